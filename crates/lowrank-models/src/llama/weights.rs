//! The checkpoint's weights in the model: their transformers names ([`WeightPlace::name`]),
//! loading them, and one walk over all of them ([`Llama::weights`]) that writing a checkpoint
//! and full fine-tuning share.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lowrank_core::{AdaptedLinear, Error, Result};

use super::layer::{mlp_norm_names, proj_specs, Layer, Proj, INPUT_NORM, K_NORM, Q_NORM};
use super::{Llama, LoadOptions};
use crate::active::{AdapterPacks, PROJ_NAMES, SLOTS_PER_LAYER};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::rope::Ropes;

/// Where a checkpoint weight lives in the model.
#[derive(Debug, Clone, Copy)]
pub(super) enum WeightPlace {
    Embed,
    /// A decoder layer's norm, by its module key suffix (see `Layer::norms`).
    LayerNorm {
        layer: usize,
        suffix: &'static str,
    },
    /// The weight of a decoder layer's projection of `kind`.
    Linear {
        layer: usize,
        kind: usize,
    },
    /// The bias of a decoder layer's projection of `kind`.
    Bias {
        layer: usize,
        kind: usize,
    },
    FinalNorm,
    LmHead,
}

impl WeightPlace {
    /// The weight's name in a transformers checkpoint.
    pub(super) fn name(self) -> String {
        match self {
            WeightPlace::Embed => "model.embed_tokens.weight".into(),
            WeightPlace::LayerNorm { layer, suffix } => {
                format!("model.layers.{layer}.{suffix}.weight")
            }
            WeightPlace::Linear { layer, kind } => {
                format!("{}.weight", proj_name(layer, kind))
            }
            WeightPlace::Bias { layer, kind } => format!("{}.bias", proj_name(layer, kind)),
            WeightPlace::FinalNorm => "model.norm.weight".into(),
            WeightPlace::LmHead => "lm_head.weight".into(),
        }
    }
}

/// The module key of layer `layer`'s projection of `kind`.
fn proj_name(layer: usize, kind: usize) -> String {
    format!("model.layers.{layer}.{}", PROJ_NAMES[kind])
}

/// A weight as the model holds it.
pub(super) enum WeightRef<'a> {
    /// The embedding, a norm or the output head.
    Tensor(&'a Tensor),
    /// A projection's weight, dense or 4-bit.
    Linear(&'a AdaptedLinear),
    Bias(&'a Tensor),
}

/// A weight as the model holds it, to replace.
pub(super) enum WeightMut<'a> {
    Tensor(&'a mut Tensor),
    Linear(&'a mut AdaptedLinear),
    /// The bias of this linear.
    Bias(&'a mut AdaptedLinear),
}

impl Llama {
    /// Every weight of the model with its transformers name, in checkpoint order: the
    /// embedding; each layer's norms (in `Layer::norms` order), then its projections' weights
    /// and biases; the final norm; lm_head unless tied.
    pub(super) fn weights(&self) -> impl Iterator<Item = (String, WeightPlace)> + '_ {
        let layers = self.layers.iter().enumerate().flat_map(|(i, layer)| {
            let norms = layer
                .norms()
                .into_iter()
                .map(move |(suffix, _)| WeightPlace::LayerNorm { layer: i, suffix });
            let projs = layer.projs().iter().flat_map(move |p| {
                let kind = p.kind;
                let bias = p
                    .linear
                    .bias()
                    .map(|_| WeightPlace::Bias { layer: i, kind });
                std::iter::once(WeightPlace::Linear { layer: i, kind }).chain(bias)
            });
            norms.chain(projs)
        });
        std::iter::once(WeightPlace::Embed)
            .chain(layers)
            .chain([WeightPlace::FinalNorm])
            .chain(self.lm_head.as_ref().map(|_| WeightPlace::LmHead))
            .map(|place| (place.name(), place))
    }

    /// The weight at `place`, which [`Self::weights`] yielded.
    pub(super) fn weight(&self, place: WeightPlace) -> Result<WeightRef<'_>> {
        let missing = || Error::Msg(format!("the model has no {}", place.name()));
        Ok(match place {
            WeightPlace::Embed => WeightRef::Tensor(&self.embed),
            WeightPlace::LayerNorm { layer, suffix } => {
                let norms = self.layers.get(layer).ok_or_else(missing)?.norms();
                let w = norms.into_iter().find(|(s, _)| *s == suffix);
                WeightRef::Tensor(w.ok_or_else(missing)?.1)
            }
            WeightPlace::Linear { layer, kind } => {
                WeightRef::Linear(&self.proj_at(layer, kind).ok_or_else(missing)?.linear)
            }
            WeightPlace::Bias { layer, kind } => {
                let proj = self.proj_at(layer, kind).ok_or_else(missing)?;
                WeightRef::Bias(proj.linear.bias().ok_or_else(missing)?)
            }
            WeightPlace::FinalNorm => WeightRef::Tensor(&self.norm),
            WeightPlace::LmHead => WeightRef::Tensor(self.lm_head.as_ref().ok_or_else(missing)?),
        })
    }

    /// The weight at `place`, which [`Self::weights`] yielded, to replace.
    pub(super) fn weight_mut(&mut self, place: WeightPlace) -> Result<WeightMut<'_>> {
        let missing = || Error::Msg(format!("the model has no {}", place.name()));
        Ok(match place {
            WeightPlace::Embed => WeightMut::Tensor(&mut self.embed),
            WeightPlace::LayerNorm { layer, suffix } => {
                let norms = self.layers.get_mut(layer).ok_or_else(missing)?.norms_mut();
                let w = norms.into_iter().find(|(s, _)| *s == suffix);
                WeightMut::Tensor(w.ok_or_else(missing)?.1)
            }
            WeightPlace::Linear { layer, kind } => {
                WeightMut::Linear(&mut self.proj_at_mut(layer, kind).ok_or_else(missing)?.linear)
            }
            WeightPlace::Bias { layer, kind } => {
                WeightMut::Bias(&mut self.proj_at_mut(layer, kind).ok_or_else(missing)?.linear)
            }
            WeightPlace::FinalNorm => WeightMut::Tensor(&mut self.norm),
            WeightPlace::LmHead => WeightMut::Tensor(self.lm_head.as_mut().ok_or_else(missing)?),
        })
    }

    fn proj_at(&self, layer: usize, kind: usize) -> Option<&Proj> {
        self.layers.get(layer)?.proj(kind)
    }

    fn proj_at_mut(&mut self, layer: usize, kind: usize) -> Option<&mut Proj> {
        let projs = self.layers.get_mut(layer)?.projs_mut();
        projs.iter_mut().find(|p| p.kind == kind)
    }

    /// Loads a checkpoint folder (config.json + safetensors) with weights in f32 (4-bit
    /// linears of a pre-quantized bitsandbytes checkpoint stay 4-bit).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, &LoadOptions::default())
    }

    /// Loads a checkpoint folder, quantizing the linear weights at load if `opts` says so.
    /// `dir` may also be a GGUF file (see [`crate::gguf`]): its tensors are dequantized to f32.
    pub fn load_with(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            let model = crate::gguf::GgufModel::open(dir)?;
            let config = model.config()?;
            let ckpt = Checkpoint::from_gguf(model, &config);
            return Self::from_checkpoint_with(config, &ckpt, device, opts);
        }
        let config = ModelConfig::load(&dir.join("config.json"))?;
        if opts.quantize.is_some() && config.quantization.is_some() {
            return Err(Error::file(
                dir,
                "the checkpoint is 4-bit quantized already (quantization_config in config.json); drop --quantize",
            ));
        }
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint_with(config, &ckpt, device, opts)
    }

    pub fn from_checkpoint(
        config: ModelConfig,
        ckpt: &Checkpoint,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint_with(config, ckpt, device, &LoadOptions::default())
    }

    /// Builds the model from an open checkpoint. Linear weights stored 4-bit in the
    /// bitsandbytes layout are kept packed; with `opts.quantize` each dense linear weight is
    /// quantized as soon as it is read, so the dense copy of one weight at most is resident.
    pub fn from_checkpoint_with(
        config: ModelConfig,
        ckpt: &Checkpoint,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let load = |place: WeightPlace, shape: &[usize]| {
            ckpt.load(&place.name(), shape, DType::F32, device)
        };
        let embed = load(WeightPlace::Embed, &[vocab, h])?;
        let stored_dtype = ckpt
            .stored_dtype(&WeightPlace::Embed.name())
            .unwrap_or(DType::F32);
        // Not `with_capacity(num_layers)`: config.json's count is checked only by the tensors
        // found, and a huge one would abort on the allocation.
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            layers.push(load_layer(&config, ckpt, device, opts, i)?);
        }
        let norm = load(WeightPlace::FinalNorm, &[h])?;
        let lm_head = (!config.tie_word_embeddings)
            .then(|| load(WeightPlace::LmHead, &[vocab, h]))
            .transpose()?;
        let rope = Ropes::new(&config, device)?;
        let model = Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            head_for_inference: None,
            rope,
            stored_dtype,
            packs: AdapterPacks::default(),
            trainable: false,
            bf16_activations: false,
        };
        model.back_weights_with_huge_pages();
        Ok(model)
    }
}

/// Reads decoder layer `i` (see [`Llama::from_checkpoint_with`]).
fn load_layer(
    config: &ModelConfig,
    ckpt: &Checkpoint,
    device: &Device,
    opts: &LoadOptions,
    i: usize,
) -> Result<Layer> {
    let dtype = DType::F32;
    let specs = proj_specs(config);
    let mut projs = Vec::with_capacity(specs.len());
    for spec in &specs {
        let (out_f, in_f, kind) = (spec.out_features, spec.in_features, spec.kind);
        let weight_name = WeightPlace::Linear { layer: i, kind }.name();
        let bias = if spec.bias {
            let name = WeightPlace::Bias { layer: i, kind }.name();
            Some(ckpt.load(&name, &[out_f], dtype, device)?)
        } else {
            None
        };
        let linear = if ckpt.is_quantized(&weight_name) {
            let q = ckpt.load_quantized(&weight_name, &[out_f, in_f])?;
            AdaptedLinear::new_quantized(Arc::new(q), bias)?
        } else {
            let weight = ckpt.load(&weight_name, &[out_f, in_f], dtype, device)?;
            let mut linear = AdaptedLinear::new(weight, bias);
            if let Some(spec) = &opts.quantize {
                linear.quantize(spec)?;
            }
            linear
        };
        projs.push(Proj {
            name: proj_name(i, kind),
            kind,
            slot: SLOTS_PER_LAYER * i + kind,
            linear,
        });
    }
    let norm = |suffix: &'static str, width: usize| {
        let name = WeightPlace::LayerNorm { layer: i, suffix }.name();
        ckpt.load(&name, &[width], dtype, device)
    };
    let head_norm = |suffix| {
        config
            .qk_norm
            .then(|| norm(suffix, config.head_dim))
            .transpose()
    };
    let h = config.hidden_size;
    let sandwich = config.sandwich_norms;
    let (mlp, [attn_out, mlp_out]) = mlp_norm_names(sandwich);
    Ok(Layer {
        input_norm: norm(INPUT_NORM, h)?,
        mlp_norm: norm(mlp, h)?,
        attn_out_norm: sandwich.then(|| norm(attn_out, h)).transpose()?,
        mlp_out_norm: sandwich.then(|| norm(mlp_out, h)).transpose()?,
        q_norm: head_norm(Q_NORM)?,
        k_norm: head_norm(K_NORM)?,
        projs,
    })
}
