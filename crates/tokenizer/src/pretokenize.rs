//! BPE pre-tokenization: splitting text into words with the regex list that `tokenizer.ggml.pre`
//! selects (the same lists llama.cpp uses), applied one after another like llama.cpp's
//! `unicode_regex_split`: each regex splits every current piece into its matches and the text
//! between them.

use fancy_regex::Regex;

use crate::error::{Result, TokenizerError};

// GPT-2's split: contractions, letters, numbers, other symbols (each with an optional leading
// space), then whitespace runs that leave the last space to the next word. Text no alternative
// matches stays a piece of its own, which is what GPT-2's trailing `|\s+` would give.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

const CONTRACTIONS_ANY_CASE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

fn llama3_like(numbers: &str) -> String {
    format!(
        r"{CONTRACTIONS_ANY_CASE}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{numbers}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
}

// Han, CJK and Hangul blocks as DeepSeek's tokenizers write them.
const CJK_HANGUL: &str = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+";

/// How a BPE vocabulary pre-tokenizes and a few flags that go with its `tokenizer.ggml.pre`.
#[derive(Debug, Clone)]
pub(crate) struct PreConfig {
    pub patterns: Vec<String>,
    /// A word that is itself a token is taken whole, without running the merges.
    pub ignore_merges: bool,
    /// Default for `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// Decode removes spaces before punctuation and contractions (llama.cpp `clean_spaces`).
    pub clean_spaces: bool,
    /// The pre-tokenizer disables the BOS token (ChatGLM).
    pub no_bos: bool,
}

impl PreConfig {
    /// The configuration for a `tokenizer.ggml.pre` name (`None`: the key is absent).
    pub fn for_name(pre: Option<&str>) -> PreConfig {
        let s = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let mut c =
            PreConfig { patterns: s(&[GPT2]), ignore_merges: false, add_bos: false, clean_spaces: true, no_bos: false };
        let default = || s(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]);
        let Some(pre) = pre else {
            tracing::warn!("tokenizer.ggml.pre is missing; using the 'default' pre-tokenizer (quality may suffer)");
            c.patterns = default();
            return c;
        };
        match pre {
            "default" => c.patterns = default(),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
                c.patterns = vec![llama3_like(r"\p{N}{1,3}")];
                c.ignore_merges = true;
                c.add_bos = true;
            }
            "dbrx" | "smaug-bpe" => c.patterns = vec![llama3_like(r"\p{N}{1,3}")],
            "chatglm-bpe" | "glm4" => {
                c.patterns = vec![llama3_like(r"\p{N}{1,3}")];
                c.no_bos = true;
            }
            "deepseek-llm" => {
                c.patterns = s(&[
                    "[\r\n]",
                    // Cased letters (upper, lower, title case).
                    r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
                    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
                    r"\s+$",
                    CJK_HANGUL,
                    r"\p{N}+",
                ]);
                c.clean_spaces = false;
            }
            "deepseek-coder" => {
                c.patterns = s(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}"]);
                c.clean_spaces = false;
            }
            "deepseek-v3" => {
                c.patterns = s(&[
                    r"\p{N}{1,3}",
                    r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
                    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
                ]);
                c.clean_spaces = false;
            }
            "falcon" => {
                c.patterns = s(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]);
            }
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" => {
                c.patterns = s(&[r"\p{N}", GPT2]);
            }
            "command-r" | "smollm" => {
                c.patterns = s(&[r"\p{N}", GPT2]);
                c.clean_spaces = false;
            }
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
            | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "exaone4" => {}
            "trillion" | "granite-docling" => c.clean_spaces = false,
            "qwen2" | "deepseek-r1-qwen" | "hunyuan" => {
                c.patterns = vec![llama3_like(r"\p{N}")];
                c.clean_spaces = false;
            }
            "stablelm2" | "megrez" => c.patterns = vec![llama3_like(r"\p{N}")],
            "poro-chat" | "bloom" | "gpt3-finnish" => {
                c.patterns = s(&[r" ?[^(\s|.,!?…。，、।۔،)]+"]);
                c.clean_spaces = pre != "poro-chat";
            }
            "viking" => {
                c.patterns = s(&[r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"]);
                c.clean_spaces = false;
            }
            "tekken" => {
                c.patterns = s(&[
                    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ]);
                c.ignore_merges = true;
                c.add_bos = true;
                c.clean_spaces = false;
            }
            "gpt-4o" | "llama4" => {
                c.patterns = vec![format!(
                    r"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{CONTRACTIONS_ANY_CASE}?|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{CONTRACTIONS_ANY_CASE}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                )];
                c.clean_spaces = false;
            }
            "seed-coder" => {
                c.patterns = vec![format!(
                    r"{CONTRACTIONS_ANY_CASE}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
                )];
                c.clean_spaces = false;
            }
            "grok-2" => {
                c.patterns = vec![llama3_like(r"\p{N}")];
                c.clean_spaces = false;
            }
            other => {
                tracing::warn!("unknown pre-tokenizer {other:?} (tokenizer.ggml.pre); using the GPT-2 split");
            }
        }
        c
    }
}

/// Compiled pre-tokenizer regexes.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(patterns: &[String]) -> Result<PreTokenizer> {
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| TokenizerError::Regex { pattern: p.clone(), message: e.to_string() }))
            .collect::<Result<Vec<_>>>()?;
        Ok(PreTokenizer { regexes })
    }

    /// Splits `text` into words, as byte ranges that cover the text in order.
    pub fn split(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let mut pieces = vec![(0, text.len())];
        if text.is_empty() {
            return Ok(Vec::new());
        }
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for &(start, end) in &pieces {
                let chunk = &text[start..end];
                let mut last = 0;
                for m in re.find_iter(chunk) {
                    let m = m.map_err(|e| TokenizerError::Regex {
                        pattern: re.as_str().to_string(),
                        message: e.to_string(),
                    })?;
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > last {
                        next.push((start + last, start + m.start()));
                    }
                    next.push((start + m.start(), start + m.end()));
                    last = m.end();
                }
                if last < chunk.len() {
                    next.push((start + last, end));
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let c = PreConfig::for_name(Some(pre));
        let p = PreTokenizer::new(&c.patterns).unwrap();
        p.split(text).unwrap().into_iter().map(|(a, b)| text[a..b].to_string()).collect()
    }

    #[test]
    fn every_pattern_compiles() {
        for name in [
            "default",
            "gpt-2",
            "llama-bpe",
            "qwen2",
            "smollm",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "poro-chat",
            "viking",
            "tekken",
            "gpt-4o",
            "seed-coder",
            "no-such-pre",
        ] {
            let c = PreConfig::for_name(Some(name));
            PreTokenizer::new(&c.patterns).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn gpt2_split() {
        assert_eq!(
            words("gpt-2", "Hello, y'all!  How   are\tyou 123?\n"),
            ["Hello", ",", " y", "'", "all", "!", " ", " How", "  ", " are", "\t", "you", " 123", "?", "\n"]
        );
    }

    #[test]
    fn smollm_splits_digits() {
        assert_eq!(words("smollm", "a 2024 b"), ["a", " ", "2", "0", "2", "4", " b"]);
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            words("llama-bpe", "I'M 12345 ok!\n\n  x"),
            ["I", "'M", " ", "123", "45", " ok", "!\n\n", " ", " x"]
        );
    }
}
