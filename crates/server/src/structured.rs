//! The request fields that shape the output: OpenAI's `response_format`, `tools` and
//! `tool_choice`; llama.cpp's `json_schema` and `grammar` (GBNF).
//!
//! Everything here is checked before the request is queued: a malformed field, a schema or
//! grammar that does not compile, a tool whose parameter schema cannot be enforced, or a
//! `tool_choice` naming no offered tool is a 400 naming the field, and nothing is generated.

use kiln_engine::constraint::{Constraint, ConstraintSpec};
use kiln_engine::Model;
use kiln_tokenizer::template::ChatTemplate;
use serde_json::Value;

use crate::error::ApiError;
use crate::tool_calls::{self, Tool, ToolChoice, ToolFormat};

/// The output constraint asked for by `response_format`, `json_schema` or `grammar` (at most one).
pub fn constraint_fields(
    response_format: Option<&Value>,
    json_schema: Option<&Value>,
    grammar: Option<&Value>,
) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    let mut found: Vec<(ConstraintSpec, &'static str)> = Vec::new();
    if let Some(rf) = response_format {
        if let Some(spec) = response_format_spec(rf)? {
            found.push((spec, "response_format"));
        }
    }
    if let Some(s) = json_schema.filter(|v| !v.is_null()) {
        if !(s.is_object() || s.is_boolean()) {
            return Err(ApiError::bad_param("json_schema", "json_schema must be a JSON Schema object"));
        }
        found.push((ConstraintSpec::JsonSchema(s.clone()), "json_schema"));
    }
    if let Some(g) = grammar.filter(|v| !v.is_null()) {
        let Some(text) = g.as_str() else {
            return Err(ApiError::bad_param(
                "grammar",
                "grammar must be a string: llama.cpp's GBNF, or llguidance's Lark after `%llguidance`",
            ));
        };
        if !text.trim().is_empty() {
            found.push((ConstraintSpec::grammar_text(text.to_string()), "grammar"));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.1).collect();
        return Err(ApiError::bad_param(
            found[1].1,
            format!("{} each constrain the output: give only one", names.join(" and ")),
        ));
    }
    Ok(found.pop())
}

/// `{"type": "text"}`, `{"type": "json_object"}` (with llama.cpp's optional `schema`), or
/// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}, "strict": true}}`.
fn response_format_spec(rf: &Value) -> Result<Option<ConstraintSpec>, ApiError> {
    let bad = |m: String| ApiError::bad_param("response_format", m);
    if rf.is_null() {
        return Ok(None);
    }
    let Some(obj) = rf.as_object() else {
        return Err(bad("response_format must be an object such as {\"type\": \"json_object\"}".into()));
    };
    match obj.get("type").and_then(Value::as_str) {
        None => Err(bad("response_format needs a `type`: \"text\", \"json_object\" or \"json_schema\"".into())),
        Some("text") => Ok(None),
        Some("json_object") => match obj.get("schema") {
            None | Some(Value::Null) => Ok(Some(ConstraintSpec::JsonObject)),
            Some(s) if s.is_object() || s.is_boolean() => Ok(Some(ConstraintSpec::JsonSchema(s.clone()))),
            Some(_) => Err(bad("response_format.schema must be a JSON Schema object".into())),
        },
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format of type json_schema needs `json_schema`: {\"name\": …, \"schema\": {…}}".into(),
                ));
            };
            if let Some(s) = js.get("strict") {
                if !s.is_boolean() && !s.is_null() {
                    return Err(bad("response_format.json_schema.strict must be a boolean".into()));
                }
            }
            if let Some(n) = js.get("name") {
                if !n.is_string() {
                    return Err(bad("response_format.json_schema.name must be a string".into()));
                }
            }
            match js.get("schema") {
                Some(s) if s.is_object() || s.is_boolean() => Ok(Some(ConstraintSpec::JsonSchema(s.clone()))),
                Some(_) => Err(bad("response_format.json_schema.schema must be a JSON Schema object".into())),
                None => Err(bad("response_format.json_schema has no `schema`".into())),
            }
        }
        Some(other) => Err(bad(format!(
            "response_format type {other:?} is not supported: use \"text\", \"json_object\" or \"json_schema\""
        ))),
    }
}

/// What a chat request's `tools` and `tool_choice` ask for.
pub struct ToolUse {
    /// The template's call format; `None` only under `tool_choice: "none"`, which needs none.
    pub format: Option<Box<dyn ToolFormat>>,
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Several calls in one answer allowed (OpenAI's `parallel_tool_calls`, default true).
    pub parallel: bool,
    /// The `tools` array as sent, for the chat template.
    pub raw: Value,
}

impl ToolUse {
    /// The grammar forcing a call (`required` or a named function); `None` leaves the model free.
    pub fn constraint(&self) -> Option<ConstraintSpec> {
        self.format.as_ref()?.grammar(&self.tools, &self.choice, self.parallel).map(ConstraintSpec::Lark)
    }

    /// Whether the output is parsed for calls: not under `tool_choice: "none"`, where the tools are
    /// shown to the model (as OpenAI does) but what it writes is its answer.
    pub fn parses_calls(&self) -> bool {
        !matches!(self.choice, ToolChoice::None) && self.format.is_some()
    }

    /// The parser of the model's calls, where the output is parsed for them.
    pub fn parser(&self) -> Option<Box<dyn tool_calls::CallParser>> {
        self.format.as_ref().filter(|_| self.parses_calls()).map(|f| f.parser())
    }
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None` when no tools are offered.
pub fn tool_use(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
    template: Option<&ChatTemplate>,
) -> Result<Option<ToolUse>, ApiError> {
    let tools_v = tools.filter(|v| !v.is_null());
    let empty = tools_v.is_none_or(|v| v.as_array().is_some_and(Vec::is_empty));
    if empty {
        if tools_v.is_some_and(|v| !v.is_array()) {
            return Err(ApiError::bad_param("tools", "tools must be an array of function tools"));
        }
        return match tool_choice.filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(c) if c == "none" || c == "auto" => Ok(None),
            Some(_) => Err(ApiError::bad_param("tool_choice", "tool_choice needs a non-empty `tools` list")),
        };
    }
    let raw = tools_v.cloned().unwrap_or(Value::Null);
    let parsed = tool_calls::parse_tools(&raw).map_err(|m| ApiError::bad_param("tools", m))?;
    let choice = tool_calls::parse_tool_choice(tool_choice.filter(|v| !v.is_null()), &parsed)
        .map_err(|m| ApiError::bad_param("tool_choice", m))?;
    let parallel = parallel_tool_calls.unwrap_or(true);
    if !parallel && matches!(choice, ToolChoice::Auto) {
        // Unconstrained text may hold any number of calls; only a forced call can be limited.
        return Err(ApiError::bad_param(
            "parallel_tool_calls",
            "parallel_tool_calls = false needs tool_choice \"required\" or a named function \
             (with \"auto\" the output is not constrained, so one call cannot be promised)",
        ));
    }
    let format = template.and_then(|t| tool_calls::detect(t.source()));
    if matches!(choice, ToolChoice::None) {
        // The tools are shown to the model where its template can (none is parsed or forced).
        return Ok(template.map(|_| ToolUse { format, tools: parsed, choice, parallel, raw }));
    }
    if template.is_none() {
        return Err(ApiError::bad_param("tools", "this model has no chat template, so it has no tool-call format"));
    }
    let Some(format) = format else {
        return Err(ApiError::bad_param(
            "tools",
            "this model's chat template writes no tool-call format kiln knows (Hermes/Qwen2.5 <tool_call>, Llama 3.1 JSON)",
        ));
    };
    Ok(Some(ToolUse { format: Some(format), tools: parsed, choice, parallel, raw }))
}

/// Compiles the constraint (off the async runtime: a large schema takes milliseconds to seconds)
/// and checks that every offered tool's parameter schema can be enforced, so that a bad schema is
/// a 400 whether or not this request happens to constrain the call.
pub fn compile(
    model: &Model,
    spec: Option<&(ConstraintSpec, &'static str)>,
    tools: Option<&ToolUse>,
) -> Result<Option<Constraint>, ApiError> {
    if let Some(t) = tools {
        for tool in &t.tools {
            model.compile_constraint(&ConstraintSpec::JsonSchema(tool.parameters.clone())).map_err(|e| {
                ApiError::bad_param("tools", format!("the parameters of tool {:?} cannot be enforced: {e}", tool.name))
            })?;
        }
    }
    match spec {
        None => Ok(None),
        Some((spec, field)) => model.compile_constraint(spec).map(Some).map_err(|e| {
            let what = match tools {
                Some(ToolUse { format: Some(f), .. }) if *field == "tool_choice" => {
                    format!("{} tool-call grammar", f.name())
                }
                _ => spec.kind().to_string(),
            };
            ApiError::bad_param(field, format!("the {what} cannot be enforced: {e}"))
        }),
    }
}
