//! Q4_K blocks: super-blocks of 256 weights in 8 sub-blocks of 32, 4-bit quants with a 6-bit scale and
//! a 6-bit min per sub-block, relative to the f16 super-block scales `d` and `dmin`:
//! `x = (d * sc) * q - (dmin * m)`.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 144;

/// One Q4_K super-block, as laid out in the file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    /// Super-block scale of the quantized scales.
    pub d: f16,
    /// Super-block scale of the quantized mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each (see [`get_scale_min`]).
    pub scales: [u8; 12],
    /// 4-bit quants: byte `32 * (j / 2) + l` holds sub-block `j`'s element `l` in its low (even `j`)
    /// or high (odd `j`) nibble.
    pub qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == BLOCK_BYTES);

/// Unpacks the 6-bit (scale, min) of sub-block `j` (0..8) from the 12 packed bytes shared by Q4_K and
/// Q5_K: sub-blocks 0..4 use the low 6 bits of bytes `j` and `j + 4`; sub-blocks 4..8 take their low 4
/// bits from byte `j + 4` (scale: low nibble, min: high nibble) and their top 2 bits from the top bits of
/// bytes `j - 4` (scale) and `j` (min).
#[inline]
pub fn get_scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Packs 8 (scale, min) pairs of 6 bits into the 12-byte layout read by [`get_scale_min`].
pub fn pack_scale_min(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j] & 63, m[j] & 63);
        if j < 4 {
            s[j] |= ls;
            s[j + 4] |= lm;
        } else {
            s[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    s
}

impl BlockQ4K {
    /// Reads a block from its `BLOCK_BYTES` little-endian bytes (any alignment).
    pub fn from_bytes(b: &[u8; BLOCK_BYTES]) -> Self {
        BlockQ4K {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            dmin: f16::from_bits(u16::from_le_bytes([b[2], b[3]])),
            scales: b[4..16].try_into().unwrap(),
            qs: b[16..144].try_into().unwrap(),
        }
    }

    /// The block's file bytes.
    pub fn to_bytes(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&self.dmin.to_bits().to_le_bytes());
        b[4..16].copy_from_slice(&self.scales);
        b[16..144].copy_from_slice(&self.qs);
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
            for (y, &q) in sub.iter_mut().zip(qs) {
                *y = dl * ((q >> shift) & 0x0F) as f32 - ml;
            }
        }
    }
}

fn blocks(src: &[u8]) -> impl Iterator<Item = BlockQ4K> + '_ {
    debug_assert_eq!(src.len() % BLOCK_BYTES, 0);
    src.chunks_exact(BLOCK_BYTES).map(|c| BlockQ4K::from_bytes(c.try_into().unwrap()))
}

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    for (b, out) in blocks(src).zip(dst.chunks_exact_mut(QK_K)) {
        b.dequantize(out.try_into().unwrap());
    }
}

/// Reference dot product of a Q4_K row with f32 activations: each weight dequantized exactly as
/// [`dequantize_row`] does, products summed in f32 in element order.
pub fn vec_dot_unopt(row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(row.len() % BLOCK_BYTES, 0, "Q4_K row is not whole blocks");
    assert_eq!(row.len() / BLOCK_BYTES * QK_K, x.len(), "Q4_K row/activation length mismatch");
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

/// Quantizes `src` (a multiple of 256 values) into Q4_K blocks appended to `dst`.
///
/// A simple min/max search per sub-block (no error-minimising refinement): good enough for tests and
/// for making models, not for matching llama.cpp's output byte for byte.
pub fn quantize_row(src: &[f32], dst: &mut Vec<u8>) {
    assert_eq!(src.len() % QK_K, 0, "Q4_K quantize: length is not whole blocks");
    for x in src.chunks_exact(QK_K) {
        dst.extend_from_slice(&quantize_block(x.try_into().unwrap()).to_bytes());
    }
}

fn quantize_block(x: &[f32; QK_K]) -> BlockQ4K {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let mut lo = sub.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if lo > 0.0 {
            lo = 0.0;
        }
        scales[j] = (hi - lo).max(0.0) / 15.0;
        mins[j] = -lo;
    }
    let max_scale = scales.iter().copied().fold(0f32, f32::max);
    let max_min = mins.iter().copied().fold(0f32, f32::max);
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (inv_scale * scales[j]).round().clamp(0.0, 63.0) as u8;
        lm[j] = (inv_min * mins[j]).round().clamp(0.0, 63.0) as u8;
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut qs = [0u8; 128];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let dl = d.to_f32() * ls[j] as f32;
        let ml = dmin.to_f32() * lm[j] as f32;
        for (l, &v) in sub.iter().enumerate() {
            let q = if dl > 0.0 { ((v + ml) / dl).round().clamp(0.0, 15.0) as u8 } else { 0 };
            qs[32 * (j / 2) + l] |= q << (4 * (j % 2));
        }
    }
    BlockQ4K { d, dmin, scales: pack_scale_min(&ls, &lm), qs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_row(rng: &mut StdRng, n_blocks: usize) -> Vec<u8> {
        let mut row = vec![0u8; n_blocks * BLOCK_BYTES];
        rng.fill(&mut row[..]);
        for b in row.chunks_exact_mut(BLOCK_BYTES) {
            let d = f16::from_f32(rng.gen_range(-0.1..0.1));
            let dmin = f16::from_f32(rng.gen_range(-0.1..0.1));
            b[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
            b[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
        }
        row
    }

    #[test]
    fn scale_min_pack_roundtrip() {
        let sc = [0, 63, 17, 42, 5, 63, 33, 1];
        let m = [63, 0, 9, 60, 31, 32, 1, 62];
        let s = pack_scale_min(&sc, &m);
        for j in 0..8 {
            assert_eq!(get_scale_min(j, &s), (sc[j], m[j]));
        }
    }

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
        qs[0] = 0xA7; // element 0: 7, element 32: 10
        qs[127] = 0xF0; // element 255 (sub-block 7, l = 31): 15; element 223: 0
        let b = BlockQ4K { d: f16::from_f32(1.0), dmin: f16::from_f32(0.5), scales: pack_scale_min(&sc, &m), qs };
        let mut out = vec![0f32; QK_K];
        dequantize_row(&b.to_bytes(), &mut out);
        assert_eq!(out[0], 2.0 * 7.0 - 1.5);
        assert_eq!(out[1], -1.5);
        assert_eq!(out[32], 5.0 * 10.0 - 0.5);
        assert_eq!(out[64], 0.0);
        assert_eq!(out[255], 63.0 * 15.0 - 20.0);
        assert_eq!(out[223], 0.0);
    }

    #[test]
    fn vec_dot_matches_dequantized_dot() {
        let mut rng = StdRng::seed_from_u64(4);
        let row = random_row(&mut rng, 3);
        let x: Vec<f32> = (0..3 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut w = vec![0f32; 3 * QK_K];
        dequantize_row(&row, &mut w);
        let want = w.iter().zip(&x).fold(0f32, |s, (a, b)| s + a * b);
        assert_eq!(vec_dot_unopt(&row, &x).to_bits(), want.to_bits());
        let want64: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((vec_dot_unopt(&row, &x) as f64 - want64).abs() < 1e-3);
    }

    #[test]
    fn quantize_roundtrip() {
        let mut rng = StdRng::seed_from_u64(44);
        let x: Vec<f32> = (0..4 * QK_K).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut q = Vec::new();
        quantize_row(&x, &mut q);
        assert_eq!(q.len(), 4 * BLOCK_BYTES);
        let mut y = vec![0f32; x.len()];
        dequantize_row(&q, &mut y);
        let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // step ≈ 2/15 per sub-block; half a step plus the 6-bit scale/min rounding
        assert!(err < 0.12, "max error {err}");
        let zeros = vec![0f32; QK_K];
        let mut q = Vec::new();
        quantize_row(&zeros, &mut q);
        let mut y = vec![1f32; QK_K];
        dequantize_row(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
