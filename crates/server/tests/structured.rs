//! Structured outputs end to end: a synth model and SmolLM2 served in-process on a free port,
//! driven by tests/py/test_structured.py (the official `openai` client, answers checked with
//! `jsonschema`) over every schema in tests/schemas/ at temperatures 1 and 0, plus json_object,
//! streaming and the response formats that must be refused with a 400.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::Model;
use kiln_server::{Config, Running};

mod common;

use common::load;

const KEY: &str = "test-key-structured";

fn synth(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/synth");
    assert!(d.is_dir(), "{} is missing: the shared models are required", d.display());
    d.join(format!("synth-tiny-{name}.gguf"))
}

/// SmolLM2, resolved (and fetched) like the CLI's default model; `None` (with a visible SKIPPED
/// line) when it cannot be had.
fn smollm2(test: &str) -> Option<Arc<Model>> {
    match kiln_engine::default_model::ensure() {
        Ok(p) => Some(load(&p)),
        Err(e) => {
            eprintln!("SKIPPED {test}: the default model (SmolLM2) could not be fetched: {e:#}");
            None
        }
    }
}

fn start(model: &Arc<Model>, edit: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = Config::new(model);
    cfg.port = 0;
    cfg.grace = Duration::from_secs(2);
    edit(&mut cfg);
    kiln_server::spawn(model.clone(), cfg).expect("server starts")
}

/// Whether python3 with the `openai` and `jsonschema` packages is there; prints SKIPPED if not.
fn python_ready(test: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai, jsonschema; print(openai.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: the openai or jsonschema Python package is missing \
                 (python3 -m pip install openai jsonschema): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: python3 is not available ({e})");
            false
        }
    }
}

/// Runs tests/py/test_structured.py against `model` served with 4 slots. The schema folder is
/// tests/schemas unless KILN_SCHEMA_DIR names another; KILN_MAX_TOKENS passes through.
fn run_structured(test: &str, model: &Arc<Model>) {
    if !python_ready(test) {
        return;
    }
    let srv = start(model, |c| {
        c.api_key = Some(KEY.into());
        c.parallel = 4;
        c.ctx = 1024;
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let schemas = std::env::var_os("KILN_SCHEMA_DIR").map(PathBuf::from).unwrap_or_else(|| dir.join("schemas"));
    let out = std::process::Command::new("python3")
        .arg(dir.join("py/test_structured.py"))
        .env("KILN_BASE_URL", format!("http://{}/v1", srv.addr))
        .env("KILN_API_KEY", KEY)
        .env("KILN_MODEL", &srv.model_id)
        .env("KILN_SCHEMA_DIR", &schemas)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test}: the structured output tests failed");
    assert!(stdout.contains("ALL PASSED"), "{test}: {stdout}");
    srv.stop().unwrap();
}

#[test]
fn structured_outputs_synth() {
    run_structured("structured_outputs_synth", &load(&synth("Q8_0")));
}

#[test]
fn structured_outputs_smollm2() {
    let Some(model) = smollm2("structured_outputs_smollm2") else { return };
    run_structured("structured_outputs_smollm2", &model);
}
