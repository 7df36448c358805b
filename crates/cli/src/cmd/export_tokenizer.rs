//! `kiln export-tokenizer MODEL DIR`: the model's tokenizer, chat template and shape as Hugging
//! Face's files ([`kiln_engine::hf_files`]), for front ends that tokenize requests themselves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF model.
    pub model: PathBuf,
    /// Directory to write the files into (created if missing; existing files are replaced).
    pub dir: PathBuf,
    /// The name front ends show for the model (config.json `_name_or_path`); default: the
    /// file's `general.name`, else its file name.
    #[arg(long)]
    pub name: Option<String>,
}

pub fn main(a: Args) -> Result<ExitCode> {
    let g = kiln_engine::Model::open_gguf(&a.model)?;
    for p in kiln_engine::hf_files::write_hf_files(&g, &a.model, a.name.as_deref(), &a.dir)? {
        eprintln!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
