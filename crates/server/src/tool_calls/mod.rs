//! OpenAI function calling (`tools`, `tool_choice`) over a model's native tool-call text.
//!
//! The chat template tells the model about the tools and shows it, in earlier turns, how its own
//! calls look; the model then writes calls in that native format. This module validates the
//! request fields, recognises the format from the template source ([`detect`]), parses generated
//! text back into calls (incrementally, for streaming), and writes the Lark grammar that forces a
//! valid call when `tool_choice` demands one.
//!
//! Formats, one file each: `hermes` (`<tool_call>{json}</tool_call>`: Qwen2.5, Hermes 2/3) and
//! `llama3` (a bare `{"name": .., "parameters": ..}` answer: Llama 3.1/3.2/3.3).

mod hermes;
mod llama3;

use serde_json::{json, Map, Value};

/// One function the client offers, validated from the request's `tools` array entry
/// (`{"type":"function","function":{"name":..,"description":..,"parameters":{JSON schema},"strict":..}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

impl Tool {
    /// The OpenAI form templates iterate over (`tools` in the template context), with the
    /// defaulted `parameters`.
    #[cfg(test)]
    pub fn to_json(&self) -> Value {
        let mut function = Map::new();
        function.insert("name".into(), Value::from(self.name.as_str()));
        if let Some(d) = &self.description {
            function.insert("description".into(), Value::from(d.as_str()));
        }
        function.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": function})
    }
}

/// Parses and validates the `tools` field: an array of function tools; names
/// `[A-Za-z0-9_-]{1,64}` and unique; `parameters` an object schema (default
/// `{"type":"object","properties":{}}`). An empty array is no tools. Errors are messages for a
/// 400 naming the problem.
pub fn parse_tools(v: &Value) -> Result<Vec<Tool>, String> {
    let list = v.as_array().ok_or("`tools` must be an array of function tools")?;
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let tool = parse_tool(entry).map_err(|e| format!("`tools[{i}]`: {e}"))?;
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(format!("`tools[{i}]`: duplicate function name {:?}", tool.name));
        }
        tools.push(tool);
    }
    Ok(tools)
}

fn parse_tool(entry: &Value) -> Result<Tool, String> {
    let obj = entry.as_object().ok_or("must be an object")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("function") => {}
        _ => return Err("`type` must be \"function\" (the only tool type supported)".into()),
    }
    let f = obj.get("function").and_then(Value::as_object).ok_or("`function` must be an object")?;
    let name = f.get("name").and_then(Value::as_str).ok_or("`function.name` must be a string")?;
    if !valid_name(name) {
        return Err(format!("`function.name` {name:?} must be 1 to 64 of a-z, A-Z, 0-9, '_' and '-'"));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`function.description` must be a string".into()),
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(m)) => {
            // Arguments are always a JSON object (OpenAI sends them as one, templates read keys).
            if m.get("type").is_some_and(|t| t != "object") {
                return Err("`function.parameters` must be a schema of \"type\": \"object\"".into());
            }
            p.clone()
        }
        Some(_) => return Err("`function.parameters` must be a JSON schema object".into()),
    };
    Ok(Tool { name: name.to_string(), description, parameters })
}

/// OpenAI's rule for function names. It also keeps names safe to splice into grammar literals.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

/// `tool_choice`: `"auto"` | `"none"` | `"required"` | `{"type":"function","function":{"name":..}}`;
/// a named function must exist in `tools`. Absent or null: `auto` with tools, `none` without
/// (OpenAI's defaults).
pub fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, String> {
    let choice = match v {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => return Err(format!("`tool_choice` {s:?} must be \"auto\", \"none\", \"required\" or an object")),
        },
        Some(Value::Object(o)) => {
            let name = (o.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| o.get("function")?.get("name")?.as_str())
                .flatten()
                .ok_or("`tool_choice` object must be {\"type\": \"function\", \"function\": {\"name\": ...}}")?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!("`tool_choice` names function {name:?}, which is not in `tools`"));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(_) => return Err("`tool_choice` must be a string or an object".into()),
    };
    if choice == ToolChoice::Required && tools.is_empty() {
        return Err("`tool_choice` \"required\" needs at least one tool in `tools`".into());
    }
    Ok(choice)
}

/// The native tool-call format a chat template writes, recognised from its source text as
/// llama.cpp does (`common/chat.cpp`). `None`: the template has no tool support we know.
pub fn detect(template_source: &str) -> Option<Box<dyn ToolFormat>> {
    hermes::detect(template_source).or_else(|| llama3::detect(template_source))
}

pub trait ToolFormat: Send + Sync {
    fn name(&self) -> &'static str;
    /// A grammar in llguidance's Lark syntax that the whole assistant output must match:
    /// `Required`: one or more calls of any offered tool; `Function(name)`: exactly one call of
    /// that function; `Auto`/`None`: `None` (no constraint). Each call's arguments follow the
    /// tool's `parameters` schema; the name is a literal.
    fn grammar(&self, tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<String>;
    /// A streaming parser of the generated text.
    fn parser(&self) -> Box<dyn CallParser>;
}

pub trait CallParser: Send {
    /// Feeds newly generated text; returns what became final.
    fn push(&mut self, text: &str) -> Vec<ParseEvent>;
    /// End of generation: flushes. Text held back as a possible call start that never
    /// completed, or a call whose JSON is malformed, comes out as `Content`.
    fn finish(&mut self) -> Vec<ParseEvent>;
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParseEvent {
    Content(String),
    /// A complete tool call: `index` counts calls from 0; `arguments` is the JSON text of the
    /// arguments object (compact, as OpenAI sends).
    Call {
        index: usize,
        name: String,
        arguments: String,
    },
}

/// OpenAI assistant `tool_calls` from a request message, in the form templates read: each
/// `function.arguments` a JSON object parsed from OpenAI's string form (as transformers gets it;
/// Qwen2.5's template writes it with `tojson`). An empty string is `{}`; an object is kept.
pub fn calls_for_template(tool_calls: &Value) -> Result<Value, String> {
    let list = tool_calls.as_array().ok_or("`tool_calls` must be an array")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, call) in list.iter().enumerate() {
        let at = |e: &str| format!("`tool_calls[{i}]`: {e}");
        let mut call = call.as_object().cloned().ok_or_else(|| at("must be an object"))?;
        let f = call
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| at("`function` must be an object"))?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(at("`function.name` must be a string"));
        }
        let args = match f.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) if s.trim().is_empty() => json!({}),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => v,
                _ => return Err(at("`function.arguments` must be a JSON object (as a string)")),
            },
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(at("`function.arguments` must be a string")),
        };
        f.insert("arguments".into(), args);
        call.entry("type").or_insert_with(|| Value::from("function"));
        out.push(Value::Object(call));
    }
    Ok(Value::Array(out))
}

// ---- Helpers the formats share ----

/// Appends `text` as content, skipping empty text (the server sends no empty deltas).
fn push_content(out: &mut Vec<ParseEvent>, text: &str) {
    if !text.is_empty() {
        out.push(ParseEvent::Content(text.to_string()));
    }
}

/// The length of the longest end of `text` that is a proper prefix of `marker`: text that may
/// become the marker with the next push, so it is held back. Markers are ASCII, so the cut is
/// on a character boundary.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.as_bytes().ends_with(&marker.as_bytes()[..k]))
        .unwrap_or(0)
}

/// The byte offset of `needle` in `hay` at or after byte `from`. Byte search, so `from` needs
/// no character boundary (an ASCII needle only matches on one).
fn find_from(hay: &str, needle: &str, from: usize) -> Option<usize> {
    let hay = hay.as_bytes().get(from..)?;
    hay.windows(needle.len()).position(|w| w == needle.as_bytes()).map(|i| i + from)
}

/// Finds where a JSON value that starts with `{` ends, across pushes: brackets counted outside
/// strings, string escapes followed. It does not validate; the parse afterwards does.
#[derive(Debug, Default)]
struct JsonEnd {
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonEnd {
    /// Scans `text` (the same text as last time, possibly grown) from where it stopped; the byte
    /// length of the first complete value, once it is there.
    fn feed(&mut self, text: &str) -> Option<usize> {
        let bytes = text.as_bytes();
        while let Some(&b) = bytes.get(self.pos) {
            self.pos += 1;
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(self.pos);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// A call from its JSON text: an object with a string `name` and, under the first of `arg_keys`
/// present, an object of arguments (or a string holding one, which models sometimes write).
/// Returns the name and the compact arguments text; `None` if it is not such an object.
fn call_from_json(text: &str, arg_keys: &[&str]) -> Option<(String, String)> {
    let Ok(Value::Object(mut obj)) = serde_json::from_str(text.trim()) else { return None };
    let name = obj.get("name")?.as_str().filter(|n| !n.is_empty())?.to_string();
    let args = match arg_keys.iter().find_map(|k| obj.remove(*k))? {
        args @ Value::Object(_) => args,
        Value::String(s) => serde_json::from_str::<Value>(&s).ok().filter(Value::is_object)?,
        _ => return None,
    };
    Some((name, serde_json::to_string(&args).ok()?))
}

/// The Lark grammar for `choice` where a call to `name` reads `open(name)`, the arguments
/// object, then `close`, and several calls (`Required` with `parallel`) are joined by `sep`.
fn call_grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    sep: &str,
    open: impl Fn(&str) -> String,
    close: &str,
) -> Option<String> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
    };
    if chosen.is_empty() {
        return None;
    }
    let mut g = match choice {
        ToolChoice::Required if parallel => format!("start: call ({} call)*\n", lark_str(sep)),
        _ => "start: call\n".to_string(),
    };
    // Rules are numbered: tool names may hold upper case and '-', which Lark rule names cannot.
    let alternatives: Vec<String> = (0..chosen.len()).map(|i| format!("call_{i}")).collect();
    g += &format!("call: {}\n", alternatives.join(" | "));
    for (i, tool) in chosen.iter().enumerate() {
        g += &format!("call_{i}: {} args_{i} {}\n", lark_str(&open(&tool.name)), lark_str(close));
        g += &format!("args_{i}: %json {}\n", args_schema(&tool.parameters));
    }
    Some(g)
}

/// A Lark string literal: Lark reads quoted strings as JSON strings. Quoted, `<|...|>` stays
/// text (unquoted it would name a special token).
fn lark_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// The arguments schema as inline JSON for `%json`, with llguidance options: JSON laid out as
/// the templates' `tojson` writes it (Python's `json.dumps`: `", "` and `": "`, no other
/// whitespace), which is what the model saw in earlier turns and keeps it from padding with
/// endless whitespace. Not lenient: a keyword llguidance cannot enforce fails the request (the
/// server also compiles each tool's schema on its own first, to name the tool in the 400).
fn args_schema(parameters: &Value) -> String {
    let mut schema = match parameters {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    schema.entry("type").or_insert_with(|| Value::from("object"));
    schema.insert(
        "x-guidance".into(),
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    Value::Object(schema).to_string()
}

#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tools_parse_with_defaults() {
        let tools = parse_tools(&json!([weather(), {"type": "function", "function": {"name": "now-Time_2"}}])).unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(tools[0].description.as_deref(), Some("Weather in a city"));
        assert_eq!(tools[1].parameters, json!({"type": "object", "properties": {}}));
        assert_eq!(
            tools[1].to_json(),
            json!({"type": "function", "function": {"name": "now-Time_2",
            "parameters": {"type": "object", "properties": {}}}})
        );
        assert_eq!(parse_tools(&json!([])).unwrap(), vec![]);
    }

    #[test]
    fn bad_tools_are_named() {
        let err = |v: Value| parse_tools(&v).unwrap_err();
        assert!(err(json!({"a": 1})).contains("array"));
        assert!(err(json!([1])).contains("tools[0]"));
        assert!(err(json!([{"type": "retrieval"}])).contains("type"));
        assert!(err(json!([{"type": "function"}])).contains("function"));
        assert!(err(json!([{"type": "function", "function": {"name": ""}}])).contains("name"));
        assert!(err(json!([{"type": "function", "function": {"name": "a b"}}])).contains("name"));
        assert!(err(json!([{"type": "function", "function": {"name": "x".repeat(65)}}])).contains("name"));
        assert!(err(json!([{"type": "function", "function": {"name": "é"}}])).contains("name"));
        assert!(err(json!([weather(), weather()])).contains("tools[1]`: duplicate"));
        let params = |p: Value| json!([{"type": "function", "function": {"name": "f", "parameters": p}}]);
        assert!(err(params(json!("x"))).contains("parameters"));
        assert!(err(params(json!({"type": "string"}))).contains("parameters"));
        let desc = json!([{"type": "function", "function": {"name": "f", "description": 3}}]);
        assert!(err(desc).contains("description"));
    }

    #[test]
    fn tool_choice_forms() {
        let tools = parse_tools(&json!([weather()])).unwrap();
        let choice = |v: Value| parse_tool_choice(Some(&v), &tools);
        assert_eq!(parse_tool_choice(None, &tools), Ok(ToolChoice::Auto));
        assert_eq!(parse_tool_choice(None, &[]), Ok(ToolChoice::None));
        assert_eq!(parse_tool_choice(Some(&Value::Null), &tools), Ok(ToolChoice::Auto));
        assert_eq!(choice(json!("auto")), Ok(ToolChoice::Auto));
        assert_eq!(choice(json!("none")), Ok(ToolChoice::None));
        assert_eq!(choice(json!("required")), Ok(ToolChoice::Required));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(choice(named), Ok(ToolChoice::Function("get_weather".into())));
        assert!(choice(json!({"type": "function", "function": {"name": "nope"}})).unwrap_err().contains("nope"));
        assert!(choice(json!({"type": "function"})).is_err());
        assert!(choice(json!({"function": {"name": "get_weather"}})).is_err());
        assert!(choice(json!("sometimes")).is_err());
        assert!(choice(json!(1)).is_err());
        assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn detects_the_repository_templates() {
        let qwen = include_str!("../../../tokenizer/tests/templates/qwen2.5.jinja");
        assert_eq!(detect(qwen).map(|f| f.name()), Some("hermes"));
        // Llama 3 (not 3.1) has no tools; the others neither.
        for src in [
            include_str!("../../../tokenizer/tests/templates/llama3.jinja"),
            include_str!("../../../tokenizer/tests/templates/chatml_smollm2.jinja"),
            include_str!("../../../tokenizer/tests/templates/gemma.jinja"),
            include_str!("../../../tokenizer/tests/templates/mistral.jinja"),
        ] {
            assert!(detect(src).is_none());
        }
    }

    #[test]
    fn calls_become_template_objects() {
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "function": {"name": "now", "arguments": ""}}]);
        assert_eq!(
            calls_for_template(&calls).unwrap(),
            json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}])
        );
        let args = |a: Value| json!([{"type": "function", "function": {"name": "f", "arguments": a}}]);
        assert_eq!(calls_for_template(&args(json!({"a": 1}))).unwrap()[0]["function"]["arguments"], json!({"a": 1}));
        assert!(calls_for_template(&args(json!("{not json"))).unwrap_err().contains("tool_calls[0]"));
        assert!(calls_for_template(&args(json!("[1]"))).is_err());
        assert!(calls_for_template(&args(json!(5))).is_err());
        assert!(calls_for_template(&json!([{"function": {"arguments": "{}"}}])).is_err());
        assert!(calls_for_template(&json!({})).is_err());
    }

    /// Random mixes of marker and JSON pieces: no panics, every chunking agrees (checked by
    /// `testing::parse`), and text without calls comes back exactly.
    #[test]
    fn random_text_is_never_lost() {
        const PIECES: [&str; 22] = [
            "{",
            "}",
            "\"",
            "\\",
            "<tool_call>",
            "</tool_call>",
            "<tool_",
            "<|python_tag|>",
            "<|py",
            ";",
            " ",
            "\n",
            "é",
            "😀",
            "name",
            ":",
            ", ",
            "arguments",
            "parameters",
            r#"{"name": "f", "arguments": {"a": "}"}}"#,
            r#"{"name": "f", "parameters": {}}"#,
            "[1]",
        ];
        let formats = [detect("<tool_call>").unwrap(), detect("<|start_header_id|>ipython<|end_header_id|>").unwrap()];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..300 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for _ in 0..seed % 12 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text += PIECES[(seed % PIECES.len() as u64) as usize];
            }
            for format in &formats {
                let events = testing::parse(format.as_ref(), &text);
                if events.iter().all(|e| matches!(e, ParseEvent::Content(_))) {
                    let back: String =
                        events.iter().map(|e| if let ParseEvent::Content(c) = e { c.as_str() } else { "" }).collect();
                    assert_eq!(back, text, "{}", format.name());
                }
            }
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(partial_marker_len("abc<tool", "<tool_call>"), 5);
        assert_eq!(partial_marker_len("abc<tool_call>", "<tool_call>"), 0);
        assert_eq!(partial_marker_len("é<", "<tool_call>"), 1);
        assert_eq!(partial_marker_len("", "<tool_call>"), 0);
        assert_eq!(find_from("a</x>b</x>", "</x>", 2), Some(6));
        assert_eq!(find_from("ab", "</x>", 9), None);
        let mut end = JsonEnd::default();
        let text = r#"{"a": "}\"{", "b": [1, {"c": "]"}]} tail"#;
        assert_eq!(end.feed(&text[..10]), None);
        assert_eq!(end.feed(text), Some(text.len() - 5));
        assert_eq!(
            call_from_json(r#" {"name": "f", "arguments": {"x": [1, 2]}} "#, &["arguments"]),
            Some(("f".into(), r#"{"x":[1,2]}"#.into()))
        );
        assert_eq!(
            call_from_json(r#"{"name": "f", "arguments": "{\"x\": 1}"}"#, &["arguments"]),
            Some(("f".into(), r#"{"x":1}"#.into()))
        );
        assert_eq!(call_from_json(r#"{"name": "f", "arguments": [1]}"#, &["arguments"]), None);
        assert_eq!(call_from_json(r#"{"name": 3, "arguments": {}}"#, &["arguments"]), None);
        assert_eq!(call_from_json(r#"{"name": "f"}"#, &["arguments"]), None);
        assert_eq!(call_from_json(r#"{"name": "f", "arguments": {}"#, &["arguments"]), None);
    }

    #[test]
    fn args_schema_keeps_the_client_schema_and_sets_layout() {
        let s: Value =
            serde_json::from_str(&args_schema(&json!({"properties": {"a": {}}, "x-guidance": {"bad": 1}}))).unwrap();
        assert_eq!(s["type"], "object");
        assert_eq!(s["properties"], json!({"a": {}}));
        assert_eq!(s["x-guidance"]["item_separator"], ", ");
        assert!(s["x-guidance"].get("bad").is_none());
    }
}
