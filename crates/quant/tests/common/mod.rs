//! Random inputs shared by the dot-kernel tests (a module of each test crate that uses it).
#![allow(dead_code)]

use half::f16;
use kiln_gguf::GgmlType;
use rand::rngs::StdRng;
use rand::Rng;

/// A random f16 of magnitude in `[lo, hi)` with a random sign.
pub fn rand_f16(rng: &mut StdRng, lo: f32, hi: f32) -> [u8; 2] {
    let mag = lo * (hi / lo).powf(rng.gen::<f32>());
    let v = if rng.gen::<bool>() { mag } else { -mag };
    f16::from_f32(v).to_le_bytes()
}

/// A row of `n` elements of random valid blocks: random scales (and offsets), random quants.
pub fn legacy_row(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let bs = ty.type_size();
    let mut row = vec![0u8; n / 32 * bs];
    for blk in row.chunks_exact_mut(bs) {
        rng.fill(blk);
        blk[..2].copy_from_slice(&rand_f16(rng, 1e-3, 5e-2));
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            blk[2..4].copy_from_slice(&rand_f16(rng, 1e-3, 0.5));
        }
    }
    row
}

pub fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// A row of random valid blocks: random quant and scale bytes, f16 scales in a sane range.
/// Writes the super-block scale `d` (and `dmin`, for the formats with mins) of one block of `ty`.
pub fn put_kquant_scales(b: &mut [u8], ty: GgmlType, d: f32, dmin: f32) {
    match ty {
        GgmlType::Q2_K => {
            put_f16(b, 80, d);
            put_f16(b, 82, dmin);
        }
        GgmlType::Q3_K => put_f16(b, 108, d),
        GgmlType::Q4_K | GgmlType::Q5_K => {
            put_f16(b, 0, d);
            put_f16(b, 2, dmin);
        }
        GgmlType::Q6_K => put_f16(b, 208, d),
        GgmlType::IQ4_XS => put_f16(b, 0, d),
        _ => unreachable!(),
    }
}

/// Random activations: mostly uniform, some outliers, sometimes an all-zero block.
pub fn legacy_x(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let v = rng.gen_range(-2.0f32..2.0);
            if rng.gen_ratio(1, 50) {
                v * 30.0
            } else {
                v
            }
        })
        .collect();
    if n >= 96 && rng.gen::<bool>() {
        x[32..64].fill(0.0);
    }
    x
}

pub fn kquant_row(rng: &mut StdRng, ty: GgmlType, n: usize) -> Vec<u8> {
    let ts = ty.type_size();
    let mut row = vec![0u8; n / 256 * ts];
    rng.fill(&mut row[..]);
    for b in row.chunks_exact_mut(ts) {
        let d = rng.gen_range(-0.05f32..0.05);
        let dmin = rng.gen_range(-0.05f32..0.05);
        put_kquant_scales(b, ty, d, dmin);
    }
    row
}

pub fn kquant_x(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            // Varying magnitudes between super-blocks, and a few outliers.
            let scale = [0.1f32, 1.0, 3.0, 0.01][(i / 256) % 4];
            let v = rng.gen_range(-1.0f32..1.0) * scale;
            if rng.gen_range(0..64) == 0 {
                v * 10.0
            } else {
                v
            }
        })
        .collect()
}
