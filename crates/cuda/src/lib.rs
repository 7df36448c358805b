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

mod model;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use kiln_gguf::GgmlType;

pub use model::{CudaModel, CudaSession};

/// Batches up to this many tokens run through the matrix-vector kernels (weights read once per
/// token); larger ones through dequantize + cuBLAS.
pub const MATVEC_MAX_TOKENS: usize = 8;

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

/// The three kernels specialised for one weight type.
pub(crate) struct TypeKernels {
    pub matvec: CudaFunction,
    /// The matrix-vector product whose input is silu(gate) * up (the FFN down projection).
    pub matvec_swiglu: CudaFunction,
    pub dequant_f16: CudaFunction,
    pub get_rows: CudaFunction,
}

pub(crate) struct Kernels {
    pub by_type: Vec<(GgmlType, TypeKernels)>,
    pub rms_norm: CudaFunction,
    pub split_f16: CudaFunction,
    pub rope_kv: CudaFunction,
    pub attention: CudaFunction,
    pub swiglu: CudaFunction,
}

impl Kernels {
    pub fn for_type(&self, ty: GgmlType) -> Result<&TypeKernels> {
        match self.by_type.iter().find(|(t, _)| *t == ty) {
            Some((_, k)) => Ok(k),
            None => bail!("tensor type {ty} is not supported by the CUDA backend"),
        }
    }
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
        let opts = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=sm_{}{}", capability.0, capability.1), "--std=c++17".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map_err(|e| anyhow::anyhow!("NVRTC failed to compile the kernels: {e}"))?;
        let module = ctx.load_module(ptx).map_err(|e| anyhow::anyhow!("loading the kernel module: {e}"))?;
        let f = |name: &str| -> Result<CudaFunction> {
            module.load_function(name).with_context(|| format!("kernel {name} missing from the module"))
        };
        let mut by_type = Vec::new();
        for (ty, sfx) in TYPES {
            by_type.push((
                ty,
                TypeKernels {
                    matvec: f(&format!("matvec_{sfx}"))?,
                    matvec_swiglu: f(&format!("matvec_swiglu_{sfx}"))?,
                    dequant_f16: f(&format!("dequant_f16_{sfx}"))?,
                    get_rows: f(&format!("get_rows_{sfx}"))?,
                },
            ));
        }
        let kernels = Kernels {
            by_type,
            rms_norm: f("rms_norm")?,
            split_f16: f("split_f16")?,
            rope_kv: f("rope_kv")?,
            attention: f("attention")?,
            swiglu: f("swiglu")?,
        };
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
        // cuBLAS is optional: without it batches run through the matrix-vector kernels.
        // SAFETY: dlopen probe only.
        let blas =
            if unsafe { cudarc::cublas::sys::is_culib_present() } { CudaBlas::new(stream.clone()).ok() } else { None };
        Ok(Device { ctx, stream, kernels, blas, name, capability, compile_ms, _module: module })
    }

    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }
}
