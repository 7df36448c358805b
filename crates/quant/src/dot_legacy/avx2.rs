//! AVX2 + FMA + F16C kernels for the legacy formats, and the same kernels with AVX-512 VNNI byte
//! products (module [`vnni`], generated from the same source by `kernel_set!`).
//!
//! Blocks are taken four at a time, as two pairs. The activations are stored pair-interleaved
//! (see [`crate::act_q8`]): for blocks `A`, `B` the two 256-bit vectors are `[A0..16 | B0..16]` and
//! `[A16..32 | B16..32]`. Loading the 16 quant bytes of `A` and `B` into one 256-bit register
//! unpacks both blocks' nibbles in that same order with one mask (low nibbles) and one shift + mask
//! (high nibbles): no lane shuffles. The unsigned quants (Q4_0, Q4_1: `0..=15`; Q5_0, Q5_1:
//! `0..=31` with the fifth bit spread from `qh` by `vpshufb` + compare) then go straight into
//! `vpmaddubsw` (u8 × i8 → i16 pairs); the two halves' i16 results are added (at most
//! `4 · 31 · 127 = 15748`, no overflow) before one `vpmaddwd` with ones widens them to i32. The
//! signed formats (Q8_0, and IQ4_NL through a `vpshufb` of the codebook) use `|w|` with the sign
//! moved onto the activation (`vpsignb`); their pairs (at most `2 · 128 · 127 = 32512`, no
//! saturation) are widened separately. A shuffle/add tree reduces the two pairs to one `__m128i` of
//! the four exact block sums. The Q4_0/Q5_0 offsets are subtracted there in integers (`8 · Σa`,
//! `16 · Σa` from the precomputed sums), so each lane holds exactly the oracle's `Σ w a`; it is
//! converted to f32 and multiplied into the accumulator with the four scales `d · da` (F16C
//! converts the four f16 scales at once). Q4_1/Q5_1 add `(m · da) · Σa` into a second accumulator.
//! The activations are zero-padded to whole groups of four; a partial last group of 1..=3 weight
//! blocks runs through the same code specialised on the number of blocks present (the missing
//! ones unpack as zero bytes and get zero scales, exactly as zero-padded weights would), reading
//! nothing past the row.

use std::arch::x86_64::*;

use super::{block_bytes, T_IQ4_NL, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0};
use crate::act_q8::{ActQ8, GROUP, QK};
use crate::iq4_nl::KVALUES_IQ4NL;

/// A kernel for one format, `K` activations and `P` planes each: `out[k] = row · acts[k P .. k P +
/// P]` (see [`super::vec_dot_q8_planes`] for what two planes mean).
///
/// # Safety
/// The CPU must have the kernel's level (AVX2, FMA and F16C; for [`vnni`] also AVX-512
/// F/BW/VL/VNNI). `row` must be whole blocks of the kernel's format, every
/// activation vector well formed ([`ActQ8::is_well_formed`]) with exactly that many blocks,
/// `acts.len() == K · P` and `out.len() == K`; with two planes, each second plane's scales are
/// its first plane's divided by 256 ([`ActQ8::quantize_residual`]).
pub(super) type DotFn = unsafe fn(&[u8], &[&ActQ8], &mut [f32]);

macro_rules! by_k {
    ($t:ident) => {
        [dot::<$t, 1, 1, 1>, dot::<$t, 2, 1, 2>, dot::<$t, 3, 1, 3>, dot::<$t, 4, 1, 4>]
    };
}

/// Up to four two-plane activations (eight vectors). Three and four are for the VNNI set, whose 32
/// vector registers hold their sums; the AVX2 set has them too (same bits, but they spill), and
/// [`super::tokens2_per_call`] keeps its callers at two.
macro_rules! by_k2 {
    ($t:ident) => {
        [dot::<$t, 1, 2, 2>, dot::<$t, 2, 2, 4>, dot::<$t, 3, 2, 6>, dot::<$t, 4, 2, 8>]
    };
}

const _: () = assert!(T_Q4_0 == 0 && T_Q4_1 == 1 && T_Q5_0 == 2 && T_Q5_1 == 3 && T_Q8_0 == 4 && T_IQ4_NL == 5);

/// Activation pointers of one group of four blocks, for each of the `N` activation vectors.
struct ActPtrs<const N: usize> {
    qs: [*const i8; N],
    d: [*const f32; N],
    sums: [*const i32; N],
}

impl<const N: usize> ActPtrs<N> {
    /// The pointers of group `g`.
    ///
    /// # Safety
    /// `self` points to group 0 of storage holding more than `g` whole groups.
    #[inline(always)]
    unsafe fn at(&self, g: usize) -> ActPtrs<N> {
        // SAFETY: the offsets stay inside the storage (the caller's contract).
        unsafe {
            ActPtrs {
                qs: std::array::from_fn(|k| self.qs[k].add(GROUP * QK * g)),
                d: std::array::from_fn(|k| self.d[k].add(GROUP * g)),
                sums: std::array::from_fn(|k| self.sums[k].add(GROUP * g)),
            }
        }
    }
}

/// The kernels of one level: `$feat` its target features; with `$vnni`, each pair of half-vectors
/// is multiplied by two `vpdpbusd` (u8 × i8, four products added into each i32 lane) instead of
/// `vpmaddubsw` + `vpmaddwd`, and a second plane goes on from the first's sums shifted by 8 bits.
/// The per-block integers are the same either way, so both levels give the same bits.
macro_rules! kernel_set {
    ($feat:literal, $vnni:literal) => {
        /// The one-plane kernels, indexed `[format code][K - 1]` (the codes are 0..=5 in the order of the
        /// table).
        pub(in crate::dot_legacy) const KERNELS: [[DotFn; 4]; 6] =
            [by_k!(T_Q4_0), by_k!(T_Q4_1), by_k!(T_Q5_0), by_k!(T_Q5_1), by_k!(T_Q8_0), by_k!(T_IQ4_NL)];

        /// The two-plane kernels, indexed `[format code][K - 1]`.
        pub(in crate::dot_legacy) const KERNELS2: [[DotFn; 4]; 6] =
            [by_k2!(T_Q4_0), by_k2!(T_Q4_1), by_k2!(T_Q5_0), by_k2!(T_Q5_1), by_k2!(T_Q8_0), by_k2!(T_IQ4_NL)];

        /// # Safety
        /// As [`DotFn`](super::DotFn), with `acts.len() == N == K · P` and `out.len() == K`.
        #[target_feature(enable = $feat)]
        unsafe fn dot<const T: u8, const K: usize, const P: usize, const N: usize>(
            row: &[u8],
            acts: &[&ActQ8],
            out: &mut [f32],
        ) {
            let bs = block_bytes(T);
            let nb = row.len() / bs;
            let full = nb / GROUP;
            let rem = nb % GROUP;
            debug_assert!(acts.len() == N && N == K * P && out.len() == K);
            let base = ActPtrs::<N> {
                qs: std::array::from_fn(|i| acts[i].raw().1.as_ptr()),
                d: std::array::from_fn(|i| acts[i].raw().0.as_ptr()),
                sums: std::array::from_fn(|i| acts[i].raw().2.as_ptr()),
            };
            // Lane `j` of the eight-block accumulators takes blocks `8i + j`: the low half is the
            // accumulator of the even groups, the high half that of the odd ones.
            let mut acc8 = [_mm256_setzero_ps(); K];
            let mut accm8 = [_mm256_setzero_ps(); K];
            let w0 = row.as_ptr();
            let mut g = 0;
            // SAFETY (all blocks below): a well-formed ActQ8 of `nb` blocks stores `nb.div_ceil(4)` whole
            // groups, zero-padded; groups `g < full` lie wholly inside `row`, and the last group (`full`
            // when `rem > 0`) reads only its `rem` blocks of `row`.
            while g + 2 <= full {
                unsafe {
                    let w = w0.add(GROUP * bs * g);
                    // the lines of these eight blocks, 2 KiB ahead
                    crate::isa::prefetch_lines_ahead(w, (2 * GROUP * bs).div_ceil(64) + 1);
                    eight::<T, K, P, N>(w, &base.at(g), &mut acc8, &mut accm8);
                }
                g += 2;
            }
            let mut acc: [__m128; K] = std::array::from_fn(|k| _mm256_castps256_ps128(acc8[k]));
            let mut accm: [__m128; K] = std::array::from_fn(|k| _mm256_castps256_ps128(accm8[k]));
            let acc2: [__m128; K] = std::array::from_fn(|k| _mm256_extractf128_ps::<1>(acc8[k]));
            let accm2: [__m128; K] = std::array::from_fn(|k| _mm256_extractf128_ps::<1>(accm8[k]));
            if g < full {
                unsafe { group::<T, K, P, N, 4>(w0.add(GROUP * bs * g), &base.at(g), &mut acc, &mut accm) };
            }
            // The last 1..=3 blocks: the missing blocks count as zero weights with zero scales, against the
            // activations' zero padding (scale, quants, sums), so they add exact zeros.
            let wt = unsafe { w0.add(GROUP * bs * full) };
            match rem {
                0 => {}
                1 => unsafe { group::<T, K, P, N, 1>(wt, &base.at(full), &mut acc, &mut accm) },
                2 => unsafe { group::<T, K, P, N, 2>(wt, &base.at(full), &mut acc, &mut accm) },
                _ => unsafe { group::<T, K, P, N, 3>(wt, &base.at(full), &mut acc, &mut accm) },
            }
            for k in 0..K {
                out[k] = hsum(_mm_add_ps(_mm_add_ps(acc[k], acc2[k]), _mm_add_ps(accm[k], accm2[k])));
            }
        }

        /// The first `R` (1..=4) blocks starting at `w` against the group of four activation blocks at `a`
        /// (blocks `R..4` count as zero weights with zero scales), for `K` activations of `P` planes.
        ///
        /// With two planes the first plane's integer sums are scaled by 256 in the widening `vpmaddwd`
        /// (a multiply by 256 instead of 1; with VNNI, shifted left by 8 as the start of the second
        /// plane's `vpdpbusd`) and added to the second's: per block `Σ w (256 a + a')`, an exact
        /// integer (at most `32 · 128 · 32639 < 2^31`), converted and scaled once with the second
        /// plane's `d / 256`.
        ///
        /// # Safety
        /// The module's features; `w` points to `R` whole blocks of format `T`; each `a.qs[i]` to 128 readable
        /// quants (pair-interleaved), each `a.d[i]` and `a.sums[i]` to four readable values.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn group<const T: u8, const K: usize, const P: usize, const N: usize, const R: usize>(
            w: *const u8,
            a: &ActPtrs<N>,
            acc: &mut [__m128; K],
            accm: &mut [__m128; K],
        ) {
            let bs = block_bytes(T);
            let has_m = T == T_Q4_1 || T == T_Q5_1;
            let signed = T == T_Q8_0 || T == T_IQ4_NL;
            // blocks present in pair 1 (pair 0 always has at least one)
            let pairs = if R > 2 { 2 } else { 1 };
            // SAFETY: every read stays inside the `R` blocks at `w` (offsets `j · bs + 0 .. bs`, `j < R`)
            // and the activation ranges of the contract; all loads are unaligned.
            unsafe {
                // [pair][half]: the unsigned operand (quants, or |w|) and, for signed formats, the sign.
                let mut wu = [[_mm256_setzero_si256(); 2]; 2];
                let mut ws = [[_mm256_setzero_si256(); 2]; 2];
                for p in 0..pairs {
                    let pa = w.add(2 * p * bs);
                    let v = if R >= 2 * p + 2 { unpack::<T, true>(pa, pa.add(bs)) } else { unpack::<T, false>(pa, pa) };
                    for h in 0..2 {
                        if signed {
                            wu[p][h] = _mm256_abs_epi8(v[h]);
                            ws[p][h] = v[h];
                        } else {
                            wu[p][h] = v[h];
                        }
                    }
                }
                let (dw, mw) = if has_m {
                    let x = _mm_setr_epi32(
                        rd32(w) as i32,
                        if R > 1 { rd32(w.add(bs)) as i32 } else { 0 },
                        if R > 2 { rd32(w.add(2 * bs)) as i32 } else { 0 },
                        if R > 3 { rd32(w.add(3 * bs)) as i32 } else { 0 },
                    );
                    let x = _mm_shuffle_epi8(x, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
                    (_mm_cvtph_ps(x), _mm_cvtph_ps(_mm_unpackhi_epi64(x, x)))
                } else {
                    let mut h = u64::from(rd16(w));
                    if R > 1 {
                        h |= u64::from(rd16(w.add(bs))) << 16;
                    }
                    if R > 2 {
                        h |= u64::from(rd16(w.add(2 * bs))) << 32;
                    }
                    if R > 3 {
                        h |= u64::from(rd16(w.add(3 * bs))) << 48;
                    }
                    (_mm_cvtph_ps(_mm_cvtsi64_si128(h as i64)), _mm_setzero_ps())
                };
                let ones = _mm256_set1_epi16(1);
                let c256 = _mm256_set1_epi16(256);
                for k in 0..K {
                    let mut pr = [_mm256_setzero_si256(); 2];
                    for p in 0..pairs {
                        for pl in 0..P {
                            let q = a.qs[k * P + pl];
                            let widen = if P == 2 && pl == 0 { c256 } else { ones };
                            let a0 = _mm256_loadu_si256(q.add(64 * p) as *const __m256i);
                            let a1 = _mm256_loadu_si256(q.add(64 * p + 32) as *const __m256i);
                            if $vnni {
                                let (s0, s1) = if signed {
                                    (_mm256_sign_epi8(a0, ws[p][0]), _mm256_sign_epi8(a1, ws[p][1]))
                                } else {
                                    (a0, a1)
                                };
                                let start =
                                    if pl == 0 { _mm256_setzero_si256() } else { _mm256_slli_epi32::<8>(pr[p]) };
                                pr[p] = dp_halves(start, wu[p][0], s0, wu[p][1], s1);
                                continue;
                            }
                            let v = if signed {
                                let m0 = _mm256_maddubs_epi16(wu[p][0], _mm256_sign_epi8(a0, ws[p][0]));
                                let m1 = _mm256_maddubs_epi16(wu[p][1], _mm256_sign_epi8(a1, ws[p][1]));
                                _mm256_add_epi32(_mm256_madd_epi16(m0, widen), _mm256_madd_epi16(m1, widen))
                            } else {
                                let m = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(wu[p][0], a0),
                                    _mm256_maddubs_epi16(wu[p][1], a1),
                                );
                                _mm256_madd_epi16(m, widen)
                            };
                            pr[p] = if pl == 0 { v } else { _mm256_add_epi32(pr[p], v) };
                        }
                    }
                    let mut isum = reduce_pairs(pr[0], pr[1]);
                    let mut sv = _mm_loadu_si128(a.sums[k * P] as *const __m128i);
                    if P == 2 {
                        sv = _mm_add_epi32(_mm_slli_epi32(sv, 8), _mm_loadu_si128(a.sums[k * P + 1] as *const __m128i));
                    }
                    if T == T_Q4_0 {
                        isum = _mm_sub_epi32(isum, _mm_slli_epi32(sv, 3));
                    } else if T == T_Q5_0 {
                        isum = _mm_sub_epi32(isum, _mm_slli_epi32(sv, 4));
                    }
                    let da = _mm_loadu_ps(a.d[k * P + P - 1]);
                    acc[k] = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(dw, da), acc[k]);
                    if has_m {
                        accm[k] = _mm_fmadd_ps(_mm_cvtepi32_ps(sv), _mm_mul_ps(mw, da), accm[k]);
                    }
                }
            }
        }

        /// Eight whole blocks starting at `w` (two groups) against the activation groups at `a` and the
        /// next one, for `K` activations of `P` planes: the exact integer sums per block of [`group`],
        /// with the reduction, the scale loads and the f32 update done once for all eight blocks in
        /// 256-bit registers. Lane `j` of `acc` / `accm` takes block `j`'s term, so each lane sees the
        /// same sequence of updates as lane `j mod 4` of the four-block path's even (`j < 4`) or odd
        /// group accumulator.
        ///
        /// # Safety
        /// The module's features; `w` points to eight whole blocks of format `T`; each `a.qs[i]` to 256 readable
        /// quants (pair-interleaved), each `a.d[i]` and `a.sums[i]` to eight readable values.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn eight<const T: u8, const K: usize, const P: usize, const N: usize>(
            w: *const u8,
            a: &ActPtrs<N>,
            acc: &mut [__m256; K],
            accm: &mut [__m256; K],
        ) {
            let bs = block_bytes(T);
            let has_m = T == T_Q4_1 || T == T_Q5_1;
            let signed = T == T_Q8_0 || T == T_IQ4_NL;
            // SAFETY: every read stays inside the eight blocks at `w` and the activation ranges of the
            // contract; all loads are unaligned.
            unsafe {
                let ones = _mm256_set1_epi16(1);
                let c256 = _mm256_set1_epi16(256);
                let mut pr = [[_mm256_setzero_si256(); K]; 4];
                // pair by pair, so that only one pair's weights (and signs) are live at a time
                for (p, prp) in pr.iter_mut().enumerate() {
                    let pa = w.add(2 * p * bs);
                    let v = unpack::<T, true>(pa, pa.add(bs));
                    let wu = if signed { [_mm256_abs_epi8(v[0]), _mm256_abs_epi8(v[1])] } else { v };
                    for (k, sum) in prp.iter_mut().enumerate() {
                        for pl in 0..P {
                            let q = a.qs[k * P + pl];
                            let widen = if P == 2 && pl == 0 { c256 } else { ones };
                            let a0 = _mm256_loadu_si256(q.add(64 * p) as *const __m256i);
                            let a1 = _mm256_loadu_si256(q.add(64 * p + 32) as *const __m256i);
                            if $vnni {
                                let (s0, s1) = if signed {
                                    (_mm256_sign_epi8(a0, v[0]), _mm256_sign_epi8(a1, v[1]))
                                } else {
                                    (a0, a1)
                                };
                                let start = if pl == 0 { _mm256_setzero_si256() } else { _mm256_slli_epi32::<8>(*sum) };
                                *sum = dp_halves(start, wu[0], s0, wu[1], s1);
                                continue;
                            }
                            let s = if signed {
                                let m0 = _mm256_maddubs_epi16(wu[0], _mm256_sign_epi8(a0, v[0]));
                                let m1 = _mm256_maddubs_epi16(wu[1], _mm256_sign_epi8(a1, v[1]));
                                _mm256_add_epi32(_mm256_madd_epi16(m0, widen), _mm256_madd_epi16(m1, widen))
                            } else {
                                let m =
                                    _mm256_add_epi16(_mm256_maddubs_epi16(wu[0], a0), _mm256_maddubs_epi16(wu[1], a1));
                                _mm256_madd_epi16(m, widen)
                            };
                            *sum = if pl == 0 { s } else { _mm256_add_epi32(*sum, s) };
                        }
                    }
                }
                let dw = _mm256_cvtph_ps(halves8(w, bs, 0));
                let mw = if has_m { _mm256_cvtph_ps(halves8(w, bs, 2)) } else { _mm256_setzero_ps() };
                for k in 0..K {
                    let mut isum = reduce_eight(std::array::from_fn(|p| pr[p][k]));
                    let mut sv = _mm256_loadu_si256(a.sums[k * P] as *const __m256i);
                    if P == 2 {
                        sv = _mm256_add_epi32(
                            _mm256_slli_epi32(sv, 8),
                            _mm256_loadu_si256(a.sums[k * P + 1] as *const __m256i),
                        );
                    }
                    if T == T_Q4_0 {
                        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(sv, 3));
                    } else if T == T_Q5_0 {
                        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(sv, 4));
                    }
                    let da = _mm256_loadu_ps(a.d[k * P + P - 1]);
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, da), acc[k]);
                    if has_m {
                        accm[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sv), _mm256_mul_ps(mw, da), accm[k]);
                    }
                }
            }
        }
    };
}

/// AVX2 + FMA + F16C.
mod base {
    use super::*;
    kernel_set!("avx2,fma,f16c", false);
}

/// AVX-512 VNNI on 256-bit vectors (AVX-512 VL), with AVX2 + FMA + F16C.
pub(super) mod vnni {
    use super::*;
    kernel_set!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", true);
}

pub(super) use base::{KERNELS, KERNELS2};

/// `acc + Σ u0·s0 + Σ u1·s1` per i32 lane (four adjacent u8 × i8 products of each pair of
/// vectors): the VNNI form of one plane's pair of half-vectors, exact (no saturation).
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn dp_halves(acc: __m256i, u0: __m256i, s0: __m256i, u1: __m256i, s1: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, u0, s0), u1, s1)
}

/// The f16 at byte `off` of each of the eight blocks (`bs` bytes each) at `w`, in block order.
/// Block `j`'s value is word `j` of the 16 bytes at `w + (bs - 2) j + off`, so eight overlapping
/// loads and seven word blends gather them without scalar code.
///
/// # Safety
/// AVX2; `w` points to eight whole blocks of `bs >= 4` bytes and `off + 2 <= bs`, `off <= 2`
/// (every load ends at `w + 7 bs + 2 + off <= w + 8 bs`).
#[inline(always)]
unsafe fn halves8(w: *const u8, bs: usize, off: usize) -> __m128i {
    // SAFETY: load `j` covers `w + (bs - 2) j + off .. + 16`, inside the eight blocks (contract).
    unsafe {
        let ld = |j: usize| _mm_loadu_si128(w.add((bs - 2) * j + off) as *const __m128i);
        let mut x = ld(0);
        x = _mm_blend_epi16::<0b0000_0010>(x, ld(1));
        x = _mm_blend_epi16::<0b0000_0100>(x, ld(2));
        x = _mm_blend_epi16::<0b0000_1000>(x, ld(3));
        x = _mm_blend_epi16::<0b0001_0000>(x, ld(4));
        x = _mm_blend_epi16::<0b0010_0000>(x, ld(5));
        x = _mm_blend_epi16::<0b0100_0000>(x, ld(6));
        _mm_blend_epi16::<0b1000_0000>(x, ld(7))
    }
}

/// `pr[p]` holds 4 partial sums of block `2p` in its low lane and of block `2p + 1` in its high
/// lane; lane `j` of the result is the total of block `j` (0..8).
///
/// In-lane unpacks and adds, then one single-source permute. (A tree ending in a two-source
/// cross-lane interleave, two `vperm2i128` and an unpack, made LLVM join its two halves into
/// 512-bit registers where AVX-512 is enabled; 512-bit uops in flight take port 1's vector units
/// from the 256-bit byte products, and the VNNI kernels ran slower, most with three and four
/// two-plane activations, which then cost more per token than two.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce_eight(pr: [__m256i; 4]) -> __m256i {
    // low lane [b0 (sums 0+2), b2 (0+2), b0 (1+3), b2 (1+3)], high lane the same for b1, b3
    let t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(pr[0], pr[1]), _mm256_unpackhi_epi32(pr[0], pr[1]));
    // the same for b4, b6 | b5, b7
    let t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(pr[2], pr[3]), _mm256_unpackhi_epi32(pr[2], pr[3]));
    // low lane [b0, b2, b4, b6], high lane [b1, b3, b5, b7]
    let u = _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
    _mm256_permutevar8x32_epi32(u, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// # Safety
/// `p` must point to 2 readable bytes.
#[inline(always)]
unsafe fn rd16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes; the read is unaligned.
    unsafe { (p as *const u16).read_unaligned() }
}

/// # Safety
/// `p` must point to 4 readable bytes.
#[inline(always)]
unsafe fn rd32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes; the read is unaligned.
    unsafe { (p as *const u32).read_unaligned() }
}

/// The nibbles of the 16 quant bytes of blocks `A` (at `pa`) and `B` (at `pb`) in the
/// pair-interleaved order: `[A0..16 | B0..16]` (low nibbles) and `[A16..32 | B16..32]` (high).
///
/// # Safety
/// AVX2; `pa` and `pb` must each point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles_pair<const B: bool>(pa: *const u8, pb: *const u8) -> [__m256i; 2] {
    // SAFETY: the caller guarantees 16 readable bytes at each pointer read; the loads are unaligned.
    let x = unsafe { load_pair::<B>(pa, pb) };
    let m = _mm256_set1_epi8(0x0f);
    [_mm256_and_si256(x, m), _mm256_and_si256(_mm256_srli_epi16(x, 4), m)]
}

/// 16 bytes at `pa` in the low lane and, if `B`, 16 bytes at `pb` in the high lane (else zeros).
///
/// # Safety
/// AVX2; `pa` (and `pb` if `B`) must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_pair<const B: bool>(pa: *const u8, pb: *const u8) -> __m256i {
    // SAFETY: the caller's contract; the loads are unaligned.
    unsafe {
        let hi = if B { _mm_loadu_si128(pb as *const __m128i) } else { _mm_setzero_si128() };
        _mm256_set_m128i(hi, _mm_loadu_si128(pa as *const __m128i))
    }
}

/// The fifth bits of blocks `A`, `B` (`qh` words) as `0x10` bytes in the pair-interleaved order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fifth_bits_pair(qa: u32, qb: u32) -> [__m256i; 2] {
    let v = _mm256_set1_epi64x((u64::from(qa) | u64::from(qb) << 32) as i64);
    // byte j of the low half of A comes from qh byte j / 8 of A (bytes 0, 1 of the 64-bit word),
    // of B from bytes 4, 5; the high halves from bytes 2, 3 and 6, 7.
    let spread_lo = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
    );
    let spread_hi = _mm256_setr_epi8(
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7,
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let bit = _mm256_set1_epi8(0x10);
    let expand = |spread: __m256i| {
        let bytes = _mm256_shuffle_epi8(v, spread);
        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, sel), sel), bit)
    };
    [expand(spread_lo), expand(spread_hi)]
}

/// Blocks `A` (at `pa`) and `B` (at `pb`) unpacked to two 256-bit vectors in the pair-interleaved
/// order: unsigned quants, or the signed weights of Q8_0 / IQ4_NL. Without `B`, `pb` is not read
/// and block `B` unpacks as if all its bytes were zero.
///
/// # Safety
/// AVX2; `pa` (and `pb` if `B`) must point to one whole block of format `T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const T: u8, const B: bool>(pa: *const u8, pb: *const u8) -> [__m256i; 2] {
    // SAFETY: every offset read is inside the block layout of `T` (see the format files).
    unsafe {
        let with_fifth = |n: [__m256i; 2], h: [__m256i; 2]| [_mm256_or_si256(n[0], h[0]), _mm256_or_si256(n[1], h[1])];
        match T {
            T_Q4_0 => nibbles_pair::<B>(pa.add(2), pb.add(2)),
            T_Q4_1 => nibbles_pair::<B>(pa.add(4), pb.add(4)),
            T_Q5_0 => with_fifth(
                nibbles_pair::<B>(pa.add(6), pb.add(6)),
                fifth_bits_pair(rd32(pa.add(2)), if B { rd32(pb.add(2)) } else { 0 }),
            ),
            T_Q5_1 => with_fifth(
                nibbles_pair::<B>(pa.add(8), pb.add(8)),
                fifth_bits_pair(rd32(pa.add(4)), if B { rd32(pb.add(4)) } else { 0 }),
            ),
            T_Q8_0 => [load_pair::<B>(pa.add(2), pb.add(2)), load_pair::<B>(pa.add(18), pb.add(18))],
            _ => {
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i));
                let n = nibbles_pair::<B>(pa.add(2), pb.add(2));
                [_mm256_shuffle_epi8(table, n[0]), _mm256_shuffle_epi8(table, n[1])]
            }
        }
    }
}

/// `p01` holds 4 partial sums of block 0 in its low lane and of block 1 in its high lane, `p23`
/// likewise for blocks 2, 3; lane `j` of the result is the total of block `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce_pairs(p01: __m256i, p23: __m256i) -> __m128i {
    // low lane: [b0 0+2, b2 0+2, b0 1+3, b2 1+3], high lane the same for b1, b3
    let t = _mm256_add_epi32(_mm256_unpacklo_epi32(p01, p23), _mm256_unpackhi_epi32(p01, p23));
    // low lane: [b0, b2, b0, b2], high lane [b1, b3, b1, b3]
    let u = _mm256_add_epi32(t, _mm256_shuffle_epi32(t, 0b01_00_11_10));
    _mm_unpacklo_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
