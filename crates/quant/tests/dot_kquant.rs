//! k-quant × 8-bit activation dot products: every kernel level against the scalar oracle, the
//! multi-vector kernels against single dots, and the oracle against the f64 dot of the exactly
//! dequantized row with the original f32 activations.
//!
//! Error bounds used here:
//! - kernel vs oracle: the integers are the same, only f32 rounding of partial sums differs, so
//!   `|kernel - oracle| <= 1e-5 * M` with `M` from `vec_dot_q8k_unopt_with_magnitude` (every partial
//!   sum a kernel forms is at most `M`; ~30 roundings of 2^-24 each stay far below 1e-5).
//! - oracle vs exact: activations are `da * a` with `|x - da * a| <= da / 2` (`da = amax / 127` per
//!   super-block, round to nearest), so `|oracle - Σ w x| <= Σ_blocks (da / 2) Σ |w|`, plus f32
//!   rounding of the oracle (`1e-5 * M`) and of the dequantized weights (`1e-6 * Σ |w x|`).

use kiln_gguf::{GgmlType, GgufFile};
use kiln_quant::act_q8k::ActQ8K;
use kiln_quant::dequantize_row;
use kiln_quant::dot_kquant::{
    available_isas, is_supported, vec_dot_q8k, vec_dot_q8k_isa, vec_dot_q8k_unopt, vec_dot_q8k_unopt_with_magnitude,
    vec_dot_q8k_x4_isa, Isa,
};
mod common;

use common::{kquant_row as random_row, kquant_x as random_x, put_f16};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

const TYPES: [GgmlType; 6] =
    [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_XS];

const LENGTHS: [usize; 4] = [256, 768, 256 * 11, 4096 + 256];

/// Rows whose blocks take the extreme values of every field (all quant bits set / clear, largest
/// scales and mins), to exercise the i16 / i32 headroom of the kernels.
fn extreme_row(ty: GgmlType, n: usize, fill: u8) -> Vec<u8> {
    let ts = ty.type_size();
    let mut row = vec![fill; n / 256 * ts];
    for b in row.chunks_exact_mut(ts) {
        match ty {
            GgmlType::Q2_K => {
                put_f16(b, 80, 0.01);
                put_f16(b, 82, -0.01);
            }
            GgmlType::Q3_K => put_f16(b, 108, 0.01),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                put_f16(b, 0, 0.01);
                put_f16(b, 2, 0.01);
            }
            GgmlType::Q6_K => put_f16(b, 208, 0.01),
            GgmlType::IQ4_XS => put_f16(b, 0, 0.01),
            _ => unreachable!(),
        }
    }
    row
}

fn quantize(x: &[f32]) -> ActQ8K {
    let mut a = ActQ8K::new();
    a.quantize(x);
    a
}

/// Checks every level and the x4 kernels against the oracle, and the oracle against the exact dot.
fn check_row(ty: GgmlType, row: &[u8], x: &[f32], what: &str) {
    let act = quantize(x);
    let (oracle, mag) = vec_dot_q8k_unopt_with_magnitude(ty, row, &act);
    assert_eq!(oracle.to_bits(), vec_dot_q8k_unopt(ty, row, &act).to_bits());
    let tol = 1e-5 * mag + 1e-30;
    for isa in available_isas() {
        let got = vec_dot_q8k_isa(isa, ty, row, &act);
        assert!(
            ((got - oracle) as f64).abs() <= tol,
            "{ty:?} {what} n={} {}: {got} vs oracle {oracle} (tol {tol})",
            x.len(),
            isa.name()
        );
    }
    let dispatched = vec_dot_q8k(ty, row, &act);
    assert!(((dispatched - oracle) as f64).abs() <= tol);

    // Exact: f64 dot of the dequantized row with the original activations.
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, row, &mut w).unwrap();
    let exact: f64 = w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
    let abs_wx: f64 = w.iter().zip(x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
    let act_err: f64 = w
        .chunks_exact(256)
        .zip(&act.d)
        .map(|(wb, &da)| da as f64 / 2.0 * wb.iter().map(|&v| (v as f64).abs()).sum::<f64>())
        .sum();
    let bound = act_err * 1.0001 + tol + 1e-6 * abs_wx + 1e-30;
    assert!(
        (oracle as f64 - exact).abs() <= bound,
        "{ty:?} {what} n={}: oracle {oracle} vs exact {exact} (bound {bound})",
        x.len()
    );
}

#[test]
fn random_rows_all_levels() {
    println!("levels: {:?}", available_isas());
    let mut rng = StdRng::seed_from_u64(0x6b71);
    for ty in TYPES {
        assert!(is_supported(ty));
        for n in LENGTHS {
            for rep in 0..4 {
                let row = random_row(&mut rng, ty, n);
                let x = random_x(&mut rng, n);
                check_row(ty, &row, &x, &format!("random#{rep}"));
            }
        }
    }
}

#[test]
fn extreme_rows_all_levels() {
    let mut rng = StdRng::seed_from_u64(7);
    for ty in TYPES {
        for fill in [0x00u8, 0xFF, 0x55, 0xAA, 0x80, 0x7F] {
            let row = extreme_row(ty, 768, fill);
            // Saturated activations: every |a| = 127 with random signs, and all equal signs.
            let signs: Vec<f32> = (0..768).map(|_| if rng.gen::<bool>() { 1.0 } else { -1.0 }).collect();
            check_row(ty, &row, &signs, &format!("extreme {fill:#x} ±1"));
            check_row(ty, &row, &[1.0; 768], &format!("extreme {fill:#x} +1"));
            check_row(ty, &row, &[-1.0; 768], &format!("extreme {fill:#x} -1"));
        }
    }
}

#[test]
fn zero_activations_and_zero_blocks() {
    let mut rng = StdRng::seed_from_u64(9);
    for ty in TYPES {
        let row = random_row(&mut rng, ty, 512);
        let act = quantize(&[0.0; 512]);
        for isa in available_isas() {
            assert_eq!(vec_dot_q8k_isa(isa, ty, &row, &act), 0.0);
        }
    }
}

#[test]
fn x4_matches_single() {
    let mut rng = StdRng::seed_from_u64(0x44);
    for ty in TYPES {
        for n in [256usize, 256 * 11] {
            let row = random_row(&mut rng, ty, n);
            let acts: Vec<ActQ8K> = (0..4).map(|_| quantize(&random_x(&mut rng, n))).collect();
            for isa in available_isas() {
                for k in 1..=4 {
                    let refs: Vec<&ActQ8K> = acts[..k].iter().collect();
                    let mut out = vec![f32::NAN; k];
                    vec_dot_q8k_x4_isa(isa, ty, &row, &refs, &mut out);
                    for (j, &o) in out.iter().enumerate() {
                        let single = vec_dot_q8k_isa(isa, ty, &row, &acts[j]);
                        // Same instructions in the same order: identical.
                        assert_eq!(o.to_bits(), single.to_bits(), "{ty:?} {} k={k} j={j}", isa.name());
                    }
                }
            }
        }
    }
}

#[test]
fn unaligned_rows() {
    let mut rng = StdRng::seed_from_u64(0xa1);
    for ty in TYPES {
        let row = random_row(&mut rng, ty, 768);
        let x = random_x(&mut rng, 768);
        let act = quantize(&x);
        let want = vec_dot_q8k_unopt(ty, &row, &act);
        let mut buf = vec![0u8; row.len() + 64];
        for off in 1..8 {
            buf[off..off + row.len()].copy_from_slice(&row);
            let r = &buf[off..off + row.len()];
            for isa in available_isas() {
                let (oracle, mag) = vec_dot_q8k_unopt_with_magnitude(ty, r, &act);
                assert_eq!(oracle, want);
                let got = vec_dot_q8k_isa(isa, ty, r, &act);
                assert!(((got - oracle) as f64).abs() <= 1e-5 * mag);
            }
        }
    }
}

#[test]
fn act_simd_matches_scalar() {
    let mut rng = StdRng::seed_from_u64(0x51);
    let mut a = ActQ8K::new();
    let mut b = ActQ8K::new();
    for n in [256usize, 768, 4096, 4096 + 256] {
        for _ in 0..8 {
            let mut x = random_x(&mut rng, n);
            // Exact ties: values that land on k + 0.5 after scaling by 127 / amax.
            x[0] = 127.0 / 64.0;
            for (i, v) in x.iter_mut().enumerate().skip(1).step_by(37) {
                *v = (i % 255) as f32 / 128.0 - 0.99;
            }
            a.quantize(&x);
            b.quantize_scalar(&x);
            assert_eq!(a, b, "n={n}");
            assert_eq!(a.len(), n);
            for (blk, (db, xb)) in a.d.iter().zip(x.chunks_exact(256)).enumerate() {
                for (i, &v) in xb.iter().enumerate() {
                    let q = a.qs[256 * blk + i] as f32;
                    assert!((v - db * q).abs() <= db * 0.5001 + 1e-30);
                }
                for g in 0..16 {
                    let s: i32 = a.qs[256 * blk + 16 * g..256 * blk + 16 * g + 16].iter().map(|&q| q as i32).sum();
                    assert_eq!(s, a.bsums[16 * blk + g] as i32);
                }
            }
        }
    }
    // Capacity is reused and lengths follow the input.
    a.quantize(&[0.5; 256]);
    assert_eq!((a.len(), a.d.len(), a.bsums.len()), (256, 1, 16));
    assert!(a.qs.iter().all(|&q| q == 127));
}

fn synth_path(ty: &str) -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for base in [manifest.join("../../../shared"), manifest.join("../../shared"), "/work/shared".into()] {
        let p = base.join(format!("models/synth/synth-tiny-{ty}.gguf"));
        if p.exists() {
            return p;
        }
    }
    panic!("synth-tiny-{ty}.gguf not found")
}

#[test]
fn real_rows_of_synth_models() {
    let mut rng = StdRng::seed_from_u64(0x5e);
    for ty in TYPES {
        let g = GgufFile::open(synth_path(ty.name())).unwrap();
        let mut n_rows = 0;
        for t in g.tensors.iter().filter(|t| t.ggml_type == ty) {
            let data = g.tensor_data(t);
            let rb = t.row_bytes();
            // Every 7th row of every tensor of this type (all of them would be slow in the oracle).
            for r in (0..t.n_rows()).step_by(7) {
                let row = &data[r * rb..(r + 1) * rb];
                let x = random_x(&mut rng, t.row_len());
                check_row(ty, row, &x, &format!("{} row {r}", t.name));
                n_rows += 1;
            }
        }
        assert!(n_rows > 0, "no {ty:?} tensors in the synth model");
    }
}

/// Matrix-vector timing, 1 thread: `cargo test --release --test dot_kquant -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_matvec_4096() {
    let rows: usize = std::env::var("KILN_BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let cols = 4096usize;
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_x(&mut rng, cols);
    let act = quantize(&x);
    let acts4: Vec<ActQ8K> = (0..4).map(|_| quantize(&random_x(&mut rng, cols))).collect();
    let refs: Vec<&ActQ8K> = acts4.iter().collect();
    let types: Vec<GgmlType> = match std::env::var("KILN_BENCH_TYPES") {
        Ok(s) => s.split(',').filter_map(GgmlType::from_name).collect(),
        Err(_) => TYPES.to_vec(),
    };
    for ty in types {
        let mat = random_row(&mut rng, ty, rows * cols);
        let rb = cols / 256 * ty.type_size();
        let mut y = vec![0f32; rows];
        for isa in available_isas() {
            let reps = if isa == Isa::Scalar { 2 } else { 20 };
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                for (r, yr) in y.iter_mut().enumerate() {
                    *yr = vec_dot_q8k_isa(isa, ty, &mat[r * rb..(r + 1) * rb], &act);
                }
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(&y);
            }
            let mut best4 = f64::INFINITY;
            let mut out = [0f32; 4];
            for _ in 0..reps {
                let t = Instant::now();
                for r in 0..rows {
                    vec_dot_q8k_x4_isa(isa, ty, &mat[r * rb..(r + 1) * rb], &refs, &mut out);
                    std::hint::black_box(&out);
                }
                best4 = best4.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{:>6} {:>6} {rows}x4096: matvec {:7.3} ms {:6.2} GB/s {:6.2} Gop/s | x4 {:7.3} ms ({:6.2} GB/s, {:6.2} Gop/s)",
                ty.name(),
                isa.name(),
                best * 1e3,
                mat.len() as f64 / best / 1e9,
                2.0 * (rows * cols) as f64 / best / 1e9,
                best4 * 1e3,
                mat.len() as f64 / best4 / 1e9,
                8.0 * (rows * cols) as f64 / best4 / 1e9,
            );
        }
    }
}
