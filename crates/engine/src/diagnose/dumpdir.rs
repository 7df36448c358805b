//! Dump directories: one `.npy` per activation plus `index.json`.
//!
//! ```json
//! { "format": "kiln-activations/1", "naming": "kiln", "model": "synth-tiny-F32.gguf",
//!   "precision": "default", "tokens": [1, 2, 3],
//!   "activations": [ { "name": "q_rope-3", "layer": 3, "op": "q_rope", "shape": [3, 64], "file": "q_rope-3.npy" } ] }
//! ```
//!
//! Another engine's dump is read through the same index. With `"naming": "llama.cpp"` the names
//! are llama.cpp's eval-callback names (see [`super::names::LLAMA_CPP_NAMES`]); `layer`/`op` may
//! then be left out, and arrays of any rank are read as `[first dim, product of the others]`
//! (ggml's `[ne0, ne1, ne2]` saved in C order is `(ne2, ne1, ne0)`; for Qcur after RoPE that is
//! `(n_tokens, n_head, head_dim)`, which flattens to kiln's `(n_tokens, n_head × head_dim)`),
//! except `kq_soft_max`, whose `(n_head, n_tokens, n_kv)` is reordered to kiln's
//! `(n_tokens × n_head, n_kv)`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::capture::Tensor;
use super::{names, npy};

pub const FORMAT: &str = "kiln-activations/1";

#[derive(Serialize, Deserialize, Debug)]
pub struct Index {
    #[serde(default)]
    pub format: Option<String>,
    /// `kiln` (default) or `llama.cpp`.
    #[serde(default)]
    pub naming: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub precision: Option<String>,
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
    pub activations: Vec<Entry>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Entry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    pub shape: Vec<usize>,
    pub file: String,
}

/// Writes `tensors` into `dir` (created if needed) with their index.
pub fn write(dir: &Path, model: &str, precision: &str, tokens: &[u32], tensors: &[Tensor]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut activations = Vec::with_capacity(tensors.len());
    for t in tensors {
        let name = t.name();
        let file = format!("{name}.npy");
        npy::write_f32(&dir.join(&file), t.rows, t.cols, &t.data)?;
        activations.push(Entry { name, layer: t.layer, op: Some(t.op.to_string()), shape: vec![t.rows, t.cols], file });
    }
    let index = Index {
        format: Some(FORMAT.into()),
        naming: Some("kiln".into()),
        model: Some(model.into()),
        precision: Some(precision.into()),
        tokens: Some(tokens.to_vec()),
        activations,
    };
    let path = dir.join("index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index)?).with_context(|| format!("writing {}", path.display()))
}

/// A dump read back: its tokens (if the index lists them) and its activations in the index's
/// order, as kiln names and layouts; `skipped` lists names without a kiln counterpart.
pub struct Dump {
    pub tokens: Option<Vec<u32>>,
    pub tensors: Vec<Tensor>,
    pub skipped: Vec<String>,
}

pub fn read(dir: &Path) -> Result<Dump> {
    if !dir.is_dir() {
        bail!("dump directory {} does not exist", dir.display());
    }
    let index_path = dir.join("index.json");
    let text = std::fs::read_to_string(&index_path)
        .with_context(|| format!("{}: no index.json (write one listing name, shape, file)", dir.display()))?;
    let index: Index = serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let llama = match index.naming.as_deref() {
        None | Some("kiln") => false,
        Some("llama.cpp") => true,
        Some(other) => bail!("{}: unknown naming {other:?} (kiln or llama.cpp)", index_path.display()),
    };
    let mut seen = HashSet::new();
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    let mut taken = HashSet::new();
    for e in &index.activations {
        let first_time = seen.insert(e.name.clone());
        let parsed = if llama {
            names::parse_llama_cpp(&e.name, !first_time)
        } else {
            let parsed = names::parse_kiln(&e.name);
            if parsed.is_none() {
                let valid: Vec<&str> = names::all_ops().collect();
                bail!(
                    "{}: unknown activation name {:?} (kiln names are OP or OP-LAYER with OP one of {}; \
                     set \"naming\": \"llama.cpp\" for llama.cpp's names)",
                    index_path.display(),
                    e.name,
                    valid.join(", ")
                );
            }
            parsed
        };
        let Some((layer, op)) = parsed else {
            skipped.push(e.name.clone());
            continue;
        };
        if !taken.insert((layer, op)) {
            bail!("{}: activation {} is listed twice", index_path.display(), names::activation_name(layer, op));
        }
        let path = dir.join(&e.file);
        if !path.is_file() {
            bail!("{}: file {} of activation {} is missing", dir.display(), e.file, e.name);
        }
        let arr = npy::read(&path)?;
        if arr.shape != e.shape {
            bail!(
                "{}: activation {} has shape {:?} in index.json but {:?} in {}",
                dir.display(),
                e.name,
                e.shape,
                arr.shape,
                e.file
            );
        }
        let (rows, cols, data) = to_kiln_layout(op, llama, &arr.shape, arr.data)
            .with_context(|| format!("{}: activation {}", dir.display(), e.name))?;
        tensors.push(Tensor { layer, op, rows, cols, data });
    }
    Ok(Dump { tokens: index.tokens, tensors, skipped })
}

fn to_kiln_layout(op: &str, llama: bool, shape: &[usize], data: Vec<f32>) -> Result<(usize, usize, Vec<f32>)> {
    match shape {
        [] => bail!("scalar arrays are not activations"),
        [c] => Ok((1, *c, data)),
        [a, b, c] if llama && op == "kq_soft_max" => {
            // (n_head, n_tokens, n_kv) -> (n_tokens, n_head, n_kv).
            let (nh, nt, nk) = (*a, *b, *c);
            let mut out = vec![0f32; data.len()];
            for h in 0..nh {
                for t in 0..nt {
                    let src = &data[(h * nt + t) * nk..(h * nt + t + 1) * nk];
                    out[(t * nh + h) * nk..(t * nh + h + 1) * nk].copy_from_slice(src);
                }
            }
            Ok((nt * nh, nk, out))
        }
        // Tokens are the outermost dimension (ggml's last); the rest is one row.
        _ => Ok((shape[0], shape[1..].iter().product(), data)),
    }
}
