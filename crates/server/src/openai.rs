//! OpenAI request bodies and their validation into a generation job.
//!
//! No field is accepted and ignored: every field of a body is one the endpoint implements, a
//! metadata field that cannot change the output ([`METADATA`]), or a 400 naming it (`param`) —
//! "unknown" for names neither OpenAI nor llama.cpp define for the endpoint, "not supported" for
//! those they define that kiln does not implement ([`UNSUPPORTED_CHAT`], unless sent as `null`,
//! which asks for nothing). Known fields of the wrong type, and values out of range, are 400s
//! naming the field too. The same holds inside `messages` and `stream_options`.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_engine::speculative::{SpecMode, SpecOptions};
use kiln_engine::SamplingParams;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// `"text"` or `["a", "b"]`.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The sampling and length fields shared by both endpoints (OpenAI's, plus llama.cpp's `top_k`,
/// `min_p`, `repeat_penalty`, `n_predict`).
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Sampling {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// The token limit, whichever of `max_tokens`, `max_completion_tokens` (chat) and llama.cpp's
    /// `n_predict` gave it (they must agree): [`Body::finish`] resolves them.
    pub max_tokens: Option<i64>,
    /// llama.cpp's name for `max_tokens`; -1 is its "no limit".
    pub n_predict: Option<i64>,
    /// The field the limit came from, for error messages.
    #[serde(skip)]
    limit_field: &'static str,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub n: Option<i64>,
    /// llama.cpp's extension: keep generating past end-of-generation tokens.
    pub ignore_eos: Option<bool>,
    /// OpenAI's output format: text, any JSON object, or a JSON Schema ([`crate::structured`]).
    pub response_format: Option<Value>,
    /// llama.cpp's extensions: a JSON Schema, or a GBNF grammar, the output must match.
    pub json_schema: Option<Value>,
    pub grammar: Option<Value>,
    /// Speculative decoding for this request: `{"mode": "off" | "ngram" | "draft", "draft_max": N}`
    /// (either field may be left out: the server's default).
    pub speculative: Option<Value>,
    /// llama.cpp's name for the most drafted tokens per verification (0: no speculation).
    #[serde(rename = "speculative.n_max")]
    pub speculative_n_max: Option<i64>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Function tools the model may call, and whether/which it must call.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// `false`: at most one call, enforced with `tool_choice` "required" or a named function.
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Message {
    pub role: String,
    /// Text, or a list of parts of which only `{"type": "text"}` ones are supported; null for an
    /// assistant turn that only called tools.
    pub content: Option<Content>,
    /// An assistant turn's calls, as OpenAI returned them (arguments as JSON text).
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers, and the function's name.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub echo: Option<bool>,
    pub logprobs: Option<i64>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A text, token ids, or a one-element list of either.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
    pub parse_special: Option<bool>,
    #[serde(default)]
    pub with_pieces: bool,
}

#[derive(Deserialize, Debug, Clone)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// One field an endpoint reads: its name and a check that its value has the field's type.
pub struct Field {
    name: &'static str,
    check: fn(&Value) -> Result<(), serde_json::Error>,
    /// What the field holds, for types whose serde error says only "did not match any variant".
    expected: Option<&'static str>,
}

impl Field {
    /// A 400 naming the field when its value does not have the field's type.
    fn check(&self, v: &Value) -> Result<(), ApiError> {
        (self.check)(v).map_err(|e| {
            let m = e.to_string();
            let m = match self.expected {
                // Inside a list the mismatch is in an element, which serde does not say.
                Some(x) if m.starts_with("data did not match any variant") && v.is_array() => {
                    format!("invalid element, expected {x}")
                }
                Some(x) if m.starts_with("data did not match any variant") => {
                    format!("invalid type: {}, expected {x}", kind(v))
                }
                _ => m,
            };
            ApiError::bad_param(self.name, format!("{}: {m}", self.name))
        })
    }
}

fn has_type<T: DeserializeOwned>(v: &Value) -> Result<(), serde_json::Error> {
    T::deserialize(v).map(drop)
}

/// A field of type `T` (as declared in the request struct).
const fn field<T: DeserializeOwned>(name: &'static str) -> Field {
    Field { name, check: has_type::<T>, expected: None }
}

/// A field of an untagged-enum type `T`, and what it holds in words.
const fn field_of<T: DeserializeOwned>(name: &'static str, expected: &'static str) -> Field {
    Field { name, check: has_type::<T>, expected: Some(expected) }
}

/// [`Sampling`]'s fields.
const SAMPLING: &[Field] = &[
    field::<Option<String>>("model"),
    field::<Option<bool>>("stream"),
    field::<Option<StreamOptions>>("stream_options"),
    field::<Option<i64>>("max_tokens"),
    field::<Option<i64>>("n_predict"),
    field::<Option<f32>>("temperature"),
    field::<Option<f32>>("top_p"),
    field::<Option<i64>>("top_k"),
    field::<Option<f32>>("min_p"),
    field::<Option<f32>>("repeat_penalty"),
    field::<Option<f32>>("presence_penalty"),
    field::<Option<f32>>("frequency_penalty"),
    field::<Option<i64>>("seed"),
    field_of::<Option<StringOrList>>("stop", "a string or a list of strings"),
    field::<Option<i64>>("n"),
    field::<Option<bool>>("ignore_eos"),
    field::<Option<Value>>("response_format"),
    field::<Option<Value>>("json_schema"),
    field::<Option<Value>>("grammar"),
    field::<Option<Value>>("speculative"),
    field::<Option<i64>>("speculative.n_max"),
];

/// [`ChatRequest`]'s own fields.
const CHAT: &[Field] = &[
    field_of::<Vec<Message>>(
        "messages",
        "a list of messages {role, content}, each content a string, a list of text parts or null",
    ),
    field::<Option<i64>>("max_completion_tokens"),
    field::<Option<bool>>("logprobs"),
    field::<Option<i64>>("top_logprobs"),
    field::<Option<Value>>("tools"),
    field::<Option<Value>>("tool_choice"),
    field::<Option<bool>>("parallel_tool_calls"),
];

/// [`CompletionRequest`]'s own fields.
const COMPLETION: &[Field] = &[
    field_of::<Prompt>("prompt", "a string, a list of token ids, or a one-element list of either"),
    field::<Option<bool>>("echo"),
    field::<Option<i64>>("logprobs"),
    field::<Option<i64>>("best_of"),
    field::<Option<String>>("suffix"),
];

const TOKENIZE: &[Field] = &[
    field::<String>("content"),
    field::<bool>("add_special"),
    field::<Option<bool>>("parse_special"),
    field::<bool>("with_pieces"),
];

const DETOKENIZE: &[Field] = &[field::<Vec<u32>>("tokens")];

/// Fields OpenAI clients send routinely that describe the request but cannot change the output,
/// accepted on both generation endpoints and checked by [`check_metadata`]:
/// - `user`, `safety_identifier`: who the end user is, for OpenAI's abuse monitoring (a string);
/// - `metadata`: tags for OpenAI's dashboard (an object of strings);
/// - `prompt_cache_key`: a routing hint for OpenAI's prompt cache (a string); kiln reuses cached
///   prefixes by itself, and the output does not depend on it;
/// - `store`: `false` or absent only — `true` asks for the completion to be stored for later
///   retrieval, which kiln does not do;
/// - `service_tier`: `"auto"`/`"default"` only — `"flex"`/`"priority"`/`"scale"` ask for a
///   latency/price class kiln does not have.
///
/// (`stream_options` is read: `include_usage` is implemented; see [`StreamOptions`].)
pub const METADATA: &[&str] = &["user", "safety_identifier", "metadata", "prompt_cache_key", "store", "service_tier"];

/// Chat fields OpenAI defines that kiln does not implement: 400 "not supported" unless `null`
/// (or a value that asks for nothing: `logit_bias: {}`, `modalities: ["text"]`).
pub const UNSUPPORTED_CHAT: &[&str] = &[
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_retention",
];

/// Completion fields OpenAI defines that kiln does not implement (as [`UNSUPPORTED_CHAT`]).
pub const UNSUPPORTED_COMPLETION: &[&str] = &["logit_bias"];

/// A request body: the fields its endpoint reads, and the checks once it is parsed.
pub trait Body: DeserializeOwned {
    /// The endpoint, for error messages.
    const ENDPOINT: &'static str;
    /// The field lists of the struct (flattened parts included).
    const FIELDS: &'static [&'static [Field]];
    /// Fields defined elsewhere (OpenAI, llama.cpp) that kiln does not implement.
    const UNSUPPORTED: &'static [&'static str] = &[];
    /// Whether the [`METADATA`] fields are accepted.
    const ACCEPTS_METADATA: bool = false;

    /// Checks nested objects of the raw body (before deserializing).
    fn check_nested(_body: &Map<String, Value>) -> Result<(), ApiError> {
        Ok(())
    }

    /// Checks and settles fields that depend on each other (after deserializing).
    fn finish(&mut self) -> Result<(), ApiError> {
        Ok(())
    }
}

impl Body for ChatRequest {
    const ENDPOINT: &'static str = "/v1/chat/completions";
    const FIELDS: &'static [&'static [Field]] = &[CHAT, SAMPLING];
    const UNSUPPORTED: &'static [&'static str] = UNSUPPORTED_CHAT;
    const ACCEPTS_METADATA: bool = true;

    fn check_nested(body: &Map<String, Value>) -> Result<(), ApiError> {
        check_stream_options(body, Self::ENDPOINT)?;
        check_messages(body.get("messages"))
    }

    fn finish(&mut self) -> Result<(), ApiError> {
        let limit = self.sampling.resolve_limit(self.max_completion_tokens)?;
        self.max_completion_tokens = limit;
        Ok(())
    }
}

impl Body for CompletionRequest {
    const ENDPOINT: &'static str = "/v1/completions";
    const FIELDS: &'static [&'static [Field]] = &[COMPLETION, SAMPLING];
    const UNSUPPORTED: &'static [&'static str] = UNSUPPORTED_COMPLETION;
    const ACCEPTS_METADATA: bool = true;

    fn check_nested(body: &Map<String, Value>) -> Result<(), ApiError> {
        check_stream_options(body, Self::ENDPOINT)
    }

    fn finish(&mut self) -> Result<(), ApiError> {
        self.sampling.resolve_limit(None).map(drop)
    }
}

impl Body for TokenizeRequest {
    const ENDPOINT: &'static str = "/tokenize";
    const FIELDS: &'static [&'static [Field]] = &[TOKENIZE];
}

impl Body for DetokenizeRequest {
    const ENDPOINT: &'static str = "/detokenize";
    const FIELDS: &'static [&'static [Field]] = &[DETOKENIZE];
}

/// Parses a JSON body: a syntax error is a 400 quoting serde's message (line and column); a field
/// the endpoint does not implement, or of the wrong type, a 400 naming it.
pub fn parse<T: Body>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty: send a JSON object"));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(ApiError::bad_request(format!("the request body must be a JSON object, not {}", kind(&value))));
    };
    let known = |key: &str| T::FIELDS.iter().flat_map(|set| set.iter()).find(|f| f.name == key);
    for (key, v) in map {
        if known(key).is_some() {
            // Types are checked by deserializing below.
        } else if let Some(&name) = METADATA.iter().find(|&&m| m == key).filter(|_| T::ACCEPTS_METADATA) {
            check_metadata(name, v)?;
        } else if let Some(&name) = T::UNSUPPORTED.iter().find(|&&u| u == key) {
            if !asks_nothing(name, v) {
                return Err(ApiError::bad_param(
                    name,
                    format!("{name} is not supported by kiln (leave it out, or send null)"),
                ));
            }
        } else {
            return Err(unknown_field(key, T::ENDPOINT, None));
        }
    }
    T::check_nested(map)?;
    // A type error inside the struct (flattened parts especially) does not say which field it is
    // in: on failure each field is checked on its own to name it.
    let named = |map: &Map<String, Value>| -> Result<(), ApiError> {
        map.iter().filter_map(|(k, v)| known(k).map(|f| (f, v))).try_for_each(|(f, v)| f.check(v))
    };
    let mut req: T = match T::deserialize(&value) {
        Ok(r) => r,
        Err(e) => {
            return Err(match named(map) {
                Err(named) => named,
                Ok(()) => ApiError::bad_request(format!("invalid request body: {e}")),
            });
        }
    };
    req.finish()?;
    Ok(req)
}

/// A JSON value's kind, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A client's field name as text for a one-line message: escaped (`{:?}`), and cut if long.
fn quoted(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((at, _)) => format!("{:?}…", &name[..at]),
        None => format!("{name:?}"),
    }
}

/// An unknown field's name as `param`: left out when it is too long to echo (the message still
/// names it, cut).
fn param_name(name: &str) -> Option<Cow<'static, str>> {
    const MAX_LEN: usize = 64;
    (name.len() <= MAX_LEN).then(|| Cow::Owned(name.to_string()))
}

/// 400 for a field the endpoint does not know: `param` names it (or the object holding it).
fn unknown_field(name: &str, endpoint: &str, within: Option<(&'static str, String)>) -> ApiError {
    match within {
        None => ApiError {
            param: param_name(name),
            ..ApiError::bad_request(format!("unknown field {}: not supported by {endpoint}", quoted(name)))
        },
        Some((param, path)) => {
            ApiError::bad_param(param, format!("{path}: unknown field {}: not supported by {endpoint}", quoted(name)))
        }
    }
}

/// Whether an unsupported field's value asks for nothing: `null`, or the value that means the
/// default (no bias, text output).
fn asks_nothing(name: &str, v: &Value) -> bool {
    match (name, v) {
        (_, Value::Null) => true,
        ("logit_bias", Value::Object(m)) => m.is_empty(),
        ("modalities", Value::Array(a)) => a.len() == 1 && a[0] == "text",
        _ => false,
    }
}

/// Checks a [`METADATA`] field: the right type, and no value that would ask for a behaviour
/// kiln does not have.
fn check_metadata(name: &'static str, v: &Value) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::bad_param(name, m));
    match (name, v) {
        (_, Value::Null) => Ok(()),
        ("user" | "safety_identifier" | "prompt_cache_key", Value::String(_)) => Ok(()),
        ("user" | "safety_identifier" | "prompt_cache_key", v) => {
            bad(format!("{name} must be a string, not {}", kind(v)))
        }
        ("metadata", Value::Object(m)) => match m.iter().find(|(_, v)| !v.is_string()) {
            None => Ok(()),
            Some((k, v)) => bad(format!("metadata values must be strings; {} is {}", quoted(k), kind(v))),
        },
        ("metadata", v) => bad(format!("metadata must be an object of strings, not {}", kind(v))),
        ("store", Value::Bool(false)) => Ok(()),
        ("store", Value::Bool(true)) => bad("store: true is not supported: kiln does not store completions".into()),
        ("store", v) => bad(format!("store must be a boolean, not {}", kind(v))),
        ("service_tier", Value::String(t)) if t == "auto" || t == "default" => Ok(()),
        ("service_tier", Value::String(t)) => {
            bad(format!("service_tier {} is not supported: kiln has one tier (\"auto\" or \"default\")", quoted(t)))
        }
        ("service_tier", v) => bad(format!("service_tier must be a string, not {}", kind(v))),
        _ => bad(format!("{name} is not supported")),
    }
}

/// `stream_options` holds only `include_usage` (and OpenAI's `include_obfuscation`, only as
/// `false`: kiln pads no stream chunks).
fn check_stream_options(body: &Map<String, Value>, endpoint: &str) -> Result<(), ApiError> {
    let Some(Value::Object(o)) = body.get("stream_options") else { return Ok(()) };
    for (k, v) in o {
        match (k.as_str(), v) {
            ("include_usage", _) => {}
            ("include_obfuscation", Value::Null | Value::Bool(false)) => {}
            ("include_obfuscation", _) => {
                return Err(ApiError::bad_param(
                    "stream_options",
                    "stream_options.include_obfuscation is not supported (kiln pads no chunks): send false or leave it out",
                ));
            }
            _ => return Err(unknown_field(k, endpoint, Some(("stream_options", "stream_options".into())))),
        }
    }
    Ok(())
}

/// The fields a message may have, and those OpenAI returns on an assistant message that a client
/// may send back (accepted as `null` only: they ask for nothing then).
const MESSAGE_FIELDS: &[&str] = &["role", "content", "name", "tool_calls", "tool_call_id"];
const MESSAGE_NULL_FIELDS: &[&str] = &["refusal", "function_call", "audio", "annotations"];

/// Unknown fields in messages and in their text parts are 400s naming `messages`.
fn check_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let Some(Value::Array(list)) = messages else { return Ok(()) };
    let unknown = |name: &str, path: String| unknown_field(name, "/v1/chat/completions", Some(("messages", path)));
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else { continue };
        for (k, v) in m {
            if MESSAGE_FIELDS.contains(&k.as_str()) || (v.is_null() && MESSAGE_NULL_FIELDS.contains(&k.as_str())) {
                continue;
            }
            return Err(unknown(k, format!("messages[{i}]")));
        }
        let Some(Value::Array(parts)) = m.get("content") else { continue };
        for (j, p) in parts.iter().enumerate() {
            let Value::Object(p) = p else { continue };
            // Parts of other types are refused as such when the text is read ([`Message::text`]).
            if p.get("type").and_then(Value::as_str) != Some("text") {
                continue;
            }
            if let Some(k) = p.keys().find(|k| *k != "type" && *k != "text") {
                return Err(unknown(k, format!("messages[{i}].content[{j}]")));
            }
        }
    }
    Ok(())
}

/// What the request asks the scheduler for, apart from the prompt.
pub struct Job {
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// The request's speculative decoding, where it set any (else the server's default).
    pub spec: SpecRequest,
}

/// What a request asked of speculative decoding; unset parts take the server's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecRequest {
    pub mode: Option<SpecMode>,
    pub draft_max: Option<usize>,
}

impl SpecRequest {
    /// The options for a request on a server whose default is `default`.
    pub fn resolve(self, default: SpecOptions) -> SpecOptions {
        SpecOptions { mode: self.mode.unwrap_or(default.mode), draft_max: self.draft_max.unwrap_or(default.draft_max) }
    }
}

/// `speculative` (an object of `mode` and `draft_max`) and llama.cpp's `speculative.n_max`.
fn spec_request(obj: Option<&Value>, n_max: Option<i64>) -> Result<SpecRequest, ApiError> {
    let bad = |msg: String| ApiError::bad_param("speculative", msg);
    let mut out = SpecRequest::default();
    let draft_max = |n: i64, name: &'static str| -> Result<usize, ApiError> {
        let max = kiln_engine::speculative::controller::MAX_DRAFT as i64;
        if !(0..=max).contains(&n) {
            return Err(ApiError::bad_param(name, format!("{name} must be in [0, {max}], got {n}")));
        }
        Ok(n as usize)
    };
    if let Some(v) = obj {
        let Some(o) = v.as_object() else {
            return Err(bad(
                "speculative must be an object {\"mode\": \"off\" | \"ngram\" | \"draft\", \"draft_max\": N}".into(),
            ));
        };
        for (k, v) in o {
            match k.as_str() {
                "mode" => {
                    let m: SpecMode = v
                        .as_str()
                        .ok_or_else(|| bad("speculative.mode must be a string".into()))?
                        .parse()
                        .map_err(bad)?;
                    out.mode = Some(m);
                }
                "draft_max" => {
                    let n = v.as_i64().ok_or_else(|| bad("speculative.draft_max must be an integer".into()))?;
                    out.draft_max = Some(draft_max(n, "speculative")?);
                }
                other => return Err(bad(format!("unknown field speculative.{other} (expected mode, draft_max)"))),
            }
        }
    }
    if let Some(n) = n_max {
        let n = draft_max(n, "speculative.n_max")?;
        if out.draft_max.is_some_and(|m| m != n) {
            return Err(ApiError::bad_param(
                "speculative.n_max",
                "speculative.n_max and speculative.draft_max disagree: give one".to_string(),
            ));
        }
        out.draft_max = Some(n);
    }
    Ok(out)
}

impl Sampling {
    /// Settles the token limit from `max_tokens`, `max_completion_tokens` (chat) and llama.cpp's
    /// `n_predict` (-1: no limit): those given must agree, and the limit is left in `max_tokens`
    /// (and returned). Two different limits are a 400 rather than one silently winning.
    fn resolve_limit(&mut self, max_completion_tokens: Option<i64>) -> Result<Option<i64>, ApiError> {
        let n_predict = match self.n_predict {
            Some(n) if n < -1 => {
                return Err(ApiError::bad_param(
                    "n_predict",
                    format!("n_predict must be -1 (no limit) or at least 1, got {n}"),
                ));
            }
            n => n,
        };
        let given = [
            ("max_completion_tokens", max_completion_tokens),
            ("max_tokens", self.max_tokens),
            ("n_predict", n_predict),
        ];
        let mut limit: Option<(&'static str, i64)> = None;
        for (name, v) in given {
            let Some(v) = v else { continue };
            match limit {
                None => limit = Some((name, v)),
                Some((first, w)) if w != v => {
                    let show = |n: &str, x: i64| {
                        if n == "n_predict" && x == -1 {
                            format!("{n} = -1 (no limit)")
                        } else {
                            format!("{n} = {x}")
                        }
                    };
                    return Err(ApiError::bad_param(
                        name,
                        format!("{} and {} disagree: give one token limit", show(first, w), show(name, v)),
                    ));
                }
                Some(_) => {}
            }
        }
        let (field, value) = match limit {
            Some(("n_predict", -1)) => ("n_predict", None),
            Some((f, v)) => (f, Some(v)),
            None => ("max_tokens", None),
        };
        self.limit_field = field;
        self.max_tokens = value;
        Ok(value)
    }

    /// Checks the shared fields; `n_ctx` bounds `max_tokens`.
    pub fn job(&self, max_tokens: Option<i64>, n_ctx: usize) -> Result<Job, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad_param("n", format!("n = {n} is not supported: only n = 1")));
            }
        }
        let field = if self.limit_field.is_empty() { "max_tokens" } else { self.limit_field };
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m <= 0 => {
                return Err(ApiError::bad_param(field, format!("{field} must be at least 1, got {m}")));
            }
            Some(m) if m as u64 > n_ctx as u64 => {
                return Err(ApiError::bad_param(
                    field,
                    format!("{field} = {m} is more than the context of {n_ctx} tokens"),
                ));
            }
            Some(m) => Some(m as usize),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::bad_param("stop", format!("at most 16 stop strings, got {}", stop.len())));
        }
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let params = kiln_engine::sampler::SamplingRequest {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed.map(|s| s as u64),
        }
        .resolve("repeat_penalty")
        .map_err(|e| match e.field {
            Some(f) => ApiError::bad_param(f, e.message),
            None => ApiError::bad_request(e.message),
        })?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream && self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        let spec = spec_request(self.speculative.as_ref(), self.speculative_n_max)?;
        Ok(Job { params, max_tokens, stop, stream, include_usage, ignore_eos: self.ignore_eos.unwrap_or(false), spec })
    }
}

/// A fresh response id with the given prefix (`chatcmpl-…`, `cmpl-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", kiln_engine::sampler::random_seed())
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Message {
    /// The message's text: a string, or its text parts joined.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad_param(
                            "messages",
                            format!("content parts of type {:?} are not supported (text only)", p.kind),
                        ));
                    }
                    out.push_str(p.text.as_deref().unwrap_or(""));
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A body with the required fields, and `extra` added.
    fn with(base: &Value, extra: Value) -> Vec<u8> {
        let mut b = base.clone();
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.to_string().into_bytes()
    }

    /// Every listed field is a field of the struct: some value of it changes the parsed request
    /// (a listed name the struct lacked would be accepted and ignored by serde).
    fn fields_reach<T: Body + std::fmt::Debug>(base: Value) {
        let candidates = [
            json!(true),
            json!(7),
            json!(0.5),
            json!("x"),
            json!({"type": "text"}),
            json!([1]),
            json!(["x"]),
            json!([{"role": "user", "content": "x"}]),
        ];
        let plain = format!("{:?}", serde_json::from_value::<T>(base.clone()).unwrap());
        for f in T::FIELDS.iter().flat_map(|s| s.iter()) {
            let reached = candidates.iter().any(|c| {
                let mut b = base.clone();
                b[f.name] = c.clone();
                serde_json::from_value::<T>(b).is_ok_and(|r| format!("{r:?}") != plain)
            });
            assert!(reached, "{}: {} is listed but no value of it reaches the request", T::ENDPOINT, f.name);
        }
    }

    #[test]
    fn listed_fields_are_the_structs_fields() {
        fields_reach::<ChatRequest>(json!({"messages": []}));
        fields_reach::<CompletionRequest>(json!({"prompt": ""}));
        fields_reach::<TokenizeRequest>(json!({"content": ""}));
        fields_reach::<DetokenizeRequest>(json!({"tokens": []}));
    }

    fn chat_err(extra: Value) -> ApiError {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        parse::<ChatRequest>(&with(&base, extra)).expect_err("refused")
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_by_name() {
        let e = chat_err(json!({"frobnicate": 1}));
        assert_eq!(e.param.as_deref(), Some("frobnicate"));
        assert!(e.message.contains("unknown field \"frobnicate\""), "{}", e.message);
        for name in UNSUPPORTED_CHAT {
            let e = chat_err(json!({ *name: {"x": 1} }));
            assert_eq!(e.param.as_deref(), Some(*name));
            assert!(e.message.contains("not supported"), "{}", e.message);
        }
        // null (and the values that mean the default) ask for nothing.
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        for extra in [json!({"logit_bias": null, "audio": null}), json!({"logit_bias": {}, "modalities": ["text"]})] {
            parse::<ChatRequest>(&with(&base, extra)).unwrap();
        }
        let e = parse::<CompletionRequest>(br#"{"prompt": "a", "messages": []}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse::<TokenizeRequest>(br#"{"content": "a", "model": "m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse::<DetokenizeRequest>(br#"{"tokens": [], "with_pieces": true}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("with_pieces"));
        // A hostile name: one line, cut, and no `param` past the bound on kept names.
        let long = "x\n".repeat(1000);
        let e = chat_err(json!({ long: 1 }));
        assert_eq!(e.param.as_deref(), None);
        assert!(!e.message.contains('\n') && e.message.len() < 300, "{}", e.message);
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (extra, field) in [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"stop": 3}), "stop"),
            (json!({"n_predict": "many"}), "n_predict"),
            (json!({"stream_options": 1}), "stream_options"),
            (json!({"messages": "hello"}), "messages"),
            (json!({"messages": [{"role": "user", "content": 5}]}), "messages"),
        ] {
            let e = chat_err(extra);
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
            assert!(e.message.contains("invalid") && e.message.contains("expected"), "{}", e.message);
        }
        assert_eq!(
            parse::<ChatRequest>(b"[1, 2]").unwrap_err().message,
            "the request body must be a JSON object, not an array"
        );
    }

    #[test]
    fn metadata_fields() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        let ok = json!({"user": "u1", "safety_identifier": "s", "metadata": {"k": "v"}, "store": false,
                        "service_tier": "auto", "prompt_cache_key": "p", "stream_options": {"include_usage": true}});
        parse::<ChatRequest>(&with(&base, ok)).unwrap();
        for (extra, field) in [
            (json!({"store": true}), "store"),
            (json!({"service_tier": "flex"}), "service_tier"),
            (json!({"user": 5}), "user"),
            (json!({"metadata": {"k": 1}}), "metadata"),
            (json!({"stream_options": {"include_usage": true, "extra": 1}}), "stream_options"),
            (json!({"stream_options": {"include_obfuscation": true}}), "stream_options"),
        ] {
            assert_eq!(chat_err(extra).param.as_deref(), Some(field));
        }
        // Not on the tokenizer endpoints.
        assert_eq!(
            parse::<TokenizeRequest>(br#"{"content": "a", "user": "u"}"#).unwrap_err().param.as_deref(),
            Some("user")
        );
    }

    #[test]
    fn message_fields() {
        let body = |m: Value| json!({"messages": [{"role": "user", "content": "hi"}, m]}).to_string().into_bytes();
        let e = parse::<ChatRequest>(&body(json!({"role": "user", "content": "x", "mood": "happy"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("messages[1]") && e.message.contains("\"mood\""), "{}", e.message);
        let part = json!({"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]});
        let e = parse::<ChatRequest>(&body(part)).unwrap_err();
        assert!(e.message.contains("messages[1].content[0]"), "{}", e.message);
        // What OpenAI returns on an assistant message, sent back empty, and a tool turn.
        let back = json!({"role": "assistant", "content": "x", "refusal": null, "annotations": null});
        parse::<ChatRequest>(&body(back)).unwrap();
        let tool = json!({"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"});
        parse::<ChatRequest>(&body(tool)).unwrap();
        let e = parse::<ChatRequest>(&body(json!({"role": "assistant", "content": "x", "refusal": "no"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn token_limits_agree() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}]});
        let chat = |extra: Value| parse::<ChatRequest>(&with(&base, extra));
        let r = chat(json!({"n_predict": 5})).unwrap();
        assert_eq!((r.sampling.max_tokens, r.max_completion_tokens), (Some(5), Some(5)));
        let r = chat(json!({"n_predict": 5, "max_tokens": 5, "max_completion_tokens": 5})).unwrap();
        assert_eq!(r.sampling.max_tokens, Some(5));
        let r = chat(json!({"n_predict": -1})).unwrap();
        assert_eq!((r.sampling.max_tokens, r.max_completion_tokens), (None, None));
        assert_eq!(chat(json!({"n_predict": 5, "max_tokens": 6})).unwrap_err().param.as_deref(), Some("n_predict"));
        assert_eq!(
            chat(json!({"max_tokens": 5, "max_completion_tokens": 6})).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(chat(json!({"n_predict": -1, "max_tokens": 6})).unwrap_err().param.as_deref(), Some("n_predict"));
        assert_eq!(chat(json!({"n_predict": -2})).unwrap_err().param.as_deref(), Some("n_predict"));
        // The limit's checks name the field it came from.
        let r = chat(json!({"n_predict": 0})).unwrap();
        assert_eq!(r.sampling.job(r.max_completion_tokens, 64).err().unwrap().param.as_deref(), Some("n_predict"));
        let r = parse::<CompletionRequest>(br#"{"prompt": "a", "n_predict": 1000}"#).unwrap();
        let e = r.sampling.job(r.sampling.max_tokens, 64).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("n_predict"));
        assert!(e.message.contains("n_predict = 1000"), "{}", e.message);
    }
}
