//! Dot products of k-quant rows (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_XS rows with activations
//! quantized to 8 bits in super-blocks of 256 ([`ActQ8K`]).
//!
//! Per super-block the weights are small integers `q` with integer scales `sc` (and for Q2_K, Q4_K,
//! Q5_K integer mins `m`) under f16 super-scales `d`, `dmin`; the activations are `da * a` with `a`
//! in `-127..=127`. So a super-block contributes exactly
//!
//! `(d * da) * Σ_g sc_g * Σ_{i∈g} q_i a_i  -  (dmin * da) * Σ_g m_g * Σ_{i∈g} a_i`,
//!
//! where both sums are computed in integers (the second from the activation's per-16 `bsums`) and
//! only the two products with the f32 scales and the accumulation over super-blocks are in f32.
//! Offsets inside the formats (Q6_K's `q - 32`, Q3_K's `q - 4`) are folded in as
//! `-offset * Σ_g sc_g * bsum_g`, also in integers.
//!
//! [`vec_dot_q8k_unopt`] is the scalar oracle: it decodes every quant to a signed integer, forms the
//! integer sums per group (activation sums from the quants themselves, not from `bsums`) and applies
//! the scales in that order. The SIMD kernels compute the same integers; only the order of the f32
//! accumulation differs, except over interleaved rows ([`vec_dot_q8k_rows_planes_interleaved`],
//! the default path's generation products), whose kernels total each super-block's integers
//! exactly and then take the oracle's f32 steps: its bits.
//!
//! The kernel is picked once per process: the best one the CPU runs (runtime detection), or a lower
//! one forced by the environment variable `KILN_ISA=scalar|avx2|avx512` (a level the CPU lacks, or
//! that is not built, falls back to the best one below it).

use crate::act_q8k::ActQ8K;
use crate::iq4_nl::KVALUES_IQ4NL;
use crate::{q3_k, q4_k};
use half::f16;
use kiln_gguf::GgmlType;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod rows8;

const QK_K: usize = 256;

use crate::isa::isa;
pub use crate::isa::{active_isa, available_isas, detected_isa, Isa};

/// Whether `ty` has kernels here.
pub fn is_supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::IQ4_XS)
}

/// Checks the geometry of a call; returns the number of super-blocks.
fn check(ty: GgmlType, row: &[u8], n: usize) -> usize {
    assert!(is_supported(ty), "dot_kquant: {ty:?} is not supported");
    let ts = ty.type_size();
    assert_eq!(row.len() % ts, 0, "dot_kquant: {ty:?} row of {} bytes is not whole blocks", row.len());
    let nb = row.len() / ts;
    assert_eq!(nb * QK_K, n, "dot_kquant: {ty:?} row of {nb} blocks vs {n} activations");
    nb
}

fn check_act(act: &ActQ8K) {
    let nb = act.d.len();
    assert!(act.qs.len() == nb * QK_K && act.bsums.len() == nb * 16, "dot_kquant: malformed ActQ8K");
}

/// Dot product of one `ty` row (whole super-blocks, any alignment) with quantized activations of the
/// same length, with the kernel of [`active_isa`].
pub fn vec_dot_q8k(ty: GgmlType, row: &[u8], act: &ActQ8K) -> f32 {
    check_act(act);
    check(ty, row, act.len());
    dot_one(isa(), ty, row, act)
}

/// [`vec_dot_q8k`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8k_isa(isa: Isa, ty: GgmlType, row: &[u8], act: &ActQ8K) -> f32 {
    check_act(act);
    check(ty, row, act.len());
    assert_available(isa);
    dot_one(isa, ty, row, act)
}

fn assert_available(isa: Isa) {
    assert!(isa <= detected_isa(), "dot_kquant: {} is not available on this CPU", isa.name());
}

/// One dot product; the geometry is checked and `isa` runs on this CPU.
#[inline]
fn dot_one(isa: Isa, ty: GgmlType, row: &[u8], act: &ActQ8K) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            let mut out = [0f32];
            // SAFETY: `isa` is at most `detected_isa()`, which found AVX2, FMA and F16C at run time
            // (callers check it); the row is whole super-blocks and `act` has exactly as many.
            unsafe { avx2::vec_dot_multi(ty, row, &[act], &mut out) };
            out[0]
        }
        _ => scalar_dot(ty, row, &[act], &mut None),
    }
}

/// Dot products of one row with 1 to 4 activation vectors (`out[k]` for `acts[k]`), unpacking each
/// weight block once for all of them.
pub fn vec_dot_q8k_x4(ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    vec_dot_q8k_x4_isa(isa(), ty, row, acts, out)
}

/// The geometry checks of the row functions: `data` is whole rows, `out` holds `k` results per
/// row, every activation vector is well formed and as long as a row. `false`: no rows.
fn check_rows(ty: GgmlType, data: &[u8], row_bytes: usize, acts: &[&ActQ8K], k: usize, out_len: usize) -> bool {
    assert!(row_bytes > 0 && data.len().is_multiple_of(row_bytes), "dot_kquant: data is not whole rows");
    let n_rows = data.len() / row_bytes;
    assert_eq!(out_len, n_rows * k, "dot_kquant: output length");
    if n_rows == 0 {
        return false;
    }
    for a in acts {
        check_act(a);
        check(ty, &data[..row_bytes], a.len());
    }
    true
}

/// Dot products of consecutive rows (`data`, `row_bytes` each) with 1 to 4 activation vectors:
/// `out[r * acts.len() + k]` = row `r` · `acts[k]`, with one geometry check for all the rows.
pub fn vec_dot_q8k_rows(ty: GgmlType, data: &[u8], row_bytes: usize, acts: &[&ActQ8K], out: &mut [f32]) {
    let k = acts.len();
    assert!((1..=4).contains(&k), "dot_kquant: 1 to 4 activation vectors, got {k}");
    if !check_rows(ty, data, row_bytes, acts, k, out.len()) {
        return;
    }
    let level = isa();
    let own_prefetch = kernel_prefetches(level);
    for (i, (row, o)) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(k)).enumerate() {
        // Generation streams each weight row once from memory: ask for the rows ahead early.
        if !own_prefetch {
            crate::isa::prefetch(data.get((i + 2) * row_bytes..(i + 3) * row_bytes));
        }
        match level {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => {
                // SAFETY: `isa()` never exceeds the detected level (AVX2, FMA and F16C found at
                // run time); each row has the checked geometry and every activation vector
                // exactly as many super-blocks.
                unsafe { avx2::vec_dot_multi(ty, row, acts, o) }
            }
            _ => {
                for (v, a) in o.iter_mut().zip(acts) {
                    *v = scalar_dot(ty, row, &[a], &mut None);
                }
            }
        }
    }
}

/// Dot products of one row with 1 or 2 activations given as two planes each: `acts[2k]` the
/// quantized activation ([`ActQ8K::quantize`]), `acts[2k + 1]` its residual plane
/// ([`ActQ8K::quantize_residual`], scale `d / 256`); `out[k]` = row · `d′ (256 a + a′)`. Q4_K and
/// Q5_K have fused kernels (both planes' integer sums added before one conversion per
/// super-block); the other formats sum the two planes' dot products.
pub fn vec_dot_q8k_planes(ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    vec_dot_q8k_planes_isa(isa(), ty, row, acts, out)
}

/// [`vec_dot_q8k_planes`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8k_planes_isa(isa: Isa, ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    let k = out.len();
    assert!((1..=2).contains(&k) && acts.len() == 2 * k, "dot_kquant: 1 or 2 two-plane activations");
    for a in acts {
        check_act(a);
        check(ty, row, a.len());
    }
    check_planes(acts);
    assert_available(isa);
    planes_unchecked(isa, ty, row, acts, out);
}

/// Checks that every second plane is the residual plane of its first one (scales `d / 256`).
fn check_planes(acts: &[&ActQ8K]) {
    for pair in acts.chunks_exact(2) {
        // A fold, not `all`: no early exit, so it vectorizes (it runs on every generation call).
        let ok = pair[0].len() == pair[1].len()
            && pair[0].d.iter().zip(&pair[1].d).fold(true, |ok, (&d1, &d2)| ok & (d2 == d1 * (1.0 / 256.0)));
        assert!(ok, "dot_kquant: second plane is not the residual plane of the first");
    }
}

/// [`vec_dot_q8k_planes`] once the geometry and the planes are checked and `isa` is available.
#[inline]
fn planes_unchecked(isa: Isa, ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if avx2::has_planes_kernel(ty) => {
            // SAFETY: AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C) were detected; geometry and
            // planes are checked, `acts.len() == 2 · out.len()` with `out.len()` 1 or 2.
            unsafe { avx2::vec_dot_planes(true, ty, row, acts, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            if avx2::has_planes_kernel(ty) {
                // SAFETY: AVX2, FMA and F16C were detected; geometry and planes are checked,
                // `acts.len() == 2 · out.len()` with `out.len()` 1 or 2.
                unsafe { avx2::vec_dot_planes(false, ty, row, acts, out) }
            } else {
                let mut both = [0f32; 4];
                let both = &mut both[..acts.len()];
                // SAFETY: as above, 2 or 4 activation vectors.
                unsafe { avx2::vec_dot_multi(ty, row, acts, both) };
                for (o, p) in out.iter_mut().zip(both.chunks_exact(2)) {
                    *o = p[0] + p[1];
                }
            }
        }
        _ => {
            for (o, p) in out.iter_mut().zip(acts.chunks_exact(2)) {
                *o = scalar_dot(ty, row, p, &mut None);
            }
        }
    }
}

/// Scalar oracle of [`vec_dot_q8k_planes`]: per super-block the exact integer sums over the
/// activations `256 a + a′`, then scaled by the second plane's `d′` as in [`vec_dot_q8k_unopt`].
pub fn vec_dot_q8k_planes_unopt(ty: GgmlType, row: &[u8], first: &ActQ8K, second: &ActQ8K) -> f32 {
    vec_dot_q8k_planes_unopt_with_magnitude(ty, row, first, second).0
}

/// [`vec_dot_q8k_planes_unopt`] and the magnitude bound of [`vec_dot_q8k_unopt_with_magnitude`].
#[doc(hidden)]
pub fn vec_dot_q8k_planes_unopt_with_magnitude(
    ty: GgmlType,
    row: &[u8],
    first: &ActQ8K,
    second: &ActQ8K,
) -> (f32, f64) {
    for a in [first, second] {
        check_act(a);
        check(ty, row, a.len());
    }
    check_planes(&[first, second]);
    let mut mag = Some(0f64);
    let v = scalar_dot(ty, row, &[first, second], &mut mag);
    (v, mag.unwrap())
}

/// Dot products of consecutive rows with two-plane activations (see [`vec_dot_q8k_planes`]):
/// `out[r * k + i]` = row `r` · activation `i`, `k = acts.len() / 2` (1 or 2).
pub fn vec_dot_q8k_rows_planes(ty: GgmlType, data: &[u8], row_bytes: usize, acts: &[&ActQ8K], out: &mut [f32]) {
    let k = acts.len() / 2;
    assert!((1..=2).contains(&k) && acts.len() == 2 * k, "dot_kquant: 1 or 2 two-plane activations");
    if !check_rows(ty, data, row_bytes, acts, k, out.len()) {
        return;
    }
    check_planes(acts);
    let level = isa();
    // The SIMD kernels prefetch inside their loops, a steady few lines per super-block; the
    // scalar ones get each row's bytes asked for two rows ahead.
    let own_prefetch = kernel_prefetches(level);
    for (i, (row, o)) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(k)).enumerate() {
        if !own_prefetch {
            crate::isa::prefetch(data.get((i + 2) * row_bytes..(i + 3) * row_bytes));
        }
        planes_unchecked(level, ty, row, acts, o);
    }
}

/// [`vec_dot_q8k_rows_planes`] over rows of an interleaved Q4_K/Q5_K matrix
/// ([`crate::interleave`]): `data` starts at a group of rows; its whole groups are woven, any
/// rows after them (the matrix's last, fewer than a group) are in the file's layout. Every result
/// has the bits of the scalar oracle [`vec_dot_q8k_planes_unopt`] (the row-at-a-time SIMD kernels
/// sum lane-wise partial totals in f32).
pub fn vec_dot_q8k_rows_planes_interleaved(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8K],
    out: &mut [f32],
) {
    vec_dot_q8k_rows_planes_interleaved_isa(isa(), ty, data, row_bytes, acts, out)
}

/// [`vec_dot_q8k_rows_planes_interleaved`] with an explicit level; panics if this CPU cannot run
/// `isa`.
pub fn vec_dot_q8k_rows_planes_interleaved_isa(
    isa: Isa,
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    acts: &[&ActQ8K],
    out: &mut [f32],
) {
    use crate::interleave::GROUP;
    let k = acts.len() / 2;
    assert!((1..=2).contains(&k) && acts.len() == 2 * k, "dot_kquant: 1 or 2 two-plane activations");
    assert!(crate::interleave::supports(ty), "dot_kquant: {ty:?} has no interleaved layout");
    if !check_rows(ty, data, row_bytes, acts, k, out.len()) {
        return;
    }
    check_planes(acts);
    assert_available(isa);
    let rows = data.len() / row_bytes;
    let group_bytes = GROUP * row_bytes;
    let (woven, plain) = data.split_at(rows / GROUP * group_bytes);
    let (out_woven, out_plain) = out.split_at_mut(rows / GROUP * GROUP * k);
    let nb = row_bytes / ty.type_size();
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if !woven.is_empty() => {
            // SAFETY: `isa` runs on this CPU (AVX2, FMA, F16C; AVX-512 F/BW/VL/VNNI for
            // `Avx512`); `woven` is whole groups of rows of `nb` super-blocks (the caller's layout),
            // every activation vector has `nb` super-blocks (checked), planes checked, and `out`
            // holds `k` results per row.
            unsafe { rows8::groups(isa == Isa::Avx512, ty, woven, group_bytes, nb, acts, out_woven) }
        }
        _ => {
            let mut row = vec![0u8; row_bytes];
            for (group, o) in woven.chunks_exact(group_bytes).zip(out_woven.chunks_exact_mut(GROUP * k)) {
                for (r, o) in o.chunks_exact_mut(k).enumerate() {
                    crate::interleave::row_blocks(ty, group, GROUP, row_bytes, r, 0..nb, &mut row);
                    oracle_planes(ty, &row, acts, o);
                }
            }
        }
    }
    // The rows past the groups take the oracle too: one definition for the whole matrix.
    for (row, o) in plain.chunks_exact(row_bytes).zip(out_plain.chunks_exact_mut(k)) {
        oracle_planes(ty, row, acts, o);
    }
}

/// The scalar oracle for each two-plane activation of `acts`.
fn oracle_planes(ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    for (o, p) in out.iter_mut().zip(acts.chunks_exact(2)) {
        *o = scalar_dot(ty, row, p, &mut None);
    }
}

/// Whether the kernels at `level` prefetch the rows themselves (the SIMD ones do).
fn kernel_prefetches(level: Isa) -> bool {
    level >= Isa::Avx2
}

/// [`vec_dot_q8k_x4`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_q8k_x4_isa(isa: Isa, ty: GgmlType, row: &[u8], acts: &[&ActQ8K], out: &mut [f32]) {
    assert!((1..=4).contains(&acts.len()), "dot_kquant: 1 to 4 activation vectors, got {}", acts.len());
    assert_eq!(acts.len(), out.len(), "dot_kquant: acts/out length mismatch");
    for a in acts {
        check_act(a);
        check(ty, row, a.len());
    }
    assert_available(isa);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `detected_isa` found AVX2, FMA and F16C at run time; the row is whole
            // super-blocks and every activation vector has exactly as many (checked above).
            unsafe { avx2::vec_dot_multi(ty, row, acts, out) }
        }
        _ => {
            for (o, a) in out.iter_mut().zip(acts) {
                *o = scalar_dot(ty, row, &[a], &mut None);
            }
        }
    }
}

/// Scalar oracle: integer sums per group, scales applied as the format defines, f32 per super-block.
pub fn vec_dot_q8k_unopt(ty: GgmlType, row: &[u8], act: &ActQ8K) -> f32 {
    check_act(act);
    check(ty, row, act.len());
    scalar_dot(ty, row, &[act], &mut None)
}

/// [`vec_dot_q8k_unopt`] and a bound on the magnitude of every partial sum a kernel may form in
/// f32: `Σ_blocks |d·da|·Σ_g |sc_g|·Σ_i (|q_i| + off)·|a_i| + |dmin·da|·Σ_g |m_g|·|Σ_i a_i|` (f64),
/// where `off` is the bias a kernel may add to make `q` unsigned (32 for Q6_K, 4 for Q3_K, else 0). Kernels may
/// differ from the oracle by a few f32 roundings of such partial sums.
#[doc(hidden)]
pub fn vec_dot_q8k_unopt_with_magnitude(ty: GgmlType, row: &[u8], act: &ActQ8K) -> (f32, f64) {
    check_act(act);
    check(ty, row, act.len());
    let mut mag = Some(0f64);
    let v = scalar_dot(ty, row, &[act], &mut mag);
    (v, mag.unwrap())
}

/// One super-block decoded to integers: `w_i = d * sc[g] * q_i - dmin * m[g]` for `i` in group `g`
/// of `group` elements.
struct Decoded {
    q: [i8; QK_K],
    sc: [i32; 16],
    m: [i32; 16],
    group: usize,
    /// Offset the kernels add to `q` to make it unsigned (for the magnitude bound only).
    off: i64,
    d: f32,
    dmin: f32,
}

impl Decoded {
    fn new(group: usize, d: u16, dmin: u16) -> Self {
        Decoded {
            q: [0; QK_K],
            sc: [0; 16],
            m: [0; 16],
            group,
            off: 0,
            d: f16::from_bits(d).to_f32(),
            dmin: f16::from_bits(dmin).to_f32(),
        }
    }
}

#[inline]
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn decode(ty: GgmlType, b: &[u8]) -> Decoded {
    match ty {
        GgmlType::Q2_K => {
            let mut o = Decoded::new(16, le16(b, 80), le16(b, 82));
            for ((sc, m), &byte) in o.sc.iter_mut().zip(o.m.iter_mut()).zip(&b[..16]) {
                *sc = (byte & 0x0F) as i32;
                *m = (byte >> 4) as i32;
            }
            for h in 0..2 {
                for s in 0..4 {
                    for l in 0..32 {
                        o.q[128 * h + 32 * s + l] = ((b[16 + 32 * h + l] >> (2 * s)) & 3) as i8;
                    }
                }
            }
            o
        }
        GgmlType::Q3_K => {
            let mut o = Decoded::new(16, le16(b, 108), 0);
            o.off = 4;
            let scales: &[u8; 12] = b[96..108].try_into().unwrap();
            for g in 0..16 {
                o.sc[g] = q3_k::scale(g, scales) as i32;
            }
            for h in 0..2 {
                for s in 0..4 {
                    for l in 0..32 {
                        let e = 128 * h + 32 * s + l;
                        let lo = (b[32 + 32 * h + l] >> (2 * s)) & 3;
                        let hi = (b[l] >> (e / 32)) & 1;
                        o.q[e] = (lo | (hi << 2)) as i8 - 4;
                    }
                }
            }
            o
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let mut o = Decoded::new(32, le16(b, 0), le16(b, 2));
            let scales: &[u8; 12] = b[4..16].try_into().unwrap();
            let (qh, qs) = if ty == GgmlType::Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for j in 0..8 {
                let (sc, m) = q4_k::get_scale_min(j, scales);
                o.sc[j] = sc as i32;
                o.m[j] = m as i32;
                for l in 0..32 {
                    let mut q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> j) & 1) << 4;
                    }
                    o.q[32 * j + l] = q as i8;
                }
            }
            o
        }
        GgmlType::Q6_K => {
            let mut o = Decoded::new(16, le16(b, 208), 0);
            o.off = 32;
            for g in 0..16 {
                o.sc[g] = b[192 + g] as i8 as i32;
            }
            for (e, q) in o.q.iter_mut().enumerate() {
                let (h, r) = (e / 128, e % 128);
                let lo = (b[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
                let hi = (b[128 + 32 * h + r % 32] >> (2 * (r / 32))) & 3;
                *q = (lo | (hi << 4)) as i8 - 32;
            }
            o
        }
        GgmlType::IQ4_XS => {
            let mut o = Decoded::new(32, le16(b, 0), 0);
            let sh = le16(b, 2);
            for j in 0..8 {
                let low = (b[4 + j / 2] >> (4 * (j % 2))) & 0x0F;
                let high = ((sh >> (2 * j)) & 3) as u8;
                o.sc[j] = (low | (high << 4)) as i32 - 32;
                for l in 0..16 {
                    let byte = b[8 + 16 * j + l];
                    o.q[32 * j + l] = KVALUES_IQ4NL[(byte & 0x0F) as usize];
                    o.q[32 * j + l + 16] = KVALUES_IQ4NL[(byte >> 4) as usize];
                }
            }
            o
        }
        other => panic!("dot_kquant: {other:?} is not supported"),
    }
}

/// One plane (`planes = [a]`): quants `a` under `da`. Two planes (`[a, a′]`, the second the
/// residual plane of the first): the integer activations `256 a + a′` under the second plane's
/// `da / 256` (sums in i64: a super-block's total can pass `2^31`).
fn scalar_dot(ty: GgmlType, row: &[u8], planes: &[&ActQ8K], mag: &mut Option<f64>) -> f32 {
    let ts = ty.type_size();
    let mut sum = 0f32;
    let last = planes[planes.len() - 1];
    let mut a = [0i64; QK_K];
    for (i, b) in row.chunks_exact(ts).enumerate() {
        let w = decode(ty, b);
        for (j, v) in a.iter_mut().enumerate() {
            *v = i64::from(planes[0].qs[QK_K * i + j]);
            if let Some(second) = planes.get(1) {
                *v = 256 * *v + i64::from(second.qs[QK_K * i + j]);
            }
        }
        let da = last.d[i];
        let (mut isum, mut msum) = (0i64, 0i64);
        let (mut iabs, mut mabs) = (0i64, 0i64);
        for (g, (qg, ag)) in w.q.chunks_exact(w.group).zip(a.chunks_exact(w.group)).enumerate() {
            let dot: i64 = qg.iter().zip(ag).map(|(&q, &x)| q as i64 * x).sum();
            let asum: i64 = ag.iter().sum();
            isum += w.sc[g] as i64 * dot;
            msum += w.m[g] as i64 * asum;
            if mag.is_some() {
                let dabs: i64 = qg.iter().zip(ag).map(|(&q, &x)| ((q as i64).abs() + w.off) * x.abs()).sum();
                iabs += w.sc[g].abs() as i64 * dabs;
                mabs += (w.m[g] as i64 * asum).abs();
            }
        }
        let (dd, dm) = (w.d * da, w.dmin * da);
        sum += dd * isum as f32 - dm * msum as f32;
        if let Some(m) = mag {
            *m += (dd as f64).abs() * iabs as f64 + (dm as f64).abs() * mabs as f64;
        }
    }
    sum
}
