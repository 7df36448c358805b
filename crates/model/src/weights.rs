//! Weights of a model, borrowed from the GGUF memory map in their stored types, loaded by the
//! tensor roles its [`Architecture`](crate::arch::Architecture) requires or allows.

use std::collections::HashSet;

use kiln_gguf::GgufFile;
use kiln_quant::matmul::QMatrix;

use crate::arch::Presence;
use crate::{ModelConfig, ModelError};

/// `blk.N.attn_{q,k,v}.bias`.
#[derive(Clone)]
pub struct QkvBias {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// `blk.N.attn_{q,k}_norm.weight`: one head's length each, applied to every head.
#[derive(Clone)]
pub struct QkNorm {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

/// `blk.N.post_attention_norm.weight`, `blk.N.post_ffw_norm.weight`.
#[derive(Clone)]
pub struct PostNorms {
    pub attn: Vec<f32>,
    pub ffn: Vec<f32>,
}

#[derive(Clone)]
pub struct LayerWeights<'a> {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix<'a>,
    pub wk: QMatrix<'a>,
    pub wv: QMatrix<'a>,
    pub qkv_bias: Option<QkvBias>,
    pub qk_norm: Option<QkNorm>,
    pub wo: QMatrix<'a>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: QMatrix<'a>,
    pub w_up: QMatrix<'a>,
    pub w_down: QMatrix<'a>,
    pub post_norms: Option<PostNorms>,
}

#[derive(Clone)]
pub struct ModelWeights<'a> {
    pub cfg: ModelConfig,
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
fn product_matrices(cfg: &ModelConfig) -> Vec<String> {
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
/// [`ModelWeights::load_interleaved`]. Nothing changes without a copy, with one activation plane
/// (`KILN_ACT=q8`, whose kernels read rows), or for matrices of other types or shapes.
pub fn interleave_matrices(g: &mut GgufFile) -> Result<Vec<String>, ModelError> {
    let cfg = ModelConfig::from_gguf(g)?;
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

/// Reads tensors by name, checking shapes and remembering which were read.
struct Loader<'a, 'i> {
    g: &'a GgufFile,
    arch: &'static str,
    interleaved: &'i [String],
    used: HashSet<String>,
}

impl<'a> Loader<'a, '_> {
    fn has(&self, name: &str) -> bool {
        self.g.tensor(name).is_some()
    }

    fn info(&mut self, name: &str) -> Result<&'a kiln_gguf::TensorInfo, ModelError> {
        let t = self.g.tensor(name).ok_or_else(|| ModelError::MissingTensor { arch: self.arch, name: name.into() })?;
        self.used.insert(name.to_string());
        Ok(t)
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatrix<'a>, ModelError> {
        let t = self.info(name)?;
        let expected = vec![cols as u64, rows as u64];
        if t.dims != expected {
            return Err(ModelError::BadShape { arch: self.arch, name: name.into(), found: t.dims.clone(), expected });
        }
        let data = self.g.tensor_data(t);
        if self.interleaved.iter().any(|n| n == name) {
            QMatrix::new_interleaved(t.ggml_type, data, rows, cols)
        } else {
            QMatrix::new(t.ggml_type, data, rows, cols)
        }
        .map_err(|error| ModelError::Tensor { name: name.to_string(), error })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.info(name)?;
        if t.dims != [len as u64] {
            return Err(ModelError::BadShape {
                arch: self.arch,
                name: name.into(),
                found: t.dims.clone(),
                expected: vec![len as u64],
            });
        }
        let mut out = vec![0f32; len];
        kiln_quant::dequantize_row(t.ggml_type, self.g.tensor_data(t), &mut out)
            .map_err(|error| ModelError::Tensor { name: name.to_string(), error })?;
        Ok(out)
    }

    /// A group of vectors the architecture marks `presence`: all of them or (unless required)
    /// none; a file with some but not all, or with any where the architecture has none, is refused.
    fn vectors<const N: usize>(
        &mut self,
        presence: Presence,
        names: [(String, usize); N],
    ) -> Result<Option<[Vec<f32>; N]>, ModelError> {
        let found = names.iter().filter(|(n, _)| self.has(n)).count();
        match presence {
            Presence::Absent => match names.iter().find(|(n, _)| self.has(n)) {
                Some((n, _)) => Err(ModelError::UnexpectedTensor { arch: self.arch, name: n.clone() }),
                None => Ok(None),
            },
            Presence::Optional if found == 0 => Ok(None),
            _ => {
                let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
                for (o, (n, len)) in out.iter_mut().zip(&names) {
                    *o = self.vector(n, *len)?;
                }
                Ok(Some(out))
            }
        }
    }
}

impl<'a> ModelWeights<'a> {
    pub fn load(g: &'a GgufFile) -> Result<ModelWeights<'a>, ModelError> {
        ModelWeights::load_interleaved(g, &[])
    }

    /// [`Self::load`] where the tensors named in `interleaved` were woven by
    /// [`interleave_matrices`].
    pub fn load_interleaved(g: &'a GgufFile, interleaved: &[String]) -> Result<ModelWeights<'a>, ModelError> {
        let cfg = ModelConfig::from_gguf(g)?;
        let arch = cfg.arch;
        let mut ld = Loader { g, arch: arch.name, interleaved, used: HashSet::new() };
        let (e, qd, kvd, hd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let token_embd = ld.matrix("token_embd.weight", cfg.n_vocab, e)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let qkv_bias = ld
                .vectors(arch.qkv_bias, [(n("attn_q.bias"), qd), (n("attn_k.bias"), kvd), (n("attn_v.bias"), kvd)])?
                .map(|[q, k, v]| QkvBias { q, k, v });
            let qk_norm = ld
                .vectors(arch.qk_norm, [(n("attn_q_norm.weight"), hd), (n("attn_k_norm.weight"), hd)])?
                .map(|[q, k]| QkNorm { q, k });
            let post_norms = ld
                .vectors(arch.post_norms, [(n("post_attention_norm.weight"), e), (n("post_ffw_norm.weight"), e)])?
                .map(|[attn, ffn]| PostNorms { attn, ffn });
            layers.push(LayerWeights {
                attn_norm: ld.vector(&n("attn_norm.weight"), e)?,
                wq: ld.matrix(&n("attn_q.weight"), qd, e)?,
                wk: ld.matrix(&n("attn_k.weight"), kvd, e)?,
                wv: ld.matrix(&n("attn_v.weight"), kvd, e)?,
                qkv_bias,
                qk_norm,
                wo: ld.matrix(&n("attn_output.weight"), e, qd)?,
                ffn_norm: ld.vector(&n("ffn_norm.weight"), e)?,
                w_gate: ld.matrix(&n("ffn_gate.weight"), cfg.n_ff, e)?,
                w_up: ld.matrix(&n("ffn_up.weight"), cfg.n_ff, e)?,
                w_down: ld.matrix(&n("ffn_down.weight"), e, cfg.n_ff)?,
                post_norms,
            });
        }
        let output_norm = ld.vector("output_norm.weight", e)?;
        let (output, output_is_tied) = match g.tensor("output.weight") {
            Some(_) => (ld.matrix("output.weight", cfg.n_vocab, e)?, false),
            None => (token_embd, true),
        };
        let rope_freqs = match g.tensor("rope_freqs.weight") {
            Some(_) => Some(ld.vector("rope_freqs.weight", cfg.n_rot / 2)?),
            None => None,
        };
        // Divisors of the rotation frequencies: zero, negative or non-finite ones would turn every
        // rotated key into NaN (or reverse its rotation) at every position.
        if let Some((i, f)) = rope_freqs.iter().flatten().enumerate().find(|(_, f)| !(f.is_finite() && **f > 0.0)) {
            return Err(ModelError::BadConfig(format!(
                "rope_freqs.weight[{i}] = {f}: RoPE frequency factors must be finite and positive"
            )));
        }
        // A tensor nobody reads is a part of the model kiln would silently leave out (llama.cpp
        // refuses such files too).
        if let Some(t) = g.tensors.iter().find(|t| !ld.used.contains(&t.name)) {
            return Err(ModelError::UnexpectedTensor { arch: arch.name, name: t.name.clone() });
        }
        Ok(ModelWeights { cfg, token_embd, layers, output_norm, output, output_is_tied, rope_freqs })
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
