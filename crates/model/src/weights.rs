//! Weights of a Llama-family model, borrowed from the GGUF memory map in their stored types.

use kiln_gguf::GgufFile;
use kiln_quant::matmul::QMatrix;

use crate::{LlamaConfig, ModelError};

pub struct LayerWeights<'a> {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix<'a>,
    pub wk: QMatrix<'a>,
    pub wv: QMatrix<'a>,
    pub wo: QMatrix<'a>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: QMatrix<'a>,
    pub w_up: QMatrix<'a>,
    pub w_down: QMatrix<'a>,
}

pub struct LlamaWeights<'a> {
    pub cfg: LlamaConfig,
    pub token_embd: QMatrix<'a>,
    pub layers: Vec<LayerWeights<'a>>,
    pub output_norm: Vec<f32>,
    /// The LM head: `output.weight`, or `token_embd.weight` when the file ties them.
    pub output: QMatrix<'a>,
    pub output_is_tied: bool,
    /// Per-dimension-pair RoPE frequency divisors (`rope_freqs.weight`, Llama 3.1 style).
    pub rope_freqs: Option<Vec<f32>>,
}

impl<'a> LlamaWeights<'a> {
    pub fn load(g: &'a GgufFile) -> Result<LlamaWeights<'a>, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix<'a>, ModelError> {
            let t = g.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            let expected = vec![cols as u64, rows as u64];
            if t.dims != expected {
                return Err(ModelError::BadShape { name: name.to_string(), found: t.dims.clone(), expected });
            }
            QMatrix::new(t.ggml_type, g.tensor_data(t), rows, cols)
                .map_err(|source| ModelError::Tensor { name: name.to_string(), source })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let t = g.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            if t.dims != [len as u64] {
                return Err(ModelError::BadShape {
                    name: name.to_string(),
                    found: t.dims.clone(),
                    expected: vec![len as u64],
                });
            }
            let mut out = vec![0f32; len];
            kiln_quant::dequantize_row(t.ggml_type, g.tensor_data(t), &mut out)
                .map_err(|source| ModelError::Tensor { name: name.to_string(), source })?;
            Ok(out)
        };
        let token_embd = matrix("token_embd.weight", cfg.n_vocab, cfg.n_embd)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(&n("attn_norm"), cfg.n_embd)?,
                wq: matrix(&n("attn_q"), cfg.q_dim(), cfg.n_embd)?,
                wk: matrix(&n("attn_k"), cfg.kv_dim(), cfg.n_embd)?,
                wv: matrix(&n("attn_v"), cfg.kv_dim(), cfg.n_embd)?,
                wo: matrix(&n("attn_output"), cfg.n_embd, cfg.q_dim())?,
                ffn_norm: vector(&n("ffn_norm"), cfg.n_embd)?,
                w_gate: matrix(&n("ffn_gate"), cfg.n_ff, cfg.n_embd)?,
                w_up: matrix(&n("ffn_up"), cfg.n_ff, cfg.n_embd)?,
                w_down: matrix(&n("ffn_down"), cfg.n_embd, cfg.n_ff)?,
            });
        }
        let output_norm = vector("output_norm.weight", cfg.n_embd)?;
        let (output, output_is_tied) = match g.tensor("output.weight") {
            Some(_) => (matrix("output.weight", cfg.n_vocab, cfg.n_embd)?, false),
            None => (token_embd, true),
        };
        let rope_freqs = match g.tensor("rope_freqs.weight") {
            Some(_) => Some(vector("rope_freqs.weight", cfg.n_rot / 2)?),
            None => None,
        };
        Ok(LlamaWeights { cfg, token_embd, layers, output_norm, output, output_is_tied, rope_freqs })
    }

    /// Bytes of weight data read per generated token (every matrix once, plus one embedding row).
    pub fn bytes_per_token(&self) -> usize {
        let mut b = self.output.data.len() + self.token_embd.data.len() / self.cfg.n_vocab;
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                b += m.data.len();
            }
        }
        b
    }
}
