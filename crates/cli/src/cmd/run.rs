use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_engine::constraint::ConstraintSpec;
use kiln_engine::{GenerateOptions, Sampler};
use kiln_model::Precision;

use crate::common::{self, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Prompt text (or use -p, or pipe it on stdin).
    #[arg(conflicts_with_all = ["prompt", "tokens"])]
    pub text: Option<String>,
    /// GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    #[arg(short, long, conflicts_with = "tokens")]
    pub prompt: Option<String>,
    /// Feed these token ids as they are (no template, no BOS added).
    #[arg(long, conflicts_with = "raw")]
    pub tokens: Option<String>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message for the chat template.
    #[arg(long, conflicts_with = "raw")]
    pub system: Option<String>,
    #[command(flatten)]
    pub template: common::TemplateArgs,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Context size in tokens (default: the model's, capped at 4096).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Read the weights from the file's memory map instead of a private copy on 2 MiB pages
    /// (quicker start, pages shared with other processes; slower generation: the Q4_0/Q4_K/Q5_K
    /// matrices stay in the file's row layout, not interleaved for the eight-row kernels).
    #[arg(long)]
    pub mmap: bool,
    /// Threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Use the exact reference path (f64 sums) instead of the default fast path.
    #[arg(long)]
    pub exact: bool,
    /// Constrain the output to the JSON Schema in FILE (it then ends when the JSON is complete).
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the output to the grammar in FILE: llama.cpp's GBNF (start symbol `root`), or
    /// llguidance's Lark syntax when the file starts with `%llguidance`.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: common::SpecArgs,
    #[command(flatten)]
    pub backend: common::BackendArgs,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

/// The constraint asked for by `--json-schema` / `--grammar`.
fn constraint_spec(a: &Args) -> Result<Option<ConstraintSpec>> {
    let read = |p: &PathBuf| -> Result<String> {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    if let Some(p) = &a.json_schema {
        let v: serde_json::Value =
            serde_json::from_str(&read(p)?).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", p.display()))?;
        return Ok(Some(ConstraintSpec::JsonSchema(v)));
    }
    if let Some(p) = &a.grammar {
        return Ok(Some(ConstraintSpec::grammar_text(read(p)?)));
    }
    Ok(None)
}

pub fn main(a: Args) -> Result<ExitCode> {
    if a.n_predict == 0 {
        bail!("-n 0 asks for no tokens: give -n 1 or more");
    }
    if a.ctx == Some(0) {
        bail!("--ctx must be at least 1");
    }
    if a.template.chat_template.is_some() && (a.raw || a.tokens.is_some()) {
        bail!("--chat-template applies to a text prompt without --raw");
    }
    a.template.check()?;
    let params = a.sampling.params()?;
    let spec = constraint_spec(&a)?;
    let spec_opts = a.spec.options()?;
    common::set_threads(a.threads)?;
    let pages = common::cpu_weight_pages(a.mmap);
    let (mut model, gpu) = a.backend.load(&a.model, a.mmap, &a.load, a.exact, |m| {
        kiln_engine::GpuModel::session_bytes(&m.weights.cfg, a.ctx.unwrap_or_else(|| m.default_ctx()))
    })?;
    let draft = a.spec.load_draft(&model, pages, &a.load)?;
    let prompt_ids = if let Some(t) = &a.tokens {
        let ids = common::parse_tokens(t)?;
        common::check_tokens(&model, &ids)?;
        ids
    } else {
        let text = match a.text.as_ref().or(a.prompt.as_ref()) {
            Some(t) => t.clone(),
            None => common::read_stdin()?,
        };
        if text.is_empty() {
            bail!("the prompt is empty: give text, -p TEXT, or pipe it on stdin");
        }
        if !a.raw {
            a.template.apply(&mut model, "using the prompt")?;
            if model.template.is_none() && a.system.is_some() {
                bail!("--system needs a chat template, and this model has none (give --chat-template NAME)");
            }
        }
        common::encode_prompt(&model, a.system.as_deref(), &text, a.raw)?
    };
    let n_ctx = a.ctx.unwrap_or_else(|| model.default_ctx());
    if prompt_ids.len() > n_ctx {
        bail!("the prompt has {} tokens but the context holds {n_ctx} (raise --ctx)", prompt_ids.len());
    }
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let mut session = common::session_on(&model, gpu.as_ref(), n_ctx, precision, &ctx_flag(a.ctx, n_ctx))?;
    let mut sampler = Sampler::new(params);
    let mut speculator = common::speculator(spec_opts, draft.as_ref(), n_ctx)?;
    let opts = GenerateOptions {
        max_tokens: a.n_predict.min(n_ctx - prompt_ids.len()),
        stop: a.stop.clone(),
        stop_at_eog: !a.ignore_eos,
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    // Compiled before generating: a schema or grammar that cannot be enforced is an error, never
    // unconstrained output.
    let mut constraint = match &spec {
        None => None,
        Some(spec) => {
            let t0 = std::time::Instant::now();
            model.constraints()?;
            let vocab_ms = t0.elapsed().as_secs_f64() * 1e3;
            let t0 = std::time::Instant::now();
            let c = model.compile_constraint(spec).map_err(|e| {
                let file = a.json_schema.as_ref().or(a.grammar.as_ref()).map(|p| p.display().to_string());
                anyhow::anyhow!("{}: the {} cannot be enforced: {e}", file.unwrap_or_default(), spec.kind())
            })?;
            eprintln!(
                "kiln: constraint vocabulary {vocab_ms:.1} ms | {} compiled in {:.1} ms",
                spec.kind(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            Some(c)
        }
    };
    let mut stdout = std::io::stdout().lock();
    let gen =
        session.generate_with(&prompt_ids, &opts, &mut sampler, constraint.as_mut(), speculator.as_mut(), |text| {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
            !interrupted.load(Ordering::SeqCst)
        })?;
    let _ = writeln!(stdout);
    drop(stdout);
    eprintln!(
        "kiln: load {:.2} s | prompt {} tokens, {:.1} t/s | generated {} tokens, {:.1} t/s | stop: {:?}",
        model.load_seconds,
        gen.prompt_tokens,
        gen.prompt_evaluated as f64 / gen.prompt_seconds.max(1e-9),
        gen.tokens.len(),
        gen.tokens.len() as f64 / gen.gen_seconds.max(1e-9),
        gen.stop_reason
    );
    if let Some(sp) = &speculator {
        eprintln!("kiln: speculation {} (draft-max {}): {}", sp.options.mode, sp.options.draft_max, sp.stats.summary());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a context size came from, for errors about it.
pub fn ctx_flag(given: Option<usize>, n_ctx: usize) -> String {
    match given {
        Some(c) => format!("--ctx {c}"),
        None => format!("the default context ({n_ctx} positions)"),
    }
}
