//! The LoRA / DoRA adapter configuration, read from and written to PEFT's `adapter_config.json`.
//!
//! `LoraConfigFile` is the serde wire type (PEFT's field names, unknown fields kept so a file we
//! rewrite loses nothing); `LoraConfig` is the validated form the rest of the code uses.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::peft_config::{check_alpha, check_shared, number, peft_config_file};
use crate::targets::{layer_index, pattern_value, ModuleSelector};

/// How the adapter's output is combined with the base layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraVariant {
    /// y = W·x + b + s·B(A·x)
    Lora,
    /// y = (m / ‖W + s·BA‖_row)·(W·x + s·B(A·x)) + b
    Dora,
}

peft_config_file! {
    /// PEFT's `adapter_config.json` for `peft_type` "LORA", field for field.
    pub struct LoraConfigFile {
        after_base_model {
            #[serde(default = "default_rank")]
            pub r: usize,
        }
        after_lora_dropout {
            #[serde(default)]
            pub use_rslora: bool,
            #[serde(default)]
            pub use_dora: bool,
        }
        after_exclude_modules {
            #[serde(default)]
            pub rank_pattern: Map<String, Value>,
            #[serde(default)]
            pub alpha_pattern: Map<String, Value>,
        }
        after_fan_in_fan_out {}
        /// Every other PEFT field, kept as it was.
        other,
    }
}

fn default_rank() -> usize {
    8
}

/// A validated LoRA/DoRA configuration.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub variant: LoraVariant,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dropout: f64,
    pub targets: ModuleSelector,
    pub exclude: Option<ModuleSelector>,
    /// (pattern, rank) in file order: PEFT takes the first pattern that matches.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub base_model: Option<String>,
    /// Fields we do not interpret, written back unchanged.
    other: Map<String, Value>,
}

impl LoraConfig {
    /// A plain LoRA config over `targets`, as `lowrank train` creates it.
    pub fn new(rank: usize, alpha: f64, targets: ModuleSelector) -> Self {
        LoraConfig {
            variant: LoraVariant::Lora,
            rank,
            alpha,
            use_rslora: false,
            dropout: 0.0,
            targets,
            exclude: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            layers_to_transform: None,
            layers_pattern: vec![],
            base_model: None,
            other: Map::new(),
        }
    }

    /// Reads and validates `adapter_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let file: LoraConfigFile = crate::files::read_json(path)?;
        Self::from_file(file, path)
    }

    pub fn from_file(file: LoraConfigFile, path: &Path) -> Result<Self> {
        let bad = |field: &str, msg: String| Error::field(path, field, msg);
        if file.peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                format!(
                    "expected \"LORA\", found {:?} (other PEFT methods are not supported here)",
                    file.peft_type
                ),
            ));
        }
        if file.r == 0 {
            return Err(bad("r", "the rank must be at least 1".into()));
        }
        let matching = check_shared(file.shared(), path)?;
        let rank_pattern = file
            .rank_pattern
            .iter()
            .map(|(k, v)| match v.as_u64() {
                Some(r) if r > 0 => Ok((k.clone(), r as usize)),
                _ => Err(bad(
                    "rank_pattern",
                    format!("{k:?}: expected a positive integer rank, found {v}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = file
            .alpha_pattern
            .iter()
            .map(|(k, v)| match v.as_f64() {
                Some(a) => check_alpha(a)
                    .map(|()| (k.clone(), a))
                    .map_err(|m| bad("alpha_pattern", format!("{k:?}: {m}"))),
                None => Err(bad(
                    "alpha_pattern",
                    format!("{k:?}: expected a number, found {v}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        for (key, _) in file.rank_pattern.iter().chain(file.alpha_pattern.iter()) {
            regex::Regex::new(key)
                .map_err(|e| bad("rank_pattern/alpha_pattern", format!("{key:?}: {e}")))?;
        }
        Ok(LoraConfig {
            variant: if file.use_dora {
                LoraVariant::Dora
            } else {
                LoraVariant::Lora
            },
            rank: file.r,
            alpha: file.lora_alpha,
            use_rslora: file.use_rslora,
            dropout: file.lora_dropout,
            targets: matching.targets,
            exclude: matching.exclude,
            rank_pattern,
            alpha_pattern,
            layers_to_transform: matching.layers_to_transform,
            layers_pattern: matching.layers_pattern,
            base_model: file.base_model_name_or_path,
            other: file.other,
        })
    }

    /// The wire form PEFT's `LoraConfig.from_pretrained` reads.
    pub fn to_file(&self) -> LoraConfigFile {
        LoraConfigFile {
            r: self.rank,
            use_rslora: self.use_rslora,
            use_dora: self.variant == LoraVariant::Dora,
            rank_pattern: self
                .rank_pattern
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
            alpha_pattern: self
                .alpha_pattern
                .iter()
                .map(|(k, v)| (k.clone(), number(*v)))
                .collect(),
            ..LoraConfigFile::with_shared("LORA", self, &self.other, &[])
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_json(path, &self.to_file())
    }

    /// Whether the adapter applies to the module `key`, as PEFT's `check_target_module_exists`.
    pub fn targets_module(&self, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.selects(key)) {
            return false;
        }
        if !self.targets.selects(key) {
            return false;
        }
        // PEFT applies the layer filter only to list targets that are not an exact module name.
        let exact = matches!(&self.targets, ModuleSelector::Names(n) if n.iter().any(|n| n == key));
        match (&self.targets, &self.layers_to_transform) {
            (ModuleSelector::Names(_), Some(layers)) if !exact && !layers.is_empty() => {
                layer_index(key, &self.layers_pattern).is_some_and(|i| layers.contains(&i))
            }
            _ => true,
        }
    }

    /// The rank of module `key` (`rank_pattern` first).
    pub fn rank_for(&self, key: &str) -> usize {
        pattern_value(&self.rank_pattern, key)
            .copied()
            .unwrap_or(self.rank)
    }

    /// The α of module `key` (`alpha_pattern` first).
    pub fn alpha_for(&self, key: &str) -> f64 {
        pattern_value(&self.alpha_pattern, key)
            .copied()
            .unwrap_or(self.alpha)
    }

    /// The scale s of module `key`: α/r, or α/√r with rsLoRA.
    pub fn scale_for(&self, key: &str) -> f64 {
        let r = self.rank_for(key) as f64;
        let alpha = self.alpha_for(key);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LoraConfig> {
        let file: LoraConfigFile = serde_json::from_str(json).unwrap();
        LoraConfig::from_file(file, Path::new("adapter_config.json"))
    }

    #[test]
    fn reads_peft_fields_and_patterns() {
        let c = parse(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":16,"use_rslora":true,
                "target_modules":["q_proj","v_proj","down_proj"],
                "rank_pattern":{"q_proj":2,"model.layers.1.mlp.down_proj":6},
                "alpha_pattern":{"v_proj":3},"some_future_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj"), 6);
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 4);
        assert!((c.scale_for("model.layers.0.self_attn.v_proj") - 3.0 / 2.0).abs() < 1e-12);
        assert!(
            (c.scale_for("model.layers.0.self_attn.q_proj") - 16.0 / 2f64.sqrt()).abs() < 1e-12
        );
        assert!(c.targets_module("model.layers.0.self_attn.v_proj"));
        assert!(!c.targets_module("model.layers.0.self_attn.k_proj"));
        // Unknown fields survive a rewrite.
        let back = serde_json::to_value(c.to_file()).unwrap();
        assert_eq!(back["some_future_field"]["x"], 1);
        assert_eq!(back["rank_pattern"]["model.layers.1.mlp.down_proj"], 6);
    }

    #[test]
    fn plain_lora_scale_is_alpha_over_r() {
        let c = parse(r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj"]}"#)
            .unwrap();
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.variant, LoraVariant::Lora);
    }

    #[test]
    fn layers_to_transform_filters_list_targets() {
        let c = parse(
            r#"{"peft_type":"LORA","r":4,"target_modules":["q_proj"],"layers_to_transform":[1]}"#,
        )
        .unwrap();
        assert!(!c.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(c.targets_module("model.layers.1.self_attn.q_proj"));
        let one =
            parse(r#"{"peft_type":"LORA","target_modules":["q_proj"],"layers_to_transform":0}"#)
                .unwrap();
        assert!(one.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(!one.targets_module("model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn exclude_modules_win() {
        let c = parse(
            r#"{"peft_type":"LORA","target_modules":["q_proj","v_proj"],"exclude_modules":["layers.0.self_attn.v_proj"]}"#,
        )
        .unwrap();
        assert!(!c.targets_module("model.layers.0.self_attn.v_proj"));
        assert!(c.targets_module("model.layers.1.self_attn.v_proj"));
        let re = parse(r#"{"peft_type":"LORA","target_modules":["q_proj"],"exclude_modules":".*layers\\.1\\..*"}"#).unwrap();
        assert!(!re.targets_module("model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn unsupported_options_are_named() {
        let cases = [
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"bias":"all"}"#,
                "`bias`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#,
                "`modules_to_save`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"fan_in_fan_out":true}"#,
                "`fan_in_fan_out`",
            ),
            (
                r#"{"peft_type":"IA3","target_modules":["q_proj"]}"#,
                "`peft_type`",
            ),
            (r#"{"peft_type":"LORA"}"#, "`target_modules`"),
            (
                r#"{"peft_type":"LORA","target_modules":"("}"#,
                "`target_modules`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"r":0}"#,
                "`r`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"rank_pattern":{"q_proj":"x"}}"#,
                "`rank_pattern`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"layer_replication":[[0,1]]}"#,
                "`layer_replication`",
            ),
            (
                r#"{"peft_type":"LORA","target_modules":["q_proj"],"lora_bias":true}"#,
                "`lora_bias`",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("adapter_config.json"),
                "{json}: {err}"
            );
        }
        // Unset optional features are fine.
        parse(r#"{"peft_type":"LORA","target_modules":["q_proj"],"layer_replication":null,"lora_bias":false,"target_parameters":[]}"#)
            .unwrap();
    }

    #[test]
    fn all_linear_string_expands_to_decoder_linears() {
        let c = parse(r#"{"peft_type":"LORA","target_modules":"all-linear"}"#).unwrap();
        assert!(c.targets_module("model.layers.1.mlp.gate_proj"));
        assert!(!c.targets_module("lm_head"));
    }
}
