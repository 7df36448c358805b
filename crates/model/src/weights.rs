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

/// Names of the matrices every generated token multiplies by (the LM head when it is its own
/// tensor, not the embedding table).
fn product_matrices(cfg: &LlamaConfig) -> Vec<String> {
    let mut names = Vec::with_capacity(7 * cfg.n_layer + 1);
    for l in 0..cfg.n_layer {
        for s in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            names.push(format!("blk.{l}.{s}.weight"));
        }
    }
    names.push("output.weight".to_string());
    names
}

/// Weaves the product matrices that have an interleaved layout ([`kiln_quant::interleave`]) in
/// `g`'s private copy of the data ([`GgufFile::copy_data_to_huge_pages`]), for the generation
/// kernels that read eight rows at once; returns their names, to pass to
/// [`LlamaWeights::load_interleaved`]. Nothing changes without a copy, with one activation plane
/// (`KILN_ACT=q8`, whose kernels read rows), or for matrices of other types or shapes.
pub fn interleave_matrices(g: &mut GgufFile) -> Result<Vec<String>, ModelError> {
    let cfg = LlamaConfig::from_gguf(g)?;
    if kiln_quant::matmul::activation_planes() != 2 {
        return Ok(Vec::new());
    }
    let mut done = Vec::new();
    for name in product_matrices(&cfg) {
        let Some(t) = g.tensor(&name) else { continue };
        let ty = t.ggml_type;
        let [cols, rows] = t.dims[..] else { continue };
        let (cols, rows) = (cols as usize, rows as usize);
        let bs = ty.block_size();
        if !kiln_quant::interleave::supports(ty) || rows < kiln_quant::interleave::GROUP || !cols.is_multiple_of(bs) {
            continue;
        }
        let row_bytes = cols / bs * ty.type_size();
        let Some(data) = g.tensor_data_mut(&name) else { continue };
        if data.len() != rows * row_bytes {
            continue;
        }
        kiln_quant::interleave::interleave(ty, data, rows, row_bytes);
        done.push(name);
    }
    Ok(done)
}

impl<'a> LlamaWeights<'a> {
    pub fn load(g: &'a GgufFile) -> Result<LlamaWeights<'a>, ModelError> {
        LlamaWeights::load_interleaved(g, &[])
    }

    /// [`Self::load`] where the tensors named in `interleaved` were woven by
    /// [`interleave_matrices`].
    pub fn load_interleaved(g: &'a GgufFile, interleaved: &[String]) -> Result<LlamaWeights<'a>, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix<'a>, ModelError> {
            let t = g.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            let expected = vec![cols as u64, rows as u64];
            if t.dims != expected {
                return Err(ModelError::BadShape { name: name.to_string(), found: t.dims.clone(), expected });
            }
            let data = g.tensor_data(t);
            if interleaved.iter().any(|n| n == name) {
                QMatrix::new_interleaved(t.ggml_type, data, rows, cols)
            } else {
                QMatrix::new(t.ggml_type, data, rows, cols)
            }
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
