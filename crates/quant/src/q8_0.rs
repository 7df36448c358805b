//! Q8_0: blocks of 32 weights, one f16 scale `d` and 32 signed 8-bit quants `q`;
//! the weight is `d * q`.

use half::f16;

/// Elements per block.
pub const QK: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 34;

/// One Q8_0 block as stored in a GGUF file (little-endian, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants in element order.
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == BLOCK_BYTES);

impl BlockQ8_0 {
    /// Reads a block from exactly [`BLOCK_BYTES`] bytes (any alignment).
    #[inline]
    pub fn from_bytes(b: &[u8]) -> Self {
        assert_eq!(b.len(), BLOCK_BYTES, "a Q8_0 block is {BLOCK_BYTES} bytes");
        let mut qs = [0i8; QK];
        for (q, &byte) in qs.iter_mut().zip(&b[2..]) {
            *q = byte as i8;
        }
        Self { d: f16::from_le_bytes([b[0], b[1]]), qs }
    }

    /// Writes the block into exactly [`BLOCK_BYTES`] bytes.
    #[inline]
    pub fn write_bytes(&self, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_BYTES, "a Q8_0 block is {BLOCK_BYTES} bytes");
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        for (byte, &q) in out[2..].iter_mut().zip(&self.qs) {
            *byte = q as u8;
        }
    }
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let blk = BlockQ8_0::from_bytes(b);
        let d = blk.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&blk.qs) {
            *o = d * f32::from(q);
        }
    }
}

/// Reference quantizer (as llama.cpp's `quantize_row_q8_0_ref`): `d = amax / 127`, quants
/// rounded to nearest, halves away from zero.
///
/// Panics unless `src.len()` is a multiple of 32 and `dst` holds exactly its blocks.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % QK, 0, "Q8_0 rows are whole 32-element blocks");
    assert_eq!(dst.len(), src.len() / QK * BLOCK_BYTES, "Q8_0 destination size");
    for (x, out) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        }
        BlockQ8_0 { d: f16::from_f32(d), qs }.write_bytes(out);
    }
}

/// Plain scalar dot product of a Q8_0 row with f32 activations: per block, the sum of `q * x` in
/// f32 times `d`, then the blocks summed in order. The oracle for SIMD kernels.
///
/// Panics unless `x.len()` is a multiple of 32 and `row` holds exactly its blocks.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(x.len() % QK, 0, "Q8_0 rows are whole 32-element blocks");
    assert_eq!(row.len(), x.len() / QK * BLOCK_BYTES, "Q8_0 row size");
    let mut sum = 0.0f32;
    for (b, xs) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(QK)) {
        let blk = BlockQ8_0::from_bytes(b);
        let mut s = 0.0f32;
        for (&xv, &q) in xs.iter().zip(&blk.qs) {
            s += f32::from(q) * xv;
        }
        sum += blk.d.to_f32() * s;
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

    /// Per element: half a step, plus the f16 rounding of the scale times |q| <= 127, plus a
    /// little absolute slack for subnormal scales.
    fn check_round_trip(x: &[f32]) -> Result<(), String> {
        let y = round_trip(x);
        for (bx, by) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
            let amax = bx.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let tol = d * (0.5 + 128.0 / 2048.0) + 1e-6;
            for (a, b) in bx.iter().zip(by) {
                if (a - b).abs() > tol {
                    return Err(format!("{a} -> {b}, tolerance {tol}"));
                }
            }
        }
        Ok(())
    }

    fn dot_check(x: &[f32], act: &[f32]) {
        let bytes = quantize(x);
        let mut y = vec![0.0f32; x.len()];
        dequantize_row(&bytes, &mut y);
        let exact: f64 = y.iter().zip(act).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = y.iter().zip(act).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
        let got = vec_dot_unopt(&bytes, act) as f64;
        let tol = 2.0 * (x.len() as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
        assert!((got - exact).abs() <= tol, "{got} vs {exact} (tol {tol})");
    }

    #[test]
    fn known_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(-0.5).to_le_bytes());
        let qs: Vec<i8> = (0..QK as i32).map(|i| (i * 8 - 127) as i8).collect();
        for (byte, &q) in b[2..].iter_mut().zip(&qs) {
            *byte = q as u8;
        }
        let mut y = [0.0f32; QK];
        dequantize_row(&b, &mut y);
        for (v, &q) in y.iter().zip(&qs) {
            assert_eq!(*v, -0.5 * q as f32);
        }
    }

    #[test]
    fn round_trip_random_and_edge() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        let x: Vec<f32> = (0..QK * 64).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        check_round_trip(&x).unwrap();
        check_round_trip(&[0.0; QK]).unwrap();
        assert!(round_trip(&[0.0; QK]).iter().all(|v| *v == 0.0));
        // a block of integers with amax 127 is exact
        let ints: Vec<f32> = (0..QK).map(|i| (i as f32 * 8.0 - 127.0).max(-127.0)).collect();
        assert_eq!(round_trip(&ints), ints);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
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
