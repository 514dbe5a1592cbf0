//! Statistics of one update's spectrum: effective rank, energy captured by the top k singular
//! values, and the smallest rank that keeps a share of the energy.
//!
//! - Energy is σ²: the energy of the top k is Σ_{i≤k} σᵢ² / ‖ΔW‖²_F, the share of ΔW's squared
//!   Frobenius norm its best rank-k approximation (Eckart–Young) keeps.
//! - Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
//!   dimensionality"): with pᵢ = σᵢ / Σⱼσⱼ, erank = exp(−Σ pᵢ·ln pᵢ), the exponential of the
//!   Shannon entropy of the normalised singular values. n equal values give n, one non-zero
//!   value gives 1, the zero matrix 0. It uses σ, not σ², so it weighs small directions more
//!   than the energy ranks do.
//!
//! When only the top K singular values are known (a randomized SVD of a full fine-tune), the
//! energies still use the exact ‖ΔW‖²_F, a rank beyond K is reported as unknown (`None`), and the
//! effective rank is that of the top K values (so at most K).

use crate::analyze::report::{EnergyRank, ModuleSpectrum};

/// The energy shares the reports give the smallest rank for.
pub const ENERGY_THRESHOLDS: [f64; 3] = [0.90, 0.95, 0.99];

/// Relative slack when comparing a cumulative energy with a threshold, so that 0.9 of the energy
/// counted in floating point still meets a 0.9 target.
const ENERGY_SLACK: f64 = 1e-12;

/// exp of the Shannon entropy of pᵢ = σᵢ/Σσ (Roy & Vetterli 2007); 0 for an all-zero spectrum.
pub fn effective_rank(singular_values: &[f64]) -> f64 {
    let total: f64 = singular_values.iter().filter(|s| **s > 0.0).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let entropy: f64 = singular_values
        .iter()
        .filter(|s| **s > 0.0)
        .map(|s| {
            let p = s / total;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

/// Share of `total_energy` (= ‖ΔW‖²_F) kept by the top k singular values, for k = 1..=n.
/// All zeros when the total is zero.
pub fn cumulative_energy(singular_values: &[f64], total_energy: f64) -> Vec<f64> {
    let mut sum = 0.0;
    singular_values
        .iter()
        .map(|s| {
            sum += s * s;
            if total_energy > 0.0 {
                (sum / total_energy).min(1.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// The smallest k whose top-k energy share reaches `threshold`: 0 when there is no energy at all,
/// `None` when the known singular values do not reach it (only part of the spectrum is known).
pub fn rank_for_energy(cumulative: &[f64], total_energy: f64, threshold: f64) -> Option<usize> {
    if total_energy <= 0.0 {
        return Some(0);
    }
    cumulative
        .iter()
        .position(|e| *e >= threshold * (1.0 - ENERGY_SLACK))
        .map(|i| i + 1)
}

/// The statistics of one module's update.
///
/// `singular_values` must be sorted descending; `total_energy` is ‖ΔW‖²_F, which equals Σσ²
/// when the spectrum is complete; `stored_rank` is the adapter's r (None for a full fine-tune).
pub fn module_spectrum(
    module: &str,
    shape: (usize, usize),
    stored_rank: Option<usize>,
    singular_values: Vec<f64>,
    total_energy: f64,
    complete: bool,
) -> ModuleSpectrum {
    let cumulative = cumulative_energy(&singular_values, total_energy);
    let ranks_for_energy = ENERGY_THRESHOLDS
        .iter()
        .map(|&energy| EnergyRank {
            energy,
            rank: rank_for_energy(&cumulative, total_energy, energy),
        })
        .collect();
    ModuleSpectrum {
        module: module.to_string(),
        out_features: shape.0,
        in_features: shape.1,
        stored_rank,
        complete_spectrum: complete,
        frobenius_norm: total_energy.max(0.0).sqrt(),
        effective_rank: effective_rank(&singular_values),
        singular_values,
        cumulative_energy: cumulative,
        ranks_for_energy,
    }
}

/// Module names in model order: by layer index as a number (`layers.2` before `layers.10`),
/// then by the position of the projection in [`lowrank_core::lora::ALL_LINEAR`], then by name.
pub fn model_order_key(module: &str) -> (usize, usize, String) {
    let parts: Vec<&str> = module.split('.').collect();
    let layer = parts
        .windows(2)
        .find(|w| w[0] == "layers" || w[0] == "h" || w[0] == "blocks")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(usize::MAX);
    let kind = parts.last().copied().unwrap_or_default();
    let position = lowrank_core::lora::ALL_LINEAR
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(usize::MAX);
    (layer, position, module.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn energy_of(s: &[f64]) -> f64 {
        s.iter().map(|x| x * x).sum()
    }

    #[test]
    fn energy_shares_and_ranks_of_a_hand_built_spectrum() {
        // σ = (4, 3): energies 16/25 and 9/25.
        let s = [4.0, 3.0];
        let cum = cumulative_energy(&s, energy_of(&s));
        assert!((cum[0] - 0.64).abs() < 1e-15 && (cum[1] - 1.0).abs() < 1e-15);
        for t in ENERGY_THRESHOLDS {
            assert_eq!(rank_for_energy(&cum, 25.0, t), Some(2));
        }
        assert_eq!(rank_for_energy(&cum, 25.0, 0.6), Some(1));

        // σ = (4, 2, 1): 16/21 = 0.762, 20/21 = 0.952, 1 → 90% and 95% need 2, 99% needs 3.
        let s = [4.0, 2.0, 1.0];
        let m = module_spectrum("m", (5, 5), Some(3), s.to_vec(), energy_of(&s), true);
        let ranks: Vec<Option<usize>> = m.ranks_for_energy.iter().map(|r| r.rank).collect();
        assert_eq!(ranks, vec![Some(2), Some(2), Some(3)]);
        assert!((m.frobenius_norm - 21f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn a_partial_spectrum_leaves_unreached_ranks_unknown() {
        // Top 2 of a spectrum whose total energy is 100: 16+9 = 25%.
        let cum = cumulative_energy(&[4.0, 3.0], 100.0);
        assert_eq!(rank_for_energy(&cum, 100.0, 0.2), Some(2));
        assert_eq!(rank_for_energy(&cum, 100.0, 0.9), None);
    }

    #[test]
    fn effective_rank_of_flat_single_and_zero_spectra() {
        assert!((effective_rank(&[2.0; 5]) - 5.0).abs() < 1e-12);
        assert!((effective_rank(&[7.0, 0.0, 0.0]) - 1.0).abs() < 1e-15);
        assert_eq!(effective_rank(&[0.0, 0.0]), 0.0);
        // p = (3/4, 1/4): exp(−(¾ln¾ + ¼ln¼)) = 4/3^(3/4).
        let expected = 4.0 / 3f64.powf(0.75);
        assert!((effective_rank(&[3.0, 1.0]) - expected).abs() < 1e-12);
    }

    #[test]
    fn a_zero_update_needs_rank_zero() {
        let m = module_spectrum("m", (3, 3), Some(2), vec![0.0, 0.0], 0.0, true);
        assert!(m.ranks_for_energy.iter().all(|r| r.rank == Some(0)));
        assert_eq!(m.cumulative_energy, vec![0.0, 0.0]);
    }

    #[test]
    fn modules_sort_in_model_order() {
        let mut names = vec![
            "model.layers.10.self_attn.q_proj",
            "model.layers.2.mlp.down_proj",
            "model.layers.2.self_attn.v_proj",
            "model.layers.2.self_attn.q_proj",
        ];
        names.sort_by_key(|n| model_order_key(n));
        assert_eq!(
            names,
            vec![
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.self_attn.v_proj",
                "model.layers.2.mlp.down_proj",
                "model.layers.10.self_attn.q_proj",
            ]
        );
    }
}
