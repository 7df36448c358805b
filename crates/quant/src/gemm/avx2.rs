//! AVX2 + FMA kernel of the f32 matrix-matrix path: [`MR`] tokens × [`NR`] weight rows held in
//! twelve accumulators while `k` runs over the whole row, one FMA chain per output.

use std::arch::x86_64::*;

use super::{MR, NR};

/// `c[t * ldc + j] = Σ_k a[t * lda + k] · panel[k * NR + j]` for `t < m`, `j < nvalid`.
pub(super) fn tile(a: &[f32], lda: usize, m: usize, panel: &[f32], c: &mut [f32], ldc: usize, nvalid: usize) {
    let k = panel.len() / NR;
    assert!((1..=MR).contains(&m) && (1..=NR).contains(&nvalid) && panel.len() == k * NR);
    assert!(a.len() >= (m - 1) * lda + k, "activation tile out of bounds");
    assert!(c.len() >= (m - 1) * ldc + nvalid, "output tile out of bounds");
    // SAFETY: the caller's CPU has AVX2 and FMA (dispatch in `super::tile`); the asserts above
    // keep every read of `a`/`panel` and every write of `c` in bounds.
    unsafe {
        match m {
            1 => kernel::<1>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
            2 => kernel::<2>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
            3 => kernel::<3>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
            4 => kernel::<4>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
            5 => kernel::<5>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
            _ => kernel::<6>(a.as_ptr(), lda, panel.as_ptr(), k, c.as_mut_ptr(), ldc, nvalid),
        }
    }
}

/// # Safety
/// AVX2 + FMA; `a` readable for `M` rows of `k` at stride `lda`, `b` for `k * NR`, `c` writable
/// for `M` rows of `nvalid` at stride `ldc`.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const M: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    k: usize,
    c: *mut f32,
    ldc: usize,
    nvalid: usize,
) {
    let mut lo = [_mm256_setzero_ps(); M];
    let mut hi = [_mm256_setzero_ps(); M];
    // SAFETY (whole body): offsets stay inside the regions of the contract.
    unsafe {
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
            let row = c.add(t * ldc);
            if nvalid == NR {
                _mm256_storeu_ps(row, lo[t]);
                _mm256_storeu_ps(row.add(8), hi[t]);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo[t]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi[t]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, nvalid);
            }
        }
    }
}
