//! Drafting with a second, smaller model of the same vocabulary: its most likely continuation,
//! token by token, from its own KV cache kept in step with the sequence.

use anyhow::{bail, Result};
use kiln_model::{forward, KvCache, Logits, Precision};

use crate::sampler::argmax;
use crate::Model;

/// Refuses a draft model whose tokens are not the target's, id for id (drafts are token ids: a
/// different vocabulary would propose tokens that mean something else).
pub fn check_vocabulary(target: &Model, draft: &Model) -> Result<()> {
    let (t, d) = (&target.tokenizer, &draft.tokenizer);
    let name = |m: &Model| m.path.display().to_string();
    if t.n_vocab() != d.n_vocab() || target.weights.cfg.n_vocab != draft.weights.cfg.n_vocab {
        bail!(
            "the draft model {} has {} tokens but the model {} has {}: a draft model must share the vocabulary",
            name(draft),
            d.n_vocab(),
            name(target),
            t.n_vocab()
        );
    }
    for id in 0..t.n_vocab() as u32 {
        let (a, b) = (t.token_to_piece(id)?, d.token_to_piece(id)?);
        if a != b || t.is_eog(id) != d.is_eog(id) {
            bail!(
                "the draft model {} differs from the model {} at token {id} ({:?} vs {:?}): a draft model must share the vocabulary",
                name(draft),
                name(target),
                String::from_utf8_lossy(&b),
                String::from_utf8_lossy(&a),
            );
        }
    }
    if t.bos() != d.bos() {
        bail!("the draft model {} has another beginning-of-sequence token than {}", name(draft), name(target));
    }
    Ok(())
}

/// A draft model's state for one sequence.
pub struct DraftModel<'m> {
    pub model: &'m Model,
    cache: KvCache,
    /// Tokens whose keys and values are in `cache`.
    tokens: Vec<u32>,
}

impl<'m> DraftModel<'m> {
    /// A draft model with a context of `n_ctx` positions (the target's), its size checked.
    pub fn new(model: &'m Model, n_ctx: usize) -> Result<DraftModel<'m>> {
        kiln_model::check_kv_memory(&model.weights.cfg, n_ctx, 1)?;
        Ok(DraftModel { model, cache: KvCache::try_new(&model.weights.cfg, n_ctx)?, tokens: Vec::new() })
    }

    /// Makes the draft cache's pages resident now ([`KvCache::commit`]).
    pub fn commit(&mut self) {
        self.cache.commit();
    }

    /// Up to `k` tokens the draft model finds most likely after `history` (fewer where its
    /// context ends), and the mean seconds of its one-token steps in this call (what a drafted
    /// token costs; catching up on a long history is not one).
    pub fn propose(&mut self, history: &[u32], k: usize) -> Result<(Vec<u32>, Option<f64>)> {
        let k = k.min(self.cache.n_ctx.saturating_sub(history.len()));
        if k == 0 || history.is_empty() {
            return Ok((Vec::new(), None));
        }
        let (mut secs, mut steps) = (0.0, 0);
        let mut timed = |this: &mut Self, tokens: &[u32]| -> Result<Vec<f32>> {
            let t0 = std::time::Instant::now();
            let logits = this.eval(tokens)?;
            if tokens.len() == 1 {
                secs += t0.elapsed().as_secs_f64();
                steps += 1;
            }
            Ok(logits)
        };
        // Catch up: keep the common prefix, evaluate the rest (at least one token, for logits).
        let common = self.tokens.iter().zip(history).take_while(|(a, b)| a == b).count();
        let keep = common.min(history.len() - 1);
        self.cache.truncate(keep);
        self.tokens.truncate(keep);
        let mut logits = timed(self, &history[keep..])?;
        let mut out = Vec::with_capacity(k);
        loop {
            let t = argmax(&logits);
            out.push(t);
            if out.len() == k {
                break;
            }
            logits = timed(self, &[t])?;
        }
        Ok((out, (steps > 0).then(|| secs / steps as f64)))
    }

    fn eval(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = forward(&self.model.weights, &mut self.cache, tokens, Precision::Fast, Logits::Last, None)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }
}
