//! RMSNorm: y = x / sqrt(mean(x²) + eps) · w over the last dimension.
//!
//! Forward keeps nothing; backward recomputes the per-row 1/rms (one pass over the row).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot3, slice, sum_sq, view};

const NAME: &str = "lowrank-rms-norm";

/// RMSNorm of `x` (..., h) with weight `w` (h).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let h = w.dims1()?;
    if x.dims().last() != Some(&h) {
        bail!(
            "rms_norm: x has shape {:?}, weight has {h} elements",
            x.dims()
        )
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

/// RMSNorm of each row of x (rows × w.len(), row-major) into a new buffer, rows in parallel.
/// Inference only.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len().max(1);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(16)
        .for_each(|(o, x)| {
            let r = inv_rms(x, eps);
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        });
    out
}

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, NAME)?, slice(s2, l2, NAME)?);
        if x.len() % w.len().max(1) != 0 {
            bail!(
                "{NAME}: x does not hold rows of the weight's {} values",
                w.len()
            )
        }
        Ok((
            CpuStorage::F32(rms_norm_rows(x, w, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (xv, wv, gv) = (view(x, NAME)?, view(w, NAME)?, view(&g, NAME)?);
        let (xs, ws, gs) = (xv.get(), wv.get(), gv.get());
        let h = ws.len();
        let eps = self.eps;
        let grad_x = if x.track_op() {
            // dx = r·(g∘w) − x·r³/h·Σ(g∘w∘x)
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(h)
                .zip(xs.par_chunks(h).zip(gs.par_chunks(h)))
                .with_min_len(16)
                .for_each(|(dx, (x, g))| {
                    let r = inv_rms(x, eps);
                    let c = dot3(g, ws, x) * r * r * r / h as f32;
                    for i in 0..h {
                        dx[i] = r * g[i] * ws[i] - x[i] * c;
                    }
                });
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            // dw = Σ_rows g∘x·r, one partial sum per block of rows, the partials then added in
            // block order: a parallel reduce would add them in whatever order the threads
            // finished, and training would not repeat itself from the same seed.
            const ROWS: usize = 64;
            let partials: Vec<Vec<f32>> = xs
                .par_chunks(h * ROWS)
                .zip(gs.par_chunks(h * ROWS))
                .map(|(xb, gb)| {
                    let mut acc = vec![0f32; h];
                    for (x, g) in xb.chunks(h).zip(gb.chunks(h)) {
                        let r = inv_rms(x, eps);
                        for i in 0..h {
                            acc[i] += g[i] * x[i] * r;
                        }
                    }
                    acc
                })
                .collect();
            let mut dw = vec![0f32; h];
            for partial in &partials {
                dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
            }
            Some(Tensor::from_vec(dw, h, w.device())?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use candle_core::D;

    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }

    #[test]
    fn matches_composed_and_finite_differences() {
        for (shape, h) in [(vec![3, 5, 37], 37), (vec![2, 64], 64), (vec![1, 1, 8], 8)] {
            let x = randt(&shape, 1, 1.0);
            let w = randt(&[h], 2, 1.0);
            let r = randt(&shape, 3, 1.0);
            let fused = |t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-5).unwrap();
            let comp = |t: &[Tensor]| composed(&t[0], &t[1], 1e-5);
            let (yf, gf) = autograd(&fused, &[x.clone(), w.clone()], &[true, true], &r);
            let (yc, gc) = autograd(&comp, &[x.clone(), w.clone()], &[true, true], &r);
            let e_fwd = rel_err(&yf, &yc);
            let e_gx = rel_err(gf[0].as_ref().unwrap(), gc[0].as_ref().unwrap());
            let e_gw = rel_err(gf[1].as_ref().unwrap(), gc[1].as_ref().unwrap());
            let fd_x = fd_err(
                &fused,
                &[x.clone(), w.clone()],
                0,
                gf[0].as_ref().unwrap(),
                &r,
                1e-2,
                40,
            );
            let fd_w = fd_err(
                &fused,
                &[x.clone(), w.clone()],
                1,
                gf[1].as_ref().unwrap(),
                &r,
                1e-2,
                20,
            );
            println!("rms_norm {shape:?}: fwd {e_fwd:.2e} gx {e_gx:.2e} gw {e_gw:.2e} fd_x {fd_x:.2e} fd_w {fd_w:.2e}");
            assert!(e_fwd < 1e-5 && e_gx < 1e-5 && e_gw < 1e-5);
            assert!(fd_x < 1e-2 && fd_w < 1e-2);
        }
    }

    /// The weight's gradient is the same, bit for bit, on every call: its per-block partial
    /// sums are added in block order (a parallel reduce added them in whatever order the
    /// threads finished, so training did not repeat itself from the same seed).
    #[test]
    fn weight_grad_adds_blocks_in_order() {
        let (rows, h) = (64 * 40 + 7, 48);
        let x = randt(&[rows, h], 7, 1.0);
        let w = randt(&[h], 8, 1.0);
        let r = randt(&[rows, h], 9, 1.0);
        let f = |t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-5).unwrap();
        let grad_w = || {
            let (_, g) = autograd(&f, &[x.clone(), w.clone()], &[false, true], &r);
            g[1].as_ref().unwrap().to_vec1::<f32>().unwrap()
        };
        let (xs, gs) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut expected = vec![0f32; h];
        for (xb, gb) in xs.chunks(64 * h).zip(gs.chunks(64 * h)) {
            let mut block = vec![0f32; h];
            for (x, g) in xb.chunks(h).zip(gb.chunks(h)) {
                let inv = inv_rms(x, 1e-5);
                for i in 0..h {
                    block[i] += g[i] * x[i] * inv;
                }
            }
            for (e, b) in expected.iter_mut().zip(&block) {
                *e += b;
            }
        }
        for _ in 0..5 {
            assert_eq!(grad_w(), expected);
        }
    }

    #[test]
    fn frozen_weight_gets_no_grad_and_strided_input_works() {
        let x = randt(&[16, 4], 4, 1.0).t().unwrap(); // (4, 16), non-contiguous
        let w = randt(&[16], 5, 1.0);
        let r = randt(&[4, 16], 6, 1.0);
        let f = |t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-6).unwrap();
        let (y, g) = autograd(&f, &[x.clone(), w.clone()], &[true, false], &r);
        assert!(rel_err(&y, &composed(&x, &w, 1e-6)) < 1e-5);
        assert!(g[0].is_some() && g[1].is_none());
    }
}
