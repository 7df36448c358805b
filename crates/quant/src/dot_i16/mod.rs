//! Dot products of Q8_0 rows with 16-bit activations ([`ActI16`]: 15-bit integers per block of 32,
//! the prompt kernel's format) for generation.
//!
//! Why for Q8_0: its weights are signed bytes, so the 8-bit kernels need `|w|` and the sign moved
//! onto each activation plane before `vpmaddubsw`, and the two planes the default path needs for
//! accuracy double that. Sign-extending the weights to 16 bits once and multiplying them with one
//! 15-bit activation plane (`vpmaddwd`) is fewer instructions per block and as accurate (the
//! activation error is 2^-15 of the block's largest element; two 8-bit planes: 2^-16).
//!
//! A block contributes `(d · da) · Σ w a`, the sum an exact integer (at most `32 · 128 · 16383 <
//! 2^31`). Blocks go four at a time into four f32 lanes (lane `l` takes blocks `4g + l`), the lanes
//! summed `(l0 + l2) + (l1 + l3)` at the end; [`vec_dot_q8_0_unopt`] is the oracle with exactly that
//! order, so the SIMD kernel is bit-identical to it.

use half::f16;

use crate::gemm::int16::ActI16;
use crate::gemm::int_weights::BLOCK;
use crate::isa::{isa, Isa};
use crate::q8_0::BLOCK_BYTES;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Lanes of the block accumulation.
const LANES: usize = 4;

fn check(row: &[u8], act: &ActI16, t: usize) -> usize {
    assert!(t < act.n, "dot_i16: token {t} of {}", act.n);
    assert!(row.len().is_multiple_of(BLOCK_BYTES), "dot_i16: Q8_0 row is not whole blocks");
    let nb = row.len() / BLOCK_BYTES;
    assert_eq!(nb * BLOCK, act.cols, "dot_i16: row and activation lengths differ");
    nb
}

/// The scalar oracle: row `row` (Q8_0) times token `t` of `act`.
pub fn vec_dot_q8_0_unopt(row: &[u8], act: &ActI16, t: usize) -> f32 {
    let nb = check(row, act, t);
    let (aq, ad) = (&act.q[t * act.cols / 2..(t + 1) * act.cols / 2], &act.d[t * nb..(t + 1) * nb]);
    let mut lanes = [0f32; LANES];
    for g in 0..nb.div_ceil(LANES) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let b = g * LANES + l;
            // Past the last block: a zero sum under a zero scale, as the SIMD kernel's padding.
            let (s, scale) = if b < nb {
                let blk = &row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
                let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let mut s = 0i32;
                for (p, &pair) in aq[b * BLOCK / 2..(b + 1) * BLOCK / 2].iter().enumerate() {
                    let pb = pair.to_ne_bytes();
                    let (a0, a1) = (i16::from_ne_bytes([pb[0], pb[1]]), i16::from_ne_bytes([pb[2], pb[3]]));
                    let (w0, w1) = (blk[2 + 2 * p] as i8, blk[3 + 2 * p] as i8);
                    s += i32::from(w0) * i32::from(a0) + i32::from(w1) * i32::from(a1);
                }
                (s, dw * ad[b])
            } else {
                (0, 0.0)
            };
            *lane = (s as f32).mul_add(scale, *lane);
        }
    }
    (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
}

/// Row `row` (Q8_0) times token `t` of `act`, with the best kernel this CPU runs.
pub fn vec_dot_q8_0(row: &[u8], act: &ActI16, t: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx2 {
            let nb = check(row, act, t);
            return avx2::vec_dot_q8_0(row, nb, act, t);
        }
    }
    vec_dot_q8_0_unopt(row, act, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn unit(seed: &mut u64) -> f32 {
        (lcg(seed) % 20001) as f32 / 10000.0 - 1.0
    }

    /// Random Q8_0 rows: random quants (the extremes -128 and 127 included) under random scales.
    fn random_row(nb: usize, seed: &mut u64) -> Vec<u8> {
        let mut row = vec![0u8; nb * BLOCK_BYTES];
        for b in 0..nb {
            let blk = &mut row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
            blk[..2].copy_from_slice(&f16::from_f32(unit(seed) * 0.02).to_le_bytes());
            for (k, q) in blk[2..].iter_mut().enumerate() {
                *q = match (b + k) % 11 {
                    0 => 0x80,
                    1 => 0x7f,
                    _ => lcg(seed) as u8,
                };
            }
        }
        row
    }

    #[test]
    fn simd_matches_oracle_bit_for_bit() {
        let mut seed = 4;
        for nb in [1usize, 2, 3, 4, 5, 7, 8, 9, 64, 67] {
            let row = random_row(nb, &mut seed);
            let n = 3;
            let x: Vec<f32> =
                (0..n * nb * BLOCK).map(|i| unit(&mut seed) * if i % 29 == 0 { 50.0 } else { 1.0 }).collect();
            let mut act = ActI16::default();
            act.quantize(&x, n, nb * BLOCK);
            for t in 0..n {
                let want = vec_dot_q8_0_unopt(&row, &act, t);
                let got = vec_dot_q8_0(&row, &act, t);
                assert_eq!(got.to_bits(), want.to_bits(), "nb={nb} t={t}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn oracle_is_the_exact_product_of_the_represented_values() {
        let mut seed = 8;
        for nb in [1usize, 6, 64] {
            let row = random_row(nb, &mut seed);
            let x: Vec<f32> = (0..nb * BLOCK).map(|_| unit(&mut seed)).collect();
            let mut act = ActI16::default();
            act.quantize(&x, 1, nb * BLOCK);
            let mut w = vec![0f32; nb * BLOCK];
            crate::q8_0::dequantize_row(&row, &mut w);
            let (mut exact, mut mag) = (0f64, 0f64);
            for (k, &wk) in w.iter().enumerate() {
                let pb = act.q[k / 2].to_ne_bytes();
                let q =
                    if k % 2 == 0 { i16::from_ne_bytes([pb[0], pb[1]]) } else { i16::from_ne_bytes([pb[2], pb[3]]) };
                let a = f64::from(act.d[k / BLOCK]) * f64::from(q);
                exact += f64::from(wk) * a;
                mag += (f64::from(wk) * a).abs();
            }
            let got = f64::from(vec_dot_q8_0_unopt(&row, &act, 0));
            assert!((got - exact).abs() <= 1e-6 * mag + 1e-12, "nb={nb}: {got} vs {exact}");
        }
    }
}
