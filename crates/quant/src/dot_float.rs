//! Dot products of float-stored rows (F32, F16, BF16) with f32 activations.
//!
//! The activations stay f32: for float weights the conversion is exact and cheap, so there is no
//! reason to give up accuracy. Sums are f32 FMA lanes, reduced pairwise at the end.

use kiln_gguf::GgmlType;

use crate::isa::{isa, Isa};

pub fn is_supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `Σ row[i] · x[i]` for a row stored as `ty` (F32, F16 or BF16), `x.len()` elements.
///
/// Panics if `ty` is not a float type or `row` does not hold exactly `x.len()` elements.
pub fn vec_dot_f32(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let width = match ty {
        GgmlType::F32 => 4,
        GgmlType::F16 | GgmlType::BF16 => 2,
        other => panic!("vec_dot_f32: {other} is not a float type"),
    };
    assert_eq!(row.len(), x.len() * width, "row bytes vs activation length");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 or above only after detecting AVX2, FMA and F16C at run time;
        // the lengths were checked above.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::vec_dot(ty, row, x) },
        _ => vec_dot_f32_unopt(ty, row, x),
    }
}

/// The scalar oracle: widen each element exactly and sum in f32, in element order.
pub fn vec_dot_f32_unopt(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let w = |i: usize| -> f32 {
        match ty {
            GgmlType::F32 => f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
            GgmlType::F16 => half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32(),
            GgmlType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])) << 16),
            other => panic!("vec_dot_f32_unopt: {other} is not a float type"),
        }
    };
    let mut acc = 0f32;
    for (i, &xi) in x.iter().enumerate() {
        acc += w(i) * xi;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use kiln_gguf::GgmlType;

    /// Loads 8 weights starting at element `i` as f32.
    #[inline(always)]
    unsafe fn load8(ty: GgmlType, row: *const u8, i: usize) -> __m256 {
        // SAFETY (for the caller): `row` holds at least `i + 8` elements of `ty`; loads are
        // unaligned because mmap'd rows have arbitrary alignment.
        match ty {
            GgmlType::F32 => _mm256_loadu_ps(row.add(4 * i) as *const f32),
            GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * i) as *const __m128i)),
            _ => {
                let h = _mm_loadu_si128(row.add(2 * i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `row` must hold exactly `x.len()` elements of `ty`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let r = row.as_ptr();
        let xp = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load below reads elements i..i+32 (or i..i+8) with i + 32 ≤ n (i + 8 ≤ n),
        // inside `row` and `x` by the length contract.
        unsafe {
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let w = load8(ty, r, i + 8 * k);
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(load8(ty, r, i), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = hsum(sum);
            if i < n {
                s += super::vec_dot_f32_unopt(ty, &row[i * (row.len() / n)..], &x[i..]);
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            ((s >> 8) as f32 / (1 << 24) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n).map(|_| next()).collect();
        let x: Vec<f32> = (0..n).map(|_| next()).collect();
        (w, x)
    }

    fn encode(ty: GgmlType, w: &[f32]) -> Vec<u8> {
        match ty {
            GgmlType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => w.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }

    #[test]
    fn simd_matches_exact_dot_of_widened_weights() {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            for n in [1, 7, 8, 31, 32, 33, 100, 256, 1000, 4096 + 5] {
                let (w, x) = rows(n, n as u32 * 7 + 1);
                let bytes = encode(ty, &w);
                let mut wide = vec![0f32; n];
                crate::dequantize_row(ty, &bytes, &mut wide).unwrap();
                let exact: f64 = wide.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let mag: f64 = wide.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                for got in [vec_dot_f32(ty, &bytes, &x), vec_dot_f32_unopt(ty, &bytes, &x)] {
                    // f32 summation error bound: n · ε · Σ|terms|.
                    let bound = n as f64 * f32::EPSILON as f64 * mag + 1e-30;
                    assert!((got as f64 - exact).abs() <= bound, "{ty} n={n}: {got} vs {exact}");
                }
            }
        }
    }
}
