use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kiln_gguf::GgufFile;
use kiln_tokenizer::template::{ChatMessage, ChatTemplate};
use kiln_tokenizer::Tokenizer;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// JSON file with `[{"role": "...", "content": "..."}, ...]` (default: one example user turn).
    #[arg(long)]
    pub messages: Option<PathBuf>,
    /// Leave out the assistant header that invites the answer.
    #[arg(long)]
    pub no_generation_prompt: bool,
}

pub fn main(a: Args) -> Result<ExitCode> {
    let path = common::model_path(&a.model)?;
    let g = GgufFile::open(&path).with_context(|| path.display().to_string())?;
    let tok = Tokenizer::from_gguf(&g).with_context(|| format!("{}: tokenizer", path.display()))?;
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    let Some(t) = ChatTemplate::from_gguf(&g, &text(tok.bos()), &text(tok.eos()))? else {
        bail!("{} has no chat template (tokenizer.chat_template); use `kiln run --raw`", path.display());
    };
    let messages: Vec<ChatMessage> = match &a.messages {
        Some(f) => {
            let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            serde_json::from_str(&s)
                .with_context(|| format!("{}: expected a JSON array of {{role, content}}", f.display()))?
        }
        None => vec![ChatMessage { role: "user".into(), content: "Hello!".into() }],
    };
    print!("{}", t.render(&messages, !a.no_generation_prompt)?);
    Ok(ExitCode::SUCCESS)
}
