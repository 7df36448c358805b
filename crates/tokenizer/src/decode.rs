//! Ids back to text: token pieces, whole-sequence detokenization (llama.cpp `llama_detokenize`
//! with `remove_special = false, unparse_special = false`) and streaming.

use crate::bpe;
use crate::error::{Result, TokenizerError};
use crate::vocab::TokenKind;
use crate::{ModelKind, Tokenizer};

impl Tokenizer {
    fn check_id(&self, id: u32) -> Result<usize> {
        if (id as usize) < self.vocab.len() {
            Ok(id as usize)
        } else {
            Err(TokenizerError::IdOutOfRange { id, n_vocab: self.vocab.len() })
        }
    }

    /// Appends the bytes of token `id` to `out`; with `lstrip`, a leading space is dropped.
    pub(crate) fn write_piece(&self, id: u32, lstrip: bool, out: &mut Vec<u8>) -> Result<()> {
        let i = self.check_id(id)?;
        let text = &self.vocab.texts[i];
        let start = out.len();
        match self.vocab.kinds[i] {
            TokenKind::Control | TokenKind::Unknown | TokenKind::Unused => return Ok(()),
            TokenKind::UserDefined => out.extend_from_slice(text.as_bytes()),
            TokenKind::Normal => match self.model {
                ModelKind::Spm => out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
                ModelKind::Bpe(_) => bpe::byte_decode(text, out),
            },
            TokenKind::Byte => out.push(parse_byte_token(text).unwrap_or(0)),
        }
        if lstrip && out.get(start) == Some(&b' ') {
            out.remove(start);
        }
        Ok(())
    }

    pub(crate) fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            self.write_piece(id, n == 0 && self.add_space_prefix, &mut out)?;
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        Ok(out)
    }
}

/// The byte of a `<0xXX>` token.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's `clean_spaces` post-processing of decoded text (Hugging Face
/// `clean_up_tokenization_spaces`): " ?" " !" " ." " ," lose the space, a lone apostrophe between
/// spaces loses both spaces, and " 's" " 'm" " 're" " 've" lose the space.
pub(crate) fn clean_up_spaces(t: &mut Vec<u8>) {
    if t.is_empty() {
        return;
    }
    // 1: a space before ? ! . ,
    let mut out = Vec::with_capacity(t.len());
    for i in 0..t.len() {
        let drop_space = t[i] == b' ' && matches!(t.get(i + 1), Some(b'?' | b'!' | b'.' | b','));
        if !drop_space {
            out.push(t[i]);
        }
    }
    *t = out;

    // 2: " ' " becomes "'"
    let mut out = Vec::with_capacity(t.len());
    let mut i = 0;
    let mut prev_was_eaten = false;
    while i < t.len() {
        let x = t[i];
        let prev_space = i > 0 && t[i - 1] == b' ' && !prev_was_eaten;
        prev_was_eaten = false;
        if i > 0 && x == b'\'' && i + 1 < t.len() && prev_space && t[i + 1] == b' ' {
            out.pop();
            out.push(x);
            i += 2;
            prev_was_eaten = true;
            continue;
        }
        out.push(x);
        i += 1;
    }
    *t = out;

    // 3: contractions after a space
    let mut out = Vec::with_capacity(t.len());
    for i in 0..t.len() {
        let x = t[i];
        if i > 0 && t[i - 1] == b' ' && x == b'\'' && i + 1 < t.len() {
            let x1 = t[i + 1];
            let x2 = t.get(i + 2).copied();
            let drop = matches!(x1, b's' | b'm') || matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e')));
            if drop {
                out.pop();
            }
        }
        out.push(x);
    }
    *t = out;
}

/// Incremental detokenization: feed ids one at a time, get back only complete UTF-8.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
    first: bool,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tok: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder { tok, pending: Vec::new(), first: true }
    }

    /// Adds token `id`; returns the text that is now complete (possibly empty). Byte sequences
    /// that can never become valid UTF-8 come out as U+FFFD.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let lstrip = self.first && self.tok.add_space_prefix;
        self.tok.write_piece(id, lstrip, &mut self.pending)?;
        self.first = false;
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, tail) = rest.split_at(e.valid_up_to());
                    // The prefix was just validated.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &tail[n..];
                        }
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
        Ok(out)
    }

    /// Flushes what is left (an incomplete UTF-8 sequence comes out as U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_up_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_spaces_like_llama_cpp() {
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("a ' b"), "a'b");
        assert_eq!(clean("it 's we 're I 'm they 've"), "it's we're I'm they've");
        assert_eq!(clean("don 't we 'll"), "don 't we 'll");
        assert_eq!(clean(" ' ' "), "'' ");
    }
}
