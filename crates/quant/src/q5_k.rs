//! Q5_K blocks: like Q4_K (8 sub-blocks of 32 with 6-bit scales and mins) plus a fifth bit per weight
//! in `qh`: `x = (d * sc) * q - (dmin * m)` with `q` in 0..32.

use crate::q4_k::get_scale_min;
use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 176;

/// One Q5_K super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    /// Super-block scale of the quantized scales.
    pub d: f16,
    /// Super-block scale of the quantized mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each, packed as in Q4_K.
    pub scales: [u8; 12],
    /// High bits: bit `j` of byte `l` is the fifth bit of sub-block `j`'s element `l`.
    pub qh: [u8; 32],
    /// Low 4 bits, arranged as Q4_K's `qs`.
    pub qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockQ5K>() == BLOCK_BYTES);

impl BlockQ5K {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        BlockQ5K {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            dmin: f16::from_bits(u16::from_le_bytes([b[2], b[3]])),
            scales: b[4..16].try_into().unwrap(),
            qh: b[16..48].try_into().unwrap(),
            qs: b[48..176].try_into().unwrap(),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&self.dmin.to_bits().to_le_bytes());
        b[4..16].copy_from_slice(&self.scales);
        b[16..48].copy_from_slice(&self.qh);
        b[48..176].copy_from_slice(&self.qs);
        b
    }

    /// Dequantizes the 256 weights of the block.
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        let dmin = self.dmin.to_f32();
        for (j, sub) in out.chunks_exact_mut(32).enumerate() {
            let (sc, m) = get_scale_min(j, &self.scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let qs = &self.qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            for ((y, &lo), &hi) in sub.iter_mut().zip(qs).zip(&self.qh) {
                let q = ((lo >> shift) & 0x0F) | (((hi >> j) & 1) << 4);
                *y = dl * q as f32 - ml;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockQ5K> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockQ5K::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of a Q5_K row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "Q5_K row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "Q5_K row/activation length mismatch");
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
    use crate::q4_k::pack_scale_min;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn hand_built_block() {
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        sc[0] = 2;
        m[0] = 3;
        sc[1] = 5;
        m[1] = 1;
        sc[7] = 63;
        m[7] = 40;
        let mut qs = [0u8; 128];
        let mut qh = [0u8; 32];
        qs[0] = 0xA7; // element 0: low 7, element 32: low 10
        qh[0] = 0b1000_0010; // element 32 (sub-block 1) and element 224 (sub-block 7) get +16
        qs[96] = 0x30; // element 224: low 3
        let b = BlockQ5K { d: f16::from_f32(1.0), dmin: f16::from_f32(0.5), scales: pack_scale_min(&sc, &m), qh, qs };
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 2.0 * 7.0 - 1.5);
        assert_eq!(out[32], 5.0 * 26.0 - 0.5);
        assert_eq!(out[33], -0.5);
        assert_eq!(out[224], 63.0 * 19.0 - 20.0);
        assert_eq!(out[192], 0.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut row = vec![0u8; 2 * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            b[0..2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(-0.02).to_bits().to_le_bytes());
        }
        let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 2 * QK_K];
        dequantize_row(&row, &mut w);
        assert!(w.iter().all(|v| v.is_finite()));
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
    }
}
