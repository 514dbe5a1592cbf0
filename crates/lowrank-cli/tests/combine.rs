//! `lowrank combine` end to end: combined adapters load in `lowrank eval` and give the loss of
//! the adapters stacked with their weights (linear, cat, svd at full rank), a DoRA adapter
//! combines to a plain LoRA adapter with the DoRA's loss, and bad inputs fail naming the field
//! without leaving an output folder.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
use lowrank_core::targets::ModuleSelector;
use serde_json::Value;

mod common;
use common::*;

const MODEL: &str = "models/llama-tied";
const QV: &str = "adapters/llama-tied__lora-qv";

/// `lowrank eval` loss of the llama-tied fixture with `adapters` (`DIR[:WEIGHT]`) stacked.
fn eval_loss(adapters: &[&str]) -> f64 {
    let (model, data) = (fx(MODEL), fx("data/eval.jsonl"));
    let mut args = vec!["eval", "--model", &model, "--data", &data];
    for a in adapters {
        args.extend(["--adapter", a]);
    }
    json_out(&lowrank(&args))["loss"].as_f64().unwrap()
}

/// A deterministic pseudo-random (rows × cols) tensor in [−amplitude, amplitude].
fn pseudo_random(rows: usize, cols: usize, seed: u64, amplitude: f32) -> Tensor {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state % 2001) as f32 / 1000.0 - 1.0) * amplitude
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
}

/// Writes a LoRA adapter for llama-tied over `targets` (module-name suffixes) at `rank`, with
/// rsLoRA and B ≠ 0; `shape_of` may override a module's (out, in) to make a mismatched one.
fn write_adapter(
    dir: &Path,
    targets: &[&str],
    rank: usize,
    shape_of: impl Fn(&str, (usize, usize)) -> (usize, usize),
) {
    let model = lowrank_models::Llama::load(Path::new(&fx(MODEL)), &Device::Cpu).unwrap();
    let mut config = LoraConfig::new(
        rank,
        6.0,
        ModuleSelector::Names(targets.iter().map(|t| t.to_string()).collect()),
    );
    config.use_rslora = true;
    let mut modules = std::collections::BTreeMap::new();
    for (i, linear) in model
        .linears()
        .into_iter()
        .filter(|l| config.targets_module(&l.name))
        .enumerate()
    {
        let (out, inp) = shape_of(&linear.name, (linear.out_features, linear.in_features));
        let module = LoraModule {
            a: pseudo_random(rank, inp, 2 * i as u64 + 1, 0.3),
            b: pseudo_random(out, rank, 2 * i as u64 + 2, 0.3),
            magnitude: None,
            scale: config.scale_for(&linear.name),
        };
        modules.insert(linear.name.clone(), module);
    }
    LoraAdapter { config, modules }.save(dir).unwrap();
}

/// Runs `lowrank combine` with `args` plus `--out out`.
fn combine(args: &[&str], out: &Path) -> Output {
    let out = out.to_string_lossy().into_owned();
    let mut all = vec!["combine"];
    all.extend(args);
    all.extend(["--out", &out]);
    lowrank(&all)
}

#[test]
fn combined_adapters_give_the_loss_of_the_stacked_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    // A second adapter with another rank, rsLoRA and an overlapping target set (v_proj).
    let other = tmp.path().join("kov");
    write_adapter(&other, &["k_proj", "o_proj", "v_proj"], 3, |_, s| s);
    let (qv, other) = (fx(QV), other.to_string_lossy().into_owned());
    let adapters = format!("{qv},{other}");
    let stacked = eval_loss(&[&format!("{qv}:0.6"), &format!("{other}:-0.4")]);
    let base = eval_loss(&[]);
    let qv_alone = eval_loss(&[&qv]);
    assert!((stacked - base).abs() > 1e-3 && (stacked - qv_alone).abs() > 1e-3);

    let run = |method: &str, extra: &[&str]| -> (PathBuf, Value, String) {
        let out = tmp.path().join(format!("{method}{}", extra.join("")));
        let mut args = vec![
            "--adapters",
            &adapters,
            "--weights",
            "0.6,-0.4",
            "--method",
            method,
        ];
        args.extend(extra);
        let output = combine(&args, &out);
        let summary = json_out(&output);
        (
            out,
            summary,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    for (method, extra) in [
        ("linear", &[][..]),
        ("cat", &[][..]),
        ("svd", &["--rank", "7"][..]),
        ("dare_linear", &["--density", "1"][..]),
    ] {
        let (out, summary, table) = run(method, extra);
        let loss = eval_loss(&[&out.to_string_lossy()]);
        assert!(
            (loss - stacked).abs() < 1e-5,
            "{method}: {loss} vs stacked {stacked}"
        );
        assert!(
            summary["max_relative_error"].as_f64().unwrap() < 1e-6,
            "{method}: {summary}"
        );
        // The union of targets: q, v from one, k, o, v from the other, in two layers.
        assert_eq!(summary["modules"], 8, "{method}");
        assert!(table.contains("model.layers.1.self_attn.k_proj") && table.contains(method));
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["use_rslora"], false);
        assert_eq!(config["r"], config["lora_alpha"]);
    }

    // Stacking at generation time gives the greedy text of the exact combination.
    let generate = |adapters: &[&str]| -> String {
        let model = fx(MODEL);
        let mut args = vec!["generate", "--model", &model, "--prompt", "The quick cat"];
        args.extend(["--max-tokens", "12", "--ignore-eos"]);
        for a in adapters {
            args.extend(["--adapter", a]);
        }
        ok(&lowrank(&args))
    };
    let linear = tmp.path().join("linear"); // written by the loop above
    let stacked_text = generate(&[&format!("{qv}:0.6"), &format!("{other}:-0.4")]);
    assert_eq!(stacked_text, generate(&[&linear.to_string_lossy()]));
    assert_ne!(stacked_text, generate(&[]));

    // Truncated to rank 1, the loss moves and every module reports a truncation error.
    let (out, summary, table) = run("svd", &["--rank", "1"]);
    assert!(summary["max_relative_error"].as_f64().unwrap() > 1e-3);
    let v0 = table
        .lines()
        .find(|l| l.starts_with("model.layers.0.self_attn.v_proj"))
        .unwrap();
    let fields: Vec<&str> = v0.split_whitespace().collect();
    assert_eq!(&fields[1..4], &["svd", "2", "1"], "{v0}");
    assert!(fields[4].parse::<f64>().unwrap() > 1e-3, "{v0}");
    let truncated = eval_loss(&[&out.to_string_lossy()]);
    assert!((truncated - stacked).abs() > 1e-6);

    // Pruning methods run and load; DARE is reproducible with its seed.
    let (ties, summary, table) = run("ties", &["--density", "0.5"]);
    assert!(eval_loss(&[&ties.to_string_lossy()]).is_finite());
    assert!(summary["max_relative_error"].as_f64().unwrap() < 1e-6);
    assert!(table.contains("change vs Σ"));
    let (first, ..) = run("dare_ties", &["--density", "0.5", "--seed", "5"]);
    let again = tmp.path().join("dare-again");
    let seeded = [
        "--adapters",
        &adapters,
        "--weights",
        "0.6,-0.4",
        "--method",
        "dare_ties",
        "--density",
        "0.5",
        "--seed",
        "5",
    ];
    json_out(&combine(&seeded, &again));
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&first), bytes(&again));
}

#[test]
fn a_dora_adapter_combines_to_lora_by_its_effective_update() {
    let tmp = tempfile::tempdir().unwrap();
    let dora = fx("adapters/llama-tied__dora");
    let out = tmp.path().join("dora-as-lora");
    let model = fx(MODEL);
    let args = [
        "--adapters",
        &dora,
        "--weights",
        "1",
        "--method",
        "linear",
        "--base",
        &model,
    ];
    json_out(&combine(&args, &out));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], false);
    let loss = eval_loss(&[&out.to_string_lossy()]);
    let dora_loss = eval_loss(&[&dora]);
    assert!(
        (loss - dora_loss).abs() < 1e-5,
        "{loss} vs DoRA {dora_loss}"
    );

    // Without the base the DoRA update is unknown.
    let missing = tmp.path().join("no-base");
    let failed = combine(&args[..6], &missing);
    assert_fails_with(&failed, &["llama-tied__dora", "use_dora", "--base"]);
    assert!(!missing.exists());
}

#[test]
fn bad_inputs_fail_naming_the_field_and_leave_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // The same module name as the fixture's v_proj (16×32) but 32×32.
    let wide = tmp.path().join("wide-v");
    write_adapter(&wide, &["v_proj"], 2, |_, (_, inp)| (32, inp));
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = work.join("out");
    let qv = fx(QV);
    let pair = format!("{qv},{}", wide.to_string_lossy());
    let qv_twice = format!("{qv},{qv}");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "--adapters",
                &qv_twice,
                "--weights",
                "0.5",
                "--method",
                "linear",
            ],
            vec!["--weights", "1 weight(s) for 2 adapter(s)"],
        ),
        (
            vec![
                "--adapters",
                &qv_twice,
                "--weights",
                "1,1",
                "--method",
                "average",
            ],
            vec!["--method", "unknown method \"average\""],
        ),
        (
            vec![
                "--adapters",
                &qv_twice,
                "--weights",
                "1,1",
                "--method",
                "ties",
            ],
            vec!["--density", "fraction of entries to keep"],
        ),
        (
            vec![
                "--adapters",
                &qv_twice,
                "--weights",
                "1,1",
                "--method",
                "ties",
                "--density",
                "1.5",
            ],
            vec!["--density", "1.5 is outside (0, 1]"],
        ),
        (
            vec![
                "--adapters",
                &qv_twice,
                "--weights",
                "1,1",
                "--method",
                "cat",
                "--rank",
                "2",
            ],
            vec!["--rank", "not used by method cat"],
        ),
        (
            vec![
                "--adapters",
                &pair,
                "--weights",
                "1,1",
                "--method",
                "linear",
            ],
            vec![
                "model.layers.0.self_attn.v_proj",
                "16×32",
                "32×32",
                "wide-v",
            ],
        ),
        (
            vec![
                "--adapters",
                "no/such/adapter",
                "--weights",
                "1",
                "--method",
                "linear",
            ],
            vec!["no/such/adapter"],
        ),
    ];
    for (args, needles) in cases {
        assert_fails_with(&combine(&args, &out), &needles);
        assert!(!out.exists(), "{args:?} left {}", out.display());
        let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left files in {}", work.display());
    }
    // An occupied output folder is refused and kept as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let args = ["--adapters", &qv, "--weights", "1", "--method", "linear"];
    assert_fails_with(&combine(&args, &out), &["already exists"]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
}

/// Where PEFT computes what lowrank does — the `_svd` types merge the dense updates; with
/// every scale 1 and (for TIES) equal weights its double scaling and pre-weighting sign vote
/// do not show — `lowrank combine` must give PEFT's update (scripts/make_combine_fixtures.py).
#[test]
fn svd_variants_match_peft_where_peft_is_exact() {
    let dir = fixtures().join("combine");
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let adapters = format!("{},{}", dir.join("a").display(), dir.join("b").display());
    let tmp = tempfile::tempdir().unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let weights: Vec<String> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.to_string())
            .collect();
        let (weights, rank) = (weights.join(","), case["svd_rank"].to_string());
        let mut args = vec![
            "--adapters",
            &adapters,
            "--weights",
            &weights,
            "--method",
            case["method"].as_str().unwrap(),
            "--rank",
            &rank,
        ];
        let density = case["density"].as_f64().map(|d| d.to_string());
        if let Some(d) = &density {
            args.extend(["--density", d]);
        }
        if let Some(sign) = case["majority_sign"].as_str() {
            args.extend(["--majority-sign", sign]);
        }
        let out = tmp.path().join(name);
        json_out(&combine(&args, &out));
        let ours = LoraAdapter::load_standalone(&out, &Device::Cpu).unwrap();
        let prefix = format!("{name}.");
        let mut compared = 0;
        for (key, want) in reference.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let module = &key[prefix.len()..];
            let got = ours.modules[module].delta_weight().unwrap();
            let diff = (&got - want).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = want.sqr().unwrap().sum_all().unwrap();
            let relative =
                (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            assert!(
                relative < 1e-5,
                "{name} {module}: ‖ours − PEFT‖/‖PEFT‖ = {relative}"
            );
            compared += 1;
        }
        assert_eq!(compared, 6, "{name}");
    }
}
