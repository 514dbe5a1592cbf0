//! Training data: JSONL in every format the trainer accepts (`text`, `prompt`/`completion`,
//! `messages`), read by `lowrank_train::data::load` as `lowrank train` does.

use std::sync::OnceLock;

use lowrank_models::Tokenizer;
use lowrank_train::data;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

use crate::ensure;
use crate::support::*;
use crate::tokenizers::messages;

const MUTATED_CASES: u32 = 1500;
const GENERATED_CASES: u32 = 1500;

/// The model fixtures' tokenizers: llama-style with its template in tokenizer_config.json,
/// qwen-style with `chat_template.jinja`.
fn tokenizers() -> &'static [Tokenizer] {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        ["models/llama-tied", "models/qwen2-tied"]
            .iter()
            .map(|m| Tokenizer::load(&fixtures().join(m)).unwrap())
            .collect()
    })
}

/// Why a line must be refused, if it must: not JSON, not an object of a known format, a
/// field of the wrong type, or not the format of the first line.
fn line_fault(line: &str, first: &mut Option<&'static str>) -> Option<String> {
    if line.trim().is_empty() {
        return None;
    }
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Some("not JSON".into());
    };
    let Some(obj) = v.as_object() else {
        return Some("not an object".into());
    };
    let (format, fields): (&str, &[&str]) = if obj.contains_key("messages") {
        ("messages", &[])
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        ("prompt/completion", &["prompt", "completion"])
    } else if obj.contains_key("text") {
        ("text", &["text"])
    } else {
        return Some("no known format".into());
    };
    if *first.get_or_insert(format) != format {
        return Some("a second format".into());
    }
    for f in fields {
        if !obj[*f].is_string() {
            return Some(format!("{f} is not a string"));
        }
    }
    if format == "messages" {
        let ok = obj["messages"].as_array().is_some_and(|list| {
            list.iter()
                .all(|m| m["role"].is_string() && m["content"].is_string())
        });
        if !ok {
            return Some("messages is not a list of role/content strings".into());
        }
    }
    None
}

/// Writes `text` as a JSONL file, loads it with each tokenizer, and checks the outcome: no
/// panic, an error naming the file, an error whenever a line is at fault, nothing written.
fn check_data(text: &[u8], max_len: usize) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("train.jsonl");
    std::fs::write(&path, text).unwrap();
    let before = snapshot(root.path());
    let fault = std::str::from_utf8(text)
        .map(|t| {
            let mut first = None;
            t.lines().find_map(|l| line_fault(l, &mut first))
        })
        .unwrap_or(Some("not UTF-8".into()));
    for tok in tokenizers() {
        match data::load(&path, tok, max_len) {
            Ok((_, examples, _)) => {
                ensure!(
                    fault.is_none(),
                    "accepted a file with a line at fault: {fault:?}"
                );
                ensure!(!examples.is_empty(), "no examples and no error");
                for ex in &examples {
                    ensure!(
                        ex.ids.len() <= max_len && ex.ids.len() == ex.targets.len(),
                        "an example of {} ids, {} targets (max_len {max_len})",
                        ex.ids.len(),
                        ex.targets.len()
                    );
                }
            }
            Err(e) => check_error(&e.to_string(), &[&path.display().to_string()])?,
        }
    }
    check_unchanged(root.path(), &before)
}

/// The fixtures' data files and one line of each other format, edited as text or as JSON
/// (a line's fields replaced with wrong types, huge numbers, NaN-like strings...).
#[test]
fn training_jsonl_mutated() {
    let mut sources: Vec<Vec<u8>> = ["data/train.jsonl", "data/eval.jsonl"]
        .iter()
        .map(|f| read_fixture(f))
        .collect();
    let records = [
        json!({"prompt": "Question: what is red?\nAnswer:", "completion": " The ball."}),
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is the dog?"},
            {"role": "assistant", "content": "Under the tree."}
        ]}),
    ];
    for r in &records {
        let line = serde_json::to_string(r).unwrap();
        sources.push(format!("{line}\n{line}\n").into_bytes());
    }
    let donors: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
    run(
        "training JSONL (mutated fixtures)",
        MUTATED_CASES,
        (
            any::<proptest::sample::Index>(),
            prop_oneof![2 => byte_edits(3).prop_map(Ok), 3 => (any::<proptest::sample::Index>(), json_edits(3)).prop_map(Err)],
            1usize..96,
        ),
        |(src, edit, max_len)| {
            let source = &sources[src.index(sources.len())];
            let text = match &edit {
                Ok(e) => apply_bytes(source, 0..source.len(), e, &donors),
                Err((line, e)) => {
                    let text = std::str::from_utf8(source).unwrap();
                    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                    let i = line.index(lines.len());
                    let doc: Value = serde_json::from_str(&lines[i]).unwrap();
                    lines[i] = serde_json::to_string(&apply_json(&doc, e, &[])).unwrap();
                    lines.join("\n").into_bytes()
                }
            };
            check_data(&text, max_len)
        },
    );
}

/// JSONL made from scratch: records of each format with fields of their type or another,
/// blank lines, broken lines, formats mixed.
#[test]
fn training_jsonl_generated() {
    let text_value = || prop_oneof![4 => "[a-z .]{0,40}".prop_map(Value::from), 1 => nasty_value()];
    let message = (
        prop_oneof![4 => prop::sample::select(vec!["system", "user", "assistant"]).prop_map(Value::from), 1 => nasty_value()],
        text_value(),
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let record = prop_oneof![
        3 => text_value().prop_map(|t| json!({"text": t})),
        3 => (text_value(), text_value()).prop_map(|(p, c)| json!({"prompt": p, "completion": c})),
        3 => messages().prop_map(|m| json!({"messages": m})),
        1 => prop::collection::vec(message, 0..4).prop_map(|m| json!({"messages": m})),
        1 => nasty_value(),
    ];
    let line = prop_oneof![
        12 => record.prop_map(|r| serde_json::to_string(&r).unwrap()),
        1 => Just(String::new()),
        1 => Just("   ".to_string()),
        1 => "[{}\\[\\]\":a-z,]{0,20}",
    ];
    run(
        "training JSONL (generated)",
        GENERATED_CASES,
        (prop::collection::vec(line, 0..6), 1usize..96, any::<bool>()),
        |(lines, max_len, crlf)| {
            let text = lines.join(if crlf { "\r\n" } else { "\n" });
            check_data(text.as_bytes(), max_len)
        },
    );
}
