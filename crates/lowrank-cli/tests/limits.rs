//! Limits and crash safety of the commands, through the binary: generation bounded by the
//! model's positions and memory, evaluation in windows of the model's context, long training
//! lines cut before tokenizing, non-finite weights and out-of-range configs refused at load,
//! a training run killed or failed and resumed, and errors that name the flag at fault.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod common;
use common::*;

const MODEL: &str = "models/llama-tied";
const QV: &str = "adapters/llama-tied__lora-qv";

/// Copies a fixture folder (models/..., adapters/...) into `dest`.
fn copy_fixture(rel: &str, dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(fixtures().join(rel)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
    dest.to_path_buf()
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Sets element 0 of tensor `name` in a safetensors file to `value`.
fn poison_tensor(file: &Path, name: &str, value: f32) {
    let mut tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let t = &tensors[name];
    let (shape, dtype) = (t.shape().clone(), t.dtype());
    let mut values = t
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[0] = value;
    let poisoned = candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    tensors.insert(name.to_string(), poisoned);
    candle_core::safetensors::save(&tensors, file).unwrap();
}

fn exit_code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn generate_refuses_more_positions_than_the_model_has_or_memory_holds() {
    let out = lowrank(&[
        "generate",
        "--model",
        &fx(MODEL),
        "--prompt",
        "The cat",
        "--max-tokens",
        "1000000000",
    ]);
    assert_fails_with(
        &out,
        &[
            "max tokens (1000000000)",
            "256 positions",
            "max_position_embeddings",
        ],
    );
    assert_eq!(exit_code(&out), Some(1));
    // A model that claims a huge context: the KV cache, reserved up front, cannot fit.
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture(MODEL, &tmp.path().join("model"));
    edit_json(&model.join("config.json"), |v| {
        v["max_position_embeddings"] = 1_000_000_000_000_000u64.into()
    });
    let out = lowrank(&[
        "generate",
        "--model",
        &s(&model),
        "--prompt",
        "The cat",
        "--max-tokens",
        "100000000000000",
    ]);
    assert_fails_with(&out, &["KV cache", "MB of memory available"]);
    assert_eq!(exit_code(&out), Some(1));
}

/// `fixtures/reference/windows.json` (scripts/make_window_fixtures.py): transformers'
/// sliding-window loss of a line 12 times the model's context.
#[test]
fn eval_scores_lines_longer_than_the_context_in_windows_like_transformers() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/windows.json")).unwrap(),
    )
    .unwrap();
    let (model, data) = (fx(MODEL), fx("data/long.jsonl"));
    for (stride, key) in [(None, "stride_255"), (Some("100"), "stride_100")] {
        let mut args = vec!["eval", "--model", &model, "--data", &data];
        if let Some(s) = stride {
            args.extend(["--stride", s]);
        }
        let out = lowrank(&args);
        let got = json_out(&out);
        let want = &reference[key];
        assert_eq!(got["tokens"], want["tokens"], "{key}");
        let diff = (got["loss"].as_f64().unwrap() - want["loss"].as_f64().unwrap()).abs();
        assert!(diff < 1e-4, "{key}: loss differs by {diff}: {got}");
        assert_eq!(got["windowed_lines"], 1, "{got}");
        assert_eq!(got["window"], 256);
        assert!(String::from_utf8_lossy(&out.stderr).contains("windows of 256 tokens"));
    }
    assert_fails_with(
        &lowrank(&[
            "eval", "--model", &model, "--data", &data, "--stride", "256",
        ]),
        &["--stride", "between 1 and 255"],
    );
}

/// One 10 MB line cut to 64 tokens is tokenized only as far as those need; the example is
/// what tokenizing the whole line and truncating gives (data.rs tests that equality).
#[test]
fn a_huge_training_line_is_cut_before_it_is_tokenized() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("huge.jsonl");
    let sentence = "The small dog finds the red ball under the tree. ";
    let text = sentence.repeat(10_000_000 / sentence.len());
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            serde_json::json!({ "text": text }),
            serde_json::json!({"text": sentence})
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let report = json_out(&lowrank(&[
        "train",
        "--model",
        &fx(MODEL),
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--max-len",
        "64",
        "--max-steps",
        "1",
        "--quiet",
    ]));
    // Reading the 10 MB file and its JSON value take ~30 MB; tokenizing the whole line took
    // 1.9 GB.
    let peak = report["peak_rss_mb"].as_f64().unwrap();
    assert!(peak < 400.0, "peak RSS {peak} MB");
}

#[test]
fn non_finite_weights_and_out_of_range_configs_are_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = |model: &str, adapter: Option<&Path>| {
        let (data, adapter) = (fx("data/eval.jsonl"), adapter.map(s));
        let mut args = vec!["eval", "--model", model, "--data", &data];
        if let Some(a) = &adapter {
            args.extend(["--adapter", a]);
        }
        lowrank(&args)
    };
    // An adapter tensor holding NaN, then one holding +inf: eval, generate and combine refuse it.
    let nan = copy_fixture(QV, &tmp.path().join("nan"));
    let b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    poison_tensor(&nan.join("adapter_model.safetensors"), b, f32::NAN);
    assert_fails_with(
        &eval(&fx(MODEL), Some(&nan)),
        &["adapter_model.safetensors", b, "non-finite"],
    );
    assert_fails_with(
        &lowrank(&[
            "generate",
            "--model",
            &fx(MODEL),
            "--adapter",
            &s(&nan),
            "--prompt",
            "The cat",
        ]),
        &[b, "non-finite"],
    );
    let combined = tmp.path().join("combined");
    assert_fails_with(
        &lowrank(&[
            "combine",
            "--adapters",
            &format!("{},{}", s(&nan), fx(QV)),
            "--weights",
            "1,1",
            "--method",
            "linear",
            "--out",
            &s(&combined),
        ]),
        &[b, "non-finite"],
    );
    assert!(!combined.exists());
    let inf = copy_fixture(QV, &tmp.path().join("inf"));
    poison_tensor(&inf.join("adapter_model.safetensors"), b, f32::INFINITY);
    assert_fails_with(&eval(&fx(MODEL), Some(&inf)), &[b, "non-finite"]);
    // lora_alpha so large that the scale α/r overflows f32.
    let alpha = copy_fixture(QV, &tmp.path().join("alpha"));
    edit_json(&alpha.join("adapter_config.json"), |v| {
        v["lora_alpha"] = 1e300.into()
    });
    assert_fails_with(
        &eval(&fx(MODEL), Some(&alpha)),
        &["adapter_config.json", "`lora_alpha`", "1e300"],
    );
    // A model weight holding NaN (the bf16, sharded checkpoint too).
    let model = copy_fixture(MODEL, &tmp.path().join("model"));
    let weight = "model.layers.1.mlp.down_proj.weight";
    poison_tensor(&model.join("model.safetensors"), weight, f32::NAN);
    assert_fails_with(
        &eval(&s(&model), None),
        &["model.safetensors", weight, "non-finite"],
    );
    let sharded = copy_fixture("models/llama-untied", &tmp.path().join("sharded"));
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let embed = "model.embed_tokens.weight";
    let shard = index["weight_map"][embed].as_str().unwrap();
    poison_tensor(&sharded.join(shard), embed, f32::NEG_INFINITY);
    assert_fails_with(&eval(&s(&sharded), None), &[embed, "non-finite"]);
    // Config values a forward pass divides by or takes powers of.
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("num_hidden_layers", serde_json::json!(0)),
        ("max_position_embeddings", serde_json::json!(0)),
    ] {
        let model = copy_fixture(MODEL, &tmp.path().join(format!("config-{field}")));
        edit_json(&model.join("config.json"), |v| v[field] = value.clone());
        assert_fails_with(
            &eval(&s(&model), None),
            &["config.json", &format!("`{field}`")],
        );
    }
    let model = copy_fixture(MODEL, &tmp.path().join("config-rope"));
    edit_json(&model.join("config.json"), |v| {
        v["rope_parameters"]["rope_theta"] = (-1.0).into()
    });
    assert_fails_with(&eval(&s(&model), None), &["config.json", "`rope_theta`"]);
}

/// The flags of a small `lowrank train` run on the llama-tied fixture writing to `out`.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &fx(MODEL),
        "--data",
        &fx("data/train.jsonl"),
        "--out",
        &s(out),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--save-every",
        "2",
        "--dropout",
        "0.1",
        "--quiet",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `args` with `flag` set to `value` (replaced where it is given, else added).
fn set_flag(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(at) => args[at + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let args = train_args(out, extra);
    lowrank(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn log_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn step_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["step"]
        .as_u64()
        .unwrap()
}

/// The fields of a step line that do not depend on timing.
fn deterministic_fields(line: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(line).unwrap();
    ["step", "epoch", "loss", "lr", "grad_norm", "tokens"]
        .iter()
        .map(|k| v[*k].to_string())
        .collect()
}

/// A run killed after step 3 (its log written to step 3 with a line cut short, checkpoint-2
/// saved, a checkpoint being staged) resumes to the uninterrupted run's adapter; the log up
/// to the checkpoint keeps its lines byte for byte, the staging folder is gone.
#[test]
fn a_killed_run_resumes_keeping_its_log_and_cleaning_its_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    ok(&train(&whole, &[]));
    let whole_log = log_lines(&whole);
    assert_eq!(whole_log.iter().map(|l| step_of(l)).max(), Some(9));

    // The state `kill -9` during step 4 leaves: what the run wrote up to then.
    let killed = tmp.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    let ckpt = killed.join("checkpoint-2");
    std::fs::create_dir(&ckpt).unwrap();
    for entry in std::fs::read_dir(whole.join("checkpoint-2")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), ckpt.join(entry.file_name())).unwrap();
    }
    let mut text: String = whole_log
        .iter()
        .filter(|l| step_of(l) <= 3)
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&whole_log[3][..20]);
    std::fs::write(killed.join("training_log.jsonl"), &text).unwrap();
    let staging = killed.join(".checkpoint-Ab3xYz");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("trainable.safetensors"), b"half").unwrap();
    std::fs::write(killed.join(".tmpQ1w2E3"), b"half").unwrap();

    ok(&train(&killed, &["--resume", &s(&killed)]));
    assert!(!staging.exists(), "the staging folder is removed");
    assert!(
        !killed.join(".tmpQ1w2E3").exists(),
        "the temp file is removed"
    );
    let resumed = log_lines(&killed);
    // Up to the checkpoint: the killed run's lines, byte for byte.
    let kept: Vec<&String> = whole_log.iter().filter(|l| step_of(l) <= 2).collect();
    assert_eq!(resumed[..kept.len()].iter().collect::<Vec<_>>(), kept);
    // After it: the uninterrupted run's steps again.
    let after = |log: &[String]| -> Vec<Vec<String>> {
        log.iter()
            .filter(|l| step_of(l) > 2)
            .map(|l| deterministic_fields(l))
            .collect()
    };
    assert_eq!(after(&resumed), after(&whole_log));
    let a = std::fs::read(whole.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "the resumed run's adapter is the uninterrupted run's");
}

#[test]
fn resume_refuses_another_model_or_other_data() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[String]| lowrank(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Other data: the same file, changed since the checkpoint.
    let data = tmp.path().join("train.jsonl");
    std::fs::copy(fixtures().join("data/train.jsonl"), &data).unwrap();
    let out = tmp.path().join("run");
    let args = set_flag(train_args(&out, &["--max-steps", "2"]), "--data", &s(&data));
    ok(&run(&args));
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"text\": \"One more line.\"}\n");
    std::fs::write(&data, text).unwrap();
    let mut resume = args.clone();
    resume.extend(["--resume".to_string(), s(&out)]);
    assert_fails_with(
        &run(&resume),
        &["--data", "train.jsonl", "checkpoint has", "this run gives"],
    );
    // The original data moved elsewhere is the same data; another model folder is not.
    std::fs::copy(fixtures().join("data/train.jsonl"), &data).unwrap();
    let moved = tmp.path().join("moved.jsonl");
    std::fs::rename(&data, &moved).unwrap();
    let model = copy_fixture(MODEL, &tmp.path().join("other-model"));
    let resume = set_flag(resume, "--data", &s(&moved));
    ok(&run(&resume));
    let resume = set_flag(resume, "--model", &s(&model));
    assert_fails_with(&run(&resume), &["--model", "other-model", "llama-tied"]);
}

/// A run that fails while setting up (an AdaLoRA schedule with no budgeting phase) leaves no
/// log behind, so the same `--out` takes the corrected run.
#[test]
fn a_run_that_fails_before_its_first_step_leaves_its_out_reusable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let adalora = [
        "--method",
        "adalora",
        "--max-steps",
        "2",
        "--init-rank",
        "4",
        "--target-rank",
        "2",
    ];
    let mut bad = adalora.to_vec();
    bad.extend(["--tinit", "5"]);
    assert_fails_with(&train(&out, &bad), &["--tinit"]);
    assert!(!out.join("training_log.jsonl").exists());
    ok(&train(&out, &adalora));
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn option_errors_name_the_flag_at_fault_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    for (flag, value) in [
        ("--save-every", "0"),
        ("--eval-every", "0"),
        ("--max-steps", "0"),
        ("--weight-decay", "nan"),
        ("--max-grad-norm", "nan"),
        ("--eps", "0"),
        ("--grad-accum", "0"),
        ("--lr", "0"),
    ] {
        let args = set_flag(train_args(&out, &[]), flag, value);
        let run = lowrank(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_fails_with(&run, &[&format!("{flag}: ")]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!stderr.contains("field `"), "{flag}: {stderr}");
        for other in ["--eps", "--max-steps", "--batch-size"] {
            if other != flag {
                assert!(!stderr.contains(other), "{flag} blames {other}: {stderr}");
            }
        }
    }
    assert!(!out.exists() || !out.join("training_log.jsonl").exists());
}

#[test]
fn non_utf8_data_is_named_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("latin1.jsonl");
    std::fs::write(&data, b"{\"text\": \"fine\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let d = s(&data);
    assert_fails_with(
        &lowrank(&["eval", "--model", &fx(MODEL), "--data", &d]),
        &["latin1.jsonl:2:", "UTF-8"],
    );
    let args = set_flag(train_args(&tmp.path().join("run"), &[]), "--data", &d);
    assert_fails_with(
        &lowrank(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        &["latin1.jsonl:2:", "UTF-8"],
    );
}

/// An error names each path and says each cause once ("x: No such file or directory (os
/// error 2): No such file or directory (os error 2)" and "loading adapter a:
/// a/adapter_config.json: ..." said them twice).
#[test]
fn errors_say_each_thing_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = s(&tmp.path().join("missing.jsonl"));
    let out = lowrank(&["eval", "--model", &fx(MODEL), "--data", &missing]);
    assert_fails_with(&out, &["missing.jsonl"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    let adapter = s(&tmp.path().join("no-adapter"));
    for command in [
        vec![
            "eval",
            "--model",
            &fx(MODEL),
            "--data",
            &fx("data/eval.jsonl"),
            "--adapter",
            &adapter,
        ],
        vec!["inspect", &adapter],
    ] {
        let out = lowrank(&command);
        assert_fails_with(&out, &["no-adapter"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches("no-adapter").count(), 1, "{stderr}");
        assert!(
            stderr.matches("adapter_config.json").count() <= 1,
            "{stderr}"
        );
    }
}
