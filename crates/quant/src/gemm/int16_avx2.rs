//! AVX2 kernel of the 16-bit prompt path: `M` tokens × [`NR`] rows, one `vpmaddwd` per token and
//! 8 rows per weight pair, exact i32 sums per block of 32, then the same two f32 FMAs per block as
//! the scalar oracle ([`super::int16::tile_scalar`]).

use std::arch::x86_64::*;

use super::int16::{ActI16, IntPanel, TilePtrs, MR_AVX2};
use super::int_weights::BLOCK;
use super::NR;

#[allow(clippy::too_many_arguments)]
pub(super) fn tile(
    a: &ActI16,
    t0: usize,
    m: usize,
    panel: &IntPanel,
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let TilePtrs { pairs, blocks, aq, ad, asum, w, out } =
        super::int16::tile_ptrs(a, t0, m, MR_AVX2, panel, c, ldc, nvalid);
    // SAFETY: the caller's CPU has AVX2 and FMA (dispatch in `super::int16::tile_at`); the checks
    // of `tile_ptrs` keep every read of the activations and the panel and every write of `c` in
    // bounds.
    unsafe {
        macro_rules! run {
            ($m:literal) => {
                if panel.has_min {
                    kernel::<$m, true>(aq, ad, asum, pairs, blocks, w, out, ldc, nvalid, accumulate)
                } else {
                    kernel::<$m, false>(aq, ad, asum, pairs, blocks, w, out, ldc, nvalid, accumulate)
                }
            };
        }
        match m {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            _ => run!(4),
        }
    }
}

/// # Safety
/// AVX2 + FMA; `aq` readable for `M` tokens of `pairs` pairs, `ad`/`asum` for `M` tokens of
/// `blocks`, the panel's arrays for `pairs * NR` and `blocks * NR`, `c` writable for `M` rows of
/// `nvalid` at stride `ldc` (and readable there with `accumulate`).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const M: usize, const MIN: bool>(
    aq: *const u32,
    ad: *const f32,
    asum: *const f32,
    pairs: usize,
    blocks: usize,
    (wq, wscale, wmin): (*const u32, *const f32, *const f32),
    c: *mut f32,
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let mut acc_lo = [_mm256_setzero_ps(); M];
    let mut acc_hi = [_mm256_setzero_ps(); M];
    // SAFETY (whole body): offsets stay inside the regions of the contract.
    unsafe {
        if accumulate {
            for t in 0..M {
                (acc_lo[t], acc_hi[t]) = super::avx2::load_row(c.add(t * ldc), nvalid);
            }
        }
        for b in 0..blocks {
            let mut s_lo = [_mm256_setzero_si256(); M];
            let mut s_hi = [_mm256_setzero_si256(); M];
            for p in b * BLOCK / 2..(b + 1) * BLOCK / 2 {
                let w0 = _mm256_loadu_si256(wq.add(p * NR) as *const __m256i);
                let w1 = _mm256_loadu_si256(wq.add(p * NR + 8) as *const __m256i);
                for t in 0..M {
                    let av = _mm256_set1_epi32(*aq.add(t * pairs + p) as i32);
                    s_lo[t] = _mm256_add_epi32(s_lo[t], _mm256_madd_epi16(av, w0));
                    s_hi[t] = _mm256_add_epi32(s_hi[t], _mm256_madd_epi16(av, w1));
                }
            }
            let sc0 = _mm256_loadu_ps(wscale.add(b * NR));
            let sc1 = _mm256_loadu_ps(wscale.add(b * NR + 8));
            for t in 0..M {
                let da = _mm256_set1_ps(*ad.add(t * blocks + b));
                acc_lo[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_lo[t]), _mm256_mul_ps(sc0, da), acc_lo[t]);
                acc_hi[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_hi[t]), _mm256_mul_ps(sc1, da), acc_hi[t]);
            }
            if MIN {
                let mn0 = _mm256_loadu_ps(wmin.add(b * NR));
                let mn1 = _mm256_loadu_ps(wmin.add(b * NR + 8));
                for t in 0..M {
                    let sa = _mm256_set1_ps(*asum.add(t * blocks + b));
                    acc_lo[t] = _mm256_fmadd_ps(mn0, sa, acc_lo[t]);
                    acc_hi[t] = _mm256_fmadd_ps(mn1, sa, acc_hi[t]);
                }
            }
        }
        for t in 0..M {
            super::avx2::store_row(c.add(t * ldc), acc_lo[t], acc_hi[t], nvalid);
        }
    }
}

/// The AVX2 twin of [`super::int16::quantize_block_scalar`] (bit-identical).
pub(super) fn quantize_block(x: &[f32; BLOCK], q: &mut [u32; BLOCK / 2]) -> (f32, f32) {
    // SAFETY: AVX2 was detected by the caller; the arrays' sizes bound every load and store.
    unsafe { quantize_block_avx2(x, q) }
}

/// # Safety
/// AVX2.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32; BLOCK], q: &mut [u32; BLOCK / 2]) -> (f32, f32) {
    use super::int16::MAX_A;
    // SAFETY (whole body): four 8-float loads cover `x`, two 32-byte stores cover `q`.
    unsafe {
        let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(x.as_ptr().add(i)));
        let sign = _mm256_set1_ps(-0.0);
        let abs = v.map(|a| _mm256_andnot_ps(sign, a));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let amax = _mm_cvtss_f32(m);
        let scale = amax / MAX_A as f32;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let (lo, hi) = (_mm256_set1_ps(-MAX_A as f32), _mm256_set1_ps(MAX_A as f32));
        let ints = v.map(|a| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(a, inv));
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
        let total = _mm_cvtsi128_si32(t);
        // packs interleaves 128-bit halves; the permute restores element order.
        let p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(ints[0], ints[1]), 0b11_01_10_00);
        let p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(ints[2], ints[3]), 0b11_01_10_00);
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p01);
        _mm256_storeu_si256(q.as_mut_ptr().add(8) as *mut __m256i, p23);
        (scale, scale * total as f32)
    }
}
