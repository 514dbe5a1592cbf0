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
    group_scores(qs, &k[lo * d..len * d], scale, scores);
    if let Some(cap) = softcap {
        soft_cap(scores, cap);
    }
    for s in scores.chunks_exact_mut(n) {
        let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let inv = 1.0 / exp_shifted(s, max);
        s.iter_mut().for_each(|p| *p *= inv);
    }
    let mut out = vec![0f32; qs.len() * d];
    group_values(scores, &v[lo * d..len * d], d, &mut out);
    out
}

/// scores[h·n + j] = q_h·key_j·scale for each head h of the group and each of the n keys
/// (n × d).
fn group_scores(qs: &[&[f32]], keys: &[f32], scale: f32, scores: &mut [f32]) {
    let d = qs.first().map_or(0, |q| q.len());
    let n = keys.len().checked_div(d).unwrap_or(0);
    assert!(
        scores.len() >= qs.len() * n && qs.iter().all(|q| q.len() == d),
        "group_scores: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && crate::cpu::has_avx512f() {
        // SAFETY: the CPU has AVX-512F; the assert keeps every read and write inside the
        // slices.
        return unsafe { group_scores_avx512(qs, keys, d, scale, scores) };
    }
    for (j, key) in keys.chunks_exact(d).enumerate() {
        for (h, q) in qs.iter().enumerate() {
            scores[h * n + j] = dot(q, key) * scale;
        }
    }
}

/// [`group_scores`] for d a multiple of 16: each key loaded once for all heads.
///
/// # Safety
/// The CPU must have AVX-512F; the shapes must pass [`group_scores`]' check.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_scores_avx512(
    qs: &[&[f32]],
    keys: &[f32],
    d: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = keys.len() / d;
    let whole = n / 16 * 16;
    // Sixteen keys at a time per head: sixteen sums, then added across lanes together.
    for (h, q) in qs.iter().enumerate() {
        for j0 in (0..whole).step_by(16) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..d).step_by(16) {
                let qc = _mm512_loadu_ps(q.as_ptr().add(c));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let key = keys.as_ptr().add((j0 + t) * d + c);
                    *acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(key), *acc);
                }
            }
            let sums = _mm512_mul_ps(crate::cpu::sum_lanes_16(acc), _mm512_set1_ps(scale));
            _mm512_storeu_ps(scores.as_mut_ptr().add(h * n + j0), sums);
        }
    }
    for j in whole..n {
        let key = keys.as_ptr().add(j * d);
        for (h, q) in qs.iter().enumerate() {
            let mut acc = _mm512_setzero_ps();
            for c in (0..d).step_by(16) {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.as_ptr().add(c)),
                    _mm512_loadu_ps(key.add(c)),
                    acc,
                );
            }
            *scores.get_unchecked_mut(h * n + j) = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// out[h·d..(h + 1)·d] += Σ_j p[h·n + j]·values[j] for each head h of the group, the n values
/// (n × d) read once for all heads.
fn group_values(p: &[f32], values: &[f32], d: usize, out: &mut [f32]) {
    let heads = out.len().checked_div(d).unwrap_or(0);
    let n = values.len().checked_div(d).unwrap_or(0);
    assert!(p.len() >= heads * n, "group_values: shapes");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(32) && crate::cpu::has_avx512f() {
        for h0 in (0..heads).step_by(VALUE_HEADS) {
            let hs = VALUE_HEADS.min(heads - h0);
            let (p, out) = (&p[h0 * n..], &mut out[h0 * d..(h0 + hs) * d]);
            macro_rules! heads {
                ($($h:literal),*) => {
                    match hs {
                        // SAFETY: the CPU has AVX-512F; the assert keeps every read inside
                        // p and values, and the writes inside out.
                        $($h => unsafe { group_values_avx512::<$h>(p, values, d, out) },)*
                        _ => unreachable!("1 to {VALUE_HEADS} heads"),
                    }
                };
            }
            heads!(1, 2, 3, 4, 5, 6, 7, 8);
        }
        return;
    }
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        for (p, value) in p[h * n..(h + 1) * n].iter().zip(values.chunks_exact(d)) {
            o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
        }
    }
}

/// Heads of a group whose sums [`group_values_avx512`] keeps in registers at once.
#[cfg(target_arch = "x86_64")]
const VALUE_HEADS: usize = 8;

/// [`group_values`] for H heads and d a multiple of 32: 32 columns at a time, H × 2 sums in
/// registers over all the values.
///
/// # Safety
/// The CPU must have AVX-512F; p must hold H × n weights, values n × d and out H × d.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_values_avx512<const H: usize>(
    p: &[f32],
    values: &[f32],
    d: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = values.len() / d;
    for c in (0..d).step_by(32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; H];
        for j in 0..n {
            let value = values.as_ptr().add(j * d + c);
            let (v0, v1) = (_mm512_loadu_ps(value), _mm512_loadu_ps(value.add(16)));
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.get_unchecked(h * n + j));
                acc[0] = _mm512_fmadd_ps(w, v0, acc[0]);
                acc[1] = _mm512_fmadd_ps(w, v1, acc[1]);
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(h * d + c);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[0]));
            _mm512_storeu_ps(o.add(16), _mm512_add_ps(_mm512_loadu_ps(o.add(16)), acc[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal_attention;
    use crate::test_util::*;
    use candle_core::Tensor;

    /// A kv group's scores and weighted values against f64 sums, for head sizes that take
    /// the AVX-512 paths (multiples of 16 and 32, where the CPU has them) and those that do
    /// not, and groups of up to ten heads (more than one block of eight for the values).
    #[test]
    fn group_scores_and_values_match_f64() {
        for d in [8, 16, 40, 64, 96, 128] {
            for heads in [1, 3, 8, 10] {
                let n = 37;
                let qv: Vec<Vec<f32>> = (0..heads).map(|h| values(d, h)).collect();
                let qs: Vec<&[f32]> = qv.iter().map(|q| q.as_slice()).collect();
                let (keys, vals) = (values(n * d, 50), values(n * d, 60));
                let mut scores = vec![0f32; heads * n];
                group_scores(&qs, &keys, 0.3, &mut scores);
                let start = values(heads * d, 70);
                let mut out = start.clone();
                group_values(&scores, &vals, d, &mut out);
                for h in 0..heads {
                    for j in 0..n {
                        let want: f64 = (0..d)
                            .map(|c| qs[h][c] as f64 * keys[j * d + c] as f64)
                            .sum::<f64>()
                            * 0.3;
                        let got = scores[h * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "d {d} heads {heads} score ({h}, {j}): {got} vs {want}"
                        );
                    }
                    for c in 0..d {
                        let want = start[h * d + c] as f64
                            + (0..n)
                                .map(|j| scores[h * n + j] as f64 * vals[j * d + c] as f64)
                                .sum::<f64>();
                        let got = out[h * d + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "d {d} heads {heads} value ({h}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

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
