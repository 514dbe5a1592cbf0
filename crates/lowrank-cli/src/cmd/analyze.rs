//! `lowrank analyze`: the spectrum of an adapter's updates (or a full fine-tune's), the rank to
//! train with next, and the subspace similarity between two adapters. The work is in
//! `lowrank_algebra::analyze`.

use std::path::{Path, PathBuf};

use super::NamePath;
use anyhow::{Context, Result};
use lowrank_algebra::analyze::report::{AnalysisReport, Comparison, ModuleSpectrum};
use lowrank_algebra::analyze::{
    analyze_adapter, analyze_full_fine_tune, plot, FullOptions, RandomizedOptions,
};
use lowrank_models::hub::resolve_adapter_dir;

#[derive(clap::Args)]
pub struct Args {
    /// Adapter folder (PEFT LoRA, DoRA or AdaLoRA) or Hub id org/name[@revision].
    #[arg(required_unless_present = "full", conflicts_with = "full")]
    adapter: Option<PathBuf>,
    /// A second adapter (folder or Hub id): subspace similarity φ(i, j) with it, per module both adapt.
    #[arg(long, value_name = "ADAPTER")]
    compare: Option<PathBuf>,
    /// A fully fine-tuned model (folder, GGUF file or Hub id): analyse ΔW = W_ft − W of
    /// its decoder-layer linears against --base.
    #[arg(long, value_name = "MODEL_FT", requires = "base")]
    full: Option<String>,
    /// With --full: the model it was fine-tuned from (folder, GGUF file or Hub id).
    #[arg(long, value_name = "MODEL", requires = "full")]
    base: Option<String>,
    /// With --full: singular values computed per layer (randomized SVD).
    #[arg(long, value_name = "K", default_value_t = 32, requires = "full")]
    top: usize,
    /// With --full: extra sketch columns of the randomized SVD.
    #[arg(long, default_value_t = 10, requires = "full")]
    oversample: usize,
    /// With --full: power iterations of the randomized SVD.
    #[arg(long, default_value_t = 2, requires = "full")]
    power_iters: usize,
    /// With --full: seed of the random sketch.
    #[arg(long, default_value_t = 0, requires = "full")]
    seed: u64,
    /// Energy share (σ² of ΔW) each module should keep at the suggested rank.
    #[arg(long, default_value_t = lowrank_algebra::analyze::DEFAULT_ENERGY)]
    energy: f64,
    /// Print the report as JSON (schema in docs/analyze.md) instead of tables.
    #[arg(long)]
    json: bool,
    /// Write spectrum.svg (and similarity.svg with --compare) to this folder.
    #[arg(long, value_name = "DIR")]
    plot_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let report = match (&args.adapter, &args.full, &args.base) {
        (Some(adapter), _, _) => {
            let mut analysis = analyze_adapter(&resolve_adapter_dir(adapter)?, args.energy)
                .naming("analysing adapter", adapter)?;
            if let Some(other) = &args.compare {
                analysis
                    .compare_with(&resolve_adapter_dir(other)?)
                    .naming("comparing with adapter", other)?;
            }
            analysis.report
        }
        (None, Some(full), Some(base)) => {
            if args.compare.is_some() {
                anyhow::bail!("--compare compares two adapters; it does not apply to --full");
            }
            let options = FullOptions {
                top: args.top,
                sketch: RandomizedOptions {
                    oversampling: args.oversample,
                    power_iterations: args.power_iters,
                    seed: args.seed,
                },
            };
            analyze_full_fine_tune(full, base, options, args.energy)
                .with_context(|| format!("analysing full fine-tune {full} against {base}"))?
        }
        _ => anyhow::bail!("give an adapter folder, or --full MODEL_FT --base MODEL"),
    };
    if let Some(dir) = &args.plot_dir {
        write_plots(dir, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

fn write_plots(dir: &Path, report: &AnalysisReport) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let title = format!(
        "singular values of ΔW per module: {}",
        short(&report.source)
    );
    let path = dir.join("spectrum.svg");
    plot::write_svg(&path, &plot::spectrum_svg(&title, &report.modules)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    if let Some(comparison) = &report.comparison {
        let path = dir.join("similarity.svg");
        let svg = plot::similarity_svg(
            comparison,
            &short(&report.source),
            &short(&comparison.other),
        )?;
        plot::write_svg(&path, &svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The last component of a path, for captions.
fn short(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}

/// Up to `shown` names, then how many more.
fn some_of(names: &[String], shown: usize) -> String {
    let mut out = names
        .iter()
        .take(shown)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > shown {
        out.push_str(&format!(" and {} more", names.len() - shown));
    }
    out
}

fn text(report: &AnalysisReport) -> String {
    let mut out = match &report.base {
        Some(base) => format!(
            "full fine-tune {} against base {}: ΔW = W_ft − W\n",
            report.source, base
        ),
        None => format!("{} adapter {}: ΔW = s·B·A\n", report.method, report.source),
    };
    out.push_str(&format!("singular values: {}\n", report.spectrum_method));
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out.push_str(
        "effective rank = exp(entropy of σᵢ/Σσ) (Roy & Vetterli); energy = σ²; top-1 = σ₁²/‖ΔW‖²_F\n\n",
    );
    out.push_str(&module_table(&report.modules));
    out.push_str(&suggestion_text(report));
    if let Some(comparison) = &report.comparison {
        out.push_str(&comparison_text(report, comparison));
    }
    out
}

fn module_table(modules: &[ModuleSpectrum]) -> String {
    let width = modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<width$} {:>11} {:>4} {:>10} {:>8} {:>7}  {:<14} σ (largest first)\n",
        "module", "shape", "r", "‖ΔW‖_F", "eff.rank", "top-1", "rank 90/95/99%"
    );
    for m in modules {
        let ranks: Vec<String> = m
            .ranks_for_energy
            .iter()
            .map(|r| match r.rank {
                Some(k) => k.to_string(),
                None => format!(">{}", m.singular_values.len()),
            })
            .collect();
        let sigma: Vec<String> = m.singular_values.iter().take(6).map(|s| sci(*s)).collect();
        let more = if m.singular_values.len() > 6 {
            " …"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<width$} {:>11} {:>4} {:>10} {:>8.2} {:>6.1}%  {:<14} {}{more}\n",
            m.module,
            format!("{}x{}", m.out_features, m.in_features),
            m.stored_rank.map_or("-".into(), |r| r.to_string()),
            sci(m.frobenius_norm),
            m.effective_rank,
            100.0 * m.cumulative_energy.first().copied().unwrap_or(0.0),
            ranks.join("/"),
            sigma.join(" "),
        ));
    }
    out
}

fn suggestion_text(report: &AnalysisReport) -> String {
    let s = &report.suggestion;
    let mut out = String::from("\n");
    match s.rank {
        Some(rank) => out.push_str(&format!("suggested: --rank {rank}\n")),
        None => out.push_str("suggested: no rank\n"),
    }
    out.push_str(&format!("  why: {}\n", s.reason));
    if !s.rank_pattern.is_empty() {
        out.push_str(&format!(
            "  rank_pattern: {}\n",
            serde_json::to_string(&s.rank_pattern).unwrap_or_default()
        ));
    }
    if !s.modules_at_full_rank.is_empty() {
        out.push_str(&format!(
            "  {} module(s) need every direction they have (a larger rank may help them): {}\n",
            s.modules_at_full_rank.len(),
            some_of(&s.modules_at_full_rank, 4)
        ));
    }
    if !s.modules_without_update.is_empty() {
        out.push_str(&format!(
            "  {} module(s) have no update (drop them from target_modules?): {}\n",
            s.modules_without_update.len(),
            some_of(&s.modules_without_update, 4)
        ));
    }
    out
}

fn comparison_text(report: &AnalysisReport, c: &Comparison) -> String {
    let mut out = format!(
        "\nsubspace similarity with {} adapter {}: φ(i, j) = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j), 1 = contained, 0 = orthogonal\n",
        c.other_method, c.other
    );
    out.push_str("right = right singular vectors of ΔW (input space, A's row space: Hu et al.'s choice); left = left singular vectors (output space); random = φ(r1, r2) of random subspaces\n\n");
    let width = c
        .modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "{:<width$} {:>4} {:>4}   {:>12} {:>9} {:>7}   {:>11} {:>9} {:>7}\n",
        "module",
        "r1",
        "r2",
        "right φ(1,1)",
        "φ(r1,r2)",
        "random",
        "left φ(1,1)",
        "φ(r1,r2)",
        "random"
    ));
    for m in &c.modules {
        out.push_str(&format!(
            "{:<width$} {:>4} {:>4}   {:>12.3} {:>9.3} {:>7.3}   {:>11.3} {:>9.3} {:>7.3}\n",
            m.module,
            m.rank,
            m.other_rank,
            m.right.top_direction,
            m.right.whole_subspace,
            m.right.random_whole_subspace,
            m.left.top_direction,
            m.left.whole_subspace,
            m.left.random_whole_subspace,
        ));
    }
    let (r, l) = (c.summary.right, c.summary.left);
    out.push_str(&format!(
        "{:<width$} {:>4} {:>4}   {:>12.3} {:>9.3} {:>7.3}   {:>11.3} {:>9.3} {:>7.3}\n",
        format!("mean over {} modules", c.summary.modules),
        "",
        "",
        r.mean_top_direction,
        r.mean_whole_subspace,
        r.mean_random_whole_subspace,
        l.mean_top_direction,
        l.mean_whole_subspace,
        l.mean_random_whole_subspace,
    ));
    if !c.unmatched_modules.is_empty() {
        out.push_str(&format!(
            "only in one of {} and {}: {}\n",
            short(&report.source),
            short(&c.other),
            some_of(&c.unmatched_modules, 4)
        ));
    }
    out
}
