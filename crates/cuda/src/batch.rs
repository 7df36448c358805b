//! Many sequences on one GPU: a paged KV cache shared by all of them ([`BlockPool`]), and batched
//! steps in which every generating sequence's rows run in one pass while prompts run in chunks.
//!
//! **Batch invariance.** A sequence's results are the same bits whatever else runs beside it:
//! - generation rows (one token, or a token and its drafts) of all sequences run in one pass
//!   through the matrix-vector kernels (or, where turned on, the tensor-core row kernel: one
//!   kernel for every row count) and per-row attention, which compute each row alone, in an
//!   order fixed by the row and the model (never cuBLAS, whose algorithm depends on the batch's
//!   size);
//! - prompts run one sequence per pass, in chunks whose bounds depend on the prompt alone: they
//!   end at multiples of [`PROMPT_CHUNK`] positions (the last one at the prompt's end), so each
//!   chunk's products have the shape they would have if the request ran alone;
//! - a prompt reuses cached blocks (computed for another request with the same leading tokens)
//!   only up to a multiple of [`PROMPT_CHUNK`]: those positions were computed by whole chunks of
//!   the same tokens, so they hold the bits this request would compute.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys, CudaGraph};
use kiln_model::{Logits, ModelConfig};

use crate::forward::{Forward, Pass, KV_BLOCK};
use crate::model::dev_err;
use crate::pages::BlockPool;
use crate::CudaModel;

/// Prompt positions per chunk: prompt chunks end at multiples of this (a multiple of
/// [`KV_BLOCK`]), and cached prefixes are shared in whole chunks.
pub const PROMPT_CHUNK: usize = 256;

/// Rows one sequence may feed in a generation step (a token and up to 14 drafts).
pub const MAX_ROWS_PER_SEQUENCE: usize = 15;

/// Whether `st` runs in a pass of its own: a prompt chunk too long for the one-token kernels.
fn own_pass(st: &BatchStep<'_>) -> bool {
    st.prompt && !CudaBatch::rides_along(st.tokens.len())
}

/// The work of one sequence (slot) in a step.
pub struct BatchStep<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub want: Logits,
    /// A chunk of the prompt (its own pass, see [`CudaBatch::prompt_chunk`]) rather than
    /// generation rows.
    pub prompt: bool,
}

#[derive(Default)]
struct SeqPages {
    blocks: Vec<u32>,
    /// Blocks reserved at admission and not yet taken.
    reserved: usize,
    /// Positions filled.
    len: usize,
    /// The tokens at those positions (to register whole prompt chunks).
    tokens: Vec<u32>,
}

pub struct CudaBatch<'m> {
    f: Forward<'m>,
    pool: BlockPool,
    seqs: Vec<SeqPages>,
    /// Positions per sequence.
    pub n_ctx: usize,
    graphs: HashMap<usize, CudaGraph>,
    /// Row counts of generation passes run eagerly once (kernels are loaded at first launch,
    /// which a capture does not allow): the next pass of that size is captured.
    seen: Vec<bool>,
    /// Whether generation passes replay captured CUDA graphs (`KILN_CUDA_GRAPH=0` turns it off).
    pub use_graph: bool,
}

impl<'m> CudaBatch<'m> {
    /// `n_slots` sequences of up to `n_ctx` positions over a KV pool of `kv_bytes` bytes
    /// (both layers' keys and values, f32).
    pub fn new(m: &'m CudaModel, n_slots: usize, n_ctx: usize, kv_bytes: usize) -> Result<CudaBatch<'m>> {
        let per_block = Self::block_bytes(&m.cfg);
        let n_blocks = kv_bytes / per_block;
        let per_seq = n_ctx.div_ceil(KV_BLOCK);
        if n_blocks < per_seq {
            bail!(
                "KV memory of {} MiB holds {n_blocks} blocks of {KV_BLOCK} positions, less than one sequence of {n_ctx} positions needs ({per_seq}): raise --kv-memory or lower --ctx",
                kv_bytes >> 20
            );
        }
        let n_slots = n_slots.max(1);
        let rows = Self::rows(n_slots);
        let f = Forward::new(m, n_ctx, rows, n_blocks, n_slots * per_seq)?;
        let use_graph = std::env::var("KILN_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true);
        Ok(CudaBatch {
            f,
            pool: BlockPool::new(n_blocks, KV_BLOCK),
            seqs: (0..n_slots).map(|_| SeqPages::default()).collect(),
            n_ctx,
            graphs: HashMap::new(),
            seen: vec![false; rows + 1],
            use_graph,
        })
    }

    /// Device bytes of one KV block (keys and values of every layer).
    pub fn block_bytes(cfg: &ModelConfig) -> usize {
        crate::forward::kv_bytes(cfg, 1)
    }

    /// Device bytes of the work buffers (beyond the KV pool) for `n_slots` sequences.
    pub fn work_bytes(cfg: &ModelConfig, n_slots: usize, n_ctx: usize) -> usize {
        crate::forward::work_bytes(cfg, Self::rows(n_slots), n_ctx)
    }

    fn rows(n_slots: usize) -> usize {
        PROMPT_CHUNK.max(n_slots.max(1) * MAX_ROWS_PER_SEQUENCE)
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The prefix cache's registrations and evictions since the last call.
    pub fn take_events(&mut self) -> Vec<crate::pages::PoolEvent> {
        self.pool.take_events()
    }

    pub fn n_slots(&self) -> usize {
        self.seqs.len()
    }

    /// Positions filled in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.seqs[slot].len
    }

    /// Takes `slot` (empty) for a prompt whose sequence may grow to `max_len` positions: shares
    /// the cached blocks of the prompt's leading whole chunks and reserves the rest. Returns the
    /// positions shared (the prompt's evaluation starts there), or `None` when the blocks are not
    /// there now (the request should wait); an error when the pool could never hold it.
    pub fn admit(&mut self, slot: usize, prompt: &[u32], max_len: usize) -> Result<Option<usize>> {
        self.release(slot);
        let max_len = max_len.min(self.n_ctx).max(prompt.len());
        let need = max_len.div_ceil(KV_BLOCK);
        if need > self.pool.n_blocks() {
            bail!(
                "the request needs {need} KV blocks ({max_len} positions) but the pool has {}: lower max_tokens or raise --kv-memory",
                self.pool.n_blocks()
            );
        }
        // At least one prompt token must run (for its logits); sharing stops at a whole chunk.
        let chunk_blocks = PROMPT_CHUNK / KV_BLOCK;
        let max_chunks = (prompt.len() - 1) / PROMPT_CHUNK;
        let mut shared = self.pool.lookup(prompt, max_chunks * chunk_blocks);
        shared.truncate(shared.len() / chunk_blocks * chunk_blocks);
        let more = need - shared.len();
        if !self.pool.admit(&shared, more) {
            return Ok(None);
        }
        let keep = shared.len() * KV_BLOCK;
        let s = &mut self.seqs[slot];
        s.blocks = shared;
        s.reserved = more;
        s.len = keep;
        s.tokens = prompt[..keep].to_vec();
        Ok(Some(keep))
    }

    /// Gives back `slot`'s blocks (shared ones stay with their other users; registered ones stay
    /// cached) and the rest of its reservation.
    pub fn release(&mut self, slot: usize) {
        let s = std::mem::take(&mut self.seqs[slot]);
        self.pool.release(&s.blocks, s.reserved);
    }

    /// Forgets `slot`'s positions from `len` on (rejected drafts); its blocks stay reserved to it.
    pub fn truncate(&mut self, slot: usize, len: usize) {
        let s = &mut self.seqs[slot];
        s.len = s.len.min(len);
        s.tokens.truncate(s.len);
    }

    /// Prompt tokens to read next in `slot` out of `left`: up to the next multiple of
    /// [`PROMPT_CHUNK`] positions (chunk bounds that depend on the prompt alone).
    pub fn prompt_chunk(&self, slot: usize, left: usize) -> usize {
        let at = self.seqs[slot].len;
        left.min(PROMPT_CHUNK - at % PROMPT_CHUNK)
    }

    /// Runs one step: the generation rows of every non-prompt step in one pass, then each prompt
    /// chunk in its own. Returns each step's logits (its last row, or all its rows), in order.
    /// Everything is checked first: on error no sequence has changed.
    pub fn step(&mut self, steps: &[BatchStep<'_>]) -> Result<Vec<Vec<f32>>> {
        let nv = self.f.m.cfg.n_vocab;
        let mut gen_rows = 0;
        for (i, st) in steps.iter().enumerate() {
            let s = self.seqs.get(st.slot).ok_or_else(|| anyhow!("internal: no slot {}", st.slot))?;
            if steps[..i].iter().any(|o| o.slot == st.slot) {
                bail!("internal: slot {} twice in one step", st.slot);
            }
            let end = s.len + st.tokens.len();
            if end > self.n_ctx {
                return Err(kiln_model::ModelError::ContextFull { needed: end, n_ctx: self.n_ctx }.into());
            }
            if end.div_ceil(KV_BLOCK) > s.blocks.len() + s.reserved {
                bail!("internal: slot {} grows past its reservation", st.slot);
            }
            if let Some(&id) = st.tokens.iter().find(|&&t| t as usize >= nv) {
                return Err(kiln_model::ModelError::TokenOutOfRange { id, n_vocab: nv }.into());
            }
            if st.prompt && st.tokens.len() > PROMPT_CHUNK - s.len % PROMPT_CHUNK {
                bail!("internal: a prompt chunk crosses a chunk bound");
            }
            if !own_pass(st) {
                gen_rows += st.tokens.len();
            }
        }
        if gen_rows > self.f.rows {
            bail!("internal: {gen_rows} generation rows for buffers of {}", self.f.rows);
        }
        // Blocks for the new positions, out of each sequence's reservation.
        for st in steps {
            let s = &mut self.seqs[st.slot];
            while s.blocks.len() < (s.len + st.tokens.len()).div_ceil(KV_BLOCK) {
                let b = self.pool.take().ok_or_else(|| anyhow!("internal: a reservation ran out"))?;
                s.reserved -= 1;
                s.blocks.push(b);
            }
        }
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); steps.len()];
        // Generation rows of all sequences, and prompt chunks short enough for the same kernels
        // (they would take them alone too): one pass.
        if gen_rows > 0 {
            let (mut tokens, mut pos, mut tbl, mut bt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for st in steps.iter().filter(|s| !own_pass(s)) {
                let s = &self.seqs[st.slot];
                let off = bt.len() as i32;
                bt.extend(s.blocks.iter().map(|&b| b as i32));
                for (j, &t) in st.tokens.iter().enumerate() {
                    tokens.push(t);
                    pos.push((s.len + j) as i32);
                    tbl.push(off);
                }
            }
            self.f.upload_rows(&tokens, &pos, &tbl, Some(&bt))?;
            self.generation_pass(gen_rows)?;
            let all = self.f.logits_rows(0, gen_rows)?;
            let mut row = 0;
            for (i, st) in steps.iter().enumerate().filter(|(_, s)| !own_pass(s)) {
                let n = st.tokens.len();
                out[i] = match st.want {
                    Logits::All => all[row * nv..(row + n) * nv].to_vec(),
                    Logits::Last => all[(row + n - 1) * nv..(row + n) * nv].to_vec(),
                };
                row += n;
            }
        }
        // Prompt chunks: a pass each.
        for (i, st) in steps.iter().enumerate().filter(|(_, s)| own_pass(s)) {
            let s = &self.seqs[st.slot];
            let n = st.tokens.len();
            let pos: Vec<i32> = (s.len..s.len + n).map(|p| p as i32).collect();
            let bt: Vec<i32> = s.blocks.iter().map(|&b| b as i32).collect();
            self.f.upload_rows(st.tokens, &pos, &vec![0; n], Some(&bt))?;
            let p = Pass { off: 0, n, gemm: self.f.gemm_for(n), mma: false };
            self.f.run(p, Some(st.want), 0)?;
            out[i] = self.f.logits_rows(0, if st.want == Logits::All { n } else { 1 })?;
        }
        self.f.m.dev.stream.synchronize().map_err(dev_err)?;
        // The new positions, and the prompt blocks now complete in whole chunks.
        for st in steps {
            let s = &mut self.seqs[st.slot];
            let start = s.len;
            s.len += st.tokens.len();
            s.tokens.extend_from_slice(st.tokens);
            // Everything before a whole chunk is whole chunks too (or shared ones): registration
            // only needs each block's parent registered, which `register` checks.
            let whole_chunk = st.prompt && start.is_multiple_of(PROMPT_CHUNK) && st.tokens.len() == PROMPT_CHUNK;
            if whole_chunk {
                for b in start / KV_BLOCK..s.len / KV_BLOCK {
                    let parent = b.checked_sub(1).map(|p| s.blocks[p]);
                    self.pool.register(s.blocks[b], parent, &s.tokens[b * KV_BLOCK..(b + 1) * KV_BLOCK]);
                }
            }
        }
        Ok(out)
    }

    /// Whether a prompt chunk of `n` tokens runs in the generation pass: chunks of up to
    /// [`crate::MATVEC_MAX_TOKENS`] take the matrix-vector kernels alone as well, so their rows
    /// are the same bits there, and they join the step's one pass instead of a pass of their own.
    pub fn rides_along(n: usize) -> bool {
        n <= crate::MATVEC_MAX_TOKENS
    }

    /// The generation pass over the uploaded rows: a captured graph per row count once that
    /// count has run eagerly (the graph reads positions and tables from the uploaded rows).
    fn generation_pass(&mut self, n: usize) -> Result<()> {
        // Every row count takes the same kernels (the tensor-core row kernel where the model
        // allows it), so a row's bits do not depend on how many sequences share the step.
        let p = Pass { off: 0, n, gemm: false, mma: self.f.m.mma_rows };
        if self.use_graph {
            if !self.graphs.contains_key(&n) && self.seen[n] {
                let s = &self.f.m.dev.stream;
                s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(dev_err)?;
                let r = self.f.run(p, Some(Logits::All), 0);
                let g = s.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(dev_err);
                r?;
                match g? {
                    Some(g) => {
                        self.graphs.insert(n, g);
                    }
                    None => self.use_graph = false,
                }
            }
            if let Some(g) = self.graphs.get(&n) {
                return g.launch().map_err(dev_err);
            }
        }
        self.seen[n] = true;
        self.f.run(p, Some(Logits::All), 0)
    }
}
