//! Matrix products of a stored (possibly quantized) weight matrix with f32 activations.
//!
//! Two paths with the same inputs: `matmul_exact` (weights dequantized exactly, products summed in
//! f64 — the reference) and `matmul` (the default path: f32 accumulation in SIMD-friendly lanes).

use kiln_gguf::GgmlType;
use rayon::prelude::*;

use std::sync::Mutex;

use crate::act_q8::ActQ8;
use crate::act_q8k::ActQ8K;
use crate::gemm::int16::ActI16;
use crate::{dequantize_row, QuantError};

/// A row-major weight matrix in its stored encoding: `rows` rows of `cols` elements each.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    /// 8-bit activation planes for the default path's quantized products (1 or 2; see [`matmul`]).
    pub act_planes: usize,
    /// Whole groups of rows stored woven together ([`crate::interleave`]).
    interleaved: bool,
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if !ty.is_supported() {
            return Err(QuantError::Unsupported(ty));
        }
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(QuantError::NotBlockMultiple { ty, n_elements: cols, block: ty.block_size() });
        }
        let row_bytes = cols / ty.block_size() * ty.type_size();
        if data.len() != row_bytes * rows {
            return Err(QuantError::WrongByteCount {
                ty,
                n_elements: rows * cols,
                expected: row_bytes * rows,
                got: data.len(),
            });
        }
        Ok(QMatrix { ty, data, rows, cols, row_bytes, act_planes: activation_planes(), interleaved: false })
    }

    /// A matrix whose `data` was woven by [`crate::interleave::interleave`] (a [`crate::interleave::supports`] type).
    pub fn new_interleaved(ty: GgmlType, data: &'a [u8], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if !crate::interleave::supports(ty) {
            return Err(QuantError::Unsupported(ty));
        }
        Ok(QMatrix { interleaved: true, ..QMatrix::new(ty, data, rows, cols)? })
    }

    /// Whether whole groups of rows are stored woven together ([`crate::interleave`]).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// Rows `r0 .. r0 + rows` as a matrix of their own (same type, layout and activation planes).
    /// An interleaved matrix splits at whole groups only: `r0` a multiple of the group, and
    /// `rows` too unless the block runs to the last row.
    pub fn row_block(&self, r0: usize, rows: usize) -> QMatrix<'a> {
        assert!(r0 + rows <= self.rows, "row_block: rows {r0}+{rows} of {}", self.rows);
        if self.interleaved {
            let g = crate::interleave::GROUP;
            assert!(
                r0.is_multiple_of(g) && (rows.is_multiple_of(g) || r0 + rows == self.rows),
                "row_block: an interleaved matrix splits at whole groups of {g} rows"
            );
        }
        QMatrix { data: &self.data[r0 * self.row_bytes..(r0 + rows) * self.row_bytes], rows, ..*self }
    }

    /// Row `r` in the file's layout. Panics on an interleaved matrix (use [`Self::row_blocks`]).
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(!self.interleaved, "QMatrix::row of an interleaved matrix");
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Blocks `blocks` of row `r` in the file's layout: borrowed from the matrix, or (interleaved)
    /// copied into `buf`.
    pub fn row_blocks<'b>(&'b self, r: usize, blocks: std::ops::Range<usize>, buf: &'b mut Vec<u8>) -> &'b [u8] {
        let ts = self.ty.type_size();
        if !self.interleaved {
            return &self.data[r * self.row_bytes + blocks.start * ts..r * self.row_bytes + blocks.end * ts];
        }
        buf.resize(blocks.len() * ts, 0);
        crate::interleave::row_blocks(self.ty, self.data, self.rows, self.row_bytes, r, blocks, buf);
        buf
    }

    /// The same matrix with `planes` (1 or 2) activation planes on the default path.
    pub fn with_act_planes(mut self, planes: usize) -> Self {
        self.act_planes = planes.clamp(1, 2);
        self
    }

    /// Dequantizes row `r` into `out` (`cols` long). Infallible: the geometry was checked in `new`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let mut buf = Vec::new();
        let row = self.row_blocks(r, 0..self.cols / self.ty.block_size(), &mut buf);
        dequantize_row(self.ty, row, out).expect("geometry validated in QMatrix::new");
    }
}

/// Rows handled per parallel task: enough work to amortise scheduling, small enough to balance.
fn rows_per_task(rows: usize, n: usize) -> usize {
    let per = (4096 / n.max(1)).clamp(4, 64);
    per.min(rows.max(1))
}

/// `out[t * rows + r] = Σ_c w[r, c] · x[t * cols + c]` for `n` activation vectors `x`.
/// Weights are dequantized exactly to f32 and the products summed in f64.
pub fn matmul_exact(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    run_rows(w, x, n, out, |row, xs, res| {
        for (t, xt) in xs.chunks_exact(row.len()).enumerate() {
            res[t] = dot_f64(row, xt) as f32;
        }
    });
}

/// How activations enter the default path's dot products for a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// f32 activations against widened float weights (F32, F16, BF16).
    F32,
    /// 8-bit blocks of 32 ([`ActQ8`]): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.
    Q8,
    /// 8-bit super-blocks of 256 ([`ActQ8K`]): Q2_K … Q6_K, IQ4_XS.
    Q8K,
    /// 15-bit blocks of 32 ([`ActI16`]): Q8_0 on the default two-plane setting, where one 16-bit
    /// plane is as accurate as two 8-bit ones and quicker for signed weights ([`crate::dot_i16`]).
    I16,
}

pub fn act_format(ty: GgmlType) -> ActFormat {
    act_format_for(ty, 1)
}

/// The activation format of `ty`'s generation products with `planes` 8-bit planes asked for.
pub fn act_format_for(ty: GgmlType, planes: usize) -> ActFormat {
    if ty == GgmlType::Q8_0 && planes == 2 && crate::isa::isa() >= crate::isa::Isa::Avx2 {
        return ActFormat::I16;
    }
    if crate::dot_float::is_supported(ty) {
        ActFormat::F32
    } else if crate::dot_legacy::is_supported(ty) {
        ActFormat::Q8
    } else {
        ActFormat::Q8K
    }
}

/// The default path: same result layout as [`matmul_exact`]. From [`gemm::MIN_TOKENS`] tokens
/// (prompts) the weights are dequantized panel by panel and multiplied in f32 ([`gemm`]); fewer
/// tokens (generation) go through [`matmul_dot`].
///
/// [`gemm::MIN_TOKENS`]: crate::gemm::MIN_TOKENS
/// [`gemm`]: crate::gemm
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_many(&mut [(w, out)], x, n);
}

/// Several products of the same activations (`out_j = x · w_jᵀ`, e.g. the q, k and v
/// projections) in one parallel section, the activations quantized once.
pub fn matmul_many(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize) {
    if uses_gemm(n) {
        crate::gemm::gemm_many(jobs, x, n);
    } else {
        matmul_dot_many(jobs, x, n);
    }
}

/// Whether [`matmul`] takes the matrix-matrix path for a call of `n` tokens.
pub fn uses_gemm(n: usize) -> bool {
    n >= crate::gemm::MIN_TOKENS && crate::gemm::available()
}

/// The generation kernels: quantized weights are multiplied with 8-bit activation blocks by the
/// SIMD dot kernels (integer products, f32 block sums); float weights with f32 activations. Each
/// token's result is independent of the others in the call.
pub fn matmul_dot(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_dot_many(&mut [(w, out)], x, n);
}

/// [`matmul_dot`] for several matrices sharing the activations.
pub fn matmul_dot_many(jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32], n: usize) {
    let Some(cols) = jobs.first().map(|(w, _)| w.cols) else { return };
    for (w, out) in jobs.iter() {
        assert_eq!(w.cols, cols, "fused matrices share the activations");
        assert_eq!(x.len(), n * cols, "activation length");
        assert_eq!(out.len(), n * w.rows, "output length");
    }
    let planes = jobs[0].0.act_planes;
    if jobs.iter().any(|(w, _)| w.act_planes != planes) {
        for (w, out) in jobs.iter_mut() {
            matmul_dot_many(&mut [(*w, &mut **out)], x, n);
        }
        return;
    }
    let mut acts = take_activations();
    let mats: Vec<&QMatrix> = jobs.iter().map(|(w, _)| &**w).collect();
    acts.quantize(&mats, x, n, true);

    // Tasks of rows over all the matrices: enough to balance the threads, tiles of rows small
    // enough to stay in L1 while the token groups stream past.
    let mut tasks = Vec::new();
    dot_tasks_into(&mats, n, rayon::current_num_threads(), &mut tasks);
    let outs: Vec<(QMatrix, OutPtr)> = jobs.iter_mut().map(|(w, out)| (**w, OutPtr(out.as_mut_ptr()))).collect();
    tasks.into_par_iter().for_each(|(j, rows)| {
        let (w, ptr) = (&outs[j].0, outs[j].1);
        dot_task(w, &acts, x, rows, ptr);
    });
    return_activations(acts);
}

/// Row tasks `(matrix index, rows)` of a generation product over `mats` for `threads` threads, into
/// `tasks`: a few per thread to balance them, interleaved matrices split at whole groups (their
/// kernels' step).
pub fn dot_tasks_into(mats: &[&QMatrix], n: usize, threads: usize, tasks: &mut Vec<(usize, std::ops::Range<usize>)>) {
    let total_rows: usize = mats.iter().map(|w| w.rows).sum();
    let threads = threads.max(1);
    let per = if n == 1 {
        total_rows.div_ceil(threads * 8).clamp(1, 256)
    } else {
        total_rows.div_ceil(threads * 4).clamp(1, 16)
    };
    tasks.clear();
    for (j, w) in mats.iter().enumerate() {
        let per = if w.interleaved { per.next_multiple_of(crate::interleave::GROUP) } else { per };
        tasks.extend((0..w.rows).step_by(per).map(|r0| (j, r0..(r0 + per).min(w.rows))));
    }
}

/// Rows `rows` of `w` against activations quantized by [`DotActivations::quantize`] (from `x`,
/// which the float formats read directly), written to `out[t * rows.len() + (r - rows.start)]`:
/// the results of [`matmul_dot_many`] for those rows, bit for bit. An interleaved matrix's `rows`
/// start at a whole group and end at one or at the last row.
pub fn matmul_dot_rows(w: &QMatrix, acts: &DotActivations, x: &[f32], rows: std::ops::Range<usize>, out: &mut [f32]) {
    assert_eq!(out.len(), acts.n * rows.len(), "output length");
    assert_eq!(x.len(), acts.n * w.cols, "activation length");
    assert!(acts.covers(w), "activations quantized for this matrix's format");
    let block = w.row_block(rows.start, rows.len());
    dot_task(&block, acts, x, 0..rows.len(), OutPtr(out.as_mut_ptr()));
}

/// Activations quantized for the generation kernels, in every format a set of matrices calls
/// for; kept between calls so that steady-state generation allocates nothing.
#[derive(Default)]
pub struct DotActivations {
    q8: Vec<ActQ8>,
    q8k: Vec<ActQ8K>,
    i16: ActI16,
    /// Tokens, columns and planes of the last [`Self::quantize`], and which formats it made.
    n: usize,
    cols: usize,
    planes: usize,
    formats: [bool; 3],
}

impl DotActivations {
    /// Quantizes the `n` vectors of `x` for the products with `mats` (same columns and activation
    /// planes), on the calling thread unless `parallel`.
    pub fn quantize(&mut self, mats: &[&QMatrix], x: &[f32], n: usize, parallel: bool) {
        let Some(first) = mats.first() else { return };
        let (cols, planes) = (first.cols, first.act_planes);
        assert!(mats.iter().all(|w| w.cols == cols && w.act_planes == planes), "matrices share the activations");
        assert_eq!(x.len(), n * cols, "activation length");
        let needs = |f: ActFormat| mats.iter().any(|w| act_format_for(w.ty, planes) == f);
        (self.n, self.cols, self.planes) = (n, cols, planes);
        self.formats = [needs(ActFormat::Q8), needs(ActFormat::Q8K), needs(ActFormat::I16)];
        if self.formats[0] {
            prepare(
                &mut self.q8,
                x,
                n,
                cols,
                planes,
                parallel,
                ActQ8::new,
                |a, x| a.quantize(x),
                |first, second, x| second.quantize_residual(first, x),
            );
        }
        if self.formats[1] {
            prepare(
                &mut self.q8k,
                x,
                n,
                cols,
                planes,
                parallel,
                ActQ8K::new,
                |a, x| a.quantize(x),
                |first, second, x| second.quantize_residual(first, x),
            );
        }
        if self.formats[2] {
            self.i16.quantize(x, n, cols);
        }
    }

    /// Whether the last [`Self::quantize`] made what `w`'s kernels read.
    fn covers(&self, w: &QMatrix) -> bool {
        w.cols == self.cols
            && w.act_planes == self.planes
            && match act_format_for(w.ty, self.planes) {
                ActFormat::F32 => true,
                ActFormat::Q8 => self.formats[0],
                ActFormat::Q8K => self.formats[1],
                ActFormat::I16 => self.formats[2],
            }
    }
}

static ACTIVATIONS_POOL: Mutex<Vec<DotActivations>> = Mutex::new(Vec::new());

fn take_activations() -> DotActivations {
    ACTIVATIONS_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
}

fn return_activations(a: DotActivations) {
    ACTIVATIONS_POOL.lock().unwrap_or_else(|e| e.into_inner()).push(a);
}

/// One row task of a generation product: rows `rows` of `w` against every token of `acts`, written
/// to `out[t * w.rows + r]`.
fn dot_task(w: &QMatrix, acts: &DotActivations, x: &[f32], rows: std::ops::Range<usize>, ptr: OutPtr) {
    let (n, planes, cols, ty) = (acts.n, acts.planes, w.cols, w.ty);
    let (q8, q8k, a16) = (&acts.q8[..], &acts.q8k[..], &acts.i16);
    let format = act_format_for(ty, planes);
    let group = tokens_per_call(format, planes);
    match format {
        ActFormat::I16 => tile_rows(w, n, rows, ptr, group, |row, t0, res| {
            res[0] = crate::dot_i16::vec_dot_q8_0(row, a16, t0);
        }),
        ActFormat::F32 => tile_rows(w, n, rows, ptr, group, |row, t0, res| {
            for (i, r) in res.iter_mut().enumerate() {
                let t = t0 + i;
                *r = crate::dot_float::vec_dot_f32(ty, row, &x[t * cols..(t + 1) * cols]);
            }
        }),
        ActFormat::Q8 => rows_by_groups(w, n, rows, ptr, planes, group, |data, t0, k, parts| {
            let refs: [&ActQ8; MAX_VECTORS] = std::array::from_fn(|i| &q8[(t0 * planes + i).min(n * planes - 1)]);
            match (planes, w.interleaved) {
                (2, true) => {
                    crate::dot_legacy::vec_dot_q8_rows_planes_interleaved(ty, data, w.row_bytes, &refs[..k], parts)
                }
                (_, true) => {
                    // One plane has no interleaved kernel: the rows back in the file's layout.
                    let rows = crate::interleave::deinterleave(ty, data, data.len() / w.row_bytes, w.row_bytes);
                    crate::dot_legacy::vec_dot_q8_rows_planes(ty, &rows, w.row_bytes, &refs[..k], planes, parts);
                }
                (_, false) => {
                    crate::dot_legacy::vec_dot_q8_rows_planes(ty, data, w.row_bytes, &refs[..k], planes, parts)
                }
            }
        }),
        ActFormat::Q8K => rows_by_groups(w, n, rows, ptr, planes, group, |data, t0, k, parts| {
            let refs: [&ActQ8K; TOKEN_GROUP] = std::array::from_fn(|i| &q8k[(t0 * planes + i).min(n * planes - 1)]);
            match (planes, w.interleaved) {
                (2, true) => {
                    crate::dot_kquant::vec_dot_q8k_rows_planes_interleaved(ty, data, w.row_bytes, &refs[..k], parts)
                }
                (2, false) => crate::dot_kquant::vec_dot_q8k_rows_planes(ty, data, w.row_bytes, &refs[..k], parts),
                (_, true) => {
                    // One plane has no interleaved kernel: the rows back in the file's layout.
                    let rows = crate::interleave::deinterleave(ty, data, data.len() / w.row_bytes, w.row_bytes);
                    crate::dot_kquant::vec_dot_q8k_rows(ty, &rows, w.row_bytes, &refs[..k], parts);
                }
                (_, false) => crate::dot_kquant::vec_dot_q8k_rows(ty, data, w.row_bytes, &refs[..k], parts),
            }
        }),
    }
}

/// 8-bit planes per activation vector: 1 = x ≈ d·q (llama.cpp's choice); 2 = x ≈ d·q + d'·q',
/// where the second plane quantizes the first one's rounding error (≈ 15-bit activations, twice
/// the multiplies; for the legacy formats with `d' = d / 256`, so both planes' integer sums are
/// added before one conversion and one scale per block).
pub fn activation_planes() -> usize {
    static PLANES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PLANES.get_or_init(|| match std::env::var("KILN_ACT").as_deref() {
        Ok("q8") => 1,
        _ => 2,
    })
}

/// Quantizes the `n` activation vectors of `x` into `acts[t * planes + p]`.
#[allow(clippy::too_many_arguments)]
fn prepare<A: Send>(
    acts: &mut Vec<A>,
    x: &[f32],
    n: usize,
    cols: usize,
    planes: usize,
    parallel: bool,
    new: fn() -> A,
    quantize: impl Fn(&mut A, &[f32]) + Sync,
    second_plane: impl Fn(&A, &mut A, &[f32]) + Sync,
) {
    if acts.len() < n * planes {
        acts.resize_with(n * planes, new);
    }
    let one = |a: &mut [A], xt: &[f32]| {
        quantize(&mut a[0], xt);
        if planes == 2 {
            let (first, second) = a.split_at_mut(1);
            second_plane(&first[0], &mut second[0], xt);
        }
    };
    // A few vectors are quicker to quantize here than to hand to the pool.
    if !parallel || n <= TOKEN_GROUP {
        for (a, xt) in acts[..n * planes].chunks_mut(planes).zip(x.chunks_exact(cols)) {
            one(a, xt);
        }
        return;
    }
    acts[..n * planes].par_chunks_mut(planes).zip(x.par_chunks_exact(cols)).for_each(|(a, xt)| one(a, xt));
}

/// Activation vectors that meet each weight row at once in most kernels (their `_x4` width).
const TOKEN_GROUP: usize = 4;

/// Activation vectors of the widest kernel call: four two-plane tokens ([`tokens_per_call`]).
const MAX_VECTORS: usize = 8;

/// Tokens whose activations meet each weight row in one kernel call of a format, with `planes`
/// 8-bit planes each. More tokens per call unpack each weight block for more of them (speculative
/// verification, batches); every token's result is the same either way.
fn tokens_per_call(format: ActFormat, planes: usize) -> usize {
    match format {
        // f32 vectors: the planes do not apply
        ActFormat::F32 => TOKEN_GROUP,
        // its kernel reads one token's 16-bit activations
        ActFormat::I16 => 1,
        // four tokens (eight vectors) where the level has the registers for them (AVX-512 VNNI)
        ActFormat::Q8 if planes == 2 => crate::dot_legacy::tokens2_per_call(),
        ActFormat::Q8 | ActFormat::Q8K => TOKEN_GROUP / planes,
    }
}

/// An output matrix shared by the row tasks of [`matmul_dot_many`], each writing its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint row ranges of each output (see `tile_rows`); the outputs outlive
// the tasks.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Rows handled per call of a rows kernel in [`rows_by_groups`] (bounds its stack buffer).
const ROW_CHUNK: usize = 64;

/// Weight rows `rows` of `w` against every group of up to `group` tokens (of `planes` activation
/// planes each): `kernel(rows_data, t0, k, parts)` gets the `k = tokens * planes` activation
/// vectors from `t0 * planes` and fills `parts[r * tokens + i]` with row `r` · token `t0 + i` (the
/// kernel combines the planes), written to `out[(t0 + i) * w.rows + r]`.
fn rows_by_groups(
    w: &QMatrix,
    n: usize,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    planes: usize,
    group: usize,
    kernel: impl Fn(&[u8], usize, usize, &mut [f32]),
) {
    assert!(rows.end <= w.rows);
    assert!(group >= 1 && group * planes <= MAX_VECTORS && group <= TOKEN_GROUP);
    let mut parts = [0f32; ROW_CHUNK * TOKEN_GROUP];
    let mut t0 = 0;
    while t0 < n {
        let g = (n - t0).min(group);
        let k = g * planes;
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + ROW_CHUNK).min(rows.end);
            let parts = &mut parts[..(r1 - r0) * g];
            kernel(&w.data[r0 * w.row_bytes..r1 * w.row_bytes], t0, k, parts);
            for (r, p) in (r0..r1).zip(parts.chunks_exact(g)) {
                for (i, &v) in p.iter().enumerate() {
                    // SAFETY: (t0 + i) < n and r < w.rows, so the index is inside the output
                    // (n * w.rows long, checked by the caller); no other task writes row r.
                    unsafe { *out.0.add((t0 + i) * w.rows + r) = v };
                }
            }
            r0 = r1;
        }
        t0 += g;
    }
}

/// Weight rows `rows` of `w` against every group of up to `group` tokens, so the tile of weight
/// rows stays in L1 while the activations stream; `kernel(row, t0, res)` fills `res[i]` = row ·
/// activation `t0 + i`, written to `out[(t0 + i) * w.rows + r]`.
fn tile_rows(
    w: &QMatrix,
    n: usize,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    group: usize,
    kernel: impl Fn(&[u8], usize, &mut [f32]),
) {
    assert!(rows.end <= w.rows);
    let mut res = [0f32; TOKEN_GROUP];
    let mut t0 = 0;
    while t0 < n {
        let g = (n - t0).min(group);
        for r in rows.clone() {
            kernel(w.row(r), t0, &mut res[..g]);
            for (i, &v) in res[..g].iter().enumerate() {
                // SAFETY: (t0 + i) < n and r < w.rows, so the index is inside the output
                // (n * w.rows long, checked by the caller); no other task writes row r.
                unsafe { *out.0.add((t0 + i) * w.rows + r) = v };
            }
        }
        t0 += g;
    }
}

/// Runs `kernel(dequantized_row, activations, results)` over row tasks (the exact path).
fn run_rows(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32], kernel: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) {
    assert_eq!(x.len(), n * w.cols, "activation length");
    assert_eq!(out.len(), n * w.rows, "output length");
    let per = rows_per_task(w.rows, n);
    let n_tasks = w.rows.div_ceil(per);
    // Each task produces its rows' results for every token ([rows_in_task][n]); scattered after.
    let results: Vec<Vec<f32>> = (0..n_tasks)
        .into_par_iter()
        .map(|task| {
            let r0 = task * per;
            let r1 = (r0 + per).min(w.rows);
            let mut row = vec![0f32; w.cols];
            let mut res = vec![0f32; (r1 - r0) * n];
            for r in r0..r1 {
                w.dequantize_row_into(r, &mut row);
                kernel(&row, x, &mut res[(r - r0) * n..(r - r0 + 1) * n]);
            }
            res
        })
        .collect();
    for (task, res) in results.iter().enumerate() {
        let r0 = task * per;
        for (i, chunk) in res.chunks_exact(n).enumerate() {
            for (t, &v) in chunk.iter().enumerate() {
                out[t * w.rows + r0 + i] = v;
            }
        }
    }
}

/// Dot product summed in f64 (exact for practical purposes: every f32 product is exact in f64).
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..4 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += *x as f64 * *y as f64;
    }
    s
}

/// Dot product in f32 with 16 independent lanes, which the compiler maps onto SIMD registers:
/// 256-bit ones where AVX2 runs (a build for baseline x86-64 gets 128-bit ones). Each lane is the
/// same chain of separate multiplies and adds at every width, so the result does not depend on it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() >= crate::isa::Isa::Avx2 {
        // SAFETY: AVX2 was detected.
        return unsafe { dot_f32_avx2(a, b) };
    }
    dot_f32_lanes(a, b)
}

/// [`dot_f32`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_lanes(a, b)
}

#[inline(always)]
fn dot_f32_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    // Pairwise reduction keeps the rounding error of the final sum small.
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + s
}

/// Attention scores of one query: `out[s] = dot_f32(q, rows[s · stride ..][..q.len()]) · scale` for
/// `s < out.len()` (the keys of one head, `stride` apart). The same arithmetic as [`dot_f32`] key by
/// key, in one loop (no call per key, the query kept in registers).
pub fn dot_f32_rows(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    if let Some(last) = out.len().checked_sub(1) {
        assert!(rows.len() >= last * stride + q.len(), "dot_f32_rows: rows too short");
    }
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() >= crate::isa::Isa::Avx2 {
        // SAFETY: AVX2 was detected.
        unsafe { dot_f32_rows_avx2(q, rows, stride, scale, out) };
        return;
    }
    dot_f32_rows_lanes(q, rows, stride, scale, out)
}

/// [`dot_f32_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f32_rows_avx2(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    dot_f32_rows_lanes(q, rows, stride, scale, out)
}

#[inline(always)]
fn dot_f32_rows_lanes(q: &[f32], rows: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    for (s, o) in out.iter_mut().enumerate() {
        *o = dot_f32_lanes(q, &rows[s * stride..s * stride + q.len()]) * scale;
    }
}

/// Attention output of one query: `o[i] += (p[s] · scale) · rows[s · stride + i]` for `s` in order
/// (a multiply, then an add, per element: the softmax-weighted values of one head, `stride` apart).
/// Head sizes 64 and 128 keep `o` in registers across the values.
pub fn axpy_f32_rows(o: &mut [f32], p: &[f32], scale: f32, rows: &[f32], stride: usize) {
    if let Some(last) = p.len().checked_sub(1) {
        assert!(rows.len() >= last * stride + o.len(), "axpy_f32_rows: rows too short");
    }
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() >= crate::isa::Isa::Avx2 {
        // SAFETY: AVX2 was detected.
        unsafe { axpy_f32_rows_avx2(o, p, scale, rows, stride) };
        return;
    }
    axpy_f32_rows_lanes(o, p, scale, rows, stride)
}

/// [`axpy_f32_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_f32_rows_avx2(o: &mut [f32], p: &[f32], scale: f32, rows: &[f32], stride: usize) {
    axpy_f32_rows_lanes(o, p, scale, rows, stride)
}

#[inline(always)]
fn axpy_f32_rows_lanes(o: &mut [f32], p: &[f32], scale: f32, rows: &[f32], stride: usize) {
    match o.len() {
        64 => axpy_rows_fixed::<64>(o, p, scale, rows, stride),
        128 => axpy_rows_fixed::<128>(o, p, scale, rows, stride),
        d => {
            for (s, &ps) in p.iter().enumerate() {
                let w = ps * scale;
                for (oi, &v) in o.iter_mut().zip(&rows[s * stride..s * stride + d]) {
                    *oi += w * v;
                }
            }
        }
    }
}

#[inline(always)]
fn axpy_rows_fixed<const D: usize>(o: &mut [f32], p: &[f32], scale: f32, rows: &[f32], stride: usize) {
    let mut acc = [0f32; D];
    acc.copy_from_slice(&o[..D]);
    for (s, &ps) in p.iter().enumerate() {
        let w = ps * scale;
        let v: &[f32; D] = rows[s * stride..s * stride + D].try_into().expect("D values");
        for i in 0..D {
            acc[i] += w * v[i];
        }
    }
    o[..D].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention helpers give, bit for bit, the per-key `dot_f32` and the element-wise
    /// multiply-then-add chain in key order, at every head size (fixed 64 / 128, generic others),
    /// with and without SIMD.
    #[test]
    fn attention_rows_match_per_key_chains_bit_for_bit() {
        let mut seed = 0x5eedu64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for d in [16usize, 40, 64, 128, 72] {
            for (n, extra) in [(1usize, 0usize), (7, 3), (33, d)] {
                let stride = d + extra;
                let q: Vec<f32> = (0..d).map(|_| next()).collect();
                let rows: Vec<f32> = (0..n * stride).map(|_| next()).collect();
                let scale = 0.125f32;
                let mut got = vec![0f32; n];
                dot_f32_rows(&q, &rows, stride, scale, &mut got);
                let mut portable = vec![0f32; n];
                dot_f32_rows_lanes(&q, &rows, stride, scale, &mut portable);
                for s in 0..n {
                    let want = dot_f32(&q, &rows[s * stride..s * stride + d]) * scale;
                    assert_eq!(got[s].to_bits(), want.to_bits(), "scores d={d} n={n} s={s}");
                    assert_eq!(portable[s].to_bits(), want.to_bits(), "portable scores d={d} n={n} s={s}");
                }
                let p: Vec<f32> = (0..n).map(|_| next().abs()).collect();
                let start: Vec<f32> = (0..d).map(|_| next()).collect();
                let mut want = start.clone();
                for (s, &ps) in p.iter().enumerate() {
                    let w = ps * scale;
                    for (i, o) in want.iter_mut().enumerate() {
                        *o += w * rows[s * stride + i];
                    }
                }
                let mut o = start.clone();
                axpy_f32_rows(&mut o, &p, scale, &rows, stride);
                let mut portable = start.clone();
                axpy_f32_rows_lanes(&mut portable, &p, scale, &rows, stride);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o), bits(&want), "values d={d} n={n}");
                assert_eq!(bits(&portable), bits(&want), "portable values d={d} n={n}");
            }
        }
    }

    #[test]
    fn f32_matrix_products_match_naive() {
        let (rows, cols, n) = (7, 48, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = QMatrix::new(GgmlType::F32, &bytes, rows, cols).unwrap();
        let mut exact = vec![0f32; n * rows];
        let mut fast = vec![0f32; n * rows];
        matmul_exact(&m, &x, n, &mut exact);
        matmul(&m, &x, n, &mut fast);
        for t in 0..n {
            for r in 0..rows {
                let want: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                assert_eq!(exact[t * rows + r], want as f32);
                assert!((fast[t * rows + r] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
        }
    }

    /// Row ranges through `matmul_dot_rows` give `matmul_dot_many`'s results for those rows, bit
    /// for bit: every activation format (Q8, Q8K, I16, F32), 1 and 3 tokens, ranges that end in
    /// the middle, at the last row, and a single row.
    #[test]
    fn row_ranges_match_the_whole_product_bit_for_bit() {
        let (cols, n_rows) = (512, 70);
        let wf: Vec<f32> = (0..n_rows * cols).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let mut q8_0 = vec![0u8; n_rows * cols / 32 * crate::q8_0::BLOCK_BYTES];
        crate::q8_0::quantize_row(&wf, &mut q8_0);
        let mut q4_k = Vec::new();
        crate::q4_k::quantize_row(&wf, &mut q4_k);
        let mut q4_0 = vec![0u8; n_rows * cols / 32 * 18];
        crate::q4_0::quantize_row(&wf, &mut q4_0);
        let f32_bytes: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mats = [
            QMatrix::new(GgmlType::Q8_0, &q8_0, n_rows, cols).unwrap(),
            QMatrix::new(GgmlType::Q4_K, &q4_k, n_rows, cols).unwrap(),
            QMatrix::new(GgmlType::Q4_0, &q4_0, n_rows, cols).unwrap(),
            QMatrix::new(GgmlType::F32, &f32_bytes, n_rows, cols).unwrap(),
        ];
        for n in [1, 3] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let refs: Vec<&QMatrix> = mats.iter().collect();
            let mut acts = DotActivations::default();
            acts.quantize(&refs, &x, n, false);
            for m in &mats {
                let mut whole = vec![0f32; n * n_rows];
                matmul_dot(m, &x, n, &mut whole);
                for rows in [0..16, 16..69, 32..70, 69..70] {
                    let mut part = vec![0f32; n * rows.len()];
                    matmul_dot_rows(m, &acts, &x, rows.clone(), &mut part);
                    for t in 0..n {
                        let want: Vec<u32> = whole[t * n_rows..][rows.clone()].iter().map(|v| v.to_bits()).collect();
                        let got: Vec<u32> = part[t * rows.len()..][..rows.len()].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{:?}, {n} tokens, rows {rows:?}, token {t}", m.ty);
                    }
                }
            }
        }
    }

    /// Every token of a generation product of n = 1..=9 tokens gets the bits a product of that token
    /// alone gives it, across the kernels' token groups (four two-plane tokens per call with
    /// AVX-512, two with AVX2) and their remainders: Q4_1 and Q4_0 rows in the file's layout, Q4_0
    /// interleaved (two whole groups and a tail of rows), Q8_0 and Q4_K, one and two activation
    /// planes. Runs at the active level and, in child processes (`KILN_ISA`), at every lower one.
    #[test]
    fn tokens_together_match_tokens_alone_bit_for_bit() {
        const NAME: &str = "matmul::tests::tokens_together_match_tokens_alone_bit_for_bit";
        if std::env::var_os("KILN_ISA").is_none() {
            let exe = std::env::current_exe().unwrap();
            for lower in crate::isa::available_isas().into_iter().filter(|&i| i < crate::isa::isa()) {
                let run = std::process::Command::new(&exe)
                    .args(["--exact", NAME, "--test-threads", "1"])
                    .env("KILN_ISA", lower.name())
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&run.stdout);
                assert!(run.status.success() && stdout.contains("1 passed"), "KILN_ISA={}: {stdout}", lower.name());
            }
        }
        let (rows, cols, cols_k) = (37, 576, 512);
        let wf: Vec<f32> = (0..rows * cols).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let blocks = rows * cols / 32;
        let (mut q4_0, mut q4_1, mut q8_0) = (vec![0u8; blocks * 18], vec![0u8; blocks * 20], vec![0u8; blocks * 34]);
        crate::q4_0::quantize_row(&wf, &mut q4_0);
        crate::q4_1::quantize_row(&wf, &mut q4_1);
        crate::q8_0::quantize_row(&wf, &mut q8_0);
        let mut woven = q4_0.clone();
        crate::interleave::interleave(GgmlType::Q4_0, &mut woven, rows, q4_0.len() / rows);
        let mut q4_k = Vec::new();
        crate::q4_k::quantize_row(&wf[..rows * cols_k], &mut q4_k);
        let mats = [
            QMatrix::new(GgmlType::Q4_1, &q4_1, rows, cols).unwrap(),
            QMatrix::new(GgmlType::Q4_0, &q4_0, rows, cols).unwrap(),
            QMatrix::new_interleaved(GgmlType::Q4_0, &woven, rows, cols).unwrap(),
            QMatrix::new(GgmlType::Q8_0, &q8_0, rows, cols).unwrap(),
            QMatrix::new(GgmlType::Q4_K, &q4_k, rows, cols_k).unwrap(),
        ];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for m in mats {
            for planes in [1, 2] {
                let m = m.with_act_planes(planes);
                let x: Vec<f32> = (0..9 * m.cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                let alone: Vec<Vec<u32>> = x
                    .chunks_exact(m.cols)
                    .map(|xt| {
                        let mut out = vec![0f32; rows];
                        matmul_dot(&m, xt, 1, &mut out);
                        bits(&out)
                    })
                    .collect();
                for n in 1..=9 {
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_dot(&m, &x[..n * m.cols], n, &mut out);
                    for (t, want) in alone.iter().enumerate().take(n) {
                        assert_eq!(
                            bits(&out[t * rows..(t + 1) * rows]),
                            *want,
                            "{:?}{} {planes} planes at {}: token {t} of {n}",
                            m.ty,
                            if m.is_interleaved() { " interleaved" } else { "" },
                            crate::isa::active_isa()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_kernels_match_the_one_row_kernels_bit_for_bit() {
        let cols = 512;
        let n_rows = 70; // more than one ROW_CHUNK
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let wf: Vec<f32> = (0..n_rows * cols).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let mut q8_0 = vec![0u8; n_rows * cols / 32 * crate::q8_0::BLOCK_BYTES];
        crate::q8_0::quantize_row(&wf, &mut q8_0);
        let mut q4_k = Vec::new();
        crate::q4_k::quantize_row(&wf, &mut q4_k);
        let acts: Vec<ActQ8> = x
            .chunks_exact(cols)
            .map(|xt| {
                let mut a = ActQ8::new();
                a.quantize(xt);
                a
            })
            .collect();
        let acts_k: Vec<ActQ8K> = x
            .chunks_exact(cols)
            .map(|xt| {
                let mut a = ActQ8K::new();
                a.quantize(xt);
                a
            })
            .collect();
        for k in 1..=3 {
            let refs: Vec<&ActQ8> = acts[..k].iter().collect();
            let rb = q8_0.len() / n_rows;
            let mut rows_out = vec![0f32; n_rows * k];
            crate::dot_legacy::vec_dot_q8_rows(GgmlType::Q8_0, &q8_0, rb, &refs, &mut rows_out);
            for (r, got) in rows_out.chunks_exact(k).enumerate() {
                let mut want = vec![0f32; k];
                crate::dot_legacy::vec_dot_q8_x4(GgmlType::Q8_0, &q8_0[r * rb..(r + 1) * rb], &refs, &mut want);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            let refs: Vec<&ActQ8K> = acts_k[..k].iter().collect();
            let rb = q4_k.len() / n_rows;
            crate::dot_kquant::vec_dot_q8k_rows(GgmlType::Q4_K, &q4_k, rb, &refs, &mut rows_out);
            for (r, got) in rows_out.chunks_exact(k).enumerate() {
                let mut want = vec![0f32; k];
                crate::dot_kquant::vec_dot_q8k_x4(GgmlType::Q4_K, &q4_k[r * rb..(r + 1) * rb], &refs, &mut want);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn fused_products_equal_separate_ones_bit_for_bit() {
        // Mixed formats (as in Q4_K_M files: q/k in Q4_K, v in Q6_K...), both regimes.
        let cols = 256;
        let wf: Vec<f32> = (0..40 * cols).map(|i| ((i * 29 % 97) as f32 - 48.0) / 40.0).collect();
        let mut q8_0 = vec![0u8; 40 * cols / 32 * crate::q8_0::BLOCK_BYTES];
        crate::q8_0::quantize_row(&wf, &mut q8_0);
        let mut q4_k = Vec::new();
        crate::q4_k::quantize_row(&wf[..24 * cols], &mut q4_k);
        let f32s: Vec<u8> = wf[..9 * cols].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mats = [
            QMatrix::new(GgmlType::Q8_0, &q8_0, 40, cols).unwrap(),
            QMatrix::new(GgmlType::Q4_K, &q4_k, 24, cols).unwrap(),
            QMatrix::new(GgmlType::F32, &f32s, 9, cols).unwrap(),
        ];
        for n in [1usize, 3, 5, crate::gemm::MIN_TOKENS + 3] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 41 % 83) as f32 - 41.0) / 20.0).collect();
            let mut separate: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows]).collect();
            for (m, out) in mats.iter().zip(separate.iter_mut()) {
                matmul(m, &x, n, out);
            }
            let mut fused: Vec<Vec<f32>> = mats.iter().map(|m| vec![f32::NAN; n * m.rows]).collect();
            let mut jobs: Vec<(&QMatrix, &mut [f32])> =
                mats.iter().zip(fused.iter_mut()).map(|(m, o)| (m, o.as_mut_slice())).collect();
            matmul_many(&mut jobs, &x, n);
            for (a, b) in separate.iter().zip(&fused) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(b), "n={n}");
            }
        }
    }

    #[test]
    fn rejects_unsupported_and_bad_geometry() {
        assert_eq!(
            QMatrix::new(GgmlType::IQ2_XXS, &[], 0, 256).unwrap_err(),
            QuantError::Unsupported(GgmlType::IQ2_XXS)
        );
        assert!(QMatrix::new(GgmlType::Q4_0, &[0; 18], 1, 31).is_err());
        assert!(QMatrix::new(GgmlType::Q4_0, &[0; 17], 1, 32).is_err());
    }
}
