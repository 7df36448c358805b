//! One sequence on the GPU: a contiguous KV cache (the paged pools with the identity block
//! table), chunked prompts and a captured CUDA graph for one-token steps.

use anyhow::{anyhow, Result};
use cudarc::driver::{sys, CudaGraph};
use kiln_model::{Logits, ModelConfig, ModelError};

use crate::forward::{Forward, Pass, KV_BLOCK};
use crate::model::dev_err;
use crate::CudaModel;

/// Tokens per forward chunk: longer inputs run in pieces of this many (fixed buffers).
pub const UBATCH: usize = 512;

pub struct CudaSession<'m> {
    f: Forward<'m>,
    pub n_ctx: usize,
    /// Positions filled so far.
    pub len: usize,
    graph: Option<CudaGraph>,
    eager_decode_steps: usize,
    /// Whether one-token steps replay a captured CUDA graph (`KILN_CUDA_GRAPH=0` turns it off).
    pub use_graph: bool,
}

impl<'m> CudaSession<'m> {
    pub fn new(m: &'m CudaModel, n_ctx: usize) -> Result<CudaSession<'m>> {
        let n_ctx = n_ctx.max(1);
        let blocks = n_ctx.div_ceil(KV_BLOCK);
        let mut f = Forward::new(m, n_ctx, UBATCH.min(n_ctx), blocks, blocks)?;
        let identity: Vec<i32> = (0..blocks as i32).collect();
        f.upload_rows(&[], &[], &[], Some(&identity))?;
        let use_graph = std::env::var("KILN_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true);
        Ok(CudaSession { f, n_ctx, len: 0, graph: None, eager_decode_steps: 0, use_graph })
    }

    /// Device bytes a session of `n_ctx` positions takes (KV cache and work buffers).
    pub fn bytes_needed(cfg: &ModelConfig, n_ctx: usize) -> usize {
        let n_ctx = n_ctx.max(1);
        crate::forward::kv_bytes(cfg, n_ctx.div_ceil(KV_BLOCK))
            + crate::forward::work_bytes(cfg, UBATCH.min(n_ctx), n_ctx)
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Forgets every position from `len` on (their keys and values are overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of device memory this session holds (KV cache and work buffers).
    pub fn device_bytes(&self) -> usize {
        self.f.device_bytes()
    }

    /// Runs `tokens` at positions `len..`, appends them to the KV cache, returns logits
    /// `[n_out, n_vocab]` (as `kiln_model::forward`).
    pub fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if self.len + tokens.len() > self.n_ctx {
            return Err(ModelError::ContextFull { needed: self.len + tokens.len(), n_ctx: self.n_ctx }.into());
        }
        let nv = self.f.m.cfg.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= nv) {
            return Err(ModelError::TokenOutOfRange { id, n_vocab: nv }.into());
        }
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.f.rows);
        for (ci, chunk) in tokens.chunks(self.f.rows).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            let chunk_want = if want == Logits::All { Some(Logits::All) } else { last_chunk.then_some(Logits::Last) };
            let n = chunk.len();
            let pos: Vec<i32> = (self.len..self.len + n).map(|p| p as i32).collect();
            self.f.upload_rows(chunk, &pos, &vec![0; n], None)?;
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
                    let p = Pass { off: 0, n, gemm: self.f.gemm_for(n), mma: false };
                    self.f.run(p, chunk_want, 0)?;
                    self.eager_decode_steps += decode as usize;
                }
            }
            self.len += n;
            if let Some(w) = chunk_want {
                out.extend(self.f.logits_rows(0, if w == Logits::All { n } else { 1 })?);
            }
        }
        self.f.m.dev.stream.synchronize().map_err(dev_err)?;
        Ok(out)
    }

    /// Records one decode step (one token, last logits) as a CUDA graph.
    fn capture(&self) -> Result<CudaGraph> {
        let s = &self.f.m.dev.stream;
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(dev_err)?;
        let r = self.f.run(Pass { off: 0, n: 1, gemm: false, mma: false }, Some(Logits::Last), 0);
        // End the capture whatever happened, so the stream leaves capture mode.
        let g = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(dev_err);
        r?;
        g?.ok_or_else(|| anyhow!("CUDA: graph capture recorded nothing"))
    }
}
