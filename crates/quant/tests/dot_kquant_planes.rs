//! Two-plane k-quant dot products (`vec_dot_q8k_planes`): activations as a quantized plane plus
//! the plane of its rounding error at the fixed scale `d / 256` ([`ActQ8K::quantize_residual`]).
//!
//! - kernel vs oracle: the oracle forms the exact integer sums over `256 a + a′` per super-block;
//!   the kernels form the same integers lane by lane (fused Q4_K/Q5_K) or per plane, so only f32
//!   rounding of partial sums differs: `|kernel - oracle| <= 1e-5 · M` as in the one-plane tests.
//! - against the exact dot: the planes stand for `x̂ = d′ (256 a + a′)`, so
//!   `|oracle - Σ w x| <= Σ |w| |x - x̂|` plus the f32 slack of the oracle and the dequantized
//!   weights; and every `|x - x̂|` is at most `d / 512` (plus the f32 rounding of `x - d a`), or
//!   `1.5 d / 256` where the second plane was clamped.

use kiln_gguf::GgmlType;
use kiln_quant::act_q8k::ActQ8K;
use kiln_quant::dequantize_row;
use kiln_quant::dot_kquant::{
    available_isas, vec_dot_q8k, vec_dot_q8k_planes, vec_dot_q8k_planes_isa, vec_dot_q8k_planes_unopt,
    vec_dot_q8k_planes_unopt_with_magnitude, vec_dot_q8k_rows_planes, Isa,
};
mod common;

use common::{kquant_row, kquant_x as random_x, put_kquant_scales};
use rand::{rngs::StdRng, SeedableRng};

const TYPES: [GgmlType; 6] =
    [GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_XS];

const LENGTHS: [usize; 4] = [256, 768, 256 * 11, 4096 + 256];

/// Random valid blocks; with `fill`, every byte but the f16 scales is `fill` (extreme quants,
/// scales and mins, for the i32 headroom of the fused kernels).
fn row(rng: &mut StdRng, ty: GgmlType, n: usize, fill: Option<u8>) -> Vec<u8> {
    let Some(f) = fill else { return kquant_row(rng, ty, n) };
    let ts = ty.type_size();
    let mut row = vec![f; n / 256 * ts];
    for b in row.chunks_exact_mut(ts) {
        let (d, dmin) = (0.01, 0.01);
        put_kquant_scales(b, ty, d, dmin);
    }
    row
}

fn planes(x: &[f32]) -> (ActQ8K, ActQ8K) {
    let mut a = ActQ8K::new();
    a.quantize(x);
    let mut r = ActQ8K::new();
    r.quantize_residual(&a, x);
    (a, r)
}

fn represented(a: &ActQ8K, r: &ActQ8K) -> Vec<f64> {
    a.qs.iter()
        .zip(&r.qs)
        .enumerate()
        .map(|(i, (&q, &q2))| f64::from(r.d[i / 256]) * (256.0 * f64::from(q) + f64::from(q2)))
        .collect()
}

fn check(ty: GgmlType, w_row: &[u8], x: &[f32], what: &str) {
    let (a, r) = planes(x);
    let (oracle, mag) = vec_dot_q8k_planes_unopt_with_magnitude(ty, w_row, &a, &r);
    assert_eq!(oracle.to_bits(), vec_dot_q8k_planes_unopt(ty, w_row, &a, &r).to_bits());
    let tol = 1e-5 * mag + 1e-30;
    // The SIMD levels (AVX2, AVX-512 VNNI) form the same integers in the same lanes.
    let simd: Vec<u32> = available_isas()
        .into_iter()
        .filter(|&isa| isa >= Isa::Avx2)
        .map(|isa| {
            let mut out = [0f32];
            vec_dot_q8k_planes_isa(isa, ty, w_row, &[&a, &r], &mut out);
            out[0].to_bits()
        })
        .collect();
    assert!(simd.windows(2).all(|w| w[0] == w[1]), "{ty:?} {what}: SIMD levels differ: {simd:?}");
    for isa in available_isas() {
        let mut out = [0f32];
        vec_dot_q8k_planes_isa(isa, ty, w_row, &[&a, &r], &mut out);
        assert!(
            f64::from((out[0] - oracle).abs()) <= tol,
            "{ty:?} {what} n={} {}: {} vs oracle {oracle} (tol {tol})",
            x.len(),
            isa.name(),
            out[0]
        );
    }
    let mut w = vec![0f32; x.len()];
    dequantize_row(ty, w_row, &mut w).unwrap();
    let exact: f64 = w.iter().zip(x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
    let abs_wx: f64 = w.iter().zip(x).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
    let xh = represented(&a, &r);
    let act_err: f64 =
        w.iter().zip(x.iter().zip(&xh)).map(|(&wi, (&xi, &hi))| f64::from(wi).abs() * (f64::from(xi) - hi).abs()).sum();
    let bound = act_err + tol + 1e-6 * abs_wx + 1e-30;
    assert!(
        (f64::from(oracle) - exact).abs() <= bound,
        "{ty:?} {what} n={}: oracle {oracle} vs exact {exact} (bound {bound})",
        x.len()
    );
}

#[test]
fn residual_plane_is_within_its_bound() {
    let mut rng = StdRng::seed_from_u64(21);
    for n in LENGTHS {
        let x = random_x(&mut rng, n);
        let (a, r) = planes(&x);
        let xh = represented(&a, &r);
        for (i, (&xi, &hi)) in x.iter().zip(&xh).enumerate() {
            let d = f64::from(a.d[i / 256]);
            let lim = if r.qs[i].unsigned_abs() == 127 { 1.5 * d / 256.0 } else { d / 512.0 };
            let bound = lim * (1.0 + 1e-3) + 4.0 * f64::from(f32::EPSILON) * f64::from(xi.abs());
            assert!((f64::from(xi) - hi).abs() <= bound, "n={n} elem {i}");
        }
        for (g, s) in r.bsums.iter().enumerate() {
            assert_eq!(i32::from(*s), r.qs[16 * g..16 * g + 16].iter().map(|&q| i32::from(q)).sum::<i32>());
        }
    }
}

#[test]
fn two_planes_random_rows_all_levels() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for ty in TYPES {
        for n in LENGTHS {
            for _ in 0..2 {
                let w = row(&mut rng, ty, n, None);
                let x = random_x(&mut rng, n);
                check(ty, &w, &x, "random");
            }
        }
    }
}

#[test]
fn two_planes_extreme_rows_all_levels() {
    let mut rng = StdRng::seed_from_u64(9);
    for ty in TYPES {
        for fill in [0x00u8, 0xFF, 0x55, 0xAA] {
            let w = row(&mut rng, ty, 512, Some(fill));
            // All activations at the largest magnitude, one sign: every lane sum at its bound.
            check(ty, &w, &vec![1.0f32; 512], "extreme+");
            check(ty, &w, &vec![-1.0f32; 512], "extreme-");
            check(ty, &w, &random_x(&mut rng, 512), "extreme");
        }
    }
}

#[test]
fn two_planes_beat_one_plane() {
    let mut rng = StdRng::seed_from_u64(4);
    let (mut e1, mut e2) = (0f64, 0f64);
    for ty in TYPES {
        for _ in 0..8 {
            let n = 2048;
            let w_row = row(&mut rng, ty, n, None);
            let x = random_x(&mut rng, n);
            let (a, r) = planes(&x);
            let mut w = vec![0f32; n];
            dequantize_row(ty, &w_row, &mut w).unwrap();
            let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let mut out = [0f32];
            vec_dot_q8k_planes(ty, &w_row, &[&a, &r], &mut out);
            e1 += (f64::from(vec_dot_q8k(ty, &w_row, &a)) - exact).powi(2);
            e2 += (f64::from(out[0]) - exact).powi(2);
        }
    }
    eprintln!("rms error, one plane / two planes: {:.1}", (e1 / e2).sqrt());
    assert!(e2 * 64.0 < e1, "two planes: {e2} vs one plane {e1}");
}

#[test]
fn rows_match_single_calls_and_reject_foreign_planes() {
    let mut rng = StdRng::seed_from_u64(6);
    for ty in TYPES {
        let n = 768;
        let rows = 5;
        let data: Vec<u8> = (0..rows).flat_map(|_| row(&mut rng, ty, n, None)).collect();
        let rb = data.len() / rows;
        let p: Vec<(ActQ8K, ActQ8K)> = (0..2).map(|_| planes(&random_x(&mut rng, n))).collect();
        let refs: Vec<&ActQ8K> = p.iter().flat_map(|(a, r)| [a, r]).collect();
        let mut got = vec![0f32; rows * 2];
        vec_dot_q8k_rows_planes(ty, &data, rb, &refs, &mut got);
        for r in 0..rows {
            let mut want = [0f32; 2];
            vec_dot_q8k_planes(ty, &data[r * rb..(r + 1) * rb], &refs, &mut want);
            assert_eq!(got[2 * r].to_bits(), want[0].to_bits(), "{ty:?} row {r}");
            assert_eq!(got[2 * r + 1].to_bits(), want[1].to_bits(), "{ty:?} row {r}");
        }
        let mut own = ActQ8K::new();
        own.quantize(&random_x(&mut rng, n));
        let bad = std::panic::catch_unwind(|| {
            let mut out = [0f32];
            vec_dot_q8k_planes(ty, &data[..rb], &[&p[0].0, &own], &mut out);
        });
        assert!(bad.is_err(), "{ty:?}: foreign second plane accepted");
    }
}

/// The interleaved kernels ([`kiln_quant::interleave`]) against the oracle on every row: random
/// and extreme blocks, whole groups and a tail, one group and pairs of groups, 1 and 2 tokens, every
/// level — bit for bit.
#[test]
fn interleaved_rows_give_the_oracle_bits() {
    use kiln_quant::dot_kquant::vec_dot_q8k_rows_planes_interleaved_isa;
    use kiln_quant::interleave;
    let mut rng = StdRng::seed_from_u64(88);
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
        for (rows, n, fill) in
            [(8, 256, None), (16, 768, None), (24, 512, None), (13, 256, None), (37, 1024, None), (5, 256, None)]
                .into_iter()
                .chain([0x00u8, 0xFF, 0x55, 0xAA].map(|f| (17, 512, Some(f))))
        {
            let plain: Vec<u8> = (0..rows).flat_map(|_| row(&mut rng, ty, n, fill)).collect();
            let rb = plain.len() / rows;
            let mut woven = plain.clone();
            interleave::interleave(ty, &mut woven, rows, rb);
            for tokens in 1..=2 {
                let xs: Vec<Vec<f32>> = (0..tokens)
                    .map(|t| if fill.is_some() && t == 0 { vec![1.0f32; n] } else { random_x(&mut rng, n) })
                    .collect();
                let p: Vec<(ActQ8K, ActQ8K)> = xs.iter().map(|x| planes(x)).collect();
                let refs: Vec<&ActQ8K> = p.iter().flat_map(|(a, r)| [a, r]).collect();
                for isa in available_isas() {
                    let mut got = vec![0f32; rows * tokens];
                    vec_dot_q8k_rows_planes_interleaved_isa(isa, ty, &woven, rb, &refs, &mut got);
                    for r in 0..rows {
                        for (t, (a, b)) in p.iter().enumerate() {
                            let want = vec_dot_q8k_planes_unopt(ty, &plain[r * rb..(r + 1) * rb], a, b);
                            assert_eq!(
                                got[r * tokens + t].to_bits(),
                                want.to_bits(),
                                "{ty:?} {} rows={rows} n={n} fill={fill:?} row {r} token {t}: {} vs {want}",
                                isa.name(),
                                got[r * tokens + t]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Two-plane matrix-vector timing, 1 thread, row-at-a-time vs interleaved:
/// `cargo test --release --test dot_kquant_planes -- --ignored --nocapture` (`KILN_BENCH_ROWS`:
/// 64 keeps a Q4_K matrix in L2; the default 4096 streams it from memory).
#[test]
#[ignore]
fn bench_planes_matvec() {
    use kiln_quant::dot_kquant::{vec_dot_q8k_rows_planes_interleaved_isa, Isa};
    use std::time::Instant;
    let rows: usize = std::env::var("KILN_BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let cols: usize = std::env::var("KILN_BENCH_COLS").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let mut rng = StdRng::seed_from_u64(1);
    let (a, r) = planes(&random_x(&mut rng, cols));
    let refs = [&a, &r];
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
        let plain: Vec<u8> = (0..rows).flat_map(|_| row(&mut rng, ty, cols, None)).collect();
        let rb = plain.len() / rows;
        let mut woven = plain.clone();
        kiln_quant::interleave::interleave(ty, &mut woven, rows, rb);
        let mut y = vec![0f32; rows];
        let reps = (200_000 / rows).clamp(20, 2000);
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
            let rowwise = time(&mut |y| {
                for (i, yr) in y.iter_mut().enumerate() {
                    let mut o = [0f32];
                    vec_dot_q8k_planes_isa(isa, ty, &plain[i * rb..(i + 1) * rb], &refs, &mut o);
                    *yr = o[0];
                }
            });
            let inter = time(&mut |y| vec_dot_q8k_rows_planes_interleaved_isa(isa, ty, &woven, rb, &refs, y));
            let two = (0..reps)
                .map(|_| interleaved_on_two_threads(isa, ty, &woven, rb, &refs, &mut y))
                .fold(f64::INFINITY, f64::min);
            println!("    two threads: interleaved {:5.1} GB/s", plain.len() as f64 / two / 1e9);
            let blocks = (rows * cols / 256) as f64;
            println!(
                "{:>5} {:>6} {rows}x{cols}: rows {:6.2} ns/super-block ({:5.1} GB/s) | interleaved {:6.2} ns ({:5.1} GB/s)",
                ty.name(),
                isa.name(),
                rowwise / blocks * 1e9,
                plain.len() as f64 / rowwise / 1e9,
                inter / blocks * 1e9,
                plain.len() as f64 / inter / 1e9,
            );
        }
    }
}

/// Two-plane Q4_K generation kernel from memory at two row widths of about the same bytes (2048
/// columns like TinyLlama's q/k/v/o/gate/up, 5632 like its down projection), one thread and two,
/// as the mean over 10 alternating calls: where a 16-row group's weights outgrow L1, the next
/// super-block's activations must be prefetched (see `dot_kquant/rows8.rs`).
/// `cargo test --release -p kiln-quant --test dot_kquant_planes bench_interleaved_widths -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_interleaved_widths() {
    use kiln_quant::dot_kquant::vec_dot_q8k_rows_planes_interleaved_isa;
    use std::time::Instant;
    let mut rng = StdRng::seed_from_u64(1);
    let ty = GgmlType::Q4_K;
    let Some(&isa) = available_isas().iter().rfind(|&&i| i >= Isa::Avx2) else { return };
    let mut cases = Vec::new();
    for (rows, cols) in [(65536usize, 2048usize), (23824, 5632)] {
        let (a, r) = planes(&random_x(&mut rng, cols));
        let plain: Vec<u8> = (0..rows).flat_map(|_| row(&mut rng, ty, cols, None)).collect();
        let rb = plain.len() / rows;
        let mut woven = plain;
        kiln_quant::interleave::interleave(ty, &mut woven, rows, rb);
        cases.push((rows, cols, a, r, woven, rb));
    }
    let mut gbs = [[0f64; 2]; 2];
    const ROUNDS: usize = 10;
    for _ in 0..ROUNDS {
        for (c, (rows, _, a, r, woven, rb)) in cases.iter().enumerate() {
            let refs = [a, r];
            let mut y = vec![0f32; *rows];
            let t = Instant::now();
            vec_dot_q8k_rows_planes_interleaved_isa(isa, ty, woven, *rb, &refs, &mut y);
            gbs[c][0] += woven.len() as f64 / t.elapsed().as_secs_f64() / 1e9 / ROUNDS as f64;
            let two = interleaved_on_two_threads(isa, ty, woven, *rb, &refs, &mut y);
            gbs[c][1] += woven.len() as f64 / two / 1e9 / ROUNDS as f64;
        }
    }
    for (c, case) in cases.iter().enumerate() {
        println!(
            "Q4_K {} {}x{}: one thread {:.1} GB/s, two {:.1} GB/s",
            isa.name(),
            case.0,
            case.1,
            gbs[c][0],
            gbs[c][1]
        );
    }
}

/// Seconds for one product of the woven matrix on two threads, each over its own half of the
/// whole groups (as generation splits them).
fn interleaved_on_two_threads(
    isa: kiln_quant::dot_kquant::Isa,
    ty: GgmlType,
    woven: &[u8],
    rb: usize,
    refs: &[&ActQ8K],
    y: &mut [f32],
) -> f64 {
    use kiln_quant::dot_kquant::vec_dot_q8k_rows_planes_interleaved_isa;
    let half = y.len() / 32 * 16;
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        let (y0, y1) = y.split_at_mut(half);
        let (w0, w1) = woven.split_at(half * rb);
        s.spawn(|| vec_dot_q8k_rows_planes_interleaved_isa(isa, ty, w0, rb, refs, y0));
        vec_dot_q8k_rows_planes_interleaved_isa(isa, ty, w1, rb, refs, y1);
    });
    t.elapsed().as_secs_f64()
}
