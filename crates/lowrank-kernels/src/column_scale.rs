//! y[…, o] = u[…, o] · f[o]: one factor per output feature, as DoRA's m/‖W + s·BA‖. Candle's
//! broadcast multiply runs single-threaded and its backward allocates a broadcast copy for
//! each input; here forward and backward are one parallel pass each.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, view};

const NAME: &str = "lowrank-column-scale";
/// Rows per rayon task: enough work to amortise the task, enough tasks to balance.
const ROWS_PER_TASK: usize = 16;

/// u · f with f broadcast over every dimension of u but the last; gradients flow to both.
pub fn scale_columns(u: &Tensor, factor: &Tensor) -> Result<Tensor> {
    let cols = u.dims().last().copied().unwrap_or(1);
    if factor.dims() != [cols] {
        bail!(
            "scale_columns: factor {:?} does not match the last dimension of {:?}",
            factor.dims(),
            u.dims()
        )
    }
    u.contiguous()?
        .apply_op2(&factor.contiguous()?, ColumnScale)
}

struct ColumnScale;

impl CustomOp2 for ColumnScale {
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
        let (u, f) = (slice(s1, l1, NAME)?, slice(s2, l2, NAME)?);
        let cols = f.len();
        let mut out = vec![0f32; u.len()];
        out.par_chunks_mut(cols * ROWS_PER_TASK)
            .zip(u.par_chunks(cols * ROWS_PER_TASK))
            .for_each(|(out, u)| {
                for (out, u) in out.chunks_exact_mut(cols).zip(u.chunks_exact(cols)) {
                    for ((y, x), s) in out.iter_mut().zip(u).zip(f) {
                        *y = x * s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        u: &Tensor,
        factor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (uv, fv, dv) = (view(u, NAME)?, view(factor, NAME)?, view(&dy, NAME)?);
        let (us, f, dy) = (uv.get(), fv.get(), dv.get());
        let cols = f.len();
        let grad_u = if u.track_op() {
            let mut du = vec![0f32; us.len()];
            du.par_chunks_mut(cols * ROWS_PER_TASK)
                .zip(dy.par_chunks(cols * ROWS_PER_TASK))
                .for_each(|(du, dy)| {
                    for (du, dy) in du.chunks_exact_mut(cols).zip(dy.chunks_exact(cols)) {
                        for ((d, g), s) in du.iter_mut().zip(dy).zip(f) {
                            *d = g * s;
                        }
                    }
                });
            Some(Tensor::from_vec(du, u.shape(), u.device())?)
        } else {
            None
        };
        let grad_factor = if factor.track_op() {
            // Per-task partial sums over rows, then one sum of the partials.
            let partials: Vec<Vec<f32>> = us
                .par_chunks(cols * ROWS_PER_TASK)
                .zip(dy.par_chunks(cols * ROWS_PER_TASK))
                .map(|(us, dy)| {
                    let mut acc = vec![0f32; cols];
                    for (u, g) in us.chunks_exact(cols).zip(dy.chunks_exact(cols)) {
                        for ((a, x), d) in acc.iter_mut().zip(u).zip(g) {
                            *a += x * d;
                        }
                    }
                    acc
                })
                .collect();
            let mut df = vec![0f32; cols];
            for partial in &partials {
                for (d, p) in df.iter_mut().zip(partial) {
                    *d += p;
                }
            }
            Some(Tensor::from_vec(df, cols, factor.device())?)
        } else {
            None
        };
        Ok((grad_u, grad_factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn matches_composed_and_finite_differences() {
        for shape in [vec![3, 7, 11], vec![40, 33], vec![1, 5]] {
            let cols = *shape.last().unwrap();
            let u = randt(&shape, 31, 1.0);
            let f = randt(&[cols], 32, 1.0);
            let r = randt(&shape, 33, 1.0);
            let fused = |t: &[Tensor]| scale_columns(&t[0], &t[1]).unwrap();
            let comp = |t: &[Tensor]| t[0].broadcast_mul(&t[1]).unwrap();
            let ins = [u.clone(), f.clone()];
            let (yf, gf) = autograd(&fused, &ins, &[true, true], &r);
            let (yc, gc) = autograd(&comp, &ins, &[true, true], &r);
            let e_fwd = rel_err(&yf, &yc);
            let e_gu = rel_err(gf[0].as_ref().unwrap(), gc[0].as_ref().unwrap());
            let e_gf = rel_err(gf[1].as_ref().unwrap(), gc[1].as_ref().unwrap());
            let fd_u = fd_err(&fused, &ins, 0, gf[0].as_ref().unwrap(), &r, 1e-2, 40);
            let fd_f = fd_err(&fused, &ins, 1, gf[1].as_ref().unwrap(), &r, 1e-2, 40);
            println!("column scale {shape:?}: fwd {e_fwd:.2e} gu {e_gu:.2e} gf {e_gf:.2e} fd {fd_u:.2e} {fd_f:.2e}");
            assert!(e_fwd < 1e-6 && e_gu < 1e-6 && e_gf < 1e-5 && fd_u < 1e-2 && fd_f < 1e-2);
        }
    }

    #[test]
    fn only_tracked_inputs_get_grads_and_shapes_are_checked() {
        let u = randt(&[4, 9], 34, 1.0);
        let f = randt(&[9], 35, 1.0);
        let r = randt(&[4, 9], 36, 1.0);
        let op = |t: &[Tensor]| scale_columns(&t[0], &t[1]).unwrap();
        let (_, grads) = autograd(&op, &[u.clone(), f], &[false, true], &r);
        assert!(grads[0].is_none() && grads[1].is_some());
        let err = scale_columns(&u, &randt(&[4], 37, 1.0)).unwrap_err();
        assert!(err.to_string().contains("last dimension"), "{err}");
    }
}
