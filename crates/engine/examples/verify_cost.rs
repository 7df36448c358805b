//! What verifying k drafted tokens in one forward call costs against one generated token: the
//! number speculative decoding's gain rests on (k tokens through the generation kernels read the
//! weights once).
//!
//!   cargo run --release -p kiln-engine --example verify_cost -- MODEL.gguf [MAX_K] [CONTEXT]

use std::time::Instant;

use anyhow::{bail, Result};
use kiln_engine::{Model, Session};
use kiln_model::{Logits, Precision};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        bail!("usage: verify_cost MODEL.gguf [MAX_K] [CONTEXT]");
    }
    let model = Model::load(std::path::Path::new(&args[1]))?;
    let max_k: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(15);
    let mut s = Session::try_new(&model, 2048, Precision::Fast)?;
    let ctx: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let prompt: Vec<u32> = (0..ctx).map(|i| 100 + i * 7 % 1000).collect();
    s.eval(&prompt, Logits::Last)?;
    let base = s.tokens.len();
    let reps = 30;
    for k in 1..=max_k {
        let toks: Vec<u32> = (0..k as u32).map(|i| 200 + i).collect();
        // Warm-up, then interleave with single steps so drift hits both alike.
        s.eval(&toks, Logits::All)?;
        s.truncate(base);
        s.tokens.truncate(base);
        let (mut tk, mut t1) = (0.0, 0.0);
        for _ in 0..reps {
            let t0 = Instant::now();
            s.eval(&toks, Logits::All)?;
            tk += t0.elapsed().as_secs_f64();
            s.truncate(base);
            s.tokens.truncate(base);
            let t0 = Instant::now();
            s.eval(&toks[..1], Logits::Last)?;
            t1 += t0.elapsed().as_secs_f64();
            s.truncate(base);
            s.tokens.truncate(base);
        }
        println!(
            "k {k:2}: {:.2} ms per call, {:.2}x one token's ({:.2} ms)",
            tk / reps as f64 * 1e3,
            tk / t1,
            t1 / reps as f64 * 1e3
        );
    }
    Ok(())
}
