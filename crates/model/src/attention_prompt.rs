//! Attention for a prompt (many queries of one sequence at once) on the default path, as two
//! matrix products per head: scores `Q·Kᵀ` and output `P·V` run through the f32 matrix-matrix
//! kernel of [`kiln_quant::gemm`], with keys and values packed into its panel layout once per task
//! and shared by all the task's queries. Each query's result is a function of that query alone
//! (fixed summation orders), so it does not depend on how the prompt is split or batched.

use kiln_quant::gemm::{self, MR, NR};

use crate::forward::AttnHeads;
use rayon::prelude::*;

/// Queries per task: enough to amortise packing keys and values, few enough to balance the pool.
const QUERIES_PER_TASK: usize = 8 * MR;

/// Causal attention of the `n` queries `qo` (`[n, n_head * d]`, positions `pos0 ..`) over `keys`
/// and `values` (`[pos, n_head_kv * d]`, already holding the prompt's own positions), each query
/// head replaced by its output in place (no second `[n, n_head * d]` buffer); returns the softmax
/// weights `[n * n_head, pos0 + n]` when asked. Keys before a query's window (`heads.window`) get
/// weight exactly zero.
pub(crate) fn attention_prompt(
    heads: &AttnHeads,
    pos0: usize,
    qo: &mut [f32],
    keys: &[f32],
    values: &[f32],
    want_weights: bool,
) -> Option<Vec<f32>> {
    let AttnHeads { n_head, n_head_kv, d, .. } = *heads;
    let (qd, kvd) = (n_head * d, n_head_kv * d);
    let n = qo.len() / qd;
    let group = n_head / n_head_kv;
    let scale = heads.scale as f32;
    let n_keys = pos0 + n;
    let kblocks = n_keys.div_ceil(NR);
    let dblocks = d.div_ceil(NR);
    // Keys and values of each kv head in the kernel's panel layout, packed once and shared by the
    // head group's queries: keys k-major over the head dim per block of NR keys, values k-major
    // over the keys per block of NR head dims (zeros past the ends).
    let packed: Vec<(Vec<f32>, Vec<f32>)> = (0..n_head_kv)
        .into_par_iter()
        .map(|kh| {
            let mut kp = vec![0f32; kblocks * d * NR];
            for (b, block) in kp.chunks_exact_mut(d * NR).enumerate() {
                for s in 0..NR.min(n_keys - b * NR) {
                    let key = &keys[(b * NR + s) * kvd + kh * d..][..d];
                    for (j, &kv) in key.iter().enumerate() {
                        block[j * NR + s] = kv;
                    }
                }
            }
            let mut vp = vec![0f32; dblocks * n_keys * NR];
            for (jb, block) in vp.chunks_exact_mut(n_keys * NR).enumerate() {
                let j0 = jb * NR;
                let nj = (d - j0).min(NR);
                for (s, dst) in block.chunks_exact_mut(NR).enumerate() {
                    dst[..nj].copy_from_slice(&values[s * kvd + kh * d + j0..][..nj]);
                }
            }
            (kp, vp)
        })
        .collect();
    let tasks: Vec<(usize, usize)> =
        (0..n_head).flat_map(|h| (0..n).step_by(QUERIES_PER_TASK).map(move |t0| (h, t0))).collect();
    let shared_out = SharedOut { ptr: qo.as_mut_ptr(), len: qo.len() };
    // Each task copies its head's columns of its query rows out first, then writes their outputs
    // straight back in their place (no per-task copy to gather); the probabilities and query
    // buffers are reused across the tasks of a rayon split.
    let task_weights: Vec<(usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(probs, q): &mut (Vec<f32>, Vec<f32>), (h, t0)| {
                let t1 = (t0 + QUERIES_PER_TASK).min(n);
                let m = t1 - t0;
                q.resize(m * d, 0.0);
                shared_out.read_block(t0, m, qd, h * d, d, q);
                let (kp, vp) = &packed[h / group];
                // Keys a query of this task may see: up to the last query's position.
                let len = pos0 + t1;
                let ld = len.div_ceil(NR) * NR;
                probs.clear();
                probs.resize(m * ld, 0.0);
                for s0 in (0..len).step_by(NR) {
                    let nk = (len - s0).min(NR);
                    let panel = &kp[s0 / NR * d * NR..][..d * NR];
                    for tt in (0..m).step_by(MR) {
                        let mr = (m - tt).min(MR);
                        gemm::tile(&q[tt * d..], d, mr, panel, &mut probs[tt * ld + s0..], ld, nk, false);
                    }
                }
                // Softmax over each query's causal keys; the rest of its row becomes exact zeros.
                for (i, row) in probs.chunks_exact_mut(ld).enumerate() {
                    let visible = pos0 + t0 + i + 1;
                    let (seen, unseen) = row.split_at_mut(visible);
                    unseen.fill(0.0);
                    let (before, seen) = seen.split_at_mut(heads.first_key(visible - 1));
                    before.fill(0.0);
                    let max = seen.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
                    for v in seen.iter_mut() {
                        *v = *v * scale - max;
                    }
                    kiln_quant::exp::exp_in_place(seen);
                    let inv = (1.0 / kiln_quant::exp::sum_f64(seen)) as f32;
                    for v in seen.iter_mut() {
                        *v *= inv;
                    }
                }
                for j0 in (0..d).step_by(NR) {
                    let nj = (d - j0).min(NR);
                    let panel = &vp[j0 / NR * n_keys * NR..][..len * NR];
                    for tt in (0..m).step_by(MR) {
                        let mr = (m - tt).min(MR);
                        let c = shared_out.tile(t0 + tt, mr, qd, h * d + j0, nj);
                        gemm::tile(&probs[tt * ld..], ld, mr, panel, c, qd, nj, false);
                    }
                }
                want_weights.then(|| (h, t0, probs.clone()))
            },
        )
        .flatten()
        .collect();
    let n_ctx = pos0 + n;
    let mut weights = want_weights.then(|| vec![0f32; n * n_head * n_ctx]);
    if let Some(w) = weights.as_mut() {
        for (h, t0, probs) in task_weights {
            let m = (n - t0).min(QUERIES_PER_TASK);
            let ld = probs.len() / m;
            for i in 0..m {
                let row = (t0 + i) * n_head + h;
                let take = ld.min(n_ctx);
                w[row * n_ctx..row * n_ctx + take].copy_from_slice(&probs[i * ld..i * ld + take]);
            }
        }
    }
    weights
}

/// The queries, then the attention output (`[n, n_head * d]`), shared by the tasks, each of which
/// reads and writes only its own head's columns of its own query rows.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint (query rows, head columns) blocks of the output, which outlives
// them (the parallel section ends before `attention_prompt` returns).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Copies columns `c0 .. c0 + nc` of rows `t .. t + m` (stride `ld`) into `dst` (`m × nc`).
    fn read_block(&self, t: usize, m: usize, ld: usize, c0: usize, nc: usize, dst: &mut [f32]) {
        assert!(c0 + nc <= ld && (t + m) * ld <= self.len && dst.len() == m * nc, "block past the buffer");
        for (i, row) in dst.chunks_exact_mut(nc).enumerate() {
            // SAFETY: in bounds (checked above); these columns of these rows are the calling
            // task's own, which no other task writes or reads.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add((t + i) * ld + c0), row.as_mut_ptr(), nc) };
        }
    }

    /// The output from row `t`, column `c0` to the last of the `nc` columns of row `t + mr - 1`:
    /// what a kernel tile of `mr` rows at stride `ld` writes.
    #[allow(clippy::mut_from_ref)]
    fn tile(&self, t: usize, mr: usize, ld: usize, c0: usize, nc: usize) -> &mut [f32] {
        let start = t * ld + c0;
        let end = (t + mr - 1) * ld + c0 + nc;
        assert!(mr > 0 && c0 + nc <= ld && end <= self.len, "tile past the output");
        // SAFETY: the range is inside the output (checked above), which outlives the tasks; the
        // caller's tile writes only its own rows' columns `c0 .. c0 + nc`, which no other task
        // writes or reads.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }

    /// Causal attention in f64, one query and head at a time.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        n_head: usize,
        n_head_kv: usize,
        d: usize,
        pos0: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let (qd, kvd) = (n_head * d, n_head_kv * d);
        let n = q.len() / qd;
        let n_ctx = pos0 + n;
        let mut out = vec![0f64; n * qd];
        let mut weights = vec![0f64; n * n_head * n_ctx];
        for t in 0..n {
            for h in 0..n_head {
                let kh = h / (n_head / n_head_kv);
                let len = pos0 + t + 1;
                let scores: Vec<f64> = (0..len)
                    .map(|s| {
                        (0..d).map(|j| q[t * qd + h * d + j] as f64 * k[s * kvd + kh * d + j] as f64).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for s in 0..len {
                    let p = e[s] / sum;
                    weights[(t * n_head + h) * n_ctx + s] = p;
                    for j in 0..d {
                        out[t * qd + h * d + j] += p * v[s * kvd + kh * d + j] as f64;
                    }
                }
            }
        }
        (out, weights)
    }

    #[test]
    fn matches_f64_attention_with_gqa_offsets_and_partial_tiles() {
        let mut seed = 5;
        for (n_head, n_head_kv, d, pos0, n) in [(4, 2, 64, 0, 19), (3, 1, 24, 7, 53), (2, 2, 16, 0, 1)] {
            let (qd, kvd) = (n_head * d, n_head_kv * d);
            let q: Vec<f32> = (0..n * qd).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..(pos0 + n) * kvd).map(|_| lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..(pos0 + n) * kvd).map(|_| lcg(&mut seed)).collect();
            let mut out = q.clone();
            let heads = AttnHeads { n_head, n_head_kv, d, scale: 1.0 / (d as f64).sqrt(), window: None };
            let weights = attention_prompt(&heads, pos0, &mut out, &k, &v, true).expect("weights");
            let (want_out, want_w) = naive(n_head, n_head_kv, d, pos0, &q, &k, &v);
            for (i, (&g, &w)) in out.iter().zip(&want_out).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "out[{i}]: {g} vs {w}");
            }
            assert_eq!(weights.len(), want_w.len());
            for (i, (&g, &w)) in weights.iter().zip(&want_w).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-6, "weight[{i}]: {g} vs {w}");
                if w == 0.0 {
                    assert_eq!(g, 0.0, "weight[{i}] past the causal limit");
                }
            }
        }
    }
}
