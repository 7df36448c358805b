//! The forward pass: one function, top to bottom, over a batch of consecutive tokens, for every
//! architecture: the layer sequence is the same, and the [`ModelConfig`] (built from the file's
//! [`crate::arch::Architecture`]) decides at a few fixed points what happens there — the
//! embedding scale, q/k/v biases and per-head norms, RoPE's pairing and base, the attention's
//! scale and window, the post-attention and post-FFN norms, the FFN's activation, the logits'
//! soft-cap.

use kiln_quant::matmul::{self, dot_f64, QMatrix};
use rayon::prelude::*;

use crate::arch::{FfnActivation, RopePairing};
use crate::attention_prompt::attention_prompt;
use crate::forward_lockstep::{forward_lockstep, LockstepBuffers};
use crate::{Activation, Fault, KvCache, ModelConfig, ModelError, ModelWeights, Observer, Rope, RopeScaling};

/// Which arithmetic the forward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// The reference: weights dequantized exactly, f32 activations and KV cache, sums in f64.
    Exact,
    /// The default path (optimised kernels; must stay within the accuracy bars).
    Fast,
}

/// Which positions' logits to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (teacher-forced scoring).
    All,
}

/// Runs `tokens` at positions `cache.len ..` through the model, appends their keys and values to
/// the cache, and returns logits `[n_out, n_vocab]` (n_out = 1 for `Logits::Last`).
pub fn forward(
    w: &ModelWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    obs: Option<&mut dyn Observer>,
) -> Result<Vec<f32>, ModelError> {
    forward_faulty(w, cache, tokens, precision, want, obs, None)
}

/// [`forward`] with a deliberate bug injected, for testing the diagnostics.
#[doc(hidden)]
pub fn forward_faulty(
    w: &ModelWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    obs: Option<&mut dyn Observer>,
    fault: Option<Fault>,
) -> Result<Vec<f32>, ModelError> {
    // A fault is an edit of the model (its description or a weight), run by the ordinary pass.
    let mut storage = Vec::new();
    let faulty;
    let w = match fault {
        Some(f) => {
            faulty = f.apply(w, &mut storage);
            &faulty
        }
        None => w,
    };
    forward_ubatched(w, cache, tokens, precision, want, obs, MAX_UBATCH)
}

/// Most tokens of one sequence in one pass through the layers (llama.cpp's default `n_ubatch`).
/// Longer prompts run as equal micro-batches, so the activation buffers stay bounded whatever the
/// prompt length (a 4096-token prompt on a 1.1B model would otherwise hold ~300 MB of them).
/// Equal parts keep every part on the prompt kernels; each token's results are the same either way.
pub const MAX_UBATCH: usize = 512;

/// [`forward`] with micro-batches of at most `ubatch` tokens (with an observer, one batch: the
/// diagnostics compare whole activations).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn forward_ubatched(
    w: &ModelWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    obs: Option<&mut dyn Observer>,
    ubatch: usize,
) -> Result<Vec<f32>, ModelError> {
    let ubatch = ubatch.max(1);
    // The sequence's own buffers: no allocation per generated token.
    let mut ws = std::mem::take(&mut cache.buffers);
    let result = run_in_pool(|| {
        if obs.is_some() || tokens.len() <= ubatch {
            let mut steps = [SeqStep { cache: &mut *cache, tokens, want }];
            return Ok(forward_steps(w, &mut steps, precision, &mut ws, obs, GenerationPass::Auto, None)?
                .pop()
                .unwrap_or_default());
        }
        // Nothing runs unless all of it can (no half-filled cache on error).
        check_step(&w.cfg, cache, tokens)?;
        let size = tokens.len().div_ceil(tokens.len().div_ceil(ubatch));
        let mut out = Vec::new();
        for part in tokens.chunks(size) {
            let mut steps = [SeqStep { cache: &mut *cache, tokens: part, want }];
            let logits = forward_steps(w, &mut steps, precision, &mut ws, None, GenerationPass::Auto, None)?
                .pop()
                .unwrap_or_default();
            match want {
                Logits::All => out.extend_from_slice(&logits),
                Logits::Last => out = logits,
            }
        }
        Ok(out)
    });
    cache.buffers = ws;
    result
}

/// Whether `tokens` fit after the cache's contents and are all in the vocabulary.
fn check_step(cfg: &ModelConfig, cache: &KvCache, tokens: &[u32]) -> Result<(), ModelError> {
    let needed = cache.len + tokens.len();
    if needed > cache.n_ctx {
        return Err(ModelError::ContextFull { needed, n_ctx: cache.n_ctx });
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
        return Err(ModelError::TokenOutOfRange { id, n_vocab: cfg.n_vocab });
    }
    Ok(())
}

/// One sequence's share of a batched forward step: its cache, the tokens to append, which logits
/// it wants.
pub struct SeqStep<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub want: Logits,
}

/// Runs several sequences in one pass: every matmul runs over all their tokens stacked, RoPE and
/// attention per sequence over its own cache. Returns one logits vector per step, in order.
/// Each sequence's results are bit-identical to running it alone: every row of every operation is
/// computed independently of the others. All steps are checked before anything runs, so on error
/// no cache is modified.
pub fn forward_batch(
    w: &ModelWeights,
    steps: &mut [SeqStep<'_>],
    precision: Precision,
    ws: &mut Workspace,
    obs: Option<&mut dyn Observer>,
) -> Result<Vec<Vec<f32>>, ModelError> {
    run_in_pool(|| forward_steps(w, steps, precision, ws, obs, GenerationPass::Auto, None))
}

/// How a generation step's parallel work is organised (the results are the same bits either way).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationPass {
    /// Lock step where it applies (see below) and no other lock-step pass runs; sections otherwise.
    Auto,
    /// One parallel section per operation.
    Sections,
    /// Every pool thread through every operation ([`crate::forward_lockstep`]). Panics where it does
    /// not apply (an observer, a fault, the exact path, a step long enough for the prompt kernels)
    /// or while another lock-step pass runs.
    Lockstep,
}

/// [`forward_batch`] with the generation pass chosen (to compare the two).
#[doc(hidden)]
pub fn forward_batch_with(
    w: &ModelWeights,
    steps: &mut [SeqStep<'_>],
    ws: &mut Workspace,
    pass: GenerationPass,
) -> Result<Vec<Vec<f32>>, ModelError> {
    run_in_pool(|| forward_steps(w, steps, Precision::Fast, ws, None, pass, None))
}

/// Sums one rank's partial output of a row-parallel matrix (`wo`, `w_down`: each rank holds some
/// of their columns) with the other ranks', in place, the same bits on every rank
/// ([`crate::tensor_parallel`]).
pub type PartialSum<'a> = &'a (dyn Fn(&mut [f32]) + Sync);

/// One rank's share of a tensor-parallel pass: [`forward`] over a shard's weights
/// ([`crate::tensor_parallel::ColumnShards::shards`]) and its own cache (its KV heads), with
/// `reduce` completing each row-parallel product before the residual. Every rank must call it
/// with the same tokens.
/// Runs on the calling thread (not moved onto the pool: ranks wait for each other in `reduce`,
/// and a pool thread waiting there could hold the thread another rank's work needs).
pub fn forward_shard(
    w: &ModelWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    reduce: PartialSum<'_>,
) -> Result<Vec<f32>, ModelError> {
    let mut ws = std::mem::take(&mut cache.buffers);
    let mut steps = [SeqStep { cache: &mut *cache, tokens, want }];
    let r = forward_steps(w, &mut steps, precision, &mut ws, None, GenerationPass::Sections, Some(reduce));
    cache.buffers = ws;
    Ok(r?.pop().unwrap_or_default())
}

/// Runs `f` on a pool thread: the many short parallel sections inside then start by work stealing
/// instead of waking the pool from outside for each one (a large cost per generated token).
fn run_in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut result = None;
    rayon::scope(|_| result = Some(f()));
    result.expect("rayon::scope runs its closure")
}

fn forward_steps(
    w: &ModelWeights,
    steps: &mut [SeqStep<'_>],
    precision: Precision,
    ws: &mut Workspace,
    mut obs: Option<&mut dyn Observer>,
    pass: GenerationPass,
    reduce: Option<PartialSum<'_>>,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let cfg = &w.cfg;
    for s in steps.iter() {
        check_step(cfg, s.cache, s.tokens)?;
    }
    // Row ranges of each step in the stacked batch; empty steps take no rows and get no logits.
    let mut spans = Vec::with_capacity(steps.len());
    let mut n = 0;
    for s in steps.iter() {
        spans.push(n..n + s.tokens.len());
        n += s.tokens.len();
    }
    if n == 0 {
        return Ok(vec![Vec::new(); steps.len()]);
    }
    let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    // Each step's rows take the kernel its token count calls for (f32 matrix-matrix for prompts,
    // 8-bit dot kernels for generation), so batching never changes a sequence's results.
    let row_segments = segments(spans.iter().cloned());
    let mm = |jobs: &mut [(&QMatrix, &mut [f32])], x: &[f32]| matmul_segments(jobs, x, &row_segments, precision);
    let rms_eps = cfg.rms_eps;
    // Per step, one table per RoPE variant of the model (layer `l` takes `cfg.layers[l].rope`).
    let ropes: Vec<Vec<RopeTable>> =
        steps.iter().map(|s| RopeTable::for_model(w, s.cache.len, s.tokens.len())).collect();
    // The rows whose logits are wanted.
    let out_rows: Vec<std::ops::Range<usize>> = steps
        .iter()
        .zip(&spans)
        .map(|(s, span)| match s.want {
            _ if span.is_empty() => span.clone(),
            Logits::All => span.clone(),
            Logits::Last => span.end - 1..span.end,
        })
        .collect();
    let split_logits = |logits: Vec<f32>| {
        let nv = cfg.n_vocab;
        let mut at = 0;
        out_rows
            .iter()
            .map(|r| {
                at += r.len();
                logits[(at - r.len()) * nv..at * nv].to_vec()
            })
            .collect::<Vec<_>>()
    };

    let lockstep_fits = obs.is_none()
        && reduce.is_none()
        && precision == Precision::Fast
        && row_segments.iter().all(|(_, prompt)| !prompt);
    let lockstep = match pass {
        GenerationPass::Sections => false,
        GenerationPass::Auto => lockstep_fits && crate::forward_lockstep::enabled(),
        GenerationPass::Lockstep => {
            assert!(lockstep_fits, "the lock-step pass does not apply to this call");
            true
        }
    };
    if lockstep {
        if let Some(mut logits) = forward_lockstep(w, steps, &spans, &ropes, &out_rows, &mut ws.lockstep) {
            soft_cap(cfg, &mut logits, precision);
            return Ok(split_logits(logits));
        }
        // Another pass runs: take the sections (waiting for it here could hold a thread it needs).
        assert!(pass != GenerationPass::Lockstep, "another lock-step pass is running");
    }

    // Observers see whole activations, and the exact path and the generation kernels have no
    // column pieces: the FFN then runs whole.
    let all_prompt = row_segments.iter().all(|(_, prompt)| *prompt);
    let pieces = obs.is_none() && precision == Precision::Fast && all_prompt;
    let ffn_units: Vec<Option<usize>> = w.layers.iter().map(|lw| ffn_piece_units(&lw.w_down, n, pieces)).collect();
    // gate: q (then the attention output), then the FFN's gate (whole, or a piece and the down
    // sums); up: k and v, then the FFN's up (whole, or a piece).
    let gate_len = ffn_units.iter().map(|u| u.map_or(n * ff, |u| n * (u + e))).fold(n * qd, usize::max);
    let up_len = ffn_units.iter().map(|u| n * u.unwrap_or(ff)).fold(2 * n * kvd, usize::max);
    ws.resize(n * e, gate_len, up_len);
    let Workspace { x, h, gate, up, .. } = ws;
    for (s, span) in steps.iter().zip(&spans) {
        for (&tok, xr) in s.tokens.iter().zip(x[span.start * e..span.end * e].chunks_exact_mut(e)) {
            embed(w, tok, xr);
        }
    }
    emit(&mut obs, None, "token_embd", n, e, x);

    // Attention weights are reported only for a single sequence (rows of one causal triangle).
    let single = steps.len() == 1;

    for (l, lw) in w.layers.iter().enumerate() {
        let li = Some(l);
        rms_norm(x, &lw.attn_norm, rms_eps, h);
        emit(&mut obs, li, "attn_norm", n, e, h);

        // Buffers live only in the attention half borrow the FFN's, which are free then: k and v
        // from `up`, q from `gate` (attention replaces each query head by its output in place);
        // projections land in `h` once the matmul that read it is done.
        let (k, v) = up[..2 * n * kvd].split_at_mut(n * kvd);
        let q = &mut gate[..n * qd];
        mm(&mut [(&lw.wq, &mut *q), (&lw.wk, &mut *k), (&lw.wv, &mut *v)], h);
        if let Some(b) = &lw.qkv_bias {
            add_rows(q, &b.q);
            add_rows(k, &b.k);
            add_rows(v, &b.v);
        }
        emit(&mut obs, li, "q", n, qd, q);
        emit(&mut obs, li, "k", n, kvd, k);
        emit(&mut obs, li, "v", n, kvd, v);
        if let Some(qk) = &lw.qk_norm {
            rms_norm_in_place(q, &qk.q, rms_eps);
            rms_norm_in_place(k, &qk.k, rms_eps);
            emit(&mut obs, li, "q_norm", n, qd, q);
            emit(&mut obs, li, "k_norm", n, kvd, k);
        }
        let layer = cfg.layers[l];
        for (rope, span) in ropes.iter().zip(&spans) {
            rope[layer.rope].apply(&mut q[span.start * qd..span.end * qd], cfg.head_dim);
            rope[layer.rope].apply(&mut k[span.start * kvd..span.end * kvd], cfg.head_dim);
        }
        emit(&mut obs, li, "q_rope", n, qd, q);
        emit(&mut obs, li, "k_rope", n, kvd, k);

        for (s, span) in steps.iter_mut().zip(&spans) {
            let p0 = s.cache.len;
            let rows = p0 * kvd..(p0 + span.len()) * kvd;
            s.cache.keys[l][rows.clone()].copy_from_slice(&k[span.start * kvd..span.end * kvd]);
            s.cache.values[l][rows].copy_from_slice(&v[span.start * kvd..span.end * kvd]);
        }

        let want_weights = single && obs.as_ref().is_some_and(|o| o.wants(li, "kq_soft_max"));
        let seqs: Vec<AttnSeq> = steps
            .iter()
            .zip(&spans)
            .map(|(s, span)| AttnSeq {
                rows: span.clone(),
                pos0: s.cache.len,
                keys: &s.cache.keys[l],
                values: &s.cache.values[l],
                prompt: precision == Precision::Fast && matmul::uses_gemm(span.len()),
            })
            .collect();
        let heads = AttnHeads::for_layer(cfg, l);
        let mut weights = attention(&heads, &seqs, q, precision, want_weights);
        for sq in seqs.iter().filter(|sq| sq.prompt) {
            let w = attention_prompt(
                &heads,
                sq.pos0,
                &mut q[sq.rows.start * qd..sq.rows.end * qd],
                sq.keys,
                sq.values,
                want_weights,
            );
            weights = weights.or(w);
        }
        if let Some(wts) = &weights {
            emit(&mut obs, li, "kq_soft_max", n * cfg.n_head, seqs[0].pos0 + n, wts);
        }
        let attn = q;
        emit(&mut obs, li, "attn_out", n, qd, attn);

        mm(&mut [(&lw.wo, h)], attn);
        if let Some(sum) = reduce {
            sum(h);
        }
        emit(&mut obs, li, "attn_proj", n, e, h);
        if let Some(pn) = &lw.post_norms {
            rms_norm_in_place(h, &pn.attn, rms_eps);
            emit(&mut obs, li, "attn_post_norm", n, e, h);
        }
        add_in_place(x, h);
        emit(&mut obs, li, "attn_residual", n, e, x);

        rms_norm(x, &lw.ffn_norm, rms_eps, h);
        emit(&mut obs, li, "ffn_norm", n, e, h);
        if let Some(units) = ffn_units[l] {
            // A long prompt's FFN piece by piece of `units` hidden units: their gate and up rows,
            // SwiGLU, and the down projection's matching columns added on, so no n × ff buffer
            // exists. Each down output's chain goes on across the pieces: the bits of the
            // whole-matrix path below.
            let (g, down) = gate.split_at_mut(n * units);
            let down = &mut down[..n * e];
            for (i, r0) in (0..ff).step_by(units).enumerate() {
                let rows = units.min(ff - r0);
                let (g, u) = (&mut g[..n * rows], &mut up[..n * rows]);
                let (w_gate, w_up) = (lw.w_gate.row_block(r0, rows), lw.w_up.row_block(r0, rows));
                mm(&mut [(&w_gate, &mut *g), (&w_up, &mut *u)], h);
                ffn_act_in_place(cfg.ffn_activation, g, u, precision);
                kiln_quant::gemm::gemm_cols(&lw.w_down, r0, g, n, down, i > 0);
            }
            if let Some(sum) = reduce {
                sum(down);
            }
            if let Some(pn) = &lw.post_norms {
                rms_norm_in_place(down, &pn.ffn, rms_eps);
            }
            add_in_place(x, down);
            continue;
        }
        let (gate, up) = (&mut gate[..n * ff], &mut up[..n * ff]);
        mm(&mut [(&lw.w_gate, &mut *gate), (&lw.w_up, &mut *up)], h);
        emit(&mut obs, li, "ffn_gate", n, ff, gate);
        emit(&mut obs, li, "ffn_up", n, ff, up);
        ffn_act_in_place(cfg.ffn_activation, gate, up, precision);
        emit(&mut obs, li, "ffn_swiglu", n, ff, gate);
        mm(&mut [(&lw.w_down, h)], gate);
        if let Some(sum) = reduce {
            sum(h);
        }
        emit(&mut obs, li, "ffn_down", n, e, h);
        if let Some(pn) = &lw.post_norms {
            rms_norm_in_place(h, &pn.ffn, rms_eps);
            emit(&mut obs, li, "ffn_post_norm", n, e, h);
        }
        add_in_place(x, h);
        emit(&mut obs, li, "ffn_residual", n, e, x);
    }
    for (s, span) in steps.iter_mut().zip(&spans) {
        s.cache.len += span.len();
    }

    // The rows whose logits are wanted, stacked, through one output matmul.
    let n_out: usize = out_rows.iter().map(|r| r.len()).sum();
    let mut xs = Vec::with_capacity(n_out * e);
    for r in &out_rows {
        xs.extend_from_slice(&x[r.start * e..r.end * e]);
    }
    let mut hn = vec![0f32; n_out * e];
    rms_norm(&xs, &w.output_norm, rms_eps, &mut hn);
    emit(&mut obs, None, "output_norm", n_out, e, &hn);
    let nv = cfg.n_vocab;
    let mut logits = vec![0f32; n_out * nv];
    let mut at = 0;
    let out_segments = segments(out_rows.iter().map(|r| {
        at += r.len();
        at - r.len()..at
    }));
    matmul_segments(&mut [(&w.output, &mut logits)], &hn, &out_segments, precision);
    soft_cap(cfg, &mut logits, precision);
    emit(&mut obs, None, "logits", n_out, nv, &logits);
    Ok(split_logits(logits))
}

/// Consecutive row ranges of the stacked batch that take the same default-path kernel: `(rows,
/// prompt)`, where `prompt` marks a step long enough for the matrix-matrix path.
fn segments(spans: impl Iterator<Item = std::ops::Range<usize>>) -> Vec<(std::ops::Range<usize>, bool)> {
    let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for span in spans.filter(|s| !s.is_empty()) {
        let prompt = matmul::uses_gemm(span.len());
        match out.last_mut() {
            Some((last, p)) if *p == prompt && last.end == span.start => last.end = span.end,
            _ => out.push((span, prompt)),
        }
    }
    out
}

/// `out_j = x · m_jᵀ` for each job over the stacked rows, segment by segment; the matrices of
/// one call share the activations (quantized once) and one parallel section.
fn matmul_segments(
    jobs: &mut [(&QMatrix, &mut [f32])],
    x: &[f32],
    segments: &[(std::ops::Range<usize>, bool)],
    precision: Precision,
) {
    let Some(k) = jobs.first().map(|(m, _)| m.cols) else { return };
    if precision == Precision::Exact {
        for (m, out) in jobs.iter_mut() {
            matmul::matmul_exact(m, x, x.len() / k, out);
        }
        return;
    }
    for (rows, prompt) in segments {
        let xs = &x[rows.start * k..rows.end * k];
        let mut sub: Vec<(&QMatrix, &mut [f32])> =
            jobs.iter_mut().map(|(m, out)| (*m, &mut out[rows.start * m.rows..rows.end * m.rows])).collect();
        if *prompt {
            matmul::matmul_many(&mut sub, xs, rows.len());
        } else {
            matmul::matmul_dot_many(&mut sub, xs, rows.len());
        }
    }
}

/// Tokens from which a prompt's FFN runs in [`FFN_PIECES`] pieces (below, its buffers are small
/// and one piece means fewer parallel sections).
const FFN_PIECE_TOKENS: usize = 256;
/// Pieces of a long prompt's FFN: its n × ff buffers shrink to a quarter and the down projection's
/// activations to a piece's width (SmolLM2-135M at pp512: gate and up 3.1 + 3.1 MB whole).
const FFN_PIECES: usize = 4;

/// Hidden units per piece where a layer's FFN runs piece by piece (gate and up rows, SwiGLU, the
/// down projection's matching columns; see `forward_steps`), or `None` where it runs whole. Pieces
/// need a long step on the matrix-matrix kernels (`pieces`: no observer, the default path, every
/// row a prompt's), whose column pieces give the bits of whole rows; they are whole blocks of the
/// down matrix's format and whole panels.
fn ffn_piece_units(w_down: &QMatrix, n: usize, pieces: bool) -> Option<usize> {
    if !pieces || n < FFN_PIECE_TOKENS {
        return None;
    }
    let ff = w_down.cols;
    let align = kiln_quant::gemm::NR.max(w_down.ty.block_size());
    Some(ff.div_ceil(FFN_PIECES).next_multiple_of(align).min(ff))
}

/// Activation buffers of a forward call, reused between calls: a sequence's own live in its
/// [`KvCache`]; batched callers keep one for [`forward_batch`].
#[derive(Default, Debug)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    /// The FFN's gate and SwiGLU output (or, piece by piece, a piece of them and the down
    /// projection's sums: [`ffn_piece_units`]); in the attention half, q and then in its place
    /// the attention output.
    gate: Vec<f32>,
    /// The FFN's up projection (or a piece of it); in the attention half, k and v.
    up: Vec<f32>,
    /// The lock-step generation pass's buffers.
    lockstep: LockstepBuffers,
}

impl Workspace {
    fn resize(&mut self, x_len: usize, gate_len: usize, up_len: usize) {
        for (buf, len) in
            [(&mut self.x, x_len), (&mut self.h, x_len), (&mut self.gate, gate_len), (&mut self.up, up_len)]
        {
            buf.resize(len, 0.0);
        }
    }
}

fn emit(
    obs: &mut Option<&mut dyn Observer>,
    layer: Option<usize>,
    op: &'static str,
    rows: usize,
    cols: usize,
    data: &[f32],
) {
    if let Some(o) = obs.as_deref_mut() {
        if o.wants(layer, op) {
            o.observe(&Activation { layer, op, rows, cols, data });
        }
    }
}

/// `out = x / sqrt(mean(x²) + eps) * weight`, row by row; the mean is taken in f64.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let e = weight.len();
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        let scale = inv_rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = ((v as f64 * scale) * g as f64) as f32;
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)`, in f64.
fn inv_rms(x: &[f32], eps: f64) -> f64 {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    1.0 / (ss / x.len() as f64 + eps).sqrt()
}

pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// [`rms_norm`] of each `weight.len()`-long piece of `x` in place (a row, or one head of a row):
/// the same arithmetic, so the same bits.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f64) {
    let e = weight.len();
    for xr in x.chunks_exact_mut(e) {
        let scale = inv_rms(xr, eps);
        for (v, &g) in xr.iter_mut().zip(weight) {
            *v = ((*v as f64 * scale) * g as f64) as f32;
        }
    }
}

/// Adds `bias` to every row of `x` (rows of `bias.len()`).
pub(crate) fn add_rows(x: &mut [f32], bias: &[f32]) {
    for xr in x.chunks_exact_mut(bias.len()) {
        add_in_place(xr, bias);
    }
}

/// Token `tok`'s embedding row into `out`, times the architecture's embedding scale.
pub(crate) fn embed(w: &ModelWeights, tok: u32, out: &mut [f32]) {
    w.token_embd.dequantize_row_into(tok as usize, out);
    if let Some(s) = w.cfg.embedding_scale {
        for v in out.iter_mut() {
            *v *= s;
        }
    }
}

/// The final soft-cap `c·tanh(l / c)`, where the architecture sets one (in f64 on the exact path).
pub(crate) fn soft_cap(cfg: &ModelConfig, logits: &mut [f32], precision: Precision) {
    let Some(c) = cfg.logit_softcap else { return };
    match precision {
        Precision::Exact => logits.iter_mut().for_each(|l| *l = (c * (*l as f64 / c).tanh()) as f32),
        Precision::Fast => {
            let c = c as f32;
            logits.iter_mut().for_each(|l| *l = c * (*l / c).tanh());
        }
    }
}

/// The gated FFN's product `gate = act(gate) * up`: in f64 on the exact path, in f32 on the
/// default path (eight lanes at a time, `exp` within 1 ulp: [`kiln_quant::exp`]), where f64 `exp`
/// costs more than the products around it.
pub(crate) fn ffn_act_in_place(act: FfnActivation, gate: &mut [f32], up: &[f32], precision: Precision) {
    // Element by element, so any split gives the same bits; a prompt's is worth the threads.
    const CHUNK: usize = 1 << 14;
    if gate.len() > CHUNK {
        gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(|(g, u)| ffn_act_in_place(act, g, u, precision));
        return;
    }
    match (precision, act) {
        (Precision::Exact, FfnActivation::Silu) => {
            for (g, &u) in gate.iter_mut().zip(up) {
                let gv = *g as f64;
                *g = (gv / (1.0 + (-gv).exp()) * u as f64) as f32;
            }
        }
        (Precision::Exact, FfnActivation::GeluTanh) => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            for (g, &u) in gate.iter_mut().zip(up) {
                let gv = *g as f64;
                *g = (0.5 * gv * (1.0 + (c * (gv + 0.044715 * gv * gv * gv)).tanh()) * u as f64) as f32;
            }
        }
        (Precision::Fast, FfnActivation::Silu) => kiln_quant::exp::silu_mul_in_place(gate, up),
        (Precision::Fast, FfnActivation::GeluTanh) => kiln_quant::exp::gelu_tanh_mul_in_place(gate, up),
    }
}

/// Rotation angles for one sequence's positions, computed in f64 once per forward call.
pub(crate) struct RopeTable {
    /// `[n_tokens][n_rot / 2]` (cos, sin) pairs.
    cos_sin: Vec<(f32, f32)>,
    half: usize,
    pairing: RopePairing,
}

impl RopeTable {
    /// One table per RoPE variant of the model ([`ModelConfig::ropes`]) for positions `pos0 ..
    /// pos0 + n`.
    pub(crate) fn for_model(w: &ModelWeights, pos0: usize, n: usize) -> Vec<RopeTable> {
        w.cfg.ropes.iter().map(|r| RopeTable::new(&w.cfg, r, w.rope_freqs.as_deref(), pos0, n)).collect()
    }

    fn new(cfg: &ModelConfig, rope: &Rope, freqs: Option<&[f32]>, pos0: usize, n: usize) -> RopeTable {
        let half = cfg.n_rot / 2;
        let scale = match rope.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f) => 1.0 / f,
        };
        let mut cos_sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let p = (pos0 + t) as f64 * scale;
            for i in 0..half {
                let mut theta = rope.base.powf(-2.0 * i as f64 / cfg.n_rot as f64);
                if let Some(f) = freqs {
                    theta /= f[i] as f64;
                }
                let (s, c) = (p * theta).sin_cos();
                cos_sin.push((c as f32, s as f32));
            }
        }
        RopeTable { cos_sin, half, pairing: cfg.rope_pairing }
    }

    /// Rotates the pairs of the first `n_rot` dims of every head of every token in `x`.
    fn apply(&self, x: &mut [f32], head_dim: usize) {
        if self.half == 0 || x.is_empty() {
            return;
        }
        let n = self.cos_sin.len() / self.half;
        let row = x.len() / n;
        for (t, xr) in x.chunks_exact_mut(row).enumerate() {
            for head in xr.chunks_exact_mut(head_dim) {
                self.apply_head(t, head);
            }
        }
    }

    /// Rotates one head of the call's token `t` (its first `n_rot` dims).
    pub(crate) fn apply_head(&self, t: usize, head: &mut [f32]) {
        if self.half == 0 {
            return;
        }
        let cs = &self.cos_sin[t * self.half..(t + 1) * self.half];
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (ia, ib) = match self.pairing {
                RopePairing::Adjacent => (2 * i, 2 * i + 1),
                RopePairing::Halves => (i, i + self.half),
            };
            let (a, b) = (head[ia] as f64, head[ib] as f64);
            let (c, s) = (c as f64, s as f64);
            head[ia] = (a * c - b * s) as f32;
            head[ib] = (a * s + b * c) as f32;
        }
    }
}

/// The attention's shape and the layer's options: heads, head size, score scale, window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnHeads {
    pub(crate) n_head: usize,
    pub(crate) n_head_kv: usize,
    pub(crate) d: usize,
    pub(crate) scale: f64,
    pub(crate) window: Option<usize>,
}

impl AttnHeads {
    /// Layer `l`'s attention as the model's description sets it.
    pub(crate) fn for_layer(cfg: &ModelConfig, l: usize) -> AttnHeads {
        AttnHeads {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            d: cfg.head_dim,
            scale: cfg.attention_scale,
            window: cfg.layers[l].window,
        }
    }

    /// The first key position the query at position `pos` sees.
    pub(crate) fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// One sequence's view for attention: its rows in the stacked batch and its cached keys/values
/// (already holding this step's positions).
struct AttnSeq<'a> {
    rows: std::ops::Range<usize>,
    pos0: usize,
    keys: &'a [f32],
    values: &'a [f32],
    /// Whether the sequence's queries go through [`attention_prompt`] instead.
    prompt: bool,
}

/// Causal multi-head attention of each sequence's queries (`qo`, `[n, n_head * d]`) over its own
/// cache, each query head replaced by its output in place (sequences marked `prompt` are left to
/// [`attention_prompt`]). Returns the softmax weights `[n * n_head, pos0 + n]` of a single
/// sequence when asked (zeros past each causal limit).
fn attention(
    heads: &AttnHeads,
    seqs: &[AttnSeq],
    qo: &mut [f32],
    precision: Precision,
    want_weights: bool,
) -> Option<Vec<f32>> {
    let AttnHeads { n_head, n_head_kv, d, scale, .. } = *heads;
    let kvd = n_head_kv * d;
    let group = n_head / n_head_kv;
    // Which sequence each stacked token row belongs to.
    let mut seq_of_row = Vec::with_capacity(qo.len() / (n_head * d));
    for (i, s) in seqs.iter().enumerate() {
        seq_of_row.extend(std::iter::repeat_n(i, s.rows.len()));
    }
    let n_ctx = seqs.first().map_or(0, |s| s.pos0 + s.rows.len());
    if seqs.iter().all(|s| s.prompt) {
        return None;
    }
    // A step of several generation rows (a speculative verification) reads each key and value
    // once for all its rows' queries of a key-value head (below), not once per query.
    let shares = |s: &AttnSeq| precision == Precision::Fast && !want_weights && !s.prompt && s.rows.len() > 1;
    let mut weights = want_weights.then(|| vec![0f32; qo.len() / d * n_ctx]);
    let wchunks: Vec<Option<&mut [f32]>> = match weights.as_mut() {
        Some(wv) => wv.chunks_mut(n_ctx).map(Some).collect(),
        None => (0..qo.len() / d).map(|_| None).collect(),
    };
    qo.par_chunks_mut(d)
        .zip(wchunks)
        .enumerate()
        // Score buffers (and the query's copy) are reused across the (token, head) items of a
        // rayon split.
        .for_each_init(
            || (Vec::<f64>::new(), Vec::<f64>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
            |(scores64, acc, scores32, qh), (idx, (o, wrow))| {
                let (row, h) = (idx / n_head, idx % n_head);
                let seq = &seqs[seq_of_row[row]];
                if seq.prompt || shares(seq) {
                    return;
                }
                // The query head is read whole before its output overwrites it.
                qh.clear();
                qh.extend_from_slice(o);
                let qh = &qh[..];
                let (keys, values) = (seq.keys, seq.values);
                let kh = h / group;
                let len = seq.pos0 + (row - seq.rows.start) + 1;
                let lo = heads.first_key(len - 1);
                let key = |s: usize| &keys[s * kvd + kh * d..s * kvd + kh * d + d];
                let val = |s: usize| &values[s * kvd + kh * d..s * kvd + kh * d + d];
                match precision {
                    Precision::Exact => {
                        scores64.clear();
                        scores64.extend((lo..len).map(|s| dot_f64(qh, key(s)) * scale));
                        let max = scores64.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        for s in scores64.iter_mut() {
                            *s = (*s - max).exp();
                        }
                        let exps = &*scores64;
                        let sum: f64 = exps.iter().sum();
                        acc.clear();
                        acc.resize(d, 0.0);
                        for (s, &p) in (lo..len).zip(exps.iter()) {
                            let p = p / sum;
                            for (a, &vv) in acc.iter_mut().zip(val(s)) {
                                *a += p * vv as f64;
                            }
                        }
                        for (oo, a) in o.iter_mut().zip(acc.iter()) {
                            *oo = *a as f32;
                        }
                        if let Some(wr) = wrow {
                            for (wv, &p) in wr[lo..].iter_mut().zip(exps.iter()) {
                                *wv = (p / sum) as f32;
                            }
                        }
                    }
                    Precision::Fast => {
                        let at = lo * kvd + kh * d;
                        let run = KeyValueRun { keys: &keys[at..], values: &values[at..], stride: kvd, len: len - lo };
                        let inv = attend_head(qh, &[run], scale as f32, scores32, o);
                        if let Some(wr) = wrow {
                            for (wv, &p) in wr[lo..].iter_mut().zip(scores32.iter()) {
                                *wv = p * inv;
                            }
                        }
                    }
                }
            },
        );
    attention_shared(heads, seqs.iter().filter(|s| shares(s)), qo);
    weights
}

/// [`attention`]'s default path for sequences whose step has several generation rows: a task per
/// key-value head and chunk of rows ([`shared_rows_per_task`]), its queries through
/// [`attend_heads`]; the numbers of the per-query path, bit for bit.
fn attention_shared<'a>(heads: &AttnHeads, seqs: impl Iterator<Item = &'a AttnSeq<'a>>, qo: &mut [f32]) {
    let AttnHeads { n_head, n_head_kv, d, scale, .. } = *heads;
    let (kvd, qd, group) = (n_head_kv * d, n_head * d, n_head / n_head_kv);
    let mut tasks = Vec::new();
    for seq in seqs {
        let per = shared_rows_per_task(seq.rows.len(), n_head_kv, rayon::current_num_threads());
        for r0 in seq.rows.clone().step_by(per) {
            for kh in 0..n_head_kv {
                tasks.push((seq, r0..(r0 + per).min(seq.rows.end), kh));
            }
        }
    }
    if tasks.is_empty() {
        return;
    }
    let qo_read: &[f32] = qo;
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(qs, spans, scores), (seq, rows, kh)| {
                qs.clear();
                spans.clear();
                for row in rows.clone() {
                    let len = seq.pos0 + (row - seq.rows.start) + 1;
                    let lo = heads.first_key(len - 1);
                    for h in kh * group..(kh + 1) * group {
                        qs.extend_from_slice(&qo_read[row * qd + h * d..row * qd + (h + 1) * d]);
                        spans.push([lo..len, 0..0]);
                    }
                }
                let run = KeyValueRun {
                    keys: &seq.keys[kh * d..],
                    values: &seq.values[kh * d..],
                    stride: kvd,
                    len: seq.pos0 + seq.rows.len(),
                };
                let mut out = vec![0f32; qs.len()];
                attend_heads(qs, spans, &[run], scale as f32, scores, &mut out);
                out
            },
        )
        .collect();
    for ((_, rows, kh), out) in tasks.iter().zip(outs) {
        for (i, row) in rows.clone().enumerate() {
            let o = &out[i * group * d..(i + 1) * group * d];
            qo[row * qd + kh * group * d..row * qd + (kh + 1) * group * d].copy_from_slice(o);
        }
    }
}

/// `len` consecutive positions of one key-value head: key `s` at `keys[s · stride ..][..d]`, its
/// value at `values[s · stride ..][..d]`.
pub(crate) struct KeyValueRun<'a> {
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) stride: usize,
    pub(crate) len: usize,
}

/// One query head's attention on the default path over the positions of `runs`, in order (the
/// cache's, then, in the lock-step pass, the step's own): scores `q · k · scale` key by key, the
/// softmax with `exp` eight lanes at a time and its sum in f64, then `o` = the weighted values, a
/// multiply and an add per element in position order. Leaves the softmax numerators in `scores`
/// and returns the reciprocal of their sum (the weights are `scores[s] · inv`).
pub(crate) fn attend_head(q: &[f32], runs: &[KeyValueRun], scale: f32, scores: &mut Vec<f32>, o: &mut [f32]) -> f32 {
    scores.clear();
    scores.resize(runs.iter().map(|r| r.len).sum(), 0.0);
    let mut at = 0;
    for r in runs {
        matmul::dot_f32_rows(q, r.keys, r.stride, scale, &mut scores[at..at + r.len]);
        at += r.len;
    }
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s -= max;
    }
    kiln_quant::exp::exp_in_place(scores);
    let inv = (1.0 / kiln_quant::exp::sum_f64(scores)) as f32;
    o.fill(0.0);
    let mut at = 0;
    for r in runs {
        matmul::axpy_f32_rows(o, &scores[at..at + r.len], inv, r.values, r.stride);
        at += r.len;
    }
    inv
}

/// Keys or values of a run read for all the queries of [`attend_heads`] before the next block:
/// 32 positions of a 128-wide head are 16 KiB, in L1 while every query passes over them.
const SHARED_BLOCK: usize = 32;

/// The positions one query of [`attend_heads`] sees in each run (a range of the run's positions).
pub(crate) type QuerySpans = [std::ops::Range<usize>; 2];

/// Several query heads over the same runs of keys and values — the query heads of one key-value
/// head at several rows of one sequence's step (a speculative verification): the keys and values
/// are read block by block, each block once for all of them, instead of once per query. Query
/// `j` (`qs[j·d ..][..d]`) sees positions `spans[j][r]` of run `r` (at most two runs); its output
/// goes to `out[j·d ..][..d]`. Every number is [`attend_head`]'s for that query over those
/// positions, bit for bit: the same scores, each by the same dot product; the same softmax, on
/// the query's scores laid out as `attend_head` lays them out; the same multiply-then-add per
/// output element, in position order (a block's products continue the previous block's sums).
pub(crate) fn attend_heads(
    qs: &[f32],
    spans: &[QuerySpans],
    runs: &[KeyValueRun],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let m = spans.len();
    let d = qs.len() / m.max(1);
    debug_assert!(runs.len() <= 2 && qs.len() == m * d && out.len() == m * d);
    // Query j's scores at `at[j]`: its run 0 positions, then its run 1 positions.
    let total = |sp: &QuerySpans| runs.iter().enumerate().map(|(r, _)| sp[r].len()).sum::<usize>();
    let mut at = Vec::with_capacity(m + 1);
    at.push(0);
    for sp in spans {
        at.push(at[at.len() - 1] + total(sp));
    }
    scores.clear();
    scores.resize(at[m], 0.0);
    // The pieces of run `r`'s positions block by block, each block for every query that sees part
    // of it: (query, positions, where its scores start).
    let at_ref = &at[..];
    let pieces = |r: usize| {
        let lo = spans.iter().map(|sp| sp[r].start).min().unwrap_or(0);
        let hi = spans.iter().map(|sp| sp[r].end).max().unwrap_or(0);
        (lo..hi).step_by(SHARED_BLOCK).flat_map(move |b| {
            let block = b..(b + SHARED_BLOCK).min(hi);
            spans.iter().enumerate().filter_map(move |(j, sp)| {
                let s = block.start.max(sp[r].start)..block.end.min(sp[r].end);
                let first = at_ref[j] + if r == 1 { sp[0].len() } else { 0 };
                (!s.is_empty()).then(|| (j, s.clone(), first + (s.start - sp[r].start)))
            })
        })
    };
    for (r, run) in runs.iter().enumerate() {
        for (j, s, o) in pieces(r) {
            matmul::dot_f32_rows(
                &qs[j * d..(j + 1) * d],
                &run.keys[s.start * run.stride..],
                run.stride,
                scale,
                &mut scores[o..o + s.len()],
            );
        }
    }
    let mut inv = Vec::with_capacity(m);
    for j in 0..m {
        let sc = &mut scores[at[j]..at[j + 1]];
        let max = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for v in sc.iter_mut() {
            *v -= max;
        }
        kiln_quant::exp::exp_in_place(sc);
        inv.push((1.0 / kiln_quant::exp::sum_f64(sc)) as f32);
    }
    out.fill(0.0);
    for (r, run) in runs.iter().enumerate() {
        for (j, s, o) in pieces(r) {
            matmul::axpy_f32_rows(
                &mut out[j * d..(j + 1) * d],
                &scores[o..o + s.len()],
                inv[j],
                &run.values[s.start * run.stride..],
                run.stride,
            );
        }
    }
}

/// Rows of one sequence's step per attention task that shares its key and value reads
/// ([`attend_heads`]): all of them, or fewer where the key-value heads alone would leave threads
/// idle (a task per key-value head and chunk of rows, about two per thread).
pub(crate) fn shared_rows_per_task(rows: usize, n_head_kv: usize, threads: usize) -> usize {
    let chunks = (2 * threads).div_ceil(n_head_kv.max(1)).max(1);
    rows.div_ceil(chunks).max(1)
}
