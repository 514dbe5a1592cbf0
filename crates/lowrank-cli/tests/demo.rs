//! `lowrank demo --quick` end to end: the micro pipeline through the binary, with every training
//! run in its own child process so that each run's peak memory is measured.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_demo_runs_end_to_end_and_measures_memory_per_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_lowrank"))
            .args(["demo", "--quick", "--out"])
            .arg(&out)
            .output()
            .expect("run lowrank")
    };
    let done = run();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "failed: {stderr}");
    let stdout = String::from_utf8_lossy(&done.stdout);
    for needle in [
        "acc / loss",
        "trainable params",
        "Peak memory",
        "max |logit diff|",
        "Rank sweep",
        "Samples",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("pretraining the base model"),
        "progress goes to stderr: {stderr}"
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // The demo model's row and the wider probe's row, both sides measured in their own process.
    let memory = report["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 2, "{memory:?}");
    for row in memory {
        for side in ["adapter_peak_rss_mb", "full_peak_rss_mb"] {
            assert!(
                row[side].as_f64().is_some_and(|mb| mb > 1.0),
                "{side}: {row}"
            );
        }
    }
    // The probe's weights are deleted once measured; only its spec and result files stay.
    for name in ["probe-model", "probe-adapter", "probe-full"] {
        assert!(!out.join("runs").join(name).exists(), "{name} left behind");
    }
    assert!(out.join("runs/probe-full.spec.result.json").exists());
    for cost in report["costs"].as_array().unwrap() {
        assert!(cost["peak_rss_mb"].as_f64().is_some(), "{cost}");
    }
    // The base is a checkpoint the other commands read.
    let gen = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args([
            "generate",
            "--prompt",
            "copy: lamp =",
            "--max-tokens",
            "4",
            "--model",
        ])
        .arg(out.join("base"))
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );

    // A rerun into the demo's own folder is allowed; a folder with other files is refused untouched.
    assert!(run().status.success());
    let foreign = tmp.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep").unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["demo", "--quick", "--out"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not written by `lowrank demo`"));
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
}
