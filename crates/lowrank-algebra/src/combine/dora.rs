//! DoRA's effective update against a base weight. A DoRA module replaces W by
//! W' = diag(m / ‖W + s·BA‖_row)·(W + s·BA) (what `lowrank merge` and PEFT's merge write), so
//! the update it makes is ΔW = W' − W: dense and in general of full rank, and only defined
//! for that base.

use lowrank_core::lora::LoraModule;
use nalgebra::DMatrix;

use crate::factored::matrix_from_tensor;
use crate::{Error, Factored, Result};

/// W' − W for the DoRA `module` over `base` (out × in); `name` is the module, for errors.
pub fn effective_update(
    name: &str,
    module: &LoraModule,
    base: &DMatrix<f64>,
) -> Result<DMatrix<f64>> {
    let magnitude = module.magnitude.as_ref().ok_or_else(|| {
        Error::Invalid(format!(
            "module {name:?}: not a DoRA module (no magnitude vector)"
        ))
    })?;
    let magnitude: Vec<f64> = matrix_from_tensor(&magnitude.unsqueeze(1)?)?
        .iter()
        .copied()
        .collect();
    let low_rank = Factored::from_module(module)?.to_dense();
    if low_rank.shape() != base.shape() || magnitude.len() != base.nrows() {
        return Err(Error::Invalid(format!(
            "module {name:?}: the DoRA adapter is {}×{} with {} magnitudes, the base weight is {}×{}",
            low_rank.nrows(),
            low_rank.ncols(),
            magnitude.len(),
            base.nrows(),
            base.ncols()
        )));
    }
    let mut adapted = base + low_rank;
    for (row, m) in magnitude.iter().enumerate() {
        let norm = adapted.row(row).norm();
        if norm == 0.0 {
            return Err(Error::Invalid(format!(
                "module {name:?}: row {row} of W + s·BA is zero, so DoRA's magnitude scale m/‖·‖ is undefined"
            )));
        }
        adapted.row_mut(row).scale_mut(m / norm);
    }
    Ok(adapted - base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn the_effective_update_rescales_each_row_to_its_magnitude() {
        // W = [[3, 0], [0, 1]], s·BA = 2·(0.5·I)·I = I, m = [2, 4]:
        // W + s·BA = [[4, 0], [0, 2]], row norms 4 and 2, so W' = [[2, 0], [0, 4]] and
        // ΔW = W' − W = [[−1, 0], [0, 3]].
        let dev = Device::Cpu;
        let module = LoraModule {
            a: Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap(),
            b: Tensor::new(&[[0.5f32, 0.], [0., 0.5]], &dev).unwrap(),
            magnitude: Some(Tensor::new(&[2f32, 4.], &dev).unwrap()),
            scale: 2.0,
        };
        let base = DMatrix::from_row_slice(2, 2, &[3.0, 0.0, 0.0, 1.0]);
        let delta = effective_update("q", &module, &base).unwrap();
        assert_eq!(delta, DMatrix::from_row_slice(2, 2, &[-1.0, 0.0, 0.0, 3.0]));

        let wrong = DMatrix::zeros(3, 2);
        let err = effective_update("q", &module, &wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"q\"") && err.contains("3×2"), "{err}");
        let plain = LoraModule {
            magnitude: None,
            ..module
        };
        assert!(effective_update("q", &plain, &base).is_err());
    }
}
