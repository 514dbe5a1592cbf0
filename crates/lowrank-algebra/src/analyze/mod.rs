//! `lowrank analyze`: which rank does an update need, and how low-rank is fine-tuning?
//!
//! - [`analyze_adapter`]: per module, the singular values of ΔW = s·B·A from the factors
//!   ([`crate::Factored::svd`], exact), effective rank and energy statistics ([`stats`]), and a
//!   suggested `--rank` / `rank_pattern` for the next run ([`suggest`]).
//! - [`AdapterAnalysis::compare_with`]: the subspace similarity φ of Hu et al. between two
//!   adapters' updates, module by module ([`similarity`]).
//! - [`analyze_full_fine_tune`]: the same statistics for a full fine-tune's ΔW = W_ft − W,
//!   by randomized SVD of the dense difference ([`full`], [`randomized`]).
//!
//! The results are [`report`] wire types (the `--json` schema); [`plot`] draws them.

pub mod adapter;
pub mod full;
pub mod plot;
pub mod randomized;
pub mod report;
pub mod similarity;
pub mod stats;
pub mod suggest;

use std::collections::BTreeMap;
use std::path::Path;

pub use adapter::AdapterUpdates;
pub use full::FullOptions;
pub use randomized::{randomized_svd, RandomizedOptions};
pub use report::{AnalysisReport, Comparison, ModuleSpectrum, SourceKind, SCHEMA_VERSION};

use crate::{Error, LowRankSvd, Result};

/// The energy share the rank suggestion keeps by default.
pub const DEFAULT_ENERGY: f64 = 0.9;

/// An adapter's report, with the SVDs it was made from (what a comparison needs).
pub struct AdapterAnalysis {
    pub report: AnalysisReport,
    pub spectra: BTreeMap<String, LowRankSvd>,
}

fn check_energy(energy: f64) -> Result<()> {
    if energy > 0.0 && energy <= 1.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "the energy share must be in (0, 1], got {energy}"
        )))
    }
}

/// Analyses the adapter folder `dir`; the rank suggestion keeps `energy` of each module's update.
pub fn analyze_adapter(dir: &Path, energy: f64) -> Result<AdapterAnalysis> {
    check_energy(energy)?;
    let updates = AdapterUpdates::load(dir)?;
    let spectra = updates.spectra();
    let modules = updates.module_spectra(&spectra);
    let report = AnalysisReport {
        schema_version: SCHEMA_VERSION,
        kind: SourceKind::Adapter,
        source: dir.display().to_string(),
        base: None,
        method: updates.method.into(),
        spectrum_method: adapter::ADAPTER_SPECTRUM_METHOD.into(),
        notes: updates.notes,
        suggestion: suggest::suggest_rank(&modules, energy),
        modules,
        comparison: None,
    };
    Ok(AdapterAnalysis { report, spectra })
}

impl AdapterAnalysis {
    /// Adds φ between this adapter's updates and those of the adapter folder `other`.
    pub fn compare_with(&mut self, other: &Path) -> Result<()> {
        let theirs = AdapterUpdates::load(other)?;
        let (modules, unmatched_modules, summary) =
            similarity::compare_spectra(&self.spectra, &theirs.spectra())?;
        if modules.is_empty() {
            return Err(Error::Invalid(format!(
                "{} and {} adapt no module in common",
                self.report.source,
                other.display()
            )));
        }
        self.report.comparison = Some(Comparison {
            other: other.display().to_string(),
            other_method: theirs.method.into(),
            modules,
            unmatched_modules,
            summary,
        });
        Ok(())
    }
}

/// Analyses the full fine-tune `fine_tuned` against `base` (folders or repo ids in the local HF
/// cache); the rank suggestion keeps `energy` of each layer's update.
pub fn analyze_full_fine_tune(
    fine_tuned: &str,
    base: &str,
    options: FullOptions,
    energy: f64,
) -> Result<AnalysisReport> {
    check_energy(energy)?;
    let modules = full::full_fine_tune_spectra(fine_tuned, base, options)?;
    let mut notes = vec![format!(
        "ΔW = W_ft − W of every decoder-layer q/k/v/o/gate/up/down projection; energies use the exact ‖ΔW‖²_F, the effective rank only the top {} singular values",
        options.top
    )];
    if modules.iter().all(|m| m.frobenius_norm == 0.0) {
        notes.push("the two checkpoints have identical adapted weights".into());
    }
    Ok(AnalysisReport {
        schema_version: SCHEMA_VERSION,
        kind: SourceKind::FullFineTune,
        source: fine_tuned.to_string(),
        base: Some(base.to_string()),
        method: "full".into(),
        spectrum_method: options.describe(),
        notes,
        suggestion: suggest::suggest_rank(&modules, energy),
        modules,
        comparison: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(name)
    }

    #[test]
    fn an_adapter_compared_with_itself_is_fully_similar() {
        let dir = fixture("adapters/llama-tied__lora-qv");
        let mut analysis = analyze_adapter(&dir, 0.95).unwrap();
        analysis.compare_with(&dir).unwrap();
        let report = &analysis.report;
        assert_eq!(report.suggestion.energy, 0.95);
        let comparison = report.comparison.as_ref().unwrap();
        assert_eq!(comparison.modules.len(), report.modules.len());
        assert!(comparison.unmatched_modules.is_empty());
        for side in [comparison.summary.right, comparison.summary.left] {
            assert!((side.mean_top_direction - 1.0).abs() < 1e-9);
            assert!((side.mean_whole_subspace - 1.0).abs() < 1e-9);
        }
        // Another adapter on other modules: the modules only one has are listed.
        let mut analysis = analyze_adapter(&dir, 0.9).unwrap();
        analysis
            .compare_with(&fixture("adapters/llama-tied__dora"))
            .unwrap();
        let comparison = analysis.report.comparison.unwrap();
        assert_eq!(comparison.modules.len(), 4, "q and v of 2 layers");
        assert_eq!(comparison.unmatched_modules.len(), 10);
        assert!(analyze_adapter(&dir, 1.5).is_err());
    }
}
