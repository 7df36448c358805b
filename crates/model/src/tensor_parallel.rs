//! Tensor parallelism: one model's layers split across `N` ranks (GPUs, or threads of one
//! process), each rank reading only its shard of every matrix.
//!
//! The split (Megatron-LM's, as vLLM's and mistral.rs's): q, k and v are column-parallel by
//! heads — rank `r` holds query heads `r·H/N ..` and the KV heads they read, with their biases,
//! and its own KV cache of those heads (with fewer KV heads than ranks, each KV head is held by
//! the ranks whose query heads read it, as vLLM does); `wo` is row-parallel (rank `r` holds the
//! columns of its heads), so each rank's product is a partial sum of the attention output,
//! completed by one all-reduce. The FFN likewise: gate and up column-parallel by hidden units,
//! down row-parallel, one all-reduce; the hidden units split in whole blocks of `down`'s rows,
//! as evenly as the blocks allow (11008 units in blocks of 256 go 5376 / 5632 over two ranks).
//! Norms, residuals, the embedding and the LM head are replicated. Everything else is the
//! ordinary forward pass over a shard's weights ([`crate::forward::forward_shard`], with the
//! shard's head and hidden-unit counts in its [`ModelConfig`]): the architecture description
//! applies unchanged, post-norms included (they follow the all-reduce).
//!
//! Ranks talk through [`Collective`]; [`LocalCollective`] is `N` threads of one process (the CPU,
//! and the tests: a model split into 2 or 4 shards must give the unsharded logits). An NCCL
//! implementation for several GPUs fits the same trait.

use std::sync::{Barrier, Mutex};

use kiln_quant::matmul::QMatrix;

use crate::forward::{forward_shard, Logits, Precision};
use crate::{KvCache, LayerWeights, ModelConfig, ModelError, ModelWeights, QkvBias};

/// Communication between the ranks of one tensor-parallel model.
pub trait Collective: Sync {
    /// Number of ranks.
    fn ranks(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`s, added in rank
    /// order: the same bits on every rank and in every run. Every rank must call it, with
    /// buffers of one length, the same number of times.
    fn all_reduce_sum(&self, rank: usize, buf: &mut [f32]);
}

/// `N` ranks as threads of one process: each deposits its buffer, all wait, each adds the
/// deposits in rank order, all wait again (so no deposit is overwritten before every rank has
/// read it).
pub struct LocalCollective {
    ranks: usize,
    parts: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl LocalCollective {
    pub fn new(ranks: usize) -> LocalCollective {
        let ranks = ranks.max(1);
        LocalCollective { ranks, parts: Mutex::new(vec![Vec::new(); ranks]), barrier: Barrier::new(ranks) }
    }
}

impl Collective for LocalCollective {
    fn ranks(&self) -> usize {
        self.ranks
    }

    fn all_reduce_sum(&self, rank: usize, buf: &mut [f32]) {
        {
            let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
            parts[rank].clear();
            parts[rank].extend_from_slice(buf);
        }
        self.barrier.wait();
        {
            let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                parts.iter().all(|p| p.len() == buf.len()),
                "all_reduce_sum: ranks gave buffers of different lengths"
            );
            buf.copy_from_slice(&parts[0]);
            for p in &parts[1..] {
                for (b, &v) in buf.iter_mut().zip(p) {
                    *b += v;
                }
            }
        }
        self.barrier.wait();
    }
}

/// The columns of the row-parallel matrices (`wo`, `w_down`) of every rank, copied out of the
/// file's rows (a rank's columns of a quantized row are whole blocks of it), and the checks that
/// the model splits `N` ways. [`ColumnShards::shards`] then lends each rank its weights.
pub struct ColumnShards {
    ranks: usize,
    /// Each rank's FFN hidden units.
    ff: Vec<std::ops::Range<usize>>,
    /// `[rank][layer]`: the bytes of `wo`'s and `w_down`'s columns of that rank, row after row.
    wo: Vec<Vec<Vec<u8>>>,
    down: Vec<Vec<Vec<u8>>>,
}

/// Each rank's FFN hidden units: `n_ff` in blocks of `unit`, rank `r` taking blocks
/// `r·B/N .. (r+1)·B/N`; `None` when a rank would get none.
fn ffn_ranges(n_ff: usize, unit: usize, ranks: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let blocks = n_ff / unit;
    (blocks >= ranks).then(|| (0..ranks).map(|r| r * blocks / ranks * unit..(r + 1) * blocks / ranks * unit).collect())
}

/// Bytes of columns `c0 .. c0 + cols` of every row of `m` (whole blocks).
fn column_bytes(m: &QMatrix, c0: usize, cols: usize) -> Vec<u8> {
    let (bs, ts) = (m.ty.block_size(), m.ty.type_size());
    let (b0, nb) = (c0 / bs, cols / bs);
    let mut out = Vec::with_capacity(m.rows * nb * ts);
    for r in 0..m.rows {
        out.extend_from_slice(&m.row(r)[b0 * ts..(b0 + nb) * ts]);
    }
    out
}

impl ColumnShards {
    /// Checks that `w` splits into `ranks` shards — query and KV heads and hidden units divide
    /// evenly, each rank's columns are whole blocks of its row-parallel matrices, the matrices in
    /// the file's layout (not the CPU's interleaved copy) — and copies out the columns.
    pub fn new(w: &ModelWeights, ranks: usize) -> Result<ColumnShards, ModelError> {
        let cfg = &w.cfg;
        let bad = |why: String| Err(ModelError::BadConfig(format!("tensor parallel over {ranks}: {why}")));
        if ranks == 0 {
            return bad("needs at least one rank".into());
        }
        if !cfg.n_head.is_multiple_of(ranks) {
            return bad(format!("the model's {} query heads do not split evenly", cfg.n_head));
        }
        // KV heads split evenly, or each is repeated on the ranks whose query heads read it.
        let kv = cfg.n_head_kv;
        let repeats = ranks.is_multiple_of(kv) && (cfg.n_head / kv).is_multiple_of(ranks / kv);
        if !(kv.is_multiple_of(ranks) || repeats) {
            return bad(format!("the model's {kv} KV heads neither split evenly nor repeat evenly"));
        }
        let qd = cfg.q_dim() / ranks;
        // Hidden units in whole blocks of every layer's `down` (its rows are whole blocks, so
        // n_ff is a multiple of the largest block size), shared out as evenly as blocks allow.
        let unit = w.layers.iter().map(|lw| lw.w_down.ty.block_size()).max().unwrap_or(1);
        let Some(ff) = ffn_ranges(cfg.n_ff, unit, ranks) else {
            return bad(format!(
                "{} FFN hidden units in blocks of {unit} do not split (a rank would hold none)",
                cfg.n_ff
            ));
        };
        let mut wo = vec![Vec::with_capacity(cfg.n_layer); ranks];
        let mut down = vec![Vec::with_capacity(cfg.n_layer); ranks];
        for (l, lw) in w.layers.iter().enumerate() {
            let mats = [
                ("attn_q", &lw.wq),
                ("attn_k", &lw.wk),
                ("attn_v", &lw.wv),
                ("attn_output", &lw.wo),
                ("ffn_gate", &lw.w_gate),
                ("ffn_up", &lw.w_up),
                ("ffn_down", &lw.w_down),
            ];
            if let Some((name, _)) = mats.iter().find(|(_, m)| m.is_interleaved()) {
                return bad(format!("blk.{l}.{name} is in the CPU's interleaved layout: load the file's layout"));
            }
            if !qd.is_multiple_of(lw.wo.ty.block_size()) {
                return bad(format!(
                    "blk.{l}.attn_output ({}) would split inside its blocks of {} columns ({qd} columns a rank)",
                    lw.wo.ty,
                    lw.wo.ty.block_size()
                ));
            }
            for (r, (wo_r, down_r)) in wo.iter_mut().zip(down.iter_mut()).enumerate() {
                wo_r.push(column_bytes(&lw.wo, r * qd, qd));
                down_r.push(column_bytes(&lw.w_down, ff[r].start, ff[r].len()));
            }
        }
        Ok(ColumnShards { ranks, ff, wo, down })
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Each rank's weights: its rows of q, k, v, gate and up (and bias parts), its columns of wo
    /// and down, everything else shared, and a config with its share of the heads and hidden
    /// units. `w` must be the model [`ColumnShards::new`] was given.
    pub fn shards<'s>(&'s self, w: &ModelWeights<'s>) -> Vec<ModelWeights<'s>> {
        let n = self.ranks;
        let cfg = &w.cfg;
        let (hd, qd) = (cfg.head_dim, cfg.q_dim() / n);
        // KV heads of a rank, and the first one: an even share, or the one its query heads read.
        let kv_heads = (cfg.n_head_kv / n).max(1);
        let kv_first = |r: usize| {
            if cfg.n_head_kv.is_multiple_of(n) {
                r * kv_heads
            } else {
                (r * cfg.n_head / n) / (cfg.n_head / cfg.n_head_kv)
            }
        };
        let kvd = kv_heads * hd;
        let mut shard_cfg = cfg.clone();
        shard_cfg.n_head = cfg.n_head / n;
        shard_cfg.n_head_kv = kv_heads;
        debug_assert_eq!(shard_cfg.q_dim(), qd);
        debug_assert_eq!(shard_cfg.head_dim, hd);
        (0..n)
            .map(|r| {
                let ff = self.ff[r].clone();
                let layers = w
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(l, lw)| {
                        let cols = |m: &QMatrix<'s>, data: &'s [u8], cols: usize| {
                            let mut c = QMatrix::new(m.ty, data, m.rows, cols).expect("whole blocks, checked in new");
                            c.act_planes = m.act_planes;
                            c
                        };
                        LayerWeights {
                            wq: lw.wq.row_block(r * qd, qd),
                            wk: lw.wk.row_block(kv_first(r) * hd, kvd),
                            wv: lw.wv.row_block(kv_first(r) * hd, kvd),
                            qkv_bias: lw.qkv_bias.as_ref().map(|b| {
                                let k0 = kv_first(r) * hd;
                                QkvBias {
                                    q: b.q[r * qd..(r + 1) * qd].to_vec(),
                                    k: b.k[k0..k0 + kvd].to_vec(),
                                    v: b.v[k0..k0 + kvd].to_vec(),
                                }
                            }),
                            wo: cols(&lw.wo, &self.wo[r][l], qd),
                            w_gate: lw.w_gate.row_block(ff.start, ff.len()),
                            w_up: lw.w_up.row_block(ff.start, ff.len()),
                            w_down: cols(&lw.w_down, &self.down[r][l], ff.len()),
                            ..lw.clone()
                        }
                    })
                    .collect();
                ModelWeights { cfg: ModelConfig { n_ff: ff.len(), ..shard_cfg.clone() }, layers, ..w.clone() }
            })
            .collect()
    }
}

/// A model running on `N` ranks as threads of this process, one KV cache per rank: the CPU's
/// tensor-parallel forward (the shards run one after another or side by side as the thread pool
/// allows), which gives what an `N`-GPU run computes.
pub struct TensorParallel<'s> {
    shards: Vec<ModelWeights<'s>>,
    caches: Vec<KvCache>,
    collective: LocalCollective,
}

impl<'s> TensorParallel<'s> {
    /// Ranks of `columns` over `w` (the same model), with caches of `n_ctx` positions.
    pub fn new(
        w: &ModelWeights<'s>,
        columns: &'s ColumnShards,
        n_ctx: usize,
    ) -> Result<TensorParallel<'s>, ModelError> {
        let shards = columns.shards(w);
        let caches = shards.iter().map(|s| KvCache::try_new(&s.cfg, n_ctx)).collect::<Result<Vec<_>, _>>()?;
        Ok(TensorParallel { shards, caches, collective: LocalCollective::new(columns.ranks()) })
    }

    /// Positions in the caches.
    pub fn len(&self) -> usize {
        self.caches[0].len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `tokens` through every rank (each on a thread of its own) and returns the logits
    /// (every rank computes the same; rank 0's are returned).
    pub fn eval(&mut self, tokens: &[u32], precision: Precision, want: Logits) -> Result<Vec<f32>, ModelError> {
        let coll = &self.collective;
        let results: Vec<Result<Vec<f32>, ModelError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = self
                .shards
                .iter()
                .zip(self.caches.iter_mut())
                .enumerate()
                .map(|(rank, (w, cache))| {
                    sc.spawn(move || {
                        let reduce = |buf: &mut [f32]| coll.all_reduce_sum(rank, buf);
                        forward_shard(w, cache, tokens, precision, want, &reduce)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let mut first = None;
        for r in results {
            let logits = r?;
            first.get_or_insert(logits);
        }
        Ok(first.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::ffn_ranges;

    #[test]
    fn hidden_units_split_in_whole_blocks_as_evenly_as_they_allow() {
        // Llama-7B's 11008 units in K-quant blocks of 256 (43 blocks).
        assert_eq!(ffn_ranges(11008, 256, 2), Some(vec![0..5376, 5376..11008]));
        assert_eq!(ffn_ranges(11008, 256, 4), Some(vec![0..2560, 2560..5376, 5376..8192, 8192..11008]));
        assert_eq!(ffn_ranges(11008, 32, 2), Some(vec![0..5504, 5504..11008]));
        assert_eq!(ffn_ranges(512, 256, 4), None);
        assert_eq!(ffn_ranges(512, 256, 2), Some(vec![0..256, 256..512]));
    }
}
