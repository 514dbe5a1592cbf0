//! SwiGLU: silu(gate)·up, elementwise. Backward recomputes the sigmoid from the inputs.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{slice, view};
use crate::exp::sigmoid_into;

const NAME: &str = "lowrank-swiglu";
const CHUNK: usize = 4096;

/// silu(gate) · up for two tensors of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// gelu_tanh(gate)·up (Gemma's GeGLU) over two equally long slices, into a new buffer.
/// Inference only.
pub fn gelu_tanh_glu_values(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(
        gate.len(),
        up.len(),
        "gelu_tanh_glu_values: gate and up differ in length"
    );
    // torch's gelu(approximate="tanh"): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    let beta = (2.0f32 / std::f32::consts::PI).sqrt();
    let mut out = vec![0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            for i in 0..o.len() {
                let x = g[i];
                let inner = beta * (x + 0.044715 * x * x * x);
                o[i] = 0.5 * x * (1.0 + inner.tanh()) * u[i];
            }
        });
    out
}

/// silu(gate)·up over two equally long slices, into a new buffer. Inference only.
pub fn swiglu_values(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(
        gate.len(),
        up.len(),
        "swiglu_values: gate and up differ in length"
    );
    let mut out = vec![0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            sigmoid_into(g, o);
            for i in 0..o.len() {
                o[i] *= g[i] * u[i];
            }
        });
    out
}

impl CustomOp2 for SwiGlu {
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
        let (g, u) = (slice(s1, l1, NAME)?, slice(s2, l2, NAME)?);
        Ok((CpuStorage::F32(swiglu_values(g, u)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        if !want_g && !want_u {
            return Ok((None, None));
        }
        let dy = grad.contiguous()?;
        let (gv, uv, dv) = (view(gate, NAME)?, view(up, NAME)?, view(&dy, NAME)?);
        let (g, u, dy) = (gv.get(), uv.get(), dv.get());
        let n = g.len();
        let mut dg = vec![0f32; if want_g { n } else { 0 }];
        let mut du = vec![0f32; if want_u { n } else { 0 }];
        let range = |c: usize, len: usize| (c * CHUNK, c * CHUNK + len);
        match (want_g, want_u) {
            (true, true) => dg
                .par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, (dg, du))| {
                    let (lo, hi) = range(c, dg.len());
                    let (g, u, dy) = (&g[lo..hi], &u[lo..hi], &dy[lo..hi]);
                    sigmoid_into(g, du);
                    for i in 0..dg.len() {
                        let s = du[i];
                        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        du[i] = dy[i] * g[i] * s;
                    }
                }),
            (true, false) => dg.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dg)| {
                let (lo, hi) = range(c, dg.len());
                let (g, u, dy) = (&g[lo..hi], &u[lo..hi], &dy[lo..hi]);
                sigmoid_into(g, dg);
                for i in 0..dg.len() {
                    let s = dg[i];
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            }),
            _ => du.par_chunks_mut(CHUNK).enumerate().for_each(|(c, du)| {
                let (lo, hi) = range(c, du.len());
                let (g, dy) = (&g[lo..hi], &dy[lo..hi]);
                sigmoid_into(g, du);
                for i in 0..du.len() {
                    du[i] *= dy[i] * g[i];
                }
            }),
        }
        let dg = want_g
            .then(|| Tensor::from_vec(dg, gate.shape(), gate.device()))
            .transpose()?;
        let du = want_u
            .then(|| Tensor::from_vec(du, up.shape(), up.device()))
            .transpose()?;
        Ok((dg, du))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn matches_composed_and_finite_differences() {
        for shape in [vec![3, 7, 11], vec![2, 5000], vec![1]] {
            let g = randt(&shape, 21, 2.0);
            let u = randt(&shape, 22, 1.0);
            let r = randt(&shape, 23, 1.0);
            let fused = |t: &[Tensor]| swiglu(&t[0], &t[1]).unwrap();
            let comp = |t: &[Tensor]| (candle_core::Tensor::silu(&t[0]).unwrap() * &t[1]).unwrap();
            let ins = [g.clone(), u.clone()];
            let (yf, gf) = autograd(&fused, &ins, &[true, true], &r);
            let (yc, gc) = autograd(&comp, &ins, &[true, true], &r);
            let e_fwd = rel_err(&yf, &yc);
            let e_gg = rel_err(gf[0].as_ref().unwrap(), gc[0].as_ref().unwrap());
            let e_gu = rel_err(gf[1].as_ref().unwrap(), gc[1].as_ref().unwrap());
            let fd_g = fd_err(&fused, &ins, 0, gf[0].as_ref().unwrap(), &r, 1e-2, 40);
            let fd_u = fd_err(&fused, &ins, 1, gf[1].as_ref().unwrap(), &r, 1e-2, 40);
            println!("swiglu {shape:?}: fwd {e_fwd:.2e} ggate {e_gg:.2e} gup {e_gu:.2e} fd {fd_g:.2e} {fd_u:.2e}");
            assert!(e_fwd < 1e-5 && e_gg < 1e-5 && e_gu < 1e-5 && fd_g < 1e-2 && fd_u < 1e-2);
        }
    }

    #[test]
    fn only_tracked_inputs_get_grads() {
        let g = randt(&[4, 9], 24, 1.0);
        let u = randt(&[4, 9], 25, 1.0);
        let r = randt(&[4, 9], 26, 1.0);
        let f = |t: &[Tensor]| swiglu(&t[0], &t[1]).unwrap();
        let (_, gr) = autograd(&f, &[g, u], &[false, true], &r);
        assert!(gr[0].is_none() && gr[1].is_some());
    }
}
