//! Per-layer key and value cache, f32, laid out `[position][kv_head * head_dim]`.

use crate::forward::Workspace;
use crate::ModelConfig;

pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    /// `keys[layer][pos * kv_dim ..]`
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    /// Positions filled so far.
    pub len: usize,
    /// The forward pass's work buffers for this sequence, reused from call to call.
    pub(crate) buffers: Workspace,
}

impl KvCache {
    /// Zero-initialised, so the OS only commits pages as positions are filled.
    pub fn new(cfg: &ModelConfig, n_ctx: usize) -> KvCache {
        let kv_dim = cfg.kv_dim();
        KvCache {
            n_ctx,
            kv_dim,
            keys: (0..cfg.n_layer).map(|_| vec![0f32; n_ctx * kv_dim]).collect(),
            values: (0..cfg.n_layer).map(|_| vec![0f32; n_ctx * kv_dim]).collect(),
            len: 0,
            buffers: Workspace::default(),
        }
    }

    /// Forgets positions from `len` on (they are overwritten by the next forward).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held when full.
    pub fn capacity_bytes(&self) -> usize {
        2 * self.keys.len() * self.n_ctx * self.kv_dim * std::mem::size_of::<f32>()
    }
}
