//! Chat templates: the Jinja template a model ships in `tokenizer.chat_template`, rendered the
//! way Hugging Face transformers renders it, or one of llama.cpp's built-in formats chosen by name
//! (see [`ChatTemplate::builtin`]).
//!
//! transformers compiles templates with
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])`
//! and adds the `raise_exception` and `strftime_now` globals and a `tojson` filter that is plain
//! `json.dumps(ensure_ascii=False)`. This module sets minijinja up the same way and adds the Python
//! string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) through
//! `minijinja-contrib`'s pycompat layer; maps keep their insertion order (minijinja's
//! `preserve_order`), as Python dicts do, so `tojson` writes keys in the order given. The context
//! holds `messages`, `tools` (`none` unless given, as transformers passes it), `documents` (`none`),
//! `add_generation_prompt`, `bos_token` and `eos_token`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{context, AutoEscape, Environment, Error, ErrorKind, Value};

mod builtin;
use builtin::{Builtin, BUILTINS};

/// The GGUF metadata key holding the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Name under which the template is registered in its environment (shows up in nothing the
/// caller sees: errors are reported with line numbers only).
const TEMPLATE_NAME: &str = "chat_template";
/// The most instructions one rendering may run (a few seconds' worth at the slowest).
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A JSON value handed to templates as given (tool definitions, tool calls). Object keys keep the
/// order they were written in, as Python's `json.loads` keeps them, so a template's `tojson` prints
/// them as transformers does; deserialize straight into this type (not through a
/// `serde_json::Value`, whose maps sort their keys) to keep that order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Json(Value);

impl Json {
    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// One turn of a conversation. The optional fields are the OpenAI-style tool-use fields that
/// templates such as Qwen2.5's read; templates see only the fields that are set.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// Empty for an assistant turn that only calls tools.
    #[serde(default)]
    pub content: String,
    /// The assistant's tool calls: a list of `{"type": "function", "function": {"name": ...,
    /// "arguments": {...}}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Json>,
    /// On a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a `tool` message: the function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// The names [`ChatTemplate::builtin`] accepts, as llama.cpp spells them.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("chat template syntax error{}: {message}", at_line(*line))]
    Syntax { line: Option<usize>, message: String },
    /// The template parsed but failed while rendering (unknown filter, bad operation, ...).
    #[error("chat template render error{}: {message}", at_line(*line))]
    Render { line: Option<usize>, message: String },
    /// The template called `raise_exception(message)`, e.g. on roles it does not support.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// `tokenizer.chat_template` exists but could not be read as a string.
    #[error("GGUF metadata `{CHAT_TEMPLATE_KEY}`: {0}")]
    Metadata(#[source] kiln_gguf::GgufError),
    /// [`ChatTemplate::builtin`] was given a name it does not know.
    #[error("unknown chat template {name:?}; known: {}", builtin_names().join(", "))]
    UnknownBuiltin { name: String },
}

fn at_line(line: Option<usize>) -> String {
    match line {
        Some(l) => format!(" at line {l}"),
        None => String::new(),
    }
}

/// The error value `raise_exception` hands to minijinja; found again in the error's source chain.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// minijinja's message without its `(in name:line)` suffix: kind, then detail.
fn describe(err: &Error) -> String {
    match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    }
}

impl TemplateError {
    fn syntax(err: Error) -> Self {
        let message = match (err.kind(), err.detail()) {
            (ErrorKind::SyntaxError, Some(d)) => d.to_owned(),
            _ => describe(&err),
        };
        TemplateError::Syntax { line: err.line(), message }
    }

    fn render(err: Error) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = source {
            if let Some(r) = e.downcast_ref::<RaisedException>() {
                return TemplateError::Raised(r.0.clone());
            }
            source = e.source();
        }
        TemplateError::Render { line: err.line(), message: describe(&err) }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    kind: Kind,
    source: String,
    bos_token: String,
    eos_token: String,
}

enum Kind {
    // Boxed: an environment is hundreds of bytes, a built-in one.
    Jinja(Box<Environment<'static>>),
    Builtin(Builtin),
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at render time.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Jinja2's default, which transformers keeps: one trailing newline of the source is dropped.
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // A template comes from the model file: one that loops (nearly) forever must not hold a
        // thread for minutes. Real chat templates render a long conversation with tools in well
        // under a million instructions.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(TemplateError::syntax)?;
        Ok(ChatTemplate {
            kind: Kind::Jinja(Box::new(env)),
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template stored under `tokenizer.chat_template`, or `None` when the file has none.
    pub fn from_gguf(g: &kiln_gguf::GgufFile, bos_token: &str, eos_token: &str) -> Result<Option<Self>, TemplateError> {
        match g.get_str(CHAT_TEMPLATE_KEY).map_err(TemplateError::Metadata)? {
            None => Ok(None),
            Some(src) => Self::new(src, bos_token, eos_token).map(Some),
        }
    }

    /// llama.cpp's built-in format `name` (`chatml`, `llama2`, `llama3`, `gemma`, ...: see
    /// [`builtin_names`]), for models whose file carries no template. It renders what llama.cpp's
    /// formatter of that name does; the tokens are kept for [`ChatTemplate::bos_token`] and
    /// [`ChatTemplate::eos_token`] only.
    pub fn builtin(name: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let b = Builtin::from_name(name).ok_or_else(|| TemplateError::UnknownBuiltin { name: name.to_owned() })?;
        Ok(ChatTemplate {
            kind: Kind::Builtin(b),
            source: name.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders the conversation; with `add_generation_prompt` the template appends the header
    /// that opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with tool definitions (`tools`: a list of `{"type": "function",
    /// "function": {...}}`), which templates with tool support describe to the model. Built-in
    /// formats ignore tools, as llama.cpp's do.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let env = match &self.kind {
            Kind::Jinja(env) => env,
            Kind::Builtin(b) => return Ok(b.render(messages, add_generation_prompt)),
        };
        let messages: Vec<Value> = messages.iter().map(|m| Value::from_object(MessageValue::new(m))).collect();
        let tmpl = env.get_template(TEMPLATE_NAME).map_err(TemplateError::render)?;
        tmpl.render(context! {
            messages => messages,
            // transformers always passes these, `None` when absent: `tools is defined` holds.
            tools => tools.map(|t| t.0.clone()).unwrap_or(Value::from(())),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(TemplateError::render)
    }

    /// The template text as given, or the built-in format's name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The name of the built-in format, `None` for a Jinja template.
    pub fn builtin_name(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Builtin(b) => Some(b.name()),
            Kind::Jinja(_) => None,
        }
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A message as the template sees it: a map of the fields that are set, in Python's insertion
/// order (`role`, `content`, then the tool fields), so `message.items()` and `message | tojson`
/// match transformers and `message.tool_calls` is undefined on a message without calls. Both
/// `message.role` and `message['role']` work.
#[derive(Debug)]
struct MessageValue {
    fields: Vec<(&'static str, Value)>,
}

impl MessageValue {
    fn new(m: &ChatMessage) -> Self {
        let mut fields = vec![("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))];
        if let Some(t) = &m.tool_calls {
            fields.push(("tool_calls", t.0.clone()));
        }
        if let Some(id) = &m.tool_call_id {
            fields.push(("tool_call_id", Value::from(id.as_str())));
        }
        if let Some(n) = &m.name {
            fields.push(("name", Value::from(n.as_str())));
        }
        MessageValue { fields }
    }
}

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.fields.iter().map(|(k, _)| Value::from(*k)).collect())
    }
}

/// `raise_exception(msg)`: aborts rendering; `render` turns it into `TemplateError::Raised(msg)`.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
}

/// `strftime_now(format)`: the current time (UTC) formatted like Python's `strftime`.
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats `unix_secs` (UTC) with the common `strftime` directives; `%-d` style (no padding) is
/// accepted as glibc does.
fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let tod = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (tod / 3600, tod / 60 % 60, tod % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut d = chars.next();
        let pad = if d == Some('-') {
            d = chars.next();
            false
        } else {
            true
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if pad {
                let _ = write!(out, "{v:0width$}");
            } else {
                let _ = write!(out, "{v}");
            }
        };
        match d {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = write!(out, "{day:2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('u') => num(&mut out, weekday as i64 + 1, 1),
            Some('w') => num(&mut out, (weekday as i64 + 1) % 7, 1),
            Some('F') => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, so `", "` and `": "` separators without `indent` (`","` and `": "` with
/// it, as Python picks them), and no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_owned()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_owned(), b.as_str().unwrap_or_default().to_owned())
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings (item, key)",
                    ))
                }
            }
        }
        _ => ((if indent.is_some() { "," } else { ", " }).to_owned(), ": ".to_owned()),
    };
    let mut w = JsonWriter {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    w.value(value, 0)?;
    Ok(Value::from(w.out))
}

struct JsonWriter {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonWriter {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    fn item_separator(&mut self) {
        self.out.push_str(&self.item_sep);
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    let _ = write!(self.out, "{v}");
                } else {
                    let f = f64::try_from(v.clone())?;
                    self.float(f);
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.seq(&items, depth)?;
            }
            ValueKind::Map => {
                let mut pairs = Vec::new();
                for k in v.try_iter()? {
                    let item = v.get_item(&k)?;
                    pairs.push((json_key(&k), item));
                }
                if self.sort_keys {
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.map(&pairs, depth)?;
            }
            ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: {} is not JSON serializable", v.kind()),
                ))
            }
            // ValueKind is non-exhaustive.
            _ => self.string(&v.to_string()),
        }
        Ok(())
    }

    fn seq(&mut self, items: &[Value], depth: usize) -> Result<(), Error> {
        if items.is_empty() {
            self.out.push_str("[]");
            return Ok(());
        }
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.item_separator();
            }
            self.newline(depth + 1);
            self.value(item, depth + 1)?;
        }
        self.newline(depth);
        self.out.push(']');
        Ok(())
    }

    fn map(&mut self, pairs: &[(String, Value)], depth: usize) -> Result<(), Error> {
        if pairs.is_empty() {
            self.out.push_str("{}");
            return Ok(());
        }
        self.out.push('{');
        for (i, (k, item)) in pairs.iter().enumerate() {
            if i > 0 {
                self.item_separator();
            }
            self.newline(depth + 1);
            self.string(k);
            self.out.push_str(&self.key_sep);
            self.value(item, depth + 1)?;
        }
        self.newline(depth);
        self.out.push('}');
        Ok(())
    }

    /// Python's float repr: shortest round-trip digits, `.0` on integral values, `e+XX`
    /// exponents from 1e16 and below 1e-4.
    fn float(&mut self, f: f64) {
        if f.is_nan() {
            self.out.push_str("NaN");
        } else if f.is_infinite() {
            self.out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        } else if f != 0.0 && (f.abs() >= 1e16 || f.abs() < 1e-4) {
            let s = format!("{f:e}");
            let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
            let exp: i32 = exp.parse().unwrap_or(0);
            let sign = if exp < 0 { '-' } else { '+' };
            let _ = write!(self.out, "{mant}e{sign}{:02}", exp.abs());
        } else if f.fract() == 0.0 {
            let _ = write!(self.out, "{f:.1}");
        } else {
            let _ = write!(self.out, "{f}");
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `json.dumps` turns non-string keys into strings: `true`/`false`/`null`, numbers as
/// written.
fn json_key(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_owned(),
        ValueKind::None | ValueKind::Undefined => "null".to_owned(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_owned(),
        _ => k.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t).unwrap(), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "29 Feb 2024");
        assert_eq!(strftime("%A %B %-d, %y %j", t).unwrap(), "Thursday February 29, 24 060");
        assert_eq!(strftime("%I %p %a %%", t).unwrap(), "01 PM Thu %");
        assert_eq!(strftime("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %a", -86_400).unwrap(), "1969-12-31 Wed");
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (123456.0, "123456.0"),
        ];
        for (f, want) in cases {
            let mut w = JsonWriter {
                out: String::new(),
                indent: None,
                item_sep: ", ".into(),
                key_sep: ": ".into(),
                ensure_ascii: false,
                sort_keys: false,
            };
            w.float(f);
            assert_eq!(w.out, want, "{f}");
        }
    }
}
