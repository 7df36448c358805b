//! Weights on the GPU and the forward pass over them (the semantics of
//! `crates/model/src/forward.rs`, default path).

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys as blas_sys;
use std::ffi::c_void;

use cudarc::driver::{sys, CudaFunction, CudaGraph, CudaSlice, DevicePtr};
use kiln_gguf::GgmlType;
use kiln_model::arch::{FfnActivation, RopePairing};
use kiln_model::{Logits, ModelConfig, ModelError, ModelWeights, RopeScaling};
use kiln_quant::matmul::QMatrix;

use crate::{Device, MATVEC_MAX_TOKENS};

/// Tokens per forward chunk: longer inputs run in pieces of this many (fixed buffers).
const UBATCH: usize = 512;
/// Threads of the matrix-vector kernel's blocks (one warp per output row).
const MATVEC_THREADS: u32 = 128;
const ATTN_THREADS: u32 = 256;
/// Rows each warp of the matrix-vector kernel computes (`MV_ROWS` in kernels.cu).
const MATVEC_ROWS_PER_WARP: usize = 1;
/// Threads of the RMSNorm blocks (one block per row).
const NORM_THREADS: u32 = 1024;

/// One kernel argument, by value.
#[derive(Clone, Copy)]
enum A {
    /// A device pointer.
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    D(f64),
}

fn dev_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("CUDA: {e}")
}

/// What the fast mat-vec kernel does with adjacent output-row pairs (`EPI_*` in kernels.cu).
#[derive(Clone, Copy)]
enum Epi {
    /// y (+)= W x.
    Plain,
    /// Rows interleaved (gate, up): y[i] = silu(gate_i) · up_i.
    Swiglu,
    /// Rows [q | k | v]: RoPE on q and k, k and v stored into layer `.0`'s caches.
    RopeKv(usize),
}

/// A weight matrix on the device in its stored format; its output lands at column `out_off` of
/// the destination rows (several matrices can fill one row: q|k|v, gate|up).
#[derive(Clone, Copy, Debug)]
struct Mat {
    ty: GgmlType,
    ptr: u64,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    out_off: usize,
    /// Rows stored in the repacked layout of Q4_0 / Q8_0 (see [`repack8`]).
    repacked: bool,
}

struct Layer {
    attn_norm: u64,
    ffn_norm: u64,
    /// q, k, v (one fused matrix when the three share a type).
    qkv: Vec<Mat>,
    wo: Mat,
    /// gate, up (fused when they share a type, rows then interleaved: gate 0, up 0, gate 1, ...).
    gate_up: Vec<Mat>,
    /// Whether `gate_up` is one matrix of interleaved rows (its products come out as
    /// [g0 u0 g1 u1 ...], so one warp computing two adjacent rows can apply SwiGLU itself).
    gu_interleaved: bool,
    down: Mat,
}

/// A model's weights uploaded to one GPU.
pub struct CudaModel {
    pub dev: Device,
    pub cfg: ModelConfig,
    token_embd: Mat,
    output: Mat,
    output_norm: u64,
    layers: Vec<Layer>,
    rope_freqs: Option<Vec<f32>>,
    /// Weight bytes read per generated token (as `ModelWeights::bytes_per_token`).
    pub bytes_per_token: usize,
    /// Bytes uploaded.
    pub device_bytes: usize,
    /// Largest matrix in elements (the f16 scratch tile of the batched path).
    max_elems: usize,
    /// Whether some matrix is F16 or BF16 (its batched products take two activation planes).
    float_weights: bool,
    _owners: Vec<CudaSlice<u8>>,
}

impl CudaModel {
    /// Uploads `w` to `dev`. Fails with one line when a tensor type or shape is not supported.
    pub fn upload(dev: Device, w: &ModelWeights) -> Result<CudaModel> {
        let cfg = w.cfg.clone();
        let missing = missing_features(w);
        if !missing.is_empty() {
            bail!(
                "the CUDA backend cannot run this {} model yet: it lacks {} (use the CPU backend)",
                cfg.arch.name,
                missing.join(", ")
            );
        }
        for (what, v) in [("embedding", cfg.n_embd), ("head size", cfg.head_dim), ("feed-forward", cfg.n_ff)] {
            if v % 8 != 0 {
                bail!("the CUDA backend needs the {what} length to be a multiple of 8 (it is {v})");
            }
        }
        let mut owners = Vec::new();
        let mut device_bytes = 0usize;
        let mut max_elems = 0usize;
        let mut float_weights = false;
        // `interleave`: the parts' rows alternate (row r of each part in turn; parts of one type,
        // width and row count), else they follow one another.
        let mut upload = |parts: &[&QMatrix], interleave: bool| -> Result<Vec<Mat>> {
            let mut bytes = Vec::new();
            let mut mats = Vec::new();
            let mut out_off = 0;
            let mut layouts = Vec::new();
            for m in parts {
                dev.kernels.for_type(m.ty)?;
                if m.is_interleaved() {
                    // The CPU's eight-row layout (a private copy made for the CPU kernels).
                    bail!("the CUDA backend reads weights in the file's layout: load the model without the CPU's interleaved copy");
                }
                float_weights |= matches!(m.ty, GgmlType::F16 | GgmlType::BF16);
                let row_bytes = m.data.len() / m.rows;
                let block = match m.ty {
                    GgmlType::Q4_0 => 18,
                    GgmlType::Q8_0 => 34,
                    _ => 0,
                };
                let repacked =
                    dev.kernels.fast && block != 0 && m.cols.is_multiple_of(256) && row_bytes == m.cols / 32 * block;
                let ptr = if interleave { out_off as u64 * row_bytes as u64 } else { bytes.len() as u64 };
                mats.push(Mat { ty: m.ty, ptr, rows: m.rows, cols: m.cols, row_bytes, out_off, repacked });
                out_off += m.rows;
                layouts.push((row_bytes, block, repacked));
                if !interleave {
                    if repacked {
                        repack8(m.data, block, &mut bytes);
                    } else {
                        bytes.extend_from_slice(m.data);
                    }
                }
            }
            if interleave {
                // Repacking works within a row (rows hold whole 8-block groups), so rows can be
                // regrouped one at a time.
                for r in 0..parts[0].rows {
                    for (m, &(rb, block, repacked)) in parts.iter().zip(&layouts) {
                        let row = &m.data[r * rb..(r + 1) * rb];
                        if repacked {
                            repack8(row, block, &mut bytes);
                        } else {
                            bytes.extend_from_slice(row);
                        }
                    }
                }
            }
            // The f16 scratch tile must hold these matrices fused.
            max_elems = max_elems.max(parts.iter().map(|m| m.rows * m.cols).sum());
            // Pad so that 16-byte vector loads past the last row's end stay inside the buffer.
            bytes.resize(bytes.len() + 16, 0);
            let buf = dev.stream.clone_htod(&bytes).map_err(dev_err)?;
            let (base, _) = buf.device_ptr(&dev.stream);
            for m in &mut mats {
                m.ptr += base;
            }
            device_bytes += bytes.len();
            owners.push(buf);
            Ok(mats)
        };
        // Fuses matrices that share a type and width into one (their rows concatenated in one
        // buffer, so one kernel computes them all), else one each.
        // `interleave`: fused rows alternate between the parts (they must then have as many rows).
        let mut group = |parts: &[&QMatrix], interleave: bool| -> Result<Vec<Mat>> {
            if parts.iter().all(|m| m.ty == parts[0].ty && m.cols == parts[0].cols) {
                let interleave = interleave && parts.iter().all(|m| m.rows == parts[0].rows);
                let mats = upload(parts, interleave)?;
                let rows = mats.iter().map(|m| m.rows).sum();
                Ok(vec![Mat { rows, ..mats[0] }])
            } else {
                let mut v = Vec::new();
                let mut off = 0;
                for m in parts {
                    let mut one = upload(&[m], false)?;
                    one[0].out_off = off;
                    off += m.rows;
                    v.append(&mut one);
                }
                Ok(v)
            }
        };
        let token_embd = group(&[&w.token_embd], false)?[0];
        let output = if w.output_is_tied { token_embd } else { group(&[&w.output], false)?[0] };
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut norms: Vec<f32> = Vec::new();
        for lw in &w.layers {
            let gate_up = group(&[&lw.w_gate, &lw.w_up], true)?;
            layers.push(Layer {
                attn_norm: norms.len() as u64,
                ffn_norm: 0,
                qkv: group(&[&lw.wq, &lw.wk, &lw.wv], false)?,
                wo: group(&[&lw.wo], false)?[0],
                gu_interleaved: gate_up.len() == 1,
                gate_up,
                down: group(&[&lw.w_down], false)?[0],
            });
            norms.extend_from_slice(&lw.attn_norm);
            let l = layers.last_mut().expect("just pushed");
            l.ffn_norm = norms.len() as u64;
            norms.extend_from_slice(&lw.ffn_norm);
        }
        let out_norm_off = norms.len() as u64;
        norms.extend_from_slice(&w.output_norm);
        let norm_bytes: Vec<u8> = norms.iter().flat_map(|v| v.to_le_bytes()).collect();
        let norm_buf = dev.stream.clone_htod(&norm_bytes).map_err(dev_err)?;
        let (nbase, _) = norm_buf.device_ptr(&dev.stream);
        for l in &mut layers {
            l.attn_norm = nbase + 4 * l.attn_norm;
            l.ffn_norm = nbase + 4 * l.ffn_norm;
        }
        let output_norm = nbase + 4 * out_norm_off;
        device_bytes += norm_bytes.len();
        owners.push(norm_buf);
        dev.stream.synchronize().map_err(dev_err)?;
        Ok(CudaModel {
            cfg,
            token_embd,
            output,
            output_norm,
            layers,
            rope_freqs: w.rope_freqs.clone(),
            bytes_per_token: w.bytes_per_token(),
            device_bytes,
            max_elems,
            float_weights,
            dev,
            _owners: owners,
        })
    }
}

/// One sequence on the GPU: its KV cache, work buffers and the captured decode graph.
pub struct CudaSession<'m> {
    m: &'m CudaModel,
    pub n_ctx: usize,
    /// Positions filled so far.
    pub len: usize,
    ub: usize,
    // Device buffers and their raw addresses (kernels take plain pointers).
    bufs: Vec<CudaSlice<u8>>,
    meta: CudaSlice<i32>,
    meta_ptr: u64,
    kc: Vec<u64>,
    vc: Vec<u64>,
    cos_sin: u64,
    x: u64,
    h: u64,
    qkv: u64,
    attn: u64,
    gu: u64,
    ffo: u64,
    logits: CudaSlice<f32>,
    logits_ptr: u64,
    w16: u64,
    x16_hi: u64,
    x16_lo: u64,
    attn_smem: u32,
    graph: Option<CudaGraph>,
    eager_decode_steps: usize,
    /// Whether one-token steps replay a captured CUDA graph (`KILN_CUDA_GRAPH=0` turns it off).
    pub use_graph: bool,
}

impl<'m> CudaSession<'m> {
    pub fn new(m: &'m CudaModel, n_ctx: usize) -> Result<CudaSession<'m>> {
        let cfg = &m.cfg;
        let n_ctx = n_ctx.max(1);
        let s = &m.dev.stream;
        let (e, qd, kvd, ff, nv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
        let ub = UBATCH.min(n_ctx);
        let qkv_w = qd + 2 * kvd;
        if cfg.head_dim / 4 > ATTN_THREADS as usize {
            bail!("head size {} is too large for the CUDA attention kernel", cfg.head_dim);
        }
        let attn_smem = ((4 * ATTN_THREADS as usize + cfg.head_dim + n_ctx) * 4) as u32;
        // Hopper and Ampere allow up to 227 KiB of dynamic shared memory per block (opt-in past 48).
        const SMEM_MAX: u32 = 227 * 1024;
        if attn_smem > SMEM_MAX {
            bail!(
                "context {n_ctx} is too long for the CUDA attention kernel (at most {} positions)",
                SMEM_MAX as usize / 4 - cfg.head_dim - 4 * ATTN_THREADS as usize
            );
        }
        if attn_smem > 48 * 1024 {
            for f in [&m.dev.kernels.attention, &m.dev.kernels.attention_b8] {
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    attn_smem as i32,
                )
                .map_err(dev_err)?;
            }
        }
        let mut bufs = Vec::new();
        let mut alloc = |bytes: usize| -> Result<u64> {
            let b = s.alloc_zeros::<u8>(bytes.max(16)).map_err(dev_err)?;
            let (p, _) = b.device_ptr(s);
            bufs.push(b);
            Ok(p)
        };
        let mut kc = Vec::new();
        let mut vc = Vec::new();
        for _ in 0..cfg.n_layer {
            kc.push(alloc(n_ctx * kvd * 4)?);
            vc.push(alloc(n_ctx * kvd * 4)?);
        }
        let x = alloc(ub * e * 4)?;
        let h = alloc(ub * e * 4)?;
        let qkv = alloc(ub * qkv_w * 4)?;
        let attn = alloc(ub * qd * 4)?;
        let gu = alloc(ub * 2 * ff * 4)?;
        let ffo = alloc(ub * ff * 4)?;
        let widest = e.max(qd).max(ff);
        let batched = m.dev.blas.is_some() && ub > MATVEC_MAX_TOKENS;
        let (w16, x16_hi, x16_lo) = if batched {
            (alloc(m.max_elems * 2)?, alloc(ub * widest * 2)?, alloc(ub * widest * 2)?)
        } else {
            (0, 0, 0)
        };
        let cs = rope_table(cfg, m.rope_freqs.as_deref(), n_ctx);
        let cs_bytes: Vec<u8> = cs.iter().flat_map(|v| v.to_le_bytes()).collect();
        let cs_buf = s.clone_htod(&cs_bytes).map_err(dev_err)?;
        let (cos_sin, _) = cs_buf.device_ptr(s);
        bufs.push(cs_buf);
        let meta = s.alloc_zeros::<i32>(1 + ub).map_err(dev_err)?;
        let (meta_ptr, _) = meta.device_ptr(s);
        let logits = s.alloc_zeros::<f32>(ub * nv).map_err(dev_err)?;
        let (logits_ptr, _) = logits.device_ptr(s);
        let use_graph = std::env::var("KILN_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true);
        Ok(CudaSession {
            m,
            n_ctx,
            len: 0,
            ub,
            bufs,
            meta,
            meta_ptr,
            kc,
            vc,
            cos_sin,
            x,
            h,
            qkv,
            attn,
            gu,
            ffo,
            logits,
            logits_ptr,
            w16,
            x16_hi,
            x16_lo,
            attn_smem,
            graph: None,
            eager_decode_steps: 0,
            use_graph,
        })
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Bytes of device memory this session holds (KV cache and work buffers).
    pub fn device_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum::<usize>() + self.logits.len() * 4
    }

    /// Runs `tokens` at positions `len..`, appends them to the KV cache, returns logits
    /// `[n_out, n_vocab]` (as `kiln_model::forward`).
    pub fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        let cfg = &self.m.cfg;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if self.len + tokens.len() > self.n_ctx {
            return Err(ModelError::ContextFull { needed: self.len + tokens.len(), n_ctx: self.n_ctx }.into());
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            return Err(ModelError::TokenOutOfRange { id, n_vocab: cfg.n_vocab }.into());
        }
        let nv = cfg.n_vocab;
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.ub);
        for (ci, chunk) in tokens.chunks(self.ub).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            let chunk_want = if want == Logits::All { Some(Logits::All) } else { last_chunk.then_some(Logits::Last) };
            let mut meta = Vec::with_capacity(1 + chunk.len());
            meta.push(self.len as i32);
            meta.extend(chunk.iter().map(|&t| t as i32));
            let s = self.m.dev.stream.clone();
            s.memcpy_htod(&meta, &mut self.meta.slice_mut(0..meta.len())).map_err(dev_err)?;
            let n = chunk.len();
            let decode = n == 1 && chunk_want == Some(Logits::Last);
            // The first decode step runs eagerly: kernels load lazily at their first launch, which
            // is not allowed inside a capture. From the second step on, the captured graph replays.
            if decode && self.use_graph && self.graph.is_none() && self.eager_decode_steps > 0 {
                match self.capture() {
                    Ok(g) => self.graph = Some(g),
                    Err(e) => {
                        eprintln!("kiln: CUDA graph capture failed ({e}); launching kernels one by one");
                        self.use_graph = false;
                    }
                }
            }
            match &self.graph {
                Some(g) if decode && self.use_graph => g.launch().map_err(dev_err)?,
                _ => {
                    self.run(n, chunk_want)?;
                    self.eager_decode_steps += decode as usize;
                }
            }
            self.len += n;
            if let Some(w) = chunk_want {
                let rows = if w == Logits::All { n } else { 1 };
                let mut host = vec![0f32; rows * nv];
                s.memcpy_dtoh(&self.logits.slice(0..rows * nv), &mut host).map_err(dev_err)?;
                out.extend_from_slice(&host);
            }
        }
        self.m.dev.stream.synchronize().map_err(dev_err)?;
        Ok(out)
    }

    /// Records one decode step (one token, last logits) as a CUDA graph.
    fn capture(&self) -> Result<CudaGraph> {
        let s = &self.m.dev.stream;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(dev_err)?;
        let r = self.run(1, Some(Logits::Last));
        // End the capture whatever happened, so the stream leaves capture mode.
        let g = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(dev_err);
        r?;
        g?.ok_or_else(|| anyhow!("CUDA: graph capture recorded nothing"))
    }

    /// Enqueues one chunk of `n` tokens (ids and start position already in `meta`).
    fn run(&self, n: usize, want: Option<Logits>) -> Result<()> {
        let m = self.m;
        let cfg = &m.cfg;
        let k = &m.dev.kernels;
        let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let qkv_w = qd + 2 * kvd;
        let ni = n as i32;
        // Embedding rows.
        {
            let te = &m.token_embd;
            let f = &k.for_layout(te.ty, te.repacked)?.get_rows;
            let args =
                [A::P(te.ptr), A::L(te.row_bytes as i64), A::P(self.meta_ptr + 4), A::P(self.x), A::I(te.cols as i32)];
            self.launch(f, (n as u32, 1, 1), 128, 0, &args)?;
        }
        let half = (cfg.n_rot / 2) as i32;
        let (nh, nkv, d) = (cfg.n_head as i32, cfg.n_head_kv as i32, cfg.head_dim as i32);
        let scale = cfg.attention_scale as f32;
        for (l, lw) in m.layers.iter().enumerate() {
            let (src, norm, planes) = self.normed_input(&lw.qkv, lw.attn_norm, self.x, n)?;
            let (qkv_wi, kvdi) = (qkv_w as i32, kvd as i32);
            if let Some(mat) = self.pair_epilogue(&lw.qkv, n) {
                // RoPE and the KV-cache store in the q|k|v kernel's epilogue.
                self.matvec(mat, src, norm, n, self.qkv, qkv_w, false, Epi::RopeKv(l))?;
            } else {
                for mat in &lw.qkv {
                    self.matmul(mat, src, norm, planes, n, self.qkv, qkv_w, false)?;
                }
                let args = [
                    A::P(self.qkv),
                    A::I(qkv_wi),
                    A::P(self.cos_sin),
                    A::P(self.meta_ptr),
                    A::P(self.kc[l]),
                    A::P(self.vc[l]),
                    A::I(nh),
                    A::I(nkv),
                    A::I(d),
                    A::I(half),
                    A::I(kvdi),
                ];
                let rope_blocks = (qd / 2).max(kvd).div_ceil(256) as u32;
                self.launch(&k.rope_kv, (n as u32, rope_blocks, 1), 256, 0, &args)?;
            }
            let args = [
                A::P(self.qkv),
                A::I(qkv_wi),
                A::P(self.kc[l]),
                A::P(self.vc[l]),
                A::P(self.attn),
                A::P(self.meta_ptr),
                A::I(nh),
                A::I(nkv),
                A::I(d),
                A::I(kvdi),
                A::F(scale),
            ];
            let tiled = k.attention_tiled.iter().find(|(hd, _, _)| *hd == cfg.head_dim);
            let (hi, lo) = self.planes_out(n);
            let attn_planes = match tiled {
                Some((_, f, smem)) if self.batched(n) && cfg.n_head.is_multiple_of(cfg.n_head_kv) => {
                    // Prompts: the tiled kernel (K/V tiles shared by a block's query rows).
                    let args = [
                        A::P(self.qkv),
                        A::I(qkv_wi),
                        A::P(self.kc[l]),
                        A::P(self.vc[l]),
                        A::P(self.attn),
                        A::P(self.meta_ptr),
                        A::I(ni),
                        A::I(nh),
                        A::I(nkv),
                        A::I(kvdi),
                        A::F(scale),
                        A::P(hi),
                        A::P(lo),
                    ];
                    let tiles = (n * (cfg.n_head / cfg.n_head_kv)).div_ceil(64) as u32;
                    self.launch(f, (tiles * cfg.n_head_kv as u32, 1, 1), 256, *smem, &args)?;
                    hi != 0
                }
                _ => {
                    // One-token steps: more loads in flight per thread (few blocks, latency-bound);
                    // small batches keep the leaner kernel's occupancy.
                    let attn = if n == 1 { &k.attention_b8 } else { &k.attention };
                    self.launch(attn, (cfg.n_head as u32, n as u32, 1), ATTN_THREADS, self.attn_smem, &args)?;
                    false
                }
            };
            self.matmul(&lw.wo, self.attn, None, attn_planes, n, self.x, e, true)?;
            let (src, norm, planes) = self.normed_input(&lw.gate_up, lw.ffn_norm, self.x, n)?;
            match self.pair_epilogue(&lw.gate_up, n).filter(|_| lw.gu_interleaved) {
                // SwiGLU in the gate|up kernel's epilogue, straight into the down projection's input.
                Some(mat) => self.matvec(mat, src, norm, n, self.ffo, ff, false, Epi::Swiglu)?,
                None => {
                    for mat in &lw.gate_up {
                        self.matmul(mat, src, norm, planes, n, self.gu, 2 * ff, false)?;
                    }
                    let inter = lw.gu_interleaved as i32;
                    let args =
                        [A::P(self.gu), A::P(self.ffo), A::I(ff as i32), A::I(ni), A::I(inter), A::P(hi), A::P(lo)];
                    self.launch(&k.swiglu, ((ff as u32).div_ceil(256), n as u32, 1), 256, 0, &args)?;
                }
            }
            self.matmul(&lw.down, self.ffo, None, hi != 0, n, self.x, e, true)?;
        }
        match want {
            None => {}
            Some(Logits::Last) => {
                let last = self.x + ((n - 1) * e * 4) as u64;
                let (src, norm, planes) = self.normed_input(std::slice::from_ref(&m.output), m.output_norm, last, 1)?;
                self.matmul(&m.output, src, norm, planes, 1, self.logits_ptr, cfg.n_vocab, false)?;
            }
            Some(Logits::All) => {
                let (src, norm, planes) =
                    self.normed_input(std::slice::from_ref(&m.output), m.output_norm, self.x, n)?;
                self.matmul(&m.output, src, norm, planes, n, self.logits_ptr, cfg.n_vocab, false)?;
            }
        }
        Ok(())
    }

    fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &[A]) -> Result<()> {
        let mut vals = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                A::P(v) => v as *mut u64 as *mut c_void,
                A::I(v) => v as *mut i32 as *mut c_void,
                A::L(v) => v as *mut i64 as *mut c_void,
                A::F(v) => v as *mut f32 as *mut c_void,
                A::D(v) => v as *mut f64 as *mut c_void,
            })
            .collect();
        // SAFETY: `ptrs` point into `vals`, alive across the call, one per kernel parameter in the
        // kernel's declared order and width; every pointer value is a live device allocation of
        // this session or model, sized for the launch geometry the caller computed.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                self.m.dev.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(dev_err)
    }

    /// Where producers of `n` tokens' activations write their f16 planes too: the batched path's
    /// (hi, lo) buffers, else (0, 0) (not written).
    fn planes_out(&self, n: usize) -> (u64, u64) {
        if self.batched(n) {
            (self.x16_hi, if self.m.float_weights { self.x16_lo } else { 0 })
        } else {
            (0, 0)
        }
    }

    /// The input of matrices `mats` that take RMSNorm(`x`) · `g` over `n` tokens: (`x`, Some(`g`),
    /// false) when every one of them has a fast mat-vec kernel here (the norm is fused into its
    /// prologue), else the norm kernel runs into `h` and the input is (`h`, None, whether its f16
    /// planes were written as well).
    fn normed_input(&self, mats: &[Mat], g: u64, x: u64, n: usize) -> Result<(u64, Option<u64>, bool)> {
        if !self.batched(n) && mats.iter().all(|m| self.fast_kernel(m).is_some()) {
            return Ok((x, Some(g), false));
        }
        let (hi, lo) = self.planes_out(n);
        let cfg = &self.m.cfg;
        let args = [A::P(x), A::P(g), A::P(self.h), A::I(cfg.n_embd as i32), A::D(cfg.rms_eps), A::P(hi), A::P(lo)];
        // Many rows: smaller blocks, all resident at once (ncu, pp512: 11 us per call with 1024
        // threads a row); a few rows (decode, non-fused norms): 1024 threads share each row.
        let threads = if n > MATVEC_MAX_TOKENS { 256 } else { NORM_THREADS };
        self.launch(&self.m.dev.kernels.rms_norm, (n as u32, 1, 1), threads, 0, &args)?;
        Ok((self.h, None, hi != 0))
    }

    /// The fast mat-vec kernel for `mat` and its dynamic shared memory, when it has one and its
    /// staged activations fit the default 48 KiB.
    fn fast_kernel(&self, mat: &Mat) -> Option<(&CudaFunction, u32)> {
        let k = &self.m.dev.kernels;
        let f = k.for_layout(mat.ty, mat.repacked).ok().filter(|_| k.fast)?.matvec_fast.as_ref()?;
        let smem = mat.cols.div_ceil(1024) * (4096 + 256);
        (mat.cols.is_multiple_of(32) && smem <= 48 * 1024).then_some((f, smem as u32))
    }

    /// Whether `n` tokens go through dequantize + cuBLAS rather than the matrix-vector kernels.
    fn batched(&self, n: usize) -> bool {
        n > MATVEC_MAX_TOKENS && self.w16 != 0
    }

    /// The one matrix of `mats` when the fast kernel can apply a pair epilogue to it on `n`
    /// tokens (not batched, an even number of rows per warp).
    fn pair_epilogue<'a>(&self, mats: &'a [Mat], n: usize) -> Option<&'a Mat> {
        let k = &self.m.dev.kernels;
        match mats {
            [mat] if !self.batched(n) && k.mvf_rows.is_multiple_of(2) && self.fast_kernel(mat).is_some() => Some(mat),
            _ => None,
        }
    }

    /// The matrix-vector kernel over `n` tokens whose inputs are rows of `x` (`norm`: the input is
    /// RMSNorm(x) · norm, computed in the fast kernel's prologue; `epi`: see [`Epi`]).
    #[allow(clippy::too_many_arguments)]
    fn matvec(
        &self,
        mat: &Mat,
        x: u64,
        norm: Option<u64>,
        n: usize,
        y: u64,
        ldy: usize,
        acc: bool,
        epi: Epi,
    ) -> Result<()> {
        let ldx = mat.cols;
        if let Some((f, smem)) = self.fast_kernel(mat) {
            let k = &self.m.dev.kernels;
            let cfg = &self.m.cfg;
            let (mode, kc, vc) = match epi {
                Epi::Plain => (0, 0, 0),
                Epi::Swiglu => (1, 0, 0),
                Epi::RopeKv(l) => (2, self.kc[l], self.vc[l]),
            };
            let args = [
                A::P(mat.ptr),
                A::L(mat.row_bytes as i64),
                A::P(x),
                A::P(norm.unwrap_or(0)),
                A::D(self.m.cfg.rms_eps),
                A::P(y + (mat.out_off * 4) as u64),
                A::I(mat.rows as i32),
                A::I(mat.cols as i32),
                A::I(ldx as i32),
                A::I(ldy as i32),
                A::I(acc as i32),
                A::I(mode),
                A::P(self.cos_sin),
                A::P(self.meta_ptr),
                A::P(kc),
                A::P(vc),
                A::I(cfg.q_dim() as i32),
                A::I(cfg.kv_dim() as i32),
                A::I(cfg.head_dim as i32),
                A::I((cfg.n_rot / 2) as i32),
            ];
            let threads = 32 * k.mvf_warps as u32;
            let mut groups = mat.rows.div_ceil(k.mvf_rows * k.mvf_warps);
            if k.mvf_cap {
                // One resident wave: each block then loops over several row groups.
                let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None);
                let wave = (per_sm.unwrap_or(1).max(1) as usize * k.sms / n).max(1);
                groups = groups.min(wave);
            }
            return self.launch(f, (groups as u32, n as u32, 1), threads, smem, &args);
        }
        if norm.is_some() || !matches!(epi, Epi::Plain) {
            bail!("internal: a fused RMSNorm or epilogue needs the fast mat-vec kernel");
        }
        let tk = self.m.dev.kernels.for_layout(mat.ty, mat.repacked)?;
        let rows_per_block = (MATVEC_THREADS / 32) as usize * MATVEC_ROWS_PER_WARP;
        let args = [
            A::P(mat.ptr),
            A::L(mat.row_bytes as i64),
            A::P(x),
            A::P(y + (mat.out_off * 4) as u64),
            A::I(mat.rows as i32),
            A::I(mat.cols as i32),
            A::I(ldx as i32),
            A::I(ldy as i32),
            A::I(acc as i32),
        ];
        let grid = (mat.rows.div_ceil(rows_per_block) as u32, n as u32, 1);
        self.launch(&tk.matvec, grid, MATVEC_THREADS, 0, &args)
    }

    /// `y[t * ldy + mat.out_off + r] (+)= Σ_c W[r, c] x[t * cols + c]` for t < n (`norm`: of
    /// RMSNorm(x) · norm instead of x, only on the fast mat-vec path; `planes`: x's f16 planes are
    /// already in the batched path's buffers, written by x's producer).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        mat: &Mat,
        x: u64,
        norm: Option<u64>,
        planes: bool,
        n: usize,
        y: u64,
        ldy: usize,
        acc: bool,
    ) -> Result<()> {
        let dev = &self.m.dev;
        let tk = dev.kernels.for_layout(mat.ty, mat.repacked)?;
        let yo = y + (mat.out_off * 4) as u64;
        let blas = match &dev.blas {
            Some(b) if self.batched(n) => b,
            _ => return self.matvec(mat, x, norm, n, y, ldy, acc, Epi::Plain),
        };
        if norm.is_some() {
            bail!("internal: a fused RMSNorm on the batched path");
        }
        let (rows, cols) = (mat.rows as i32, mat.cols as i32);
        let alpha = 1f32;
        let beta0 = if acc { 1f32 } else { 0f32 };
        let handle = *blas.handle();
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use blas_sys::cudaDataType::{CUDA_R_16F, CUDA_R_32F};
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        if mat.ty == GgmlType::F32 {
            // f32 weights: a true f32 product (no TF32), straight from the stored matrix.
            // SAFETY: A = W [rows × cols] row-major read as cols × rows column-major (lda = cols),
            // B = x [n × cols] (ldb = cols), C = y [n × ldy] (ldc = ldy); all live device memory.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    rows,
                    n as i32,
                    cols,
                    &alpha as *const f32 as *const _,
                    mat.ptr as *const _,
                    CUDA_R_32F,
                    cols,
                    x as *const _,
                    CUDA_R_32F,
                    cols,
                    &beta0 as *const f32 as *const _,
                    yo as *mut _,
                    CUDA_R_32F,
                    ldy as i32,
                    compute,
                    algo,
                )
            }
            .map_err(dev_err)?;
            return Ok(());
        }
        // Weights → f16 tile (one rounding of the dequantized value); F16 weights are used as stored.
        let w16 = if mat.ty == GgmlType::F16 {
            mat.ptr
        } else {
            let per = (mat.rows * mat.cols / 8) as u32;
            let rb = mat.row_bytes as i64;
            let args = [A::P(mat.ptr), A::L(rb), A::P(self.w16), A::I(rows), A::I(cols)];
            self.launch(&tk.dequant_f16, (per.div_ceil(256), 1, 1), 256, 0, &args)?;
            self.w16
        };
        // Activations → f16 planes. Float weights (F16/BF16) carry ~11 significant bits of their
        // own, so one f16 activation plane would add an error as large as the weights'; two planes
        // (hi + residual) keep ~22 bits. Quantized weights are far coarser than one plane.
        let n_planes = if matches!(mat.ty, GgmlType::F16 | GgmlType::BF16) { 2 } else { 1 };
        if !planes {
            let total = (n * mat.cols) as i64;
            let lo = if n_planes == 2 { self.x16_lo } else { 0 };
            let args = [A::P(x), A::P(self.x16_hi), A::P(lo), A::L(total)];
            self.launch(&dev.kernels.split_f16, ((total as u32).div_ceil(256), 1, 1), 256, 0, &args)?;
        }
        for p in 0..n_planes {
            let src = if p == 0 { self.x16_hi } else { self.x16_lo };
            let beta = if p == 0 { beta0 } else { 1f32 };
            // SAFETY: as above, with A the f16 tile (lda = cols) and B an f16 activation plane.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    rows,
                    n as i32,
                    cols,
                    &alpha as *const f32 as *const _,
                    w16 as *const _,
                    CUDA_R_16F,
                    cols,
                    src as *const _,
                    CUDA_R_16F,
                    cols,
                    &beta as *const f32 as *const _,
                    yo as *mut _,
                    CUDA_R_32F,
                    ldy as i32,
                    compute,
                    algo,
                )
            }
            .map_err(dev_err)?;
        }
        Ok(())
    }
}

/// Appends `data` (rows of Q4_0 or Q8_0 blocks of `block` bytes: f16 d, then the quants) with
/// every 8 consecutive blocks of a row regrouped as [8 × quants][8 × d], the layout of the
/// kernels' T_Q4_0R / T_Q8_0R: each block's quants then start 16-byte aligned (rows hold a
/// multiple of 8 blocks, so groups never straddle rows and row sizes are unchanged).
fn repack8(data: &[u8], block: usize, out: &mut Vec<u8>) {
    for grp in data.chunks(8 * block) {
        for b in grp.chunks(block) {
            out.extend_from_slice(&b[2..]);
        }
        for b in grp.chunks(block) {
            out.extend_from_slice(&b[..2]);
        }
    }
}

/// The parts of `w`'s architecture description that the CUDA kernels do not implement: each is
/// read here at one fixed point, so a model that needs one is refused whole, by name.
fn missing_features(w: &ModelWeights) -> Vec<&'static str> {
    let cfg = &w.cfg;
    let mut missing = Vec::new();
    if cfg.rope_pairing != RopePairing::Adjacent {
        missing.push("NEOX RoPE pairing");
    }
    if cfg.ffn_activation != FfnActivation::Silu {
        missing.push("the GELU-tanh FFN");
    }
    if cfg.embedding_scale.is_some() {
        missing.push("the embedding scale");
    }
    if cfg.layers.iter().any(|l| l.window.is_some()) || cfg.ropes.len() > 1 {
        missing.push("sliding-window layers");
    }
    if cfg.logit_softcap.is_some() {
        missing.push("the logit soft-cap");
    }
    let any = |f: fn(&kiln_model::LayerWeights) -> bool| w.layers.iter().any(f);
    if any(|l| l.qkv_bias.is_some()) {
        missing.push("q/k/v biases");
    }
    if any(|l| l.qk_norm.is_some()) {
        missing.push("q/k norms");
    }
    if any(|l| l.post_norms.is_some()) {
        missing.push("post-attention/FFN norms");
    }
    missing
}

/// `[pos][i] = (cos, sin)` of the RoPE angles for positions `0..n_ctx`, computed in f64 and
/// rounded to f32 exactly as the CPU's `RopeTable`.
fn rope_table(cfg: &ModelConfig, freqs: Option<&[f32]>, n_ctx: usize) -> Vec<f32> {
    let half = cfg.n_rot / 2;
    let rope = cfg.rope();
    let scale = match rope.scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear(f) => 1.0 / f,
    };
    let mut out = Vec::with_capacity(n_ctx * half * 2);
    for pos in 0..n_ctx {
        let p = pos as f64 * scale;
        for i in 0..half {
            let mut theta = rope.base.powf(-2.0 * i as f64 / cfg.n_rot as f64);
            if let Some(f) = freqs {
                theta /= f[i] as f64;
            }
            let (s, c) = (p * theta).sin_cos();
            out.push(c as f32);
            out.push(s as f32);
        }
    }
    out
}
