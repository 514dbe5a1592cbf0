//! The demo's calls into the training engine (`lowrank_train::train`), in this process or in a
//! child process of the `lowrank` binary.
//!
//! Peak memory can only be compared between runs made in separate processes: a process's peak
//! resident set (VmHWM) only grows. So the CLI runs every training of the demo as
//! `lowrank demo --train-child SPEC.json`, which trains, reads its own VmHWM and writes the
//! outcome next to the spec.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use lowrank_train::{TrainOptions, TrainReport};

/// The options of one demo run: the knobs the demo sets (`max_steps` ends every run), the rest
/// the engine's defaults.
pub fn options(model: &Path, data: &Path, out: &Path, max_steps: usize) -> TrainOptions {
    TrainOptions {
        model: model.to_string_lossy().into_owned(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        // max_steps ends every run; epochs only has to be large enough not to end it first.
        epochs: 1_000_000,
        max_steps: Some(max_steps),
        ..Default::default()
    }
}

/// Trains in this process.
pub fn train_here(options: &TrainOptions) -> Result<TrainReport> {
    lowrank_train::train(options).with_context(|| format!("training {}", options.out.display()))
}

fn result_path(spec_path: &Path) -> PathBuf {
    spec_path.with_extension("result.json")
}

/// The body of `lowrank demo --train-child SPEC`: trains with the options in SPEC and writes
/// the report (its `peak_rss_mb` this process's peak) to `SPEC.result.json`.
pub fn child_main(spec_path: &Path) -> Result<()> {
    let options: TrainOptions = lowrank_core::files::read_json(spec_path)?;
    let report = train_here(&options)?;
    lowrank_core::files::write_json(&result_path(spec_path), &report)?;
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

    /// Whether each run's `peak_rss_mb` is its own: only in a process of its own, as a
    /// process's peak resident set only grows.
    pub fn measures_memory(&self) -> bool {
        matches!(self, Runner::Child { .. })
    }

    /// The peak memory of the run that reported `report`, where it can be told apart.
    pub fn peak_rss_mb(&self, report: &TrainReport) -> Option<f64> {
        self.measures_memory().then_some(report.peak_rss_mb)
    }

    /// Trains with `spec`, writing it (and the child's result) to `spec_path`.
    pub fn train(&self, spec: &TrainOptions, spec_path: &Path) -> Result<TrainReport> {
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
