//! Adapter tensors and PEFT's `adapter_model.safetensors` layout:
//! `base_model.model.<module>.lora_A.weight` (r×in), `.lora_B.weight` (out×r) and, for DoRA,
//! `.lora_magnitude_vector` (out).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{LoraConfig, LoraVariant};
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

/// One module's adapter: ΔW = scale·B·A, plus DoRA's magnitude.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// r × in
    pub a: Tensor,
    /// out × r
    pub b: Tensor,
    /// out; present for DoRA.
    pub magnitude: Option<Tensor>,
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// scale·B·A, out × in.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }

    /// The same module cut from the autograd graph (evaluation during training: no op then
    /// keeps or computes what a backward would need).
    pub fn detached(&self) -> LoraModule {
        LoraModule {
            a: self.a.detach(),
            b: self.b.detach(),
            magnitude: self.magnitude.as_ref().map(Tensor::detach),
            scale: self.scale,
        }
    }

    /// r·(in + out) (+ out for DoRA's magnitude).
    pub fn num_parameters(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, |m| m.elem_count())
    }
}

/// A LoRA or DoRA adapter: its config and one `LoraModule` per adapted linear.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub modules: BTreeMap<String, LoraModule>,
}

enum Part {
    A,
    B,
    Magnitude,
}

/// The two factors of ΔW = B·A, whose shapes give a module's: A is r × in, B is out × r.
pub(crate) enum Factor {
    A,
    B,
}

/// Each module's shape, read from its A and B tensors (for an adapter folder loaded without
/// its base model); `factor_of(key)` names a tensor's module and factor (none for others).
pub(crate) fn shapes_of<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    factor_of: impl Fn(&str) -> Result<(String, Option<Factor>)>,
) -> Result<Vec<LinearShape>> {
    let mut shapes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, factor) = factor_of(key)?;
        let entry = shapes.entry(module).or_default();
        match (factor, t.dims()) {
            (Some(Factor::A), [_, k]) => entry.1 = *k,
            (Some(Factor::B), [d, _]) => entry.0 = *d,
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

/// Splits a PEFT tensor key into (module, part).
fn parse_key(key: &str, file: &Path) -> Result<(String, Part)> {
    let rest = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
        Error::tensors(
            file,
            format!("tensor {key:?}: expected a PEFT key starting with {PEFT_PREFIX:?}"),
        )
    })?;
    let suffixes = [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_magnitude_vector.weight", Part::Magnitude),
        (".lora_magnitude_vector", Part::Magnitude),
    ];
    for (suffix, part) in suffixes {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((module.to_string(), part));
        }
    }
    if rest.contains("lora_embedding_") {
        return Err(Error::tensors(
            file,
            format!("tensor {key:?}: embedding adapters are not supported"),
        ));
    }
    Err(Error::tensors(
        file,
        format!("tensor {key:?}: not a LoRA tensor (expected .lora_A.weight, .lora_B.weight or .lora_magnitude_vector)"),
    ))
}

impl LoraAdapter {
    /// Loads a PEFT adapter folder and checks it against the base model's linear layers: every
    /// targeted linear must have tensors of the right shapes and every tensor a targeted linear.
    /// A PEFT AdaLoRA folder (`peft_type` "ADALORA") loads as its LoRA form
    /// ([`crate::adalora::AdaloraAdapter::to_lora`]).
    pub fn load(dir: &Path, base: &[LinearShape], device: &Device) -> Result<Self> {
        if crate::adalora::is_adalora_dir(dir) {
            return crate::adalora::AdaloraAdapter::load(dir, base, device)?.to_lora();
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            return Err(Error::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found: not a PEFT adapter folder",
                ),
            ));
        }
        let config = LoraConfig::load(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                "only adapter_model.safetensors is read; convert the pickled adapter_model.bin to safetensors"
            } else {
                "file not found"
            };
            return Err(Error::io(
                &weights_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, hint),
            ));
        }
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| Error::tensors(&weights_path, format!("cannot read safetensors: {e}")))?;
        Self::from_tensors(config, tensors, base, &weights_path)
    }

    /// Loads a PEFT adapter folder without a base model, taking each layer's shape from its own
    /// tensors (for inspection and adapter algebra).
    pub fn load_standalone(dir: &Path, device: &Device) -> Result<Self> {
        if crate::adalora::is_adalora_dir(dir) {
            return crate::adalora::AdaloraAdapter::load_standalone(dir, device)?.to_lora();
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| Error::tensors(&weights_path, format!("cannot read safetensors: {e}")))?;
        let base = shapes_of(&tensors, |key| {
            let (module, part) = parse_key(key, &weights_path)?;
            let factor = match part {
                Part::A => Some(Factor::A),
                Part::B => Some(Factor::B),
                Part::Magnitude => None,
            };
            Ok((module, factor))
        })?;
        Self::load(dir, &base, device)
    }

    /// Builds an adapter from PEFT-keyed tensors; `file` names the source in errors.
    pub fn from_tensors(
        config: LoraConfig,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        base: &[LinearShape],
        file: &Path,
    ) -> Result<Self> {
        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for (key, tensor) in tensors {
            let (module, part) = parse_key(&key, file)?;
            let slot = parts.entry(module).or_default();
            let tensor = tensor.to_dtype(DType::F32)?;
            crate::finite::ensure_finite(file, &key, &tensor)?;
            match part {
                Part::A => slot[0] = Some(tensor),
                Part::B => slot[1] = Some(tensor),
                Part::Magnitude => slot[2] = Some(tensor),
            }
        }
        for name in parts.keys() {
            match base.iter().find(|l| &l.name == name) {
                None => {
                    return Err(Error::tensors(
                        file,
                        format!("module {name:?} is not a linear layer of the base model"),
                    ))
                }
                Some(_) if !config.targets_module(name) => {
                    return Err(Error::tensors(
                        file,
                        format!(
                        "module {name:?} has tensors but adapter_config.json does not target it"
                    ),
                    ))
                }
                Some(_) => {}
            }
        }
        let is_dora = config.variant == LoraVariant::Dora;
        let mut modules = BTreeMap::new();
        for linear in base.iter().filter(|l| config.targets_module(&l.name)) {
            let name = &linear.name;
            let [a, b, magnitude] = parts.remove(name).unwrap_or_default();
            let missing =
                |what: &str| Error::tensors(file, format!("module {name:?}: missing {what}"));
            let a = a.ok_or_else(|| missing("lora_A.weight"))?;
            let b = b.ok_or_else(|| missing("lora_B.weight"))?;
            let r = config.rank_for(name);
            let expect = |t: &Tensor, what: &str, shape: &[usize]| -> Result<()> {
                if t.dims() != shape {
                    return Err(Error::tensors(
                        file,
                        format!(
                            "module {name:?}: {what} has shape {:?}, expected {shape:?} (rank {r} from r/rank_pattern, base layer {}×{})",
                            t.dims(),
                            linear.out_features,
                            linear.in_features
                        ),
                    ));
                }
                Ok(())
            };
            expect(&a, "lora_A", &[r, linear.in_features])?;
            expect(&b, "lora_B", &[linear.out_features, r])?;
            let magnitude = match (is_dora, magnitude) {
                (true, Some(m)) => {
                    expect(&m, "lora_magnitude_vector", &[linear.out_features])?;
                    Some(m)
                }
                (true, None) => return Err(missing("lora_magnitude_vector (use_dora is true)")),
                (false, Some(_)) => {
                    return Err(Error::tensors(
                        file,
                        format!("module {name:?}: has lora_magnitude_vector but use_dora is false"),
                    ))
                }
                (false, None) => None,
            };
            let scale = config.scale_for(name);
            modules.insert(
                name.clone(),
                LoraModule {
                    a,
                    b,
                    magnitude,
                    scale,
                },
            );
        }
        if modules.is_empty() {
            return Err(Error::tensors(
                file,
                "the adapter targets no linear layer of the base model",
            ));
        }
        Ok(LoraAdapter { config, modules })
    }

    /// The tensors under PEFT's key names.
    pub fn peft_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, m) in &self.modules {
            out.push((format!("{PEFT_PREFIX}{name}.lora_A.weight"), m.a.clone()));
            out.push((format!("{PEFT_PREFIX}{name}.lora_B.weight"), m.b.clone()));
            if let Some(mag) = &m.magnitude {
                out.push((
                    format!("{PEFT_PREFIX}{name}.lora_magnitude_vector"),
                    mag.clone(),
                ));
            }
        }
        out
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) in PEFT's format.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self
            .peft_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        crate::files::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
        self.config.save(&dir.join(CONFIG_FILE))
    }

    /// Moves the factors onto 2 MiB pages where the kernel can
    /// ([`lowrank_kernels::back_with_huge_pages`]; returns the bytes collapsed): served
    /// unmerged, they are read at every decoding step along with the base weights.
    pub fn back_with_huge_pages(&self) -> usize {
        let factors: Vec<&Tensor> = self.modules.values().flat_map(|m| [&m.a, &m.b]).collect();
        lowrank_kernels::back_with_huge_pages(&factors)
    }

    pub fn num_parameters(&self) -> usize {
        self.modules.values().map(LoraModule::num_parameters).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::ModuleSelector;

    fn config() -> LoraConfig {
        LoraConfig::new(
            2,
            4.0,
            ModuleSelector::Names(vec!["q_proj".into(), "embed_tokens".into()]),
        )
    }

    fn base() -> Vec<LinearShape> {
        vec![LinearShape {
            name: "model.layers.0.self_attn.q_proj".into(),
            out_features: 3,
            in_features: 4,
        }]
    }

    fn zeros(shape: (usize, usize)) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    fn err(tensors: Vec<(String, Tensor)>) -> String {
        LoraAdapter::from_tensors(
            config(),
            tensors,
            &base(),
            Path::new("adapter_model.safetensors"),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn unsupported_and_unmatched_keys_are_named() {
        let emb = "base_model.model.model.embed_tokens.lora_embedding_A".to_string();
        let e = err(vec![(emb, zeros((2, 10)))]);
        assert!(
            e.contains("embedding adapters are not supported")
                && e.contains("adapter_model.safetensors"),
            "{e}"
        );
        let e = err(vec![(
            "model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            zeros((2, 4)),
        )]);
        assert!(e.contains("expected a PEFT key"), "{e}");
        let e = err(vec![(
            "base_model.model.model.layers.0.self_attn.q_proj.bias".into(),
            zeros((3, 1)),
        )]);
        assert!(e.contains("not a LoRA tensor"), "{e}");
        let e = err(vec![(
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
            zeros((2, 4)),
        )]);
        assert!(e.contains("not a linear layer of the base model"), "{e}");
    }

    #[test]
    fn a_well_formed_module_loads_with_its_scale() {
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        let adapter = LoraAdapter::from_tensors(
            config(),
            vec![
                (format!("{q}.lora_A.weight"), zeros((2, 4))),
                (format!("{q}.lora_B.weight"), zeros((3, 2))),
            ],
            &base(),
            Path::new("adapter_model.safetensors"),
        )
        .unwrap();
        assert_eq!(
            adapter.modules["model.layers.0.self_attn.q_proj"].scale,
            2.0
        );
        assert_eq!(adapter.num_parameters(), 2 * (3 + 4));
    }

    /// Both factors of every module are collapsed together (24 MiB here: A alone, 12 MiB,
    /// would be under the 16 MiB floor), values unchanged, where the kernel offers
    /// transparent huge pages.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn factors_go_onto_huge_pages() {
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        let features = 3 << 19;
        let shape = vec![LinearShape {
            name: "model.layers.0.self_attn.q_proj".into(),
            out_features: features,
            in_features: features,
        }];
        let a = Tensor::ones((2, features), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::full(2f32, (features, 2), &Device::Cpu).unwrap();
        let adapter = LoraAdapter::from_tensors(
            config(),
            vec![
                (format!("{q}.lora_A.weight"), a),
                (format!("{q}.lora_B.weight"), b),
            ],
            &shape,
            Path::new("adapter_model.safetensors"),
        )
        .unwrap();
        let collapsed = adapter.back_with_huge_pages();
        let module = &adapter.modules["model.layers.0.self_attn.q_proj"];
        let sum = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(sum(&module.a), (2 * features) as f32);
        assert_eq!(sum(&module.b), (4 * features) as f32);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            assert_eq!(collapsed, 0);
        } else {
            // At least the five 2 MiB blocks wholly inside each 12 MiB factor.
            assert!(collapsed >= 20 << 20, "collapsed {collapsed} bytes");
        }
    }
}
