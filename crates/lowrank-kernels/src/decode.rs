//! Batch-1 decoding: bf16 weights × f32 activations with f32 accumulation, the LoRA path fused
//! into the same pass over W.
//!
//! Decoding reads every weight once per token, so it is bound by memory bandwidth; keeping W
//! in bf16 halves the bytes read. The target CPUs have AVX2/FMA but no AVX-512 BF16
//! (`vdpbf16ps`), so each bf16 is widened to f32 in registers (a 16-bit shift:
//! `vpmovzxwd` + `vpslld`) and accumulated with f32 FMAs. The kernel is compiled for AVX2+FMA
//! and picked at run time, with a portable fallback. No backward: inference only.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu::{
    add_scaled_matvec, check_run, dot_portable, factor_rank, require_cpu, rows_with, slice, view,
    RunTail,
};
use crate::gemv::{gemv, LowRankTerm, Weights};

const NAME: &str = "lowrank-gemv-bf16";
/// The most input rows the kernels are meant for (a decoding step over a small batch): each
/// row of W is read once and kept in L1 while every input row uses it.
pub const MAX_ROWS: usize = 16;
/// Output rows per rayon task.
const ROWS: usize = 32;

/// x·Wᵀ for x (..., in) f32 with few rows and w (out, in) bf16, accumulated in f32.
pub fn gemv_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    decode_op(x, w, None, None, 0.0)
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
    decode_op(x, w, bias, Some((a, b)), scale as f32)
}

fn decode_op(
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
    let op = DecodeBf16 {
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

struct DecodeBf16 {
    bias: Option<Tensor>,
    lora: Option<(Tensor, Tensor)>,
    scale: f32,
}

/// Σ bf16(w)·x in f32, eight lanes at a time.
fn dot_bf16_portable(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (w, x) in cw.zip(cx) {
        for i in 0..8 {
            acc[i] += f32::from_bits((w[i].to_bits() as u32) << 16) * x[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (w, x) in rw.iter().zip(rx) {
        s += w.to_f32() * x;
    }
    s
}

/// y[k] = bf16(w[k])·x (+ B[k]·(scale·A·x) from `tail`) in f32 for each row k of `w`
/// (row-major, x.len() wide), streamed from memory as `cpu::streamed_rows` streams f32 rows:
/// one call per run, each row's reads asking for the bytes `STREAM_AHEAD_BYTES` past them.
pub(crate) fn streamed_rows_bf16(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    check_run("streamed_rows_bf16", w.len(), x, y, tail);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { streamed_rows_bf16_avx2(w, x, y, tail) };
        }
    }
    streamed_rows_bf16_portable(w, x, y, tail)
}

/// [`streamed_rows_bf16`] without SIMD intrinsics (and without prefetching).
fn streamed_rows_bf16_portable(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    rows_with(w, x, y, tail, dot_bf16_portable)
}

/// Each bf16 widened in registers (zero-extend to 32 bits, shift left 16) and accumulated by
/// four 8-wide FMA chains, so the FMA latency does not bound the loop; each iteration (one
/// cache line of w) also asks for the line `STREAM_AHEAD_BYTES` past it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn streamed_rows_bf16_avx2(w: &[bf16], x: &[f32], y: &mut [f32], tail: RunTail) {
    use crate::cpu::{add_tail_row, prefetch_line, sum_lanes, STREAM_AHEAD_BYTES};
    use std::arch::x86_64::*;
    const AHEAD: usize = STREAM_AHEAD_BYTES / 2;
    let n = x.len();
    let r = tail.map_or(0, |(_, ax)| ax.len());
    let px = x.as_ptr();
    let widen = |p: *const u16| {
        // SAFETY: callers pass p with 8 readable u16s.
        let half = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
    };
    for (k, y) in y.iter_mut().enumerate() {
        // SAFETY (all loads from `row`): w holds y.len() rows of n, and i + 32 ≤ n, resp.
        // i + 8 ≤ n, keeps each load inside row k and inside x.
        let row = w.as_ptr().add(k * n) as *const u16;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            prefetch_line(row.wrapping_add(i + AHEAD));
            for (j, acc) in acc.iter_mut().enumerate() {
                let wv = widen(row.add(i + 8 * j));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i + 8 * j)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(widen(row.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let mut rest = 0.0;
        for (wj, xj) in w[k * n + i..(k + 1) * n].iter().zip(&x[i..]) {
            rest += wj.to_f32() * xj;
        }
        if let Some((b, ax)) = tail {
            rest += add_tail_row(&mut acc[1], b.as_ptr().add(k * r), ax);
        }
        *y = sum_lanes(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        )) + rest;
    }
}

impl CustomOp2 for DecodeBf16 {
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

    /// Rows of bf16 weights (with and without a B term, r a multiple of eight and not) on
    /// the SIMD and portable paths against an f64 sum, at row lengths around the unroll
    /// boundaries.
    #[test]
    fn bf16_row_paths_agree() {
        let rows = 3;
        for n in [0, 5, 8, 31, 32, 40, 77, 576, 1537] {
            let w: Vec<bf16> = (0..rows * n)
                .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 25.0))
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            for r in [0, 5, 16] {
                let b: Vec<f32> = (0..rows * r).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
                let ax: Vec<f32> = (0..r).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
                let tail = (r > 0).then_some((b.as_slice(), ax.as_slice()));
                let mut fast = vec![f32::NAN; rows];
                streamed_rows_bf16(&w, &x, &mut fast, tail);
                let mut portable = vec![f32::NAN; rows];
                streamed_rows_bf16_portable(&w, &x, &mut portable, tail);
                for k in 0..rows {
                    let exact: f64 = (0..n)
                        .map(|j| w[k * n + j].to_f64() * x[j] as f64)
                        .sum::<f64>()
                        + (0..r)
                            .map(|j| b[k * r + j] as f64 * ax[j] as f64)
                            .sum::<f64>();
                    let tol = 1e-5 * (1.0 + exact.abs()) * (n as f64).sqrt().max(1.0);
                    for (path, got) in [("streamed", fast[k]), ("portable", portable[k])] {
                        assert!(
                            (got as f64 - exact).abs() < tol,
                            "{path}: n={n} r={r} row {k}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
