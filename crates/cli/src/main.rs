//! `kiln`: run, chat with, inspect and check GGUF language models.

mod cmd;
mod common;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Makes glibc serve every thread from one malloc arena. By default each pool thread that meets
/// contention gets an arena of its own, which keeps what it freed (activation buffers, quantized
/// activations, per-task scratch) for itself alone; with one arena the threads reuse each other's
/// free memory: SmolLM2-135M `bench -p 512 -n 128` peak RSS -1.5 MB, speed unchanged. The
/// threads allocate little inside the parallel sections, so the shared lock costs nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets a parameter of glibc's allocator (thread-safe; no pointers
    // involved). It runs before any thread is started, so no second arena exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

#[derive(Parser)]
#[command(name = "kiln", version, about = "A GGUF inference engine that proves its numbers", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout; timings to stderr).
    Run(cmd::run::Args),
    /// Interactive multi-turn chat through the model's chat template.
    Chat(cmd::chat::Args),
    /// Teacher-forced logits at every position of a token sequence.
    Logits(cmd::logits::Args),
    /// Prompt-processing and generation speed, like llama-bench (pp512, tg128).
    Bench(cmd::bench::Args),
    /// Check exact and default paths against the float64 reference fixtures.
    Parity(cmd::parity::Args),
    /// Show a GGUF file's metadata, hyper-parameters and tensors.
    Inspect(cmd::inspect::Args),
    /// Write every named activation of a forward pass as .npy files, or print their statistics.
    Dump(cmd::dump::Args),
    /// Find the first activation where the default path (or another engine's dump) departs from
    /// the exact path; exits 3 when one is found.
    Diff(cmd::diff::Args),
    /// Perplexity over a text (llama-perplexity's chunks); KL divergence against saved logits.
    Perplexity(cmd::perplexity::Args),
    /// OpenAI-compatible HTTP server with continuous batching.
    Serve(cmd::serve::Args),
    /// Tokenize text with a model's tokenizer.
    Tokenize(cmd::tokenize::Args),
    /// Render a chat prompt with a model's chat template.
    Template(cmd::template::Args),
    /// Write a model's tokenizer, chat template and shape as Hugging Face files (tokenizer.json,
    /// tokenizer_config.json, config.json, generation_config.json) for front ends that tokenize
    /// requests themselves (NVIDIA Dynamo's).
    ExportTokenizer(cmd::export_tokenizer::Args),
}

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // One line, like every other kiln error; `--help` has the details.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("kiln: error: {first} (see `kiln --help`)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(a) => cmd::run::main(a),
        Command::Chat(a) => cmd::chat::main(a),
        Command::Logits(a) => cmd::logits::main(a),
        Command::Parity(a) => cmd::parity::main(a),
        Command::Bench(a) => cmd::bench::main(a),
        Command::Inspect(a) => cmd::inspect::main(a),
        Command::Dump(a) => cmd::dump::main(a),
        Command::Diff(a) => cmd::diff::main(a),
        Command::Perplexity(a) => cmd::perplexity::main(a),
        Command::Serve(a) => cmd::serve::main(a),
        Command::Tokenize(a) => cmd::tokenize::main(a),
        Command::Template(a) => cmd::template::main(a),
        Command::ExportTokenizer(a) => cmd::export_tokenizer::main(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, no backtrace. A cause whose text the line already ends
/// with is left out: an error type that prints its source in its own message and also returns it
/// from `source()` would otherwise show it twice ("is a directory: is a directory"). kiln's own
/// error types do one or the other; this keeps a dependency's from doubling a message.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.ends_with(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::one_line;

    /// An error that shows its source in its message and also returns it from `source()`.
    #[derive(Debug)]
    struct Doubled(std::io::Error);

    impl std::fmt::Display for Doubled {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open x: {}", self.0)
        }
    }

    impl std::error::Error for Doubled {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_already_shown_are_not_repeated() {
        let io = || std::io::Error::other("is a directory");
        let e = anyhow::Error::new(Doubled(io())).context("model.gguf");
        assert_eq!(one_line(&e), "model.gguf: cannot open x: is a directory");
        let e = anyhow::Error::new(io()).context("reading x");
        assert_eq!(one_line(&e), "reading x: is a directory");
    }
}
