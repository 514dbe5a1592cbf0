//! AdaLoRA against PEFT on the fixtures of scripts/make_adalora_fixtures.py: eval parity of a
//! PEFT AdaLoRA adapter (unmerged, merged, unmerge), training parity (per-step losses, final
//! rank pattern and tensors), gradients of every trainable tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use lowrank_core::adalora::{AdaloraAdapter, AdaloraConfig};
use lowrank_models::{ActiveAdapter, Llama, Tokenizer};
use lowrank_train::trainable::setup_trainable;
use lowrank_train::trainer::gradients;
use lowrank_train::{train, AdaloraOptions, Method, OptimizerKind, Schedule, TrainOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load_base() -> (Llama, Tokenizer) {
    let dir = fixtures().join("models/llama-tied");
    (
        Llama::load(&dir, &Device::Cpu).unwrap(),
        Tokenizer::load(&dir).unwrap(),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn eval_texts() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("data/eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Max |Δ log-prob| over the eval lines against PEFT's reference.
fn logprob_diff(model: &Llama, tok: &Tokenizer, adapters: &[ActiveAdapter]) -> f32 {
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("adalora/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut worst = 0f32;
    for (i, text) in eval_texts().iter().enumerate() {
        let ids = tok.encode(text, true).unwrap();
        let ref_ids: Vec<i64> = refs[&format!("input_ids.{i}")].to_vec1().unwrap();
        assert_eq!(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), ref_ids);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .forward(&input, None, adapters)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        worst = worst.max(max_abs_diff(&lp, &refs[&format!("logprobs.{i}")]));
    }
    worst
}

#[test]
fn peft_adalora_adapter_gives_peft_logprobs() {
    let (model, tok) = load_base();
    let dir = fixtures().join("adalora/trained");
    let ada = AdaloraAdapter::load(&dir, &model.linears(), &Device::Cpu).unwrap();
    // The fixture's pattern: 28 of 56 triplets kept, two modules with none.
    let ranks = ada.ranks();
    assert_eq!(ranks.len(), 14);
    assert_eq!(ranks.values().sum::<usize>(), 28);
    assert_eq!(ranks["model.layers.1.mlp.down_proj"], 0);
    assert_eq!(ranks["model.layers.1.self_attn.o_proj"], 0);
    assert_eq!(ranks["model.layers.0.mlp.up_proj"], 3);
    // Llama::load_adapter reads it (dispatching on peft_type) as its LoRA form.
    let adapter = model.load_adapter(&dir).unwrap();
    assert_eq!(adapter.modules.len(), 12);
    for (name, m) in &adapter.modules {
        assert_eq!(m.rank(), ranks[name]);
        assert!((m.scale - 8.0 / 4.00001).abs() < 1e-12);
        assert!(
            (adapter.config.scale_for(name) - m.scale).abs() < 1e-9,
            "{name}"
        );
        assert!(adapter.config.targets_module(name));
    }
    assert!(!adapter
        .config
        .targets_module("model.layers.1.mlp.down_proj"));
    let base = logprob_diff(&model, &tok, &[]);
    let diff = logprob_diff(&model, &tok, &[ActiveAdapter::new(&adapter)]);
    eprintln!("AdaLoRA eval parity: max |Δ logprob| {diff:e} (base vs adapter {base})");
    assert!(base > 0.05, "the adapter must change the outputs");
    assert!(diff <= 1e-4, "max |Δ logprob| = {diff}");
}

#[test]
fn adalora_merge_matches_peft_and_unmerge_restores() {
    let (mut model, tok) = load_base();
    let original = model.named_weights().unwrap();
    let adapter = model
        .load_adapter(&fixtures().join("adalora/trained"))
        .unwrap();
    model.merge_adapter("ada", &adapter, 1.0).unwrap();
    let diff = logprob_diff(&model, &tok, &[]);
    assert!(diff <= 1e-4, "merged: max |Δ logprob| = {diff}");
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("adalora/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let weights: HashMap<String, Tensor> = model.named_weights().unwrap().into_iter().collect();
    for name in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ] {
        let key = format!("{name}.weight");
        let d = max_abs_diff(
            &weights[&key].to_dtype(DType::F32).unwrap(),
            &refs[&format!("merged.{key}")],
        );
        assert!(
            d < 1e-5,
            "{key}: merged weight differs from PEFT's merge_and_unload by {d}"
        );
    }
    model.unmerge_adapter("ada").unwrap();
    for ((n, before), (_, after)) in original.iter().zip(model.named_weights().unwrap()) {
        let d = max_abs_diff(before, &after);
        assert!(d <= 1e-5, "{n} not restored: {d}");
    }
}

/// PEFT's loop of scripts/make_adalora_fixtures.py: SGD lr 0.05, batch 1, file order, 9 steps,
/// tinit 2, tfinal 3, deltaT 2, target_r 2.
fn parity_options(out: &Path) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: fixtures().join("data/train.jsonl"),
        out: out.to_path_buf(),
        method: Method::Adalora,
        init_adapter: Some(fixtures().join("adalora/init")),
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        lr_schedule: Schedule::Constant,
        batch_size: 1,
        max_grad_norm: 0.0,
        shuffle: false,
        max_steps: Some(9),
        quiet: true,
        adalora: AdaloraOptions {
            init_rank: 4,
            target_rank: 2,
            tinit: 2,
            tfinal: 3,
            delta_t: 2,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
        },
        ..Default::default()
    }
}

#[test]
fn adalora_training_matches_peft_losses_and_rank_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let report = train(&parity_options(&out)).unwrap();
    let steps = read_json(&fixtures().join("adalora/steps.json"));
    let expect: Vec<f64> = steps["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(report.losses.len(), expect.len());
    let worst = report
        .losses
        .iter()
        .zip(&expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "AdaLoRA losses ours {:?}\n  PEFT {:?}\n  max |diff| {worst:e}",
        report.losses, expect
    );
    assert!(worst <= 1e-4, "max per-step loss difference {worst}");
    // The log: nll + w·orth_reg = loss, PEFT's budgets.
    let log: Vec<Value> = std::fs::read_to_string(out.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let budgets: Vec<u64> = log.iter().map(|l| l["budget"].as_u64().unwrap()).collect();
    let want: Vec<u64> = steps["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(budgets, want);
    for (l, n) in log.iter().zip(steps["nll"].as_array().unwrap()) {
        assert!((l["nll"].as_f64().unwrap() - n.as_f64().unwrap()).abs() < 1e-4);
        let total = l["nll"].as_f64().unwrap() + 0.5 * l["orth_reg"].as_f64().unwrap();
        assert!((total - l["loss"].as_f64().unwrap()).abs() < 1e-9);
    }
    // The final rank pattern, as PEFT saved it.
    let ours = AdaloraConfig::load(&out.join("adapter_config.json")).unwrap();
    let peft =
        AdaloraConfig::load(&fixtures().join("adalora/trained/adapter_config.json")).unwrap();
    assert_eq!(ours.rank_pattern, peft.rank_pattern, "final rank pattern");
    assert_eq!(ours.schedule, peft.schedule);
    // Tensors cut to the kept rank, equal to PEFT's.
    let ours_t =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let peft_t = candle_core::safetensors::load(
        fixtures().join("adalora/trained/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours_t.len(), peft_t.len());
    let mut worst_t = 0f32;
    for (k, t) in &peft_t {
        assert_eq!(ours_t[k].dims(), t.dims(), "{k}");
        if t.elem_count() > 0 {
            worst_t = worst_t.max(max_abs_diff(&ours_t[k], t));
        }
    }
    eprintln!("AdaLoRA final tensors max |diff| {worst_t:e}");
    assert!(worst_t < 1e-4, "final tensors differ by {worst_t}");
    // The rank report.
    let ranks = read_json(&out.join("adalora_ranks.json"));
    assert_eq!(ranks["total"], 28);
    assert_eq!(ranks["per_module"]["model.layers.0.mlp.up_proj"], 3);
    assert_eq!(ranks["ranks"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(out.join("adalora_ranks.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("q_proj"));
}

#[test]
fn every_adalora_tensor_gets_a_finite_nonzero_gradient() {
    let (mut model, tok) = load_base();
    let examples = lowrank_train::data::load(&fixtures().join("data/train.jsonl"), &tok, 512)
        .unwrap()
        .1;
    let dir = tempfile::tempdir().unwrap();
    let check = |grads: &HashMap<String, Tensor>, names: &[String], what: &str| {
        assert_eq!(grads.len(), names.len(), "{what}: a tensor got no gradient");
        for n in names {
            let g = grads[n]
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(g.is_finite() && g > 0.0, "{what}: {n}: |grad| max {g}");
        }
    };
    // From the PEFT adapter (E ≠ 0): the token loss reaches A, E and B.
    let t = setup_trainable(&mut model, &parity_options(&dir.path().join("a"))).unwrap();
    assert_eq!(t.vars.len(), 14 * 3);
    check(
        &gradients(&model, &t, &examples[..2], false).unwrap(),
        &t.names,
        "init adapter",
    );
    // Fresh (E = 0, as PEFT): the token loss reaches E, the regularizer A and B.
    let mut o = parity_options(&dir.path().join("b"));
    o.init_adapter = None;
    o.targets = "q_proj,v_proj".into();
    let t = setup_trainable(&mut model, &o).unwrap();
    let mut grads = gradients(&model, &t, &examples[..2], false).unwrap();
    let ada = t.adalora.as_ref().unwrap();
    let store = ada.orth_reg(&t.vars).unwrap().backward().unwrap();
    for (n, v) in t.names.iter().zip(&t.vars) {
        let g = store.get(v.as_tensor()).cloned();
        match (grads.remove(n), g) {
            (Some(a), Some(b)) => grads.insert(n.clone(), (a + b).unwrap()),
            (a, b) => a.or(b).and_then(|g| grads.insert(n.clone(), g)),
        };
    }
    check(&grads, &t.names, "fresh adapter");
    let e = t.vars[1]
        .as_tensor()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(e, 0.0, "E starts at zero");
}

#[test]
fn adalora_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = parity_options(&dir.path().join("run"));
    o.adalora.tinit = 6; // 6 ≥ 9 − 3: no budgeting phase (PEFT's check)
    let err = train(&o).unwrap_err().to_string();
    assert!(err.contains("tinit"), "{err}");
    let mut o = parity_options(&dir.path().join("run2"));
    o.adalora.target_rank = 5;
    o.init_adapter = None;
    let err = train(&o).unwrap_err().to_string();
    assert!(err.contains("target-rank"), "{err}");
    let mut o = parity_options(&dir.path().join("run3"));
    o.init_adapter = Some(fixtures().join("adalora/trained"));
    let err = train(&o).unwrap_err().to_string();
    assert!(err.contains("full-rank"), "{err}");
}
