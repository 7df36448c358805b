//! Hermes-style calls (Qwen2.5, Hermes 2 Pro / 3): each call is a JSON object in tags,
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! possibly several (Qwen's template joins them with `\n`), possibly after some text. Qwen2.5
//! has `<tool_call>` and `</tool_call>` as user-defined tokens (not control), so decoded text
//! contains them.

use super::{
    call_from_json, call_grammar, find_from, partial_marker_len, push_content, CallParser, ParseEvent, Tool,
    ToolChoice, ToolFormat,
};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Templates that write `<tool_call>` around JSON. Qwen3-Coder-style templates also write
/// `<tool_call>`, around an XML `<function=...>` body: a different format, not this one.
pub(super) fn detect(src: &str) -> Option<Box<dyn ToolFormat>> {
    (src.contains(OPEN) && !src.contains("<function=")).then(|| Box::new(Hermes) as Box<dyn ToolFormat>)
}

struct Hermes;

impl ToolFormat for Hermes {
    fn name(&self) -> &'static str {
        "hermes"
    }

    /// Calls exactly as Qwen2.5's template writes them in history, newline-separated; no
    /// whitespace around them (the prompt ends in "assistant\n" and the model starts with the tag).
    fn grammar(&self, tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<String> {
        let open = |name: &str| format!("{OPEN}\n{{\"name\": \"{name}\", \"arguments\": ");
        call_grammar(tools, choice, parallel, "\n", open, &format!("}}\n{CLOSE}"))
    }

    fn parser(&self) -> Box<dyn CallParser> {
        Box::new(HermesParser::default())
    }
}

/// Whitespace right before `<tool_call>` and right after a parsed call is layout, not content;
/// everything else comes out as content, a malformed or unterminated call as its raw text.
#[derive(Default)]
struct HermesParser {
    /// Text not yet given out: held content, or the inside of an open call.
    buf: String,
    /// Inside `<tool_call>`: `buf` is the call's text so far.
    in_call: bool,
    /// Inside a call: how far `buf` has been searched for `</tool_call>`.
    searched: usize,
    /// Whitespace held before the open call: dropped if the call parses, content if not.
    gap: String,
    /// The last thing out was a call: whitespace that follows is dropped.
    after_call: bool,
    calls: usize,
}

impl HermesParser {
    /// One step over `buf`; false once it needs more text.
    fn step(&mut self, out: &mut Vec<ParseEvent>) -> bool {
        if self.in_call {
            return self.close_call(out);
        }
        if self.after_call {
            let ws = self.buf.len() - self.buf.trim_start().len();
            self.buf.drain(..ws);
        }
        if let Some(at) = self.buf.find(OPEN) {
            let text = self.buf[..at].trim_end();
            push_content(out, text);
            self.after_call &= text.is_empty();
            self.gap = self.buf[text.len()..at].to_string();
            self.buf.drain(..at + OPEN.len());
            self.in_call = true;
            self.searched = 0;
            return true;
        }
        // Hold a possible start of the tag, and trailing whitespace (it may precede a call).
        let end = self.buf.len() - partial_marker_len(&self.buf, OPEN);
        let text = self.buf[..end].trim_end();
        push_content(out, text);
        self.after_call &= text.is_empty();
        self.buf.drain(..text.len());
        false
    }

    fn close_call(&mut self, out: &mut Vec<ParseEvent>) -> bool {
        let Some(at) = find_from(&self.buf, CLOSE, self.searched) else {
            self.searched = self.buf.len().saturating_sub(CLOSE.len() - 1);
            return false;
        };
        let body = &self.buf[..at];
        if let Some((name, arguments)) = call_from_json(body, &["arguments"]) {
            out.push(ParseEvent::Call { index: self.calls, name, arguments });
            self.calls += 1;
            self.after_call = true;
        } else {
            push_content(out, &format!("{}{OPEN}{body}{CLOSE}", self.gap));
            self.after_call = false;
        }
        self.buf.drain(..at + CLOSE.len());
        self.gap.clear();
        self.in_call = false;
        true
    }
}

impl CallParser for HermesParser {
    fn push(&mut self, text: &str) -> Vec<ParseEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    fn finish(&mut self) -> Vec<ParseEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.in_call) {
            push_content(&mut out, &format!("{}{OPEN}{rest}", self.gap));
        } else if !self.after_call {
            push_content(&mut out, &rest);
        }
        self.gap.clear();
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
        parse(&Hermes, text)
    }

    const PARIS: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

    #[test]
    fn single_call() {
        assert_eq!(p(PARIS), vec![call(0, "get_weather", r#"{"city":"Paris"}"#)]);
    }

    #[test]
    fn two_calls_and_text_before() {
        let text = format!("Let me check both.\n\n{PARIS}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>\n");
        assert_eq!(
            p(&text),
            vec![
                content("Let me check both."),
                call(0, "get_weather", r#"{"city":"Paris"}"#),
                call(1, "get_time", "{}")
            ]
        );
    }

    #[test]
    fn text_only_is_kept_exactly() {
        for text in ["", "Hello!", "  Hello, <b>world</b> <tool\n", "a < b <tool_cal", "\n\n", "x\n<tool_call"] {
            let want = if text.is_empty() { vec![] } else { vec![content(text)] };
            assert_eq!(p(text), want);
        }
    }

    #[test]
    fn text_after_a_call() {
        assert_eq!(
            p(&format!("{PARIS}\n\nDone <3\n")),
            vec![call(0, "get_weather", r#"{"city":"Paris"}"#), content("Done <3\n")]
        );
    }

    #[test]
    fn malformed_call_is_content() {
        for body in [
            "{\"name\": \"f\", \"arguments\": {\"a\": 1}",
            "{\"arguments\": {}}",
            "not json",
            "{\"name\": \"f\", \"arguments\": 3}",
        ] {
            let text = format!("Hi <tool_call>{body}</tool_call> there");
            assert_eq!(p(&text), vec![content(&text)]);
        }
        // A later good call still counts from 0.
        let text = format!("<tool_call>{{oops</tool_call>\n{PARIS}");
        assert_eq!(
            p(&text),
            vec![content("<tool_call>{oops</tool_call>"), call(0, "get_weather", r#"{"city":"Paris"}"#)]
        );
    }

    #[test]
    fn unterminated_call_is_content() {
        let text = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par";
        assert_eq!(p(text), vec![content(text)]);
        let text = format!("{PARIS}\n<tool_call>\n{{\"name\"");
        assert_eq!(p(&text), vec![call(0, "get_weather", r#"{"city":"Paris"}"#), content("<tool_call>\n{\"name\"")]);
    }

    #[test]
    fn braces_quotes_and_unicode_in_strings() {
        let text = "<tool_call>\n{\"name\": \"say\", \"arguments\": {\"text\": \"}{ \\\"q\\\" </tool \u{1F600} Zürich 東京\"}}\n</tool_call>";
        assert_eq!(p(text), vec![call(0, "say", "{\"text\":\"}{ \\\"q\\\" </tool \u{1F600} Zürich 東京\"}")]);
        let text = "météo: <tool_call>{\"name\": \"météo\", \"arguments\": {\"ville\": \"Besançon\"}}</tool_call>";
        assert_eq!(p(text), vec![content("météo:"), call(0, "météo", "{\"ville\":\"Besançon\"}")]);
    }

    #[test]
    fn arguments_as_a_json_string() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>";
        assert_eq!(p(text), vec![call(0, "f", r#"{"a":1}"#)]);
    }

    #[test]
    fn detection() {
        assert_eq!(detect("{{- '<tool_call>\\n' }}").map(|f| f.name()), Some("hermes"));
        assert!(detect("<tool_call>\n<function=get_weather>").is_none());
    }

    fn tools() -> Vec<Tool> {
        parse_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get-Time"}}
        ]))
        .unwrap()
    }

    #[test]
    fn grammar_none_for_auto_and_none() {
        assert_eq!(Hermes.grammar(&tools(), &ToolChoice::Auto, true), None);
        assert_eq!(Hermes.grammar(&tools(), &ToolChoice::None, true), None);
        assert_eq!(Hermes.grammar(&tools(), &ToolChoice::Function("missing".into()), true), None);
        assert_eq!(Hermes.grammar(&[], &ToolChoice::Required, true), None);
    }

    #[test]
    fn required_grammar() {
        let g = Hermes.grammar(&tools(), &ToolChoice::Required, true).unwrap();
        let time = "<tool_call>\n{\"name\": \"get-Time\", \"arguments\": {}}\n</tool_call>";
        for ok in [
            PARIS.to_string(),
            time.into(),
            format!("{PARIS}\n{time}\n{PARIS}"),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"\\\"}\", \"days\": 3}}\n</tool_call>"
                .into(),
        ] {
            assert!(accepts(&g, &ok), "{ok}");
            // And the parser reads what the grammar lets through.
            assert!(p(&ok).iter().all(|e| matches!(e, ParseEvent::Call { .. })));
        }
        for bad in [
            String::new(),
            "<tool_call>\n{\"name\": \"get_wether\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>".into(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 3}}\n</tool_call>".into(),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 3}}\n</tool_call>".into(),
            format!("Sure! {PARIS}"),
            format!("{PARIS} Done."),
            format!("{PARIS}{PARIS}"),
            PARIS.replace("\"city\": ", "\"city\":"),
        ] {
            assert!(!accepts(&g, &bad), "{bad}");
        }
    }

    #[test]
    fn required_without_parallel_calls_is_one_call() {
        let g = Hermes.grammar(&tools(), &ToolChoice::Required, false).unwrap();
        assert!(accepts(&g, PARIS));
        assert!(!accepts(&g, &format!("{PARIS}\n{PARIS}")));
    }

    #[test]
    fn named_grammar() {
        let g = Hermes.grammar(&tools(), &ToolChoice::Function("get_weather".into()), true).unwrap();
        assert!(accepts(&g, PARIS));
        assert!(!accepts(&g, &format!("{PARIS}\n{PARIS}")));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"get-Time\", \"arguments\": {}}\n</tool_call>"));
    }
}
