use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use kiln_engine::parity;
use kiln_engine::Model;

use crate::common;

#[derive(clap::Args)]
pub struct Args {
    /// Fixture directory (default: ../shared/fixtures/parity).
    pub dir: Option<PathBuf>,
    /// Only fixtures whose file name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
}

pub fn main(a: Args) -> Result<ExitCode> {
    common::set_threads(a.threads)?;
    let dir = common::default_fixture_dir(&a.dir)?;
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for f in parity::fixture_files(&dir)? {
        let name = f.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if a.only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let fixture = parity::load_fixture(&f)?;
        let Some(model_path) =
            parity::resolve_model(&dir, &fixture.model, true).with_context(|| format!("fetching {}", fixture.model))?
        else {
            skipped.push(fixture.model.clone());
            continue;
        };
        let model = Model::load(&model_path)?;
        let t0 = std::time::Instant::now();
        let report = parity::check_model(&model, &fixture, &dir)?;
        eprintln!(
            "kiln: {} — {} cases, {} positions, {:.1} s: {}",
            fixture.model,
            report.cases,
            report.default.positions,
            t0.elapsed().as_secs_f64(),
            if report.passed() { "pass".to_string() } else { report.failures.join("; ") }
        );
        reports.push(report);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", parity::render_table(&reports));
    }
    for s in &skipped {
        eprintln!("kiln: skipped {s}: model file not found");
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        eprintln!("kiln: {failed} of {} models miss a parity bar", reports.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
