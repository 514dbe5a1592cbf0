//! y = x·Wᵀ with W frozen: backward gives grad-x = dy·W only.
//!
//! candle's own matmul backward always computes the weight's gradient too (lhsᵀ·dy, an
//! out×in GEMM and buffer per layer) even when nothing needs it; for LoRA training over a
//! frozen base that doubles the backward work of every linear layer.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::cpu::{
    require_cpu, rows_and_features, sgemm, sgemm_xwt, slice, view, with_features, Mat,
};
use crate::gemv::{gemv, Weights};

const NAME: &str = "lowrank-frozen-linear";

/// A frozen base weight the kernels cannot read as an f32 matrix (a 4-bit or a bf16 one): it
/// supplies x·Wᵀ and dy·W itself, and the frozen and LoRA linears are built around those two
/// products.
pub trait FrozenMatmul: Send + Sync {
    /// (out, in) of W.
    fn shape(&self) -> (usize, usize);
    /// x·Wᵀ for `rows` rows of x (rows × in) → rows × out.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>>;
    /// dy·W for `rows` rows of dy (rows × out) → rows × in.
    fn grad_input(&self, dy: &[f32], rows: usize) -> Result<Vec<f32>>;
}

/// x (..., in) · wᵀ (w: out × in), with gradient to x only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    require_cpu(w, NAME)?;
    let op = FrozenLinear {
        w: w.detach().contiguous()?,
    };
    over_rows(x, w.dims2()?, op)
}

/// x (..., in) · Wᵀ for a base that multiplies itself (a bf16 one), gradient to x only.
pub fn frozen_linear_over(x: &Tensor, base: Arc<dyn FrozenMatmul>) -> Result<Tensor> {
    let shape = base.shape();
    over_rows(x, shape, FrozenOver { base })
}

/// Applies `op` to x (..., in); the op keeps x's leading dimensions.
fn over_rows(
    x: &Tensor,
    (out_f, in_f): (usize, usize),
    op: impl CustomOp1 + Send + Sync + 'static,
) -> Result<Tensor> {
    if x.dims().last() != Some(&in_f) {
        bail!(
            "frozen_linear: x {:?} does not fit w {:?}",
            x.dims(),
            (out_f, in_f)
        )
    }
    x.contiguous()?.apply_op1(op)
}

struct FrozenLinear {
    w: Tensor,
}

struct FrozenOver {
    base: Arc<dyn FrozenMatmul>,
}

impl CustomOp1 for FrozenOver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, NAME)?;
        let (n, _) = rows_and_features(l.shape(), NAME)?;
        let y = self.base.forward(x, n)?;
        Ok((
            CpuStorage::F32(y),
            with_features(l.shape(), self.base.shape().0),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let (n, _) = rows_and_features(g.shape(), NAME)?;
        let dx = self.base.grad_input(view(&g, NAME)?.get(), n)?;
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, NAME)?;
        let (n, in_f) = rows_and_features(l.shape(), NAME)?;
        let wv = view(&self.w, NAME)?;
        let w = wv.get();
        let out_f = w.len() / in_f;
        let out_shape = with_features(l.shape(), out_f);
        if n == 1 {
            return Ok((
                CpuStorage::F32(gemv(x, Weights::F32(w), None, None)),
                out_shape,
            ));
        }
        let mut y = vec![0f32; n * out_f];
        sgemm_xwt(n, out_f, in_f, &mut y, out_f, x, w);
        Ok((CpuStorage::F32(y), out_shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let (out_f, in_f) = self.w.dims2()?;
        let (n, _) = rows_and_features(g.shape(), NAME)?;
        let (gv, wv) = (view(&g, NAME)?, view(&self.w, NAME)?);
        let dx = dense_grad_input(gv.get(), wv.get(), n, (out_f, in_f));
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

/// dy (n × out) · W (out × in): the input gradient of a linear layer with a dense frozen W.
pub(crate) fn dense_grad_input(
    dy: &[f32],
    w: &[f32],
    n: usize,
    (out_f, in_f): (usize, usize),
) -> Vec<f32> {
    let mut dx = vec![0f32; n * in_f];
    sgemm(
        n,
        in_f,
        out_f,
        &mut dx,
        in_f,
        Mat::rows(dy, out_f),
        Mat::rows(w, in_f),
        1.0,
        false,
        true,
    );
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_grad_match_candle_and_w_gets_none() {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 1., (7, 5), &dev).unwrap();
        let x = Var::randn(0f32, 1., (2, 3, 5), &dev).unwrap();
        let y = frozen_linear(x.as_tensor(), w.as_tensor()).unwrap();
        let expect = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        let diff = (&y - &expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        let probe = Tensor::randn(0f32, 1., (2, 3, 7), &dev).unwrap();
        let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let expect_gx = probe.broadcast_matmul(w.as_tensor()).unwrap();
        let diff = (gx - expect_gx)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "a frozen weight gets no gradient"
        );
    }

    /// One input row (decoding) takes the four-rows-at-a-time GEMV, ragged end included.
    #[test]
    fn one_row_matches_candle() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (37, 150), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 150), &dev).unwrap();
        let y = frozen_linear(&x, &w).unwrap();
        let expect = x.matmul(&w.t().unwrap()).unwrap();
        let diff: f32 = (&y - &expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }

    /// Over a bf16 base: x·Wᵀ and grad-x equal candle's f32 products of the bf16-rounded
    /// values (x rounded in forward, dy in backward).
    #[test]
    fn bf16_base_matches_candle_on_rounded_values() {
        use candle_core::DType;
        let dev = Device::Cpu;
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let w = round(&Tensor::randn(0f32, 1., (23, 40), &dev).unwrap());
        let x = Var::randn(0f32, 1., (3, 11, 40), &dev).unwrap();
        let base = crate::Bf16Frozen::new(&w.to_dtype(DType::BF16).unwrap()).unwrap();
        let y = frozen_linear_over(x.as_tensor(), base).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let expect = round(x.as_tensor())
            .broadcast_matmul(&w.t().unwrap())
            .unwrap();
        assert!(max_diff(&y, &expect) < 1e-4);
        let probe = Tensor::randn(0f32, 1., (3, 11, 23), &dev).unwrap();
        let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let expect_gx = round(&probe).broadcast_matmul(&w).unwrap();
        assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &expect_gx) < 1e-4);
    }
}
