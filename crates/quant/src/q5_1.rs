//! Q5_1: blocks of 32 weights, an f16 scale `d`, an f16 offset `m` and 32 unsigned 5-bit quants
//! `q`; the weight is `d * q + m` (product rounded to f32, then the sum: no fused multiply-add).
//!
//! Byte `qs[j]` holds the low 4 bits of element `j` in its low nibble and of element `j + 16` in
//! its high nibble; bit `i` of the little-endian u32 `qh` is bit 4 of element `i`.

use half::f16;

/// Elements per block.
pub const QK: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 24;

/// One Q5_1 block as stored in a GGUF file (little-endian, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Offset (the block minimum).
    pub m: f16,
    /// Fifth bits, a little-endian u32 (bit `i` belongs to element `i`).
    pub qh: [u8; 4],
    /// Low 4 bits: low nibbles are elements 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == BLOCK_BYTES);

impl BlockQ5_1 {
    /// Reads a block from exactly [`BLOCK_BYTES`] bytes (any alignment).
    #[inline]
    pub fn from_bytes(b: &[u8]) -> Self {
        assert_eq!(b.len(), BLOCK_BYTES, "a Q5_1 block is {BLOCK_BYTES} bytes");
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[8..]);
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            m: f16::from_le_bytes([b[2], b[3]]),
            qh: [b[4], b[5], b[6], b[7]],
            qs,
        }
    }

    /// Writes the block into exactly [`BLOCK_BYTES`] bytes.
    #[inline]
    pub fn write_bytes(&self, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_BYTES, "a Q5_1 block is {BLOCK_BYTES} bytes");
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_le_bytes());
        out[4..8].copy_from_slice(&self.qh);
        out[8..].copy_from_slice(&self.qs);
    }

    /// The 32 quants in element order, 0..=31.
    #[inline]
    pub fn quants(&self) -> [u8; QK] {
        let qh = u32::from_le_bytes(self.qh);
        let mut q = [0u8; QK];
        for (j, &b) in self.qs.iter().enumerate() {
            let h0 = ((qh >> j) & 1) as u8;
            let h1 = ((qh >> (j + QK / 2)) & 1) as u8;
            q[j] = (b & 0x0f) | (h0 << 4);
            q[j + QK / 2] = (b >> 4) | (h1 << 4);
        }
        q
    }
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let blk = BlockQ5_1::from_bytes(b);
        let d = blk.d.to_f32();
        let m = blk.m.to_f32();
        for (o, q) in out.iter_mut().zip(blk.quants()) {
            *o = d * f32::from(q) + m;
        }
    }
}

/// Reference quantizer (round to nearest, as llama.cpp's `quantize_row_q5_1_ref`): `m` is the
/// block minimum and `d = (max - min) / 31`.
///
/// Panics unless `src.len()` is a multiple of 32 and `dst` holds exactly its blocks.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % QK, 0, "Q5_1 rows are whole 32-element blocks");
    assert_eq!(dst.len(), src.len() / QK * BLOCK_BYTES, "Q5_1 destination size");
    for (x, out) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        let min = x.iter().copied().fold(f32::MAX, f32::min);
        let max = x.iter().copied().fold(-f32::MAX, f32::max);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 31) as u32;
        let mut qs = [0u8; QK / 2];
        let mut qh = 0u32;
        for (j, byte) in qs.iter_mut().enumerate() {
            let q0 = q(x[j]);
            let q1 = q(x[j + QK / 2]);
            *byte = ((q0 & 0x0f) | ((q1 & 0x0f) << 4)) as u8;
            qh |= (q0 >> 4) << j;
            qh |= (q1 >> 4) << (j + QK / 2);
        }
        BlockQ5_1 { d: f16::from_f32(d), m: f16::from_f32(min), qh: qh.to_le_bytes(), qs }.write_bytes(out);
    }
}

/// Plain scalar dot product of a Q5_1 row with f32 activations: per block
/// `d * sum(q * x) + m * sum(x)` in f32, then the blocks summed in order. The oracle for SIMD
/// kernels.
///
/// Panics unless `x.len()` is a multiple of 32 and `row` holds exactly its blocks.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(x.len() % QK, 0, "Q5_1 rows are whole 32-element blocks");
    assert_eq!(row.len(), x.len() / QK * BLOCK_BYTES, "Q5_1 row size");
    let mut sum = 0.0f32;
    for (b, xs) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(QK)) {
        let blk = BlockQ5_1::from_bytes(b);
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

    /// Per element: half a step, plus the f16 rounding of `d` (times q <= 31) and of `m`, plus f32
    /// rounding and a little absolute slack for subnormal f16.
    fn check_round_trip(x: &[f32]) -> Result<(), String> {
        let y = round_trip(x);
        for (bx, by) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
            let min = bx.iter().copied().fold(f32::MAX, f32::min);
            let max = bx.iter().copied().fold(-f32::MAX, f32::max);
            let d = (max - min) / 31.0;
            let tol = d * (0.5 + 32.0 / 2048.0) + min.abs() / 2048.0 + (min.abs() + max.abs()) * 1e-6 + 1e-6;
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
                let blk = BlockQ5_1::from_bytes(b);
                let sx: f64 = xs.iter().map(|v| v.abs() as f64).sum();
                (blk.d.to_f32() as f64 * 31.0 + (blk.m.to_f32() as f64).abs()) * sx
            })
            .sum();
        let got = vec_dot_unopt(&bytes, act) as f64;
        let tol = 2.0 * (x.len() as f64 + 4.0) * f32::EPSILON as f64 * (mag + blk_mag) + 1e-30;
        assert!((got - exact).abs() <= tol, "{got} vs {exact} (tol {tol})");
    }

    #[test]
    fn known_block() {
        // element i has quant i (0..32): low nibbles i & 15, fifth bit set for i >= 16
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.125).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(3.0).to_le_bytes());
        b[4..8].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        for j in 0..16 {
            b[8 + j] = (j as u8) | ((j as u8) << 4);
        }
        let mut y = [0.0f32; QK];
        dequantize_row(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.125 * i as f32 + 3.0);
        }
    }

    #[test]
    fn round_trip_random_and_edge() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let x: Vec<f32> = (0..QK * 64).map(|_| rng.gen_range(-3.0f32..5.0)).collect();
        check_round_trip(&x).unwrap();
        check_round_trip(&[0.0; QK]).unwrap();
        assert!(round_trip(&[0.0; QK]).iter().all(|v| *v == 0.0));
        assert!(round_trip(&[-1.5; QK]).iter().all(|v| *v == -1.5));
        // every quant value 0..32 is representable exactly
        let ramp: Vec<f32> = (0..QK).map(|i| 0.25 * i as f32 - 2.0).collect();
        assert_eq!(round_trip(&ramp), ramp);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(32);
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
