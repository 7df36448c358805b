//! The tokenizer as a Hugging Face `tokenizer.json`, made from the GGUF metadata alone, for
//! front ends that tokenize requests themselves (NVIDIA Dynamo's, vLLM's) and must produce the
//! ids kiln would.
//!
//! - Byte-level BPE (`gpt2`): the vocabulary and merges as they are; `tokenizer.ggml.pre`'s regex
//!   list becomes one `Split` (isolated matches, the text between them kept) per regex, which is
//!   how llama.cpp applies the list, then the byte-to-character mapping; `ignore_merges` as the
//!   pre-tokenizer says.
//! - SentencePiece (`llama`): a BPE model with byte fallback whose merges are every split of
//!   every token into two tokens, ranked by the merged token's score (highest first, as
//!   llama.cpp's SentencePiece merges the best-scoring pair first); spaces become `▁` and, where
//!   the model adds a space prefix, each text segment starts with one (llama.cpp adds it at the
//!   start and after every special token).
//! - Decoding removes spaces before punctuation and contractions where llama.cpp does
//!   (`clean_spaces`, e.g. GPT-2's pre-tokenizer), as `Replace` steps after the byte mapping.
//! - Control, user-defined and unknown tokens are added tokens, matched whole in the input (as
//!   kiln encodes with special tokens parsed); BOS/EOS are added as `tokenizer.ggml.add_*_token`
//!   say.

use serde_json::{json, Map, Value as Json};

use crate::error::{Result, TokenizerError};
use crate::pretokenize::PreConfig;
use crate::vocab::Meta;
use crate::{ModelKind, TokenKind, Tokenizer, KEY_MERGES, KEY_PRE};

impl Tokenizer {
    /// `tokenizer.json` for this tokenizer; `get` looks up the same metadata it was built from
    /// (for the BPE merges, which the tokenizer keeps only as a table).
    pub fn to_hf_json<'a>(&self, get: impl Fn(&str) -> Option<&'a kiln_gguf::Value>) -> Result<Json> {
        let meta = Meta { get };
        let n = self.vocab.len();
        let text = |id: usize| self.vocab.texts.get(id).unwrap_or_default().to_string();
        let added: Vec<Json> = (0..n)
            .filter(|&id| {
                matches!(self.vocab.kinds[id], TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)
            })
            .map(|id| {
                json!({
                    "id": id, "content": text(id), "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": self.vocab.kinds[id] != TokenKind::UserDefined,
                })
            })
            .collect();
        let mut vocab = Map::with_capacity(n);
        for id in 0..n {
            // Duplicate texts (a few vocabularies have them): the first id wins, as in kiln.
            vocab.entry(text(id)).or_insert(json!(id));
        }
        let (model, normalizer, pre_tokenizer, decoder) = match &self.model {
            ModelKind::Bpe(_) => {
                let merges =
                    meta.str_array(KEY_MERGES)?.ok_or_else(|| TokenizerError::MissingKey(KEY_MERGES.into()))?;
                let pre = PreConfig::for_name(meta.str(KEY_PRE)?);
                let mut steps: Vec<Json> = pre
                    .patterns
                    .iter()
                    .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
                    .collect();
                steps.push(
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
                );
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": pre.ignore_merges, "vocab": vocab, "merges": merges,
                });
                let byte_level =
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
                let decoder = if self.clean_spaces {
                    // llama.cpp's `clean_spaces` passes, in its order, on the decoded text: no space
                    // before ? ! . , ; " ' " becomes "'"; no space before 's 'm 're 've.
                    let replace = |pattern: Json, content: &str| json!({"type": "Replace", "pattern": pattern, "content": content});
                    json!({"type": "Sequence", "decoders": [
                        byte_level,
                        replace(json!({"Regex": " (?=[?!.,])"}), ""),
                        replace(json!({"String": " ' "}), "'"),
                        replace(json!({"Regex": " (?='(?:[sm]|re|ve))"}), ""),
                    ]})
                } else {
                    byte_level
                };
                (model, Json::Null, json!({"type": "Sequence", "pretokenizers": steps}), decoder)
            }
            ModelKind::Spm => {
                let mut normalizers = Vec::new();
                if self.add_space_prefix {
                    normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if self.add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let unk = self.vocab.kinds.iter().position(|&k| k == TokenKind::Unknown).map(text);
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": self.spm_merges(),
                });
                (
                    model,
                    json!({"type": "Sequence", "normalizers": normalizers}),
                    Json::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                )
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(&text),
            "decoder": decoder,
            "model": model,
        }))
    }

    /// SentencePiece merges: for every normal token, each split into two tokens, best merged score
    /// first (ties: the lower id of the merged token, then the longer left piece).
    fn spm_merges(&self) -> Vec<Json> {
        let n = self.vocab.len();
        let mut merges: Vec<(f32, usize, usize, String, String)> = Vec::new();
        for id in 0..n {
            if !matches!(self.vocab.kinds[id], TokenKind::Normal) {
                continue;
            }
            let Some(t) = self.vocab.texts.get(id) else { continue };
            for (cut, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(cut);
                let usable = |s: &str| {
                    self.vocab.id(s).is_some_and(|i| matches!(self.vocab.kinds[i as usize], TokenKind::Normal))
                };
                if usable(l) && usable(r) {
                    merges.push((self.vocab.scores[id], id, usize::MAX - cut, l.to_string(), r.to_string()));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect()
    }

    fn post_processor(&self, text: &dyn Fn(usize) -> String) -> Json {
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = self.eos.filter(|_| self.add_eos);
        if bos.is_none() && eos.is_none() {
            return Json::Null;
        }
        let special = |id: u32| json!({"SpecialToken": {"id": text(id as usize), "type_id": 0}});
        let mut single = Vec::new();
        let mut tokens = Map::new();
        for (id, at_start) in [(bos, true), (eos, false)] {
            if let Some(id) = id {
                let t = text(id as usize);
                tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
                if at_start {
                    single.push(special(id));
                }
            }
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        single.extend(eos.map(special));
        let mut pair = single.clone();
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
    }
}
