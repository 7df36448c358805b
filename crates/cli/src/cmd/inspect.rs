use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_gguf::{inspect, GgufFile};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file.
    pub model: PathBuf,
    /// One machine-readable JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: Args) -> Result<ExitCode> {
    let g = GgufFile::open(&a.model).with_context(|| a.model.display().to_string())?;
    let summary = inspect::Summary::new(&g);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", inspect::render_text(&summary));
    }
    Ok(ExitCode::SUCCESS)
}
