//! IQ4_XS blocks: super-blocks of 256 weights in 8 sub-blocks of 32, 4-bit indices into the
//! non-linear codebook [`KVALUES_IQ4NL`] with a signed 6-bit scale per sub-block (stored biased by 32)
//! relative to the f16 super-block scale `d`: `x = (d * (ls - 32)) * kvalues[q]`.

use crate::iq4_nl::KVALUES_IQ4NL;
use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 136;

/// One IQ4_XS super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockIQ4XS {
    /// Super-block scale.
    pub d: f16,
    /// High 2 bits of the 8 scales: bits `2j..2j+2` for sub-block `j`.
    pub scales_h: u16,
    /// Low 4 bits of the 8 scales: nibble `j % 2` of byte `j / 2`.
    pub scales_l: [u8; 4],
    /// Indices: sub-block `j`'s elements `l` and `l + 16` are the low and high nibble of byte `16j + l`.
    pub qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == BLOCK_BYTES);

impl BlockIQ4XS {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        BlockIQ4XS {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            scales_h: u16::from_le_bytes([b[2], b[3]]),
            scales_l: b[4..8].try_into().unwrap(),
            qs: b[8..136].try_into().unwrap(),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&self.scales_h.to_le_bytes());
        b[4..8].copy_from_slice(&self.scales_l);
        b[8..136].copy_from_slice(&self.qs);
        b
    }

    /// The scale of sub-block `j` (0..8), minus its bias of 32.
    #[inline]
    pub fn scale(&self, j: usize) -> i8 {
        let low = (self.scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
        let high = ((self.scales_h >> (2 * j)) & 0x03) as u8;
        (low | (high << 4)) as i8 - 32
    }

    /// Dequantizes the 256 weights of the block.
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        for (j, sub) in out.chunks_exact_mut(32).enumerate() {
            let dl = d * self.scale(j) as f32;
            let qs = &self.qs[16 * j..16 * j + 16];
            let (lo, hi) = sub.split_at_mut(16);
            for ((a, b), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                *a = dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
                *b = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockIQ4XS> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockIQ4XS::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of an IQ4_XS row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "IQ4_XS row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "IQ4_XS row/activation length mismatch");
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn hand_built_block() {
        // scales: j0 = 33 (-> 1), j1 = 0 (-> -32), j7 = 63 (-> 31), others 32 (-> 0)
        let ls: [u8; 8] = [33, 0, 32, 32, 32, 32, 32, 63];
        let mut scales_l = [0u8; 4];
        let mut scales_h = 0u16;
        for (j, &v) in ls.iter().enumerate() {
            scales_l[j / 2] |= (v & 0x0F) << (4 * (j % 2));
            scales_h |= ((v >> 4) as u16) << (2 * j);
        }
        let mut qs = [0u8; 128];
        qs[0] = 0xF0; // element 0: index 0 (-127), element 16: index 15 (113)
        qs[16] = 0x08; // element 32: index 8 (1), element 48: index 0 (-127)
        qs[127] = 0x70; // element 255 (j 7, l 31): index 7 (-10); element 239: index 0
        let b = BlockIQ4XS { d: f16::from_f32(0.5), scales_h, scales_l, qs };
        for (j, &v) in ls.iter().enumerate() {
            assert_eq!(b.scale(j), v as i8 - 32);
        }
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 0.5 * -127.0);
        assert_eq!(out[16], 0.5 * 113.0);
        assert_eq!(out[32], -16.0 * 1.0);
        assert_eq!(out[48], -16.0 * -127.0);
        assert_eq!(out[64], 0.0);
        assert_eq!(out[255], 15.5 * -10.0);
        assert_eq!(out[239], 15.5 * -127.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut row = vec![0u8; 2 * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            b[0..2].copy_from_slice(&f16::from_f32(0.001).to_bits().to_le_bytes());
        }
        let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 2 * QK_K];
        dequantize_row(&row, &mut w);
        assert!(w.iter().all(|v| v.is_finite()));
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
    }
}
