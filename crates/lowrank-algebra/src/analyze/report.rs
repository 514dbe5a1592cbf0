//! The JSON wire types of `lowrank analyze --json` (schema version [`SCHEMA_VERSION`]).
//!
//! Fields are only ever added within a schema version; renaming or removing one bumps it. Every
//! number is a plain JSON number (no NaN: undefined quantities are `null`). Module names are
//! the adapter's module paths (`model.layers.0.self_attn.q_proj`), in model order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// What was analysed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// An adapter folder: ΔW = s·B·A per module, exact spectrum from the factors.
    Adapter,
    /// A full fine-tune against its base: ΔW = W_ft − W per linear, randomized top-K spectrum.
    FullFineTune,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalysisReport {
    pub schema_version: u32,
    pub kind: SourceKind,
    /// The adapter folder, or the fine-tuned model.
    pub source: String,
    /// The base model (full fine-tunes only).
    pub base: Option<String>,
    /// "LoRA", "DoRA", "AdaLoRA" or "full".
    pub method: String,
    /// How the singular values were computed, in words.
    pub spectrum_method: String,
    /// Caveats of this analysis (e.g. that a DoRA magnitude is not part of the spectrum).
    pub notes: Vec<String>,
    pub modules: Vec<ModuleSpectrum>,
    pub suggestion: RankSuggestion,
    /// Present with `--compare`.
    pub comparison: Option<Comparison>,
}

/// One module's update ΔW (out_features × in_features) and its spectrum statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleSpectrum {
    pub module: String,
    pub out_features: usize,
    pub in_features: usize,
    /// The adapter's rank r for this module (null for a full fine-tune).
    pub stored_rank: Option<usize>,
    /// Whether `singular_values` is the whole non-trivial spectrum (false: only the top K).
    pub complete_spectrum: bool,
    /// ‖ΔW‖_F (exact, also when the spectrum is partial).
    pub frobenius_norm: f64,
    /// exp(entropy of σᵢ/Σσ) over `singular_values` (Roy & Vetterli 2007).
    pub effective_rank: f64,
    /// σ₁ ≥ σ₂ ≥ … of ΔW.
    pub singular_values: Vec<f64>,
    /// Entry k−1: Σ_{i≤k} σᵢ² / ‖ΔW‖²_F, the energy share of the best rank-k approximation.
    pub cumulative_energy: Vec<f64>,
    /// The smallest rank keeping 90/95/99% of the energy.
    pub ranks_for_energy: Vec<EnergyRank>,
}

/// The smallest rank keeping `energy` of ‖ΔW‖²_F: 0 for a zero update, null when the known
/// singular values do not reach it (a partial spectrum).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EnergyRank {
    pub energy: f64,
    pub rank: Option<usize>,
}

/// What rank to train with next time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankSuggestion {
    /// The energy share each module should keep.
    pub energy: f64,
    /// `--rank` / PEFT's `r`: null when most modules need more than the spectrum shows.
    pub rank: Option<usize>,
    /// PEFT `rank_pattern` for modules that need a different rank: keys are projection names
    /// (`q_proj`) when every such module agrees, else full module paths.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Modules that need every direction they have to reach `energy` (an adapter using its
    /// whole rank, or a full fine-tune beyond its top K): a larger rank may help them.
    pub modules_at_full_rank: Vec<String>,
    /// Modules whose update is zero (candidates to drop from `target_modules`).
    pub modules_without_update: Vec<String>,
    /// How the suggestion was made, in words.
    pub reason: String,
}

/// `--compare`: subspace similarity between this adapter and another, per common module.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The other adapter folder.
    pub other: String,
    pub other_method: String,
    pub modules: Vec<ModuleSimilarity>,
    /// Modules only one of the two adapters has.
    pub unmatched_modules: Vec<String>,
    /// Means over `modules`.
    pub summary: SimilaritySummary,
}

/// φ between the two updates of one module, on both sides of ΔW.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleSimilarity {
    pub module: String,
    /// Singular directions of this adapter's ΔW (its rank) and of the other's.
    pub rank: usize,
    pub other_rank: usize,
    /// Right singular vectors V of ΔW (the input space, ΔW's row space = A's row space: what
    /// Hu et al. compare).
    pub right: SimilarityGrid,
    /// Left singular vectors U of ΔW (the output space, B's column space).
    pub left: SimilarityGrid,
}

/// φ(i, j) = ‖U₁,ᵢᵀ U₂,ⱼ‖²_F / min(i, j) for the top i and top j singular vectors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilarityGrid {
    /// `phi[i-1][j-1]` = φ(i, j), i ≤ rank, j ≤ other_rank; each in [0, 1].
    pub phi: Vec<Vec<f64>>,
    /// φ(1, 1): how aligned the two top directions are.
    pub top_direction: f64,
    /// φ(rank, other_rank): the share of the smaller subspace inside the larger.
    pub whole_subspace: f64,
    /// What `whole_subspace` would be for random subspaces: max(i, j) / n in expectation.
    pub random_whole_subspace: f64,
}

/// Means of the per-module numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilaritySummary {
    pub modules: usize,
    pub right: SideSummary,
    pub left: SideSummary,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SideSummary {
    pub mean_top_direction: f64,
    pub mean_whole_subspace: f64,
    pub mean_random_whole_subspace: f64,
}
