//! The rank to train with next time, read off the spectra: for each module, the smallest rank
//! keeping a share of its update's energy; `--rank` is the smallest power of two at or above the
//! median of those (half the modules need at most that), and PEFT's `rank_pattern` lists the
//! modules whose own need, rounded up to a power of two, differs. Powers of two because that is
//! how ranks are usually chosen, and rounding up never keeps less than the target.

use std::collections::BTreeMap;

use crate::analyze::report::{ModuleSpectrum, RankSuggestion};
use crate::analyze::stats::rank_for_energy;

/// What one module needs to keep `energy` of its update.
enum Need {
    /// A zero update: nothing to keep.
    Nothing,
    Rank(usize),
    /// More directions than the (partial) spectrum shows.
    Unknown,
}

fn need(module: &ModuleSpectrum, energy: f64) -> Need {
    let total = module.frobenius_norm.powi(2);
    match rank_for_energy(&module.cumulative_energy, total, energy) {
        Some(0) => Need::Nothing,
        Some(r) => Need::Rank(r),
        None => Need::Unknown,
    }
}

/// The projection a module path ends with (`q_proj`), PEFT's short `rank_pattern` key.
fn projection(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Suggests `--rank` and a `rank_pattern` keeping `energy` (0 < energy ≤ 1) of every module's
/// update energy.
pub fn suggest_rank(modules: &[ModuleSpectrum], energy: f64) -> RankSuggestion {
    // Per module with an update: its rank, or None when beyond the computed spectrum.
    let mut needs: Vec<(&str, Option<usize>)> = Vec::new();
    let mut at_full_rank = Vec::new();
    let mut without_update = Vec::new();
    for m in modules {
        match need(m, energy) {
            Need::Nothing => without_update.push(m.module.clone()),
            Need::Rank(r) => {
                if m.stored_rank == Some(r) {
                    at_full_rank.push(m.module.clone());
                }
                needs.push((&m.module, Some(r)));
            }
            Need::Unknown => {
                at_full_rank.push(m.module.clone());
                needs.push((&m.module, None));
            }
        }
    }
    let percent = format!("{:.0}%", 100.0 * energy);
    // An unknown need counts as larger than every known one.
    let mut sorted: Vec<usize> = needs.iter().map(|(_, r)| r.unwrap_or(usize::MAX)).collect();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied();
    let (rank, reason) = match median {
        None => (None, "no module has a non-zero update".to_string()),
        Some(usize::MAX) => (
            None,
            format!(
                "most modules need more directions than the computed top singular values to keep {percent} of their energy: compute more (--top)"
            ),
        ),
        Some(median) => (
            Some(median.next_power_of_two()),
            format!(
                "the smallest power of two at or above the median, over {} modules with an update, of the rank keeping {percent} of each module's energy; rank_pattern: modules whose own rank, rounded up to a power of two, differs",
                needs.len()
            ),
        ),
    };
    let differing: Vec<(&str, usize)> = match rank {
        Some(rank) => needs
            .iter()
            .filter_map(|(m, r)| r.map(|r| (*m, r.next_power_of_two())))
            .filter(|(_, r)| *r != rank)
            .collect(),
        None => Vec::new(),
    };
    RankSuggestion {
        energy,
        rank,
        rank_pattern: group_by_projection(&differing, modules),
        modules_at_full_rank: at_full_rank,
        modules_without_update: without_update,
        reason,
    }
}

/// `rank_pattern` keys: a projection name (`q_proj`) when every module of that projection has
/// the same differing rank, else the full module paths (PEFT matches a key as a `.`-suffix).
fn group_by_projection(
    differing: &[(&str, usize)],
    modules: &[ModuleSpectrum],
) -> BTreeMap<String, usize> {
    let mut by_projection: BTreeMap<&str, Vec<(&str, usize)>> = BTreeMap::new();
    for (m, r) in differing {
        by_projection
            .entry(projection(m))
            .or_default()
            .push((m, *r));
    }
    let mut pattern = BTreeMap::new();
    for (proj, entries) in by_projection {
        let all_of_projection = modules
            .iter()
            .filter(|s| projection(&s.module) == proj)
            .count();
        let same_rank = entries.iter().all(|(_, r)| *r == entries[0].1);
        if same_rank && entries.len() == all_of_projection {
            pattern.insert(proj.to_string(), entries[0].1);
        } else {
            pattern.extend(entries.into_iter().map(|(m, r)| (m.to_string(), r)));
        }
    }
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::stats::module_spectrum;

    fn adapter_module(name: &str, sigma: &[f64]) -> ModuleSpectrum {
        let energy = sigma.iter().map(|s| s * s).sum();
        module_spectrum(
            name,
            (8, 8),
            Some(sigma.len()),
            sigma.to_vec(),
            energy,
            true,
        )
    }

    #[test]
    fn median_rank_and_a_pattern_for_the_modules_that_differ() {
        // Needs at 90%: q → 1 (one dominant direction), v → 3 of 4, k → 0 (no update).
        let modules = vec![
            adapter_module("model.layers.0.self_attn.q_proj", &[10.0, 1.0, 0.5, 0.1]),
            adapter_module("model.layers.1.self_attn.q_proj", &[10.0, 1.0, 0.5, 0.1]),
            adapter_module("model.layers.0.self_attn.v_proj", &[3.0, 3.0, 3.0, 0.5]),
            adapter_module("model.layers.1.self_attn.v_proj", &[3.0, 3.0, 3.0, 3.0]),
            adapter_module("model.layers.0.self_attn.k_proj", &[0.0, 0.0, 0.0, 0.0]),
        ];
        let s = suggest_rank(&modules, 0.9);
        // Needs 1, 1, 3, 4 → median (upper) 3 → rank 4; q's own 1 differs for every q_proj.
        assert_eq!(s.rank, Some(4));
        assert_eq!(s.rank_pattern, BTreeMap::from([("q_proj".to_string(), 1)]));
        assert_eq!(
            s.modules_without_update,
            vec!["model.layers.0.self_attn.k_proj"]
        );
        assert_eq!(
            s.modules_at_full_rank,
            vec!["model.layers.1.self_attn.v_proj"]
        );
    }

    #[test]
    fn modules_of_one_projection_that_disagree_are_named_in_full() {
        let modules = vec![
            adapter_module("model.layers.0.mlp.up_proj", &[1.0, 1.0]),
            adapter_module("model.layers.1.mlp.up_proj", &[1.0, 0.0]),
            adapter_module("model.layers.2.mlp.up_proj", &[1.0, 1.0]),
        ];
        let s = suggest_rank(&modules, 0.9);
        assert_eq!(s.rank, Some(2));
        assert_eq!(
            s.rank_pattern,
            BTreeMap::from([("model.layers.1.mlp.up_proj".to_string(), 1)])
        );
    }

    #[test]
    fn a_partial_spectrum_that_does_not_reach_the_energy_gives_no_rank() {
        let partial =
            |name: &str| module_spectrum(name, (64, 64), None, vec![1.0, 1.0], 10.0, false);
        let s = suggest_rank(&[partial("a.q_proj"), partial("b.q_proj")], 0.9);
        assert_eq!(s.rank, None);
        assert_eq!(s.modules_at_full_rank.len(), 2);
        let none = suggest_rank(&[adapter_module("a.q_proj", &[0.0])], 0.9);
        assert_eq!(none.rank, None);
    }
}
