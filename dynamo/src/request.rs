//! A Dynamo request (pre-tokenized by the frontend) as kiln's scheduler takes it: sampling options
//! checked as `kiln serve` checks them, guided decoding as kiln's constraints. What kiln cannot
//! do is refused with a message naming the field, never dropped silently.
//!
//! Stop strings and stop token ids are the frontend's: its detokenizer watches the streamed
//! tokens and cancels the request when one matches. The end-of-generation ids come with the
//! request (`eos_token_ids`; empty with `ignore_eos`) and are the model's own, which kiln stops at.

use dynamo_llm::protocols::common::preprocessor::PreprocessedRequest;
use dynamo_llm::protocols::common::{GuidedDecodingOptions, SamplingOptions};
use kiln_engine::constraint::ConstraintSpec;
use kiln_engine::SamplingParams;

/// What a request asks of the scheduler, checked.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop_at_eog: bool,
    pub constraint: Option<ConstraintSpec>,
}

/// Checks `req` against a context of `n_ctx` tokens and a vocabulary of `n_vocab`.
pub fn job(req: &PreprocessedRequest, n_ctx: usize, n_vocab: usize) -> Result<Job, String> {
    let prompt: Vec<u32> = req.token_ids.iter().copied().collect();
    if prompt.is_empty() {
        return Err("the prompt is empty: nothing to generate from".into());
    }
    if prompt.len() >= n_ctx {
        return Err(format!(
            "the prompt has {} tokens but the context holds {n_ctx}: no room to generate",
            prompt.len()
        ));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(format!("token id {t} is out of range (the vocabulary has {n_vocab} tokens)"));
    }
    if req.prompt_embeds.is_some() || req.multi_modal_data.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err("prompt embeddings and multimodal data are not supported by kiln".into());
    }
    let sc = &req.stop_conditions;
    let room = n_ctx - prompt.len();
    let max_tokens = match sc.max_tokens {
        None => room,
        Some(0) => return Err("max_tokens must be at least 1".into()),
        Some(m) => (m as usize).min(room),
    };
    if sc.min_tokens.is_some_and(|m| m > 0) {
        return Err("min_tokens is not supported by kiln".into());
    }
    if sc.max_thinking_tokens.is_some() {
        return Err("max_thinking_tokens is not supported by kiln".into());
    }
    let o = &req.output_options;
    if o.logprobs.is_some() || o.prompt_logprobs.is_some() {
        return Err("logprobs through Dynamo are not supported by this worker yet (kiln serve has them)".into());
    }
    let ignore_eos = sc.ignore_eos.unwrap_or(false);
    let (params, constraint) = sampling(&req.sampling_options)?;
    Ok(Job { prompt, params, max_tokens, stop_at_eog: !ignore_eos, constraint })
}

fn sampling(s: &SamplingOptions) -> Result<(SamplingParams, Option<ConstraintSpec>), String> {
    if s.n.is_some_and(|n| n != 1) || s.best_of.is_some_and(|n| n != 1) {
        return Err("n and best_of other than 1 are not supported by kiln".into());
    }
    if s.use_beam_search == Some(true) || s.length_penalty.is_some() {
        return Err("beam search (use_beam_search, length_penalty) is not supported by kiln".into());
    }
    // One validator for every front end (kiln serve's, this worker's).
    let params = kiln_engine::sampler::SamplingRequest {
        temperature: s.temperature,
        top_k: s.top_k.map(i64::from),
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repetition_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed.map(|v| v as u64),
    }
    .resolve("repetition_penalty")
    .map_err(|e| e.message)?;
    let constraint = s.guided_decoding.as_ref().map(guided).transpose()?.flatten();
    Ok((params, constraint))
}

/// Guided decoding as a kiln constraint (llguidance, as `kiln serve`'s `response_format`).
fn guided(g: &GuidedDecodingOptions) -> Result<Option<ConstraintSpec>, String> {
    if g.whitespace_pattern.is_some() {
        return Err("guided_whitespace_pattern is not supported by kiln".into());
    }
    if g.structural_tag.is_some() {
        return Err("structural tags are not supported by kiln".into());
    }
    let mut specs = Vec::new();
    if let Some(j) = &g.json {
        specs.push(match j {
            serde_json::Value::Object(o) if o.len() == 1 && o.get("type") == Some(&serde_json::json!("object")) => {
                ConstraintSpec::JsonObject
            }
            other => ConstraintSpec::JsonSchema(other.clone()),
        });
    }
    if let Some(r) = &g.regex {
        specs.push(ConstraintSpec::Regex(r.clone()));
    }
    if let Some(c) = &g.choice {
        if c.is_empty() {
            return Err("guided_choice is empty".into());
        }
        let alts: Vec<String> = c.iter().map(|s| regex_escape(s)).collect();
        specs.push(ConstraintSpec::Regex(format!("(?:{})", alts.join("|"))));
    }
    if let Some(gr) = &g.grammar {
        specs.push(ConstraintSpec::grammar_text(gr.clone()));
    }
    match specs.len() {
        0 | 1 => Ok(specs.pop()),
        _ => Err("give one of guided json, regex, choice and grammar, not several".into()),
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(tokens: Vec<u32>) -> PreprocessedRequest {
        serde_json::from_value(serde_json::json!({ "model": "m", "token_ids": tokens })).expect("a request")
    }

    #[test]
    fn checks_prompt_context_and_options() {
        let r = req(vec![1, 2, 3]);
        let j = job(&r, 16, 100).unwrap();
        assert_eq!((j.prompt.len(), j.max_tokens, j.stop_at_eog), (3, 13, true));
        assert!(job(&req(vec![]), 16, 100).unwrap_err().contains("empty"));
        assert!(job(&req(vec![1; 16]), 16, 100).unwrap_err().contains("no room"));
        assert!(job(&req(vec![1, 200]), 16, 100).unwrap_err().contains("200"));
        let mut r = req(vec![1, 2]);
        r.sampling_options.temperature = Some(0.0);
        r.stop_conditions.max_tokens = Some(5);
        r.stop_conditions.ignore_eos = Some(true);
        let j = job(&r, 16, 100).unwrap();
        assert_eq!((j.params.temperature, j.max_tokens, j.stop_at_eog), (0.0, 5, false));
        for (set, want) in [
            (
                Box::new(|r: &mut PreprocessedRequest| r.sampling_options.n = Some(2)) as Box<dyn Fn(&mut _)>,
                "n and best_of",
            ),
            (Box::new(|r: &mut PreprocessedRequest| r.sampling_options.temperature = Some(3.0)), "temperature"),
            (Box::new(|r: &mut PreprocessedRequest| r.sampling_options.top_k = Some(-5)), "top_k"),
            (Box::new(|r: &mut PreprocessedRequest| r.stop_conditions.min_tokens = Some(3)), "min_tokens"),
            (Box::new(|r: &mut PreprocessedRequest| r.output_options.logprobs = Some(2)), "logprobs"),
            (Box::new(|r: &mut PreprocessedRequest| r.stop_conditions.max_tokens = Some(0)), "max_tokens"),
        ] {
            let mut r = req(vec![1, 2]);
            set(&mut r);
            let e = job(&r, 16, 100).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn guided_decoding_becomes_a_constraint() {
        let g = |v: serde_json::Value| guided(&serde_json::from_value(v).unwrap());
        assert_eq!(g(serde_json::json!({"json": {"type": "object"}})).unwrap(), Some(ConstraintSpec::JsonObject));
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(g(serde_json::json!({ "json": schema.clone() })).unwrap(), Some(ConstraintSpec::JsonSchema(schema)));
        assert_eq!(
            g(serde_json::json!({"choice": ["yes", "no (maybe)"]})).unwrap(),
            Some(ConstraintSpec::Regex(r"(?:yes|no \(maybe\))".into()))
        );
        assert!(g(serde_json::json!({"regex": "a+", "choice": ["x"]})).unwrap_err().contains("not several"));
        assert!(g(serde_json::json!({"whitespace_pattern": " "})).is_err());
    }
}
