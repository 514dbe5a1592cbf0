//! The commands that write an output folder (`merge`, `combine`, `quantize`) fed broken
//! inputs, and `eval`'s own JSONL reader: a failure exits non-zero with a message naming the
//! input, never panics, and leaves no output behind. A process per case, so fewer cases.

use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use crate::ensure;
use crate::support::*;

const MERGE_CASES: u32 = 50;
const COMBINE_CASES: u32 = 50;
const QUANTIZE_CASES: u32 = 50;
const EVAL_CASES: u32 = 50;

const ADAPTERS: &[&str] = &[
    "adapters/llama-tied__lora-qv",
    "adapters/llama-tied__dora",
    "adalora/trained",
];

/// Runs `lowrank` and checks: no panic; on failure a message naming `input`; either way
/// nothing but a complete output in `out` (absent or empty on failure).
fn check_command(args: &[&str], input: &Path, out: Option<&Path>) -> Result<(), TestCaseError> {
    let run = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(!stderr.contains("panicked"), "{stderr}");
    ensure!(run.status.code().is_some(), "killed by a signal: {stderr}");
    if !run.status.success() {
        check_error(&stderr, &[&input.display().to_string()])?;
        if let Some(out) = out {
            let left: Vec<_> = std::fs::read_dir(out)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
                .unwrap_or_default();
            ensure!(
                left.is_empty(),
                "a failed run left {left:?} in {}",
                out.display()
            );
        }
    }
    Ok(())
}

/// An adapter folder: a fixture's with its config edited as JSON or its weights as a
/// safetensors file.
fn broken_adapter() -> impl Strategy<Value = (Index, Result<Vec<JsonEdit>, SafetensorsEdit>)> {
    (
        any::<Index>(),
        prop_oneof![json_edits(3).prop_map(Ok), safetensors_edit().prop_map(Err)],
    )
}

fn write_adapter(dir: &Path, src: &Index, edit: &Result<Vec<JsonEdit>, SafetensorsEdit>) {
    let src = ADAPTERS[src.index(ADAPTERS.len())];
    std::fs::create_dir_all(dir).unwrap();
    let mut config = read_fixture(&format!("{src}/adapter_config.json"));
    let mut weights = read_fixture(&format!("{src}/adapter_model.safetensors"));
    match edit {
        Ok(e) => {
            let doc: Value = serde_json::from_slice(&config).unwrap();
            config = serde_json::to_vec(&apply_json(&doc, e, &[])).unwrap();
        }
        Err(e) => weights = apply_safetensors(&weights, e, &[]),
    }
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

fn model() -> String {
    fixtures()
        .join("models/llama-tied")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn merge_with_broken_adapters() {
    run(
        "lowrank merge --adapter <broken>",
        MERGE_CASES,
        broken_adapter(),
        |(src, edit)| {
            let root = tempfile::tempdir().unwrap();
            let adapter = root.path().join("adapter");
            write_adapter(&adapter, &src, &edit);
            let out = root.path().join("out");
            let a = adapter.to_string_lossy();
            let o = out.to_string_lossy();
            check_command(
                &["merge", "--model", &model(), "--adapter", &a, "--out", &o],
                &adapter,
                Some(&out),
            )
        },
    );
}

#[test]
fn combine_with_broken_adapters() {
    run(
        "lowrank combine --adapters <broken>,<fixture>",
        COMBINE_CASES,
        broken_adapter(),
        |(src, edit)| {
            let root = tempfile::tempdir().unwrap();
            let adapter = root.path().join("adapter");
            write_adapter(&adapter, &src, &edit);
            let out = root.path().join("out");
            let adapters = format!(
                "{},{}",
                adapter.display(),
                fixtures().join(ADAPTERS[0]).display()
            );
            let o = out.to_string_lossy();
            let m = model();
            check_command(
                &[
                    "combine",
                    "--adapters",
                    &adapters,
                    "--weights",
                    "0.5,0.5",
                    "--method",
                    "linear",
                    "--base",
                    &m,
                    "--out",
                    &o,
                ],
                &adapter,
                Some(&out),
            )
        },
    );
}

#[test]
fn quantize_broken_models() {
    let config: Value = fixture_json("models/llama-tied/config.json");
    let weights = read_fixture("models/llama-tied/model.safetensors");
    run(
        "lowrank quantize --model <broken>",
        QUANTIZE_CASES,
        prop_oneof![json_edits(3).prop_map(Ok), safetensors_edit().prop_map(Err)],
        |edit| {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("model");
            std::fs::create_dir(&dir).unwrap();
            let (c, w) = match &edit {
                Ok(e) => (
                    serde_json::to_vec(&apply_json(&config, e, &[])).unwrap(),
                    weights.clone(),
                ),
                Err(e) => (
                    serde_json::to_vec(&config).unwrap(),
                    apply_safetensors(&weights, e, &[]),
                ),
            };
            std::fs::write(dir.join("config.json"), c).unwrap();
            std::fs::write(dir.join("model.safetensors"), w).unwrap();
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(fixtures().join("models/llama-tied").join(f), dir.join(f)).unwrap();
            }
            let out = root.path().join("out");
            let (d, o) = (dir.to_string_lossy(), out.to_string_lossy());
            check_command(
                &["quantize", "--model", &d, "--quant", "nf4", "--out", &o],
                &dir,
                Some(&out),
            )
        },
    );
}

#[test]
fn eval_broken_data() {
    let source = read_fixture("data/eval.jsonl");
    run(
        "lowrank eval --data <broken>",
        EVAL_CASES,
        byte_edits(3),
        |edits| {
            let root = tempfile::tempdir().unwrap();
            let data = root.path().join("eval.jsonl");
            std::fs::write(&data, apply_bytes(&source, 0..source.len(), &edits, &[])).unwrap();
            let d = data.to_string_lossy();
            check_command(
                &["eval", "--model", &model(), "--data", &d, "--max-len", "32"],
                &data,
                None,
            )
        },
    );
}
