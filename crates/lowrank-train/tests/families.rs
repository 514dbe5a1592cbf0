//! Training on the newer model families (fixtures/families, scripts/make_family_fixtures.py):
//! per-step SGD losses against PEFT over the f32 base and over an NF4 + double-quant base
//! (bitsandbytes), and a finite non-zero gradient for every trainable tensor, including the
//! families' own norm weights under full fine-tuning.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lowrank_models::Llama;
use lowrank_quant::{QuantSpec, QuantType};
use lowrank_train::data;
use lowrank_train::trainable::setup_trainable;
use lowrank_train::trainer::{batch_nll, gradients};
use lowrank_train::{train, Method, OptimizerKind, Schedule, TrainOptions};

const FAMILIES: &[&str] = &["qwen3", "phi3", "gemma2", "gemma3"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn family_dir(family: &str) -> PathBuf {
    fixtures().join("families").join(family)
}

fn reference(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(family_dir(family).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn losses(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// scripts/make_family_fixtures.py's loop: SGD at the reference's lr, batch 1, train.jsonl in order, from
/// the fixture adapter; the worst per-step loss difference (fails above 1e-4).
fn check(family: &str, adapter: &str, method: Method, nf4: bool, lr: f64, expect: &[f64]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        model: family_dir(family).join("model").display().to_string(),
        quantize: nf4.then_some(QuantSpec {
            kind: QuantType::Nf4,
            double_quant: true,
            block_size: 64,
        }),
        data: fixtures().join("data/train.jsonl"),
        out: dir.path().join("run"),
        method,
        init_adapter: Some(family_dir(family).join("adapters").join(adapter)),
        optimizer: OptimizerKind::Sgd,
        lr,
        lr_schedule: Schedule::Constant,
        batch_size: 1,
        max_grad_norm: 0.0,
        shuffle: false,
        quiet: true,
        ..Default::default()
    };
    let report = train(&opts).unwrap();
    assert_eq!(report.losses.len(), expect.len());
    let worst = report
        .losses
        .iter()
        .zip(expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{family} {adapter} nf4={nf4}: ours {:?}\n  PEFT {expect:?}\n  max |diff| {worst:e}",
        report.losses
    );
    assert!(
        worst <= 1e-4,
        "{family} {adapter} nf4={nf4}: max per-step loss difference {worst}"
    );
    worst
}

#[test]
fn sgd_steps_match_peft_over_f32_and_nf4_bases() {
    for family in FAMILIES {
        let r = reference(family);
        let f32_losses = &r["train"]["losses"];
        let lr = r["train"]["lr"].as_f64().unwrap();
        let mut worst = 0f64;
        worst = worst.max(check(
            family,
            "all-linear",
            Method::Lora,
            false,
            lr,
            &losses(&f32_losses["all-linear"]),
        ));
        worst = worst.max(check(
            family,
            "dora",
            Method::Dora,
            false,
            lr,
            &losses(&f32_losses["dora"]),
        ));
        worst = worst.max(check(
            family,
            "all-linear",
            Method::Lora,
            true,
            lr,
            &losses(&r["nf4"]["train"]["all-linear"]),
        ));
        eprintln!("{family}: worst per-step training loss difference {worst:e}");
    }
}

#[test]
fn every_trainable_tensor_gets_a_finite_nonzero_gradient() {
    for family in FAMILIES {
        let dir = family_dir(family).join("model");
        for (method, adapter) in [
            (Method::Lora, Some("all-linear")),
            (Method::Dora, Some("dora")),
            (Method::Full, None),
        ] {
            let mut model = Llama::load(&dir, &Device::Cpu).unwrap();
            let tok = lowrank_models::Tokenizer::load(&dir).unwrap();
            let examples = data::load(&fixtures().join("data/train.jsonl"), &tok, 512)
                .unwrap()
                .1;
            let opts = TrainOptions {
                method,
                init_adapter: adapter.map(|a| family_dir(family).join("adapters").join(a)),
                ..Default::default()
            };
            let t = setup_trainable(&mut model, &opts).unwrap();
            if method == Method::Full {
                // Every tensor of the checkpoint, the per-head norms included.
                let stored = lowrank_models::checkpoint::Checkpoint::open(&dir)
                    .unwrap()
                    .names();
                assert_eq!(t.names.len(), stored.len(), "{family}: {:?}", t.names);
            }
            let grads = gradients(&model, &t, &examples[..2], false).unwrap();
            assert_eq!(grads.len(), t.names.len(), "{family} {method}");
            for name in &t.names {
                let norm = grads[name]
                    .to_dtype(DType::F64)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    .sqrt();
                assert!(
                    norm.is_finite() && norm > 0.0,
                    "{family} {method} {name}: gradient norm {norm}"
                );
            }
        }
    }
}

/// `--targets all-linear` puts a module on every linear of each family, Phi-3's fused
/// `qkv_proj` and `gate_up_proj` included, each as wide as the fused output.
#[test]
fn all_linear_targets_every_linear_of_each_family() {
    for family in FAMILIES {
        let mut model = Llama::load(&family_dir(family).join("model"), &Device::Cpu).unwrap();
        let linears = model.linears();
        let opts = TrainOptions {
            method: Method::Lora,
            targets: "all-linear".into(),
            ..Default::default()
        };
        let t = setup_trainable(&mut model, &opts).unwrap();
        let adapter = t.adapter.as_ref().unwrap();
        let names: Vec<&String> = adapter.modules.keys().collect();
        assert_eq!(names.len(), linears.len(), "{family}: {names:?}");
        for l in &linears {
            let m = &adapter.modules[&l.name];
            assert_eq!(m.b.dims()[0], l.out_features, "{family} {}", l.name);
            assert_eq!(m.a.dims()[1], l.in_features, "{family} {}", l.name);
        }
        if *family == "phi3" {
            assert!(names.iter().any(|n| n.ends_with("self_attn.qkv_proj")));
            assert!(names.iter().any(|n| n.ends_with("mlp.gate_up_proj")));
        }
    }
}

/// Packed rows (their own positions and block-diagonal mask, the sliding windows added to it)
/// give each family the loss of the same sequences padded into a batch.
#[test]
fn packed_rows_give_the_same_loss_as_padded_batches() {
    for family in FAMILIES {
        let dir = family_dir(family).join("model");
        let model = Llama::load(&dir, &Device::Cpu).unwrap();
        let tok = lowrank_models::Tokenizer::load(&dir).unwrap();
        let ex = data::load(&fixtures().join("data/train.jsonl"), &tok, 512)
            .unwrap()
            .1;
        let order: Vec<usize> = (0..ex.len()).collect();
        let padded = data::make_batch(
            &ex,
            &data::plan_micro_batches(&ex, &order, 6, false, 512)[0],
            &Device::Cpu,
        )
        .unwrap();
        let plan = data::plan_micro_batches(&ex, &order, 6, true, 48);
        assert!(plan[0].iter().any(|row| row.len() > 1), "rows are packed");
        let scalar = |t: candle_core::Tensor| t.to_scalar::<f32>().unwrap() as f64;
        let (mut a, mut b) = (0.0, 0.0);
        a += scalar(batch_nll(&model, &[], &padded, None).unwrap());
        for micro in &plan {
            let packed = data::make_batch(&ex, micro, &Device::Cpu).unwrap();
            b += scalar(batch_nll(&model, &[], &packed, None).unwrap());
        }
        assert!(
            (a - b).abs() < 1e-4 * a,
            "{family}: padded {a} vs packed {b}"
        );
    }
}
