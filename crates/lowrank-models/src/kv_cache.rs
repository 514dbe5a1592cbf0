//! The KV cache of one generation (or one batch of equal-length generations).
//!
//! A cache is filled by one of the two layer loops and stays with it: the batched step
//! (`batched.rs`: inference on the CPU, one sequence per cache) keeps each layer's keys and
//! values in plain buffers that its attention kernel reads in place; the candle layer loop
//! (other devices, batches of sequences in one cache, adapters being trained) keeps tensors.

use candle_core::{DType, Tensor};
use lowrank_core::{Error, Result};

use crate::llama::causal_mask;

/// Keys and values of past positions, per layer, in buffers (batch, kv_heads, capacity,
/// head_dim) allocated ahead, so a decoding step writes its one position in place instead of
/// copying the whole cache (`Tensor::cat` per step makes decoding quadratic in length).
/// Capacity is what [`KvCache::with_capacity`] reserved, doubled when a step needs more.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    reserve: usize,
    /// The tokens the batched step has cached, for a LongRoPE model's recomputation of the
    /// whole sequence when it crosses `original_max_position_embeddings`.
    tokens: Vec<u32>,
}

#[derive(Debug)]
enum LayerKv {
    /// Filled by the candle layer loop: (batch, kv_heads, capacity, head_dim) tensors.
    Tensors { k: Tensor, v: Tensor, len: usize },
    /// Filled by the batched step: one sequence's keys and values in plain buffers.
    Rows(RowKv),
}

impl LayerKv {
    fn len(&self) -> usize {
        match self {
            LayerKv::Tensors { len, .. } => *len,
            LayerKv::Rows(r) => r.len,
        }
    }

    fn capacity(&self) -> usize {
        match self {
            LayerKv::Tensors { k, .. } => k.dim(2).unwrap_or(0),
            LayerKv::Rows(r) => r.capacity,
        }
    }
}

/// One sequence's keys and values of one layer, (kv_heads, capacity, head_dim) each, the first
/// `len` positions valid.
pub(crate) struct RowKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub len: usize,
}

impl std::fmt::Debug for RowKv {
    // Not the values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowKv")
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .finish()
    }
}

impl RowKv {
    /// Writes `tokens` new positions after the valid ones, from k and v laid out (tokens,
    /// kv_heads · head_dim) as the projections give them. The caller has made room.
    pub fn append(&mut self, k: &[f32], v: &[f32], tokens: usize) {
        let (d, width) = (self.head_dim, self.kv_heads * self.head_dim);
        for t in 0..tokens {
            for g in 0..self.kv_heads {
                let to = (g * self.capacity + self.len + t) * d;
                let from = t * width + g * d;
                self.k[to..to + d].copy_from_slice(&k[from..from + d]);
                self.v[to..to + d].copy_from_slice(&v[from..from + d]);
            }
        }
        self.len += tokens;
    }

    /// Room for `needed` positions: the capacity grows to needed, twice the old capacity or
    /// `reserve`, whichever is most, the valid positions copied over.
    fn make_room(&mut self, needed: usize, reserve: usize) {
        if needed <= self.capacity {
            return;
        }
        let grown = needed.max(2 * self.capacity).max(reserve);
        let (d, heads, capacity, len) = (self.head_dim, self.kv_heads, self.capacity, self.len);
        let regrow = |old: &[f32]| {
            let mut new = vec![0f32; heads * grown * d];
            for g in 0..heads {
                let from = g * capacity * d;
                new[g * grown * d..(g * grown + len) * d]
                    .copy_from_slice(&old[from..from + len * d]);
            }
            new
        };
        self.k = regrow(&self.k);
        self.v = regrow(&self.v);
        self.capacity = grown;
    }
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
    /// queries — over the cache, scores scaled by `scale` and soft-capped by `softcap`: the
    /// fused kernel reading the buffers in place on the CPU, the composed candle ops elsewhere.
    pub fn attend(
        &self,
        q: &Tensor,
        scale: f64,
        sliding_window: Option<usize>,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let (batch, heads, seq, head_dim) = q.dims4()?;
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            return Ok(lowrank_kernels::causal_attention_cached(
                q,
                &self.k,
                &self.v,
                self.len,
                scale as f32,
                sliding_window,
                softcap.map(|c| c as f32),
            )?);
        }
        let (k, v) = self.valid()?;
        let kv_heads = k.dim(1)?;
        let group = heads / kv_heads;
        let q = q.reshape((batch, kv_heads, group * seq, head_dim))?;
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(cap) = softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
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
            tokens: Vec::new(),
        }
    }

    /// Notes `tokens` as cached after the ones before (the batched step).
    pub(crate) fn record(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// The tokens the batched step has cached.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets every position (the room stays reserved).
    pub(crate) fn clear(&mut self) {
        self.layers.clear();
        self.tokens.clear();
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions each layer holds room for (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, LayerKv::capacity)
    }

    /// Layer `layer`'s buffers for the batched step, with room for `tokens` more positions.
    /// An error for a cache the candle layer loop has filled.
    pub(crate) fn row_layer(
        &mut self,
        layer: usize,
        kv_heads: usize,
        head_dim: usize,
        tokens: usize,
    ) -> Result<&mut RowKv> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let reserve = self.reserve;
        let slot = self.layers[layer].get_or_insert_with(|| {
            let capacity = tokens.max(reserve);
            LayerKv::Rows(RowKv {
                k: vec![0f32; kv_heads * capacity * head_dim],
                v: vec![0f32; kv_heads * capacity * head_dim],
                kv_heads,
                head_dim,
                capacity,
                len: 0,
            })
        });
        match slot {
            LayerKv::Rows(r) if r.kv_heads == kv_heads && r.head_dim == head_dim => {
                r.make_room(r.len + tokens, reserve);
                Ok(r)
            }
            _ => Err(Error::Msg(
                "this KV cache was filled by another forward path (a batch of sequences or adapters being trained); use a new cache".into(),
            )),
        }
    }

    /// Layer `layer`'s buffers as the batched step left them.
    pub(crate) fn rows_of(&self, layer: usize) -> Option<&RowKv> {
        match self.layers.get(layer)? {
            Some(LayerKv::Rows(r)) => Some(r),
            _ => None,
        }
    }

    /// Writes `k`, `v` (batch, kv_heads, seq, head_dim) after the layer's cached positions (the
    /// candle layer loop).
    pub(crate) fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<CachedKv> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let (batch, kv_heads, seq, head_dim) = k.dims4()?;
        let (len, capacity) = match &self.layers[layer] {
            None => (0, 0),
            Some(LayerKv::Tensors { k, len, .. }) => (*len, k.dim(2)?),
            Some(LayerKv::Rows(_)) => {
                return Err(Error::Msg(
                    "this KV cache was filled by the batched step; use a new cache".into(),
                ))
            }
        };
        let needed = len + seq;
        if needed > capacity {
            let grown = needed.max(2 * capacity).max(self.reserve);
            let shape = (batch, kv_heads, grown, head_dim);
            let (nk, nv) = (
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            );
            if let Some(LayerKv::Tensors {
                k: old_k, v: old_v, ..
            }) = &self.layers[layer]
            {
                nk.slice_set(&old_k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old_v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            self.layers[layer] = Some(LayerKv::Tensors { k: nk, v: nv, len });
        }
        let Some(LayerKv::Tensors {
            k: ck,
            v: cv,
            len: valid,
        }) = self.layers[layer].as_mut()
        else {
            unreachable!("allocated above")
        };
        ck.slice_set(&k.contiguous()?, 2, len)?;
        cv.slice_set(&v.contiguous()?, 2, len)?;
        *valid = needed;
        Ok(CachedKv {
            k: ck.clone(),
            v: cv.clone(),
            len: needed,
        })
    }
}
