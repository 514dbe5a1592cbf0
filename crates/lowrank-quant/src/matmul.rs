//! y = x·Wᵀ with W a [`Quantized4Bit`] (out × in), never dequantized whole: each task
//! dequantizes a tile of W (a few output rows, or a column strip) into a small buffer with a
//! byte → value-pair table lookup and multiplies it at once. Rayon splits the output rows
//! (forward) or the input columns (backward). The backward gives the gradient of x only
//! (the base weight is frozen): dx = dy·W.
//!
//! The inner loops (scale multiply, 8-lane dot products and axpys) are written so that LLVM
//! vectorizes them; there are no explicit intrinsics.
//!
//! With many rows (prefill, training: at least [`GEMM_MIN_ROWS`]) the forward runs on
//! [`crate::tiled`]'s engine where the CPU has AVX-512F, up to `TILED_MAX_ROWS` rows: each
//! task decodes twelve rows of W once into its own buffer and multiplies them into every row
//! of x. Otherwise (and for the backward) the weight is walked in tiles of [`GEMM_TILE_OUT`]
//! output rows: each tile is dequantized (in parallel) into one reused buffer and multiplied
//! with the packed GEMM kernels of the `gemm` crate (the ones candle's CPU matmul uses). Either
//! way a 4-bit matmul costs about what a dense one does while little of W is ever dequantized
//! at once.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::qtensor::Quantized4Bit;
use crate::sgemm::{sgemm, sgemm_xwt, sgemm_xwt_made, Mat};

/// Output rows of W dequantized per forward task.
const TILE_OUT: usize = 16;
/// Input columns of W per backward task.
const TILE_IN: usize = 256;
/// Rows of x from which the tiled GEMM path is used.
pub const GEMM_MIN_ROWS: usize = 16;
/// Output rows of W dequantized per GEMM tile.
pub const GEMM_TILE_OUT: usize = 128;

/// Dequantizes rows `o0..o0 + n` of W (out × in) into `tile` (n × in), rows in parallel.
fn dequantize_rows(
    w: &Quantized4Bit,
    lut: &crate::qtensor::PairLut,
    o0: usize,
    in_f: usize,
    tile: &mut [f32],
) {
    tile.par_chunks_mut(in_f * 8)
        .enumerate()
        .for_each(|(i, chunk)| {
            w.dequantize_range(lut, (o0 + i * 8) * in_f, chunk);
        });
}

/// y = x·Wᵀ tile by tile through gemm.
fn matmul_4bit_gemm(
    x: &[f32],
    rows: usize,
    w: &Quantized4Bit,
    out_f: usize,
    in_f: usize,
) -> Vec<f32> {
    let lut = w.pair_lut();
    let mut y = vec![0.0f32; rows * out_f];
    // Each task of the tiled engine decodes its rows of W once for every row of x (a
    // 256-token NF4 prefill, Zen 4: 485–490 → 610–667 tokens/s against the tiles below, each
    // dequantized behind a barrier and x packed again for every tile).
    let decode = |first: usize, count: usize, out: &mut [f32]| {
        w.dequantize_range(&lut, first * in_f, &mut out[..count * in_f])
    };
    if sgemm_xwt_made(rows, out_f, in_f, &mut y, out_f, x, &decode) {
        return y;
    }
    let mut tile = vec![0.0f32; GEMM_TILE_OUT.min(out_f) * in_f];
    for o0 in (0..out_f).step_by(GEMM_TILE_OUT) {
        let n = GEMM_TILE_OUT.min(out_f - o0);
        let tile = &mut tile[..n * in_f];
        dequantize_rows(w, &lut, o0, in_f, tile);
        // Columns o0..o0 + n of y (rows × out_f); the tile (n × in_f) read transposed.
        sgemm_xwt(rows, n, in_f, &mut y[o0..], out_f, x, tile);
    }
    y
}

/// dx = dy·W tile by tile through gemm (accumulating over the tiles of W's rows).
fn matmul_4bit_grad_input_gemm(
    dy: &[f32],
    rows: usize,
    w: &Quantized4Bit,
    out_f: usize,
    in_f: usize,
) -> Vec<f32> {
    let lut = w.pair_lut();
    let mut dx = vec![0.0f32; rows * in_f];
    let mut tile = vec![0.0f32; GEMM_TILE_OUT.min(out_f) * in_f];
    for o0 in (0..out_f).step_by(GEMM_TILE_OUT) {
        let n = GEMM_TILE_OUT.min(out_f - o0);
        let tile = &mut tile[..n * in_f];
        dequantize_rows(w, &lut, o0, in_f, tile);
        // Columns o0..o0 + n of dy (rows × out_f) times the tile (n × in_f, row-major).
        let dy_cols = Mat {
            data: &dy[o0..],
            rs: out_f,
            cs: 1,
        };
        sgemm(
            rows,
            in_f,
            n,
            &mut dx,
            in_f,
            dy_cols,
            Mat::rows(tile, in_f),
            1.0,
            o0 > 0,
            true,
        );
    }
    dx
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [0.0f32; L];
    let (ac, ar) = a.split_at(a.len() - a.len() % L);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(L).zip(bc.chunks_exact(L)) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// y (rows × out) = x (rows × in) · Wᵀ.
pub fn matmul_4bit(x: &[f32], rows: usize, w: &Quantized4Bit) -> Result<Vec<f32>> {
    let (out_f, in_f) = w.dims2()?;
    if x.len() != rows * in_f {
        return Err(Error::tensor(
            "x",
            format!("{} values, expected {rows} × {in_f}", x.len()),
        ));
    }
    if rows == 0 || out_f == 0 {
        return Ok(vec![0.0f32; out_f * rows]);
    }
    if rows >= GEMM_MIN_ROWS && in_f > 0 {
        return Ok(matmul_4bit_gemm(x, rows, w, out_f, in_f));
    }
    let lut = w.pair_lut();
    // yᵀ (out × rows), one chunk of TILE_OUT output rows per task.
    let mut yt = vec![0.0f32; out_f * rows];
    yt.par_chunks_mut(TILE_OUT * rows)
        .enumerate()
        .for_each(|(t, chunk)| {
            let o0 = t * TILE_OUT;
            let n_out = chunk.len() / rows;
            let mut tile = vec![0.0f32; n_out * in_f];
            w.dequantize_range(&lut, o0 * in_f, &mut tile);
            for (o, wrow) in tile.chunks_exact(in_f.max(1)).enumerate() {
                for r in 0..rows {
                    chunk[o * rows + r] = dot(&x[r * in_f..(r + 1) * in_f], wrow);
                }
            }
        });
    let mut y = vec![0.0f32; rows * out_f];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * out_f + o] = v;
        }
    }
    Ok(y)
}

/// dx (rows × in) = dy (rows × out) · W.
pub fn matmul_4bit_grad_input(dy: &[f32], rows: usize, w: &Quantized4Bit) -> Result<Vec<f32>> {
    let (out_f, in_f) = w.dims2()?;
    if dy.len() != rows * out_f {
        return Err(Error::tensor(
            "grad_y",
            format!("{} values, expected {rows} × {out_f}", dy.len()),
        ));
    }
    if rows >= GEMM_MIN_ROWS && in_f > 0 && out_f > 0 {
        return Ok(matmul_4bit_grad_input_gemm(dy, rows, w, out_f, in_f));
    }
    let lut = w.pair_lut();
    let strips: Vec<(usize, Vec<f32>)> = (0..in_f.div_ceil(TILE_IN))
        .into_par_iter()
        .map(|s| {
            let c0 = s * TILE_IN;
            let width = TILE_IN.min(in_f - c0);
            let mut acc = vec![0.0f32; rows * width];
            let mut buf = vec![0.0f32; width];
            for o in 0..out_f {
                w.dequantize_range(&lut, o * in_f + c0, &mut buf);
                for r in 0..rows {
                    let g = dy[r * out_f + o];
                    if g == 0.0 {
                        continue;
                    }
                    for (a, &b) in acc[r * width..(r + 1) * width].iter_mut().zip(&buf) {
                        *a += g * b;
                    }
                }
            }
            (c0, acc)
        })
        .collect();
    let mut dx = vec![0.0f32; rows * in_f];
    for (c0, acc) in strips {
        let width = acc.len() / rows.max(1);
        for r in 0..rows {
            dx[r * in_f + c0..r * in_f + c0 + width]
                .copy_from_slice(&acc[r * width..(r + 1) * width]);
        }
    }
    Ok(dx)
}

/// A frozen 4-bit linear weight usable in a candle graph: `forward(x)` = x·Wᵀ for x of shape
/// (..., in), differentiable with respect to x.
#[derive(Debug, Clone)]
pub struct QMatMul {
    w: Arc<Quantized4Bit>,
}

impl QMatMul {
    pub fn new(w: Arc<Quantized4Bit>) -> Result<Self> {
        w.dims2()?;
        Ok(QMatMul { w })
    }

    pub fn weight(&self) -> &Quantized4Bit {
        &self.w
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_f, in_f) = self.w.dims2()?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&in_f) {
            return Err(Error::tensor(
                "x",
                format!("shape {dims:?}, expected last dimension {in_f}"),
            ));
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x
            .reshape((rows, in_f))?
            .contiguous()?
            .apply_op1(Forward(self.w.clone()))?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dimension") = out_f;
        Ok(y.reshape(out_dims)?)
    }
}

fn f32_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{op}: expected an f32 input"),
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    let (rows, _) = layout.shape().dims2()?;
    Ok((&data[start..end], rows))
}

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// x (rows × in) ↦ x·Wᵀ.
struct Forward(Arc<Quantized4Bit>);
/// dy (rows × out) ↦ dy·W.
struct GradInput(Arc<Quantized4Bit>);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "matmul-4bit"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, rows) = f32_rows(s, l, self.name())?;
        let (out_f, _) = self.0.dims2().map_err(to_candle)?;
        let y = matmul_4bit(x, rows, &self.0).map_err(to_candle)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out_f))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(GradInput(self.0.clone()))?))
    }
}

impl CustomOp1 for GradInput {
    fn name(&self) -> &'static str {
        "matmul-4bit-grad-input"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dy, rows) = f32_rows(s, l, self.name())?;
        let (_, in_f) = self.0.dims2().map_err(to_candle)?;
        let dx = matmul_4bit_grad_input(dy, rows, &self.0).map_err(to_candle)?;
        Ok((CpuStorage::F32(dx), Shape::from((rows, in_f))))
    }

    /// Linear in dy: its own gradient is g·Wᵀ (lets second-order use work).
    fn bwd(&self, _dy: &Tensor, _dx: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1(Forward(self.0.clone()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::QuantType;
    use candle_core::{Device, Var};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rel_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "[{i}] {x} vs {y} (scale {scale})"
            );
        }
    }

    /// Shapes where blocks straddle rows (in not a multiple of the block) and odd sizes.
    const CASES: [(usize, usize, usize, usize); 8] = [
        (5, 40, 72, 64),
        (3, 33, 17, 32),
        (9, 300, 128, 128),
        (1, 64, 1, 64),
        // The GEMM paths (rows ≥ GEMM_MIN_ROWS), incl. a short last tile and odd sizes: the
        // tiled engine where the CPU has AVX-512F, then (past TILED_MAX_ROWS) the `gemm` crate.
        (16, 300, 72, 64),
        (37, 129, 45, 32),
        (64, 256, 128, 64),
        (crate::sgemm::TILED_MAX_ROWS + 3, 40, 96, 64),
    ];

    #[test]
    fn forward_matches_dequantize_then_matmul() {
        let dev = Device::Cpu;
        for (rows, out_f, in_f, bs) in CASES {
            for dq in [false, true] {
                let w = rand(out_f * in_f, 1);
                let q =
                    Quantized4Bit::quantize(&w, &[out_f, in_f], QuantType::Nf4, bs, dq).unwrap();
                let x = rand(rows * in_f, 2);
                let y = matmul_4bit(&x, rows, &q).unwrap();
                let wd = q.dequantize_tensor(&dev).unwrap();
                let xt = Tensor::from_vec(x, (rows, in_f), &dev).unwrap();
                let want = xt.matmul(&wd.t().unwrap()).unwrap().flatten_all().unwrap();
                rel_close(&y, &want.to_vec1::<f32>().unwrap(), 1e-5);
            }
        }
    }

    #[test]
    fn grad_input_matches_dequantize_then_matmul() {
        let dev = Device::Cpu;
        for (rows, out_f, in_f, bs) in CASES {
            let w = rand(out_f * in_f, 3);
            let q = Quantized4Bit::quantize(&w, &[out_f, in_f], QuantType::Fp4, bs, true).unwrap();
            let dy = rand(rows * out_f, 4);
            let dx = matmul_4bit_grad_input(&dy, rows, &q).unwrap();
            let wd = q.dequantize_tensor(&dev).unwrap();
            let dyt = Tensor::from_vec(dy, (rows, out_f), &dev).unwrap();
            let want = dyt.matmul(&wd).unwrap().flatten_all().unwrap();
            rel_close(&dx, &want.to_vec1::<f32>().unwrap(), 1e-5);
        }
    }

    #[test]
    fn candle_op_backward_and_finite_differences() {
        let dev = Device::Cpu;
        let (out_f, in_f) = (24, 96);
        let q = Arc::new(
            Quantized4Bit::quantize(
                &rand(out_f * in_f, 5),
                &[out_f, in_f],
                QuantType::Nf4,
                64,
                true,
            )
            .unwrap(),
        );
        let op = QMatMul::new(q.clone()).unwrap();
        let x0 = rand(2 * 3 * in_f, 6);
        let c = Tensor::from_vec(rand(2 * 3 * out_f, 7), (2, 3, out_f), &dev).unwrap();
        let x = Var::from_vec(x0.clone(), (2, 3, in_f), &dev).unwrap();
        let y = op.forward(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[2, 3, out_f]);
        let loss = (&y * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let gx = gx.to_vec1::<f32>().unwrap();
        // Analytic: c·W.
        let wd = q.dequantize_tensor(&dev).unwrap();
        let want = c.reshape((6, out_f)).unwrap().matmul(&wd).unwrap();
        rel_close(
            &gx,
            &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            1e-5,
        );
        // Central finite differences in f64 on a few coordinates (the loss is linear in x).
        let cv = c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let loss_at = |xv: &[f32]| -> f64 {
            let y = matmul_4bit(xv, 6, &q).unwrap();
            y.iter().zip(&cv).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        for &i in &[0usize, 17, 95, 300, 575] {
            let h = 1e-2f32;
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let fd = (loss_at(&xp) - loss_at(&xm)) / (2.0 * h as f64);
            assert!(
                (fd - gx[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                "[{i}] fd {fd} vs {}",
                gx[i]
            );
        }
        // Second order through the grad op: d/dc of sum(grad) is defined.
        let gop = Tensor::from_vec(rand(6 * out_f, 8), (6, out_f), &dev).unwrap();
        let v = Var::from_tensor(&gop).unwrap();
        let dx = v.as_tensor().apply_op1(GradInput(q.clone())).unwrap();
        let g2 = dx.sum_all().unwrap().backward().unwrap();
        let g2 = g2.get(v.as_tensor()).unwrap();
        let ones = Tensor::ones((6, in_f), candle_core::DType::F32, &dev).unwrap();
        let want2 = ones.matmul(&wd.t().unwrap()).unwrap();
        rel_close(
            &g2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            1e-5,
        );
    }

    #[test]
    fn rejects_bad_inputs() {
        let q = Arc::new(
            Quantized4Bit::quantize(&rand(64, 1), &[4, 16], QuantType::Nf4, 32, false).unwrap(),
        );
        let op = QMatMul::new(q.clone()).unwrap();
        let x = Tensor::zeros((2, 15), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(op.forward(&x).unwrap_err().to_string().contains("16"));
        let x = Tensor::zeros((2, 16), candle_core::DType::F64, &Device::Cpu).unwrap();
        assert!(op.forward(&x).is_err());
        let q1 = Quantized4Bit::quantize(&rand(64, 1), &[64], QuantType::Nf4, 32, false).unwrap();
        assert!(QMatMul::new(Arc::new(q1)).is_err());
    }
}
