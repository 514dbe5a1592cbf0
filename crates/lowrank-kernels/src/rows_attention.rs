//! Attention of a batched inference step: each sequence's new queries against its own KV cache
//! (ragged lengths; prefill chunks and single decoding tokens mixed) in one call, parallel over
//! (sequence, head), the caches read in place.
//!
//! A decoding row (one query) is one task per kv head: its `group` query heads read each key
//! and value once. A prefill chunk goes through the tiled online-softmax blocks of
//! [`attention`](crate::attention), one task per (query head, block of queries).

use candle_core::{bail, Result};
use rayon::prelude::*;

use crate::attention::{soft_cap, Attention, BLOCK_Q};
use crate::cpu::dot;
use crate::exp::exp_shifted;

/// One sequence of a step.
#[derive(Clone, Copy)]
pub struct CachedRow<'a> {
    /// Its cached keys and values, (kv_heads, capacity, head_dim) each; the first `len`
    /// positions are valid, the last `tokens` of them this step's own.
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
    pub len: usize,
    /// Its queries are rows first..first + tokens of the step's q.
    pub first: usize,
    pub tokens: usize,
}

/// The attention heads of a model.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A task's output: `heads` consecutive query heads from `head`, `tokens` queries from token
/// row `first`, laid out (head, token, head_dim).
struct Piece {
    head: usize,
    heads: usize,
    first: usize,
    tokens: usize,
    values: Vec<f32>,
}

/// softmax(q·kᵀ·scale (soft-capped when `softcap` is given) + causal (and sliding-window)
/// mask)·v for every row's queries. `q` and the
/// output are (step tokens) × heads × head_dim, token-major (as the projections give them);
/// query head h reads kv head h / (heads / kv_heads).
pub fn attend_rows(
    q: &[f32],
    rows: &[CachedRow],
    shape: Heads,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Result<Vec<f32>> {
    let Heads {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!("attend_rows: {heads} query heads are not a multiple of {kv_heads} kv heads")
    }
    if window == Some(0) {
        bail!("attend_rows: a sliding window of 0 sees nothing")
    }
    let width = heads * d;
    for (i, r) in rows.iter().enumerate() {
        let cache = kv_heads * r.capacity * d;
        if r.tokens == 0 || r.tokens > r.len || r.len > r.capacity {
            bail!(
                "attend_rows: row {i}: {} queries, {} valid positions, capacity {}",
                r.tokens,
                r.len,
                r.capacity
            )
        }
        if r.k.len() < cache || r.v.len() < cache || (r.first + r.tokens) * width > q.len() {
            bail!("attend_rows: row {i}: its cache or queries are shorter than its shape says")
        }
    }
    let group = heads / kv_heads;
    // (row, first head, heads, first query, queries)
    let mut tasks = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.tokens == 1 {
            tasks.extend((0..kv_heads).map(|g| (i, g * group, group, 0, 1)));
        } else {
            for h in 0..heads {
                for t0 in (0..r.tokens).step_by(BLOCK_Q) {
                    tasks.push((i, h, 1, t0, BLOCK_Q.min(r.tokens - t0)));
                }
            }
        }
    }
    let pieces: Vec<Piece> = tasks
        .into_par_iter()
        .map_init(Vec::new, |scratch, (i, head, n_heads, t0, nt)| {
            let r = &rows[i];
            let g = head / group;
            let span = g * r.capacity * d..(g * r.capacity + r.len) * d;
            let (k, v) = (&r.k[span.clone()], &r.v[span]);
            let query = |h: usize, t: usize| {
                let at = (r.first + t) * width + h * d;
                &q[at..at + d]
            };
            let values = if nt == 1 && n_heads == group && r.tokens == 1 {
                let qs: Vec<&[f32]> = (head..head + n_heads).map(|h| query(h, 0)).collect();
                decode_heads(&qs, k, v, d, r.len, (scale, softcap), window, scratch)
            } else {
                let mut qb = Vec::with_capacity(nt * d);
                for t in t0..t0 + nt {
                    qb.extend_from_slice(query(head, t));
                }
                let att = Attention::inference(scale, softcap, r.len - r.tokens, window, r.len);
                let mut out = vec![0f32; nt * d];
                let mut lse = vec![0f32; nt];
                att.forward_block(r.len, d, &qb, k, v, t0, &mut out, &mut lse, scratch);
                out
            };
            Piece {
                head,
                heads: n_heads,
                first: r.first + t0,
                tokens: nt,
                values,
            }
        })
        .collect();
    let total = rows.iter().map(|r| r.first + r.tokens).max().unwrap_or(0);
    let mut out = vec![0f32; total * width];
    for p in pieces {
        for (hh, per_head) in p
            .values
            .chunks_exact(p.tokens * d)
            .enumerate()
            .take(p.heads)
        {
            for (t, value) in per_head.chunks_exact(d).enumerate() {
                let at = (p.first + t) * width + (p.head + hh) * d;
                out[at..at + d].copy_from_slice(value);
            }
        }
    }
    Ok(out)
}

/// One decoding query per head of a kv group (its last position, len − 1) over keys and
/// values (len × d): each key and value is read once for all the group's heads. Returns the
/// heads' outputs one after another.
#[allow(clippy::too_many_arguments)]
fn decode_heads(
    qs: &[&[f32]],
    k: &[f32],
    v: &[f32],
    d: usize,
    len: usize,
    (scale, softcap): (f32, Option<f32>),
    window: Option<usize>,
    scores: &mut Vec<f32>,
) -> Vec<f32> {
    let lo = window.map_or(0, |w| len.saturating_sub(w));
    let n = len - lo;
    scores.clear();
    scores.resize(qs.len() * n, 0.0);
    for (j, key) in k[lo * d..len * d].chunks_exact(d).enumerate() {
        for (h, q) in qs.iter().enumerate() {
            scores[h * n + j] = dot(q, key) * scale;
        }
    }
    if let Some(cap) = softcap {
        soft_cap(scores, cap);
    }
    let mut out = vec![0f32; qs.len() * d];
    for (h, s) in scores.chunks_exact_mut(n).enumerate() {
        let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let inv = 1.0 / exp_shifted(s, max);
        s.iter_mut().for_each(|p| *p *= inv);
        let o = &mut out[h * d..(h + 1) * d];
        for (p, value) in s.iter().zip(v[lo * d..len * d].chunks_exact(d)) {
            o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal_attention;
    use crate::test_util::*;
    use candle_core::Tensor;

    /// Rows of different cache lengths, prefill chunks (longer than a query block too) and
    /// decoding tokens in one call equal each row's attention alone (the tiled kernel over its
    /// valid prefix), with and without a sliding window, for grouped heads; what lies past a
    /// row's valid positions is never read.
    #[test]
    fn ragged_rows_equal_each_row_alone() {
        let (heads, kv_heads, d) = (6, 2, 8);
        let width = heads * d;
        for window in [None, Some(5)] {
            // (valid positions, this step's tokens, capacity)
            let shapes = [(1, 1, 4), (9, 1, 16), (7, 3, 8), (70, 70, 80), (30, 2, 30)];
            let caches: Vec<(Tensor, Tensor)> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(_, _, cap))| {
                    (
                        randt(&[1, kv_heads, cap, d], 10 + i as u64, 1.0),
                        randt(&[1, kv_heads, cap, d], 20 + i as u64, 1.0),
                    )
                })
                .collect();
            let total: usize = shapes.iter().map(|s| s.1).sum();
            let q = randt(&[total, heads, d], 3, 1.0);
            let kv: Vec<(Vec<f32>, Vec<f32>)> =
                caches.iter().map(|(k, v)| (vals(k), vals(v))).collect();
            let mut first = 0;
            let rows: Vec<CachedRow> = shapes
                .iter()
                .zip(&kv)
                .map(|(&(len, tokens, capacity), (k, v))| {
                    let row = CachedRow {
                        k,
                        v,
                        capacity,
                        len,
                        first,
                        tokens,
                    };
                    first += tokens;
                    row
                })
                .collect();
            let shape = Heads {
                heads,
                kv_heads,
                head_dim: d,
            };
            let got = attend_rows(&vals(&q), &rows, shape, 0.4, window, None).unwrap();
            for (i, (&(len, tokens, _), (k, v))) in shapes.iter().zip(&caches).enumerate() {
                let qi = q
                    .narrow(0, rows[i].first, tokens)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let (k, v) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
                let want = causal_attention(&qi, &k, &v, 0.4, len - tokens, window).unwrap();
                let want = vals(&want.squeeze(0).unwrap().transpose(0, 1).unwrap());
                let got = &got[rows[i].first * width..(rows[i].first + tokens) * width];
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err < 1e-5, "row {i} (window {window:?}): {err}");
            }
        }
        let cache = vec![0f32; 2 * 4 * 8];
        let row = CachedRow {
            k: &cache,
            v: &cache,
            capacity: 4,
            len: 5,
            first: 0,
            tokens: 1,
        };
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 8,
        };
        let err = attend_rows(&[0.0; 48], &[row], shape, 1.0, None, None).unwrap_err();
        assert!(err.to_string().contains("row 0"), "{err}");
    }
}
