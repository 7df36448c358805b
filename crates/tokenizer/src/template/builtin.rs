//! Chat formats selectable by name (`--chat-template NAME`), for files without a
//! `tokenizer.chat_template`. Each produces exactly what llama.cpp's built-in formatter of the same
//! name does (`llm_chat_apply_template`): plain string assembly, no Jinja, no BOS (the tokenizer
//! adds it as the model asks). Only `role` and `content` are read, as there.

use super::ChatMessage;

/// A built-in chat format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    /// One tagged block per message, `{open}{role}{sep}{content}{close}` (contents trimmed where
    /// `trim`), and `{open}assistant{sep}` to invite the answer: chatml, phi3, phi4, falcon3,
    /// zephyr, llama3.
    Tagged {
        open: &'static str,
        sep: &'static str,
        close: &'static str,
        trim: bool,
    },
    /// Llama 2 `[INST]` turns; `sys`: `<<SYS>>` block for the system message (else it is written
    /// as a line of the first turn), `bos`: `<s>` before each later turn, `strip`: contents trimmed.
    Llama2 {
        sys: bool,
        bos: bool,
        strip: bool,
    },
    Gemma,
    /// Mistral v1 / v3 / v3-tekken (`[INST]` turns with the system message inside the first one).
    MistralV1,
    MistralV3,
    MistralV3Tekken,
    /// Mistral v7 (`[SYSTEM_PROMPT]`); `space`: the non-tekken variant's space after each tag.
    MistralV7 {
        space: bool,
    },
    /// Vicuna 1.1; `orca`: the `SYSTEM: ` line variant.
    Vicuna {
        orca: bool,
    },
    Deepseek,
    Deepseek3,
}

/// Names as llama.cpp spells them, in its order.
pub(crate) const BUILTINS: &[(&str, Builtin)] = &[
    ("chatml", Builtin::Tagged { open: "<|im_start|>", sep: "\n", close: "<|im_end|>\n", trim: false }),
    ("llama2", Builtin::Llama2 { sys: false, bos: false, strip: false }),
    ("llama2-sys", Builtin::Llama2 { sys: true, bos: false, strip: false }),
    ("llama2-sys-bos", Builtin::Llama2 { sys: true, bos: true, strip: false }),
    ("llama2-sys-strip", Builtin::Llama2 { sys: true, bos: false, strip: true }),
    ("mistral-v1", Builtin::MistralV1),
    ("mistral-v3", Builtin::MistralV3),
    ("mistral-v3-tekken", Builtin::MistralV3Tekken),
    ("mistral-v7", Builtin::MistralV7 { space: true }),
    ("mistral-v7-tekken", Builtin::MistralV7 { space: false }),
    ("phi3", Builtin::Tagged { open: "<|", sep: "|>\n", close: "<|end|>\n", trim: false }),
    ("phi4", Builtin::Tagged { open: "<|im_start|>", sep: "<|im_sep|>", close: "<|im_end|>", trim: false }),
    ("falcon3", Builtin::Tagged { open: "<|", sep: "|>\n", close: "\n", trim: false }),
    ("zephyr", Builtin::Tagged { open: "<|", sep: "|>\n", close: "<|endoftext|>\n", trim: false }),
    ("gemma", Builtin::Gemma),
    ("vicuna", Builtin::Vicuna { orca: false }),
    ("vicuna-orca", Builtin::Vicuna { orca: true }),
    ("deepseek", Builtin::Deepseek),
    ("deepseek3", Builtin::Deepseek3),
    (
        "llama3",
        Builtin::Tagged { open: "<|start_header_id|>", sep: "<|end_header_id|>\n\n", close: "<|eot_id|>", trim: true },
    ),
];

/// llama.cpp trims with C's `isspace` (ASCII space, \t, \n, \v, \f, \r), not Unicode whitespace.
fn trim(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r'))
}

impl Builtin {
    pub(crate) fn from_name(name: &str) -> Option<Builtin> {
        BUILTINS.iter().find(|(n, _)| *n == name).map(|&(_, b)| b)
    }

    pub(crate) fn name(self) -> &'static str {
        BUILTINS.iter().find(|(_, b)| *b == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// The prompt for `msgs`; `add_ass` appends the header that opens the assistant's turn (the
    /// `[INST]` formats have none: their user turn already ends in `[/INST]`).
    pub(crate) fn render(self, msgs: &[ChatMessage], add_ass: bool) -> String {
        let mut s = String::new();
        // The text after the last message that invites the answer, where the format has one.
        let mut gen_prompt = String::new();
        match self {
            Builtin::Tagged { open, sep, close, trim: t } => {
                for m in msgs {
                    let c = if t { trim(&m.content) } else { &m.content };
                    s += &format!("{open}{}{sep}{c}{close}", m.role);
                }
                gen_prompt = format!("{open}assistant{sep}");
            }
            Builtin::Llama2 { sys, bos, strip } => {
                // The first turn's `[INST] ` is written up front: no BOS there.
                s += "[INST] ";
                let mut in_turn = true;
                for m in msgs {
                    let c = if strip { trim(&m.content) } else { &m.content };
                    if !in_turn {
                        in_turn = true;
                        s += if bos { "<s>[INST] " } else { "[INST] " };
                    }
                    match m.role.as_str() {
                        "system" if sys => s += &format!("<<SYS>>\n{c}\n<</SYS>>\n\n"),
                        "system" => s += &format!("{c}\n"),
                        "user" => s += &format!("{c} [/INST]"),
                        _ => {
                            s += &format!("{c}</s>");
                            in_turn = false;
                        }
                    }
                }
            }
            Builtin::MistralV1 | Builtin::MistralV3 | Builtin::MistralV3Tekken => {
                let lead = if self == Builtin::MistralV1 { " " } else { "" };
                let trail = if self == Builtin::MistralV3Tekken { "" } else { " " };
                let mut in_turn = false;
                for m in msgs {
                    if !in_turn {
                        s += &format!("{lead}[INST]{trail}");
                        in_turn = true;
                    }
                    match m.role.as_str() {
                        "system" => s += &format!("{}\n\n", m.content),
                        "user" => s += &format!("{}{lead}[/INST]", m.content),
                        _ => {
                            let c = if self == Builtin::MistralV3 { trim(&m.content) } else { &m.content };
                            s += &format!("{trail}{c}</s>");
                            in_turn = false;
                        }
                    }
                }
            }
            Builtin::MistralV7 { space } => {
                let sp = if space { " " } else { "" };
                for m in msgs {
                    match m.role.as_str() {
                        "system" => s += &format!("[SYSTEM_PROMPT]{sp}{}[/SYSTEM_PROMPT]", m.content),
                        "user" => s += &format!("[INST]{sp}{}[/INST]", m.content),
                        _ => s += &format!("{sp}{}</s>", m.content),
                    }
                }
            }
            Builtin::Gemma => {
                // Gemma has no system turn: system text is held back and opens the next user
                // (non-model) turn.
                let mut system = String::new();
                for m in msgs {
                    if m.role == "system" {
                        system += trim(&m.content);
                        continue;
                    }
                    let role = if m.role == "assistant" { "model" } else { &m.role };
                    s += &format!("<start_of_turn>{role}\n");
                    if !system.is_empty() && role != "model" {
                        s += &format!("{system}\n\n");
                        system.clear();
                    }
                    s += &format!("{}<end_of_turn>\n", trim(&m.content));
                }
                gen_prompt = "<start_of_turn>model\n".into();
            }
            Builtin::Vicuna { orca } => {
                for m in msgs {
                    match m.role.as_str() {
                        "system" if orca => s += &format!("SYSTEM: {}\n", m.content),
                        "system" => s += &format!("{}\n\n", m.content),
                        "user" => s += &format!("USER: {}\n", m.content),
                        "assistant" => s += &format!("ASSISTANT: {}</s>\n", m.content),
                        _ => {}
                    }
                }
                gen_prompt = "ASSISTANT:".into();
            }
            Builtin::Deepseek => {
                for m in msgs {
                    match m.role.as_str() {
                        "system" => s += &m.content,
                        "user" => s += &format!("### Instruction:\n{}\n", m.content),
                        "assistant" => s += &format!("### Response:\n{}\n<|EOT|>\n", m.content),
                        _ => {}
                    }
                }
                gen_prompt = "### Response:\n".into();
            }
            Builtin::Deepseek3 => {
                for m in msgs {
                    match m.role.as_str() {
                        "system" => s += &format!("{}\n\n", m.content),
                        "user" => s += &format!("<｜User｜>{}", m.content),
                        "assistant" => s += &format!("<｜Assistant｜>{}<｜end▁of▁sentence｜>", m.content),
                        _ => {}
                    }
                }
                gen_prompt = "<｜Assistant｜>".into();
            }
        }
        if add_ass {
            s += &gen_prompt;
        }
        s
    }
}
