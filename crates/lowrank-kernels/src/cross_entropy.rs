//! Cross-entropy over the vocabulary fused with the LM head, in (row block × vocab chunk)
//! tiles: the (n × vocab) logits are never materialised, in forward or backward.
//!
//! With a frozen head (LoRA training) forward computes grad-hidden as well: a block of rows
//! keeps its logits across the vocabulary (at most [`KEEP_FLOATS`]), turns them into
//! softmax − one-hot in place and multiplies by the head, so backward only scales that n × h
//! result by the incoming gradient (the loss is a scalar, so its gradient is one number).
//! That saves the logits GEMM and two of the three exps per logit a recomputing backward costs.
//! With a trainable head forward keeps one log-sum-exp per counted row; backward recomputes
//! each logits tile, turns it into softmax − one-hot in place and feeds it to the two gradient
//! GEMMs. Rows whose target is `ignore_index` are dropped before any GEMM.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{sgemm, slice, view, Mat};
use crate::exp::exp_shifted;

const NAME: &str = "lowrank-chunked-cross-entropy";
const ROW_BLOCK: usize = 128;
const VOCAB_CHUNK: usize = 1024;
/// Logits a block of rows keeps when forward computes the gradient (16 MiB per thread).
const KEEP_FLOATS: usize = 1 << 22;

/// Σ over counted rows of −log softmax(hidden·headᵀ)[target], for hidden (n, h), head (v, h)
/// and targets (n) u32; rows whose target is `ignore_index` count for nothing. Returns the sum
/// (a scalar tensor, differentiable with respect to hidden and, when it is tracked, head) and
/// the number of counted rows (divide by it for the mean).
pub fn chunked_cross_entropy(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<(Tensor, usize)> {
    ce_blocks(hidden, head, targets, ignore_index, ROW_BLOCK, VOCAB_CHUNK)
}

pub(crate) fn ce_blocks(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    row_block: usize,
    vocab_chunk: usize,
) -> Result<(Tensor, usize)> {
    let (n, h) = hidden.dims2()?;
    let (vocab, hh) = head.dims2()?;
    if hh != h || targets.dims() != [n] {
        bail!(
            "chunked_cross_entropy: hidden {:?}, head {:?}, targets {:?} do not fit",
            hidden.dims(),
            head.dims(),
            targets.dims()
        )
    }
    if targets.dtype() != DType::U32 {
        bail!(
            "chunked_cross_entropy: targets must be u32, got {:?}",
            targets.dtype()
        )
    }
    let t = targets.to_vec1::<u32>()?;
    let mut count = 0;
    for &id in &t {
        if id != ignore_index {
            if id as usize >= vocab {
                bail!("chunked_cross_entropy: target {id} outside the vocabulary of {vocab}")
            }
            count += 1;
        }
    }
    let op = CrossEntropy {
        ignore_index,
        row_block,
        vocab_chunk,
        keep_lse: head.track_op(),
        grad_in_forward: hidden.track_op() && !head.track_op(),
        lse: Mutex::new(None),
        grad_hidden: Mutex::new(None),
    };
    let loss = hidden
        .contiguous()?
        .apply_op3(&head.contiguous()?, &targets.contiguous()?, op)?;
    Ok((loss, count))
}

struct CrossEntropy {
    ignore_index: u32,
    row_block: usize,
    vocab_chunk: usize,
    keep_lse: bool,
    grad_in_forward: bool,
    /// Log-sum-exp of each counted row's logits, in counted-row order.
    lse: Mutex<Option<Tensor>>,
    /// ∂loss/∂hidden (n × h, ignored rows zero), when forward computed it.
    grad_hidden: Mutex<Option<Vec<f32>>>,
}

/// Counted rows: their indices and hidden states gathered contiguously (borrowed when all
/// rows count).
fn counted<'a>(
    hidden: &'a [f32],
    targets: &[u32],
    ignore: u32,
    h: usize,
) -> (Vec<usize>, std::borrow::Cow<'a, [f32]>) {
    let idx: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i] != ignore)
        .collect();
    if idx.len() == targets.len() {
        return (idx, std::borrow::Cow::Borrowed(hidden));
    }
    let mut g = Vec::with_capacity(idx.len() * h);
    for &i in &idx {
        g.extend_from_slice(&hidden[i * h..(i + 1) * h]);
    }
    (idx, std::borrow::Cow::Owned(g))
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        bail!("{NAME}: targets must be u32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{NAME}: targets must be contiguous")
    };
    Ok(&v[a..b])
}

impl CrossEntropy {
    /// Σ −log softmax[target] over the counted rows and ∂/∂hidden of it (nv × h), one block
    /// of rows at a time with its logits across the whole vocabulary kept.
    fn loss_and_grad(
        &self,
        hc: &[f32],
        head: &[f32],
        targets: &[u32],
        idx: &[usize],
        h: usize,
        vocab: usize,
    ) -> (f64, Vec<f32>) {
        let nv = idx.len();
        // Enough blocks for every thread, each within the kept-logits budget.
        let rows_per_block = (KEEP_FLOATS / vocab)
            .min(self.row_block)
            .min(nv.div_ceil(rayon::current_num_threads()))
            .max(1);
        let mut gh = vec![0f32; nv * h];
        let total = gh
            .par_chunks_mut(rows_per_block * h)
            .enumerate()
            .map(|(blk, gh)| {
                let (r0, rows) = (blk * rows_per_block, gh.len() / h);
                let mut p = vec![0f32; rows * vocab];
                sgemm(
                    rows,
                    vocab,
                    h,
                    &mut p,
                    vocab,
                    Mat::rows(&hc[r0 * h..(r0 + rows) * h], h),
                    Mat::t(head, h),
                    1.0,
                    false,
                    false,
                );
                let mut loss = 0f64;
                for (r, row) in p.chunks_mut(vocab).enumerate() {
                    let t = targets[idx[r0 + r]] as usize;
                    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let target_logit = row[t];
                    let sum = exp_shifted(row, mx);
                    loss += (mx + sum.ln() - target_logit) as f64;
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                    row[t] -= 1.0;
                }
                sgemm(
                    rows,
                    h,
                    vocab,
                    gh,
                    h,
                    Mat::rows(&p, vocab),
                    Mat::rows(head, h),
                    1.0,
                    false,
                    false,
                );
                loss
            })
            .sum();
        (total, gh)
    }
}

impl CustomOp3 for CrossEntropy {
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
        let (hidden, head, targets) = (
            slice(s1, l1, NAME)?,
            slice(s2, l2, NAME)?,
            u32_slice(s3, l3)?,
        );
        let (_, h) = l1.shape().dims2()?;
        let (vocab, _) = l2.shape().dims2()?;
        let (idx, hc) = counted(hidden, targets, self.ignore_index, h);
        let nv = idx.len();
        if self.grad_in_forward {
            let (total, gh) = self.loss_and_grad(&hc, head, targets, &idx, h, vocab);
            let mut dh = vec![0f32; hidden.len()];
            for (k, &i) in idx.iter().enumerate() {
                dh[i * h..(i + 1) * h].copy_from_slice(&gh[k * h..(k + 1) * h]);
            }
            *self.grad_hidden.lock().expect("grad lock") = Some(dh);
            return Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())));
        }
        let (rb, vc) = (self.row_block, self.vocab_chunk);
        let mut lse = vec![0f32; nv];
        let total: f64 = lse
            .par_chunks_mut(rb)
            .enumerate()
            .map(|(blk, lse)| {
                let (r0, rows) = (blk * rb, lse.len());
                let hb = &hc[r0 * h..(r0 + rows) * h];
                let mut tile = vec![0f32; rows * vc.min(vocab)];
                let mut m = vec![f32::NEG_INFINITY; rows];
                let mut l = vec![0f32; rows];
                let mut tgt = vec![0f32; rows];
                for c0 in (0..vocab).step_by(vc) {
                    let cols = vc.min(vocab - c0);
                    let tl = &mut tile[..rows * cols];
                    sgemm(
                        rows,
                        cols,
                        h,
                        tl,
                        cols,
                        Mat::rows(hb, h),
                        Mat::t(&head[c0 * h..(c0 + cols) * h], h),
                        1.0,
                        false,
                        false,
                    );
                    for r in 0..rows {
                        let row = &mut tl[r * cols..(r + 1) * cols];
                        let t = targets[idx[r0 + r]] as usize;
                        if (c0..c0 + cols).contains(&t) {
                            tgt[r] = row[t - c0];
                        }
                        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        let m_new = m[r].max(mx);
                        let sum = exp_shifted(row, m_new);
                        l[r] = l[r] * (m[r] - m_new).exp() + sum;
                        m[r] = m_new;
                    }
                }
                let mut loss = 0f64;
                for r in 0..rows {
                    lse[r] = m[r] + l[r].ln();
                    loss += (lse[r] - tgt[r]) as f64;
                }
                loss
            })
            .sum();
        if self.keep_lse {
            *self.lse.lock().expect("lse lock") = Some(Tensor::from_vec(lse, nv, &Device::Cpu)?);
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden_t: &Tensor,
        head_t: &Tensor,
        targets_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_h, want_w) = (hidden_t.track_op(), head_t.track_op());
        if !(want_h || want_w) {
            return Ok((None, None, None));
        }
        if let Some(dh) = self.grad_hidden.lock().expect("grad lock").as_ref() {
            let gscale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let dh: Vec<f32> = dh.iter().map(|g| g * gscale).collect();
            let grad_h = Tensor::from_vec(dh, hidden_t.dims(), hidden_t.device())?;
            return Ok((Some(grad_h), None, None));
        }
        let Some(lse) = self.lse.lock().expect("lse lock").clone() else {
            bail!("{NAME}: backward without the forward's log-sum-exp")
        };
        let gscale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let targets = targets_t.to_vec1::<u32>()?;
        let (n, h) = hidden_t.dims2()?;
        let (vocab, _) = head_t.dims2()?;
        let (hv, wv, lv) = (
            view(hidden_t, NAME)?,
            view(head_t, NAME)?,
            view(&lse, NAME)?,
        );
        let (hidden, head, lse) = (hv.get(), wv.get(), lv.get());
        let (idx, hc) = counted(hidden, &targets, self.ignore_index, h);
        let nv = idx.len();
        let (rb, vc) = (self.row_block, self.vocab_chunk);
        // Vocabulary chunks are split into one contiguous group per thread: each group owns its
        // rows of grad-head and accumulates a private grad-hidden, summed at the end.
        let nchunks = vocab.div_ceil(vc);
        let groups = rayon::current_num_threads().clamp(1, nchunks.max(1));
        let per_group = nchunks.div_ceil(groups);
        let mut gw = vec![0f32; if want_w { vocab * h } else { 0 }];
        let mut gw_parts: Vec<Option<&mut [f32]>> = Vec::new();
        {
            let mut rest: &mut [f32] = &mut gw;
            for g in 0..groups {
                let lo = (g * per_group * vc).min(vocab);
                let hi = ((g + 1) * per_group * vc).min(vocab);
                if want_w {
                    let (part, tail) = rest.split_at_mut((hi - lo) * h);
                    gw_parts.push(Some(part));
                    rest = tail;
                } else {
                    gw_parts.push(None);
                }
            }
        }
        let partial_gh: Vec<Vec<f32>> = gw_parts
            .into_par_iter()
            .enumerate()
            .map(|(g, mut gw_part)| {
                let v_lo = (g * per_group * vc).min(vocab);
                let v_hi = ((g + 1) * per_group * vc).min(vocab);
                let mut gh = vec![0f32; if want_h { nv * h } else { 0 }];
                let mut tile = vec![0f32; rb.min(nv.max(1)) * vc];
                for c0 in (v_lo..v_hi).step_by(vc) {
                    let cols = vc.min(v_hi - c0);
                    let wc = &head[c0 * h..(c0 + cols) * h];
                    for r0 in (0..nv).step_by(rb) {
                        let rows = rb.min(nv - r0);
                        let hb = &hc[r0 * h..(r0 + rows) * h];
                        let tl = &mut tile[..rows * cols];
                        sgemm(
                            rows,
                            cols,
                            h,
                            tl,
                            cols,
                            Mat::rows(hb, h),
                            Mat::t(wc, h),
                            1.0,
                            false,
                            false,
                        );
                        for r in 0..rows {
                            let ls = lse[r0 + r];
                            let row = &mut tl[r * cols..(r + 1) * cols];
                            exp_shifted(row, ls);
                            row.iter_mut().for_each(|x| *x *= gscale);
                            let t = targets[idx[r0 + r]] as usize;
                            if (c0..c0 + cols).contains(&t) {
                                row[t - c0] -= gscale;
                            }
                        }
                        if let Some(gw) = gw_part.as_deref_mut() {
                            let gwc = &mut gw[(c0 - v_lo) * h..(c0 - v_lo + cols) * h];
                            sgemm(
                                cols,
                                h,
                                rows,
                                gwc,
                                h,
                                Mat::t(tl, cols),
                                Mat::rows(hb, h),
                                1.0,
                                true,
                                false,
                            );
                        }
                        if want_h {
                            sgemm(
                                rows,
                                h,
                                cols,
                                &mut gh[r0 * h..(r0 + rows) * h],
                                h,
                                Mat::rows(tl, cols),
                                Mat::rows(wc, h),
                                1.0,
                                true,
                                false,
                            );
                        }
                    }
                }
                gh
            })
            .collect();
        let grad_h = if want_h {
            let mut dh = vec![0f32; n * h];
            // Scatter the counted rows back (ignored rows keep a zero gradient).
            for (k, &i) in idx.iter().enumerate() {
                let dst = &mut dh[i * h..(i + 1) * h];
                for p in &partial_gh {
                    for (d, s) in dst.iter_mut().zip(&p[k * h..(k + 1) * h]) {
                        *d += s;
                    }
                }
            }
            Some(Tensor::from_vec(dh, (n, h), hidden_t.device())?)
        } else {
            None
        };
        let grad_w = if want_w {
            Some(Tensor::from_vec(gw, (vocab, h), head_t.device())?)
        } else {
            None
        };
        Ok((grad_h, grad_w, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use candle_core::D;

    fn composed(hidden: &Tensor, head: &Tensor, targets: &[u32], ignore: u32) -> Tensor {
        let logits = hidden.matmul(&head.t().unwrap()).unwrap();
        let mx = logits.max_keepdim(D::Minus1).unwrap().detach();
        let lse = (logits
            .broadcast_sub(&mx)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap()
            + &mx)
            .unwrap();
        let logp = logits.broadcast_sub(&lse).unwrap();
        let ids: Vec<u32> = targets
            .iter()
            .map(|&t| if t == ignore { 0 } else { t })
            .collect();
        let mask: Vec<f32> = targets
            .iter()
            .map(|&t| if t == ignore { 0.0 } else { 1.0 })
            .collect();
        let n = targets.len();
        let ids = Tensor::from_vec(ids, (n, 1), hidden.device()).unwrap();
        let mask = Tensor::from_vec(mask, n, hidden.device()).unwrap();
        let picked = logp.gather(&ids, 1).unwrap().squeeze(1).unwrap();
        (picked * mask).unwrap().sum_all().unwrap().neg().unwrap()
    }

    #[test]
    fn matches_composed_and_finite_differences() {
        let ignore = u32::MAX;
        let (h, vocab) = (8, 37);
        for (n, blocks, ignored) in [
            (13, (4, 10), vec![2, 3, 11]),
            (5, (128, 1024), vec![]),
            (9, (3, 7), vec![0, 8]),
        ] {
            let hidden = randt(&[n, h], 61, 1.0);
            let head = randt(&[vocab, h], 62, 1.0);
            let tv: Vec<u32> = (0..n)
                .map(|i| {
                    if ignored.contains(&i) {
                        ignore
                    } else {
                        ((i * 17 + 5) % vocab) as u32
                    }
                })
                .collect();
            let targets = Tensor::from_vec(tv.clone(), n, &Device::Cpu).unwrap();
            let one = Tensor::new(1.7f32, &Device::Cpu).unwrap();
            let tcl = targets.clone();
            let fused = move |x: &[Tensor]| {
                ce_blocks(&x[0], &x[1], &tcl, ignore, blocks.0, blocks.1)
                    .unwrap()
                    .0
            };
            let tv2 = tv.clone();
            let comp = move |x: &[Tensor]| composed(&x[0], &x[1], &tv2, ignore);
            let ins = [hidden, head];
            // A frozen head takes the path that computes grad-hidden in forward.
            let (yf1, gf1) = autograd(&fused, &ins, &[true, false], &one);
            let (yc1, gc1) = autograd(&comp, &ins, &[true, false], &one);
            let e_frozen = rel_err(gf1[0].as_ref().unwrap(), gc1[0].as_ref().unwrap());
            let fd_frozen = fd_err(&fused, &ins, 0, gf1[0].as_ref().unwrap(), &one, 1e-2, 30);
            println!(
                "frozen head: fwd {:.2e} grad hidden {e_frozen:.2e} fd {fd_frozen:.2e}",
                rel_err(&yf1, &yc1)
            );
            assert!(rel_err(&yf1, &yc1) < 1e-5 && e_frozen < 1e-5 && fd_frozen < 1e-2);
            assert!(gf1[1].is_none());
            let (yf, gf) = autograd(&fused, &ins, &[true, true], &one);
            let (yc, gc) = autograd(&comp, &ins, &[true, true], &one);
            let e_fwd = rel_err(&yf, &yc);
            let e: Vec<f32> = (0..2)
                .map(|i| rel_err(gf[i].as_ref().unwrap(), gc[i].as_ref().unwrap()))
                .collect();
            let fd: Vec<f32> = (0..2)
                .map(|i| fd_err(&fused, &ins, i, gf[i].as_ref().unwrap(), &one, 1e-2, 30))
                .collect();
            let (_, count) =
                ce_blocks(&ins[0], &ins[1], &targets, ignore, blocks.0, blocks.1).unwrap();
            println!("cross_entropy n{n} blocks{blocks:?} ignored{ignored:?}: fwd {e_fwd:.2e} grads hidden/head {e:?} fd {fd:?}");
            assert_eq!(count, n - ignored.len());
            assert!(e_fwd < 1e-5 && e.iter().all(|&v| v < 1e-5) && fd.iter().all(|&v| v < 1e-2));
            // Ignored rows get exactly zero gradient.
            let gh = gf[0].as_ref().unwrap();
            for &i in &ignored {
                assert!(vals(&gh.get(i).unwrap()).iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn frozen_head_and_all_ignored() {
        let hidden = randt(&[4, 6], 1, 1.0);
        let head = randt(&[10, 6], 2, 1.0);
        let targets = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu).unwrap();
        let one = Tensor::new(1f32, &Device::Cpu).unwrap();
        let f = |x: &[Tensor]| chunked_cross_entropy(&x[0], &x[1], &targets, 99).unwrap().0;
        let (_, g) = autograd(&f, &[hidden.clone(), head.clone()], &[true, false], &one);
        assert!(g[0].is_some() && g[1].is_none());
        let none = Tensor::new(&[99u32; 4], &Device::Cpu).unwrap();
        let f = |x: &[Tensor]| chunked_cross_entropy(&x[0], &x[1], &none, 99).unwrap().0;
        let (y, g) = autograd(&f, &[hidden, head], &[true, true], &one);
        assert_eq!(y.to_scalar::<f32>().unwrap(), 0.0);
        assert!(vals(g[0].as_ref().unwrap()).iter().all(|&v| v == 0.0));
        assert!(chunked_cross_entropy(
            &randt(&[1, 6], 3, 1.0),
            &randt(&[10, 6], 2, 1.0),
            &Tensor::new(&[10u32], &Device::Cpu).unwrap(),
            99
        )
        .is_err());
    }
}
