//! Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole assistant answer is the call,
//!
//! ```text
//! {"name": "get_weather", "parameters": {"city": "Paris"}}
//! ```
//!
//! as the official templates write a call in history. Llama 3.1 may put `<|python_tag|>` first
//! (its code-interpreter marker; a control token, which kiln's decoder drops, so it only shows
//! when a vocabulary has it as text), Llama 3.2 also writes `{"type": "function", "name": ..,
//! "parameters": ..}`, and several calls are joined by `;`. A call only counts at the start of
//! the answer: JSON later in prose is content.

use super::{
    call_from_json, call_grammar, push_content, CallParser, JsonEnd, ParseEvent, Tool, ToolChoice, ToolFormat,
};

const PYTHON_TAG: &str = "<|python_tag|>";

/// The keys a call object may start with; another first key means the JSON is an answer.
const CALL_KEYS: [&str; 4] = ["name", "type", "parameters", "arguments"];

/// Llama 3.1+ templates have the `ipython` role for tool results (Llama 3.0's has no tools).
pub(super) fn detect(src: &str) -> Option<Box<dyn ToolFormat>> {
    src.contains("<|start_header_id|>ipython<|end_header_id|>").then(|| Box::new(Llama3) as Box<dyn ToolFormat>)
}

struct Llama3;

impl ToolFormat for Llama3 {
    fn name(&self) -> &'static str {
        "llama3"
    }

    /// Bare JSON as the template writes a call, `; `-joined. No `<|python_tag|>`: it is a control
    /// token, which a text literal would make the model spell out in pieces.
    fn grammar(&self, tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<String> {
        let open = |name: &str| format!("{{\"name\": \"{name}\", \"parameters\": ");
        // Meta's Llama 3.1 template refuses a turn with several calls: one call per answer.
        let _ = parallel;
        call_grammar(tools, choice, false, "; ", open, "}")
    }

    fn parser(&self) -> Box<dyn CallParser> {
        Box::new(Llama3Parser::default())
    }
}

#[derive(Default, PartialEq)]
enum State {
    /// Nothing decided yet: leading whitespace and a possible `<|python_tag|>` are held.
    #[default]
    Start,
    /// In a call's JSON, which starts at `json_at` in the buffer.
    Call,
    /// After a call: whitespace and `;` are held, another call may follow.
    Between,
    /// Content: everything passes through.
    Text,
}

#[derive(Default)]
struct Llama3Parser {
    state: State,
    /// Held text; in a call, its raw text from the start (given out as content if it fails).
    buf: String,
    json_at: usize,
    end: JsonEnd,
    /// In a call: its first key has been seen and is a call key.
    key_ok: bool,
    calls: usize,
}

impl Llama3Parser {
    /// One step over `buf`; false once it needs more text.
    fn step(&mut self, out: &mut Vec<ParseEvent>) -> bool {
        match self.state {
            State::Start | State::Between => self.call_start(),
            State::Call => self.call_end(out),
            State::Text => {
                push_content(out, &std::mem::take(&mut self.buf));
                false
            }
        }
    }

    /// Decides whether a call starts: `[<|python_tag|>] {` after whitespace (and, between
    /// calls, `;`).
    fn call_start(&mut self) -> bool {
        let between = self.state == State::Between;
        let rest = self.buf.trim_start_matches(|c: char| c.is_whitespace() || (between && c == ';'));
        let lead = self.buf.len() - rest.len();
        let after = match rest.strip_prefix(PYTHON_TAG) {
            Some(after) => after.trim_start(),
            None if PYTHON_TAG.starts_with(rest) => return false,
            None => rest,
        };
        if after.is_empty() {
            return false;
        }
        let is_call = after.starts_with('{');
        let json_at = self.buf.len() - after.len();
        // Separators after a call are layout: dropped whatever follows.
        let dropped = if between { lead } else { 0 };
        self.buf.drain(..dropped);
        if is_call {
            self.json_at = json_at - dropped;
            self.state = State::Call;
            self.end = JsonEnd::default();
            self.key_ok = false;
        } else {
            self.state = State::Text;
        }
        true
    }

    fn call_end(&mut self, out: &mut Vec<ParseEvent>) -> bool {
        let json = &self.buf[self.json_at..];
        if !self.key_ok {
            match call_key(json) {
                Some(true) => self.key_ok = true,
                Some(false) => {
                    self.state = State::Text;
                    return true;
                }
                None => {}
            }
        }
        let Some(len) = self.end.feed(json) else { return false };
        let Some((name, arguments)) = call_from_json(&json[..len], &["parameters", "arguments"]) else {
            self.state = State::Text;
            return true;
        };
        out.push(ParseEvent::Call { index: self.calls, name, arguments });
        self.calls += 1;
        self.buf.drain(..self.json_at + len);
        self.state = State::Between;
        true
    }
}

/// Whether the object `json` (which starts with `{`) can be a call, from its first key:
/// `Some(true)` once that key is complete and a call key, `Some(false)` as soon as it cannot be
/// one, `None` until then. This streams a JSON answer out as soon as it is clearly not a call.
fn call_key(json: &str) -> Option<bool> {
    let rest = json.get(1..)?.trim_start();
    if rest.is_empty() {
        return None;
    }
    let Some(key) = rest.strip_prefix('"') else { return Some(false) };
    match key.find('"') {
        Some(q) => Some(CALL_KEYS.contains(&&key[..q])),
        None if CALL_KEYS.iter().any(|k| k.starts_with(key)) => None,
        None => Some(false),
    }
}

impl CallParser for Llama3Parser {
    fn push(&mut self, text: &str) -> Vec<ParseEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    fn finish(&mut self) -> Vec<ParseEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        let rest = match self.state {
            // Only separators left after the last call.
            State::Between => rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';'),
            _ => &rest,
        };
        push_content(&mut out, rest);
        self.state = State::Text;
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{accepts, call, content, parse};
    use super::super::{detect, parse_tools};
    use super::*;

    fn p(text: &str) -> Vec<ParseEvent> {
        parse(&Llama3, text)
    }

    const PARIS: &str = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    const PARIS_ARGS: &str = r#"{"city":"Paris"}"#;

    #[test]
    fn bare_json_call() {
        assert_eq!(p(PARIS), vec![call(0, "get_weather", PARIS_ARGS)]);
        assert_eq!(p(&format!("\n\n {PARIS}\n")), vec![call(0, "get_weather", PARIS_ARGS)]);
    }

    #[test]
    fn python_tag_prefix() {
        assert_eq!(p(&format!("<|python_tag|>{PARIS}")), vec![call(0, "get_weather", PARIS_ARGS)]);
        assert_eq!(p(&format!(" <|python_tag|>\n{PARIS}")), vec![call(0, "get_weather", PARIS_ARGS)]);
        // Llama 3.1's built-in tool syntax is not a JSON call: kept as text.
        let builtin = "<|python_tag|>brave_search.call(query=\"Paris\")";
        assert_eq!(p(builtin), vec![content(builtin)]);
        assert_eq!(p("<|python_t"), vec![content("<|python_t")]);
    }

    #[test]
    fn semicolon_separated_calls() {
        let two = format!(r#"{PARIS}; {{"name": "get_time", "parameters": {{}}}}"#);
        assert_eq!(p(&two), vec![call(0, "get_weather", PARIS_ARGS), call(1, "get_time", "{}")]);
        let three = format!("{PARIS};\n{PARIS} ;{PARIS};");
        assert_eq!(
            p(&three),
            vec![
                call(0, "get_weather", PARIS_ARGS),
                call(1, "get_weather", PARIS_ARGS),
                call(2, "get_weather", PARIS_ARGS)
            ]
        );
    }

    #[test]
    fn type_function_form() {
        let text = r#"{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}"#;
        assert_eq!(p(text), vec![call(0, "get_weather", PARIS_ARGS)]);
        let text = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
        assert_eq!(p(text), vec![call(0, "get_weather", PARIS_ARGS)]);
    }

    #[test]
    fn prose_then_json_is_content() {
        for text in [
            format!("Here is the call: {PARIS}"),
            format!("Sure.\n\n{PARIS}"),
            "The weather in Paris is sunny.".to_string(),
            "  indented answer\n".to_string(),
            "<b>bold</b>".to_string(),
            "\n\n".to_string(),
        ] {
            assert_eq!(p(&text), vec![content(&text)]);
        }
    }

    #[test]
    fn json_answers_that_are_not_calls() {
        for text in [
            r#"{"answer": 42}"#,
            r#" {"name": "Bob", "age": 3}"#,
            "{}",
            "{ 1 }",
            r#"{"nam"#,
            "{\"name\": \"f\", \"parameters\": [1]}",
        ] {
            assert_eq!(p(text), vec![content(text)]);
        }
        // A non-call key is decided at once: the answer streams.
        let mut parser = Llama3.parser();
        assert_eq!(parser.push(r#"{"a"#), vec![]);
        assert_eq!(parser.push("n"), vec![content(r#"{"an"#)]);
        assert_eq!(parser.push(r#"swer": 4}"#), vec![content(r#"swer": 4}"#)]);
    }

    #[test]
    fn malformed_and_unterminated_calls_are_content() {
        let text = r#"{"name": "get_weather", "parameters": {"city": "Par"#;
        assert_eq!(p(text), vec![content(text)]);
        let text = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": Paris}}"#;
        assert_eq!(p(text), vec![content(text)]);
        let text = format!("{PARIS}; {{\"name\": \"f\"");
        assert_eq!(p(&text), vec![call(0, "get_weather", PARIS_ARGS), content("{\"name\": \"f\"")]);
        let text = format!("{PARIS}\nI called it.");
        assert_eq!(p(&text), vec![call(0, "get_weather", PARIS_ARGS), content("I called it.")]);
    }

    #[test]
    fn braces_quotes_and_unicode_in_strings() {
        let text = r#"{"name": "echo", "parameters": {"t": "}}{ \"q\\\" ,\\", "u": "Zürich 😀 東京"}}"#;
        assert_eq!(p(text), vec![call(0, "echo", r#"{"t":"}}{ \"q\\\" ,\\","u":"Zürich 😀 東京"}"#)]);
    }

    /// The parts of Meta's Llama 3.1 template (tokenizer_config.json) that tell the format.
    const LLAMA31_EXCERPT: &str = r#"{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}"#;

    #[test]
    fn detection() {
        assert_eq!(detect(LLAMA31_EXCERPT).map(|f| f.name()), Some("llama3"));
    }

    fn tools() -> Vec<Tool> {
        parse_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "Get-time"}}
        ]))
        .unwrap()
    }

    #[test]
    fn required_grammar() {
        let g = Llama3.grammar(&tools(), &ToolChoice::Required, true).unwrap();
        let time = r#"{"name": "Get-time", "parameters": {}}"#;
        for ok in [
            PARIS.to_string(),
            time.into(),
            r#"{"name": "get_weather", "parameters": {"city": "{\"x\"}", "unit": "f"}}"#.into(),
        ] {
            assert!(accepts(&g, &ok), "{ok}");
            assert!(p(&ok).iter().all(|e| matches!(e, ParseEvent::Call { .. })));
        }
        for bad in [
            String::new(),
            // One call per turn: Meta's template refuses several.
            format!("{PARIS}; {time}"),
            r#"{"name": "get_weathers", "parameters": {"city": "Paris"}}"#.into(),
            r#"{"name": "get_weather", "parameters": {"unit": "c"}}"#.into(),
            r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "k"}}"#.into(),
            format!("Calling: {PARIS}"),
            format!("{PARIS} ok"),
            format!("<|python_tag|>{PARIS}"),
            r#"{"name":"get_weather","parameters":{"city":"Paris"}}"#.into(),
        ] {
            assert!(!accepts(&g, &bad), "{bad}");
        }
    }

    #[test]
    fn named_grammar() {
        let g = Llama3.grammar(&tools(), &ToolChoice::Function("Get-time".into()), true).unwrap();
        assert!(accepts(&g, r#"{"name": "Get-time", "parameters": {}}"#));
        assert!(!accepts(&g, PARIS));
        assert!(!accepts(&g, r#"{"name": "Get-time", "parameters": {}}; {"name": "Get-time", "parameters": {}}"#));
        assert_eq!(Llama3.grammar(&tools(), &ToolChoice::Auto, true), None);
    }
}
