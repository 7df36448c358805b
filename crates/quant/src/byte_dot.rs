//! Per-lane byte products shared by the interleaved kernels' AVX2 and AVX-512 VNNI sets
//! (`dot_kquant::rows8`, `dot_legacy::rows8`).

/// Defines, in a kernel set's module, `dp(acc, w, a)` = `acc + Σ_{4 bytes} w · a` per i32 lane
/// (u8 × i8: `vpdpbusd` with `$vnni`, else `vpmaddubsw` + `vpmaddwd` with ones) and `bcast(p)`,
/// the 4 bytes at `p` in every lane. Both are inlined into the set's kernels, whose target
/// features they then run under.
#[cfg(target_arch = "x86_64")]
macro_rules! byte_dot_helpers {
    ($vnni:literal) => {
        /// `acc + Σ_{4 bytes} w · a` per i32 lane (u8 × i8).
        #[inline(always)]
        unsafe fn dp(
            acc: std::arch::x86_64::__m256i,
            w: std::arch::x86_64::__m256i,
            a: std::arch::x86_64::__m256i,
        ) -> std::arch::x86_64::__m256i {
            use std::arch::x86_64::*;
            // SAFETY: the enclosing kernel's target features (AVX-512 VNNI + VL in the VNNI set).
            unsafe {
                if $vnni {
                    _mm256_dpbusd_epi32(acc, w, a)
                } else {
                    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)))
                }
            }
        }

        /// The 4 bytes at `p` in every i32 lane.
        #[inline(always)]
        unsafe fn bcast<T>(p: *const T) -> std::arch::x86_64::__m256i {
            // SAFETY: the caller guarantees 4 readable bytes at `p`.
            unsafe { std::arch::x86_64::_mm256_set1_epi32((p as *const i32).read_unaligned()) }
        }
    };
}
