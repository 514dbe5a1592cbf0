//! Helpers shared by the binary's integration tests: fixture paths, running `lowrank`, reading
//! its output. Each test file uses a subset, hence the allow.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A fixture's path as an argument.
pub fn fx(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

/// Runs the `lowrank` binary built for these tests.
pub fn lowrank(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(args)
        .output()
        .expect("run lowrank")
}

/// Stdout of a run that must have succeeded.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON object a command prints as its last line.
pub fn last_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON last line")
}

/// The last-line JSON of a run that must have succeeded.
pub fn json_out(out: &Output) -> Value {
    last_json(&ok(out))
}

/// A run that must have failed with a message containing every needle, and no panic.
pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure, got success");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
