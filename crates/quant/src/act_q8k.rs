//! Activations quantized to 8 bits in super-blocks of 256 (the counterpart of llama.cpp's `Q8_K`), the
//! right-hand side of the k-quant dot products in [`crate::dot_kquant`].
//!
//! Super-block `b` of a vector `x` is stored as
//! - `d[b] = amax / 127` (f32), where `amax` is the largest `|x|` of the super-block,
//! - `qs[256 b + i] = round_ties_even(x[256 b + i] * (127 / amax))`, in `-127..=127`,
//! - `bsums[16 b + g] = Σ qs` over the 16 elements `16 g .. 16 g + 16` of the super-block.
//!
//! An all-zero super-block has `d = 0` and all quants 0. So `x[i] ≈ d * qs[i]` with
//! `|x[i] - d * qs[i]| <= d / 2` (up to one f32 rounding of `x * (127 / amax)`).
//!
//! [`ActQ8K::quantize`] uses AVX2 when the CPU has it (and `KILN_ISA` does not force `scalar`); the
//! result is bit-identical to [`ActQ8K::quantize_scalar`]: the same f32 multiply by the same
//! reciprocal, rounded half to even in both paths.

use crate::aligned::AlignedI8;

/// Elements per activation super-block.
pub const QK_K: usize = 256;

/// A vector of f32 activations quantized to 8 bits per element in super-blocks of 256.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActQ8K {
    /// Scale per super-block: `amax / 127`.
    pub d: Vec<f32>,
    /// Quants, 256 per super-block, in `-127..=127`.
    pub qs: AlignedI8,
    /// Sums of the quants per group of 16 elements, 16 per super-block.
    pub bsums: Vec<i16>,
}

impl ActQ8K {
    /// An empty vector; [`ActQ8K::quantize`] fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of elements (a multiple of 256).
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether no elements are held.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }

    /// Number of super-blocks of 256.
    pub fn n_blocks(&self) -> usize {
        self.d.len()
    }

    /// Quantizes `x` (a multiple of 256 values), reusing this vector's capacity. Uses AVX2 where
    /// available; bit-identical to [`ActQ8K::quantize_scalar`].
    pub fn quantize(&mut self, x: &[f32]) {
        self.resize(x.len());
        #[cfg(target_arch = "x86_64")]
        {
            if crate::dot_kquant::active_isa() != "scalar" {
                // SAFETY: `active_isa` reports a SIMD level only after runtime detection found AVX2
                // and FMA on this CPU; `resize` made all three buffers the right length.
                unsafe { quantize_avx2(x, &mut self.d, &mut self.qs, &mut self.bsums) };
                return;
            }
        }
        quantize_blocks_scalar(x, &mut self.d, &mut self.qs, &mut self.bsums);
    }

    /// Quantizes `x` (a multiple of 256 values) with plain scalar code: the reference for the SIMD path.
    pub fn quantize_scalar(&mut self, x: &[f32]) {
        self.resize(x.len());
        quantize_blocks_scalar(x, &mut self.d, &mut self.qs, &mut self.bsums);
    }

    /// Quantizes the rounding error of `first` (the quantization of `x`) as a second plane with the
    /// fixed scale `d / 256` per super-block, so that `x ≈ (d / 256) · (256 q + q')` (the same
    /// scheme as [`crate::act_q8::ActQ8::quantize_residual`], which explains the clamp to ±127).
    pub fn quantize_residual(&mut self, first: &ActQ8K, x: &[f32]) {
        assert_eq!(x.len(), first.len(), "ActQ8K: residual of a different length");
        self.resize(x.len());
        #[cfg(target_arch = "x86_64")]
        {
            if crate::dot_kquant::active_isa() != "scalar" {
                // SAFETY: as in `quantize`: AVX2 and FMA were detected; `resize` made the buffers
                // `x.len()` (and `first`'s are as long, asserted above).
                unsafe { residual_avx2(x, &first.d, &first.qs, &mut self.d, &mut self.qs, &mut self.bsums) };
                return;
            }
        }
        self.residual_blocks_scalar(first, x);
    }

    /// [`Self::quantize_residual`] with plain scalar code: the reference for the SIMD path.
    pub fn quantize_residual_scalar(&mut self, first: &ActQ8K, x: &[f32]) {
        assert_eq!(x.len(), first.len(), "ActQ8K: residual of a different length");
        self.resize(x.len());
        self.residual_blocks_scalar(first, x);
    }

    fn residual_blocks_scalar(&mut self, first: &ActQ8K, x: &[f32]) {
        for (b, xb) in x.chunks_exact(QK_K).enumerate() {
            let d = first.d[b];
            let qb = &mut self.qs[b * QK_K..(b + 1) * QK_K];
            if d != 0.0 {
                let m = 256.0 / d;
                for ((q, &v), &q1) in qb.iter_mut().zip(xb).zip(&first.qs[b * QK_K..(b + 1) * QK_K]) {
                    let r = v - d * f32::from(q1);
                    *q = crate::act_q8::round_small(r * m).clamp(-127.0, 127.0) as i8;
                }
            }
            self.d[b] = d / 256.0;
            fill_bsums(qb, &mut self.bsums[16 * b..16 * b + 16]);
        }
    }

    /// The activations this vector stands for: `d * q` per element (for tests and error bounds).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.chunks_exact(QK_K).zip(&self.d).flat_map(|(q, &d)| q.iter().map(move |&v| d * v as f32)).collect()
    }

    fn resize(&mut self, n: usize) {
        assert_eq!(n % QK_K, 0, "ActQ8K: length {n} is not a multiple of {QK_K}");
        let nb = n / QK_K;
        self.d.clear();
        self.d.resize(nb, 0.0);
        self.qs.clear();
        self.qs.resize(n, 0);
        self.bsums.clear();
        self.bsums.resize(nb * 16, 0);
    }
}

/// The scale and the multiplier of a super-block whose largest magnitude is `amax`.
#[inline]
fn scale_of(amax: f32) -> (f32, f32) {
    if amax > 0.0 {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    }
}

fn quantize_blocks_scalar(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    for (((xb, db), qb), sb) in
        x.chunks_exact(QK_K).zip(d.iter_mut()).zip(qs.chunks_exact_mut(QK_K)).zip(bsums.chunks_exact_mut(16))
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, id) = scale_of(amax);
        *db = scale;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        fill_bsums(qb, sb);
    }
}

#[inline]
fn fill_bsums(qb: &[i8], sb: &mut [i16]) {
    for (s, g) in sb.iter_mut().zip(qb.chunks_exact(16)) {
        *s = g.iter().map(|&v| v as i16).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), qs.len());
    debug_assert_eq!(d.len() * QK_K, x.len());
    debug_assert_eq!(bsums.len(), d.len() * 16);
    for (b, db) in d.iter_mut().enumerate() {
        let xb = &x[b * QK_K..(b + 1) * QK_K];
        let qb = &mut qs[b * QK_K..(b + 1) * QK_K];
        // SAFETY: every load reads 8 floats inside `xb` (256 long), every store writes 32 bytes
        // inside `qb` (256 long); unaligned loads/stores are used throughout, and the caller
        // guarantees AVX2 is present.
        unsafe {
            let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut m = _mm256_setzero_ps();
            for c in 0..QK_K / 8 {
                let v = _mm256_loadu_ps(xb.as_ptr().add(8 * c));
                m = _mm256_max_ps(m, _mm256_and_ps(v, abs_mask));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
            let amax = _mm_cvtss_f32(m1);
            let (scale, id) = scale_of(amax);
            *db = scale;
            let idv = _mm256_set1_ps(id);
            let lim_hi = _mm256_set1_ps(127.0);
            let lim_lo = _mm256_set1_ps(-127.0);
            // packs interleave 128-bit lanes; this permutation restores element order.
            let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for c in 0..QK_K / 32 {
                let p = xb.as_ptr().add(32 * c);
                let mut r = [_mm256_setzero_si256(); 4];
                for (k, rk) in r.iter_mut().enumerate() {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * k)), idv);
                    let v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    let v = _mm256_min_ps(_mm256_max_ps(v, lim_lo), lim_hi);
                    *rk = _mm256_cvtps_epi32(v);
                }
                let w01 = _mm256_packs_epi32(r[0], r[1]);
                let w23 = _mm256_packs_epi32(r[2], r[3]);
                let bytes = _mm256_packs_epi16(w01, w23);
                let bytes = _mm256_permutevar8x32_epi32(bytes, perm);
                _mm256_storeu_si256(qb.as_mut_ptr().add(32 * c) as *mut __m256i, bytes);
            }
        }
        fill_bsums(qb, &mut bsums[16 * b..16 * b + 16]);
    }
}

/// The residual plane of one vector (see [`ActQ8K::quantize_residual`]): per element the same f32
/// steps as the scalar code (`v − d·q` as a product then a difference, times `256 / d`, rounded to
/// nearest even, clamped to ±127), eight lanes at a time.
///
/// # Safety
/// AVX2 and FMA; `x`, `q1` and `qs` are `256 · d1.len()` long, `d` as long as `d1`, `bsums` 16 per
/// super-block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn residual_avx2(x: &[f32], d1: &[f32], q1: &[i8], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == q1.len() && x.len() == qs.len() && d1.len() * QK_K == x.len());
    debug_assert!(d.len() == d1.len() && bsums.len() == d1.len() * 16);
    for (b, (&db, dout)) in d1.iter().zip(d.iter_mut()).enumerate() {
        let qb = &mut qs[b * QK_K..(b + 1) * QK_K];
        if db != 0.0 {
            let m = 256.0 / db;
            // SAFETY: every load reads 8 floats or 8 bytes inside block `b` of `x` / `q1`, every
            // store writes 32 bytes inside `qb`; all unaligned.
            unsafe {
                let (dv, mv) = (_mm256_set1_ps(db), _mm256_set1_ps(m));
                let (lim_hi, lim_lo) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
                let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
                for c in 0..QK_K / 32 {
                    let at = b * QK_K + 32 * c;
                    let mut r = [_mm256_setzero_si256(); 4];
                    for (k, rk) in r.iter_mut().enumerate() {
                        let v = _mm256_loadu_ps(x.as_ptr().add(at + 8 * k));
                        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q1.as_ptr().add(at + 8 * k) as *const __m128i));
                        let res = _mm256_sub_ps(v, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(q)));
                        let t = _mm256_round_ps(_mm256_mul_ps(res, mv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                        *rk = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, lim_lo), lim_hi));
                    }
                    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
                    _mm256_storeu_si256(
                        qb.as_mut_ptr().add(32 * c) as *mut __m256i,
                        _mm256_permutevar8x32_epi32(bytes, perm),
                    );
                }
            }
        }
        *dout = db / 256.0;
        fill_bsums(qb, &mut bsums[16 * b..16 * b + 16]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_basics() {
        let mut x = vec![0f32; 512];
        x[3] = -2.0;
        x[4] = 1.0;
        x[17] = 0.5;
        let mut a = ActQ8K::new();
        a.quantize_scalar(&x);
        assert_eq!(a.len(), 512);
        assert_eq!(a.d, vec![2.0 / 127.0, 0.0]);
        assert_eq!(a.qs[3], -127);
        assert_eq!(a.qs[4], 64); // 63.5 rounds to even
        assert_eq!(a.qs[17], 32); // 31.75
        assert_eq!(a.bsums[0], -63);
        assert_eq!(a.bsums[1], 32);
        assert!(a.qs[256..].iter().all(|&q| q == 0));
    }

    #[test]
    fn simd_matches_scalar() {
        let mut s = 12345u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for n in [256usize, 768, 4096] {
            let mut x: Vec<f32> = (0..n).map(|i| next() * (1 + i % 7) as f32).collect();
            x[5] = 0.5; // exact ties after scaling are exercised by the rounding below
            if n > 256 {
                x[256..512].fill(0.0); // an all-zero super-block: d = 0, no residual
            }
            let mut a = ActQ8K::new();
            let mut b = ActQ8K::new();
            a.quantize(&x);
            b.quantize_scalar(&x);
            assert_eq!(a, b);
            let (mut ra, mut rb) = (ActQ8K::new(), ActQ8K::new());
            ra.quantize_residual(&a, &x);
            rb.quantize_residual_scalar(&a, &x);
            assert_eq!(ra, rb, "residual plane, n={n}");
            assert!(rb.qs.iter().any(|&q| q != 0));
        }
    }
}
