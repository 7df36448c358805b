//! Byte-level BPE (GPT-2 style, llama.cpp `llm_tokenizer_bpe`): pre-tokenize into words, map each
//! byte to a printable character, then merge adjacent pieces by merge rank (lowest first).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::error::Result;
use crate::pretokenize::PreTokenizer;
use crate::vocab::Vocab;

/// Bytes that GPT-2 maps to the code point of the same number.
const fn maps_to_itself(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Byte → code point of its printable stand-in (GPT-2 `bytes_to_unicode`).
const BYTE_TO_CPT: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut n = 0;
    let mut i = 0;
    while i < 256 {
        if maps_to_itself(i as u8) {
            t[i] = i as u32;
        } else {
            t[i] = 256 + n;
            n += 1;
        }
        i += 1;
    }
    t
};

/// The bytes whose stand-ins are 256, 257, …, in that order.
const SHIFTED_BYTES: [u8; 68] = {
    let mut t = [0u8; 68];
    let mut n = 0;
    let mut i = 0;
    while i < 256 {
        if !maps_to_itself(i as u8) {
            t[n] = i as u8;
            n += 1;
        }
        i += 1;
    }
    t
};

pub(crate) fn byte_to_char(b: u8) -> char {
    // All table entries are below 0x200, valid scalar values.
    char::from_u32(BYTE_TO_CPT[b as usize]).unwrap_or('\u{FFFD}')
}

pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    if c < 256 && maps_to_itself(c as u8) {
        Some(c as u8)
    } else if (256..256 + SHIFTED_BYTES.len() as u32).contains(&c) {
        Some(SHIFTED_BYTES[(c - 256) as usize])
    } else {
        None
    }
}

/// The byte-level encoding of raw bytes (each byte becomes its stand-in character).
pub(crate) fn byte_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// A token text in the byte-level alphabet back to bytes; characters outside it are written the
/// way llama.cpp does (`[UNK_BYTE_0x…]`).
pub(crate) fn byte_decode(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

/// Pending merges: (rank, left index, right index, left length, right length), lowest rank and
/// then leftmost first.
type MergeQueue = BinaryHeap<Reverse<(u32, u32, u32, u32, u32)>>;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
    /// The piece this symbol spells: a token id (< n_vocab) or a merge-only piece (≥ n_vocab).
    piece: Option<u32>,
}

/// One merge rule: `left right` → `merged`, applied in `rank` order.
#[derive(Debug, Clone, Copy)]
struct MergeEntry {
    left: u32,
    right: u32,
    rank: u32,
    merged: u32,
}

/// The merge rules grouped by left piece (rows of a sparse matrix): 12 bytes a rule plus 4 a piece,
/// where a hash map takes ~23 a rule (1.1 MB for SmolLM2's 48,900 merges, against 0.8 MB).
#[derive(Debug)]
struct MergeTable {
    /// Rules of left piece `p`: `rules[starts[p] .. starts[p + 1]]`, sorted by right piece.
    starts: Vec<u32>,
    /// `(right, rank, merged)`.
    rules: Vec<[u32; 3]>,
}

impl MergeTable {
    /// `entries` in any order over pieces `< n_pieces`; of several rules for the same pair, the
    /// lowest rank wins (llama.cpp keeps the first in file order, which is rank order).
    fn new(mut entries: Vec<MergeEntry>, n_pieces: usize) -> MergeTable {
        entries.sort_unstable_by_key(|e| (e.left, e.right, e.rank));
        entries.dedup_by_key(|e| (e.left, e.right));
        let starts = crate::vocab::group_starts(entries.iter().map(|e| e.left as usize), n_pieces);
        let rules = entries.iter().map(|e| [e.right, e.rank, e.merged]).collect();
        MergeTable { starts, rules }
    }

    /// `(rank, merged piece)` of the rule merging `left` and `right`.
    fn get(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let (a, b) = (*self.starts.get(left as usize)?, *self.starts.get(left as usize + 1)?);
        let row = &self.rules[a as usize..b as usize];
        let i = row.binary_search_by_key(&right, |r| r[0]).ok()?;
        Some((row[i][1], row[i][2]))
    }
}

/// Merge table and pre-tokenizer of a byte-level BPE vocabulary.
#[derive(Debug)]
pub(crate) struct Bpe {
    pre: PreTokenizer,
    ignore_merges: bool,
    n_vocab: u32,
    /// (left piece, right piece) → (rank, merged piece).
    ranks: MergeTable,
    /// The piece of each single byte's stand-in character.
    byte_piece: [Option<u32>; 256],
    /// Tokens of single printable ASCII characters (llama.cpp's fallback for unmerged pieces).
    ascii_token: [Option<u32>; 128],
}

impl Bpe {
    /// `merges`: "left right" strings, best (lowest rank) first.
    pub fn new(vocab: &Vocab, merges: &[&str], pre: PreTokenizer, ignore_merges: bool) -> Bpe {
        let n_vocab = vocab.len() as u32;
        let mut extra: HashMap<String, u32> = HashMap::new();
        let mut intern = |s: &str| -> u32 {
            if let Some(id) = vocab.id(s) {
                return id;
            }
            if let Some(&id) = extra.get(s) {
                return id;
            }
            let id = n_vocab + extra.len() as u32;
            extra.insert(s.to_string(), id);
            id
        };
        let mut entries = Vec::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first byte, like llama.cpp.
            let Some(pos) = m.as_bytes().iter().skip(1).position(|&b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&m[..pos], &m[pos + 1..]);
            if left.is_empty() || right.is_empty() {
                continue;
            }
            let (l, r) = (intern(left), intern(right));
            let merged = intern(&format!("{left}{right}"));
            entries.push(MergeEntry { left: l, right: r, rank: rank as u32, merged });
        }
        let ranks = MergeTable::new(entries, n_vocab as usize + extra.len());
        let mut byte_piece = [None; 256];
        for (b, slot) in byte_piece.iter_mut().enumerate() {
            let s = byte_to_char(b as u8).to_string();
            *slot = vocab.id(&s).or_else(|| extra.get(&s).copied());
        }
        let mut ascii_token = [None; 128];
        for (b, slot) in ascii_token.iter_mut().enumerate() {
            *slot = vocab.id(&(b as u8 as char).to_string());
        }
        Bpe { pre, ignore_merges, n_vocab, ranks, byte_piece, ascii_token }
    }

    /// The words of `text` (byte ranges), as [`Bpe::tokenize`] merges within them.
    pub fn words(&self, text: &str) -> Vec<(usize, usize)> {
        self.pre.split(text)
    }

    pub fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols = Vec::new();
        let mut heap = BinaryHeap::new();
        for (a, b) in self.words(text) {
            let word = &text.as_bytes()[a..b];
            if self.ignore_merges {
                if let Some(id) = vocab.id(&byte_encode(word)) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word(word, &mut symbols, &mut heap);
            let mut i = 0i32;
            while i >= 0 {
                let s = symbols[i as usize];
                match s.piece {
                    Some(p) if p < self.n_vocab => out.push(p),
                    _ => {
                        let bytes = &word[s.start as usize..(s.start + s.len) as usize];
                        for &b in bytes {
                            if (0x21..=0x7E).contains(&b) {
                                out.extend(self.ascii_token[b as usize]);
                            }
                        }
                    }
                }
                i = s.next;
            }
        }
        Ok(())
    }

    /// Runs the merges over one word; afterwards `symbols` holds the chain from index 0.
    fn merge_word(&self, word: &[u8], symbols: &mut Vec<Symbol>, heap: &mut MergeQueue) {
        symbols.clear();
        heap.clear();
        let n = word.len();
        symbols.extend(word.iter().enumerate().map(|(i, &b)| Symbol {
            start: i as u32,
            len: 1,
            prev: i as i32 - 1,
            next: if i + 1 == n { -1 } else { i as i32 + 1 },
            piece: self.byte_piece[b as usize],
        }));
        let push = |symbols: &[Symbol], heap: &mut BinaryHeap<_>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (symbols[l as usize], symbols[r as usize]);
            if let (Some(pl), Some(pr)) = (ls.piece, rs.piece) {
                if let Some((rank, _)) = self.ranks.get(pl, pr) {
                    heap.push(Reverse((rank, l as u32, r as u32, ls.len, rs.len)));
                }
            }
        };
        for i in 1..n as i32 {
            push(symbols, heap, i - 1, i);
        }
        while let Some(Reverse((_, l, r, llen, rlen))) = heap.pop() {
            let (l, r) = (l as usize, r as usize);
            // Stale entries: one side has grown or been merged away since it was queued.
            if symbols[l].len != llen || symbols[r].len != rlen {
                continue;
            }
            let (pl, pr) = (symbols[l].piece, symbols[r].piece);
            let merged = pl.zip(pr).and_then(|(a, b)| self.ranks.get(a, b)).map(|(_, m)| m);
            symbols[l].len += symbols[r].len;
            symbols[l].piece = merged;
            symbols[r].len = 0;
            let next = symbols[r].next;
            symbols[l].next = next;
            if next >= 0 {
                symbols[next as usize].prev = l as i32;
            }
            let prev = symbols[l].prev;
            push(symbols, heap, prev, l as i32);
            push(symbols, heap, l as i32, next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_mapping_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
    }
}
