//! A full fine-tune's update ΔW = W_ft − W per adapted linear, read from two HF checkpoints
//! (single file or shards, any float dtype) or GGUF files (dequantized, under the HF names),
//! and its top-K spectrum by randomized SVD.
//!
//! The linears compared are the ones LoRA targets: every `…layers.N.….{q,k,v,o,gate,up,down}_proj
//! .weight` of the base, matched by name in the fine-tune. One layer at a time is held in memory
//! (W, W_ft and ΔW in f64), so the models are never loaded whole.

use candle_core::{DType, Device};
use lowrank_core::lora::ALL_LINEAR;
use lowrank_models::checkpoint::{resolve_model_dir, Checkpoint};

use crate::analyze::randomized::{randomized_svd, RandomizedOptions};
use crate::analyze::report::ModuleSpectrum;
use crate::analyze::stats::{model_order_key, module_spectrum};
use crate::factored::matrix_from_tensor;
use crate::{Error, Result};

/// How many singular values to compute per layer, and the sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullOptions {
    pub top: usize,
    pub sketch: RandomizedOptions,
}

impl FullOptions {
    pub fn describe(&self) -> String {
        format!(
            "randomized SVD (Halko–Martinsson–Tropp): top {}, Gaussian sketch with {} extra columns, {} power iterations with QR re-orthonormalisation, seed {}; exact where a layer is no wider than the sketch",
            self.top, self.sketch.oversampling, self.sketch.power_iterations, self.sketch.seed
        )
    }
}

/// Whether a tensor name is a decoder layer's adapted linear weight; its module path if so.
pub fn adapted_linear_module(tensor: &str) -> Option<&str> {
    let module = tensor.strip_suffix(".weight")?;
    let projection = module.rsplit('.').next()?;
    let in_layer = module.split('.').any(|p| p == "layers");
    (in_layer && ALL_LINEAR.contains(&projection)).then_some(module)
}

/// A checkpoint's tensors (memory-mapped safetensors, or a GGUF file), with its path for
/// messages.
struct Weights {
    dir: String,
    checkpoint: Checkpoint,
}

impl Weights {
    fn open(spec: &str) -> Result<Self> {
        let dir = resolve_model_dir(spec)?;
        Ok(Weights {
            checkpoint: Checkpoint::open_model(&dir)?,
            dir: dir.display().to_string(),
        })
    }

    fn matrix(&self, name: &str) -> Result<nalgebra::DMatrix<f64>> {
        if self.checkpoint.is_quantized(name) {
            return Err(Error::Invalid(format!(
                "{}: {name} is stored 4-bit; compare checkpoints with full-precision weights",
                self.dir
            )));
        }
        let tensor = self.checkpoint.load_stored(name, &Device::Cpu)?;
        if tensor.rank() != 2 || !tensor.dtype().is_float() {
            return Err(Error::Invalid(format!(
                "{}: tensor {name:?} is {:?} {:?}, expected a 2-D float matrix",
                self.dir,
                tensor.dtype(),
                tensor.dims()
            )));
        }
        matrix_from_tensor(&tensor.to_dtype(DType::F64)?)
    }
}

/// The spectrum of ΔW = W_ft − W for every adapted linear of `base`, in model order.
/// `fine_tuned` and `base` are folders, GGUF files or repo ids in the local HF cache.
pub fn full_fine_tune_spectra(
    fine_tuned: &str,
    base: &str,
    options: FullOptions,
) -> Result<Vec<ModuleSpectrum>> {
    if options.top == 0 {
        return Err(Error::Invalid("--top must be at least 1".into()));
    }
    let base = Weights::open(base)?;
    let tuned = Weights::open(fine_tuned)?;
    let mut names: Vec<(String, String)> = base
        .checkpoint
        .names()
        .into_iter()
        .filter_map(|(tensor, _)| {
            adapted_linear_module(&tensor).map(|m| (m.to_string(), tensor.clone()))
        })
        .collect();
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no decoder-layer linear weights (layers.N.…{{{}}}.weight) to compare",
            base.dir,
            ALL_LINEAR.join(",")
        )));
    }
    names.sort_by_key(|(module, _)| model_order_key(module));
    names
        .iter()
        .map(|(module, tensor)| {
            let w = base.matrix(tensor)?;
            let w_ft = tuned.matrix(tensor)?;
            if w.shape() != w_ft.shape() {
                return Err(Error::Invalid(format!(
                    "{tensor}: {:?} in {} but {:?} in {}: not the same architecture",
                    w.shape(),
                    base.dir,
                    w_ft.shape(),
                    tuned.dir
                )));
            }
            let delta = w_ft - w;
            let svd = randomized_svd(&delta, options.top, options.sketch);
            let complete = svd.singular_values.len() == delta.nrows().min(delta.ncols());
            Ok(module_spectrum(
                module,
                delta.shape(),
                None,
                svd.singular_values,
                delta.norm_squared(),
                complete,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use nalgebra::DMatrix;
    use std::path::Path;

    fn tiny_model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama-tied")
    }

    #[test]
    fn names_the_linears_lora_targets() {
        assert_eq!(
            adapted_linear_module("model.layers.3.self_attn.q_proj.weight"),
            Some("model.layers.3.self_attn.q_proj")
        );
        assert_eq!(
            adapted_linear_module("model.layers.3.self_attn.q_proj.bias"),
            None
        );
        assert_eq!(adapted_linear_module("model.embed_tokens.weight"), None);
        assert_eq!(adapted_linear_module("lm_head.weight"), None);
        assert_eq!(
            adapted_linear_module("model.layers.0.input_layernorm.weight"),
            None
        );
    }

    /// Copies the tiny fixture model and adds a planted rank-2 update to every adapted linear:
    /// σ = (3 + layer, 2) on orthonormal directions. Returns the planted σ per module.
    fn plant_rank_two(dir: &Path) -> Vec<(String, [f64; 2])> {
        let src = tiny_model();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let file = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let mut planted = Vec::new();
        let mut out = Vec::new();
        for (name, t) in tensors {
            let t = match adapted_linear_module(&name) {
                Some(module) => {
                    let (d, k) = t.dims2().unwrap();
                    let layer: f64 = module.split('.').nth(2).unwrap().parse().unwrap();
                    let sigma = [3.0 + layer, 2.0];
                    // Orthonormal u₀ ⟂ u₁ and v₀ ⟂ v₁ from disjoint coordinates.
                    let u = |c: usize, i: usize| {
                        if i % 2 == c {
                            (2.0 / d as f64).sqrt()
                        } else {
                            0.0
                        }
                    };
                    let v = |c: usize, j: usize| {
                        if j % 2 == c {
                            (2.0 / k as f64).sqrt()
                        } else {
                            0.0
                        }
                    };
                    let delta = DMatrix::from_fn(d, k, |i, j| {
                        sigma[0] * u(0, i) * v(0, j) + sigma[1] * u(1, i) * v(1, j)
                    });
                    let data: Vec<f32> = delta.transpose().iter().map(|x| *x as f32).collect();
                    planted.push((module.to_string(), sigma));
                    (t + Tensor::from_vec(data, (d, k), &Device::Cpu).unwrap()).unwrap()
                }
                None => t,
            };
            out.push((name, t));
        }
        lowrank_core::files::write_safetensors(&file, &out).unwrap();
        planted
    }

    #[test]
    fn a_planted_rank_two_difference_shows_two_singular_values() {
        let tmp = tempfile::tempdir().unwrap();
        let planted = plant_rank_two(tmp.path());
        assert_eq!(planted.len(), 14, "2 layers x 7 linears");
        let base = tiny_model().display().to_string();
        let tuned = tmp.path().display().to_string();
        let options = FullOptions {
            top: 4,
            sketch: RandomizedOptions::default(),
        };
        let spectra = full_fine_tune_spectra(&tuned, &base, options).unwrap();
        assert_eq!(spectra.len(), planted.len());
        for m in &spectra {
            let sigma = planted.iter().find(|(p, _)| *p == m.module).unwrap().1;
            // f32 storage of W + ΔW rounds ΔW at ~1e-7 relative to W.
            assert!(
                (m.singular_values[0] - sigma[0]).abs() < 1e-4,
                "{}: {:?}",
                m.module,
                m.singular_values
            );
            assert!(
                (m.singular_values[1] - sigma[1]).abs() < 1e-4,
                "{}: {:?}",
                m.module,
                m.singular_values
            );
            assert!(
                m.singular_values[2] < 1e-4,
                "{}: {:?}",
                m.module,
                m.singular_values
            );
            // 90% needs both: σ₁² is 9/13 (layer 0) or 16/20 (layer 1) of the energy.
            assert_eq!(m.ranks_for_energy[0].rank, Some(2));
            assert!(m.effective_rank > 1.0 && m.effective_rank < 2.0);
        }
        // Layers in model order, projections in LoRA's order.
        assert_eq!(spectra[0].module, "model.layers.0.self_attn.q_proj");
        assert_eq!(spectra[7].module, "model.layers.1.self_attn.q_proj");
    }

    #[test]
    fn a_model_against_itself_has_no_update_and_bad_inputs_name_the_folder() {
        let base = tiny_model().display().to_string();
        let options = FullOptions {
            top: 2,
            sketch: RandomizedOptions::default(),
        };
        let spectra = full_fine_tune_spectra(&base, &base, options).unwrap();
        assert!(spectra.iter().all(|m| m.frobenius_norm == 0.0));

        // A fine-tune whose q_proj has another shape, and one that lacks a tensor.
        let tmp = tempfile::tempdir().unwrap();
        let rewrite = |edit: &dyn Fn(&str, Tensor) -> Option<Tensor>| {
            let dir = tmp.path();
            for entry in std::fs::read_dir(tiny_model()).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
            let file = dir.join("model.safetensors");
            let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
            let kept: Vec<(String, Tensor)> = tensors
                .into_iter()
                .filter_map(|(n, t)| edit(&n, t).map(|t| (n, t)))
                .collect();
            lowrank_core::files::write_safetensors(&file, &kept).unwrap();
            dir.display().to_string()
        };
        let q = "model.layers.0.self_attn.q_proj.weight";
        let narrower = rewrite(&|n, t| {
            Some(if n == q {
                t.narrow(0, 0, 16).unwrap()
            } else {
                t
            })
        });
        let err = full_fine_tune_spectra(&narrower, &base, options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(q) && err.contains("not the same architecture"),
            "{err}"
        );
        let missing = rewrite(&|n, t| (n != q).then_some(t));
        let err = full_fine_tune_spectra(&missing, &base, options)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing tensor") && err.contains(q), "{err}");
        let err = full_fine_tune_spectra("/nonexistent/model", &base, options)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/model"), "{err}");
    }
}
