//! AdaLoRA tensors and PEFT's file layout: `base_model.model.<module>.lora_A` (r×in, Q),
//! `.lora_E` (r×1, Λ) and `.lora_B` (out×r, P), without `.weight` (they are PEFT
//! `ParameterDict` entries) and without `ranknum` (PEFT never saves it). With a `rank_pattern`
//! the saved tensors hold only the kept triplets (PEFT's `resize_state_dict_by_rank_pattern`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::AdaloraConfig;
use crate::adapter_tensors::{
    modules_from_tensors, read_weights, standalone_shapes, LinearShape, ModuleTensors, Part, Parts,
    TensorKeys, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE,
};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraModule};
use crate::targets::ModuleSelector;

/// One module: ΔW = scale·P·diag(Λ)·Q = scale·B·(A ⊙ E).
#[derive(Debug, Clone)]
pub struct AdaloraModule {
    /// r × in (Q, PEFT's `lora_A`)
    pub a: Tensor,
    /// r × 1 (Λ, PEFT's `lora_E`)
    pub e: Tensor,
    /// out × r (P, PEFT's `lora_B`)
    pub b: Tensor,
}

impl AdaloraModule {
    /// Rows stored (the kept rank once cut to a pattern, `init_r` while training).
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// The LoRA form: a = A ⊙ E (r × in), b = B, so ΔW = scale·b·a.
    pub fn to_lora(&self, scale: f64) -> Result<LoraModule> {
        Ok(LoraModule {
            a: self.a.broadcast_mul(&self.e)?,
            b: self.b.clone(),
            magnitude: None,
            scale,
        })
    }

    /// Keeps the triplets whose `mask` entry is true (rows of A and E, columns of B).
    pub fn cut(&self, mask: &[bool]) -> Result<AdaloraModule> {
        if mask.len() != self.rank() || mask.iter().all(|k| *k) {
            return Ok(self.clone());
        }
        let keep: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize])
            .collect();
        if keep.is_empty() {
            let dev = self.a.device();
            let (out, inp) = (self.b.dim(0)?, self.a.dim(1)?);
            return Ok(AdaloraModule {
                a: Tensor::zeros((0, inp), DType::F32, dev)?,
                e: Tensor::zeros((0, 1), DType::F32, dev)?,
                b: Tensor::zeros((out, 0), DType::F32, dev)?,
            });
        }
        let idx = Tensor::new(keep.as_slice(), self.a.device())?;
        Ok(AdaloraModule {
            a: self.a.index_select(&idx, 0)?,
            e: self.e.index_select(&idx, 0)?,
            b: self.b.index_select(&idx, 1)?,
        })
    }

    pub fn num_parameters(&self) -> usize {
        self.a.elem_count() + self.e.elem_count() + self.b.elem_count()
    }
}

/// An AdaLoRA adapter: its config and one module per adapted linear.
#[derive(Debug, Clone)]
pub struct AdaloraAdapter {
    pub config: AdaloraConfig,
    pub modules: BTreeMap<String, AdaloraModule>,
}

/// AdaLoRA's keys: `.lora_A`, `.lora_B`, and Λ (`.lora_E`) as the third part.
const KEYS: TensorKeys = TensorKeys {
    suffixes: &[
        (".lora_A", Part::A),
        (".lora_B", Part::B),
        (".lora_E", Part::Third),
    ],
    unknown: unknown_key,
};

fn unknown_key(key: &str, _rest: &str) -> String {
    format!("tensor {key:?}: not an AdaLoRA tensor (expected .lora_A, .lora_E or .lora_B)")
}

/// Whether the folder's `adapter_config.json` says `peft_type` "ADALORA".
pub fn is_adalora_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("peft_type").and_then(|p| p.as_str()) == Some("ADALORA"))
}

impl AdaloraAdapter {
    /// Loads a PEFT AdaLoRA folder checked against the base model's linear layers.
    pub fn load(dir: &Path, base: &[LinearShape], device: &Device) -> Result<Self> {
        let config = AdaloraConfig::load(&dir.join(CONFIG_FILE))?;
        let (path, tensors) = read_weights(dir, device)?;
        Self::from_tensors(config, tensors, base, &path)
    }

    /// Loads without a base model, taking each layer's shape from its tensors.
    pub fn load_standalone(dir: &Path, device: &Device) -> Result<Self> {
        let (path, tensors) = read_weights(dir, device)?;
        let base = standalone_shapes(&KEYS, &tensors, &path)?;
        Self::load(dir, &base, device)
    }

    /// Builds the adapter from PEFT-keyed tensors: every targeted linear needs A, E and B of
    /// its kept rank (`rank_pattern`, else `init_r`).
    pub fn from_tensors(
        config: AdaloraConfig,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        base: &[LinearShape],
        file: &Path,
    ) -> Result<Self> {
        let build = |module: &ModuleTensors, [a, b, e]: Parts| {
            let linear = module.linear;
            let (a, e, b) = (
                module.require(a, "lora_A")?,
                module.require(e, "lora_E")?,
                module.require(b, "lora_B")?,
            );
            let r = config.rank_for(&linear.name);
            let rank_note = format!("kept rank {r} from init_r/rank_pattern");
            module.check_shape(&a, "lora_A", &[r, linear.in_features], &rank_note)?;
            module.check_shape(&e, "lora_E", &[r, 1], &rank_note)?;
            module.check_shape(&b, "lora_B", &[linear.out_features, r], &rank_note)?;
            Ok(AdaloraModule { a, e, b })
        };
        let targets = |name: &str| config.targets_module(name);
        let modules = modules_from_tensors(&KEYS, tensors, base, targets, file, build)?;
        Ok(AdaloraAdapter { config, modules })
    }

    /// The tensors as PEFT saves them: cut to the kept rank when there is a `rank_pattern`.
    pub fn peft_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, m) in &self.modules {
            let m = m.cut(&self.config.mask_for(name))?;
            out.push((format!("{PEFT_PREFIX}{name}.lora_A"), m.a));
            out.push((format!("{PEFT_PREFIX}{name}.lora_B"), m.b));
            out.push((format!("{PEFT_PREFIX}{name}.lora_E"), m.e));
        }
        Ok(out)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) as PEFT does.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self
            .peft_tensors()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        crate::files::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
        self.config.save(&dir.join(CONFIG_FILE))
    }

    /// The kept rank of each module (counting its pattern, not its stored rows).
    pub fn ranks(&self) -> BTreeMap<String, usize> {
        self.modules
            .keys()
            .map(|n| (n.clone(), self.config.rank_for(n)))
            .collect()
    }

    /// Parameters as PEFT counts them (A, E and B of the stored rank).
    pub fn num_parameters(&self) -> usize {
        self.modules
            .values()
            .map(AdaloraModule::num_parameters)
            .sum()
    }

    /// The inference form: one `LoraModule` per module with a kept triplet (a = E⊙A over the
    /// kept rows, b = B, scale = α/(init_r + 1e-5)), so eval, generate, merge and serve work
    /// unchanged. Its `LoraConfig` gives every module that scale (rank/alpha patterns with the
    /// escaped module names) and excludes modules with no triplet left.
    pub fn to_lora(&self) -> Result<LoraAdapter> {
        let scale = self.config.scale();
        let init_r = self.config.schedule.init_r;
        let mut config = self.config.lora_view();
        config.rank = init_r;
        config.alpha = scale * init_r as f64;
        let mut modules = BTreeMap::new();
        let mut empty = Vec::new();
        for (name, m) in &self.modules {
            let kept = m.cut(&self.config.mask_for(name))?;
            let r = kept.rank();
            if r == 0 {
                empty.push(name.clone());
                continue;
            }
            if r != init_r {
                let key = regex::escape(name);
                config.rank_pattern.push((key.clone(), r));
                config.alpha_pattern.push((key, scale * r as f64));
            }
            modules.insert(name.clone(), kept.to_lora(scale)?);
        }
        if !empty.is_empty() {
            config.exclude = Some(match config.exclude.take() {
                None => ModuleSelector::Names(empty),
                Some(ModuleSelector::Names(mut v)) => {
                    v.extend(empty);
                    ModuleSelector::Names(v)
                }
                Some(ModuleSelector::Regex(src, _)) => {
                    let alts: Vec<String> = empty.iter().map(|n| regex::escape(n)).collect();
                    ModuleSelector::regex(&format!("(?:{src})|{}", alts.join("|")))
                        .map_err(Error::Msg)?
                }
            });
        }
        Ok(LoraAdapter { config, modules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_the_masked_in_triplets_and_to_lora_multiplies_e() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let e = Tensor::new(&[[2f32], [0.], [-1.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32, 0., 1.], [0., 1., 0.]], &dev).unwrap();
        let m = AdaloraModule { a, e, b };
        let cut = m.cut(&[true, false, true]).unwrap();
        assert_eq!(
            cut.a.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![5., 6.]]
        );
        assert_eq!(
            cut.b.to_vec2::<f32>().unwrap(),
            vec![vec![1., 1.], vec![0., 0.]]
        );
        let l = cut.to_lora(0.5).unwrap();
        // ΔW = 0.5·B·(A⊙E) = 0.5·[[2·1 − 5, 2·2 − 6], [0, 0]]
        assert_eq!(
            l.delta_weight().unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![-1.5, -1.], vec![0., 0.]]
        );
        assert_eq!(m.cut(&[false, false, false]).unwrap().rank(), 0);
    }
}
