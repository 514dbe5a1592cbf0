//! End-to-end training tests on the tiny fixture models (fast on 2 cores, never timing-based).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lowrank_models::Llama;
use lowrank_train::data::{self, Example};
use lowrank_train::trainable::setup_trainable;
use lowrank_train::trainer::{batch_nll, gradients};
use lowrank_train::{train, Init, Method, OptimizerKind, Schedule, TrainOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// PEFT's training loop of scripts/make_fixtures.py: SGD lr 0.05, batch 1, file order.
fn parity_options(adapter: &str, method: Method, out: &Path) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: fixtures().join("data/train.jsonl"),
        out: out.to_path_buf(),
        method,
        init_adapter: Some(fixtures().join("adapters").join(adapter)),
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        lr_schedule: Schedule::Constant,
        batch_size: 1,
        max_grad_norm: 0.0,
        shuffle: false,
        quiet: true,
        ..Default::default()
    }
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

fn check_parity(adapter: &str, suffix: &str, method: Method) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let report = train(&parity_options(adapter, method, &out)).unwrap();
    let steps = read_json(&fixtures().join("train").join(suffix).join("steps.json"));
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
        "{suffix}: per-step losses ours {:?}\n  PEFT {:?}\n  max |diff| {worst:e}",
        report.losses, expect
    );
    assert!(
        worst <= 1e-4,
        "{suffix}: max per-step loss difference {worst}"
    );
    // The trained adapter tensors.
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let peft = candle_core::safetensors::load(
        fixtures()
            .join("train")
            .join(suffix)
            .join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), peft.len());
    let mut worst_t = 0f32;
    for (k, t) in &peft {
        let d = max_abs_diff(&ours[k], t);
        worst_t = worst_t.max(d);
    }
    eprintln!("{suffix}: max |diff| of final adapter tensors {worst_t:e}");
    assert!(
        worst_t < 1e-4,
        "{suffix}: final tensors differ by {worst_t}"
    );
    let log = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "peak_rss_mb",
    ] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
    assert_eq!(first["step"], 1);
    assert!(out.join("loss.svg").exists());
}

#[test]
fn lora_training_matches_peft_step_by_step() {
    check_parity("llama-tied__lora-qv", "lora-qv", Method::Lora);
}

#[test]
fn dora_training_matches_peft_step_by_step() {
    check_parity("llama-tied__dora", "dora", Method::Dora);
}

fn tiny_model() -> (Llama, lowrank_models::Tokenizer) {
    let dir = fixtures().join("models/llama-tied");
    (
        Llama::load(&dir, &Device::Cpu).unwrap(),
        lowrank_models::Tokenizer::load(&dir).unwrap(),
    )
}

fn train_examples(tok: &lowrank_models::Tokenizer) -> Vec<Example> {
    data::load(&fixtures().join("data/train.jsonl"), tok, 512)
        .unwrap()
        .1
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_finite_nonzero_gradient_and_checkpointing_agrees() {
    let cases: Vec<(Method, Option<&str>, f64)> = vec![
        (Method::Lora, Some("llama-tied__lora-qv"), 0.0),
        (Method::Dora, Some("llama-tied__dora"), 0.0),
        (Method::Dora, Some("llama-tied__dora"), 0.3),
        (Method::Full, None, 0.0),
    ];
    for (method, adapter, dropout) in cases {
        let (mut model, tok) = tiny_model();
        let ex = train_examples(&tok);
        let mut opts = TrainOptions {
            method,
            dropout,
            ..Default::default()
        };
        opts.init_adapter = adapter.map(|a| fixtures().join("adapters").join(a));
        let mut t = setup_trainable(&mut model, &opts).unwrap();
        if let Some(a) = t.adapter.as_mut() {
            a.config.dropout = dropout;
        }
        let plain = gradients(&model, &t, &ex[..3], false).unwrap();
        let ckpt = gradients(&model, &t, &ex[..3], true).unwrap();
        assert_eq!(
            plain.len(),
            t.names.len(),
            "{method}: a trainable tensor got no gradient"
        );
        for name in &t.names {
            let g = &plain[name];
            let norm = scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{method} {name}: gradient norm {norm}"
            );
            let d = max_abs_diff(g, &ckpt[name]) as f64;
            assert!(
                d <= 1e-5 * (1.0 + norm),
                "{method} dropout {dropout} {name}: checkpointed gradient differs by {d}"
            );
        }
        if method == Method::Lora {
            assert_eq!(
                t.names.len(),
                8,
                "q,v × 2 layers × A,B: nothing else is trainable"
            );
        }
    }
}

/// ∂loss/∂θ for one element against central finite differences of the loss (LoRA A and B,
/// DoRA's magnitude; DoRA's A/B gradients treat the norm as a constant, as PEFT, and are
/// checked by the PEFT parity tests instead).
#[test]
fn gradients_match_finite_differences() {
    for (method, adapter, suffixes) in [
        (
            Method::Lora,
            "llama-tied__lora-qv",
            vec!["lora_A.weight", "lora_B.weight"],
        ),
        (
            Method::Dora,
            "llama-tied__dora",
            vec!["lora_magnitude_vector"],
        ),
    ] {
        let (mut model, tok) = tiny_model();
        let ex = train_examples(&tok);
        let opts = TrainOptions {
            method,
            init_adapter: Some(fixtures().join("adapters").join(adapter)),
            ..Default::default()
        };
        let t = setup_trainable(&mut model, &opts).unwrap();
        let grads = gradients(&model, &t, &ex[..2], false).unwrap();
        let rows = vec![vec![0], vec![1]];
        let batch = data::make_batch(&ex, &rows, &Device::Cpu).unwrap();
        let active = [lowrank_models::ActiveAdapter::new(
            t.adapter.as_ref().unwrap(),
        )];
        let loss = || {
            scalar(&batch_nll(&model, &active, &batch, None).unwrap()) / batch.loss_tokens as f64
        };
        for (name, var) in t.names.iter().zip(&t.vars) {
            if !suffixes.iter().any(|s| name.ends_with(s))
                || !name.contains("layers.0.self_attn.v_proj")
            {
                continue;
            }
            let g: Vec<f32> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
            let (idx, &gi) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-2f32;
            let shifted = |delta: f32| {
                let mut v = flat.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss()
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            var.set(&orig).unwrap();
            let rel = (fd - gi as f64).abs() / (gi.abs() as f64).max(1e-3);
            eprintln!("{name}[{idx}]: autograd {gi:e}, finite difference {fd:e}");
            assert!(
                rel < 0.02,
                "{name}[{idx}]: autograd {gi} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn packed_rows_give_the_same_loss_as_padded_batches() {
    let (model, tok) = tiny_model();
    let ex = train_examples(&tok);
    let order: Vec<usize> = (0..ex.len()).collect();
    let padded = data::make_batch(
        &ex,
        &data::plan_micro_batches(&ex, &order, 6, false, 512)[0],
        &Device::Cpu,
    )
    .unwrap();
    let plan = data::plan_micro_batches(&ex, &order, 6, true, 40);
    assert_eq!(plan.len(), 1);
    assert!(plan[0].iter().any(|row| row.len() > 1), "rows are packed");
    let packed = data::make_batch(&ex, &plan[0], &Device::Cpu).unwrap();
    assert_eq!(packed.loss_tokens, padded.loss_tokens);
    let a = scalar(&batch_nll(&model, &[], &padded, None).unwrap());
    let b = scalar(&batch_nll(&model, &[], &packed, None).unwrap());
    assert!((a - b).abs() < 1e-4 * a, "padded {a} vs packed {b}");
}

fn small_run(out: &Path) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: fixtures().join("data/train.jsonl"),
        out: out.to_path_buf(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        lr: 1e-2,
        batch_size: 2,
        grad_accum: 2,
        epochs: 3,
        save_every: Some(2),
        quiet: true,
        ..Default::default()
    }
}

#[test]
fn resume_reproduces_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let full = train(&small_run(&dir.path().join("a"))).unwrap();
    assert_eq!(full.steps, 6);
    let b = dir.path().join("b");
    let killed = train(&TrainOptions {
        stop_after: Some(3),
        ..small_run(&b)
    })
    .unwrap();
    assert_eq!(killed.losses[..], full.losses[..3]);
    assert!(b.join("checkpoint-2").join("trainer_state.json").exists());
    assert!(!b.join("adapter_model.safetensors").exists());
    // Without --resume the folder is refused.
    let err = train(&small_run(&b)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let resumed = train(&TrainOptions {
        resume: Some(b.clone()),
        ..small_run(&b)
    })
    .unwrap();
    assert_eq!(resumed.losses[..], full.losses[2..], "resumed from step 2");
    let x = candle_core::safetensors::load(
        dir.path().join("a/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let y =
        candle_core::safetensors::load(b.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for (k, t) in &x {
        assert_eq!(max_abs_diff(t, &y[k]), 0.0, "{k}");
    }
    let log = std::fs::read_to_string(b.join("training_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // A changed option is refused.
    let err = train(&TrainOptions {
        resume: Some(b.clone()),
        lr: 0.5,
        ..small_run(&b)
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("lr"), "{err}");
}

/// A run whose first update (SGD at lr 1e30, unclipped) makes the next loss non-finite, with
/// a checkpoint after every step.
fn diverging_run(out: &Path) -> TrainOptions {
    TrainOptions {
        optimizer: OptimizerKind::Sgd,
        lr: 1e30,
        lr_schedule: Schedule::Constant,
        max_grad_norm: 0.0,
        dropout: 0.0,
        grad_accum: 1,
        save_every: Some(1),
        init_adapter: Some(fixtures().join("adapters/llama-tied__lora-qv")),
        ..small_run(out)
    }
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = train(&diverging_run(&out)).unwrap_err().to_string();
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    assert!(err.contains("checkpoint-"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
    // The named checkpoint holds finite tensors and loads as a PEFT adapter.
    let ckpt = err.split("checkpoint is ").nth(1).unwrap().trim();
    let (model, _) = tiny_model();
    let adapter = model.load_adapter(Path::new(ckpt)).unwrap();
    for m in adapter.modules.values() {
        let s = scalar(&m.b.abs().unwrap().sum_all().unwrap());
        assert!(s.is_finite());
    }
}

/// A small synthetic task: counting sequences. The eval loss must drop well below the base's.
#[test]
fn lora_learns_a_small_task() {
    let dir = tempfile::tempdir().unwrap();
    let words = [
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    let line = |start: usize| {
        let text: Vec<&str> = (0..6).map(|k| words[(start + k) % 10]).collect();
        serde_json::json!({"text": text.join(" ")}).to_string()
    };
    let train_lines: Vec<String> = (0..40).map(|i| line(i % 10)).collect();
    std::fs::write(dir.path().join("train.jsonl"), train_lines.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("eval.jsonl"),
        (0..10).map(line).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let report = train(&TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: dir.path().join("train.jsonl"),
        eval_data: Some(dir.path().join("eval.jsonl")),
        out: dir.path().join("run"),
        rank: 8,
        alpha: 16.0,
        lr: 2e-2,
        batch_size: 8,
        epochs: 8,
        warmup_steps: 2,
        quiet: true,
        ..Default::default()
    })
    .unwrap();
    let (base, eval) = (report.base_eval_loss.unwrap(), report.eval_loss.unwrap());
    eprintln!(
        "base eval loss {base:.4}, after {} steps {eval:.4}",
        report.steps
    );
    assert!(eval < 0.5 * base, "eval loss {eval} vs base {base}");
}

#[test]
fn full_fine_tune_writes_a_checkpoint_llama_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("full");
    let report = train(&TrainOptions {
        method: Method::Full,
        eval_data: Some(fixtures().join("data/eval.jsonl")),
        max_steps: Some(3),
        save_every: None,
        grad_checkpoint: true,
        dropout: 0.0,
        ..small_run(&out)
    })
    .unwrap();
    assert_eq!(report.trainable_parameters, report.model_parameters);
    assert!(out.join("config.json").exists() && out.join("tokenizer.json").exists());
    let trained = Llama::load(&out, &Device::Cpu).unwrap();
    let (base, tok) = tiny_model();
    let ex = data::load(&fixtures().join("data/eval.jsonl"), &tok, 512)
        .unwrap()
        .1;
    let eval = lowrank_train::trainer::evaluate(&trained, &[], &ex, 4).unwrap();
    assert!(
        (eval - report.eval_loss.unwrap()).abs() < 1e-4,
        "{eval} vs {:?}",
        report.eval_loss
    );
    let before = lowrank_train::trainer::evaluate(&base, &[], &ex, 4).unwrap();
    assert!((before - report.base_eval_loss.unwrap()).abs() < 1e-6);
    assert!((eval - before).abs() > 1e-4, "the weights changed");
}

/// PiSSA and OLoRA train on a rewritten base but save a plain LoRA adapter for the original
/// base: that adapter on the original base gives the trained model's eval loss.
#[test]
fn pissa_and_olora_save_an_equivalent_plain_lora_adapter() {
    for init in [Init::Pissa, Init::Olora] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let report = train(&TrainOptions {
            init,
            targets: "q_proj,v_proj".into(),
            rslora: init == Init::Olora,
            eval_data: Some(fixtures().join("data/eval.jsonl")),
            max_steps: Some(3),
            save_every: None,
            ..small_run(&out)
        })
        .unwrap();
        let (base, tok) = tiny_model();
        let adapter = base.load_adapter(&out).unwrap();
        assert_eq!(adapter.config.rank, 8, "{init}: rank doubled");
        let ex = data::load(&fixtures().join("data/eval.jsonl"), &tok, 512)
            .unwrap()
            .1;
        let active = [lowrank_models::ActiveAdapter::new(&adapter)];
        let eval = lowrank_train::trainer::evaluate(&base, &active, &ex, 4).unwrap();
        let trained = report.eval_loss.unwrap();
        eprintln!("{init}: trained {trained:.6}, saved adapter on the original base {eval:.6}, base {:.6}", report.base_eval_loss.unwrap());
        assert!((eval - trained).abs() < 1e-4, "{init}: {eval} vs {trained}");
        assert!(
            (eval - report.base_eval_loss.unwrap()).abs() > 1e-4,
            "{init}: training changed the model"
        );
    }
}

#[test]
fn bad_options_and_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"the dog\"}\n{\"text\": \"the cat\"\n").unwrap();
    let err = train(&TrainOptions {
        data: bad.clone(),
        ..small_run(&dir.path().join("o1"))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    let err = train(&TrainOptions {
        targets: "nope_proj".into(),
        ..small_run(&dir.path().join("o2"))
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--targets") && err.contains("nope_proj"),
        "{err}"
    );
    let err = train(&TrainOptions {
        method: Method::Dora,
        init: Init::Pissa,
        ..small_run(&dir.path().join("o3"))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--init"), "{err}");
    let err = train(&TrainOptions {
        dropout: 1.5,
        ..small_run(&dir.path().join("o4"))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--dropout"), "{err}");
    assert!(!dir
        .path()
        .join("o1")
        .join("adapter_model.safetensors")
        .exists());
}

/// Callers tell training errors apart by variant: a divergence names the checkpoint to go back
/// to; a used --out, a refused resume, a bad option and a bad data line each have their own.
#[test]
fn training_errors_are_typed() {
    use lowrank_train::Error;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = train(&diverging_run(&out)).unwrap_err();
    match &err {
        Error::Diverged {
            value,
            last_checkpoint: Some(ckpt),
            ..
        } => {
            assert!(!value.is_finite(), "{err}");
            assert!(ckpt.join("trainer_state.json").exists(), "{err}");
        }
        other => panic!("expected Error::Diverged, got {other}"),
    }
    let err = train(&small_run(&out)).unwrap_err();
    assert!(
        matches!(&err, Error::RunExists { out: o, .. } if o == &out),
        "{err}"
    );
    let err = train(&TrainOptions {
        resume: Some(out.clone()),
        lr: 0.5,
        ..small_run(&out)
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Resume { .. }), "{err}");
    let err = train(&TrainOptions {
        dropout: 1.5,
        ..small_run(&dir.path().join("o1"))
    })
    .unwrap_err();
    assert!(
        matches!(&err, Error::Option { flag, .. } if flag == "dropout"),
        "{err}"
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"the dog\"}\n{\"text\": \"the cat\"\n").unwrap();
    let err = train(&TrainOptions {
        data: bad,
        ..small_run(&dir.path().join("o2"))
    })
    .unwrap_err();
    assert!(matches!(&err, Error::DataLine { line: 2, .. }), "{err}");
}
