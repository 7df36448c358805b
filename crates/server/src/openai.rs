//! OpenAI request bodies and their validation into a generation job.
//!
//! Unknown fields are ignored (clients send many optional ones); known fields of the wrong type,
//! and values out of range, are 400s naming the field.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_engine::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

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
/// `min_p`, `repeat_penalty`).
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Sampling {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
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

/// Parses a JSON body; a syntax or type error is a 400 quoting serde's message (which names the
/// line/column and the expected type).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty: send a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// What the request asks the scheduler for, apart from the prompt.
pub struct Job {
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Sampling {
    /// Checks the shared fields; `n_ctx` bounds `max_tokens`.
    pub fn job(&self, max_tokens: Option<i64>, n_ctx: usize) -> Result<Job, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad_param("n", format!("n = {n} is not supported: only n = 1")));
            }
        }
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m <= 0 => {
                return Err(ApiError::bad_param("max_tokens", format!("max_tokens must be at least 1, got {m}")));
            }
            Some(m) if m as u64 > n_ctx as u64 => {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    format!("max_tokens = {m} is more than the context of {n_ctx} tokens"),
                ));
            }
            Some(m) => Some(m as usize),
        };
        let d = SamplingParams::default();
        let temperature = self.temperature.unwrap_or(d.temperature);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_param(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(d.top_p);
        if !(0.0..=1.0).contains(&top_p) {
            return Err(ApiError::bad_param("top_p", format!("top_p must be in [0, 1], got {top_p}")));
        }
        let min_p = self.min_p.unwrap_or(d.min_p);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::bad_param("min_p", format!("min_p must be in [0, 1], got {min_p}")));
        }
        let top_k = match self.top_k {
            None => d.top_k,
            Some(k) if k < 0 => return Err(ApiError::bad_param("top_k", format!("top_k must be ≥ 0, got {k}"))),
            Some(k) => k as usize,
        };
        let penalty = |v: Option<f32>, name: &'static str| -> Result<f32, ApiError> {
            let v = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::bad_param(name, format!("{name} must be in [-2, 2], got {v}")));
            }
            Ok(v)
        };
        let presence_penalty = penalty(self.presence_penalty, "presence_penalty")?;
        let frequency_penalty = penalty(self.frequency_penalty, "frequency_penalty")?;
        let repeat_penalty = self.repeat_penalty.unwrap_or(d.repeat_penalty);
        // Written so that NaN fails too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(repeat_penalty > 0.0 && repeat_penalty <= 10.0) {
            return Err(ApiError::bad_param(
                "repeat_penalty",
                format!("repeat_penalty must be in (0, 10], got {repeat_penalty}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::bad_param("stop", format!("at most 16 stop strings, got {}", stop.len())));
        }
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        // Without a seed every request draws differently, as with OpenAI.
        let seed = match self.seed {
            Some(s) => s as u64,
            None => random_seed(),
        };
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            seed,
            ..d
        };
        params.validate().map_err(ApiError::bad_request)?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream && self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        Ok(Job { params, max_tokens, stop, stream, include_usage, ignore_eos: self.ignore_eos.unwrap_or(false) })
    }
}

fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    // splitmix64 of time and a counter: distinct for requests in the same nanosecond.
    let mut z = t ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fresh response id with the given prefix (`chatcmpl-…`, `cmpl-…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", random_seed())
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
