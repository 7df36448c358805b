//! `exp` in f32 for the default path's softmax and SwiGLU, eight lanes at a time.
//!
//! Why not `f32::exp`: the C library's `expf` is one call per element, and arguments past its
//! range (softmax scores far below the row's maximum, SiLU of large gates) take a slow path that
//! sets `errno`; a long prompt's attention and FFN call it hundreds of millions of times.
//!
//! The method (Cody–Waite range reduction and a polynomial): `x = n ln 2 + r` with `n` the
//! nearest integer to `x / ln 2` and `|r| ≤ ln 2 / 2`; `r` is formed with `ln 2` split into a head
//! whose product with any `|n| ≤ 151` is exact and a tail, each subtraction one FMA; `e^r` is the
//! degree-7 Taylor polynomial (truncation error below `0.35^8 / 8! ≈ 5·10^-9`, under a twentieth
//! of an ulp) evaluated by Horner with FMAs; `2^n` is applied as two exact power-of-two factors
//! `2^⌊n/2⌋ · 2^(n - ⌊n/2⌋)`, so that results in the subnormal range are rounded once, like any
//! other product, and overflow gives `inf`. Arguments are clamped to `[-104, 89]` first (beyond
//! them the result is `0` or `inf` anyway), which keeps `n` small; NaN passes through.
//!
//! [`exp_scalar`] is the oracle: the same operations in the same order with `f32::mul_add`, so
//! the SIMD lanes are bit-identical to it (tested). The error against the exact `exp` stays under
//! 1 ulp (0.88 at worst on a dense sweep of the normal range, tested), like the C library's.

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::isa::{isa, Isa};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` rounded to 9 significant bits: `n · LN2_HI` is exact for `|n| < 2^15`.
const LN2_HI: f32 = 0.693_359_4;
/// `ln 2 - LN2_HI`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// Clamp bounds: `e^-104` is below half the smallest subnormal, `e^89` above `f32::MAX`.
const X_MIN: f32 = -104.0;
const X_MAX: f32 = 89.0;
/// `1 / k!` for `k = 2..=7`, the Taylor coefficients after `1 + r`.
const C: [f32; 6] = [1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];

/// `2^e` for an exponent in the normal range `-126..=127`, built from its bits.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `e^x` (the oracle of the SIMD kernel, bit-identical to it).
pub fn exp_scalar(x: f32) -> f32 {
    // `clamp` keeps NaN (as the SIMD `max`/`min` operand order does)
    let x = x.clamp(X_MIN, X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = C[5];
    for &c in C[..5].iter().rev() {
        p = p.mul_add(r, c);
    }
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // NaN: `n as i32` is 0 and `p` NaN, so the product is NaN
    let n = n as i32;
    let n1 = n >> 1;
    p * pow2(n1) * pow2(n - n1)
}

/// `x[i] = e^x[i]`.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        avx2::exp_in_place(x);
        return;
    }
    for v in x.iter_mut() {
        *v = exp_scalar(*v);
    }
}

/// SwiGLU's product: `gate[i] = silu(gate[i]) · up[i]`, with `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        avx2::silu_mul_in_place(gate, up);
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_mul_scalar(*g, u);
    }
}

/// One element of [`silu_mul_in_place`] (the oracle).
pub fn silu_mul_scalar(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_scalar(-g)) * u
}

/// `2·sqrt(2/π)` and `2·sqrt(2/π)·0.044715`: GELU's tanh form through the logistic function,
/// `0.5·(1 + tanh(z)) = 1 / (1 + e^-2z)`, so `gelu(g) = g / (1 + e^-y)` with `y = g·(C1 + C2·g²)`.
const GELU_C1: f32 = 1.595_769_2;
const GELU_C2: f32 = 0.071_354_814;

/// Gemma's gated FFN product: `gate[i] = gelu_tanh(gate[i]) · up[i]`, with
/// `gelu_tanh(g) = 0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³)))`, evaluated as `g / (1 + e^-y)`
/// (see [`GELU_C1`]): one `exp` per element, like SiLU.
pub fn gelu_tanh_mul_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_mul: gate and up lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        avx2::gelu_tanh_mul_in_place(gate, up);
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh_mul_scalar(*g, u);
    }
}

/// One element of [`gelu_tanh_mul_in_place`] (the oracle).
pub fn gelu_tanh_mul_scalar(g: f32, u: f32) -> f32 {
    let y = g * (g * g).mul_add(GELU_C2, GELU_C1);
    g / (1.0 + exp_scalar(-y)) * u
}

/// `Σ x[i]` in f64 over four interleaved partial sums (the softmax denominators: an f64 sum is
/// exact enough to be order-independent at f32 precision, and four chains keep the adds from
/// waiting on each other).
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f64::from(v);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Error of `got` against the exact `want` in units of the last place of `want` (as f32).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if w == 0.0 || !w.is_finite() {
            return if got == w { 0.0 } else { f64::INFINITY };
        }
        let ulp = f64::from(f32::from_bits(w.abs().to_bits() + 1)) - f64::from(w.abs());
        (f64::from(got) - want).abs() / ulp
    }

    #[test]
    fn within_one_ulp_of_exact_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.7 {
            let e = ulps(exp_scalar(x), f64::from(x).exp());
            assert!(e < 1.0, "exp({x}): {e} ulp");
            worst = worst.max(e);
            x += 0.000_731;
        }
        // the range reduction's seams and small arguments
        for k in -125..=127 {
            for d in [-1e-3f32, -1e-7, 0.0, 1e-7, 1e-3] {
                let x = k as f32 * std::f32::consts::LN_2 + d;
                if x > -87.3 && x < 88.7 {
                    assert!(ulps(exp_scalar(x), f64::from(x).exp()) < 1.0, "exp({x})");
                }
            }
        }
        assert!(worst > 0.0, "the sweep measured something");
    }

    #[test]
    fn limits_and_subnormals() {
        assert_eq!(exp_scalar(0.0), 1.0);
        assert_eq!(exp_scalar(-200.0), 0.0);
        assert_eq!(exp_scalar(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_scalar(100.0), f32::INFINITY);
        assert_eq!(exp_scalar(f32::INFINITY), f32::INFINITY);
        assert!(exp_scalar(f32::NAN).is_nan());
        // subnormal results: within one subnormal step of the exact value
        for x in [-88.0f32, -95.5, -100.0, -103.0] {
            let want = f64::from(x).exp();
            let step = f64::from(f32::from_bits(1));
            assert!((f64::from(exp_scalar(x)) - want).abs() <= step, "exp({x})");
        }
    }

    fn sample(n: usize) -> Vec<f32> {
        // a deterministic spread over [-120, 100], with specials
        let mut s = 0x2545_f491_u32;
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 220.0 - 120.0
            })
            .collect();
        v.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 88.72, -87.33, 1e-30, -1e-30]);
        v
    }

    #[test]
    fn simd_lanes_equal_the_oracle() {
        for n in [0, 1, 7, 8, 9, 100, 1003] {
            let x = sample(n);
            let mut got = x.clone();
            exp_in_place(&mut got);
            for (&xi, &g) in x.iter().zip(&got) {
                assert_eq!(g.to_bits(), exp_scalar(xi).to_bits(), "exp({xi})");
            }
            let up: Vec<f32> = x.iter().map(|v| v * 0.37 - 1.0).collect();
            let mut gate: Vec<f32> = x.iter().map(|v| v * 0.1).collect();
            let want: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu_mul_scalar(g, u)).collect();
            silu_mul_in_place(&mut gate, &up);
            for (g, w) in gate.iter().zip(&want) {
                assert_eq!(g.to_bits(), w.to_bits());
            }
            let mut gate: Vec<f32> = x.iter().map(|v| v * 0.1).collect();
            let want: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| gelu_tanh_mul_scalar(g, u)).collect();
            gelu_tanh_mul_in_place(&mut gate, &up);
            for (g, w) in gate.iter().zip(&want) {
                assert_eq!(g.to_bits(), w.to_bits());
            }
        }
        let mut nan = [f32::NAN; 9];
        exp_in_place(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn gelu_tanh_is_the_tanh_formula() {
        // The logistic form against the textbook tanh form in f64, over the range activations
        // take: within a few f32 roundings. In the negative tail the result is g·e^y, whose
        // relative error is y's absolute error, a few ulps of y (f32 constants and products),
        // so the bound grows with |y|.
        let mut g = -12.0f32;
        while g < 12.0 {
            let gd = f64::from(g);
            let y = 2.0 * (2.0 / std::f64::consts::PI).sqrt() * (gd + 0.044715 * gd.powi(3));
            let want = 0.5 * gd * (1.0 + (y / 2.0).tanh());
            let got = f64::from(gelu_tanh_mul_scalar(g, 1.0));
            let bound = 3e-7 * (1.0 + y.abs()) * want.abs().max(1e-3);
            assert!((got - want).abs() <= bound, "gelu({g}): {got} vs {want}");
            g += 0.0137;
        }
        assert_eq!(gelu_tanh_mul_scalar(-100.0, 1.0), 0.0);
        assert_eq!(gelu_tanh_mul_scalar(100.0, 2.0), 200.0);
    }

    #[test]
    fn sum_f64_adds_every_element() {
        let x: Vec<f32> = (0..1003).map(|i| i as f32 * 0.5).collect();
        let want: f64 = x.iter().map(|&v| f64::from(v)).sum();
        assert_eq!(sum_f64(&x), want);
        assert_eq!(sum_f64(&x[..3]), 1.5);
        assert_eq!(sum_f64(&[]), 0.0);
    }
}
