//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) and its relatives
//! (Qwen3, Phi-3/3.5/4-mini, Gemma 2, Gemma 3 text) as transformers defines them. What differs
//! per family is configuration ([`ModelConfig`]: q/k norms, fused projections, (1 + w) norms,
//! norms around both blocks, GeGLU, embedding scale, attention scale and soft-capping,
//! per-layer windows and RoPE), not code.
//!
//! Two layer loops run it: the candle loop (`layer.rs`) — differentiable, for training and for
//! forwards over batches of sequences or on other devices — and the inference step on plain
//! buffers (`batched.rs`) that the server, `generate` and every cached one-sequence forward on
//! the CPU take. The candle loop uses fused kernels with a hand-written backward (rms_norm,
//! rope, causal attention, swiglu); only the cached attention, which needs no backward, uses
//! candle's `softmax_last_dim` (`kv_cache.rs`).
//!
//! Files: `layer.rs` (projections, layer weights, the layer forward), `weights.rs` (the
//! checkpoint's weight names, loading, the walk over all weights), `train.rs` (training
//! forward, trainable weights), `inference.rs` (forwards through the cache, logits),
//! `export.rs` (writing a checkpoint).

mod export;
mod inference;
mod layer;
mod train;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lowrank_core::lora::{LinearShape, LoraAdapter};
use lowrank_core::{AdaptedLinear, Error, QuantSpec, QuantizeStats, Result};

pub use crate::active::ActiveAdapter;
use crate::active::AdapterPacks;
use crate::config::ModelConfig;
pub use crate::kv_cache::KvCache;
use crate::rope::Ropes;
pub use export::COPIED_FILES;
pub(crate) use layer::causal_mask;
use layer::Layer;
pub use train::{dropout, TrainContext};

#[derive(Debug, Clone)]
pub struct Llama {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `None` when tied to the embedding.
    lm_head: Option<Tensor>,
    /// The output head in a narrower dtype for inference (see [`Llama::cast_for_inference`]).
    head_for_inference: Option<Tensor>,
    rope: Ropes,
    /// The dtype the checkpoint stores its weights in.
    stored_dtype: DType,
    /// The packs of the adapters inference steps apply (see `active.rs`).
    packs: AdapterPacks,
    /// Weights are trainable `Var`s (full fine-tuning): inference takes the candle loop.
    trainable: bool,
    /// Inference steps round the input of every bf16 linear to bf16 (see
    /// [`Llama::round_activations_to_bf16`]).
    bf16_activations: bool,
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Quantize every linear weight of the decoder layers to 4 bits as it is loaded
    /// (embeddings, norms and lm_head stay full precision, as transformers'
    /// `BitsAndBytesConfig(load_in_4bit=True)`). An error for a checkpoint that is 4-bit already.
    pub quantize: Option<QuantSpec>,
}

/// Memory of the decoder layers' linear weights (biases excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinearMemory {
    pub params: usize,
    pub bytes: usize,
    /// The part of `params` / `bytes` that is 4-bit.
    pub quantized_params: usize,
    pub quantized_bytes: usize,
}

impl LinearMemory {
    /// Bits per parameter of the 4-bit weights (0 when none is).
    pub fn quantized_bits_per_param(&self) -> f64 {
        if self.quantized_params == 0 {
            0.0
        } else {
            self.quantized_bytes as f64 * 8.0 / self.quantized_params as f64
        }
    }

    /// One line for stderr, e.g. `linear weights: 3.2 MB resident for 6.1M parameters (4.13 bits/param, 4-bit)`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "linear weights: {} bytes ({:.2} MB) resident for {} parameters ({:.3} bits/param)",
            self.bytes,
            self.bytes as f64 / 1e6,
            self.params,
            if self.params == 0 {
                0.0
            } else {
                self.bytes as f64 * 8.0 / self.params as f64
            }
        );
        if self.quantized_params > 0 && self.quantized_params < self.params {
            s.push_str(&format!(
                "; 4-bit part: {} bytes for {} parameters ({:.3} bits/param)",
                self.quantized_bytes,
                self.quantized_params,
                self.quantized_bits_per_param()
            ));
        }
        s
    }
}

impl Llama {
    /// Puts the weights that decoding streams every token on 2 MiB pages where the OS allows
    /// (see `lowrank_kernels::huge_pages`). Called whenever they are made anew.
    fn back_weights_with_huge_pages(&self) {
        let mut tensors = vec![&self.embed];
        tensors.extend(&self.lm_head);
        tensors.extend(&self.head_for_inference);
        let mut codes: Vec<&[u8]> = Vec::new();
        for p in self.layers.iter().flat_map(|l| l.projs()) {
            tensors.extend(p.linear.base().as_dense());
            codes.extend(p.linear.base().as_quantized().map(|q| q.packed()));
        }
        lowrank_kernels::back_with_huge_pages(&tensors);
        lowrank_kernels::back_slices_with_huge_pages(&codes);
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn stored_dtype(&self) -> DType {
        self.stored_dtype
    }

    /// Whether any linear weight is 4-bit.
    pub fn is_quantized(&self) -> bool {
        self.layers
            .iter()
            .flat_map(|l| l.projs())
            .any(|p| p.linear.is_quantized())
    }

    /// Resident memory of the decoder layers' linear weights.
    pub fn linear_memory(&self) -> LinearMemory {
        let mut m = LinearMemory::default();
        for p in self.layers.iter().flat_map(|l| l.projs()) {
            let base = p.linear.base();
            let (n, b) = (base.numel(), base.resident_bytes());
            m.params += n;
            m.bytes += b;
            if base.is_quantized() {
                m.quantized_params += n;
                m.quantized_bytes += b;
            }
        }
        m
    }

    /// Quantizes every dense linear weight of the decoder layers to 4 bits (merged adapters
    /// stay in the weights but can no longer be unmerged) and returns the error introduced.
    pub fn quantize_linears(&mut self, spec: &QuantSpec) -> Result<QuantizeStats> {
        self.packs.clear();
        let mut stats = QuantizeStats::default();
        for layer in &mut self.layers {
            for p in layer.projs_mut() {
                stats.add(&p.linear.quantize(spec)?);
            }
        }
        self.back_weights_with_huge_pages();
        Ok(stats)
    }

    /// Replaces every 4-bit linear weight with its dequantized dense weight (for writing a
    /// full-precision checkpoint).
    pub fn dequantize_linears(&mut self) -> Result<()> {
        self.packs.clear();
        let device = self.device().clone();
        for layer in &mut self.layers {
            for p in layer.projs_mut() {
                if p.linear.is_quantized() {
                    let w = p.linear.base().to_dense(&device)?;
                    p.linear.set_weight(w)?;
                }
            }
        }
        Ok(())
    }

    /// Every linear layer adapters can attach to, with its module key and shape.
    pub fn linears(&self) -> Vec<LinearShape> {
        self.layers
            .iter()
            .flat_map(|l| l.projs())
            .map(|p| {
                let (out_features, in_features) = p.linear.shape();
                LinearShape {
                    name: p.name.clone(),
                    out_features,
                    in_features,
                }
            })
            .collect()
    }

    /// The linear layer with module key `name`.
    pub fn linear(&self, name: &str) -> Option<&AdaptedLinear> {
        self.layers
            .iter()
            .flat_map(|l| l.projs())
            .find(|p| p.name == name)
            .map(|p| &p.linear)
    }

    /// Loads a PEFT adapter folder checked against this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<LoraAdapter> {
        let adapter = LoraAdapter::load(dir, &self.linears(), self.device())?;
        adapter.back_with_huge_pages();
        Ok(adapter)
    }

    /// Folds `adapter` (times `weight`) into the base weights.
    pub fn merge_adapter(
        &mut self,
        name: &str,
        adapter: &LoraAdapter,
        coefficient: f64,
    ) -> Result<()> {
        self.packs.clear();
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                if let Some(module) = adapter.modules.get(&proj.name) {
                    proj.linear.merge(name, module, coefficient)?;
                }
            }
        }
        self.back_weights_with_huge_pages();
        Ok(())
    }

    /// Undoes the most recent merge of adapter `name` in every layer it touched.
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        self.packs.clear();
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                if proj.linear.merged_adapters().last() == Some(name) {
                    proj.linear.unmerge()?;
                }
            }
        }
        self.back_weights_with_huge_pages();
        Ok(())
    }

    /// The linear layer with module key `name`, to replace its weight (PiSSA/OLoRA, training).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut AdaptedLinear> {
        self.packs.clear();
        self.layers
            .iter_mut()
            .flat_map(|l| l.projs_mut())
            .find(|p| p.name == name)
            .map(|p| &mut p.linear)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings (batch, seq, hidden), in f32 (a bf16 table's rows widened), scaled
    /// as the family does (Gemma: by √hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((batch, seq, self.config.hidden_size))?;
        match self.config.embed_scale {
            Some(scale) => Ok((x * scale as f64)?),
            None => Ok(x),
        }
    }

    /// Checks that a token id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(t) => Err(Error::Msg(format!(
                "token id {t} is outside the model's vocabulary of {}",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

#[path = "batched.rs"]
mod batched;
pub use batched::RowStep;
