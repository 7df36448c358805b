//! Pieces shared by the subcommands: model selection, threads, token lists, sampling flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_engine::{Backend, GpuModel, Model, SamplingParams, Session, WeightPages};
use kiln_model::Precision;
use kiln_tokenizer::template::ChatTemplate;
use kiln_tokenizer::Tokenizer;

/// `-m PATH`, or the default model (fetched on first use).
pub fn model_path(m: &Option<PathBuf>) -> Result<PathBuf> {
    match m {
        Some(p) => {
            if !p.exists() {
                bail!("model file {} does not exist", p.display());
            }
            Ok(p.clone())
        }
        None => kiln_engine::default_model::ensure(),
    }
}

/// The model for the CPU's default path (see [`Model::load`]).
pub fn load_model(m: &Option<PathBuf>, load: &LoadArgs) -> Result<Model> {
    load_model_opts(m, WeightPages::HugePages, load)
}

/// [`load_model`] with the weights where `pages` says and the checks `load` relaxes.
pub fn load_model_opts(m: &Option<PathBuf>, pages: WeightPages, load: &LoadArgs) -> Result<Model> {
    let p = model_path(m)?;
    Model::load_opts(&p, pages, load.allow_nonfinite)
}

/// `--backend` of the commands that run a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(clap::Args, Clone, Debug)]
pub struct BackendArgs {
    /// Where the forward pass runs: `cpu`; `cuda` (an NVIDIA GPU, in builds with `--features
    /// cuda`); `auto`: the GPU when a usable one is present (a line on stderr names it), else
    /// the CPU.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
}

impl BackendArgs {
    /// Loads the model where `--backend` says, with `extra(model)` bytes of GPU memory needed
    /// beside the weights (KV cache, buffers). `exact`: the exact path, which runs on the CPU
    /// only (`auto` then takes the CPU; `cuda` is refused).
    pub fn load(
        &self,
        m: &Option<PathBuf>,
        mmap: bool,
        load: &LoadArgs,
        exact: bool,
        extra: impl FnOnce(&Model) -> usize,
    ) -> Result<(Model, Option<GpuModel>)> {
        let b = match (self.backend, exact) {
            (BackendArg::Cuda, true) => bail!("--exact runs on the CPU only (drop --backend cuda)"),
            (_, true) | (BackendArg::Cpu, _) => Backend::Cpu,
            (BackendArg::Cuda, _) => Backend::Cuda,
            (BackendArg::Auto, _) => Backend::Auto,
        };
        let choice = kiln_engine::backend::choose(b)?;
        if !choice.is_gpu() {
            return Ok((load_model_opts(m, cpu_weight_pages(mmap), load)?, None));
        }
        // The GPU reads the file's layout: no private copy for the CPU kernels.
        let model = load_model_opts(m, WeightPages::Mapped, load)?;
        let bytes = extra(&model);
        match choice.upload(&model, |_| bytes)? {
            Some(gpu) => Ok((model, Some(gpu))),
            // `auto` met a model the GPU cannot run (a notice said so): the CPU's layout after all.
            None if cpu_weight_pages(mmap) != WeightPages::Mapped => {
                drop(model);
                Ok((load_model_opts(m, cpu_weight_pages(mmap), load)?, None))
            }
            None => Ok((model, None)),
        }
    }
}

/// A session of `n_ctx` positions on the GPU when there is one, else on the CPU (checked as
/// [`session`]).
pub fn session_on<'m>(
    model: &'m Model,
    gpu: Option<&'m GpuModel>,
    n_ctx: usize,
    precision: Precision,
    flag: &str,
) -> Result<Session<'m>> {
    match gpu {
        Some(g) => Session::on_gpu(model, n_ctx, g).with_context(|| flag.to_string()),
        None => session(model, n_ctx, precision, flag),
    }
}

/// Flags of every command that loads a model for inference.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LoadArgs {
    /// Load the model even if some weights are NaN or infinite (they are refused by default;
    /// `kiln inspect --check` lists them).
    #[arg(long)]
    pub allow_nonfinite: bool,
}

/// Speculative decoding flags of `run`, `chat` and `serve`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SpecArgs {
    /// Speculative decoding: `ngram` drafts continuations found earlier in the prompt or output,
    /// `draft` asks a draft model (--model-draft), `off` decodes one token per step. Drafted
    /// tokens are kept only where the model would have produced them: greedy output is
    /// identical, sampled output has the same distribution. [default: draft with
    /// --model-draft, else ngram]
    #[arg(long, value_name = "MODE")]
    pub spec: Option<kiln_engine::speculative::SpecMode>,
    /// Most drafted tokens per verification (fewer when the measured acceptance does not pay
    /// for them; at most 14).
    #[arg(long, value_name = "N", default_value_t = kiln_engine::speculative::DEFAULT_DRAFT_MAX)]
    pub draft_max: usize,
    /// Draft model for --spec draft: a smaller model with the same vocabulary (in `serve`, each
    /// slot gets its own KV cache for it).
    #[arg(long = "model-draft", value_name = "FILE")]
    pub model_draft: Option<PathBuf>,
}

impl SpecArgs {
    pub fn options(&self) -> Result<kiln_engine::speculative::SpecOptions> {
        use kiln_engine::speculative::{SpecMode, SpecOptions};
        let mode = self.spec.unwrap_or(if self.model_draft.is_some() { SpecMode::Draft } else { SpecMode::Ngram });
        if mode == SpecMode::Draft && self.model_draft.is_none() {
            bail!("--spec draft needs a draft model: give --model-draft FILE");
        }
        if mode != SpecMode::Draft && self.model_draft.is_some() {
            bail!("--model-draft is used by --spec draft, not --spec {mode}");
        }
        let o = SpecOptions { mode, draft_max: self.draft_max };
        o.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(o)
    }

    /// The draft model, loaded and checked against `model`'s vocabulary.
    pub fn load_draft(&self, model: &Model, pages: WeightPages, load: &LoadArgs) -> Result<Option<Model>> {
        let Some(p) = &self.model_draft else { return Ok(None) };
        if !p.exists() {
            bail!("draft model file {} does not exist", p.display());
        }
        let draft = Model::load_opts(p, pages, load.allow_nonfinite)?;
        kiln_engine::speculative::check_vocabulary(model, &draft)?;
        Ok(Some(draft))
    }
}

/// A sequence's speculator for `opts` (`None` when off), with its draft model's cache.
pub fn speculator<'m>(
    opts: kiln_engine::speculative::SpecOptions,
    draft: Option<&'m Model>,
    n_ctx: usize,
) -> Result<Option<kiln_engine::speculative::Speculator<'m>>> {
    let draft = match draft {
        Some(d) if opts.mode == kiln_engine::speculative::SpecMode::Draft => {
            Some(kiln_engine::speculative::DraftModel::new(d, n_ctx).context("the draft model's KV cache")?)
        }
        _ => None,
    };
    kiln_engine::speculative::Speculator::new(opts, draft)
}

/// The weights of a CPU run: a private copy on huge pages unless `--mmap` was given.
pub fn cpu_weight_pages(mmap: bool) -> WeightPages {
    if mmap {
        WeightPages::Mapped
    } else {
        WeightPages::HugePages
    }
}

/// Most threads `-t` accepts: far above any core count kiln runs on, low enough that a typo
/// (`-t 100000`) cannot exhaust the process's threads.
pub const MAX_THREADS: usize = 1024;

/// Sizes the global thread pool; 0 means one thread per available core. More threads than cores
/// is allowed with a warning: the forward pass splits every operation among all threads and waits
/// for the last, so extra threads only queue for the cores (`-t 1000` on 2 cores: ~200× slower).
pub fn set_threads(threads: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).ok();
    if threads > MAX_THREADS {
        bail!("-t {threads}: at most {MAX_THREADS} threads (this machine has {} cores)", describe_cores(cores));
    }
    if let Some(c) = cores.filter(|&c| threads > c) {
        eprintln!(
            "kiln: warning: -t {threads} starts more threads than the {c} available cores; the extra threads \
             only wait for a core, and every step waits for the slowest (omit -t for one thread per core)"
        );
    }
    let n = if threads == 0 { cores.unwrap_or(1) } else { threads };
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the thread pool")
}

fn describe_cores(cores: Option<usize>) -> String {
    cores.map_or_else(|| "an unknown number of".to_string(), |c| c.to_string())
}

/// A session of `n_ctx` positions after checking that its KV cache fits ([`Session::try_new`]);
/// `flag` names where the size came from (`--ctx 100000`), for the error.
pub fn session<'m>(model: &'m Model, n_ctx: usize, precision: Precision, flag: &str) -> Result<Session<'m>> {
    Session::try_new(model, n_ctx, precision).with_context(|| flag.to_string())
}

/// Fails with a one-line error when `what` (`bytes` of it, `None` if the size overflowed) exceeds
/// the memory available now; `flag` names where the size came from.
pub fn check_memory(flag: &str, what: &str, bytes: Option<u64>) -> Result<()> {
    let Some(bytes) = bytes else { bail!("{flag}: {what} overflows the address space") };
    if let Some(available) = kiln_model::available_memory().filter(|&a| bytes > a) {
        bail!(
            "{flag}: {what} would take {}; {} of memory are available",
            kiln_model::human_bytes(bytes),
            kiln_model::human_bytes(available)
        );
    }
    Ok(())
}

/// Checks, before anything is allocated, that a pass over `n` positions from an empty cache fits in
/// memory: its KV cache, plus with `all_logits` the logits of every position (and `extra` bytes of
/// what else the command keeps, e.g. captured activations). `flag` names where `n` came from.
pub fn check_pass_memory(model: &Model, n: usize, all_logits: bool, extra: Option<u64>, flag: &str) -> Result<()> {
    let kv = kiln_model::check_kv_memory(&model.weights.cfg, n, 1).with_context(|| flag.to_string())?;
    if !all_logits {
        return Ok(());
    }
    let total = logits_bytes(model, n).and_then(|l| l.checked_add(kv)).and_then(|t| t.checked_add(extra?));
    let n_vocab = model.weights.cfg.n_vocab;
    let what = match extra {
        Some(0) => format!("the KV cache and the logits of {n} positions × {n_vocab} tokens"),
        _ => format!("the KV cache, the logits of {n} positions × {n_vocab} tokens and the activations kept"),
    };
    check_memory(flag, &what, total)
}

/// The memory of `n` positions' logits (`Logits::All`), which some commands hold at once.
pub fn logits_bytes(model: &Model, n: usize) -> Option<u64> {
    (n as u64).checked_mul(model.weights.cfg.n_vocab as u64)?.checked_mul(4)
}

/// Parses `1,2,3` (spaces allowed).
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let v: Result<Vec<u32>> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().with_context(|| format!("invalid token id {p:?} in --tokens")))
        .collect();
    let v = v?;
    if v.is_empty() {
        bail!("--tokens is empty");
    }
    Ok(v)
}

pub fn check_tokens(model: &Model, tokens: &[u32]) -> Result<()> {
    let n = model.weights.cfg.n_vocab;
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n) {
        bail!("token id {t} is out of range (the vocabulary has {n} tokens, ids 0..{})", n - 1);
    }
    Ok(())
}

/// Reads all of stdin as UTF-8.
pub fn read_stdin() -> Result<String> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
    String::from_utf8(buf)
        .map_err(|e| anyhow::anyhow!("stdin is not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()))
}

#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1: all).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P × the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise repeats of the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed: the same seed and inputs give the same output.
    #[arg(long, default_value_t = 0xC0FFEE)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            penalty_last_n: self.repeat_last_n,
            seed: self.seed,
        };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

/// The fixture directory: the argument, else `../shared/fixtures/parity` or `shared/fixtures/parity`.
pub fn default_fixture_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(d.clone());
    }
    for c in ["../shared/fixtures/parity", "shared/fixtures/parity"] {
        if Path::new(c).is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    bail!("no fixture directory given and ../shared/fixtures/parity not found")
}

/// `--chat-template NAME`, shared by run, chat, serve and template.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TemplateArgs {
    /// Use llama.cpp's built-in chat format NAME instead of the file's template (for models
    /// without one): chatml, llama2, llama2-sys, llama3, gemma, mistral-v7, phi3, zephyr, ...
    #[arg(long = "chat-template", value_name = "NAME")]
    pub chat_template: Option<String>,
}

impl TemplateArgs {
    /// Fails on an unknown name (listing the known ones) before anything slow is done.
    pub fn check(&self) -> Result<()> {
        self.builtin(None).map(|_| ())
    }

    /// The built-in template asked for, with `tok`'s BOS/EOS texts; `None` without the flag.
    pub fn builtin(&self, tok: Option<&Tokenizer>) -> Result<Option<ChatTemplate>> {
        let Some(name) = &self.chat_template else { return Ok(None) };
        let text = |id: Option<u32>| id.and_then(|i| tok?.token_text(i)).unwrap_or("").to_string();
        let (bos, eos) = (text(tok.and_then(|t| t.bos())), text(tok.and_then(|t| t.eos())));
        Ok(Some(ChatTemplate::builtin(name, &bos, &eos).context("--chat-template")?))
    }

    /// Puts the built-in template asked for in place of the file's; says on stderr when the model
    /// ends up with none, so that `what` (the prompt, the messages) goes in as plain text.
    pub fn apply(&self, model: &mut Model, what: &str) -> Result<()> {
        if let Some(t) = self.builtin(Some(&model.tokenizer))? {
            model.template = Some(t);
        }
        if model.template.is_none() {
            eprintln!("kiln: {}", no_template_notice(&model.path, what));
        }
        Ok(())
    }
}

/// The one-line notice for a model without a chat template.
pub fn no_template_notice(path: &Path, what: &str) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    format!(
        "{name} has no chat template; {what} as plain text (give --chat-template NAME, e.g. chatml, for a chat format)"
    )
}

/// Encodes a user prompt: through the chat template unless `raw` or the model has none.
pub fn encode_prompt(model: &Model, system: Option<&str>, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    use kiln_tokenizer::template::ChatMessage;
    let tok = &model.tokenizer;
    match (&model.template, raw) {
        (Some(t), false) => {
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", prompt));
            let text = t.render(&msgs, true)?;
            encode_rendered(model, &text)
        }
        _ => Ok(tok.encode(prompt, true, false)?),
    }
}

/// Tokenizes a rendered chat prompt: specials parsed, BOS added as the model asks unless the
/// template already wrote it (avoids llama.cpp's double-BOS pitfall).
pub fn encode_rendered(model: &Model, text: &str) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    let mut ids = tok.encode(text, false, true)?;
    if let Some(bos) = tok.bos() {
        if tok.add_bos() && ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}
