//! AVX2 + FMA kernel of the f32 matrix-matrix path: [`MR`] tokens × [`NR`] weight rows held in
//! twelve accumulators while `k` runs over the whole row, one FMA chain per output.

use std::arch::x86_64::*;

use super::{MR, NR};

/// `c[t * ldc + j] (+)= Σ_k a[t * lda + k] · panel[k * NR + j]` for `t < m`, `j < nvalid`.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile(
    a: &[f32],
    lda: usize,
    m: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let k = panel.len() / NR;
    assert!((1..=MR).contains(&m) && (1..=NR).contains(&nvalid) && panel.len() == k * NR);
    assert!(a.len() >= (m - 1) * lda + k, "activation tile out of bounds");
    assert!(c.len() >= (m - 1) * ldc + nvalid, "output tile out of bounds");
    // SAFETY: the caller's CPU has AVX2 and FMA (dispatch in `super::tile`); the asserts above
    // keep every read of `a`/`panel` and every write of `c` in bounds.
    unsafe {
        match m {
            1 => kernel::<1>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
            2 => kernel::<2>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
            3 => kernel::<3>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
            4 => kernel::<4>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
            5 => kernel::<5>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
            _ => kernel::<6>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid, accumulate),
        }
    }
}

/// # Safety
/// AVX2 + FMA; `a` readable for `M` rows of `k` at stride `lda`, `b` for `k * NR`, `c` writable
/// for `M` rows of `nvalid` at stride `ldc` (and readable there with `accumulate`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const M: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    k: usize,
    c: *mut f32,
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let mut lo = [_mm256_setzero_ps(); M];
    let mut hi = [_mm256_setzero_ps(); M];
    // SAFETY (whole body): offsets stay inside the regions of the contract.
    unsafe {
        if accumulate {
            for t in 0..M {
                (lo[t], hi[t]) = load_row(c.add(t * ldc), nvalid);
            }
        }
        for kk in 0..k {
            let b0 = _mm256_loadu_ps(b.add(kk * NR));
            let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
            for t in 0..M {
                let av = _mm256_broadcast_ss(&*a.add(t * lda + kk));
                lo[t] = _mm256_fmadd_ps(av, b0, lo[t]);
                hi[t] = _mm256_fmadd_ps(av, b1, hi[t]);
            }
        }
        for t in 0..M {
            store_row(c.add(t * ldc), lo[t], hi[t], nvalid);
        }
    }
}

/// Stores the first `nvalid` of the [`NR`] outputs `lo ‖ hi` of one token at `row`.
///
/// # Safety
/// AVX2; `row` writable for `nvalid` (≤ `NR`) floats.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn store_row(row: *mut f32, lo: __m256, hi: __m256, nvalid: usize) {
    // SAFETY: the caller's contract; a partial row goes through a stack copy.
    unsafe {
        if nvalid == NR {
            _mm256_storeu_ps(row, lo);
            _mm256_storeu_ps(row.add(8), hi);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, nvalid);
        }
    }
}

/// The inverse of [`store_row`]: `nvalid` floats from `row` as two vectors, zero past `nvalid`.
///
/// # Safety
/// AVX2; `row` readable for `nvalid ≤ NR` floats.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load_row(row: *const f32, nvalid: usize) -> (__m256, __m256) {
    // SAFETY: the caller's contract; a partial row goes through a stack copy.
    unsafe {
        if nvalid == NR {
            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
        } else {
            let mut tmp = [0f32; NR];
            std::ptr::copy_nonoverlapping(row, tmp.as_mut_ptr(), nvalid);
            (_mm256_loadu_ps(tmp.as_ptr()), _mm256_loadu_ps(tmp.as_ptr().add(8)))
        }
    }
}

/// `panel[k * NR + j] = rows[j * ld + k]` for `j < NR`, `k < kc` (a multiple of 8), by 8 × 8 tiles.
pub(super) fn transpose_into(rows: &[f32], ld: usize, kc: usize, panel: &mut [f32]) {
    assert!(kc.is_multiple_of(8) && kc <= ld && rows.len() >= (NR - 1) * ld + kc && panel.len() >= kc * NR);
    // SAFETY: AVX2 was detected by the caller (`super::transpose_into`); the asserts bound every
    // read (`j * ld + k < rows.len()`) and write (`k * NR + j < panel.len()`).
    unsafe { transpose_avx2(rows.as_ptr(), ld, kc, panel.as_mut_ptr()) }
}

/// [`transpose_into`] for 32-bit integers (the 16-bit kernel's weight pairs).
pub(super) fn transpose_u32_into(rows: &[u32], ld: usize, kc: usize, panel: &mut [u32]) {
    assert!(kc.is_multiple_of(8) && kc <= ld && rows.len() >= (NR - 1) * ld + kc && panel.len() >= kc * NR);
    // SAFETY: AVX2 was detected by the caller; the asserts bound every read and write as in
    // `transpose_into`. u32 and f32 have the same size and alignment and the transpose only moves
    // bits (unpacks, shuffles, lane permutes: no arithmetic), so the integers come through intact.
    unsafe { transpose_avx2(rows.as_ptr() as *const f32, ld, kc, panel.as_mut_ptr() as *mut f32) }
}

/// # Safety
/// AVX2; `rows` readable for `NR` rows of `kc` at stride `ld`, `panel` writable for `kc * NR`.
#[target_feature(enable = "avx2")]
unsafe fn transpose_avx2(rows: *const f32, ld: usize, kc: usize, panel: *mut f32) {
    // SAFETY (whole body): offsets stay inside the regions of the contract.
    unsafe {
        for jb in (0..NR).step_by(8) {
            for k in (0..kc).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows.add((jb + i) * ld + k)));
                // Standard 8 × 8 transpose: interleave pairs, then quads, then 128-bit halves.
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(s0, s4),
                    _mm256_permute2f128_ps::<0x20>(s1, s5),
                    _mm256_permute2f128_ps::<0x20>(s2, s6),
                    _mm256_permute2f128_ps::<0x20>(s3, s7),
                    _mm256_permute2f128_ps::<0x31>(s0, s4),
                    _mm256_permute2f128_ps::<0x31>(s1, s5),
                    _mm256_permute2f128_ps::<0x31>(s2, s6),
                    _mm256_permute2f128_ps::<0x31>(s3, s7),
                ];
                for (i, v) in out.iter().enumerate() {
                    _mm256_storeu_ps(panel.add((k + i) * NR + jb), *v);
                }
            }
        }
    }
}

/// Dequantizes whole blocks of Q4_0, Q4_1 or Q8_0 (`src` exactly the blocks of `dst`) with the
/// same f32 operations as the formats' scalar `dequantize_row` (a product, plus the offset for
/// Q4_1 as a separate rounding), so the results are bit-identical. Returns `false` for other types.
pub(super) fn dequantize_row(ty: kiln_gguf::GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    use kiln_gguf::GgmlType as T;
    let (bs, code) = match ty {
        T::Q4_0 => (crate::q4_0::BLOCK_BYTES, 0),
        T::Q4_1 => (crate::q4_1::BLOCK_BYTES, 1),
        T::Q8_0 => (crate::q8_0::BLOCK_BYTES, 2),
        T::Q4_K => {
            let bs = crate::q4_k::BLOCK_BYTES;
            assert!(src.len().is_multiple_of(bs) && dst.len() == src.len() / bs * 256, "whole blocks");
            // SAFETY: AVX2 was detected by the caller; the assert sizes every block read and write.
            unsafe { dequant_q4_k(src, dst) };
            return true;
        }
        _ => return false,
    };
    assert!(src.len().is_multiple_of(bs) && dst.len() == src.len() / bs * 32, "whole blocks");
    // SAFETY: AVX2 and F16C were detected by the caller (`super::pack_panel` dispatch); the assert
    // sizes every block read (`bs` bytes) and write (32 values).
    unsafe {
        match code {
            0 => dequant_blocks::<0>(src, dst),
            1 => dequant_blocks::<1>(src, dst),
            _ => dequant_blocks::<2>(src, dst),
        }
    }
    true
}

/// # Safety
/// AVX2 + F16C; `src` holds `dst.len() / 32` whole blocks of the format `C` (0 Q4_0, 1 Q4_1, 2 Q8_0).
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequant_blocks<const C: u8>(src: &[u8], dst: &mut [f32]) {
    let bs = match C {
        0 => crate::q4_0::BLOCK_BYTES,
        1 => crate::q4_1::BLOCK_BYTES,
        _ => crate::q8_0::BLOCK_BYTES,
    };
    let half_to_f32 = |b: &[u8]| -> f32 { half::f16::from_le_bytes([b[0], b[1]]).to_f32() };
    for (blk, out) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(32)) {
        let d = _mm256_set1_ps(half_to_f32(&blk[0..2]));
        // SAFETY (block): the loads read 16 or 32 bytes inside `blk`; the stores write 32 floats
        // of `out`.
        unsafe {
            let o = out.as_mut_ptr();
            if C == 2 {
                for i in 0..4 {
                    let q8 = _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * i) as *const __m128i);
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                    _mm256_storeu_ps(o.add(8 * i), _mm256_mul_ps(d, v));
                }
                continue;
            }
            let qoff = if C == 1 { 4 } else { 2 };
            let qs = _mm_loadu_si128(blk.as_ptr().add(qoff) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
            let off = _mm256_set1_epi32(if C == 0 { 8 } else { 0 });
            let m = _mm256_set1_ps(if C == 1 { half_to_f32(&blk[2..4]) } else { 0.0 });
            for (i, nib) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)].into_iter().enumerate() {
                let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), off);
                let mut v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
                if C == 1 {
                    v = _mm256_add_ps(v, m);
                }
                _mm256_storeu_ps(o.add(8 * i), v);
            }
        }
    }
}

/// # Safety
/// AVX2; `src` holds `dst.len() / 256` whole Q4_K blocks.
#[target_feature(enable = "avx2")]
unsafe fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    let h = |b: &[u8]| -> f32 { half::f16::from_le_bytes([b[0], b[1]]).to_f32() };
    for (blk, out) in src.chunks_exact(crate::q4_k::BLOCK_BYTES).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (h(&blk[0..2]), h(&blk[2..4]));
        let scales: &[u8; 12] = blk[4..16].try_into().expect("12 scale bytes");
        let qs = &blk[16..144];
        for j in 0..8 {
            let (sc, m) = crate::q4_k::get_scale_min(j, scales);
            // The scalar path's roundings: `dl * q - ml` with `dl = d * sc`, `ml = dmin * m`.
            let dl = _mm256_set1_ps(d * sc as f32);
            let ml = _mm256_set1_ps(dmin * m as f32);
            // SAFETY (block): reads 32 bytes of `qs`, writes 32 floats of `out`.
            unsafe {
                let q = _mm256_loadu_si256(qs.as_ptr().add(32 * (j / 2)) as *const __m256i);
                let q = if j % 2 == 1 { _mm256_srli_epi16::<4>(q) } else { q };
                let q = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                let o = out.as_mut_ptr().add(32 * j);
                for (i, part) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)].into_iter().enumerate() {
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                    _mm256_storeu_ps(o.add(8 * i), _mm256_sub_ps(_mm256_mul_ps(dl, v), ml));
                }
            }
        }
    }
}
