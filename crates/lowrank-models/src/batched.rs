//! One forward pass over many sequences at once, each with its own KV cache, position and
//! adapter — the step of a continuous-batching server. The linear layers run once over all
//! rows' tokens (the base matmul once for the whole batch), then each adapter adds B(A·x) on
//! its own rows only (gather, two thin matmuls, scatter-add), so tenants with different
//! adapters, ranks or DoRA share one pass. Attention runs per row against its own cache.

use candle_core::Tensor;
use lowrank_core::linear::matmul_t;
use lowrank_core::lora::{LoraAdapter, LoraModule};
use lowrank_core::{Error, Result};

use super::{rms_norm, KvCache, Llama, Proj};

/// One sequence's part of a batched step: its new tokens (a prompt chunk, or the last
/// sampled token), its cache (advanced by the step) and its adapter.
pub struct RowStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a LoraAdapter>,
}

/// Rows of the flattened token matrix that share one adapter.
struct AdapterGroup<'a> {
    adapter: &'a LoraAdapter,
    /// Token indices into the flattened batch, as a tensor (for gathers) and as numbers.
    index: Tensor,
    rows: Vec<u32>,
}

/// Σ s·B(A·x) for every LoRA (not DoRA) group's rows in one pass over plain slices: with one or
/// a few rows per adapter (decoding many tenants), candle's per-op overhead for gathers, two
/// tiny matmuls and a scatter-add per group would cost more than the arithmetic. The adapter
/// factors are small (r × (in + out)), so reading them out is cheap.
fn lora_rows_direct(
    name: &str,
    x: &Tensor,
    out_f: usize,
    groups: &[AdapterGroup],
) -> Result<Vec<f32>> {
    let (n, in_f) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut delta = vec![0f32; n * out_f];
    for group in groups {
        let Some(m) = group.adapter.modules.get(name) else {
            continue;
        };
        let a = m.a.flatten_all()?.to_vec1::<f32>()?;
        let b = m.b.flatten_all()?.to_vec1::<f32>()?;
        let r = m.rank();
        let scale = m.scale as f32;
        let mut ax = vec![0f32; r];
        for &row in &group.rows {
            let row = row as usize;
            let xr = &xs[row * in_f..(row + 1) * in_f];
            for (k, v) in ax.iter_mut().enumerate() {
                *v = scale
                    * xr.iter()
                        .zip(&a[k * in_f..(k + 1) * in_f])
                        .map(|(p, q)| p * q)
                        .sum::<f32>();
            }
            for (o, d) in delta[row * out_f..(row + 1) * out_f].iter_mut().enumerate() {
                *d += b[o * r..(o + 1) * r]
                    .iter()
                    .zip(&ax)
                    .map(|(p, q)| p * q)
                    .sum::<f32>();
            }
        }
    }
    Ok(delta)
}

impl Proj {
    /// y = x·Wᵀ + b for all rows, plus each group's adapter on its rows.
    fn forward_grouped(&self, x: &Tensor, groups: &[AdapterGroup]) -> Result<Tensor> {
        let linear = &self.linear;
        let base = linear.base().matmul_t(x)?;
        let mut y = match linear.bias() {
            Some(b) => base.broadcast_add(b)?,
            None => base.clone(),
        };
        let all_lora = groups.iter().all(|g| {
            g.adapter
                .modules
                .get(&self.name)
                .is_none_or(|m| m.magnitude.is_none())
        });
        if all_lora && !groups.is_empty() {
            let (n, out_f) = y.dims2()?;
            let delta = lora_rows_direct(&self.name, x, out_f, groups)?;
            return Ok((y + Tensor::from_vec(delta, (n, out_f), x.device())?)?);
        }
        for group in groups {
            let Some(module) = group.adapter.modules.get(&self.name) else {
                continue;
            };
            let rows = x.index_select(&group.index, 0)?;
            let lora = lora_rows(&rows, module)?;
            let delta = match &module.magnitude {
                None => lora,
                // DoRA: (m/n)(Wx + s·BAx) + b − (Wx + b) = (m/n − 1)·Wx + (m/n)·s·BAx.
                Some(magnitude) => {
                    let factor = (magnitude / linear.base().row_norm(&module.delta_weight()?)?)?;
                    let base_rows = base.index_select(&group.index, 0)?;
                    let scaled_base = base_rows.broadcast_mul(&(&factor - 1.0)?)?;
                    (scaled_base + lora.broadcast_mul(&factor)?)?
                }
            };
            y = y.index_add(&group.index, &delta, 0)?;
        }
        Ok(y)
    }
}

/// s·B(A·x) for the rows of one adapter.
fn lora_rows(x: &Tensor, m: &LoraModule) -> Result<Tensor> {
    Ok((matmul_t(&matmul_t(x, &m.a)?, &m.b)? * m.scale)?)
}

impl Llama {
    /// Advances every row by its tokens and returns the logits (rows, vocab) after each
    /// row's last token.
    pub fn forward_rows(&self, rows: &mut [RowStep]) -> Result<Tensor> {
        if rows.is_empty() || rows.iter().any(|r| r.tokens.is_empty()) {
            return Err(Error::Msg(
                "forward_rows needs at least one token in every row".into(),
            ));
        }
        let device = self.device();
        let c = &self.config;
        let all: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        self.check_ids(&all)?;
        let mut starts = Vec::with_capacity(rows.len());
        let mut offset = 0;
        for r in rows.iter() {
            starts.push(offset);
            offset += r.tokens.len();
        }
        // Group token indices by adapter (by identity: two tenants' adapters never share tensors).
        let mut groups: Vec<(&LoraAdapter, Vec<u32>)> = Vec::new();
        for (r, &start) in rows.iter().zip(&starts) {
            let Some(adapter) = r.adapter else { continue };
            let ids = (start..start + r.tokens.len()).map(|i| i as u32);
            match groups.iter_mut().find(|(a, _)| std::ptr::eq(*a, adapter)) {
                Some((_, idx)) => idx.extend(ids),
                None => groups.push((adapter, ids.collect())),
            }
        }
        let groups = groups
            .into_iter()
            .map(|(adapter, idx)| {
                let n = idx.len();
                Ok(AdapterGroup {
                    adapter,
                    index: Tensor::from_vec(idx.clone(), n, device)?,
                    rows: idx,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pasts: Vec<usize> = rows.iter().map(|r| r.cache.len()).collect();
        let tables = rows
            .iter()
            .zip(&pasts)
            .map(|(r, &past)| self.rope.tables(past, r.tokens.len()))
            .collect::<Result<Vec<_>>>()?;

        let ids = Tensor::new(all.as_slice(), device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        for (layer_index, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = layer.q.forward_grouped(&normed, &groups)?;
            let k = layer.k.forward_grouped(&normed, &groups)?;
            let v = layer.v.forward_grouped(&normed, &groups)?;
            let mut outputs = Vec::with_capacity(rows.len());
            for (i, row) in rows.iter_mut().enumerate() {
                let (start, seq) = (starts[i], row.tokens.len());
                let heads_of = |t: &Tensor, n: usize| -> Result<Tensor> {
                    Ok(t.narrow(0, start, seq)?
                        .reshape((1, seq, n, head_dim))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let qr = tables[i].apply(&heads_of(&q, heads)?)?;
                let kr = tables[i].apply(&heads_of(&k, kv_heads)?)?;
                let attn = row
                    .cache
                    .append(layer_index, kr, heads_of(&v, kv_heads)?)?
                    .attend(&qr, c.sliding_window)?;
                outputs.push(attn.transpose(1, 2)?.reshape((seq, heads * head_dim))?);
            }
            let attn = Tensor::cat(&outputs, 0)?;
            x = (x + layer.o.forward_grouped(&attn, &groups)?)?;
            let normed = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let gate = layer.gate.forward_grouped(&normed, &groups)?.silu()?;
            let up = layer.up.forward_grouped(&normed, &groups)?;
            x = (&x + layer.down.forward_grouped(&(gate * up)?, &groups)?)?;
        }
        let last: Vec<u32> = rows
            .iter()
            .zip(&starts)
            .map(|(r, &s)| (s + r.tokens.len() - 1) as u32)
            .collect();
        let n = last.len();
        let last = x.index_select(&Tensor::from_vec(last, n, device)?, 0)?;
        let hidden = rms_norm(&last, &self.norm, c.rms_norm_eps)?;
        self.logits(&hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::ActiveAdapter;
    use candle_core::Device;
    use std::path::Path;

    fn fixture(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(p)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Each row of a batched step equals a forward of that row alone, for rows with different
    /// adapters and cache lengths.
    fn check_rows_alone(model: &Llama, adapters: [Option<&LoraAdapter>; 3]) {
        let prompts: [&[u32]; 3] = [&[1, 40, 41, 42, 43], &[1, 50, 51], &[1, 60, 61, 62]];
        let mut expect = Vec::new();
        for (p, a) in prompts.iter().zip(adapters) {
            let active: Vec<ActiveAdapter> = a.into_iter().map(ActiveAdapter::new).collect();
            let ids = Tensor::new(*p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&ids, None, &active).unwrap();
            expect.push(logits.squeeze(0).unwrap().get(p.len() - 1).unwrap());
        }
        // Prefill different-length prefixes first, then the rest in one mixed step.
        let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new()).collect();
        let split = [2usize, 1, 3];
        for part in 0..2 {
            let mut rows: Vec<RowStep> = caches
                .iter_mut()
                .zip(prompts.iter().zip(adapters))
                .zip(split)
                .map(|((cache, (p, adapter)), s)| {
                    let tokens = if part == 0 { &p[..s] } else { &p[s..] };
                    RowStep {
                        tokens,
                        cache,
                        adapter,
                    }
                })
                .collect();
            let got = model.forward_rows(&mut rows).unwrap();
            if part == 1 {
                for (i, e) in expect.iter().enumerate() {
                    let d = max_diff(&got.get(i).unwrap(), e);
                    assert!(d < 1e-4, "row {i}: {d}");
                }
            }
        }
        assert_eq!(caches[0].len(), 5);
        assert_eq!(caches[1].len(), 3);
    }

    #[test]
    fn mixed_adapter_rows_equal_single_row_forwards() {
        let model = Llama::load(&fixture("models/llama-tied"), &Device::Cpu).unwrap();
        let lora = model
            .load_adapter(&fixture("adapters/llama-tied__lora-qv"))
            .unwrap();
        let dora = model
            .load_adapter(&fixture("adapters/llama-tied__dora"))
            .unwrap();
        // DoRA in the batch: the tensor path for every linear it touches.
        check_rows_alone(&model, [Some(&lora), Some(&dora), None]);
        // LoRA only: the direct per-row path.
        check_rows_alone(&model, [Some(&lora), None, Some(&lora)]);
    }
}
