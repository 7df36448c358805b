//! Hyper-parameters of a Llama-family model, read from GGUF metadata.

use kiln_gguf::GgufFile;

use crate::ModelError;

pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor (`rope.scaling.type = linear`).
    Linear(f64),
}

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Leading dimensions of each head that RoPE rotates (`rope.dimension_count`).
    pub n_rot: usize,
    pub rope_base: f64,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f64,
    pub n_ctx_train: usize,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<LlamaConfig, ModelError> {
        let arch = g.architecture().ok_or(ModelError::NoArchitecture)?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture {
                found: arch,
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, ModelError> {
            let full = key(k);
            g.get_u64(&full)?.map(|v| v as usize).ok_or(ModelError::MissingKey(full))
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_layer = req("block_count")?;
        let n_ff = req("feed_forward_length")?;
        let n_head_kv = g.get_u64(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_embd == 0 || n_layer == 0 || n_ff == 0 {
            return Err(ModelError::BadConfig("zero-sized dimension".into()));
        }
        let head_dim = match g.get_u64(&key("attention.key_length"))? {
            Some(d) => d as usize,
            None => {
                if n_embd % n_head != 0 {
                    return Err(ModelError::BadConfig(format!(
                        "embedding {n_embd} is not divisible by {n_head} heads"
                    )));
                }
                n_embd / n_head
            }
        };
        if n_head % n_head_kv != 0 {
            return Err(ModelError::BadConfig(format!("{n_head} heads is not a multiple of {n_head_kv} KV heads")));
        }
        let n_rot = g.get_u64(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope dimension {n_rot} must be even and at most the head size {head_dim}"
            )));
        }
        let rope_base = g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let rope_scaling = match g.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => match g.get_f64(&key("rope.scale_linear"))? {
                Some(f) if f != 1.0 => RopeScaling::Linear(f),
                _ => RopeScaling::None,
            },
            Some("linear") => {
                let f = g.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if f == 1.0 {
                    RopeScaling::None
                } else {
                    RopeScaling::Linear(f)
                }
            }
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "rope scaling type {other:?} is not supported (none, linear)"
                )))
            }
        };
        let rms_eps = g
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| ModelError::MissingKey(key("attention.layer_norm_rms_epsilon")))?;
        let n_ctx_train = g.get_u64(&key("context_length"))?.map(|v| v as usize).unwrap_or(2048);
        let embd =
            g.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = embd.dims.get(1).copied().unwrap_or(0) as usize;
        // Written so that NaN fails the checks too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if n_rot == 0 || !(rope_base > 0.0) || !(rms_eps >= 0.0) || n_vocab == 0 {
            return Err(ModelError::BadConfig("rope base, rope dimension and vocabulary must be positive".into()));
        }
        Ok(LlamaConfig {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_rot,
            rope_base,
            rope_scaling,
            rms_eps,
            n_ctx_train,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
