//! Tokenizers built from GGUF metadata alone (SentencePiece and byte-level BPE), streaming
//! detokenization, and chat templates.
//!
//! Encoding follows llama.cpp (`llama_tokenize`) exactly: special-token partitioning of the input,
//! then SentencePiece (`tokenizer.ggml.model = "llama"`) or GPT-2 byte-level BPE (`"gpt2"`, with
//! the pre-tokenizer regexes selected by `tokenizer.ggml.pre`).

mod bpe;
mod decode;
mod error;
mod hf_export;
mod pretokenize;
mod special;
mod spm;
pub mod template;
mod vocab;

use std::collections::BTreeSet;

use kiln_gguf::{GgufFile, Value};

pub use decode::StreamDecoder;
pub use error::TokenizerError;
pub use vocab::TokenKind;

use bpe::Bpe;
use error::Result;
use pretokenize::{PreConfig, PreTokenizer};
use special::Fragment;
use vocab::{Meta, SpecialIds, Vocab};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

pub(crate) enum ModelKind {
    Spm,
    Bpe(Box<Bpe>),
}

/// A tokenizer that encodes and decodes exactly like llama.cpp for the same GGUF metadata.
pub struct Tokenizer {
    pub(crate) vocab: Vocab,
    pub(crate) model: ModelKind,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    /// SPM byte fallback.
    byte_tokens: [Option<u32>; 256],
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    pub(crate) add_space_prefix: bool,
    pub(crate) clean_spaces: bool,
    eog: BTreeSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match self.model {
                    ModelKind::Spm => "spm",
                    ModelKind::Bpe(_) => "bpe",
                },
            )
            .field("n_vocab", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        Tokenizer::from_metadata(|k| g.get(k))
    }

    /// Builds the tokenizer from metadata looked up by key (GGUF key names and value types), e.g.
    /// a map of values taken from a file and edited.
    pub fn from_metadata<'a>(get: impl Fn(&str) -> Option<&'a Value>) -> Result<Tokenizer> {
        let meta = Meta { get };
        let model_name = meta.req_str(KEY_MODEL)?;
        let is_spm = match model_name {
            "llama" => true,
            "gpt2" => false,
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };

        let tokens = meta.str_array(KEY_TOKENS)?.ok_or_else(|| TokenizerError::MissingKey(KEY_TOKENS.into()))?;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        let check_len = |key: &str, found: usize| {
            if found < n {
                Err(TokenizerError::LengthMismatch { key: key.to_string(), found, n_vocab: n })
            } else {
                Ok(())
            }
        };
        let scores = match meta.f32_array(KEY_SCORES)? {
            Some(s) => {
                check_len(KEY_SCORES, s.len())?;
                s[..n].to_vec()
            }
            // SentencePiece merging is driven by the scores; BPE does not use them.
            None if is_spm => return Err(TokenizerError::MissingKey(KEY_SCORES.into())),
            None => vec![0.0; n],
        };
        let types = meta.int_array(KEY_TOKEN_TYPE)?;
        let kinds: Vec<TokenKind> = match &types {
            Some(t) => {
                check_len(KEY_TOKEN_TYPE, t.len())?;
                t[..n].iter().map(|&t| TokenKind::from_gguf(t)).collect()
            }
            None if is_spm => vec![TokenKind::Normal; n],
            // Without token types, BPE vocabularies mark their specials only by the <|…|> form.
            None => tokens
                .iter()
                .map(|t| {
                    if t.len() > 4 && t.starts_with("<|") && t.ends_with("|>") {
                        TokenKind::Control
                    } else {
                        TokenKind::Normal
                    }
                })
                .collect(),
        };
        let mut vocab = Vocab::new(tokens.iter().map(|s| s.as_ref()), scores, kinds)?;

        let mut ids = SpecialIds::default();
        let (model, mut add_bos, mut add_space_prefix, clean_spaces) = if is_spm {
            ids.bos = Some(1);
            ids.eos = Some(2);
            ids.unk = Some(0);
            (ModelKind::Spm, true, true, false)
        } else {
            let merges = meta.str_array(KEY_MERGES)?.ok_or_else(|| TokenizerError::MissingKey(KEY_MERGES.into()))?;
            let pre = PreConfig::for_name(meta.str(KEY_PRE)?);
            let pretok = PreTokenizer::new(&pre.patterns)?;
            let bpe = Bpe::new(&vocab, &merges, pretok, pre.ignore_merges);
            ids.bos = if pre.no_bos { None } else { Some(11) };
            ids.eos = Some(11);
            (ModelKind::Bpe(Box::new(bpe)), pre.add_bos, false, pre.clean_spaces)
        };
        if let Some(v) = meta.bool(KEY_ADD_SPACE_PREFIX)? {
            add_space_prefix = v;
        }

        // Defaults that do not fit the vocabulary are dropped; metadata ids override them.
        for id in [&mut ids.bos, &mut ids.eos, &mut ids.unk] {
            if id.is_some_and(|i| i as usize >= n) {
                *id = None;
            }
        }
        type Slot = fn(&mut SpecialIds) -> &mut Option<u32>;
        let slots: [(&str, Slot); 14] = [
            (KEY_BOS, |s| &mut s.bos),
            (KEY_EOS, |s| &mut s.eos),
            ("tokenizer.ggml.eot_token_id", |s| &mut s.eot),
            ("tokenizer.ggml.eom_token_id", |s| &mut s.eom),
            ("tokenizer.ggml.unknown_token_id", |s| &mut s.unk),
            ("tokenizer.ggml.fim_pre_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", |s| &mut s.fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", |s| &mut s.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", |s| &mut s.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", |s| &mut s.fim_sep),
            // Deprecated spellings of the FIM keys.
            ("tokenizer.ggml.prefix_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.suffix_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.middle_token_id", |s| &mut s.fim_mid),
        ];
        for (key, slot) in slots {
            if let Some(v) = meta.u64(key)? {
                if v < n as u64 {
                    *slot(&mut ids) = Some(v as u32);
                } else {
                    tracing::warn!("{key} = {v} is outside the vocabulary ({n} tokens); ignoring it");
                }
            }
        }

        if let Some(v) = meta.bool(KEY_ADD_BOS)? {
            add_bos = v;
        }
        let add_eos = meta.bool(KEY_ADD_EOS)?.unwrap_or(false);
        if add_bos && ids.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { flag_key: KEY_ADD_BOS, id_key: KEY_BOS });
        }
        if add_eos && ids.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { flag_key: KEY_ADD_EOS, id_key: KEY_EOS });
        }

        let eog = vocab.finish_specials(&mut ids);
        let specials = vocab.special_cache();
        let byte_tokens = if is_spm { spm::byte_tokens(&vocab, ids.unk) } else { [None; 256] };
        Ok(Tokenizer {
            vocab,
            model,
            specials,
            byte_tokens,
            bos: ids.bos,
            eos: ids.eos,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            eog,
        })
    }

    /// Text to token ids. `add_special`: add BOS/EOS as the model asks (`add_bos` / `add_eos`).
    /// `parse_special`: texts of control tokens in the input become those tokens (user-defined
    /// tokens always do, as in llama.cpp); otherwise they are tokenized as plain text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let frags = special::partition(&self.vocab, &self.specials, text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            ModelKind::Spm => {
                // The first text fragment, and any text right after a special token, gets the
                // SentencePiece space prefix.
                let mut after_special = true;
                let mut buf = String::new();
                for f in frags {
                    match f {
                        Fragment::Text(a, b) => {
                            buf.clear();
                            if self.add_space_prefix && after_special {
                                buf.push('\u{2581}');
                            }
                            for c in text[a..b].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::tokenize(&self.vocab, &self.byte_tokens, &buf, &mut out)?;
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            ModelKind::Bpe(bpe) => {
                for f in frags {
                    match f {
                        Fragment::Text(a, b) => bpe.tokenize(&self.vocab, &text[a..b], &mut out)?,
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// The words a byte-level BPE vocabulary's pre-tokenizer (`tokenizer.ggml.pre`) splits `text`
    /// into, in order, before merging within each; SentencePiece has no pre-tokenizer, so its one
    /// word is the whole text. Special-token texts are not looked for. For inspecting the split.
    pub fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        match &self.model {
            ModelKind::Bpe(bpe) => bpe.words(text).into_iter().map(|(a, b)| &text[a..b]).collect(),
            ModelKind::Spm if text.is_empty() => Vec::new(),
            ModelKind::Spm => vec![text],
        }
    }

    /// Ids to text, like llama.cpp's `llama_detokenize` (special tokens render as nothing; the
    /// SentencePiece space prefix of the first token is dropped). Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// The bytes a token stands for: SPM `▁` as space and `<0xXX>` as that byte, byte-level BPE
    /// characters mapped back to bytes, user-defined tokens as their text, control and unknown
    /// tokens as nothing.
    pub fn token_to_piece(&self, id: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_piece(id, false, &mut out)?;
        Ok(out)
    }

    /// A streaming detokenizer over this vocabulary.
    pub fn decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` ends generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp
    /// recognises by text (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, `<end_of_turn>`, …).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.vocab.kinds.get(id as usize).copied()
    }

    /// Whether `encode(…, add_special = true, …)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(…, add_special = true, …)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
}
