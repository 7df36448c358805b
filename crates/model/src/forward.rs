//! The Llama forward pass: one function, top to bottom, over a batch of consecutive tokens.

use kiln_quant::matmul::{self, dot_f32, dot_f64, QMatrix};
use rayon::prelude::*;

use crate::{Activation, KvCache, LlamaWeights, ModelError, Observer, RopeScaling};

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
    w: &LlamaWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    obs: Option<&mut dyn Observer>,
) -> Result<Vec<f32>, ModelError> {
    // Run on a pool thread: the many short parallel sections inside then start by work stealing
    // instead of waking the pool from outside for each one (a large cost per generated token).
    if rayon::current_thread_index().is_none() {
        let mut result = None;
        rayon::scope(|_| result = Some(forward_in_pool(w, cache, tokens, precision, want, obs)));
        return result.expect("rayon::scope runs its closure");
    }
    forward_in_pool(w, cache, tokens, precision, want, obs)
}

fn forward_in_pool(
    w: &LlamaWeights,
    cache: &mut KvCache,
    tokens: &[u32],
    precision: Precision,
    want: Logits,
    mut obs: Option<&mut dyn Observer>,
) -> Result<Vec<f32>, ModelError> {
    let cfg = &w.cfg;
    let n = tokens.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let pos0 = cache.len;
    if pos0 + n > cache.n_ctx {
        return Err(ModelError::ContextFull { needed: pos0 + n, n_ctx: cache.n_ctx });
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
        return Err(ModelError::TokenOutOfRange { id, n_vocab: cfg.n_vocab });
    }
    let (e, qd, kvd, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
    let mm = |m: &QMatrix, x: &[f32], out: &mut [f32]| match precision {
        Precision::Exact => matmul::matmul_exact(m, x, x.len() / m.cols, out),
        Precision::Fast => matmul::matmul(m, x, x.len() / m.cols, out),
    };

    // Reuse the sequence's work buffers: no allocation per generated token.
    let mut bufs = std::mem::take(&mut cache.buffers);
    bufs.resize(n, e, qd, kvd, ff);
    let Buffers { x, h, q, k, v, attn, proj, gate, up } = &mut bufs;
    for (t, &tok) in tokens.iter().enumerate() {
        w.token_embd.dequantize_row_into(tok as usize, &mut x[t * e..(t + 1) * e]);
    }
    emit(&mut obs, None, "token_embd", n, e, x);

    let rope = RopeTable::new(w, pos0, n);

    for (l, lw) in w.layers.iter().enumerate() {
        let li = Some(l);
        rms_norm(x, &lw.attn_norm, cfg.rms_eps, h);
        emit(&mut obs, li, "attn_norm", n, e, h);

        mm(&lw.wq, h, q);
        mm(&lw.wk, h, k);
        mm(&lw.wv, h, v);
        emit(&mut obs, li, "q", n, qd, q);
        emit(&mut obs, li, "k", n, kvd, k);
        emit(&mut obs, li, "v", n, kvd, v);
        rope.apply(q, cfg.head_dim);
        rope.apply(k, cfg.head_dim);
        emit(&mut obs, li, "q_rope", n, qd, q);
        emit(&mut obs, li, "k_rope", n, kvd, k);

        cache.keys[l][pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(k);
        cache.values[l][pos0 * kvd..(pos0 + n) * kvd].copy_from_slice(v);

        let want_weights = obs.as_ref().is_some_and(|o| o.wants(li, "kq_soft_max"));
        let weights = attention(
            cfg.n_head,
            cfg.n_head_kv,
            cfg.head_dim,
            pos0,
            q,
            &cache.keys[l],
            &cache.values[l],
            precision,
            want_weights,
            attn,
        );
        if let Some(wts) = &weights {
            emit(&mut obs, li, "kq_soft_max", n * cfg.n_head, pos0 + n, wts);
        }
        emit(&mut obs, li, "attn_out", n, qd, attn);

        mm(&lw.wo, attn, proj);
        emit(&mut obs, li, "attn_proj", n, e, proj);
        add_in_place(x, proj);
        emit(&mut obs, li, "attn_residual", n, e, x);

        rms_norm(x, &lw.ffn_norm, cfg.rms_eps, h);
        emit(&mut obs, li, "ffn_norm", n, e, h);
        mm(&lw.w_gate, h, gate);
        mm(&lw.w_up, h, up);
        emit(&mut obs, li, "ffn_gate", n, ff, gate);
        emit(&mut obs, li, "ffn_up", n, ff, up);
        swiglu_in_place(gate, up);
        emit(&mut obs, li, "ffn_swiglu", n, ff, gate);
        mm(&lw.w_down, gate, proj);
        emit(&mut obs, li, "ffn_down", n, e, proj);
        add_in_place(x, proj);
        emit(&mut obs, li, "ffn_residual", n, e, x);
    }
    cache.len = pos0 + n;

    let rows = match want {
        Logits::All => 0..n,
        Logits::Last => n - 1..n,
    };
    let n_out = rows.len();
    let xs = &x[rows.start * e..rows.end * e];
    let mut hn = vec![0f32; n_out * e];
    rms_norm(xs, &w.output_norm, cfg.rms_eps, &mut hn);
    emit(&mut obs, None, "output_norm", n_out, e, &hn);
    let mut logits = vec![0f32; n_out * cfg.n_vocab];
    mm(&w.output, &hn, &mut logits);
    emit(&mut obs, None, "logits", n_out, cfg.n_vocab, &logits);
    cache.buffers = bufs;
    Ok(logits)
}

/// Activation buffers of one forward call, kept in the [`KvCache`] between calls.
#[derive(Default, Debug)]
pub struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Buffers {
    fn resize(&mut self, n: usize, e: usize, qd: usize, kvd: usize, ff: usize) {
        for (buf, len) in [
            (&mut self.x, n * e),
            (&mut self.h, n * e),
            (&mut self.q, n * qd),
            (&mut self.k, n * kvd),
            (&mut self.v, n * kvd),
            (&mut self.attn, n * qd),
            (&mut self.proj, n * e),
            (&mut self.gate, n * ff),
            (&mut self.up, n * ff),
        ] {
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
fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let e = weight.len();
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let scale = 1.0 / (ss / e as f64 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = ((v as f64 * scale) * g as f64) as f32;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gate = silu(gate) * up`.
fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let gv = *g as f64;
        *g = (gv / (1.0 + (-gv).exp()) * u as f64) as f32;
    }
}

/// Rotation angles for the batch's positions, computed in f64 once per forward call.
struct RopeTable {
    /// `[n_tokens][n_rot / 2]` (cos, sin) pairs.
    cos_sin: Vec<(f32, f32)>,
    half: usize,
}

impl RopeTable {
    fn new(w: &LlamaWeights, pos0: usize, n: usize) -> RopeTable {
        let cfg = &w.cfg;
        let half = cfg.n_rot / 2;
        let scale = match cfg.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f) => 1.0 / f,
        };
        let mut cos_sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let p = (pos0 + t) as f64 * scale;
            for i in 0..half {
                let mut theta = cfg.rope_base.powf(-2.0 * i as f64 / cfg.n_rot as f64);
                if let Some(f) = &w.rope_freqs {
                    theta /= f[i] as f64;
                }
                let (s, c) = (p * theta).sin_cos();
                cos_sin.push((c as f32, s as f32));
            }
        }
        RopeTable { cos_sin, half }
    }

    /// Rotates adjacent pairs (x[2i], x[2i+1]) of the first `n_rot` dims of every head
    /// (GGUF Llama weights are permuted for this "normal" pairing at conversion).
    fn apply(&self, x: &mut [f32], head_dim: usize) {
        let n = self.cos_sin.len() / self.half.max(1);
        let row = x.len() / n;
        for (t, xr) in x.chunks_exact_mut(row).enumerate() {
            let cs = &self.cos_sin[t * self.half..(t + 1) * self.half];
            for head in xr.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
                    let (c, s) = (c as f64, s as f64);
                    head[2 * i] = (a * c - b * s) as f32;
                    head[2 * i + 1] = (a * s + b * c) as f32;
                }
            }
        }
    }
}

/// Causal multi-head attention of `n` queries at positions `pos0..` over the cache.
/// Returns the softmax weights `[n * n_head, pos0 + n]` when asked (zeros past each causal limit).
#[allow(clippy::too_many_arguments)]
fn attention(
    n_head: usize,
    n_head_kv: usize,
    d: usize,
    pos0: usize,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    precision: Precision,
    want_weights: bool,
    out: &mut [f32],
) -> Option<Vec<f32>> {
    let kvd = n_head_kv * d;
    let group = n_head / n_head_kv;
    let n_ctx = pos0 + q.len() / (n_head * d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut weights = want_weights.then(|| vec![0f32; q.len() / d * n_ctx]);
    let wchunks: Vec<Option<&mut [f32]>> = match weights.as_mut() {
        Some(wv) => wv.chunks_mut(n_ctx).map(Some).collect(),
        None => (0..q.len() / d).map(|_| None).collect(),
    };
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .zip(wchunks)
        .enumerate()
        // Score buffers are reused across the (token, head) items of a rayon split.
        .for_each_init(
            || (Vec::<f64>::new(), Vec::<f64>::new(), Vec::<f32>::new()),
            |(scores64, acc, scores32), (idx, ((o, qh), wrow))| {
                let (t, h) = (idx / n_head, idx % n_head);
                let kh = h / group;
                let len = pos0 + t + 1;
                let key = |s: usize| &keys[s * kvd + kh * d..s * kvd + kh * d + d];
                let val = |s: usize| &values[s * kvd + kh * d..s * kvd + kh * d + d];
                match precision {
                    Precision::Exact => {
                        scores64.clear();
                        scores64.extend((0..len).map(|s| dot_f64(qh, key(s)) * scale));
                        let max = scores64.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        for s in scores64.iter_mut() {
                            *s = (*s - max).exp();
                        }
                        let exps = &*scores64;
                        let sum: f64 = exps.iter().sum();
                        acc.clear();
                        acc.resize(d, 0.0);
                        for (s, &p) in exps.iter().enumerate() {
                            let p = p / sum;
                            for (a, &vv) in acc.iter_mut().zip(val(s)) {
                                *a += p * vv as f64;
                            }
                        }
                        for (oo, a) in o.iter_mut().zip(acc.iter()) {
                            *oo = *a as f32;
                        }
                        if let Some(wr) = wrow {
                            for (wv, &p) in wr.iter_mut().zip(exps.iter()) {
                                *wv = (p / sum) as f32;
                            }
                        }
                    }
                    Precision::Fast => {
                        let sc = scale as f32;
                        scores32.clear();
                        scores32.extend((0..len).map(|s| dot_f32(qh, key(s)) * sc));
                        let scores = scores32;
                        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0f64;
                        for s in scores.iter_mut() {
                            *s = (*s - max).exp();
                            sum += *s as f64;
                        }
                        let inv = (1.0 / sum) as f32;
                        o.fill(0.0);
                        for (s, &p) in scores.iter().enumerate() {
                            let p = p * inv;
                            for (a, &vv) in o.iter_mut().zip(val(s)) {
                                *a += p * vv;
                            }
                        }
                        if let Some(wr) = wrow {
                            for (wv, &p) in wr.iter_mut().zip(scores.iter()) {
                                *wv = p * inv;
                            }
                        }
                    }
                }
            },
        );
    weights
}
