//! Data-parallel training under `mpirun` (built with `--features lowrank-cli/mpi`; `.ci/run`
//! installs Open MPI): two ranks with global batch 4 against one process with batch 4 give
//! the same per-step losses and the same adapter (LoRA, DoRA, AdaLoRA, a 4-bit base, bf16,
//! gradient checkpointing, accumulation), a stopped two-rank run resumes to the same result,
//! and a rank given other inputs ends the whole job with its error.
//!
//! The tolerance is 1e-6: a rank's matmuls and loss sum over its slice of the batch before the
//! ranks' sums are added, so float rounding differs from the one-process run's (by ~4e-7 on
//! these losses).
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{assert_fails_with, fx, ok};
use serde_json::Value;

const TOLERANCE: f64 = 1e-6;

/// Every run's bf16 GEMM kernel, named rather than timed per process: the AVX512-BF16 kernel
/// and the widening one sum in another order, which bf16 rounding grows to ~4e-5 in a loss.
const BF16_KERNEL: (&str, &str) = ("LOWRANK_BF16_GEMM", "widen");

/// One thread per rank, as many ranks as asked for on this machine's cores or not.
fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &ranks.to_string()])
        .args(["--oversubscribe", "--allow-run-as-root"])
        // Ends the job rather than hanging the test if a rank ever waits forever.
        .args(["--timeout", "120"])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .args(["-x", &format!("{}={}", BF16_KERNEL.0, BF16_KERNEL.1)]);
    cmd
}

fn lowrank() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lowrank"));
    cmd.env("RAYON_NUM_THREADS", "1")
        .env(BF16_KERNEL.0, BF16_KERNEL.1);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("run (is Open MPI's mpirun installed?)")
}

/// `lowrank train` on the tiny fixture model: 6 lines, 3 epochs of a batch of 4 and one of 2
/// (the last batch splits 1 + 1 over two ranks). AdamW at lr 1e-3: at 1e-2 an element whose
/// gradient is at rounding level (AdamW's step does not shrink with the gradient) moved by
/// 8e-5 between the two runs; here the adapters agree to 3e-7 and the losses to 4e-7.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &fx("models/llama-tied"),
        "--data",
        &fx("data/train.jsonl"),
        "--out",
        &out.display().to_string(),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-3",
        "--epochs",
        "3",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--batch-size") {
        args.extend(["--batch-size".to_string(), "4".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The step lines of a run's training_log.jsonl.
fn steps(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn adapter(out: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// Two ranks and one process, the same flags: per-step losses and every adapter tensor
/// within the tolerance; only the two-rank log names its world size.
fn two_ranks_match_one_process(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(&run({
        let mut cmd = lowrank();
        cmd.args(train_args(&one, extra));
        cmd
    }));
    ok(&run({
        let mut cmd = mpirun(2);
        cmd.arg(env!("CARGO_BIN_EXE_lowrank"))
            .args(train_args(&two, extra));
        cmd
    }));
    let (a, b) = (steps(&one), steps(&two));
    assert!(a.len() >= 3, "{extra:?}: {} steps", a.len());
    assert_eq!(a.len(), b.len(), "{extra:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["tokens"], y["tokens"], "the whole step's tokens");
        assert!(x.get("world_size").is_none(), "{x}");
        assert_eq!(y["world_size"], 2, "{y}");
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() <= TOLERANCE,
            "{extra:?} step {}: loss {lx} (one process) vs {ly} (two ranks)",
            x["step"]
        );
    }
    let (x, y) = (adapter(&one), adapter(&two));
    assert_eq!(
        x.keys().collect::<std::collections::BTreeSet<_>>(),
        y.keys().collect()
    );
    for (name, t) in &x {
        assert_eq!(t.dims(), y[name].dims(), "{name}");
        // AdaLoRA's modules masked down to rank 0 are empty.
        let d = if t.elem_count() == 0 {
            0.0
        } else {
            max_abs_diff(t, &y[name])
        };
        assert!(d <= TOLERANCE, "{extra:?} {name}: max |Δ| {d}");
    }
}

#[test]
fn lora_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&[]);
}

/// Each rank computes two of the step's four micro-batches of one packed row (two or one
/// sequences of up to 48 tokens).
#[test]
fn lora_with_accumulation_and_packing_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&[
        "--batch-size",
        "1",
        "--grad-accum",
        "4",
        "--pack",
        "--max-len",
        "48",
    ]);
}

#[test]
fn dora_with_gradient_checkpointing_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&["--method", "dora", "--grad-checkpoint"]);
}

#[test]
fn adalora_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&[
        "--method",
        "adalora",
        "--init-rank",
        "4",
        "--target-rank",
        "2",
        "--tinit",
        "1",
        "--tfinal",
        "1",
    ]);
}

#[test]
fn qlora_over_nf4_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&["--quantize", "nf4", "--double-quant"]);
}

#[test]
fn bf16_compute_on_two_ranks_equals_one_process() {
    two_ranks_match_one_process(&["--compute-dtype", "bf16"]);
}

/// A two-rank run stopped after step 3 (checkpoint-2 saved) and resumed on two ranks ends
/// with the uninterrupted two-rank run's losses and adapter, bit for bit.
#[test]
fn a_stopped_two_rank_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, stopped) = (tmp.path().join("whole"), tmp.path().join("stopped"));
    let two_ranks = |out: &Path, extra: &[&str]| {
        let mut cmd = mpirun(2);
        cmd.arg(env!("CARGO_BIN_EXE_lowrank"))
            .args(train_args(out, &[&["--save-every", "2"], extra].concat()));
        ok(&run(cmd));
    };
    two_ranks(&whole, &[]);
    two_ranks(&stopped, &["--stop-after", "3"]);
    assert!(stopped.join("checkpoint-2/trainer_state.json").exists());
    assert!(!stopped.join("adapter_model.safetensors").exists());
    two_ranks(&stopped, &["--resume", &stopped.display().to_string()]);
    let fields = |out: &Path| -> Vec<(Value, Value)> {
        steps(out)
            .into_iter()
            .map(|v| (v["step"].clone(), v["loss"].clone()))
            .collect()
    };
    assert_eq!(fields(&stopped), fields(&whole));
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(stopped.join("adapter_model.safetensors")).unwrap(),
        "the resumed adapter is the uninterrupted run's"
    );
}

/// Rank 1 given other data (an MPMD launch) fails at start-up, naming the flag, and ends the
/// job instead of leaving rank 0 waiting; nothing is written.
#[test]
fn a_rank_with_other_inputs_ends_the_job_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let bin = env!("CARGO_BIN_EXE_lowrank");
    let mut other = train_args(&out, &[]);
    let at = other.iter().position(|a| a == "--data").unwrap();
    other[at + 1] = fx("data/eval.jsonl");
    let mut cmd = mpirun(1);
    cmd.arg(bin)
        .args(train_args(&out, &[]))
        .args([":", "-np", "1", "-x", "RAYON_NUM_THREADS=1", bin])
        .args(other);
    let output = run(cmd);
    assert_fails_with(&output, &["rank 1", "--data", "differs from rank 0's"]);
    assert!(!out.join("training_log.jsonl").exists());
}
