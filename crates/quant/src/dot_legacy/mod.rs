//! Dot products of legacy-format rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) with activations
//! quantized to 8 bits in blocks of 32 ([`ActQ8`]).
//!
//! Per block the weights are small integers `w` (already offset: `q - 8` for Q4_0, `q - 16` for
//! Q5_0, `q` for Q4_1/Q5_1/Q8_0, `KVALUES_IQ4NL[q]` for IQ4_NL) under an f16 scale `d` (and an f16
//! offset `m` for Q4_1/Q5_1); the activations are `da * a` with `a` in `-127..=127`. So a block
//! contributes exactly
//!
//! `(d * da) * Σ w_i a_i  +  (m * da) * Σ a_i`,
//!
//! where both sums are integers and only the two products with the f32 scales and the accumulation
//! over blocks are in f32.
//!
//! [`vec_dot_q8_unopt`] is the scalar oracle: it decodes every quant to a signed integer, forms the
//! integer sums per block (the activation sum from the quants themselves, not from `sums`) and
//! applies the scales in that order. The SIMD kernels compute the same integers per block (the
//! Q4_0/Q5_0 offsets are folded in as `- 8 Σa` / `- 16 Σa` in integers); only the order of the f32
//! accumulation differs.
//!
//! Two-plane activations ([`vec_dot_q8_planes`], the default path's generation products): the
//! quantized vector `a` and the plane `a′` of its rounding error at the fixed scale `da / 256`
//! ([`ActQ8::quantize_residual`]) stand for the integers `256 a + a′` under one scale, so a block
//! contributes `(d · da′) Σ w (256 a + a′) + (m · da′) Σ (256 a + a′)`, still two exact integer sums;
//! [`vec_dot_q8_planes_unopt`] is its oracle.
//!
//! The kernel is picked once per process: the best one the CPU runs (runtime detection), or a
//! lower one forced by the environment variable `KILN_ISA=scalar|avx2|avx512` (a level the CPU
//! lacks falls back to the best one below it). The AVX-512 level is the AVX2 kernels with the
//! byte products in `vpdpbusd` (AVX-512 VNNI): the same integers per block, the same bits.

use crate::act_q8::{ActQ8, QK};
use crate::iq4_nl::KVALUES_IQ4NL;
use half::f16;
use kiln_gguf::GgmlType;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod rows8;

use crate::isa::isa;
pub use crate::isa::{active_isa, available_isas, detected_isa, Isa};

/// Whether the active level (after `KILN_ISA`) has AVX2 + FMA + F16C (used by [`ActQ8::quantize`]).
pub(crate) fn simd_available() -> bool {
    isa() >= Isa::Avx2
}

/// Whether `ty` has kernels here.
pub fn is_supported(ty: GgmlType) -> bool {
    code_of(ty).is_some()
}

// Internal format codes: const-generic parameters of the SIMD kernels.
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q5_1: u8 = 3;
const T_Q8_0: u8 = 4;
const T_IQ4_NL: u8 = 5;

fn code_of(ty: GgmlType) -> Option<u8> {
    Some(match ty {
        GgmlType::Q4_0 => T_Q4_0,
        GgmlType::Q4_1 => T_Q4_1,
        GgmlType::Q5_0 => T_Q5_0,
        GgmlType::Q5_1 => T_Q5_1,
        GgmlType::Q8_0 => T_Q8_0,
        GgmlType::IQ4_NL => T_IQ4_NL,
        _ => return None,
    })
}

/// Bytes per block of each format code.
const fn block_bytes(t: u8) -> usize {
    match t {
        T_Q4_0 | T_IQ4_NL => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        T_Q5_1 => 24,
        _ => 34,
    }
}

/// Checks the geometry of a call; returns the format code.
fn check(ty: GgmlType, row: &[u8], act: &ActQ8) -> u8 {
    let Some(t) = code_of(ty) else {
        panic!("dot_legacy: {ty:?} is not supported");
    };
    check_t(t, ty, row, act);
    t
}

#[inline(always)]
fn check_t(t: u8, ty: GgmlType, row: &[u8], act: &ActQ8) {
    let bs = block_bytes(t);
    let nb = row.len() / bs;
    if !(act.is_well_formed() && row.len().is_multiple_of(bs) && nb == act.n_blocks()) {
        geometry_panic(ty, row, act, bs);
    }
}

#[cold]
#[inline(never)]
fn geometry_panic(ty: GgmlType, row: &[u8], act: &ActQ8, bs: usize) -> ! {
    assert!(act.is_well_formed(), "dot_legacy: malformed ActQ8");
    assert_eq!(row.len() % bs, 0, "dot_legacy: {ty:?} row of {} bytes is not whole blocks", row.len());
    let nb = row.len() / bs;
    assert_eq!(nb, act.n_blocks(), "dot_legacy: {ty:?} row of {nb} blocks vs {} activations", act.len());
    unreachable!()
}

/// Dot product of one `ty` row (whole blocks, any alignment) with quantized activations of the same
/// length, with the kernel of [`active_isa`].
#[inline]
pub fn vec_dot_q8(ty: GgmlType, row: &[u8], act: &ActQ8) -> f32 {
    let mut out = [0f32];
    vec_dot_q8_x4(ty, row, &[act], &mut out);
    out[0]
}

/// [`vec_dot_q8`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8_isa(isa: Isa, ty: GgmlType, row: &[u8], act: &ActQ8) -> f32 {
    let mut out = [0f32];
    vec_dot_q8_x4_isa(isa, ty, row, &[act], &mut out);
    out[0]
}

/// A kernel: `out[k] = row · acts[k]`; safe to call once the geometry is checked and, for SIMD
/// kernels, the level is available (see `avx2::DotFn`).
type DotFn = unsafe fn(&[u8], &[&ActQ8], &mut [f32]);

fn scalar_k<const T: u8>(row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acts) {
        *o = scalar_dot(T, row, &[a], &mut None);
    }
}

fn scalar_k2<const T: u8>(row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acts.chunks_exact(2)) {
        *o = scalar_dot(T, row, a, &mut None);
    }
}

const SCALAR_KERNELS2: [[DotFn; MAX_TOKENS2]; 6] = {
    const fn row<const T: u8>() -> [DotFn; MAX_TOKENS2] {
        [scalar_k2::<T>; MAX_TOKENS2]
    }
    [row::<T_Q4_0>(), row::<T_Q4_1>(), row::<T_Q5_0>(), row::<T_Q5_1>(), row::<T_Q8_0>(), row::<T_IQ4_NL>()]
};

/// Two-plane activations one kernel call takes at most (eight vectors), at every level.
const MAX_TOKENS2: usize = 4;

/// Two-plane activations per kernel call for matrix products at the active level: four (eight
/// vectors) with AVX-512 VNNI, whose 32 vector registers hold their sums; two with AVX2, whose 16
/// make three and four spill (the scalar code gains nothing either way). Every level takes up to
/// four and gives each activation the bits it gives it alone, so this only sets the speed.
pub fn tokens2_per_call() -> usize {
    if isa() >= Isa::Avx512 {
        MAX_TOKENS2
    } else {
        2
    }
}

/// The two-plane kernel table of a level (indexed `[format code][K - 1]`); the level must run
/// here.
fn kernels2(isa: Isa) -> &'static [[DotFn; MAX_TOKENS2]; 6] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &avx2::vnni::KERNELS2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => &avx2::KERNELS2,
        _ => &SCALAR_KERNELS2,
    }
}

/// The kernel for `k` activations of `planes` planes at `isa` (the active one when `None`).
fn kernel_for(isa: Option<Isa>, t: u8, k: usize, planes: usize) -> DotFn {
    static ACTIVE2: OnceLock<&'static [[DotFn; MAX_TOKENS2]; 6]> = OnceLock::new();
    match (planes, isa) {
        (1, None) => active_kernels()[usize::from(t)][k - 1],
        (1, Some(i)) => kernels(i)[usize::from(t)][k - 1],
        (_, None) => ACTIVE2.get_or_init(|| kernels2(self::isa()))[usize::from(t)][k - 1],
        (_, Some(i)) => kernels2(i)[usize::from(t)][k - 1],
    }
}

/// Checks that every second plane is the residual plane of its first one: same length, scales
/// `d / 256` (what [`ActQ8::quantize_residual`] makes and the two-plane kernels rely on).
fn check_planes(acts: &[&ActQ8]) {
    for pair in acts.chunks_exact(2) {
        // A fold, not `all`: no early exit, so it vectorizes (it runs on every generation call).
        let ok = pair[0].len() == pair[1].len()
            && pair[0].d().iter().zip(pair[1].d()).fold(true, |ok, (&d1, &d2)| ok & (d2 == d1 * (1.0 / 256.0)));
        assert!(ok, "dot_legacy: second plane is not the residual plane of the first");
    }
}

const SCALAR_KERNELS: [[DotFn; 4]; 6] = {
    const fn row<const T: u8>() -> [DotFn; 4] {
        [scalar_k::<T>, scalar_k::<T>, scalar_k::<T>, scalar_k::<T>]
    }
    [row::<T_Q4_0>(), row::<T_Q4_1>(), row::<T_Q5_0>(), row::<T_Q5_1>(), row::<T_Q8_0>(), row::<T_IQ4_NL>()]
};

/// The kernel table of a level (indexed `[format code][K - 1]`); the level must run here.
fn kernels(isa: Isa) -> &'static [[DotFn; 4]; 6] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &avx2::vnni::KERNELS,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => &avx2::KERNELS,
        _ => &SCALAR_KERNELS,
    }
}

/// The kernel table of [`active_isa`], resolved once.
#[inline]
fn active_kernels() -> &'static [[DotFn; 4]; 6] {
    static ACTIVE: OnceLock<&'static [[DotFn; 4]; 6]> = OnceLock::new();
    ACTIVE.get_or_init(|| kernels(isa()))
}

/// Checks a call's geometry and runs `table`'s kernel.
#[inline(always)]
fn run(table: &[[DotFn; 4]; 6], ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    let k = acts.len();
    assert!((1..=4).contains(&k), "dot_legacy: 1 to 4 activation vectors, got {k}");
    assert_eq!(k, out.len(), "dot_legacy: acts/out length mismatch");
    let Some(t) = code_of(ty) else {
        panic!("dot_legacy: {ty:?} is not supported");
    };
    for a in acts {
        check_t(t, ty, row, a);
    }
    // SAFETY: the table's level runs on this CPU (the callers' contract); the row is whole blocks
    // of format `t`, every activation vector is well formed with exactly as many blocks, and
    // `acts.len() == out.len() == k` (checked above).
    unsafe { table[usize::from(t)][k - 1](row, acts, out) }
}

/// Dot products of one row with 1 to 4 activation vectors (`out[k]` for `acts[k]`), unpacking each
/// weight block once for all of them.
#[inline]
pub fn vec_dot_q8_x4(ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    run(active_kernels(), ty, row, acts, out)
}

/// Rows ahead of the one computed whose bytes [`vec_dot_q8_rows`] prefetches.
const PREFETCH_ROWS: usize = 2;

/// Dot products of one row with 1 to 4 activations given as two planes each, `first` (the
/// quantized activation, [`ActQ8::quantize`]) and `second` (its rounding error,
/// [`ActQ8::quantize_residual`]): `out[k]` = row · `(acts[2k], acts[2k + 1])`, computed per block
/// as `(d·d′)·Σ w (256 a + a′)` (+ `(m·d′)·Σ (256 a + a′)`) with exact integer sums, where `d′ =
/// da / 256` is the second plane's scale. About 15-bit activations for one conversion and one
/// scale multiply per block.
pub fn vec_dot_q8_planes(ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    vec_dot_q8_planes_at(None, ty, row, acts, out)
}

/// [`vec_dot_q8_planes`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8_planes_isa(isa: Isa, ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    assert!(isa <= detected_isa(), "dot_legacy: {} is not available on this CPU", isa.name());
    vec_dot_q8_planes_at(Some(isa), ty, row, acts, out)
}

fn vec_dot_q8_planes_at(isa: Option<Isa>, ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    let k = out.len();
    assert!((1..=MAX_TOKENS2).contains(&k) && acts.len() == 2 * k, "dot_legacy: 1 to 4 two-plane activations");
    let Some(t) = code_of(ty) else {
        panic!("dot_legacy: {ty:?} is not supported");
    };
    for a in acts {
        check_t(t, ty, row, a);
    }
    check_planes(acts);
    let f = kernel_for(isa, t, k, 2);
    // SAFETY: the level runs on this CPU (asserted by the caller or the active one); geometry and
    // planes checked above; `acts.len() == 2 k`, `out.len() == k`.
    unsafe { f(row, acts, out) }
}

/// [`vec_dot_q8_planes`] in scalar code: the oracle of the two-plane kernels.
pub fn vec_dot_q8_planes_unopt(ty: GgmlType, row: &[u8], first: &ActQ8, second: &ActQ8) -> f32 {
    let t = check(ty, row, first);
    check_t(t, ty, row, second);
    check_planes(&[first, second]);
    scalar_dot(t, row, &[first, second], &mut None)
}

/// [`vec_dot_q8_planes_unopt`] and the magnitude bound of [`vec_dot_q8_unopt_with_magnitude`].
#[doc(hidden)]
pub fn vec_dot_q8_planes_unopt_with_magnitude(ty: GgmlType, row: &[u8], first: &ActQ8, second: &ActQ8) -> (f32, f64) {
    let t = check(ty, row, first);
    check_t(t, ty, row, second);
    check_planes(&[first, second]);
    let mut mag = Some(0f64);
    let v = scalar_dot(t, row, &[first, second], &mut mag);
    (v, mag.unwrap())
}

/// Dot products of consecutive rows (`data`, `row_bytes` each) with 1 to 4 activation vectors:
/// `out[r * acts.len() + k]` = row `r` · `acts[k]`. One geometry check and one kernel lookup for
/// all the rows (per-row overhead matters for small matrices in generation).
pub fn vec_dot_q8_rows(ty: GgmlType, data: &[u8], row_bytes: usize, acts: &[&ActQ8], out: &mut [f32]) {
    vec_dot_q8_rows_planes(ty, data, row_bytes, acts, 1, out)
}

/// [`vec_dot_q8_rows`] for activations of `planes` (1 or 2) planes each (one plane: 1 to 4
/// activations; two planes: 1 to 4 activations, eight vectors, see [`vec_dot_q8_planes`]):
/// `out[r * k + i]` = row `r` · activation `i`, where `k = acts.len() / planes`.
pub fn vec_dot_q8_rows_planes(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8],
    planes: usize,
    out: &mut [f32],
) {
    rows_planes_at(None, ty, data, row_bytes, acts, planes, out)
}

/// [`vec_dot_q8_rows_planes`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8_rows_planes_isa(
    isa: Isa,
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8],
    planes: usize,
    out: &mut [f32],
) {
    assert!(isa <= detected_isa(), "dot_legacy: {} is not available on this CPU", isa.name());
    rows_planes_at(Some(isa), ty, data, row_bytes, acts, planes, out)
}

fn rows_planes_at(
    isa: Option<Isa>,
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8],
    planes: usize,
    out: &mut [f32],
) {
    assert!(planes == 1 || planes == 2, "dot_legacy: 1 or 2 planes");
    assert!(acts.len().is_multiple_of(planes), "dot_legacy: activations are not whole planes");
    let k = acts.len() / planes;
    let max_k = if planes == 2 { MAX_TOKENS2 } else { 4 };
    assert!((1..=max_k).contains(&k), "dot_legacy: 1 to {max_k} activations of {planes} planes, got {k}");
    assert!(row_bytes > 0 && data.len().is_multiple_of(row_bytes), "dot_legacy: data is not whole rows");
    let n_rows = data.len() / row_bytes;
    assert_eq!(out.len(), n_rows * k, "dot_legacy: output length");
    let Some(t) = code_of(ty) else {
        panic!("dot_legacy: {ty:?} is not supported");
    };
    if n_rows == 0 {
        return;
    }
    for a in acts {
        check_t(t, ty, &data[..row_bytes], a);
    }
    if planes == 2 {
        check_planes(acts);
    }
    let f = kernel_for(isa, t, k, planes);
    // The SIMD kernels prefetch a steady few lines per group of blocks themselves.
    let own_prefetch = isa.unwrap_or_else(self::isa) >= Isa::Avx2;
    for (i, (row, o)) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(k)).enumerate() {
        // Generation streams each weight row once from memory: ask for the rows ahead early.
        if !own_prefetch {
            crate::isa::prefetch(data.get((i + PREFETCH_ROWS) * row_bytes..(i + PREFETCH_ROWS + 1) * row_bytes));
        }
        // SAFETY: the level runs on this CPU (asserted by the caller, or the active one); every
        // row has the geometry checked above (same length as the first), every activation vector
        // is well formed with exactly its blocks (and second planes are residual planes),
        // `acts.len() == k · planes` and `o.len() == k`.
        unsafe { f(row, acts, o) }
    }
}

/// [`vec_dot_q8_x4`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8_x4_isa(isa: Isa, ty: GgmlType, row: &[u8], acts: &[&ActQ8], out: &mut [f32]) {
    assert!(isa <= detected_isa(), "dot_legacy: {} is not available on this CPU", isa.name());
    run(kernels(isa), ty, row, acts, out)
}

/// Scalar oracle: integer sums per block, then `(d·da)·Σ w a (+ (m·da)·Σ a)` in f32, blocks summed
/// in order.
pub fn vec_dot_q8_unopt(ty: GgmlType, row: &[u8], act: &ActQ8) -> f32 {
    let t = check(ty, row, act);
    scalar_dot(t, row, &[act], &mut None)
}

/// [`vec_dot_q8_unopt`] and a bound on the magnitude of every partial sum a kernel may form in
/// f32: `Σ_blocks |d·da|·Σ_i |w_i|·|a_i| + |m·da|·|Σ_i a_i|` (f64). Kernels may differ from the
/// oracle by a few f32 roundings of such partial sums.
#[doc(hidden)]
pub fn vec_dot_q8_unopt_with_magnitude(ty: GgmlType, row: &[u8], act: &ActQ8) -> (f32, f64) {
    let t = check(ty, row, act);
    let mut mag = Some(0f64);
    let v = scalar_dot(t, row, &[act], &mut mag);
    (v, mag.unwrap())
}

#[inline]
fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Block `b` decoded to signed integer weights, its scale and its offset (0 when the format has
/// none).
fn decode(t: u8, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut w = [0i32; QK];
    let nibbles = |w: &mut [i32; QK], qs: &[u8], off: i32| {
        for (j, &byte) in qs.iter().enumerate() {
            w[j] = i32::from(byte & 0x0f) - off;
            w[j + 16] = i32::from(byte >> 4) - off;
        }
    };
    let fifth = |w: &mut [i32; QK], qh: &[u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (i, v) in w.iter_mut().enumerate() {
            *v += (((qh >> i) & 1) << 4) as i32;
        }
    };
    let d = rd_f16(b, 0);
    let mut m = 0.0;
    match t {
        T_Q4_0 => nibbles(&mut w, &b[2..18], 8),
        T_Q4_1 => {
            m = rd_f16(b, 2);
            nibbles(&mut w, &b[4..20], 0);
        }
        T_Q5_0 => {
            nibbles(&mut w, &b[6..22], 16);
            fifth(&mut w, &b[2..6]);
        }
        T_Q5_1 => {
            m = rd_f16(b, 2);
            nibbles(&mut w, &b[8..24], 0);
            fifth(&mut w, &b[4..8]);
        }
        T_Q8_0 => {
            for (v, &byte) in w.iter_mut().zip(&b[2..34]) {
                *v = i32::from(byte as i8);
            }
        }
        T_IQ4_NL => {
            for (j, &byte) in b[2..18].iter().enumerate() {
                w[j] = i32::from(KVALUES_IQ4NL[usize::from(byte & 0x0f)]);
                w[j + 16] = i32::from(KVALUES_IQ4NL[usize::from(byte >> 4)]);
            }
        }
        _ => unreachable!("dot_legacy: unknown format code {t}"),
    }
    (w, d, m)
}

/// [`vec_dot_q8_rows_planes`] with two planes over rows of an interleaved Q4_0 matrix
/// ([`crate::interleave`]): `data` starts at a group of rows; its whole groups are woven, any rows
/// after them (the matrix's last, fewer than a group) are in the file's layout. Every result has
/// the bits of the scalar oracle [`vec_dot_q8_planes_unopt`] (the row-at-a-time SIMD kernels sum
/// their blocks in another order).
pub fn vec_dot_q8_rows_planes_interleaved(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8],
    out: &mut [f32],
) {
    vec_dot_q8_rows_planes_interleaved_isa(isa(), ty, data, row_bytes, acts, out)
}

/// [`vec_dot_q8_rows_planes_interleaved`] with an explicit level; panics if this CPU cannot run
/// `isa`.
pub fn vec_dot_q8_rows_planes_interleaved_isa(
    isa: Isa,
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8],
    out: &mut [f32],
) {
    use crate::interleave::GROUP;
    assert!(ty == GgmlType::Q4_0, "dot_legacy: {ty:?} has no interleaved kernel");
    let k = acts.len() / 2;
    assert!((1..=MAX_TOKENS2).contains(&k) && acts.len() == 2 * k, "dot_legacy: 1 to 4 two-plane activations");
    assert!(row_bytes > 0 && data.len().is_multiple_of(row_bytes), "dot_legacy: data is not whole rows");
    let rows = data.len() / row_bytes;
    assert_eq!(out.len(), rows * k, "dot_legacy: output length");
    assert!(isa <= detected_isa(), "dot_legacy: {} is not available on this CPU", isa.name());
    if rows == 0 {
        return;
    }
    let t = T_Q4_0;
    for a in acts {
        check_t(t, ty, &data[..row_bytes], a);
    }
    check_planes(acts);
    let group_bytes = GROUP * row_bytes;
    let (woven, plain) = data.split_at(rows / GROUP * group_bytes);
    let (out_woven, out_plain) = out.split_at_mut(rows / GROUP * GROUP * k);
    let nb = row_bytes / block_bytes(t);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `isa` runs on this CPU (AVX2, FMA, F16C; AVX-512 F/BW/VL/VNNI for `Avx512`);
            // `woven` is whole groups of Q4_0 rows of `nb` blocks (the caller's layout), every
            // activation vector is well formed with `nb` blocks (checked), the planes are checked,
            // and `out` holds `k` results per row.
            unsafe { rows8::groups(isa == Isa::Avx512, woven, group_bytes, nb, acts, out_woven) }
        }
        _ => {
            let mut row = vec![0u8; row_bytes];
            for (group, o) in woven.chunks_exact(group_bytes).zip(out_woven.chunks_exact_mut(GROUP * k)) {
                for (r, o) in o.chunks_exact_mut(k).enumerate() {
                    crate::interleave::row_blocks(ty, group, GROUP, row_bytes, r, 0..nb, &mut row);
                    scalar_k2::<T_Q4_0>(&row, acts, o);
                }
            }
        }
    }
    // The rows past the groups take the oracle too: one definition for the whole matrix.
    for (row, o) in plain.chunks_exact(row_bytes).zip(out_plain.chunks_exact_mut(k)) {
        scalar_k2::<T_Q4_0>(row, acts, o);
    }
}

/// One plane (`planes = [a]`): the activation quants `a` under the scale `da`. Two planes (`[a,
/// a′]`, the second the residual plane of the first): the integer activations `256 a + a′` under
/// the second plane's scale `da / 256`.
fn scalar_dot(t: u8, row: &[u8], planes: &[&ActQ8], mag: &mut Option<f64>) -> f32 {
    let mut sum = 0f32;
    let last = planes[planes.len() - 1];
    for (i, (b, &da)) in row.chunks_exact(block_bytes(t)).zip(last.d()).enumerate() {
        let mut a = planes[0].block_quants(i).map(i32::from);
        if let Some(second) = planes.get(1) {
            for (ai, &r) in a.iter_mut().zip(&second.block_quants(i)) {
                *ai = 256 * *ai + i32::from(r);
            }
        }
        let (w, d, m) = decode(t, b);
        let mut isum = 0i32;
        let mut asum = 0i32;
        let mut amag = 0i64;
        for (&wi, &ai) in w.iter().zip(&a) {
            isum += wi * ai;
            asum += ai;
            amag += i64::from((wi * ai).abs());
        }
        let mut v = (d * da) * isum as f32;
        if t == T_Q4_1 || t == T_Q5_1 {
            v += (m * da) * asum as f32;
        }
        sum += v;
        if let Some(mg) = mag {
            *mg += (f64::from(d) * f64::from(da)).abs() * amag as f64
                + (f64::from(m) * f64::from(da) * f64::from(asum)).abs();
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(d: f32, m: Option<f32>, rest: &[u8]) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_le_bytes().to_vec();
        if let Some(m) = m {
            b.extend(f16::from_f32(m).to_le_bytes());
        }
        b.extend(rest);
        b
    }

    /// Hand-computed values: 32 activations of 1.0 quantize to 127 with `da = 1/127`.
    #[test]
    fn known_values() {
        let mut act = ActQ8::new();
        act.quantize(&[1.0; 32]);
        let cases: [(GgmlType, Vec<u8>, f32); 6] = [
            // q = 15 -> w = 7: 32 * 7
            (GgmlType::Q4_0, block(1.0, None, &[0xff; 16]), 224.0),
            // q = 3, m = -1: 32 * (0.5 * 3 - 1)
            (GgmlType::Q4_1, block(0.5, Some(-1.0), &[0x33; 16]), 16.0),
            // low nibbles 0, all fifth bits set -> q = 16 -> w = 0
            (GgmlType::Q5_0, block(2.0, None, &[0xff; 4].iter().chain(&[0u8; 16]).copied().collect::<Vec<_>>()), 0.0),
            // q = 31 everywhere, m = 1: 32 * (31 + 1)
            (GgmlType::Q5_1, block(1.0, Some(1.0), &[0xff; 20]), 1024.0),
            // q = -128: 32 * -128 * 0.25
            (GgmlType::Q8_0, block(0.25, None, &[0x80; 32]), -1024.0),
            // index 0 -> -127: 32 * -127
            (GgmlType::IQ4_NL, block(1.0, None, &[0x00; 16]), -4064.0),
        ];
        for (ty, row, want) in cases {
            assert_eq!(vec_dot_q8_unopt(ty, &row, &act), want, "{ty:?} oracle");
            for isa in available_isas() {
                assert_eq!(vec_dot_q8_isa(isa, ty, &row, &act), want, "{ty:?} {isa:?}");
            }
        }
    }
}
