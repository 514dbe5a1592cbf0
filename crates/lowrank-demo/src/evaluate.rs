//! Scoring a model (optionally with adapters) on a task: loss on the completion tokens and
//! exact-match accuracy of greedy generation.

use anyhow::{Context, Result};
use candle_core::{Tensor, D};
use lowrank_models::generate::{generate, Sampler, SamplingParams};
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use serde::Serialize;

use crate::tasks::Example;

/// A model's score on one task.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Mean negative log-likelihood per completion token (the answer and the EOS after it).
    pub loss: f64,
    /// Share of prompts whose greedy completion, up to EOS, is exactly the answer.
    pub accuracy: f64,
    pub examples: usize,
    /// The greedy completions, in example order.
    #[serde(skip)]
    pub outputs: Vec<Vec<u32>>,
}

/// Token ids of an example: BOS + prompt, and completion + EOS.
pub fn encode_example(tokenizer: &Tokenizer, ex: &Example) -> Result<(Vec<u32>, Vec<u32>)> {
    let prompt = tokenizer.encode(&ex.prompt, true)?;
    let mut completion = tokenizer.encode(&ex.completion, false)?;
    completion.push(eos_id(tokenizer)?);
    Ok((prompt, completion))
}

pub fn eos_id(tokenizer: &Tokenizer) -> Result<u32> {
    tokenizer
        .eos_token_id()
        .context("the tokenizer names no EOS token")
}

/// Sum of −log p over the completion tokens given the prompt, and their number.
pub fn completion_nll(
    model: &Llama,
    prompt: &[u32],
    completion: &[u32],
    adapters: &[ActiveAdapter],
) -> Result<(f64, usize)> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    model.check_ids(&ids)?;
    let device = model.device();
    let logits = model
        .forward(
            &Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?,
            None,
            adapters,
        )?
        .squeeze(0)?;
    // Position t predicts token t+1: the completion is predicted from positions p-1 .. len-2.
    let from = prompt.len() - 1;
    let logprobs =
        candle_nn::ops::log_softmax(&logits.narrow(0, from, completion.len())?, D::Minus1)?;
    let targets = Tensor::new(completion, device)?.unsqueeze(1)?;
    let total: f32 = logprobs.gather(&targets, 1)?.sum_all()?.to_scalar()?;
    Ok((-(total as f64), completion.len()))
}

/// Greedy completion of `prompt` through `lowrank_models::generate`, stopping at EOS (not
/// included) or after `max_new` tokens.
pub fn greedy(
    model: &Llama,
    prompt: &[u32],
    adapters: &[ActiveAdapter],
    max_new: usize,
    eos: u32,
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingParams::default());
    Ok(generate(
        model,
        prompt,
        adapters,
        &mut sampler,
        max_new,
        &[eos],
        |_| Ok(()),
    )?)
}

/// Scores a model with `adapters` on `examples`. Examples of equal length run as one batch; the
/// result equals scoring them one by one with [`completion_nll`] and [`greedy`] (tested).
pub fn score(
    model: &Llama,
    tokenizer: &Tokenizer,
    adapters: &[ActiveAdapter],
    examples: &[Example],
) -> Result<Score> {
    let eos = eos_id(tokenizer)?;
    let encoded = examples
        .iter()
        .map(|ex| encode_example(tokenizer, ex))
        .collect::<Result<Vec<_>>>()?;
    let (mut nll, mut tokens) = (0.0, 0usize);
    for group in groups(&encoded, |(p, c)| p.len() + c.len()) {
        let (n, t) = batch_nll(
            model,
            &group.iter().map(|&i| &encoded[i]).collect::<Vec<_>>(),
            adapters,
        )?;
        nll += n;
        tokens += t;
    }
    let mut outputs = vec![Vec::new(); examples.len()];
    for group in groups(&encoded, |(p, _)| p.len()) {
        let prompts: Vec<&[u32]> = group.iter().map(|&i| encoded[i].0.as_slice()).collect();
        // One token more than the answer: a model that does not stop gets it wrong.
        let limits: Vec<usize> = group.iter().map(|&i| encoded[i].1.len()).collect();
        for (&i, out) in group
            .iter()
            .zip(batch_greedy(model, &prompts, adapters, &limits, eos)?)
        {
            outputs[i] = out;
        }
    }
    let correct = outputs
        .iter()
        .zip(&encoded)
        .filter(|(out, (_, c))| out.as_slice() == &c[..c.len() - 1])
        .count();
    let n = examples.len().max(1) as f64;
    Ok(Score {
        loss: nll / tokens.max(1) as f64,
        accuracy: correct as f64 / n,
        examples: examples.len(),
        outputs,
    })
}

/// Indices of `items` grouped by `key`, groups in key order, indices in item order.
fn groups<T>(items: &[T], key: impl Fn(&T) -> usize) -> Vec<Vec<usize>> {
    let mut map: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, item) in items.iter().enumerate() {
        map.entry(key(item)).or_default().push(i);
    }
    map.into_values().collect()
}

/// [`completion_nll`] summed over examples whose prompt + completion have the same length.
fn batch_nll(
    model: &Llama,
    batch: &[&(Vec<u32>, Vec<u32>)],
    adapters: &[ActiveAdapter],
) -> Result<(f64, usize)> {
    let ids: Vec<Vec<u32>> = batch
        .iter()
        .map(|(p, c)| [p.as_slice(), c.as_slice()].concat())
        .collect();
    let len = ids[0].len();
    for row in &ids {
        model.check_ids(row)?;
    }
    let device = model.device();
    let input = Tensor::new(ids.clone(), device)?;
    let logits = model.forward(&input, None, adapters)?;
    let logprobs = candle_nn::ops::log_softmax(&logits.narrow(1, 0, len - 1)?, D::Minus1)?;
    let targets: Vec<Vec<u32>> = ids.iter().map(|r| r[1..].to_vec()).collect();
    let picked: Vec<Vec<f32>> = logprobs
        .gather(&Tensor::new(targets, device)?.unsqueeze(2)?, 2)?
        .squeeze(2)?
        .to_vec2()?;
    let (mut nll, mut count) = (0.0, 0);
    for ((p, c), row) in batch.iter().zip(&picked) {
        // Position t predicts token t+1: the completion is predicted from positions p-1 .. len-2.
        nll -= row[p.len() - 1..].iter().map(|&x| x as f64).sum::<f64>();
        count += c.len();
    }
    Ok((nll, count))
}

/// [`greedy`] for prompts of equal length at once: row i stops at EOS or after `limits[i]`
/// tokens.
pub fn batch_greedy(
    model: &Llama,
    prompts: &[&[u32]],
    adapters: &[ActiveAdapter],
    limits: &[usize],
    eos: u32,
) -> Result<Vec<Vec<u32>>> {
    let device = model.device();
    for p in prompts {
        model.check_ids(p)?;
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let most = limits.iter().copied().max().unwrap_or(0);
    let mut cache = lowrank_models::KvCache::with_capacity(longest + most);
    let mut input = Tensor::new(
        prompts.iter().map(|p| p.to_vec()).collect::<Vec<_>>(),
        device,
    )?;
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done: Vec<bool> = limits.iter().map(|&l| l == 0).collect();
    let steps = limits.iter().copied().max().unwrap_or(0);
    for _ in 0..steps {
        if done.iter().all(|&d| d) {
            break;
        }
        let logits = model.forward(&input, Some(&mut cache), adapters)?;
        let last: Vec<Vec<f32>> = logits
            .narrow(1, logits.dim(1)? - 1, 1)?
            .squeeze(1)?
            .to_vec2()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (i, row) in last.iter().enumerate() {
            let token = lowrank_models::generate::argmax(row);
            if !done[i] {
                if token == eos {
                    done[i] = true;
                } else {
                    outputs[i].push(token);
                    done[i] = outputs[i].len() >= limits[i];
                }
            }
            next.push(token);
        }
        input = Tensor::new(next, device)?.unsqueeze(1)?;
    }
    Ok(outputs)
}

/// The largest |difference| between the logits of two (model, adapters) pairs over every
/// position of every prompt.
pub fn max_logit_diff(
    a: (&Llama, &[ActiveAdapter]),
    b: (&Llama, &[ActiveAdapter]),
    prompts: &[Vec<u32>],
) -> Result<f32> {
    let mut worst = 0f32;
    for ids in prompts {
        let input = Tensor::new(ids.as_slice(), a.0.device())?.unsqueeze(0)?;
        let la = a.0.forward(&input, None, a.1)?;
        let lb = b.0.forward(&input, None, b.1)?;
        let d: f32 = (la - lb)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
        worst = worst.max(d);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Task;
    use crate::tiny::TinyConfig;
    use candle_core::Device;

    #[test]
    fn batched_scoring_equals_one_by_one_generate() {
        let dir = tempfile::tempdir().unwrap();
        let shape = TinyConfig {
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 64,
            max_position_embeddings: 64,
        };
        shape.write_random(dir.path(), 11).unwrap();
        let model = Llama::load(dir.path(), &Device::Cpu).unwrap();
        let tok = Tokenizer::load(dir.path()).unwrap();
        let eos = eos_id(&tok).unwrap();
        let (_, examples) = Task::Reverse.splits(0, 24, 1);
        let (_, more) = Task::Increment.splits(0, 8, 1);
        let examples: Vec<Example> = examples.into_iter().chain(more).collect();
        let score = score(&model, &tok, &[], &examples).unwrap();
        let (mut nll, mut count) = (0.0, 0);
        for (ex, out) in examples.iter().zip(&score.outputs) {
            let (p, c) = encode_example(&tok, ex).unwrap();
            let (n, t) = completion_nll(&model, &p, &c, &[]).unwrap();
            nll += n;
            count += t;
            assert_eq!(
                out,
                &greedy(&model, &p, &[], c.len(), eos).unwrap(),
                "{}",
                ex.prompt
            );
        }
        assert!(
            (score.loss - nll / count as f64).abs() < 1e-5,
            "{} vs {}",
            score.loss,
            nll / count as f64
        );
        // An untrained model knows nothing: near-uniform loss, no right answers.
        assert!(
            (score.loss - (crate::charset::vocab_size() as f64).ln()).abs() < 0.5,
            "{}",
            score.loss
        );
        assert_eq!(score.accuracy, 0.0);
        assert_eq!(score.examples, examples.len());
    }
}
