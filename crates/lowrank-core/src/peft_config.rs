//! The `adapter_config.json` fields every LoRA-family method shares (LoRA/DoRA and AdaLoRA),
//! declared once: [`peft_config_file!`] writes a method's wire struct with them, and
//! [`check_shared`] validates them the same way for every method.
//!
//! The wire structs list every field rather than flattening a shared struct, because serde
//! cannot name a field inside a flattened struct in its errors, and errors must name the field.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::targets::{ModuleSelector, ModuleSelectorWire};

/// What `all-linear` expands to: every linear in the decoder layers of every supported family
/// (Phi-3's fused `qkv_proj` and `gate_up_proj` included); the output head is excluded, as
/// PEFT does.
pub const ALL_LINEAR: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LayersWire {
    One(usize),
    Many(Vec<usize>),
}

/// Declares the wire struct of one PEFT method's `adapter_config.json`: the shared fields,
/// with the method's own fields in four places so each file keeps the key order it has always
/// been written in. Generates `shared()` (the shared fields, for [`check_shared`]) and
/// `with_shared()` (a file from a config's shared values, the method's own fields at their
/// `Default`, to be filled with struct update syntax).
macro_rules! peft_config_file {
    (
        $(#[$doc:meta])*
        pub struct $name:ident {
            after_base_model { $($(#[$a_meta:meta])* pub $a:ident: $a_ty:ty,)* }
            after_lora_dropout { $($(#[$b_meta:meta])* pub $b:ident: $b_ty:ty,)* }
            after_exclude_modules { $($(#[$c_meta:meta])* pub $c:ident: $c_ty:ty,)* }
            after_fan_in_fan_out { $($(#[$d_meta:meta])* pub $d:ident: $d_ty:ty,)* }
            $(#[$other_doc:meta])*
            other,
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            pub peft_type: String,
            #[serde(default)]
            pub task_type: Option<String>,
            #[serde(default)]
            pub base_model_name_or_path: Option<String>,
            $($(#[$a_meta])* pub $a: $a_ty,)*
            #[serde(
                default = "crate::peft_config::default_alpha",
                serialize_with = "crate::peft_config::whole_as_integer"
            )]
            pub lora_alpha: f64,
            #[serde(default)]
            pub lora_dropout: f64,
            $($(#[$b_meta])* pub $b: $b_ty,)*
            #[serde(default)]
            pub target_modules: Option<$crate::targets::ModuleSelectorWire>,
            #[serde(default)]
            pub exclude_modules: Option<$crate::targets::ModuleSelectorWire>,
            $($(#[$c_meta])* pub $c: $c_ty,)*
            #[serde(default)]
            pub layers_to_transform: Option<$crate::peft_config::LayersWire>,
            #[serde(default)]
            pub layers_pattern: Option<$crate::targets::ModuleSelectorWire>,
            #[serde(default = "crate::peft_config::default_bias")]
            pub bias: String,
            #[serde(default)]
            pub fan_in_fan_out: bool,
            $($(#[$d_meta])* pub $d: $d_ty,)*
            #[serde(default)]
            pub modules_to_save: Option<Vec<String>>,
            $(#[$other_doc])*
            #[serde(flatten)]
            pub other: serde_json::Map<String, serde_json::Value>,
        }

        impl $name {
            /// The fields every LoRA-family method shares, for `check_shared`.
            pub(crate) fn shared(&self) -> $crate::peft_config::SharedFields<'_> {
                $crate::peft_config::SharedFields {
                    lora_alpha: self.lora_alpha,
                    lora_dropout: self.lora_dropout,
                    target_modules: self.target_modules.as_ref(),
                    exclude_modules: self.exclude_modules.as_ref(),
                    layers_to_transform: self.layers_to_transform.as_ref(),
                    layers_pattern: self.layers_pattern.as_ref(),
                    bias: &self.bias,
                    fan_in_fan_out: self.fan_in_fan_out,
                    modules_to_save: self.modules_to_save.as_deref(),
                    other: &self.other,
                }
            }

            /// A `peft_type` file with `config`'s module matching, α, dropout and base model,
            /// and `other` completed with PEFT's defaults (`with_peft_defaults`); the method's
            /// own fields are left at their `Default`.
            fn with_shared(
                peft_type: &str,
                config: &$crate::lora::LoraConfig,
                other: &serde_json::Map<String, serde_json::Value>,
                method_defaults: &[(&str, serde_json::Value)],
            ) -> Self {
                $name {
                    peft_type: peft_type.into(),
                    task_type: Some("CAUSAL_LM".into()),
                    base_model_name_or_path: config.base_model.clone(),
                    lora_alpha: config.alpha,
                    lora_dropout: config.dropout,
                    target_modules: Some(config.targets.to_wire()),
                    exclude_modules: config.exclude.as_ref().map($crate::targets::ModuleSelector::to_wire),
                    layers_to_transform: config
                        .layers_to_transform
                        .clone()
                        .map($crate::peft_config::LayersWire::Many),
                    layers_pattern: (!config.layers_pattern.is_empty()).then(|| {
                        $crate::targets::ModuleSelectorWire::Names(config.layers_pattern.clone())
                    }),
                    bias: "none".into(),
                    fan_in_fan_out: false,
                    modules_to_save: None,
                    other: $crate::peft_config::with_peft_defaults(other, method_defaults),
                    $($a: Default::default(),)*
                    $($b: Default::default(),)*
                    $($c: Default::default(),)*
                    $($d: Default::default(),)*
                }
            }
        }
    };
}
pub(crate) use peft_config_file;

/// `other` with PEFT's values for the fields it writes that lowrank does not read, where the
/// config does not have them: `inference_mode`, `init_lora_weights`, the method's own
/// (`method_defaults`), then `revision`, the order our files have always had.
pub(crate) fn with_peft_defaults(
    other: &Map<String, Value>,
    method_defaults: &[(&str, Value)],
) -> Map<String, Value> {
    let mut other = other.clone();
    let defaults = [
        ("inference_mode", Value::Bool(true)),
        ("init_lora_weights", Value::Bool(true)),
    ]
    .into_iter()
    .chain(method_defaults.iter().cloned())
    .chain([("revision", Value::Null)]);
    for (field, value) in defaults {
        other.entry(field).or_insert(value);
    }
    other
}

/// PEFT declares α an int: write 16 rather than 16.0 when it is whole.
pub(crate) fn whole_as_integer<S: serde::Serializer>(
    v: &f64,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    number(*v).serialize(s)
}

/// A JSON number, an integer when `v` is whole (as Python writes an int).
pub(crate) fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 2f64.powi(53) {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

pub(crate) fn default_alpha() -> f64 {
    8.0
}

pub(crate) fn default_bias() -> String {
    "none".into()
}

/// The shared fields of a method's wire struct, borrowed.
pub(crate) struct SharedFields<'a> {
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Option<&'a ModuleSelectorWire>,
    pub exclude_modules: Option<&'a ModuleSelectorWire>,
    pub layers_to_transform: Option<&'a LayersWire>,
    pub layers_pattern: Option<&'a ModuleSelectorWire>,
    pub bias: &'a str,
    pub fan_in_fan_out: bool,
    pub modules_to_save: Option<&'a [String]>,
    pub other: &'a Map<String, Value>,
}

/// Which modules an adapter applies to, as validated from the shared fields.
pub(crate) struct Matching {
    pub targets: ModuleSelector,
    pub exclude: Option<ModuleSelector>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
}

/// PEFT fields that change the adapter's math in ways lowrank does not implement yet: a
/// non-empty value is rejected rather than silently ignored.
const UNSUPPORTED_WHEN_SET: &[&str] = &[
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "megatron_config",
];

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// α must be a number whose scale (α/r or α/√r, r ≥ 1, applied in f32) is finite: a larger one
/// turns every output of the adapted layers into ±inf or NaN. PEFT accepts any sign (and 0).
pub(crate) fn check_alpha(alpha: f64) -> std::result::Result<(), String> {
    if alpha.is_finite() && alpha.abs() <= f64::from(f32::MAX) {
        Ok(())
    } else {
        Err(format!(
            "{alpha:e} is out of range: the scale α/r is applied in f32, so |α| must be at most {:e}",
            f32::MAX
        ))
    }
}

/// Checks the shared fields the same way for every adapter kind, rejecting by name what
/// lowrank does not implement, and returns which modules the adapter applies to.
pub(crate) fn check_shared(f: SharedFields, path: &Path) -> Result<Matching> {
    let bad = |field: &str, msg: String| Error::field(path, field, msg);
    check_alpha(f.lora_alpha).map_err(|m| bad("lora_alpha", m))?;
    if f.bias != "none" {
        return Err(bad(
            "bias",
            format!("only \"none\" is supported, found {:?}", f.bias),
        ));
    }
    if f.fan_in_fan_out {
        return Err(bad(
            "fan_in_fan_out",
            "transposed (Conv1D) weights are not supported".into(),
        ));
    }
    if f.modules_to_save.is_some_and(|m| !m.is_empty()) {
        return Err(bad(
            "modules_to_save",
            "fully trained extra modules are not supported".into(),
        ));
    }
    if f.other.get("lora_bias").is_some_and(is_set) {
        return Err(bad("lora_bias", "adapter biases are not supported".into()));
    }
    if f.other.get("use_qalora").is_some_and(is_set) {
        return Err(bad("use_qalora", "QA-LoRA is not supported".into()));
    }
    for field in UNSUPPORTED_WHEN_SET {
        if f.other.get(*field).is_some_and(is_set) {
            return Err(bad(field, "this PEFT option is not supported".into()));
        }
    }
    if !(0.0..1.0).contains(&f.lora_dropout) {
        return Err(bad(
            "lora_dropout",
            format!("expected a value in [0, 1), found {}", f.lora_dropout),
        ));
    }
    let targets = match f.target_modules {
        None => {
            return Err(bad(
                "target_modules",
                "missing: name the modules the adapter applies to".into(),
            ))
        }
        Some(ModuleSelectorWire::Pattern(p)) if p == "all-linear" => {
            ModuleSelector::Names(ALL_LINEAR.iter().map(|s| s.to_string()).collect())
        }
        Some(w) => ModuleSelector::from_wire(w)
            .map_err(|e| bad("target_modules", format!("invalid regex: {e}")))?,
    };
    let exclude = f
        .exclude_modules
        .map(|w| {
            ModuleSelector::from_wire(w)
                .map_err(|e| bad("exclude_modules", format!("invalid regex: {e}")))
        })
        .transpose()?;
    let layers_to_transform = f.layers_to_transform.map(|l| match l {
        LayersWire::One(i) => vec![*i],
        LayersWire::Many(v) => v.clone(),
    });
    let layers_pattern = match f.layers_pattern {
        None => vec![],
        Some(ModuleSelectorWire::Pattern(p)) => vec![p.clone()],
        Some(ModuleSelectorWire::Names(v)) => v.clone(),
    };
    Ok(Matching {
        targets,
        exclude,
        layers_to_transform,
        layers_pattern,
    })
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use crate::adalora::AdaloraConfigFile;
    use crate::lora::LoraConfigFile;

    /// Every shared field of the wrong type is an error on that field, in each method's file.
    fn wrong_types_name_the_field<T: DeserializeOwned + std::fmt::Debug>(peft_type: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        for (field, value) in [
            ("task_type", "1"),
            ("lora_alpha", "\"16\""),
            ("lora_dropout", "[]"),
            ("target_modules", "1"),
            ("exclude_modules", "{}"),
            ("layers_to_transform", "\"0\""),
            ("layers_pattern", "2"),
            ("bias", "false"),
            ("fan_in_fan_out", "\"no\""),
            ("modules_to_save", "\"lm_head\""),
        ] {
            let text = format!(r#"{{"peft_type": "{peft_type}", "{field}": {value}}}"#);
            std::fs::write(&path, &text).unwrap();
            let err = crate::files::read_json::<T>(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{text}: {err}");
        }
    }

    #[test]
    fn lora_file_errors_name_shared_fields() {
        wrong_types_name_the_field::<LoraConfigFile>("LORA");
    }

    #[test]
    fn adalora_file_errors_name_shared_fields() {
        wrong_types_name_the_field::<AdaloraConfigFile>("ADALORA");
    }
}
