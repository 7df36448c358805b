//! kiln's CUDA backend: the Llama forward pass on one NVIDIA GPU.
//!
//! Built on cudarc with dynamic loading, so this crate compiles and its tests run (and skip) on
//! machines without CUDA; the driver (libcuda), NVRTC and cuBLAS are looked up at run time.
//! Kernels are CUDA C++ in `kernels.cu`, compiled by NVRTC when a [`Device`] opens.
//!
//! Weights are uploaded once in their stored GGUF block formats. Decode (one token) runs
//! dequantizing matrix-vector kernels over f32 activations, captured into a CUDA graph after the
//! first token; batches of more than [`MATVEC_MAX_TOKENS`] tokens dequantize each weight matrix to
//! an f16 scratch tile and multiply with cuBLAS (f32 accumulation). Device handles are explicit
//! (a [`Device`] per GPU ordinal, no global current device), so tensor-parallel work can follow.

mod batch;
mod forward;
mod model;
pub mod pages;
mod session;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use kiln_gguf::GgmlType;

pub use batch::{BatchStep, CudaBatch};
pub use forward::KV_BLOCK;
pub use model::{CudaModel, TENSOR_CORE_MIN_SLOTS};
pub use session::{CudaSession, UBATCH};

/// Batches up to this many tokens run through the matrix-vector kernels (weights read once per
/// token); larger ones through dequantize + cuBLAS. 15 = the most rows a speculative verification
/// feeds (a token and 14 drafts): each of its rows then gets the bits of a one-token step, so
/// speculation on the GPU gives plain decoding's output exactly, as on the CPU.
pub const MATVEC_MAX_TOKENS: usize = 15;

const KERNELS: &str = include_str!("kernels.cu");

/// The weight types the kernels decode, with their kernel-name suffixes.
const TYPES: [(GgmlType, &str); 15] = [
    (GgmlType::F32, "f32"),
    (GgmlType::F16, "f16"),
    (GgmlType::BF16, "bf16"),
    (GgmlType::Q4_0, "q4_0"),
    (GgmlType::Q4_1, "q4_1"),
    (GgmlType::Q5_0, "q5_0"),
    (GgmlType::Q5_1, "q5_1"),
    (GgmlType::Q8_0, "q8_0"),
    (GgmlType::Q2_K, "q2_k"),
    (GgmlType::Q3_K, "q3_k"),
    (GgmlType::Q4_K, "q4_k"),
    (GgmlType::Q5_K, "q5_k"),
    (GgmlType::Q6_K, "q6_k"),
    (GgmlType::IQ4_NL, "iq4_nl"),
    (GgmlType::IQ4_XS, "iq4_xs"),
];

/// The kernels specialised for one weight type.
pub(crate) struct TypeKernels {
    pub matvec: CudaFunction,
    pub dequant_f16: CudaFunction,
    pub get_rows: CudaFunction,
    /// The tensor-core kernel of the serving path's generation rows (`mma_rows_*`).
    pub mma_rows: CudaFunction,
    /// The same products for steps of at most [`MMA_FEW`](crate::forward::MMA_FEW) tokens (`mma_rows8_*`: one tile, fewer
    /// registers, more weight loads in flight), bit for bit what `mma_rows` gives.
    pub mma_rows8: CudaFunction,
    /// The fast matrix-vector kernel (16-byte unit loads, optional fused RMSNorm), for the types
    /// and layouts that have one; its variants that apply each weight load to 4 and 8 tokens.
    pub matvec_fast: Option<CudaFunction>,
    pub matvec_fast_t4: Option<CudaFunction>,
    pub matvec_fast_t8: Option<CudaFunction>,
}

pub(crate) struct Kernels {
    pub by_type: Vec<(GgmlType, TypeKernels)>,
    /// Q4_0 and Q8_0 rows repacked at upload (`Layout::Repacked8`).
    pub q4_0r: TypeKernels,
    pub q8_0r: TypeKernels,
    /// Rows per warp and warps per block of the fast matrix-vector kernel (`MVF_R`, `MVF_WARPS`).
    pub mvf_rows: usize,
    pub mvf_warps: usize,
    /// Whether the fast kernel's grid is capped at one resident wave (blocks then loop over row
    /// groups, staging their activations once); `KILN_MVF_CAP=0` turns it off.
    pub mvf_cap: bool,
    /// Streaming multiprocessors of the device.
    pub sms: usize,
    /// Most tokens per block of the many-token mat-vec variants (1, 4 or 8; `KILN_MVF_TM`).
    pub mvf_tm: usize,
    /// Most dynamic shared memory a many-token mat-vec block may take: the device's opt-in
    /// limit less 1 KiB for the kernel's static shared memory (the two together must fit).
    pub fast_smem_max: usize,
    /// Whether the fast mat-vec kernels and the repacked layouts are used (`KILN_CUDA_FAST=0`:
    /// the generic kernel everywhere, for comparisons).
    pub fast: bool,
    /// Whether the decode chain's fast mat-vec and attention kernels are launched with
    /// programmatic dependent launch (sm_90+, `KILN_CUDA_PDL=1`): each starts while the one
    /// before finishes, its first weight loads in flight before it waits for that kernel's
    /// results (`pdl_release_then_wait` in kernels.cu). Opt-in until measured on a GPU.
    pub pdl: bool,
    pub rms_norm: CudaFunction,
    pub split_f16: CudaFunction,
    pub rope_kv: CudaFunction,
    pub attention: CudaFunction,
    /// The same attention with 8 loads in flight per thread (one-token steps).
    pub attention_b8: CudaFunction,
    /// Tiled (flash-style) prompt attention for head sizes 64 and 128, with its dynamic shared
    /// memory in bytes.
    pub attention_tiled: [(usize, CudaFunction, u32); 2],
    pub swiglu: CudaFunction,
}

impl Kernels {
    pub fn for_type(&self, ty: GgmlType) -> Result<&TypeKernels> {
        match self.by_type.iter().find(|(t, _)| *t == ty) {
            Some((_, k)) => Ok(k),
            None => bail!("tensor type {ty} is not supported by the CUDA backend"),
        }
    }

    /// The kernels of a type in a given device layout.
    pub fn for_layout(&self, ty: GgmlType, repacked: bool) -> Result<&TypeKernels> {
        match (ty, repacked) {
            (GgmlType::Q4_0, true) => Ok(&self.q4_0r),
            (GgmlType::Q8_0, true) => Ok(&self.q8_0r),
            (_, true) => bail!("no repacked CUDA layout for {ty}"),
            (_, false) => self.for_type(ty),
        }
    }
}

/// Dynamic shared memory of `attention_tiled_impl<d, bk>` (kernels.cu): Q [64][d+4], K [bk][d+4],
/// V [bk][d] and P [64][bk+4] floats.
fn attention_tiled_smem(d: usize, bk: usize) -> u32 {
    ((64 * (d + 4) + bk * (d + 4) + bk * d + 64 * (bk + 4)) * 4) as u32
}

/// A positive integer from the environment (development knobs), else `default`.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(default)
}

/// One GPU: its context, stream, compiled kernels and (when libcublas loads) a cuBLAS handle.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(crate) kernels: Kernels,
    pub(crate) blas: Option<CudaBlas>,
    /// Device name as the driver reports it.
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// Milliseconds NVRTC took to compile the kernels plus the module load.
    pub compile_ms: f64,
    _module: Arc<CudaModule>,
}

/// Whether a CUDA driver and at least one GPU are present: `Err` says why not, in one line.
pub fn probe() -> Result<usize> {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made through it here.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no CUDA driver (libcuda.so) on this machine: no usable NVIDIA GPU");
    }
    let n = CudaContext::device_count().map_err(|e| anyhow::anyhow!("CUDA driver: {e}"))?;
    if n <= 0 {
        bail!("the CUDA driver reports no GPU");
    }
    Ok(n as usize)
}

impl Device {
    /// Opens GPU `ordinal` and compiles the kernels for it.
    pub fn open(ordinal: usize) -> Result<Device> {
        let n = probe()?;
        if ordinal >= n {
            bail!("GPU {ordinal} requested but the driver reports {n}");
        }
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            bail!("NVRTC (libnvrtc.so) not found: the CUDA backend compiles its kernels at start-up and needs it");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("opening GPU {ordinal}: {e}"))?;
        // One stream does all the work, so cudarc's per-buffer event tracking (for multi-stream
        // safety) is pure overhead, and its event records would break graph capture.
        // SAFETY: called before any buffer exists; everything below runs on `stream` in order.
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default one: graph capture refuses the legacy stream.
        let stream = ctx.new_stream().map_err(|e| anyhow::anyhow!("creating a CUDA stream: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let capability = ctx.compute_capability().map_err(|e| anyhow::anyhow!("{e}"))?;
        let t0 = std::time::Instant::now();
        // Development knobs: the fast mat-vec kernel's shape, and a kernel source to use instead of
        // the built-in one (`KILN_CUDA_KERNELS=path/to/kernels.cu`), for trying kernels without a
        // rebuild.
        let (mvf_rows, mvf_warps) = (env_usize("KILN_MVF_R", 2).min(8), env_usize("KILN_MVF_WARPS", 8).min(32));
        let mvf_p = env_usize("KILN_MVF_P", 2).min(8);
        // Steps past those whose weights a fast mat-vec warp holds in registers that it requests
        // into L2 before its first wait (0: none).
        let mvf_pf = std::env::var("KILN_MVF_PF").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0).min(32);
        let src = match std::env::var("KILN_CUDA_KERNELS") {
            Ok(path) => std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?,
            Err(_) => KERNELS.to_string(),
        };
        let opts = cudarc::nvrtc::CompileOptions {
            options: vec![
                format!("--gpu-architecture=sm_{}{}", capability.0, capability.1),
                "--std=c++17".into(),
                format!("-DMVF_R={mvf_rows}"),
                format!("-DMVF_WARPS={mvf_warps}"),
                format!("-DMVF_P={mvf_p}"),
                format!("-DMVF_PF={mvf_pf}"),
                format!("-DKV_BLOCK={}", forward::KV_BLOCK),
            ],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts)
            .map_err(|e| anyhow::anyhow!("NVRTC failed to compile the kernels: {e}"))?;
        let module = ctx.load_module(ptx).map_err(|e| anyhow::anyhow!("loading the kernel module: {e}"))?;
        let f = |name: &str| -> Result<CudaFunction> {
            module.load_function(name).with_context(|| format!("kernel {name} missing from the module"))
        };
        let type_kernels = |sfx: &str, fast: bool| -> Result<TypeKernels> {
            Ok(TypeKernels {
                matvec: f(&format!("matvec_{sfx}"))?,
                dequant_f16: f(&format!("dequant_f16_{sfx}"))?,
                get_rows: f(&format!("get_rows_{sfx}"))?,
                mma_rows: f(&format!("mma_rows_{sfx}"))?,
                mma_rows8: f(&format!("mma_rows8_{sfx}"))?,
                matvec_fast: if fast { Some(f(&format!("matvec_fast_{sfx}"))?) } else { None },
                matvec_fast_t4: if fast { Some(f(&format!("matvec_fast_{sfx}_t4"))?) } else { None },
                matvec_fast_t8: if fast { Some(f(&format!("matvec_fast_{sfx}_t8"))?) } else { None },
            })
        };
        let mut by_type = Vec::new();
        for (ty, sfx) in TYPES {
            by_type.push((ty, type_kernels(sfx, ty == GgmlType::Q4_K)?));
        }
        let kernels = Kernels {
            by_type,
            q4_0r: type_kernels("q4_0r", true)?,
            q8_0r: type_kernels("q8_0r", true)?,
            mvf_rows,
            mvf_warps,
            mvf_cap: std::env::var("KILN_MVF_CAP").map(|v| v != "0").unwrap_or(true),
            sms: ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .max(1) as usize,
            mvf_tm: env_usize("KILN_MVF_TM", 8),
            fast_smem_max: ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .max(48 * 1024) as usize
                - 1024,
            fast: std::env::var("KILN_CUDA_FAST").map(|v| v != "0").unwrap_or(true),
            pdl: capability.0 >= 9 && std::env::var("KILN_CUDA_PDL").is_ok_and(|v| v == "1"),
            rms_norm: f("rms_norm")?,
            split_f16: f("split_f16")?,
            rope_kv: f("rope_kv")?,
            attention: f("attention")?,
            attention_b8: f("attention_b8")?,
            attention_tiled: [
                (64, f("attention_tiled64")?, attention_tiled_smem(64, 64)),
                (128, f("attention_tiled128")?, attention_tiled_smem(128, 32)),
            ],
            swiglu: f("swiglu")?,
        };
        // The many-token mat-vec variants stage 4 or 8 tokens' activations: opt in to the most
        // shared memory a block may have (the launch picks a variant whose share fits).
        for tk in kernels.by_type.iter().map(|(_, k)| k).chain([&kernels.q4_0r, &kernels.q8_0r]) {
            for f in [&tk.matvec_fast_t4, &tk.matvec_fast_t8].into_iter().flatten() {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    kernels.fast_smem_max as i32,
                )
                .map_err(|e| anyhow::anyhow!("mat-vec kernel shared memory: {e}"))?;
            }
        }
        for (_, f, smem) in &kernels.attention_tiled {
            // Past 48 KiB of dynamic shared memory a kernel must opt in.
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                *smem as i32,
            )
            .map_err(|e| anyhow::anyhow!("attention kernel shared memory: {e}"))?;
        }
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
        // cuBLAS is optional: without it batches run through the matrix-vector kernels.
        // SAFETY: dlopen probe only.
        let blas =
            if unsafe { cudarc::cublas::sys::is_culib_present() } { CudaBlas::new(stream.clone()).ok() } else { None };
        Ok(Device { ctx, stream, kernels, blas, name, capability, compile_ms, _module: module })
    }

    /// (free, total) bytes of this GPU's memory now.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("CUDA: {e}"))?;
        cudarc::driver::result::mem_get_info().map_err(|e| anyhow::anyhow!("CUDA: {e}"))
    }

    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }
}
