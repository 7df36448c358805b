//! Comparing two runs activation by activation, in forward order, to find the first operation
//! whose output is wrong.
//!
//! Error measure: relative L2, `‖ours − ref‖ / ‖ref‖` over the whole activation, in f64.
//!
//! Threshold of an activation: `max(floor(op kind), GROWTH × upstream)`, where `upstream` is the
//! largest error of the activations compared before it. Errors legitimately grow along the
//! forward pass (each matmul of the default path adds the rounding of its 8-bit activation
//! planes, softmax turns score errors into relative probability errors), so a fixed bar that
//! tolerates the last layer would miss a wrong operation in the first. Tying the bar to the
//! upstream error asks instead: *did this operation add much more error than its inputs had?*
//! The floors cover operations that start from exact inputs (layer 0, the paths agree bit for
//! bit on the embedding and the first norm). See the README section "Finding the first wrong
//! operation" for the measurements behind the numbers.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::capture::Tensor;
use super::names;

/// What kind of computation an op is, which sets how much fresh error the default path may add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Computed the same way in both paths (lookup, norms, RoPE, residual adds, SwiGLU): only
    /// f32 rounding of different inputs.
    Elementwise,
    /// A weight matrix product: the default path rounds its input to 8-bit planes.
    Matmul,
    /// Softmax and the weighted sum of values: f32 sums in the default path, f64 in the exact.
    Attention,
}

pub fn op_kind(op: &str) -> OpKind {
    match op {
        "q" | "k" | "v" | "attn_proj" | "ffn_gate" | "ffn_up" | "ffn_down" | "logits" => OpKind::Matmul,
        "kq_soft_max" | "attn_out" => OpKind::Attention,
        _ => OpKind::Elementwise,
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub floor_elementwise: f64,
    pub floor_matmul: f64,
    pub floor_attention: f64,
    pub growth: f64,
}

/// Chosen from measurement, default path against exact path over 8 tokens on every synth model
/// and SmolLM2 (README, "Finding the first wrong operation"):
/// - with exact inputs (layer 0), the first matmul's error is at most 3.1e-5 (IQ4_XS; SmolLM2
///   1.5e-5, float models 9e-8): the rounding floor is twice that;
/// - norms, RoPE, adds and SwiGLU are computed identically by both paths (0 error from equal
///   inputs); 1e-5 leaves room for another engine's f32 sums while an RMSNorm without epsilon
///   (≥ 4.4e-4 measured) stays far above;
/// - no activation's error exceeded 4.5× the largest error upstream of it: growth 20 leaves
///   4× margin, while the RoPE and LM-head faults sit 100× above it.
pub const THRESHOLDS: Thresholds =
    Thresholds { floor_elementwise: 1e-5, floor_matmul: 6e-5, floor_attention: 6e-5, growth: 20.0 };

impl Thresholds {
    pub fn floor(&self, op: &str) -> f64 {
        match op_kind(op) {
            OpKind::Elementwise => self.floor_elementwise,
            OpKind::Matmul => self.floor_matmul,
            OpKind::Attention => self.floor_attention,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    pub layer: Option<usize>,
    pub op: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub rel_l2: f64,
    pub max_abs: f64,
    /// Largest error of the activations compared before this one.
    pub upstream: f64,
    pub threshold: f64,
}

impl Comparison {
    pub fn name(&self) -> String {
        names::activation_name(self.layer, self.op)
    }

    /// Over the threshold; a NaN error counts as over.
    pub fn exceeds(&self) -> bool {
        self.rel_l2 > self.threshold || self.rel_l2.is_nan()
    }
}

/// Where an activation differs most.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Worst {
    /// (row, relative L2 of the row), worst first.
    pub rows: Vec<(usize, f64)>,
    /// (row, column, ours, reference), largest absolute difference first.
    pub elements: Vec<(usize, usize, f32, f32)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DiffReport {
    pub n_tokens: usize,
    pub comparisons: Vec<Comparison>,
    /// Index into `comparisons` of the first activation over its threshold.
    pub first: Option<usize>,
    pub worst: Option<Worst>,
}

/// Relative L2 and max |diff|. A non-finite value on one side only, or a non-zero activation
/// against an all-zero reference, is an infinite error.
pub fn rel_error(ours: &[f32], reference: &[f32]) -> (f64, f64) {
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        if !a.is_finite() || !b.is_finite() {
            let same = (a.is_nan() && b.is_nan()) || a == b;
            if !same {
                return (f64::INFINITY, f64::INFINITY);
            }
            continue;
        }
        let d = a as f64 - b as f64;
        num += d * d;
        den += b as f64 * b as f64;
        max_abs = max_abs.max(d.abs());
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    (rel, max_abs)
}

fn worst(ours: &Tensor, reference: &Tensor, k: usize) -> Worst {
    let mut rows: Vec<(usize, f64)> =
        (0..reference.rows).map(|r| (r, rel_error(ours.row(r), reference.row(r)).0)).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.truncate(k);
    let mut elements: Vec<(usize, usize, f32, f32)> = Vec::with_capacity(k + 1);
    let diff = |&(_, _, a, b): &(usize, usize, f32, f32)| {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    for (i, (&a, &b)) in ours.data.iter().zip(&reference.data).enumerate() {
        let e = (i / reference.cols, i % reference.cols, a, b);
        if elements.len() < k || diff(&e) > diff(elements.last().expect("k > 0")) {
            elements.push(e);
            elements.sort_by(|x, y| diff(y).total_cmp(&diff(x)));
            elements.truncate(k);
        }
    }
    Worst { rows, elements }
}

/// Compares `ours` with `reference`, in the reference's order. Every reference activation must
/// exist in `ours` with the same shape (a llama.cpp `kq_soft_max` may carry extra all-zero
/// columns of padded cache, which are dropped).
pub fn diff(ours: &[Tensor], reference: &[Tensor], th: &Thresholds, n_tokens: usize) -> Result<DiffReport> {
    let by_name: HashMap<(Option<usize>, &str), &Tensor> = ours.iter().map(|t| ((t.layer, t.op), t)).collect();
    let mut comparisons = Vec::with_capacity(reference.len());
    let mut first = None;
    let mut worst_at = None;
    let mut upstream = 0f64;
    for r in reference {
        let Some(&o) = by_name.get(&(r.layer, r.op)) else {
            bail!("the reference has activation {} but the model does not produce it (layer out of range?)", r.name());
        };
        let trimmed;
        let r = if r.rows == o.rows && r.cols > o.cols && r.op == "kq_soft_max" && padding_is_zero(r, o.cols) {
            let mut data = Vec::with_capacity(o.rows * o.cols);
            for row in 0..r.rows {
                data.extend_from_slice(&r.row(row)[..o.cols]);
            }
            trimmed = Tensor { data, cols: o.cols, ..r.clone() };
            &trimmed
        } else {
            r
        };
        if (r.rows, r.cols) != (o.rows, o.cols) {
            bail!(
                "activation {}: the reference has shape ({}, {}) but the model gives ({}, {})",
                r.name(),
                r.rows,
                r.cols,
                o.rows,
                o.cols
            );
        }
        let (rel_l2, max_abs) = rel_error(&o.data, &r.data);
        let threshold = th.floor(r.op).max(th.growth * upstream);
        let c =
            Comparison { layer: r.layer, op: r.op, rows: r.rows, cols: r.cols, rel_l2, max_abs, upstream, threshold };
        if first.is_none() && c.exceeds() {
            first = Some(comparisons.len());
            worst_at = Some(worst(o, r, 5));
        }
        if rel_l2.is_finite() {
            upstream = upstream.max(rel_l2);
        }
        comparisons.push(c);
    }
    Ok(DiffReport { n_tokens, comparisons, first, worst: worst_at })
}

fn padding_is_zero(r: &Tensor, cols: usize) -> bool {
    (0..r.rows).all(|row| r.row(row)[cols..].iter().all(|&v| v == 0.0))
}

/// The per-layer table (max rel-L2 per layer and op; `!` over threshold, `*` the first
/// divergence), then the first divergence and where it differs most.
pub fn render(report: &DiffReport) -> String {
    let mut s = String::new();
    let cell = |c: &Comparison, is_first: bool| {
        let mark = if is_first {
            "*"
        } else if c.exceeds() {
            "!"
        } else {
            " "
        };
        format!("{:>8.1e}{mark}", c.rel_l2)
    };
    let first_name = report.first.map(|i| report.comparisons[i].name());
    let is_first = |c: &Comparison| first_name.as_deref() == Some(c.name().as_str());
    let mut layers: Vec<usize> = report.comparisons.iter().filter_map(|c| c.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let ops: Vec<&str> =
        names::LAYER_OPS.iter().copied().filter(|op| report.comparisons.iter().any(|c| c.op == *op)).collect();
    s.push_str("relative L2 error per activation (! over its threshold, * first divergence)\n");
    for c in report.comparisons.iter().filter(|c| c.layer.is_none() && names::PRE_OPS.contains(&c.op)) {
        s.push_str(&format!("{:<14}{}\n", c.op, cell(c, is_first(c))));
    }
    if !layers.is_empty() {
        s.push_str("layer");
        for op in &ops {
            s.push_str(&format!(" {:>9}", abbreviate(op)));
        }
        s.push('\n');
        for &l in &layers {
            s.push_str(&format!("{l:>5}"));
            for op in &ops {
                match report.comparisons.iter().find(|c| c.layer == Some(l) && c.op == *op) {
                    Some(c) => s.push_str(&format!(" {}", cell(c, is_first(c)))),
                    None => s.push_str(&format!(" {:>9}", "-")),
                }
            }
            s.push('\n');
        }
    }
    for c in report.comparisons.iter().filter(|c| c.layer.is_none() && names::POST_OPS.contains(&c.op)) {
        s.push_str(&format!("{:<14}{}\n", c.op, cell(c, is_first(c))));
    }
    match report.first {
        None => {
            let max = report.comparisons.iter().map(|c| c.rel_l2).fold(0.0, f64::max);
            s.push_str(&format!(
                "agreement: all {} activations within their thresholds (largest rel-L2 {:.2e})\n",
                report.comparisons.len(),
                max
            ));
        }
        Some(i) => {
            let c = &report.comparisons[i];
            s.push_str(&format!(
                "first divergence: {} (shape {}x{}): rel-L2 {:.3e} > threshold {:.3e} (upstream error {:.2e}), max |diff| {:.3e}\n",
                c.name(),
                c.rows,
                c.cols,
                c.rel_l2,
                c.threshold,
                c.upstream,
                c.max_abs
            ));
            if let Some(w) = &report.worst {
                let per_token = (c.rows / report.n_tokens.max(1)).max(1);
                let at = |row: usize| {
                    if per_token > 1 && c.rows == report.n_tokens * per_token {
                        format!("token {} head {}", row / per_token, row % per_token)
                    } else {
                        format!("token {row}")
                    }
                };
                s.push_str("  worst positions:");
                for &(row, e) in &w.rows {
                    s.push_str(&format!(" [{}] {:.2e};", at(row), e));
                }
                s.push('\n');
                s.push_str("  worst elements:\n");
                for &(row, col, a, b) in &w.elements {
                    s.push_str(&format!("    {} col {col}: ours {a:.6e} reference {b:.6e}\n", at(row)));
                }
            }
        }
    }
    s
}

/// Column headers short enough for a 9-character cell.
fn abbreviate(op: &str) -> &str {
    match op {
        "kq_soft_max" => "softmax",
        "attn_residual" => "attn_res",
        "ffn_swiglu" => "swiglu",
        "ffn_residual" => "ffn_res",
        "attn_norm" => "attn_nrm",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(layer: Option<usize>, op: &'static str, data: Vec<f32>) -> Tensor {
        Tensor { layer, op, rows: 1, cols: data.len(), data }
    }

    #[test]
    fn first_divergence_is_relative_to_upstream_error() {
        let th = Thresholds { floor_elementwise: 1e-6, floor_matmul: 1e-4, floor_attention: 1e-4, growth: 10.0 };
        let reference = vec![
            t(None, "token_embd", vec![1.0, 2.0]),
            t(Some(0), "attn_norm", vec![1.0, 1.0]),
            t(Some(0), "q", vec![1.0, 1.0]),
            t(Some(0), "k", vec![1.0, 1.0]),
        ];
        let mut ours = reference.clone();
        ours[2].data[0] = 1.0 + 5e-5; // rel 3.5e-5: under the matmul floor
        ours[3].data[0] = 1.0 + 2e-4; // rel 1.4e-4: over the floor, within 10x the upstream 3.5e-5
        let r = diff(&ours, &reference, &th, 1).unwrap();
        assert_eq!(r.first, None, "{}", render(&r));
        ours[1].data[1] = 1.0 + 1e-5;
        let r = diff(&ours, &reference, &th, 1).unwrap();
        assert_eq!(r.first, Some(1));
        assert!(render(&r).contains("first divergence: attn_norm-0"));
        let w = r.worst.unwrap();
        assert_eq!(w.elements[0].1, 1);
    }

    #[test]
    fn nan_and_shape_mismatch() {
        assert_eq!(rel_error(&[f32::NAN], &[1.0]).0, f64::INFINITY);
        assert_eq!(rel_error(&[1.0], &[0.0]).0, f64::INFINITY);
        assert_eq!(rel_error(&[0.0], &[0.0]).0, 0.0);
        let a = vec![t(None, "logits", vec![1.0, 2.0])];
        let b = vec![t(None, "logits", vec![1.0, 2.0, 3.0])];
        let e = diff(&a, &b, &THRESHOLDS, 1).unwrap_err().to_string();
        assert!(e.contains("logits") && e.contains("(1, 3)") && e.contains("(1, 2)"), "{e}");
    }
}
