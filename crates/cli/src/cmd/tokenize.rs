use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_tokenizer::Tokenizer;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Text to tokenize, or `-` for stdin.
    pub text: String,
    /// Do not add BOS/EOS even if the model asks for them.
    #[arg(long)]
    pub no_bos: bool,
    /// Treat special-token text such as `<|im_start|>` as plain text.
    #[arg(long)]
    pub no_special: bool,
    /// One `id<TAB>piece` line per token.
    #[arg(long)]
    pub pieces: bool,
}

pub fn main(a: Args) -> Result<ExitCode> {
    let path = common::model_path(&a.model)?;
    let g = kiln_engine::Model::open_gguf(&path)?;
    let tok = Tokenizer::from_gguf(&g).with_context(|| format!("{}: tokenizer", path.display()))?;
    let text = if a.text == "-" { common::read_stdin()? } else { a.text.clone() };
    let ids = tok.encode(&text, !a.no_bos, !a.no_special)?;
    if a.pieces {
        for id in &ids {
            let piece = tok.token_to_piece(*id)?;
            println!("{id}\t{}", String::from_utf8_lossy(&piece).escape_debug());
        }
    } else {
        // No tokens (empty text without BOS) print an empty line, as llama.cpp prints an empty list.
        let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("{}", s.join(","));
    }
    Ok(ExitCode::SUCCESS)
}
