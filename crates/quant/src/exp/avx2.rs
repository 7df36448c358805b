//! AVX2 + FMA lanes of [`super::exp_scalar`]: the same operations in the same order, so each lane
//! is bit-identical to the oracle.

use std::arch::x86_64::*;

use super::{C, GELU_C1, GELU_C2, LN2_HI, LN2_LO, LOG2E, X_MAX, X_MIN};

/// Eight `e^x` at once.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    // `max(lo, x)` and `min(hi, x)` return their second operand when it is NaN, like the oracle's
    // comparisons
    let x = _mm256_min_ps(_mm256_set1_ps(X_MAX), _mm256_max_ps(_mm256_set1_ps(X_MIN), x));
    let n =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(C[5]);
    for &c in C[..5].iter().rev() {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let one = _mm256_set1_ps(1.0);
    let p = _mm256_fmadd_ps(p, r, one);
    let p = _mm256_fmadd_ps(p, r, one);
    let n = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(n);
    let n2 = _mm256_sub_epi32(n, n1);
    let bias = _mm256_set1_epi32(127);
    let pow2 = |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, bias)));
    _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2))
}

pub(super) fn exp_in_place(x: &mut [f32]) {
    // SAFETY: the dispatcher checked AVX2 + FMA.
    unsafe { exp_in_place_avx2(x) }
}

/// # Safety
/// AVX2 + FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds exactly eight floats; unaligned load and store.
        unsafe {
            let v = _mm256_loadu_ps(c.as_ptr());
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(v));
        }
    }
    for v in chunks.into_remainder() {
        *v = super::exp_scalar(*v);
    }
}

pub(super) fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    // SAFETY: the dispatcher checked AVX2 + FMA and the equal lengths.
    unsafe { silu_mul_avx2(gate, up) }
}

/// # Safety
/// AVX2 + FMA; `gate.len() == up.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    let mut g = gate.chunks_exact_mut(8);
    let mut u = up.chunks_exact(8);
    for (gc, uc) in (&mut g).zip(&mut u) {
        // SAFETY: both chunks hold exactly eight floats; unaligned loads and store.
        unsafe {
            let gv = _mm256_loadu_ps(gc.as_ptr());
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(gc.as_mut_ptr(), _mm256_mul_ps(s, _mm256_loadu_ps(uc.as_ptr())));
        }
    }
    for (gv, &uv) in g.into_remainder().iter_mut().zip(u.remainder()) {
        *gv = super::silu_mul_scalar(*gv, uv);
    }
}

pub(super) fn gelu_tanh_mul_in_place(gate: &mut [f32], up: &[f32]) {
    // SAFETY: the dispatcher checked AVX2 + FMA and the equal lengths.
    unsafe { gelu_tanh_mul_avx2(gate, up) }
}

/// # Safety
/// AVX2 + FMA; `gate.len() == up.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_mul_avx2(gate: &mut [f32], up: &[f32]) {
    let mut g = gate.chunks_exact_mut(8);
    let mut u = up.chunks_exact(8);
    for (gc, uc) in (&mut g).zip(&mut u) {
        // SAFETY: both chunks hold exactly eight floats; unaligned loads and store.
        unsafe {
            let gv = _mm256_loadu_ps(gc.as_ptr());
            let p = _mm256_fmadd_ps(_mm256_mul_ps(gv, gv), _mm256_set1_ps(GELU_C2), _mm256_set1_ps(GELU_C1));
            let y = _mm256_mul_ps(gv, p);
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), y));
            let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(gc.as_mut_ptr(), _mm256_mul_ps(s, _mm256_loadu_ps(uc.as_ptr())));
        }
    }
    for (gv, &uv) in g.into_remainder().iter_mut().zip(u.remainder()) {
        *gv = super::gelu_tanh_mul_scalar(*gv, uv);
    }
}
