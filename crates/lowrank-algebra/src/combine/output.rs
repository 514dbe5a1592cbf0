//! The combined adapter in PEFT's format. Every module's factors already carry the whole
//! update (scale folded into B), so the config makes every scale exactly 1: `lora_alpha` = `r`
//! with plain (not rsLoRA) scaling, and modules of another rank get `rank_pattern` and
//! `alpha_pattern` entries of that rank under their full name. Targets are the full module
//! names, so the file selects exactly the modules it has tensors for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use lowrank_core::lora::{LoraAdapter, LoraConfig, LoraModule};
use lowrank_core::targets::ModuleSelector;

use crate::factored::tensor_from_matrix;
use crate::{Error, Factored, Result};

/// A plain LoRA adapter whose module `name` adds exactly `factors[name]` (b·a).
pub fn scale_one_adapter(
    factors: &BTreeMap<String, Factored>,
    base_model: Option<String>,
    device: &Device,
) -> Result<LoraAdapter> {
    let default_rank = most_common_rank(factors)?;
    let names: Vec<String> = factors.keys().cloned().collect();
    let mut config = LoraConfig::new(
        default_rank,
        default_rank as f64,
        ModuleSelector::Names(names),
    );
    config.base_model = base_model;
    let mut modules = BTreeMap::new();
    for (name, f) in factors {
        let rank = f.rank();
        if rank != default_rank {
            config.rank_pattern.push((name.clone(), rank));
            config.alpha_pattern.push((name.clone(), rank as f64));
        }
        let module = LoraModule {
            a: tensor_from_matrix(&f.a, device)?,
            b: tensor_from_matrix(&f.b, device)?,
            magnitude: None,
            scale: 1.0,
        };
        debug_assert_eq!(config.scale_for(name), 1.0);
        modules.insert(name.clone(), module);
    }
    Ok(LoraAdapter { config, modules })
}

/// The rank most modules have (the smaller on a tie), so `rank_pattern` stays short.
fn most_common_rank(factors: &BTreeMap<String, Factored>) -> Result<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for f in factors.values() {
        *counts.entry(f.rank()).or_default() += 1;
    }
    counts
        .iter()
        .max_by(|(r1, n1), (r2, n2)| n1.cmp(n2).then(r2.cmp(r1)))
        .map(|(rank, _)| *rank)
        .filter(|rank| *rank > 0)
        .ok_or_else(|| Error::Invalid("the combined adapter has no module of rank ≥ 1".into()))
}

/// Writes `adapter` to the new folder `out` (or an existing empty one) through a staging folder
/// beside it, so a failed write leaves nothing behind.
pub fn save_to_new_dir(adapter: &LoraAdapter, out: &Path) -> Result<()> {
    let io = |path: &Path, e| Error::Core(lowrank_core::Error::io(path, e));
    if out.exists() {
        let empty_dir = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| io(out, e))?
                .next()
                .is_none();
        if !empty_dir {
            return Err(Error::Invalid(format!(
                "{}: already exists and is not an empty folder; choose a new output folder",
                out.display()
            )));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let staging = lowrank_core::files::staging_dir(&parent, ".lowrank-combine-")?;
    adapter.save(staging.path())?;
    if out.exists() {
        for entry in std::fs::read_dir(staging.path()).map_err(|e| io(staging.path(), e))? {
            let entry = entry.map_err(|e| io(staging.path(), e))?;
            let dest = out.join(entry.file_name());
            std::fs::rename(entry.path(), &dest).map_err(|e| io(&dest, e))?;
        }
    } else {
        std::fs::rename(staging.keep(), out).map_err(|e| io(out, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    fn factors(rank: usize, fill: f64) -> Factored {
        Factored::new(
            DMatrix::from_element(3, rank, fill),
            DMatrix::from_element(rank, 2, 1.0),
        )
        .unwrap()
    }

    #[test]
    fn modules_of_other_ranks_get_patterns_and_every_scale_is_one() {
        let mut all = BTreeMap::new();
        all.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            factors(2, 0.5),
        );
        all.insert(
            "model.layers.1.self_attn.q_proj".to_string(),
            factors(2, 1.0),
        );
        all.insert(
            "model.layers.11.self_attn.q_proj".to_string(),
            factors(5, 2.0),
        );
        let adapter = scale_one_adapter(&all, Some("base".into()), &Device::Cpu).unwrap();
        let config = &adapter.config;
        assert_eq!(
            (config.rank, config.alpha, config.use_rslora),
            (2, 2.0, false)
        );
        assert_eq!(
            config.rank_pattern,
            vec![("model.layers.11.self_attn.q_proj".to_string(), 5)]
        );
        for name in all.keys() {
            assert!(config.targets_module(name));
            assert_eq!(config.scale_for(name), 1.0);
        }
        // The full-name pattern of layer 11 does not leak onto layer 1.
        assert_eq!(config.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(config.rank_for("model.layers.11.self_attn.q_proj"), 5);
        assert!(!config.targets_module("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn saved_adapters_load_back_and_occupied_folders_are_refused() {
        let mut all = BTreeMap::new();
        all.insert("model.layers.0.mlp.up_proj".to_string(), factors(1, 0.25));
        all.insert("model.layers.0.mlp.down_proj".to_string(), factors(3, 0.5));
        let adapter = scale_one_adapter(&all, None, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("nested/combined");
        save_to_new_dir(&adapter, &out).unwrap();
        let back = LoraAdapter::load_standalone(&out, &Device::Cpu).unwrap();
        for (name, f) in &all {
            let got = Factored::from_module(&back.modules[name]).unwrap();
            assert_eq!(got.to_dense(), f.to_dense(), "{name}");
        }
        let err = save_to_new_dir(&adapter, &out).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        // Only the output folder is left: no staging folder beside it.
        let siblings: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
        assert_eq!(siblings.len(), 1);
        // An existing empty folder is filled.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        save_to_new_dir(&adapter, &empty).unwrap();
        assert!(empty.join("adapter_config.json").exists());
    }
}
