//! A PEFT adapter folder's tensors, read the same way for every LoRA-family method: the
//! safetensors file, keys grouped by module, the checks against the base model's linears, and
//! each module's shape taken from the tensors alone when there is no base model.
//!
//! Each method names its tensors' key endings ([`TensorKeys`]) and builds its modules from the
//! grouped tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Prefix PEFT puts before every module name in adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A linear layer of the base model an adapter may attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearShape {
    /// Module key, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
}

/// A tensor's part of its module: the factors of ΔW = B·A (A is r × in, B is out × r, so they
/// give the module's shape), or the method's third tensor (DoRA's magnitude, AdaLoRA's Λ).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    A,
    B,
    Third,
}

/// A module's tensors, in [`Part`] order: A, B, the third.
pub(crate) type Parts = [Option<Tensor>; 3];

/// How one method's PEFT keys name its tensors: `base_model.model.<module><suffix>`.
pub(crate) struct TensorKeys {
    pub suffixes: &'static [(&'static str, Part)],
    /// The message for a key that ends in none of the suffixes, given the key and what
    /// follows the prefix.
    pub unknown: fn(key: &str, rest: &str) -> String,
}

impl TensorKeys {
    /// Splits a PEFT tensor key into (module, part); `file` names the source in errors.
    fn parse(&self, key: &str, file: &Path) -> Result<(String, Part)> {
        let rest = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
            Error::tensors(
                file,
                format!("tensor {key:?}: expected a PEFT key starting with {PEFT_PREFIX:?}"),
            )
        })?;
        self.suffixes
            .iter()
            .find_map(|(suffix, part)| Some((rest.strip_suffix(suffix)?.to_string(), *part)))
            .ok_or_else(|| Error::tensors(file, (self.unknown)(key, rest)))
    }
}

/// Reads `dir`'s `adapter_model.safetensors`; returns its path (for errors) and the tensors.
pub(crate) fn read_weights(
    dir: &Path,
    device: &Device,
) -> Result<(PathBuf, Vec<(String, Tensor)>)> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            "only adapter_model.safetensors is read; convert the pickled adapter_model.bin to safetensors"
        } else {
            "file not found"
        };
        return Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, hint),
        ));
    }
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::tensors(&path, format!("cannot read safetensors: {e}")))?;
    Ok((path, tensors.into_iter().collect()))
}

/// Each module's shape, read from its A and B tensors (for an adapter folder loaded without
/// its base model).
pub(crate) fn standalone_shapes(
    keys: &TensorKeys,
    tensors: &[(String, Tensor)],
    file: &Path,
) -> Result<Vec<LinearShape>> {
    let mut shapes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, part) = keys.parse(key, file)?;
        let entry = shapes.entry(module).or_default();
        match (part, t.dims()) {
            (Part::A, [_, k]) => entry.1 = *k,
            (Part::B, [d, _]) => entry.0 = *d,
            _ => {}
        }
    }
    Ok(shapes
        .into_iter()
        .map(|(name, (out_features, in_features))| LinearShape {
            name,
            out_features,
            in_features,
        })
        .collect())
}

/// One targeted linear's tensors being built into a module: errors name the file and module.
pub(crate) struct ModuleTensors<'a> {
    pub file: &'a Path,
    pub linear: &'a LinearShape,
}

impl ModuleTensors<'_> {
    pub fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::tensors(
            self.file,
            format!("module {:?}: {message}", self.linear.name),
        )
    }

    /// The tensor `what`, which must be there.
    pub fn require(&self, tensor: Option<Tensor>, what: &str) -> Result<Tensor> {
        tensor.ok_or_else(|| self.error(format!("missing {what}")))
    }

    /// Checks `tensor` (PEFT's `what`) has `shape`; `rank_note` says where the rank in it came
    /// from.
    pub fn check_shape(
        &self,
        tensor: &Tensor,
        what: &str,
        shape: &[usize],
        rank_note: &str,
    ) -> Result<()> {
        if tensor.dims() == shape {
            return Ok(());
        }
        Err(self.error(format!(
            "{what} has shape {:?}, expected {shape:?} ({rank_note}, base layer {}×{})",
            tensor.dims(),
            self.linear.out_features,
            self.linear.in_features
        )))
    }
}

/// Groups PEFT-keyed tensors by module (as f32, each checked finite), checks every module is
/// a linear of `base` the adapter targets, and builds each targeted linear's module with
/// `build` from its [`Parts`]. An adapter that targets no linear is an error.
pub(crate) fn modules_from_tensors<M>(
    keys: &TensorKeys,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    base: &[LinearShape],
    targets_module: impl Fn(&str) -> bool,
    file: &Path,
    mut build: impl FnMut(&ModuleTensors, Parts) -> Result<M>,
) -> Result<BTreeMap<String, M>> {
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, tensor) in tensors {
        let (module, part) = keys.parse(&key, file)?;
        let tensor = tensor.to_dtype(DType::F32)?;
        crate::finite::ensure_finite(file, &key, &tensor)?;
        parts.entry(module).or_default()[part as usize] = Some(tensor);
    }
    for name in parts.keys() {
        if !base.iter().any(|l| &l.name == name) {
            return Err(Error::tensors(
                file,
                format!("module {name:?} is not a linear layer of the base model"),
            ));
        }
        if !targets_module(name) {
            return Err(Error::tensors(
                file,
                format!("module {name:?} has tensors but adapter_config.json does not target it"),
            ));
        }
    }
    let mut modules = BTreeMap::new();
    for linear in base.iter().filter(|l| targets_module(&l.name)) {
        let module_parts = parts.remove(&linear.name).unwrap_or_default();
        let module = build(&ModuleTensors { file, linear }, module_parts)?;
        modules.insert(linear.name.clone(), module);
    }
    if modules.is_empty() {
        return Err(Error::tensors(
            file,
            "the adapter targets no linear layer of the base model",
        ));
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a base model too, and for AdaLoRA as for LoRA, a folder holding only the
    /// pickled weights says to convert them.
    #[test]
    fn a_pickled_adapter_is_named_for_every_method_and_loader() {
        for peft_type in ["LORA", "ADALORA"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join(CONFIG_FILE),
                format!(r#"{{"peft_type": "{peft_type}", "target_modules": ["q_proj"]}}"#),
            )
            .unwrap();
            std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
            let err = crate::lora::LoraAdapter::load_standalone(dir.path(), &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(WEIGHTS_FILE) && err.contains("convert the pickled adapter_model.bin"),
                "{peft_type}: {err}"
            );
        }
    }
}
