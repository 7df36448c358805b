//! AVX2 kernel of [`super::vec_dot_q8_0`]: per block two sign-extensions (`vpmovsxbw`) and two
//! `vpmaddwd`; four blocks' i32 vectors reduced by `vphaddd` to their four exact sums, converted
//! and scaled in one FMA.

use std::arch::x86_64::*;

use super::LANES;
use crate::gemm::int16::ActI16;
use crate::gemm::int_weights::BLOCK;
use crate::q8_0::BLOCK_BYTES;

pub(super) fn vec_dot_q8_0(row: &[u8], nb: usize, act: &ActI16, t: usize) -> f32 {
    let (aq, ad) = (&act.q[t * act.cols / 2..(t + 1) * act.cols / 2], &act.d[t * nb..(t + 1) * nb]);
    assert!(row.len() == nb * BLOCK_BYTES && aq.len() == nb * BLOCK / 2 && ad.len() == nb);
    // SAFETY: the caller detected AVX2/FMA/F16C; the assert above bounds every read (block `b < nb`
    // reads row bytes `b·34 .. b·34 + 34`, pairs `16 b .. 16 b + 16`, scale `b`).
    unsafe { kernel(row.as_ptr(), nb, aq.as_ptr(), ad.as_ptr()) }
}

/// One block's 8 partial sums (`vpmaddwd` pairs), exact.
///
/// # Safety
/// AVX2; `w` points to a Q8_0 block, `a` to its 16 activation pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block(w: *const u8, a: *const u32) -> __m256i {
    // SAFETY: the caller's contract: 32 quant bytes after the 2-byte scale, 64 activation bytes.
    unsafe {
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(2) as *const __m128i));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(18) as *const __m128i));
        let a0 = _mm256_loadu_si256(a as *const __m256i);
        let a1 = _mm256_loadu_si256(a.add(8) as *const __m256i);
        _mm256_add_epi32(_mm256_madd_epi16(w0, a0), _mm256_madd_epi16(w1, a1))
    }
}

/// Four blocks' partial sums reduced to their four exact totals.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_totals(s: [__m256i; LANES]) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
}

/// The four exact block sums of blocks `b .. b + 4` (all present).
///
/// # Safety
/// AVX2; `row` holds more than `b + 3` blocks, `aq` their activation pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_sums(row: *const u8, aq: *const u32, b: usize) -> __m128i {
    // SAFETY: the caller's contract bounds blocks `b .. b + 4`.
    block_totals(std::array::from_fn(|l| unsafe { block(row.add((b + l) * BLOCK_BYTES), aq.add((b + l) * BLOCK / 2)) }))
}

/// The f16 scales of blocks `b .. b + 4` as f32.
///
/// # Safety
/// F16C; `row` holds more than `b + 3` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_scales(row: *const u8, b: usize) -> __m128 {
    // SAFETY: the caller's contract bounds the four 2-byte reads.
    let h = |l: usize| u64::from(unsafe { (row.add((b + l) * BLOCK_BYTES) as *const u16).read_unaligned() });
    _mm_cvtph_ps(_mm_cvtsi64_si128((h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48) as i64))
}

/// # Safety
/// AVX2/FMA/F16C; `row` holds `nb` blocks, `aq` `16 nb` pairs, `ad` `nb` scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel(row: *const u8, nb: usize, aq: *const u32, ad: *const f32) -> f32 {
    let mut acc = _mm_setzero_ps();
    let full = nb / LANES;
    // SAFETY (whole body): only blocks `b < nb` are read; whole groups straight through, the
    // last partial group through zero-filled arrays (its missing blocks add exact zeros).
    unsafe {
        // four block sums times their weight and activation scales, into the four lanes
        let add = |acc, sums, dw, da| _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(dw, da), acc);
        for g in 0..full {
            let b = g * LANES;
            // the group's (at most three) lines, 2 KiB ahead
            crate::isa::prefetch_lines_ahead(row.wrapping_add(b * BLOCK_BYTES), 3);
            acc = add(acc, group_sums(row, aq, b), group_scales(row, b), _mm_loadu_ps(ad.add(b)));
        }
        let present = nb - full * LANES;
        if present > 0 {
            let mut s = [_mm256_setzero_si256(); LANES];
            let mut dw = [0u16; LANES];
            let mut da = [0f32; LANES];
            for l in 0..present {
                let b = full * LANES + l;
                let w = row.add(b * BLOCK_BYTES);
                s[l] = block(w, aq.add(b * BLOCK / 2));
                dw[l] = (w as *const u16).read_unaligned();
                da[l] = *ad.add(b);
            }
            let dwv = _mm_cvtph_ps(_mm_loadl_epi64(dw.as_ptr() as *const __m128i));
            acc = add(acc, block_totals(s), dwv, _mm_loadu_ps(da.as_ptr()));
        }
        // (l0 + l2) + (l1 + l3), as the oracle.
        let s = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}
