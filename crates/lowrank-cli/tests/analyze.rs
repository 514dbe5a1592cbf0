//! `lowrank analyze` end to end on the committed fixtures: the JSON report against the dense
//! update computed here, `--compare`, `--full`, the pictures, and bad inputs.

use std::path::Path;
use std::process::Output;

use candle_core::Device;
use lowrank_algebra::analyze::{randomized_svd, RandomizedOptions};
use lowrank_algebra::factored::matrix_from_tensor;
use lowrank_core::lora::LoraAdapter;
use serde_json::Value;

mod common;
use common::*;

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn json_report_matches_the_dense_update() {
    let dir = fx("adapters/llama-untied__all-linear");
    let report = json(&lowrank(&["analyze", &dir, "--json"]));
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["kind"], "adapter");
    assert_eq!(report["method"], "LoRA");
    // The dense ΔW = s·B·A of every module, formed here from the adapter's tensors, and its
    // exact SVD (a sketch as wide as the matrix is the full decomposition).
    let adapter = LoraAdapter::load_standalone(Path::new(&dir), &Device::Cpu).unwrap();
    let modules = report["modules"].as_array().unwrap();
    assert_eq!(modules.len(), adapter.modules.len());
    for m in modules {
        let name = m["module"].as_str().unwrap();
        let module = &adapter.modules[name];
        let dense = matrix_from_tensor(&module.delta_weight().unwrap()).unwrap();
        let exact = randomized_svd(&dense, usize::MAX, RandomizedOptions::default());
        let sigma = floats(&m["singular_values"]);
        assert_eq!(sigma.len(), module.rank(), "{name}");
        assert_eq!(m["stored_rank"], module.rank());
        for (got, want) in sigma.iter().zip(&exact.singular_values) {
            assert!(
                (got - want).abs() < 1e-5 * exact.singular_values[0],
                "{name}: {got} vs {want}"
            );
        }
        assert!((m["frobenius_norm"].as_f64().unwrap() - dense.norm()).abs() < 1e-5 * dense.norm());
        // Effective rank and energy ranks from the definitions.
        let total: f64 = sigma.iter().sum();
        let entropy: f64 = sigma.iter().map(|s| -(s / total) * (s / total).ln()).sum();
        assert!(
            (m["effective_rank"].as_f64().unwrap() - entropy.exp()).abs() < 1e-9,
            "{name}"
        );
        let energy: f64 = sigma.iter().map(|s| s * s).sum();
        for target in m["ranks_for_energy"].as_array().unwrap() {
            let share = target["energy"].as_f64().unwrap();
            let mut kept = 0.0;
            let need = sigma
                .iter()
                .position(|s| {
                    kept += s * s;
                    kept >= share * energy * (1.0 - 1e-12)
                })
                .unwrap()
                + 1;
            assert_eq!(target["rank"], need, "{name} at {share}");
        }
    }
    let suggestion = &report["suggestion"];
    assert_eq!(suggestion["energy"], 0.9);
    let rank = suggestion["rank"].as_u64().unwrap();
    assert!(rank.is_power_of_two(), "{suggestion}");

    // The text report names every module and the suggestion.
    let out = lowrank(&["analyze", &dir]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in adapter.modules.keys() {
        assert!(text.contains(name.as_str()), "{name} missing:\n{text}");
    }
    assert!(
        text.contains(&format!("suggested: --rank {rank}")),
        "{text}"
    );
}

#[test]
fn compare_is_symmetric_and_self_comparison_is_one() {
    let (qv, dora) = (
        fx("adapters/llama-tied__lora-qv"),
        fx("adapters/llama-tied__dora"),
    );
    let forward = json(&lowrank(&["analyze", &qv, "--compare", &dora, "--json"]));
    let backward = json(&lowrank(&["analyze", &dora, "--compare", &qv, "--json"]));
    let (f, b) = (&forward["comparison"], &backward["comparison"]);
    assert_eq!(f["other_method"], "DoRA");
    assert_eq!(b["other_method"], "LoRA");
    let f_modules = f["modules"].as_array().unwrap();
    assert_eq!(f_modules.len(), 4, "q_proj and v_proj of 2 layers");
    assert_eq!(b["unmatched_modules"].as_array().unwrap().len(), 10);
    for (fm, bm) in f_modules.iter().zip(b["modules"].as_array().unwrap()) {
        assert_eq!(fm["module"], bm["module"]);
        for side in ["right", "left"] {
            // φ(A₁, A₂, i, j) = φ(A₂, A₁, j, i).
            let fg = fm[side]["phi"].as_array().unwrap();
            let bg = bm[side]["phi"].as_array().unwrap();
            for (i, row) in fg.iter().enumerate() {
                for (j, phi) in floats(row).iter().enumerate() {
                    assert!((0.0..=1.0).contains(phi));
                    let mirrored = bg[j][i].as_f64().unwrap();
                    assert!((phi - mirrored).abs() < 1e-9, "{side} ({i},{j})");
                }
            }
        }
    }
    assert!(forward["notes"].as_array().unwrap().is_empty());
    assert!(backward["notes"][0].as_str().unwrap().contains("DoRA"));

    let same = json(&lowrank(&["analyze", &qv, "--compare", &qv, "--json"]));
    let summary = &same["comparison"]["summary"];
    for side in ["right", "left"] {
        let s = &summary[side];
        assert!((s["mean_top_direction"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert!((s["mean_whole_subspace"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    }
    let text = lowrank(&["analyze", &qv, "--compare", &dora]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("mean over 4 modules"));
}

#[test]
fn plot_dir_gets_the_pictures_and_full_reads_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let plots = tmp.path().join("plots");
    let plots_arg = plots.to_string_lossy().into_owned();
    let qv = fx("adapters/llama-tied__lora-qv");
    let out = lowrank(&[
        "analyze",
        &qv,
        "--compare",
        &fx("adapters/llama-tied__dora"),
        "--plot-dir",
        &plots_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["spectrum.svg", "similarity.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        // Balanced elements: every opened tag closes (self-closing or with its end tag).
        let opened = svg.matches('<').count();
        let closed = svg.matches("/>").count() + 2 * svg.matches("</").count();
        assert_eq!(opened, closed, "{name}");
    }

    // A model against itself: every update is zero, no rank to suggest.
    let model = fx("models/llama-tied");
    let report = json(&lowrank(&[
        "analyze", "--full", &model, "--base", &model, "--top", "4", "--json",
    ]));
    assert_eq!(report["kind"], "full_fine_tune");
    let modules = report["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 14, "7 linears x 2 layers");
    assert!(modules.iter().all(|m| m["frobenius_norm"] == 0.0));
    assert!(report["suggestion"]["rank"].is_null());
    // Two different models of the same shapes: a dense update, top 4 of 16..32 computed.
    let report = json(&lowrank(&[
        "analyze",
        "--full",
        &fx("models/mistral"),
        "--base",
        &model,
        "--top",
        "4",
        "--json",
    ]));
    for m in report["modules"].as_array().unwrap() {
        assert_eq!(floats(&m["singular_values"]).len(), 4);
        assert_eq!(m["complete_spectrum"], false);
    }
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_problem() {
    assert_fails_with(
        &lowrank(&["analyze", "/nonexistent/adapter"]),
        &["/nonexistent/adapter"],
    );
    // A config field lowrank rejects.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("adapters/llama-tied__lora-qv");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let config_path = tmp.path().join("adapter_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["bias"] = "all".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let bad = tmp.path().to_string_lossy().into_owned();
    assert_fails_with(&lowrank(&["analyze", &bad]), &["bias", &bad]);
    assert_fails_with(
        &lowrank(&[
            "analyze",
            &fx("adapters/llama-tied__lora-qv"),
            "--compare",
            &bad,
        ]),
        &["bias", "comparing with adapter"],
    );
    assert_fails_with(
        &lowrank(&[
            "analyze",
            &fx("adapters/llama-tied__lora-qv"),
            "--energy",
            "1.5",
        ]),
        &["energy share", "1.5"],
    );
    let model = fx("models/llama-tied");
    assert_fails_with(
        &lowrank(&["analyze", "--full", "/nonexistent/model", "--base", &model]),
        &["/nonexistent/model"],
    );
    assert_fails_with(&lowrank(&["analyze", "--full", &model]), &["--base"]);
    assert_fails_with(
        &lowrank(&["analyze", "--full", &model, "--base", &model, "--top", "0"]),
        &["--top"],
    );
    // Randomized-SVD settings mean nothing for an adapter: an error, not silently ignored.
    for flag in ["--top", "--oversample", "--power-iters", "--seed"] {
        assert_fails_with(
            &lowrank(&["analyze", &fx("adapters/llama-tied__lora-qv"), flag, "3"]),
            &["--full"],
        );
    }
}
