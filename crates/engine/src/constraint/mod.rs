//! Constrained decoding: JSON schemas, grammars and regular expressions enforced token by token.
//!
//! The engine is llguidance (the Rust crate behind llama.cpp's, vLLM's and mistral.rs's structured
//! outputs) over kiln's own tokenizer ([`vocab`]). A [`ConstraintSpec`] is compiled once per
//! request into a [`Constraint`]; before each sampling step the constraint's token mask removes
//! every token that cannot continue a valid output (the logits become −∞), and each sampled token
//! advances it. The mask for the next token is computed while the forward pass for it runs
//! ([`Constraint::prepare`] on another thread), so a constraint costs little per token.
//!
//! It fails closed: a spec that does not compile, or that uses a feature llguidance cannot enforce
//! (an unknown JSON Schema keyword, say), is an error before any token is generated; a constraint
//! that fails mid-way (a grammar too complex for its limits) ends the request with an error, never
//! with unconstrained text.

mod formats;
pub mod gbnf;
mod vocab;

use std::sync::Arc;

use anyhow::Result;
use kiln_tokenizer::Tokenizer;
use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{SimpleVob, TokEnv};

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A JSON Schema (draft 2020-12 as llguidance supports it).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
    /// A grammar in llama.cpp's GBNF, converted to Lark by [`gbnf::gbnf_to_lark`].
    Gbnf(String),
    /// A regular expression the whole output must match (Rust `regex` syntax).
    Regex(String),
}

impl ConstraintSpec {
    /// A grammar as llama.cpp takes it: GBNF, or llguidance's Lark when it starts with
    /// `%llguidance` (llama.cpp's convention for grammars meant for llguidance).
    pub fn grammar_text(text: String) -> ConstraintSpec {
        if text.trim_start().starts_with("%llguidance") {
            ConstraintSpec::Lark(text)
        } else {
            ConstraintSpec::Gbnf(text)
        }
    }

    /// A short name for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject => "json_object",
            ConstraintSpec::JsonSchema(_) => "json_schema",
            ConstraintSpec::Lark(_) => "lark grammar",
            ConstraintSpec::Gbnf(_) => "grammar",
            ConstraintSpec::Regex(_) => "regex",
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
            ConstraintSpec::JsonSchema(s) => {
                if !(s.is_object() || s.is_boolean()) {
                    return Err("a JSON Schema must be an object or a boolean".into());
                }
                TopLevelGrammar::from_json_schema(prepared(s.clone()))
            }
            ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            ConstraintSpec::Gbnf(g) => TopLevelGrammar::from_lark(gbnf::gbnf_to_lark(g).map_err(|e| e.to_string())?),
            ConstraintSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        })
    }
}

/// A schema as llguidance compiles it: exact date/time formats, compact layout.
fn prepared(mut schema: Value) -> Value {
    formats::strict_date_time(&mut schema);
    compact(schema)
}

/// JSON written on one line with `", "` and `": "` between items, as `json.dumps` writes it,
/// unless the schema chose otherwise (llguidance's `x-guidance` options). Free whitespace would
/// let a sampled model pad its output with newlines until it runs out of tokens.
fn compact(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        let opts = obj.entry("x-guidance").or_insert_with(|| json!({}));
        if let Some(o) = opts.as_object_mut() {
            o.entry("whitespace_flexible").or_insert(json!(false));
            o.entry("item_separator").or_insert(json!(", "));
            o.entry("key_separator").or_insert(json!(": "));
        }
    }
    schema
}

/// Compiles specs for one model's vocabulary (built once: the trie of a 150k vocabulary takes a
/// few tens of milliseconds).
pub struct ConstraintCompiler {
    factory: ParserFactory,
    n_vocab: usize,
}

impl ConstraintCompiler {
    pub fn new(tok: &Tokenizer) -> Result<ConstraintCompiler> {
        let env: TokEnv = Arc::new(vocab::KilnTokEnv::new(tok)?);
        let mut factory = ParserFactory::new_simple(&env)?;
        // Warnings and errors go into the returned errors, not to stderr.
        factory.quiet();
        Ok(ConstraintCompiler { factory, n_vocab: tok.n_vocab() })
    }

    /// Compiles `spec`; the error says why it cannot be enforced.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, String> {
        let grammar = spec.grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| first_line(&e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(first_line(&e));
        }
        // Fail closed: whatever llguidance would only approximate is refused.
        if let Some(w) = matcher.grammar_warnings().into_iter().next() {
            return Err(w);
        }
        Ok(Constraint { matcher, mask: None, n_vocab: self.n_vocab, tokens: 0 })
    }
}

/// llguidance's messages may append the grammar and parser state; the first line says what failed.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// Whether token masks should be computed on a thread of their own while the forward pass runs:
/// only when a core is free for it. The forward pass's threads wait for each other at spinning
/// barriers, so a mask thread that preempts one of them costs the whole pass a time slice; with
/// every core busy, computing the mask before the pass (tens of microseconds) is cheaper.
pub fn overlap_masks() -> bool {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    cores > rayon::current_num_threads()
}

/// One request's constraint: where the output is in the grammar.
pub struct Constraint {
    matcher: Matcher,
    /// The allowed next tokens, once computed for the current position.
    mask: Option<SimpleVob>,
    n_vocab: usize,
    /// Tokens accepted so far.
    tokens: usize,
}

/// Why a constraint cannot go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConstraintFailed(pub String);

impl std::fmt::Display for ConstraintFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the output constraint failed: {}", self.0)
    }
}

impl std::error::Error for ConstraintFailed {}

impl Constraint {
    /// Computes the mask of the next token (if not done yet). Safe to call on another thread
    /// while the forward pass that produces the next logits runs.
    pub fn prepare(&mut self) -> Result<(), ConstraintFailed> {
        if self.mask.is_none() {
            let m = self.matcher.compute_mask_or_eos().map_err(|e| self.failed(e.to_string()))?;
            self.mask = Some(m);
        }
        Ok(())
    }

    /// Sets every token the constraint forbids to −∞. An end-of-generation token survives only
    /// where the output may end. Fails when no token at all is allowed.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), ConstraintFailed> {
        self.prepare()?;
        let Some(mask) = self.mask.as_ref() else { return Err(self.failed("no mask".into())) };
        // The mask is a bit per token, 32 to a word: whole words of forbidden tokens at once.
        let words = mask.as_slice();
        let mut any = false;
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            let w = words.get(i).copied().unwrap_or(0);
            if w == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if w >> b & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                } else {
                    any |= *l > f32::NEG_INFINITY;
                }
            }
        }
        if !any {
            return Err(self.failed(format!("no token of the {} can continue the output", self.n_vocab)));
        }
        Ok(())
    }

    /// Whether `token` is allowed at this position (computes the mask if needed).
    pub fn allows(&mut self, token: u32) -> Result<bool, ConstraintFailed> {
        self.prepare()?;
        Ok(self.mask.as_ref().is_some_and(|m| (token as usize) < m.len() && m.is_allowed(token)))
    }

    /// Advances past a sampled token (which the mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<(), ConstraintFailed> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| self.failed(e.to_string()))?;
        self.tokens += 1;
        Ok(())
    }

    /// The output is complete and nothing can follow it: generation ends here.
    pub fn is_complete(&self) -> bool {
        matches!(
            self.matcher.stop_reason(),
            StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
        )
    }

    /// The output may end here (an end-of-generation token is allowed).
    pub fn may_end(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    fn failed(&self, e: String) -> ConstraintFailed {
        let e = self.matcher.get_error().unwrap_or(e);
        ConstraintFailed(format!("after {} tokens: {}", self.tokens, first_line(&e)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::OnceLock;

    use super::*;
    use crate::Model;

    /// A small Llama model (SentencePiece vocabulary), loaded once for the constraint tests.
    pub(crate) fn synth() -> &'static Model {
        static M: OnceLock<Model> = OnceLock::new();
        M.get_or_init(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth/synth-tiny-Q8_0.gguf");
            Model::load(&p).expect("synth model")
        })
    }

    /// Whether the constraint lets the model write exactly `text` (one byte token at a time: the
    /// SentencePiece tokenizer would put a space before the text) and stop there.
    pub(crate) fn accepts(m: &Model, spec: &ConstraintSpec, text: &str) -> bool {
        let mut c = m.compile_constraint(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        let ids: Vec<u32> =
            text.bytes().map(|b| m.tokenizer.token_id(&format!("<0x{b:02X}>")).expect("byte token")).collect();
        for &t in &ids {
            if !c.allows(t).unwrap() {
                return false;
            }
            c.accept(t).unwrap();
        }
        c.is_complete() || c.may_end()
    }

    #[test]
    fn json_object_and_schema_accept_their_language_only() {
        let m = synth();
        assert!(accepts(m, &ConstraintSpec::JsonObject, r#"{"a": 1, "b": [true, null]}"#));
        assert!(!accepts(m, &ConstraintSpec::JsonObject, "[1, 2]"));
        // Compact layout: one space after ':' and ','.
        assert!(!accepts(m, &ConstraintSpec::JsonObject, "{\"a\":\n1}"));
        let s = ConstraintSpec::JsonSchema(json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 3}, "s": {"enum": ["x", "y"]}},
            "required": ["n"], "additionalProperties": false,
        }));
        assert!(accepts(m, &s, r#"{"n": 5, "s": "y"}"#));
        assert!(!accepts(m, &s, r#"{"n": 2}"#));
        assert!(!accepts(m, &s, r#"{"s": "x"}"#));
        assert!(!accepts(m, &s, r#"{"n": 5, "t": 1}"#));
    }

    #[test]
    fn bad_specs_fail_closed_with_a_reason() {
        let m = synth();
        let err =
            |spec: ConstraintSpec| m.compile_constraint(&spec).err().unwrap_or_else(|| panic!("{spec:?} compiled"));
        assert!(err(ConstraintSpec::JsonSchema(json!({"type": "objekt"}))).contains("objekt"));
        assert!(!err(ConstraintSpec::JsonSchema(json!({"type": "array", "uniqueItems": true}))).is_empty());
        assert!(!err(ConstraintSpec::JsonSchema(json!({"type": "string", "format": "uri-reference"}))).is_empty());
        assert!(!err(ConstraintSpec::JsonSchema(json!(5))).is_empty());
        assert!(!err(ConstraintSpec::Lark("start: foo".into())).is_empty());
        assert!(!err(ConstraintSpec::Regex("a(".into())).is_empty());
        assert!(err(ConstraintSpec::Gbnf("root ::= \"a".into())).contains("line 1"));
    }

    #[test]
    fn gbnf_and_regex_constrain() {
        let m = synth();
        let g = ConstraintSpec::Gbnf("root ::= (\"yes\" | \"no\") \".\"".into());
        assert!(accepts(m, &g, "yes."));
        assert!(!accepts(m, &g, "maybe."));
        let r = ConstraintSpec::Regex("[0-9]{3}-[a-z]+".into());
        assert!(accepts(m, &r, "123-abc"));
        assert!(!accepts(m, &r, "12-abc"));
    }

    /// A constrained greedy generation stops by itself when the output is complete, and what it
    /// wrote matches the schema; the same prompt unconstrained writes something else.
    #[test]
    fn constrained_generation_completes_valid_output() {
        let m = synth();
        let spec = ConstraintSpec::JsonSchema(json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["ok", "n"], "additionalProperties": false,
        }));
        let prompt = m.tokenizer.encode("Answer in JSON:", true, false).unwrap();
        let opts = crate::GenerateOptions { max_tokens: 64, stop: vec![], stop_at_eog: true };
        for temperature in [0.0, 1.0] {
            let mut c = m.compile_constraint(&spec).unwrap();
            let mut s = crate::Session::new(m, 256, kiln_model::Precision::Fast);
            let mut sampler = crate::Sampler::new(crate::SamplingParams { temperature, seed: 7, ..Default::default() });
            let g = s.generate_constrained(&prompt, &opts, &mut sampler, Some(&mut c), |_| true).unwrap();
            assert_eq!(g.stop_reason, crate::StopReason::Stop, "{:?}", g.text);
            let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {:?}", g.text));
            assert!(v["ok"].is_boolean() && v["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)), "{v}");
            assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        }
    }
}
