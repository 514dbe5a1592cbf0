//! An adapter folder as factored updates per module, and its spectra.
//!
//! - LoRA: ΔW = s·B·A.
//! - DoRA: the spectrum of s·B·A. DoRA's magnitude m rescales each output row of W + s·B·A to
//!   norm m; that rescaling needs the base weight and makes the effective update a full-rank
//!   mix of W and B·A, so it is left out (the report says so): the directions DoRA learns are
//!   those of B·A.
//! - AdaLoRA: ΔW = s·B·diag(E)·A over the kept triplets (its `rank_pattern`), read through
//!   [`AdaloraAdapter::to_lora`]; a module with every triplet pruned has no update.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use lowrank_core::adalora::{is_adalora_dir, AdaloraAdapter};
use lowrank_core::lora::{LoraAdapter, LoraVariant};

use crate::analyze::report::ModuleSpectrum;
use crate::analyze::stats::{model_order_key, module_spectrum};
use crate::{Factored, LowRankSvd, Result};

/// What the spectrum of an adapter's modules is computed from.
pub const ADAPTER_SPECTRUM_METHOD: &str =
    "exact: thin QR of B and Aᵀ, then the SVD of the r×r core (the d×k matrix is never formed)";

/// An adapter's updates, ready to analyse.
pub struct AdapterUpdates {
    /// "LoRA", "DoRA" or "AdaLoRA".
    pub method: &'static str,
    pub notes: Vec<String>,
    /// Module path → ΔW in factored form (scale folded into B).
    pub modules: BTreeMap<String, Factored>,
    /// AdaLoRA modules with every triplet pruned: (path, out_features, in_features).
    pub pruned: Vec<(String, usize, usize)>,
}

impl AdapterUpdates {
    /// Reads a PEFT adapter folder (LoRA, DoRA or AdaLoRA) without its base model.
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        if is_adalora_dir(dir) {
            let adalora = AdaloraAdapter::load_standalone(dir, &device)?;
            let lora = adalora.to_lora()?;
            let mut pruned = Vec::new();
            for (name, m) in &adalora.modules {
                if !lora.modules.contains_key(name) {
                    pruned.push((name.clone(), m.b.dim(0)?, m.a.dim(1)?));
                }
            }
            return Ok(AdapterUpdates {
                method: "AdaLoRA",
                notes: vec![
                    "AdaLoRA: ΔW = s·B·diag(E)·A over the triplets its rank_pattern keeps".into(),
                ],
                modules: factored_modules(&lora)?,
                pruned,
            });
        }
        let lora = LoraAdapter::load_standalone(dir, &device)?;
        let (method, notes) = match lora.config.variant {
            LoraVariant::Lora => ("LoRA", vec![]),
            LoraVariant::Dora => (
                "DoRA",
                vec!["DoRA: the spectrum is of s·B·A; the magnitude vector's per-row rescaling of W + s·B·A needs the base weight and is not included".into()],
            ),
        };
        Ok(AdapterUpdates {
            method,
            notes,
            modules: factored_modules(&lora)?,
            pruned: Vec::new(),
        })
    }

    /// The SVD of every module's ΔW.
    pub fn spectra(&self) -> BTreeMap<String, LowRankSvd> {
        self.modules
            .iter()
            .map(|(name, f)| (name.clone(), f.svd()))
            .collect()
    }

    /// Every module's statistics, in model order, from `spectra` (as [`Self::spectra`] gives).
    pub fn module_spectra(&self, spectra: &BTreeMap<String, LowRankSvd>) -> Vec<ModuleSpectrum> {
        let mut out: Vec<ModuleSpectrum> =
            self.modules
                .iter()
                .map(|(name, f)| {
                    let sigma = spectra
                        .get(name)
                        .map(|s| s.singular_values.clone())
                        .unwrap_or_default();
                    // The exact ‖ΔW‖²_F from the factors, not Σσ², so the two can be cross-checked.
                    let energy = f.frobenius_norm().powi(2);
                    module_spectrum(
                        name,
                        (f.out_features(), f.in_features()),
                        Some(f.rank()),
                        sigma,
                        energy,
                        true,
                    )
                })
                .chain(self.pruned.iter().map(|(name, d, k)| {
                    module_spectrum(name, (*d, *k), Some(0), vec![], 0.0, true)
                }))
                .collect();
        out.sort_by_key(|m| model_order_key(&m.module));
        out
    }
}

fn factored_modules(adapter: &LoraAdapter) -> Result<BTreeMap<String, Factored>> {
    adapter
        .modules
        .iter()
        .map(|(name, m)| Ok((name.clone(), Factored::from_module(m)?)))
        .collect()
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
    fn fixture_spectra_match_the_dense_update() {
        for name in [
            "adapters/llama-untied__all-linear",
            "adapters/llama-tied__dora",
        ] {
            let updates = AdapterUpdates::load(&fixture(name)).unwrap();
            let spectra = updates.spectra();
            let modules = updates.module_spectra(&spectra);
            assert_eq!(modules.len(), updates.modules.len());
            for m in &modules {
                let dense = updates.modules[&m.module].to_dense();
                let mut expected: Vec<f64> = dense.singular_values().iter().copied().collect();
                expected.sort_by(|a, b| b.total_cmp(a));
                let rank = m.stored_rank.unwrap();
                assert_eq!(m.singular_values.len(), rank);
                for (got, want) in m.singular_values.iter().zip(&expected) {
                    assert!((got - want).abs() < 1e-10 * expected[0], "{}", m.module);
                }
                assert!((m.frobenius_norm - dense.norm()).abs() < 1e-10 * dense.norm());
                assert!((m.cumulative_energy[rank - 1] - 1.0).abs() < 1e-10);
            }
        }
        // rank_pattern: layer 1's down_proj has r = 6, q_proj r = 2, the rest r = 4.
        let updates = AdapterUpdates::load(&fixture("adapters/llama-untied__all-linear")).unwrap();
        assert_eq!(updates.modules["model.layers.1.mlp.down_proj"].rank(), 6);
        assert_eq!(updates.modules["model.layers.0.self_attn.q_proj"].rank(), 2);
        let dora = AdapterUpdates::load(&fixture("adapters/llama-tied__dora")).unwrap();
        assert_eq!(dora.method, "DoRA");
        assert!(dora.notes[0].contains("magnitude"));
    }

    #[test]
    fn adalora_updates_are_b_diag_e_a() {
        let dir = fixture("adalora/trained");
        let updates = AdapterUpdates::load(&dir).unwrap();
        assert_eq!(updates.method, "AdaLoRA");
        let adalora = AdaloraAdapter::load_standalone(&dir, &Device::Cpu).unwrap();
        let scale = adalora.config.scale();
        for (name, f) in &updates.modules {
            let m = adalora.modules[name]
                .cut(&adalora.config.mask_for(name))
                .unwrap();
            let b = crate::factored::matrix_from_tensor(&m.b).unwrap();
            let a = crate::factored::matrix_from_tensor(&m.a).unwrap();
            let e = crate::factored::matrix_from_tensor(&m.e).unwrap();
            let expected = b * nalgebra::DMatrix::from_diagonal(&e.column(0)) * a * scale;
            assert!(
                (f.to_dense() - &expected).abs().max() < 1e-6 * expected.abs().max().max(1e-30)
            );
        }
        let spectra = updates.spectra();
        let modules = updates.module_spectra(&spectra);
        assert_eq!(modules.len(), adalora.modules.len());
    }
}
