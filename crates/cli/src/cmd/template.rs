use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_tokenizer::template::{ChatMessage, ChatTemplate, Json};
use kiln_tokenizer::Tokenizer;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// JSON file with `[{"role": "...", "content": "..."}, ...]` (default: one example user turn);
    /// messages may carry `tool_calls`, `tool_call_id` and `name`.
    #[arg(long)]
    pub messages: Option<PathBuf>,
    /// JSON file with the tool definitions (`[{"type": "function", "function": {...}}, ...]`).
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Leave out the assistant header that invites the answer.
    #[arg(long)]
    pub no_generation_prompt: bool,
    #[command(flatten)]
    pub template: common::TemplateArgs,
}

fn read(f: &PathBuf) -> Result<String> {
    std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
}

pub fn main(a: Args) -> Result<ExitCode> {
    a.template.check()?;
    let path = common::model_path(&a.model)?;
    let g = kiln_engine::Model::open_gguf(&path)?;
    let tok = Tokenizer::from_gguf(&g).with_context(|| format!("{}: tokenizer", path.display()))?;
    let t = match a.template.builtin(Some(&tok))? {
        Some(t) => t,
        None => {
            let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
            match ChatTemplate::from_gguf(&g, &text(tok.bos()), &text(tok.eos()))? {
                Some(t) => t,
                None => bail!(
                    "{} has no chat template (tokenizer.chat_template); give --chat-template NAME",
                    path.display()
                ),
            }
        }
    };
    let messages: Vec<ChatMessage> = match &a.messages {
        Some(f) => serde_json::from_str(&read(f)?)
            .with_context(|| format!("{}: expected a JSON array of {{role, content}}", f.display()))?,
        None => vec![ChatMessage::new("user", "Hello!")],
    };
    let tools = match &a.tools {
        Some(f) => Some(Json::parse(&read(f)?).with_context(|| format!("{}: not JSON", f.display()))?),
        None => None,
    };
    print!("{}", t.render_with_tools(&messages, tools.as_ref(), !a.no_generation_prompt)?);
    Ok(ExitCode::SUCCESS)
}
