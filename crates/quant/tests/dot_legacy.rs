//! Legacy-format dot kernels (`kiln_quant::dot_legacy`) against the scalar oracle, the multi-vector
//! variant against single dots, and the whole quantized dot against the exact f64 dot of the
//! dequantized weights with the original f32 activations.
//!
//! Bounds used:
//! - kernel vs oracle: the integer block sums are identical, only the f32 accumulation order
//!   differs. Any order of summing `N` terms errs by at most `(N - 1) · ε · Σ|terms|`; with at most
//!   `2 nb + 8` terms per path (block products, lane partial sums) and both paths erring,
//!   `|kernel - oracle| <= 2 · (2 nb + 8) · ε · M`, where `M` is the oracle's magnitude bound
//!   (`Σ |d·da| Σ|w a| + |m·da| |Σa|`). In practice it is far below `1e-5 · M` (also asserted).
//! - quantized vs exact: each activation is off by at most `da/2 · (1 + 1e-4)` (see `act_q8`), so
//!   `|dot_q8 - Σ w x| <= Σ_blocks da/2 · (1 + 1e-4) · Σ|w|` plus f32 rounding slack (accumulation
//!   as above, and the one rounding of `d·q + m` in the dequantized reference for Q4_1/Q5_1).

use half::f16;
use kiln_gguf::GgmlType;
use kiln_quant::act_q8::ActQ8;
use kiln_quant::dot_legacy::{
    active_isa, available_isas, is_supported, vec_dot_q8, vec_dot_q8_isa, vec_dot_q8_unopt,
    vec_dot_q8_unopt_with_magnitude, vec_dot_q8_x4, vec_dot_q8_x4_isa, Isa,
};
mod common;

use common::{legacy_row as random_row, legacy_x as random_act};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TYPES: [GgmlType; 6] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::IQ4_NL];

// 12 and 23 blocks: eight-block steps, then a lone group of four, then a partial group
const LENGTHS: [usize; 6] = [32, 96, 32 * 12, 32 * 17, 32 * 23, 4096 + 32];

fn quantized(x: &[f32]) -> ActQ8 {
    let mut a = ActQ8::new();
    a.quantize(x);
    a
}

fn acc_tol(nb: usize, mag: f64) -> f64 {
    2.0 * (2 * nb + 8) as f64 * f64::from(f32::EPSILON) * mag + 1e-30
}

#[test]
fn supported_types() {
    for ty in TYPES {
        assert!(is_supported(ty), "{ty:?}");
    }
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::IQ4_XS] {
        assert!(!is_supported(ty), "{ty:?}");
    }
    assert!(["scalar", "avx2", "avx512"].contains(&active_isa()));
    assert!(available_isas().contains(&Isa::Scalar));
}

#[test]
fn kernels_match_oracle() {
    let mut rng = StdRng::seed_from_u64(0x1e6ac7);
    let mut worst = 0f64;
    for ty in TYPES {
        for n in LENGTHS {
            for _rep in 0..4 {
                let row = random_row(&mut rng, ty, n);
                let act = quantized(&random_act(&mut rng, n));
                let (oracle, mag) = vec_dot_q8_unopt_with_magnitude(ty, &row, &act);
                assert_eq!(oracle.to_bits(), vec_dot_q8_unopt(ty, &row, &act).to_bits());
                let tol = acc_tol(n / 32, mag);
                // The SIMD levels (AVX2, AVX-512 VNNI) form the same integers in the same lanes.
                let simd: Vec<u32> = available_isas()
                    .into_iter()
                    .filter(|&isa| isa >= Isa::Avx2)
                    .map(|isa| vec_dot_q8_isa(isa, ty, &row, &act).to_bits())
                    .collect();
                assert!(simd.windows(2).all(|w| w[0] == w[1]), "{ty:?} n={n}: SIMD levels differ: {simd:?}");
                for isa in available_isas() {
                    let got = vec_dot_q8_isa(isa, ty, &row, &act);
                    let err = f64::from((got - oracle).abs());
                    assert!(
                        err <= tol && err <= 1e-5 * mag + 1e-30,
                        "{ty:?} n={n} {isa:?}: {got} vs oracle {oracle} (err {err}, mag {mag})"
                    );
                    worst = worst.max(err / mag.max(1e-30));
                }
                if std::env::var_os("KILN_ISA").is_none() {
                    let best = available_isas().into_iter().max().unwrap();
                    assert_eq!(
                        vec_dot_q8(ty, &row, &act).to_bits(),
                        vec_dot_q8_isa(best, ty, &row, &act).to_bits(),
                        "default dispatch is the best level"
                    );
                }
            }
        }
    }
    eprintln!("worst |kernel - oracle| / magnitude: {worst:e}");
}

#[test]
fn unaligned_rows() {
    let mut rng = StdRng::seed_from_u64(7);
    for ty in TYPES {
        let n = 32 * 9;
        let row = random_row(&mut rng, ty, n);
        let act = quantized(&random_act(&mut rng, n));
        let (oracle, mag) = vec_dot_q8_unopt_with_magnitude(ty, &row, &act);
        for shift in 1..8 {
            let mut buf = vec![0u8; row.len() + shift];
            buf[shift..].copy_from_slice(&row);
            for isa in available_isas() {
                let got = vec_dot_q8_isa(isa, ty, &buf[shift..], &act);
                assert!(f64::from((got - oracle).abs()) <= acc_tol(9, mag));
            }
        }
    }
}

#[test]
fn multi_matches_single_dots() {
    let mut rng = StdRng::seed_from_u64(99);
    for ty in TYPES {
        for n in LENGTHS {
            let row = random_row(&mut rng, ty, n);
            let acts: Vec<ActQ8> = (0..4).map(|_| quantized(&random_act(&mut rng, n))).collect();
            for isa in available_isas() {
                for k in 1..=4 {
                    let refs: Vec<&ActQ8> = acts[..k].iter().collect();
                    let mut out = vec![f32::NAN; k];
                    vec_dot_q8_x4_isa(isa, ty, &row, &refs, &mut out);
                    for (o, a) in out.iter().zip(&refs) {
                        let single = vec_dot_q8_isa(isa, ty, &row, a);
                        assert_eq!(o.to_bits(), single.to_bits(), "{ty:?} n={n} {isa:?} k={k}");
                    }
                    let mut out2 = vec![f32::NAN; k];
                    vec_dot_q8_x4(ty, &row, &refs, &mut out2);
                    for (o, a) in out2.iter().zip(&refs) {
                        assert_eq!(o.to_bits(), vec_dot_q8(ty, &row, a).to_bits());
                    }
                }
            }
        }
    }
}

/// Extreme quants: every weight at its largest magnitude against activations at ±127 (the
/// saturation edge of `vpmaddubsw`), including Q8_0's -128 which the quantizer never writes.
#[test]
fn extreme_blocks_do_not_saturate() {
    let n = 32 * 7;
    // activations: +-1 so every quant is +-127
    let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
    let xs: Vec<f32> = (0..n).map(|_| 1.0).collect();
    for ty in TYPES {
        let bs = ty.type_size();
        for fill in [0x00u8, 0xff, 0x80, 0x7f, 0x88] {
            let mut row = vec![fill; n / 32 * bs];
            for blk in row.chunks_exact_mut(bs) {
                blk[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    blk[2..4].copy_from_slice(&f16::from_f32(-3.0).to_le_bytes());
                }
            }
            for xv in [&x, &xs] {
                let act = quantized(xv);
                let (oracle, mag) = vec_dot_q8_unopt_with_magnitude(ty, &row, &act);
                // and the oracle is the exact dot of the dequantized row (all products are small
                // integers times 1/127)
                let mut w = vec![0f32; n];
                kiln_quant::dequantize_row(ty, &row, &mut w).unwrap();
                let exact: f64 = w.iter().zip(act.dequantize()).map(|(&a, b)| f64::from(a) * f64::from(b)).sum();
                assert!((f64::from(oracle) - exact).abs() <= acc_tol(7, mag));
                for isa in available_isas() {
                    let got = vec_dot_q8_isa(isa, ty, &row, &act);
                    assert!(
                        f64::from((got - oracle).abs()) <= acc_tol(7, mag),
                        "{ty:?} fill {fill:#x} {isa:?}: {got} vs {oracle}"
                    );
                }
            }
        }
    }
}

/// The whole quantized dot against `Σ w x` in f64 with the dequantized weights and the original
/// activations, within the documented activation-quantization bound.
#[test]
fn close_to_exact_dot() {
    let mut rng = StdRng::seed_from_u64(2024);
    let mut ratio_max = 0f64;
    for ty in TYPES {
        for n in LENGTHS {
            for _ in 0..3 {
                let row = random_row(&mut rng, ty, n);
                let x = random_act(&mut rng, n);
                let act = quantized(&x);
                let mut w = vec![0f32; n];
                kiln_quant::dequantize_row(ty, &row, &mut w).unwrap();
                let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let mag_wx: f64 = w.iter().zip(&x).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                let mut quant_bound = 0f64;
                for (wb, &da) in w.chunks_exact(32).zip(act.d()) {
                    let sw: f64 = wb.iter().map(|&v| f64::from(v).abs()).sum();
                    quant_bound += 0.5 * f64::from(da) * (1.0 + 1e-4) * sw;
                }
                let (_, mag) = vec_dot_q8_unopt_with_magnitude(ty, &row, &act);
                let slack = acc_tol(n / 32, mag) + 4.0 * f64::from(f32::EPSILON) * mag_wx;
                for isa in available_isas() {
                    let got = f64::from(vec_dot_q8_isa(isa, ty, &row, &act));
                    let err = (got - exact).abs();
                    assert!(
                        err <= quant_bound + slack,
                        "{ty:?} n={n} {isa:?}: {got} vs exact {exact} (err {err}, bound {quant_bound})"
                    );
                    ratio_max = ratio_max.max(err / (quant_bound + slack));
                }
            }
        }
    }
    eprintln!("largest error / bound: {ratio_max:.3}");
}

#[test]
fn act_simd_matches_scalar() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut a = ActQ8::new();
    let mut b = ActQ8::new();
    for n in LENGTHS {
        for scale in [1e-20f32, 1e-3, 1.0, 1e4, 1e30] {
            let mut x: Vec<f32> = random_act(&mut rng, n).iter().map(|v| v * scale).collect();
            // exact ties after scaling: amax 127 makes the multiplier 1
            x[0] = 127.0 * scale;
            x[1] = 0.5 * scale;
            if n > 32 {
                x[32..64].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 - 15.5);
            }
            a.quantize(&x);
            b.quantize_scalar(&x);
            assert_eq!(a, b, "n={n} scale={scale}");
            assert_eq!(a.len(), n);
            for (b, (s, &d)) in a.sums().iter().zip(a.d()).enumerate() {
                let q = a.block_quants(b);
                assert_eq!(*s, q.iter().map(|&v| i32::from(v)).sum::<i32>());
                assert!(q.iter().all(|&v| v != -128));
                assert!(d >= 0.0);
            }
        }
    }
}

#[test]
#[should_panic(expected = "blocks vs")]
fn length_mismatch_panics() {
    let row = vec![0u8; 18 * 3];
    let act = quantized(&[1.0; 64]);
    vec_dot_q8(GgmlType::Q4_0, &row, &act);
}

#[test]
#[should_panic(expected = "not supported")]
fn unsupported_type_panics() {
    let row = vec![0u8; 144];
    let act = quantized(&[1.0; 256]);
    vec_dot_q8(GgmlType::Q4_K, &row, &act);
}

/// `KILN_ISA` forces a lower level: re-runs this test binary with the variable set.
#[test]
fn kiln_isa_forces_level() {
    if let Ok(expect) = std::env::var("KILN_ISA_EXPECT") {
        assert_eq!(active_isa(), expect);
        let x: Vec<f32> = (0..96).map(|i| i as f32 - 40.0).collect();
        let mut a = ActQ8::new();
        a.quantize(&x);
        let mut b = ActQ8::new();
        b.quantize_scalar(&x);
        assert_eq!(a, b);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let best = available_isas().into_iter().max().unwrap().name();
    for (forced, expect) in [("scalar", "scalar"), ("avx512", best), ("bogus", best)] {
        let st = std::process::Command::new(&exe)
            .args(["--exact", "kiln_isa_forces_level", "--test-threads", "1"])
            .env("KILN_ISA", forced)
            .env("KILN_ISA_EXPECT", expect)
            .output()
            .unwrap();
        assert!(st.status.success(), "KILN_ISA={forced}: {}", String::from_utf8_lossy(&st.stdout));
    }
}

/// Timing harness (not run by default): 4096 x 4096 matrix-vector products on one thread, per
/// format and level, in GB/s of weight bytes. Run with
/// `cargo test -p kiln-quant --release --test dot_legacy -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_matvec() {
    use std::hint::black_box;
    use std::time::Instant;
    let rows: usize = std::env::var("BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let cols = 4096;
    let mut rng = StdRng::seed_from_u64(1);
    let x = random_act(&mut rng, cols);
    let acts: Vec<ActQ8> = (0..4).map(|_| quantized(&random_act(&mut rng, cols))).collect();
    let act = &acts[0];
    {
        let mut a = ActQ8::new();
        let reps = 20000;
        let t = Instant::now();
        for _ in 0..reps {
            a.quantize(black_box(&x));
        }
        let simd = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            a.quantize_scalar(black_box(&x));
        }
        let sc = t.elapsed().as_secs_f64() / reps as f64;
        eprintln!("ActQ8::quantize 4096: simd {:.2} us, scalar {:.2} us", simd * 1e6, sc * 1e6);
    }
    {
        // baseline: plain read bandwidth over a Q4_0-sized buffer
        let buf = random_row(&mut rng, GgmlType::Q4_0, rows * cols);
        let words: Vec<u64> = buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let mut best = f64::INFINITY;
        for _ in 0..10 * 4096 / rows {
            let t = Instant::now();
            let s = words.iter().fold(0u64, |a, &v| a.wrapping_add(v));
            black_box(s);
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("read bandwidth ({} MB): {:.2} GB/s", buf.len() >> 20, buf.len() as f64 / best / 1e9);
    }
    for ty in TYPES {
        let w = random_row(&mut rng, ty, rows * cols);
        let rb = cols / 32 * ty.type_size();
        let mut out = vec![0f32; rows * 4];
        for isa in available_isas() {
            let mut best = f64::INFINITY;
            let reps = if isa == Isa::Scalar { 2 } else { 10 * 4096 / rows };
            for _ in 0..reps {
                let t = Instant::now();
                for (r, o) in w.chunks_exact(rb).zip(out.iter_mut()) {
                    *o = vec_dot_q8_isa(isa, ty, r, black_box(act));
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            black_box(&out);
            let mut best4 = f64::INFINITY;
            let refs: Vec<&ActQ8> = acts.iter().collect();
            for _ in 0..reps {
                let t = Instant::now();
                for (r, o) in w.chunks_exact(rb).zip(out.chunks_exact_mut(4)) {
                    vec_dot_q8_x4_isa(isa, ty, r, black_box(&refs), o);
                }
                best4 = best4.min(t.elapsed().as_secs_f64());
            }
            black_box(&out);
            eprintln!(
                "{:>7} {:>6}: x1 {:6.2} ms {:6.2} GB/s | x4 {:6.2} ms = {:6.2} GB/s-equivalent",
                format!("{ty:?}"),
                isa.name(),
                best * 1e3,
                w.len() as f64 / best / 1e9,
                best4 * 1e3,
                4.0 * w.len() as f64 / best4 / 1e9
            );
        }
    }
}

/// Matvec over SmolLM2-135M shapes (rows × cols): one `vec_dot_q8_x4` per weight row with k = 1,
/// 2 or 4 one-plane vectors (the two-plane kernels have their own bench in `dot_legacy_planes`). Reports ns per row
/// and GB/s of weight bytes. Run with
/// `cargo test -p kiln-quant --release --test dot_legacy -- --ignored --nocapture bench_short`.
#[test]
#[ignore]
fn bench_short_rows() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(7);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
        for (rows, cols) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
            let w = random_row(&mut rng, ty, rows * cols);
            let rb = cols / 32 * ty.type_size();
            let acts: Vec<ActQ8> = (0..4).map(|_| quantized(&random_act(&mut rng, cols))).collect();
            let refs: Vec<&ActQ8> = acts.iter().collect();
            let mut line = format!("{:>6} {rows:>5}x{cols:<5}", format!("{ty:?}"));
            for k in [1usize, 2, 4] {
                let mut out = vec![0f32; rows * 4];
                let reps = 400;
                let mut best = f64::INFINITY;
                for _ in 0..reps {
                    let t = Instant::now();
                    for (r, o) in w.chunks_exact(rb).zip(out.chunks_exact_mut(4)) {
                        vec_dot_q8_x4(ty, r, black_box(&refs[..k]), &mut o[..k]);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                black_box(&out);
                line += &format!(
                    " | k={k}: {:6.1} ns/row {:5.2} GB/s",
                    best * 1e9 / rows as f64,
                    w.len() as f64 / best / 1e9
                );
            }
            eprintln!("{line}");
        }
    }
}
