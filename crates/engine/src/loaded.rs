//! A model file opened for inference: its weights, tokenizer and chat template.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use kiln_gguf::GgufFile;
use kiln_model::ModelWeights;
use kiln_tokenizer::template::ChatTemplate;
use kiln_tokenizer::Tokenizer;

use crate::constraint::{Constraint, ConstraintCompiler, ConstraintSpec};

pub struct Model {
    pub path: PathBuf,
    pub gguf: &'static GgufFile,
    pub weights: ModelWeights<'static>,
    pub tokenizer: Tokenizer,
    /// `None` when the file has no chat template (raw-prompt mode).
    pub template: Option<ChatTemplate>,
    pub load_seconds: f64,
    /// The vocabulary as the constraint engine sees it, built on first use.
    constraints: OnceLock<Result<ConstraintCompiler, String>>,
}

/// Where the weights are read from after loading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightPages {
    /// The file's memory map (page-cache pages, shared with other processes): the quickest load;
    /// the row-at-a-time kernels read the file's layout (for Q4_0/Q4_K/Q5_K their f32 sums run in
    /// another order than the interleaved kernels', so logits can differ in the last bits).
    Mapped,
    /// A private copy on 2 MiB pages where the kernel allows ([`GgufFile::copy_data_to_huge_pages`]):
    /// one more read of the file at load, fewer TLB misses while generating on the CPU, and the
    /// Q4_0/Q4_K/Q5_K matrices woven for the eight-row generation kernels
    /// ([`kiln_model::interleave_matrices`]). CPU only: other backends read the file's layout.
    #[default]
    HugePages,
}

impl Model {
    /// Opens and validates `path` for the CPU's default path: the weights in a private copy
    /// ([`WeightPages::HugePages`], interleaved where the generation kernels want it).
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, WeightPages::HugePages)
    }

    /// Opens and validates `path`, refusing weights with NaN or infinite values (see
    /// [`Model::load_opts`]). The file stays memory-mapped (or its copy resident) for the rest of
    /// the process: a model is loaded once and used until exit (CLI, server), which lets the
    /// weights borrow from it.
    pub fn load_with(path: &Path, pages: WeightPages) -> Result<Model> {
        Model::load_opts(path, pages, false)
    }

    /// [`Model::load_with`], loading weights with NaN or infinite values too when
    /// `allow_nonfinite` (`--allow-nonfinite`; a warning on stderr says which tensors).
    /// Every tensor is scanned at load ([`kiln_model::scan_nonfinite`]: the float values, and the
    /// scales of the quantized blocks, in parallel).
    pub fn load_opts(path: &Path, pages: WeightPages, allow_nonfinite: bool) -> Result<Model> {
        let t0 = std::time::Instant::now();
        let mut gguf = Model::open_gguf(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf).with_context(|| format!("{}: tokenizer", path.display()))?;
        let bos = tokenizer.bos().and_then(|id| tokenizer.token_text(id)).unwrap_or("").to_string();
        let eos = tokenizer.eos().and_then(|id| tokenizer.token_text(id)).unwrap_or("").to_string();
        let template =
            ChatTemplate::from_gguf(&gguf, &bos, &eos).with_context(|| format!("{}: chat template", path.display()))?;
        // The tokenizer has its own tables now: the metadata's copies of the vocabulary and merges,
        // and the map's pages they were parsed from, would only hold resident memory for the rest
        // of the run.
        gguf.release_arrays_longer_than(1024);
        gguf.release_header_pages();
        let mut copied = false;
        if pages == WeightPages::HugePages {
            // The map holds the same bytes: a failed copy (memory, I/O) costs speed, not the run.
            match gguf.copy_data_to_huge_pages() {
                Ok(c) => copied = c,
                Err(e) => eprintln!("kiln: reading the weights from the file's map ({e})"),
            }
        }
        // Scanned where the weights will be read from (the copy, or the map), and before the
        // interleaving below rearranges blocks (the scan reads the file's block layout).
        let nonfinite = kiln_model::scan_nonfinite(&gguf);
        if !nonfinite.is_clean() {
            if !allow_nonfinite {
                anyhow::bail!("{}: {nonfinite}; --allow-nonfinite to load anyway", path.display());
            }
            eprintln!("kiln: warning: {}: {nonfinite}; loading anyway (--allow-nonfinite)", path.display());
        }
        // The copy is private: the generation kernels' row-interleaved layout is made in place
        // (same bytes, same results, faster generation).
        let interleaved = if copied {
            kiln_model::interleave_matrices(&mut gguf).with_context(|| format!("{}", path.display()))?
        } else {
            Vec::new()
        };
        let gguf: &'static GgufFile = Box::leak(Box::new(gguf));
        let weights =
            ModelWeights::load_interleaved(gguf, &interleaved).with_context(|| format!("{}", path.display()))?;
        if tokenizer.n_vocab() != weights.cfg.n_vocab {
            anyhow::bail!(
                "{}: tokenizer has {} tokens but token_embd.weight has {} rows",
                path.display(),
                tokenizer.n_vocab(),
                weights.cfg.n_vocab
            );
        }
        Ok(Model {
            path: path.to_path_buf(),
            gguf,
            weights,
            tokenizer,
            template,
            load_seconds: t0.elapsed().as_secs_f64(),
            constraints: OnceLock::new(),
        })
    }

    /// Opens `path` as a GGUF file, with errors that name the file once (OS errors name it
    /// themselves; errors about the contents get it in front).
    pub fn open_gguf(path: &Path) -> Result<GgufFile> {
        GgufFile::open(path).map_err(|e| match e.path() {
            Some(_) => anyhow::Error::new(e),
            None => anyhow::Error::new(e).context(path.display().to_string()),
        })
    }

    /// Whether the file the weights are read from is still the one loaded: an error naming what
    /// changed (truncated, resized, modified in place, replaced, removed) when the weights come
    /// from the file's map ([`WeightPages::Mapped`]); always `Ok` for a private copy, which the
    /// file can no longer affect. A long-lived process (the server, `kiln chat`) calls it before
    /// each request, so a rewritten file is reported instead of silently producing garbage; a
    /// truncation met during a forward pass ends the process with one line (SIGBUS handler,
    /// [`kiln_gguf::sigbus`]).
    pub fn check_file_unchanged(&self) -> Result<()> {
        Ok(self.gguf.check_unchanged()?)
    }

    /// The compiler of output constraints for this model's vocabulary (built on first use).
    pub fn constraints(&self) -> Result<&ConstraintCompiler> {
        self.constraints
            .get_or_init(|| ConstraintCompiler::new(&self.tokenizer).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("building the constraint engine's vocabulary: {e}"))
    }

    /// Compiles an output constraint for this model.
    pub fn compile_constraint(&self, spec: &ConstraintSpec) -> Result<Constraint, String> {
        self.constraints().map_err(|e| format!("{e:#}"))?.compile(spec)
    }

    /// The model's context length capped at 4096 (the default `--ctx`).
    pub fn default_ctx(&self) -> usize {
        self.weights.cfg.n_ctx_train.clamp(1, 4096)
    }
}
