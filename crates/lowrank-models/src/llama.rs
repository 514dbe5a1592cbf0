//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) as transformers
//! defines it, written with differentiable candle ops only, so the same code serves inference
//! and training. Fused candle ops without backward (rms_norm, softmax_last_dim, rope) are
//! deliberately not used.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use lowrank_core::lora::{LinearShape, LoraAdapter};
use lowrank_core::{ActiveModule, AdaptedLinear, Error, QuantSpec, QuantizeStats, Result};
use lowrank_kernels::DecodeTeam;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use crate::active::ActiveAdapter;
use crate::active::PROJ_NAMES;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::rope::{Rope, RopeTables};

/// A linear layer with its module key, so adapters find their tensors for it.
#[derive(Debug, Clone)]
struct Proj {
    name: String,
    /// 7 × layer + the projection's place in [`PROJ_NAMES`]: the module key
    /// `model.layers.{layer}.{name}` as a number (see [`proj_slot`]).
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
    /// This projection as one linear of a one-row pass (see `AdaptedLinear::row_linear`),
    /// with the factors of its one adapter module, if any, as the adapter's decoding slices
    /// where it has them.
    fn row_linear<'a>(
        &'a self,
        adapters: &'a [ActiveAdapter],
    ) -> Option<lowrank_kernels::RowLinear<'a>> {
        let mut owners = adapters.iter().filter(|a| a.module(self.slot).is_some());
        match (owners.next(), owners.next()) {
            (None, _) => self.linear.row_linear(&[]),
            (Some(owner), None) => match owner.decode_lora(self.slot) {
                Some(lora) => self
                    .linear
                    .row_linear(&[])
                    .map(|base| lowrank_kernels::RowLinear {
                        lora: Some(lora),
                        ..base
                    }),
                None => self.linear.row_linear(&self.active(adapters)),
            },
            _ => None,
        }
    }

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

/// One token's projections of the same input (q, k, v; gate, up) in one pass over their
/// weights (`lowrank_kernels::linears_one_row`: one dispatch to the thread pool instead of
/// one per projection), when x is a single untracked row and every projection can go that
/// way (`AdaptedLinear::row_linear`); `None` otherwise.
fn project_one_row(
    projs: &[&Proj],
    x: &Tensor,
    adapters: &[ActiveAdapter],
) -> Result<Option<Vec<Tensor>>> {
    let one_row = x.elem_count() == x.dims().last().copied().unwrap_or(0);
    if !one_row || x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let linears: Option<Vec<_>> = projs.iter().map(|p| p.row_linear(adapters)).collect();
    match linears {
        Some(linears) => Ok(Some(lowrank_kernels::linears_one_row(x, &linears)?)),
        None => Ok(None),
    }
}

/// The A factors a one-row pass over `projs` reads first: those of the projections whose one
/// adapter module has decoding slices (see [`Proj::row_linear`]).
fn decode_inputs<'a>(projs: &[&'a Proj], adapters: &'a [ActiveAdapter]) -> Vec<&'a [f32]> {
    projs
        .iter()
        .filter_map(|p| match p.row_linear(adapters)?.lora? {
            lowrank_kernels::RowLora::Slices { a, .. } => Some(a),
            lowrank_kernels::RowLora::Tensors { .. } => None,
        })
        .collect()
}

/// Has a decoding step's helper load the A factors of the pass over `projs` (see
/// `lowrank_kernels::decode_team`).
fn warm_inputs<'a>(
    team: Option<&DecodeTeam<'a>>,
    projs: &[&'a Proj],
    adapters: &'a [ActiveAdapter],
) {
    if let Some(team) = team.filter(|t| t.is_helped()) {
        team.warm(&decode_inputs(projs, adapters));
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
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn projs_mut(&mut self) -> [&mut Proj; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// Keys and values of past positions, per layer, in buffers (batch, kv_heads, capacity,
/// head_dim) allocated ahead, so a decoding step writes its one position in place instead of
/// copying the whole cache (`Tensor::cat` per step makes decoding quadratic in length).
/// Capacity is what [`KvCache::with_capacity`] reserved, doubled when a step needs more.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    reserve: usize,
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// One layer's cache after an append: the buffers and how many positions are valid.
pub(crate) struct CachedKv {
    pub k: Tensor,
    pub v: Tensor,
    pub len: usize,
}

impl CachedKv {
    /// The valid positions as (narrowed, non-contiguous) views.
    pub fn valid(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Causal attention of `q` (batch, heads, seq, head_dim) — the last `seq` cached positions'
    /// queries — over the cache: the fused kernel reading the buffers in place on the CPU, the
    /// composed candle ops elsewhere.
    pub fn attend(&self, q: &Tensor, sliding_window: Option<usize>) -> Result<Tensor> {
        let (batch, heads, seq, head_dim) = q.dims4()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            return Ok(lowrank_kernels::causal_attention_cached(
                q,
                &self.k,
                &self.v,
                self.len,
                scale as f32,
                sliding_window,
            )?);
        }
        let (k, v) = self.valid()?;
        let kv_heads = k.dim(1)?;
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq, head_dim))?;
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if seq > 1 || sliding_window.is_some() {
            let mask = causal_mask(seq, self.len - seq, sliding_window, q.device())?;
            scores = scores
                .reshape((batch, kv_heads, group, seq, self.len))?
                .broadcast_add(&mask)?
                .reshape((batch, kv_heads, group * seq, self.len))?;
        }
        // Inference only, so the fused softmax (which has no backward) is fine here.
        let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
        Ok(probs
            .matmul(&v.contiguous()?)?
            .reshape((batch, heads, seq, head_dim))?)
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache with room for `positions` positions per layer (prompt + tokens to generate),
    /// allocated at the first step.
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            layers: Vec::new(),
            reserve: positions,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions each layer holds room for (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.k.dim(2).unwrap_or(0))
    }

    /// Writes `k`, `v` (batch, kv_heads, seq, head_dim) after the layer's cached positions.
    pub(crate) fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<CachedKv> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let (batch, kv_heads, seq, head_dim) = k.dims4()?;
        let (len, needed) = match &self.layers[layer] {
            Some(l) => (l.len, l.len + seq),
            None => (0, seq),
        };
        let capacity = self.layers[layer]
            .as_ref()
            .map_or(0, |l| l.k.dim(2).unwrap_or(0));
        if needed > capacity {
            let grown = needed.max(2 * capacity).max(self.reserve);
            let shape = (batch, kv_heads, grown, head_dim);
            let (nk, nv) = (
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            );
            if let Some(old) = &self.layers[layer] {
                nk.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            self.layers[layer] = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = self.layers[layer].as_mut().expect("allocated above");
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        l.len = needed;
        Ok(CachedKv {
            k: l.k.clone(),
            v: l.v.clone(),
            len: needed,
        })
    }
}

/// What a training forward needs besides the ids: rotary tables for the positions, the
/// attention mask and the dropout seed.
#[derive(Debug, Clone)]
pub struct TrainContext {
    tables: RopeTables,
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
    rope: Rope,
    /// The dtype the checkpoint stores its weights in.
    stored_dtype: DType,
}

/// (module key suffix, has bias?) for the seven linears of a layer, in `Layer::projs` order.
fn proj_keys(config: &ModelConfig) -> [(&'static str, bool); 7] {
    let bias = [
        config.qkv_bias,
        config.qkv_bias,
        config.qkv_bias,
        config.o_bias,
        config.mlp_bias,
        config.mlp_bias,
        config.mlp_bias,
    ];
    std::array::from_fn(|k| (PROJ_NAMES[k], bias[k]))
}

/// (out, in) of each linear of a layer, in `Layer::projs` order.
fn proj_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
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

/// RMSNorm through the fused kernel (hand-written backward; candle's own has none).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(lowrank_kernels::rms_norm(x, weight, eps as f32)?)
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
        let keys = proj_keys(&config);
        let shapes = proj_shapes(&config);
        for i in 0..config.num_layers {
            let prefix = format!("model.layers.{i}");
            let mut projs = Vec::with_capacity(7);
            for (k, ((key, has_bias), (out_f, in_f))) in keys.iter().zip(shapes).enumerate() {
                let name = format!("{prefix}.{key}");
                let weight_name = format!("{name}.weight");
                let bias = if *has_bias {
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
                    slot: 7 * i + k,
                    linear,
                });
            }
            let [q, k, v, o, gate, up, down]: [Proj; 7] =
                projs.try_into().expect("seven projections");
            layers.push(Layer {
                input_norm: ckpt.load(
                    &format!("{prefix}.input_layernorm.weight"),
                    &[h],
                    dtype,
                    device,
                )?,
                post_norm: ckpt.load(
                    &format!("{prefix}.post_attention_layernorm.weight"),
                    &[h],
                    dtype,
                    device,
                )?,
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
        let model = Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            head_for_inference: None,
            rope,
            stored_dtype,
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
            var(
                format!("{prefix}.input_layernorm.weight"),
                &mut layer.input_norm,
            )?;
            var(
                format!("{prefix}.post_attention_layernorm.weight"),
                &mut layer.post_norm,
            )?;
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

    /// Token embeddings (batch, seq, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            batch,
            seq,
            self.config.hidden_size,
        ))?)
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
            None,
        )
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
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
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, cache, adapters)?;
        self.logits(&hidden)
    }

    /// The final normalized hidden states (batch, seq, hidden).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        adapters: &[ActiveAdapter],
    ) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            batch,
            seq,
            self.config.hidden_size,
        ))?;
        let tables = self.rope.tables(past, seq)?;
        // A decoding step whose passes read an unmerged adapter's packed factors runs with the
        // pool's other threads awake, which load each pass's A before it (see
        // `lowrank_kernels::decode_team`). A 4-bit base or `--compute-dtype bf16` takes the
        // per-module path, which has no use for them: the first adapted layer tells.
        let decoding = batch == 1 && seq == 1 && cache.is_some();
        let reads_packed_factors = || {
            adapters
                .iter()
                .filter_map(ActiveAdapter::first_decode_slot)
                .any(|slot| {
                    self.layers
                        .get(slot / PROJ_NAMES.len())
                        .is_some_and(|layer| !decode_inputs(&layer.projs(), adapters).is_empty())
                })
        };
        let x = if decoding && reads_packed_factors() {
            lowrank_kernels::with_helpers(|team| {
                self.layers_forward(x, &tables, cache, adapters, Some(team))
            })?
        } else {
            self.layers_forward(x, &tables, cache, adapters, None)?
        };
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Every decoder layer over x, continuing from `cache` if given.
    fn layers_forward<'a>(
        &'a self,
        mut x: Tensor,
        tables: &RopeTables,
        mut cache: Option<&mut KvCache>,
        adapters: &'a [ActiveAdapter],
        team: Option<&DecodeTeam<'a>>,
    ) -> Result<Tensor> {
        for (i, layer) in self.layers.iter().enumerate() {
            warm_inputs(team, &[&layer.q, &layer.k, &layer.v], adapters);
            // No mask: causal (and windowed) attention, done by the fused kernel.
            x = self.layer_forward_impl(
                i,
                layer,
                &x,
                tables,
                None,
                cache.as_deref_mut(),
                adapters,
                None,
                team,
            )?;
        }
        Ok(x)
    }

    /// The output head's weight (vocab × hidden): lm_head, or the embedding when tied.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        // Through the base-weight path: the decoding GEMV for one row, the frozen-linear
        // kernel otherwise (candle's matmul when the head is being trained).
        let head = self
            .head_for_inference
            .as_ref()
            .unwrap_or(self.head_weight());
        lowrank_core::BaseWeight::Dense(head.clone()).matmul_t(hidden)
    }

    /// Stores the decoder layers' frozen linear weights and the output head in `dtype` for
    /// inference — bf16: half the memory and half the bytes each decoding step reads, products
    /// still accumulated in f32. Embedding lookups and norms stay as they are, 4-bit layers
    /// stay 4-bit, and adapters must be merged before (merging into bf16 is refused).
    pub fn cast_for_inference(&mut self, dtype: DType) -> Result<()> {
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                proj.linear.cast_base(dtype)?;
            }
        }
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
        for layer in &mut self.layers {
            for proj in layer.projs_mut() {
                proj.linear.compute_in_bf16()?;
            }
        }
        Ok(())
    }

    /// Decoder layer `index`: with `dropout_seed`, in training mode (LoRA dropout); with
    /// `team`, as part of a decoding step whose helpers load each pass's A factors first.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward_impl<'a>(
        &'a self,
        index: usize,
        layer: &'a Layer,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        adapters: &'a [ActiveAdapter],
        dropout_seed: Option<u64>,
        team: Option<&DecodeTeam<'a>>,
    ) -> Result<Tensor> {
        let proj = |p: &Proj, x: &Tensor, n: u64| {
            p.forward_train(x, adapters, dropout_seed.map(|s| s.wrapping_add(n)))
        };
        // Projections of one input share a pass only outside training (no dropout masks).
        let fuse_adapters = dropout_seed.is_none().then_some(adapters);
        let c = &self.config;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = heads / kv_heads;

        let normed = rms_norm(x, &layer.input_norm, c.rms_norm_eps)?;
        let split_heads = |t: Tensor, n: usize| lowrank_kernels::split_heads(&t, n);
        let fused = match fuse_adapters {
            Some(adapters) => project_one_row(&[&layer.q, &layer.k, &layer.v], &normed, adapters)?,
            None => None,
        };
        if fused.is_some() {
            // Attention comes next, the longest stretch without a pass: long enough to load
            // gate's and up's A as well as o's.
            warm_inputs(team, &[&layer.o, &layer.gate, &layer.up], adapters);
        }
        let (q, k, v) = match fused.as_deref() {
            Some([q, k, v]) => (q.clone(), k.clone(), v.clone()),
            _ => (
                proj(&layer.q, &normed, 0)?,
                proj(&layer.k, &normed, 1)?,
                proj(&layer.v, &normed, 2)?,
            ),
        };
        let q = split_heads(q, heads)?;
        let k = split_heads(k, kv_heads)?;
        let v = split_heads(v, kv_heads)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        if let Some(cache) = cache {
            let attn = lowrank_kernels::merge_heads(
                &cache.append(index, k, v)?.attend(&q, c.sliding_window)?,
            )?;
            return self.layer_rest(layer, x, &attn, &proj, fuse_adapters, team);
        }
        let total = k.dim(2)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let attn = match mask {
            // Causal (with a sliding window for Mistral): the fused, tiled kernel.
            None => lowrank_kernels::causal_attention(
                &q,
                &k,
                &v,
                scale as f32,
                total - seq,
                c.sliding_window,
            )?,
            // Packed rows bring their own mask: the composed path. Grouped-query attention
            // without copying K/V: the `group` query heads that share a key/value head are
            // stacked along the sequence axis.
            Some(mask) => {
                let q = q.reshape((batch, kv_heads, group * seq, head_dim))?;
                let scores = (q.matmul(&k.t()?)? * scale)?;
                let scores = scores
                    .reshape((batch, kv_heads, group, seq, total))?
                    .broadcast_add(mask)?;
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
        self.layer_rest(layer, x, &attn, &proj, fuse_adapters, team)
    }

    /// The layer after attention: output projection, residual, MLP, residual. `proj` applies
    /// one of the layer's projections (numbered for dropout seeds).
    fn layer_rest<'a>(
        &self,
        layer: &'a Layer,
        x: &Tensor,
        attn: &Tensor,
        proj: &dyn Fn(&Proj, &Tensor, u64) -> Result<Tensor>,
        fuse_adapters: Option<&'a [ActiveAdapter]>,
        team: Option<&DecodeTeam<'a>>,
    ) -> Result<Tensor> {
        // A single projection takes the one-row pass too: for an unmerged adapter it reads
        // the decoding slices, not the factor tensors (0.3% of a token, in-process).
        let single = |p: &Proj, x: &Tensor, n: u64| -> Result<Tensor> {
            let one_row = match fuse_adapters {
                Some(adapters) => project_one_row(&[p], x, adapters)?,
                None => None,
            };
            match one_row.and_then(|mut y| y.pop()) {
                Some(y) => Ok(y),
                None => proj(p, x, n),
            }
        };
        let x = (x + single(&layer.o, attn, 3)?)?;
        let normed = rms_norm(&x, &layer.post_norm, self.config.rms_norm_eps)?;
        let fused = match fuse_adapters {
            Some(adapters) => project_one_row(&[&layer.gate, &layer.up], &normed, adapters)?,
            None => None,
        };
        if let (Some(_), Some(adapters)) = (&fused, fuse_adapters) {
            warm_inputs(team, &[&layer.down], adapters);
        }
        let (gate, up) = match fused.as_deref() {
            Some([gate, up]) => (gate.clone(), up.clone()),
            _ => (proj(&layer.gate, &normed, 4)?, proj(&layer.up, &normed, 5)?),
        };
        let mlp = single(&layer.down, &lowrank_kernels::swiglu(&gate, &up)?, 6)?;
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
            let prefix = format!("model.layers.{i}");
            ck.tensors.insert(
                format!("{prefix}.input_layernorm.weight"),
                layer.input_norm.to_dtype(dtype)?,
            );
            ck.tensors.insert(
                format!("{prefix}.post_attention_layernorm.weight"),
                layer.post_norm.to_dtype(dtype)?,
            );
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
            let prefix = format!("model.layers.{i}");
            out.push((
                format!("{prefix}.input_layernorm.weight"),
                layer.input_norm.to_dtype(dtype)?,
            ));
            out.push((
                format!("{prefix}.post_attention_layernorm.weight"),
                layer.post_norm.to_dtype(dtype)?,
            ));
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
