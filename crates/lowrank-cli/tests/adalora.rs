//! `lowrank` with AdaLoRA adapters end to end: eval / merge of a PEFT AdaLoRA adapter,
//! `inspect` showing the kept ranks, `train --method adalora` with its rank report.

use serde_json::Value;

mod common;
use common::*;

#[test]
fn eval_and_merge_of_a_peft_adalora_adapter_match_peft() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("adalora/reference.json")).unwrap(),
    )
    .unwrap();
    let want = reference["loss"].as_f64().unwrap();
    for merge in [false, true] {
        let model = fx("models/llama-tied");
        let adapter = fx("adalora/trained");
        let data = fx("data/eval.jsonl");
        let mut args = vec![
            "eval",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--data",
            &data,
        ];
        if merge {
            args.push("--merge");
        }
        let v = last_json(&ok(&lowrank(&args)));
        let got = v["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "merge {merge}: loss {got} vs PEFT {want}"
        );
        assert_eq!(v["tokens"], reference["tokens"]);
    }
}

#[test]
fn inspect_shows_kept_of_initial_rank() {
    let text = ok(&lowrank(&["inspect", &fx("adalora/trained")]));
    assert!(text.starts_with("AdaLoRA adapter"), "{text}");
    assert!(
        text.contains("model.layers.0.mlp.up_proj") && text.contains("3/4"),
        "{text}"
    );
    let v: Value = serde_json::from_str(&ok(&lowrank(&[
        "inspect",
        &fx("adalora/trained"),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["method"], "AdaLoRA");
    let kept: u64 = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["rank"].as_u64().unwrap())
        .sum();
    assert_eq!(kept, 28);
    assert_eq!(v["modules"][0]["initial_rank"], 4);
    // LoRA adapters are shown as before (no initial rank).
    let v: Value = serde_json::from_str(&ok(&lowrank(&[
        "inspect",
        &fx("adapters/llama-tied__lora-qv"),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["method"], "LoRA");
    assert!(v["modules"][0].get("initial_rank").is_none());
}

#[test]
fn train_adalora_reports_where_the_rank_went() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_string_lossy().into_owned();
    let output = lowrank(&[
        "train",
        "--model",
        &fx("models/llama-tied"),
        "--data",
        &fx("data/train.jsonl"),
        "--out",
        &out_s,
        "--method",
        "adalora",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--init-rank",
        "4",
        "--target-rank",
        "2",
        "--tinit",
        "1",
        "--tfinal",
        "1",
        "--delta-t",
        "1",
        "--beta1",
        "0.8",
        "--beta2",
        "0.9",
        "--orth-reg-weight",
        "0.1",
        "--max-steps",
        "5",
        "--batch-size",
        "2",
        "--lr",
        "0.01",
    ]);
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("AdaLoRA final ranks") && stderr.contains("q_proj"),
        "{stderr}"
    );
    let ranks: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adalora_ranks.json")).unwrap())
            .unwrap();
    assert_eq!(ranks["total"], 12, "target 2 × 6 modules");
    assert_eq!(
        ranks["modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert!(out.join("adalora_ranks.svg").exists());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(config["total_step"], 5);
    assert_eq!(config["rank_pattern"].as_object().unwrap().len(), 6);
    // The saved adapter loads for eval and inspect.
    let data = fx("data/eval.jsonl");
    ok(&lowrank(&[
        "eval",
        "--model",
        &fx("models/llama-tied"),
        "--adapter",
        &out_s,
        "--data",
        &data,
    ]));
    let text = ok(&lowrank(&["inspect", &out_s]));
    assert!(text.contains("/4"), "{text}");
    // Bad schedules are errors naming the flag.
    let bad = lowrank(&[
        "train",
        "--model",
        &fx("models/llama-tied"),
        "--data",
        &fx("data/train.jsonl"),
        "--out",
        &dir.path().join("bad").to_string_lossy(),
        "--method",
        "adalora",
        "--init-rank",
        "2",
        "--target-rank",
        "4",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--target-rank"));
}
