//! The demo's rank sweep: one task taught by LoRA adapters of rank 1, 2, 4, 8, 16, each scored,
//! then analysed with `lowrank_algebra::analyze` — how much of its rank each update uses
//! (effective rank, rank for 90% of the energy) and how much of the largest adapter's subspaces
//! the smaller ones found (φ of Hu et al., on the input and the output side of ΔW).

use std::path::{Path, PathBuf};

use lowrank_algebra::analyze::report::{ModuleSpectrum, SideSummary};
use lowrank_algebra::analyze::{analyze_adapter, plot, AdapterAnalysis, DEFAULT_ENERGY};
use serde::{Deserialize, Serialize};

use crate::evaluate::Score;
use crate::progress::Progress;
use crate::tasks::Task;
use anyhow::{Context, Result};

/// Which ranks to train on which task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankSweep {
    pub task: Task,
    /// Ascending; the last is the reference the others are compared with.
    pub ranks: Vec<usize>,
    /// Training steps per rank (the batch size and learning rate of the adapters').
    pub steps: usize,
    /// s = α/r, the same for every rank (α = s·r), so ranks differ only in rank.
    pub scale: f64,
}

impl RankSweep {
    pub fn alpha(&self, rank: usize) -> f64 {
        self.scale * rank as f64
    }

    /// The folder of one rank's adapter under `out`.
    pub fn dir(&self, out: &Path, rank: usize) -> PathBuf {
        out.join(format!("{}-r{rank}", self.task.name()))
    }
}

/// One rank's results.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub rank: usize,
    pub alpha: f64,
    pub trainable_parameters: usize,
    pub train_seconds: f64,
    pub final_loss: f64,
    /// On the task's held-out prompts.
    pub accuracy: f64,
    pub loss: f64,
    /// Means over the adapted modules.
    pub mean_effective_rank: f64,
    pub mean_rank_for_90_percent: f64,
    /// `lowrank analyze`'s suggestion from this adapter alone.
    pub suggested_rank: Option<usize>,
    /// φ against the largest rank's adapter, means over modules, on the input side (right
    /// singular vectors, as Hu et al.) and the output side (left).
    pub input_space: PhiVsLargest,
    pub output_space: PhiVsLargest,
}

/// φ(1, 1) (top directions), φ(r, r_max) (this whole subspace) and its chance level.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PhiVsLargest {
    pub top_direction: f64,
    pub whole_subspace: f64,
    pub random_whole_subspace: f64,
}

impl From<SideSummary> for PhiVsLargest {
    fn from(s: SideSummary) -> Self {
        PhiVsLargest {
            top_direction: s.mean_top_direction,
            whole_subspace: s.mean_whole_subspace,
            random_whole_subspace: s.mean_random_whole_subspace,
        }
    }
}

/// The sweep's section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub task: Task,
    pub steps: usize,
    pub batch_size: usize,
    /// Held-out prompts each rank was scored on.
    pub eval_examples: usize,
    /// Adapted modules per adapter.
    pub modules: usize,
    pub rows: Vec<SweepRow>,
    /// Wall time of the whole section (training, scoring, analysis, pictures).
    pub seconds: f64,
    /// The pictures, relative to the demo's folder.
    pub figures: Vec<String>,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn rank_for_90(m: &ModuleSpectrum) -> f64 {
    m.ranks_for_energy
        .iter()
        .find(|r| (r.energy - 0.9).abs() < 1e-9)
        .and_then(|r| r.rank)
        .unwrap_or(m.singular_values.len()) as f64
}

/// A trained rank, before the comparison.
struct Trained {
    rank: usize,
    dir: PathBuf,
    outcome: lowrank_train::TrainReport,
    score: Score,
}

/// Runs the sweep into `out` (created): `train(rank, dir)` trains one adapter, `score(dir)`
/// scores it on the task's held-out prompts; `demo_out` is the demo's folder, for the figure
/// paths.
pub fn run(
    sweep: &RankSweep,
    out: &Path,
    demo_out: &Path,
    batch_size: usize,
    train: impl Fn(usize, &Path) -> Result<lowrank_train::TrainReport>,
    score: impl Fn(&Path) -> Result<Score>,
    progress: &Progress,
) -> Result<SweepReport> {
    let start = progress.seconds();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut trained = Vec::new();
    for &rank in &sweep.ranks {
        let dir = sweep.dir(out, rank);
        let outcome = train(rank, &dir)?;
        let score = score(&dir)?;
        progress.say(format!(
            "  r{rank}: {} steps in {:.0}s, {:.1}% on {}",
            outcome.steps,
            outcome.seconds,
            100.0 * score.accuracy,
            sweep.task.name()
        ));
        trained.push(Trained {
            rank,
            dir,
            outcome,
            score,
        });
    }
    let largest = trained.last().context("the rank sweep lists no rank")?;
    let analyse = |t: &Trained| -> Result<AdapterAnalysis> {
        let mut analysis = analyze_adapter(&t.dir, DEFAULT_ENERGY)
            .with_context(|| format!("analysing {}", t.dir.display()))?;
        analysis.compare_with(&largest.dir).with_context(|| {
            format!(
                "comparing {} with {}",
                t.dir.display(),
                largest.dir.display()
            )
        })?;
        Ok(analysis)
    };
    let mut rows = Vec::new();
    let mut analyses = Vec::new();
    for t in &trained {
        let analysis = analyse(t)?;
        let report = &analysis.report;
        let comparison = report
            .comparison
            .as_ref()
            .context("the comparison was just made")?;
        rows.push(SweepRow {
            rank: t.rank,
            alpha: sweep.alpha(t.rank),
            trainable_parameters: t.outcome.trainable_parameters,
            train_seconds: t.outcome.seconds,
            final_loss: t.outcome.final_loss,
            accuracy: t.score.accuracy,
            loss: t.score.loss,
            mean_effective_rank: mean(report.modules.iter().map(|m| m.effective_rank)),
            mean_rank_for_90_percent: mean(report.modules.iter().map(rank_for_90)),
            suggested_rank: report.suggestion.rank,
            input_space: comparison.summary.right.into(),
            output_space: comparison.summary.left.into(),
        });
        analyses.push(analysis);
    }
    let figures = write_figures(sweep, out, demo_out, &analyses)?;
    Ok(SweepReport {
        task: sweep.task,
        steps: sweep.steps,
        batch_size,
        eval_examples: trained.last().map_or(0, |t| t.score.examples),
        modules: analyses.first().map_or(0, |a| a.report.modules.len()),
        rows,
        seconds: progress.seconds() - start,
        figures,
    })
}

/// `spectrum.svg` of the largest rank and `similarity.svg` of the second largest against it
/// (as the LoRA paper's r = 8 against r = 64).
fn write_figures(
    sweep: &RankSweep,
    out: &Path,
    demo_out: &Path,
    analyses: &[AdapterAnalysis],
) -> Result<Vec<String>> {
    let relative = |p: &Path| p.strip_prefix(demo_out).unwrap_or(p).display().to_string();
    let mut figures = Vec::new();
    let task = sweep.task.name();
    if let [.., second, largest] = analyses {
        let (r2, r1) = (
            sweep.ranks[sweep.ranks.len() - 2],
            sweep.ranks[sweep.ranks.len() - 1],
        );
        let spectrum = out.join("spectrum.svg");
        let svg = plot::spectrum_svg(
            &format!("singular values of ΔW per module: {task} LoRA r{r1}"),
            &largest.report.modules,
        )
        .context("drawing the sweep's spectrum")?;
        plot::write_svg(&spectrum, &svg).context("writing the sweep's spectrum")?;
        figures.push(relative(&spectrum));
        if let Some(comparison) = &second.report.comparison {
            let similarity = out.join("similarity.svg");
            let svg = plot::similarity_svg(comparison, &format!("r{r2}"), &format!("r{r1}"))
                .context("drawing the sweep's similarity")?;
            plot::write_svg(&similarity, &svg).context("writing the sweep's similarity")?;
            figures.push(relative(&similarity));
        }
    }
    Ok(figures)
}
