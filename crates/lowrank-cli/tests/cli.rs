//! The `lowrank` binary end to end on the committed fixtures: outputs against the transformers
//! + PEFT references, and every bad input giving a clear error and a non-zero exit.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod common;
use common::*;

fn reference(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/{name}.json"))).unwrap(),
    )
    .unwrap()
}

#[test]
fn eval_reports_transformers_loss() {
    for (model, adapter) in [
        ("llama-tied", None),
        ("llama-untied", Some("llama-untied__all-linear")),
        ("llama-tied", Some("llama-tied__dora")),
    ] {
        let model_dir = fx(&format!("models/{model}"));
        let data = fx("data/eval.jsonl");
        let mut args = vec!["eval", "--model", &model_dir, "--data", &data];
        let adapter_dir = adapter.map(|a| fx(&format!("adapters/{a}")));
        if let Some(a) = &adapter_dir {
            args.extend(["--adapter", a]);
        }
        let expect = reference(adapter.unwrap_or(model));
        for extra in [&[][..], &["--max-len", "8"][..]] {
            if adapter.is_none() && !extra.is_empty() {
                continue;
            }
            let mut all = args.clone();
            all.extend(extra);
            let got = json_out(&lowrank(&all));
            let want = if extra.is_empty() {
                &expect
            } else {
                &expect["max_len_8"]
            };
            assert_eq!(got["tokens"], want["tokens"]);
            let diff = (got["loss"].as_f64().unwrap() - want["loss"].as_f64().unwrap()).abs();
            assert!(
                diff < 1e-4,
                "{model} {adapter:?} {extra:?}: loss differs by {diff}"
            );
        }
        if let Some(a) = &adapter_dir {
            let merged = json_out(&lowrank(&[
                "eval",
                "--model",
                &model_dir,
                "--adapter",
                a,
                "--merge",
                "--data",
                &data,
            ]));
            let diff = (merged["loss"].as_f64().unwrap() - expect["loss"].as_f64().unwrap()).abs();
            assert!(diff < 1e-4, "--merge: {diff}");
        }
    }
}

#[test]
fn merge_writes_a_checkpoint_with_the_adapters_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("merged");
    let out_s = out_dir.to_string_lossy().into_owned();
    let model = fx("models/qwen2-tied");
    let adapter = fx("adapters/qwen2-tied__regex");
    let out = lowrank(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &out_s,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let got = json_out(&lowrank(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &fx("data/eval.jsonl"),
    ]));
    let want = reference("qwen2-tied__regex");
    assert!((got["loss"].as_f64().unwrap() - want["loss"].as_f64().unwrap()).abs() < 1e-4);
    // No tensor of the adapter's kind may remain; the names are the base's.
    let bytes = std::fs::read(out_dir.join("model.safetensors")).unwrap();
    let st = safetensors_names(&bytes);
    assert!(
        st.iter().all(|n| !n.contains("lora"))
            && st.contains(&"model.embed_tokens.weight".to_string())
    );
    // A second merge into the same folder is refused.
    let again = lowrank(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--out",
        &out_s,
    ]);
    assert_fails_with(&again, &["already holds a checkpoint"]);
}

fn safetensors_names(bytes: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[test]
fn inspect_counts_r_times_d_plus_k() {
    let out = lowrank(&["inspect", &fx("adapters/llama-tied__lora-qv"), "--json"]);
    let report = json_out_whole(&out);
    // q_proj 32×32 and v_proj 16×32 at rank 4, in 2 layers: 2·(4·64 + 4·48).
    assert_eq!(report["trainable_parameters"], 2 * (4 * 64 + 4 * 48));
    assert_eq!(report["modules"].as_array().unwrap().len(), 4);
    assert_eq!(report["method"], "LoRA");
    // The base is found from base_model_name_or_path only when run from the repo root, so name it.
    let out = lowrank(&[
        "inspect",
        &fx("adapters/llama-untied__all-linear"),
        "--json",
        "--model",
        &fx("models/llama-untied"),
    ]);
    let report = json_out_whole(&out);
    let q0 = report["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["module"] == "model.layers.0.self_attn.q_proj")
        .unwrap();
    assert_eq!(q0["rank"], 2);
    assert!((q0["scale"].as_f64().unwrap() - 16.0 / 2f64.sqrt()).abs() < 1e-9);
    assert!(report["share_percent"].as_f64().unwrap() > 0.0);
    let table = lowrank(&["inspect", &fx("adapters/llama-tied__dora")]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("DoRA adapter"));
}

fn json_out_whole(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_streams_text_and_is_deterministic() {
    let model = fx("models/llama-tied");
    let args = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "The cat",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--ignore-eos",
    ];
    let a = lowrank(&args);
    let b = lowrank(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stderr).contains("decode: 8 tokens"));
    let chat = lowrank(&[
        "generate",
        "--model",
        &fx("models/qwen2-tied"),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "3",
    ]);
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );
}

/// `--bf16-activations` generates over bf16 weights, and without `--bf16-weights` is refused
/// naming both flags.
#[test]
fn bf16_activations_need_bf16_weights() {
    let model = fx("models/llama-tied");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "The cat",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        lowrank(&args)
    };
    let ok = run(&["--bf16-weights", "--bf16-activations"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr).contains("decode: 4 tokens"));
    let refused = run(&["--bf16-activations"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("--bf16-activations")
            && err.contains("--bf16-weights"),
        "{err}"
    );
}

#[test]
fn every_command_has_help() {
    for cmd in ["eval", "generate", "merge", "inspect"] {
        let out = lowrank(&[cmd, "--help"]);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{cmd} --help"
        );
    }
}

/// Copies a fixture adapter into a temp folder so a test can break it.
fn adapter_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("adapters").join(name).join(f),
            tmp.path().join(f),
        )
        .unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn eval_with(model: &str, adapter: &Path) -> Output {
    let a = adapter.to_string_lossy().into_owned();
    lowrank(&[
        "eval",
        "--model",
        &fx(&format!("models/{model}")),
        "--adapter",
        &a,
        "--data",
        &fx("data/eval.jsonl"),
    ])
}

#[test]
fn bad_adapters_are_named_errors() {
    // Rank in the config that does not fit the tensors.
    let d = adapter_copy("llama-tied__lora-qv");
    edit_config(d.path(), |v| v["r"] = 8.into());
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["adapter_model.safetensors", "lora_A", "expected [8, 32]"],
    );
    // Targets a module that has no tensors.
    let d = adapter_copy("llama-tied__lora-qv");
    edit_config(d.path(), |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "v_proj", "k_proj"])
    });
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["k_proj", "missing lora_A.weight"],
    );
    // Tensors the config does not target.
    let d = adapter_copy("llama-tied__lora-qv");
    edit_config(d.path(), |v| {
        v["target_modules"] = serde_json::json!(["q_proj"])
    });
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["v_proj", "does not target it"],
    );
    // An adapter for another base: shapes do not fit.
    let d = adapter_copy("llama-untied__all-linear");
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["has shape", "expected"],
    );
    // Unsupported PEFT options.
    let d = adapter_copy("llama-tied__lora-qv");
    edit_config(d.path(), |v| v["bias"] = "all".into());
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["adapter_config.json", "`bias`"],
    );
    // DoRA flag without magnitudes.
    let d = adapter_copy("llama-tied__lora-qv");
    edit_config(d.path(), |v| v["use_dora"] = true.into());
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["lora_magnitude_vector"],
    );
    // Missing files.
    let d = adapter_copy("llama-tied__lora-qv");
    std::fs::remove_file(d.path().join("adapter_model.safetensors")).unwrap();
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["adapter_model.safetensors"],
    );
    let empty = tempfile::tempdir().unwrap();
    assert_fails_with(
        &eval_with("llama-tied", empty.path()),
        &["adapter_config.json"],
    );
    // Not JSON.
    let d = adapter_copy("llama-tied__lora-qv");
    std::fs::write(d.path().join("adapter_config.json"), "{").unwrap();
    assert_fails_with(
        &eval_with("llama-tied", d.path()),
        &["adapter_config.json", "invalid JSON"],
    );
}

#[test]
fn bad_models_and_data_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{oops\n").unwrap();
    let d = data.to_string_lossy().into_owned();
    assert_fails_with(
        &lowrank(&["eval", "--model", &fx("models/llama-tied"), "--data", &d]),
        &["bad.jsonl:2"],
    );
    std::fs::write(&data, "{\"prompt\": \"x\"}\n").unwrap();
    assert_fails_with(
        &lowrank(&["eval", "--model", &fx("models/llama-tied"), "--data", &d]),
        &["bad.jsonl:1", "\"text\""],
    );
    // A path (an org/name would be looked up on the Hub: tests/hub.rs).
    assert_fails_with(
        &lowrank(&["eval", "--model", "./no/such-model", "--data", &d]),
        &["no/such-model", "not found"],
    );

    // A model folder with an unsupported architecture, then with a tensor missing.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixtures().join("models/llama-tied").join(f), model.join(f)).unwrap();
    }
    let config_path = model.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let good = config.clone();
    config["model_type"] = "gpt_neox".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let m = model.to_string_lossy().into_owned();
    let eval_data = fx("data/eval.jsonl");
    assert_fails_with(
        &lowrank(&["eval", "--model", &m, "--data", &eval_data]),
        &["config.json", "gpt_neox"],
    );
    let mut more_layers = good.clone();
    more_layers["num_hidden_layers"] = 3.into();
    std::fs::write(&config_path, more_layers.to_string()).unwrap();
    assert_fails_with(
        &lowrank(&["eval", "--model", &m, "--data", &eval_data]),
        &["model.layers.2", "missing tensor"],
    );
    let mut wider = good;
    wider["intermediate_size"] = 65.into();
    std::fs::write(&config_path, wider.to_string()).unwrap();
    assert_fails_with(
        &lowrank(&["eval", "--model", &m, "--data", &eval_data]),
        &["gate_proj", "has shape"],
    );
}

/// `lowrank train` end to end with the flags the README shows: output files, log fields,
/// determinism under a seed, and the trained adapter used by `eval`.
#[test]
fn train_writes_adapter_log_plot_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = tmp.path().join(name);
        let o = out.to_string_lossy().into_owned();
        let model = fx("models/llama-tied");
        let data = fx("data/train.jsonl");
        let args = [
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--out",
            &o,
            "--eval-split",
            "0.2",
            "--targets",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--lr",
            "1e-2",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--max-steps",
            "3",
            "--save-every",
            "2",
            "--seed",
            "7",
            "--max-len",
            "32",
            "--quiet",
        ];
        let result = lowrank(&args);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        out
    };
    let out = run("a");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_log.jsonl",
        "loss.svg",
        "checkpoint-2",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let log = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap();
    let rows: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&Value> = rows
        .iter()
        .filter(|r| r.get("step").is_some() && r.get("grad_norm").is_some())
        .collect();
    assert_eq!(
        steps
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for r in &steps {
        for field in ["loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_mb"] {
            assert!(
                r[field].as_f64().is_some_and(f64::is_finite),
                "{field} in {r}"
            );
        }
    }
    assert!(
        rows.iter().any(|r| r.get("eval_loss").is_some()),
        "no eval line: {log}"
    );
    // Same seed, same data, same machine: the same losses.
    let again = std::fs::read_to_string(run("b").join("training_log.jsonl")).unwrap();
    let losses = |text: &str| -> Vec<f64> {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r.get("grad_norm").is_some())
            .map(|r| r["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&log), losses(&again));
    let adapter = out.to_string_lossy().into_owned();
    json_out(&lowrank(&[
        "eval",
        "--model",
        &fx("models/llama-tied"),
        "--adapter",
        &adapter,
        "--data",
        &fx("data/eval.jsonl"),
    ]));
    // A bad line is named by file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"prompt\": 3}\n").unwrap();
    let b = bad.to_string_lossy().into_owned();
    let o = tmp.path().join("c").to_string_lossy().into_owned();
    assert_fails_with(
        &lowrank(&[
            "train",
            "--model",
            &fx("models/llama-tied"),
            "--data",
            &b,
            "--out",
            &o,
        ]),
        &["bad.jsonl:2"],
    );
}

/// A reader that goes away (`lowrank ... | head`) ends the command quietly, not with a panic.
#[cfg(unix)]
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["inspect", &fx("adapters/llama-untied__all-linear")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lowrank");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// bf16 training with an unknown `LOWRANK_BF16_GEMM` kernel stops before writing anything.
#[test]
fn an_unknown_bf16_kernel_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["train", "--model", &fx("models/llama-tied")])
        .args(["--data", &fx("data/train.jsonl"), "--quiet"])
        .args(["--compute-dtype", "bf16", "--out"])
        .arg(&out)
        .env("LOWRANK_BF16_GEMM", "fast")
        .output()
        .expect("run lowrank");
    assert_fails_with(&output, &["LOWRANK_BF16_GEMM", "\"fast\"", "dot or widen"]);
    assert!(!out.exists(), "nothing is written");
}

/// A build without the `mpi` feature started as one of several ranks (`mpirun -np 2`, `srun
/// -n 2`) refuses to train: each copy would train alone and overwrite the others' --out.
#[cfg(not(feature = "mpi"))]
#[test]
fn train_without_mpi_refuses_to_be_one_of_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for var in ["OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_lowrank"))
            .args(["train", "--model", &fx("models/llama-tied")])
            .args(["--data", &fx("data/train.jsonl"), "--quiet", "--out"])
            .arg(&out)
            .env(var, "2")
            .output()
            .expect("run lowrank");
        assert_fails_with(
            &output,
            &[var, "built without MPI", "--features lowrank-cli/mpi"],
        );
        assert!(!out.exists(), "nothing is written");
    }
}
