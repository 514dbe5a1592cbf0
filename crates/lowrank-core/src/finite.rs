//! Loaded weights must be finite: one NaN or ±inf in a model or adapter tensor turns every
//! loss, logit and merged weight downstream into NaN without any error. Readers check each
//! tensor once as they load it (a pass over memory already being read) and name the file and
//! the tensor.

use std::path::Path;

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::error::{Error, Result};

/// How many elements of `t` are NaN or ±inf (0 for integer dtypes).
pub fn count_non_finite(t: &Tensor) -> Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            let count = match cpu {
                CpuStorage::F32(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
                CpuStorage::F64(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
                CpuStorage::BF16(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
                CpuStorage::F16(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
                _ => return count_by_copy(t),
            };
            return Ok(count);
        }
    }
    count_by_copy(t)
}

/// Other devices, layouts and float formats: through an f32 copy.
fn count_by_copy(t: &Tensor) -> Result<usize> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(values.iter().filter(|x| !x.is_finite()).count())
}

/// An error naming `file` and tensor `name` when `t` holds a NaN or an infinity.
pub fn ensure_finite(file: &Path, name: &str, t: &Tensor) -> Result<()> {
    match count_non_finite(t)? {
        0 => Ok(()),
        n => Err(Error::tensors(
            file,
            format!(
                "tensor {name:?} holds {n} non-finite value(s) (NaN or ±inf) of {}",
                t.elem_count()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn counts_nan_and_infinities_in_every_float_dtype_and_view() {
        let t = Tensor::new(
            &[1f32, f32::NAN, 2.0, f32::INFINITY, -f32::INFINITY],
            &Device::Cpu,
        )
        .unwrap();
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            assert_eq!(count_non_finite(&t.to_dtype(dtype).unwrap()).unwrap(), 3);
        }
        assert_eq!(count_non_finite(&t.narrow(0, 0, 1).unwrap()).unwrap(), 0);
        let m = Tensor::new(&[[1f32, f32::NAN], [2.0, 3.0]], &Device::Cpu).unwrap();
        assert_eq!(count_non_finite(&m.t().unwrap()).unwrap(), 1);
        let err = ensure_finite(Path::new("w.safetensors"), "x", &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("\"x\"") && err.contains("3 non-finite"),
            "{err}"
        );
        // A value f32 cannot hold is infinite once converted.
        let big = Tensor::new(&[1e300f64], &Device::Cpu).unwrap();
        assert_eq!(
            count_non_finite(&big.to_dtype(DType::F32).unwrap()).unwrap(),
            1
        );
    }
}
