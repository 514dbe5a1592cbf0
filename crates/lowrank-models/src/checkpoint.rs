//! Finding and reading a Hugging Face checkpoint: a local folder or a Hub repo id (the local HF
//! cache, else a download: [`crate::hub`]), single or sharded safetensors, memory-mapped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use lowrank_core::{Error, Result};
use lowrank_gguf::TensorType;
use serde::Deserialize;

use crate::gguf::GgufModel;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Resolves `--model`: an existing folder, or a Hub id `org/name[@revision]` from the local HF
/// cache or downloaded into it (see [`crate::hub`]).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    crate::hub::resolve(spec, crate::hub::Wanted::Model)
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The shard files a `model.safetensors.index.json` lists, each once.
pub fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let idx: ShardIndex = lowrank_core::files::read_json(index)?;
    let names: BTreeSet<String> = idx.weight_map.into_values().collect();
    // Shards sit beside the index: a path (absolute, `..`, a subfolder) would read or download
    // files outside the checkpoint.
    if let Some(bad) = names.iter().find(|n| {
        let mut parts = Path::new(n.as_str()).components();
        !matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        )
    }) {
        return Err(Error::field(
            index,
            "weight_map",
            format!("shard {bad:?} is not a file name in the checkpoint folder"),
        ));
    }
    Ok(names)
}

/// The weights of a checkpoint, memory-mapped: the safetensors files of a folder, or a GGUF
/// file whose tensors are read under their HF names (see [`crate::gguf`]).
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    store: Store,
}

enum Store {
    Safetensors(MmapedSafetensors),
    Gguf {
        model: Box<GgufModel>,
        /// Attention and key/value heads, to undo the converter's q/k permutation.
        heads: (usize, usize),
    },
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.exists() {
            shard_names(&index)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        } else if dir.join(SINGLE_FILE).exists() {
            vec![dir.join(SINGLE_FILE)]
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                " (pickled pytorch_model.bin is not read; convert it to safetensors)"
            } else {
                ""
            };
            return Err(Error::file(
                dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE}{hint}"),
            ));
        };
        for f in &files {
            if !f.exists() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                ));
            }
        }
        // SAFETY: the files are opened read-only; as with every mmap, they must not be truncated while in use.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::tensors(dir, format!("cannot read safetensors: {e}")))?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            store: Store::Safetensors(tensors),
        })
    }

    /// A checkpoint folder, or a GGUF file read under the HF names of its model's config.
    pub fn open_model(path: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(path) {
            let model = GgufModel::open(path)?;
            let config = model.config()?;
            return Ok(Self::from_gguf(model, &config));
        }
        Self::open(path)
    }

    /// The tensors of a GGUF model under their HF names, for a model of `config`.
    pub fn from_gguf(model: GgufModel, config: &crate::ModelConfig) -> Self {
        let path = model.path().to_path_buf();
        Checkpoint {
            dir: path.clone(),
            files: vec![path],
            store: Store::Gguf {
                model: Box::new(model),
                heads: (config.num_heads, config.num_kv_heads),
            },
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Safetensors(t) => t.get(name).is_ok(),
            Store::Gguf { model, .. } => model.tensor(name).is_some(),
        }
    }

    /// Every tensor name with its stored dtype (of a GGUF: F16 and BF16 as such, the
    /// quantized types as F32, the dtype they are computed in).
    pub fn names(&self) -> Vec<(String, DType)> {
        let tensors = match &self.store {
            Store::Safetensors(t) => t,
            Store::Gguf { model, .. } => {
                return model
                    .hf_names()
                    .map(|n| {
                        let dtype = match model.tensor(n).map(|t| t.tensor_type) {
                            Some(TensorType::F16) => DType::F16,
                            Some(TensorType::BF16) => DType::BF16,
                            _ => DType::F32,
                        };
                        (n.to_string(), dtype)
                    })
                    .collect()
            }
        };
        tensors
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let dtype = match v.dtype() {
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F16 => DType::F16,
                    _ => DType::F32,
                };
                (n, dtype)
            })
            .collect()
    }

    /// Loads tensor `name` as `dtype`, checking its shape.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.load_stored(name, device)?;
        if t.dims() != shape {
            return Err(Error::tensors(
                &self.dir,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?} from config.json",
                    t.dims()
                ),
            ));
        }
        let t = t.to_dtype(dtype)?;
        lowrank_core::finite::ensure_finite(self.source(), name, &t)?;
        Ok(t)
    }

    /// Tensor `name` in its stored dtype and shape (of a GGUF: dequantized to f32, in the HF
    /// model's layout).
    pub fn load_stored(&self, name: &str, device: &Device) -> Result<Tensor> {
        Ok(match &self.store {
            Store::Safetensors(t) => t
                .load(name, device)
                .map_err(|_| Error::tensors(&self.dir, format!("missing tensor {name:?}")))?,
            Store::Gguf { model, heads } => {
                let (dims, data) = model.load_f32(name, heads.0, heads.1)?;
                Tensor::from_vec(data, dims, device)?
            }
        })
    }

    /// What errors about a tensor name: the file of a single-file checkpoint, else the folder.
    fn source(&self) -> &Path {
        match self.files.as_slice() {
            [one] => one,
            _ => &self.dir,
        }
    }

    /// Whether `weight_name` is stored 4-bit in the bitsandbytes layout (it has a
    /// `<weight_name>.quant_state.bitsandbytes__nf4` or `__fp4` sibling).
    pub fn is_quantized(&self, weight_name: &str) -> bool {
        let Store::Safetensors(_) = &self.store else {
            return false;
        };
        ["nf4", "fp4"]
            .iter()
            .any(|k| self.contains(&format!("{weight_name}.quant_state.bitsandbytes__{k}")))
    }

    /// Reads a 4-bit weight stored in the bitsandbytes layout (`weight` packed uint8,
    /// `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    /// `weight.quant_state.bitsandbytes__nf4|fp4`), checking its shape.
    pub fn load_quantized(
        &self,
        weight_name: &str,
        shape: &[usize],
    ) -> Result<lowrank_quant::Quantized4Bit> {
        use lowrank_quant::qtensor::{RawDtype, RawTensorRef};
        let Store::Safetensors(tensors) = &self.store else {
            return Err(Error::tensors(
                &self.dir,
                "GGUF files hold no bitsandbytes 4-bit tensors",
            ));
        };
        // The views of this weight's tensors (a view owns its shape, so they are kept here).
        let mut views = std::collections::HashMap::new();
        let parts = [
            "",
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".quant_state.bitsandbytes__nf4",
            ".quant_state.bitsandbytes__fp4",
        ];
        for part in parts {
            let name = format!("{weight_name}{part}");
            if let Ok(v) = tensors.get(&name) {
                views.insert(name, v);
            }
        }
        let get = |name: &str| -> Option<RawTensorRef<'_>> {
            let v = views.get(name)?;
            let dtype = match v.dtype() {
                safetensors::Dtype::F32 => RawDtype::F32,
                // Any other dtype is reported as uint8; the checks below name wrong ones.
                _ => RawDtype::U8,
            };
            Some(RawTensorRef {
                dtype,
                shape: v.shape(),
                data: v.data(),
            })
        };
        for part in ["absmax", "quant_map", "nested_absmax", "nested_quant_map"] {
            let name = format!("{weight_name}.{part}");
            if let Ok(v) = tensors.get(&name) {
                if !matches!(v.dtype(), safetensors::Dtype::U8 | safetensors::Dtype::F32) {
                    return Err(Error::tensors(
                        &self.dir,
                        format!(
                            "tensor {name:?} has dtype {:?}, expected uint8 or float32",
                            v.dtype()
                        ),
                    ));
                }
            }
        }
        let q = lowrank_quant::Quantized4Bit::from_bnb_tensors(weight_name, get)
            .map_err(|e| Error::tensors(&self.dir, e.to_string()))?;
        if q.shape() != shape {
            return Err(Error::tensors(
                &self.dir,
                format!(
                    "4-bit tensor {weight_name:?} has shape {:?}, expected {shape:?} from config.json",
                    q.shape()
                ),
            ));
        }
        Ok(q)
    }

    /// The dtype the weights are stored in (that of the embedding).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.names()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_weights_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    /// The folder at fault is a field of the error, not only part of its text.
    #[test]
    fn a_folder_without_weights_is_a_file_error_on_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        match Checkpoint::open(dir.path()) {
            Err(Error::File { path, .. }) => assert_eq!(path, dir.path()),
            other => panic!("{:?}", other.err()),
        }
    }
}
