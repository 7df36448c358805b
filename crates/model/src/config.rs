//! Hyper-parameters of a model, read from GGUF metadata as its [`Architecture`] describes.

use kiln_gguf::{GgufFile, Value};

use crate::arch::{self, Architecture, AttentionScale, EmbeddingScale, FfnActivation, RopePairing};
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor (`rope.scaling.type = linear`).
    Linear(f64),
}

/// One RoPE variant: its base and position scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub base: f64,
    pub scaling: RopeScaling,
}

/// What differs between layers: local attention and the RoPE that goes with it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttention {
    /// Keys visible to the query at position `i`: `i - window < j <= i` (`None`: all `j <= i`).
    pub window: Option<usize>,
    /// Index into [`ModelConfig::ropes`].
    pub rope: usize,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: &'static Architecture,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Leading dimensions of each head that RoPE rotates (`rope.dimension_count`).
    pub n_rot: usize,
    pub rope_pairing: RopePairing,
    /// The distinct RoPE variants; `ropes[0]` is the global layers'.
    pub ropes: Vec<Rope>,
    /// Per layer.
    pub layers: Vec<LayerAttention>,
    pub rms_eps: f64,
    pub n_ctx_train: usize,
    pub ffn_activation: FfnActivation,
    /// Multiplier of the embedding rows, if any.
    pub embedding_scale: Option<f32>,
    /// The attention scores' scale.
    pub attention_scale: f64,
    /// `c` of the final `c·tanh(logits / c)`, if set.
    pub logit_softcap: Option<f64>,
}

/// Most layers, heads, and dimensions a file may declare: far above any released model (405B:
/// 126 layers, 16384 wide, 53248 FFN; vocabularies up to ~260k), and small enough that products
/// of a few of them cannot overflow.
const MAX_LAYERS: usize = 4096;
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig, ModelError> {
        let name = g.architecture().ok_or(ModelError::NoArchitecture)?;
        let arch = arch::architecture(name).ok_or_else(|| ModelError::UnsupportedArchitecture {
            found: name.to_string(),
            supported: arch::supported_names(),
        })?;
        let key = |k: &str| format!("{}.{k}", arch.name);
        let bad = |what: String| ModelError::BadConfig(format!("{}: {what}", arch.name));
        let opt_dim = |k: &str| -> Result<Option<usize>, ModelError> {
            match g.get_u64(&key(k))? {
                None => Ok(None),
                Some(v) if v as u128 > MAX_DIM as u128 => Err(bad(format!("{} = {v} is implausibly large", key(k)))),
                Some(v) => Ok(Some(v as usize)),
            }
        };
        let req = |k: &str| -> Result<usize, ModelError> {
            opt_dim(k)?.ok_or_else(|| ModelError::MissingKey { arch: arch.name, key: key(k) })
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_layer = req("block_count")?;
        let n_ff = req("feed_forward_length")?;
        let n_head_kv = opt_dim("attention.head_count_kv")?.unwrap_or(n_head);
        if n_layer > MAX_LAYERS {
            return Err(bad(format!("{} = {n_layer} layers is implausibly many", key("block_count"))));
        }
        if n_head == 0 || n_head_kv == 0 || n_embd == 0 || n_layer == 0 || n_ff == 0 {
            return Err(bad("zero-sized dimension".into()));
        }
        let head_dim = match opt_dim("attention.key_length")? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(bad(format!("embedding {n_embd} is not divisible by {n_head} heads")));
                }
                n_embd / n_head
            }
        };
        if let Some(dv) = opt_dim("attention.value_length")? {
            if dv != head_dim {
                return Err(bad(format!("value length {dv} differs from key length {head_dim} (not supported)")));
            }
        }
        if head_dim == 0 || n_head % n_head_kv != 0 {
            return Err(bad(format!("{n_head} heads is not a multiple of {n_head_kv} KV heads, or head size 0")));
        }
        let n_rot = opt_dim("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot == 0 || n_rot > head_dim || n_rot % 2 != 0 {
            return Err(bad(format!(
                "rope dimension {n_rot} must be even, positive and at most the head size {head_dim}"
            )));
        }
        let positive = |k: &str, v: f64| -> Result<f64, ModelError> {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(bad(format!("{} = {v} must be finite and positive", key(k))))
            }
        };
        let rope_base = positive("rope.freq_base", g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0))?;
        let linear = |k: &str| -> Result<RopeScaling, ModelError> {
            match g.get_f64(&key(k))? {
                None => Ok(RopeScaling::None),
                Some(1.0) => Ok(RopeScaling::None),
                Some(f) => Ok(RopeScaling::Linear(positive(k, f)?)),
            }
        };
        let rope_scaling = match g.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => linear("rope.scale_linear")?,
            Some("linear") => linear("rope.scaling.factor")?,
            Some(other) => return Err(bad(format!("rope scaling type {other:?} is not supported (none, linear)"))),
        };
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_eps =
            g.get_f64(&eps_key)?.ok_or_else(|| ModelError::MissingKey { arch: arch.name, key: eps_key.clone() })?;
        if !(rms_eps.is_finite() && (0.0..1.0).contains(&rms_eps)) {
            return Err(bad(format!("{eps_key} = {rms_eps} must be finite, at least 0 and below 1")));
        }
        let n_ctx_train = g.get_u64(&key("context_length"))?.map_or(2048, |v| v.min(usize::MAX as u64) as usize);
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor { arch: arch.name, name: "token_embd.weight".into() })?;
        let n_vocab = embd.dims.get(1).copied().unwrap_or(0);
        if n_vocab == 0 || n_vocab > (1 << 24) {
            return Err(bad(format!("vocabulary of {n_vocab} tokens (token_embd.weight's rows)")));
        }
        let n_vocab = n_vocab as usize;

        let mut ropes = vec![Rope { base: rope_base, scaling: rope_scaling }];
        let mut layers = vec![LayerAttention { window: None, rope: 0 }; n_layer];
        if let Some(sw) = arch.sliding_window {
            let window = opt_dim(sw.window_key)?.filter(|&w| w > 0);
            if let Some(window) = window {
                let local = local_layers(g, &key(sw.pattern_key), sw.default_period, n_layer)?;
                let base = positive(
                    sw.local_rope_base_key,
                    g.get_f64(&key(sw.local_rope_base_key))?.unwrap_or(sw.default_local_rope_base),
                )?;
                ropes.push(Rope { base, scaling: RopeScaling::None });
                for (la, is_local) in layers.iter_mut().zip(local) {
                    if is_local {
                        *la = LayerAttention { window: Some(window), rope: 1 };
                    }
                }
            }
        }
        let embedding_scale = match arch.embedding_scale {
            EmbeddingScale::None => None,
            EmbeddingScale::SqrtEmbd => Some((n_embd as f64).sqrt() as f32),
        };
        let attention_scale = match arch.attention_scale {
            AttentionScale::InvSqrtHeadDim => 1.0 / (head_dim as f64).sqrt(),
            AttentionScale::Gemma3 if n_layer == 62 => 1.0 / ((n_embd / n_head) as f64).sqrt(),
            AttentionScale::Gemma3 => 1.0 / (head_dim as f64).sqrt(),
        };
        let logit_softcap = match arch.logit_softcap_key {
            None => None,
            Some(k) => match g.get_f64(&key(k))? {
                None => None,
                Some(0.0) => None,
                Some(c) => Some(positive(k, c)?),
            },
        };
        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_rot,
            rope_pairing: arch.rope_pairing,
            ropes,
            layers,
            rms_eps,
            n_ctx_train,
            ffn_activation: arch.ffn_activation,
            embedding_scale,
            attention_scale,
            logit_softcap,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// The global layers' RoPE.
    pub fn rope(&self) -> Rope {
        self.ropes[0]
    }
}

/// Which of `n_layer` layers attend locally: from `key` (an integer period `p`: layer `l` is local
/// when `l % p < p - 1`, every layer when `p` is 0; or one bool per layer), else `default_period`.
fn local_layers(g: &GgufFile, key: &str, default_period: usize, n_layer: usize) -> Result<Vec<bool>, ModelError> {
    let period = |p: usize| (0..n_layer).map(|l| p == 0 || l % p < p - 1).collect();
    match g.get(key) {
        None => Ok(period(default_period)),
        Some(Value::Array(a)) => {
            let flags: Option<Vec<bool>> =
                a.items.iter().map(|v| if let Value::Bool(b) = v { Some(*b) } else { None }).collect();
            match flags {
                Some(f) if f.len() >= n_layer => Ok(f[..n_layer].to_vec()),
                _ => Err(ModelError::BadConfig(format!("{key} must hold one bool per layer ({n_layer})"))),
            }
        }
        Some(_) => {
            let p = g.get_u64(key)?.unwrap_or(default_period as u64);
            Ok(period(p.min(n_layer as u64 + 1) as usize))
        }
    }
}
