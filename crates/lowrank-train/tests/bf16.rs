//! `--compute-dtype bf16`: mixed-precision training over a bf16 base tracks the f32 run, every
//! trainable tensor still gets a gradient, and the combinations it does not cover are errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lowrank_models::Llama;
use lowrank_quant::{QuantSpec, QuantType};
use lowrank_train::trainable::setup_trainable;
use lowrank_train::trainer::gradients;
use lowrank_train::{data, train, ComputeDtype, Method, TrainOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn run(out: &Path, method: Method, compute_dtype: ComputeDtype) -> TrainOptions {
    TrainOptions {
        model: fixtures().join("models/llama-tied").display().to_string(),
        data: fixtures().join("data/train.jsonl"),
        out: out.to_path_buf(),
        method,
        compute_dtype,
        rank: 4,
        alpha: 8.0,
        lr: 1e-2,
        batch_size: 2,
        epochs: 3,
        shuffle: false,
        quiet: true,
        ..Default::default()
    }
}

fn norm(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// The bar: per-step losses within 1% of the f32 run (AdamW, all-linear LoRA, DoRA
/// and AdaLoRA). They must also differ, or the bf16 path was not taken.
#[test]
fn bf16_training_losses_stay_within_one_percent_of_f32() {
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Lora, Method::Dora, Method::Adalora] {
        let f32_run = train(&run(
            &dir.path().join(format!("{method}-f32")),
            method,
            ComputeDtype::F32,
        ))
        .unwrap();
        let bf16_run = train(&run(
            &dir.path().join(format!("{method}-bf16")),
            method,
            ComputeDtype::Bf16,
        ))
        .unwrap();
        assert_eq!(f32_run.losses.len(), bf16_run.losses.len());
        assert!(f32_run.losses.len() >= 6);
        let worst = f32_run
            .losses
            .iter()
            .zip(&bf16_run.losses)
            .map(|(a, b)| (a - b).abs() / a)
            .fold(0.0, f64::max);
        eprintln!(
            "{method}: f32 {:?}\n  bf16 {:?}\n  worst relative difference {worst:.2e}",
            f32_run.losses, bf16_run.losses
        );
        assert!(worst < 0.01, "{method}: bf16 losses differ by {worst:.3e}");
        assert!(worst > 0.0, "{method}: bf16 gave the f32 losses exactly");
        if method == Method::Adalora {
            continue;
        }
        // The trained adapter is an ordinary f32 PEFT adapter.
        let adapter = lowrank_core::lora::LoraAdapter::load_standalone(
            &dir.path().join(format!("{method}-bf16")),
            &Device::Cpu,
        )
        .unwrap();
        assert!(!adapter.modules.is_empty());
        assert!(adapter.modules.values().all(|m| m.a.dtype() == DType::F32));
    }
}

/// Gradients under bf16 compute stay near the f32 ones. This random tiny model is sensitive:
/// rounding only its weights to bf16 (f32 compute) already moves these gradients by 1–4%
/// (measured once by hand), so the bar is 10%.
#[test]
fn every_trainable_tensor_gets_a_gradient_close_to_f32s() {
    let dir = fixtures().join("models/llama-tied");
    let tok = lowrank_models::Tokenizer::load(&dir).unwrap();
    let ex = data::load(&fixtures().join("data/train.jsonl"), &tok, 512)
        .unwrap()
        .1;
    for method in [Method::Lora, Method::Dora] {
        let opts = TrainOptions {
            method,
            rank: 4,
            ..Default::default()
        };
        let mut model = Llama::load(&dir, &Device::Cpu).unwrap();
        let t = setup_trainable(&mut model, &opts).unwrap();
        // B starts at zero, which would leave every A without a gradient: fixed pseudo-random
        // values instead (seeded, so the test does not change from run to run).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for (name, var) in t.names.iter().zip(&t.vars) {
            if name.contains("lora_B") {
                let values: Vec<f32> = (0..var.elem_count())
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                    })
                    .collect();
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let want = gradients(&model, &t, &ex[..3], false).unwrap();
        model.compute_in_bf16().unwrap();
        let got = gradients(&model, &t, &ex[..3], false).unwrap();
        assert_eq!(
            got.len(),
            t.names.len(),
            "{method}: a tensor got no gradient"
        );
        for name in &t.names {
            let (g, w) = (&got[name], &want[name]);
            let (gn, wn) = (norm(g), norm(w));
            let diff = norm(&(g - w).unwrap());
            assert!(
                gn.is_finite() && gn > 0.0,
                "{method} {name}: gradient norm {gn}"
            );
            assert!(
                diff <= 0.1 * wn,
                "{method} {name}: |g_bf16 − g_f32| {diff:.3e} vs |g_f32| {wn:.3e}"
            );
        }
    }
}

#[test]
fn bf16_is_refused_where_it_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let err = train(&run(
        &dir.path().join("full"),
        Method::Full,
        ComputeDtype::Bf16,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--compute-dtype") && err.contains("full"),
        "{err}"
    );
    let err = train(&TrainOptions {
        quantize: Some(QuantSpec {
            kind: QuantType::Nf4,
            double_quant: true,
            block_size: 64,
        }),
        ..run(&dir.path().join("q"), Method::Lora, ComputeDtype::Bf16)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--compute-dtype") && err.contains("4-bit"),
        "{err}"
    );
    assert!(!dir.path().join("full").exists() && !dir.path().join("q").exists());
}
