//! Weights on the GPU and the forward pass over them (the semantics of
//! `crates/model/src/forward.rs`, default path).

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr};
use kiln_gguf::GgmlType;
use kiln_model::arch::{FfnActivation, RopePairing};
use kiln_model::{ModelConfig, ModelWeights, RopeScaling};
use kiln_quant::matmul::QMatrix;

use crate::Device;

/// One kernel argument, by value.
#[derive(Clone, Copy)]
pub(crate) enum A {
    /// A device pointer.
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    D(f64),
}

pub(crate) fn dev_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("CUDA: {e}")
}

/// What the fast mat-vec kernel does with adjacent output-row pairs (`EPI_*` in kernels.cu).
#[derive(Clone, Copy)]
pub(crate) enum Epi {
    /// y (+)= W x.
    Plain,
    /// Rows interleaved (gate, up): y[i] = silu(gate_i) · up_i.
    Swiglu,
    /// Rows [q | k | v]: RoPE on q and k, k and v stored into layer `.0`'s caches.
    RopeKv(usize),
}

/// A weight matrix on the device in its stored format; its output lands at column `out_off` of
/// the destination rows (several matrices can fill one row: q|k|v, gate|up).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub ty: GgmlType,
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub out_off: usize,
    /// Rows stored in the repacked layout of Q4_0 / Q8_0 (see [`repack8`]).
    pub repacked: bool,
}

pub(crate) struct Layer {
    pub attn_norm: u64,
    pub ffn_norm: u64,
    /// q, k, v (one fused matrix when the three share a type).
    pub qkv: Vec<Mat>,
    pub wo: Mat,
    /// gate, up (fused when they share a type, rows then interleaved: gate 0, up 0, gate 1, ...).
    pub gate_up: Vec<Mat>,
    /// Whether `gate_up` is one matrix of interleaved rows (its products come out as
    /// [g0 u0 g1 u1 ...], so one warp computing two adjacent rows can apply SwiGLU itself).
    pub gu_interleaved: bool,
    pub down: Mat,
}

/// Server slots from which [`CudaModel::serve_rows_for_slots`] runs the generation rows on the
/// tensor cores. Measured on an H100 (Q4_0, `bench/loadtest.py`): with 8 streams the tensor
/// cores gave TinyLlama 2,623 t/s and Llama-7B 741 where the single-sequence kernels had given
/// 1,928 and 613; one stream is faster on the single-sequence kernels.
pub const TENSOR_CORE_MIN_SLOTS: usize = 8;

/// A model's weights uploaded to one GPU.
pub struct CudaModel {
    pub dev: Device,
    pub cfg: ModelConfig,
    pub(crate) token_embd: Mat,
    pub(crate) output: Mat,
    pub(crate) output_norm: u64,
    pub(crate) layers: Vec<Layer>,
    pub(crate) rope_freqs: Option<Vec<f32>>,
    /// Weight bytes read per generated token (as `ModelWeights::bytes_per_token`).
    pub bytes_per_token: usize,
    /// Bytes uploaded.
    pub device_bytes: usize,
    /// Largest matrix in elements (the f16 scratch tile of the batched path).
    pub(crate) max_elems: usize,
    /// Whether some matrix is F16 or BF16 (its batched products take two activation planes).
    pub(crate) float_weights: bool,
    /// Whether the serving path's generation rows run on the tensor cores (`mma_rows_*`): an
    /// sm_80+ device, every matrix 32-column aligned and none F32 (those keep exact f32 products).
    /// Off at upload unless `KILN_CUDA_MMA=1`; a server turns it on for many slots
    /// ([`CudaModel::serve_rows_for_slots`]). Fixed before any batch is made, so every row count
    /// takes the same kernels.
    pub(crate) mma_rows: bool,
    /// Whether steps of at most 8 tokens take the one-tile tensor-core kernel (`mma_rows8_*`; the
    /// same bits as `mma_rows_*`, shown on an H100 by `batch_invariance gpu_serving`;
    /// `KILN_CUDA_MMA_FEW=0` turns it off).
    pub(crate) mma_few: bool,
    /// Whether the model and device allow `mma_rows` at all.
    mma_eligible: bool,
    _owners: Vec<CudaSlice<u8>>,
}

impl CudaModel {
    /// Whether the serving path's generation rows run on the tensor cores (f16 activations, the
    /// batched prompt path's rounding) rather than through the single-sequence decode kernels.
    pub fn serving_on_tensor_cores(&self) -> bool {
        self.mma_rows
    }

    /// Turns the tensor-core generation rows on or off (before any batch is made); `Err` says
    /// why they cannot run this model here (a device older than sm_80, an F32 matrix, a width
    /// that is not a multiple of 32).
    pub fn set_serving_on_tensor_cores(&mut self, on: bool) -> Result<()> {
        if on && !self.mma_eligible {
            bail!(
                "the tensor-core generation rows need an sm_80+ GPU and matrices of widths that are \
                 multiples of 32, none F32"
            );
        }
        self.mma_rows = on;
        Ok(())
    }

    /// Chooses the serving path's generation rows for a server of `n_slots` sequences: the tensor
    /// cores from [`TENSOR_CORE_MIN_SLOTS`] slots (steps of many rows are bound by arithmetic on
    /// the CUDA cores: a 64-row Llama-7B step 3.8x faster on an H100), the single-sequence
    /// kernels below (few rows are bound by reading the weights, which those kernels do faster).
    /// `KILN_CUDA_MMA=1` / `0` forces either. Returns whether the tensor cores were chosen.
    pub fn serve_rows_for_slots(&mut self, n_slots: usize) -> bool {
        let on = match std::env::var("KILN_CUDA_MMA").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => n_slots >= TENSOR_CORE_MIN_SLOTS,
        };
        self.mma_rows = on && self.mma_eligible;
        self.mma_rows
    }

    /// Device bytes [`CudaModel::upload`] will take for `w` (its matrices as stored, tied output
    /// once, norms), known before anything is allocated.
    pub fn upload_bytes(w: &ModelWeights) -> usize {
        let mut b = w.token_embd.data.len() + 16;
        if !w.output_is_tied {
            b += w.output.data.len() + 16;
        }
        for l in &w.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                b += m.data.len() + 16;
            }
            b += 4 * (l.attn_norm.len() + l.ffn_norm.len());
        }
        b + 4 * w.output_norm.len()
    }

    /// Why the CUDA kernels cannot run `w` (one line), if they cannot: an architecture feature
    /// they lack, or a length they need to be a multiple of 8.
    pub fn unsupported(w: &ModelWeights) -> Option<String> {
        let cfg = &w.cfg;
        let missing = missing_features(w);
        if !missing.is_empty() {
            return Some(format!(
                "the CUDA backend cannot run this {} model yet: it lacks {}",
                cfg.arch.name,
                missing.join(", ")
            ));
        }
        for (what, v) in [("embedding", cfg.n_embd), ("head size", cfg.head_dim), ("feed-forward", cfg.n_ff)] {
            if v % 8 != 0 {
                return Some(format!("the CUDA backend needs the {what} length to be a multiple of 8 (it is {v})"));
            }
        }
        None
    }

    /// Uploads `w` to `dev`. Fails with one line when a tensor type or shape is not supported.
    pub fn upload(dev: Device, w: &ModelWeights) -> Result<CudaModel> {
        let cfg = w.cfg.clone();
        let missing = missing_features(w);
        if !missing.is_empty() {
            bail!(
                "the CUDA backend cannot run this {} model yet: it lacks {} (use the CPU backend)",
                cfg.arch.name,
                missing.join(", ")
            );
        }
        for (what, v) in [("embedding", cfg.n_embd), ("head size", cfg.head_dim), ("feed-forward", cfg.n_ff)] {
            if v % 8 != 0 {
                bail!("the CUDA backend needs the {what} length to be a multiple of 8 (it is {v})");
            }
        }
        let mut owners = Vec::new();
        let mut device_bytes = 0usize;
        let mut max_elems = 0usize;
        let mut float_weights = false;
        // `interleave`: the parts' rows alternate (row r of each part in turn; parts of one type,
        // width and row count), else they follow one another.
        let mut upload = |parts: &[&QMatrix], interleave: bool| -> Result<Vec<Mat>> {
            let mut bytes = Vec::new();
            let mut mats = Vec::new();
            let mut out_off = 0;
            let mut layouts = Vec::new();
            for m in parts {
                dev.kernels.for_type(m.ty)?;
                if m.is_interleaved() {
                    // The CPU's eight-row layout (a private copy made for the CPU kernels).
                    bail!("the CUDA backend reads weights in the file's layout: load the model without the CPU's interleaved copy");
                }
                float_weights |= matches!(m.ty, GgmlType::F16 | GgmlType::BF16);
                let row_bytes = m.data.len() / m.rows;
                let block = match m.ty {
                    GgmlType::Q4_0 => 18,
                    GgmlType::Q8_0 => 34,
                    _ => 0,
                };
                let repacked =
                    dev.kernels.fast && block != 0 && m.cols.is_multiple_of(256) && row_bytes == m.cols / 32 * block;
                let ptr = if interleave { out_off as u64 * row_bytes as u64 } else { bytes.len() as u64 };
                mats.push(Mat { ty: m.ty, ptr, rows: m.rows, cols: m.cols, row_bytes, out_off, repacked });
                out_off += m.rows;
                layouts.push((row_bytes, block, repacked));
                if !interleave {
                    if repacked {
                        repack8(m.data, block, &mut bytes);
                    } else {
                        bytes.extend_from_slice(m.data);
                    }
                }
            }
            if interleave {
                // Repacking works within a row (rows hold whole 8-block groups), so rows can be
                // regrouped one at a time.
                for r in 0..parts[0].rows {
                    for (m, &(rb, block, repacked)) in parts.iter().zip(&layouts) {
                        let row = &m.data[r * rb..(r + 1) * rb];
                        if repacked {
                            repack8(row, block, &mut bytes);
                        } else {
                            bytes.extend_from_slice(row);
                        }
                    }
                }
            }
            // The f16 scratch tile must hold these matrices fused.
            max_elems = max_elems.max(parts.iter().map(|m| m.rows * m.cols).sum());
            // Pad so that 16-byte vector loads past the last row's end stay inside the buffer.
            bytes.resize(bytes.len() + 16, 0);
            let buf = dev.stream.clone_htod(&bytes).map_err(dev_err)?;
            let (base, _) = buf.device_ptr(&dev.stream);
            for m in &mut mats {
                m.ptr += base;
            }
            device_bytes += bytes.len();
            owners.push(buf);
            Ok(mats)
        };
        // Fuses matrices that share a type and width into one (their rows concatenated in one
        // buffer, so one kernel computes them all), else one each.
        // `interleave`: fused rows alternate between the parts (they must then have as many rows).
        let mut group = |parts: &[&QMatrix], interleave: bool| -> Result<Vec<Mat>> {
            if parts.iter().all(|m| m.ty == parts[0].ty && m.cols == parts[0].cols) {
                let interleave = interleave && parts.iter().all(|m| m.rows == parts[0].rows);
                let mats = upload(parts, interleave)?;
                let rows = mats.iter().map(|m| m.rows).sum();
                Ok(vec![Mat { rows, ..mats[0] }])
            } else {
                let mut v = Vec::new();
                let mut off = 0;
                for m in parts {
                    let mut one = upload(&[m], false)?;
                    one[0].out_off = off;
                    off += m.rows;
                    v.append(&mut one);
                }
                Ok(v)
            }
        };
        let token_embd = group(&[&w.token_embd], false)?[0];
        let output = if w.output_is_tied { token_embd } else { group(&[&w.output], false)?[0] };
        let mut layers = Vec::with_capacity(w.layers.len());
        let mut norms: Vec<f32> = Vec::new();
        for lw in &w.layers {
            let gate_up = group(&[&lw.w_gate, &lw.w_up], true)?;
            layers.push(Layer {
                attn_norm: norms.len() as u64,
                ffn_norm: 0,
                qkv: group(&[&lw.wq, &lw.wk, &lw.wv], false)?,
                wo: group(&[&lw.wo], false)?[0],
                gu_interleaved: gate_up.len() == 1,
                gate_up,
                down: group(&[&lw.w_down], false)?[0],
            });
            norms.extend_from_slice(&lw.attn_norm);
            let l = layers.last_mut().expect("just pushed");
            l.ffn_norm = norms.len() as u64;
            norms.extend_from_slice(&lw.ffn_norm);
        }
        let out_norm_off = norms.len() as u64;
        norms.extend_from_slice(&w.output_norm);
        let norm_bytes: Vec<u8> = norms.iter().flat_map(|v| v.to_le_bytes()).collect();
        let norm_buf = dev.stream.clone_htod(&norm_bytes).map_err(dev_err)?;
        let (nbase, _) = norm_buf.device_ptr(&dev.stream);
        for l in &mut layers {
            l.attn_norm = nbase + 4 * l.attn_norm;
            l.ffn_norm = nbase + 4 * l.ffn_norm;
        }
        let output_norm = nbase + 4 * out_norm_off;
        device_bytes += norm_bytes.len();
        owners.push(norm_buf);
        dev.stream.synchronize().map_err(dev_err)?;
        let mma_eligible = dev.capability.0 >= 8
            && layers
                .iter()
                .flat_map(|l| l.qkv.iter().chain(&l.gate_up).chain([&l.wo, &l.down]))
                .chain([&output])
                .all(|m| m.cols.is_multiple_of(32) && m.ty != GgmlType::F32);
        // Off until a server chooses (`serve_rows_for_slots`); `KILN_CUDA_MMA=1` turns them on for
        // every user of the model (parity, tests).
        let mma_rows = mma_eligible && std::env::var("KILN_CUDA_MMA").is_ok_and(|v| v == "1");
        Ok(CudaModel {
            cfg,
            token_embd,
            output,
            output_norm,
            layers,
            rope_freqs: w.rope_freqs.clone(),
            bytes_per_token: w.bytes_per_token(),
            device_bytes,
            max_elems,
            float_weights,
            mma_rows,
            mma_few: std::env::var("KILN_CUDA_MMA_FEW").map(|v| v != "0").unwrap_or(true),
            mma_eligible,
            dev,
            _owners: owners,
        })
    }
}

/// Appends `data` (rows of Q4_0 or Q8_0 blocks of `block` bytes: f16 d, then the quants) with
/// every 8 consecutive blocks of a row regrouped as [8 × quants][8 × d], the layout of the
/// kernels' T_Q4_0R / T_Q8_0R: each block's quants then start 16-byte aligned (rows hold a
/// multiple of 8 blocks, so groups never straddle rows and row sizes are unchanged).
fn repack8(data: &[u8], block: usize, out: &mut Vec<u8>) {
    for grp in data.chunks(8 * block) {
        for b in grp.chunks(block) {
            out.extend_from_slice(&b[2..]);
        }
        for b in grp.chunks(block) {
            out.extend_from_slice(&b[..2]);
        }
    }
}

/// The parts of `w`'s architecture description that the CUDA kernels do not implement: each is
/// read here at one fixed point, so a model that needs one is refused whole, by name.
fn missing_features(w: &ModelWeights) -> Vec<&'static str> {
    let cfg = &w.cfg;
    let mut missing = Vec::new();
    if cfg.rope_pairing != RopePairing::Adjacent {
        missing.push("NEOX RoPE pairing");
    }
    if cfg.ffn_activation != FfnActivation::Silu {
        missing.push("the GELU-tanh FFN");
    }
    if cfg.embedding_scale.is_some() {
        missing.push("the embedding scale");
    }
    if cfg.layers.iter().any(|l| l.window.is_some()) || cfg.ropes.len() > 1 {
        missing.push("sliding-window layers");
    }
    if cfg.logit_softcap.is_some() {
        missing.push("the logit soft-cap");
    }
    let any = |f: fn(&kiln_model::LayerWeights) -> bool| w.layers.iter().any(f);
    if any(|l| l.qkv_bias.is_some()) {
        missing.push("q/k/v biases");
    }
    if any(|l| l.qk_norm.is_some()) {
        missing.push("q/k norms");
    }
    if any(|l| l.post_norms.is_some()) {
        missing.push("post-attention/FFN norms");
    }
    missing
}

/// `[pos][i] = (cos, sin)` of the RoPE angles for positions `0..n_ctx`, computed in f64 and
/// rounded to f32 exactly as the CPU's `RopeTable`.
pub(crate) fn rope_table(cfg: &ModelConfig, freqs: Option<&[f32]>, n_ctx: usize) -> Vec<f32> {
    let half = cfg.n_rot / 2;
    let rope = cfg.rope();
    let scale = match rope.scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear(f) => 1.0 / f,
    };
    let mut out = Vec::with_capacity(n_ctx * half * 2);
    for pos in 0..n_ctx {
        let p = pos as f64 * scale;
        for i in 0..half {
            let mut theta = rope.base.powf(-2.0 * i as f64 / cfg.n_rot as f64);
            if let Some(f) = freqs {
                theta /= f[i] as f64;
            }
            let (s, c) = (p * theta).sin_cos();
            out.push(c as f32);
            out.push(s as f32);
        }
    }
    out
}
