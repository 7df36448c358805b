//! The instruction-set level the kernels run at: detected once at run time, and optionally lowered
//! with `KILN_ISA=scalar|avx2|avx512` (for tests and comparisons; it never raises the level).

use std::sync::OnceLock;

/// Instruction-set levels of the kernels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable code (the oracles' arithmetic).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (and AVX2 + FMA + F16C): kernels that gain from `vpdpbusd` /
    /// `vpdpwssd` or 512-bit registers have a version here; the others run their AVX2 version.
    Avx512,
}

impl Isa {
    /// Lower-case name, as `KILN_ISA` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn from_name(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// The best level this CPU can run among the built kernels.
pub fn detected_isa() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// Every level that can run here, lowest first (for tests and benchmarks).
pub fn available_isas() -> Vec<Isa> {
    let best = detected_isa();
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
}

/// The level the kernels use: the detected one, lowered by `KILN_ISA` if set.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detected_isa();
        match std::env::var("KILN_ISA").ok().and_then(|s| Isa::from_name(&s)) {
            Some(forced) => forced.min(best),
            None => best,
        }
    })
}

/// Name of the active level: `"scalar"`, `"avx2"` or `"avx512"`.
pub fn active_isa() -> &'static str {
    isa().name()
}

/// Hints the CPU to bring `bytes` (if any) into cache; a no-op where no hint exists.
#[inline(always)]
pub fn prefetch(bytes: Option<&[u8]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(b) = bytes {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for off in (0..b.len()).step_by(64) {
            // SAFETY: prefetching is a hint that never faults; the address is inside `b` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().add(off) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// How far ahead of the bytes being multiplied the generation kernels ask for weight bytes:
/// generation streams every weight once from DRAM and the hardware prefetcher stops at each 4 KiB
/// page (TinyLlama-shape Q4_K tg: 2 KiB ahead beat 1 KiB and 3–4 KiB).
const PREFETCH_AHEAD: usize = 2048;

/// Asks for `lines` cache lines from [`PREFETCH_AHEAD`] bytes past `p`. The SIMD kernels call it
/// once per group of blocks, a steady trickle (a whole row asked for at once stalls on the miss
/// buffers); past a row the bytes are the next row's, which the caller multiplies next. `p` need
/// not point into any object: prefetches never fault.
#[inline(always)]
pub(crate) fn prefetch_lines_ahead(p: *const u8, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let ahead = p.wrapping_add(PREFETCH_AHEAD);
        for line in 0..lines {
            // SAFETY: a prefetch is a hint that never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}
