//! The training side of the model: the differentiable forward (with LoRA dropout and packed
//! rows' masks), full fine-tuning's trainable weights and mixed-precision compute.

use candle_core::{Tensor, Var};
use lowrank_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::layer::LayerCall;
use super::weights::WeightMut;
use super::{ActiveAdapter, Llama};
use crate::rope::{LayerTables, RopeTables};

/// A seed for one module's dropout mask from the call's seed and the module name (FNV-1a).
pub(super) fn mix_seed(seed: u64, name: &str) -> u64 {
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

impl Llama {
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
        let weights: Vec<_> = self.weights().collect();
        for (name, place) in weights {
            match self.weight_mut(place)? {
                WeightMut::Tensor(t) => var(name, t)?,
                WeightMut::Linear(linear) => {
                    let mut w = linear.weight()?.clone();
                    var(name, &mut w)?;
                    linear.set_weight(w)?;
                }
                WeightMut::Bias(linear) => {
                    if let Some(mut b) = linear.bias().cloned() {
                        var(name, &mut b)?;
                        linear.set_bias(b)?;
                    }
                }
            }
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
        let call = LayerCall {
            index,
            layer,
            rope: &ctx.tables,
            mask: ctx.mask.as_ref(),
            cache: None,
            adapters,
            dropout_seed: seed,
        };
        self.layer_forward(x, call)
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
}
