//! Rotary position embeddings as transformers computes them (`rotate_half` layout), with the
//! `linear` and `llama3` frequency scalings.

use candle_core::{DType, Device, Tensor, D};
use lowrank_core::Result;

use crate::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of a model; cos/sin tables are made per forward call for the
/// positions it covers, so a 128k-context model costs nothing up front.
#[derive(Debug, Clone)]
pub struct Rope {
    /// 1 × head_dim/2
    inv_freq: Tensor,
    /// The same frequencies as plain values, for the batched step's tables.
    inv_freq_values: Vec<f32>,
}

/// cos and sin for a run of positions, (seq, head_dim) each.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies θ^(-2i/d), scaled as `rope_scaling` asks.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / (config.rope_theta as f32).powf(i as f32 / dim as f32))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(config);
        let half = inv.len();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv.clone(), (1, half), device)?,
            inv_freq_values: inv,
        })
    }

    /// Tables for positions `start..start+seq`.
    pub fn tables(&self, start: usize, seq: usize) -> Result<RopeTables> {
        let positions = Tensor::arange(start as u32, (start + seq) as u32, self.inv_freq.device())?
            .to_dtype(DType::F32)?
            .reshape((seq, 1))?;
        let freqs = positions.broadcast_mul(&self.inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(RopeTables {
            cos: emb.cos()?,
            sin: emb.sin()?,
        })
    }

    /// Tables for explicit positions (batch, seq) (u32), e.g. restarting at 0 for each sequence
    /// packed into a row: cos and sin of shape (batch, 1, seq, head_dim).
    /// cos and sin (positions × head_dim, row-major) for each of `positions`, computed as
    /// [`Self::tables`] computes them (f32 position × frequency, f32 cos and sin), so both
    /// layer loops rotate by the same values.
    pub fn host_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let d = 2 * self.inv_freq_values.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * d),
            Vec::with_capacity(positions.len() * d),
        );
        for &p in positions {
            for _ in 0..2 {
                for f in &self.inv_freq_values {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }

    pub fn tables_for(&self, positions: &Tensor) -> Result<RopeTables> {
        let (batch, seq) = positions.dims2()?;
        let half = self.inv_freq.dim(1)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((batch, seq, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok(RopeTables {
            cos: emb.cos()?,
            sin: emb.sin()?,
        })
    }
}

impl RopeTables {
    /// Rotates x of shape (batch, heads, seq, head_dim): x·cos + rotate_half(x)·sin, with
    /// the fused kernel (hand-written backward to x).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(lowrank_kernels::rope(x, &self.cos, &self.sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(scaling: serde_json::Value) -> ModelConfig {
        let v = json!({"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"rope_theta":500000.0,"rope_scaling":scaling});
        ModelConfig::from_value(v, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inverse_frequencies(&config(serde_json::Value::Null));
        let scaled = inverse_frequencies(&config(json!({"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192})));
        // Highest frequency (wavelength 2π < 8192/4): unchanged.
        assert_eq!(scaled[0], plain[0]);
        // Lowest frequency (wavelength > 8192): divided by the factor.
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
        // In between: between the two.
        let mid = (0..plain.len())
            .find(|&i| {
                let w = 2.0 * std::f32::consts::PI / plain[i];
                w > 2048.0 && w < 8192.0
            })
            .unwrap();
        assert!(scaled[mid] < plain[mid] && scaled[mid] > plain[mid] / 8.0);
    }

    /// The batched step's tables are the candle tables' values, bit for bit.
    #[test]
    fn host_tables_equal_the_tensor_tables() {
        let rope = Rope::new(&config(serde_json::Value::Null), &Device::Cpu).unwrap();
        let t = rope.tables(5, 3).unwrap();
        let (cos, sin) = rope.host_tables(&[5, 6, 7]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(cos, flat(&t.cos));
        assert_eq!(sin, flat(&t.sin));
    }

    #[test]
    fn rotation_at_position_zero_is_identity_and_preserves_norm() {
        let c = config(serde_json::Value::Null);
        let rope = Rope::new(&c, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 1, 3, 64), &Device::Cpu).unwrap();
        let y = rope.tables(0, 3).unwrap().apply(&x).unwrap();
        let d0 = (x.narrow(2, 0, 1).unwrap() - y.narrow(2, 0, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d0.to_scalar::<f32>().unwrap() < 1e-7);
        let n = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((n(&x) - n(&y)).abs() < 1e-3);
    }
}
