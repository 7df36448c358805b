//! Prompt processing as matrix-matrix products: each panel of [`NR`] weight rows is decoded once per
//! call and multiplied with every token's activations by a register-blocked kernel, so the decoding
//! is paid once per panel and shared by all the prompt's tokens (this path only runs from
//! [`MIN_TOKENS`] tokens up; generation keeps the 8-bit dot kernels).
//!
//! Two kernels:
//! - [`int16`] for quantized formats with an exact integer form ([`int_weights`]: all but Q2_K):
//!   weights as integers, activations rounded to 15 bits per block of 32, exact i32 block sums.
//!   `vpmaddwd` does twice the multiply-adds of an FMA per instruction; the activation error
//!   (2^-15 of a block's largest element) is 128 times smaller than llama.cpp's 8-bit blocks.
//! - f32 (this file) for float weights and Q2_K: the weights dequantized exactly, f32
//!   activations, one FMA chain per output (the `avx2` module).
//!
//! In both, each output is one chain over `k` (or its blocks) in order, whatever tile or batch it is
//! computed in: a token's results do not depend on the other tokens of the call.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod int16;
#[cfg(target_arch = "x86_64")]
mod int16_avx2;
#[cfg(target_arch = "x86_64")]
mod int16_avx512;
pub mod int_weights;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::isa::{isa, Isa};
use crate::matmul::QMatrix;

/// Weight rows per panel (two 8-lane vectors).
pub const NR: usize = 16;
/// Tokens per kernel tile: 6 × 2 accumulators + 2 weight vectors + 1 broadcast fit the 16 AVX2
/// registers.
pub const MR: usize = 6;
/// Fewest tokens for which dequantizing the panels pays off (measured with `kiln bench`).
pub const MIN_TOKENS: usize = 16;

/// Whether this CPU runs the matrix-matrix path (`KILN_GEMM=off` turns it off, for comparisons).
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| isa() >= Isa::Avx2 && std::env::var("KILN_GEMM").as_deref() != Ok("off"))
}

/// Columns dequantized at a time while packing: a multiple of every block size (32, 256), and
/// `NR` rows of it (16 KiB) stay in L1 for the transpose.
const KC: usize = 256;

/// Dequantizes weight rows `r0 .. r0 + NR` (zeros past the last row) into `panel`, k-major:
/// `panel[k * NR + j] = w[r0 + j, k]`. `rows_buf` is scratch of `NR * KC` values.
pub fn pack_panel(w: &QMatrix, r0: usize, rows_buf: &mut [f32], panel: &mut [f32]) {
    pack_panel_cols(w, r0, 0..w.cols, rows_buf, panel);
}

/// [`pack_panel`] for columns `k` of the rows only (whole blocks of `w`'s format):
/// `panel[i * NR + j] = w[r0 + j, k.start + i]`.
pub fn pack_panel_cols(w: &QMatrix, r0: usize, k: std::ops::Range<usize>, rows_buf: &mut [f32], panel: &mut [f32]) {
    let (bs, ts) = (w.ty.block_size(), w.ty.type_size());
    assert!(k.start.is_multiple_of(bs) && k.end.is_multiple_of(bs) && k.end <= w.cols, "whole blocks");
    let cols = k.len();
    debug_assert!(rows_buf.len() == NR * KC && panel.len() == cols * NR);
    let mut c0 = 0;
    let mut buf = Vec::new();
    while c0 < cols {
        let kc = (cols - c0).min(KC);
        for j in 0..NR {
            let dst = &mut rows_buf[j * KC..j * KC + kc];
            if r0 + j < w.rows {
                let at = k.start + c0;
                let src = w.row_blocks(r0 + j, at / bs..(at + kc) / bs, &mut buf);
                debug_assert_eq!(src.len(), kc / bs * ts);
                if !dequantize_fast(w.ty, src, dst) {
                    crate::dequantize_row(w.ty, src, dst).expect("geometry validated in QMatrix::new");
                }
            } else {
                dst.fill(0.0);
            }
        }
        transpose_into(rows_buf, kc, &mut panel[c0 * NR..(c0 + kc) * NR]);
        c0 += kc;
    }
}

/// The SIMD twin of `dequantize_row` where one exists (bit-identical); `false` otherwise.
fn dequantize_fast(ty: kiln_gguf::GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx2 {
            return avx2::dequantize_row(ty, src, dst);
        }
    }
    let _ = (ty, src, dst);
    false
}

/// `panel[k * NR + j] = rows[j * KC + k]` for `k < kc` (a multiple of 8 when SIMD runs).
fn transpose_into(rows: &[f32], kc: usize, panel: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx2 && kc.is_multiple_of(8) {
            avx2::transpose_into(rows, KC, kc, panel);
            return;
        }
    }
    for k in 0..kc {
        for j in 0..NR {
            panel[k * NR + j] = rows[j * KC + k];
        }
    }
}

/// The portable kernel, and the oracle of the SIMD one: `c[t * ldc + j] = Σ_k a[t * lda + k] ·
/// panel[k * NR + j]` for `t < m` tokens and `j < nvalid` rows, each a fused multiply-add chain in
/// ascending `k` (so the SIMD kernel's FMAs give bit-identical results), from 0 or, with
/// `accumulate`, from the value in `c` (the chain of an earlier call over the preceding columns
/// goes on, so column pieces give the bits of one call).
#[allow(clippy::too_many_arguments)]
pub fn tile_scalar(
    a: &[f32],
    lda: usize,
    m: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    let k = panel.len() / NR;
    for t in 0..m {
        let at = &a[t * lda..t * lda + k];
        for j in 0..nvalid {
            let mut acc = if accumulate { c[t * ldc + j] } else { 0.0 };
            for (kk, &av) in at.iter().enumerate() {
                acc = av.mul_add(panel[kk * NR + j], acc);
            }
            c[t * ldc + j] = acc;
        }
    }
}

/// One tile with the best kernel this CPU has (also used by prompt attention, with keys or
/// values as the panel).
#[allow(clippy::too_many_arguments)]
pub fn tile(
    a: &[f32],
    lda: usize,
    m: usize,
    panel: &[f32],
    c: &mut [f32],
    ldc: usize,
    nvalid: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx2 {
            avx2::tile(a, lda, m, panel, c, ldc, nvalid, accumulate);
            return;
        }
    }
    tile_scalar(a, lda, m, panel, c, ldc, nvalid, accumulate);
}

thread_local! {
    /// Per-thread panel and row scratch, reused across calls (no allocation per panel).
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `out[t * rows + r] = Σ_c w[r, c] · x[t * cols + c]` for `n` tokens, panel by panel on the pool.
pub fn gemm(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    gemm_many(&mut [(w, out)], x, n);
}

/// Whether the integer path takes matrices it supports (`KILN_GEMM=f32` keeps every matrix on the
/// f32 kernel, for comparisons).
pub fn int16_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_GEMM").as_deref() != Ok("f32"))
}

/// One piece of a product split along the columns, on the kernel [`gemm_many`] takes for `w`:
/// `out[t * rows + r] (+)= Σ_c w[r, k0 + c] · x[t * xc + c]` for the `xc = x.len() / n` columns
/// from `k0` (whole blocks of `w`'s format), added to `out` with `accumulate`, else written.
/// Pieces taken in column order with `accumulate` after the first continue each output's chain:
/// the bits of one [`gemm_many`] call over whole rows, with activations and panels a piece wide.
pub fn gemm_cols(w: &QMatrix, k0: usize, x: &[f32], n: usize, out: &mut [f32], accumulate: bool) {
    if int16_enabled() && int_weights::is_supported(w.ty) {
        int16::gemm_cols(w, k0, x, n, out, accumulate);
        return;
    }
    let k = piece_cols(w, k0, x, n, out);
    f32_panels(&mut [(w, out)], x, n, k, accumulate);
}

/// Checks one column piece of `w` (`x`: `n` tokens of the piece's columns from `k0`; `out`:
/// `[n, rows]`) and returns its columns.
fn piece_cols(w: &QMatrix, k0: usize, x: &[f32], n: usize, out: &[f32]) -> std::ops::Range<usize> {
    assert!(n > 0 && x.len().is_multiple_of(n), "whole tokens");
    let xc = x.len() / n;
    assert!(out.len() == n * w.rows && k0 + xc <= w.cols, "piece inside the matrix");
    k0..k0 + xc
}

/// [`gemm`] for several matrices sharing the activations: quantized formats with an integer form
/// go through the 16-bit kernel ([`int16`]), the others (float weights, Q2_K) through the f32 one.
pub fn gemm_many(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize) {
    let int = |w: &QMatrix| int16_enabled() && int_weights::is_supported(w.ty);
    if jobs.iter().all(|(w, _)| int(w)) {
        int16::gemm_many(jobs, x, n);
        return;
    }
    if jobs.iter().any(|(w, _)| int(w)) {
        let (mut ints, mut floats): (Vec<_>, Vec<_>) =
            jobs.iter_mut().map(|(w, out)| (*w, &mut **out)).partition(|(w, _)| int(w));
        int16::gemm_many(&mut ints, x, n);
        gemm_many_f32(&mut floats, x, n);
        return;
    }
    gemm_many_f32(jobs, x, n);
}

/// The f32 kernel for every job.
pub fn gemm_many_f32(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize) {
    let Some(cols) = check_jobs(jobs, x, n) else { return };
    f32_panels(jobs, x, n, 0..cols, false);
}

/// The f32 kernel over columns `k` of every job's rows (`x`: `n` tokens of `k.len()` columns),
/// written or, with `accumulate`, added on (see [`tile_scalar`]).
fn f32_panels(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize, k: std::ops::Range<usize>, accumulate: bool) {
    let xc = k.len();
    for_each_panel(jobs, |w, r0, nvalid, out| {
        SCRATCH.with(|s| {
            let (buf, panel) = &mut *s.borrow_mut();
            buf.resize(NR * KC, 0.0);
            panel.resize(xc * NR, 0.0);
            pack_panel_cols(w, r0, k.clone(), buf, panel);
            for t0 in (0..n).step_by(MR) {
                tile(&x[t0 * xc..], xc, (n - t0).min(MR), panel, out.rows_from(t0), w.rows, nvalid, accumulate);
            }
        });
    });
}

/// Checks that the jobs share `n` tokens of activations `x` and that each output is `[n, rows]`;
/// returns the shared column count (`None` for no jobs).
fn check_jobs(jobs: &[(&QMatrix, &mut [f32])], x: &[f32], n: usize) -> Option<usize> {
    let cols = jobs.first()?.0.cols;
    for (w, out) in jobs {
        assert_eq!(w.cols, cols, "fused matrices share the activations");
        assert_eq!(x.len(), n * cols, "activation length");
        assert_eq!(out.len(), n * w.rows, "output length");
    }
    Some(cols)
}

/// One panel task's view of its job's output (`[n, rows]`): only columns `r0 .. r0 + nvalid` of
/// each token row are this task's to write.
pub(crate) struct PanelOut {
    ptr: *mut f32,
    len: usize,
    rows: usize,
    r0: usize,
}

impl PanelOut {
    /// The output from token `t0`'s row at the panel's first column to the end; the kernels write
    /// the panel's columns of consecutive token rows at stride `rows`.
    pub(crate) fn rows_from(&mut self, t0: usize) -> &mut [f32] {
        let start = t0 * self.rows + self.r0;
        assert!(start <= self.len, "token {t0} past the output");
        // SAFETY: the range is inside the job's output (checked above), which outlives the panel
        // tasks; each task writes only its own panel's columns, so writes never overlap.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), self.len - start) }
    }
}

/// The outputs shared by the panel tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges (weight rows) of the outputs, which outlive them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Runs `panel(w, r0, nvalid, out)` for every panel of [`NR`] rows of every job, in parallel on the
/// pool (`nvalid`: the panel's rows inside the matrix).
pub(crate) fn for_each_panel(
    jobs: &mut [(&QMatrix, &mut [f32])],
    panel: impl Fn(&QMatrix, usize, usize, &mut PanelOut) + Sync,
) {
    let outs: Vec<(QMatrix, OutPtr, usize)> =
        jobs.iter_mut().map(|(w, out)| (**w, OutPtr(out.as_mut_ptr()), out.len())).collect();
    let panels: Vec<(usize, usize)> =
        outs.iter().enumerate().flat_map(|(j, (w, _, _))| (0..w.rows).step_by(NR).map(move |r0| (j, r0))).collect();
    panels.into_par_iter().for_each(|(j, r0)| {
        let (w, ptr, len) = (&outs[j].0, outs[j].1, outs[j].2);
        let mut out = PanelOut { ptr: ptr.0, len, rows: w.rows, r0 };
        panel(w, r0, (w.rows - r0).min(NR), &mut out);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_gguf::GgmlType;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn simd_tile_matches_scalar_oracle_bit_for_bit() {
        let mut seed = 7;
        for k in [1usize, 7, 32, 257] {
            let panel: Vec<f32> = (0..k * NR).map(|_| lcg(&mut seed)).collect();
            for m in 1..=MR {
                let lda = k + 3;
                let a: Vec<f32> = (0..m * lda).map(|_| lcg(&mut seed)).collect();
                for nvalid in [1, 5, 8, 9, NR] {
                    let ldc = NR + 2;
                    let mut want = vec![0f32; m * ldc];
                    let mut got = vec![0f32; m * ldc];
                    tile_scalar(&a, lda, m, &panel, &mut want, ldc, nvalid, false);
                    tile(&a, lda, m, &panel, &mut got, ldc, nvalid, false);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "k={k} m={m} nvalid={nvalid}");
                }
            }
        }
    }

    #[test]
    fn packed_panel_holds_the_dequantized_rows_k_major() {
        let mut seed = 3;
        // 300 columns: one whole 256-column chunk and a 44-column remainder (not a multiple of 8
        // for the SIMD transpose: exercises the scalar one too); 21 rows: a partial second panel.
        for cols in [64usize, 300, 512] {
            let rows = 21;
            let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let bytes: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
            let w = QMatrix::new(GgmlType::F32, &bytes, rows, cols).expect("matrix");
            let mut buf = vec![0f32; NR * KC];
            let mut panel = vec![f32::NAN; cols * NR];
            for r0 in [0, NR] {
                pack_panel(&w, r0, &mut buf, &mut panel);
                for k in 0..cols {
                    for j in 0..NR {
                        let want = if r0 + j < rows { wf[(r0 + j) * cols + k] } else { 0.0 };
                        assert_eq!(panel[k * NR + j].to_bits(), want.to_bits(), "cols={cols} r0={r0} k={k} j={j}");
                    }
                }
            }
        }
    }

    #[test]
    fn simd_dequantization_is_bit_identical_to_the_formats() {
        let mut seed = 1u64;
        for (ty, bs) in [(GgmlType::Q4_0, 18usize), (GgmlType::Q4_1, 20), (GgmlType::Q8_0, 34)] {
            for nb in [1usize, 3, 8] {
                let mut src: Vec<u8> = (0..nb * bs).map(|_| (lcg(&mut seed) * 512.0) as i32 as u8).collect();
                // Finite f16 scales (and mins) of either sign.
                for b in 0..nb {
                    for off in [0, 2] {
                        let v = half::f16::from_f32(lcg(&mut seed) * 0.1).to_le_bytes();
                        src[b * bs + off..b * bs + off + 2].copy_from_slice(&v);
                    }
                }
                let mut want = vec![0f32; nb * 32];
                let mut got = vec![f32::NAN; nb * 32];
                crate::dequantize_row(ty, &src, &mut want).expect("dequantize");
                if !dequantize_fast(ty, &src, &mut got) {
                    continue;
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ty:?} {nb} blocks");
            }
        }
        // Q4_K: random bytes with finite f16 d and dmin.
        for nb in [1usize, 3] {
            let bs = 144;
            let mut src: Vec<u8> = (0..nb * bs).map(|_| (lcg(&mut seed) * 512.0) as i32 as u8).collect();
            for b in 0..nb {
                for off in [0, 2] {
                    let v = half::f16::from_f32(lcg(&mut seed) * 0.01).to_le_bytes();
                    src[b * bs + off..b * bs + off + 2].copy_from_slice(&v);
                }
            }
            let mut want = vec![0f32; nb * 256];
            let mut got = vec![f32::NAN; nb * 256];
            crate::dequantize_row(GgmlType::Q4_K, &src, &mut want).expect("dequantize");
            if dequantize_fast(GgmlType::Q4_K, &src, &mut got) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "Q4_K {nb} blocks");
            }
        }
    }

    /// [`gemm_cols`] over column pieces in order gives the bits of one call over whole rows, on
    /// the f32 kernel (F32, F16, and Q2_K with its 256-element blocks) and the integer one (Q8_0).
    #[test]
    fn column_pieces_give_the_bits_of_the_whole_product() {
        let mut seed = 13;
        let (rows, n) = (NR * 2 + 5, 2 * MR + 1);
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q2_K, GgmlType::Q8_0] {
            let bs = ty.block_size().max(32);
            let cols = 5 * bs;
            let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let bytes: Vec<u8> = match ty {
                GgmlType::F32 => wf.iter().flat_map(|v| v.to_le_bytes()).collect(),
                GgmlType::F16 => wf.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                GgmlType::Q2_K => {
                    // Random scales and quants, finite super-block scales (d, dmin at bytes 80..84).
                    let mut b: Vec<u8> =
                        (0..rows * cols / 256 * 84).map(|_| (lcg(&mut seed) * 512.0) as i32 as u8).collect();
                    for blk in b.chunks_exact_mut(crate::q2_k::BLOCK_BYTES) {
                        blk[80..82].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                        blk[82..84].copy_from_slice(&half::f16::from_f32(0.003).to_le_bytes());
                    }
                    b
                }
                _ => {
                    let mut b = vec![0u8; rows * cols / 32 * crate::q8_0::BLOCK_BYTES];
                    let rb = cols / 32 * crate::q8_0::BLOCK_BYTES;
                    wf.chunks_exact(cols)
                        .zip(b.chunks_exact_mut(rb))
                        .for_each(|(r, o)| crate::q8_0::quantize_row(r, o));
                    b
                }
            };
            let w = QMatrix::new(ty, &bytes, rows, cols).expect("matrix");
            let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut seed)).collect();
            let mut want = vec![f32::NAN; n * rows];
            gemm(&w, &x, n, &mut want);
            let mut got = vec![f32::NAN; n * rows];
            for (i, k) in [0..2 * bs, 2 * bs..3 * bs, 3 * bs..cols].into_iter().enumerate() {
                let piece: Vec<f32> = x.chunks_exact(cols).flat_map(|t| t[k.clone()].to_vec()).collect();
                gemm_cols(&w, k.start, &piece, n, &mut got, i > 0);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty:?}");
        }
    }

    /// With `accumulate`, the SIMD tile continues from `c` exactly as the oracle does.
    #[test]
    fn accumulating_simd_tile_matches_scalar_oracle() {
        let mut seed = 19;
        let k = 37;
        let panel: Vec<f32> = (0..k * NR).map(|_| lcg(&mut seed)).collect();
        for m in 1..=MR {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            for nvalid in [1, 9, NR] {
                let start: Vec<f32> = (0..m * NR).map(|_| lcg(&mut seed)).collect();
                let (mut want, mut got) = (start.clone(), start);
                tile_scalar(&a, k, m, &panel, &mut want, NR, nvalid, true);
                tile(&a, k, m, &panel, &mut got, NR, nvalid, true);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "m={m} nvalid={nvalid}");
            }
        }
    }

    #[test]
    fn gemm_matches_exact_products_of_dequantized_weights() {
        let mut seed = 11;
        for (rows, cols, n) in [(1usize, 32usize, 1usize), (17, 64, 7), (40, 96, 13), (16, 32, 6)] {
            let wf: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let bytes: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
            let w = QMatrix::new(GgmlType::F32, &bytes, rows, cols).expect("matrix");
            let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut seed)).collect();
            let mut out = vec![f32::NAN; n * rows];
            gemm(&w, &x, n, &mut out);
            for t in 0..n {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                    let got = out[t * rows + r] as f64;
                    assert!((got - exact).abs() <= 1e-5 * (1.0 + exact.abs()), "t={t} r={r}: {got} vs {exact}");
                }
            }
        }
    }
}
