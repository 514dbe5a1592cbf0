//! The 4-bit base (QLoRA) end to end through the binary: `quantize`, `eval`/`generate`/`train`
//! with `--quantize`, `merge` over a 4-bit base (full precision and `--requantize`), and the
//! error cases. References: fixtures/quant/ (scripts/make_quant_fixtures.py).

use serde_json::Value;

mod common;
use common::*;

/// bitsandbytes' eval loss for (model, adapter, quant type).
fn bnb_loss(model: &str, adapter: Option<&str>, kind: &str) -> f64 {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant/reference.json")).unwrap(),
    )
    .unwrap();
    r["eval"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["model"] == model && c["adapter"].as_str() == adapter && c["quant_type"] == kind
        })
        .unwrap()["loss"]
        .as_f64()
        .unwrap()
}

#[test]
fn quantize_writes_what_transformers_writes_and_eval_matches_bitsandbytes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nf4");
    let q = lowrank(&[
        "quantize",
        "--model",
        &fx("models/llama-tied"),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        "nf4",
        "--double-quant",
    ]);
    let j = json_out(&q);
    assert!(j["bits_per_param"].as_f64().unwrap() <= 4.2, "{j}");
    assert!(String::from_utf8_lossy(&q.stderr).contains("bits/param"));
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs =
        std::fs::read(fixtures().join("quant/llama-tied-nf4-dq/model.safetensors")).unwrap();
    assert!(
        ours == theirs,
        "model.safetensors is not byte-identical to transformers'"
    );
    assert!(out.join("tokenizer.json").exists());

    let adapter = fx("adapters/llama-tied__lora-qv");
    let data = fx("data/eval.jsonl");
    let want = bnb_loss("llama-tied", Some("llama-tied__lora-qv"), "nf4");
    // Quantized at load, and pre-quantized (the folder just written).
    for args in [
        vec![
            "eval",
            "--model",
            &fx("models/llama-tied"),
            "--quantize",
            "nf4",
            "--double-quant",
        ],
        vec!["eval", "--model", out.to_str().unwrap()],
    ] {
        let mut args = args.clone();
        args.extend(["--adapter", &adapter, "--data", &data]);
        let o = lowrank(&args);
        let loss = json_out(&o)["loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= 1e-4,
            "{args:?}: {loss} vs bnb {want}"
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("bits/param"), "{stderr}");
    }
    // fp4 without double quant.
    let o = lowrank(&[
        "eval",
        "--model",
        &fx("models/llama-untied"),
        "--quantize",
        "fp4",
        "--data",
        &data,
    ]);
    let loss = json_out(&o)["loss"].as_f64().unwrap();
    let want = bnb_loss("llama-untied", None, "fp4");
    assert!((loss - want).abs() <= 1e-4, "{loss} vs bnb {want}");

    // --quantize on a checkpoint that is 4-bit already.
    let o = lowrank(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--quantize",
        "nf4",
        "--data",
        &data,
    ]);
    assert_fails_with(&o, &["quantized already"]);
    // generate over the 4-bit folder.
    let o = lowrank(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "The",
        "--max-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn merge_over_4bit_base_full_precision_and_requantized() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fx("data/eval.jsonl");
    let adapter = fx("adapters/llama-tied__dora");
    let want = bnb_loss("llama-tied", Some("llama-tied__dora"), "nf4");
    let full = tmp.path().join("full");
    let o = lowrank(&[
        "merge",
        "--model",
        &fx("models/llama-tied"),
        "--quantize",
        "nf4",
        "--double-quant",
        "--adapter",
        &adapter,
        "--out",
        full.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = std::fs::read_to_string(full.join("config.json")).unwrap();
    assert!(!cfg.contains("quantization_config"));
    let loss = json_out(&lowrank(&[
        "eval",
        "--model",
        full.to_str().unwrap(),
        "--data",
        &data,
    ]))["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (loss - want).abs() <= 1e-4,
        "full-precision merge: {loss} vs {want}"
    );

    let requant = tmp.path().join("requant");
    let o = lowrank(&[
        "merge",
        "--model",
        &fx("models/llama-tied"),
        "--quantize",
        "nf4",
        "--double-quant",
        "--adapter",
        &adapter,
        "--out",
        requant.to_str().unwrap(),
        "--requantize",
    ]);
    let j = json_out(&o);
    let rel = j["relative_error"].as_f64().unwrap();
    assert!(rel > 0.0 && rel < 0.2, "{j}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("relative error"));
    let cfg = std::fs::read_to_string(requant.join("config.json")).unwrap();
    assert!(cfg.contains("\"bnb_4bit_quant_type\": \"nf4\""), "{cfg}");
    let e = lowrank(&[
        "eval",
        "--model",
        requant.to_str().unwrap(),
        "--data",
        &data,
    ]);
    let loss = json_out(&e)["loss"].as_f64().unwrap();
    assert!(String::from_utf8_lossy(&e.stderr).contains("bits/param"));
    assert!(
        (loss - want).abs() < 0.5,
        "requantized merge: {loss} vs {want}"
    );

    // --requantize over a dense base is an error.
    let o = lowrank(&[
        "merge",
        "--model",
        &fx("models/llama-tied"),
        "--adapter",
        &adapter,
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "--requantize",
    ]);
    assert_fails_with(&o, &["--requantize needs a 4-bit base"]);
}

#[test]
fn train_over_4bit_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lowrank(&[
        "train",
        "--model",
        &fx("models/llama-tied"),
        "--data",
        &fx("data/train.jsonl"),
        "--out",
        out.to_str().unwrap(),
        "--quantize",
        "nf4",
        "--double-quant",
        "--block-size",
        "32",
        "--max-steps",
        "2",
        "--rank",
        "4",
        "--quiet",
    ]);
    let j = json_out(&o);
    assert_eq!(j["steps"], 2);
    assert!(j["final_loss"].as_f64().unwrap().is_finite());
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn quantization_flag_errors() {
    let data = fx("data/eval.jsonl");
    let model = fx("models/llama-tied");
    for bad in ["48", "16", "8192", "x"] {
        let o = lowrank(&[
            "eval",
            "--model",
            &model,
            "--data",
            &data,
            "--quantize",
            "nf4",
            "--block-size",
            bad,
        ]);
        assert_fails_with(&o, &["--block-size"]);
    }
    let o = lowrank(&[
        "eval",
        "--model",
        &model,
        "--data",
        &data,
        "--quantize",
        "nf4",
        "--block-size",
        "48",
    ]);
    assert_fails_with(&o, &["power of two"]);
    let o = lowrank(&[
        "eval",
        "--model",
        &model,
        "--data",
        &data,
        "--quantize",
        "int4",
    ]);
    assert_fails_with(&o, &["int4", "nf4, fp4"]);
    let o = lowrank(&[
        "quantize",
        "--model",
        &model,
        "--out",
        "/nonexistent/x",
        "--quant",
        "int8",
    ]);
    assert_fails_with(&o, &["int8"]);
    // --double-quant without --quantize.
    let o = lowrank(&["eval", "--model", &model, "--data", &data, "--double-quant"]);
    assert_fails_with(&o, &["--quantize"]);
    // An unsupported quantization_config in config.json names the field.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixtures().join("models/llama-tied").join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/llama-tied/config.json")).unwrap(),
    )
    .unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let o = lowrank(&["eval", "--model", dir.to_str().unwrap(), "--data", &data]);
    assert_fails_with(&o, &["quant_method", "gptq"]);
}

/// `eval --quantize … --block-size …` where blocks straddle weight rows (fixtures/quant-straddle:
/// down_proj rows of 176 values at block 64, blocks over several rows at 256 and 4096),
/// quantized at load and from the folder `quantize --block-size` writes, against transformers
/// + bitsandbytes (+ PEFT).
#[test]
fn eval_with_blocks_straddling_rows_matches_bitsandbytes() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quant-straddle/reference.json")).unwrap(),
    )
    .unwrap();
    let want = |adapter: Option<&str>, kind: &str, dq: bool, block: u64| -> f64 {
        r["eval"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["adapter"].as_str() == adapter
                    && c["quant_type"] == kind
                    && c["double_quant"] == dq
                    && c["block_size"] == block
            })
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let model = fx("quant-straddle/llama-i176");
    let data = fx("data/eval.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    for (adapter, kind, dq, block) in [
        (None, "nf4", true, 64),
        (Some("llama-i176__dora"), "fp4", false, 256),
        (Some("llama-i176__lora"), "nf4", false, 4096),
    ] {
        let block_arg = block.to_string();
        let adapter_arg = adapter.map(|a| fx(&format!("quant-straddle/{a}")));
        let mut at_load = vec![
            "eval",
            "--model",
            &model,
            "--data",
            &data,
            "--quantize",
            kind,
            "--block-size",
            &block_arg,
        ];
        let folder = tmp.path().join(format!("{kind}-{block}"));
        let mut quantize = vec![
            "quantize",
            "--model",
            &model,
            "--out",
            folder.to_str().unwrap(),
            "--quant",
            kind,
            "--block-size",
            &block_arg,
        ];
        if dq {
            at_load.push("--double-quant");
            quantize.push("--double-quant");
        }
        json_out(&lowrank(&quantize));
        let mut from_folder = vec!["eval", "--model", folder.to_str().unwrap(), "--data", &data];
        for args in [&mut at_load, &mut from_folder] {
            if let Some(a) = &adapter_arg {
                args.extend(["--adapter", a.as_str()]);
            }
            let loss = json_out(&lowrank(args))["loss"].as_f64().unwrap();
            let want = want(adapter, kind, dq, block);
            assert!(
                (loss - want).abs() <= 1e-5,
                "{args:?}: {loss} vs bnb {want}"
            );
        }
    }
}
