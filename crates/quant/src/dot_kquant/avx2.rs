//! AVX2 + FMA + F16C kernels.
//!
//! Every kernel unpacks a weight super-block once into 8 vectors of 32 quants (unsigned bytes, or
//! signed codebook values for IQ4_XS) plus 8 vectors of i16 scales laid out for `vpmaddwd`, then for
//! each of the 1..=4 activation vectors:
//! `vpmaddubsw(q, a)` (u8 × i8 → pairs summed in i16; |q| ≤ 63 and |a| ≤ 127 keep it far from
//! saturation), `vpmaddwd` with the scales (→ i32), summed in i32, converted once per super-block
//! and accumulated with one FMA by `d · da`. Offsets (`q - 32`, `q - 4`) and mins are taken from the
//! activation's `bsums` in integers, the mins with a second FMA by `dmin · da`.
//!
//! Scales per 16 elements: a 32-byte chunk covers groups `2c` (low 128-bit lane, as `vpmaddubsw`
//! works within lanes) and `2c + 1` (high lane), so the scale vector holds `sc[2c]` in its low lane
//! and `sc[2c + 1]` in its high lane.

use super::QK_K;
use crate::act_q8k::ActQ8K;
use crate::iq4_nl::KVALUES_IQ4NL;
use kiln_gguf::GgmlType;
use std::arch::x86_64::*;

/// Runs the kernel of `ty` for `acts.len()` (1..=4) activation vectors.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `row` must be whole super-blocks of `ty` and every
/// activation vector must hold exactly as many super-blocks (with consistent `d`, `qs`, `bsums`).
pub(super) unsafe fn vec_dot_multi(ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match acts.len() {
            1 => run::<1>(ty, row, acts, out),
            2 => run::<2>(ty, row, acts, out),
            3 => run::<3>(ty, row, acts, out),
            4 => run::<4>(ty, row, acts, out),
            n => unreachable!("{n} activation vectors"),
        }
    }
}

#[inline(always)]
unsafe fn run<const N: usize>(ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    let acts: &[&ActQ8K; N] = acts.try_into().unwrap();
    let out: &mut [f32; N] = out.try_into().unwrap();
    // SAFETY: forwarded from `vec_dot_multi`'s contract.
    unsafe {
        match ty {
            GgmlType::Q2_K => q2k::<N>(row, acts, out),
            GgmlType::Q3_K => q3k::<N>(row, acts, out),
            GgmlType::Q4_K => q4k::<N, false>(row, acts, out),
            GgmlType::Q5_K => q4k::<N, true>(row, acts, out),
            GgmlType::Q6_K => q6k::<N>(row, acts, out),
            GgmlType::IQ4_XS => iq4xs::<N>(row, acts, out),
            other => unreachable!("{other:?}"),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`; the load is unaligned.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; the load is unaligned.
    unsafe { _mm_loadu_si128(p as *const __m128i) }
}

/// The f16 stored little-endian at `p`, widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn u32_at(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes at `p`.
    u32::from_le(unsafe { (p as *const u32).read_unaligned() })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `vpshufb` controls that spread i16 scales over the chunks of a super-block.
///
/// They are hidden from the optimizer (`black_box`): seeing constant controls on a broadcast, LLVM
/// rewrites each `vpshufb` into three shuffles (`vpshuflw`, `vpshufd`, `vpermq`), which makes the
/// shuffle port the bottleneck; opaque controls stay one `vpshufb` with a memory operand.
#[derive(Clone, Copy)]
struct ScaleMasks {
    /// Chunk `j` of 32 takes i16 element `j` in both lanes.
    per32: [__m256i; 8],
    /// Chunk `c` takes i16 element `2(c mod 4)` into the low lane and `2(c mod 4) + 1` into the
    /// high lane (of the source holding groups 0..8 for `c < 4`, else 8..16).
    per16: [__m256i; 8],
}

/// The scale vector of each chunk, as a `vpshufb` of one of two sources: built lazily inside the dot
/// loop for one activation vector (fewer live registers), or once per block for several.
#[derive(Clone, Copy)]
struct ScaleSrc<'a> {
    src: [__m256i; 2],
    masks: &'a [__m256i; 8],
    /// Build inside the dot loop when there is one activation vector (measured: faster for the
    /// per-32 layouts, slower for the per-16 ones, which have more live unpacked state).
    lazy: bool,
}

impl ScaleSrc<'_> {
    #[inline]
    fn precomputed<const N: usize>(&self) -> bool {
        N > 1 || !self.lazy
    }
}

impl ScaleSrc<'_> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn get(&self, c: usize) -> __m256i {
        _mm256_shuffle_epi8(self.src[c / 4], self.masks[c])
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn all(&self) -> [__m256i; 8] {
        core::array::from_fn(|c| self.get(c))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_masks() -> ScaleMasks {
    let pair = |e: usize| (((2 * e + 1) << 8) | (2 * e)) as i16;
    std::hint::black_box(ScaleMasks {
        per32: core::array::from_fn(|j| _mm256_set1_epi16(pair(j))),
        per16: core::array::from_fn(|c| {
            let k = c % 4;
            _mm256_set_m128i(_mm_set1_epi16(pair(2 * k + 1)), _mm_set1_epi16(pair(2 * k)))
        }),
    })
}

/// Scale sources for 8 scales per 32 elements, given as 8 i16 in `s`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales_per32(s: __m128i, m: &ScaleMasks) -> ScaleSrc<'_> {
    let b = _mm256_broadcastsi128_si256(s);
    ScaleSrc { src: [b, b], masks: &m.per32, lazy: true }
}

/// Scale sources for 16 scales per 16 elements, given as i16 groups 0..8 in `lo` and 8..16 in `hi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales_per16(lo: __m128i, hi: __m128i, m: &ScaleMasks) -> ScaleSrc<'_> {
    ScaleSrc { src: [_mm256_broadcastsi128_si256(lo), _mm256_broadcastsi128_si256(hi)], masks: &m.per16, lazy: false }
}

/// The scale vectors of a block: none kept for one activation vector (built inside [`dot_u8`]),
/// all 8 built once for several.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prepare<const N: usize>(sv: &ScaleSrc<'_>) -> [__m256i; 8] {
    if sv.precomputed::<N>() {
        sv.all()
    } else {
        [_mm256_setzero_si256(); 8]
    }
}

/// `Σ_c vpmaddwd(vpmaddubsw(w[c], a[c]), s[c])` over the 8 chunks of 32 of one super-block, 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8<const N: usize>(w: &[__m256i; 8], sv: &ScaleSrc<'_>, pre: &[__m256i; 8], q8: *const u8) -> __m256i {
    let mut acc = [_mm256_setzero_si256(); 2];
    for c in 0..8 {
        // SAFETY: the caller guarantees 256 readable activation bytes at `q8`.
        let a = unsafe { load(q8.add(32 * c)) };
        let sc = if sv.precomputed::<N>() { pre[c] } else { sv.get(c) };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], a), sc);
        acc[c % 2] = _mm256_add_epi32(acc[c % 2], p);
    }
    _mm256_add_epi32(acc[0], acc[1])
}

/// Like [`dot_u8`] for signed weights: `wa` = |w|, the sign of `w` moved onto the activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8<const N: usize>(
    w: &[__m256i; 8],
    wa: &[__m256i; 8],
    sv: &ScaleSrc<'_>,
    pre: &[__m256i; 8],
    q8: *const u8,
) -> __m256i {
    let mut acc = [_mm256_setzero_si256(); 2];
    for c in 0..8 {
        // SAFETY: the caller guarantees 256 readable activation bytes at `q8`.
        let a = unsafe { load(q8.add(32 * c)) };
        let p = _mm256_maddubs_epi16(wa[c], _mm256_sign_epi8(a, w[c]));
        let sc = if sv.precomputed::<N>() { pre[c] } else { sv.get(c) };
        acc[c % 2] = _mm256_add_epi32(acc[c % 2], _mm256_madd_epi16(p, sc));
    }
    _mm256_add_epi32(acc[0], acc[1])
}

/// Pointers to super-block `i` of an activation vector: quants, bsums, scale.
#[inline(always)]
unsafe fn act_block(a: &ActQ8K, i: usize) -> (*const u8, *const u8, f32) {
    // SAFETY: the caller guarantees `i` < the number of super-blocks of `a`.
    unsafe {
        (a.qs.as_ptr().add(QK_K * i) as *const u8, a.bsums.as_ptr().add(16 * i) as *const u8, *a.d.get_unchecked(i))
    }
}

/// One Q4_K / Q5_K super-block unpacked: its two f16 scales, the per-32 scale source, the mins
/// (each twice, once per group of 16, to pair with the per-16 bsums) and the 8 × 32 quants.
struct Q4kBlock<'a> {
    d: f32,
    dmin: f32,
    /// The 8 six-bit scales, one per byte (sub-block `j` in byte `j`).
    sc8: u64,
    s: ScaleSrc<'a>,
    mins: __m256i,
    w: [__m256i; 8],
}

/// Unpacks the super-block at `b` (Q5_K with `FIVE`).
///
/// # Safety
/// AVX2/FMA/F16C; `b` points to one whole super-block (144 bytes, 176 with `FIVE`): header 16
/// bytes, qh 32 bytes at 16 (Q5_K), qs 128 bytes at 16 or 48; all loads are unaligned.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_block<const FIVE: bool>(b: *const u8, masks: &ScaleMasks) -> Q4kBlock<'_> {
    // SAFETY: every read stays inside the super-block (the caller's contract).
    unsafe {
        let d = f16_at(b);
        let dmin = f16_at(b.add(2));
        let (u0, u1, u2) = (u32_at(b.add(4)), u32_at(b.add(8)), u32_at(b.add(12)));
        const L6: u32 = 0x3f3f_3f3f;
        const L4: u32 = 0x0f0f_0f0f;
        const H2: u32 = 0x0303_0303;
        let sc_hi = (u2 & L4) | (((u0 >> 6) & H2) << 4);
        let mn_hi = ((u2 >> 4) & L4) | (((u1 >> 6) & H2) << 4);
        let sc = (u0 & L6) as u64 | ((sc_hi as u64) << 32);
        let mn = (u1 & L6) as u64 | ((mn_hi as u64) << 32);
        let s = scales_per32(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)), masks);
        let mn8 = _mm_cvtsi64_si128(mn as i64);
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));

        let m4 = _mm256_set1_epi8(0x0F);
        let qs = b.add(if FIVE { 48 } else { 16 });
        let mut w = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            let q = load(qs.add(32 * k));
            w[2 * k] = _mm256_and_si256(q, m4);
            w[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        }
        if FIVE {
            // Bit j of qh byte l is the fifth bit of sub-block j: walk the bits down to bit 0 and
            // move each to bit 4 (bits shifted across bytes are masked off).
            let m10 = _mm256_set1_epi8(0x10);
            let mut h = load(b.add(16));
            for wj in w.iter_mut() {
                let bit = _mm256_and_si256(_mm256_slli_epi16(h, 4), m10);
                *wj = _mm256_or_si256(*wj, bit);
                h = _mm256_srli_epi16(h, 1);
            }
        }
        Q4kBlock { d, dmin, sc8: sc, s, mins, w }
    }
}

/// Q4_K (and Q5_K with `FIVE`): 8 sub-blocks of 32, 6-bit scales and mins.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k<const N: usize, const FIVE: bool>(row: &[u8], acts: &[&ActQ8K; N], out: &mut [f32; N]) {
    let bs = if FIVE { 176 } else { 144 };
    let nb = row.len() / bs;
    let masks = scale_masks();
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * bs), bs.div_ceil(64));
        // SAFETY: block `i` lies inside `row` (nb whole blocks), every activation vector has `nb`
        // super-blocks (caller's contract); all loads are unaligned and stay within those bounds:
        // header 16 bytes, qh 32 bytes at 16 (Q5_K), qs 128 bytes at 16 or 48.
        unsafe {
            let Q4kBlock { d, dmin, s, mins, w, .. } = q4k_block::<FIVE>(row.as_ptr().add(i * bs), &masks);
            let pre = prepare::<N>(&s);
            for n in 0..N {
                let (q8, bsums, da) = act_block(acts[n], i);
                let sumi = dot_u8::<N>(&w, &s, &pre, q8);
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc[n]);
                let pm = _mm256_madd_epi16(mins, load(bsums));
                accm[n] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(pm), accm[n]);
            }
        }
    }
    for n in 0..N {
        out[n] = hsum_ps(acc[n]) - hsum_ps(accm[n]);
    }
}

/// Whether `ty` has a two-plane kernel ([`vec_dot_planes`]).
pub(super) fn has_planes_kernel(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K)
}

/// Two-plane activations of 1 or 2 tokens: `out[t]` = row · (`acts[2t]`, `acts[2t + 1]`), the
/// second plane the residual plane of the first (scale `d / 256`). Per super-block both planes'
/// scaled integer sums are formed lane by lane, the first shifted left by 8 and added to the second
/// (each lane of the first is at most `8 · 63 · 4 · 31 · 127 < 2^23`, so the sum stays below
/// `2^31`), then converted and scaled once by `d · d′`; the mins likewise from both planes' bsums.
///
/// With `vnni` the byte products run in `vpdpbusd` ([`q4k_planes_vnni`]): the same integers per
/// lane, the same bits.
///
/// # Safety
/// As [`vec_dot_multi`], with `acts.len() == 2 · out.len()`, `out.len()` 1 or 2, and `ty` one of
/// [`has_planes_kernel`]; with `vnni`, the CPU must also have AVX-512 F/BW/VL/VNNI.
pub(super) unsafe fn vec_dot_planes(vnni: bool, ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match (ty, out.len(), vnni) {
            (GgmlType::Q4_K, 1, false) => q4k_planes::<1, false>(row, acts, out),
            (GgmlType::Q4_K, 2, false) => q4k_planes::<2, false>(row, acts, out),
            (GgmlType::Q5_K, 1, false) => q4k_planes::<1, true>(row, acts, out),
            (GgmlType::Q5_K, 2, false) => q4k_planes::<2, true>(row, acts, out),
            (GgmlType::Q4_K, 1, true) => q4k_planes_vnni::<1, false>(row, acts, out),
            (GgmlType::Q4_K, 2, true) => q4k_planes_vnni::<2, false>(row, acts, out),
            (GgmlType::Q5_K, 1, true) => q4k_planes_vnni::<1, true>(row, acts, out),
            (GgmlType::Q5_K, 2, true) => q4k_planes_vnni::<2, true>(row, acts, out),
            (other, n, _) => unreachable!("{other:?} × {n}"),
        }
    }
}

/// The mins' integer term of two planes: `(Σ m·bsums₁) << 8 + Σ m·bsums₂`, 8 × i32.
///
/// # Safety
/// AVX2; `bsums1` and `bsums2` point to 16 readable i16 each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mins_planes(mins: __m256i, bsums1: *const u8, bsums2: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        _mm256_add_epi32(
            _mm256_slli_epi32(_mm256_madd_epi16(mins, load(bsums1)), 8),
            _mm256_madd_epi16(mins, load(bsums2)),
        )
    }
}

/// [`dot_u8`] for the two planes at `q1`, `q2` at once (the scale vectors built once for both):
/// `(Σ_c first) << 8 + Σ_c second`, 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_planes<const N: usize>(
    w: &[__m256i; 8],
    sv: &ScaleSrc<'_>,
    pre: &[__m256i; 8],
    q1: *const u8,
    q2: *const u8,
) -> __m256i {
    let mut acc1 = [_mm256_setzero_si256(); 2];
    let mut acc2 = [_mm256_setzero_si256(); 2];
    for c in 0..8 {
        // SAFETY: the caller guarantees 256 readable activation bytes at `q1` and at `q2`.
        let (a1, a2) = unsafe { (load(q1.add(32 * c)), load(q2.add(32 * c))) };
        let sc = if sv.precomputed::<N>() { pre[c] } else { sv.get(c) };
        acc1[c % 2] = _mm256_add_epi32(acc1[c % 2], _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], a1), sc));
        acc2[c % 2] = _mm256_add_epi32(acc2[c % 2], _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], a2), sc));
    }
    let first = _mm256_add_epi32(acc1[0], acc1[1]);
    _mm256_add_epi32(_mm256_slli_epi32(first, 8), _mm256_add_epi32(acc2[0], acc2[1]))
}

/// Q4_K / Q5_K against `NT` two-plane activations (see [`vec_dot_planes`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_planes<const NT: usize, const FIVE: bool>(row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    let bs = if FIVE { 176 } else { 144 };
    let nb = row.len() / bs;
    let masks = scale_masks();
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut accm = [_mm256_setzero_ps(); NT];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * bs), bs.div_ceil(64));
        // SAFETY: as in `q4k`: block `i` lies inside `row`, every activation vector has `nb`
        // super-blocks; all loads are unaligned and stay within those bounds.
        unsafe {
            let Q4kBlock { d, dmin, s, mins, w, .. } = q4k_block::<FIVE>(row.as_ptr().add(i * bs), &masks);
            let pre = prepare::<NT>(&s);
            for t in 0..NT {
                let (q1, bsums1, _) = act_block(acts[2 * t], i);
                let (q2, bsums2, da2) = act_block(acts[2 * t + 1], i);
                let sumi = dot_u8_planes::<NT>(&w, &s, &pre, q1, q2);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * da2), _mm256_cvtepi32_ps(sumi), acc[t]);
                let pm = mins_planes(mins, bsums1, bsums2);
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da2), _mm256_cvtepi32_ps(pm), accm[t]);
            }
        }
    }
    for t in 0..NT {
        out[t] = hsum_ps(acc[t]) - hsum_ps(accm[t]);
    }
}

/// [`q4k_planes`] with the byte products in `vpdpbusd`: per chunk of 32 (one sub-block) the first
/// plane's four-product lane sums, shifted left by 8, are the start of the second plane's, and
/// the sub-block's scale multiplies the result (`vpmulld`). Lane for lane these are the AVX2
/// kernel's integers (`Σ_c sc_c (256 D1 + D2)` of the same four products), with 3 multiplies per
/// chunk instead of 4 and no scale shuffles.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_planes_vnni<const NT: usize, const FIVE: bool>(row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    let bs = if FIVE { 176 } else { 144 };
    let nb = row.len() / bs;
    let masks = scale_masks();
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut accm = [_mm256_setzero_ps(); NT];
    let mut scs = [0i32; 8];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * bs), bs.div_ceil(64));
        // SAFETY: as in `q4k`: block `i` lies inside `row`, every activation vector has `nb`
        // super-blocks; all loads are unaligned and stay within those bounds; `scs` holds 8 i32.
        unsafe {
            let Q4kBlock { d, dmin, sc8, mins, w, .. } = q4k_block::<FIVE>(row.as_ptr().add(i * bs), &masks);
            let sc32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc8 as i64));
            _mm256_storeu_si256(scs.as_mut_ptr() as *mut __m256i, sc32);
            for t in 0..NT {
                let (q1, bsums1, _) = act_block(acts[2 * t], i);
                let (q2, bsums2, da2) = act_block(acts[2 * t + 1], i);
                let mut part = [_mm256_setzero_si256(); 2];
                for c in 0..8 {
                    let x = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[c], load(q1.add(32 * c)));
                    let x = _mm256_dpbusd_epi32(_mm256_slli_epi32::<8>(x), w[c], load(q2.add(32 * c)));
                    part[c % 2] = _mm256_add_epi32(part[c % 2], _mm256_mullo_epi32(x, _mm256_set1_epi32(scs[c])));
                }
                let sumi = _mm256_add_epi32(part[0], part[1]);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * da2), _mm256_cvtepi32_ps(sumi), acc[t]);
                let pm = mins_planes(mins, bsums1, bsums2);
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da2), _mm256_cvtepi32_ps(pm), accm[t]);
            }
        }
    }
    for t in 0..NT {
        out[t] = hsum_ps(acc[t]) - hsum_ps(accm[t]);
    }
}

/// Q6_K: 16 groups of 16, quants 0..64 biased by 32, signed 8-bit scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const N: usize>(row: &[u8], acts: &[&ActQ8K; N], out: &mut [f32; N]) {
    const BS: usize = 210;
    let nb = row.len() / BS;
    let masks = scale_masks();
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * BS), BS.div_ceil(64));
        // SAFETY: block `i` lies inside `row`; ql 128 bytes at 0, qh 64 at 128, scales 16 at 192,
        // d at 208; activation super-block `i` exists (caller's contract). Unaligned loads.
        unsafe {
            let b = row.as_ptr().add(i * BS);
            let d = f16_at(b.add(208));
            let sc8 = load128(b.add(192));
            let s = scales_per16(_mm_cvtepi8_epi16(sc8), _mm_cvtepi8_epi16(_mm_srli_si128(sc8, 8)), &masks);
            let sc16 = _mm256_cvtepi8_epi16(sc8);
            let mut w = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let a = load(b.add(64 * h));
                let bb = load(b.add(64 * h + 32));
                let hb = load(b.add(128 + 32 * h));
                let hi0 = _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30);
                let hi1 = _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30);
                let hi2 = _mm256_and_si256(hb, m30);
                let hi3 = _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30);
                w[4 * h] = _mm256_or_si256(_mm256_and_si256(a, m4), hi0);
                w[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(bb, m4), hi1);
                w[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), hi2);
                w[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bb, 4), m4), hi3);
            }
            let pre = prepare::<N>(&s);
            for n in 0..N {
                let (q8, bsums, da) = act_block(acts[n], i);
                let dot = dot_u8::<N>(&w, &s, &pre, q8);
                // Σ_g sc_g · 32 · bsum_g: the bias of the quants.
                let off = _mm256_madd_epi16(sc16, load(bsums));
                let sumi = _mm256_sub_epi32(dot, _mm256_slli_epi32(off, 5));
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc[n]);
            }
        }
    }
    for n in 0..N {
        out[n] = hsum_ps(acc[n]);
    }
}

/// Q3_K: 16 groups of 16, quants `lo | hbit << 2` biased by 4, signed 6-bit scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k<const N: usize>(row: &[u8], acts: &[&ActQ8K; N], out: &mut [f32; N]) {
    const BS: usize = 110;
    let nb = row.len() / BS;
    let masks = scale_masks();
    let m3 = _mm256_set1_epi8(3);
    let m04 = _mm256_set1_epi8(4);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * BS), BS.div_ceil(64));
        // SAFETY: block `i` lies inside `row`; hmask 32 bytes at 0, qs 64 at 32, scales 12 at 96,
        // d at 108; activation super-block `i` exists (caller's contract). Unaligned loads.
        unsafe {
            let b = row.as_ptr().add(i * BS);
            let d = f16_at(b.add(108));
            let (a0, a1, a2) = (u32_at(b.add(96)), u32_at(b.add(100)), u32_at(b.add(104)));
            const L4: u32 = 0x0f0f_0f0f;
            const H2: u32 = 0x0303_0303;
            let s0 = (a0 & L4) | ((a2 & H2) << 4);
            let s1 = (a1 & L4) | (((a2 >> 2) & H2) << 4);
            let s2 = ((a0 >> 4) & L4) | (((a2 >> 4) & H2) << 4);
            let s3 = ((a1 >> 4) & L4) | (((a2 >> 6) & H2) << 4);
            let lo = s0 as u64 | ((s1 as u64) << 32);
            let hi = s2 as u64 | ((s3 as u64) << 32);
            let sc8 = _mm_sub_epi8(_mm_set_epi64x(hi as i64, lo as i64), _mm_set1_epi8(32));
            let s = scales_per16(_mm_cvtepi8_epi16(sc8), _mm_cvtepi8_epi16(_mm_srli_si128(sc8, 8)), &masks);
            let sc16 = _mm256_cvtepi8_epi16(sc8);

            let mut h = load(b);
            let mut w = [_mm256_setzero_si256(); 8];
            for hh in 0..2 {
                let q = load(b.add(32 + 32 * hh));
                let lows = [q, _mm256_srli_epi16(q, 2), _mm256_srli_epi16(q, 4), _mm256_srli_epi16(q, 6)];
                for (s_, l) in lows.into_iter().enumerate() {
                    // Bit c = 4·hh + s_ of each hmask byte, moved to bit 2.
                    let bit = _mm256_and_si256(_mm256_slli_epi16(h, 2), m04);
                    h = _mm256_srli_epi16(h, 1);
                    w[4 * hh + s_] = _mm256_or_si256(_mm256_and_si256(l, m3), bit);
                }
            }
            let pre = prepare::<N>(&s);
            for n in 0..N {
                let (q8, bsums, da) = act_block(acts[n], i);
                let dot = dot_u8::<N>(&w, &s, &pre, q8);
                let off = _mm256_madd_epi16(sc16, load(bsums));
                let sumi = _mm256_sub_epi32(dot, _mm256_slli_epi32(off, 2));
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc[n]);
            }
        }
    }
    for n in 0..N {
        out[n] = hsum_ps(acc[n]);
    }
}

/// Q2_K: 16 groups of 16, 2-bit quants, 4-bit scales and mins.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2k<const N: usize>(row: &[u8], acts: &[&ActQ8K; N], out: &mut [f32; N]) {
    const BS: usize = 84;
    let nb = row.len() / BS;
    let masks = scale_masks();
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * BS), BS.div_ceil(64));
        // SAFETY: block `i` lies inside `row`; scales 16 bytes at 0, qs 64 at 16, d and dmin at 80
        // and 82; activation super-block `i` exists (caller's contract). Unaligned loads.
        unsafe {
            let b = row.as_ptr().add(i * BS);
            let d = f16_at(b.add(80));
            let dmin = f16_at(b.add(82));
            let raw = load128(b);
            let sc8 = _mm_and_si128(raw, m4);
            let mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
            let s = scales_per16(_mm_cvtepu8_epi16(sc8), _mm_cvtepu8_epi16(_mm_srli_si128(sc8, 8)), &masks);
            let mut w = [_mm256_setzero_si256(); 8];
            for hh in 0..2 {
                let q = load(b.add(16 + 32 * hh));
                w[4 * hh] = _mm256_and_si256(q, m3);
                w[4 * hh + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 2), m3);
                w[4 * hh + 2] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m3);
                w[4 * hh + 3] = _mm256_and_si256(_mm256_srli_epi16(q, 6), m3);
            }
            let pre = prepare::<N>(&s);
            for n in 0..N {
                let (q8, bsums, da) = act_block(acts[n], i);
                let dot = dot_u8::<N>(&w, &s, &pre, q8);
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(dot), acc[n]);
                let pm = _mm256_madd_epi16(mins16, load(bsums));
                accm[n] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(pm), accm[n]);
            }
        }
    }
    for n in 0..N {
        out[n] = hsum_ps(acc[n]) - hsum_ps(accm[n]);
    }
}

/// IQ4_XS: 8 sub-blocks of 32, codebook values looked up with `vpshufb`, signed 6-bit scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq4xs<const N: usize>(row: &[u8], acts: &[&ActQ8K; N], out: &mut [f32; N]) {
    const BS: usize = 136;
    let nb = row.len() / BS;
    let masks = scale_masks();
    let m4 = _mm256_set1_epi8(0x0F);
    // SAFETY: KVALUES_IQ4NL is 16 bytes.
    let table = _mm256_broadcastsi128_si256(unsafe { load128(KVALUES_IQ4NL.as_ptr() as *const u8) });
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        crate::isa::prefetch_lines_ahead(row.as_ptr().wrapping_add(i * BS), BS.div_ceil(64));
        // SAFETY: block `i` lies inside `row`; d at 0, scales_h at 2, scales_l 4 bytes at 4, qs 128
        // at 8; activation super-block `i` exists (caller's contract). Unaligned loads.
        unsafe {
            let b = row.as_ptr().add(i * BS);
            let d = f16_at(b);
            // Scale j: nibble j of scales_l (4 bytes) | bits 2j..2j+2 of scales_h << 4; spread
            // both to one byte per scale with shift-and-mask steps.
            let sh = (b.add(2) as *const u16).read_unaligned().to_le() as u64;
            let mut hi = (sh | (sh << 24)) & 0x0000_00FF_0000_00FF;
            hi = (hi | (hi << 12)) & 0x000F_000F_000F_000F;
            hi = (hi | (hi << 6)) & 0x0303_0303_0303_0303;
            let mut lo = u32_at(b.add(4)) as u64;
            lo = (lo | (lo << 16)) & 0x0000_FFFF_0000_FFFF;
            lo = (lo | (lo << 8)) & 0x00FF_00FF_00FF_00FF;
            lo = (lo | (lo << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
            let ls = _mm_sub_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((lo | (hi << 4)) as i64)), _mm_set1_epi16(32));
            let s = scales_per32(ls, &masks);
            let mut w = [_mm256_setzero_si256(); 8];
            for (j, wj) in w.iter_mut().enumerate() {
                let x = load128(b.add(8 + 16 * j));
                let idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), m4);
                *wj = _mm256_shuffle_epi8(table, idx);
            }
            let wa: [__m256i; 8] = core::array::from_fn(|j| _mm256_sign_epi8(w[j], w[j]));
            let pre = prepare::<N>(&s);
            for n in 0..N {
                let (q8, _, da) = act_block(acts[n], i);
                let dot = dot_i8::<N>(&w, &wa, &s, &pre, q8);
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(dot), acc[n]);
            }
        }
    }
    for n in 0..N {
        out[n] = hsum_ps(acc[n]);
    }
}
