use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use kiln_gguf::inspect;
use kiln_model::NonFiniteReport;

/// Exit status of `--check` when a tensor holds NaN or infinite values (distinct from errors, 1).
pub const EXIT_NONFINITE: u8 = 3;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file.
    pub model: PathBuf,
    /// One machine-readable JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also scan every tensor for NaN and infinite values (float values, and the scales of
    /// quantized blocks) and list those that have any, with counts; exits 3 if one does.
    #[arg(long)]
    pub check: bool,
}

pub fn main(a: Args) -> Result<ExitCode> {
    let g = kiln_engine::Model::open_gguf(&a.model)?;
    let summary = inspect::Summary::new(&g);
    let report = a.check.then(|| kiln_model::scan_nonfinite(&g));
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let (Some(r), serde_json::Value::Object(o)) = (&report, &mut v) {
            o.insert("check".into(), check_json(r));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", inspect::render_text(&summary));
        if let Some(r) = &report {
            print!("{}", check_text(r, g.tensors.len()));
        }
    }
    Ok(match report {
        Some(r) if !r.is_clean() => ExitCode::from(EXIT_NONFINITE),
        _ => ExitCode::SUCCESS,
    })
}

fn check_json(r: &NonFiniteReport) -> serde_json::Value {
    let tensors: Vec<serde_json::Value> = r
        .tensors
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "type": t.ggml_type.name(),
                "n_elements": t.n_elements,
                "nan": t.nan,
                "inf": t.inf,
            })
        })
        .collect();
    let unchecked: Vec<serde_json::Value> =
        r.unchecked.iter().map(|(n, ty)| serde_json::json!({ "name": n, "type": ty.name() })).collect();
    serde_json::json!({ "nonfinite": tensors, "unchecked": unchecked })
}

fn check_text(r: &NonFiniteReport, n_tensors: usize) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let checked = n_tensors - r.unchecked.len();
    if r.is_clean() {
        let _ = writeln!(o, "\ncheck: every value of the {checked} checked tensors is finite");
    } else {
        let _ = writeln!(o, "\ncheck: {} of {checked} checked tensors have NaN or infinite values", r.tensors.len());
        let width = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &r.tensors {
            let _ = writeln!(
                o,
                "  {:<width$}  {:<6}  {} NaN, {} infinite of {} values",
                t.name,
                t.ggml_type.name(),
                t.nan,
                t.inf,
                t.n_elements
            );
        }
    }
    if !r.unchecked.is_empty() {
        let list: Vec<String> = r.unchecked.iter().map(|(n, ty)| format!("{n} ({})", ty.name())).collect();
        let _ = writeln!(o, "  not checked (types kiln cannot read): {}", list.join(", "));
    }
    o
}
