//! The linears of a batched inference step: one call, [`apply`], for any number of rows, any
//! base (f32, bf16, NF4/FP4) and any mix of adapters over the rows, as vLLM's
//! `punica_wrapper.add_lora_linear`: the caller says which rows use which adapter module
//! ([`Segment`]s) and gets every output; the choice of kernel is made here, from the base kind,
//! the adapters and the number of rows:
//!
//! - one row over an f32 or bf16 base with at most one plain LoRA: batch-1 decoding's GEMV
//!   pass (`gemv.rs`), with its A·x inside the pass and B folded into the row dots;
//! - up to [`SKINNY_MAX_ROWS`] rows (and one row over a 4-bit base): the skinny GEMM
//!   (`skinny.rs`), one pass over W for all rows, adapters shrunk and expanded per segment;
//! - more rows (prefill): the `gemm` crate's packed GEMM for the base (a bf16 W widened and a
//!   4-bit W decoded a tile at a time), the same shrink and the expand row by row.
//!
//! No backward: inference only.

use candle_core::{bail, Result};
use rayon::prelude::*;

use crate::bf16_gemm::{all_bf16, bf16_kernel, x_wt, Bf16Kernel};
use crate::cpu::sgemm_xwt;
use crate::gemv::{gemv_parts, GemvPart, LowRankTerm, Weights};
use crate::skinny::{dot_tile, shrink, skinny, TileWeight};
pub use crate::skinny::{BaseWeights, Segment, StepLinear};

/// Rows up to which the skinny GEMM runs; above, the packed GEMM's throughput wins over
/// reading W once.
pub const SKINNY_MAX_ROWS: usize = 64;
/// Output rows of a bf16 W widened per GEMM tile: large enough that the GEMM runs long on
/// each, small enough (a few MB) for an output head of 50k rows.
const WIDEN_TILE: usize = 1024;
/// Rows of Y per task of the GEMM path's expand.
const EXPAND_ROWS: usize = 16;

const NAME: &str = "lowrank-step-linears";

/// The kernel [`apply`] runs for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKernel {
    Gemv,
    Skinny,
    Gemm,
}

/// The kernel for `rows` rows of these linears.
pub fn kernel_for(rows: usize, linears: &[StepLinear]) -> StepKernel {
    let gemv_fits = |l: &StepLinear| {
        !matches!(l.weight, BaseWeights::FourBit(_))
            && match l.segments.as_slice() {
                [] => true,
                [one] => one.column_scale.is_none() && one.rows == [0],
                _ => false,
            }
    };
    if rows == 1 && linears.iter().all(gemv_fits) {
        StepKernel::Gemv
    } else if rows <= SKINNY_MAX_ROWS {
        StepKernel::Skinny
    } else {
        StepKernel::Gemm
    }
}

/// Each linear's Y (rows × out, row-major) for X (rows × in_f, row-major): W·x + bias plus
/// every segment's adapter on its rows. Fails with the linear's index when shapes do not fit.
pub fn apply(x: &[f32], in_f: usize, linears: &[StepLinear]) -> Result<Vec<Vec<f32>>> {
    if in_f == 0 || !x.len().is_multiple_of(in_f) {
        bail!("{NAME}: x holds {} values, not rows of {in_f}", x.len())
    }
    let rows = x.len() / in_f;
    for (i, l) in linears.iter().enumerate() {
        check(i, l, in_f, rows)?;
    }
    Ok(match kernel_for(rows, linears) {
        StepKernel::Gemv => {
            let parts: Vec<GemvPart> = linears
                .iter()
                .map(|l| GemvPart {
                    w: match l.weight {
                        BaseWeights::F32(w) => Weights::F32(w),
                        BaseWeights::Bf16(w) => Weights::Bf16(w),
                        BaseWeights::FourBit(_) => {
                            unreachable!("kernel_for keeps 4-bit off the GEMV")
                        }
                    },
                    lora: l.segments.first().map(|s| LowRankTerm {
                        a: s.a,
                        b: s.b,
                        scale: s.scale,
                    }),
                    bias: l.bias,
                })
                .collect();
            gemv_parts(x, &parts)
        }
        StepKernel::Skinny => skinny(x, in_f, linears),
        StepKernel::Gemm => {
            let x_rows: Vec<&[f32]> = x.chunks_exact(in_f).collect();
            let shrunk = shrink(&x_rows, in_f, linears);
            linears
                .iter()
                .zip(&shrunk)
                .map(|(l, t)| gemm_linear(x, in_f, l, t))
                .collect::<Result<_>>()?
        }
    })
}

/// Whether a bf16 W's GEMM can run on AVX512-BF16's dot products: only where every value of
/// X already is a bf16 (the model rounds each linear's input, `--bf16-activations`), so that
/// kernel multiplies the same values as widening W would, and only where this process chose it
/// as the faster (`bf16_gemm::bf16_kernel`).
fn dot_kernel_fits(x: &[f32]) -> Result<bool> {
    Ok(bf16_kernel()? == Bf16Kernel::Dot && all_bf16(x))
}

/// Checks that a linear's weight, bias and segments fit x's rows and features.
fn check(index: usize, l: &StepLinear, in_f: usize, rows: usize) -> Result<()> {
    if !l.weight.len().is_multiple_of(in_f) {
        bail!(
            "{NAME}: linear {index}'s weight holds {} values, not rows of {in_f}",
            l.weight.len()
        )
    }
    if let BaseWeights::FourBit(q) = l.weight {
        if q.dims2().ok().map(|(_, i)| i) != Some(in_f) {
            bail!(
                "{NAME}: linear {index}'s 4-bit weight has shape {:?}, not (…, {in_f})",
                q.shape()
            )
        }
    }
    let out_f = l.out_features(in_f);
    if l.bias.is_some_and(|b| b.len() != out_f) {
        bail!("{NAME}: linear {index}'s bias does not have {out_f} values")
    }
    for (s, seg) in l.segments.iter().enumerate() {
        let r = seg.a.len() / in_f;
        if seg.a.len() != r * in_f || seg.b.len() != out_f * r {
            bail!(
                "{NAME}: linear {index}, segment {s}: A of {} and B of {} values do not fit a {out_f}×{in_f} weight",
                seg.a.len(),
                seg.b.len()
            )
        }
        if seg.rows.iter().any(|&i| i >= rows) {
            bail!("{NAME}: linear {index}, segment {s} names a row past the step's {rows}")
        }
        if seg.column_scale.is_some_and(|c| c.len() != out_f) {
            bail!("{NAME}: linear {index}, segment {s}: the column scale does not have {out_f} values")
        }
    }
    Ok(())
}

/// One linear over many rows: the base through the packed GEMM, then the segments' expands,
/// DoRA scales and bias, runs of rows in parallel.
fn gemm_linear(x: &[f32], in_f: usize, l: &StepLinear, shrunk: &[Vec<f32>]) -> Result<Vec<f32>> {
    let rows = x.len() / in_f;
    let out_f = l.out_features(in_f);
    // Y[:, o0..o0 + n] = X·W[o0..o0 + n]ᵀ for an f32 block of W's rows.
    let gemm_into = |y: &mut [f32], o0: usize, n: usize, w: &[f32]| {
        sgemm_xwt(rows, n, in_f, &mut y[o0..], out_f, x, w)
    };
    let mut y = match l.weight {
        BaseWeights::F32(w) => {
            let mut y = vec![0f32; rows * out_f];
            gemm_into(&mut y, 0, out_f, w);
            y
        }
        BaseWeights::Bf16(w) if dot_kernel_fits(x)? => {
            x_wt(Bf16Kernel::Dot, x, rows, w, (out_f, in_f))
        }
        BaseWeights::Bf16(w) => {
            let mut y = vec![0f32; rows * out_f];
            let mut tile = Vec::with_capacity(WIDEN_TILE.min(out_f) * in_f);
            for o0 in (0..out_f).step_by(WIDEN_TILE) {
                let n = WIDEN_TILE.min(out_f - o0);
                tile.resize(n * in_f, 0.0);
                // Widened in parallel.
                tile.par_chunks_mut(1 << 14)
                    .zip(w[o0 * in_f..(o0 + n) * in_f].par_chunks(1 << 14))
                    .for_each(|(dst, src)| {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = TileWeight::to_f32(*v);
                        }
                    });
                gemm_into(&mut y, o0, n, &tile);
            }
            y
        }
        BaseWeights::FourBit(q) => lowrank_quant::matmul_4bit(x, rows, q)
            .map_err(|e| candle_core::Error::Msg(format!("{NAME}: {e}")))?,
    };
    // Runs of rows in parallel; in each, every segment's expand for its rows there as
    // blocks of four rows (one row at a time, each B row's dot would wait on its own sums).
    let run = EXPAND_ROWS * out_f.max(1);
    y.par_chunks_mut(run).enumerate().for_each(|(c, y)| {
        let first = c * EXPAND_ROWS;
        let here = first..first + y.len() / out_f.max(1);
        for (seg, t) in l.segments.iter().zip(shrunk) {
            let r = seg.a.len() / in_f;
            if r == 0 {
                continue;
            }
            let (ts, out_x): (Vec<&[f32]>, Vec<usize>) = seg
                .rows
                .iter()
                .enumerate()
                .filter(|(_, row)| here.contains(row))
                .map(|(k, &row)| (&t[k * r..(k + 1) * r], (row - first) * out_f))
                .unzip();
            dot_tile(seg.b, r, out_f, r, &ts, y, &out_x, 1, false);
        }
        for seg in &l.segments {
            if let Some(cs) = seg.column_scale {
                for &row in seg.rows.iter().filter(|row| here.contains(row)) {
                    let y = &mut y[(row - first) * out_f..(row - first + 1) * out_f];
                    y.iter_mut().zip(cs).for_each(|(v, c)| *v *= c);
                }
            }
        }
        if let Some(bias) = l.bias {
            for y in y.chunks_exact_mut(out_f.max(1)) {
                y.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
    });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use half::bf16;
    use lowrank_quant::{QuantType, Quantized4Bit};

    /// W as f64, decoded independently of the kernels: code (row-major flat index i) times the
    /// absmax of block i / block_size.
    fn dense(w: &BaseWeights) -> Vec<f64> {
        match w {
            BaseWeights::F32(w) => w.iter().map(|&v| v as f64).collect(),
            BaseWeights::Bf16(w) => w.iter().map(|v| v.to_f64()).collect(),
            BaseWeights::FourBit(q) => (0..q.numel())
                .map(|i| {
                    q.code()[q.code_at(i) as usize] as f64
                        * q.absmax().get(i / q.block_size()) as f64
                })
                .collect(),
        }
    }

    /// The step's linear in f64: y = W·x + Σ scale·B(A·x) (DoRA rows: column_scale ⊙ (…)) + b.
    fn reference(x: &[f32], in_f: usize, l: &StepLinear) -> Vec<f64> {
        let rows = x.len() / in_f;
        let w = dense(&l.weight);
        let out_f = w.len() / in_f;
        let mut y = vec![0f64; rows * out_f];
        for i in 0..rows {
            let xi = &x[i * in_f..(i + 1) * in_f];
            for o in 0..out_f {
                y[i * out_f + o] = (0..in_f).map(|k| w[o * in_f + k] * xi[k] as f64).sum();
            }
            for seg in l.segments.iter().filter(|s| s.rows.contains(&i)) {
                let r = seg.a.len() / in_f;
                let ax: Vec<f64> = (0..r)
                    .map(|j| {
                        (0..in_f)
                            .map(|k| seg.a[j * in_f + k] as f64 * xi[k] as f64)
                            .sum()
                    })
                    .collect();
                for o in 0..out_f {
                    let d: f64 = (0..r).map(|j| seg.b[o * r + j] as f64 * ax[j]).sum();
                    y[i * out_f + o] += seg.scale as f64 * d;
                }
            }
            for seg in l.segments.iter().filter(|s| s.rows.contains(&i)) {
                if let Some(cs) = seg.column_scale {
                    for o in 0..out_f {
                        y[i * out_f + o] *= cs[o] as f64;
                    }
                }
            }
            if let Some(b) = l.bias {
                for o in 0..out_f {
                    y[i * out_f + o] += b[o] as f64;
                }
            }
        }
        y
    }

    /// Every row count from 1 to 64 and a few above (each kernel), over f32, bf16, NF4 and FP4
    /// weights (plain and double-quantized absmax; 4-bit blocks that straddle rows, with 100 or
    /// 48 inputs in blocks of 64, and that cover several rows, with 40 or 32 inputs in blocks
    /// of 128),
    /// odd shapes, and adapters of ranks 3 and 16, a DoRA row, a row with two stacked adapters
    /// and rows without any, all in one step, against f64.
    #[test]
    fn every_row_count_and_base_kind_matches_f64() {
        // Rows of a multiple of 32 values take the 4-bit path that decodes in registers (up
        // to four rows of X), the others the decoded buffer.
        // bf16 over 1100 outputs: two tiles of the GEMM path's widening.
        let cases: [(usize, usize, &str, usize); 10] = [
            (77, 50, "f32", 0),
            (77, 37, "bf16", 0),
            (24, 1100, "bf16", 0),
            (100, 29, "nf4", 64),
            (40, 21, "fp4", 128),
            (100, 33, "nf4-dq", 64),
            (40, 13, "fp4-dq", 128),
            (48, 19, "nf4-dq", 64),
            (64, 7, "nf4-dq", 32),
            (32, 11, "fp4", 128),
        ];
        for (in_f, out_f, kind, block) in cases {
            let wv = values(out_f * in_f, 1);
            let wb: Vec<bf16> = wv.iter().map(|&v| bf16::from_f32(v)).collect();
            let q = (block > 0).then(|| {
                let qt = if kind.starts_with("nf4") {
                    QuantType::Nf4
                } else {
                    QuantType::Fp4
                };
                Quantized4Bit::quantize(&wv, &[out_f, in_f], qt, block, kind.ends_with("dq"))
                    .unwrap()
            });
            let weight = match (kind, &q) {
                ("f32", _) => BaseWeights::F32(&wv),
                ("bf16", _) => BaseWeights::Bf16(&wb),
                (_, Some(q)) => BaseWeights::FourBit(q),
                _ => unreachable!(),
            };
            let bias = values(out_f, 2);
            let (a3, b3) = (values(3 * in_f, 3), values(out_f * 3, 4));
            let (a16, b16) = (values(16 * in_f, 5), values(out_f * 16, 6));
            let (ad, bd, cs) = (values(8 * in_f, 7), values(out_f * 8, 8), values(out_f, 9));
            for rows in (1..=SKINNY_MAX_ROWS).chain([65, 130]) {
                let x = values(rows * in_f, 10 + rows);
                // Row 0: rank 3; every third row from 1: rank 16; row 2: DoRA; the last row
                // (when not one of those): ranks 3 and 16 stacked; the others: no adapter.
                let mut r3: Vec<usize> = vec![0];
                let r16: Vec<usize> = (1..rows).step_by(3).collect();
                let dora: Vec<usize> = if rows > 2 { vec![2] } else { vec![] };
                let last = rows - 1;
                if last > 2 && !r16.contains(&last) {
                    r3.push(last);
                }
                let mut r16 = r16;
                if last > 2 && !r16.contains(&last) {
                    r16.push(last);
                }
                let segments: Vec<Segment> = [
                    Segment {
                        a: &a3,
                        b: &b3,
                        scale: 0.5,
                        rows: &r3,
                        column_scale: None,
                    },
                    Segment {
                        a: &a16,
                        b: &b16,
                        scale: 0.25,
                        rows: &r16,
                        column_scale: None,
                    },
                    Segment {
                        a: &ad,
                        b: &bd,
                        scale: 2.0,
                        rows: &dora,
                        column_scale: Some(&cs),
                    },
                ]
                .into_iter()
                .filter(|s| !s.rows.is_empty())
                .collect();
                let linears = [
                    StepLinear {
                        weight,
                        bias: Some(&bias),
                        segments,
                    },
                    StepLinear {
                        weight,
                        bias: None,
                        segments: vec![],
                    },
                ];
                let got = apply(&x, in_f, &linears).unwrap();
                for (l, (linear, y)) in linears.iter().zip(&got).enumerate() {
                    let want = reference(&x, in_f, linear);
                    assert_eq!(y.len(), want.len());
                    for (k, (g, w)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{kind}, {rows} rows ({:?}), linear {l}, row {} col {}: {g} vs {w}",
                            kernel_for(rows, &linears),
                            k / out_f,
                            k % out_f
                        );
                    }
                }
            }
        }
    }

    /// X already in bf16 (`--bf16-activations`) over a bf16 W: up to 64 rows of a multiple of
    /// 32 features the skinny GEMM's pair block and above 64 rows the GEMM run on AVX512-BF16's
    /// dot products (the GEMM where this process chose them); every path matches f64, odd and
    /// even features alike.
    #[test]
    fn bf16_inputs_over_a_bf16_base_match_f64() {
        for (in_f, out_f) in [(77, 37), (64, 150), (96, 50)] {
            let wb: Vec<bf16> = values(out_f * in_f, 1)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let (a, b) = (values(4 * in_f, 2), values(out_f * 4, 3));
            for rows in [1, 2, 5, 8, 9, 16, 23, 24, 65, 130] {
                let mut x = values(rows * in_f, 4);
                crate::bf16_gemm::round_to_bf16(&mut x);
                let odd: Vec<usize> = (1..rows).step_by(2).collect();
                let linears = [StepLinear {
                    weight: BaseWeights::Bf16(&wb),
                    bias: None,
                    segments: vec![Segment {
                        a: &a,
                        b: &b,
                        scale: 0.5,
                        rows: &odd,
                        column_scale: None,
                    }],
                }];
                let got = apply(&x, in_f, &linears).unwrap();
                let want = reference(&x, in_f, &linears[0]);
                for (k, (g, w)) in got[0].iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{in_f} features, {rows} rows ({:?}, {:?}), row {} col {}: {g} vs {w}",
                        kernel_for(rows, &linears),
                        crate::bf16_gemm::bf16_kernel(),
                        k / out_f,
                        k % out_f
                    );
                }
            }
        }
    }

    /// One row of an f32 or bf16 base with one plain LoRA takes the GEMV pass, with a DoRA row
    /// or over a 4-bit base the skinny one; more than 64 rows the GEMM.
    #[test]
    fn the_kernel_follows_rows_base_and_adapters() {
        let w = values(8 * 16, 1);
        let q = Quantized4Bit::quantize(&w, &[8, 16], QuantType::Nf4, 64, false).unwrap();
        let (a, b, cs) = (values(2 * 16, 2), values(8 * 2, 3), values(8, 4));
        let row0 = [0usize];
        let lora = Segment {
            a: &a,
            b: &b,
            scale: 1.0,
            rows: &row0,
            column_scale: None,
        };
        let dora = Segment {
            column_scale: Some(&cs),
            ..lora
        };
        let linear = |weight, segments| StepLinear {
            weight,
            bias: None,
            segments,
        };
        let f32_lora = [linear(BaseWeights::F32(&w), vec![lora])];
        assert_eq!(kernel_for(1, &f32_lora), StepKernel::Gemv);
        assert_eq!(kernel_for(2, &f32_lora), StepKernel::Skinny);
        assert_eq!(kernel_for(65, &f32_lora), StepKernel::Gemm);
        assert_eq!(
            kernel_for(1, &[linear(BaseWeights::F32(&w), vec![dora])]),
            StepKernel::Skinny
        );
        assert_eq!(
            kernel_for(1, &[linear(BaseWeights::F32(&w), vec![lora, lora])]),
            StepKernel::Skinny
        );
        assert_eq!(
            kernel_for(1, &[linear(BaseWeights::FourBit(&q), vec![])]),
            StepKernel::Skinny
        );
    }

    /// Shapes that do not fit are refused with the linear and segment named.
    #[test]
    fn misfits_are_refused() {
        let w = values(8 * 16, 1);
        let (a, b) = (values(2 * 16, 2), values(8 * 2, 3));
        let x = values(2 * 16, 4);
        let far = [5usize];
        let seg = Segment {
            a: &a,
            b: &b,
            scale: 1.0,
            rows: &far,
            column_scale: None,
        };
        let err = |linear: StepLinear, x: &[f32]| apply(x, 16, &[linear]).unwrap_err().to_string();
        let e = err(
            StepLinear {
                weight: BaseWeights::F32(&w),
                bias: None,
                segments: vec![seg],
            },
            &x,
        );
        assert!(e.contains("segment 0") && e.contains("past"), "{e}");
        let short_b = Segment {
            b: &b[..10],
            rows: &[0],
            ..seg
        };
        let e = err(
            StepLinear {
                weight: BaseWeights::F32(&w),
                bias: None,
                segments: vec![short_b],
            },
            &x,
        );
        assert!(e.contains("do not fit"), "{e}");
        let e = err(
            StepLinear {
                weight: BaseWeights::F32(&w),
                bias: Some(&a[..3]),
                segments: vec![],
            },
            &x,
        );
        assert!(e.contains("bias"), "{e}");
        let e = err(
            StepLinear {
                weight: BaseWeights::F32(&w),
                bias: None,
                segments: vec![],
            },
            &x[..20],
        );
        assert!(e.contains("not rows of 16"), "{e}");
    }
}
