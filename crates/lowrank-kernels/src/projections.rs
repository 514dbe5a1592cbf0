//! Several linears of the same input row in one parallel pass over all their weights: batch-1
//! decoding's q, k and v projections (and gate and up).
//!
//! One token's linears are short, bandwidth-bound passes; each pays a dispatch to the thread
//! pool and a tail where one thread finishes alone, so fewer, longer passes are faster.
//! No backward: inference only (the outputs record no op).

use crate::cpu::{factor_rank, require_cpu, view};
use crate::gemv::{gemv_parts, GemvPart, LowRankTerm, Weights};
use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};

const NAME: &str = "lowrank-linears-one-row";

/// One linear of [`linears_one_row`]: y = x·Wᵀ (+ bias) (+ scale·(x·Aᵀ)·Bᵀ). The weight
/// (out × in) is f32 or bf16 (widened in registers, f32 accumulation); bias (out), A (r × in)
/// and B (out × r) are f32.
pub struct OneRowLinear<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub lora: Option<OneRowLora<'a>>,
}

/// The LoRA term of a [`OneRowLinear`]: A (r × in), B (out × r) and the scale.
#[derive(Clone, Copy)]
pub enum OneRowLora<'a> {
    /// Factors as f32 tensors.
    Tensors {
        a: &'a Tensor,
        b: &'a Tensor,
        scale: f64,
    },
    /// Factors as plain row-major slices: an adapter's factors copied out for decoding, which
    /// spares every token the tensors' bookkeeping (locks, shapes, strides), whose memory the
    /// streamed weights have pushed out of cache since the last token.
    Slices {
        a: &'a [f32],
        b: &'a [f32],
        scale: f64,
    },
}

/// Every linear's output for x (…, in) holding exactly one row, shaped like x with the last
/// dimension replaced by the linear's output size.
pub fn linears_one_row(x: &Tensor, linears: &[OneRowLinear]) -> Result<Vec<Tensor>> {
    let in_f = x.dims().last().copied().unwrap_or(0);
    if x.elem_count() != in_f {
        bail!("{NAME}: x {:?} must hold exactly one row", x.dims())
    }
    require_cpu(x, NAME)?;
    for l in linears {
        let (out_f, w_in) = l.weight.dims2()?;
        if w_in != in_f {
            bail!(
                "{NAME}: weight {:?} does not fit x {:?}",
                l.weight.dims(),
                x.dims()
            )
        }
        require_cpu(l.weight, NAME)?;
        if !matches!(l.weight.dtype(), DType::F32 | DType::BF16) {
            bail!(
                "{NAME}: weights must be f32 or bf16, got {:?}",
                l.weight.dtype()
            )
        }
        if l.bias.is_some_and(|b| b.dims() != [out_f]) {
            bail!("{NAME}: a bias does not fit weight {:?}", l.weight.dims())
        }
        match l.lora {
            Some(OneRowLora::Tensors { a, b, .. }) => {
                factor_rank(NAME, a, b, (out_f, in_f))?;
            }
            Some(OneRowLora::Slices { a, b, .. }) => {
                let r = a.len().checked_div(in_f).unwrap_or(0);
                if a.len() != r * in_f || b.len() != out_f * r {
                    bail!(
                        "{NAME}: a of {} and b of {} values do not fit weight {:?}",
                        a.len(),
                        b.len(),
                        l.weight.dims()
                    )
                }
            }
            None => {}
        }
    }
    let x = x.contiguous()?;
    let weights = linears
        .iter()
        .map(|l| l.weight.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = weights.iter().map(|w| w.storage_and_layout()).collect();
    let mut data = Vec::with_capacity(linears.len());
    for (guard, layout) in &guards {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{NAME}: a weight is not contiguous")
        };
        data.push(match &**guard {
            Storage::Cpu(CpuStorage::F32(v)) => Weights::F32(&v[start..end]),
            Storage::Cpu(CpuStorage::BF16(v)) => Weights::Bf16(&v[start..end]),
            _ => bail!("{NAME}: weights must be f32 or bf16 on the CPU"),
        });
    }
    let small = |t: &Tensor| t.contiguous();
    let biases = linears
        .iter()
        .map(|l| l.bias.map(small).transpose())
        .collect::<Result<Vec<_>>>()?;
    let factors = linears
        .iter()
        .map(|l| match l.lora {
            Some(OneRowLora::Tensors { a, b, .. }) => Ok(Some((small(a)?, small(b)?))),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let xv = view(&x, NAME)?;
    let xs = xv.get();
    let bias_views = biases
        .iter()
        .map(|b| b.as_ref().map(|b| view(b, NAME)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let factor_views = factors
        .iter()
        .map(|f| {
            f.as_ref()
                .map(|(a, b)| Ok::<_, candle_core::Error>((view(a, NAME)?, view(b, NAME)?)))
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    let parts: Vec<GemvPart> = linears
        .iter()
        .enumerate()
        .map(|(i, l)| GemvPart {
            w: data[i],
            lora: match (l.lora, &factor_views[i]) {
                (Some(OneRowLora::Tensors { scale, .. }), Some((a, b))) => Some(LowRankTerm {
                    a: a.get(),
                    b: b.get(),
                    scale: scale as f32,
                }),
                (Some(OneRowLora::Slices { a, b, scale }), _) => Some(LowRankTerm {
                    a,
                    b,
                    scale: scale as f32,
                }),
                _ => None,
            },
            bias: bias_views[i].as_ref().map(|b| b.get()),
        })
        .collect();
    let outputs = gemv_parts(xs, &parts);
    let dims = x.dims().to_vec();
    outputs
        .into_iter()
        .map(|y| {
            let mut shape = dims.clone();
            *shape.last_mut().expect("x has a last dimension") = y.len();
            Tensor::from_vec(y, shape, x.device())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{frozen_linear, gemv_bf16, lora_linear, lora_linear_decode_bf16};

    /// Each output equals the single-linear kernels' (f32 and bf16 weights, with and without
    /// bias and LoRA, factors as tensors and as slices, output sizes that leave partial runs),
    /// and bad shapes are refused.
    #[test]
    fn matches_one_linear_at_a_time() {
        let in_f = 96;
        let x = randt(&[1, 1, in_f], 91, 1.0);
        let w1 = randt(&[37, in_f], 92, 0.5);
        let w2 = randt(&[16, in_f], 93, 0.5).to_dtype(DType::BF16).unwrap();
        let w3 = randt(&[50, in_f], 94, 0.5);
        let w4 = randt(&[9, in_f], 95, 0.5).to_dtype(DType::BF16).unwrap();
        let bias1 = randt(&[37], 96, 0.5);
        let bias4 = randt(&[9], 97, 0.5);
        let (a3, b3) = (randt(&[16, in_f], 98, 0.3), randt(&[50, 16], 99, 0.3));
        let (a4, b4) = (randt(&[8, in_f], 100, 0.3), randt(&[9, 8], 101, 0.3));
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a4_values, b4_values) = (flat(&a4), flat(&b4));
        let got = linears_one_row(
            &x,
            &[
                OneRowLinear {
                    weight: &w1,
                    bias: Some(&bias1),
                    lora: None,
                },
                OneRowLinear {
                    weight: &w2,
                    bias: None,
                    lora: None,
                },
                OneRowLinear {
                    weight: &w3,
                    bias: None,
                    lora: Some(OneRowLora::Tensors {
                        a: &a3,
                        b: &b3,
                        scale: 0.7,
                    }),
                },
                OneRowLinear {
                    weight: &w4,
                    bias: Some(&bias4),
                    lora: Some(OneRowLora::Slices {
                        a: &a4_values,
                        b: &b4_values,
                        scale: 1.5,
                    }),
                },
            ],
        )
        .unwrap();
        let want = [
            frozen_linear(&x, &w1)
                .unwrap()
                .broadcast_add(&bias1)
                .unwrap(),
            gemv_bf16(&x, &w2).unwrap(),
            lora_linear(&x, &w3, None, &a3, &b3, 0.7).unwrap(),
            lora_linear_decode_bf16(&x, &w4, Some(&bias4), &a4, &b4, 1.5).unwrap(),
        ];
        assert_eq!(got.len(), 4);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.dims(), w.dims(), "linear {i}");
            let e = rel_err(g, w);
            assert!(e < 1e-6, "linear {i}: {e:.2e}");
        }
        let two_rows = randt(&[2, in_f], 102, 1.0);
        let refused = |x: &Tensor, bias: Option<&Tensor>, lora: Option<OneRowLora>| {
            let linear = OneRowLinear {
                weight: &w1,
                bias,
                lora,
            };
            linears_one_row(x, &[linear]).unwrap_err().to_string()
        };
        let err = refused(&two_rows, None, None);
        assert!(err.contains("exactly one row"), "{err}");
        let err = refused(&x, Some(&bias4), None);
        assert!(err.contains("bias"), "{err}");
        // Factors of other shapes, as tensors (r = 16 for 50 outputs) and as slices (r = 8 for 9).
        let misfits = [
            OneRowLora::Tensors {
                a: &a3,
                b: &b3,
                scale: 1.0,
            },
            OneRowLora::Slices {
                a: &a4_values,
                b: &b4_values,
                scale: 1.0,
            },
        ];
        for lora in misfits {
            let err = refused(&x, None, Some(lora));
            assert!(err.contains("do not fit"), "{err}");
        }
    }
}
