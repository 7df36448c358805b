//! Row-interleaved storage of Q4_0, Q4_K and Q5_K matrices for the generation kernels.
//!
//! A matrix-vector kernel that reads one row at a time ends every super-block with a horizontal
//! sum and applies each sub-block's scale to a vector of partial sums of that one row. With the
//! super-blocks of eight rows woven together, one 32-byte load holds the same four quant bytes of
//! all eight rows, one broadcast activation word multiplies them all, and the vector lanes are the
//! rows: scales, mins and f32 steps then run once per eight rows.
//!
//! The layout is a permutation of the file's bytes, nothing added or dropped. Rows `16g .. 16g +
//! 16` (whole groups of [`GROUP`] only) keep their place as one stretch of `16 · row_bytes`; inside
//! it, block `i` of the sixteen rows is one *unit* of `16 · block` bytes at `i · 16 · block`, so a
//! kernel reads one
//! steady stream while each broadcast activation word serves sixteen rows. A block is read as `h`
//! 2-byte header fields (Q4_0: `d`; Q4_K, Q5_K: `d`, `dmin`) and then 4-byte words (Q4_0 4,
//! Q4_K 35, Q5_K 43): field `f` of row `r` goes to `32f + 2r`, word `k` to `32h + 64k + 4r`. So the
//! 64-byte slot of word `k` holds that word of all sixteen rows (rows 0–7 in its first 32 bytes,
//! one 256-bit vector with a row per lane): for the k-quants the scale words 0–2, then Q5_K's `qh`
//! words 3–10 (alternating with its first eight quant words, see [`slot_of`]), then the quant
//! words. Rows past the last whole group stay as they were.

use kiln_gguf::GgmlType;

/// Rows woven together.
pub const GROUP: usize = 16;
/// Rows of a half-unit (the lanes of one 256-bit vector of i32).
pub const LANES: usize = 8;

/// Whether `ty` has the interleaved layout (and its kernels).
pub fn supports(ty: GgmlType) -> bool {
    header_fields(ty).is_some()
}

/// The 2-byte header fields that lead a block of `ty` (the rest is 4-byte words).
fn header_fields(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 => Some(1),
        GgmlType::Q4_K | GgmlType::Q5_K => Some(2),
        _ => None,
    }
}

/// Weaves the whole groups of rows of a `ty` matrix (`rows` rows of `row_bytes` bytes in `data`)
/// in place. Panics if `ty` is not [`supports`] or the sizes disagree.
pub fn interleave(ty: GgmlType, data: &mut [u8], rows: usize, row_bytes: usize) {
    assert!(supports(ty), "interleave: {ty:?} has no interleaved layout");
    let bs = ty.type_size();
    assert!(data.len() == rows * row_bytes && row_bytes.is_multiple_of(bs), "interleave: geometry");
    use rayon::prelude::*;
    // Groups are independent: the threads share them (a 1.1B model's 600 MB at load).
    data[..rows / GROUP * GROUP * row_bytes].par_chunks_exact_mut(GROUP * row_bytes).for_each_init(
        || vec![0u8; GROUP * row_bytes],
        |woven, group| {
            for (i, dst) in woven.chunks_exact_mut(GROUP * bs).enumerate() {
                for r in 0..GROUP {
                    let src = &group[r * row_bytes + i * bs..r * row_bytes + (i + 1) * bs];
                    put_block(ty, dst, r, src);
                }
            }
            group.copy_from_slice(woven);
        },
    );
}

/// Bytes of one slot: one 4-byte word of every row of the group.
const SLOT: usize = 4 * GROUP;

/// The slot of word `k`: the word order, except that Q5_K's eight `qh` words (3..=10) alternate
/// with its first eight quant words (11..=18), the order in which its kernel first reads them, so
/// that it reads one stream (two interleaved ones slowed its AVX2 kernel 2.5× from memory).
pub fn slot_of(ty: GgmlType, k: usize) -> usize {
    match (ty, k) {
        (GgmlType::Q5_K, 3..=10) => 3 + 2 * (k - 3),
        (GgmlType::Q5_K, 11..=18) => 4 + 2 * (k - 11),
        _ => k,
    }
}

/// Row `r`'s block (`out`, one block of `ty`) out of a unit of `GROUP` blocks.
pub fn take_block(ty: GgmlType, unit: &[u8], r: usize, out: &mut [u8]) {
    let (bs, h) = (ty.type_size(), header_fields(ty).expect("an interleaved type"));
    debug_assert!(unit.len() == GROUP * bs && out.len() == bs && r < GROUP);
    for f in 0..h {
        out[2 * f..2 * f + 2].copy_from_slice(&unit[2 * GROUP * f + 2 * r..2 * GROUP * f + 2 * r + 2]);
    }
    let words = 2 * GROUP * h;
    for k in 0..(bs - 2 * h) / 4 {
        let at = words + SLOT * slot_of(ty, k) + 4 * r;
        out[2 * h + 4 * k..2 * h + 4 * k + 4].copy_from_slice(&unit[at..at + 4]);
    }
}

/// Writes `block` as row `r`'s share of `unit` (the inverse of [`take_block`]).
fn put_block(ty: GgmlType, unit: &mut [u8], r: usize, block: &[u8]) {
    let (bs, h) = (ty.type_size(), header_fields(ty).expect("an interleaved type"));
    for f in 0..h {
        unit[2 * GROUP * f + 2 * r..2 * GROUP * f + 2 * r + 2].copy_from_slice(&block[2 * f..2 * f + 2]);
    }
    let words = 2 * GROUP * h;
    for k in 0..(bs - 2 * h) / 4 {
        let at = words + SLOT * slot_of(ty, k) + 4 * r;
        unit[at..at + 4].copy_from_slice(&block[2 * h + 4 * k..2 * h + 4 * k + 4]);
    }
}

/// Blocks `blocks` of row `r` of an interleaved matrix (`data` all its rows) in the file's layout,
/// written to `out` (`blocks.len()` blocks long).
pub fn row_blocks(
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    row_bytes: usize,
    r: usize,
    blocks: std::ops::Range<usize>,
    out: &mut [u8],
) {
    let bs = ty.type_size();
    assert!(r < rows && blocks.end * bs <= row_bytes && out.len() == blocks.len() * bs, "row_blocks: geometry");
    if r >= rows / GROUP * GROUP {
        out.copy_from_slice(&data[r * row_bytes + blocks.start * bs..r * row_bytes + blocks.end * bs]);
        return;
    }
    let group = &data[r / GROUP * GROUP * row_bytes..(r / GROUP + 1) * GROUP * row_bytes];
    for (i, o) in blocks.zip(out.chunks_exact_mut(bs)) {
        take_block(ty, &group[i * GROUP * bs..(i + 1) * GROUP * bs], r % GROUP, o);
    }
}

/// The rows of an interleaved `data` (`rows` rows, starting at a group) in the file's layout.
pub fn deinterleave(ty: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    let nb = row_bytes / ty.type_size();
    let mut out = vec![0u8; data.len()];
    for (r, o) in out.chunks_exact_mut(row_bytes).enumerate() {
        row_blocks(ty, data, rows, row_bytes, r, 0..nb, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn every_row_reads_back_as_the_file_had_it() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q5_K] {
            let bs = ty.type_size();
            for (rows, blocks) in [(16, 1), (32, 3), (13, 2), (7, 2), (40, 5), (16, 2)] {
                let rb = blocks * bs;
                let plain = bytes(rows * rb, (rows * 31 + blocks) as u64);
                let mut woven = plain.clone();
                interleave(ty, &mut woven, rows, rb);
                if rows >= GROUP {
                    assert_ne!(woven, plain, "{ty:?} {rows}x{blocks}: nothing moved");
                }
                assert_eq!(deinterleave(ty, &woven, rows, rb), plain);
                let mut sorted_a = plain.clone();
                let mut sorted_b = woven.clone();
                sorted_a.sort_unstable();
                sorted_b.sort_unstable();
                assert_eq!(sorted_a, sorted_b, "a permutation");
                for r in 0..rows {
                    for b0 in 0..blocks {
                        let mut out = vec![0u8; (blocks - b0) * bs];
                        row_blocks(ty, &woven, rows, rb, r, b0..blocks, &mut out);
                        assert_eq!(out, plain[r * rb + b0 * bs..(r + 1) * rb], "{ty:?} row {r} from block {b0}");
                    }
                }
            }
        }
    }

    #[test]
    fn slots_are_a_permutation_of_the_words() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q5_K] {
            let h = header_fields(ty).unwrap();
            let words = (ty.type_size() - 2 * h) / 4;
            let mut slots: Vec<usize> = (0..words).map(|k| slot_of(ty, k)).collect();
            slots.sort_unstable();
            assert_eq!(slots, (0..words).collect::<Vec<_>>(), "{ty:?}");
        }
    }

    #[test]
    fn the_slots_hold_one_word_of_every_row() {
        let ty = GgmlType::Q4_K;
        let bs = ty.type_size();
        let plain = bytes(GROUP * bs, 7);
        let mut woven = plain.clone();
        interleave(ty, &mut woven, GROUP, bs);
        for r in 0..GROUP {
            let block = &plain[r * bs..(r + 1) * bs];
            assert_eq!(woven[2 * r..2 * r + 2], block[0..2], "d");
            assert_eq!(woven[32 + 2 * r..34 + 2 * r], block[2..4], "dmin");
            // The first quant word: qs bytes 0..4 of the row (block bytes 16..20), in slot 4.
            assert_eq!(woven[64 * 4 + 4 * r..64 * 4 + 4 * r + 4], block[16..20]);
        }
    }
}
