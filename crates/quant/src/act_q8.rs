//! Activations quantized to 8 bits in blocks of 32 (the counterpart of llama.cpp's `Q8_0` as the
//! right-hand side of its dot products, with an f32 scale and a precomputed block sum), used by the
//! legacy-type kernels in [`crate::dot_legacy`].
//!
//! Block `b` of a vector `x` is
//! - `d[b] = amax / 127` (f32), where `amax` is the largest `|x|` of the block,
//! - `q[32 b + i] = round_half_even(x[32 b + i] * (127 / amax))`, in `-127..=127`,
//! - `sums[b] = Σ q` over the 32 quants of the block (i32).
//!
//! An all-zero block has `d = 0` and all quants 0. So `x[i] ≈ d * q[i]` with
//! `|x[i] - d * q[i]| <= d / 2 · (1 + 1e-4)` (the slack covers the f32 roundings of `127 / amax`,
//! `amax / 127` and the product). Inputs must be finite.
//!
//! Storage layout (what the SIMD kernels want): the blocks are padded with all-zero blocks to a
//! multiple of [`GROUP`] (4), and the quants of each pair of blocks `2p`, `2p + 1` are interleaved
//! by halves: the 64 bytes of pair `p` are `q[2p][0..16], q[2p+1][0..16], q[2p][16..32],
//! q[2p+1][16..32]`. This matches the nibble layout of Q4/Q5 weights (element `j` and `j + 16` share
//! a byte), so two weight blocks unpack into two 256-bit vectors with no lane shuffles. Use
//! [`ActQ8::block_quants`] / [`ActQ8::dequantize`] for element-order access.
//!
//! [`ActQ8::quantize`] uses AVX2 when the CPU has it (and `KILN_ISA` does not force `scalar`); the
//! result is bit-identical to [`ActQ8::quantize_scalar`]: the same f32 multiply by the same
//! reciprocal, rounded half to even, in both paths.

use crate::aligned::AlignedI8;

/// Elements per activation block.
pub const QK: usize = 32;
/// Blocks are stored padded to a multiple of this many.
pub const GROUP: usize = 4;

/// Byte offset of half `h` (elements `16 h .. 16 h + 16`) of block `b` in the quant storage.
#[inline]
pub(crate) const fn half_offset(b: usize, h: usize) -> usize {
    64 * (b / 2) + 32 * h + 16 * (b % 2)
}

/// A vector of f32 activations quantized to 8 bits per element in blocks of 32.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActQ8 {
    /// Number of elements quantized (a multiple of 32).
    n: usize,
    /// Scale per block, `amax / 127`, padded with zeros to a multiple of [`GROUP`].
    d: Vec<f32>,
    /// Quants in the pair-interleaved layout, padded with zeros.
    qs: AlignedI8,
    /// Sum of the 32 quants of each block, padded with zeros.
    sums: Vec<i32>,
}

impl ActQ8 {
    /// An empty vector; [`ActQ8::quantize`] fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of elements (a multiple of 32).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no elements are held.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of blocks of 32 (not counting the padding).
    pub fn n_blocks(&self) -> usize {
        self.n / QK
    }

    /// The block scales (`n_blocks` of them).
    pub fn d(&self) -> &[f32] {
        &self.d[..self.n_blocks()]
    }

    /// The block sums of the quants (`n_blocks` of them).
    pub fn sums(&self) -> &[i32] {
        &self.sums[..self.n_blocks()]
    }

    /// The 32 quants of block `b` in element order.
    pub fn block_quants(&self, b: usize) -> [i8; QK] {
        assert!(b < self.n_blocks(), "ActQ8: block {b} out of range");
        let mut q = [0i8; QK];
        for h in 0..2 {
            let o = half_offset(b, h);
            q[16 * h..16 * h + 16].copy_from_slice(&self.qs[o..o + 16]);
        }
        q
    }

    /// The activations this vector stands for: `d * q` per element (for tests and error bounds).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.n_blocks())
            .flat_map(|b| {
                let d = self.d[b];
                self.block_quants(b).map(|v| d * f32::from(v))
            })
            .collect()
    }

    /// Raw padded storage `(d, qs, sums)` for the kernels: `d` and `sums` hold a multiple of
    /// [`GROUP`] blocks, `qs` 32 bytes per block in the pair-interleaved layout.
    pub(crate) fn raw(&self) -> (&[f32], &[i8], &[i32]) {
        (&self.d, &self.qs, &self.sums)
    }

    /// Whether the padded buffers have the lengths the element count implies.
    pub(crate) fn is_well_formed(&self) -> bool {
        let nbp = self.n_blocks().div_ceil(GROUP) * GROUP;
        self.n == self.n_blocks() * QK && self.d.len() == nbp && self.qs.len() == nbp * QK && self.sums.len() == nbp
    }

    /// Quantizes `x` (a multiple of 32 values), reusing this vector's capacity (no allocation when
    /// the length is unchanged). Uses AVX2 where available; bit-identical to
    /// [`ActQ8::quantize_scalar`].
    pub fn quantize(&mut self, x: &[f32]) {
        self.resize(x.len());
        #[cfg(target_arch = "x86_64")]
        {
            if crate::dot_legacy::simd_available() {
                // SAFETY: `simd_available` is true only after runtime detection found AVX2, FMA
                // and F16C on this CPU; `resize` made all three buffers the lengths `x` needs.
                unsafe { quantize_avx2(x, &mut self.d, &mut self.qs, &mut self.sums) };
                return;
            }
        }
        quantize_blocks_scalar(x, &mut self.d, &mut self.qs, &mut self.sums);
    }

    /// Quantizes `x` (a multiple of 32 values) with plain scalar code: the reference for the SIMD
    /// path.
    pub fn quantize_scalar(&mut self, x: &[f32]) {
        self.resize(x.len());
        quantize_blocks_scalar(x, &mut self.d, &mut self.qs, &mut self.sums);
    }

    /// Quantizes the rounding error of `first` (the quantization of `x`) as a second plane with the
    /// fixed scale `d / 256` per block, so that `x ≈ (d / 256) · (256 q + q')`: one exact integer
    /// activation per element, which lets the two-plane kernels add both planes' integer sums
    /// before the single conversion to f32. The error `x - d q` is at most `d / 2` (plus f32
    /// rounding), so `q'` stays within ±128; it is clamped to ±127 (the signed kernels move weight
    /// signs onto the activations, and `-(-128)` does not fit in a byte). The result: every
    /// element within `d / 512` of `x`, or `1.5 d / 256` in the rare clamped case.
    pub fn quantize_residual(&mut self, first: &ActQ8, x: &[f32]) {
        assert_eq!(x.len(), first.len(), "ActQ8: residual of a different length");
        self.resize(x.len());
        #[cfg(target_arch = "x86_64")]
        {
            if crate::dot_legacy::simd_available() {
                // SAFETY: as in `quantize`; `resize` gave this vector the block count of `first`
                // (asserted the same length), whose buffers are as long.
                unsafe { residual_avx2(x, first, &mut self.d, &mut self.qs, &mut self.sums) };
                return;
            }
        }
        self.residual_blocks_scalar(first, x);
    }

    /// [`Self::quantize_residual`] with plain scalar code: the reference for the SIMD path.
    pub fn quantize_residual_scalar(&mut self, first: &ActQ8, x: &[f32]) {
        assert_eq!(x.len(), first.len(), "ActQ8: residual of a different length");
        self.resize(x.len());
        self.residual_blocks_scalar(first, x);
    }

    fn residual_blocks_scalar(&mut self, first: &ActQ8, x: &[f32]) {
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let d = first.d[b];
            if d == 0.0 {
                self.d[b] = 0.0;
                self.sums[b] = 0;
                for h in 0..2 {
                    let o = half_offset(b, h);
                    self.qs[o..o + 16].fill(0);
                }
                continue;
            }
            let q1 = first.block_quants(b);
            let m = 256.0 / d;
            let mut q2 = [0i8; QK];
            for ((q, &v), &qi) in q2.iter_mut().zip(xb).zip(&q1) {
                let r = v - d * f32::from(qi);
                *q = round_small(r * m).clamp(-127.0, 127.0) as i8;
            }
            for h in 0..2 {
                let o = half_offset(b, h);
                self.qs[o..o + 16].copy_from_slice(&q2[16 * h..16 * h + 16]);
            }
            let s: i32 = q2.iter().map(|&q| i32::from(q)).sum();
            self.d[b] = d / 256.0;
            self.sums[b] = s;
        }
    }

    /// Sets the length for `n` elements and zeroes the padding blocks.
    fn resize(&mut self, n: usize) {
        assert_eq!(n % QK, 0, "ActQ8: length {n} is not a multiple of {QK}");
        let nb = n / QK;
        let nbp = nb.div_ceil(GROUP) * GROUP;
        self.n = n;
        // `resize` only allocates when growing past the capacity; real blocks are all overwritten,
        // the padding is zeroed here.
        self.d.resize(nbp, 0.0);
        self.qs.resize(nbp * QK, 0);
        self.sums.resize(nbp, 0);
        self.d[nb..].fill(0.0);
        self.sums[nb..].fill(0);
        for b in nb..nbp {
            for h in 0..2 {
                let o = half_offset(b, h);
                self.qs[o..o + 16].fill(0);
            }
        }
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22` (larger values come out
/// large and are clamped by the caller): adding and subtracting `1.5 · 2^23` leaves no fraction
/// bits, and IEEE addition rounds ties to even. Plain arithmetic, so it vectorizes (the library
/// call `rintf` does not on baseline x86-64).
#[inline(always)]
pub(crate) fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let v = v.clamp(-4_000_000.0, 4_000_000.0);
    (v + MAGIC) - MAGIC
}

/// The scale and the multiplier of a block whose largest magnitude is `amax`.
#[inline]
fn scale_of(amax: f32) -> (f32, f32) {
    if amax > 0.0 {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    }
}

fn quantize_blocks_scalar(x: &[f32], d: &mut [f32], qs: &mut [i8], sums: &mut [i32]) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, id) = scale_of(amax);
        d[b] = scale;
        let mut s = 0i32;
        for (i, &v) in xb.iter().enumerate() {
            let q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            qs[half_offset(b, i / 16) + i % 16] = q;
            s += i32::from(q);
        }
        sums[b] = s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], d: &mut [f32], qs: &mut [i8], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(nb * QK == x.len() && d.len() >= nb && sums.len() >= nb);
    assert!(qs.len() >= 64 * nb.div_ceil(2));
    // SAFETY: (for the whole body) block `b < nb` reads the 32 floats `x[32 b .. 32 b + 32]` and
    // writes 16 bytes at `half_offset(b, 0)` and at `half_offset(b, 1)`, all inside the 64 bytes
    // of its pair `b / 2`, which `qs` holds (asserted above); `d[b]` and `sums[b]` are checked
    // writes; all loads and stores are unaligned; the caller guarantees AVX2 and FMA.
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let lim_hi = _mm256_set1_ps(127.0);
        let lim_lo = _mm256_set1_ps(-127.0);
        // the packs interleave 128-bit lanes; this permutation restores element order.
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            let p = x.as_ptr().add(QK * b);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let m01 = _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
            let m23 = _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
            let m = _mm256_max_ps(m01, m23);
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
            let (scale, id) = scale_of(_mm_cvtss_f32(m1));
            d[b] = scale;
            let idv = _mm256_set1_ps(id);
            let mut r = [_mm256_setzero_si256(); 4];
            for (rk, &vk) in r.iter_mut().zip(&v) {
                let t = _mm256_mul_ps(vk, idv);
                let t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                let t = _mm256_min_ps(_mm256_max_ps(t, lim_lo), lim_hi);
                *rk = _mm256_cvtps_epi32(t);
            }
            let s = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
            sums[b] = _mm_cvtsi128_si32(s1);
            let w01 = _mm256_packs_epi32(r[0], r[1]);
            let w23 = _mm256_packs_epi32(r[2], r[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
            let q = qs.as_mut_ptr();
            _mm_storeu_si128(q.add(half_offset(b, 0)) as *mut __m128i, _mm256_castsi256_si128(bytes));
            _mm_storeu_si128(q.add(half_offset(b, 1)) as *mut __m128i, _mm256_extracti128_si256(bytes, 1));
        }
    }
}

/// The residual plane (see [`ActQ8::quantize_residual`]): per element the scalar code's f32 steps
/// (`v − d·q` as a product then a difference, times `256 / d`, rounded to nearest even, clamped to
/// ±127), eight lanes at a time, stored by halves like every plane.
///
/// # Safety
/// AVX2; `x` is `32 · nb` long for the `nb` blocks of `first`, and `d`, `qs`, `sums` have this
/// vector's padded lengths for them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn residual_avx2(x: &[f32], first: &ActQ8, d: &mut [f32], qs: &mut [i8], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    debug_assert!(first.d.len() >= nb && d.len() >= nb && sums.len() >= nb && qs.len() >= nb.div_ceil(2) * 64);
    for b in 0..nb {
        let db = first.d[b];
        let halves = [half_offset(b, 0), half_offset(b, 1)];
        if db == 0.0 {
            d[b] = 0.0;
            sums[b] = 0;
            for o in halves {
                qs[o..o + 16].fill(0);
            }
            continue;
        }
        let m = 256.0 / db;
        // SAFETY: the loads read 8 floats of block `b` of `x` and 8 quants of one of its halves
        // in `first.qs`; the stores write its two 16-byte halves in `qs`; all unaligned.
        unsafe {
            let (dv, mv) = (_mm256_set1_ps(db), _mm256_set1_ps(m));
            let (lim_hi, lim_lo) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
            let mut r = [_mm256_setzero_si256(); 4];
            for (k, rk) in r.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(x.as_ptr().add(QK * b + 8 * k));
                let src = first.qs.as_ptr().add(halves[k / 2] + 8 * (k % 2));
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(src as *const __m128i));
                let res = _mm256_sub_ps(v, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(q)));
                let t = _mm256_round_ps(_mm256_mul_ps(res, mv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                *rk = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, lim_lo), lim_hi));
            }
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm_storeu_si128(qs.as_mut_ptr().add(halves[0]) as *mut __m128i, _mm256_castsi256_si128(bytes));
            _mm_storeu_si128(qs.as_mut_ptr().add(halves[1]) as *mut __m128i, _mm256_extracti128_si256::<1>(bytes));
            let s8 = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256::<1>(s8));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            sums[b] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
        }
        d[b] = db / 256.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_basics() {
        let mut x = vec![0f32; 64];
        x[3] = -2.0;
        x[4] = 1.0;
        x[17] = 0.5;
        let mut a = ActQ8::new();
        a.quantize_scalar(&x);
        assert_eq!(a.len(), 64);
        assert_eq!(a.n_blocks(), 2);
        assert!(a.is_well_formed());
        assert_eq!(a.d(), &[2.0 / 127.0, 0.0]);
        let q = a.block_quants(0);
        assert_eq!(q[3], -127);
        assert_eq!(q[4], 64); // 63.5 rounds to even
        assert_eq!(q[17], 32); // 31.75
        assert_eq!(a.sums(), &[-127 + 64 + 32, 0]);
        assert_eq!(a.block_quants(1), [0; QK]);
        // padding: two zero blocks
        assert_eq!(a.raw().0, &[2.0 / 127.0, 0.0, 0.0, 0.0]);
        assert_eq!(a.raw().1.len(), 128);
        let mut in_storage = a.raw().1.to_vec();
        in_storage.sort();
        let mut expect = q.to_vec();
        expect.extend([0; 96]);
        expect.sort();
        assert_eq!(in_storage, expect);
        // pair layout: block 0's elements 16.. start at byte 32
        assert_eq!(a.raw().1[32 + 1], 32);
    }

    #[test]
    fn simd_matches_scalar_and_reuses_capacity() {
        let mut s = 12345u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut a = ActQ8::new();
        let mut b = ActQ8::new();
        // shrinking after a longer vector must re-zero the padding
        for n in [4128usize, 32, 96, 544, 4128, 64] {
            let mut x: Vec<f32> = (0..n).map(|i| next() * (1 + i % 7) as f32).collect();
            x[5] = 0.5;
            x[6] = -x[6] * 1e-30; // tiny values next to large ones
            if n > 64 {
                x[32..64].fill(0.0); // an all-zero block
            }
            a.quantize(&x);
            b.quantize_scalar(&x);
            assert_eq!(a, b);
            assert!(a.is_well_formed());
            let (mut ra, mut rb) = (ActQ8::new(), ActQ8::new());
            ra.quantize_residual(&a, &x);
            rb.quantize_residual_scalar(&a, &x);
            assert_eq!(ra, rb, "residual plane, n={n}");
            assert!(ra.is_well_formed() && rb.qs.iter().any(|&q| q != 0));
            let ptrs = (a.d.as_ptr(), a.qs.as_ptr(), a.sums.as_ptr());
            a.quantize(&x);
            assert_eq!(ptrs, (a.d.as_ptr(), a.qs.as_ptr(), a.sums.as_ptr()));
            for (b, (bx, &d)) in x.chunks_exact(QK).zip(a.d()).enumerate() {
                for (&v, qv) in bx.iter().zip(a.block_quants(b)) {
                    assert!((v - d * f32::from(qv)).abs() <= d * 0.5 * (1.0 + 1e-4));
                }
            }
        }
    }
}
