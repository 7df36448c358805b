//! Collecting named activations from a forward pass, filtered by layer and op.

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use kiln_model::{forward_faulty, Activation, Fault, KvCache, Logits, Observer, Precision};

use super::names;
use crate::Model;

/// One captured activation, row-major `[rows, cols]`.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub layer: Option<usize>,
    pub op: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn name(&self) -> String {
        names::activation_name(self.layer, self.op)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Which activations to keep. `--layers` restricts the per-layer activations only: token_embd,
/// output_norm and logits stay unless `--ops` leaves them out.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    layers: Option<BTreeSet<usize>>,
    ops: Option<BTreeSet<&'static str>>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Validates `layers` against the model's `n_layer` and `ops` against the op names.
    pub fn new(n_layer: usize, layers: Option<&[usize]>, ops: Option<&[String]>) -> Result<Filter> {
        let layers = match layers {
            Some(ls) => {
                if let Some(&bad) = ls.iter().find(|&&l| l >= n_layer) {
                    bail!("layer {bad} is out of range: the model has {n_layer} layers (0..={})", n_layer - 1);
                }
                Some(ls.iter().copied().collect())
            }
            None => None,
        };
        let ops = match ops {
            Some(os) => {
                let mut set = BTreeSet::new();
                for o in os {
                    match names::op_name(o) {
                        Some(op) => set.insert(op),
                        None => {
                            let valid: Vec<&str> = names::all_ops().collect();
                            bail!("unknown op name {o:?} (valid: {})", valid.join(", "));
                        }
                    };
                }
                Some(set)
            }
            None => None,
        };
        Ok(Filter { layers, ops })
    }

    pub fn admits(&self, layer: Option<usize>, op: &str) -> bool {
        let layer_ok = match (layer, &self.layers) {
            (Some(l), Some(set)) => set.contains(&l),
            _ => true,
        };
        layer_ok && self.ops.as_ref().is_none_or(|set| set.contains(op))
    }
}

/// An observer that copies every admitted activation, in the order the forward pass reports them.
pub struct Collector {
    pub filter: Filter,
    pub tensors: Vec<Tensor>,
}

impl Collector {
    pub fn new(filter: Filter) -> Collector {
        Collector { filter, tensors: Vec::new() }
    }
}

impl Observer for Collector {
    fn wants(&self, layer: Option<usize>, op: &'static str) -> bool {
        self.filter.admits(layer, op)
    }

    fn observe(&mut self, a: &Activation) {
        self.tensors.push(Tensor { layer: a.layer, op: a.op, rows: a.rows, cols: a.cols, data: a.data.to_vec() });
    }
}

/// Runs `tokens` in one call from an empty cache with every position's logits (so output_norm and
/// logits cover all positions) and returns the admitted activations in forward order.
pub fn capture(
    model: &Model,
    tokens: &[u32],
    precision: Precision,
    fault: Option<Fault>,
    filter: Filter,
) -> Result<Vec<Tensor>> {
    if tokens.is_empty() {
        bail!("no tokens to run");
    }
    let mut cache = KvCache::new(&model.weights.cfg, tokens.len());
    let mut col = Collector::new(filter);
    forward_faulty(&model.weights, &mut cache, tokens, precision, Logits::All, Some(&mut col), fault)?;
    Ok(col.tensors)
}

/// Summary statistics of one activation; RMS, mean, min and max over its finite values.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub rms: f64,
    pub mean: f64,
    pub min: f32,
    pub max: f32,
    pub nan: usize,
    pub inf: usize,
}

pub fn stats(data: &[f32]) -> Stats {
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0usize);
    let mut s = Stats { min: f32::INFINITY, max: f32::NEG_INFINITY, ..Stats::default() };
    for &v in data {
        if v.is_nan() {
            s.nan += 1;
        } else if v.is_infinite() {
            s.inf += 1;
        } else {
            sum += v as f64;
            sq += v as f64 * v as f64;
            n += 1;
            s.min = s.min.min(v);
            s.max = s.max.max(v);
        }
    }
    if n > 0 {
        s.mean = sum / n as f64;
        s.rms = (sq / n as f64).sqrt();
    } else {
        (s.min, s.max) = (f32::NAN, f32::NAN);
    }
    s
}

/// One line per activation, grouped by layer: the view for eyeballing where values blow up.
pub fn render_stats(tensors: &[Tensor]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<5} {:<13} {:>14} {:>11} {:>11} {:>11} {:>11} {:>5} {:>5}\n",
        "layer", "op", "shape", "rms", "mean", "min", "max", "nan", "inf"
    ));
    for t in tensors {
        let st = stats(&t.data);
        let layer = t.layer.map_or("-".to_string(), |l| l.to_string());
        s.push_str(&format!(
            "{:<5} {:<13} {:>14} {:>11.4e} {:>11.4e} {:>11.4e} {:>11.4e} {:>5} {:>5}\n",
            layer,
            t.op,
            format!("{}x{}", t.rows, t.cols),
            st.rms,
            st.mean,
            st.min,
            st.max,
            st.nan,
            st.inf
        ));
    }
    s
}
