//! IQ4_NL: blocks of 32 weights, one f16 scale `d` and 32 4-bit indices `q` into the non-linear
//! codebook [`KVALUES_IQ4NL`]; the weight is `d * KVALUES_IQ4NL[q]`.
//!
//! Byte `qs[j]` holds element `j` in its low nibble and element `j + 16` in its high nibble.

use half::f16;

/// The non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Elements per block.
pub const QK: usize = 32;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 18;

/// One IQ4_NL block as stored in a GGUF file (little-endian, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockIq4Nl {
    /// Scale.
    pub d: f16,
    /// Codebook indices: low nibbles are elements 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockIq4Nl>() == BLOCK_BYTES);

impl BlockIq4Nl {
    /// Reads a block from exactly [`BLOCK_BYTES`] bytes (any alignment).
    #[inline]
    pub fn from_bytes(b: &[u8]) -> Self {
        assert_eq!(b.len(), BLOCK_BYTES, "an IQ4_NL block is {BLOCK_BYTES} bytes");
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[2..]);
        Self { d: f16::from_le_bytes([b[0], b[1]]), qs }
    }

    /// Writes the block into exactly [`BLOCK_BYTES`] bytes.
    #[inline]
    pub fn write_bytes(&self, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_BYTES, "an IQ4_NL block is {BLOCK_BYTES} bytes");
        out[..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..].copy_from_slice(&self.qs);
    }

    /// The 32 codebook values in element order.
    #[inline]
    pub fn values(&self) -> [i8; QK] {
        let mut v = [0i8; QK];
        for (j, &b) in self.qs.iter().enumerate() {
            v[j] = KVALUES_IQ4NL[usize::from(b & 0x0f)];
            v[j + QK / 2] = KVALUES_IQ4NL[usize::from(b >> 4)];
        }
        v
    }
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let blk = BlockIq4Nl::from_bytes(b);
        let d = blk.d.to_f32();
        for (o, v) in out.iter_mut().zip(blk.values()) {
            *o = d * f32::from(v);
        }
    }
}

/// Index of the codebook entry nearest to `v` (in units of the scale); ties go to the lower index.
#[inline]
fn nearest_index(v: f32) -> u8 {
    let mut best = 0usize;
    let mut best_err = f32::INFINITY;
    for (i, &k) in KVALUES_IQ4NL.iter().enumerate() {
        let err = (v - f32::from(k)).abs();
        if err < best_err {
            best_err = err;
            best = i;
        }
    }
    best as u8
}

/// How far the scale search moves the image of the largest element from -127, in codebook units.
const SCALE_TRIES: i32 = 7;

/// Reference quantizer. Per block: starting from `d = max / -127` (the element of largest
/// magnitude on the codebook's end), try `2 * SCALE_TRIES + 1` scales that put that element at
/// `-127 + t`, map every element to its nearest codebook value, and keep the assignment whose
/// least-squares scale leaves the smallest squared error (llama.cpp's search, with unit weights).
/// The indices are then chosen again against the f16-rounded scale.
///
/// Panics unless `src.len()` is a multiple of 32 and `dst` holds exactly its blocks.
pub fn quantize_row(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % QK, 0, "IQ4_NL rows are whole 32-element blocks");
    assert_eq!(dst.len(), src.len() / QK * BLOCK_BYTES, "IQ4_NL destination size");
    for (x, out) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut d = 0.0f32;
        if amax > 0.0 {
            // maximise sumqx^2 / sumq2, i.e. minimise the error of the least-squares scale
            let mut best_num = 0.0f32;
            let mut best_den = 1.0f32;
            for t in -SCALE_TRIES..=SCALE_TRIES {
                let id = (t as f32 + f32::from(KVALUES_IQ4NL[0])) / max;
                let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
                for &v in x {
                    let k = f32::from(KVALUES_IQ4NL[usize::from(nearest_index(id * v))]);
                    sumqx += k * v;
                    sumq2 += k * k;
                }
                if sumq2 > 0.0 && sumqx * sumqx * best_den > best_num * sumq2 {
                    best_num = sumqx * sumqx;
                    best_den = sumq2;
                    d = sumqx / sumq2;
                }
            }
        }
        let d16 = f16::from_f32(d);
        let dr = d16.to_f32();
        let id = if dr != 0.0 { 1.0 / dr } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        for (j, byte) in qs.iter_mut().enumerate() {
            *byte = nearest_index(id * x[j]) | (nearest_index(id * x[j + QK / 2]) << 4);
        }
        BlockIq4Nl { d: d16, qs }.write_bytes(out);
    }
}

/// Plain scalar dot product of an IQ4_NL row with f32 activations: per block, the sum of
/// `KVALUES_IQ4NL[q] * x` in f32 times `d`, then the blocks summed in order. The oracle for SIMD
/// kernels.
///
/// Panics unless `x.len()` is a multiple of 32 and `row` holds exactly its blocks.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(x.len() % QK, 0, "IQ4_NL rows are whole 32-element blocks");
    assert_eq!(row.len(), x.len() / QK * BLOCK_BYTES, "IQ4_NL row size");
    let mut sum = 0.0f32;
    for (b, xs) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(QK)) {
        let blk = BlockIq4Nl::from_bytes(b);
        let mut s = 0.0f32;
        for (&xv, v) in xs.iter().zip(blk.values()) {
            s += f32::from(v) * xv;
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

    /// The search keeps an assignment at least as good (in squared error) as the plain one with
    /// `d = max / -127`, whose per-element error is at most 14 codebook units (113 vs 127 at the
    /// top end; inner gaps are at most 24). So the block's RMS error is at most `14 * amax / 127`,
    /// plus the f16 rounding of the scale and some float slack.
    fn check_round_trip(x: &[f32]) -> Result<(), String> {
        let y = round_trip(x);
        for (bx, by) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
            let amax = bx.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let sse: f64 = bx.iter().zip(by).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let rms = (sse / QK as f64).sqrt();
            let tol = amax as f64 * (14.0 / 127.0 + 2.0 / 1024.0) + 1e-6;
            if rms > tol {
                return Err(format!("rms error {rms} > {tol} for {bx:?} -> {by:?}"));
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
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0.0f32; QK];
        dequantize_row(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * f32::from(KVALUES_IQ4NL[j]));
            assert_eq!(y[j + 16], 0.5 * f32::from(KVALUES_IQ4NL[15 - j]));
        }
    }

    #[test]
    fn nearest_index_picks_the_closest_entry() {
        for (i, &k) in KVALUES_IQ4NL.iter().enumerate() {
            assert_eq!(usize::from(nearest_index(f32::from(k))), i);
        }
        assert_eq!(nearest_index(-1000.0), 0);
        assert_eq!(nearest_index(1000.0), 15);
        assert_eq!(nearest_index(0.0), 8);
        assert_eq!(nearest_index(100.0), 14);
        assert_eq!(nearest_index(102.0), 15);
    }

    #[test]
    fn round_trip_random_and_edge() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(51);
        let x: Vec<f32> = (0..QK * 64).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        check_round_trip(&x).unwrap();
        check_round_trip(&[0.0; QK]).unwrap();
        assert!(round_trip(&[0.0; QK]).iter().all(|v| *v == 0.0));
        // values on the codebook with a power-of-two scale come back exactly
        let exact: Vec<f32> = (0..QK).map(|i| 0.25 * f32::from(KVALUES_IQ4NL[i % 16])).collect();
        assert_eq!(round_trip(&exact), exact);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(52);
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
