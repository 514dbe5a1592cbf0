//! Decoding: KV-cached generation with greedy, temperature, top-k and top-p sampling in the
//! order transformers applies them (temperature, then top-k, then top-p).

use candle_core::{Tensor, D};
use lowrank_core::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{ActiveAdapter, KvCache, Llama};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Picks tokens from logits; seeded, so the same seed gives the same text.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            order.truncate(k);
        }
        let max = logits[order[0]] / t;
        let mut probs: Vec<f32> = order.iter().map(|&i| (logits[i] / t - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p.filter(|&p| p < 1.0) {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    mass += p;
                    mass >= top_p as f32
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (p, &i) in probs.iter().zip(&order) {
            if draw < *p {
                return i as u32;
            }
            draw -= p;
        }
        order[probs.len() - 1] as u32
    }
}

/// The first index of the largest value, as torch.argmax.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks that `prompt_len` + `max_tokens` positions fit the model's context
/// (`max_position_embeddings`) and that their KV cache, reserved up front, fits the memory
/// the system has available (where /proc/meminfo tells), as the server checks each request.
pub fn check_fits(model: &Llama, prompt_len: usize, max_tokens: usize) -> Result<()> {
    let config = model.config();
    let positions = config.max_position_embeddings;
    let total = prompt_len.saturating_add(max_tokens);
    if total > positions {
        return Err(lowrank_core::Error::Msg(format!(
            "prompt ({prompt_len} tokens) + max tokens ({max_tokens}) exceeds the model's {positions} positions (max_position_embeddings){}",
            match positions.checked_sub(prompt_len) {
                Some(room) if room > 0 => format!("; at most {room} new tokens fit"),
                _ => "; the prompt alone fills them".into(),
            }
        )));
    }
    let need = (total as u64).saturating_mul(config.kv_cache_bytes_per_token());
    if let Some(available) = available_memory_bytes() {
        if need > available {
            return Err(lowrank_core::Error::Msg(format!(
                "the KV cache for {total} positions needs {} MB, more than the {} MB of memory available; lower max tokens",
                need / (1 << 20),
                available / (1 << 20)
            )));
        }
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` for each new token; stops
/// after a token in `stop_ids` (which is not returned). Returns the new tokens. Refuses (see
/// [`check_fits`]) more positions than the model has or a cache the memory cannot hold.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    adapters: &[ActiveAdapter],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    model.check_ids(prompt)?;
    check_fits(model, prompt.len(), max_tokens)?;
    // Room for the whole answer up front: no cache copy while decoding.
    let mut cache = KvCache::with_capacity(prompt.len() + max_tokens);
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    for _ in 0..max_tokens {
        let last = model.forward_last(&input, Some(&mut cache), adapters)?;
        let next = sampler.sample(&last.squeeze(0)?.to_vec1::<f32>()?);
        if stop_ids.contains(&next) {
            break;
        }
        out.push(next);
        on_token(next)?;
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

/// Token ids that end generation: `generation_config.json`'s `eos_token_id` (one or a list),
/// config.json's and the tokenizer's EOS.
pub fn stop_token_ids(
    model_dir: &std::path::Path,
    model: &Llama,
    tokenizer: &crate::Tokenizer,
) -> Result<Vec<u32>> {
    let mut ids = model.config().eos_token_ids.clone();
    let path = model_dir.join("generation_config.json");
    if path.exists() {
        let v: serde_json::Value = lowrank_core::files::read_json(&path)?;
        let Some(fields) = v.as_object() else {
            return Err(lowrank_core::Error::file(
                &path,
                format!("expected a JSON object, found {v}"),
            ));
        };
        let eos = crate::config::token_ids(&fields.get("eos_token_id").cloned())
            .map_err(|m| lowrank_core::Error::field(&path, "eos_token_id", m))?;
        ids.extend(eos);
    }
    ids.extend(tokenizer.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Sum of −log p(token_t | tokens_<t) over t ≥ 1 and the number of predicted tokens, for one
/// sequence.
pub fn sequence_nll(
    model: &Llama,
    ids: &[u32],
    adapters: &[ActiveAdapter],
) -> Result<(f64, usize)> {
    scored_nll(model, ids, 1, adapters)
}

/// Sum of −log p(token_t | tokens_<t) over `first ≤ t < ids.len()` (t ≥ 1) and how many
/// there are: one window of a sliding-window evaluation, where the tokens before `first` were
/// scored by an earlier window and are only context here.
pub fn scored_nll(
    model: &Llama,
    ids: &[u32],
    first: usize,
    adapters: &[ActiveAdapter],
) -> Result<(f64, usize)> {
    let first = first.max(1);
    if ids.len() <= first {
        return Ok((0.0, 0));
    }
    model.check_ids(ids)?;
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    // Through a cache, so that on the CPU the loss comes from the batched step that `generate`
    // and the server decode with, not from the training forward.
    let mut cache = KvCache::with_capacity(ids.len());
    let logits = model
        .forward(&input, Some(&mut cache), adapters)?
        .squeeze(0)?;
    let scored = ids.len() - first;
    let logprobs = candle_nn::ops::log_softmax(&logits.narrow(0, first - 1, scored)?, D::Minus1)?;
    let targets = Tensor::new(&ids[first..], model.device())?.unsqueeze(1)?;
    let picked = logprobs.gather(&targets, 1)?;
    let total = picked
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    Ok((-total, scored))
}

/// [`sequence_nll`] of a sequence longer than the model's context, in windows of `window`
/// tokens starting every `stride` tokens (1 ≤ stride < window): each window scores the tokens
/// after the previous window's end, so every token after the first is scored once, with at
/// least `window − stride` tokens of context (transformers' sliding-window perplexity).
pub fn windowed_nll(
    model: &Llama,
    ids: &[u32],
    window: usize,
    stride: usize,
    adapters: &[ActiveAdapter],
) -> Result<(f64, usize)> {
    if stride == 0 || stride >= window {
        return Err(lowrank_core::Error::Msg(format!(
            "the window stride must be between 1 and {} (window {window}), found {stride}",
            window.saturating_sub(1)
        )));
    }
    let (mut total, mut count) = (0.0, 0);
    let (mut begin, mut scored_to) = (0, 0);
    loop {
        let end = (begin + window).min(ids.len());
        let (nll, n) = scored_nll(model, &ids[begin..end], scored_to - begin, adapters)?;
        total += nll;
        count += n;
        scored_to = end;
        if end == ids.len() {
            return Ok((total, count));
        }
        begin += stride;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 1.0, 5.0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits = [0.5f32, 0.4, 0.3, 0.2];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 0));
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().any(|&t| t != 0), "sampling at T=1 explores");
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_prefix() {
        // Probabilities ≈ [0.84, 0.11, 0.04, 0.01]: top_p 0.8 keeps only the first.
        let logits = [4.0f32, 2.0, 1.0, -0.5];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.8),
            seed: 3,
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits) == 0));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.9),
            seed: 3,
            ..Default::default()
        });
        let seen: std::collections::BTreeSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert_eq!(seen, [0, 1].into());
    }
}
