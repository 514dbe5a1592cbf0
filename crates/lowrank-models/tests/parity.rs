//! Parity with transformers + PEFT on the committed fixtures (scripts/make_fixtures.py):
//! log-probabilities, tokenization, greedy generation, chat templates, merge/unmerge.

mod common;
use common::{eval_texts, fixtures, max_abs_diff};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use lowrank_core::lora::LoraAdapter;
use lowrank_models::generate::{generate, Sampler, SamplingParams};
use lowrank_models::{ActiveAdapter, Llama, Message, Tokenizer};
use serde_json::Value;

const BASES: &[&str] = &["llama-tied", "llama-untied", "qwen2-tied", "mistral"];
const ADAPTERS: &[&str] = &[
    "llama-tied__lora-qv",
    "llama-untied__all-linear",
    "llama-tied__dora",
    "qwen2-tied__regex",
    "mistral__layers",
];

fn load(base: &str) -> (Llama, Tokenizer) {
    let dir = fixtures().join("models").join(base);
    (
        Llama::load(&dir, &Device::Cpu).unwrap(),
        Tokenizer::load(&dir).unwrap(),
    )
}

fn base_of(adapter: &str) -> &str {
    adapter.split("__").next().unwrap()
}

/// Our log-softmax for every eval line must equal transformers' within 1e-4, with identical ids.
fn check_logprobs(
    model: &Llama,
    tokenizer: &Tokenizer,
    adapters: &[ActiveAdapter],
    reference: &str,
) -> f32 {
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures()
            .join("reference")
            .join(format!("{reference}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut worst = 0f32;
    for (i, text) in eval_texts().iter().enumerate() {
        let ids = tokenizer.encode(text, true).unwrap();
        let ref_ids: Vec<i64> = refs[&format!("input_ids.{i}")].to_vec1().unwrap();
        assert_eq!(
            ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ref_ids,
            "{reference}: tokenization of line {i}"
        );
        let input = row(&ids);
        let logits = model
            .forward(&input, None, adapters)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let diff = max_abs_diff(&logprobs, &refs[&format!("logprobs.{i}")]);
        assert!(
            diff <= 1e-4,
            "{reference}: line {i}: max |Δ logprob| = {diff}"
        );
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn base_models_match_transformers() {
    for base in BASES {
        let (model, tokenizer) = load(base);
        check_logprobs(&model, &tokenizer, &[], base);
    }
}

#[test]
fn unmerged_adapters_match_peft() {
    for name in ADAPTERS {
        let (model, tokenizer) = load(base_of(name));
        let adapter = model
            .load_adapter(&fixtures().join("adapters").join(name))
            .unwrap();
        check_logprobs(&model, &tokenizer, &[ActiveAdapter::new(&adapter)], name);
    }
}

#[test]
fn merged_adapters_match_peft_and_unmerge_restores_the_base() {
    for name in ADAPTERS {
        let (mut model, tokenizer) = load(base_of(name));
        let original = model.named_weights().unwrap();
        let adapter = model
            .load_adapter(&fixtures().join("adapters").join(name))
            .unwrap();
        model.merge_adapter("a", &adapter, 1.0).unwrap();
        check_logprobs(&model, &tokenizer, &[], name);
        model.unmerge_adapter("a").unwrap();
        for ((n, before), (_, after)) in original.iter().zip(model.named_weights().unwrap()) {
            let scale = before
                .to_dtype(DType::F32)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(
                &before.to_dtype(DType::F32).unwrap(),
                &after.to_dtype(DType::F32).unwrap(),
            );
            // Stored-dtype weights (bf16/f16) must round back to the very same values.
            let tolerance = if model.stored_dtype() == DType::F32 {
                1e-6 * scale.max(1.0)
            } else {
                0.0
            };
            assert!(diff <= tolerance, "{name}: {n} not restored: {diff}");
        }
    }
}

#[test]
fn merged_weights_equal_peft_merge_and_unload() {
    for name in ADAPTERS {
        let (mut model, _) = load(base_of(name));
        let adapter = model
            .load_adapter(&fixtures().join("adapters").join(name))
            .unwrap();
        model.merge_adapter("a", &adapter, 1.0).unwrap();
        let peft =
            lowrank_models::checkpoint::Checkpoint::open(&fixtures().join("merged").join(name))
                .unwrap();
        for (tensor_name, ours) in model.named_weights().unwrap() {
            let theirs = peft
                .load(&tensor_name, ours.dims(), DType::F32, &Device::Cpu)
                .unwrap();
            let ours = ours.to_dtype(DType::F32).unwrap();
            let scale = theirs
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-3);
            // f32 bases: rounding only. bf16/f16 bases: PEFT merges in the stored dtype, we in f32 and round once.
            let tolerance = if model.stored_dtype() == DType::F32 {
                1e-5
            } else {
                1.6e-2
            };
            let diff = max_abs_diff(&ours, &theirs) / scale;
            assert!(
                diff <= tolerance,
                "{name}: {tensor_name}: relative diff {diff}"
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/generate.json")).unwrap(),
    )
    .unwrap();
    for case in cases {
        let (model, tokenizer) = load(case["model"].as_str().unwrap());
        let adapter: Option<LoraAdapter> = case["adapter"].as_str().map(|a| {
            model
                .load_adapter(&fixtures().join("adapters").join(a))
                .unwrap()
        });
        let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
        let prompt = tokenizer
            .encode(case["prompt"].as_str().unwrap(), true)
            .unwrap();
        let expect_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(prompt, expect_prompt);
        let mut sampler = Sampler::new(SamplingParams::default());
        let max = case["max_new_tokens"].as_u64().unwrap() as usize;
        let eos = tokenizer.eos_token_id().into_iter().collect::<Vec<_>>();
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
        assert_eq!(out, expect, "{case}");
    }
}

/// One-token steps over the KV cache with every fixture adapter applied unmerged (and the
/// biased qwen2 base alone) give the full forward's logits: the steps take the one-row path
/// that projects q/k/v and gate/up in one pass each (LoRA on some of them only, DoRA and
/// layer-selected adapters falling back per layer), the full forward the per-module one. The
/// steps run on the test's own thread (no helpers) and inside a pool of two threads, where
/// a step with an unmerged adapter runs with a helper awake that computes each pass's A·x
/// (`lowrank_kernels::with_helpers`).
#[test]
fn kv_cached_steps_with_unmerged_adapters_equal_a_full_forward() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut cases: Vec<(String, Option<String>)> = vec![("qwen2-tied".into(), None)];
    for entry in std::fs::read_dir(fixtures().join("adapters")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        cases.push((base_of(&name).to_string(), Some(name)));
    }
    for (base, adapter_name) in cases {
        let (model, tokenizer) = load(&base);
        let adapter = adapter_name.as_ref().map(|a| {
            model
                .load_adapter(&fixtures().join("adapters").join(a))
                .unwrap()
        });
        let active: Vec<ActiveAdapter> = adapter.iter().map(ActiveAdapter::new).collect();
        let ids = tokenizer.encode(&eval_texts()[1], true).unwrap();
        let full = model
            .forward(&row(&ids), None, &active)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let split = 3;
        let steps = || {
            let mut cache = lowrank_models::KvCache::new();
            model
                .forward(&row(&ids[..split]), Some(&mut cache), &active)
                .unwrap();
            ids[split..]
                .iter()
                .map(|&id| {
                    model
                        .forward(&row(&[id]), Some(&mut cache), &active)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        for (threads, logits) in [("alone", steps()), ("pool of two", pool.install(steps))] {
            for (t, step) in (split..).zip(logits) {
                let diff = max_abs_diff(
                    &step.squeeze(0).unwrap().squeeze(0).unwrap(),
                    &full.get(t).unwrap(),
                );
                assert!(
                    diff < 1e-4,
                    "{base} {adapter_name:?} ({threads}) position {t}: {diff}"
                );
            }
        }
    }
}

#[test]
fn kv_cached_decoding_equals_a_full_forward() {
    let (model, tokenizer) = load("mistral");
    let ids = tokenizer.encode(&eval_texts()[3], true).unwrap();
    let full = model
        .forward(&row(&ids), None, &[])
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = lowrank_models::KvCache::new();
    let split = 5;
    let first = row(&ids[..split]);
    model.forward(&first, Some(&mut cache), &[]).unwrap();
    for (t, &id) in ids.iter().enumerate().skip(split) {
        let step = model.forward(&row(&[id]), Some(&mut cache), &[]).unwrap();
        let diff = max_abs_diff(
            &step.squeeze(0).unwrap().squeeze(0).unwrap(),
            &full.get(t).unwrap(),
        );
        assert!(diff < 1e-4, "position {t}: {diff}");
    }
    assert_eq!(cache.len(), ids.len());
    // Grown by doubling from the 5-position prompt.
    assert!(cache.capacity() >= ids.len() && cache.capacity() < 2 * ids.len());

    // Reserved up front: one allocation that never grows, the same logits.
    let mut reserved = lowrank_models::KvCache::with_capacity(ids.len());
    let whole = row(&ids[..ids.len() - 1]);
    model.forward(&whole, Some(&mut reserved), &[]).unwrap();
    let last = row(&ids[ids.len() - 1..]);
    let step = model.forward(&last, Some(&mut reserved), &[]).unwrap();
    let diff = max_abs_diff(
        &step.squeeze(0).unwrap().squeeze(0).unwrap(),
        &full.get(ids.len() - 1).unwrap(),
    );
    assert!(diff < 1e-4, "last position with a reserved cache: {diff}");
    assert_eq!(reserved.capacity(), ids.len());
}

#[test]
fn chat_templates_render_like_transformers() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/chat.json")).unwrap(),
    )
    .unwrap();
    for case in cases {
        let dir = fixtures()
            .join("models")
            .join(case["model"].as_str().unwrap());
        let tokenizer = Tokenizer::load(&dir).unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        match case["error"].as_str() {
            Some(msg) => {
                let err = tokenizer
                    .apply_chat_template(&messages, add)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(msg), "{err}");
            }
            None => {
                assert_eq!(
                    tokenizer.apply_chat_template(&messages, add).unwrap(),
                    case["text"].as_str().unwrap()
                );
                let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
                assert_eq!(tokenizer.encode_chat(&messages, add).unwrap(), ids);
            }
        }
    }
}

#[test]
fn our_adapter_writer_round_trips_peft_files() {
    for name in ADAPTERS {
        let (model, _) = load(base_of(name));
        let original = model
            .load_adapter(&fixtures().join("adapters").join(name))
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        original.save(tmp.path()).unwrap();
        let again = model.load_adapter(tmp.path()).unwrap();
        assert_eq!(
            original.modules.keys().collect::<Vec<_>>(),
            again.modules.keys().collect::<Vec<_>>()
        );
        for (key, m) in &original.modules {
            let n = &again.modules[key];
            assert_eq!(max_abs_diff(&m.a, &n.a), 0.0);
            assert_eq!(max_abs_diff(&m.b, &n.b), 0.0);
            assert_eq!(m.scale, n.scale, "{name}: {key}");
            assert_eq!(m.magnitude.is_some(), n.magnitude.is_some());
        }
        // The config keeps PEFT's fields: what we write, PEFT reads the same way.
        let peft: Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixtures()
                    .join("adapters")
                    .join(name)
                    .join("adapter_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let ours: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for field in [
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "bias",
            "task_type",
        ] {
            let (a, b) = (&peft[field], &ours[field]);
            let same = a == b || (a.as_f64().is_some() && a.as_f64() == b.as_f64());
            assert!(same, "{name}: field {field}: PEFT {a} vs ours {b}");
        }
    }
}

/// bf16 activations (each bf16 linear's input rounded to bf16, `--bf16-activations`): refused
/// over f32 weights; logits within bf16 rounding of the f32 model's and unlike those of bf16
/// weights alone; and an 80-token prefill (the GEMM, on AVX512-BF16's dot products where this
/// process chose them) ends in the logits the same tokens give fed one at a time (the GEMV),
/// up to the order of the f32 sums.
#[test]
fn bf16_activations_round_each_linear_s_input() {
    let name = "llama-tied__lora-qv";
    let (reference, tokenizer) = load(base_of(name));
    let (mut weights_only, _) = load(base_of(name));
    weights_only.cast_for_inference(DType::BF16).unwrap();
    let (mut rounded, _) = load(base_of(name));
    let err = rounded.round_activations_to_bf16().unwrap_err();
    assert!(err.to_string().contains("bf16 weights"), "{err}");
    rounded.cast_for_inference(DType::BF16).unwrap();
    rounded.round_activations_to_bf16().unwrap();
    let ids = repeated_ids(&tokenizer, 80);
    let adapter = reference
        .load_adapter(&fixtures().join("adapters").join(name))
        .unwrap();
    for active in [vec![], vec![ActiveAdapter::new(&adapter)]] {
        let want = prefill_and_decode(&reference, &ids[..20], &active);
        let unrounded = prefill_and_decode(&weights_only, &ids[..20], &active);
        let got = prefill_and_decode(&rounded, &ids[..20], &active);
        for (step, ((g, w), u)) in got.iter().zip(&want).zip(&unrounded).enumerate() {
            let scale = max_abs_diff(w, &w.zeros_like().unwrap());
            let rel = max_abs_diff(g, w) / scale;
            let rel_unrounded = max_abs_diff(u, w) / scale;
            assert!(
                rel < 5e-2,
                "step {step}, {} adapters: {rel} ({rel_unrounded} unrounded)",
                active.len()
            );
            assert!(max_abs_diff(g, u) > 0.0, "step {step}: not rounded");
        }
        let last = |logits: Tensor| logits.squeeze(0).unwrap().get(0).unwrap();
        let at_once = last(
            rounded
                .forward(
                    &row(&ids[..]),
                    Some(&mut lowrank_models::KvCache::new()),
                    &active,
                )
                .unwrap()
                .narrow(1, ids.len() - 1, 1)
                .unwrap(),
        );
        let mut cache = lowrank_models::KvCache::new();
        let mut one_by_one = None;
        for &id in &ids {
            let logits = rounded
                .forward(&row(&[id]), Some(&mut cache), &active)
                .unwrap();
            one_by_one = Some(last(logits));
        }
        let one_by_one = one_by_one.unwrap();
        let scale = max_abs_diff(&at_once, &at_once.zeros_like().unwrap());
        let rel = max_abs_diff(&at_once, &one_by_one) / scale;
        assert!(
            rel < 1e-4,
            "{} adapters: prefill against one by one {rel}",
            active.len()
        );
    }
}

/// `ids` as one row of a batch (1 × len).
fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// The first `n` ids of the first eval text, repeated as often as it takes.
fn repeated_ids(tokenizer: &Tokenizer, n: usize) -> Vec<u32> {
    (0..n)
        .flat_map(|_| tokenizer.encode(&eval_texts()[0], true).unwrap())
        .take(n)
        .collect()
}

/// Logits of a prompt (prefill) and of three cached decoding steps after it.
fn prefill_and_decode(model: &Llama, ids: &[u32], adapters: &[ActiveAdapter]) -> Vec<Tensor> {
    let mut cache = lowrank_models::KvCache::new();
    let mut out = vec![model
        .forward(&row(ids), Some(&mut cache), adapters)
        .unwrap()];
    for &id in &ids[..3] {
        out.push(
            model
                .forward(&row(&[id]), Some(&mut cache), adapters)
                .unwrap(),
        );
    }
    out
}

/// bf16 base weights for inference (prefill through the widened GEMM, decoding through the
/// bf16 GEMV with the LoRA path fused): logits within bf16 rounding of the f32 model's, with
/// and without an unmerged adapter; merging into a bf16 base is refused.
#[test]
fn bf16_weights_stay_within_rounding_of_f32() {
    let name = "llama-tied__lora-qv";
    let (reference, tokenizer) = load(base_of(name));
    let (mut narrow, _) = load(base_of(name));
    narrow.cast_for_inference(DType::BF16).unwrap();
    let ids = repeated_ids(&tokenizer, 20);
    let adapter = reference
        .load_adapter(&fixtures().join("adapters").join(name))
        .unwrap();
    for active in [vec![], vec![ActiveAdapter::new(&adapter)]] {
        let want = prefill_and_decode(&reference, &ids, &active);
        let got = prefill_and_decode(&narrow, &ids, &active);
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let scale = max_abs_diff(w, &w.zeros_like().unwrap());
            let rel = max_abs_diff(g, w) / scale;
            assert!(
                rel > 0.0 && rel < 2e-2,
                "step {step}, {} adapters: {rel}",
                active.len()
            );
        }
    }
    let err = narrow.merge_adapter(name, &adapter, 1.0).unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
}
