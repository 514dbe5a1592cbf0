//! QLoRA: adapters trained over a 4-bit (NF4 + double quant) base, against PEFT over
//! transformers + bitsandbytes (fixtures/quant/reference.json, scripts/make_quant_fixtures.py).

use std::path::{Path, PathBuf};

use candle_core::Device;
use lowrank_models::{Llama, LoadOptions};
use lowrank_quant::{QuantSpec, QuantType};
use lowrank_train::data;
use lowrank_train::trainable::setup_trainable;
use lowrank_train::trainer::gradients;
use lowrank_train::{train, Init, Method, OptimizerKind, Schedule, TrainOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn nf4_dq() -> QuantSpec {
    QuantSpec {
        kind: QuantType::Nf4,
        double_quant: true,
        block_size: 64,
    }
}

/// The training loop of scripts/make_quant_fixtures.py: SGD lr 0.05, batch 1, file order,
/// from the fixture adapter, over the NF4 + DQ base.
fn qlora_options(adapter: &str, method: Method, out: &Path) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        quantize: Some(nf4_dq()),
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

fn check(adapter: &str, method: Method) {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant/reference.json")).unwrap(),
    )
    .unwrap();
    let expect: Vec<f64> = reference["qlora_train"][adapter]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let report = train(&qlora_options(adapter, method, &dir.path().join("run"))).unwrap();
    assert_eq!(report.losses.len(), expect.len());
    let worst = report
        .losses
        .iter()
        .zip(&expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{adapter} over nf4+dq: ours {:?}\n  PEFT+bnb {expect:?}\n  max |diff| {worst:e}",
        report.losses
    );
    assert!(
        worst <= 1e-4,
        "{adapter}: max per-step loss difference {worst}"
    );
    assert!(dir.path().join("run/adapter_model.safetensors").exists());
}

#[test]
fn qlora_lora_training_matches_peft_over_bitsandbytes() {
    check("llama-tied__lora-qv", Method::Lora);
}

#[test]
fn qlora_dora_training_matches_peft_over_bitsandbytes() {
    check("llama-tied__dora", Method::Dora);
}

/// fixtures/quant-straddle/: a model whose 4-bit blocks straddle weight rows (down_proj's
/// 176-value rows at block 64; blocks over several rows at 256 and 4096). Each adapter trains
/// (6 SGD steps, as above) over nf4 + DQ at 64, fp4 at 256 and nf4 at 4096 with PEFT's
/// per-step losses.
#[test]
fn qlora_training_with_blocks_straddling_rows_matches_peft_over_bitsandbytes() {
    let straddle = fixtures().join("quant-straddle");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straddle.join("reference.json")).unwrap())
            .unwrap();
    let cases = reference["qlora_train"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let adapter = case["adapter"].as_str().unwrap();
        let quant_type = match case["quant_type"].as_str().unwrap() {
            "nf4" => QuantType::Nf4,
            _ => QuantType::Fp4,
        };
        let method = if adapter.ends_with("dora") {
            Method::Dora
        } else {
            Method::Lora
        };
        let opts = TrainOptions {
            model: straddle.join("llama-i176").display().to_string(),
            quantize: Some(QuantSpec {
                kind: quant_type,
                double_quant: case["double_quant"].as_bool().unwrap(),
                block_size: case["block_size"].as_u64().unwrap() as usize,
            }),
            init_adapter: Some(straddle.join(adapter)),
            ..qlora_options(adapter, method, &dir.path().join(i.to_string()))
        };
        let expect: Vec<f64> = serde_json::from_value(case["losses"].clone()).unwrap();
        let report = train(&opts).unwrap();
        assert_eq!(report.losses.len(), expect.len());
        let worst = report
            .losses
            .iter()
            .zip(&expect)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("{case}\n  ours {:?}\n  max |diff| {worst:e}", report.losses);
        assert!(
            worst <= 1e-4,
            "{case}: max per-step loss difference {worst}"
        );
    }
}

/// Over a 4-bit base the only tensors with gradients (and optimizer state) are the
/// adapter's: the base has no trainable tensor at all; every adapter gradient is finite and
/// non-zero.
#[test]
fn only_adapter_tensors_get_gradients_over_4bit_base() {
    let dir = fixtures().join("models/llama-tied");
    for (method, adapter) in [
        (Method::Lora, "llama-tied__lora-qv"),
        (Method::Dora, "llama-tied__dora"),
    ] {
        let opts = LoadOptions {
            quantize: Some(nf4_dq()),
        };
        let mut model = Llama::load_with(&dir, &Device::Cpu, &opts).unwrap();
        let tok = lowrank_models::Tokenizer::load(&dir).unwrap();
        let examples = data::load(&fixtures().join("data/train.jsonl"), &tok, 512)
            .unwrap()
            .1;
        let o = TrainOptions {
            method,
            init_adapter: Some(fixtures().join("adapters").join(adapter)),
            ..Default::default()
        };
        let t = setup_trainable(&mut model, &o).unwrap();
        assert!(model.is_quantized(), "the base stays 4-bit");
        assert!(t.names.iter().all(|n| n.contains("lora_")), "{:?}", t.names);
        let grads = gradients(&model, &t, &examples[..2], false).unwrap();
        assert_eq!(grads.len(), t.names.len());
        for (name, g) in &grads {
            assert!(t.names.contains(name), "{name} is not an adapter tensor");
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(v.iter().any(|x| *x != 0.0), "{name}: zero gradient");
        }
    }
}

#[test]
fn full_fine_tuning_and_pissa_need_a_dense_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        quantize: Some(nf4_dq()),
        data: fixtures().join("data/train.jsonl"),
        max_steps: Some(1),
        quiet: true,
        ..Default::default()
    };
    let err = train(&TrainOptions {
        method: Method::Full,
        out: dir.path().join("full"),
        ..base.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("4-bit"), "{err}");
    let err = train(&TrainOptions {
        init: Init::Pissa,
        out: dir.path().join("pissa"),
        ..base
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("dense base"), "{err}");
}
