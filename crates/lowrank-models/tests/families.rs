//! The newer model families (fixtures/families/<family>, made by
//! scripts/make_family_fixtures.py) against transformers + PEFT + bitsandbytes: log-probs of
//! the base and of each adapter unmerged and merged (through the candle layer loop and through
//! the batched step over a KV cache), greedy generation, eval loss over an NF4 base, chat
//! templates.

mod common;
use common::{eval_texts, max_abs_diff};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use lowrank_core::QuantSpec;
use lowrank_models::generate::{generate, sequence_nll, Sampler, SamplingParams};
use lowrank_models::{ActiveAdapter, KvCache, Llama, LoadOptions, Message, Tokenizer};
use lowrank_quant::QuantType;
use serde_json::Value;

const FAMILIES: &[&str] = &["qwen3", "phi3", "gemma2", "gemma3"];
const ADAPTERS: &[&str] = &["all-linear", "dora", "pattern"];

fn family_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/families")
        .join(family)
}

fn reference(family: &str) -> Value {
    let text = std::fs::read_to_string(family_dir(family).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(family: &str) -> (Llama, Tokenizer) {
    let dir = family_dir(family).join("model");
    (
        Llama::load(&dir, &Device::Cpu).unwrap(),
        Tokenizer::load(&dir).unwrap(),
    )
}

fn adapter_dir(family: &str, adapter: &str) -> PathBuf {
    family_dir(family).join("adapters").join(adapter)
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// How a forward is run: the candle layer loop over the whole line, or the batched step
/// over a KV cache (a prefill of all but the last two tokens, then one token at a time: a
/// LongRoPE model picks its frequencies per forward, by its largest position, so a shorter
/// prefill would legitimately rotate differently from the whole line's forward).
#[derive(Clone, Copy, Debug)]
enum Path_ {
    Full,
    Cached,
}

fn logits(model: &Llama, ids: &[u32], adapters: &[ActiveAdapter], path: Path_) -> Tensor {
    match path {
        Path_::Full => model
            .forward(&row(ids), None, adapters)
            .unwrap()
            .squeeze(0)
            .unwrap(),
        Path_::Cached => {
            let mut cache = KvCache::new();
            let split = ids.len().saturating_sub(2).max(1);
            let mut parts = vec![model
                .forward(&row(&ids[..split]), Some(&mut cache), adapters)
                .unwrap()
                .squeeze(0)
                .unwrap()];
            for &id in &ids[split..] {
                parts.push(
                    model
                        .forward(&row(&[id]), Some(&mut cache), adapters)
                        .unwrap()
                        .squeeze(0)
                        .unwrap(),
                );
            }
            Tensor::cat(&parts, 0).unwrap()
        }
    }
}

/// The worst |Δ log-prob| against transformers' over the reference's eval lines (ids checked
/// too); fails above 1e-4.
fn check_logprobs(
    family: &str,
    model: &Llama,
    tokenizer: &Tokenizer,
    adapters: &[ActiveAdapter],
    case: &str,
    path: Path_,
) -> f32 {
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        family_dir(family).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let lines = reference(family)["eval_lines"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    for (i, text) in eval_texts().iter().take(lines).enumerate() {
        let ids = tokenizer.encode(text, true).unwrap();
        let ref_ids: Vec<i64> = refs[&format!("input_ids.{i}")].to_vec1().unwrap();
        assert_eq!(
            ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ref_ids,
            "{family}: tokenization of line {i}"
        );
        let lp =
            candle_nn::ops::log_softmax(&logits(model, &ids, adapters, path), D::Minus1).unwrap();
        let diff = max_abs_diff(&lp, &refs[&format!("{case}.logprobs.{i}")]);
        assert!(
            diff <= 1e-4,
            "{family} {case} {path:?}: line {i}: max |Δ logprob| = {diff}"
        );
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn base_and_adapters_match_transformers_and_peft_unmerged_and_merged() {
    for family in FAMILIES {
        let (model, tokenizer) = load(family);
        let mut worst = 0f32;
        for path in [Path_::Full, Path_::Cached] {
            worst = worst.max(check_logprobs(
                family,
                &model,
                &tokenizer,
                &[],
                "base",
                path,
            ));
        }
        for name in ADAPTERS {
            let adapter = model.load_adapter(&adapter_dir(family, name)).unwrap();
            for path in [Path_::Full, Path_::Cached] {
                let active = [ActiveAdapter::new(&adapter)];
                worst = worst.max(check_logprobs(
                    family, &model, &tokenizer, &active, name, path,
                ));
            }
            let mut merged = model.clone();
            merged.merge_adapter("a", &adapter, 1.0).unwrap();
            for path in [Path_::Full, Path_::Cached] {
                worst = worst.max(check_logprobs(family, &merged, &tokenizer, &[], name, path));
            }
            merged.unmerge_adapter("a").unwrap();
            for ((n, before), (_, after)) in model
                .named_weights()
                .unwrap()
                .iter()
                .zip(merged.named_weights().unwrap())
            {
                let d = max_abs_diff(before, &after);
                assert!(d <= 1e-5, "{family} {name}: {n} not restored: {d}");
            }
        }
        eprintln!("{family}: worst |Δ logprob| over base, adapters, merged, both paths: {worst:e}");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for family in FAMILIES {
        let (model, tokenizer) = load(family);
        for case in reference(family)["generate"].as_array().unwrap() {
            let adapter = case["adapter"]
                .as_str()
                .map(|a| model.load_adapter(&adapter_dir(family, a)).unwrap());
            let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
            let prompt = tokenizer
                .encode(case["prompt"].as_str().unwrap(), true)
                .unwrap();
            let expect_prompt: Vec<u32> =
                serde_json::from_value(case["prompt_ids"].clone()).unwrap();
            assert_eq!(prompt, expect_prompt);
            let mut sampler = Sampler::new(SamplingParams::default());
            let max = case["max_new_tokens"].as_u64().unwrap() as usize;
            let eos: Vec<u32> = model.config().eos_token_ids.clone();
            let out = generate(
                &model,
                &prompt,
                &active,
                &mut sampler,
                max,
                &eos,
                |_| Ok(()),
            )
            .unwrap();
            let expect: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
            assert_eq!(out, expect, "{family}: {case}");
        }
    }
}

#[test]
fn eval_loss_over_an_nf4_base_matches_bitsandbytes() {
    let spec = QuantSpec::new(QuantType::Nf4, true, 64).unwrap();
    for family in FAMILIES {
        let dir = family_dir(family).join("model");
        let opts = LoadOptions {
            quantize: Some(spec),
        };
        let model = Llama::load_with(&dir, &Device::Cpu, &opts).unwrap();
        assert!(model.is_quantized());
        let tokenizer = Tokenizer::load(&dir).unwrap();
        let r = reference(family);
        for (case, want) in r["nf4"]["eval"].as_object().unwrap() {
            let adapter =
                (case != "base").then(|| model.load_adapter(&adapter_dir(family, case)).unwrap());
            let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
            let (mut total, mut count) = (0.0, 0);
            for text in eval_texts() {
                let ids = tokenizer.encode(&text, true).unwrap();
                let (nll, n) = sequence_nll(&model, &ids, &active).unwrap();
                total += nll;
                count += n;
            }
            let loss = total / count as f64;
            let d = (loss - want.as_f64().unwrap()).abs();
            eprintln!("{family} {case} over nf4+dq: ours {loss:.8} bnb {want} |diff| {d:.2e}");
            assert!(d <= 1e-4, "{family} {case}: {loss} vs {want}");
        }
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    for family in FAMILIES {
        let (_, tokenizer) = load(family);
        for case in reference(family)["chat"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let got = tokenizer.apply_chat_template(&messages, add);
            match case["error"].as_str() {
                Some(expect) => {
                    let err = got.unwrap_err().to_string();
                    assert!(err.contains(expect), "{family}: {err} vs {expect}");
                }
                None => assert_eq!(got.unwrap(), case["text"].as_str().unwrap(), "{family}"),
            }
        }
    }
}

/// The per-head norm weights are read, written back and counted: a merged checkpoint holds
/// every tensor of the original, and the parameter count is the checkpoint's.
#[test]
fn checkpoint_round_trip_keeps_every_tensor() {
    for family in FAMILIES {
        let (model, _) = load(family);
        let ckpt = lowrank_models::checkpoint::Checkpoint::open(&family_dir(family).join("model"))
            .unwrap();
        let ours = model.named_weights().unwrap();
        let mut stored = 0;
        for (name, w) in &ours {
            let theirs = ckpt.load(name, w.dims(), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(max_abs_diff(w, &theirs), 0.0, "{family}: {name}");
            stored += w.elem_count();
        }
        assert_eq!(ours.len(), ckpt.names().len(), "{family}: tensor count");
        assert_eq!(model.config().num_parameters(), stored, "{family}");
    }
}
