//! Fixture paths and comparisons the parity test files share.

use std::path::{Path, PathBuf};

use candle_core::Tensor;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The texts of fixtures/data/eval.jsonl, in order.
pub fn eval_texts() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("data/eval.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect()
}

// Not every test file compares tensors.
#[allow(dead_code)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
