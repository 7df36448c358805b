//! The vocabulary: token texts, scores and kinds, read from GGUF metadata, plus the special-token
//! bookkeeping llama.cpp does at load time (EOG set, kind overrides by token text).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use kiln_gguf::Value;

use crate::error::{Result, TokenizerError};

/// The kind of a token, from `tokenizer.ggml.token_type` (1..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    /// The GGUF token type number; 0 and anything unknown ("undefined" in llama.cpp) behave like
    /// unused tokens: never produced by text, rendered as nothing.
    pub fn from_gguf(t: i64) -> TokenKind {
        match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            6 => TokenKind::Byte,
            _ => TokenKind::Unused,
        }
    }
}

/// Typed access to metadata values by key, with errors that name the key.
pub(crate) struct Meta<'a, F: Fn(&str) -> Option<&'a Value>> {
    pub get: F,
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("array of {}", a.elem_type.name()),
        _ => v.value_type().name().to_string(),
    }
}

impl<'a, F: Fn(&str) -> Option<&'a Value>> Meta<'a, F> {
    fn wrong(key: &str, expected: &'static str, v: &Value) -> TokenizerError {
        TokenizerError::WrongType { key: key.to_string(), expected, found: type_name(v) }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| Self::wrong(key, "string", v)),
        }
    }

    pub fn req_str(&self, key: &str) -> Result<&'a str> {
        self.str(key)?.ok_or_else(|| TokenizerError::MissingKey(key.to_string()))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| Self::wrong(key, "bool", v)),
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| Self::wrong(key, "unsigned integer", v)),
        }
    }

    fn array(&self, key: &str, expected: &'static str) -> Result<Option<&'a [Value]>> {
        match (self.get)(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(|a| Some(a.items.as_slice())).ok_or_else(|| Self::wrong(key, expected, v)),
        }
    }

    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key, "array of string")? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| Self::wrong(key, "array of string", v)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of numbers (f32 or integers, as llama.cpp accepts for scores).
    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key, "array of f32")? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                _ => v.as_i64().map(|x| x as f32).ok_or_else(|| Self::wrong(key, "array of f32", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key, "array of i32")? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| v.as_i64().ok_or_else(|| Self::wrong(key, "array of i32", v)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The token texts end to end in one buffer: a `String` per token would cost an allocation (and
/// its allocator overhead) each, megabytes for a 50k vocabulary.
pub(crate) struct TokenTexts {
    buf: String,
    /// End of token `i`'s text in `buf` (it starts where token `i - 1`'s ends).
    ends: Vec<u32>,
}

impl TokenTexts {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.buf[start..end])
    }
}

impl std::ops::Index<usize> for TokenTexts {
    type Output = str;
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(t) => t,
            None => panic!("token id {i} out of range ({} tokens)", self.len()),
        }
    }
}

/// Token texts, scores and kinds, and the reverse map.
pub(crate) struct Vocab {
    pub texts: TokenTexts,
    pub scores: Vec<f32>,
    pub kinds: Vec<TokenKind>,
    /// The reverse map, without a copy of the texts.
    index: TextIndex,
}

/// Ids grouped by the top bits of a fixed 64-bit hash of their text, about one id a group: 8 bytes
/// a token where a hash map from hash to id took 22 (SmolLM2: 0.45 MB instead of 1.1 MB). A lookup
/// compares the text with its group's few ids.
struct TextIndex {
    /// `64 - log2(groups)`: a hash's group is `hash >> shift`.
    shift: u32,
    /// Ids of group `g`: `ids[starts[g] .. starts[g + 1]]`, ascending.
    starts: Vec<u32>,
    ids: Vec<u32>,
}

impl TextIndex {
    fn new(texts: &TokenTexts) -> TextIndex {
        let n = texts.len();
        let bits = n.next_power_of_two().trailing_zeros().max(1);
        let shift = 64 - bits;
        let group_of: Vec<u32> = (0..n).map(|id| (text_hash(&texts[id]) >> shift) as u32).collect();
        // Counting sort of the ids by group: each id at its group's cursor (ascending ids within
        // a group).
        let starts = group_starts(group_of.iter().map(|&g| g as usize), 1 << bits);
        let mut cursor = starts.clone();
        let mut ids = vec![0u32; n];
        for (id, &g) in group_of.iter().enumerate() {
            ids[cursor[g as usize] as usize] = id as u32;
            cursor[g as usize] += 1;
        }
        TextIndex { shift, starts, ids }
    }

    /// The ids of `text`'s group (a superset of the ids with that text), ascending.
    fn group(&self, text: &str) -> &[u32] {
        let g = (text_hash(text) >> self.shift) as usize;
        &self.ids[self.starts[g] as usize..self.starts[g + 1] as usize]
    }
}

/// Where each of `n_groups` groups starts in an array sorted by group (group `g` is
/// `starts[g] .. starts[g + 1]`), from the group of every element: counts, then running sums.
pub(crate) fn group_starts(groups: impl Iterator<Item = usize>, n_groups: usize) -> Vec<u32> {
    let mut starts = vec![0u32; n_groups + 1];
    for g in groups {
        starts[g + 1] += 1;
    }
    for g in 0..n_groups {
        starts[g + 1] += starts[g];
    }
    starts
}

/// The hash of a token text (SipHash with fixed keys: the same in every run).
fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl Vocab {
    /// Fails only for texts of more than 4 GiB in all (offsets are 32-bit).
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>, scores: Vec<f32>, kinds: Vec<TokenKind>) -> Result<Vocab> {
        let texts = texts.into_iter();
        let mut buf = String::new();
        let mut ends = Vec::with_capacity(texts.size_hint().0);
        for (i, t) in texts.enumerate() {
            if t.is_empty() {
                tracing::warn!("empty token at index {i}");
                buf.push_str(&format!("[EMPTY_{i}]"));
            } else {
                buf.push_str(t);
            }
            ends.push(u32::try_from(buf.len()).map_err(|_| TokenizerError::VocabTooLarge { bytes: buf.len() })?);
        }
        buf.shrink_to_fit();
        ends.shrink_to_fit();
        let texts = TokenTexts { buf, ends };
        let index = TextIndex::new(&texts);
        for group in index.starts.windows(2).map(|w| &index.ids[w[0] as usize..w[1] as usize]) {
            for (i, &prev) in group.iter().enumerate() {
                if let Some(&id) = group[i + 1..].iter().find(|&&id| texts[id as usize] == texts[prev as usize]) {
                    let text = &texts[id as usize];
                    tracing::warn!("duplicate token {text:?} with ids {prev} and {id}; using {id}");
                }
            }
        }
        Ok(Vocab { texts, scores, kinds, index })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        // The highest id with that text (llama.cpp's map keeps the last duplicate).
        self.index.group(text).iter().rev().copied().find(|&id| &self.texts[id as usize] == text)
    }
}

// Texts that llama.cpp recognises as special tokens when the metadata does not say.
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_NAMES: &[&str] = &["<|eom_id|>"];
const FIM_PRE_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_NAMES: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_NAMES: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_NAMES: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Special token ids as far as the metadata (or the model defaults) give them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

impl Vocab {
    /// The first token (lowest id) whose text is one of `names`, made a control token.
    fn detect(&mut self, names: &[&str]) -> Option<u32> {
        let id = names.iter().filter_map(|n| self.id(n)).min()?;
        self.force_control(id);
        Some(id)
    }

    fn force_control(&mut self, id: u32) {
        let k = &mut self.kinds[id as usize];
        if *k != TokenKind::Control {
            tracing::debug!(
                "control-looking token {id} {:?} was {k:?}; treating it as a control token",
                &self.texts[id as usize]
            );
            *k = TokenKind::Control;
        }
    }

    /// llama.cpp's load-time fix-ups: detect EOT/EOM/FIM tokens by text when the metadata does
    /// not name them (making them control tokens), and build the end-of-generation set.
    pub fn finish_specials(&mut self, ids: &mut SpecialIds) -> BTreeSet<u32> {
        if ids.eot.is_none() {
            ids.eot = self.detect(EOT_NAMES);
        }
        if ids.eom.is_none() {
            ids.eom = self.detect(EOM_NAMES);
        }
        if ids.fim_pre.is_none() {
            ids.fim_pre = self.detect(FIM_PRE_NAMES);
        }
        if ids.fim_suf.is_none() {
            ids.fim_suf = self.detect(FIM_SUF_NAMES);
        }
        if ids.fim_mid.is_none() {
            ids.fim_mid = self.detect(FIM_MID_NAMES);
        }
        if ids.fim_pad.is_none() {
            ids.fim_pad = self.detect(FIM_PAD_NAMES);
        }
        if ids.fim_rep.is_none() {
            ids.fim_rep = self.detect(FIM_REP_NAMES);
        }
        if ids.fim_sep.is_none() {
            ids.fim_sep = self.detect(FIM_SEP_NAMES);
        }

        let mut eog = BTreeSet::new();
        eog.extend(ids.fim_pad);
        eog.extend(ids.fim_rep);
        eog.extend(ids.fim_sep);
        for name in EOG_NAMES {
            if let Some(id) = self.id(name) {
                eog.insert(id);
                self.force_control(id);
            }
        }
        for name in ALWAYS_RENDERED {
            if let Some(id) = self.id(name) {
                self.kinds[id as usize] = TokenKind::UserDefined;
            }
        }
        eog.extend(ids.eos);
        eog.extend(ids.eot);
        eog.extend(ids.eom);

        // Harmony-style vocabularies: "<|end|>" ends a message, not the generation.
        let has = |eog: &BTreeSet<u32>, name: &str| self.id(name).is_some_and(|id| eog.contains(&id));
        let (ret, call, calls, flush, tool_response) = (
            has(&eog, "<|return|>"),
            has(&eog, "<|call|>"),
            has(&eog, "<|calls|>"),
            has(&eog, "<|flush|>"),
            has(&eog, "<|tool_response>"),
        );
        if let Some(end) = self.id("<|end|>").filter(|id| eog.contains(id)) {
            if (call || calls) && (ret || flush) {
                eog.remove(&end);
                self.kinds[end as usize] = TokenKind::UserDefined;
            }
        }
        // Gemma-4 style: "</s>" is an ordinary token there.
        if tool_response {
            if let Some(s) = self.id("</s>").filter(|id| eog.contains(id)) {
                eog.remove(&s);
                self.kinds[s as usize] = TokenKind::Normal;
            }
        }
        eog
    }

    /// Tokens matched as whole strings before the model tokenizer runs (control, user-defined and
    /// unknown tokens), longest text first.
    pub fn special_cache(&self) -> Vec<u32> {
        let mut v: Vec<u32> = (0..self.len() as u32)
            .filter(|&id| {
                matches!(self.kinds[id as usize], TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)
            })
            .collect();
        v.sort_by_key(|&id| std::cmp::Reverse(self.texts[id as usize].len()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_reverse_map() {
        let texts = ["a", "bc", "", "bc", "é", "<|im_end|>"];
        let v = Vocab::new(texts, vec![0.0; 6], vec![TokenKind::Normal; 6]).expect("vocab");
        assert_eq!(v.len(), 6);
        assert_eq!(&v.texts[1], "bc");
        assert_eq!(&v.texts[2], "[EMPTY_2]");
        assert_eq!(v.texts.get(4), Some("é"));
        assert_eq!(v.texts.get(6), None);
        // every distinct text maps back to its id; a duplicate to the later one
        assert_eq!(v.id("a"), Some(0));
        assert_eq!(v.id("bc"), Some(3));
        assert_eq!(v.id("[EMPTY_2]"), Some(2));
        assert_eq!(v.id("é"), Some(4));
        assert_eq!(v.id("<|im_end|>"), Some(5));
        assert_eq!(v.id(""), None);
        assert_eq!(v.id("b"), None);
    }
}
