//! PEFT's `AdaLoraConfig` (`peft_type` "ADALORA") as read from and written to
//! `adapter_config.json`.
//!
//! `AdaloraConfigFile` is the wire type (PEFT's field names, unknown fields kept);
//! `AdaloraConfig` is the validated form. Module matching (`target_modules`,
//! `exclude_modules`, `layers_to_transform`) is LoRA's, through [`AdaloraConfig::lora_view`].

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::peft_config::{check_shared, peft_config_file};
use crate::targets::ModuleSelector;

/// The `rank_pattern` key PEFT writes for a module: `<module>.lora_E`.
pub fn rank_pattern_key(module: &str) -> String {
    format!("{module}.lora_E")
}

peft_config_file! {
    /// PEFT's `adapter_config.json` for `peft_type` "ADALORA", field for field.
    pub struct AdaloraConfigFile {
        after_base_model {
            #[serde(default = "default_init_r")]
            pub init_r: usize,
            #[serde(default = "default_target_r")]
            pub target_r: usize,
            #[serde(default)]
            pub tinit: usize,
            #[serde(default)]
            pub tfinal: usize,
            #[serde(rename = "deltaT", default = "one")]
            pub delta_t: usize,
            #[serde(default = "default_beta")]
            pub beta1: f64,
            #[serde(default = "default_beta")]
            pub beta2: f64,
            #[serde(default = "default_orth")]
            pub orth_reg_weight: f64,
            #[serde(default)]
            pub total_step: Option<usize>,
            /// `<module>.lora_E` → one bool per initial triplet (kept or masked); `null` before
            /// any masking.
            #[serde(default)]
            pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
        }
        after_lora_dropout {}
        after_exclude_modules {}
        after_fan_in_fan_out {
            #[serde(default)]
            pub use_dora: bool,
        }
        /// Every other PEFT field (`r`, `inference_mode`, ...), kept as it was.
        other,
    }
}

fn default_init_r() -> usize {
    12
}
fn default_target_r() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth() -> f64 {
    0.5
}

/// The budget schedule's hyperparameters (PEFT's `AdaLoraConfig` fields of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaloraSchedule {
    pub init_r: usize,
    pub target_r: usize,
    pub tinit: usize,
    pub tfinal: usize,
    pub delta_t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub orth_reg_weight: f64,
    pub total_step: Option<usize>,
}

impl Default for AdaloraSchedule {
    /// PEFT's defaults.
    fn default() -> Self {
        AdaloraSchedule {
            init_r: 12,
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
        }
    }
}

/// A validated AdaLoRA configuration.
#[derive(Debug, Clone)]
pub struct AdaloraConfig {
    pub schedule: AdaloraSchedule,
    /// `lora_alpha`; the scale is α/(ranknum + 1e-5), ranknum = `init_r`.
    pub alpha: f64,
    pub dropout: f64,
    pub targets: ModuleSelector,
    pub exclude: Option<ModuleSelector>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub base_model: Option<String>,
    /// Module name → kept triplets (PEFT's keys without `.lora_E`); `None` = nothing masked.
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    other: Map<String, Value>,
}

impl AdaloraConfig {
    /// A fresh config over `targets`, as `lowrank train --method adalora` creates it.
    pub fn new(schedule: AdaloraSchedule, alpha: f64, targets: ModuleSelector) -> Self {
        AdaloraConfig {
            schedule,
            alpha,
            dropout: 0.0,
            targets,
            exclude: None,
            layers_to_transform: None,
            layers_pattern: vec![],
            base_model: None,
            rank_pattern: None,
            other: Map::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let file: AdaloraConfigFile = crate::files::read_json(path)?;
        Self::from_file(file, path)
    }

    pub fn from_file(file: AdaloraConfigFile, path: &Path) -> Result<Self> {
        let bad = |field: &str, msg: String| Error::field(path, field, msg);
        if file.peft_type != "ADALORA" {
            return Err(bad(
                "peft_type",
                format!("expected \"ADALORA\", found {:?}", file.peft_type),
            ));
        }
        if file.init_r == 0 {
            return Err(bad("init_r", "the initial rank must be at least 1".into()));
        }
        if file.delta_t == 0 {
            return Err(bad("deltaT", "must be at least 1".into()));
        }
        for (field, b) in [("beta1", file.beta1), ("beta2", file.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(bad(field, format!("must be in (0, 1), found {b}")));
            }
        }
        if file.orth_reg_weight.is_nan() || file.orth_reg_weight < 0.0 {
            return Err(bad(
                "orth_reg_weight",
                format!("must be ≥ 0, found {}", file.orth_reg_weight),
            ));
        }
        if file.use_dora {
            return Err(bad("use_dora", "AdaLoRA does not support DoRA".into()));
        }
        let matching = check_shared(file.shared(), path)?;
        let rank_pattern = match file.rank_pattern {
            None => None,
            Some(map) => {
                let mut out = BTreeMap::new();
                for (key, mask) in map {
                    // PEFT strips the adapter name on save; a file written mid-training by
                    // other tools may still carry `.default`.
                    let module = key
                        .strip_suffix(".lora_E")
                        .or_else(|| key.strip_suffix(".lora_E.default"))
                        .ok_or_else(|| {
                            bad(
                                "rank_pattern",
                                format!("{key:?}: expected a key `<module>.lora_E`"),
                            )
                        })?;
                    if mask.len() != file.init_r {
                        return Err(bad(
                            "rank_pattern",
                            format!(
                                "{key:?}: {} entries, expected init_r = {}",
                                mask.len(),
                                file.init_r
                            ),
                        ));
                    }
                    out.insert(module.to_string(), mask);
                }
                Some(out)
            }
        };
        Ok(AdaloraConfig {
            schedule: AdaloraSchedule {
                init_r: file.init_r,
                target_r: file.target_r,
                tinit: file.tinit,
                tfinal: file.tfinal,
                delta_t: file.delta_t,
                beta1: file.beta1,
                beta2: file.beta2,
                orth_reg_weight: file.orth_reg_weight,
                total_step: file.total_step,
            },
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            targets: matching.targets,
            exclude: matching.exclude,
            layers_to_transform: matching.layers_to_transform,
            layers_pattern: matching.layers_pattern,
            base_model: file.base_model_name_or_path,
            rank_pattern,
            other: file.other,
        })
    }

    /// The wire form PEFT's `AdaLoraConfig.from_pretrained` reads.
    pub fn to_file(&self) -> AdaloraConfigFile {
        let s = &self.schedule;
        AdaloraConfigFile {
            init_r: s.init_r,
            target_r: s.target_r,
            tinit: s.tinit,
            tfinal: s.tfinal,
            delta_t: s.delta_t,
            beta1: s.beta1,
            beta2: s.beta2,
            orth_reg_weight: s.orth_reg_weight,
            total_step: s.total_step,
            rank_pattern: self.rank_pattern.as_ref().map(|rp| {
                rp.iter()
                    .map(|(m, mask)| (rank_pattern_key(m), mask.clone()))
                    .collect()
            }),
            use_dora: false,
            // PEFT writes LoraConfig's `r` (8) in AdaLoRA files too, though AdaLoRA does not use it.
            ..AdaloraConfigFile::with_shared(
                "ADALORA",
                &self.lora_view(),
                &self.other,
                &[("r", Value::from(8))],
            )
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_json(path, &self.to_file())
    }

    /// A LoRA config with the same module matching (and α, dropout), for target checks.
    pub fn lora_view(&self) -> LoraConfig {
        let mut c = LoraConfig::new(self.schedule.init_r, self.alpha, self.targets.clone());
        c.exclude = self.exclude.clone();
        c.layers_to_transform = self.layers_to_transform.clone();
        c.layers_pattern = self.layers_pattern.clone();
        c.dropout = self.dropout;
        c.base_model = self.base_model.clone();
        c
    }

    /// Whether the adapter applies to module `key` (PEFT's `check_target_module_exists`).
    pub fn targets_module(&self, key: &str) -> bool {
        self.lora_view().targets_module(key)
    }

    /// PEFT's scale: `scaling / (ranknum + 1e-5)` with `scaling` = α (or `init_r` when α ≤ 0)
    /// and `ranknum` the initial rank, kept when the module is cut to its pattern.
    pub fn scale(&self) -> f64 {
        let r = self.schedule.init_r as f64;
        let scaling = if self.alpha > 0.0 { self.alpha } else { r };
        scaling / (r + 1e-5)
    }

    /// The mask of module `name` (all kept when the pattern does not name it).
    pub fn mask_for(&self, name: &str) -> Vec<bool> {
        self.rank_pattern
            .as_ref()
            .and_then(|rp| rp.get(name).cloned())
            .unwrap_or_else(|| vec![true; self.schedule.init_r])
    }

    /// The kept rank of module `name`. Counted without building the mask: `init_r` comes from
    /// the file and is checked against the tensors only after this.
    pub fn rank_for(&self, name: &str) -> usize {
        match self.rank_pattern.as_ref().and_then(|rp| rp.get(name)) {
            Some(mask) => mask.iter().filter(|k| **k).count(),
            None => self.schedule.init_r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AdaloraConfig> {
        let file: AdaloraConfigFile = serde_json::from_str(json).unwrap();
        AdaloraConfig::from_file(file, Path::new("adapter_config.json"))
    }

    #[test]
    fn reads_and_writes_peft_fields() {
        let c = parse(
            r#"{"peft_type":"ADALORA","init_r":4,"target_r":2,"tinit":2,"tfinal":3,"deltaT":2,
                "total_step":9,"beta1":0.8,"beta2":0.9,"orth_reg_weight":0.1,"lora_alpha":8,"r":8,
                "target_modules":["q_proj","v_proj"],
                "rank_pattern":{"model.layers.0.self_attn.q_proj.lora_E":[true,false,true,false]},
                "some_future_field":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.schedule.init_r, 4);
        assert_eq!(c.schedule.delta_t, 2);
        assert_eq!(c.schedule.total_step, Some(9));
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.v_proj"), 4);
        assert!(c.targets_module("model.layers.1.self_attn.v_proj"));
        assert!(!c.targets_module("model.layers.1.self_attn.k_proj"));
        assert!((c.scale() - 8.0 / 4.00001).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        c.save(&path).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["peft_type"], "ADALORA");
        assert_eq!(v["deltaT"], 2);
        assert_eq!(v["lora_alpha"], 8);
        assert_eq!(v["some_future_field"][0], 1);
        assert_eq!(
            v["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"],
            serde_json::json!([true, false, true, false])
        );
        let back = AdaloraConfig::load(&path).unwrap();
        assert_eq!(back.schedule, c.schedule);
        assert_eq!(back.rank_pattern, c.rank_pattern);
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        let base = r#""peft_type":"ADALORA","init_r":4,"target_modules":["q_proj"]"#;
        for (extra, field) in [
            (r#""use_dora":true"#, "use_dora"),
            (r#""beta1":1.0"#, "beta1"),
            (r#""deltaT":0"#, "deltaT"),
            (r#""orth_reg_weight":-1"#, "orth_reg_weight"),
            (
                r#""rank_pattern":{"model.layers.0.self_attn.q_proj.lora_E":[true]}"#,
                "rank_pattern",
            ),
        ] {
            let err = parse(&format!("{{{base},{extra}}}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
        let err = parse(r#"{"peft_type":"LORA","target_modules":["q_proj"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ADALORA"), "{err}");
    }
}
