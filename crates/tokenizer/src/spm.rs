//! SentencePiece BPE as llama.cpp runs it (`llm_tokenizer_spm`): start from single characters and
//! repeatedly merge the adjacent pair whose concatenation is the vocabulary token with the highest
//! score; pieces that are not tokens fall back to byte tokens `<0xXX>`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::error::{Result, TokenizerError};
use crate::vocab::Vocab;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
}

#[derive(Debug)]
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Higher score first; among equal scores the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then_with(|| o.left.cmp(&self.left))
    }
}

/// Byte-fallback tokens: `<0xXX>`, else the one-byte text itself, else the unknown token.
pub(crate) fn byte_tokens(vocab: &Vocab, unk: Option<u32>) -> [Option<u32>; 256] {
    let mut t = [None; 256];
    for (b, slot) in t.iter_mut().enumerate() {
        *slot = vocab
            .id(&format!("<0x{b:02X}>"))
            .or_else(|| if b < 128 { vocab.id(&(b as u8 as char).to_string()) } else { None })
            .or(unk);
    }
    t
}

/// Tokenizes `text` (spaces already escaped to `▁`) and appends the ids to `out`.
pub(crate) fn tokenize(vocab: &Vocab, byte_tokens: &[Option<u32>; 256], text: &str, out: &mut Vec<u32>) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        symbols.push(Symbol { start: start as u32, len: c.len_utf8() as u32, prev: i as i32 - 1, next: i as i32 + 1 });
    }
    if let Some(last) = symbols.last_mut() {
        last.next = -1;
    }

    let mut heap = BinaryHeap::new();
    let try_add = |symbols: &[Symbol], heap: &mut BinaryHeap<Bigram>, l: i32, r: i32| {
        if l < 0 || r < 0 {
            return;
        }
        let (ls, rs) = (symbols[l as usize], symbols[r as usize]);
        let piece = &text[ls.start as usize..(rs.start + rs.len) as usize];
        if let Some(id) = vocab.id(piece) {
            heap.push(Bigram {
                score: vocab.scores[id as usize],
                left: l as u32,
                right: r as u32,
                size: piece.len() as u32,
            });
        }
    };
    for i in 1..symbols.len() as i32 {
        try_add(&symbols, &mut heap, i - 1, i);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (bg.left as usize, bg.right as usize);
        let (ll, rl) = (symbols[l].len, symbols[r].len);
        // Stale: one side already merged into something else.
        if ll == 0 || rl == 0 || ll + rl != bg.size {
            continue;
        }
        symbols[l].len += rl;
        symbols[r].len = 0;
        let next = symbols[r].next;
        symbols[l].next = next;
        if next >= 0 {
            symbols[next as usize].prev = l as i32;
        }
        let prev = symbols[l].prev;
        try_add(&symbols, &mut heap, prev, l as i32);
        try_add(&symbols, &mut heap, l as i32, next);
    }

    let mut i = 0i32;
    while i >= 0 {
        let s = symbols[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    out.push(byte_tokens[b as usize].ok_or(TokenizerError::NoByteToken(b))?);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}
