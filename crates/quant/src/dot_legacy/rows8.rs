//! Two-plane Q4_0 kernels over row-interleaved groups ([`crate::interleave`]): the vector lanes are
//! rows.
//!
//! A group is sixteen rows; per block the unit holds the sixteen `d` (32 bytes) and four 64-byte
//! slots, slot `k` holding quant bytes `4k .. 4k + 4` of every row (rows 0–7 in its first half).
//! Low nibbles are elements `4k ..`, high nibbles `16 + 4k ..` of the block: each is multiplied by
//! the matching broadcast activation word of each plane (`vpdpbusd`, or `vpmaddubsw` + `vpmaddwd`
//! without VNNI) into per-row sums. Per block and row the integer `Σ (q − 8)(256 a + a′)` is
//! `(P1 << 8) + P2 − 8 · (256 S1 + S2)` with the activation sums `S` (at most `32 · 8 · 32639 <
//! 2^24`, so exact in i32 and in its f32 conversion), and the f32 steps are the scalar oracle's:
//! `sum += (d · da′) · isum`, block after block. So these kernels give the oracle's bits.

use crate::act_q8::ActQ8;
use crate::interleave::GROUP;

macro_rules! rows8_kernels {
    ($feat:literal, $vnni:literal) => {
        use crate::act_q8::{half_offset, ActQ8};
        use std::arch::x86_64::*;

        byte_dot_helpers!($vnni);

        /// One group of 16 interleaved Q4_0 rows (at `data`, `nb` units of 288 bytes) against
        /// `NT` two-plane activations: `out[(8g + r) · NT + t]` for row `r` of half `g`.
        ///
        /// # Safety
        /// The CPU has the set's features; `data` holds one group woven by
        /// [`crate::interleave::interleave`] from Q4_0 rows of `nb` blocks; `acts` holds `2 · NT`
        /// well-formed activation vectors of `nb` blocks each (pairs of a plane and its residual
        /// plane); `out` holds `16 · NT` values.
        #[target_feature(enable = $feat)]
        pub(in crate::dot_legacy) unsafe fn q4_0_group<const NT: usize>(
            data: *const u8,
            nb: usize,
            acts: &[&ActQ8],
            out: &mut [f32],
        ) {
            const G: usize = 2;
            const UNIT: usize = 16 * 18;
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); NT]; G];
            let raw: [[(&[f32], &[i8], &[i32]); 2]; NT] =
                std::array::from_fn(|t| [acts[2 * t].raw(), acts[2 * t + 1].raw()]);
            for b in 0..nb {
                // SAFETY: unit `b` lies inside `data` (the caller's contract); activation reads stay
                // inside block `b` of vectors of `nb` blocks (their padded buffers), prefetched
                // addresses inside blocks below `nb`.
                unsafe {
                    let base = data.add(b * UNIT);
                    // The activations two blocks ahead into L1 (not the weights: see the K-quant
                    // kernels): a wide matrix's units evict them between groups (TinyLlama Q4_0
                    // tg128 +5%).
                    if b + 2 < nb {
                        for t in 0..NT {
                            for plane in &raw[t] {
                                _mm_prefetch::<_MM_HINT_T0>(plane.1.as_ptr().add(half_offset(b + 2, 0)) as *const i8);
                                if b % 16 == 0 && b + 16 < nb {
                                    _mm_prefetch::<_MM_HINT_T0>(plane.0.as_ptr().add(b + 16) as *const i8);
                                    _mm_prefetch::<_MM_HINT_T0>(plane.2.as_ptr().add(b + 16) as *const i8);
                                }
                            }
                        }
                    }
                    let (lo_at, hi_at) = (half_offset(b, 0), half_offset(b, 1));
                    let mut x1 = [[_mm256_setzero_si256(); NT]; G];
                    let mut x2 = [[_mm256_setzero_si256(); NT]; G];
                    for k in 0..4 {
                        let mut lo = [_mm256_setzero_si256(); G];
                        let mut hi = [_mm256_setzero_si256(); G];
                        for g in 0..G {
                            let w = _mm256_loadu_si256(base.add(32 + 64 * k + 32 * g) as *const __m256i);
                            lo[g] = _mm256_and_si256(w, m4);
                            hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                        }
                        for t in 0..NT {
                            let (q1, q2) = (raw[t][0].1.as_ptr(), raw[t][1].1.as_ptr());
                            let (l1, h1) = (bcast(q1.add(lo_at + 4 * k)), bcast(q1.add(hi_at + 4 * k)));
                            let (l2, h2) = (bcast(q2.add(lo_at + 4 * k)), bcast(q2.add(hi_at + 4 * k)));
                            for g in 0..G {
                                x1[g][t] = dp(dp(x1[g][t], lo[g], l1), hi[g], h1);
                                x2[g][t] = dp(dp(x2[g][t], lo[g], l2), hi[g], h2);
                            }
                        }
                    }
                    for g in 0..G {
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16 * g) as *const __m128i));
                        for t in 0..NT {
                            let (s1, s2) = (*raw[t][0].2.get_unchecked(b), *raw[t][1].2.get_unchecked(b));
                            let offset = _mm256_set1_epi32(8 * (256 * s1 + s2));
                            let isum =
                                _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32::<8>(x1[g][t]), x2[g][t]), offset);
                            let dd = _mm256_mul_ps(d, _mm256_set1_ps(*raw[t][1].0.get_unchecked(b)));
                            acc[g][t] = _mm256_add_ps(acc[g][t], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(isum)));
                        }
                    }
                }
            }
            for g in 0..G {
                for t in 0..NT {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds 8 f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[g][t]) };
                    for (r, &v) in lanes.iter().enumerate() {
                        out[(8 * g + r) * NT + t] = v;
                    }
                }
            }
        }
    };
}

const _: () = assert!(GROUP == 16);

/// AVX2 + FMA + F16C.
pub(super) mod base {
    rows8_kernels!("avx2,fma,f16c", false);
}

/// AVX-512 VNNI on 256-bit vectors (AVX-512 VL), with AVX2 + FMA + F16C.
pub(super) mod vnni {
    rows8_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", true);
}

/// Runs the interleaved Q4_0 kernel over the whole groups of `woven` (`group_bytes` each, rows of
/// `nb` blocks) against `acts.len() / 2` (1 to 4) two-plane activations: `out[r · NT + t]` for row
/// `r` of the slice. Three and four are for the VNNI set (32 vector registers); the AVX2 set runs
/// them too, with the same bits, but spills.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512 F/BW/VL/VNNI with `vnni`); `woven` is whole groups
/// woven from Q4_0 rows of `nb` blocks; `acts` are 2 to 8 well-formed vectors of `nb` blocks, each
/// second one the residual plane of the one before; `out` holds `16 · NT` values per group.
pub(super) unsafe fn groups(vnni: bool, woven: &[u8], group_bytes: usize, nb: usize, acts: &[&ActQ8], out: &mut [f32]) {
    let nt = acts.len() / 2;
    for (group, o) in woven.chunks_exact(group_bytes).zip(out.chunks_exact_mut(GROUP * nt)) {
        let data = group.as_ptr();
        // SAFETY: forwarded from this function's contract: one whole group at `data`.
        unsafe {
            match (vnni, nt) {
                (true, 1) => vnni::q4_0_group::<1>(data, nb, acts, o),
                (true, 2) => vnni::q4_0_group::<2>(data, nb, acts, o),
                (true, 3) => vnni::q4_0_group::<3>(data, nb, acts, o),
                (true, 4) => vnni::q4_0_group::<4>(data, nb, acts, o),
                (false, 1) => base::q4_0_group::<1>(data, nb, acts, o),
                (false, 2) => base::q4_0_group::<2>(data, nb, acts, o),
                (false, 3) => base::q4_0_group::<3>(data, nb, acts, o),
                (false, 4) => base::q4_0_group::<4>(data, nb, acts, o),
                _ => unreachable!("{nt} tokens"),
            }
        }
    }
}
