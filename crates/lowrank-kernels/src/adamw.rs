//! AdamW, updating the parameter and both moments in place (torch.optim.AdamW's formula):
//!
//! p ← p·(1 − lr·wd); m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
//! p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + eps).
//!
//! candle's in-place ops mutate one tensor each, so the step is three rayon-parallel passes
//! (m, v, then p) with no allocation; the optimizer's `m` and `v` are replaced (once) by
//! private contiguous f32 copies if they are shared views or not f32.

use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;

use crate::cpu::slice;

const NAME: &str = "lowrank-adamw";
const CHUNK: usize = 8192;

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{NAME}: expects f32 tensors")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{NAME}: expects contiguous tensors")
    };
    Ok(&mut v[a..b])
}

/// Identifies a tensor's storage (equal for tensors sharing one buffer).
fn storage_ptr(t: &Tensor) -> usize {
    let (guard, _) = t.storage_and_layout();
    &*guard as *const candle_core::Storage as usize
}

/// One AdamW step on `param` with gradient `grad`; `m`, `v` are the first and second moments
/// (zeros before the first step) and `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    param: &Var,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: usize,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    if step == 0 {
        bail!("adamw_step: steps count from 1")
    }
    let shape = param.shape();
    if grad.shape() != shape || m.shape() != shape || v.shape() != shape {
        bail!(
            "adamw_step: param {:?}, grad {:?}, m {:?}, v {:?} differ",
            shape,
            grad.dims(),
            m.dims(),
            v.dims()
        )
    }
    if param.dtype() != DType::F32 || !param.is_contiguous() {
        bail!("adamw_step: the parameter must be a contiguous f32 variable")
    }
    let p_ptr = storage_ptr(param);
    if storage_ptr(m) == p_ptr || m.dtype() != DType::F32 || !m.is_contiguous() {
        *m = m.to_dtype(DType::F32)?.copy()?;
    }
    if [p_ptr, storage_ptr(m)].contains(&storage_ptr(v))
        || v.dtype() != DType::F32
        || !v.is_contiguous()
    {
        *v = v.to_dtype(DType::F32)?.copy()?;
    }
    let grad = grad.detach().to_dtype(DType::F32)?.contiguous()?;
    let (b1, b2) = betas;
    m.inplace_op2(
        &grad,
        &Moment {
            keep: b1 as f32,
            take: (1.0 - b1) as f32,
            squared: false,
        },
    )?;
    v.inplace_op2(
        &grad,
        &Moment {
            keep: b2 as f32,
            take: (1.0 - b2) as f32,
            squared: true,
        },
    )?;
    let bc1 = 1.0 - b1.powi(step as i32);
    let bc2 = 1.0 - b2.powi(step as i32);
    let update = Update {
        decay: (1.0 - lr * weight_decay) as f32,
        step_size: (lr / bc1) as f32,
        inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
        eps: eps as f32,
    };
    param.as_tensor().inplace_op3(m, v, &update)
}

/// m ← keep·m + (1 − keep)·g (or g² when `squared`).
struct Moment {
    keep: f32,
    /// 1 − β computed in f64 (1 − (β as f32) is off by 1e-5 relative for β = 0.999).
    take: f32,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, g) = (slice_mut(s1, l1)?, slice(s2, l2, NAME)?);
        let (keep, take) = (self.keep, self.take);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                if self.squared {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, g)| *m = keep * *m + take * g * g);
                } else {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, g)| *m = keep * *m + take * g);
                }
            });
        Ok(())
    }
}

struct Update {
    decay: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m, v) = (
            slice_mut(s1, l1)?,
            slice(s2, l2, NAME)?,
            slice(s3, l3, NAME)?,
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for i in 0..p.len() {
                    let denom = v[i].sqrt() * self.inv_bc2_sqrt + self.eps;
                    p[i] = p[i] * self.decay - self.step_size * m[i] / denom;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn matches_torch_formula_over_steps() {
        let n = 20_000; // several chunks, ragged last one
        let p0 = randt(&[n], 71, 1.0);
        let var = Var::from_tensor(&p0).unwrap();
        let mut m = Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut v = m.clone(); // shared storage with m: must be split, not aliased
        let (lr, b1, b2, eps, wd) = (1e-2, 0.9, 0.999, 1e-8, 0.1);
        let mut rp: Vec<f64> = vals(&p0).iter().map(|&x| x as f64).collect();
        let (mut rm, mut rv) = (vec![0f64; n], vec![0f64; n]);
        for step in 1..=4 {
            let g = randt(&[n], 100 + step as u64, 1.0);
            adamw_step(&var, &g, &mut m, &mut v, step, lr, (b1, b2), eps, wd).unwrap();
            let gv = vals(&g);
            for i in 0..n {
                let gi = gv[i] as f64;
                rp[i] *= 1.0 - lr * wd;
                rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
                rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
                let denom = rv[i].sqrt() / (1.0 - b2.powi(step as i32)).sqrt() + eps;
                rp[i] -= lr / (1.0 - b1.powi(step as i32)) * rm[i] / denom;
            }
        }
        let err = |t: &Tensor, r: &[f64]| {
            let scale = r.iter().fold(0f64, |a, b| a.max(b.abs()));
            vals(t)
                .iter()
                .zip(r)
                .fold(0f64, |a, (x, y)| a.max((*x as f64 - y).abs()))
                / scale
        };
        let (ep, em, ev) = (err(var.as_tensor(), &rp), err(&m, &rm), err(&v, &rv));
        println!("adamw 4 steps: param {ep:.2e} m {em:.2e} v {ev:.2e}");
        assert!(ep < 1e-5 && em < 1e-5 && ev < 1e-5);
    }
}
