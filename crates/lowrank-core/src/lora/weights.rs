//! Adapter tensors and PEFT's `adapter_model.safetensors` layout:
//! `base_model.model.<module>.lora_A.weight` (r×in), `.lora_B.weight` (out×r) and, for DoRA,
//! `.lora_magnitude_vector` (out).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{LoraConfig, LoraVariant};
use crate::adapter_tensors::{
    modules_from_tensors, read_weights, standalone_shapes, LinearShape, ModuleTensors, Part, Parts,
    TensorKeys, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE,
};
use crate::error::{Error, Result};

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

/// LoRA's keys: `.lora_A.weight`, `.lora_B.weight`, and DoRA's magnitude as the third part.
const KEYS: TensorKeys = TensorKeys {
    suffixes: &[
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_magnitude_vector.weight", Part::Third),
        (".lora_magnitude_vector", Part::Third),
    ],
    unknown: unknown_key,
};

fn unknown_key(key: &str, rest: &str) -> String {
    if rest.contains("lora_embedding_") {
        format!("tensor {key:?}: embedding adapters are not supported")
    } else {
        format!("tensor {key:?}: not a LoRA tensor (expected .lora_A.weight, .lora_B.weight or .lora_magnitude_vector)")
    }
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
        let (weights_path, tensors) = read_weights(dir, device)?;
        Self::from_tensors(config, tensors, base, &weights_path)
    }

    /// Loads a PEFT adapter folder without a base model, taking each layer's shape from its own
    /// tensors (for inspection and adapter algebra).
    pub fn load_standalone(dir: &Path, device: &Device) -> Result<Self> {
        if crate::adalora::is_adalora_dir(dir) {
            return crate::adalora::AdaloraAdapter::load_standalone(dir, device)?.to_lora();
        }
        let (weights_path, tensors) = read_weights(dir, device)?;
        let base = standalone_shapes(&KEYS, &tensors, &weights_path)?;
        Self::load(dir, &base, device)
    }

    /// Builds an adapter from PEFT-keyed tensors; `file` names the source in errors.
    pub fn from_tensors(
        config: LoraConfig,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        base: &[LinearShape],
        file: &Path,
    ) -> Result<Self> {
        let is_dora = config.variant == LoraVariant::Dora;
        let build = |module: &ModuleTensors, [a, b, magnitude]: Parts| {
            let (name, linear) = (&module.linear.name, module.linear);
            let a = module.require(a, "lora_A.weight")?;
            let b = module.require(b, "lora_B.weight")?;
            let r = config.rank_for(name);
            let rank_note = format!("rank {r} from r/rank_pattern");
            module.check_shape(&a, "lora_A", &[r, linear.in_features], &rank_note)?;
            module.check_shape(&b, "lora_B", &[linear.out_features, r], &rank_note)?;
            let magnitude = match (is_dora, magnitude) {
                (true, Some(m)) => {
                    let shape = [linear.out_features];
                    module.check_shape(&m, "lora_magnitude_vector", &shape, &rank_note)?;
                    Some(m)
                }
                (true, None) => {
                    return Err(module.error("missing lora_magnitude_vector (use_dora is true)"))
                }
                (false, Some(_)) => {
                    return Err(module.error("has lora_magnitude_vector but use_dora is false"))
                }
                (false, None) => None,
            };
            Ok(LoraModule {
                a,
                b,
                magnitude,
                scale: config.scale_for(name),
            })
        };
        let targets = |name: &str| config.targets_module(name);
        let modules = modules_from_tensors(&KEYS, tensors, base, targets, file, build)?;
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
