//! The inference step on the CPU: one forward pass over many sequences at once, each with its
//! own KV cache, positions and adapters — the step of a continuous-batching server, and of
//! `generate` and every cached forward of one sequence (the same loop with one row).
//!
//! The step works on plain buffers, token rows side by side (prefill chunks and single
//! decoding tokens mixed): each group of linears of one input (q, k, v; gate, up; o; down; the
//! head) is one call to `lowrank_kernels::batch::apply`, which reads each weight once for all
//! rows and applies every row's adapters by segments; attention is one call for all rows, each
//! over its own cache, read in place. What a row's adapters are is resolved once per step into
//! segments (an adapter module and the token rows that use it), from the adapters' packs (see
//! `active.rs`). Every step keeps the pool's other threads awake while its layers run, and a
//! step of one token with one plain LoRA also has them load each pass's A factors before it
//! (`lowrank_kernels::decode_team`).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::bf16;
use lowrank_core::lora::LoraAdapter;
use lowrank_core::{BaseWeight, Error, Result};
use lowrank_kernels::batch::{apply, BaseWeights, Segment, StepLinear};
use lowrank_kernels::{attend_rows, CachedRow, DecodeTeam, Heads};

use super::{KvCache, Llama};
use crate::active::{kind, AdapterPack, SLOTS_PER_LAYER};
use crate::config::Activation;
use crate::rope::LayerTables;

/// One sequence's part of a batched step: its new tokens (a prompt chunk, or the last
/// sampled token), its cache (advanced by the step) and its adapters.
pub struct RowStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// The adapters applied to this sequence, each with a multiplier on its ΔW (1.0 = as
    /// trained); several are stacked (their deltas added), none is the base. A DoRA adapter is
    /// applied alone, at weight 1.
    pub adapters: Vec<(&'a LoraAdapter, f64)>,
}

/// A row's adapters: their packs and weights.
pub(crate) type RowAdapters = Vec<(Arc<AdapterPack>, f64)>;

/// A row of the step with its adapters' packs.
pub(crate) struct PackedRow<'a> {
    /// The new tokens; the whole sequence when the step recomputes it (see
    /// [`Llama::restart_for_longrope`]).
    pub tokens: Cow<'a, [u32]>,
    pub cache: &'a mut KvCache,
    pub adapters: RowAdapters,
}

/// Which token rows get logits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outputs {
    /// Each row's last token (rows × vocab).
    Last,
    /// Every token (tokens × vocab).
    All,
}

/// Token rows that share one adapter at one coefficient.
struct Group {
    pack: Arc<AdapterPack>,
    coefficient: f64,
    rows: Vec<usize>,
}

/// A weight's values as the step reads them.
enum Values<'g> {
    F32(&'g [f32]),
    Bf16(&'g [bf16]),
}

/// Each token row's rotary tables (cos, sin), as the step's host kernels read them.
type HostTables = LayerTables<(Vec<f32>, Vec<f32>)>;

/// A projection's weight and bias.
type ProjWeights<'g> = (BaseWeights<'g>, Option<&'g [f32]>);

/// One layer's weights as slices; the norms as the step multiplies by them ((1 + w) for Gemma).
struct LayerWeights<'g> {
    input_norm: Cow<'g, [f32]>,
    mlp_norm: Cow<'g, [f32]>,
    /// Gemma 2's norms of the attention's and the MLP's outputs.
    attn_out_norm: Option<Cow<'g, [f32]>>,
    mlp_out_norm: Option<Cow<'g, [f32]>>,
    /// Per-head query and key norms (Qwen3).
    q_norm: Option<Cow<'g, [f32]>>,
    k_norm: Option<Cow<'g, [f32]>>,
    /// Weight and bias by projection kind (`None` for the kinds the layer does not have).
    projs: [Option<ProjWeights<'g>>; SLOTS_PER_LAYER],
}

/// The next weight's values, which must be f32.
fn next_f32<'g>(
    values: &mut impl Iterator<Item = Result<Values<'g>>>,
    what: &str,
) -> Result<&'g [f32]> {
    match values.next() {
        Some(Ok(Values::F32(v))) => Ok(v),
        Some(Err(e)) => Err(e),
        _ => Err(Error::Msg(format!("{what} must be f32"))),
    }
}

/// The next weight's values as a dense base.
fn next_dense<'g>(
    values: &mut impl Iterator<Item = Result<Values<'g>>>,
) -> Result<BaseWeights<'g>> {
    match values.next() {
        Some(Ok(Values::F32(v))) => Ok(BaseWeights::F32(v)),
        Some(Ok(Values::Bf16(v))) => Ok(BaseWeights::Bf16(v)),
        Some(Err(e)) => Err(e),
        None => Err(Error::Msg(
            "a weight is missing from the step's list".into(),
        )),
    }
}

/// A norm's weight as the step multiplies by it: w, or 1 + w (Gemma).
fn norm_weight(w: &[f32], plus_one: bool) -> Cow<'_, [f32]> {
    if plus_one {
        Cow::Owned(w.iter().map(|v| 1.0 + v).collect())
    } else {
        Cow::Borrowed(w)
    }
}
/// The step's weights as slices.
struct StepWeights<'g> {
    embed: BaseWeights<'g>,
    final_norm: Cow<'g, [f32]>,
    head: BaseWeights<'g>,
    layers: Vec<LayerWeights<'g>>,
}

/// The token rows of each (adapter, coefficient) the rows use.
fn adapter_groups(rows: &[PackedRow], firsts: &[usize]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (row, &first) in rows.iter().zip(firsts) {
        let token_rows = first..first + row.tokens.len();
        for (pack, coefficient) in &row.adapters {
            let same = |g: &&mut Group| Arc::ptr_eq(&g.pack, pack) && g.coefficient == *coefficient;
            match groups.iter_mut().find(same) {
                Some(g) => g.rows.extend(token_rows.clone()),
                None => groups.push(Group {
                    pack: pack.clone(),
                    coefficient: *coefficient,
                    rows: token_rows.clone().collect(),
                }),
            }
        }
    }
    groups
}

/// The embedding rows of `ids` (tokens × h), scaled where the family scales them.
fn embed_rows(embed: BaseWeights, ids: &[u32], h: usize, scale: Option<f32>) -> Vec<f32> {
    let mut x = Vec::with_capacity(ids.len() * h);
    for &id in ids {
        let row = id as usize * h..(id as usize + 1) * h;
        match embed {
            BaseWeights::F32(table) => x.extend_from_slice(&table[row]),
            BaseWeights::Bf16(table) => x.extend(table[row].iter().map(|v| v.to_f32())),
            BaseWeights::FourBit(_) => unreachable!("the embedding is dense"),
        }
    }
    if let Some(scale) = scale {
        x.iter_mut().for_each(|v| *v *= scale);
    }
    x
}

/// The columns of token rows (rows × Σ widths) split into one buffer per width, in order:
/// a fused projection's output as its parts.
fn split_columns(x: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let rows = x.len() / total.max(1);
    let mut parts: Vec<Vec<f32>> = widths
        .iter()
        .map(|w| Vec::with_capacity(rows * w))
        .collect();
    for row in x.chunks_exact(total.max(1)) {
        let mut start = 0;
        for (part, &w) in parts.iter_mut().zip(widths) {
            part.extend_from_slice(&row[start..start + w]);
            start += w;
        }
    }
    parts
}

impl Llama {
    /// LongRoPE: a sequence whose cached positions are within `original_max_position_embeddings`
    /// and whose new tokens reach past it is recomputed whole, its cache emptied and its tokens
    /// made the whole sequence, so that every key is rotated by the long factors — what
    /// transformers' Phi-3 generation does (`prepare_inputs_for_generation` drops the cache
    /// there).
    fn restart_for_longrope(&self, row: &mut PackedRow) {
        let Some(original) = self.rope.long_threshold() else {
            return;
        };
        let past = row.cache.len();
        if past == 0 || past > original || past + row.tokens.len() <= original {
            return;
        }
        let whole: Vec<u32> = row
            .cache
            .tokens()
            .iter()
            .chain(row.tokens.iter())
            .copied()
            .collect();
        row.cache.clear();
        row.tokens = Cow::Owned(whole);
    }

    /// Advances every row by its tokens and returns the logits (rows, vocab) after each
    /// row's last token.
    pub fn forward_rows(&self, rows: &mut [RowStep]) -> Result<Tensor> {
        let base = |slot| self.slot_base(slot);
        let mut packed = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            let adapters = row
                .adapters
                .iter()
                .map(|&(adapter, weight)| match self.packs.get(adapter, &base)? {
                    Some(pack) => Ok((pack, weight)),
                    None => Err(Error::Msg(
                        "an adapter whose factors are being trained (or live off the CPU) cannot be batched".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            packed.push(PackedRow {
                tokens: Cow::Borrowed(row.tokens),
                cache: &mut *row.cache,
                adapters,
            });
        }
        self.step(&mut packed, Outputs::Last)
    }

    /// The base weight of projection `slot` (`SLOTS_PER_LAYER` × layer + kind).
    pub(crate) fn slot_base(&self, slot: usize) -> Option<&BaseWeight> {
        let layer = self.layers.get(slot / SLOTS_PER_LAYER)?;
        Some(layer.proj(slot % SLOTS_PER_LAYER)?.linear.base())
    }

    /// Whether this model's steps can run here: weights on the CPU in f32 or bf16 (linears
    /// may be 4-bit), none being trained.
    pub(crate) fn steps_on_host(&self) -> bool {
        self.device().is_cpu()
            && matches!(self.embed.dtype(), DType::F32 | DType::BF16)
            && !self.trainable
    }

    /// One step over `rows`; logits for the rows `outputs` names.
    pub(crate) fn step(&self, rows: &mut [PackedRow], outputs: Outputs) -> Result<Tensor> {
        self.check_rows(rows)?;
        self.packs.next_step();
        let new_tokens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
        for row in rows.iter_mut() {
            self.restart_for_longrope(row);
        }
        let c = &self.config;
        let all: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        self.check_ids(&all)?;
        let (firsts, tables) = self.row_tables(rows);
        let groups = adapter_groups(rows, &firsts);

        // Every weight's values, read in place for the whole step (one read lock per tensor:
        // std's may not be taken twice by one thread).
        let tensors = self.step_tensors();
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let storages: Vec<(&Storage, &Layout)> = guards.iter().map(|(g, l)| (&**g, *l)).collect();
        let StepWeights {
            embed,
            final_norm,
            head,
            layers,
        } = self.step_weights(&storages)?;
        let h = c.hidden_size;
        let x = embed_rows(embed, &all, h, c.embed_scale);
        // The layers are some hundred short parallel passes with serial stretches between
        // them; a sleeping thread woken for each pass cost up to a tenth of the step (more on
        // a VM), so the pool's other threads spin until the layers are done. One token with one
        // plain LoRA (batch-1 decoding) also has them warm the next pass's A factors.
        let warm_factors = all.len() == 1
            && matches!(rows[0].adapters.as_slice(), [(p, _)] if p.has_lora() && !p.has_dora());
        let x = lowrank_kernels::with_helpers(|team| {
            let team = warm_factors.then_some(team);
            self.layers_step(&layers, rows, &firsts, &groups, x, &tables, team)
        })?;

        let picked: Vec<usize> = match outputs {
            Outputs::Last => rows
                .iter()
                .zip(&firsts)
                .map(|(r, &first)| first + r.tokens.len() - 1)
                .collect(),
            // The new tokens' rows (a recomputed row has more).
            Outputs::All => rows
                .iter()
                .zip(&firsts)
                .zip(&new_tokens)
                .flat_map(|((r, &first), &n)| first + r.tokens.len() - n..first + r.tokens.len())
                .collect(),
        };
        for row in rows.iter_mut() {
            row.cache.record(&row.tokens);
        }
        let mut last = Vec::with_capacity(picked.len() * h);
        for &i in &picked {
            last.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        let normed = lowrank_kernels::rms_norm_rows(&last, &final_norm, c.rms_norm_eps as f32);
        let head = StepLinear {
            weight: head,
            bias: None,
            segments: Vec::new(),
        };
        let head = [head];
        let mut logits = apply(&self.linear_input(&normed, &head), h, &head)?
            .pop()
            .expect("one linear");
        if let Some(cap) = c.final_softcap {
            let cap = cap as f32;
            logits.iter_mut().for_each(|x| *x = (*x / cap).tanh() * cap);
        }
        let vocab = logits.len() / picked.len();
        Ok(Tensor::from_vec(
            logits,
            (picked.len(), vocab),
            self.device(),
        )?)
    }

    /// `input` as `linears` read it: rounded to bf16 where the model computes with bf16
    /// activations and their weight is bf16 (see [`Llama::round_activations_to_bf16`]).
    fn linear_input<'a>(&self, input: &'a [f32], linears: &[StepLinear]) -> Cow<'a, [f32]> {
        let bf16_weight = linears
            .iter()
            .any(|l| matches!(l.weight, BaseWeights::Bf16(_)));
        if self.bf16_activations && bf16_weight {
            Cow::Owned(lowrank_kernels::bf16_gemm::rounded_to_bf16(input))
        } else {
            Cow::Borrowed(input)
        }
    }

    /// Refuses an empty row, a model whose steps cannot run here, and a DoRA adapter stacked
    /// or re-weighted.
    fn check_rows(&self, rows: &[PackedRow]) -> Result<()> {
        if rows.is_empty() || rows.iter().any(|r| r.tokens.is_empty()) {
            return Err(Error::Msg(
                "a step needs at least one token in every row".into(),
            ));
        }
        if !self.steps_on_host() {
            return Err(Error::Msg(
                "batched steps run on the CPU over frozen f32 weights (bf16 or 4-bit linears allowed)".into(),
            ));
        }
        for row in rows.iter() {
            let dora = row.adapters.iter().any(|(p, _)| p.has_dora());
            if dora && (row.adapters.len() > 1 || row.adapters[0].1 != 1.0) {
                return Err(Error::Msg(
                    "a DoRA adapter cannot be stacked with other adapters or re-weighted at inference; merge it first".into(),
                ));
            }
        }
        Ok(())
    }

    /// Where each row's tokens start among the step's token rows, and every token row's rotary
    /// tables for its position (LongRoPE picks its frequencies per row; Gemma 3's
    /// sliding-window layers have their own).
    fn row_tables(&self, rows: &[PackedRow]) -> (Vec<usize>, HostTables) {
        let mut firsts = Vec::with_capacity(rows.len());
        let mut tables: Option<HostTables> = None;
        let mut first = 0;
        for row in rows.iter() {
            firsts.push(first);
            first += row.tokens.len();
            let past = row.cache.len();
            let positions: Vec<usize> = (past..past + row.tokens.len()).collect();
            let row_tables = self.rope.host_tables(&positions);
            match &mut tables {
                None => tables = Some(row_tables),
                Some(all) => all.extend(row_tables),
            }
        }
        (firsts, tables.expect("at least one row"))
    }

    /// The output head as the step reads it (bf16 for inference where cast), and whether it is
    /// the embedding table.
    fn step_head(&self) -> (&Tensor, bool) {
        let head = self
            .head_for_inference
            .as_ref()
            .unwrap_or(self.head_weight());
        (head, head.id() == self.embed.id())
    }

    /// The dense tensors a step reads, in the order [`Self::step_weights`] takes them: the
    /// embedding, the final norm, an untied head, then each layer's norms and dense projections
    /// with their biases.
    fn step_tensors(&self) -> Vec<&Tensor> {
        let (head, tied) = self.step_head();
        let mut tensors = vec![&self.embed, &self.norm];
        if !tied {
            tensors.push(head);
        }
        for layer in &self.layers {
            tensors.extend(layer.norms().into_iter().map(|(_, w)| w));
            for p in layer.projs() {
                tensors.extend(p.linear.base().as_dense());
                tensors.extend(p.linear.bias());
            }
        }
        tensors
    }

    /// Every weight as slices of the locked storages of [`Self::step_tensors`] (4-bit
    /// projections from their codes).
    fn step_weights<'g>(
        &'g self,
        storages: &[(&'g Storage, &'g Layout)],
    ) -> Result<StepWeights<'g>> {
        let c = &self.config;
        let tied = self.step_head().1;
        let mut values = storages.iter().map(|&(storage, layout)| {
            let range = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::Msg("a weight is not contiguous".into()))?;
            match storage {
                Storage::Cpu(CpuStorage::F32(v)) => Ok(Values::F32(&v[range.0..range.1])),
                Storage::Cpu(CpuStorage::BF16(v)) => Ok(Values::Bf16(&v[range.0..range.1])),
                _ => Err(Error::Msg("weights must be f32 or bf16 on the CPU".into())),
            }
        });
        let embed = next_dense(&mut values)?;
        let final_norm = norm_weight(next_f32(&mut values, "the final norm")?, c.norm_plus_one);
        let head = if tied {
            embed
        } else {
            next_dense(&mut values)?
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            // In `Layer::norms` order.
            let plus_one = c.norm_plus_one;
            let mut norm = |w: Option<&Tensor>| {
                w.map(|_| next_f32(&mut values, "a norm").map(|w| norm_weight(w, plus_one)))
                    .transpose()
            };
            let input_norm = norm(Some(&layer.input_norm))?.expect("always there");
            let mlp_norm = norm(Some(&layer.mlp_norm))?.expect("always there");
            let attn_out_norm = norm(layer.attn_out_norm.as_ref())?;
            let mlp_out_norm = norm(layer.mlp_out_norm.as_ref())?;
            let q_norm = norm(layer.q_norm.as_ref())?;
            let k_norm = norm(layer.k_norm.as_ref())?;
            let mut projs = [None; SLOTS_PER_LAYER];
            for p in layer.projs() {
                let weight = match p.linear.base() {
                    BaseWeight::Quantized(q) => BaseWeights::FourBit(q.as_ref()),
                    BaseWeight::Dense(_) => next_dense(&mut values)?,
                };
                let bias = match p.linear.bias() {
                    Some(_) => Some(next_f32(&mut values, "a bias")?),
                    None => None,
                };
                projs[p.kind] = Some((weight, bias));
            }
            layers.push(LayerWeights {
                input_norm,
                mlp_norm,
                attn_out_norm,
                mlp_out_norm,
                q_norm,
                k_norm,
                projs,
            });
        }

        Ok(StepWeights {
            embed,
            final_norm,
            head,
            layers,
        })
    }

    /// Appends the step's keys and values of layer `i` to each row's cache and attends every
    /// token row over its own cache (ragged lengths, one kernel call for all rows).
    fn attend_cached(
        &self,
        i: usize,
        rows: &mut [PackedRow],
        firsts: &[usize],
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = c.attention_scale as f32;
        let softcap = c.attention_softcap.map(|s| s as f32);
        let kv_width = kv_heads * d;
        for (row, &first) in rows.iter_mut().zip(firsts) {
            let n = row.tokens.len();
            let span = first * kv_width..(first + n) * kv_width;
            row.cache
                .row_layer(i, kv_heads, d, n)?
                .append(&k[span.clone()], &v[span], n);
        }
        let cached = rows
            .iter()
            .zip(firsts)
            .map(|(row, &first)| {
                let kv = row.cache.rows_of(i).expect("written above");
                CachedRow {
                    k: &kv.k,
                    v: &kv.v,
                    capacity: kv.capacity,
                    len: kv.len,
                    first,
                    tokens: row.tokens.len(),
                }
            })
            .collect::<Vec<_>>();
        let shape = Heads {
            heads,
            kv_heads,
            head_dim: d,
        };
        Ok(attend_rows(
            q,
            &cached,
            shape,
            scale,
            c.layer_windows[i],
            softcap,
        )?)
    }

    /// Every decoder layer over the step's token rows x (tokens × hidden).
    #[allow(clippy::too_many_arguments)]
    fn layers_step<'p>(
        &self,
        layers: &[LayerWeights],
        rows: &mut [PackedRow],
        firsts: &[usize],
        groups: &'p [Group],
        mut x: Vec<f32>,
        tables: &HostTables,
        team: Option<&DecodeTeam<'p>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps as f32);
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let fused = c.fused_projections;
        let (attn_in, mlp_in): (&[usize], &[usize]) = if fused {
            (&[kind::QKV], &[kind::GATE_UP])
        } else {
            (&[kind::Q, kind::K, kind::V], &[kind::GATE, kind::UP])
        };
        let tokens = x.len() / h;
        // The adapters' segments of projection `slot`.
        let segments = |slot: usize| -> Vec<Segment<'p>> {
            groups
                .iter()
                .filter_map(|g| {
                    let m = g.pack.module(slot)?;
                    Some(Segment {
                        a: m.a,
                        b: m.b,
                        scale: (m.scale * g.coefficient) as f32,
                        rows: &g.rows,
                        column_scale: m.column_scale,
                    })
                })
                .collect()
        };
        // Has the helpers load the A factors of the next pass over `projs` of `layer`.
        let warm = |layer: usize, projs: &[usize]| {
            if let Some(team) = team {
                let a: Vec<&'p [f32]> = projs
                    .iter()
                    .flat_map(|&k| segments(SLOTS_PER_LAYER * layer + k))
                    .map(|s| s.a)
                    .collect();
                team.warm(&a);
            }
        };
        for (i, w) in layers.iter().enumerate() {
            let pass = |projs: &[usize], input: &[f32], in_f: usize| -> Result<Vec<Vec<f32>>> {
                let linears = projs
                    .iter()
                    .map(|&k| {
                        let (weight, bias) = w.projs[k].ok_or_else(|| {
                            Error::Msg(format!("layer {i} has no projection of kind {k}"))
                        })?;
                        Ok(StepLinear {
                            weight,
                            bias,
                            segments: segments(SLOTS_PER_LAYER * i + k),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(apply(&self.linear_input(input, &linears), in_f, &linears)?)
            };
            // Loaded during the residual add and the norm before the pass.
            warm(i, attn_in);
            let normed = lowrank_kernels::rms_norm_rows(&x, &w.input_norm, eps);
            let outputs = pass(attn_in, &normed, h)?;
            let [mut q, mut k, v]: [Vec<f32>; 3] = if fused {
                split_columns(&outputs[0], &[heads * d, kv_heads * d, kv_heads * d])
            } else {
                outputs
            }
            .try_into()
            .unwrap_or_else(|_| unreachable!("three"));
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                q = lowrank_kernels::rms_norm_rows(&q, qn, eps);
                k = lowrank_kernels::rms_norm_rows(&k, kn, eps);
            }
            // Attention comes next, the longest stretch without a pass.
            let next: Vec<usize> = [kind::O].iter().chain(mlp_in).copied().collect();
            warm(i, &next);
            let (cos, sin) = tables.of(c.layer_windows[i].is_some());
            lowrank_kernels::rope_rows(&mut q, tokens, heads, cos, sin)?;
            lowrank_kernels::rope_rows(&mut k, tokens, kv_heads, cos, sin)?;
            let attn = self.attend_cached(i, rows, firsts, &q, &k, &v)?;
            let [mut o]: [Vec<f32>; 1] = pass(&[kind::O], &attn, heads * d)?
                .try_into()
                .unwrap_or_else(|_| unreachable!("one"));
            if let Some(wn) = &w.attn_out_norm {
                o = lowrank_kernels::rms_norm_rows(&o, wn, eps);
            }
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let normed = lowrank_kernels::rms_norm_rows(&x, &w.mlp_norm, eps);
            let outputs = pass(mlp_in, &normed, h)?;
            let inter = c.intermediate_size;
            let [gate, up]: [Vec<f32>; 2] = if fused {
                split_columns(&outputs[0], &[inter, inter])
            } else {
                outputs
            }
            .try_into()
            .unwrap_or_else(|_| unreachable!("two"));
            warm(i, &[kind::DOWN]);
            let act = match c.activation {
                Activation::Silu => lowrank_kernels::swiglu_values(&gate, &up),
                Activation::GeluTanh => lowrank_kernels::gelu_tanh_glu_values(&gate, &up),
            };
            let [mut down]: [Vec<f32>; 1] = pass(&[kind::DOWN], &act, inter)?
                .try_into()
                .unwrap_or_else(|_| unreachable!("one"));
            if let Some(wn) = &w.mlp_out_norm {
                down = lowrank_kernels::rms_norm_rows(&down, wn, eps);
            }
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::ActiveAdapter;
    use candle_core::Device;
    use lowrank_core::lora::{LoraConfig, LoraModule};
    use lowrank_core::targets::ModuleSelector;
    use lowrank_core::QuantSpec;
    use lowrank_quant::QuantType;
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

    /// A rank-`rank` LoRA on every linear of `model`, from a seeded generator.
    fn random_adapter(model: &Llama, rank: usize, seed: u64) -> LoraAdapter {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
        let modules = model
            .linears()
            .into_iter()
            .map(|l| {
                let a = Tensor::from_vec(
                    values(rank * l.in_features),
                    (rank, l.in_features),
                    &Device::Cpu,
                )
                .unwrap();
                let b = Tensor::from_vec(
                    values(l.out_features * rank),
                    (l.out_features, rank),
                    &Device::Cpu,
                )
                .unwrap();
                let module = LoraModule {
                    a,
                    b,
                    magnitude: None,
                    scale: 0.5,
                };
                (l.name, module)
            })
            .collect();
        LoraAdapter {
            config: LoraConfig::new(
                rank,
                rank as f64 / 2.0,
                ModuleSelector::Names(vec!["q_proj".into()]),
            ),
            modules,
        }
    }

    /// Each row of batched steps equals that row alone through the candle layer loop (no
    /// cache, its adapters applied there), for rows with different adapters, weights, stacks
    /// and cache lengths: three rows prefill prefixes of different lengths in one step (65
    /// token rows, past the skinny GEMM's 64: the GEMM), then finish their prompts in a second
    /// mixed step (25 token rows: the skinny GEMM's broadcast blocks where the CPU has
    /// AVX-512), then decode a token each (3: its dot-product blocks).
    fn check_rows_alone(model: &Llama, adapters: [Vec<(&LoraAdapter, f64)>; 3], tolerance: f32) {
        let long: Vec<u32> = (0..80).map(|i| 1 + (i * 7) % 300).collect();
        let prompts: [&[u32]; 3] = [&[1, 40, 41, 42, 43, 44, 45], &[1, 50, 51], &long];
        let next: [u32; 3] = [7, 8, 9];
        let mut expect = Vec::new();
        for ((p, a), n) in prompts.iter().zip(&adapters).zip(next) {
            let active: Vec<ActiveAdapter> = a
                .iter()
                .map(|&(a, w)| ActiveAdapter::with_coefficient(a, w))
                .collect();
            let full: Vec<u32> = p.iter().copied().chain([n]).collect();
            let ids = Tensor::new(full.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward(&ids, None, &active)
                .unwrap()
                .squeeze(0)
                .unwrap();
            expect.push((
                logits.get(p.len() - 1).unwrap(),
                logits.get(p.len()).unwrap(),
            ));
        }
        let mut caches: Vec<KvCache> = (0..3).map(|_| KvCache::new()).collect();
        let split = [2usize, 1, 62];
        for part in 0..3 {
            let mut rows: Vec<RowStep> = caches
                .iter_mut()
                .zip(prompts.iter().zip(&adapters))
                .zip(split.iter().zip(&next))
                .map(|((cache, (p, adapters)), (&s, n))| {
                    let tokens = match part {
                        0 => &p[..s],
                        1 => &p[s..],
                        _ => std::slice::from_ref(n),
                    };
                    RowStep {
                        tokens,
                        cache,
                        adapters: adapters.clone(),
                    }
                })
                .collect();
            let got = model.forward_rows(&mut rows).unwrap();
            if part > 0 {
                for (i, e) in expect.iter().enumerate() {
                    let want = if part == 1 { &e.0 } else { &e.1 };
                    let d = max_diff(&got.get(i).unwrap(), want);
                    assert!(d < tolerance, "step {part}, row {i}: {d}");
                }
            }
        }
        assert_eq!(caches[0].len(), 8);
        assert_eq!(caches[2].len(), 81);
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
        let wide = random_adapter(&model, 16, 1);
        check_rows_alone(
            &model,
            [vec![(&lora, 1.0)], vec![(&dora, 1.0)], vec![]],
            1e-4,
        );
        // Ranks 4 and 16, a stack with weights, the same adapter at two weights.
        check_rows_alone(
            &model,
            [
                vec![(&lora, 0.7), (&wide, 0.3)],
                vec![(&wide, 1.0)],
                vec![(&lora, 1.0)],
            ],
            1e-4,
        );
    }

    /// The same over a 4-bit base (NF4 with double quantization, in blocks of 64 that each
    /// cover two rows of the 32-wide weights), over bf16 weights, and over the 4-bit base with
    /// its embedding and head in bf16, each against the candle loop over the same weights.
    #[test]
    fn mixed_rows_over_4bit_and_bf16_bases() {
        let mut quantized = Llama::load(&fixture("models/llama-tied"), &Device::Cpu).unwrap();
        let spec = QuantSpec::new(QuantType::Nf4, true, 64).unwrap();
        quantized.quantize_linears(&spec).unwrap();
        let lora = quantized
            .load_adapter(&fixture("adapters/llama-tied__lora-qv"))
            .unwrap();
        let dora = quantized
            .load_adapter(&fixture("adapters/llama-tied__dora"))
            .unwrap();
        let wide = random_adapter(&quantized, 16, 2);
        check_rows_alone(
            &quantized,
            [
                vec![(&lora, 1.0)],
                vec![(&dora, 1.0)],
                vec![(&lora, 0.5), (&wide, 0.5)],
            ],
            1e-4,
        );
        let mut bf16 = Llama::load(&fixture("models/llama-tied"), &Device::Cpu).unwrap();
        bf16.cast_for_inference(DType::BF16).unwrap();
        check_rows_alone(
            &bf16,
            [vec![(&lora, 1.0)], vec![(&dora, 1.0)], vec![]],
            1e-4,
        );
        // `--bf16-weights` over the 4-bit base: the tied embedding and head in bf16, once.
        quantized.cast_for_inference(DType::BF16).unwrap();
        assert_eq!(quantized.head_weight().dtype(), DType::BF16);
        assert!(quantized.head_for_inference.is_none());
        check_rows_alone(
            &quantized,
            [vec![(&lora, 1.0)], vec![(&dora, 1.0)], vec![]],
            1e-4,
        );
    }

    /// `forward_last` gives the last row of `forward`'s logits, through the step (with a
    /// cache) and through the candle loop (without).
    #[test]
    fn last_position_logits_equal_the_full_forward_s_last() {
        let model = Llama::load(&fixture("models/llama-tied"), &Device::Cpu).unwrap();
        let lora = model
            .load_adapter(&fixture("adapters/llama-tied__lora-qv"))
            .unwrap();
        let active = [ActiveAdapter::new(&lora)];
        let ids = Tensor::new(&[1u32, 40, 41, 42], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for cached in [false, true] {
            let (mut all, mut last) = (KvCache::new(), KvCache::new());
            let full = model
                .forward(&ids, cached.then_some(&mut all), &active)
                .unwrap();
            let got = model
                .forward_last(&ids, cached.then_some(&mut last), &active)
                .unwrap();
            let want = full
                .squeeze(0)
                .unwrap()
                .get(3)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            // Up to f32 rounding: the GEMMs of 4 rows and of 1 sum in different orders.
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-5, "cached {cached}: {diff}");
        }
    }

    /// A DoRA adapter in a stack, or re-weighted, is refused with the reason.
    #[test]
    fn dora_is_not_stacked() {
        let model = Llama::load(&fixture("models/llama-tied"), &Device::Cpu).unwrap();
        let lora = model
            .load_adapter(&fixture("adapters/llama-tied__lora-qv"))
            .unwrap();
        let dora = model
            .load_adapter(&fixture("adapters/llama-tied__dora"))
            .unwrap();
        for adapters in [vec![(&dora, 1.0), (&lora, 1.0)], vec![(&dora, 0.5)]] {
            let mut cache = KvCache::new();
            let mut rows = [RowStep {
                tokens: &[1, 2],
                cache: &mut cache,
                adapters,
            }];
            let err = model.forward_rows(&mut rows).unwrap_err().to_string();
            assert!(err.contains("cannot be stacked"), "{err}");
        }
    }
}
