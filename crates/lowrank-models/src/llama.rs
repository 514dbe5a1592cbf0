//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) as transformers
//! defines it, written with differentiable candle ops only, so the same code serves inference
//! and training. Fused candle ops without backward (rms_norm, softmax_last_dim, rope) are
//! deliberately not used.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use lowrank_core::lora::{LinearShape, LoraAdapter};
use lowrank_core::{ActiveModule, AdaptedLinear, Error, Result};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::rope::{Rope, RopeTables};

/// An adapter applied in a forward call, with a multiplier on its ΔW (1.0 = as trained).
#[derive(Debug, Clone, Copy)]
pub struct ActiveAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub weight: f64,
}

impl<'a> ActiveAdapter<'a> {
    pub fn new(adapter: &'a LoraAdapter) -> Self {
        ActiveAdapter { adapter, weight: 1.0 }
    }
}

/// A linear layer with its module key, so adapters find their tensors for it.
#[derive(Debug, Clone)]
struct Proj {
    name: String,
    linear: AdaptedLinear,
}

impl Proj {
    /// Training forward: with `dropout_seed`, LoRA dropout (the adapter's `lora_dropout`) on
    /// the adapters' input, from a mask seeded by (seed, module name) so a recomputation
    /// (gradient checkpointing) draws the same mask.
    fn forward_train(&self, x: &Tensor, adapters: &[ActiveAdapter], dropout_seed: Option<u64>) -> Result<Tensor> {
        let active: Vec<ActiveModule> = adapters
            .iter()
            .filter_map(|a| {
                a.adapter.modules.get(&self.name).map(|module| ActiveModule { module, weight: a.weight })
            })
            .collect();
        let p = adapters
            .iter()
            .find(|a| a.adapter.modules.contains_key(&self.name))
            .map_or(0.0, |a| a.adapter.config.dropout);
        match dropout_seed {
            Some(seed) if p > 0.0 && !active.is_empty() => {
                let dropped = dropout(x, p, mix_seed(seed, &self.name))?;
                self.linear.forward_dropped(x, &active, Some(&dropped))
            }
            _ => self.linear.forward(x, &active),
        }
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
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    post_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Layer {
    fn projs(&self) -> [&Proj; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    fn projs_mut(&mut self) -> [&mut Proj; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

/// Keys and values of past positions, per layer: (batch, kv_heads, positions, head_dim).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// What a training forward needs besides the ids: rotary tables for the positions, the
/// attention mask and the dropout seed.
#[derive(Debug, Clone)]
pub struct TrainContext {
    tables: RopeTables,
    /// Additive, broadcastable to (batch, kv_heads, group, seq, seq); causal when not given.
    mask: Tensor,
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
    rope: Rope,
    /// The dtype the checkpoint stores its weights in.
    stored_dtype: DType,
}

/// (module key suffix, has bias?) for the seven linears of a layer, in `Layer::projs` order.
fn proj_keys(config: &ModelConfig) -> [(&'static str, bool); 7] {
    [
        ("self_attn.q_proj", config.qkv_bias),
        ("self_attn.k_proj", config.qkv_bias),
        ("self_attn.v_proj", config.qkv_bias),
        ("self_attn.o_proj", config.o_bias),
        ("mlp.gate_proj", config.mlp_bias),
        ("mlp.up_proj", config.mlp_bias),
        ("mlp.down_proj", config.mlp_bias),
    ]
}

/// (out, in) of each linear of a layer, in `Layer::projs` order.
fn proj_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
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

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Additive causal mask (seq, past+seq): 0 where query i may see key j, -inf elsewhere.
fn causal_mask(seq: usize, past: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
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

impl Llama {
    /// Loads a checkpoint folder (config.json + safetensors) with weights in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::load(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ckpt, device)
    }

    pub fn from_checkpoint(config: ModelConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let h = config.hidden_size;
        let embed = ckpt.load(EMBED, &[config.vocab_size, h], dtype, device)?;
        let stored_dtype = ckpt.stored_dtype(EMBED).unwrap_or(DType::F32);
        let mut layers = Vec::with_capacity(config.num_layers);
        let keys = proj_keys(&config);
        let shapes = proj_shapes(&config);
        for i in 0..config.num_layers {
            let prefix = format!("model.layers.{i}");
            let mut projs = Vec::with_capacity(7);
            for ((key, has_bias), (out_f, in_f)) in keys.iter().zip(shapes) {
                let name = format!("{prefix}.{key}");
                let weight = ckpt.load(&format!("{name}.weight"), &[out_f, in_f], dtype, device)?;
                let bias = if *has_bias {
                    Some(ckpt.load(&format!("{name}.bias"), &[out_f], dtype, device)?)
                } else {
                    None
                };
                projs.push(Proj { name, linear: AdaptedLinear::new(weight, bias) });
            }
            let [q, k, v, o, gate, up, down]: [Proj; 7] = projs.try_into().expect("seven projections");
            layers.push(Layer {
                input_norm: ckpt.load(&format!("{prefix}.input_layernorm.weight"), &[h], dtype, device)?,
                post_norm: ckpt.load(&format!("{prefix}.post_attention_layernorm.weight"), &[h], dtype, device)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = ckpt.load(NORM, &[h], dtype, device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(ckpt.load(LM_HEAD, &[config.vocab_size, h], dtype, device)?)
        };
        let rope = Rope::new(&config, device)?;
        Ok(Llama { config, embed, layers, norm, lm_head, rope, stored_dtype })
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

    /// Every linear layer adapters can attach to, with its module key and shape.
    pub fn linears(&self) -> Vec<LinearShape> {
        self.layers
            .iter()
            .flat_map(|l| l.projs())
            .map(|p| {
                let (out_features, in_features) = p.linear.shape();
                LinearShape { name: p.name.clone(), out_features, in_features }
            })
            .collect()
    }

    /// The linear layer with module key `name`.
    pub fn linear(&self, name: &str) -> Option<&AdaptedLinear> {
        self.layers.iter().flat_map(|l| l.projs()).find(|p| p.name == name).map(|p| &p.linear)
    }

    /// Loads a PEFT adapter folder checked against this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<LoraAdapter> {
        LoraAdapter::load(dir, &self.linears(), self.device())
    }

    /// Folds `adapter` (times `weight`) into the base weights.
    pub fn merge_adapter(&mut self, name: &str, adapter: &LoraAdapter, weight: f64) -> Result<()> {
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                if let Some(module) = adapter.modules.get(&proj.name) {
                    proj.linear.merge(name, module, weight)?;
                }
            }
        }
        Ok(())
    }

    /// Undoes the most recent merge of adapter `name` in every layer it touched.
    pub fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                if proj.linear.merged_adapters().last() == Some(name) {
                    proj.linear.unmerge()?;
                }
            }
        }
        Ok(())
    }

    /// The linear layer with module key `name`, to replace its weight (PiSSA/OLoRA, training).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut AdaptedLinear> {
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
        let mut out = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            out.push((name, v));
            Ok(())
        };
        var(EMBED.to_string(), &mut self.embed)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            var(format!("{prefix}.input_layernorm.weight"), &mut layer.input_norm)?;
            var(format!("{prefix}.post_attention_layernorm.weight"), &mut layer.post_norm)?;
            for p in layer.projs_mut() {
                let mut w = p.linear.weight().clone();
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
                    return Err(Error::Msg(format!("positions have shape {:?}, expected [{batch}, {seq}]", p.dims())));
                }
                self.rope.tables_for(p)?
            }
            None => self.rope.tables(0, seq)?,
        };
        let mask = match mask {
            Some(m) => m,
            None => causal_mask(seq, 0, self.config.sliding_window, self.device())?,
        };
        Ok(TrainContext { tables, mask, dropout_seed })
    }

    /// Token embeddings (batch, seq, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((batch, seq, self.config.hidden_size))?)
    }

    /// Decoder layer `index` in training mode (no cache; LoRA dropout if the context asks).
    pub fn train_layer(&self, index: usize, x: &Tensor, ctx: &TrainContext, adapters: &[ActiveAdapter]) -> Result<Tensor> {
        let layer = self
            .layers
            .get(index)
            .ok_or_else(|| Error::Msg(format!("layer {index} out of range")))?;
        // Each layer draws its own dropout masks.
        let seed = ctx.dropout_seed.map(|s| mix_seed(s, &format!("layer{index}")));
        self.layer_forward_impl(index, layer, x, &ctx.tables, Some(&ctx.mask), None, adapters, seed)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// Final normalized hidden states of a training forward: embed, every layer, norm.
    pub fn hidden_states_train(&self, ids: &Tensor, ctx: &TrainContext, adapters: &[ActiveAdapter]) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for i in 0..self.layers.len() {
            x = self.train_layer(i, &x, ctx, adapters)?;
        }
        self.final_norm(&x)
    }

    /// Writes a complete Hugging Face checkpoint folder: the weights (merged adapters
    /// included) as `model.safetensors` in the stored dtype, and config/tokenizer files copied
    /// from `base_dir`. Staged in a temporary sibling folder and renamed, so a failed run
    /// leaves nothing half-written. `out` must not hold a checkpoint already.
    pub fn save_pretrained(&self, base_dir: &Path, out: &Path) -> Result<()> {
        if out.join("model.safetensors").exists() || out.join("config.json").exists() {
            return Err(Error::Msg(format!("{}: already holds a checkpoint; choose an empty folder", out.display())));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".lowrank-ckpt-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let weights = self.named_weights()?;
        lowrank_core::files::write_safetensors(&staging.path().join("model.safetensors"), &weights)?;
        for name in COPIED_FILES {
            let src = base_dir.join(name);
            if src.exists() {
                std::fs::copy(&src, staging.path().join(name)).map_err(|e| Error::io(&src, e))?;
            }
        }
        if out.exists() {
            // An existing (empty) folder: move the files in.
            for entry in std::fs::read_dir(staging.path()).map_err(|e| Error::io(staging.path(), e))? {
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
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, adapters: &[ActiveAdapter]) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, cache, adapters)?;
        self.logits(&hidden)
    }

    /// The final normalized hidden states (batch, seq, hidden).
    pub fn hidden_states(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, adapters: &[ActiveAdapter]) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let device = self.device();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((batch, seq, self.config.hidden_size))?;
        let tables = self.rope.tables(past, seq)?;
        let mask = if seq > 1 || self.config.sliding_window.is_some() {
            Some(causal_mask(seq, past, self.config.sliding_window, device)?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(i, layer, &x, &tables, mask.as_ref(), cache.as_deref_mut(), adapters)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        lowrank_core::linear::matmul_t(hidden, head)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        self.layer_forward_impl(index, layer, x, rope, mask, cache, adapters, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward_impl(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let proj = |p: &Proj, x: &Tensor, n: u64| p.forward_train(x, adapters, dropout_seed.map(|s| s.wrapping_add(n)));
        let c = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = heads / kv_heads;

        let normed = rms_norm(x, &layer.input_norm, c.rms_norm_eps)?;
        let split_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, n, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split_heads(proj(&layer.q, &normed, 0)?, heads)?;
        let k = split_heads(proj(&layer.k, &normed, 1)?, kv_heads)?;
        let v = split_heads(proj(&layer.v, &normed, 2)?, kv_heads)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(index, k, v)?,
            None => (k, v),
        };
        let total = k.dim(2)?;

        // Grouped-query attention without copying K/V: the `group` query heads that share a
        // key/value head are stacked along the sequence axis.
        let q = q.reshape((batch, kv_heads, group * seq, head_dim))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let scores = match mask {
            Some(mask) => scores.reshape((batch, kv_heads, group, seq, total))?.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((batch, kv_heads, group * seq, total))?;
        let attn = probs.matmul(&v)?.reshape((batch, heads, seq, head_dim))?;
        let attn = attn.transpose(1, 2)?.reshape((batch, seq, heads * head_dim))?;
        let x = (x + proj(&layer.o, &attn, 3)?)?;

        let normed = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
        let gate = proj(&layer.gate, &normed, 4)?.silu()?;
        let up = proj(&layer.up, &normed, 5)?;
        let mlp = proj(&layer.down, &(gate * up)?, 6)?;
        Ok((x + mlp)?)
    }

    /// Every weight under its transformers name, in the checkpoint's stored dtype (merged
    /// adapters included), for writing a checkpoint.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dtype = self.stored_dtype;
        let mut out = vec![(EMBED.to_string(), self.embed.to_dtype(dtype)?)];
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = format!("model.layers.{i}");
            out.push((format!("{prefix}.input_layernorm.weight"), layer.input_norm.to_dtype(dtype)?));
            out.push((format!("{prefix}.post_attention_layernorm.weight"), layer.post_norm.to_dtype(dtype)?));
            for p in layer.projs() {
                out.push((format!("{}.weight", p.name), p.linear.weight().to_dtype(dtype)?));
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
