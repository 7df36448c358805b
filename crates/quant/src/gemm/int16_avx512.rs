//! AVX-512 (F + VNNI) kernel of the 16-bit prompt path: `M` tokens × [`NR`] rows, the 16 rows in
//! one 512-bit register, one `vpdpwssd` (16 pairs of i16 products added into i32 lanes) per token
//! and weight pair with the token's pair broadcast from memory. The i32 block sums are exact, as in
//! the AVX2 kernel, and each lane then takes the same two f32 FMAs per block as the scalar oracle
//! ([`super::int16::tile_scalar`]), so the results are bit-identical to both.
//!
//! Why a separate kernel: `vpdpwssd` fuses the AVX2 kernel's `vpmaddwd` + `vpaddd`, and the 32
//! vector registers hold twice the tokens per tile (fewer passes over the panel per token).

use std::arch::x86_64::*;

use super::int16::{ActI16, IntPanel, TilePtrs, MR};
use super::int_weights::BLOCK;
use super::NR;

const _: () = assert!(NR == 16, "one 512-bit register of i32 lanes per panel");

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
    let TilePtrs { pairs, blocks, aq, ad, asum, w, out } = super::int16::tile_ptrs(a, t0, m, MR, panel, c, ldc, nvalid);
    // SAFETY: the caller's CPU has AVX-512 F and VNNI (dispatch in `super::int16::tile_at`); the
    // checks of `tile_ptrs` keep every read of the activations and the panel and every write of `c`
    // in bounds.
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
            4 => run!(4),
            5 => run!(5),
            6 => run!(6),
            7 => run!(7),
            _ => run!(8),
        }
    }
}

/// # Safety
/// AVX-512 F + VNNI; `aq` readable for `M` tokens of `pairs` pairs, `ad`/`asum` for `M` tokens of
/// `blocks`, the panel's arrays for `pairs * NR` and `blocks * NR`, `c` writable for `M` rows of
/// `nvalid` at stride `ldc` (and readable there with `accumulate`).
#[target_feature(enable = "avx512f,avx512vnni")]
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
    let mask: __mmask16 = if nvalid == NR { 0xffff } else { (1u16 << nvalid) - 1 };
    let mut acc = [_mm512_setzero_ps(); M];
    // SAFETY (whole body): offsets stay inside the regions of the contract; the masked loads and
    // stores touch only the `nvalid` floats of each output row.
    unsafe {
        if accumulate {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm512_maskz_loadu_ps(mask, c.add(t * ldc));
            }
        }
        for b in 0..blocks {
            let mut s = [_mm512_setzero_si512(); M];
            for p in b * BLOCK / 2..(b + 1) * BLOCK / 2 {
                let wv = _mm512_loadu_si512(wq.add(p * NR) as *const __m512i);
                for (t, st) in s.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*aq.add(t * pairs + p) as i32);
                    *st = _mm512_dpwssd_epi32(*st, av, wv);
                }
            }
            let sc = _mm512_loadu_ps(wscale.add(b * NR));
            for (t, a) in acc.iter_mut().enumerate() {
                let da = _mm512_set1_ps(*ad.add(t * blocks + b));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(sc, da), *a);
            }
            if MIN {
                let mn = _mm512_loadu_ps(wmin.add(b * NR));
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(mn, _mm512_set1_ps(*asum.add(t * blocks + b)), *a);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(t * ldc), mask, *a);
        }
    }
}
