//! Optimizers as torch implements them: `SGD` (no momentum; weight decay as L2 added to the
//! gradient) and `AdamW` (decoupled weight decay, bias-corrected moments). Each parameter is a
//! candle `Var` updated in place, so the model sees the new values on its next forward.

use candle_core::{DType, Tensor, Var};
use lowrank_core::{Error, Result};

use crate::OptimizerKind;

/// One optimizer over a fixed list of parameters.
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    /// AdamW's first and second moments, one per parameter (empty for SGD).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (AdamW's bias correction).
    pub t: usize,
}

impl Optimizer {
    pub fn new(
        kind: OptimizerKind,
        params: &[Var],
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
    ) -> Result<Self> {
        let (m, v) = match kind {
            OptimizerKind::Adamw => {
                let zeros = params
                    .iter()
                    .map(|p| p.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (zeros.clone(), zeros)
            }
            OptimizerKind::Sgd => (vec![], vec![]),
        };
        Ok(Optimizer {
            kind,
            weight_decay,
            betas,
            eps,
            m,
            v,
            t: 0,
        })
    }

    /// State tensors per parameter (AdamW: 2, SGD: 0).
    pub fn slots(&self) -> usize {
        match self.kind {
            OptimizerKind::Adamw => 2,
            OptimizerKind::Sgd => 0,
        }
    }

    /// One update with learning rate `lr`; `decay[i]` says whether parameter i gets weight decay.
    pub fn step(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        decay: &[bool],
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let wd = if decay[i] { self.weight_decay } else { 0.0 };
            let w = p.as_tensor().detach();
            let new = match self.kind {
                OptimizerKind::Sgd => {
                    let g = if wd != 0.0 {
                        (g + (&w * wd)?)?
                    } else {
                        g.clone()
                    };
                    (&w - (g * lr)?)?
                }
                OptimizerKind::Adamw if fused_adamw(p, g) => {
                    lowrank_kernels::adamw_step(
                        p,
                        g,
                        &mut self.m[i],
                        &mut self.v[i],
                        self.t,
                        lr,
                        self.betas,
                        self.eps,
                        wd,
                    )?;
                    continue;
                }
                OptimizerKind::Adamw => {
                    let (b1, b2) = self.betas;
                    let w = if wd != 0.0 {
                        (&w * (1.0 - lr * wd))?
                    } else {
                        w
                    };
                    let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
                    let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let bc1 = 1.0 - b1.powi(self.t as i32);
                    let bc2 = 1.0 - b2.powi(self.t as i32);
                    let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
                    let new = (&w - (m.div(&denom)? * (lr / bc1))?)?;
                    self.m[i] = m;
                    self.v[i] = v;
                    new
                }
            };
            p.set(&new)?;
        }
        Ok(())
    }

    /// The state under `<name>.exp_avg` / `<name>.exp_avg_sq`, for checkpoints.
    pub fn state_tensors(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let (Some(m), Some(v)) = (self.m.get(i), self.v.get(i)) {
                out.push((format!("{name}.exp_avg"), m.clone()));
                out.push((format!("{name}.exp_avg_sq"), v.clone()));
            }
        }
        out
    }

    /// Restores what `state_tensors` saved, after `t` steps.
    pub fn load_state(
        &mut self,
        names: &[String],
        tensors: &std::collections::HashMap<String, Tensor>,
        t: usize,
    ) -> Result<()> {
        self.t = t;
        for (i, name) in names.iter().enumerate() {
            if i < self.m.len() {
                let get = |k: String| {
                    tensors.get(&k).cloned().ok_or_else(|| {
                        Error::Msg(format!("checkpoint: optimizer state {k:?} missing"))
                    })
                };
                self.m[i] = get(format!("{name}.exp_avg"))?;
                self.v[i] = get(format!("{name}.exp_avg_sq"))?;
            }
        }
        Ok(())
    }
}

/// Whether the in-place AdamW kernel applies: f32 parameter and gradient on the CPU (three
/// parallel passes, no allocation, instead of nine single-threaded candle ops per tensor).
fn fused_adamw(param: &Var, grad: &Tensor) -> bool {
    param.device().is_cpu()
        && param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && param.is_contiguous()
}

/// The global L2 norm of the gradients (f64 accumulation), as torch's `clip_grad_norm_` computes it.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch: coefficient
/// max_norm/(norm + 1e-6), applied when below 1). Returns the norm before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
    }

    fn vals(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    /// Both paths: the in-place kernel (f32 on the CPU) and the composed candle ops (f64 here,
    /// as any dtype or device the kernel does not take).
    #[test]
    fn adamw_matches_torch_formulas_by_hand() {
        for dtype in [DType::F32, DType::F64] {
            let (lr, wd, b1, b2, eps) = (0.1f64, 0.01f64, 0.9f64, 0.999f64, 1e-8f64);
            let p = Var::from_tensor(
                &Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g1 = [0.5f64, -1.0, 2.0];
            let g2 = [-0.25f64, 0.5, 1.0];
            let mut opt = Optimizer::new(
                OptimizerKind::Adamw,
                std::slice::from_ref(&p),
                wd,
                (b1, b2),
                eps,
            )
            .unwrap();
            let mut expect = [1.0f64, -2.0, 0.5];
            let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
            for (t, g) in [g1, g2].iter().enumerate() {
                let step = (t + 1) as i32;
                for i in 0..3 {
                    expect[i] *= 1.0 - lr * wd;
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let denom = (v[i].sqrt() / (1.0 - b2.powi(step)).sqrt()) + eps;
                    expect[i] -= lr / (1.0 - b1.powi(step)) * m[i] / denom;
                }
                let gt = Tensor::new(g.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                opt.step(std::slice::from_ref(&p), &[gt], &[true], lr)
                    .unwrap();
                let got: Vec<f64> = p
                    .as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, b) in got.iter().zip(&expect) {
                    assert!((a - b).abs() < 1e-6, "{dtype:?} step {step}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn sgd_adds_l2_decay_to_the_gradient_and_decay_can_be_off() {
        let p = var(&[1.0, 2.0]);
        let q = var(&[1.0, 2.0]);
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd,
            &[p.clone(), q.clone()],
            0.1,
            (0.9, 0.999),
            1e-8,
        )
        .unwrap();
        let g = Tensor::new(&[1f32, -1.], &Device::Cpu).unwrap();
        opt.step(
            &[p.clone(), q.clone()],
            &[g.clone(), g],
            &[true, false],
            0.5,
        )
        .unwrap();
        assert_eq!(
            vals(&p),
            vec![1.0 - 0.5 * (1.0 + 0.1), 2.0 - 0.5 * (-1.0 + 0.2)]
        );
        assert_eq!(vals(&q), vec![0.5, 2.5]);
        assert_eq!(opt.slots(), 0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.], &Device::Cpu).unwrap()];
        let norm = clip(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let mut g2 = vec![Tensor::new(&[0.3f32, 0.4], &Device::Cpu).unwrap()];
        clip(&mut g2, 1.0).unwrap();
        assert_eq!(g2[0].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);
    }
}
