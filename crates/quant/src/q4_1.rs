//! Q4_1: blocks of 32 weights, an f16 scale `d`, an f16 offset `m` and 32 unsigned 4-bit quants
//! `q`; the weight is `d * q + m` (product rounded to f32, then the sum: no fused multiply-add).
//!
//! Byte `qs[j]` holds element `j` in its low nibble and element `j + 16` in its high nibble.

use half::f16;

/// Elements per block.
pub const QK: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 20;

/// One Q4_1 block as stored in a GGUF file (little-endian, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Offset (the block minimum).
    pub m: f16,
    /// Quants: low nibbles are elements 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == BLOCK_BYTES);

impl BlockQ4_1 {
    /// Reads a block from exactly [`BLOCK_BYTES`] bytes (any alignment).
    #[inline]
    pub fn from_bytes(b: &[u8]) -> Self {
        assert_eq!(b.len(), BLOCK_BYTES, "a Q4_1 block is {BLOCK_BYTES} bytes");
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..]);
        Self { d: f16::from_le_bytes([b[0], b[1]]), m: f16::from_le_bytes([b[2], b[3]]), qs }
    }

    /// Writes the block into exactly [`BLOCK_BYTES`] bytes.
    #[inline]
    pub fn write_bytes(&self, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_BYTES, "a Q4_1 block is {BLOCK_BYTES} bytes");
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_le_bytes());
        out[4..].copy_from_slice(&self.qs);
    }

    /// The 32 quants in element order, 0..=15.
    #[inline]
    pub fn quants(&self) -> [u8; QK] {
        let mut q = [0u8; QK];
        for (j, &b) in self.qs.iter().enumerate() {
            q[j] = b & 0x0f;
            q[j + QK / 2] = b >> 4;
        }
        q
    }
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let blk = BlockQ4_1::from_bytes(b);
        let d = blk.d.to_f32();
        let m = blk.m.to_f32();
        for (o, q) in out.iter_mut().zip(blk.quants()) {
            *o = d * f32::from(q) + m;
        }
    }
}

/// Reference quantizer (round to nearest, as llama.cpp's `quantize_row_q4_1_ref`): `m` is the
/// block minimum and `d = (max - min) / 15`.
///
/// Panics unless `src.len()` is a multiple of 32 and `dst` holds exactly its blocks.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % QK, 0, "Q4_1 rows are whole 32-element blocks");
    assert_eq!(dst.len(), src.len() / QK * BLOCK_BYTES, "Q4_1 destination size");
    for (x, out) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        let min = x.iter().copied().fold(f32::MAX, f32::min);
        let max = x.iter().copied().fold(-f32::MAX, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let mut qs = [0u8; QK / 2];
        for (j, byte) in qs.iter_mut().enumerate() {
            *byte = q(x[j]) | (q(x[j + QK / 2]) << 4);
        }
        BlockQ4_1 { d: f16::from_f32(d), m: f16::from_f32(min), qs }.write_bytes(out);
    }
}

/// Plain scalar dot product of a Q4_1 row with f32 activations: per block
/// `d * sum(q * x) + m * sum(x)` in f32, then the blocks summed in order. The oracle for SIMD
/// kernels.
///
/// Panics unless `x.len()` is a multiple of 32 and `row` holds exactly its blocks.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(x.len() % QK, 0, "Q4_1 rows are whole 32-element blocks");
    assert_eq!(row.len(), x.len() / QK * BLOCK_BYTES, "Q4_1 row size");
    let mut sum = 0.0f32;
    for (b, xs) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(QK)) {
        let blk = BlockQ4_1::from_bytes(b);
        let mut sqx = 0.0f32;
        let mut sx = 0.0f32;
        for (&xv, q) in xs.iter().zip(blk.quants()) {
            sqx += f32::from(q) * xv;
            sx += xv;
        }
        sum += blk.d.to_f32() * sqx + blk.m.to_f32() * sx;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn quantize(x: &[f32]) -> Vec<u8> {
        let mut bytes = vec![0u8; x.len() / QK * BLOCK_BYTES];
        quantize_row(x, &mut bytes);
        bytes
    }

    fn round_trip(x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        dequantize_row(&quantize(x), &mut y);
        y
    }

    /// Per element: half a step, plus the f16 rounding of `d` (times q <= 15) and of `m`, plus f32
    /// rounding and a little absolute slack for subnormal f16.
    fn check_round_trip(x: &[f32]) -> Result<(), String> {
        let y = round_trip(x);
        for (bx, by) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
            let min = bx.iter().copied().fold(f32::MAX, f32::min);
            let max = bx.iter().copied().fold(-f32::MAX, f32::max);
            let d = (max - min) / 15.0;
            let tol = d * (0.5 + 16.0 / 2048.0) + min.abs() / 2048.0 + (min.abs() + max.abs()) * 1e-6 + 1e-6;
            for (a, b) in bx.iter().zip(by) {
                if (a - b).abs() > tol {
                    return Err(format!("{a} -> {b}, tolerance {tol}"));
                }
            }
        }
        Ok(())
    }

    /// vec_dot_unopt against the dot product of the dequantized row (in f64), within a bound on
    /// the f32 rounding of both sums.
    fn dot_check(x: &[f32], act: &[f32]) {
        let bytes = quantize(x);
        let mut y = vec![0.0f32; x.len()];
        dequantize_row(&bytes, &mut y);
        let exact: f64 = y.iter().zip(act).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = y.iter().zip(act).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
        // the m * sum(x) split can cancel: bound its terms separately
        let blk_mag: f64 = bytes
            .chunks_exact(BLOCK_BYTES)
            .zip(act.chunks_exact(QK))
            .map(|(b, xs)| {
                let blk = BlockQ4_1::from_bytes(b);
                let sx: f64 = xs.iter().map(|v| v.abs() as f64).sum();
                (blk.d.to_f32() as f64 * 15.0 + (blk.m.to_f32() as f64).abs()) * sx
            })
            .sum();
        let got = vec_dot_unopt(&bytes, act) as f64;
        let tol = 2.0 * (x.len() as f64 + 4.0) * f32::EPSILON as f64 * (mag + blk_mag) + 1e-30;
        assert!((got - exact).abs() <= tol, "{got} vs {exact} (tol {tol})");
    }

    #[test]
    fn known_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0.0f32; QK];
        dequantize_row(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.25 * j as f32 - 1.0);
            assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn round_trip_random_and_edge() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let x: Vec<f32> = (0..QK * 64).map(|_| rng.gen_range(-3.0f32..5.0)).collect();
        check_round_trip(&x).unwrap();
        check_round_trip(&[0.0; QK]).unwrap();
        assert!(round_trip(&[0.0; QK]).iter().all(|v| *v == 0.0));
        check_round_trip(&[2.5; QK]).unwrap();
        assert!(round_trip(&[2.5; QK]).iter().all(|v| *v == 2.5));
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let x: Vec<f32> = (0..QK * 16).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let act: Vec<f32> = (0..QK * 16).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        dot_check(&x, &act);
    }

    proptest! {
        #[test]
        fn prop_round_trip(x in (1usize..6).prop_flat_map(|n| prop::collection::vec(-100.0f32..100.0, n * QK))) {
            prop_assert!(check_round_trip(&x).is_ok(), "{:?}", check_round_trip(&x));
        }

        #[test]
        fn prop_vec_dot(pair in (1usize..6).prop_flat_map(|n| (
            prop::collection::vec(-10.0f32..10.0, n * QK),
            prop::collection::vec(-10.0f32..10.0, n * QK),
        ))) {
            dot_check(&pair.0, &pair.1);
        }
    }
}
