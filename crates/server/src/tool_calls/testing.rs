//! Test support shared by the formats: feeding a parser in every kind of chunking, and running
//! a grammar over text with llguidance on a byte-level toy vocabulary.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::{ParseEvent, ToolFormat};

/// Events with adjacent contents merged: how text is cut into `Content` events depends on the
/// pushes, what it says must not.
pub fn merged(events: Vec<ParseEvent>) -> Vec<ParseEvent> {
    let mut out: Vec<ParseEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (_, ParseEvent::Content(s)) if s.is_empty() => panic!("empty content event"),
            (Some(ParseEvent::Content(a)), ParseEvent::Content(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

fn feed(format: &dyn ToolFormat, chunks: &[&str]) -> Vec<ParseEvent> {
    let mut parser = format.parser();
    let mut events = Vec::new();
    for c in chunks {
        events.extend(parser.push(c));
    }
    events.extend(parser.finish());
    merged(events)
}

/// Parses `text` in one push, and checks that every other way of cutting it gives the same
/// events: one char at a time, every two-piece cut, and pseudo-random chunks.
pub fn parse(format: &dyn ToolFormat, text: &str) -> Vec<ParseEvent> {
    let whole = feed(format, &[text]);
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let chars: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    assert_eq!(feed(format, &chars), whole, "char by char: {text:?}");
    for &cut in &bounds {
        assert_eq!(feed(format, &[&text[..cut], &text[cut..]]), whole, "cut at {cut}: {text:?}");
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ text.len() as u64;
    for _ in 0..20 {
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < bounds.len() - 1 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let next = (at + 1 + (seed % 6) as usize).min(bounds.len() - 1);
            chunks.push(&text[bounds[at]..bounds[next]]);
            at = next;
        }
        assert_eq!(feed(format, &chunks), whole, "chunks {chunks:?}");
    }
    whole
}

pub fn content(s: &str) -> ParseEvent {
    ParseEvent::Content(s.to_string())
}

pub fn call(index: usize, name: &str, arguments: &str) -> ParseEvent {
    ParseEvent::Call { index, name: name.to_string(), arguments: arguments.to_string() }
}

/// One token per byte, plus an end-of-sequence token 256.
struct ByteEnv {
    trie: TokTrie,
}

impl TokenizerEnv for ByteEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        s.iter().map(|&b| b as TokenId).collect()
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// A matcher for `grammar` over the byte vocabulary; panics if the grammar does not compile.
fn matcher(grammar: &str) -> Matcher {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words.push(b"\xffeos".to_vec());
    let trie = TokTrie::from(&TokRxInfo::new(257, 256), &words);
    let env: TokEnv = Arc::new(ByteEnv { trie });
    let factory = ParserFactory::new_simple(&env).expect("parser factory");
    let parser = factory.create_parser(TopLevelGrammar::from_lark(grammar.to_string()));
    let m = Matcher::new(parser);
    assert!(!m.is_error(), "grammar does not compile: {:?}\n{grammar}", m.get_error());
    m
}

/// Whether `grammar` accepts exactly `text` as a complete output.
pub fn accepts(grammar: &str, text: &str) -> bool {
    let mut m = matcher(grammar);
    let tokens: Vec<TokenId> = text.bytes().map(|b| b as TokenId).collect();
    let consumed = m.try_consume_tokens(&tokens).unwrap_or(0);
    consumed == tokens.len() && !m.is_error() && m.is_accepting().unwrap_or(false)
}
