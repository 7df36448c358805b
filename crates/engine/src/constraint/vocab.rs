//! kiln's tokenizer as llguidance sees it: every token's bytes in a trie.
//!
//! llguidance computes token masks by walking a trie of the vocabulary's byte strings, so it needs
//! each token's bytes exactly as kiln's decoder writes them: SentencePiece `▁` as a space,
//! `<0xXX>` as that byte, byte-level BPE characters mapped back to bytes. Control, unknown and
//! unused tokens are marked special (a leading 0xFF byte, llguidance's convention): text never
//! spells them, and grammars reach them only by name. The end-of-generation tokens are the trie's
//! EOS set, so "the grammar may end here" allows every one of them.

use kiln_tokenizer::{TokenKind, Tokenizer};
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// The byte llguidance puts before the name of a special token.
const SPECIAL: u8 = TokTrie::SPECIAL_TOKEN_MARKER;

pub(crate) struct KilnTokEnv {
    trie: TokTrie,
}

impl KilnTokEnv {
    pub(crate) fn new(tok: &Tokenizer) -> anyhow::Result<KilnTokEnv> {
        let n = tok.n_vocab();
        anyhow::ensure!(n > 0 && n < u32::MAX as usize, "a vocabulary of {n} tokens");
        let mut words = Vec::with_capacity(n);
        for id in 0..n as u32 {
            words.push(token_bytes(tok, id)?);
        }
        let eogs: Vec<TokenId> = (0..n as u32).filter(|&t| tok.is_eog(t)).collect();
        // A model without any end-of-generation token still needs an EOS id for the trie; the
        // constraint never lets it through (it ends on its own when the grammar is complete).
        let eos = eogs.first().copied().or(tok.eos()).unwrap_or(0);
        let info = TokRxInfo { tok_bos: tok.bos(), ..TokRxInfo::new(n as u32, eos) };
        let mut trie = TokTrie::from(&info, &words);
        if !eogs.is_empty() {
            trie = trie.with_eos_tokens(&eogs);
        }
        Ok(KilnTokEnv { trie })
    }
}

/// What token `id` writes, as llguidance must see it.
fn token_bytes(tok: &Tokenizer, id: u32) -> anyhow::Result<Vec<u8>> {
    match tok.kind(id) {
        Some(TokenKind::Control | TokenKind::Unknown | TokenKind::Unused) | None => {
            let name = tok.token_text(id).unwrap_or("");
            let mut w = Vec::with_capacity(name.len() + 1);
            w.push(SPECIAL);
            w.extend_from_slice(name.as_bytes());
            Ok(w)
        }
        _ => {
            let piece = tok.token_to_piece(id)?;
            // A lone 0xFF byte never occurs in UTF-8 text and would read as the special marker.
            Ok(if piece.first() == Some(&SPECIAL) { Vec::new() } else { piece })
        }
    }
}

impl TokenizerEnv for KilnTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Only used for forcing tokens, which kiln does not ask for (the tokenization is declared
    /// non-canonical): the trie's greedy split is enough.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}
