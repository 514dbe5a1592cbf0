//! Writing the model as a Hugging Face checkpoint folder: dense weights in the stored dtype,
//! or 4-bit linears in the bitsandbytes layout with their `quantization_config`.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use lowrank_core::{BaseWeight, Error, Result};

use super::weights::WeightRef;
use super::Llama;

/// Files a written checkpoint copies unchanged from its base.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

impl Llama {
    /// Writes a complete Hugging Face checkpoint folder: the weights (merged adapters
    /// included) as `model.safetensors` in the stored dtype, and config/tokenizer files copied
    /// from `base_dir` (or, from a GGUF base, written from its metadata). Staged in a temporary
    /// sibling folder and renamed, so a failed run leaves nothing half-written. `out` must not hold a checkpoint already.
    pub fn save_pretrained(&self, base_dir: &Path, out: &Path) -> Result<()> {
        if out.join("model.safetensors").exists() || out.join("config.json").exists() {
            return Err(Error::file(
                out,
                "already holds a checkpoint; choose an empty folder",
            ));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let staging = lowrank_core::files::staging_dir(&parent, ".lowrank-ckpt-")?;
        let quantized = self.is_quantized();
        if quantized {
            let ckpt = self.bnb_checkpoint()?;
            let path = staging.path().join("model.safetensors");
            ckpt.write(&path)
                .map_err(|e| Error::tensors(&path, e.to_string()))?;
        } else {
            let weights = self.named_weights()?;
            lowrank_core::files::write_safetensors(
                &staging.path().join("model.safetensors"),
                &weights,
            )?;
        }
        // config.json says whether (and how) the weights are 4-bit: rewritten when that
        // differs from the base's.
        let write_config = || -> Result<()> {
            let mut cfg = self.config.raw.clone();
            if let Some(obj) = cfg.as_object_mut() {
                obj.remove("quantization_config");
            }
            if let Some(qc) = self.quantization_config() {
                qc.insert_into(&mut cfg)?;
            }
            let dest = staging.path().join("config.json");
            let text = serde_json::to_string_pretty(&cfg).map_err(|source| Error::Json {
                path: dest.clone(),
                source,
            })? + "\n";
            std::fs::write(&dest, text).map_err(|e| Error::io(&dest, e))
        };
        if crate::gguf::is_gguf(base_dir) {
            // A GGUF base has no HF files to copy: its config and tokenizer are written out.
            write_config()?;
            crate::Tokenizer::from_gguf(base_dir)?.save_hf_files(staging.path())?;
        }
        for name in COPIED_FILES {
            let src = base_dir.join(name);
            if !src.exists() {
                continue;
            }
            if *name == "config.json" && (quantized || self.config.quantization.is_some()) {
                write_config()?;
                continue;
            }
            std::fs::copy(&src, staging.path().join(name)).map_err(|e| Error::io(&src, e))?;
        }
        if out.exists() {
            // An existing (empty) folder: move the files in.
            for entry in
                std::fs::read_dir(staging.path()).map_err(|e| Error::io(staging.path(), e))?
            {
                let entry = entry.map_err(|e| Error::io(staging.path(), e))?;
                let dest = out.join(entry.file_name());
                std::fs::rename(entry.path(), &dest).map_err(|e| Error::io(&dest, e))?;
            }
        } else {
            std::fs::rename(staging.keep(), out).map_err(|e| Error::io(out, e))?;
        }
        Ok(())
    }

    /// The `quantization_config` describing this model's 4-bit weights (from the first one:
    /// quant type and double quantization), or `None` when no weight is 4-bit.
    pub fn quantization_config(&self) -> Option<lowrank_quant::QuantizationConfig> {
        let q = self
            .layers
            .iter()
            .flat_map(|l| l.projs())
            .find_map(|p| p.linear.base().as_quantized())?;
        let mut qc =
            lowrank_quant::QuantizationConfig::for_4bit(q.kind(), q.is_double_quant(), "float32");
        if let Some(old) = &self.config.quantization {
            // Keep what the base said beyond the fields that describe the tensors.
            qc.bnb_4bit_compute_dtype = old.bnb_4bit_compute_dtype.clone();
            qc.llm_int8_skip_modules = old.llm_int8_skip_modules.clone();
            qc.extra = old.extra.clone();
        }
        Some(qc)
    }

    /// Every weight for a bitsandbytes-layout checkpoint: the 4-bit linears as packed weights,
    /// the rest in the stored dtype, under transformers' names.
    pub fn bnb_checkpoint(&self) -> Result<lowrank_quant::BnbCheckpoint> {
        let dtype = self.stored_dtype;
        let mut ck = lowrank_quant::BnbCheckpoint::default();
        for (name, place) in self.weights() {
            match self.weight(place)? {
                WeightRef::Tensor(t) | WeightRef::Bias(t) => {
                    ck.tensors.insert(name, t.to_dtype(dtype)?);
                }
                WeightRef::Linear(linear) => match linear.base() {
                    BaseWeight::Quantized(q) => {
                        ck.quantized.insert(name, q.as_ref().clone());
                    }
                    BaseWeight::Dense(w) => {
                        ck.tensors.insert(name, w.to_dtype(dtype)?);
                    }
                },
            }
        }
        Ok(ck)
    }

    /// Every weight under its transformers name, in the checkpoint's stored dtype (merged
    /// adapters included), for writing a checkpoint. An error for a model with 4-bit linears
    /// (see [`Self::bnb_checkpoint`]).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dtype = self.stored_dtype;
        self.weights()
            .map(|(name, place)| {
                let tensor = match self.weight(place)? {
                    WeightRef::Tensor(t) | WeightRef::Bias(t) => t,
                    WeightRef::Linear(linear) => linear.weight()?,
                };
                Ok((name, tensor.to_dtype(dtype)?))
            })
            .collect()
    }
}
