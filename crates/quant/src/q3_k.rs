//! Q3_K blocks: super-blocks of 256 weights in 16 groups of 16, 3-bit quants (2 low bits in `qs`, the
//! high bit in `hmask`, which *subtracts* 4 when clear) with a signed 6-bit scale per group (stored
//! biased by 32) relative to the f16 super-block scale `d`: `x = (d * (sc - 32)) * q`, `q` in -4..4.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 110;

/// One Q3_K super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ3K {
    /// High bits: bit `e / 32` of byte `e % 32` belongs to element `e`.
    pub hmask: [u8; 32],
    /// Low 2 bits: element `128 * h + 32 * s + l` is bits `2s..2s+2` of byte `32 * h + l`.
    pub qs: [u8; 64],
    /// 16 scales of 6 bits (see [`BlockQ3K::scale`]).
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: f16,
}

const _: () = assert!(std::mem::size_of::<BlockQ3K>() == BLOCK_BYTES);

/// The 6-bit scale of group `k` (0..16), minus 32: low 4 bits from nibble `k / 8` of byte `k % 8`,
/// high 2 bits from bits `2 * (k / 4)` of byte `8 + k % 4`.
#[inline]
pub fn scale(k: usize, s: &[u8; 12]) -> i8 {
    let low = (s[k % 8] >> (4 * (k / 8))) & 0x0F;
    let high = (s[8 + k % 4] >> (2 * (k / 4))) & 0x03;
    (low | (high << 4)) as i8 - 32
}

/// Packs 16 scales in -32..32 into the 12-byte layout read by [`scale`].
pub fn pack_scales(sc: &[i8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (k, &v) in sc.iter().enumerate() {
        let u = (v as i32 + 32).clamp(0, 63) as u8;
        s[k % 8] |= (u & 0x0F) << (4 * (k / 8));
        s[8 + k % 4] |= (u >> 4) << (2 * (k / 4));
    }
    s
}

impl BlockQ3K {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        BlockQ3K {
            hmask: b[0..32].try_into().unwrap(),
            qs: b[32..96].try_into().unwrap(),
            scales: b[96..108].try_into().unwrap(),
            d: f16::from_bits(u16::from_le_bytes([b[108], b[109]])),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..32].copy_from_slice(&self.hmask);
        b[32..96].copy_from_slice(&self.qs);
        b[96..108].copy_from_slice(&self.scales);
        b[108..110].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b
    }

    /// Dequantizes the 256 weights of the block.
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        for (g, group) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * scale(g, &self.scales) as f32;
            // Elements 16g..16g+16: half h = g / 8, 2-bit shift s = (g % 8) / 2, high bit g / 2.
            let h = g / 8;
            let shift = 2 * ((g % 8) / 2);
            let hbit = g / 2;
            let start = 16 * (g % 2);
            let qs = &self.qs[32 * h + start..32 * h + start + 16];
            let hm = &self.hmask[start..start + 16];
            for ((y, &lo), &hi) in group.iter_mut().zip(qs).zip(hm) {
                let q = ((lo >> shift) & 3) as i8 - if (hi >> hbit) & 1 == 0 { 4 } else { 0 };
                *y = dl * q as f32;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockQ3K> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockQ3K::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of a Q3_K row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "Q3_K row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "Q3_K row/activation length mismatch");
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
    fn scale_pack_roundtrip() {
        let sc: [i8; 16] = [-32, 31, 0, -1, 5, -17, 16, 15, -16, 1, 2, 3, -30, 30, 7, -8];
        let s = pack_scales(&sc);
        for (k, &v) in sc.iter().enumerate() {
            assert_eq!(scale(k, &s), v, "scale {k}");
        }
    }

    #[test]
    fn hand_built_block() {
        let mut sc = [0i8; 16];
        sc[0] = 3;
        sc[2] = -5;
        sc[15] = 31;
        let mut qs = [0u8; 64];
        let mut hmask = [0u8; 32];
        qs[0] = 0b0000_1011; // element 0: low 3, element 32: low 2
        hmask[0] = 0b0000_0001; // element 0 high bit set (q = 3); element 32 clear (q = 2 - 4)
        qs[63] = 0b0100_0000; // element 255: low 1
        hmask[31] = 0b1000_0000; // element 255 high bit set (q = 1)
        let b = BlockQ3K { hmask, qs, scales: pack_scales(&sc), d: f16::from_f32(0.5) };
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 0.5 * 3.0 * 3.0);
        assert_eq!(out[1], 0.5 * 3.0 * -4.0);
        assert_eq!(out[32], 0.5 * -5.0 * -2.0);
        assert_eq!(out[255], 0.5 * 31.0);
        assert_eq!(out[16], 0.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut row = vec![0u8; 2 * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            b[108..110].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 2 * QK_K];
        dequantize_row(&row, &mut w);
        assert!(w.iter().all(|v| v.is_finite()));
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
    }
}
