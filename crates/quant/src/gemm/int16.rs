//! Prompt processing with 16-bit integer products: the weights in their exact integer form
//! ([`int_weights`]) times activations rounded to 15-bit integers per block of 32, summed exactly in
//! i32 per block and scaled once per block in f32.
//!
//! Why: on AVX2 one `vpmaddwd` does 16 multiply-adds where an FMA does 8, and on this CPU family it
//! issues as often, so the integer kernel has about twice the f32 kernel's peak. Why 15 bits: the
//! activation error is at most 2^-15 of its block's largest element (llama.cpp's 8-bit blocks: 2^-8),
//! and 32 products of `|q| ≤ 4096` and `|a| ≤ 16383` still fit an i32 exactly (checked below), so
//! nothing is lost in the sum.
//!
//! Each output is the same chain of block terms in ascending block order whatever the tile, the
//! batch or the thread: a token's results do not depend on the other tokens of the call.

use rayon::prelude::*;

use crate::aligned::AlignedVec;

use std::cell::RefCell;

use super::int_weights::{self, BLOCK, MAX_Q};
use super::NR;
use crate::isa::{isa, Isa};
use crate::matmul::QMatrix;

/// Largest activation integer.
pub const MAX_A: i32 = 16383;

// Exactness of the per-block integer sum (32 products of the largest magnitudes).
const _: () = assert!((BLOCK as i64) * (MAX_Q as i64) * (MAX_A as i64) <= i32::MAX as i64);

/// Most tokens per kernel tile (the AVX-512 kernel's; the AVX2 kernel, with half the registers,
/// takes a tile in pieces of at most [`MR_AVX2`]).
pub const MR: usize = 8;

/// Most tokens per AVX2 kernel call.
pub const MR_AVX2: usize = 4;

/// Pairs of 16-bit integers (element `2p` in the low half, `2p + 1` in the high half): the unit the
/// kernel multiplies.
/// In memory a pair is the two i16 in element order, so a row of pairs is the row of i16 values.
fn pair(lo: i16, hi: i16) -> u32 {
    let (l, h) = (lo.to_ne_bytes(), hi.to_ne_bytes());
    u32::from_ne_bytes([l[0], l[1], h[0], h[1]])
}

fn unpair(p: u32) -> (i32, i32) {
    let b = p.to_ne_bytes();
    (i32::from(i16::from_ne_bytes([b[0], b[1]])), i32::from(i16::from_ne_bytes([b[2], b[3]])))
}

/// Activations of `n` tokens as 15-bit integers per block of 32: token `t`'s element `k` stands for
/// `d[t * blocks + k / 32] · q`, and `sum` holds each block's represented sum (for formats with mins).
#[derive(Default)]
pub struct ActI16 {
    pub n: usize,
    pub cols: usize,
    /// `[n][cols / 2]` pairs.
    pub q: AlignedVec<u32>,
    /// `[n][cols / 32]` scales.
    pub d: Vec<f32>,
    /// `[n][cols / 32]` represented block sums, `d · Σ q`.
    pub sum: Vec<f32>,
}

impl ActI16 {
    /// Rounds `x` (`n` rows of `cols`, a multiple of 32) to the nearest representable values.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        assert!(cols.is_multiple_of(BLOCK) && x.len() == n * cols, "whole blocks of whole tokens");
        let blocks = cols / BLOCK;
        self.n = n;
        self.cols = cols;
        self.q.resize(n * cols / 2, 0);
        self.d.resize(n * blocks, 0.0);
        self.sum.resize(n * blocks, 0.0);
        let rows =
            self.q.par_chunks_mut(cols / 2).zip(self.d.par_chunks_mut(blocks)).zip(self.sum.par_chunks_mut(blocks));
        rows.zip(x.par_chunks(cols)).for_each(|(((q, d), sum), xt)| {
            for (b, xb) in xt.chunks_exact(BLOCK).enumerate() {
                let xb: &[f32; BLOCK] = xb.try_into().expect("chunks_exact");
                let qb: &mut [u32; BLOCK / 2] = (&mut q[b * BLOCK / 2..(b + 1) * BLOCK / 2]).try_into().expect("block");
                (d[b], sum[b]) = quantize_block(xb, qb);
            }
        });
    }
}

/// One block of activations: its pairs, and returns `(scale, represented sum)`. The SIMD twin is
/// bit-identical (the same IEEE operations per element; max and integer sums are exact in any order).
fn quantize_block(x: &[f32; BLOCK], q: &mut [u32; BLOCK / 2]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx2 {
            return super::int16_avx2::quantize_block(x, q);
        }
    }
    quantize_block_scalar(x, q)
}

/// The portable block quantizer: `scale = amax / MAX_A`, `q = round_ties_even(x · (1 / scale))`.
pub fn quantize_block_scalar(x: &[f32; BLOCK], q: &mut [u32; BLOCK / 2]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / MAX_A as f32;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut total = 0i32;
    for (p, o) in q.iter_mut().enumerate() {
        // `amax · (1 / scale)` can round to just above MAX_A: the clamp keeps the bound.
        let r = |v: f32| (v * inv).round_ties_even().clamp(-MAX_A as f32, MAX_A as f32) as i16;
        let (lo, hi) = (r(x[2 * p]), r(x[2 * p + 1]));
        total += i32::from(lo) + i32::from(hi);
        *o = pair(lo, hi);
    }
    (scale, scale * total as f32)
}

/// [`NR`] weight rows in integer form: `q[p * NR + j]` holds row `j`'s elements `2p, 2p + 1` as a
/// pair, `scale[b * NR + j]` and `min[b * NR + j]` its block `b`. Rows past the matrix are zero.
#[derive(Default)]
pub struct IntPanel {
    pub q: AlignedVec<u32>,
    pub scale: Vec<f32>,
    pub min: Vec<f32>,
    pub has_min: bool,
    /// The rows' pairs row-major (`[NR][cols / 2]`), before the transpose into `q`.
    rows: Vec<u32>,
    row_q: Vec<i16>,
    row_scale: Vec<f32>,
    row_min: Vec<f32>,
}

impl IntPanel {
    /// Fills the panel with rows `r0 .. r0 + NR` of `w` (an [`int_weights::is_supported`] type).
    pub fn pack(&mut self, w: &QMatrix, r0: usize) {
        self.pack_cols(w, r0, 0..w.cols);
    }

    /// [`Self::pack`] for columns `k` of the rows only (whole blocks of `w`'s format).
    pub fn pack_cols(&mut self, w: &QMatrix, r0: usize, k: std::ops::Range<usize>) {
        let bs = w.ty.block_size();
        assert!(k.start.is_multiple_of(bs) && k.end.is_multiple_of(bs) && k.start < k.end && k.end <= w.cols);
        let blocks_of_row = k.start / bs..k.end / bs;
        let mut buf = Vec::new();
        let cols = k.len();
        let (pairs, blocks) = (cols / 2, cols / BLOCK);
        self.has_min = int_weights::has_min(w.ty);
        self.q.resize(pairs * NR, 0);
        self.rows.resize(pairs * NR, 0);
        self.scale.resize(blocks * NR, 0.0);
        self.min.resize(blocks * NR, 0.0);
        self.row_q.resize(cols, 0);
        self.row_scale.resize(blocks, 0.0);
        self.row_min.resize(blocks, 0.0);
        for j in 0..NR {
            let dst = &mut self.rows[j * pairs..(j + 1) * pairs];
            if r0 + j < w.rows {
                let src = w.row_blocks(r0 + j, blocks_of_row.clone(), &mut buf);
                int_weights::decode_row(w.ty, src, &mut self.row_q, &mut self.row_scale, &mut self.row_min);
                for (o, two) in dst.iter_mut().zip(self.row_q.chunks_exact(2)) {
                    *o = pair(two[0], two[1]);
                }
            } else {
                dst.fill(0);
                self.row_scale.fill(0.0);
                self.row_min.fill(0.0);
            }
            for b in 0..blocks {
                self.scale[b * NR + j] = self.row_scale[b];
                self.min[b * NR + j] = self.row_min[b];
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            if isa() >= Isa::Avx2 && pairs.is_multiple_of(8) {
                super::avx2::transpose_u32_into(&self.rows, pairs, pairs, &mut self.q);
                return;
            }
        }
        for j in 0..NR {
            for p in 0..pairs {
                self.q[p * NR + j] = self.rows[j * pairs + p];
            }
        }
    }
}

/// The portable kernel and the oracle of the SIMD one: `c[t * ldc + j]` for tokens `t0 .. t0 + m`
/// and rows `j < nvalid`, each the chain over blocks `b` of
/// `acc = fma(Σ q·a as f32, scale_w · d_a, acc)` then (formats with mins) `acc = fma(min_w, sum_a, acc)`,
/// from `acc = 0`, or with `accumulate` from the value in `c` (the chain goes on where an earlier
/// call over the preceding columns left it, so column pieces give the same bits as one call).
#[allow(clippy::too_many_arguments)]
pub fn tile_scalar(
    a: &ActI16,
    t0: usize,
    m: usize,
    panel: &IntPanel,
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let (pairs, blocks) = (a.cols / 2, a.cols / BLOCK);
    for t in 0..m {
        let (aq, ad, asum) = (
            &a.q[(t0 + t) * pairs..][..pairs],
            &a.d[(t0 + t) * blocks..][..blocks],
            &a.sum[(t0 + t) * blocks..][..blocks],
        );
        for j in 0..nvalid {
            let mut acc = if accumulate { c[t * ldc + j] } else { 0.0 };
            for b in 0..blocks {
                let mut s = 0i32;
                let half = BLOCK / 2;
                for (p, &ap) in aq.iter().enumerate().skip(b * half).take(half) {
                    let ((w0, w1), (a0, a1)) = (unpair(panel.q[p * NR + j]), unpair(ap));
                    s = s.wrapping_add(w0 * a0 + w1 * a1);
                }
                acc = (s as f32).mul_add(panel.scale[b * NR + j] * ad[b], acc);
                if panel.has_min {
                    acc = panel.min[b * NR + j].mul_add(asum[b], acc);
                }
            }
            c[t * ldc + j] = acc;
        }
    }
}

/// The raw pointers a SIMD tile kernel reads and writes, after the bounds checks every kernel
/// needs: tokens `t0 .. t0 + m` (`1 ≤ m ≤ max_m`) of `a`, the whole panel, and `m` output rows of
/// `nvalid ≤ NR` values at stride `ldc` in `c`.
#[cfg(target_arch = "x86_64")]
pub(super) struct TilePtrs {
    pub pairs: usize,
    pub blocks: usize,
    pub aq: *const u32,
    pub ad: *const f32,
    pub asum: *const f32,
    pub w: (*const u32, *const f32, *const f32),
    pub out: *mut f32,
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_ptrs(
    a: &ActI16,
    t0: usize,
    m: usize,
    max_m: usize,
    panel: &IntPanel,
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
) -> TilePtrs {
    let (pairs, blocks) = (a.cols / 2, a.cols / BLOCK);
    assert!((1..=max_m).contains(&m) && (1..=NR).contains(&nvalid));
    assert!(a.q.len() >= (t0 + m) * pairs && a.d.len() >= (t0 + m) * blocks && a.sum.len() >= (t0 + m) * blocks);
    assert!(panel.q.len() >= pairs * NR && panel.scale.len() >= blocks * NR && panel.min.len() >= blocks * NR);
    assert!(c.len() >= (m - 1) * ldc + nvalid, "output tile out of bounds");
    TilePtrs {
        pairs,
        blocks,
        aq: a.q[t0 * pairs..].as_ptr(),
        ad: a.d[t0 * blocks..].as_ptr(),
        asum: a.sum[t0 * blocks..].as_ptr(),
        w: (panel.q.as_ptr(), panel.scale.as_ptr(), panel.min.as_ptr()),
        out: c.as_mut_ptr(),
    }
}

/// One tile (`m ≤ MR` tokens) with the best kernel this CPU has.
#[allow(clippy::too_many_arguments)]
pub fn tile(
    a: &ActI16,
    t0: usize,
    m: usize,
    panel: &IntPanel,
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    tile_at(isa(), a, t0, m, panel, c, ldc, nvalid, accumulate)
}

/// [`tile`] with the kernel of level `level`; panics if this CPU cannot run it.
#[allow(clippy::too_many_arguments)]
pub fn tile_at(
    level: Isa,
    a: &ActI16,
    t0: usize,
    m: usize,
    panel: &IntPanel,
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    assert!(level <= crate::isa::detected_isa(), "int16: {} is not available on this CPU", level.name());
    assert!((1..=MR).contains(&m), "int16: 1 to {MR} tokens per tile, got {m}");
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Isa::Avx512 {
            super::int16_avx512::tile(a, t0, m, panel, c, ldc, nvalid, accumulate);
            return;
        }
        if level >= Isa::Avx2 {
            for s in (0..m).step_by(MR_AVX2) {
                let ms = (m - s).min(MR_AVX2);
                super::int16_avx2::tile(a, t0 + s, ms, panel, &mut c[s * ldc..], ldc, nvalid, accumulate);
            }
            return;
        }
    }
    tile_scalar(a, t0, m, panel, c, ldc, nvalid, accumulate);
}

thread_local! {
    /// Per-thread panel, reused across calls.
    static PANEL: RefCell<IntPanel> = RefCell::new(IntPanel::default());
}

/// The activations quantized by the last call, reused (no allocation per call in steady state).
static ACT: std::sync::Mutex<Option<ActI16>> = std::sync::Mutex::new(None);

/// `out_j[t * rows + r] = Σ_c w_j[r, c] · x[t * cols + c]` for every job, all of an
/// [`int_weights::is_supported`] type, the activations quantized once.
pub fn gemm_many(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize) {
    let Some(cols) = super::check_jobs(jobs, x, n) else { return };
    for (w, _) in jobs.iter() {
        assert!(int_weights::is_supported(w.ty), "{:?} has no integer form", w.ty);
    }
    int_panels(jobs, x, n, 0..cols, false);
}

/// One piece of a product split along the columns: `out[t * rows + r] (+)= Σ_c w[r, k0 + c] ·
/// x[t * xc + c]` for the `xc = x.len() / n` columns from `k0` (whole blocks of `w`'s format), added
/// to `out` with `accumulate`, else written. Pieces taken in column order with `accumulate` after
/// the first give the same bits as [`gemm_many`] on the whole row (see [`tile_scalar`]), with
/// quantized activations and a panel only a piece wide.
pub fn gemm_cols(w: &QMatrix, k0: usize, x: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    assert!(int_weights::is_supported(w.ty), "{:?} has no integer form", w.ty);
    let k = super::piece_cols(w, k0, x, n, out);
    int_panels(&mut [(w, out)], x, n, k, accumulate);
}

/// The kernel over columns `k` of every job's rows (`x`: `n` tokens of `k.len()` columns, quantized
/// once), written or, with `accumulate`, added on.
fn int_panels(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize, k: std::ops::Range<usize>, accumulate: bool) {
    let mut act = ACT.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    act.quantize(x, n, k.len());
    let a = &act;
    super::for_each_panel(jobs, |w, r0, nvalid, out| {
        PANEL.with(|p| {
            let panel = &mut *p.borrow_mut();
            panel.pack_cols(w, r0, k.clone());
            for t0 in (0..n).step_by(MR) {
                tile(a, t0, (n - t0).min(MR), panel, out.rows_from(t0), w.rows, nvalid, accumulate);
            }
        });
    });
    *ACT.lock().unwrap_or_else(|e| e.into_inner()) = Some(act);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_gguf::GgmlType;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn unit(seed: &mut u64) -> f32 {
        (lcg(seed) % 20001) as f32 / 10000.0 - 1.0
    }

    /// A `rows × cols` matrix of `ty` from random f32 weights (the format's own quantizer where one
    /// exists in this crate, random bytes with sane scales otherwise).
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let vals: Vec<f32> = (0..rows * cols).map(|_| unit(seed) * 0.1).collect();
        let mut out = Vec::new();
        for r in vals.chunks_exact(cols) {
            match ty {
                GgmlType::Q4_0 => {
                    let mut b = vec![0u8; cols / 32 * crate::q4_0::BLOCK_BYTES];
                    crate::q4_0::quantize_row(r, &mut b);
                    out.extend(b);
                }
                GgmlType::Q4_1 => {
                    let mut b = vec![0u8; cols / 32 * crate::q4_1::BLOCK_BYTES];
                    crate::q4_1::quantize_row(r, &mut b);
                    out.extend(b);
                }
                GgmlType::Q8_0 => {
                    let mut b = vec![0u8; cols / 32 * crate::q8_0::BLOCK_BYTES];
                    crate::q8_0::quantize_row(r, &mut b);
                    out.extend(b);
                }
                GgmlType::Q4_K => crate::q4_k::quantize_row(r, &mut out),
                GgmlType::Q6_K => crate::q6_k::quantize_row(r, &mut out),
                _ => unreachable!(),
            }
        }
        out
    }

    fn activations(n: usize, cols: usize, seed: &mut u64) -> Vec<f32> {
        // Mixed magnitudes, an outlier block and an all-zero block.
        let mut x: Vec<f32> = (0..n * cols).map(|i| unit(seed) * if i % 97 == 0 { 30.0 } else { 1.0 }).collect();
        if cols >= 64 {
            x[32..64].fill(0.0);
        }
        x
    }

    #[test]
    fn simd_block_quantizer_matches_scalar_bit_for_bit() {
        let mut seed = 21;
        for case in 0..200 {
            let mut x = [0f32; BLOCK];
            let mag = [1e-30f32, 1e-3, 1.0, 7.5, 3e4][case % 5];
            for v in x.iter_mut() {
                *v = unit(&mut seed) * mag;
            }
            if case % 7 == 0 {
                x = [0.0; BLOCK];
            }
            if case % 11 == 0 {
                x[case % BLOCK] = -mag * 40.0;
            }
            let (mut want, mut got) = ([0u32; BLOCK / 2], [0u32; BLOCK / 2]);
            let ws = quantize_block_scalar(&x, &mut want);
            let gs = quantize_block(&x, &mut got);
            assert_eq!((ws.0.to_bits(), ws.1.to_bits()), (gs.0.to_bits(), gs.1.to_bits()), "case {case}");
            assert_eq!(want, got, "case {case}");
        }
    }

    #[test]
    fn activation_blocks_are_within_half_a_step() {
        let mut seed = 3;
        let (n, cols) = (3, 96);
        let x = activations(n, cols, &mut seed);
        let mut a = ActI16::default();
        a.quantize(&x, n, cols);
        for t in 0..n {
            for b in 0..cols / BLOCK {
                let d = a.d[t * 3 + b];
                let mut sum = 0i32;
                for k in b * BLOCK..(b + 1) * BLOCK {
                    let p = unpair(a.q[t * cols / 2 + k / 2]);
                    let q = if k % 2 == 0 { p.0 } else { p.1 };
                    assert!(q.abs() <= MAX_A);
                    sum += q;
                    let err = (f64::from(d) * f64::from(q) - f64::from(x[t * cols + k])).abs();
                    assert!(err <= 0.5 * f64::from(d) * (1.0 + 1e-6), "t={t} k={k}: err {err}, step {d}");
                }
                assert_eq!(a.sum[t * 3 + b], d * sum as f32);
            }
        }
    }

    #[test]
    fn simd_tile_matches_scalar_oracle_bit_for_bit() {
        let mut seed = 9;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let cols = if ty.block_size() == 256 { 512 } else { 96 };
            let rows = 21;
            let bytes = random_matrix(ty, rows, cols, &mut seed);
            let w = QMatrix::new(ty, &bytes, rows, cols).expect("matrix");
            let n = MR + 3;
            let x = activations(n, cols, &mut seed);
            let mut a = ActI16::default();
            a.quantize(&x, n, cols);
            let mut panel = IntPanel::default();
            for r0 in [0, NR] {
                panel.pack(&w, r0);
                let nvalid = (rows - r0).min(NR);
                for t0 in [0, 2] {
                    for m in 1..=MR {
                        let ldc = NR + 1;
                        let mut want = vec![0f32; m * ldc];
                        let mut got = vec![0f32; m * ldc];
                        tile_scalar(&a, t0, m, &panel, &mut want, ldc, nvalid, false);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        for level in crate::isa::available_isas() {
                            got.fill(0.0);
                            tile_at(level, &a, t0, m, &panel, &mut got, ldc, nvalid, false);
                            assert_eq!(bits(&got), bits(&want), "{ty:?} {level:?} r0={r0} t0={t0} m={m}");
                        }
                    }
                }
            }
        }
    }

    /// The accumulating tiles (SIMD and oracle) go on from `c`: bit-identical to each other, and a
    /// tile over the second half of the columns started from the first half's outputs equals one
    /// tile over all of them.
    #[test]
    fn accumulating_tiles_continue_the_chain_bit_for_bit() {
        let mut seed = 23;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let half = if ty.block_size() == 256 { 256 } else { 64 };
            let (rows, cols, n) = (NR + 5, 2 * half, MR + 2);
            let bytes = random_matrix(ty, rows, cols, &mut seed);
            let w = QMatrix::new(ty, &bytes, rows, cols).expect("matrix");
            let x = activations(n, cols, &mut seed);
            let (mut whole, mut first, mut second) = (ActI16::default(), ActI16::default(), ActI16::default());
            whole.quantize(&x, n, cols);
            let split =
                |h: usize| x.chunks_exact(cols).flat_map(|t| t[h * half..(h + 1) * half].to_vec()).collect::<Vec<_>>();
            first.quantize(&split(0), n, half);
            second.quantize(&split(1), n, half);
            let mut panel = IntPanel::default();
            for r0 in [0, NR] {
                let nvalid = (rows - r0).min(NR);
                for m in 1..=MR {
                    let ldc = NR + 1;
                    let mut want = vec![0f32; m * ldc];
                    panel.pack(&w, r0);
                    tile_scalar(&whole, 1, m, &panel, &mut want, ldc, nvalid, false);
                    let mut scalar = vec![0f32; m * ldc];
                    panel.pack_cols(&w, r0, 0..half);
                    tile_scalar(&first, 1, m, &panel, &mut scalar, ldc, nvalid, false);
                    panel.pack_cols(&w, r0, half..cols);
                    tile_scalar(&second, 1, m, &panel, &mut scalar, ldc, nvalid, true);
                    assert_eq!(bits(&scalar), bits(&want), "{ty:?} r0={r0} m={m} scalar");
                    for level in crate::isa::available_isas() {
                        let mut simd = vec![0f32; m * ldc];
                        panel.pack_cols(&w, r0, 0..half);
                        tile_at(level, &first, 1, m, &panel, &mut simd, ldc, nvalid, false);
                        panel.pack_cols(&w, r0, half..cols);
                        tile_at(level, &second, 1, m, &panel, &mut simd, ldc, nvalid, true);
                        assert_eq!(bits(&simd), bits(&want), "{ty:?} {level:?} r0={r0} m={m} simd");
                    }
                }
            }
        }
    }

    /// [`gemm_cols`] over column pieces in order (uneven pieces, rows and tokens off the tile
    /// sizes) gives the bits of one [`gemm_many`] call.
    #[test]
    fn column_pieces_give_the_bits_of_the_whole_product() {
        let mut seed = 29;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let bs = ty.block_size().max(BLOCK);
            let cols = 5 * bs;
            let (rows, n) = (NR * 2 + 3, 2 * MR + 1);
            let bytes = random_matrix(ty, rows, cols, &mut seed);
            let w = QMatrix::new(ty, &bytes, rows, cols).expect("matrix");
            let x = activations(n, cols, &mut seed);
            let mut want = vec![f32::NAN; n * rows];
            gemm_many(&mut [(&w, &mut want)], &x, n);
            let mut got = vec![f32::NAN; n * rows];
            for (i, k) in [0..2 * bs, 2 * bs..3 * bs, 3 * bs..cols].into_iter().enumerate() {
                let piece: Vec<f32> = x.chunks_exact(cols).flat_map(|t| t[k.clone()].to_vec()).collect();
                gemm_cols(&w, k.start, &piece, n, &mut got, i > 0);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty:?}");
        }
    }

    /// The whole product against f64 sums of the dequantized weights and the represented
    /// activations (what the kernel computes exactly, up to f32 block scaling), and against the
    /// original activations within the 15-bit rounding (half a step per activation).
    #[test]
    fn gemm_matches_exact_products() {
        let mut seed = 17;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let cols = if ty.block_size() == 256 { 512 } else { 160 };
            for (rows, n) in [(1usize, 1usize), (17, 7), (40, 13)] {
                let bytes = random_matrix(ty, rows, cols, &mut seed);
                let w = QMatrix::new(ty, &bytes, rows, cols).expect("matrix");
                let x = activations(n, cols, &mut seed);
                let mut out = vec![f32::NAN; n * rows];
                gemm_many(&mut [(&w, &mut out)], &x, n);
                let mut a = ActI16::default();
                a.quantize(&x, n, cols);
                let mut wrow = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row_into(r, &mut wrow);
                    for t in 0..n {
                        // `half_steps`: the largest effect of rounding each activation (half its step).
                        let (mut repr, mut orig, mut mag, mut half_steps) = (0f64, 0f64, 0f64, 0f64);
                        for k in 0..cols {
                            let p = unpair(a.q[t * cols / 2 + k / 2]);
                            let q = if k % 2 == 0 { p.0 } else { p.1 };
                            let av = f64::from(a.d[t * cols / BLOCK + k / BLOCK]) * f64::from(q);
                            repr += f64::from(wrow[k]) * av;
                            orig += f64::from(wrow[k]) * f64::from(x[t * cols + k]);
                            mag += (f64::from(wrow[k]) * f64::from(x[t * cols + k])).abs();
                            half_steps += f64::from(wrow[k]).abs() * 0.5 * f64::from(a.d[t * cols / BLOCK + k / BLOCK]);
                        }
                        let got = f64::from(out[t * rows + r]);
                        assert!((got - repr).abs() <= 1e-6 * mag + 1e-12, "{ty:?} t={t} r={r}: {got} vs {repr}");
                        assert!(
                            (got - orig).abs() <= half_steps * 1.001 + 1e-6 * mag + 1e-12,
                            "{ty:?} t={t} r={r}: {got} vs {orig}"
                        );
                    }
                }
            }
        }
    }
}
