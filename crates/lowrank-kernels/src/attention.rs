//! Causal attention with grouped-query heads, tiled with an online softmax
//! (FlashAttention-2 style): the t×s score matrix is never materialised, only one
//! (block_q × block_k) tile per task.
//!
//! Forward keeps the per-row log-sum-exp (b·h·t floats); backward recomputes each score tile
//! from q, k and that log-sum-exp.
//!
//! Query head `hh` reads kv head `hh / (h / kv)` (transformers' `repeat_kv` order), query row `i`
//! sits at position `past + i`, key `j` at position `j`; key j is visible to query i when
//! `j ≤ past + i` and, with a sliding window `w`, `past + i − j < w`.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{sgemm, slice, view, Mat};
use crate::exp::exp_shifted;

const NAME: &str = "lowrank-causal-attention";
pub(crate) const BLOCK_Q: usize = 64;
pub(crate) const BLOCK_K: usize = 64;

/// softmax(q·kᵀ·scale + causal mask)·v for q (b, h, t, d) and k, v (b, kv, s, d), h a multiple
/// of kv. Returns (b, h, t, d).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    past: usize,
    sliding_window: Option<usize>,
) -> Result<Tensor> {
    attention_blocks(q, k, v, scale, past, sliding_window, BLOCK_Q, BLOCK_K)
}

/// Decoding against a preallocated KV cache: `k_cache`/`v_cache` are (b, kv, capacity, d)
/// buffers whose first `cached` positions are valid, the last `t` of them being the queries'
/// own. Reads the buffers in place (no copy of the valid prefix). Inference only: fails when
/// an input records gradients.
pub fn causal_attention_cached(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cached: usize,
    scale: f32,
    sliding_window: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    if q.track_op() || k_cache.track_op() || v_cache.track_op() {
        bail!("causal_attention_cached: inference only, but an input records gradients")
    }
    let (t, capacity) = (q.dim(2)?, k_cache.dim(2)?);
    if cached < t || cached > capacity {
        bail!("causal_attention_cached: {cached} cached positions do not hold {t} queries in a cache of {capacity}")
    }
    check_attention(q, k_cache, v_cache, sliding_window)?;
    let op = Attention {
        scale,
        softcap,
        past: cached - t,
        window: sliding_window,
        block_q: BLOCK_Q,
        block_k: BLOCK_K,
        keys: Some(cached),
        keep_lse: false,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k_cache.contiguous()?, &v_cache.contiguous()?, op)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    past: usize,
    sliding_window: Option<usize>,
    block_q: usize,
    block_k: usize,
) -> Result<Tensor> {
    check_attention(q, k, v, sliding_window)?;
    if block_q == 0 || block_q > BLOCK_Q_MAX || block_k == 0 {
        bail!("causal_attention: bad block sizes {block_q}×{block_k}")
    }
    let op = Attention {
        scale,
        softcap: None,
        past,
        window: sliding_window,
        block_q,
        block_k,
        keys: None,
        keep_lse: q.track_op() || k.track_op() || v.track_op(),
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// cap · tanh(x / cap) of every score, as transformers' Gemma 2 eager attention computes it.
pub(crate) fn soft_cap(scores: &mut [f32], cap: f32) {
    scores.iter_mut().for_each(|x| *x = (*x / cap).tanh() * cap);
}

/// Shapes: q (b, h, t, d), k and v (b, kv, s, d) with h a multiple of kv.
fn check_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sliding_window: Option<usize>,
) -> Result<()> {
    let (b, h, _t, d) = q.dims4()?;
    let (kb, kv, _s, kd) = k.dims4()?;
    if k.dims() != v.dims() || kb != b || kd != d {
        bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if kv == 0 || h % kv != 0 {
        bail!("causal_attention: {h} query heads are not a multiple of {kv} kv heads")
    }
    if sliding_window == Some(0) {
        bail!("causal_attention: a sliding window of 0 sees nothing")
    }
    Ok(())
}

pub(crate) struct Attention {
    scale: f32,
    /// Gemma 2's attention logit soft-capping, cap · tanh(score / cap) of the scaled scores
    /// before the mask (inference only: backward does not know it).
    softcap: Option<f32>,
    past: usize,
    window: Option<usize>,
    block_q: usize,
    block_k: usize,
    /// Valid keys when k/v are a preallocated cache longer than that (None: all of them).
    keys: Option<usize>,
    keep_lse: bool,
    /// (b, h, t) log-sum-exp of each query row's scaled scores, kept by forward for backward.
    lse: Mutex<Option<Tensor>>,
}

impl Attention {
    /// Inference over `keys` valid keys, the queries at positions past, past + 1, …, with the
    /// default tiles and no statistics kept.
    pub(crate) fn inference(
        scale: f32,
        softcap: Option<f32>,
        past: usize,
        window: Option<usize>,
        keys: usize,
    ) -> Self {
        Attention {
            scale,
            softcap,
            past,
            window,
            block_q: BLOCK_Q,
            block_k: BLOCK_K,
            keys: Some(keys),
            keep_lse: false,
            lse: Mutex::new(None),
        }
    }

    #[inline]
    fn visible(&self, qpos: usize, j: usize) -> bool {
        j <= qpos && self.window.is_none_or(|w| qpos - j < w)
    }

    /// Keys `lo..hi` that some query at positions `p0..=p1` may see.
    fn key_range(&self, p0: usize, p1: usize, s: usize) -> (usize, usize) {
        let lo = self.window.map_or(0, |w| (p0 + 1).saturating_sub(w));
        (lo, (p1 + 1).min(s))
    }

    /// Whether every query in `p0..=p1` sees every key in `j0..=j1`.
    fn all_visible(&self, p0: usize, p1: usize, j0: usize, j1: usize) -> bool {
        j1 <= p0 && self.window.is_none_or(|w| p1 - j0 < w)
    }

    /// Whether some query in `p0..=p1` sees some key in `j0..=j1`.
    fn any_visible(&self, p0: usize, p1: usize, j0: usize, j1: usize) -> bool {
        j0 <= p1 && self.window.is_none_or(|w| p0 < j1 + w)
    }

    /// One block of query rows of one head: writes `out` (rows × d) and `lse` (rows).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_block(
        &self,
        s: usize,
        d: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        i0: usize,
        out: &mut [f32],
        lse: &mut [f32],
        sbuf: &mut Vec<f32>,
    ) {
        let rows = lse.len();
        let p0 = self.past + i0;
        let p1 = p0 + rows - 1;
        let (lo, hi) = self.key_range(p0, p1, s);
        let mut m = [f32::NEG_INFINITY; BLOCK_Q_MAX];
        let mut l = [0f32; BLOCK_Q_MAX];
        out.fill(0.0);
        sbuf.resize(rows * self.block_k, 0.0);
        let mut j0 = lo;
        while j0 < hi {
            let cols = self.block_k.min(hi - j0);
            let sb = &mut sbuf[..rows * cols];
            let kj = &k[j0 * d..(j0 + cols) * d];
            sgemm(
                rows,
                cols,
                d,
                sb,
                cols,
                Mat::rows(q, d),
                Mat::t(kj, d),
                self.scale,
                false,
                false,
            );
            if let Some(cap) = self.softcap {
                soft_cap(sb, cap);
            }
            let masked = !self.all_visible(p0, p1, j0, j0 + cols - 1);
            for r in 0..rows {
                let row = &mut sb[r * cols..(r + 1) * cols];
                if masked {
                    for (c, x) in row.iter_mut().enumerate() {
                        if !self.visible(p0 + r, j0 + c) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let m_new = m[r].max(mx);
                if m_new == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let sum = exp_shifted(row, m_new);
                let corr = (m[r] - m_new).exp();
                if corr != 1.0 {
                    out[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= corr);
                }
                l[r] = l[r] * corr + sum;
                m[r] = m_new;
            }
            sgemm(
                rows,
                d,
                cols,
                out,
                d,
                Mat::rows(sb, cols),
                Mat::rows(&v[j0 * d..(j0 + cols) * d], d),
                1.0,
                true,
                false,
            );
            j0 += cols;
        }
        for r in 0..rows {
            if l[r] > 0.0 {
                let inv = 1.0 / l[r];
                out[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= inv);
                lse[r] = m[r] + l[r].ln();
            } else {
                lse[r] = f32::INFINITY; // sees no key: output 0, probabilities 0 in backward
            }
        }
    }
}

const BLOCK_Q_MAX: usize = 256;

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(s1, l1, NAME)?,
            slice(s2, l2, NAME)?,
            slice(s3, l3, NAME)?,
        );
        let (b, h, t, d) = l1.shape().dims4()?;
        let (_, kv, s, _) = l2.shape().dims4()?;
        let keys = self.keys.unwrap_or(s);
        let group = h / kv;
        let mut out = vec![0f32; b * h * t * d];
        let mut lse = vec![0f32; b * h * t];
        let bq = self.block_q;
        if t > 0 {
            out.par_chunks_mut(t * d)
                .zip(lse.par_chunks_mut(t))
                .enumerate()
                .for_each(|(slab, (o, ls))| {
                    let (bi, hh) = (slab / h, slab % h);
                    let kbase = (bi * kv + hh / group) * s * d;
                    let (kh, vh) = (&k[kbase..kbase + s * d], &v[kbase..kbase + s * d]);
                    let qh = &q[slab * t * d..(slab + 1) * t * d];
                    o.par_chunks_mut(bq * d)
                        .zip(ls.par_chunks_mut(bq))
                        .enumerate()
                        .for_each_init(Vec::new, |sbuf, (blk, (o, ls))| {
                            let i0 = blk * bq;
                            let qb = &qh[i0 * d..(i0 + ls.len()) * d];
                            self.forward_block(keys, d, qb, kh, vh, i0, o, ls, sbuf);
                        });
                });
        }
        if self.keep_lse {
            *self.lse.lock().expect("lse lock") =
                Some(Tensor::from_vec(lse, (b, h, t), &Device::Cpu)?);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        qt: &Tensor,
        kt: &Tensor,
        vt: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_q, want_k, want_v) = (qt.track_op(), kt.track_op(), vt.track_op());
        if !(want_q || want_k || want_v) {
            return Ok((None, None, None));
        }
        let Some(lse) = self.lse.lock().expect("lse lock").clone() else {
            bail!("{NAME}: backward without the forward's log-sum-exp")
        };
        let (_b, h, t, d) = qt.dims4()?;
        let (_, kv, s, _) = kt.dims4()?;
        let group = h / kv;
        let (go, o) = (grad.contiguous()?, res.contiguous()?);
        let (qv, kvw, vv, gv, ov, lv) = (
            view(qt, NAME)?,
            view(kt, NAME)?,
            view(vt, NAME)?,
            view(&go, NAME)?,
            view(&o, NAME)?,
            view(&lse, NAME)?,
        );
        let (q, k, v, go, o, lse) = (qv.get(), kvw.get(), vv.get(), gv.get(), ov.get(), lv.get());
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let (bq, bk, scale) = (self.block_q, self.block_k, self.scale);
        if t > 0 && s > 0 {
            dq.par_chunks_mut(group * t * d)
                .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
                .enumerate()
                .for_each(|(task, (dq, (dk, dv)))| {
                    let (bi, kvh) = (task / kv, task % kv);
                    let kbase = task * s * d;
                    let (kh, vh) = (&k[kbase..kbase + s * d], &v[kbase..kbase + s * d]);
                    let slab0 = bi * h + kvh * group;
                    // D = rowsum(dO ∘ O) for this task's query heads.
                    let qoff = slab0 * t * d;
                    let dsum: Vec<f32> = (0..group * t)
                        .map(|r| {
                            crate::cpu::dot(
                                &go[qoff + r * d..qoff + (r + 1) * d],
                                &o[qoff + r * d..qoff + (r + 1) * d],
                            )
                        })
                        .collect();
                    let mut pbuf = vec![0f32; bq * bk];
                    let mut dpbuf = vec![0f32; bq * bk];
                    for j0 in (0..s).step_by(bk) {
                        let cols = bk.min(s - j0);
                        let (kj, vj) = (&kh[j0 * d..(j0 + cols) * d], &vh[j0 * d..(j0 + cols) * d]);
                        let dkj = &mut dk[j0 * d..(j0 + cols) * d];
                        let dvj = &mut dv[j0 * d..(j0 + cols) * d];
                        for g in 0..group {
                            let slab = slab0 + g;
                            for i0 in (0..t).step_by(bq) {
                                let rows = bq.min(t - i0);
                                let (p0, p1) = (self.past + i0, self.past + i0 + rows - 1);
                                if !self.any_visible(p0, p1, j0, j0 + cols - 1) {
                                    continue;
                                }
                                let qi = &q[(slab * t + i0) * d..(slab * t + i0 + rows) * d];
                                let doi = &go[(slab * t + i0) * d..(slab * t + i0 + rows) * d];
                                let p = &mut pbuf[..rows * cols];
                                sgemm(
                                    rows,
                                    cols,
                                    d,
                                    p,
                                    cols,
                                    Mat::rows(qi, d),
                                    Mat::t(kj, d),
                                    scale,
                                    false,
                                    false,
                                );
                                let masked = !self.all_visible(p0, p1, j0, j0 + cols - 1);
                                for r in 0..rows {
                                    let ls = lse[slab * t + i0 + r];
                                    let row = &mut p[r * cols..(r + 1) * cols];
                                    exp_shifted(row, ls);
                                    if masked {
                                        for (c, x) in row.iter_mut().enumerate() {
                                            if !self.visible(p0 + r, j0 + c) {
                                                *x = 0.0;
                                            }
                                        }
                                    }
                                }
                                if want_v {
                                    sgemm(
                                        cols,
                                        d,
                                        rows,
                                        dvj,
                                        d,
                                        Mat::t(p, cols),
                                        Mat::rows(doi, d),
                                        1.0,
                                        true,
                                        false,
                                    );
                                }
                                if !(want_q || want_k) {
                                    continue;
                                }
                                let ds = &mut dpbuf[..rows * cols];
                                sgemm(
                                    rows,
                                    cols,
                                    d,
                                    ds,
                                    cols,
                                    Mat::rows(doi, d),
                                    Mat::t(vj, d),
                                    1.0,
                                    false,
                                    false,
                                );
                                for r in 0..rows {
                                    let dr = dsum[g * t + i0 + r];
                                    let (pr, dsr) = (
                                        &p[r * cols..(r + 1) * cols],
                                        &mut ds[r * cols..(r + 1) * cols],
                                    );
                                    for c in 0..cols {
                                        dsr[c] = pr[c] * (dsr[c] - dr);
                                    }
                                }
                                if want_q {
                                    let dqi = &mut dq[(g * t + i0) * d..(g * t + i0 + rows) * d];
                                    sgemm(
                                        rows,
                                        d,
                                        cols,
                                        dqi,
                                        d,
                                        Mat::rows(ds, cols),
                                        Mat::rows(kj, d),
                                        scale,
                                        true,
                                        false,
                                    );
                                }
                                if want_k {
                                    sgemm(
                                        cols,
                                        d,
                                        rows,
                                        dkj,
                                        d,
                                        Mat::t(ds, cols),
                                        Mat::rows(qi, d),
                                        scale,
                                        true,
                                        false,
                                    );
                                }
                            }
                        }
                    }
                });
        }
        let mk = |want: bool, data: Vec<f32>, like: &Tensor| {
            want.then(|| Tensor::from_vec(data, like.shape(), like.device()))
                .transpose()
        };
        Ok((
            mk(want_q, dq, qt)?,
            mk(want_k, dk, kt)?,
            mk(want_v, dv, vt)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use candle_core::D;

    /// The composed candle path as the model writes it: query heads grouped along the sequence
    /// axis, (b, kv, group·t, d), an additive mask and a softmax.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        past: usize,
        window: Option<usize>,
    ) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let group = h / kv;
        let qg = q.reshape((b, kv, group * t, d)).unwrap();
        let att = (qg.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mask: Vec<f32> = (0..group * t)
            .flat_map(|r| {
                let qpos = past + r % t;
                (0..s).map(move |j| {
                    if j <= qpos && window.is_none_or(|w| qpos - j < w) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (group * t, s), q.device()).unwrap();
        let att = att.broadcast_add(&mask).unwrap();
        let mx = att.max_keepdim(D::Minus1).unwrap().detach();
        let e = att.broadcast_sub(&mx).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(v).unwrap().reshape((b, h, t, d)).unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        h: usize,
        kv: usize,
        t: usize,
        past: usize,
        d: usize,
        window: Option<usize>,
        blocks: (usize, usize),
        fd: bool,
    ) {
        let s = past + t;
        let q = randt(&[b, h, t, d], 31, 1.0);
        let k = randt(&[b, kv, s, d], 32, 1.0);
        let v = randt(&[b, kv, s, d], 33, 1.0);
        let r = randt(&[b, h, t, d], 34, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let fused = move |x: &[Tensor]| {
            attention_blocks(&x[0], &x[1], &x[2], scale, past, window, blocks.0, blocks.1).unwrap()
        };
        let comp = move |x: &[Tensor]| composed(&x[0], &x[1], &x[2], scale as f64, past, window);
        let ins = [q, k, v];
        let (yf, gf) = autograd(&fused, &ins, &[true, true, true], &r);
        let (yc, gc) = autograd(&comp, &ins, &[true, true, true], &r);
        let e_fwd = rel_err(&yf, &yc);
        let e: Vec<f32> = (0..3)
            .map(|i| rel_err(gf[i].as_ref().unwrap(), gc[i].as_ref().unwrap()))
            .collect();
        let fde: Vec<f32> = if fd {
            (0..3)
                .map(|i| fd_err(&fused, &ins, i, gf[i].as_ref().unwrap(), &r, 1e-2, 24))
                .collect()
        } else {
            vec![]
        };
        println!(
            "attention b{b} h{h} kv{kv} t{t} past{past} d{d} window{window:?} blocks{blocks:?}: fwd {e_fwd:.2e} grads {e:?} fd {fde:?}"
        );
        assert!(e_fwd < 1e-5, "forward {e_fwd}");
        assert!(e.iter().all(|&x| x < 1e-5), "grads {e:?}");
        assert!(fde.iter().all(|&x| x < 1e-2), "finite differences {fde:?}");
    }

    #[test]
    fn gqa_groups_and_tiles() {
        check(2, 2, 2, 7, 0, 8, None, (3, 4), true); // group 1
        check(2, 4, 2, 7, 0, 8, None, (3, 4), true); // group 2
        check(1, 4, 1, 9, 0, 8, None, (4, 2), true); // group 4
        check(1, 3, 1, 70, 0, 16, None, (BLOCK_Q, BLOCK_K), false); // default tiles, ragged last tile
    }

    #[test]
    fn decode_and_prefill_with_past() {
        check(2, 4, 2, 1, 6, 8, None, (3, 4), true); // t = 1 decode
        check(1, 2, 1, 3, 5, 8, None, (2, 3), true);
        check(1, 2, 1, 1, 100, 16, None, (BLOCK_Q, BLOCK_K), false);
    }

    #[test]
    fn sliding_window() {
        check(1, 4, 2, 11, 0, 8, Some(3), (3, 4), true);
        check(1, 2, 2, 2, 9, 8, Some(4), (2, 3), true);
        check(1, 2, 1, 20, 0, 8, Some(2), (5, 5), false);
    }

    #[test]
    fn inference_keeps_no_statistics() {
        let q = randt(&[1, 2, 3, 4], 1, 1.0);
        let k = randt(&[1, 1, 3, 4], 2, 1.0);
        let y = causal_attention(&q, &k, &k, 0.5, 0, None).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3, 4]);
        assert!(causal_attention(
            &q,
            &randt(&[1, 3, 3, 4], 2, 1.0),
            &randt(&[1, 3, 3, 4], 2, 1.0),
            0.5,
            0,
            None
        )
        .is_err());
    }

    /// A preallocated cache read in place equals attention over its valid prefix; what lies
    /// beyond the valid positions (here random values) is never read.
    #[test]
    fn cached_buffers_equal_the_valid_prefix() {
        for (t, cached, window) in [(1, 10, None), (3, 10, None), (1, 16, Some(4)), (4, 4, None)] {
            let q = randt(&[2, 6, t, 8], 41, 1.0);
            let k_cache = randt(&[2, 2, 16, 8], 42, 1.0);
            let v_cache = randt(&[2, 2, 16, 8], 43, 1.0);
            let (k, v) = (
                k_cache.narrow(2, 0, cached).unwrap(),
                v_cache.narrow(2, 0, cached).unwrap(),
            );
            let want = causal_attention(&q, &k, &v, 0.3, cached - t, window).unwrap();
            let got =
                causal_attention_cached(&q, &k_cache, &v_cache, cached, 0.3, window, None).unwrap();
            assert!(rel_err(&got, &want) < 1e-6, "t={t} cached={cached}");
        }
        let q = randt(&[1, 2, 3, 4], 44, 1.0);
        let cache = randt(&[1, 1, 8, 4], 45, 1.0);
        let err = causal_attention_cached(&q, &cache, &cache, 2, 0.5, None, None).unwrap_err();
        assert!(err.to_string().contains("do not hold"), "{err}");
        let tracked = candle_core::Var::from_tensor(&q).unwrap();
        assert!(
            causal_attention_cached(tracked.as_tensor(), &cache, &cache, 4, 0.5, None, None)
                .is_err()
        );
    }
}
