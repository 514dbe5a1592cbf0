//! Adapter initialisation as PEFT's `LoraLayer.reset_lora_parameters`, `pissa_init`,
//! `olora_init` and `DoraLinearLayer.update_layer` do it.

use candle_core::{Device, Tensor};
use lowrank_core::linear::row_norm;
use lowrank_core::lora::LoraModule;
use lowrank_core::{Error, Result};
use rand::rngs::StdRng;
use rand::Rng;

use crate::Init;

/// A new module for a linear of weight `weight` (out × in), and for PiSSA/OLoRA the residual
/// weight W − s·BA that replaces the base weight.
pub struct Initialized {
    pub module: LoraModule,
    pub residual: Option<Tensor>,
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

pub(crate) fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    // Box–Muller.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Initialises one module of rank `rank` and scale `scale` (DoRA adds the magnitude
/// ‖W + s·BA‖ per output row, computed after any residual rewrite, as PEFT).
pub fn init_module(
    init: Init,
    weight: &Tensor,
    rank: usize,
    scale: f64,
    dora: bool,
    rng: &mut StdRng,
) -> Result<Initialized> {
    let (out_f, in_f) = weight.dims2()?;
    let device = weight.device();
    let (a, b, residual) = match init {
        Init::Kaiming => {
            // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in.
            let a = Tensor::from_vec(
                uniform(rng, rank * in_f, 1.0 / (in_f as f64).sqrt()),
                (rank, in_f),
                device,
            )?;
            (
                a,
                Tensor::zeros((out_f, rank), weight.dtype(), device)?,
                None,
            )
        }
        Init::Gaussian => {
            let a = Tensor::from_vec(
                normal(rng, rank * in_f, 1.0 / rank as f64),
                (rank, in_f),
                device,
            )?;
            (
                a,
                Tensor::zeros((out_f, rank), weight.dtype(), device)?,
                None,
            )
        }
        Init::Pissa => {
            let (a, b) = pissa(weight, rank, scale)?;
            let residual = (weight - (b.matmul(&a)? * scale)?)?;
            (a, b, Some(residual))
        }
        Init::Olora => {
            let (a, b) = olora(weight, rank)?;
            let residual = (weight - (b.matmul(&a)? * scale)?)?;
            (a, b, Some(residual))
        }
    };
    let magnitude = if dora {
        let base = residual.as_ref().unwrap_or(weight);
        Some(row_norm(base, &(b.matmul(&a)? * scale)?)?)
    } else {
        None
    };
    Ok(Initialized {
        module: LoraModule {
            a,
            b,
            magnitude,
            scale,
        },
        residual,
    })
}

fn to_rows(t: &Tensor) -> Result<(usize, usize, Vec<f64>)> {
    let (r, c) = t.dims2()?;
    let data: Vec<f64> = t
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    Ok((r, c, data))
}

fn from_rows(data: Vec<f64>, shape: (usize, usize), device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        data.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
        shape,
        device,
    )?)
}

/// PiSSA: W = V·S·Uᵀ; A = diag(√(S_r/s))·Uᵀ_r, B = V_r·diag(√(S_r/s)). (The signs of a
/// singular pair are arbitrary, as in any SVD; s·BA does not depend on them.)
pub fn pissa(weight: &Tensor, rank: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (out_f, in_f, data) = to_rows(weight)?;
    if rank > out_f.min(in_f) {
        return Err(Error::Msg(format!(
            "PiSSA: rank {rank} exceeds min(out, in) = {} of a {out_f}×{in_f} layer",
            out_f.min(in_f)
        )));
    }
    let w = nalgebra::DMatrix::from_row_slice(out_f, in_f, &data);
    let svd = w.svd(true, true);
    let (u, vt) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for Vᵀ"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = vec![0f64; rank * in_f];
    let mut b = vec![0f64; out_f * rank];
    for (k, &idx) in order.iter().take(rank).enumerate() {
        let root = (svd.singular_values[idx] / scale).sqrt();
        for j in 0..in_f {
            a[k * in_f + j] = root * vt[(idx, j)];
        }
        for i in 0..out_f {
            b[i * rank + k] = u[(i, idx)] * root;
        }
    }
    Ok((
        from_rows(a, (rank, in_f), weight.device())?,
        from_rows(b, (out_f, rank), weight.device())?,
    ))
}

/// OLoRA: W = Q·R; B = Q[:, :r], A = R[:r]. The first r columns of Q span the first r columns
/// of W (Gram–Schmidt, twice for stability) and R[:r] = Q[:, :r]ᵀ·W. Signs follow R_kk > 0 (a
/// QR's columns are unique up to sign; s·BA does not depend on them).
pub fn olora(weight: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
    let (out_f, in_f, w) = to_rows(weight)?;
    if rank > out_f.min(in_f) {
        return Err(Error::Msg(format!(
            "OLoRA: rank {rank} exceeds min(out, in) = {} of a {out_f}×{in_f} layer",
            out_f.min(in_f)
        )));
    }
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(rank);
    for k in 0..rank {
        let mut col: Vec<f64> = (0..out_f).map(|i| w[i * in_f + k]).collect();
        for _ in 0..2 {
            for prev in &q {
                let dot: f64 = prev.iter().zip(&col).map(|(a, b)| a * b).sum();
                col.iter_mut().zip(prev).for_each(|(c, p)| *c -= dot * p);
            }
        }
        let norm = col.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-12 {
            return Err(Error::Msg(
                "OLoRA: the weight's leading columns are linearly dependent".into(),
            ));
        }
        col.iter_mut().for_each(|c| *c /= norm);
        q.push(col);
    }
    let mut b = vec![0f64; out_f * rank];
    let mut a = vec![0f64; rank * in_f];
    for (k, col) in q.iter().enumerate() {
        for i in 0..out_f {
            b[i * rank + k] = col[i];
        }
        for j in 0..in_f {
            a[k * in_f + j] = (0..out_f).map(|i| col[i] * w[i * in_f + j]).sum();
        }
    }
    Ok((
        from_rows(a, (rank, in_f), weight.device())?,
        from_rows(b, (out_f, rank), weight.device())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn kaiming_and_gaussian_start_with_zero_delta() {
        let w = Tensor::randn(0f32, 1., (6, 16), &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let k = init_module(Init::Kaiming, &w, 4, 2.0, true, &mut rng).unwrap();
        assert!(k.residual.is_none() && max_abs(&k.module.b) == 0.0);
        assert!(max_abs(&k.module.a) <= 0.25 && max_abs(&k.module.a) > 0.1);
        // DoRA's magnitude starts at ‖W‖ per row.
        let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert!(max_abs(&(k.module.magnitude.unwrap() - norms).unwrap()) < 1e-5);
        let g = init_module(Init::Gaussian, &w, 4, 2.0, false, &mut rng).unwrap();
        let std = g
            .module
            .a
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 0.25).abs() < 0.08, "{std}");
    }

    #[test]
    fn pissa_and_olora_keep_the_layer_equal() {
        let w = Tensor::randn(0f32, 1., (12, 8), &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        for init in [Init::Pissa, Init::Olora] {
            let r = init_module(init, &w, 3, 0.5, false, &mut rng).unwrap();
            let rebuilt = (r.residual.unwrap() + r.module.delta_weight().unwrap()).unwrap();
            assert!(max_abs(&(rebuilt - &w).unwrap()) < 1e-4, "{init}");
        }
        // PiSSA: s·BA is the best rank-3 approximation, so the residual's norm is that of the
        // remaining singular values; OLoRA: B has orthonormal columns.
        let (_, b) = olora(&w, 3).unwrap();
        let btb = b.t().unwrap().matmul(&b).unwrap();
        assert!(
            max_abs(
                &(btb - Tensor::eye(3, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap()
            ) < 1e-5
        );
        let (a, b) = pissa(&w, 8, 1.0).unwrap();
        assert!(max_abs(&(b.matmul(&a).unwrap() - &w).unwrap()) < 1e-4);
    }
}
