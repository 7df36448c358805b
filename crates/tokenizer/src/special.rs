//! Splitting input text around special-token texts before the model tokenizer runs (llama.cpp's
//! `tokenizer_st_partition`).

use crate::vocab::{TokenKind, Vocab};

/// A piece of the input: raw text (a byte range) or a special token found in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// Splits `text` at occurrences of the texts of `specials` (longest first, as given). Control and
/// unknown tokens are only matched when `parse_special`; user-defined tokens always are, as in
/// llama.cpp.
pub(crate) fn partition(vocab: &Vocab, specials: &[u32], text: &str, parse_special: bool) -> Vec<Fragment> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut frags = vec![Fragment::Text(0, text.len())];
    for &id in specials {
        let kind = vocab.kinds[id as usize];
        if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
            continue;
        }
        let needle = &vocab.texts[id as usize];
        if needle.is_empty() || !text.contains(needle) {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for &f in &frags {
            let Fragment::Text(mut start, end) = f else {
                next.push(f);
                continue;
            };
            while let Some(pos) = text[start..end].find(needle) {
                let at = start + pos;
                if at > start {
                    next.push(Fragment::Text(start, at));
                }
                next.push(Fragment::Token(id));
                start = at + needle.len();
            }
            if start < end {
                next.push(Fragment::Text(start, end));
            }
        }
        frags = next;
    }
    frags
}
