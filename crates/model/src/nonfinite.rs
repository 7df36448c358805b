//! NaN and infinite weights: found by a quick parallel scan of every tensor, counted exactly where
//! found.
//!
//! Float tensors are scanned value by value (bit patterns, no conversion). A quantized block's
//! values are its f16 scale fields (`d`, and `m`/`dmin` where the format has them) times small
//! integers and integer sub-scales, so a block holds a non-finite value exactly when one of its
//! scale fields is non-finite: the largest finite scale (65504) times the largest integer factors
//! (e.g. Q6_K's 127 × 32) stays far below f32's range, and a non-finite scale makes every value of
//! its block non-finite (∞ × 0 is NaN). The scan therefore reads only those fields (their offsets
//! come from kiln_quant's block structs); the counts of a flagged tensor come from dequantizing it
//! with the exact `dequantize_row`, and a test checks the two agree for every supported type.

use std::fmt;

use kiln_gguf::{GgmlType, GgufFile, TensorInfo};
use kiln_quant::{iq4_nl, iq4_xs, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0};
use rayon::prelude::*;
use std::mem::offset_of;

/// A tensor with non-finite values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonFiniteTensor {
    pub name: String,
    pub ggml_type: GgmlType,
    pub n_elements: u64,
    pub nan: u64,
    /// +∞ and −∞.
    pub inf: u64,
}

impl NonFiniteTensor {
    pub fn count(&self) -> u64 {
        self.nan + self.inf
    }
}

/// What [`scan_nonfinite`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NonFiniteReport {
    /// Tensors with NaN or infinite values, in file order.
    pub tensors: Vec<NonFiniteTensor>,
    /// Tensors of types whose layout kiln does not know (it cannot run them either), unscanned.
    pub unchecked: Vec<(String, GgmlType)>,
}

impl NonFiniteReport {
    pub fn is_clean(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// One line: the tensors (the first few by name) and their counts.
impl fmt::Display for NonFiniteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4;
        let describe = |t: &NonFiniteTensor| {
            let plural = if t.count() == 1 { "" } else { "s" };
            format!("{:?} has {} non-finite value{plural} ({} NaN, {} infinite)", t.name, t.count(), t.nan, t.inf)
        };
        match self.tensors.len() {
            0 => write!(f, "no tensor has non-finite values"),
            1 => write!(f, "tensor {}", describe(&self.tensors[0])),
            n => {
                let listed: Vec<String> = self.tensors.iter().take(SHOWN).map(describe).collect();
                write!(f, "{n} tensors have non-finite values: {}", listed.join(", "))?;
                if n > SHOWN {
                    write!(f, " and {} more", n - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

/// How a type's bytes hold its values, for the quick scan.
#[derive(Clone, Copy)]
enum Layout {
    F32,
    F16,
    BF16,
    F64,
    /// Integers: always finite.
    Integers,
    /// Blocks of `type_size` bytes whose f16 scale fields lie at these offsets.
    Blocks(&'static [usize]),
}

const Q4_0: [usize; 1] = [offset_of!(q4_0::BlockQ4_0, d)];
const Q4_1: [usize; 2] = [offset_of!(q4_1::BlockQ4_1, d), offset_of!(q4_1::BlockQ4_1, m)];
const Q5_0: [usize; 1] = [offset_of!(q5_0::BlockQ5_0, d)];
const Q5_1: [usize; 2] = [offset_of!(q5_1::BlockQ5_1, d), offset_of!(q5_1::BlockQ5_1, m)];
const Q8_0: [usize; 1] = [offset_of!(q8_0::BlockQ8_0, d)];
const Q2_K: [usize; 2] = [offset_of!(q2_k::BlockQ2K, d), offset_of!(q2_k::BlockQ2K, dmin)];
const Q3_K: [usize; 1] = [offset_of!(q3_k::BlockQ3K, d)];
const Q4_K: [usize; 2] = [offset_of!(q4_k::BlockQ4K, d), offset_of!(q4_k::BlockQ4K, dmin)];
const Q5_K: [usize; 2] = [offset_of!(q5_k::BlockQ5K, d), offset_of!(q5_k::BlockQ5K, dmin)];
const Q6_K: [usize; 1] = [offset_of!(q6_k::BlockQ6K, d)];
const IQ4_NL: [usize; 1] = [offset_of!(iq4_nl::BlockIq4Nl, d)];
const IQ4_XS: [usize; 1] = [offset_of!(iq4_xs::BlockIQ4XS, d)];

fn layout(ty: GgmlType) -> Option<Layout> {
    use GgmlType as T;
    Some(match ty {
        T::F32 => Layout::F32,
        T::F16 => Layout::F16,
        T::BF16 => Layout::BF16,
        T::F64 => Layout::F64,
        T::I8 | T::I16 | T::I32 | T::I64 => Layout::Integers,
        T::Q4_0 => Layout::Blocks(&Q4_0),
        T::Q4_1 => Layout::Blocks(&Q4_1),
        T::Q5_0 => Layout::Blocks(&Q5_0),
        T::Q5_1 => Layout::Blocks(&Q5_1),
        T::Q8_0 => Layout::Blocks(&Q8_0),
        T::Q2_K => Layout::Blocks(&Q2_K),
        T::Q3_K => Layout::Blocks(&Q3_K),
        T::Q4_K => Layout::Blocks(&Q4_K),
        T::Q5_K => Layout::Blocks(&Q5_K),
        T::Q6_K => Layout::Blocks(&Q6_K),
        T::IQ4_NL => Layout::Blocks(&IQ4_NL),
        T::IQ4_XS => Layout::Blocks(&IQ4_XS),
        _ => return None,
    })
}

const F16_EXP: u16 = 0x7c00;
const BF16_EXP: u16 = 0x7f80;
const F32_EXP: u32 = 0x7f80_0000;
const F64_EXP: u64 = 0x7ff0_0000_0000_0000;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Whether `bytes` (whole elements or blocks of `ty`) hold a non-finite value.
fn has_nonfinite(layout: Layout, ty: GgmlType, bytes: &[u8]) -> bool {
    // Counting rather than stopping at the first hit keeps the loops branch-free (vectorised);
    // hits are rare and the counts are redone exactly for flagged tensors anyway.
    let hits = match layout {
        Layout::F32 => {
            bytes.chunks_exact(4).filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & F32_EXP == F32_EXP).count()
        }
        Layout::F16 => bytes.chunks_exact(2).filter(|c| u16_at(c, 0) & F16_EXP == F16_EXP).count(),
        Layout::BF16 => bytes.chunks_exact(2).filter(|c| u16_at(c, 0) & BF16_EXP == BF16_EXP).count(),
        Layout::F64 => bytes
            .chunks_exact(8)
            .filter(|c| u64::from_le_bytes((*c).try_into().expect("8 bytes")) & F64_EXP == F64_EXP)
            .count(),
        Layout::Integers => 0,
        Layout::Blocks(offsets) => bytes
            .chunks_exact(ty.type_size())
            .filter(|b| offsets.iter().any(|&o| u16_at(b, o) & F16_EXP == F16_EXP))
            .count(),
    };
    hits > 0
}

/// Exact (NaN, infinite) counts of a tensor's values, from its exact dequantization.
fn count_nonfinite(ty: GgmlType, bytes: &[u8]) -> (u64, u64) {
    let classify = |(nan, inf): (u64, u64), v: f64| (nan + v.is_nan() as u64, inf + v.is_infinite() as u64);
    if ty == GgmlType::F64 {
        return bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .fold((0, 0), classify);
    }
    // Dequantized a run of blocks at a time, so memory stays small whatever the tensor's size.
    let per_piece = (1 << 16) / ty.block_size().max(1) * ty.block_size().max(1);
    let piece_bytes = per_piece / ty.block_size() * ty.type_size();
    let mut out = vec![0f32; per_piece];
    let mut counts = (0, 0);
    for piece in bytes.chunks(piece_bytes) {
        let n = piece.len() / ty.type_size() * ty.block_size();
        if kiln_quant::dequantize_row(ty, piece, &mut out[..n]).is_err() {
            continue;
        }
        counts = out[..n].iter().map(|&v| v as f64).fold(counts, classify);
    }
    counts
}

/// Bytes per scan job: large enough to amortise the job, small enough to share a big tensor among
/// threads.
const JOB_BYTES: usize = 1 << 20;

/// Scans every tensor of `g` for NaN and infinite values, in parallel on the current rayon pool.
pub fn scan_nonfinite(g: &GgufFile) -> NonFiniteReport {
    let mut report = NonFiniteReport::default();
    let mut jobs: Vec<(usize, Layout, &[u8])> = Vec::new();
    for (i, t) in g.tensors.iter().enumerate() {
        let Some(l) = layout(t.ggml_type) else {
            report.unchecked.push((t.name.clone(), t.ggml_type));
            continue;
        };
        let unit = t.ggml_type.type_size().max(1);
        let data = g.tensor_data(t);
        jobs.extend(data.chunks((JOB_BYTES / unit).max(1) * unit).map(|c| (i, l, c)));
    }
    let mut flagged: Vec<usize> =
        jobs.par_iter().filter(|(i, l, c)| has_nonfinite(*l, g.tensors[*i].ggml_type, c)).map(|(i, _, _)| *i).collect();
    flagged.sort_unstable();
    flagged.dedup();
    report.tensors = flagged
        .par_iter()
        .map(|&i| {
            let t: &TensorInfo = &g.tensors[i];
            let (nan, inf) = count_nonfinite(t.ggml_type, g.tensor_data(t));
            NonFiniteTensor { name: t.name.clone(), ggml_type: t.ggml_type, n_elements: t.n_elements, nan, inf }
        })
        .collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use kiln_gguf::GgufBuilder;

    /// Every supported type's scale offsets lie inside its block, and its struct is the block.
    #[test]
    fn layouts_match_the_block_structs() {
        for ty in GgmlType::SUPPORTED {
            let l = layout(ty).unwrap_or_else(|| panic!("{ty:?} has no layout"));
            if let Layout::Blocks(offsets) = l {
                for &o in offsets {
                    assert!(o + 2 <= ty.type_size(), "{ty:?}");
                }
            }
        }
        assert_eq!(std::mem::size_of::<q4_k::BlockQ4K>(), GgmlType::Q4_K.type_size());
        assert_eq!(std::mem::size_of::<q6_k::BlockQ6K>(), GgmlType::Q6_K.type_size());
        assert_eq!(std::mem::size_of::<q2_k::BlockQ2K>(), GgmlType::Q2_K.type_size());
        assert_eq!(std::mem::size_of::<iq4_xs::BlockIQ4XS>(), GgmlType::IQ4_XS.type_size());
    }

    /// Deterministic pseudo-random bytes.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The quick scan agrees with the exact dequantization, block by block, for every supported
    /// type: random blocks with finite scale fields dequantize to finite values, and a block with
    /// a NaN or infinite scale field to non-finite ones (every value of it).
    #[test]
    fn scan_agrees_with_exact_dequantization() {
        for ty in GgmlType::SUPPORTED {
            let l = layout(ty).unwrap();
            let n_blocks = 64;
            let mut bytes = noise(n_blocks * ty.type_size(), ty.id() as u64 + 1);
            // Every value finite first (random float bits can be NaN for the float types).
            let finite = |v: u16, exp: u16| if v & exp == exp { v & !0x4000 } else { v };
            match l {
                Layout::Blocks(offsets) => {
                    for b in bytes.chunks_exact_mut(ty.type_size()) {
                        for &o in offsets {
                            let v = finite(u16_at(b, o), F16_EXP);
                            b[o..o + 2].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                Layout::F16 | Layout::BF16 => {
                    let exp = if matches!(l, Layout::F16) { F16_EXP } else { BF16_EXP };
                    for c in bytes.chunks_exact_mut(2) {
                        let v = finite(u16_at(c, 0), exp);
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Layout::F32 => {
                    for c in bytes.chunks_exact_mut(4) {
                        let mut v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        if v & F32_EXP == F32_EXP {
                            v &= !0x4000_0000;
                        }
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
                _ => unreachable!(),
            }
            let n = n_blocks * ty.block_size();
            let mut out = vec![0f32; n];
            kiln_quant::dequantize_row(ty, &bytes, &mut out).unwrap();
            assert!(out.iter().all(|v| v.is_finite()), "{ty:?}: finite scales gave a non-finite value");
            assert!(!has_nonfinite(l, ty, &bytes), "{ty:?}");
            assert_eq!(count_nonfinite(ty, &bytes), (0, 0), "{ty:?}");

            // One bad scale (or value) in block 5: NaN; in block 9: +inf; in block 11: -inf.
            let bad = |bits16: u16, bits32: u32, b: &mut [u8]| match l {
                Layout::Blocks(offsets) => {
                    let o = offsets[offsets.len() - 1];
                    b[o..o + 2].copy_from_slice(&bits16.to_le_bytes());
                }
                Layout::F16 => b[..2].copy_from_slice(&bits16.to_le_bytes()),
                Layout::BF16 => b[..2].copy_from_slice(&((bits32 >> 16) as u16).to_le_bytes()),
                Layout::F32 => b[..4].copy_from_slice(&bits32.to_le_bytes()),
                _ => unreachable!(),
            };
            let ts = ty.type_size();
            bad(f16::NAN.to_bits(), f32::NAN.to_bits(), &mut bytes[5 * ts..6 * ts]);
            bad(f16::INFINITY.to_bits(), f32::INFINITY.to_bits(), &mut bytes[9 * ts..10 * ts]);
            bad(f16::NEG_INFINITY.to_bits(), f32::NEG_INFINITY.to_bits(), &mut bytes[11 * ts..12 * ts]);
            assert!(has_nonfinite(l, ty, &bytes), "{ty:?}");
            kiln_quant::dequantize_row(ty, &bytes, &mut out).unwrap();
            let exact = out.iter().filter(|v| !v.is_finite()).count() as u64;
            let (nan, inf) = count_nonfinite(ty, &bytes);
            assert_eq!(nan + inf, exact, "{ty:?}");
            // A bad scale spoils its whole block; a bad float value only itself.
            let per_bad = if matches!(l, Layout::Blocks(_)) { ty.block_size() as u64 } else { 1 };
            assert_eq!(exact, 3 * per_bad, "{ty:?}");
            assert!(nan >= per_bad, "{ty:?}: {nan} NaN");
            // The blocks between stayed finite.
            let bs = ty.block_size();
            assert!(out[6 * bs..9 * bs].iter().all(|v| v.is_finite()), "{ty:?}");
        }
    }

    #[test]
    fn report_of_a_file() {
        let mut b = GgufBuilder::new();
        let mut vals = vec![1.0f32; 64];
        vals[3] = f32::NAN;
        vals[7] = f32::NEG_INFINITY;
        b.add_f32_tensor("a", &[64], &vals);
        b.add_f32_tensor("b", &[64], &[0.5; 64]);
        b.add_tensor("c", &[32, 2], GgmlType::Q8_0, vec![0u8; 2 * 34]);
        let mut q = vec![0u8; 2 * 34];
        q[34..36].copy_from_slice(&f16::INFINITY.to_bits().to_le_bytes());
        b.add_tensor("d", &[32, 2], GgmlType::Q8_0, q);
        b.add_tensor("e", &[256], GgmlType::IQ2_XXS, vec![0u8; GgmlType::IQ2_XXS.type_size()]);
        let g = GgufFile::from_bytes(b.to_bytes()).unwrap();
        let r = scan_nonfinite(&g);
        let names: Vec<(&str, u64, u64)> = r.tensors.iter().map(|t| (t.name.as_str(), t.nan, t.inf)).collect();
        // Q8_0's quants are all 0 here: ∞ × 0 is NaN.
        assert_eq!(names, [("a", 1, 1), ("d", 32, 0)]);
        assert_eq!(r.unchecked, [("e".to_string(), GgmlType::IQ2_XXS)]);
        assert_eq!(
            r.to_string(),
            r#"2 tensors have non-finite values: "a" has 2 non-finite values (1 NaN, 1 infinite), "d" has 32 non-finite values (32 NaN, 0 infinite)"#
        );
    }
}
