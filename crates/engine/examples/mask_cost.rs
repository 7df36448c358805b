//! What a constraint costs per token, apart from the forward pass: the mask computation and its
//! application to the logits, replayed over a finished output.
//!
//!   cargo run --release -p kiln-engine --example mask_cost -- MODEL.gguf SCHEMA.json OUTPUT.txt
//!
//! OUTPUT.txt is text the schema accepts (e.g. what `kiln run --json-schema SCHEMA.json` wrote);
//! it is tokenized with the model's tokenizer and fed token by token.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_engine::constraint::ConstraintSpec;
use kiln_engine::Model;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        bail!("usage: mask_cost MODEL.gguf SCHEMA.json OUTPUT.txt");
    }
    let model = Model::load(std::path::Path::new(&args[1]))?;
    let schema = serde_json::from_str(&std::fs::read_to_string(&args[2]).context("reading the schema")?)?;
    let text = std::fs::read_to_string(&args[3]).context("reading the output")?;
    let t0 = Instant::now();
    model.constraints()?;
    println!("vocabulary for the constraint engine: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let t0 = Instant::now();
    let mut c = model.compile_constraint(&ConstraintSpec::JsonSchema(schema)).map_err(anyhow::Error::msg)?;
    println!("schema compiled: {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
    let ids = model.tokenizer.encode(text.trim(), false, false)?;
    let (mut mask, mut apply, mut worst) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut logits = vec![0f32; model.tokenizer.n_vocab()];
    for &t in &ids {
        let t0 = Instant::now();
        c.prepare()?;
        let d = t0.elapsed();
        mask += d;
        worst = worst.max(d);
        logits.fill(0.0);
        let t0 = Instant::now();
        c.apply(&mut logits)?;
        apply += t0.elapsed();
        if !c.allows(t)? {
            bail!("token {t} is not allowed: the output does not match the schema");
        }
        c.accept(t)?;
    }
    let n = ids.len().max(1) as u32;
    println!("{} tokens: mask {:?} mean, {:?} worst; applying it {:?} mean", ids.len(), mask / n, worst, apply / n);
    Ok(())
}
