use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_engine::{GenerateOptions, Sampler};
use kiln_model::Precision;
use kiln_tokenizer::template::ChatMessage;

use crate::common::{self, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// System message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    pub n_predict: usize,
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Read the weights from the file's memory map instead of a private copy on 2 MiB pages
    /// (quicker start, pages shared with other processes; slower generation: the Q4_0/Q4_K/Q5_K
    /// matrices stay in the file's row layout, not interleaved for the eight-row kernels).
    #[arg(long)]
    pub mmap: bool,
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub template: common::TemplateArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: common::SpecArgs,
    /// After each answer, print its speed and the speculation's acceptance on stderr.
    #[arg(short, long)]
    pub verbose: bool,
    #[command(flatten)]
    pub backend: common::BackendArgs,
    #[command(flatten)]
    pub load: common::LoadArgs,
}

const HELP: &str = "commands: /reset (new conversation), /raw (toggle the chat template), /exit";

pub fn main(a: Args) -> Result<ExitCode> {
    a.template.check()?;
    let params = a.sampling.params()?;
    let spec_opts = a.spec.options()?;
    common::set_threads(a.threads)?;
    let pages = common::cpu_weight_pages(a.mmap);
    let (mut model, gpu) = a.backend.load(&a.model, a.mmap, &a.load, a.exact, |m| {
        kiln_engine::GpuModel::session_bytes(&m.weights.cfg, a.ctx.unwrap_or_else(|| m.default_ctx()).max(1))
    })?;
    let draft = a.spec.load_draft(&model, pages, &a.load)?;
    // Without a template, each line continues the transcript as plain text (raw mode).
    a.template.apply(&mut model, "your lines continue the transcript")?;
    let n_ctx = a.ctx.unwrap_or_else(|| model.default_ctx()).max(1);
    let precision = if a.exact { Precision::Exact } else { Precision::Fast };
    let mut session =
        common::session_on(&model, gpu.as_ref(), n_ctx, precision, &crate::cmd::run::ctx_flag(a.ctx, n_ctx))?;
    let mut sampler = Sampler::new(params);
    let mut speculator = common::speculator(spec_opts, draft.as_ref(), n_ctx)?;
    let mut raw = model.template.is_none();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C stops the current answer; at the prompt, Ctrl-D or /exit leaves.
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s.as_str()));
    }
    eprintln!("kiln chat — {} ({HELP})", model.path.display());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let Some(line) = lines.next() else { break };
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("kiln: input is not valid UTF-8 ({e}); line ignored");
                continue;
            }
        };
        let input = line.trim_end();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                sampler.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            "/raw" => {
                if model.template.is_none() {
                    eprintln!("(this model has no chat template: raw mode only)");
                } else {
                    raw = !raw;
                    eprintln!("(chat template {})", if raw { "off: raw text mode" } else { "on" });
                }
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        let prompt: Vec<u32> = if raw {
            let mut p = session.tokens.clone();
            let add_special = p.is_empty();
            p.extend(model.tokenizer.encode(input, add_special, false)?);
            p
        } else {
            messages.push(ChatMessage::new("user", input));
            let text = model.template.as_ref().context("no chat template")?.render(&messages, true)?;
            common::encode_rendered(&model, &text)?
        };
        if prompt.len() >= n_ctx {
            eprintln!(
                "kiln: the conversation ({} tokens) fills the context ({n_ctx}); /reset to start over",
                prompt.len()
            );
            if !raw {
                messages.pop();
            }
            continue;
        }
        // With --mmap the weights are the file's pages: a file rewritten or truncated since the
        // last turn would answer with garbage (or SIGBUS); the conversation ends instead.
        model.check_file_unchanged()?;
        interrupted.store(false, Ordering::SeqCst);
        let opts =
            GenerateOptions { max_tokens: a.n_predict.min(n_ctx - prompt.len()), stop: Vec::new(), stop_at_eog: true };
        let mut stdout = std::io::stdout().lock();
        let before = speculator.as_ref().map(|s| s.stats).unwrap_or_default();
        let result = session.generate_with(&prompt, &opts, &mut sampler, None, speculator.as_mut(), |t| {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
            !interrupted.load(Ordering::SeqCst)
        });
        let _ = writeln!(stdout);
        drop(stdout);
        match result {
            Ok(g) => {
                if !raw {
                    messages.push(ChatMessage::new("assistant", g.text.as_str()));
                }
                if g.stop_reason == kiln_engine::StopReason::Cancelled {
                    eprintln!("(stopped)");
                }
                if a.verbose {
                    let mut line = format!(
                        "(prompt {} tokens, {} evaluated | generated {} tokens, {:.1} t/s",
                        g.prompt_tokens,
                        g.prompt_evaluated,
                        g.tokens.len(),
                        g.tokens.len() as f64 / g.gen_seconds.max(1e-9)
                    );
                    if let Some(sp) = &speculator {
                        let mut turn = sp.stats;
                        turn.verifications -= before.verifications;
                        turn.drafted -= before.drafted;
                        turn.accepted -= before.accepted;
                        line += &format!(" | speculation {}: {}", sp.options.mode, turn.summary());
                    }
                    eprintln!("{line})");
                }
            }
            Err(e) => eprintln!("kiln: error: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
