//! `kiln diff`: the default path against the exact path (or a dump directory), activation by
//! activation; prints the first activation whose error exceeds its threshold.
//!
//! Exit status: 0 when every activation agrees, 3 when a divergence is found, 1 on errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use kiln_engine::diagnose::{self, diff, dumpdir, Filter};
use kiln_model::{Fault, Precision};

use crate::common;

/// Exit status when a divergence is found (distinct from errors, 1, and usage errors, 2).
pub const EXIT_DIVERGED: u8 = 3;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Token ids, comma-separated (default with a dump directory: the tokens its index lists).
    #[arg(long)]
    pub tokens: Option<String>,
    /// `exact` (the exact path of the same model) or a dump directory (index.json + .npy).
    #[arg(long, default_value = "exact")]
    pub against: String,
    /// Compare the exact path instead of the default one (against a dump directory).
    #[arg(long)]
    pub exact: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Testing only: run the compared path with a deliberate bug.
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

pub fn main(a: Args) -> Result<ExitCode> {
    common::set_threads(a.threads)?;
    let fault = a.inject_fault.as_deref().map(str::parse::<Fault>).transpose().map_err(anyhow::Error::msg)?;
    let given = a.tokens.as_deref().map(common::parse_tokens).transpose()?;
    let against_exact = a.against == "exact";
    if against_exact && a.exact {
        bail!("--exact with --against exact would compare the exact path with itself");
    }
    let dump = if against_exact { None } else { Some(dumpdir::read(std::path::Path::new(&a.against))?) };
    let tokens = match (&given, dump.as_ref().and_then(|d| d.tokens.clone())) {
        (Some(t), Some(d)) if *t != d => bail!("--tokens differ from the tokens in {}/index.json", a.against),
        (Some(t), _) => t.clone(),
        (None, Some(d)) => d,
        (None, None) if against_exact => bail!("--tokens is required"),
        (None, None) => bail!("{}/index.json lists no tokens: give --tokens", a.against),
    };
    if tokens.is_empty() {
        bail!("no tokens to run");
    }
    let model = common::load_model(&a.model, &a.load)?;
    common::check_tokens(&model, &tokens)?;
    // Two captures are held: the compared path's and the reference's.
    crate::cmd::dump::check_capture_memory(&model, &tokens, 2)?;
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let ours = diagnose::capture(&model, &tokens, precision, fault, Filter::all())?;
    let reference = match dump {
        None => diagnose::capture(&model, &tokens, Precision::Exact, None, Filter::all())?,
        Some(d) => {
            if !d.skipped.is_empty() {
                eprintln!(
                    "kiln: skipped {} reference tensors kiln has no counterpart for: {}",
                    d.skipped.len(),
                    d.skipped.join(", ")
                );
            }
            if d.tensors.is_empty() {
                bail!("{}: no activations to compare", a.against);
            }
            d.tensors
        }
    };
    let report = diff::diff(&ours, &reference, &diagnose::THRESHOLDS, tokens.len())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", diff::render(&report));
    }
    Ok(if report.first.is_some() { ExitCode::from(EXIT_DIVERGED) } else { ExitCode::SUCCESS })
}
