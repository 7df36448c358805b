//! Two-plane legacy dot kernels (`vec_dot_q8_planes`): activations as a quantized plane plus the
//! plane of its rounding error at a fixed scale `d / 256` ([`ActQ8::quantize_residual`]).
//!
//! - kernel vs oracle: the integer block sums `Σ w (256 a + a′)` are identical (exact i32) and
//!   converted the same way, so only the f32 accumulation order differs; the bound is the one of
//!   the one-plane tests (`2 · (2 nb + 8) · ε · M`).
//! - against the exact dot: the kernel computes `Σ w x̂` for the activations `x̂ = d′ (256 a + a′)`
//!   the planes stand for, so `|dot - Σ w x| <= Σ |w| |x - x̂|` plus the accumulation slack; and
//!   every `|x - x̂|` is at most `d / 512` (plus the f32 rounding of `x - d a`, a few `ε |x|`), or
//!   `1.5 d / 256` where the second plane was clamped.

use kiln_gguf::GgmlType;
use kiln_quant::act_q8::ActQ8;
use kiln_quant::dot_legacy::{
    available_isas, vec_dot_q8_planes, vec_dot_q8_planes_isa, vec_dot_q8_planes_unopt,
    vec_dot_q8_planes_unopt_with_magnitude, vec_dot_q8_rows_planes, vec_dot_q8_rows_planes_isa, vec_dot_q8_x4, Isa,
};
mod common;

use common::{legacy_row as random_row, legacy_x};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TYPES: [GgmlType; 6] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::IQ4_NL];

// 12 and 23 blocks: eight-block steps, then a lone group of four, then a partial group
const LENGTHS: [usize; 7] = [32, 96, 128, 32 * 12, 32 * 17, 32 * 23, 4096 + 32];

/// Mostly uniform, some outliers, sometimes an all-zero block or a block of exact halves (ties).
fn random_act(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x = legacy_x(rng, n);
    if n >= 128 && rng.gen::<bool>() {
        // amax 127 gives d = 1: x = k + 0.5 rounds to a tie, its error d / 2 sits on the clamp.
        for (i, v) in x[96..128].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 };
        }
    }
    x
}

fn planes(x: &[f32]) -> (ActQ8, ActQ8) {
    let mut a = ActQ8::new();
    a.quantize(x);
    let mut r = ActQ8::new();
    r.quantize_residual(&a, x);
    (a, r)
}

/// The activations the two planes stand for: `d′ (256 a + a′)` per element.
fn represented(a: &ActQ8, r: &ActQ8) -> Vec<f64> {
    (0..a.n_blocks())
        .flat_map(|b| {
            let (qa, qr, d2) = (a.block_quants(b), r.block_quants(b), r.d()[b]);
            (0..32).map(move |i| f64::from(d2) * (256.0 * f64::from(qa[i]) + f64::from(qr[i])))
        })
        .collect()
}

fn acc_tol(nb: usize, mag: f64) -> f64 {
    2.0 * (2 * nb + 8) as f64 * f64::from(f32::EPSILON) * mag + 1e-30
}

#[test]
fn residual_plane_is_within_its_bound() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut clamped = 0;
    for n in LENGTHS {
        for _ in 0..8 {
            let x = random_act(&mut rng, n);
            let (a, r) = planes(&x);
            for (&d1, &d2) in a.d().iter().zip(r.d()) {
                assert_eq!(d2, d1 / 256.0);
            }
            let xh = represented(&a, &r);
            for (b, (xb, hb)) in x.chunks_exact(32).zip(xh.chunks_exact(32)).enumerate() {
                let d = f64::from(a.d()[b]);
                let qr = r.block_quants(b);
                for i in 0..32 {
                    let err = (f64::from(xb[i]) - hb[i]).abs();
                    let bound = if qr[i].unsigned_abs() == 127 {
                        clamped += 1;
                        1.5 * d / 256.0
                    } else {
                        d / 512.0
                    } * (1.0 + 1e-3)
                        // the residual x - d q is formed in f32
                        + 4.0 * f64::from(f32::EPSILON) * f64::from(xb[i].abs());
                    assert!(err <= bound + 1e-30, "n={n} block {b} elem {i}: err {err} > {bound}");
                }
            }
        }
    }
    assert!(clamped > 0, "the tie blocks exercise the clamp");
}

#[test]
fn two_plane_kernels_match_oracle() {
    let mut rng = StdRng::seed_from_u64(0x2b1a5e);
    let mut worst = 0f64;
    for ty in TYPES {
        for n in LENGTHS {
            for _ in 0..3 {
                let row = random_row(&mut rng, ty, n);
                let p: Vec<(ActQ8, ActQ8)> = (0..4).map(|_| planes(&random_act(&mut rng, n))).collect();
                let refs: Vec<&ActQ8> = p.iter().flat_map(|(a, r)| [a, r]).collect();
                let oracle: Vec<(f32, f64)> =
                    p.iter().map(|(a, r)| vec_dot_q8_planes_unopt_with_magnitude(ty, &row, a, r)).collect();
                for (o, (a, r)) in oracle.iter().zip(&p) {
                    assert_eq!(o.0.to_bits(), vec_dot_q8_planes_unopt(ty, &row, a, r).to_bits());
                }
                // The SIMD levels (AVX2, AVX-512 VNNI) form the same integers in the same lanes.
                let simd: Vec<[u32; 4]> = available_isas()
                    .into_iter()
                    .filter(|&isa| isa >= Isa::Avx2)
                    .map(|isa| {
                        let mut out = [0f32; 4];
                        vec_dot_q8_planes_isa(isa, ty, &row, &refs, &mut out);
                        out.map(f32::to_bits)
                    })
                    .collect();
                assert!(simd.windows(2).all(|w| w[0] == w[1]), "{ty:?} n={n}: SIMD levels differ: {simd:?}");
                for isa in available_isas() {
                    for k in 1..=4 {
                        let mut out = [0f32; 4];
                        vec_dot_q8_planes_isa(isa, ty, &row, &refs[..2 * k], &mut out[..k]);
                        for (i, &(want, mag)) in oracle.iter().enumerate().take(k) {
                            let err = f64::from((out[i] - want).abs());
                            let tol = acc_tol(n / 32, mag);
                            assert!(
                                err <= tol && err <= 1e-5 * mag + 1e-30,
                                "{ty:?} n={n} {isa:?} k={k} #{i}: {} vs oracle {want} (err {err}, mag {mag})",
                                out[i]
                            );
                            worst = worst.max(err / mag.max(1e-30));
                        }
                    }
                }
            }
        }
    }
    eprintln!("worst |kernel - oracle| / magnitude: {worst:e}");
}

/// Each of 1 to 4 two-plane activations in one call gets the bits it gets alone, at every level
/// (the kernels of three and four activations are the ones matrix products use with AVX-512).
#[test]
fn two_plane_activations_together_match_each_alone_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(0x4ac75);
    for ty in TYPES {
        for n in LENGTHS {
            let row = random_row(&mut rng, ty, n);
            let p: Vec<(ActQ8, ActQ8)> = (0..4).map(|_| planes(&random_act(&mut rng, n))).collect();
            let refs: Vec<&ActQ8> = p.iter().flat_map(|(a, r)| [a, r]).collect();
            for isa in available_isas() {
                let alone: Vec<u32> = p
                    .iter()
                    .map(|(a, r)| {
                        let mut out = [0f32];
                        vec_dot_q8_planes_isa(isa, ty, &row, &[a, r], &mut out);
                        out[0].to_bits()
                    })
                    .collect();
                for k in 1..=4 {
                    let mut out = vec![f32::NAN; k];
                    vec_dot_q8_planes_isa(isa, ty, &row, &refs[..2 * k], &mut out);
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, alone[..k], "{ty:?} n={n} {isa:?} k={k}");
                }
            }
        }
    }
}

#[test]
fn two_planes_close_to_exact_dot() {
    let mut rng = StdRng::seed_from_u64(77);
    let mut gain_min = f64::INFINITY;
    for ty in TYPES {
        for n in LENGTHS {
            for _ in 0..3 {
                let row = random_row(&mut rng, ty, n);
                let x = random_act(&mut rng, n);
                let (a, r) = planes(&x);
                let xh = represented(&a, &r);
                let mut w = vec![0f32; n];
                kiln_quant::dequantize_row(ty, &row, &mut w).unwrap();
                let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let bound: f64 = w
                    .iter()
                    .zip(x.iter().zip(&xh))
                    .map(|(&wi, (&xi, &hi))| f64::from(wi).abs() * (f64::from(xi) - hi).abs())
                    .sum();
                let mag_wx: f64 = w.iter().zip(&x).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                let (_, mag) = vec_dot_q8_planes_unopt_with_magnitude(ty, &row, &a, &r);
                let slack = acc_tol(n / 32, mag) + 4.0 * f64::from(f32::EPSILON) * mag_wx;
                let one_plane = f64::from(kiln_quant::dot_legacy::vec_dot_q8(ty, &row, &a));
                for isa in available_isas() {
                    let mut out = [0f32];
                    vec_dot_q8_planes_isa(isa, ty, &row, &[&a, &r], &mut out);
                    let err = (f64::from(out[0]) - exact).abs();
                    assert!(
                        err <= bound + slack,
                        "{ty:?} n={n} {isa:?}: {} vs exact {exact} (err {err}, bound {bound})",
                        out[0]
                    );
                }
                let err1 = (one_plane - exact).abs();
                if err1 > 1e3 * slack {
                    let mut out = [0f32];
                    vec_dot_q8_planes(ty, &row, &[&a, &r], &mut out);
                    gain_min = gain_min.min(err1 / (f64::from(out[0]) - exact).abs().max(1e-300));
                }
            }
        }
    }
    eprintln!("smallest error reduction over one plane: {gain_min:.1}x");
    assert!(gain_min > 8.0, "the second plane reduces the error: {gain_min}");
}

#[test]
fn rows_match_single_calls_and_reject_foreign_planes() {
    let mut rng = StdRng::seed_from_u64(5);
    for ty in TYPES {
        let n = 32 * 9;
        let rows = 5;
        let data: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, ty, n)).collect();
        let rb = data.len() / rows;
        let p: Vec<(ActQ8, ActQ8)> = (0..4).map(|_| planes(&random_act(&mut rng, n))).collect();
        let refs: Vec<&ActQ8> = p.iter().flat_map(|(a, r)| [a, r]).collect();
        for k in 1..=4 {
            let refs = &refs[..2 * k];
            let mut got = vec![0f32; rows * k];
            vec_dot_q8_rows_planes(ty, &data, rb, refs, 2, &mut got);
            for r in 0..rows {
                let mut want = vec![0f32; k];
                vec_dot_q8_planes(ty, &data[r * rb..(r + 1) * rb], refs, &mut want);
                assert_eq!(
                    got[k * r..k * (r + 1)].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty:?} k={k} row {r}"
                );
            }
            for isa in available_isas() {
                let mut at = vec![0f32; rows * k];
                vec_dot_q8_rows_planes_isa(isa, ty, &data, rb, refs, 2, &mut at);
                for r in 0..rows {
                    let mut want = vec![0f32; k];
                    vec_dot_q8_planes_isa(isa, ty, &data[r * rb..(r + 1) * rb], refs, &mut want);
                    assert_eq!(
                        at[k * r..k * (r + 1)].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{ty:?} {isa:?} k={k} row {r}"
                    );
                }
            }
        }
        // A plane quantized on its own (scale amax/127) is not a residual plane.
        let mut own = ActQ8::new();
        own.quantize(&random_act(&mut rng, n));
        let bad = std::panic::catch_unwind(|| {
            let mut out = [0f32];
            vec_dot_q8_planes(ty, &data[..rb], &[&p[0].0, &own], &mut out);
        });
        assert!(bad.is_err(), "{ty:?}: foreign second plane accepted");
    }
}

/// Generation-shaped matvec, in cache: one plane, two planes as two vectors (summed afterwards)
/// and two fused planes. Run with
/// `cargo test -p kiln-quant --release --test dot_legacy_planes -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_planes() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(3);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (rows, cols) in [(256usize, 2048usize), (576, 576)] {
            let data = random_row(&mut rng, ty, rows * cols);
            let rb = data.len() / rows;
            let (a, r) = planes(&random_act(&mut rng, cols));
            let mut line = format!("{:>6} {rows:>5}x{cols:<5}", format!("{ty:?}"));
            let variants: [(&str, usize); 3] = [("1 plane", 1), ("2 vectors", 2), ("2 planes", 3)];
            for (name, v) in variants {
                let mut out = vec![0f32; rows * 2];
                let mut best = f64::INFINITY;
                for _ in 0..300 {
                    let t = Instant::now();
                    match v {
                        1 => vec_dot_q8_rows_planes(ty, &data, rb, black_box(&[&a]), 1, &mut out[..rows]),
                        2 => vec_dot_q8_rows_planes(ty, &data, rb, black_box(&[&a, &r]), 1, &mut out),
                        _ => vec_dot_q8_rows_planes(ty, &data, rb, black_box(&[&a, &r]), 2, &mut out[..rows]),
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                black_box(&out);
                line += &format!(" | {name}: {:6.1} ns/row", best * 1e9 / rows as f64);
            }
            eprintln!("{line}");
        }
    }
    let _ = (Isa::Scalar, vec_dot_q8_x4 as fn(_, _, _, _));
}

/// The interleaved Q4_0 kernels ([`kiln_quant::interleave`]) against the oracle on every row:
/// whole groups and a tail, odd block counts, 1 to 4 tokens, every level — bit for bit.
#[test]
fn interleaved_q4_0_rows_give_the_oracle_bits() {
    use kiln_quant::dot_legacy::vec_dot_q8_rows_planes_interleaved_isa;
    use kiln_quant::interleave;
    let ty = GgmlType::Q4_0;
    let mut rng = StdRng::seed_from_u64(77);
    for (rows, n) in [(16, 32), (32, 96), (13, 64), (37, 32 * 23), (5, 32), (48, 4096 + 32)] {
        let plain: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, ty, n)).collect();
        let rb = plain.len() / rows;
        let mut woven = plain.clone();
        interleave::interleave(ty, &mut woven, rows, rb);
        for tokens in 1..=4 {
            let p: Vec<(ActQ8, ActQ8)> = (0..tokens).map(|_| planes(&random_act(&mut rng, n))).collect();
            let refs: Vec<&ActQ8> = p.iter().flat_map(|(a, r)| [a, r]).collect();
            for isa in available_isas() {
                let mut got = vec![0f32; rows * tokens];
                vec_dot_q8_rows_planes_interleaved_isa(isa, ty, &woven, rb, &refs, &mut got);
                for r in 0..rows {
                    for (t, (a, b)) in p.iter().enumerate() {
                        let want = vec_dot_q8_planes_unopt(ty, &plain[r * rb..(r + 1) * rb], a, b);
                        assert_eq!(
                            got[r * tokens + t].to_bits(),
                            want.to_bits(),
                            "{} rows={rows} n={n} row {r} token {t}: {} vs {want}",
                            isa.name(),
                            got[r * tokens + t]
                        );
                    }
                }
            }
        }
    }
}

/// Two-plane Q4_0 matrix-vector timing, 1 thread, row-at-a-time vs interleaved:
/// `cargo test --release --test dot_legacy_planes -- --ignored --nocapture bench_planes` (`KILN_BENCH_ROWS`,
/// `KILN_BENCH_COLS`: 64 × 4096 stays in L2; 65536 × 2048 streams from memory).
#[test]
#[ignore]
fn bench_planes_interleaved() {
    use kiln_quant::dot_legacy::vec_dot_q8_rows_planes_interleaved_isa;
    use std::time::Instant;
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    let (rows, cols) = (env("KILN_BENCH_ROWS", 4096), env("KILN_BENCH_COLS", 4096));
    let ty = GgmlType::Q4_0;
    let mut rng = StdRng::seed_from_u64(1);
    let (a, r) = planes(&random_act(&mut rng, cols));
    let refs = [&a, &r];
    let plain: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, ty, cols)).collect();
    let rb = plain.len() / rows;
    let mut woven = plain.clone();
    kiln_quant::interleave::interleave(ty, &mut woven, rows, rb);
    let mut y = vec![0f32; rows];
    let reps = (200_000 / rows).clamp(10, 2000);
    for isa in available_isas().into_iter().filter(|&i| i >= Isa::Avx2) {
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                f(&mut y);
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(&y);
            }
            best
        };
        let rowwise = time(&mut |y| vec_dot_q8_rows_planes(ty, &plain, rb, &refs, 2, y));
        let inter = time(&mut |y| vec_dot_q8_rows_planes_interleaved_isa(isa, ty, &woven, rb, &refs, y));
        let blocks = (rows * cols / 32) as f64;
        println!(
            "Q4_0 {:>6} {rows}x{cols}: rows {:6.3} ns/block ({:5.1} GB/s) | interleaved {:6.3} ns ({:5.1} GB/s)",
            isa.name(),
            rowwise / blocks * 1e9,
            plain.len() as f64 / rowwise / 1e9,
            inter / blocks * 1e9,
            plain.len() as f64 / inter / 1e9,
        );
    }
}

/// Two-plane kernels with 1 to 4 activations per call, in cache (SmolLM2-135M shapes), per SIMD
/// level: ns per row and per row-token, row-at-a-time (Q4_0, Q4_1, Q8_0) and interleaved (Q4_0).
/// Run with `cargo test -p kiln-quant --release --test dot_legacy_planes -- --ignored --nocapture
/// bench_tokens_per_call`. (A kernel that spills a loop-carried accumulator, as the AVX2 set's
/// two-plane Q4_1 kernel of one token does, ran 2.2x slower at one of four 16-byte stack offsets
/// of its caller: a line of this table can move between builds whose callers' frames changed.)
#[test]
#[ignore]
fn bench_tokens_per_call() {
    use kiln_quant::dot_legacy::vec_dot_q8_rows_planes_interleaved_isa;
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(9);
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::INFINITY;
        for _ in 0..300 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    for (rows, cols) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
        let p: Vec<(ActQ8, ActQ8)> = (0..4).map(|_| planes(&random_act(&mut rng, cols))).collect();
        let refs: Vec<&ActQ8> = p.iter().flat_map(|(a, r)| [a, r]).collect();
        for isa in available_isas().into_iter().filter(|&i| i >= Isa::Avx2) {
            for (ty, woven) in
                [(GgmlType::Q4_0, false), (GgmlType::Q4_0, true), (GgmlType::Q4_1, false), (GgmlType::Q8_0, false)]
            {
                let data = random_row(&mut rng, ty, rows * cols);
                let rb = data.len() / rows;
                let mut w = data.clone();
                if woven {
                    kiln_quant::interleave::interleave(ty, &mut w, rows, rb);
                }
                let name = format!("{ty:?}{}", if woven { " woven" } else { "" });
                let mut line = format!("{:>6} {name:>10} {rows:>5}x{cols:<5}", isa.name());
                // `KILN_BENCH_ONLY=avx512` (or a format, a shape) runs the lines that contain it
                if std::env::var("KILN_BENCH_ONLY").is_ok_and(|f| !line.contains(&f)) {
                    continue;
                }
                for k in 1..=4 {
                    let mut out = vec![0f32; rows * k];
                    let t = time(&mut || {
                        if woven {
                            vec_dot_q8_rows_planes_interleaved_isa(isa, ty, &w, rb, black_box(&refs[..2 * k]), &mut out)
                        } else {
                            vec_dot_q8_rows_planes_isa(isa, ty, &w, rb, black_box(&refs[..2 * k]), 2, &mut out)
                        }
                    });
                    black_box(&out);
                    line += &format!(
                        " | k={k}: {:5.1} ns/row {:5.1} /token",
                        t * 1e9 / rows as f64,
                        t * 1e9 / (rows * k) as f64
                    );
                }
                eprintln!("{line}");
            }
        }
    }
}
