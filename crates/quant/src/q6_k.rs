//! Q6_K blocks: super-blocks of 256 weights in 16 groups of 16, 6-bit quants (low 4 bits in `ql`,
//! high 2 bits in `qh`, biased by 32) with a signed 8-bit scale per group relative to the f16
//! super-block scale `d`: `x = (d * sc) * (q - 32)`.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 210;

/// One Q6_K super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    /// Low 4 bits: element `128 * h + 64 * s + l` (l < 64) is nibble `s` of byte `64 * h + l`.
    pub ql: [u8; 128],
    /// High 2 bits: element `128 * h + 32 * s + l` (l < 32) is bits `2s..2s+2` of byte `32 * h + l`.
    pub qh: [u8; 64],
    /// Signed scale per group of 16.
    pub scales: [i8; 16],
    /// Super-block scale.
    pub d: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ6K>() == BLOCK_BYTES);

impl BlockQ6K {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        let mut scales = [0i8; 16];
        for (s, &byte) in scales.iter_mut().zip(&b[192..208]) {
            *s = byte as i8;
        }
        BlockQ6K {
            ql: b[0..128].try_into().unwrap(),
            qh: b[128..192].try_into().unwrap(),
            scales,
            d: f16::from_bits(u16::from_le_bytes([b[208], b[209]])),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..128].copy_from_slice(&self.ql);
        b[128..192].copy_from_slice(&self.qh);
        for (byte, &s) in b[192..208].iter_mut().zip(&self.scales) {
            *byte = s as u8;
        }
        b[208..210].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b
    }

    /// The 6-bit quant (0..64, before the -32 bias) of element `e`.
    #[inline]
    pub(crate) fn quant(&self, e: usize) -> u8 {
        let (h, r) = (e / 128, e % 128);
        let lo = (self.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        let hi = (self.qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        lo | (hi << 4)
    }

    /// Dequantizes the 256 weights of the block.
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        for (g, group) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * self.scales[g] as f32;
            for (i, y) in group.iter_mut().enumerate() {
                let q = self.quant(16 * g + i) as i8 - 32;
                *y = dl * q as f32;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockQ6K> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockQ6K::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of a Q6_K row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "Q6_K row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "Q6_K row/activation length mismatch");
    let mut buf = [0f32; QK_K];
    let mut sum = 0f32;
    for (b, xs) in blocks(row).zip(x.chunks_exact(QK_K)) {
        b.dequantize(&mut buf);
        for (w, v) in buf.iter().zip(xs) {
            sum += w * v;
        }
    }
    sum
}

/// Quantizes `src` (a multiple of 256 values) into Q6_K blocks appended to `dst`.
///
/// A simple absmax search per group (no error-minimising refinement): good enough for tests and for
/// making models, not for matching llama.cpp's output byte for byte.
pub fn quantize_row(src: &[f32], dst: &mut Vec<u8>) {
    assert_eq!(src.len() % QK_K, 0, "Q6_K quantize: length is not whole blocks");
    for x in src.chunks_exact(QK_K) {
        dst.extend_from_slice(&quantize_block(x.try_into().unwrap()).to_bytes());
    }
}

/// The value of largest magnitude (with its sign), 0 for an empty or all-zero slice.
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

fn quantize_block(x: &[f32; QK_K]) -> BlockQ6K {
    // Group scales such that the extreme value maps to -32 (the asymmetric end of -32..32).
    let mut group_scales = [0f32; 16];
    for (s, group) in group_scales.iter_mut().zip(x.chunks_exact(16)) {
        *s = signed_absmax(group) / -32.0;
    }
    let max_scale = signed_absmax(&group_scales);
    let d = f16::from_f32(max_scale / -128.0);
    let inv = if max_scale != 0.0 { -128.0 / max_scale } else { 0.0 };
    let mut scales = [0i8; 16];
    for (q, &s) in scales.iter_mut().zip(&group_scales) {
        *q = (inv * s).round().clamp(-128.0, 127.0) as i8;
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, &v) in x.iter().enumerate() {
        let dl = d.to_f32() * scales[e / 16] as f32;
        let q = if dl != 0.0 { (v / dl).round().clamp(-32.0, 31.0) as i32 + 32 } else { 32 } as u8;
        let (h, r) = (e / 128, e % 128);
        ql[64 * h + r % 64] |= (q & 0x0F) << (4 * (r / 64));
        qh[32 * h + r % 32] |= (q >> 4) << (2 * (r / 32));
    }
    BlockQ6K { ql, qh, scales, d }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn hand_built_block() {
        let mut scales = [0i8; 16];
        scales[0] = 3;
        scales[4] = -7;
        scales[15] = -128;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        ql[0] = 0x5A; // element 0: low 10, element 64: low 5
        qh[0] = 0b0000_1110; // element 0: high 2 (q = 42), element 32: high 3 (q = 48)
        ql[127] = 0xF0; // element 255 (h 1, r 127): low 15 (nibble 1 of byte 64 + 63)
        qh[63] = 0b0100_0000; // element 255: high 1 -> q = 31
        let b = BlockQ6K { ql, qh, scales, d: f16::from_f32(0.25) };
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 0.75 * 10.0);
        assert_eq!(out[1], 0.75 * -32.0);
        assert_eq!(out[32], 0.0); // scale 0
        assert_eq!(out[64], -1.75 * (5.0 - 32.0));
        assert_eq!(out[255], -32.0 * -1.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut row = vec![0u8; 2 * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            b[208..210].copy_from_slice(&f16::from_f32(0.001).to_bits().to_le_bytes());
        }
        let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 2 * QK_K];
        dequantize_row(&row, &mut w);
        assert!(w.iter().all(|v| v.is_finite()));
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
    }

    #[test]
    fn quantize_roundtrip() {
        let mut rng = StdRng::seed_from_u64(66);
        let x: Vec<f32> = (0..4 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut q = Vec::new();
        quantize_row(&x, &mut q);
        assert_eq!(q.len(), 4 * BLOCK_BYTES);
        let mut y = vec![0f32; x.len()];
        dequantize_row(&q, &mut y);
        let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // step ≈ 1/32 per group; half a step plus the 8-bit scale rounding
        assert!(err < 0.03, "max error {err}");
        for (e, (a, b)) in x.iter().zip(&y).enumerate() {
            assert!(a.signum() == b.signum() || b.abs() < 0.03, "element {e}: {a} -> {b}");
        }
        let zeros = vec![0f32; QK_K];
        let mut q = Vec::new();
        quantize_row(&zeros, &mut q);
        let mut y = vec![1f32; QK_K];
        dequantize_row(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
