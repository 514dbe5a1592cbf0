//! The decoder layer of the candle loop: its projections ([`Proj`]), its weights ([`Layer`])
//! and its forward ([`Llama::layer_forward`]), shared by training and by the forwards the
//! batched step does not take.

use candle_core::{Device, Tensor, D};
use lowrank_core::{ActiveModule, AdaptedLinear, Error, Result};

use super::train::{dropout, mix_seed};
use super::{ActiveAdapter, KvCache, Llama};
use crate::active::{kind, PROJ_NAMES};
use crate::config::{Activation, ModelConfig};
use crate::rope::{LayerTables, RopeTables};

/// A linear layer with its module key, so adapters find their tensors for it.
#[derive(Debug, Clone)]
pub(super) struct Proj {
    pub(super) name: String,
    /// Its place in [`PROJ_NAMES`] (see [`kind`]).
    pub(super) kind: usize,
    /// [`crate::active::SLOTS_PER_LAYER`] × layer + kind: the module key `model.layers.{layer}.{name}` as a
    /// number (see `active::proj_slot`).
    pub(super) slot: usize,
    pub(super) linear: AdaptedLinear,
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

    /// The modules of `adapters` that apply to this projection, with their weights.
    fn active<'a>(&self, adapters: &'a [ActiveAdapter]) -> Vec<ActiveModule<'a>> {
        adapters
            .iter()
            .filter_map(|a| {
                a.module(self.slot).map(|module| ActiveModule {
                    module,
                    coefficient: a.coefficient,
                })
            })
            .collect()
    }
}

/// A decoder layer's weights.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) input_norm: Tensor,
    /// RMSNorm weights (head_dim) over each query / key head before RoPE (Qwen3).
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
    /// The MLP's input norm (`post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub(super) mlp_norm: Tensor,
    /// Gemma 2: norms of the attention's and the MLP's outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    pub(super) attn_out_norm: Option<Tensor>,
    pub(super) mlp_out_norm: Option<Tensor>,
    /// The layer's linears in [`proj_specs`] order: q, k, v (or the fused qkv), o, gate, up (or
    /// the fused gate_up), down.
    pub(super) projs: Vec<Proj>,
}

/// The module key suffixes of a layer's norm weights.
pub(super) const INPUT_NORM: &str = "input_layernorm";
pub(super) const POST_ATTENTION_NORM: &str = "post_attention_layernorm";
pub(super) const PRE_FEEDFORWARD_NORM: &str = "pre_feedforward_layernorm";
pub(super) const POST_FEEDFORWARD_NORM: &str = "post_feedforward_layernorm";
pub(super) const Q_NORM: &str = "self_attn.q_norm";
pub(super) const K_NORM: &str = "self_attn.k_norm";

/// The names of the MLP's input norm and of the attention's and MLP's output norms: Llama's
/// `post_attention_layernorm` is the MLP's input norm; with norms around both blocks (Gemma 2)
/// that name is the attention output's and the MLP's input norm is `pre_feedforward_layernorm`.
pub(super) fn mlp_norm_names(sandwich: bool) -> (&'static str, [&'static str; 2]) {
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
    pub(super) fn norms(&self) -> Vec<(&'static str, &Tensor)> {
        let (mlp, [attn_out, mlp_out]) = mlp_norm_names(self.attn_out_norm.is_some());
        let mut out = vec![(INPUT_NORM, &self.input_norm), (mlp, &self.mlp_norm)];
        out.extend(self.attn_out_norm.as_ref().map(|w| (attn_out, w)));
        out.extend(self.mlp_out_norm.as_ref().map(|w| (mlp_out, w)));
        out.extend(self.q_norm.as_ref().map(|w| (Q_NORM, w)));
        out.extend(self.k_norm.as_ref().map(|w| (K_NORM, w)));
        out
    }

    pub(super) fn norms_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
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

    pub(super) fn projs(&self) -> &[Proj] {
        &self.projs
    }

    pub(super) fn projs_mut(&mut self) -> &mut [Proj] {
        &mut self.projs
    }

    /// The projection of `kind`, if the layer has one.
    pub(super) fn proj(&self, kind: usize) -> Option<&Proj> {
        self.projs.iter().find(|p| p.kind == kind)
    }

    /// The projection of `kind`, which every layer of this model has.
    pub(super) fn expect_proj(&self, kind: usize) -> Result<&Proj> {
        self.proj(kind)
            .ok_or_else(|| Error::Msg(format!("the layer has no {} projection", PROJ_NAMES[kind])))
    }
}

/// One linear of a layer: its kind, (out, in) and whether it has a bias.
pub(super) struct ProjSpec {
    pub(super) kind: usize,
    pub(super) out_features: usize,
    pub(super) in_features: usize,
    pub(super) bias: bool,
}

/// The linears of every layer of a model of `c`, in `Layer::projs` order.
pub(super) fn proj_specs(c: &ModelConfig) -> Vec<ProjSpec> {
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

/// One call of [`Llama::layer_forward`]: which layer, and what it runs with.
pub(super) struct LayerCall<'a, 'm> {
    pub(super) index: usize,
    pub(super) layer: &'a Layer,
    pub(super) rope: &'a LayerTables<RopeTables>,
    /// Additive, broadcastable to (batch, kv_heads, group, seq, seq) (packed rows); `None` =
    /// causal.
    pub(super) mask: Option<&'a Tensor>,
    pub(super) cache: Option<&'a mut KvCache>,
    pub(super) adapters: &'a [ActiveAdapter<'m>],
    /// `Some` in training mode: LoRA dropout, seeded by this.
    pub(super) dropout_seed: Option<u64>,
}

impl LayerCall<'_, '_> {
    /// Applies the layer's projection of `kind`.
    fn proj(&self, kind: usize, x: &Tensor) -> Result<Tensor> {
        let p = self.layer.expect_proj(kind)?;
        self.apply(p, x)
    }

    /// Applies projection `p`; its kind numbers its dropout seed.
    fn apply(&self, p: &Proj, x: &Tensor) -> Result<Tensor> {
        let seed = self.dropout_seed.map(|s| s.wrapping_add(p.kind as u64));
        p.forward_train(x, self.adapters, seed)
    }
}

impl Llama {
    /// RMSNorm of x with weight w, (1 + w) for Gemma.
    pub(super) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.config.norm_plus_one {
            rms_norm(x, &w.affine(1.0, 1.0)?, eps)
        } else {
            rms_norm(x, w, eps)
        }
    }

    /// One decoder layer over x (batch, seq, hidden), through the cache if the call has one.
    pub(super) fn layer_forward(&self, x: &Tensor, mut call: LayerCall) -> Result<Tensor> {
        let c = &self.config;
        let layer = call.layer;
        let (batch, seq, _) = x.dims3()?;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = heads / kv_heads;

        let normed = self.norm(x, &layer.input_norm)?;
        let split_heads = |t: Tensor, n: usize| lowrank_kernels::split_heads(&t, n);
        let (q, k, v) = match layer.proj(kind::QKV) {
            // Phi-3: [q; k; v] by output rows.
            Some(qkv) => {
                let qkv = call.apply(qkv, &normed)?;
                let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
                (
                    qkv.narrow(D::Minus1, 0, q_width)?,
                    qkv.narrow(D::Minus1, q_width, kv_width)?,
                    qkv.narrow(D::Minus1, q_width + kv_width, kv_width)?,
                )
            }
            None => (
                call.proj(kind::Q, &normed)?,
                call.proj(kind::K, &normed)?,
                call.proj(kind::V, &normed)?,
            ),
        };
        let head_norm = |t: Tensor, w: &Option<Tensor>| match w {
            Some(w) => self.norm(&t, w),
            None => Ok(t),
        };
        let q = head_norm(split_heads(q, heads)?, &layer.q_norm)?;
        let k = head_norm(split_heads(k, kv_heads)?, &layer.k_norm)?;
        let v = split_heads(v, kv_heads)?;
        let window = c.layer_windows[call.index];
        let rope = call.rope.of(window.is_some());
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        if let Some(cache) = call.cache.take() {
            let attn = lowrank_kernels::merge_heads(&cache.append(call.index, k, v)?.attend(
                &q,
                c.attention_scale,
                window,
                c.attention_softcap,
            )?)?;
            return self.layer_rest(&call, x, &attn);
        }
        let total = k.dim(2)?;
        let scale = c.attention_scale;
        let attn = match (call.mask, c.attention_softcap) {
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
        self.layer_rest(&call, x, &attn)
    }

    /// The layer after attention: output projection, residual, MLP, residual.
    fn layer_rest(&self, call: &LayerCall, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let layer = call.layer;
        let mut attn = call.proj(kind::O, attn)?;
        if let Some(w) = &layer.attn_out_norm {
            attn = self.norm(&attn, w)?;
        }
        let x = (x + attn)?;
        let normed = self.norm(&x, &layer.mlp_norm)?;
        let (gate, up) = match layer.proj(kind::GATE_UP) {
            // Phi-3: [gate; up] by output rows.
            Some(gate_up) => {
                let gate_up = call.apply(gate_up, &normed)?;
                let i = self.config.intermediate_size;
                (
                    gate_up.narrow(D::Minus1, 0, i)?,
                    gate_up.narrow(D::Minus1, i, i)?,
                )
            }
            None => (
                call.proj(kind::GATE, &normed)?,
                call.proj(kind::UP, &normed)?,
            ),
        };
        let act = match self.config.activation {
            Activation::Silu => lowrank_kernels::swiglu(&gate, &up)?,
            // candle's gelu is the tanh approximation, with a backward.
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        let mut mlp = call.proj(kind::DOWN, &act)?;
        if let Some(w) = &layer.mlp_out_norm {
            mlp = self.norm(&mlp, w)?;
        }
        Ok((x + mlp)?)
    }
}
