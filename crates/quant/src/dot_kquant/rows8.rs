//! Two-plane Q4_K / Q5_K kernels over row-interleaved groups ([`crate::interleave`]): the vector
//! lanes are the eight rows of a group.
//!
//! One 32-byte load of a quant slot holds quant bytes `4m .. 4m + 4` of sub-blocks `2j` (low
//! nibbles) and `2j + 1` (high nibbles) for all eight rows; the matching four activation bytes of
//! each plane are broadcast and multiplied into per-row sums (`vpdpbusd`, or `vpmaddubsw` +
//! `vpmaddwd` without VNNI). Per sub-block each plane's sum is multiplied by the rows' scales (one
//! `vpmulld` for eight rows, where the row-at-a-time kernel needs one per row), the mins by the
//! activation sums in `vpmaddwd`/`vpdpwssd` pairs. Each plane's total per super-block is exact in
//! i32 (at most `8 · 63 · 32 · 31 · 127 < 2^31`); `256 · P1 + P2` is formed exactly in f64 and
//! rounded once to f32, then scaled as the oracle does (`(d·da) · isum − (dmin·da) · msum`, see
//! `scalar_dot`): the bits of the scalar oracle.
//!
//! Both halves of a group (rows 0–7 and 8–15, the two 32-byte halves of each 64-byte slot) run
//! together, so each broadcast activation word serves 16 rows while the weights are read as one
//! steady stream.

use crate::act_q8k::ActQ8K;
use crate::interleave::{GROUP, LANES};

/// `vpshufb` controls: byte `k` of each 32-bit lane to the lane's low byte, the rest zero.
const PICK: [[u8; 32]; 4] = pick_table(false);
/// The same byte to both i16 halves of the lane (a min paired with two per-16 sums).
const PICK2: [[u8; 32]; 4] = pick_table(true);

const fn pick_table(both_halves: bool) -> [[u8; 32]; 4] {
    let mut t = [[0x80u8; 32]; 4];
    let mut k = 0;
    while k < 4 {
        let mut b = 0;
        while b < 32 {
            // `vpshufb` indexes within each 128-bit lane.
            let lane_start = (b % 16) / 4 * 4;
            if b % 4 == 0 || (both_halves && b % 4 == 2) {
                t[k][b] = (lane_start + k) as u8;
            }
            b += 1;
        }
        k += 1;
    }
    t
}

macro_rules! rows8_kernels {
    ($feat:literal, $vnni:literal) => {
        use super::super::QK_K;
        use super::{PICK, PICK2};
        use crate::act_q8k::ActQ8K;
        use std::arch::x86_64::*;

        byte_dot_helpers!($vnni);

        /// `acc + Σ_{2 i16} a · b` per i32 lane.
        #[inline(always)]
        unsafe fn dpw(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: as in `dp`.
            unsafe {
                if $vnni {
                    _mm256_dpwssd_epi32(acc, a, b)
                } else {
                    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
                }
            }
        }

        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m256i {
            // SAFETY: the caller guarantees 32 readable bytes at `p`.
            unsafe { _mm256_loadu_si256(p as *const __m256i) }
        }

        /// `f32(256 · a + b)` for 4 lanes: exact in f64, rounded once.
        #[inline(always)]
        unsafe fn combine_half(a: __m128i, b: __m128i) -> __m128 {
            // SAFETY: AVX + FMA (part of every set's features).
            unsafe {
                _mm256_cvtpd_ps(_mm256_fmadd_pd(_mm256_cvtepi32_pd(a), _mm256_set1_pd(256.0), _mm256_cvtepi32_pd(b)))
            }
        }

        /// `f32(256 · p1 + p2)` per lane, rounded once (the sum is exact in f64).
        #[inline(always)]
        unsafe fn combine(p1: __m256i, p2: __m256i) -> __m256 {
            // SAFETY: AVX2 (part of every set's features).
            unsafe {
                let lo = combine_half(_mm256_castsi256_si128(p1), _mm256_castsi256_si128(p2));
                let hi = combine_half(_mm256_extracti128_si256::<1>(p1), _mm256_extracti128_si256::<1>(p2));
                _mm256_set_m128(hi, lo)
            }
        }

        /// One group of 16 interleaved rows (at `data`, `nb` units) against `NT` two-plane
        /// activations: `out[(8g + r) · NT + t]` for row `r` of half `g` (rows `8g .. 8g + 8`).
        ///
        /// # Safety
        /// The CPU has the set's features; `data` holds one group (`nb` units of `16 · block`
        /// bytes) woven by [`crate::interleave::interleave`] from rows of Q4_K (Q5_K with `FIVE`);
        /// `acts` holds `2 · NT` activation vectors of `nb` super-blocks each (pairs of a plane and
        /// its residual plane); `out` holds `16 · NT` values.
        #[target_feature(enable = $feat)]
        pub(in crate::dot_kquant) unsafe fn q4k_group<const NT: usize, const FIVE: bool>(
            data: *const u8,
            nb: usize,
            acts: &[&ActQ8K],
            out: &mut [f32],
        ) {
            const G: usize = 2;
            let bs = if FIVE { 176 } else { 144 };
            let unit = G * LANES * bs;
            // Slot (32 bytes) of the first quant word: block byte 16 (Q4_K) or 48 (Q5_K).
            let qs_slot = if FIVE { 12 } else { 4 };
            let m4 = _mm256_set1_epi8(0x0F);
            let (l6, l4, h2) =
                (_mm256_set1_epi32(0x3f3f_3f3f), _mm256_set1_epi32(0x0f0f_0f0f), _mm256_set1_epi32(0x0303_0303));
            let mut pick = [_mm256_setzero_si256(); 4];
            let mut pick2 = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                // SAFETY: each table row is 32 bytes.
                unsafe {
                    pick[k] = load(PICK[k].as_ptr());
                    pick2[k] = load(PICK2[k].as_ptr());
                }
            }
            let mut acc = [[_mm256_setzero_ps(); NT]; G];
            for i in 0..nb {
                // SAFETY: unit `i` of every group lies inside `data` (the caller's contract: `nb`
                // units of `unit` bytes per group); activation reads stay inside super-block `i`
                // of vectors of `nb` super-blocks, prefetched addresses inside super-block `i + 1`.
                unsafe {
                    // Half-unit g's share of each 64-byte slot: its 32 bytes at 32g.
                    let base = data.add(i * unit);
                    // No software prefetch of the weights: the hardware's stream prefetchers follow
                    // this one sequential stream better alone (ahead by 1–4 units: 0.59–0.72× tg128).
                    let units: [*const u8; G] = std::array::from_fn(|g| base.add(32 * g));
                    let mut q1 = [std::ptr::null::<u8>(); NT];
                    let mut q2 = [std::ptr::null::<u8>(); NT];
                    let mut s1 = [std::ptr::null::<u8>(); NT];
                    let mut s2 = [std::ptr::null::<u8>(); NT];
                    let mut da = [0f32; NT];
                    // The next super-block's activations into L1, though: the weights streaming
                    // through (a group's unit is 16 rows' super-block) evict them between groups,
                    // and their broadcasts then wait on L2 (the down projection, 5632 columns:
                    // 18.6 → 25.2 GB/s on one thread, 29.8 → 36.7 on two; 2048 columns: +5%;
                    // TinyLlama Q4_K tg128 +6%).
                    if i + 1 < nb {
                        for t in 0..NT {
                            for a in [acts[2 * t], acts[2 * t + 1]] {
                                let qs = a.qs.as_ptr().add(QK_K * (i + 1)) as *const i8;
                                for line in 0..QK_K / 64 {
                                    _mm_prefetch::<_MM_HINT_T0>(qs.add(64 * line));
                                }
                                _mm_prefetch::<_MM_HINT_T0>(a.bsums.as_ptr().add(16 * (i + 1)) as *const i8);
                            }
                        }
                    }
                    for t in 0..NT {
                        let (a, b) = (acts[2 * t], acts[2 * t + 1]);
                        q1[t] = a.qs.as_ptr().add(QK_K * i) as *const u8;
                        q2[t] = b.qs.as_ptr().add(QK_K * i) as *const u8;
                        s1[t] = a.bsums.as_ptr().add(16 * i) as *const u8;
                        s2[t] = b.bsums.as_ptr().add(16 * i) as *const u8;
                        da[t] = *b.d.get_unchecked(i);
                    }
                    // Per row (lane): the scale and min bytes of sub-blocks 0–3 and 4–7.
                    let mut sc = [[_mm256_setzero_si256(); 2]; G];
                    let mut mn = [[_mm256_setzero_si256(); 2]; G];
                    for g in 0..G {
                        let u = units[g];
                        let (u0, u1, u2) = (load(u.add(64)), load(u.add(128)), load(u.add(192)));
                        sc[g][0] = _mm256_and_si256(u0, l6);
                        mn[g][0] = _mm256_and_si256(u1, l6);
                        sc[g][1] = _mm256_or_si256(
                            _mm256_and_si256(u2, l4),
                            _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(u0), h2)),
                        );
                        mn[g][1] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi32::<4>(u2), l4),
                            _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(u1), h2)),
                        );
                    }
                    let mut p1 = [[_mm256_setzero_si256(); NT]; G];
                    let mut p2 = [[_mm256_setzero_si256(); NT]; G];
                    for j in 0..4 {
                        let mut xa1 = [[_mm256_setzero_si256(); NT]; G];
                        let mut xa2 = [[_mm256_setzero_si256(); NT]; G];
                        let mut xb1 = [[_mm256_setzero_si256(); NT]; G];
                        let mut xb2 = [[_mm256_setzero_si256(); NT]; G];
                        for m in 0..8 {
                            let mut lo = [_mm256_setzero_si256(); G];
                            let mut hi = [_mm256_setzero_si256(); G];
                            for g in 0..G {
                                // Q5_K's first quant words alternate with its qh words
                                // (`interleave::slot_of`).
                                let slot = if FIVE && j == 0 { 5 + 2 * m } else { qs_slot + 8 * j + m };
                                let w = load(units[g].add(64 * slot));
                                lo[g] = _mm256_and_si256(w, m4);
                                hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                                if FIVE {
                                    // Bit 2j (2j + 1) of qh byte l is the fifth bit of quant l of
                                    // sub-block 2j (2j + 1): moved to bit 4 of its byte.
                                    let h = load(units[g].add(64 * (4 + 2 * m)));
                                    let m10 = _mm256_set1_epi8(0x10);
                                    let (ba, bb) = match j {
                                        0 => (_mm256_slli_epi16::<4>(h), _mm256_slli_epi16::<3>(h)),
                                        1 => (_mm256_slli_epi16::<2>(h), _mm256_slli_epi16::<1>(h)),
                                        2 => (h, _mm256_srli_epi16::<1>(h)),
                                        _ => (_mm256_srli_epi16::<2>(h), _mm256_srli_epi16::<3>(h)),
                                    };
                                    lo[g] = _mm256_or_si256(lo[g], _mm256_and_si256(ba, m10));
                                    hi[g] = _mm256_or_si256(hi[g], _mm256_and_si256(bb, m10));
                                }
                            }
                            for t in 0..NT {
                                let off = 64 * j + 4 * m;
                                let (a1, a2) = (bcast(q1[t].add(off)), bcast(q2[t].add(off)));
                                let (b1, b2) = (bcast(q1[t].add(off + 32)), bcast(q2[t].add(off + 32)));
                                for g in 0..G {
                                    xa1[g][t] = dp(xa1[g][t], lo[g], a1);
                                    xa2[g][t] = dp(xa2[g][t], lo[g], a2);
                                    xb1[g][t] = dp(xb1[g][t], hi[g], b1);
                                    xb2[g][t] = dp(xb2[g][t], hi[g], b2);
                                }
                            }
                        }
                        // Sub-blocks 2j and 2j + 1: bytes (2j) % 4 and (2j + 1) % 4 of scale word j / 2.
                        for g in 0..G {
                            let sa = _mm256_shuffle_epi8(sc[g][j / 2], pick[(2 * j) % 4]);
                            let sb = _mm256_shuffle_epi8(sc[g][j / 2], pick[(2 * j + 1) % 4]);
                            for t in 0..NT {
                                p1[g][t] = _mm256_add_epi32(
                                    p1[g][t],
                                    _mm256_add_epi32(
                                        _mm256_mullo_epi32(xa1[g][t], sa),
                                        _mm256_mullo_epi32(xb1[g][t], sb),
                                    ),
                                );
                                p2[g][t] = _mm256_add_epi32(
                                    p2[g][t],
                                    _mm256_add_epi32(
                                        _mm256_mullo_epi32(xa2[g][t], sa),
                                        _mm256_mullo_epi32(xb2[g][t], sb),
                                    ),
                                );
                            }
                        }
                    }
                    for g in 0..G {
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16 * g) as *const __m128i));
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(base.add(32 + 16 * g) as *const __m128i));
                        for t in 0..NT {
                            // Mins: m_c (both i16 halves) · the two per-16 sums of sub-block c.
                            let (mut m1, mut m2) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for c in 0..8 {
                                let mc = _mm256_shuffle_epi8(mn[g][c / 4], pick2[c % 4]);
                                m1 = dpw(m1, mc, bcast(s1[t].add(4 * c)));
                                m2 = dpw(m2, mc, bcast(s2[t].add(4 * c)));
                            }
                            let fi = combine(p1[g][t], p2[g][t]);
                            let fm = combine(m1, m2);
                            let vda = _mm256_set1_ps(da[t]);
                            let (dd, dm) = (_mm256_mul_ps(d, vda), _mm256_mul_ps(dmin, vda));
                            let v = _mm256_sub_ps(_mm256_mul_ps(dd, fi), _mm256_mul_ps(dm, fm));
                            acc[g][t] = _mm256_add_ps(acc[g][t], v);
                        }
                    }
                }
            }
            for g in 0..G {
                for t in 0..NT {
                    let mut lanes = [0f32; LANES];
                    // SAFETY: `lanes` holds 8 f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[g][t]) };
                    for (r, &v) in lanes.iter().enumerate() {
                        out[(LANES * g + r) * NT + t] = v;
                    }
                }
            }
        }
    };
}

const _: () = assert!(GROUP == 2 * LANES);

/// AVX2 + FMA + F16C.
pub(super) mod base {
    use super::LANES;
    rows8_kernels!("avx2,fma,f16c", false);
}

/// AVX-512 VNNI on 256-bit vectors (AVX-512 VL), with AVX2 + FMA + F16C.
pub(super) mod vnni {
    use super::LANES;
    rows8_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", true);
}

/// Runs the interleaved kernel over the whole groups of `woven` (`group_bytes` each, rows of `nb`
/// super-blocks) against `acts.len() / 2` (1 or 2) two-plane activations: `out[r · NT + t]` for
/// row `r` of the slice.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512 F/BW/VL/VNNI with `vnni`); `woven` is whole groups
/// woven from rows of `nb` super-blocks of `ty` (Q4_K or Q5_K); `acts` are 2 or 4 vectors of `nb`
/// super-blocks; `out` holds `16 · NT` values per group.
pub(super) unsafe fn groups(
    vnni: bool,
    ty: kiln_gguf::GgmlType,
    woven: &[u8],
    group_bytes: usize,
    nb: usize,
    acts: &[&ActQ8K],
    out: &mut [f32],
) {
    let nt = acts.len() / 2;
    let five = ty == kiln_gguf::GgmlType::Q5_K;
    for (group, o) in woven.chunks_exact(group_bytes).zip(out.chunks_exact_mut(GROUP * nt)) {
        let data = group.as_ptr();
        macro_rules! call {
            ($set:ident) => {
                // SAFETY: forwarded from this function's contract: one whole group at `data`.
                unsafe {
                    match (nt, five) {
                        (1, false) => $set::q4k_group::<1, false>(data, nb, acts, o),
                        (2, false) => $set::q4k_group::<2, false>(data, nb, acts, o),
                        (1, true) => $set::q4k_group::<1, true>(data, nb, acts, o),
                        (2, true) => $set::q4k_group::<2, true>(data, nb, acts, o),
                        _ => unreachable!("{nt} tokens"),
                    }
                }
            };
        }
        if vnni {
            call!(vnni);
        } else {
            call!(base);
        }
    }
}
