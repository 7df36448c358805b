//! One forward pass over rows of tokens on the GPU: the work buffers, the paged KV pools and the
//! layer loop (the semantics of `crates/model/src/forward.rs`, default path). A single sequence
//! ([`crate::CudaSession`]) and a batch of sequences ([`crate::CudaBatch`]) both run through it.
//!
//! Rows carry their own position and block table (`KvMap` in kernels.cu), so one pass may hold
//! rows of different sequences; every kernel computes each row independently of the others, in
//! an order fixed by the row alone, so a row's results do not depend on what else is in the pass.
//! Which kernels a row takes depends only on the pass kind ([`Pass::gemm`], [`Pass::mma`]):
//! matrix-vector kernels (f32 activations), dequantize + cuBLAS (f16 activations, prompts), or the
//! tensor-core row kernel (f16 activations, the serving path's generation rows).

use std::ffi::c_void;

use anyhow::{bail, Result};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{sys, CudaFunction, CudaSlice, DevicePtr};
use kiln_gguf::GgmlType;
use kiln_model::{Logits, ModelConfig, ModelError};

use crate::model::{dev_err, rope_table, Epi, Mat, A};
use crate::CudaModel;

/// Positions per block of the paged KV cache (`KV_BLOCK` in kernels.cu).
pub const KV_BLOCK: usize = 16;
/// Threads of the matrix-vector kernel's blocks (one warp per output row).
const MATVEC_THREADS: u32 = 128;
pub(crate) const ATTN_THREADS: u32 = 256;
/// Rows each warp of the matrix-vector kernel computes (`MV_ROWS` in kernels.cu).
const MATVEC_ROWS_PER_WARP: usize = 1;
/// Tokens per block and threads of the tensor-core row kernel (`MMA_TOK`, `MMA_WARPS` × 32).
const MMA_TOKENS: usize = 64;
/// Steps of at most this many tokens take the one-tile kernel (`mma_rows8_*`).
pub(crate) const MMA_FEW: usize = 8;
const MMA_THREADS: u32 = 8 * 32;
/// Threads of the RMSNorm blocks (one block per row).
const NORM_THREADS: u32 = 1024;

/// Device bytes of the work buffers of passes of up to `rows` rows over sequences of up to `n_ctx`
/// positions (the KV pools not included), as [`Forward::new`] allocates them.
pub fn work_bytes(cfg: &ModelConfig, rows: usize, n_ctx: usize) -> usize {
    let (e, qd, kvd, ff, nv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
    let widest = e.max(qd).max(ff);
    let per_row = 4 * (2 * e + qd + 2 * kvd + qd + 3 * ff + nv + 3) + 4 * widest;
    // The f16 tile of the largest (fused) matrix.
    let tile = 2 * (nv * e).max(2 * ff * e).max((qd + 2 * kvd) * e);
    rows.max(1) * per_row + tile + n_ctx * cfg.n_rot * 4 + (1 << 20)
}

/// Device bytes of KV pools of `blocks` blocks (keys and values of every layer, f32).
pub fn kv_bytes(cfg: &ModelConfig, blocks: usize) -> usize {
    2 * cfg.n_layer * blocks * KV_BLOCK * cfg.kv_dim() * 4
}

/// Rows `off .. off + n` of the uploaded rows, and how they run: `gemm` = dequantize + cuBLAS
/// for the matrices and tiled prompt attention (consecutive positions of one sequence); `mma` =
/// the tensor-core row kernel for the matrices (one weight read for up to 64 rows, f16
/// activations) and per-row attention (any rows: the serving path's generation pass); else the
/// matrix-vector kernels and per-row attention (any rows).
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub off: usize,
    pub n: usize,
    pub gemm: bool,
    pub mma: bool,
}

impl Pass {
    /// Whether the matrices read f16 activation planes (written by the producers or split).
    fn planes(&self) -> bool {
        self.gemm || self.mma
    }
}

/// The buffers of passes of up to `rows` rows over KV pools of `kv_rows` positions.
pub(crate) struct Forward<'m> {
    pub m: &'m CudaModel,
    /// Most rows of one pass and of one upload.
    pub rows: usize,
    /// Block-table entries one upload may carry.
    pub bt_cap: usize,
    bufs: Vec<CudaSlice<u8>>,
    /// Row data: tokens [rows] | positions [rows] | table offsets [rows] | block tables [bt_cap].
    meta: CudaSlice<i32>,
    meta_ptr: u64,
    pub kc: Vec<u64>,
    pub vc: Vec<u64>,
    cos_sin: u64,
    x: u64,
    h: u64,
    qkv: u64,
    attn: u64,
    gu: u64,
    ffo: u64,
    pub logits: CudaSlice<f32>,
    logits_ptr: u64,
    w16: u64,
    x16_hi: u64,
    x16_lo: u64,
    attn_smem: u32,
}

impl<'m> Forward<'m> {
    /// Buffers for passes of up to `rows` rows of sequences of up to `n_ctx` positions, KV pools
    /// of `kv_blocks` blocks per layer, uploads of up to `bt_cap` block-table entries (with the
    /// cuBLAS path's scratch buffers when cuBLAS is there).
    pub fn new(m: &'m CudaModel, n_ctx: usize, rows: usize, kv_blocks: usize, bt_cap: usize) -> Result<Forward<'m>> {
        let cfg = &m.cfg;
        let n_ctx = n_ctx.max(1);
        let rows = rows.max(1);
        let s = &m.dev.stream;
        let (e, qd, kvd, ff, nv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_vocab);
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
        let pool_bytes = kv_blocks
            .checked_mul(KV_BLOCK * kvd * 4)
            .ok_or_else(|| anyhow::anyhow!("a KV pool of {kv_blocks} blocks overflows"))?;
        let mut kc = Vec::new();
        let mut vc = Vec::new();
        for _ in 0..cfg.n_layer {
            kc.push(alloc(pool_bytes)?);
            vc.push(alloc(pool_bytes)?);
        }
        let x = alloc(rows * e * 4)?;
        let h = alloc(rows * e * 4)?;
        let qkv = alloc(rows * qkv_w * 4)?;
        let attn = alloc(rows * qd * 4)?;
        let gu = alloc(rows * 2 * ff * 4)?;
        let ffo = alloc(rows * ff * 4)?;
        let widest = e.max(qd).max(ff);
        let w16 = if m.dev.blas.is_some() { alloc(m.max_elems * 2)? } else { 0 };
        let (x16_hi, x16_lo) = if m.dev.blas.is_some() || m.mma_rows {
            (alloc(rows * widest * 2)?, alloc(rows * widest * 2)?)
        } else {
            (0, 0)
        };
        let cs = rope_table(cfg, m.rope_freqs.as_deref(), n_ctx);
        let cs_bytes: Vec<u8> = cs.iter().flat_map(|v| v.to_le_bytes()).collect();
        let cs_buf = s.clone_htod(&cs_bytes).map_err(dev_err)?;
        let (cos_sin, _) = cs_buf.device_ptr(s);
        bufs.push(cs_buf);
        let meta = s.alloc_zeros::<i32>(3 * rows + bt_cap.max(1)).map_err(dev_err)?;
        let (meta_ptr, _) = meta.device_ptr(s);
        let logits = s.alloc_zeros::<f32>(rows * nv).map_err(dev_err)?;
        let (logits_ptr, _) = logits.device_ptr(s);
        Ok(Forward {
            m,
            rows,
            bt_cap,
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
        })
    }

    /// Bytes of device memory these buffers hold (KV pools included).
    pub fn device_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum::<usize>() + self.logits.len() * 4 + self.meta.len() * 4
    }

    /// Whether `n` rows of a prompt take the cuBLAS path (more than [`crate::MATVEC_MAX_TOKENS`]
    /// rows and cuBLAS there).
    pub fn gemm_for(&self, n: usize) -> bool {
        n > crate::MATVEC_MAX_TOKENS && self.w16 != 0
    }

    /// Uploads the rows of the next passes (token id, position and block-table offset of each) and,
    /// when given, the block tables they point into.
    pub fn upload_rows(&mut self, tokens: &[u32], pos: &[i32], tbl: &[i32], bt: Option<&[i32]>) -> Result<()> {
        let n = tokens.len();
        if n > self.rows || pos.len() != n || tbl.len() != n {
            bail!("internal: {n} rows uploaded into buffers of {}", self.rows);
        }
        let nv = self.m.cfg.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= nv) {
            return Err(ModelError::TokenOutOfRange { id, n_vocab: nv }.into());
        }
        let mut host = Vec::with_capacity(3 * self.rows);
        host.extend(tokens.iter().map(|&t| t as i32));
        host.resize(self.rows, 0);
        host.extend_from_slice(pos);
        host.resize(2 * self.rows, 0);
        host.extend_from_slice(tbl);
        let s = self.m.dev.stream.clone();
        s.memcpy_htod(&host, &mut self.meta.slice_mut(0..host.len())).map_err(dev_err)?;
        if let Some(bt) = bt {
            if bt.len() > self.bt_cap {
                bail!("internal: {} block-table entries for room of {}", bt.len(), self.bt_cap);
            }
            let at = 3 * self.rows;
            s.memcpy_htod(bt, &mut self.meta.slice_mut(at..at + bt.len())).map_err(dev_err)?;
        }
        Ok(())
    }

    /// Copies logits rows `row0 .. row0 + n` to the host.
    pub fn logits_rows(&self, row0: usize, n: usize) -> Result<Vec<f32>> {
        let nv = self.m.cfg.n_vocab;
        let mut host = vec![0f32; n * nv];
        self.m.dev.stream.memcpy_dtoh(&self.logits.slice(row0 * nv..(row0 + n) * nv), &mut host).map_err(dev_err)?;
        Ok(host)
    }

    fn tok(&self, p: Pass) -> u64 {
        self.meta_ptr + 4 * p.off as u64
    }
    fn pos(&self, p: Pass) -> u64 {
        self.meta_ptr + 4 * (self.rows + p.off) as u64
    }
    fn tbl(&self, p: Pass) -> u64 {
        self.meta_ptr + 4 * (2 * self.rows + p.off) as u64
    }
    fn bt(&self) -> u64 {
        self.meta_ptr + 4 * (3 * self.rows) as u64
    }

    /// Enqueues one pass over rows `p.off .. p.off + p.n` of the uploaded row data
    /// ([`Forward::upload_rows`]); logits (when wanted) land at row `logits_row` of the logits buffer.
    pub fn run(&self, p: Pass, want: Option<Logits>, logits_row: usize) -> Result<()> {
        let m = self.m;
        let n = p.n;
        let cfg = &m.cfg;
        let k = &m.dev.kernels;
        let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let qkv_w = qd + 2 * kvd;
        let ni = n as i32;
        // Embedding rows.
        {
            let te = &m.token_embd;
            let f = &k.for_layout(te.ty, te.repacked)?.get_rows;
            let args = [A::P(te.ptr), A::L(te.row_bytes as i64), A::P(self.tok(p)), A::P(self.x), A::I(te.cols as i32)];
            self.launch(f, (n as u32, 1, 1), 128, 0, &args)?;
        }
        let half = (cfg.n_rot / 2) as i32;
        let (nh, nkv, d) = (cfg.n_head as i32, cfg.n_head_kv as i32, cfg.head_dim as i32);
        let scale = cfg.attention_scale as f32;
        for (l, lw) in m.layers.iter().enumerate() {
            let (src, norm, planes) = self.normed_input(p, &lw.qkv, lw.attn_norm, self.x)?;
            let (qkv_wi, kvdi) = (qkv_w as i32, kvd as i32);
            if let Some(mat) = self.pair_epilogue(p, &lw.qkv) {
                // RoPE and the KV-cache store in the q|k|v kernel's epilogue.
                self.matvec(p, mat, src, norm, self.qkv, qkv_w, false, Epi::RopeKv(l))?;
            } else {
                for mat in &lw.qkv {
                    self.matmul(p, mat, src, norm, planes, self.qkv, qkv_w, false)?;
                }
                let args = [
                    A::P(self.qkv),
                    A::I(qkv_wi),
                    A::P(self.cos_sin),
                    A::P(self.pos(p)),
                    A::P(self.tbl(p)),
                    A::P(self.bt()),
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
                A::P(self.pos(p)),
                A::P(self.tbl(p)),
                A::P(self.bt()),
                A::I(nh),
                A::I(nkv),
                A::I(d),
                A::I(kvdi),
                A::F(scale),
            ];
            let tiled = k.attention_tiled.iter().find(|(hd, _, _)| *hd == cfg.head_dim);
            let (hi, lo) = self.planes_out(p);
            let attn_planes = match tiled {
                Some((_, f, smem)) if p.gemm && cfg.n_head.is_multiple_of(cfg.n_head_kv) => {
                    // Prompts: the tiled kernel (K/V tiles shared by a block's query rows).
                    let args = [
                        A::P(self.qkv),
                        A::I(qkv_wi),
                        A::P(self.kc[l]),
                        A::P(self.vc[l]),
                        A::P(self.attn),
                        A::P(self.pos(p)),
                        A::P(self.tbl(p)),
                        A::P(self.bt()),
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
                    self.launch_with(
                        attn,
                        (cfg.n_head as u32, n as u32, 1),
                        ATTN_THREADS,
                        self.attn_smem,
                        &args,
                        k.pdl,
                    )?;
                    false
                }
            };
            self.matmul(p, &lw.wo, self.attn, None, attn_planes, self.x, e, true)?;
            let (src, norm, planes) = self.normed_input(p, &lw.gate_up, lw.ffn_norm, self.x)?;
            match self.pair_epilogue(p, &lw.gate_up).filter(|_| lw.gu_interleaved) {
                // SwiGLU in the gate|up kernel's epilogue, straight into the down projection's input.
                Some(mat) => self.matvec(p, mat, src, norm, self.ffo, ff, false, Epi::Swiglu)?,
                None => {
                    for mat in &lw.gate_up {
                        self.matmul(p, mat, src, norm, planes, self.gu, 2 * ff, false)?;
                    }
                    let inter = lw.gu_interleaved as i32;
                    let args =
                        [A::P(self.gu), A::P(self.ffo), A::I(ff as i32), A::I(ni), A::I(inter), A::P(hi), A::P(lo)];
                    self.launch(&k.swiglu, ((ff as u32).div_ceil(256), n as u32, 1), 256, 0, &args)?;
                }
            }
            self.matmul(p, &lw.down, self.ffo, None, hi != 0, self.x, e, true)?;
        }
        let out = self.logits_ptr + (logits_row * cfg.n_vocab * 4) as u64;
        match want {
            None => {}
            Some(Logits::Last) => {
                let last = self.x + ((n - 1) * e * 4) as u64;
                // One row: the LM head's input is a pass of its own (no cuBLAS for one row).
                let one = Pass { off: p.off + n - 1, n: 1, gemm: false, mma: p.mma };
                let (src, norm, planes) =
                    self.normed_input(one, std::slice::from_ref(&m.output), m.output_norm, last)?;
                self.matmul(one, &m.output, src, norm, planes, out, cfg.n_vocab, false)?;
            }
            Some(Logits::All) => {
                let (src, norm, planes) =
                    self.normed_input(p, std::slice::from_ref(&m.output), m.output_norm, self.x)?;
                self.matmul(p, &m.output, src, norm, planes, out, cfg.n_vocab, false)?;
            }
        }
        Ok(())
    }

    fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &[A]) -> Result<()> {
        self.launch_with(f, grid, block, smem, args, false)
    }

    /// [`Self::launch`], with programmatic dependent launch when `pdl` — only for kernels that call
    /// `pdl_release_then_wait` before they read what earlier kernels wrote (pass
    /// `Kernels::pdl`, which says whether the device kernels have it on).
    fn launch_with(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[A],
        pdl: bool,
    ) -> Result<()> {
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
        if pdl {
            // SAFETY: an all-zero launch attribute is a valid value of the C struct; only the
            // programmatic-serialization member of its union is set and read.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.m.dev.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below for `ptrs`; `config` and `attr` outlive the call; the kernel waits
            // (`pdl_release_then_wait`) before reading anything an earlier kernel writes.
            return unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }
                .result()
                .map_err(dev_err);
        }
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
    fn planes_out(&self, p: Pass) -> (u64, u64) {
        if p.planes() {
            (self.x16_hi, if self.m.float_weights { self.x16_lo } else { 0 })
        } else {
            (0, 0)
        }
    }

    /// The input of matrices `mats` that take RMSNorm(`x`) · `g` over `n` tokens: (`x`, Some(`g`),
    /// false) when every one of them has a fast mat-vec kernel here (the norm is fused into its
    /// prologue), else the norm kernel runs into `h` and the input is (`h`, None, whether its f16
    /// planes were written as well).
    fn normed_input(&self, p: Pass, mats: &[Mat], g: u64, x: u64) -> Result<(u64, Option<u64>, bool)> {
        let n = p.n;
        if !p.planes() && mats.iter().all(|m| self.fast_kernel(m).is_some()) {
            return Ok((x, Some(g), false));
        }
        let (hi, lo) = self.planes_out(p);
        let cfg = &self.m.cfg;
        let args = [A::P(x), A::P(g), A::P(self.h), A::I(cfg.n_embd as i32), A::D(cfg.rms_eps), A::P(hi), A::P(lo)];
        // Many rows: smaller blocks, all resident at once (ncu, pp512: 11 us per call with 1024
        // threads a row); a few rows (decode, non-fused norms): 1024 threads share each row.
        // The block size sets the sum's order: fixed by the pass kind, never by the row count.
        let threads = if p.planes() { 256 } else { NORM_THREADS };
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

    /// The one matrix of `mats` when the fast kernel can apply a pair epilogue to it on `n`
    /// tokens (not batched, an even number of rows per warp).
    fn pair_epilogue<'a>(&self, p: Pass, mats: &'a [Mat]) -> Option<&'a Mat> {
        let k = &self.m.dev.kernels;
        match mats {
            [mat] if !p.planes() && k.mvf_rows.is_multiple_of(2) && self.fast_kernel(mat).is_some() => Some(mat),
            _ => None,
        }
    }

    /// The matrix-vector kernel over `n` tokens whose inputs are rows of `x` (`norm`: the input is
    /// RMSNorm(x) · norm, computed in the fast kernel's prologue; `epi`: see [`Epi`]).
    #[allow(clippy::too_many_arguments)]
    fn matvec(
        &self,
        p: Pass,
        mat: &Mat,
        x: u64,
        norm: Option<u64>,
        y: u64,
        ldy: usize,
        acc: bool,
        epi: Epi,
    ) -> Result<()> {
        let n = p.n;
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
                A::P(self.pos(p)),
                A::P(self.tbl(p)),
                A::P(self.bt()),
                A::P(kc),
                A::P(vc),
                A::I(cfg.q_dim() as i32),
                A::I(cfg.kv_dim() as i32),
                A::I(cfg.head_dim as i32),
                A::I((cfg.n_rot / 2) as i32),
            ];
            // Several tokens: each weight load serves 4 or 8 of them (same sums per token).
            let tk = k.for_layout(mat.ty, mat.repacked)?;
            let per_tok = smem as usize;
            let (f, tm) = match (&tk.matvec_fast_t8, &tk.matvec_fast_t4) {
                (Some(f8), _) if n >= 8 && k.mvf_tm >= 8 && 8 * per_tok <= k.fast_smem_max => (f8, 8),
                (_, Some(f4)) if n >= 2 && k.mvf_tm >= 4 && 4 * per_tok <= k.fast_smem_max => (f4, 4),
                _ => (f, 1),
            };
            let smem = (tm * per_tok) as u32;
            let ny = n.div_ceil(tm);
            let mut args = args.to_vec();
            args.insert(11, A::I(n as i32));
            let threads = 32 * k.mvf_warps as u32;
            let mut groups = mat.rows.div_ceil(k.mvf_rows * k.mvf_warps);
            if k.mvf_cap {
                // One resident wave: each block then loops over several row groups.
                let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None);
                let wave = (per_sm.unwrap_or(1).max(1) as usize * k.sms / ny).max(1);
                groups = groups.min(wave);
            }
            return self.launch_with(f, (groups as u32, ny as u32, 1), threads, smem, &args, k.pdl);
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
        p: Pass,
        mat: &Mat,
        x: u64,
        norm: Option<u64>,
        planes: bool,
        y: u64,
        ldy: usize,
        acc: bool,
    ) -> Result<()> {
        let n = p.n;
        let dev = &self.m.dev;
        let tk = dev.kernels.for_layout(mat.ty, mat.repacked)?;
        let yo = y + (mat.out_off * 4) as u64;
        if norm.is_some() && p.planes() {
            bail!("internal: a fused RMSNorm on the batched path");
        }
        if p.mma {
            return self.mma_rows(p, mat, x, planes, yo, ldy, acc);
        }
        let blas = match &dev.blas {
            Some(b) if p.gemm => b,
            _ => return self.matvec(p, mat, x, norm, y, ldy, acc, Epi::Plain),
        };
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

    /// `y[t * ldy + r] (+)= Σ_c f16(W[r, c]) x[t, c]` for the rows of an `mma` pass on the tensor
    /// cores (`mma_rows_*` in kernels.cu); `planes`: x's f16 planes are already in the buffers.
    #[allow(clippy::too_many_arguments)]
    fn mma_rows(&self, p: Pass, mat: &Mat, x: u64, planes: bool, yo: u64, ldy: usize, acc: bool) -> Result<()> {
        let dev = &self.m.dev;
        let n = p.n;
        // Float weights carry ~11 significant bits of their own: two activation planes (see matmul).
        let lo = if matches!(mat.ty, GgmlType::F16 | GgmlType::BF16) { self.x16_lo } else { 0 };
        if !planes {
            let total = (n * mat.cols) as i64;
            let args = [A::P(x), A::P(self.x16_hi), A::P(lo), A::L(total)];
            self.launch(&dev.kernels.split_f16, ((total as u32).div_ceil(256), 1, 1), 256, 0, &args)?;
        }
        let kernels = dev.kernels.for_layout(mat.ty, mat.repacked)?;
        // The one-tile kernel has not run on a GPU yet (NOTES.md): opt-in until it has.
        let few = n <= MMA_FEW && self.m.mma_few;
        let (f, tokens_per_block) = if few { (&kernels.mma_rows8, MMA_FEW) } else { (&kernels.mma_rows, MMA_TOKENS) };
        let args = [
            A::P(mat.ptr),
            A::L(mat.row_bytes as i64),
            A::P(self.x16_hi),
            A::P(lo),
            A::P(yo),
            A::I(mat.rows as i32),
            A::I(mat.cols as i32),
            A::I(ldy as i32),
            A::I(acc as i32),
            A::I(n as i32),
        ];
        let grid = (mat.rows.div_ceil(16) as u32, n.div_ceil(tokens_per_block) as u32, 1);
        self.launch(f, grid, MMA_THREADS, 0, &args)
    }
}
