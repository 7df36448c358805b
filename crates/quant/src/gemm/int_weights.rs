//! Weights as small integers for the 16-bit prompt kernel: every supported format's element is
//! `scale · q + min` per block of 32, with `q` an integer of at most [`MAX_Q`] in magnitude (K-quant
//! sub-block scales are folded into `q`, their super-block scale is the block's `scale`).
//!
//! This is an exact rewrite of each format's definition, not an approximation: `scale · q + min`
//! equals the dequantized weight in real arithmetic (the f32 `dequantize_row` rounds it once more).

use kiln_gguf::GgmlType;

use crate::{iq4_nl, iq4_xs, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0};

/// Elements per integer block (one scale and one min each).
pub const BLOCK: usize = 32;

/// Largest `|q|` of any format here: Q6_K's `(q - 32) · scale` reaches `-32 · -128`.
pub const MAX_Q: i32 = 4096;

/// Whether `ty` has an integer form here. Q2_K is left out: its mins change every 16 elements.
pub fn is_supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
    )
}

/// Whether the format's blocks carry a min (an offset added to every element).
pub fn has_min(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K)
}

/// Decodes one row: `q[k]` for every element, `scale[b]` and `min[b]` for every block of 32
/// (`min` is all zeros for formats without one). Panics for unsupported types or wrong lengths
/// (geometry is checked by the caller's `QMatrix`).
pub fn decode_row(ty: GgmlType, src: &[u8], q: &mut [i16], scale: &mut [f32], min: &mut [f32]) {
    let n = q.len();
    assert!(n.is_multiple_of(ty.block_size()), "whole blocks");
    assert_eq!(src.len(), n / ty.block_size() * ty.type_size(), "row bytes");
    assert!(scale.len() == n / BLOCK && min.len() == n / BLOCK, "one scale and min per 32");
    let mut legacy = |bytes: usize, f: &mut BlockDecoder| {
        for (b, (blk, qb)) in src.chunks_exact(bytes).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
            (scale[b], min[b]) = f(blk, qb);
        }
    };
    match ty {
        // The common formats read their bytes directly (this runs once per panel row).
        GgmlType::Q4_0 => {
            for (b, (blk, qb)) in src.chunks_exact(q4_0::BLOCK_BYTES).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
                (scale[b], min[b]) = (f16_at(blk, 0), 0.0);
                let (lo, hi) = qb.split_at_mut(BLOCK / 2);
                for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[2..]) {
                    *l = i16::from(byte & 0x0F) - 8;
                    *h = i16::from(byte >> 4) - 8;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, (blk, qb)) in src.chunks_exact(q4_1::BLOCK_BYTES).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
                (scale[b], min[b]) = (f16_at(blk, 0), f16_at(blk, 2));
                let (lo, hi) = qb.split_at_mut(BLOCK / 2);
                for ((l, h), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[4..]) {
                    *l = i16::from(byte & 0x0F);
                    *h = i16::from(byte >> 4);
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, (blk, qb)) in src.chunks_exact(q8_0::BLOCK_BYTES).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
                (scale[b], min[b]) = (f16_at(blk, 0), 0.0);
                for (o, &byte) in qb.iter_mut().zip(&blk[2..]) {
                    *o = i16::from(byte as i8);
                }
            }
        }
        GgmlType::Q5_0 => legacy(q5_0::BLOCK_BYTES, &mut |b, out| {
            let blk = q5_0::BlockQ5_0::from_bytes(b);
            copy(out, blk.quants().map(i16::from));
            (blk.d.to_f32(), 0.0)
        }),
        GgmlType::Q5_1 => legacy(q5_1::BLOCK_BYTES, &mut |b, out| {
            let blk = q5_1::BlockQ5_1::from_bytes(b);
            copy(out, blk.quants().map(i16::from));
            (blk.d.to_f32(), blk.m.to_f32())
        }),
        GgmlType::IQ4_NL => legacy(iq4_nl::BLOCK_BYTES, &mut |b, out| {
            let blk = iq4_nl::BlockIq4Nl::from_bytes(b);
            copy(out, blk.values().map(i16::from));
            (blk.d.to_f32(), 0.0)
        }),
        _ => decode_kquant_row(ty, src, q, scale, min),
    }
}

/// The little-endian f16 at `bytes[at..at + 2]`, widened.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes one 32-element block's integers and returns its `(scale, min)`.
type BlockDecoder<'a> = dyn FnMut(&[u8], &mut [i16]) -> (f32, f32) + 'a;

fn copy<const N: usize>(out: &mut [i16], vals: [i16; N]) {
    out.copy_from_slice(&vals);
}

/// The super-block formats: 8 blocks of 32 per 256, all with the super-block's `d` as scale.
fn decode_kquant_row(ty: GgmlType, src: &[u8], q: &mut [i16], scale: &mut [f32], min: &mut [f32]) {
    const QK_K: usize = 256;
    let bytes = ty.type_size();
    let supers = src.chunks_exact(bytes).zip(q.chunks_exact_mut(QK_K));
    for (s, (blk, qs)) in supers.enumerate() {
        let (sc, mn) = (&mut scale[8 * s..8 * s + 8], &mut min[8 * s..8 * s + 8]);
        match ty {
            GgmlType::Q4_K => {
                let b = q4_k::BlockQ4K::from_bytes(blk.try_into().expect("chunks_exact"));
                let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
                for j in 0..8 {
                    let (scale_j, min_j) = q4_k::get_scale_min(j, &b.scales);
                    let nib = &b.qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let shift = 4 * (j % 2);
                    for (o, &byte) in qs[32 * j..32 * j + 32].iter_mut().zip(nib) {
                        *o = i16::from((byte >> shift) & 0x0F) * i16::from(scale_j);
                    }
                    sc[j] = d;
                    mn[j] = -(dmin * f32::from(min_j));
                }
            }
            GgmlType::Q5_K => {
                let b = q5_k::BlockQ5K::from_bytes(blk.try_into().expect("chunks_exact"));
                let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
                for j in 0..8 {
                    let (scale_j, min_j) = q4_k::get_scale_min(j, &b.scales);
                    let nib = &b.qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let shift = 4 * (j % 2);
                    for ((o, &lo), &hi) in qs[32 * j..32 * j + 32].iter_mut().zip(nib).zip(&b.qh) {
                        let v = ((lo >> shift) & 0x0F) | (((hi >> j) & 1) << 4);
                        *o = i16::from(v) * i16::from(scale_j);
                    }
                    sc[j] = d;
                    mn[j] = -(dmin * f32::from(min_j));
                }
            }
            GgmlType::Q6_K => {
                let b = q6_k::BlockQ6K::from_bytes(blk.try_into().expect("chunks_exact"));
                for (e, o) in qs.iter_mut().enumerate() {
                    let v = i16::from(b.quant(e)) - 32;
                    *o = v * i16::from(b.scales[e / 16]);
                }
                sc.fill(b.d.to_f32());
                mn.fill(0.0);
            }
            GgmlType::Q3_K => {
                let b = q3_k::BlockQ3K::from_bytes(blk.try_into().expect("chunks_exact"));
                for g in 0..16 {
                    let scale_g = i16::from(q3_k::scale(g, &b.scales));
                    let (h, shift, hbit, start) = (g / 8, 2 * ((g % 8) / 2), g / 2, 16 * (g % 2));
                    let lows = &b.qs[32 * h + start..32 * h + start + 16];
                    let highs = &b.hmask[start..start + 16];
                    for ((o, &lo), &hi) in qs[16 * g..16 * g + 16].iter_mut().zip(lows).zip(highs) {
                        let v = i16::from((lo >> shift) & 3) - if (hi >> hbit) & 1 == 0 { 4 } else { 0 };
                        *o = v * scale_g;
                    }
                }
                sc.fill(b.d.to_f32());
                mn.fill(0.0);
            }
            GgmlType::IQ4_XS => {
                let b = iq4_xs::BlockIQ4XS::from_bytes(blk.try_into().expect("chunks_exact"));
                for j in 0..8 {
                    let scale_j = i16::from(b.scale(j));
                    let nib = &b.qs[16 * j..16 * j + 16];
                    let (lo, hi) = qs[32 * j..32 * j + 32].split_at_mut(16);
                    for ((a, c), &byte) in lo.iter_mut().zip(hi.iter_mut()).zip(nib) {
                        *a = i16::from(iq4_nl::KVALUES_IQ4NL[usize::from(byte & 0x0F)]) * scale_j;
                        *c = i16::from(iq4_nl::KVALUES_IQ4NL[usize::from(byte >> 4)]) * scale_j;
                    }
                }
                sc.fill(b.d.to_f32());
                mn.fill(0.0);
            }
            other => panic!("{other:?} has no integer form (check is_supported first)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Random bytes with every f16 field (scales, mins) set to finite values of either sign.
    fn random_row(ty: GgmlType, blocks: usize, seed: &mut u64) -> Vec<u8> {
        let ts = ty.type_size();
        let mut src: Vec<u8> = (0..blocks * ts).map(|_| lcg(seed) as u8).collect();
        let f16_offsets: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::IQ4_XS => &[0],
            GgmlType::Q3_K | GgmlType::Q6_K => &[ts - 2],
            _ => &[],
        };
        for b in 0..blocks {
            for &off in f16_offsets {
                let v = (lcg(seed) % 2000) as f32 / 1000.0 - 1.0;
                src[b * ts + off..b * ts + off + 2].copy_from_slice(&half::f16::from_f32(v * 0.05).to_le_bytes());
            }
        }
        src
    }

    #[test]
    fn integer_form_equals_the_dequantized_weights() {
        let mut seed = 5;
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ] {
            assert!(is_supported(ty));
            let blocks = 3;
            let n = blocks * ty.block_size();
            let src = random_row(ty, blocks, &mut seed);
            let mut want = vec![0f32; n];
            crate::dequantize_row(ty, &src, &mut want).expect("dequantize");
            let (mut q, mut scale, mut min) = (vec![0i16; n], vec![0f32; n / BLOCK], vec![f32::NAN; n / BLOCK]);
            decode_row(ty, &src, &mut q, &mut scale, &mut min);
            for k in 0..n {
                assert!(i32::from(q[k]).abs() <= MAX_Q, "{ty:?} q[{k}] = {}", q[k]);
                let b = k / BLOCK;
                if !has_min(ty) {
                    assert_eq!(min[b], 0.0);
                }
                // The f32 dequantization rounds `scale · q + min` once or twice: compare in f64
                // with a bound of a few f32 roundings of the terms.
                let exact = f64::from(scale[b]) * f64::from(q[k]) + f64::from(min[b]);
                let tol = 4.0 * f64::from(f32::EPSILON) * (exact.abs() + f64::from(min[b]).abs());
                assert!((exact - f64::from(want[k])).abs() <= tol, "{ty:?} element {k}: {exact} vs {}", want[k]);
            }
        }
        assert!(!is_supported(GgmlType::Q2_K) && !is_supported(GgmlType::F16));
    }
}
