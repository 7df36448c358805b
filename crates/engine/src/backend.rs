//! Where the forward pass runs: the CPU, or one NVIDIA GPU through the CUDA backend (builds with
//! the `cuda` feature; the driver is loaded at run time, so such builds run anywhere).
//!
//! The GPU takes a [`Session`](crate::Session) through [`SequenceForward`] (one sequence, its own
//! KV cache) and the [`Scheduler`](crate::scheduler::Scheduler) through [`PagedBackend`] (many
//! sequences over one paged KV cache). Both are narrow: tokens in, logits out.

use anyhow::{bail, Result};
use kiln_model::{Logits, ModelConfig};

use crate::Model;

/// Positions per block of the GPU's paged KV cache.
#[cfg(feature = "cuda")]
pub const KV_BLOCK_POSITIONS: usize = kiln_cuda::KV_BLOCK;
#[cfg(not(feature = "cuda"))]
pub const KV_BLOCK_POSITIONS: usize = 16;

/// `--backend`: where the forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
    /// The GPU when a usable one is there (a one-line notice names it), else the CPU.
    Auto,
}

/// A sequence's forward pass on a device, with its own KV cache (as [`kiln_model::forward`] over
/// a [`kiln_model::KvCache`]).
pub trait SequenceForward {
    /// Appends `tokens` and returns the logits of the last one or of all.
    fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>>;
    /// Forgets every position from `len` on.
    fn truncate(&mut self, len: usize);
}

/// The work of one scheduler slot in a step on a [`PagedBackend`].
pub struct PagedStep<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub want: Logits,
    /// A chunk of the slot's prompt (as sized by [`PagedBackend::prompt_chunk`]), not
    /// generation rows.
    pub prompt: bool,
}

/// KV blocks of a paged backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockUse {
    /// Used by running sequences.
    pub used: usize,
    /// Kept for prefix sharing, used by nobody (evicted when room is needed).
    pub cached: usize,
    pub total: usize,
}

/// The scheduler's batched steps over a paged KV cache shared by its slots.
pub trait PagedBackend {
    /// Takes `slot` (its previous sequence released) for `prompt`, to grow up to `max_len`
    /// positions: returns the prompt positions shared from cached blocks (evaluation starts
    /// there), `None` when the blocks are not free now (the request waits), an error when it can
    /// never fit.
    fn admit(&mut self, slot: usize, prompt: &[u32], max_len: usize) -> Result<Option<usize>>;
    /// Gives back `slot`'s blocks.
    fn release(&mut self, slot: usize);
    /// Forgets `slot`'s positions from `len` on.
    fn truncate(&mut self, slot: usize, len: usize);
    /// Prompt tokens `slot` reads next out of `left` (chunk bounds that keep results independent
    /// of the batch).
    fn prompt_chunk(&self, slot: usize, left: usize) -> usize;
    /// Whether a prompt chunk of `n` tokens rides along in the step's generation pass (costing
    /// little beside it): the scheduler then reads it whatever its prompt budget.
    fn rides_along(&self, n: usize) -> bool;
    /// One step; each step's logits (last row or all rows), in order. On error nothing changed.
    fn step(&mut self, steps: &[PagedStep<'_>]) -> Result<Vec<Vec<f32>>>;
    fn blocks(&self) -> BlockUse;
    /// The blocks of the prefix cache registered and evicted since the last call
    /// ([`crate::kv_events`]); empty where the backend keeps no prefix cache.
    fn take_kv_events(&mut self) -> Vec<crate::kv_events::KvEvent> {
        Vec::new()
    }
}

/// A model's weights on a GPU (no value exists in builds without CUDA).
#[cfg(feature = "cuda")]
pub struct GpuModel {
    m: kiln_cuda::CudaModel,
}
#[cfg(not(feature = "cuda"))]
pub enum GpuModel {}

/// The device [`choose`] picked; the weights go there with [`Choice::upload`].
pub struct Choice {
    #[cfg(feature = "cuda")]
    dev: Option<kiln_cuda::Device>,
    /// Whether the choice was `auto` (a notice is printed when the GPU is taken).
    auto: bool,
}

impl Choice {
    /// Whether the GPU was chosen (the model then needs no CPU-side weight copies).
    pub fn is_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.dev.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }
}

/// Opens the GPU when `b` asks for it: `cuda` fails with one line when there is none or this build
/// has no CUDA; `auto` takes the CPU then, quietly when there is no GPU, with a notice when one is
/// there but does not open.
pub fn choose(b: Backend) -> Result<Choice> {
    match b {
        Backend::Cpu => Ok(Choice::cpu(false)),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => bail!("--backend cuda: this kiln was built without CUDA (rebuild with --features cuda)"),
        #[cfg(not(feature = "cuda"))]
        Backend::Auto => Ok(Choice::cpu(true)),
        #[cfg(feature = "cuda")]
        Backend::Cuda | Backend::Auto => {
            let auto = b == Backend::Auto;
            if let Err(e) = kiln_cuda::probe() {
                if auto {
                    return Ok(Choice::cpu(true));
                }
                bail!("--backend cuda: {e}");
            }
            match kiln_cuda::Device::open(0) {
                Ok(dev) => Ok(Choice { dev: Some(dev), auto }),
                Err(e) if auto => {
                    eprintln!("kiln: a GPU is there but cannot be used ({e:#}); running on the CPU");
                    Ok(Choice::cpu(true))
                }
                Err(e) => Err(e.context("--backend cuda")),
            }
        }
    }
}

impl Choice {
    fn cpu(auto: bool) -> Choice {
        Choice {
            #[cfg(feature = "cuda")]
            dev: None,
            auto,
        }
    }

    /// Puts `model`'s weights on the chosen GPU (`None`: the CPU was chosen, or `auto` met a model
    /// the CUDA kernels cannot run: a notice says so). `extra` is what else must fit beside the
    /// weights (KV cache, buffers): a model that does not fit is an error naming both sizes, for
    /// `auto` too (no silent fallback).
    pub fn upload(self, model: &Model, extra: impl FnOnce(&ModelConfig) -> usize) -> Result<Option<GpuModel>> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, extra, self.auto);
            Ok(None)
        }
        #[cfg(feature = "cuda")]
        {
            let Some(dev) = self.dev else { return Ok(None) };
            let w = &model.weights;
            if let Some(why) = kiln_cuda::CudaModel::unsupported(w) {
                if self.auto {
                    eprintln!("kiln: {why}; running on the CPU");
                    return Ok(None);
                }
                bail!("--backend cuda: {why} (use --backend cpu)");
            }
            let (free, total) = dev.memory()?;
            let weights = kiln_cuda::CudaModel::upload_bytes(w);
            let rest = extra(&w.cfg);
            let human = |b: usize| kiln_model::human_bytes(b as u64);
            if weights + rest > free {
                bail!(
                    "the model does not fit in GPU memory: it needs {} (weights {} + KV cache and buffers {}) and {} has {} free of {}; use --backend cpu{}",
                    human(weights + rest),
                    human(weights),
                    human(rest),
                    dev.name,
                    human(free),
                    human(total),
                    if rest > weights { " or a smaller --ctx" } else { "" }
                );
            }
            eprintln!(
                "kiln: {} GPU 0: {} (sm_{}{}, {} free){}",
                if self.auto { "using" } else { "running on" },
                dev.name,
                dev.capability.0,
                dev.capability.1,
                human(free),
                if self.auto { " — --backend cpu to stay on the CPU" } else { "" }
            );
            Ok(Some(GpuModel { m: kiln_cuda::CudaModel::upload(dev, w)? }))
        }
    }
}

impl GpuModel {
    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        #[cfg(feature = "cuda")]
        return &self.m.dev.name;
        #[cfg(not(feature = "cuda"))]
        match *self {}
    }

    /// Chooses the serving path's generation rows for `n_slots` sequences decoded together (the
    /// tensor cores from `kiln_cuda::TENSOR_CORE_MIN_SLOTS` slots; `KILN_CUDA_MMA=1|0` forces):
    /// call before serving. Returns whether they run on the tensor cores.
    pub fn serve_rows_for_slots(&mut self, n_slots: usize) -> bool {
        #[cfg(feature = "cuda")]
        return self.m.serve_rows_for_slots(n_slots);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = n_slots;
            match *self {}
        }
    }

    /// Device bytes a session of `n_ctx` positions needs beside the weights.
    pub fn session_bytes(cfg: &ModelConfig, n_ctx: usize) -> usize {
        #[cfg(feature = "cuda")]
        return kiln_cuda::CudaSession::bytes_needed(cfg, n_ctx);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cfg, n_ctx);
            0
        }
    }

    /// Device bytes the scheduler of `n_slots` slots of `n_ctx` positions needs beside the
    /// weights, at least (work buffers and one sequence's KV blocks).
    pub fn serving_bytes(cfg: &ModelConfig, n_slots: usize, n_ctx: usize) -> usize {
        #[cfg(feature = "cuda")]
        return kiln_cuda::CudaBatch::work_bytes(cfg, n_slots, n_ctx)
            + n_ctx.div_ceil(kiln_cuda::KV_BLOCK) * kiln_cuda::CudaBatch::block_bytes(cfg);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cfg, n_slots, n_ctx);
            0
        }
    }

    /// A sequence of `n_ctx` positions on this GPU.
    pub fn session(&self, n_ctx: usize) -> Result<Box<dyn SequenceForward + '_>> {
        #[cfg(feature = "cuda")]
        return Ok(Box::new(kiln_cuda::CudaSession::new(&self.m, n_ctx)?));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = n_ctx;
            match *self {}
        }
    }

    /// The scheduler's paged KV cache on this GPU: `n_slots` sequences of up to `n_ctx`
    /// positions, `kv_bytes` of KV blocks (`None`: what is free after the work buffers, less a
    /// margin). Returns it with the bytes given to KV blocks.
    pub fn paged(
        &self,
        n_slots: usize,
        n_ctx: usize,
        kv_bytes: Option<usize>,
    ) -> Result<(Box<dyn PagedBackend + '_>, usize)> {
        #[cfg(feature = "cuda")]
        {
            let cfg = &self.m.cfg;
            let work = kiln_cuda::CudaBatch::work_bytes(cfg, n_slots, n_ctx);
            let kv = match kv_bytes {
                Some(b) => b,
                None => {
                    let (free, _) = self.m.dev.memory()?;
                    // Room for the work buffers, cuBLAS's workspace and the graphs, then 95% of the rest.
                    free.saturating_sub(work + (512 << 20)) / 20 * 19
                }
            };
            let b = kiln_cuda::CudaBatch::new(&self.m, n_slots, n_ctx, kv)?;
            let bytes = b.pool().n_blocks() * kiln_cuda::CudaBatch::block_bytes(cfg);
            Ok((Box::new(b), bytes))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (n_slots, n_ctx, kv_bytes);
            match *self {}
        }
    }
}

#[cfg(feature = "cuda")]
impl SequenceForward for kiln_cuda::CudaSession<'_> {
    fn eval(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        kiln_cuda::CudaSession::eval(self, tokens, want)
    }
    fn truncate(&mut self, len: usize) {
        kiln_cuda::CudaSession::truncate(self, len)
    }
}

#[cfg(feature = "cuda")]
impl PagedBackend for kiln_cuda::CudaBatch<'_> {
    fn admit(&mut self, slot: usize, prompt: &[u32], max_len: usize) -> Result<Option<usize>> {
        kiln_cuda::CudaBatch::admit(self, slot, prompt, max_len)
    }
    fn release(&mut self, slot: usize) {
        kiln_cuda::CudaBatch::release(self, slot)
    }
    fn truncate(&mut self, slot: usize, len: usize) {
        kiln_cuda::CudaBatch::truncate(self, slot, len)
    }
    fn prompt_chunk(&self, slot: usize, left: usize) -> usize {
        kiln_cuda::CudaBatch::prompt_chunk(self, slot, left)
    }
    fn rides_along(&self, n: usize) -> bool {
        kiln_cuda::CudaBatch::rides_along(n)
    }
    fn step(&mut self, steps: &[PagedStep<'_>]) -> Result<Vec<Vec<f32>>> {
        let steps: Vec<kiln_cuda::BatchStep<'_>> = steps
            .iter()
            .map(|s| kiln_cuda::BatchStep { slot: s.slot, tokens: s.tokens, want: s.want, prompt: s.prompt })
            .collect();
        kiln_cuda::CudaBatch::step(self, &steps)
    }
    fn blocks(&self) -> BlockUse {
        let p = self.pool();
        BlockUse { used: p.in_use(), cached: p.cached(), total: p.n_blocks() }
    }
    fn take_kv_events(&mut self) -> Vec<crate::kv_events::KvEvent> {
        use crate::kv_events::{KvEvent, StoredBlock};
        use kiln_cuda::pages::PoolEvent;
        self.take_events()
            .into_iter()
            .map(|e| match e {
                PoolEvent::Registered { id, parent, tokens } => {
                    KvEvent::Stored { parent, blocks: vec![StoredBlock { id, tokens }] }
                }
                PoolEvent::Evicted { id } => KvEvent::Removed { ids: vec![id] },
            })
            .collect()
    }
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("GpuModel").field(&self.device_name()).finish()
    }
}
