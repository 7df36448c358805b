//! Q4_0 weights repacked at load time into panels of [`PANEL_ROWS`] rows, for the generation
//! (matrix-vector) products.
//!
//! Why: one Q4_0 row at a time, each 18-byte block costs a horizontal reduction, a scalar f16 scale
//! load and a block-sum fix-up of its own, as much work as its multiplies. With eight rows side by
//! side, one 32-bit lane per row, the same activation bytes (broadcast) meet all eight rows in one
//! instruction, the eight scales convert in one `vcvtph2ps`, and the rows' sums never leave their
//! lanes: no reduction at all. The weights become one contiguous stream per panel.
//!
//! Layout of a panel of a matrix with `nb` blocks per row: `nb` block columns of
//! [`PANEL_BLOCK_BYTES`] (= 8 × 18) bytes each. Block column `b` holds the f16 scales `d` of block
//! `b` of rows 0..8 (16 bytes), then for each chunk `c` in 0..4 the quant bytes `qs[4c .. 4c + 4]`
//! of rows 0..8 (32 bytes per chunk, row `r` at `4r`). The bytes are the file's, only reordered
//! ([`repack`] and [`unpack_row`] are inverse), so the numbers are the same Q4_0 blocks.
//!
//! Results: per row, blocks in order, `sum += (d · da) · Σ w a` in f32 with exact integer sums —
//! the operations of the scalar oracle ([`crate::dot_legacy::vec_dot_q8_planes_unopt`] /
//! [`crate::dot_legacy::vec_dot_q8_unopt`]) in the same order, so the SIMD kernel is bit-identical
//! to it ([`vec_dot_panel_unopt`] is that oracle on the panel layout).

use crate::act_q8::{ActQ8, QK};
use crate::dot_legacy::{scalar_block, T_Q4_0};
use crate::isa::{detected_isa, isa, Isa};
use crate::q4_0::BLOCK_BYTES;
use kiln_gguf::GgmlType;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Rows per panel.
pub const PANEL_ROWS: usize = 8;
/// Bytes of one block column of a panel (the eight rows' blocks).
pub const PANEL_BLOCK_BYTES: usize = PANEL_ROWS * BLOCK_BYTES;

/// Whether matrices of `ty` are repacked into panels.
pub fn is_supported(ty: GgmlType) -> bool {
    ty == GgmlType::Q4_0
}

/// Byte offset inside a block column of byte `j` (0..16) of the quants of row `r`.
#[inline]
const fn quant_offset(r: usize, j: usize) -> usize {
    2 * PANEL_ROWS + 32 * (j / 4) + 4 * r + j % 4
}

/// The whole panels of a Q4_0 matrix of `rows` rows (`data`, `cols / 32` blocks per row): rows
/// `0 .. rows / 8 * 8`; the last `rows % 8` rows are not included.
pub fn repack(data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let nb = cols / QK;
    let row_bytes = nb * BLOCK_BYTES;
    assert_eq!(data.len(), rows * row_bytes, "panel_q4_0: data is not {rows} rows of {cols}");
    let panels = rows / PANEL_ROWS;
    let mut out = vec![0u8; panels * nb * PANEL_BLOCK_BYTES];
    for (p, dst) in out.chunks_exact_mut(nb * PANEL_BLOCK_BYTES).enumerate() {
        for r in 0..PANEL_ROWS {
            let row = &data[(p * PANEL_ROWS + r) * row_bytes..][..row_bytes];
            for (col, blk) in dst.chunks_exact_mut(PANEL_BLOCK_BYTES).zip(row.chunks_exact(BLOCK_BYTES)) {
                col[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                for c in 0..4 {
                    col[quant_offset(r, 4 * c)..][..4].copy_from_slice(&blk[2 + 4 * c..][..4]);
                }
            }
        }
    }
    out
}

/// Writes blocks `blocks` of row `r` (counted in the whole matrix; inside the panels) back in the
/// file's layout into `out` (18 bytes per block).
pub fn unpack_row_blocks(panels: &[u8], cols: usize, r: usize, blocks: std::ops::Range<usize>, out: &mut [u8]) {
    let nb = cols / QK;
    assert!(blocks.end <= nb, "panel_q4_0: blocks past the row");
    let panel = &panels[r / PANEL_ROWS * nb * PANEL_BLOCK_BYTES..][..nb * PANEL_BLOCK_BYTES];
    let cols_bytes = &panel[blocks.start * PANEL_BLOCK_BYTES..blocks.end * PANEL_BLOCK_BYTES];
    let j = r % PANEL_ROWS;
    assert_eq!(out.len(), blocks.len() * BLOCK_BYTES, "panel_q4_0: row buffer length");
    for (col, blk) in cols_bytes.chunks_exact(PANEL_BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        blk[..2].copy_from_slice(&col[2 * j..2 * j + 2]);
        for c in 0..4 {
            blk[2 + 4 * c..][..4].copy_from_slice(&col[quant_offset(j, 4 * c)..][..4]);
        }
    }
}

/// Writes row `r` (inside the panels) back in the file's layout into `out` (`cols / 32 · 18`
/// bytes).
pub fn unpack_row(panels: &[u8], cols: usize, r: usize, out: &mut [u8]) {
    unpack_row_blocks(panels, cols, r, 0..cols / QK, out)
}

/// Checks a call: `panel` one whole panel of `acts[0].n_blocks()` block columns, 1 to 4 vectors of
/// `planes` planes, `out` 8 per vector.
fn check(panel: &[u8], acts: &[&ActQ8], planes: usize, out: &[f32]) {
    assert!(planes == 1 || planes == 2, "panel_q4_0: 1 or 2 planes");
    assert!(!acts.is_empty() && acts.len().is_multiple_of(planes), "panel_q4_0: activations are not whole planes");
    let k = acts.len() / planes;
    assert!(k * planes <= 4, "panel_q4_0: 1 to 4 activation vectors, got {}", acts.len());
    let nb = acts[0].n_blocks();
    assert_eq!(panel.len(), nb * PANEL_BLOCK_BYTES, "panel_q4_0: panel of {nb} block columns");
    for a in acts {
        assert!(a.is_well_formed() && a.n_blocks() == nb, "panel_q4_0: activation geometry");
    }
    if planes == 2 {
        for pair in acts.chunks_exact(2) {
            let ok = pair[0].d().iter().zip(pair[1].d()).all(|(&d1, &d2)| d2 == d1 / 256.0);
            assert!(ok, "panel_q4_0: second plane is not the residual plane of the first");
        }
    }
    assert_eq!(out.len(), PANEL_ROWS * k, "panel_q4_0: output length");
}

/// Dot products of the eight rows of one panel with `acts.len() / planes` activation vectors of
/// `planes` (1 or 2) planes each: `out[r * k + i]` = row `r` · vector `i`, with the active kernel.
pub fn vec_dot_panel(panel: &[u8], acts: &[&ActQ8], planes: usize, out: &mut [f32]) {
    vec_dot_panel_at(isa(), panel, acts, planes, out)
}

/// [`vec_dot_panel`] with an explicit level; panics if this CPU cannot run `isa`.
pub fn vec_dot_panel_isa(level: Isa, panel: &[u8], acts: &[&ActQ8], planes: usize, out: &mut [f32]) {
    assert!(level <= detected_isa(), "panel_q4_0: {} is not available on this CPU", level.name());
    vec_dot_panel_at(level, panel, acts, planes, out)
}

fn vec_dot_panel_at(level: Isa, panel: &[u8], acts: &[&ActQ8], planes: usize, out: &mut [f32]) {
    check(panel, acts, planes, out);
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx2 {
        // SAFETY: the level runs on this CPU (the active one, or asserted by the caller); the
        // geometry and planes were checked above.
        unsafe { avx2::dot_panel(panel, acts, planes, out) };
        return;
    }
    let _ = level;
    scalar_panel(panel, acts, planes, out)
}

/// The scalar oracle of [`vec_dot_panel`]: each row's blocks through the scalar per-block term of
/// [`crate::dot_legacy`], summed in block order.
pub fn vec_dot_panel_unopt(panel: &[u8], acts: &[&ActQ8], planes: usize, out: &mut [f32]) {
    check(panel, acts, planes, out);
    scalar_panel(panel, acts, planes, out)
}

fn scalar_panel(panel: &[u8], acts: &[&ActQ8], planes: usize, out: &mut [f32]) {
    let k = acts.len() / planes;
    let mut blk = [0u8; BLOCK_BYTES];
    for r in 0..PANEL_ROWS {
        for (i, vec_planes) in acts.chunks_exact(planes).enumerate() {
            let mut sum = 0f32;
            for (b, col) in panel.chunks_exact(PANEL_BLOCK_BYTES).enumerate() {
                blk[..2].copy_from_slice(&col[2 * r..2 * r + 2]);
                for c in 0..4 {
                    blk[2 + 4 * c..][..4].copy_from_slice(&col[quant_offset(r, 4 * c)..][..4]);
                }
                sum += scalar_block(T_Q4_0, &blk, vec_planes, b).0;
            }
            out[r * k + i] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dot_legacy::{vec_dot_q8_planes_unopt, vec_dot_q8_unopt};
    use crate::isa::available_isas;

    fn lcg(s: &mut u64) -> u32 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*s >> 33) as u32
    }

    /// Random Q4_0 rows with scales of mixed sign and size (including zero).
    fn random_rows(rows: usize, nb: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut data = Vec::with_capacity(rows * nb * BLOCK_BYTES);
        for _ in 0..rows * nb {
            let d = match lcg(&mut s) % 8 {
                0 => 0.0,
                _ => (lcg(&mut s) % 2000) as f32 / 1000.0 - 1.0,
            };
            data.extend(half::f16::from_f32(d).to_le_bytes());
            data.extend((0..16).map(|_| lcg(&mut s) as u8));
        }
        data
    }

    fn random_acts(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                let v = (lcg(&mut s) % 20001) as f32 / 10000.0 - 1.0;
                if i % 97 == 0 {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn unpack_inverts_repack() {
        for nb in [1, 3, 8] {
            let rows = 19; // two panels and three rows left out
            let data = random_rows(rows, nb, nb as u64);
            let panels = repack(&data, rows, nb * QK);
            assert_eq!(panels.len(), 2 * nb * PANEL_BLOCK_BYTES);
            let mut row = vec![0u8; nb * BLOCK_BYTES];
            for r in 0..16 {
                unpack_row(&panels, nb * QK, r, &mut row);
                let want = &data[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
                assert_eq!(row, want, "row {r}");
                let mut part = vec![0u8; (nb - nb / 2) * BLOCK_BYTES];
                unpack_row_blocks(&panels, nb * QK, r, nb / 2..nb, &mut part);
                assert_eq!(part, want[nb / 2 * BLOCK_BYTES..], "row {r} from block {}", nb / 2);
            }
        }
    }

    /// The oracle on panels equals the row oracle of `dot_legacy` on the file's rows, and every
    /// kernel equals the oracle bit for bit: 1 and 2 planes, 1 to 4 vectors, odd block counts.
    #[test]
    fn kernels_match_row_oracle_bit_for_bit() {
        for nb in [1, 2, 3, 5, 7, 64, 67] {
            let data = random_rows(PANEL_ROWS, nb, 100 + nb as u64);
            let panel = repack(&data, PANEL_ROWS, nb * QK);
            let xs: Vec<Vec<f32>> = (0..4).map(|i| random_acts(nb * QK, 7 * nb as u64 + i)).collect();
            for planes in [1, 2] {
                let mut acts = Vec::new();
                for x in xs.iter().take(4 / planes) {
                    let mut a = ActQ8::new();
                    a.quantize(x);
                    if planes == 2 {
                        let mut r = ActQ8::new();
                        r.quantize_residual(&a, x);
                        acts.push(a);
                        acts.push(r);
                    } else {
                        acts.push(a);
                    }
                }
                for k in 1..=4 / planes {
                    let refs: Vec<&ActQ8> = acts[..k * planes].iter().collect();
                    let mut want = vec![0f32; PANEL_ROWS * k];
                    vec_dot_panel_unopt(&panel, &refs, planes, &mut want);
                    for r in 0..PANEL_ROWS {
                        let row = &data[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
                        for i in 0..k {
                            let v = if planes == 2 {
                                vec_dot_q8_planes_unopt(GgmlType::Q4_0, row, refs[2 * i], refs[2 * i + 1])
                            } else {
                                vec_dot_q8_unopt(GgmlType::Q4_0, row, refs[i])
                            };
                            assert_eq!(want[r * k + i].to_bits(), v.to_bits(), "nb {nb} planes {planes} row {r}");
                        }
                    }
                    for level in available_isas() {
                        let mut got = vec![0f32; PANEL_ROWS * k];
                        vec_dot_panel_isa(level, &panel, &refs, planes, &mut got);
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{level:?} nb {nb} planes {planes} k {k}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "panel of")]
    fn rejects_a_short_panel() {
        let mut a = ActQ8::new();
        a.quantize(&[0.5; 64]);
        let mut out = [0f32; 8];
        vec_dot_panel(&[0u8; PANEL_BLOCK_BYTES], &[&a], 1, &mut out);
    }
}
