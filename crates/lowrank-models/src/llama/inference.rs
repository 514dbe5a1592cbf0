//! Inference forwards: one sequence with a cache on the CPU takes the batched step
//! (`batched.rs`), anything else the candle layer loop through the KV cache; logits and the
//! inference dtype of the weights.

use candle_core::{DType, Tensor};
use lowrank_core::{Error, Result};

use super::batched::{Outputs, PackedRow, RowAdapters};
use super::layer::LayerCall;
use super::{ActiveAdapter, KvCache, Llama};

impl Llama {
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
    /// a prompt's forward in decoding, which needs no logits for the other positions.
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
                Some(pack) => packs.push((pack, a.coefficient)),
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
        for (index, layer) in self.layers.iter().enumerate() {
            let call = LayerCall {
                index,
                layer,
                rope: &tables,
                // Causal (and windowed) attention, done by the fused kernel.
                mask: None,
                cache: cache.as_deref_mut(),
                adapters,
                dropout_seed: None,
            };
            x = self.layer_forward(&x, call)?;
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

    /// Has inference steps round the input of every linear whose weight is bf16 (after
    /// [`Llama::cast_for_inference`] to bf16) to bf16, nearest even, as a PyTorch model in
    /// bf16 and llama.cpp's bf16 matmul do. Products stay exact and sums f32; a prefill's GEMM
    /// then runs on AVX512-BF16 dot products where this CPU has them and they time faster
    /// (`lowrank_kernels::bf16_gemm`). Refused while the embedding is not bf16.
    pub fn round_activations_to_bf16(&mut self) -> Result<()> {
        if self.embed.dtype() != DType::BF16 {
            return Err(Error::Msg(
                "bf16 activations need bf16 weights: cast the model to bf16 first (--bf16-weights)"
                    .into(),
            ));
        }
        // The prefill's bf16 GEMM kernel is chosen by a one-off timing (a few milliseconds):
        // run it here, at load, rather than in the first prompt's prefill.
        lowrank_kernels::bf16_gemm::bf16_kernel()?;
        self.bf16_activations = true;
        Ok(())
    }
}
