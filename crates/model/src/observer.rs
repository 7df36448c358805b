//! Named activations of the forward pass, reported to an optional observer.
//!
//! The forward pass checks `Option<&mut dyn Observer>` once per activation, so an absent observer
//! costs a branch, nothing more.

/// One activation: `data` is row-major `[rows, cols]` (rows = tokens, or heads × tokens).
pub struct Activation<'a> {
    /// Layer index, or `None` for activations outside the blocks (token_embd, output_norm, logits).
    pub layer: Option<usize>,
    /// Operation name, e.g. `attn_norm`, `q_rope`, `ffn_down`.
    pub op: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [f32],
}

impl Activation<'_> {
    /// `op-LAYER` for layer activations (llama.cpp's eval-callback style), `op` otherwise.
    pub fn name(&self) -> String {
        match self.layer {
            Some(l) => format!("{}-{}", self.op, l),
            None => self.op.to_string(),
        }
    }
}

pub trait Observer: Send {
    /// Whether the observer wants this activation; lets the forward pass skip building it.
    fn wants(&self, layer: Option<usize>, op: &'static str) -> bool {
        let _ = (layer, op);
        true
    }
    fn observe(&mut self, activation: &Activation);
}
