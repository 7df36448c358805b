//! BPE pre-tokenization: splitting text into words with the regex list that `tokenizer.ggml.pre`
//! selects (the same lists llama.cpp uses), applied one after another like llama.cpp's
//! `unicode_regex_split`: each regex splits every current piece into its matches and the text
//! between them.
//!
//! The patterns are written as llama.cpp writes them, but run on `regex-automata`'s linear-time
//! engines rather than a backtracking one: a backtracking engine keeps a saved state per repetition
//! of `\p{L}+` and the like, so a run of ~1,000,000 letters, digits or spaces failed ("Max stack
//! size exceeded for backtracking") or took quadratic time. Those engines have no look-around, and
//! the patterns use two kinds: GPT-2's `\s+(?!\S)` alternative, which [`SplitRegex`] evaluates
//! exactly from the whitespace run it stands on, and `((?=[\p{L}])([^a-z]))`, a letter that is not
//! `a`-`z`, which is the class intersection `[\p{L}&&[^a-z]]` ([`LOOKAHEAD_CLASSES`]). The matches
//! are those a backtracking engine reports (the leftmost start, there the first alternative that
//! matches, repetitions greedy): `regex-automata`'s leftmost-first semantics are defined as exactly
//! that, and a unit test checks them against `fancy-regex` on random text.

use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

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

/// Look-aheads in llama.cpp's patterns that only restrict the next character's class, and the
/// class intersection that matches the same single character without look-around.
const LOOKAHEAD_CLASSES: [(&str, &str); 2] =
    [(r"((?=[\p{L}])([^a-z]))", r"[\p{L}&&[^a-z]]"), (r"((?=[\p{L}])([^A-Z]))", r"[\p{L}&&[^A-Z]]")];

/// GPT-2's whitespace alternative: a run of whitespace not followed by a non-space, i.e. the whole
/// run at the end of the text, else the run without its last character (which goes with the next
/// word), else (a run of one before a non-space) no match here.
const WS_NOT_BEFORE_NONSPACE: &str = r"\s+(?!\S)";

/// The top-level alternatives of `pattern`: split at each `|` outside groups and classes.
fn alternatives(pattern: &str) -> Vec<&str> {
    let b = pattern.as_bytes();
    let (mut groups, mut classes, mut start, mut i) = (0usize, 0usize, 0usize, 0usize);
    let mut out = Vec::new();
    while i < b.len() {
        match b[i] {
            // The escaped character is skipped (a multi-byte one only has bytes ≥ 0x80 after it).
            b'\\' => i += 1,
            b'[' => {
                classes += 1;
                // `]` first in a class (after an optional `^`) is a literal.
                if b.get(i + 1) == Some(&b'^') {
                    i += 1;
                }
                if b.get(i + 1) == Some(&b']') {
                    i += 1;
                }
            }
            b']' if classes > 0 => classes -= 1,
            b'(' if classes == 0 => groups += 1,
            b')' if classes == 0 => groups = groups.saturating_sub(1),
            b'|' if classes == 0 && groups == 0 => {
                out.push(&pattern[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&pattern[start..]);
    out
}

/// `\s+(?!\S)` among a pattern's alternatives, evaluated without look-around.
#[derive(Debug)]
struct WsAlternative {
    /// `\s+`, anchored where a match starts: the whitespace run there.
    run: Regex,
    /// The alternatives before and after it, each tried anchored where a match starts.
    before: Option<Regex>,
    after: Option<Regex>,
}

/// One pre-tokenizer pattern, matching exactly as a backtracking engine would.
#[derive(Debug)]
struct SplitRegex {
    /// Every alternative, with `\s+(?!\S)` as `\s+`: where the pattern matches, this matches at the
    /// same place with the same span unless it chose the `\s+` stand-in ([`SplitRegex::find`]).
    all: Regex,
    ws: Option<WsAlternative>,
}

fn anchored(hay: &str, at: usize) -> Input<'_> {
    Input::new(hay).range(at..).anchored(Anchored::Yes)
}

/// The byte length of the character starting at `at` (1 at the end, to make progress).
fn char_len_at(hay: &str, at: usize) -> usize {
    hay[at..].chars().next().map_or(1, char::len_utf8)
}

impl SplitRegex {
    fn new(pattern: &str) -> Result<SplitRegex> {
        let err = |message: String| TokenizerError::Regex { pattern: pattern.to_string(), message };
        let compile = |p: &str| Regex::new(p).map_err(|e| err(e.to_string()));
        let mut rewritten = pattern.to_string();
        for (from, to) in LOOKAHEAD_CLASSES {
            rewritten = rewritten.replace(from, to);
        }
        let alts = alternatives(&rewritten);
        let ws_at: Vec<usize> = (0..alts.len()).filter(|&i| alts[i] == WS_NOT_BEFORE_NONSPACE).collect();
        let ws = match ws_at[..] {
            [] => None,
            [k] => {
                let join = |a: &[&str]| if a.is_empty() { Ok(None) } else { compile(&a.join("|")).map(Some) };
                Some((
                    k,
                    WsAlternative { run: compile(r"\s+")?, before: join(&alts[..k])?, after: join(&alts[k + 1..])? },
                ))
            }
            _ => return Err(err(format!("{WS_NOT_BEFORE_NONSPACE} may be only one alternative"))),
        };
        let all = match &ws {
            None => compile(&rewritten)?,
            Some((k, _)) => {
                let mut a = alts.clone();
                a[*k] = r"\s+";
                compile(&a.join("|"))?
            }
        };
        Ok(SplitRegex { all, ws: ws.map(|(_, w)| w) })
    }

    /// The first non-empty match in `hay` that starts at or after `from`, as a byte range.
    fn find(&self, hay: &str, mut from: usize) -> Option<(usize, usize)> {
        loop {
            let m = self.all.search(&Input::new(hay).range(from..))?;
            let (s, e) = (m.start(), m.end());
            if s == e {
                // No pattern here matches empty text, but an empty match must not stop the split.
                if s >= hay.len() {
                    return None;
                }
                from = s + char_len_at(hay, s);
                continue;
            }
            let Some(ws) = &self.ws else { return Some((s, e)) };
            // `all` took its `\s+` stand-in only if whitespace starts here, the match is exactly
            // that run, and no earlier alternative matches here (leftmost-first prefers those).
            let Some(run) = ws.run.search(&anchored(hay, s)) else { return Some((s, e)) };
            let r = run.end();
            if e != r || ws.before.as_ref().is_some_and(|b| b.search(&anchored(hay, s)).is_some()) {
                return Some((s, e));
            }
            // `\s+(?!\S)` proper: the run at the end of the text, else the run but its last
            // character (greedy `\s+` backs off until a whitespace character follows).
            if r == hay.len() {
                return Some((s, r));
            }
            let last = hay[s..r].chars().next_back().map_or(1, char::len_utf8);
            if r - last > s {
                return Some((s, r - last));
            }
            // A single whitespace character before a non-space: the alternatives after it may
            // match here; if none does, the pattern has no match starting here.
            if let Some(a) = ws.after.as_ref().and_then(|a| a.search(&anchored(hay, s))) {
                return Some((a.start(), a.end()));
            }
            from = s + char_len_at(hay, s);
        }
    }
}

/// Compiled pre-tokenizer regexes.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    regexes: Vec<SplitRegex>,
}

impl PreTokenizer {
    pub fn new(patterns: &[String]) -> Result<PreTokenizer> {
        let regexes = patterns.iter().map(|p| SplitRegex::new(p)).collect::<Result<Vec<_>>>()?;
        Ok(PreTokenizer { regexes })
    }

    /// Splits `text` into words, as byte ranges that cover the text in order. Linear in the text's
    /// length for every pattern, whatever the text.
    pub fn split(&self, text: &str) -> Vec<(usize, usize)> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut pieces = vec![(0, text.len())];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for &(start, end) in &pieces {
                // Each piece on its own, as llama.cpp does: `$` and look-arounds see its ends.
                let chunk = &text[start..end];
                let mut last = 0;
                while let Some((a, b)) = re.find(chunk, last) {
                    if a > last {
                        next.push((start + last, start + a));
                    }
                    next.push((start + a, start + b));
                    last = b;
                }
                if last < chunk.len() {
                    next.push((start + last, end));
                }
            }
            pieces = next;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let c = PreConfig::for_name(Some(pre));
        let p = PreTokenizer::new(&c.patterns).unwrap();
        p.split(text).into_iter().map(|(a, b)| text[a..b].to_string()).collect()
    }

    /// Every distinct configuration of [`PreConfig::for_name`].
    const NAMES: [&str; 20] = [
        "default",
        "llama3",
        "dbrx",
        "chatglm-bpe",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "falcon",
        "starcoder",
        "smollm",
        "gpt-2",
        "qwen2",
        "stablelm2",
        "poro-chat",
        "viking",
        "tekken",
        "gpt-4o",
        "seed-coder",
        "grok-2",
        "no-such-pre",
    ];

    /// The split as it was done before, with `fancy-regex` running the patterns as written.
    fn backtracking_split(regexes: &[fancy_regex::Regex], text: &str) -> Vec<(usize, usize)> {
        let mut pieces = vec![(0, text.len())];
        if text.is_empty() {
            return Vec::new();
        }
        for re in regexes {
            let mut next = Vec::new();
            for &(start, end) in &pieces {
                let chunk = &text[start..end];
                let mut last = 0;
                for m in re.find_iter(chunk) {
                    let m = m.unwrap();
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
        pieces
    }

    /// The linear-time splitter gives exactly the backtracking engine's words, for every
    /// pre-tokenizer, on random texts over characters where the patterns' classes and
    /// alternatives meet: ASCII and other letters of each case, title case, marks, digits and
    /// other numbers, contraction letters, each kind of whitespace, punctuation and symbols,
    /// CJK, Hangul and kana.
    #[test]
    fn splits_like_a_backtracking_engine() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

        const ALPHABET: &[char] = &[
            'a', 'Z', 's', 'S', 't', 'T', 'r', 'e', 'E', 'v', 'm', 'l', 'L', 'd', 'é', 'É', 'ǅ', '\u{301}', '1', '7',
            '٣', '²', 'Ⅻ', '\'', ' ', ' ', '\t', '\n', '\r', '\u{a0}', '\u{3000}', '\u{2028}', '\u{b}', '!', '.', ',',
            '…', '。', '$', '+', '/', '_', '`', '(', '|', '\u{200d}', '😀', '中', '한', 'ア', 'ぁ', 'Ａ', '！',
        ];
        let configs: Vec<(&str, Vec<fancy_regex::Regex>, PreTokenizer)> = NAMES
            .iter()
            .map(|&n| {
                let c = PreConfig::for_name(Some(n));
                let reference = c.patterns.iter().map(|p| fancy_regex::Regex::new(p).unwrap()).collect();
                (n, reference, PreTokenizer::new(&c.patterns).unwrap())
            })
            .collect();
        // A fixed seed: the same cases on every run.
        let config = Config { cases: 3000, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
        let text = proptest::collection::vec(proptest::sample::select(ALPHABET), 0..48)
            .prop_map(|v| v.into_iter().collect::<String>());
        runner
            .run(&text, |t| {
                for (name, reference, pre) in &configs {
                    let want = backtracking_split(reference, &t);
                    prop_assert_eq!(pre.split(&t), want, "{} on {:?}", name, t);
                }
                Ok(())
            })
            .unwrap();
    }

    /// Runs of one character class, and a run followed by another class, of `n` characters.
    fn runs(n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for c in ['a', 'Z', '中', '1', '!', ' ', '\n', '\t', '\u{3000}', '😀'] {
            let run: String = std::iter::repeat_n(c, n).collect();
            for tail in ["", "x", " ", "1", "!"] {
                v.push(format!("{run}{tail}"));
            }
        }
        v
    }

    /// Long runs too (where the backtracking engine still copes, and is slow on some patterns).
    #[test]
    fn long_runs_split_like_a_backtracking_engine() {
        for name in NAMES {
            let c = PreConfig::for_name(Some(name));
            let reference: Vec<_> = c.patterns.iter().map(|p| fancy_regex::Regex::new(p).unwrap()).collect();
            let pre = PreTokenizer::new(&c.patterns).unwrap();
            for t in runs(3000) {
                assert_eq!(pre.split(&t), backtracking_split(&reference, &t), "{name} on {:?}…", &t[..12]);
            }
        }
    }

    /// A million characters of one class split in linear time (the backtracking engine ran out of
    /// stack), into the words llama.cpp gives: GPT-2 keeps each run whole; Llama 3 cuts digits into
    /// threes, Qwen2 into single digits; a run of spaces before a word leaves it its last space.
    #[test]
    fn million_character_runs() {
        const N: usize = 1_000_000;
        let split = |pre: &str, text: &str| -> Vec<usize> {
            let c = PreConfig::for_name(Some(pre));
            let words = PreTokenizer::new(&c.patterns).unwrap().split(text);
            // The words cover the text in order.
            let mut at = 0;
            for &(a, b) in &words {
                assert!(a == at && b > a, "{pre}: word {a}..{b} after {at}");
                at = b;
            }
            assert_eq!(at, text.len());
            words.iter().map(|(a, b)| text[*a..*b].chars().count()).collect()
        };
        let run = |c: char| -> String { std::iter::repeat_n(c, N).collect() };
        let t = std::time::Instant::now();
        for c in ['a', '中', '1', '!', ' ', '\n'] {
            assert_eq!(split("gpt-2", &run(c)), [N], "{c:?}");
        }
        for pre in ["llama3", "qwen2"] {
            for c in ['a', '中', '!', ' ', '\n'] {
                assert_eq!(split(pre, &run(c)), [N], "{pre} {c:?}");
            }
        }
        let mut threes = vec![3; N / 3];
        threes.push(1);
        assert_eq!(split("llama3", &run('7')), threes);
        assert_eq!(split("qwen2", &run('7')), vec![1; N]);
        assert_eq!(split("smollm", &run('7')), vec![1; N]);
        for pre in ["gpt-2", "llama3", "qwen2"] {
            assert_eq!(split(pre, &format!("{}x", run(' '))), [N - 1, 2], "{pre}");
        }
        // Every pre-tokenizer, every class: no error, whole cover.
        for name in NAMES {
            for c in ['a', 'Z', '中', '1', '!', ' ', '\n', '😀'] {
                split(name, &run(c));
            }
        }
        let dt = t.elapsed();
        println!("million-character runs: {dt:?}");
        // Generous: well under a second per run even on a loaded machine; quadratic would be hours.
        assert!(dt.as_secs_f64() < 60.0, "took {dt:?}");
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
