//! The generation forward pass with every pool thread running every operation in lock step.
//!
//! Generating a token runs ~5 parallel operations per layer (q/k/v, attention, output projection,
//! gate/up, down), each a few hundred microseconds of streaming weights. Forked and joined one by
//! one, every operation pays for waking the pool and for threads that sleep between them; here
//! one pool broadcast runs the whole token: each thread keeps its own copy of the residual stream
//! (and does the cheap row-wise work — norms, activation quantization, SwiGLU — itself, on the same
//! inputs, so every copy holds the same bits), takes each product's row tasks from the front of its
//! own contiguous share (one stream of weights for the prefetchers) and then from the back of
//! another's, and meets the others at a spinning barrier where the next operation needs all of
//! the last one's results.
//!
//! Every number is computed by the same functions, in the same order, as in
//! [`crate::forward::forward`]'s sections, so the logits are bit-identical to that path (tested).
//! The keys and values of this step go to the caches after the pass (attention reads them from the
//! pass's own buffers meanwhile), so the caches are only read by the threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kiln_quant::matmul::{self, DotActivations, QMatrix};

use crate::forward::{
    add_in_place, attend_heads, embed, ffn_act_in_place, rms_norm, rms_norm_in_place, shared_rows_per_task, AttnHeads,
    KeyValueRun, Precision, QuerySpans, RopeTable, SeqStep,
};
use crate::lockstep_sync::{PassShares, SharedF32, SpinBarrier};
use crate::{LayerWeights, ModelWeights};

/// The pass's buffers, kept with a sequence's (or a batch's) workspace between calls.
#[derive(Default)]
pub(crate) struct LockstepBuffers {
    /// Query projection, then (in its own buffer) the attention output.
    q: SharedF32,
    attn: SharedF32,
    /// Output of the attention projection, then of the down projection.
    proj: SharedF32,
    gate: SharedF32,
    up: SharedF32,
    /// Each layer's keys and values of this step as the projections give them (before bias,
    /// norm and RoPE), `[layer][n][kv_dim]`.
    keys: SharedF32,
    values: SharedF32,
    logits: SharedF32,
    shares: PassShares,
    /// One per pool thread, indexed by the broadcast index.
    threads: Vec<Mutex<ThreadBuffers>>,
}

impl std::fmt::Debug for LockstepBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockstepBuffers").field("threads", &self.threads.len()).finish_non_exhaustive()
    }
}

/// One thread's own buffers.
#[derive(Default)]
struct ThreadBuffers {
    /// The residual stream `[n][n_embd]` (every thread holds the same bits).
    x: Vec<f32>,
    /// Normed rows, the attention output or the SwiGLU product: whatever the next product reads.
    input: Vec<f32>,
    /// The up projection, read back for SwiGLU; the projections' results, read back for the residual.
    other: Vec<f32>,
    acts: DotActivations,
    /// A row task's results, `[n][rows]`.
    out: Vec<f32>,
    tasks: Vec<(usize, std::ops::Range<usize>)>,
    /// Attention: one query head, the step's new keys and values of one head, scores.
    query: Vec<f32>,
    new_keys: Vec<f32>,
    new_values: Vec<f32>,
    scores: Vec<f32>,
    head_out: Vec<f32>,
    /// The queries of one attention task, stacked, and the positions each sees.
    queries: Vec<f32>,
    spans: Vec<QuerySpans>,
}

/// Whether the lock-step pass is for this pool: no more threads than the cores the process may
/// run on (a thread spinning for one that waits for a core wastes that core: with 4 threads on 2
/// cores the pass ran at a quarter of the sections' speed). `KILN_LOCKSTEP=0` turns it off, to
/// compare.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<(bool, usize)> = std::sync::OnceLock::new();
    let (on, cores) = *ON.get_or_init(|| {
        let on = std::env::var("KILN_LOCKSTEP").map_or(true, |v| v != "0");
        (on, std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    on && rayon::current_num_threads() <= cores
}

/// Held while a lock-step pass runs. Two passes broadcast to the same pool at once could each
/// hold a thread spinning for one the other holds; a second caller takes the sectioned path.
static RUNNING: AtomicBool = AtomicBool::new(false);

struct RunningGuard;

impl RunningGuard {
    fn try_acquire() -> Option<RunningGuard> {
        RUNNING.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| RunningGuard)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// One sequence as the threads see it: its rows in the stacked batch, its cache (read only) and
/// its positions' rotations.
struct SeqView<'a> {
    rows: std::ops::Range<usize>,
    pos0: usize,
    keys: &'a [Vec<f32>],
    values: &'a [Vec<f32>],
    /// One table per RoPE variant of the model.
    ropes: &'a [RopeTable],
}

/// The generation pass over `steps` (already checked: they fit their caches and the vocabulary;
/// every step short enough for the generation kernels). Returns the logits of the rows in
/// `out_rows`, stacked, or `None` when another lock-step pass is running (the caller then takes
/// the sectioned path). Appends the step's keys and values to the caches.
pub(crate) fn forward_lockstep(
    w: &ModelWeights,
    steps: &mut [SeqStep<'_>],
    spans: &[std::ops::Range<usize>],
    ropes: &[Vec<RopeTable>],
    out_rows: &[std::ops::Range<usize>],
    buffers: &mut LockstepBuffers,
) -> Option<Vec<f32>> {
    let _running = RunningGuard::try_acquire()?;
    let cfg = &w.cfg;
    let n = spans.last().map_or(0, |s| s.end);
    let n_out: usize = out_rows.iter().map(|r| r.len()).sum();
    let threads = rayon::current_num_threads().max(1);
    let (e, qd, kvd, ff, nl) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff, cfg.n_layer);
    for (buf, len) in [
        (&mut buffers.q, n * qd),
        (&mut buffers.attn, n * qd),
        (&mut buffers.proj, n * e),
        (&mut buffers.gate, n * ff),
        (&mut buffers.up, n * ff),
        (&mut buffers.keys, nl * n * kvd),
        (&mut buffers.values, nl * n * kvd),
        (&mut buffers.logits, n_out * cfg.n_vocab),
    ] {
        buf.resize(len);
    }
    // Five operations per layer and the LM head.
    buffers.shares.reset(OPS_PER_LAYER * nl + 1, threads);
    buffers.threads.resize_with(threads, Default::default);

    let seqs: Vec<SeqView> = steps
        .iter()
        .zip(spans)
        .zip(ropes)
        .map(|((s, span), ropes)| SeqView {
            rows: span.clone(),
            pos0: s.cache.len,
            keys: &s.cache.keys,
            values: &s.cache.values,
            ropes,
        })
        .collect();
    let tokens: Vec<u32> = steps.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    // Attention tasks: a key-value head over a chunk of one sequence's rows, whose queries share
    // the reads of the keys and values (one row per task for single-token steps).
    let mut attn_tasks = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        let per = shared_rows_per_task(seq.rows.len(), cfg.n_head_kv, threads);
        for r0 in seq.rows.clone().step_by(per) {
            for kh in 0..cfg.n_head_kv {
                attn_tasks.push(AttnTask { seq: i, rows: r0..(r0 + per).min(seq.rows.end), kh });
            }
        }
    }
    let barrier = SpinBarrier::new(threads);
    let pass = Pass {
        w,
        attn_tasks: &attn_tasks,
        seqs: &seqs,
        tokens: &tokens,
        out_rows,
        rms_eps: cfg.rms_eps,
        n,
        threads,
        shared: &*buffers,
        barrier: &barrier,
    };
    rayon::broadcast(|ctx| {
        let _poison = barrier.poison_on_panic();
        let mut own = buffers.threads[ctx.index()].lock().unwrap_or_else(|e| e.into_inner());
        pass.run(ctx.index(), &mut own);
    });
    drop(seqs);

    // The step's keys and values, as the attention saw them, into the caches.
    let (mut key, mut value) = (vec![0f32; cfg.head_dim], vec![0f32; cfg.head_dim]);
    for ((s, span), ropes) in steps.iter_mut().zip(spans).zip(ropes) {
        let p0 = s.cache.len;
        for (l, lw) in w.layers.iter().enumerate() {
            let rope = &ropes[cfg.layers[l].rope];
            for (t, i) in span.clone().enumerate() {
                for kh in 0..cfg.n_head_kv {
                    let from = (l * n + i) * kvd + kh * cfg.head_dim;
                    let to = (p0 + t) * kvd + kh * cfg.head_dim;
                    let (k, v) = (&buffers.keys, &buffers.values);
                    finish_key_value(lw, cfg.rms_eps, k, v, from, kh, rope, t, &mut key, &mut value);
                    s.cache.keys[l][to..to + cfg.head_dim].copy_from_slice(&key);
                    s.cache.values[l][to..to + cfg.head_dim].copy_from_slice(&value);
                }
            }
        }
        s.cache.len += span.len();
    }
    let mut logits = vec![0f32; n_out * cfg.n_vocab];
    buffers.logits.load(0, &mut logits);
    Some(logits)
}

/// One key-value head of one position of this step as the attention uses it: the projections'
/// outputs from `from` in `keys` and `values`, the value plus its bias, the key through
/// [`finish_head`].
#[allow(clippy::too_many_arguments)]
fn finish_key_value(
    lw: &LayerWeights,
    eps: f64,
    keys: &SharedF32,
    values: &SharedF32,
    from: usize,
    kh: usize,
    rope: &RopeTable,
    t: usize,
    key: &mut [f32],
    value: &mut [f32],
) {
    let d = key.len();
    keys.load(from, key);
    values.load(from, value);
    let bias = lw.qkv_bias.as_ref().map(|b| &b.k[kh * d..(kh + 1) * d]);
    finish_head(key, bias, lw.qk_norm.as_ref().map(|n| &n.k[..]), eps, rope, t);
    if let Some(b) = &lw.qkv_bias {
        add_in_place(value, &b.v[kh * d..(kh + 1) * d]);
    }
}

/// One query or key head as the sectioned pass leaves it before attention: plus its bias, through
/// the per-head norm, rotated for the call's token `t` — the same operations on the same elements.
fn finish_head(x: &mut [f32], bias: Option<&[f32]>, norm: Option<&[f32]>, eps: f64, rope: &RopeTable, t: usize) {
    if let Some(b) = bias {
        add_in_place(x, b);
    }
    if let Some(n) = norm {
        rms_norm_in_place(x, n, eps);
    }
    rope.apply_head(t, x);
}

/// One attention task of the pass: key-value head `kh` for rows `rows` of sequence `seq`.
struct AttnTask {
    seq: usize,
    rows: std::ops::Range<usize>,
    kh: usize,
}

/// What every thread of one pass reads.
struct Pass<'a> {
    w: &'a ModelWeights<'a>,
    attn_tasks: &'a [AttnTask],
    seqs: &'a [SeqView<'a>],
    tokens: &'a [u32],
    out_rows: &'a [std::ops::Range<usize>],
    rms_eps: f64,
    n: usize,
    threads: usize,
    shared: &'a LockstepBuffers,
    barrier: &'a SpinBarrier,
}

impl Pass<'_> {
    /// One thread's whole pass.
    fn run(&self, me: usize, own: &mut ThreadBuffers) {
        let (w, cfg, n, sh) = (self.w, &self.w.cfg, self.n, self.shared);
        let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        // Operations in order: their index picks their task shares.
        let mut op = 0..;
        let mut next_op = || (me, op.next().unwrap_or_default());
        own.x.resize(n * e, 0.0);
        for (&tok, xr) in self.tokens.iter().zip(own.x.chunks_exact_mut(e)) {
            embed(w, tok, xr);
        }
        for (l, lw) in w.layers.iter().enumerate() {
            // This layer's keys and values of the step, in `keys` and `values` alike.
            let kv_at = l * n * kvd;
            own.input.resize(n * e, 0.0);
            rms_norm(&own.x, &lw.attn_norm, self.rms_eps, &mut own.input);
            self.product(own, &[(&lw.wq, &sh.q, 0), (&lw.wk, &sh.keys, kv_at), (&lw.wv, &sh.values, kv_at)], next_op());
            self.barrier.wait();

            self.attention(own, l, next_op());
            self.barrier.wait();

            own.input.resize(n * qd, 0.0);
            sh.attn.load(0, &mut own.input);
            self.product(own, &[(&lw.wo, &sh.proj, 0)], next_op());
            self.barrier.wait();

            own.other.resize(n * e, 0.0);
            sh.proj.load(0, &mut own.other);
            if let Some(pn) = &lw.post_norms {
                rms_norm_in_place(&mut own.other, &pn.attn, self.rms_eps);
            }
            add_in_place(&mut own.x, &own.other);
            own.input.resize(n * e, 0.0);
            rms_norm(&own.x, &lw.ffn_norm, self.rms_eps, &mut own.input);
            self.product(own, &[(&lw.w_gate, &sh.gate, 0), (&lw.w_up, &sh.up, 0)], next_op());
            self.barrier.wait();

            own.input.resize(n * ff, 0.0);
            own.other.resize(n * ff, 0.0);
            sh.gate.load(0, &mut own.input);
            sh.up.load(0, &mut own.other);
            ffn_act_in_place(cfg.ffn_activation, &mut own.input, &own.other, Precision::Fast);
            self.product(own, &[(&lw.w_down, &sh.proj, 0)], next_op());
            self.barrier.wait();

            own.other.resize(n * e, 0.0);
            sh.proj.load(0, &mut own.other);
            if let Some(pn) = &lw.post_norms {
                rms_norm_in_place(&mut own.other, &pn.ffn, self.rms_eps);
            }
            add_in_place(&mut own.x, &own.other);
        }

        // The LM head over the rows whose logits are wanted.
        let n_out: usize = self.out_rows.iter().map(|r| r.len()).sum();
        own.other.clear();
        for r in self.out_rows {
            own.other.extend_from_slice(&own.x[r.start * e..r.end * e]);
        }
        own.input.resize(n_out * e, 0.0);
        rms_norm(&own.other, &w.output_norm, self.rms_eps, &mut own.input);
        self.product_of(own, n_out, &[(&w.output, &sh.logits, 0)], next_op());
    }

    /// `out_j = input · m_jᵀ` for the pass's `n` rows of `own.input`: the activations quantized
    /// by each thread, row tasks taken from operation `op`'s shares, results stored from `at_j`
    /// in `out_j`.
    fn product(&self, own: &mut ThreadBuffers, jobs: &[(&QMatrix, &SharedF32, usize)], op: (usize, usize)) {
        self.product_of(own, self.n, jobs, op)
    }

    fn product_of(
        &self,
        own: &mut ThreadBuffers,
        n: usize,
        jobs: &[(&QMatrix, &SharedF32, usize)],
        op: (usize, usize),
    ) {
        let Some(last) = jobs.len().checked_sub(1) else { return };
        let mats: [&QMatrix; MAX_JOBS] = std::array::from_fn(|j| jobs[j.min(last)].0);
        let mats = &mats[..jobs.len()];
        let x = &own.input[..n * mats[0].cols];
        own.acts.quantize(mats, x, n, false);
        matmul::dot_tasks_into(mats, n, self.threads, &mut own.tasks);
        let (me, op) = op;
        let shares = self.shared.shares.operation(op, own.tasks.len());
        while let Some(i) = shares.next(me) {
            let (j, rows) = own.tasks[i].clone();
            let (m, out, at) = jobs[j];
            own.out.resize(n * rows.len(), 0.0);
            matmul::matmul_dot_rows(m, &own.acts, x, rows.clone(), &mut own.out);
            out.store_columns(m.rows, at + rows.start, n, &own.out);
        }
    }

    /// Causal attention of layer `l` for every (row, key-value head) task of operation `op`:
    /// the group's query heads over the cache's positions and the step's new ones, outputs to
    /// `attn`. The arithmetic of [`crate::forward`]'s generation attention, key by key.
    fn attention(&self, own: &mut ThreadBuffers, l: usize, op: (usize, usize)) {
        let (w, cfg) = (self.w, &self.w.cfg);
        let lw = &w.layers[l];
        let (d, qd, kvd, n_kv) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim(), cfg.n_head_kv);
        let group = cfg.n_head / n_kv;
        let layer = cfg.layers[l];
        let heads = AttnHeads::for_layer(cfg, l);
        let scale = heads.scale as f32;
        let sh = self.shared;
        let base = l * self.n * kvd;
        let (me, op) = op;
        let shares = sh.shares.operation(op, self.attn_tasks.len());
        while let Some(task) = shares.next(me) {
            let AttnTask { seq, ref rows, kh } = self.attn_tasks[task];
            let seq = &self.seqs[seq];
            let old = seq.pos0;
            let rope = &seq.ropes[layer.rope];
            // This step's keys and values of the head up to the task's last row, as the
            // attention uses them.
            let new_end = rows.end - seq.rows.start;
            own.new_keys.resize(new_end * d, 0.0);
            own.new_values.resize(new_end * d, 0.0);
            for (t, (k, v)) in own.new_keys.chunks_exact_mut(d).zip(own.new_values.chunks_exact_mut(d)).enumerate() {
                let at = base + (seq.rows.start + t) * kvd + kh * d;
                finish_key_value(lw, self.rms_eps, &sh.keys, &sh.values, at, kh, rope, t, k, v);
            }
            // Each query (a row's query head) sees the cache's keys from `lo`, then this step's
            // up to its row.
            own.query.resize(d, 0.0);
            own.queries.clear();
            own.spans.clear();
            for row in rows.clone() {
                let new = row - seq.rows.start + 1;
                let lo = heads.first_key(old + new - 1);
                for h in kh * group..(kh + 1) * group {
                    sh.q.load(row * qd + h * d, &mut own.query);
                    let bias = lw.qkv_bias.as_ref().map(|b| &b.q[h * d..(h + 1) * d]);
                    let norm = lw.qk_norm.as_ref().map(|n| &n.q[..]);
                    finish_head(&mut own.query, bias, norm, self.rms_eps, rope, new - 1);
                    own.queries.extend_from_slice(&own.query);
                    let spans: QuerySpans = [lo.min(old)..old, lo.saturating_sub(old)..new];
                    own.spans.push(spans);
                }
            }
            let runs = [
                KeyValueRun { keys: &seq.keys[l][kh * d..], values: &seq.values[l][kh * d..], stride: kvd, len: old },
                KeyValueRun { keys: &own.new_keys, values: &own.new_values, stride: d, len: new_end },
            ];
            own.head_out.resize(own.queries.len(), 0.0);
            attend_heads(&own.queries, &own.spans, &runs, scale, &mut own.scores, &mut own.head_out);
            for (i, row) in rows.clone().enumerate() {
                let out = &own.head_out[i * group * d..(i + 1) * group * d];
                sh.attn.store(row * qd + kh * group * d, out);
            }
        }
    }
}

/// Parallel operations per layer: q/k/v, attention, output projection, gate/up, down.
const OPS_PER_LAYER: usize = 5;

/// Most products sharing one operation's activations (q, k and v).
const MAX_JOBS: usize = 3;
