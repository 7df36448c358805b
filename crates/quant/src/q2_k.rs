//! Q2_K blocks: super-blocks of 256 weights in 16 groups of 16, 2-bit quants with a 4-bit scale and a
//! 4-bit min per group, relative to the f16 super-block scales `d` and `dmin`:
//! `x = (d * (sc & 0xF)) * q - (dmin * (sc >> 4))`.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 84;

/// One Q2_K super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ2K {
    /// Per group of 16: scale in the low nibble, min in the high nibble.
    pub scales: [u8; 16],
    /// 2-bit quants: element `128 * h + 32 * s + l` is bits `2s..2s+2` of byte `32 * h + l`.
    pub qs: [u8; 64],
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ2K>() == BLOCK_BYTES);

impl BlockQ2K {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        BlockQ2K {
            scales: b[0..16].try_into().unwrap(),
            qs: b[16..80].try_into().unwrap(),
            d: f16::from_bits(u16::from_le_bytes([b[80], b[81]])),
            dmin: f16::from_bits(u16::from_le_bytes([b[82], b[83]])),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..16].copy_from_slice(&self.scales);
        b[16..80].copy_from_slice(&self.qs);
        b[80..82].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b[82..84].copy_from_slice(&self.dmin.to_bits().to_le_bytes());
        b
    }

    /// Dequantizes the 256 weights of the block.
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for (g, group) in out.chunks_exact_mut(16).enumerate() {
            let sc = self.scales[g];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            // Group g covers elements 16g..16g+16: half h = g / 8, shift s = (g % 8) / 2,
            // bytes 32h + 16(g % 2) ..
            let h = g / 8;
            let shift = 2 * ((g % 8) / 2);
            let start = 32 * h + 16 * (g % 2);
            for (y, &q) in group.iter_mut().zip(&self.qs[start..start + 16]) {
                *y = dl * ((q >> shift) & 3) as f32 - ml;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockQ2K> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockQ2K::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of a Q2_K row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "Q2_K row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "Q2_K row/activation length mismatch");
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
        let mut scales = [0u8; 16];
        scales[0] = 0x32; // scale 2, min 3
        scales[2] = 0x15; // group 2 (elements 32..48): scale 5, min 1
        scales[15] = 0xAF; // scale 15, min 10
        let mut qs = [0u8; 64];
        qs[0] = 0b0000_1011; // element 0: 3, element 32: 2
        qs[63] = 0b1100_0000; // element 255 (h 1, s 3, l 31): 3
        let b = BlockQ2K { scales, qs, d: f16::from_f32(1.0), dmin: f16::from_f32(0.5) };
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 2.0 * 3.0 - 1.5);
        assert_eq!(out[1], -1.5);
        assert_eq!(out[32], 5.0 * 2.0 - 0.5);
        assert_eq!(out[255], 15.0 * 3.0 - 5.0);
        assert_eq!(out[16], 0.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut row = vec![0u8; 2 * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            b[80..82].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
            b[82..84].copy_from_slice(&f16::from_f32(0.02).to_bits().to_le_bytes());
        }
        let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 2 * QK_K];
        dequantize_row(&row, &mut w);
        assert!(w.iter().all(|v| v.is_finite()));
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
    }
}
