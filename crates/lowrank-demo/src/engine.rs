//! The demo's calls into the training engine (`lowrank_train::train`), in this process or in a
//! child process of the `lowrank` binary.
//!
//! Peak memory can only be compared between runs made in separate processes: a process's peak
//! resident set (VmHWM) only grows. So the CLI runs every training of the demo as
//! `lowrank demo --train-child SPEC.json`, which trains, reads its own VmHWM and writes the
//! outcome next to the spec.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use lowrank_train as lt;

/// Which weights a training run updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lora,
    Dora,
    Full,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Lora => "LoRA",
            Method::Dora => "DoRA",
            Method::Full => "full",
        }
    }
}

/// One training run, as the demo chooses it (the knobs it sets; the rest are the engine's
/// defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSpec {
    pub model: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub out: PathBuf,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub targets: String,
    pub lr: f64,
    pub steps: usize,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub max_len: usize,
    pub pack: bool,
    pub seed: u64,
    pub quiet: bool,
}

/// What a training run reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub steps: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub base_eval_loss: Option<f64>,
    pub trainable_parameters: usize,
    pub model_parameters: usize,
    pub seconds: f64,
    /// Peak resident memory of the process that trained, in MiB; `None` when the run shared
    /// its process with other work (then its peak cannot be told apart).
    pub peak_rss_mb: Option<f64>,
}

fn options(spec: &TrainSpec) -> lt::TrainOptions {
    lt::TrainOptions {
        model: spec.model.to_string_lossy().into_owned(),
        data: spec.data.clone(),
        out: spec.out.clone(),
        eval_data: spec.eval_data.clone(),
        method: match spec.method {
            Method::Lora => lt::Method::Lora,
            Method::Dora => lt::Method::Dora,
            Method::Full => lt::Method::Full,
        },
        rank: spec.rank,
        alpha: spec.alpha,
        targets: spec.targets.clone(),
        lr: spec.lr,
        warmup_steps: spec.warmup_steps,
        batch_size: spec.batch_size,
        // max_steps ends every run; epochs only has to be large enough not to end it first.
        epochs: 1_000_000,
        max_steps: Some(spec.steps),
        seed: spec.seed,
        max_len: spec.max_len,
        pack: spec.pack,
        quiet: spec.quiet,
        ..Default::default()
    }
}

/// Trains in this process.
pub fn train_here(spec: &TrainSpec) -> Result<TrainOutcome> {
    let report =
        lt::train(&options(spec)).with_context(|| format!("training {}", spec.out.display()))?;
    Ok(TrainOutcome {
        steps: report.steps,
        final_loss: report.final_loss,
        eval_loss: report.eval_loss,
        base_eval_loss: report.base_eval_loss,
        trainable_parameters: report.trainable_parameters,
        model_parameters: report.model_parameters,
        seconds: report.seconds,
        peak_rss_mb: None,
    })
}

/// The peak resident set size of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn result_path(spec_path: &Path) -> PathBuf {
    spec_path.with_extension("result.json")
}

/// The body of `lowrank demo --train-child SPEC`: trains as the spec says and writes the
/// outcome, with this process's peak memory, to `SPEC.result.json`.
pub fn child_main(spec_path: &Path) -> Result<()> {
    let spec: TrainSpec = lowrank_core::files::read_json(spec_path)?;
    let mut outcome = train_here(&spec)?;
    outcome.peak_rss_mb = peak_rss_mb();
    lowrank_core::files::write_json(&result_path(spec_path), &outcome)?;
    Ok(())
}

/// Where training runs.
#[derive(Debug, Clone)]
pub enum Runner {
    /// In the calling process (tests; no per-run peak memory).
    InProcess,
    /// In a child process: `exe args... SPEC.json` must call [`child_main`] on SPEC.json.
    Child { exe: PathBuf, args: Vec<String> },
}

impl Runner {
    /// The `lowrank` binary running this process, as `lowrank demo --train-child`.
    pub fn current_exe() -> Result<Self> {
        let exe = std::env::current_exe().context("locating the lowrank binary")?;
        Ok(Runner::Child {
            exe,
            args: vec!["demo".into(), "--train-child".into()],
        })
    }

    /// Runs `spec`, writing its spec file (and the child's result) to `spec_path`.
    pub fn train(&self, spec: &TrainSpec, spec_path: &Path) -> Result<TrainOutcome> {
        match self {
            Runner::InProcess => train_here(spec),
            Runner::Child { exe, args } => {
                lowrank_core::files::write_json(spec_path, spec)?;
                let result = result_path(spec_path);
                let _ = std::fs::remove_file(&result);
                let status = Command::new(exe)
                    .args(args)
                    .arg(spec_path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .with_context(|| format!("starting {}", exe.display()))?;
                if !status.success() {
                    bail!(
                        "training {} failed in its child process ({status})",
                        spec.out.display()
                    );
                }
                Ok(lowrank_core::files::read_json(&result)?)
            }
        }
    }
}
