//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) and its relatives
//! (Qwen3, Phi-3/3.5/4-mini, Gemma 2, Gemma 3 text) as transformers defines them — what differs
//! per family is configuration (`ModelConfig`: q/k norms, fused projections, (1 + w) norms and
//! norms around both blocks, GeGLU, embedding scale, attention scale and soft-capping, per-layer
//! windows and RoPE) — in two layer loops: one of differentiable candle ops (training, the forward
//! without a cache, batches of sequences in one cache, other devices) — fused candle ops
//! without backward (rms_norm, softmax_last_dim, rope) are deliberately not used there — and
//! the inference step on plain buffers (`batched.rs`) that the server's batches, `generate`
//! and every cached forward of one sequence on the CPU take.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use lowrank_core::lora::{LinearShape, LoraAdapter};
use lowrank_core::{ActiveModule, AdaptedLinear, Error, QuantSpec, QuantizeStats, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use crate::active::ActiveAdapter;
use crate::active::{kind, AdapterPacks, PROJ_NAMES, SLOTS_PER_LAYER};
use crate::checkpoint::Checkpoint;
use crate::config::{Activation, ModelConfig};
pub use crate::kv_cache::KvCache;
use crate::rope::{LayerTables, RopeTables, Ropes};

/// A linear layer with its module key, so adapters find their tensors for it.
#[derive(Debug, Clone)]
struct Proj {
    name: String,
    /// Its place in [`PROJ_NAMES`] (see [`kind`]).
    kind: usize,
    /// [`SLOTS_PER_LAYER`] × layer + kind: the module key `model.layers.{layer}.{name}` as a
    /// number (see `active::proj_slot`).
    slot: usize,
    linear: AdaptedLinear,
}

impl Proj {
    /// Training forward: with `dropout_seed`, LoRA dropout (the adapter's `lora_dropout`) on
    /// the adapters' input, from a mask seeded by (seed, module name) so a recomputation
    /// (gradient checkpointing) draws the same mask.
    fn forward_train(
        &self,
        x: &Tensor,
        adapters: &[ActiveAdapter],
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let active = self.active(adapters);
        let Some(seed) = dropout_seed.filter(|_| !active.is_empty()) else {
            return self.linear.forward(x, &active);
        };
        let p = adapters
            .iter()
            .find(|a| a.adapter.modules.contains_key(&self.name))
            .map_or(0.0, |a| a.adapter.config.dropout);
        if p > 0.0 {
            let dropped = dropout(x, p, mix_seed(seed, &self.name))?;
            self.linear.forward_dropped(x, &active, Some(&dropped))
        } else {
            self.linear.forward(x, &active)
        }
    }
}

impl Proj {
    /// The modules of `adapters` that apply to this projection, with their weights.
    fn active<'a>(&self, adapters: &'a [ActiveAdapter]) -> Vec<ActiveModule<'a>> {
        adapters
            .iter()
            .filter_map(|a| {
                a.module(self.slot).map(|module| ActiveModule {
                    module,
                    weight: a.weight,
                })
            })
            .collect()
    }
}

/// A seed for one module's dropout mask from the call's seed and the module name (FNV-1a).
fn mix_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Inverted dropout as torch's: each element kept with probability 1 − p and scaled by
/// 1/(1 − p), from a seeded generator.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    /// RMSNorm weights (head_dim) over each query / key head before RoPE (Qwen3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// The MLP's input norm (`post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    mlp_norm: Tensor,
    /// Gemma 2: norms of the attention's and the MLP's outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    attn_out_norm: Option<Tensor>,
    mlp_out_norm: Option<Tensor>,
    /// The layer's linears in [`proj_specs`] order: q, k, v (or the fused qkv), o, gate, up (or
    /// the fused gate_up), down.
    projs: Vec<Proj>,
}

/// The module key suffixes of a layer's norm weights.
const INPUT_NORM: &str = "input_layernorm";
const POST_ATTENTION_NORM: &str = "post_attention_layernorm";
const PRE_FEEDFORWARD_NORM: &str = "pre_feedforward_layernorm";
const POST_FEEDFORWARD_NORM: &str = "post_feedforward_layernorm";
const Q_NORM: &str = "self_attn.q_norm";
const K_NORM: &str = "self_attn.k_norm";

/// The names of the MLP's input norm and of the attention's and MLP's output norms: Llama's
/// `post_attention_layernorm` is the MLP's input norm; with norms around both blocks (Gemma 2)
/// that name is the attention output's and the MLP's input norm is `pre_feedforward_layernorm`.
fn mlp_norm_names(sandwich: bool) -> (&'static str, [&'static str; 2]) {
    if sandwich {
        (
            PRE_FEEDFORWARD_NORM,
            [POST_ATTENTION_NORM, POST_FEEDFORWARD_NORM],
        )
    } else {
        (POST_ATTENTION_NORM, ["", ""])
    }
}

impl Layer {
    /// The layer's norm weights with their module key suffixes (the weight is
    /// `model.layers.{i}.{suffix}.weight`), in one order for every walk over them: input, MLP
    /// input, [attention output, MLP output], [q, k].
    fn norms(&self) -> Vec<(&'static str, &Tensor)> {
        let (mlp, [attn_out, mlp_out]) = mlp_norm_names(self.attn_out_norm.is_some());
        let mut out = vec![(INPUT_NORM, &self.input_norm), (mlp, &self.mlp_norm)];
        out.extend(self.attn_out_norm.as_ref().map(|w| (attn_out, w)));
        out.extend(self.mlp_out_norm.as_ref().map(|w| (mlp_out, w)));
        out.extend(self.q_norm.as_ref().map(|w| (Q_NORM, w)));
        out.extend(self.k_norm.as_ref().map(|w| (K_NORM, w)));
        out
    }

    fn norms_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let (mlp, [attn_out, mlp_out]) = mlp_norm_names(self.attn_out_norm.is_some());
        let mut out = vec![
            (INPUT_NORM, &mut self.input_norm),
            (mlp, &mut self.mlp_norm),
        ];
        out.extend(self.attn_out_norm.as_mut().map(|w| (attn_out, w)));
        out.extend(self.mlp_out_norm.as_mut().map(|w| (mlp_out, w)));
        out.extend(self.q_norm.as_mut().map(|w| (Q_NORM, w)));
        out.extend(self.k_norm.as_mut().map(|w| (K_NORM, w)));
        out
    }

    fn projs(&self) -> &[Proj] {
        &self.projs
    }

    fn projs_mut(&mut self) -> &mut [Proj] {
        &mut self.projs
    }

    /// The projection of `kind`, if the layer has one.
    fn proj(&self, kind: usize) -> Option<&Proj> {
        self.projs.iter().find(|p| p.kind == kind)
    }

    /// The projection of `kind`, which every layer of this model has.
    fn expect_proj(&self, kind: usize) -> Result<&Proj> {
        self.proj(kind)
            .ok_or_else(|| Error::Msg(format!("the layer has no {} projection", PROJ_NAMES[kind])))
    }
}

/// What a training forward needs besides the ids: rotary tables for the positions, the
/// attention mask and the dropout seed.
#[derive(Debug, Clone)]
pub struct TrainContext {
    tables: LayerTables<RopeTables>,
    /// Additive, broadcastable to (batch, kv_heads, group, seq, seq), for packed rows;
    /// `None` = causal.
    mask: Option<Tensor>,
    /// `Some` in training mode: LoRA dropout is applied, seeded by this.
    dropout_seed: Option<u64>,
}

/// A Llama-family causal language model.
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
}

/// One linear of a layer: its kind, (out, in) and whether it has a bias.
struct ProjSpec {
    kind: usize,
    out_features: usize,
    in_features: usize,
    bias: bool,
}

/// The linears of every layer of a model of `c`, in `Layer::projs` order.
fn proj_specs(c: &ModelConfig) -> Vec<ProjSpec> {
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let spec = |kind, out_features, in_features, bias| ProjSpec {
        kind,
        out_features,
        in_features,
        bias,
    };
    if c.fused_projections {
        vec![
            spec(kind::QKV, q + 2 * kv, h, c.qkv_bias),
            spec(kind::O, h, q, c.o_bias),
            spec(kind::GATE_UP, 2 * i, h, c.mlp_bias),
            spec(kind::DOWN, h, i, c.mlp_bias),
        ]
    } else {
        vec![
            spec(kind::Q, q, h, c.qkv_bias),
            spec(kind::K, kv, h, c.qkv_bias),
            spec(kind::V, kv, h, c.qkv_bias),
            spec(kind::O, h, q, c.o_bias),
            spec(kind::GATE, i, h, c.mlp_bias),
            spec(kind::UP, i, h, c.mlp_bias),
            spec(kind::DOWN, h, i, c.mlp_bias),
        ]
    }
}

const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Files a written checkpoint copies unchanged from its base.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// RMSNorm through the fused kernel (hand-written backward; candle's own has none).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(lowrank_kernels::rms_norm(x, weight, eps as f32)?)
}

/// Additive causal mask (seq, past+seq): 0 where query i may see key j, -inf elsewhere.
pub(crate) fn causal_mask(
    seq: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let total = past + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            let q = past + i;
            (0..total).map(move |j| {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
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
            return Err(Error::Msg(format!(
                "{}: the checkpoint is 4-bit quantized already (quantization_config in config.json); drop --quantize",
                dir.display()
            )));
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
        let dtype = DType::F32;
        let h = config.hidden_size;
        let embed = ckpt.load(EMBED, &[config.vocab_size, h], dtype, device)?;
        let stored_dtype = ckpt.stored_dtype(EMBED).unwrap_or(DType::F32);
        // Not `with_capacity(num_layers)`: config.json's count is checked only by the tensors
        // found, and a huge one would abort on the allocation.
        let mut layers = Vec::new();
        let specs = proj_specs(&config);
        for i in 0..config.num_layers {
            let prefix = format!("model.layers.{i}");
            let mut projs = Vec::with_capacity(specs.len());
            for spec in &specs {
                let (out_f, in_f) = (spec.out_features, spec.in_features);
                let name = format!("{prefix}.{}", PROJ_NAMES[spec.kind]);
                let weight_name = format!("{name}.weight");
                let bias = if spec.bias {
                    Some(ckpt.load(&format!("{name}.bias"), &[out_f], dtype, device)?)
                } else {
                    None
                };
                let linear = if ckpt.is_quantized(&weight_name) {
                    let q = ckpt.load_quantized(&weight_name, &[out_f, in_f])?;
                    AdaptedLinear::new_quantized(std::sync::Arc::new(q), bias)?
                } else {
                    let weight = ckpt.load(&weight_name, &[out_f, in_f], dtype, device)?;
                    let mut linear = AdaptedLinear::new(weight, bias);
                    if let Some(spec) = &opts.quantize {
                        linear.quantize(spec)?;
                    }
                    linear
                };
                projs.push(Proj {
                    name,
                    kind: spec.kind,
                    slot: SLOTS_PER_LAYER * i + spec.kind,
                    linear,
                });
            }
            let norm = |suffix: &str, width: usize| {
                ckpt.load(
                    &format!("{prefix}.{suffix}.weight"),
                    &[width],
                    dtype,
                    device,
                )
            };
            let head_norm = |suffix: &str| {
                config
                    .qk_norm
                    .then(|| norm(suffix, config.head_dim))
                    .transpose()
            };
            let sandwich = config.sandwich_norms;
            let (mlp, [attn_out, mlp_out]) = mlp_norm_names(sandwich);
            layers.push(Layer {
                input_norm: norm(INPUT_NORM, h)?,
                mlp_norm: norm(mlp, h)?,
                attn_out_norm: sandwich.then(|| norm(attn_out, h)).transpose()?,
                mlp_out_norm: sandwich.then(|| norm(mlp_out, h)).transpose()?,
                q_norm: head_norm(Q_NORM)?,
                k_norm: head_norm(K_NORM)?,
                projs,
            });
        }
        let norm = ckpt.load(NORM, &[h], dtype, device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(ckpt.load(LM_HEAD, &[config.vocab_size, h], dtype, device)?)
        };
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
        };
        model.back_weights_with_huge_pages();
        Ok(model)
    }

    /// Puts the weights that decoding streams every token on 2 MiB pages where the OS allows
    /// (see `lowrank_kernels::huge_pages`). Called whenever they are made anew.
    fn back_weights_with_huge_pages(&self) {
        let mut tensors = vec![&self.embed];
        tensors.extend(&self.lm_head);
        tensors.extend(&self.head_for_inference);
        for p in self.layers.iter().flat_map(|l| l.projs()) {
            tensors.extend(p.linear.base().as_dense());
        }
        lowrank_kernels::back_with_huge_pages(&tensors);
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
    pub fn merge_adapter(&mut self, name: &str, adapter: &LoraAdapter, weight: f64) -> Result<()> {
        self.packs.clear();
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                if let Some(module) = adapter.modules.get(&proj.name) {
                    proj.linear.merge(name, module, weight)?;
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

    /// Turns every weight (embedding, norms, linears, biases, lm_head) into a trainable `Var`,
    /// returned under its transformers name; the model then computes with the `Var`s' tensors,
    /// so updates through `Var::set` are seen by the next forward.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        if self.is_quantized() {
            return Err(Error::Msg(
                "full fine-tuning needs dense weights; a 4-bit base trains adapters only (LoRA/DoRA)".into(),
            ));
        }
        self.packs.clear();
        self.trainable = true;
        let mut out = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            out.push((name, v));
            Ok(())
        };
        var(EMBED.to_string(), &mut self.embed)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (suffix, w) in layer.norms_mut() {
                var(format!("model.layers.{i}.{suffix}.weight"), w)?;
            }
            for p in layer.projs_mut() {
                let mut w = p.linear.weight()?.clone();
                var(format!("{}.weight", p.name), &mut w)?;
                p.linear.set_weight(w)?;
                if let Some(b) = p.linear.bias() {
                    let mut b = b.clone();
                    var(format!("{}.bias", p.name), &mut b)?;
                    p.linear.set_bias(b)?;
                }
            }
        }
        var(NORM.to_string(), &mut self.norm)?;
        if let Some(head) = &mut self.lm_head {
            var(LM_HEAD.to_string(), head)?;
        }
        Ok(out)
    }

    /// The context of a training forward over (batch, seq) ids. `positions` (batch, seq) u32
    /// and `mask` (additive, (batch, 1, 1, seq, seq)) describe packed rows; without them
    /// positions are 0..seq and the mask is causal (right padding needs nothing more: no real
    /// token attends to a later pad). `dropout_seed` turns LoRA dropout on.
    pub fn train_context(
        &self,
        batch: usize,
        seq: usize,
        positions: Option<&Tensor>,
        mask: Option<Tensor>,
        dropout_seed: Option<u64>,
    ) -> Result<TrainContext> {
        let tables = match positions {
            Some(p) => {
                if p.dims() != [batch, seq] {
                    return Err(Error::Msg(format!(
                        "positions have shape {:?}, expected [{batch}, {seq}]",
                        p.dims()
                    )));
                }
                self.rope.tables_for(p)?
            }
            None => self.rope.tables(0, seq)?,
        };
        Ok(TrainContext {
            tables,
            mask,
            dropout_seed,
        })
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

    /// RMSNorm of x with weight w, (1 + w) for Gemma.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.config.norm_plus_one {
            rms_norm(x, &w.affine(1.0, 1.0)?, eps)
        } else {
            rms_norm(x, w, eps)
        }
    }

    /// Decoder layer `index` in training mode (no cache; LoRA dropout if the context asks).
    pub fn train_layer(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &TrainContext,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let layer = self
            .layers
            .get(index)
            .ok_or_else(|| Error::Msg(format!("layer {index} out of range")))?;
        // Each layer draws its own dropout masks.
        let seed = ctx
            .dropout_seed
            .map(|s| mix_seed(s, &format!("layer{index}")));
        self.layer_forward_impl(
            index,
            layer,
            x,
            &ctx.tables,
            ctx.mask.as_ref(),
            None,
            adapters,
            seed,
        )
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm(x, &self.norm)
    }

    /// Final normalized hidden states of a training forward: embed, every layer, norm.
    pub fn hidden_states_train(
        &self,
        ids: &Tensor,
        ctx: &TrainContext,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for i in 0..self.layers.len() {
            x = self.train_layer(i, &x, ctx, adapters)?;
        }
        self.final_norm(&x)
    }

    /// Writes a complete Hugging Face checkpoint folder: the weights (merged adapters
    /// included) as `model.safetensors` in the stored dtype, and config/tokenizer files copied
    /// from `base_dir` (or, from a GGUF base, written from its metadata). Staged in a temporary sibling folder and renamed, so a failed run
    /// leaves nothing half-written. `out` must not hold a checkpoint already.
    pub fn save_pretrained(&self, base_dir: &Path, out: &Path) -> Result<()> {
        if out.join("model.safetensors").exists() || out.join("config.json").exists() {
            return Err(Error::Msg(format!(
                "{}: already holds a checkpoint; choose an empty folder",
                out.display()
            )));
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
                .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
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
                qc.insert_into(&mut cfg)
                    .map_err(|e| Error::Msg(e.to_string()))?;
            }
            let text =
                serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))? + "\n";
            let dest = staging.path().join("config.json");
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

    /// Logits (batch, seq, vocab) for token ids (batch, seq), continuing from `cache` if given.
    /// One sequence with a cache, on the CPU over frozen weights, takes the batched step with
    /// one row (`batched.rs`); anything else the candle layer loop.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        self.forward_for(ids, cache, adapters, Outputs::All)
    }

    /// Logits (batch, vocab) of the last position only, as [`Self::forward`] computes them:
    /// a prompt's forward in decoding, which needs no logits for the other positions (the head
    /// is a fifth of a SmolLM-135M-sized model's prefill work).
    pub fn forward_last(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        self.forward_for(ids, cache, adapters, Outputs::Last)
    }

    /// [`Self::forward`] with logits for the positions `outputs` names.
    fn forward_for(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
        outputs: Outputs,
    ) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        if seq == 0 {
            return Err(Error::Msg("a forward needs at least one token".into()));
        }
        let packs = if batch == 1 && cache.is_some() && self.steps_on_host() {
            self.packs_of(adapters)?
        } else {
            None
        };
        match (cache, packs) {
            (Some(cache), Some(adapters)) => {
                let tokens = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut rows = [PackedRow {
                    tokens: std::borrow::Cow::Borrowed(&tokens),
                    cache,
                    adapters,
                }];
                let logits = self.step(&mut rows, outputs)?;
                match outputs {
                    Outputs::All => Ok(logits.unsqueeze(0)?),
                    Outputs::Last => Ok(logits),
                }
            }
            (cache, _) => {
                let hidden = self.hidden_states(ids, cache, adapters)?;
                match outputs {
                    Outputs::All => self.logits(&hidden),
                    Outputs::Last => self.logits(&hidden.narrow(1, seq - 1, 1)?.squeeze(1)?),
                }
            }
        }
    }

    /// The packs of `adapters` with their weights, or `None` when one cannot be packed.
    fn packs_of(&self, adapters: &[ActiveAdapter]) -> Result<Option<RowAdapters>> {
        let base = |slot| self.slot_base(slot);
        let mut packs = Vec::with_capacity(adapters.len());
        for a in adapters {
            match a.pack(&self.packs, &base)? {
                Some(pack) => packs.push((pack, a.weight)),
                None => return Ok(None),
            }
        }
        Ok(Some(packs))
    }

    /// The final normalized hidden states (batch, seq, hidden), by the candle layer loop.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let seq = ids.dims2()?.1;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(original) = self.rope.long_threshold() {
            if past > 0 && past <= original && past + seq > original {
                return Err(Error::Msg(format!(
                    "a LongRoPE model's cached sequence crossing {original} positions must be recomputed whole (the batched step on the CPU does that); start a new cache with the whole sequence"
                )));
            }
        }
        let mut x = self.embed(ids)?;
        let tables = self.rope.tables(past, seq)?;
        let mut cache = cache;
        for (i, layer) in self.layers.iter().enumerate() {
            // No mask: causal (and windowed) attention, done by the fused kernel.
            x = self.layer_forward_impl(
                i,
                layer,
                &x,
                &tables,
                None,
                cache.as_deref_mut(),
                adapters,
                None,
            )?;
        }
        self.norm(&x, &self.norm)
    }

    /// The output head's weight (vocab × hidden): lm_head, or the embedding when tied.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Projects hidden states to vocabulary logits (soft-capped where the family does).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // Through the base-weight path: the decoding GEMV for one row, the frozen-linear
        // kernel otherwise (candle's matmul when the head is being trained).
        let head = self
            .head_for_inference
            .as_ref()
            .unwrap_or(self.head_weight());
        let logits = lowrank_core::BaseWeight::Dense(head.clone()).matmul_t(hidden)?;
        match self.config.final_softcap {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// Stores the decoder layers' frozen linear weights, the embedding table and the output
    /// head in `dtype` for inference — bf16: half the memory and half the bytes each decoding
    /// step reads, products still accumulated in f32 (a tied head is the embedding table, kept
    /// once). Embedding lookups widen their rows to f32; norms stay as they are, 4-bit layers
    /// stay 4-bit (so over a 4-bit base this halves the embedding and head), and adapters must
    /// be merged before (merging into bf16 is refused).
    pub fn cast_for_inference(&mut self, dtype: DType) -> Result<()> {
        self.packs.clear();
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                proj.linear.cast_base(dtype)?;
            }
        }
        self.embed = self.embed.to_dtype(dtype)?;
        let head = self.head_weight();
        self.head_for_inference = (head.dtype() != dtype)
            .then(|| head.to_dtype(dtype))
            .transpose()?;
        self.back_weights_with_huge_pages();
        Ok(())
    }

    /// Mixed-precision training: every decoder layer's frozen dense linear weight stored in
    /// bf16, its matmuls fed bf16 inputs with f32 accumulation (see
    /// `AdaptedLinear::compute_in_bf16`). Embeddings, norms and the head stay as they are.
    pub fn compute_in_bf16(&mut self) -> Result<()> {
        self.packs.clear();
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                proj.linear.compute_in_bf16()?;
            }
        }
        Ok(())
    }

    /// Decoder layer `index`: with `dropout_seed`, in training mode (LoRA dropout).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward_impl(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        rope: &LayerTables<RopeTables>,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let proj = |p: &Proj, x: &Tensor, n: u64| {
            p.forward_train(x, adapters, dropout_seed.map(|s| s.wrapping_add(n)))
        };
        let c = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = heads / kv_heads;

        let normed = self.norm(x, &layer.input_norm)?;
        let split_heads = |t: Tensor, n: usize| lowrank_kernels::split_heads(&t, n);
        let (q, k, v) = match layer.proj(kind::QKV) {
            // Phi-3: [q; k; v] by output rows.
            Some(qkv) => {
                let qkv = proj(qkv, &normed, kind::QKV as u64)?;
                let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
                (
                    qkv.narrow(D::Minus1, 0, q_width)?,
                    qkv.narrow(D::Minus1, q_width, kv_width)?,
                    qkv.narrow(D::Minus1, q_width + kv_width, kv_width)?,
                )
            }
            None => (
                proj(layer.expect_proj(kind::Q)?, &normed, kind::Q as u64)?,
                proj(layer.expect_proj(kind::K)?, &normed, kind::K as u64)?,
                proj(layer.expect_proj(kind::V)?, &normed, kind::V as u64)?,
            ),
        };
        let head_norm = |t: Tensor, w: &Option<Tensor>| match w {
            Some(w) => self.norm(&t, w),
            None => Ok(t),
        };
        let q = head_norm(split_heads(q, heads)?, &layer.q_norm)?;
        let k = head_norm(split_heads(k, kv_heads)?, &layer.k_norm)?;
        let v = split_heads(v, kv_heads)?;
        let window = c.layer_windows[index];
        let rope = rope.of(window.is_some());
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        if let Some(cache) = cache {
            let attn = lowrank_kernels::merge_heads(&cache.append(index, k, v)?.attend(
                &q,
                c.attention_scale,
                window,
                c.attention_softcap,
            )?)?;
            return self.layer_rest(layer, x, &attn, &proj);
        }
        let total = k.dim(2)?;
        let scale = c.attention_scale;
        let attn = match (mask, c.attention_softcap) {
            // Causal (with a sliding window): the fused, tiled kernel.
            (None, None) => {
                lowrank_kernels::causal_attention(&q, &k, &v, scale as f32, total - seq, window)?
            }
            // Packed rows bring their own mask (a sliding window added to it), and soft-capped
            // scores (which the fused kernel's backward does not know) take the composed path.
            // Grouped-query attention without copying K/V: the `group` query heads that share a
            // key/value head are stacked along the sequence axis.
            (mask, softcap) => {
                let q = q.reshape((batch, kv_heads, group * seq, head_dim))?;
                let mut scores = (q.matmul(&k.t()?)? * scale)?;
                if let Some(cap) = softcap {
                    scores = ((scores / cap)?.tanh()? * cap)?;
                }
                let causal = causal_mask(seq, total - seq, None, q.device())?;
                let mut scores = scores
                    .reshape((batch, kv_heads, group, seq, total))?
                    .broadcast_add(mask.unwrap_or(&causal))?;
                if window.is_some() {
                    let windowed = causal_mask(seq, total - seq, window, q.device())?;
                    scores = scores.broadcast_add(&windowed)?;
                }
                let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((
                    batch,
                    kv_heads,
                    group * seq,
                    total,
                ))?;
                probs.matmul(&v)?.reshape((batch, heads, seq, head_dim))?
            }
        };
        let attn = lowrank_kernels::merge_heads(&attn)?;
        self.layer_rest(layer, x, &attn, &proj)
    }

    /// The layer after attention: output projection, residual, MLP, residual. `proj` applies
    /// one of the layer's projections (numbered for dropout seeds).
    fn layer_rest(
        &self,
        layer: &Layer,
        x: &Tensor,
        attn: &Tensor,
        proj: &dyn Fn(&Proj, &Tensor, u64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut attn = proj(layer.expect_proj(kind::O)?, attn, kind::O as u64)?;
        if let Some(w) = &layer.attn_out_norm {
            attn = self.norm(&attn, w)?;
        }
        let x = (x + attn)?;
        let normed = self.norm(&x, &layer.mlp_norm)?;
        let (gate, up) = match layer.proj(kind::GATE_UP) {
            // Phi-3: [gate; up] by output rows.
            Some(gate_up) => {
                let gate_up = proj(gate_up, &normed, kind::GATE_UP as u64)?;
                let i = self.config.intermediate_size;
                (
                    gate_up.narrow(D::Minus1, 0, i)?,
                    gate_up.narrow(D::Minus1, i, i)?,
                )
            }
            None => (
                proj(layer.expect_proj(kind::GATE)?, &normed, kind::GATE as u64)?,
                proj(layer.expect_proj(kind::UP)?, &normed, kind::UP as u64)?,
            ),
        };
        let down = layer.expect_proj(kind::DOWN)?;
        let act = match self.config.activation {
            Activation::Silu => lowrank_kernels::swiglu(&gate, &up)?,
            // candle's gelu is the tanh approximation, with a backward.
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        let mut mlp = proj(down, &act, kind::DOWN as u64)?;
        if let Some(w) = &layer.mlp_out_norm {
            mlp = self.norm(&mlp, w)?;
        }
        Ok((x + mlp)?)
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
        ck.tensors
            .insert(EMBED.to_string(), self.embed.to_dtype(dtype)?);
        for (i, layer) in self.layers.iter().enumerate() {
            for (suffix, w) in layer.norms() {
                ck.tensors.insert(
                    format!("model.layers.{i}.{suffix}.weight"),
                    w.to_dtype(dtype)?,
                );
            }
            for p in layer.projs() {
                let name = format!("{}.weight", p.name);
                match p.linear.base() {
                    lowrank_core::BaseWeight::Quantized(q) => {
                        ck.quantized.insert(name, q.as_ref().clone());
                    }
                    lowrank_core::BaseWeight::Dense(w) => {
                        ck.tensors.insert(name, w.to_dtype(dtype)?);
                    }
                }
                if let Some(b) = p.linear.bias() {
                    ck.tensors
                        .insert(format!("{}.bias", p.name), b.to_dtype(dtype)?);
                }
            }
        }
        ck.tensors
            .insert(NORM.to_string(), self.norm.to_dtype(dtype)?);
        if let Some(head) = &self.lm_head {
            ck.tensors
                .insert(LM_HEAD.to_string(), head.to_dtype(dtype)?);
        }
        Ok(ck)
    }

    /// Every weight under its transformers name, in the checkpoint's stored dtype (merged
    /// adapters included), for writing a checkpoint. An error for a model with 4-bit linears
    /// (see [`Self::bnb_checkpoint`]).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dtype = self.stored_dtype;
        let mut out = vec![(EMBED.to_string(), self.embed.to_dtype(dtype)?)];
        for (i, layer) in self.layers.iter().enumerate() {
            for (suffix, w) in layer.norms() {
                out.push((
                    format!("model.layers.{i}.{suffix}.weight"),
                    w.to_dtype(dtype)?,
                ));
            }
            for p in layer.projs() {
                out.push((
                    format!("{}.weight", p.name),
                    p.linear.weight()?.to_dtype(dtype)?,
                ));
                if let Some(b) = p.linear.bias() {
                    out.push((format!("{}.bias", p.name), b.to_dtype(dtype)?));
                }
            }
        }
        out.push((NORM.to_string(), self.norm.to_dtype(dtype)?));
        if let Some(head) = &self.lm_head {
            out.push((LM_HEAD.to_string(), head.to_dtype(dtype)?));
        }
        Ok(out)
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
use batched::{Outputs, PackedRow, RowAdapters};
