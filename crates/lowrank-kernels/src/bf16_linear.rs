//! Linears over bf16 weights for a few input rows (decoding): x·Wᵀ (+ bias) (+ scale·(x·Aᵀ)·Bᵀ)
//! with W in bf16 and the rest f32, accumulated in f32, the LoRA path fused into the same pass
//! over W. Decoding is bound by memory bandwidth and bf16 halves the bytes read. One row takes
//! the one-row pass (`gemv.rs`); more rows read each row of W once for all of them. No
//! backward: inference only.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::bf16_rows::streamed_rows_bf16;
use crate::cpu::{add_scaled_matvec, dot_portable, factor_rank, require_cpu, slice, view};
use crate::gemv::{gemv, LowRankTerm, Weights};

const NAME: &str = "lowrank-bf16-linear";
/// The most input rows the kernels are meant for (a decoding step over a small batch): each
/// row of W is read once and kept in L1 while every input row uses it.
pub const MAX_ROWS: usize = 16;
/// Output rows per rayon task.
const ROWS: usize = 32;

/// x·Wᵀ for x (..., in) f32 with few rows and w (out, in) bf16, accumulated in f32.
pub fn gemv_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    bf16_linear_op(x, w, None, None, 0.0)
}

/// x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ with w (out, in) in bf16 and x, a, b, bias in f32, in one
/// pass over W (A·x first, then each output row reads W[o] and B[o] once).
pub fn lora_linear_decode_bf16(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    bf16_linear_op(x, w, bias, Some((a, b)), scale as f32)
}

fn bf16_linear_op(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor)>,
    scale: f32,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    if w.dtype() != DType::BF16 {
        bail!("{NAME}: the weight must be bf16, got {:?}", w.dtype())
    }
    if x.dims().last() != Some(&in_f) {
        bail!("{NAME}: x {:?} does not fit w {:?}", x.dims(), w.dims())
    }
    if let Some((a, b)) = lora {
        factor_rank(NAME, a, b, (out_f, in_f))?;
        require_cpu(a, NAME)?;
    }
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.contiguous()?.reshape((rows, in_f))?;
    let op = Bf16Linear {
        bias: bias.map(|b| b.detach().contiguous()).transpose()?,
        lora: lora
            .map(|(a, b)| {
                Ok::<_, candle_core::Error>((a.detach().contiguous()?, b.detach().contiguous()?))
            })
            .transpose()?,
        scale,
    };
    let y = x2.apply_op2_no_bwd(&w.contiguous()?, &op)?;
    let mut od = dims;
    *od.last_mut().expect("x has a last dimension") = out_f;
    y.reshape(od)
}

struct Bf16Linear {
    bias: Option<Tensor>,
    lora: Option<(Tensor, Tensor)>,
    scale: f32,
}

impl CustomOp2 for Bf16Linear {
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
        let x = slice(s1, l1, NAME)?;
        let CpuStorage::BF16(wall) = s2 else {
            bail!("{NAME}: the weight must be bf16")
        };
        let Some((w0, w1)) = l2.contiguous_offsets() else {
            bail!("{NAME}: the weight must be contiguous")
        };
        let w = &wall[w0..w1];
        let (n, in_f) = l1.shape().dims2()?;
        let (out_f, _) = l2.shape().dims2()?;
        let bias_v = self.bias.as_ref().map(|b| view(b, NAME)).transpose()?;
        let bias = bias_v.as_ref().map(|b| b.get());
        let lora_v = self
            .lora
            .as_ref()
            .map(|(a, b)| Ok::<_, candle_core::Error>((view(a, NAME)?, view(b, NAME)?)))
            .transpose()?;
        if n == 1 {
            let lora = lora_v.as_ref().map(|(a, b)| LowRankTerm {
                a: a.get(),
                b: b.get(),
                scale: self.scale,
            });
            let y = gemv(x, Weights::Bf16(w), lora, bias);
            return Ok((CpuStorage::F32(y), Shape::from((1, out_f))));
        }
        let (r, ax, bmat) = match &lora_v {
            Some((a, b)) => {
                let (a, b) = (a.get(), b.get());
                let r = a.len() / in_f;
                let mut ax = vec![0f32; n * r];
                for (ax, x) in ax
                    .chunks_exact_mut(r.max(1))
                    .zip(x.chunks_exact(in_f.max(1)))
                {
                    add_scaled_matvec(ax, a, x, self.scale);
                }
                (r, ax, b)
            }
            None => (0, Vec::new(), &[][..]),
        };
        // Output transposed (out × n): each task owns a contiguous run of output rows, and reads
        // each row of W once for all n inputs.
        let mut yt = vec![0f32; out_f * n];
        let lora_and_bias = |o: usize, i: usize| {
            let lora = if r > 0 {
                dot_portable(&bmat[o * r..(o + 1) * r], &ax[i * r..(i + 1) * r])
            } else {
                0.0
            };
            lora + bias.map_or(0.0, |b| b[o])
        };
        yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(c, yt)| {
            for (k, yo) in yt.chunks_mut(n).enumerate() {
                let o = c * ROWS + k;
                let wrow = &w[o * in_f..(o + 1) * in_f];
                for (i, y) in yo.iter_mut().enumerate() {
                    let xi = &x[i * in_f..(i + 1) * in_f];
                    streamed_rows_bf16(wrow, xi, std::slice::from_mut(y), None);
                    *y += lora_and_bias(o, i);
                }
            }
        });
        let mut y = vec![0f32; n * out_f];
        for o in 0..out_f {
            for i in 0..n {
                y[i * out_f + o] = yt[o * n + i];
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, out_f))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn bf16_gemv_matches_f32_reference_on_the_rounded_weights() {
        // Ranks on both sides of the eight-lane LoRA-term kernel.
        for r in [4, 16] {
            let (in_f, out_f) = (77, 45);
            let w32 = randt(&[out_f, in_f], 81, 0.5);
            let w = w32.to_dtype(DType::BF16).unwrap();
            let wr = w.to_dtype(DType::F32).unwrap(); // the weights the kernel actually sees
            let a = randt(&[r, in_f], 82, 0.5);
            let b = randt(&[out_f, r], 83, 0.5);
            let bias = randt(&[out_f], 84, 0.5);
            for rows in [1, 3] {
                let x = randt(&[1, rows, in_f], 85, 1.0);
                let x2 = x.reshape((rows, in_f)).unwrap();
                let base = x2.matmul(&wr.t().unwrap()).unwrap();
                let e1 = rel_err(
                    &gemv_bf16(&x, &w).unwrap().reshape((rows, out_f)).unwrap(),
                    &base,
                );
                let lora = x2
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap();
                let expect = (base + (lora * 0.5).unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                let got = lora_linear_decode_bf16(&x, &w, Some(&bias), &a, &b, 0.5).unwrap();
                let e2 = rel_err(&got.reshape((rows, out_f)).unwrap(), &expect);
                // bf16 rounding of W itself: compare with the unrounded f32 weights too.
                let e3 = rel_err(
                    &gemv_bf16(&x, &w).unwrap().reshape((rows, out_f)).unwrap(),
                    &x2.matmul(&w32.t().unwrap()).unwrap(),
                );
                println!("gemv_bf16 r {r} rows {rows}: vs rounded-f32 {e1:.2e}, lora {e2:.2e}, vs unrounded f32 {e3:.2e}");
                assert!(e1 < 1e-5 && e2 < 1e-5 && e3 < 2e-2);
            }
            assert!(gemv_bf16(&randt(&[1, in_f], 1, 1.0), &w32).is_err());
        }
    }
}
