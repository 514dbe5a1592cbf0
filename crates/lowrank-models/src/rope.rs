//! Rotary position embeddings as transformers computes them (`rotate_half` layout), with the
//! `linear`, `llama3` and `longrope` frequency scalings and partial rotary (the leading
//! `rotary_dim` of each head rotated, the rest passed through).

use candle_core::{DType, Device, Tensor, D};
use lowrank_core::Result;

use crate::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of a model; cos/sin tables are made per forward call for the
/// positions it covers, so a 128k-context model costs nothing up front.
#[derive(Debug, Clone)]
pub struct Rope {
    /// 1 × rotary_dim/2
    inv_freq: Tensor,
    /// The same frequencies as plain values, for the batched step's tables.
    inv_freq_values: Vec<f32>,
    /// LongRoPE: the frequencies of a forward whose positions reach past the first value, as
    /// transformers' `longrope_frequency_update` switches them (per forward, by its largest
    /// position).
    long: Option<(usize, Tensor, Vec<f32>)>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f32,
}

/// cos and sin for a run of positions, (seq, head_dim) each.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// θ^(2i/d) for the rotary dimensions d, in f32 as torch computes `base ** (arange / d)`.
fn wavelength_terms(config: &ModelConfig) -> Vec<f32> {
    let dim = config.rotary_dim;
    (0..dim)
        .step_by(2)
        .map(|i| (config.rope_theta as f32).powf(i as f32 / dim as f32))
        .collect()
}

/// LongRoPE's frequencies 1 / (factor_i · θ^(2i/d)) for one list of factors.
fn longrope_frequencies(config: &ModelConfig, factors: &[f64]) -> Vec<f32> {
    wavelength_terms(config)
        .iter()
        .zip(factors)
        .map(|(t, &f)| 1.0 / (f as f32 * t))
        .collect()
}

/// The inverse frequencies θ^(-2i/d), scaled as `rope_scaling` asks (LongRoPE: the short
/// factors').
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let base: Vec<f32> = wavelength_terms(config).iter().map(|t| 1.0 / t).collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::LongRope { short_factor, .. } => longrope_frequencies(config, short_factor),
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        &RopeScaling::Llama3 {
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

/// A model's rotary embeddings: one for every layer, or (Gemma 3) a second one with its own
/// base for the sliding-window layers.
#[derive(Debug, Clone)]
pub struct Ropes {
    global: Rope,
    local: Option<Rope>,
}

/// Tables of one forward for every layer: the global ones and the sliding-window layers' own.
#[derive(Debug, Clone)]
pub struct LayerTables<T> {
    global: T,
    local: Option<T>,
}

impl LayerTables<(Vec<f32>, Vec<f32>)> {
    /// Appends another run of positions' tables (the next row of a step).
    pub fn extend(&mut self, next: Self) {
        let append = |to: &mut (Vec<f32>, Vec<f32>), from: (Vec<f32>, Vec<f32>)| {
            to.0.extend(from.0);
            to.1.extend(from.1);
        };
        append(&mut self.global, next.global);
        if let (Some(to), Some(from)) = (&mut self.local, next.local) {
            append(to, from);
        }
    }
}

impl<T> LayerTables<T> {
    /// The tables of a layer, sliding-window or not.
    pub fn of(&self, sliding: bool) -> &T {
        match &self.local {
            Some(local) if sliding => local,
            _ => &self.global,
        }
    }
}

impl Ropes {
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let local = match &config.local_rope {
            Some(local) => {
                let mut c = config.clone();
                c.rope_theta = local.theta;
                c.rope_scaling = local.scaling.clone();
                Some(Rope::new(&c, device)?)
            }
            None => None,
        };
        Ok(Ropes {
            global: Rope::new(config, device)?,
            local,
        })
    }

    fn each<T>(&self, f: impl Fn(&Rope) -> Result<T>) -> Result<LayerTables<T>> {
        Ok(LayerTables {
            global: f(&self.global)?,
            local: self.local.as_ref().map(&f).transpose()?,
        })
    }

    /// See [`Rope::tables`].
    pub fn tables(&self, start: usize, seq: usize) -> Result<LayerTables<RopeTables>> {
        self.each(|r| r.tables(start, seq))
    }

    /// See [`Rope::tables_for`].
    pub fn tables_for(&self, positions: &Tensor) -> Result<LayerTables<RopeTables>> {
        self.each(|r| r.tables_for(positions))
    }

    /// See [`Rope::host_tables`].
    pub fn host_tables(&self, positions: &[usize]) -> LayerTables<(Vec<f32>, Vec<f32>)> {
        LayerTables {
            global: self.global.host_tables(positions),
            local: self.local.as_ref().map(|r| r.host_tables(positions)),
        }
    }

    /// See [`Rope::long_threshold`].
    pub fn long_threshold(&self) -> Option<usize> {
        self.global.long_threshold()
    }
}

impl Rope {
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(config);
        let half = inv.len();
        let (long, attention_factor) = match &config.rope_scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                let long = longrope_frequencies(config, long_factor);
                (
                    Some((
                        *original_max_position_embeddings,
                        Tensor::from_vec(long.clone(), (1, half), device)?,
                        long,
                    )),
                    *attention_factor as f32,
                )
            }
            _ => (None, 1.0),
        };
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv.clone(), (1, half), device)?,
            inv_freq_values: inv,
            long,
            attention_factor,
        })
    }

    /// LongRoPE's `original_max_position_embeddings`, where the frequencies switch.
    pub fn long_threshold(&self) -> Option<usize> {
        self.long.as_ref().map(|(original, _, _)| *original)
    }

    /// The frequencies of a forward whose largest position is `max_position`.
    fn frequencies(&self, max_position: usize) -> (&Tensor, &[f32]) {
        match &self.long {
            Some((original, tensor, values)) if max_position + 1 > *original => (tensor, values),
            _ => (&self.inv_freq, &self.inv_freq_values),
        }
    }

    /// cos and sin of the angles, times the attention factor.
    fn tables_of(&self, angles: &Tensor) -> Result<RopeTables> {
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        if self.attention_factor == 1.0 {
            return Ok(RopeTables { cos, sin });
        }
        let f = self.attention_factor as f64;
        Ok(RopeTables {
            cos: (cos * f)?,
            sin: (sin * f)?,
        })
    }

    /// Tables for positions `start..start+seq`.
    pub fn tables(&self, start: usize, seq: usize) -> Result<RopeTables> {
        let (inv_freq, _) = self.frequencies(start + seq - 1);
        let positions = Tensor::arange(start as u32, (start + seq) as u32, inv_freq.device())?
            .to_dtype(DType::F32)?
            .reshape((seq, 1))?;
        let freqs = positions.broadcast_mul(inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        self.tables_of(&emb)
    }

    /// cos and sin (positions × rotary_dim, row-major) for each of `positions` (one sequence's:
    /// LongRoPE picks its frequencies by the largest), computed as [`Self::tables`] computes
    /// them (f32 position × frequency, f32 cos and sin), so both layer loops rotate by the
    /// same values.
    pub fn host_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (_, inv_freq) = self.frequencies(positions.iter().copied().max().unwrap_or(0));
        let factor = self.attention_factor;
        let d = 2 * inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * d),
            Vec::with_capacity(positions.len() * d),
        );
        for &p in positions {
            for _ in 0..2 {
                for f in inv_freq {
                    let angle = p as f32 * f;
                    if factor == 1.0 {
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    } else {
                        cos.push(angle.cos() * factor);
                        sin.push(angle.sin() * factor);
                    }
                }
            }
        }
        (cos, sin)
    }

    /// Tables for explicit positions (batch, seq) (u32), e.g. restarting at 0 for each sequence
    /// packed into a row: cos and sin of shape (batch, 1, seq, rotary_dim).
    pub fn tables_for(&self, positions: &Tensor) -> Result<RopeTables> {
        let (batch, seq) = positions.dims2()?;
        let max = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        let (inv_freq, _) = self.frequencies(max);
        let half = inv_freq.dim(1)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((batch, seq, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq.reshape((1, 1, half))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        self.tables_of(&emb)
    }
}

impl RopeTables {
    /// Rotates x of shape (batch, heads, seq, head_dim): x·cos + rotate_half(x)·sin over the
    /// leading rotary dimensions (the tables' width), with the fused kernel (hand-written
    /// backward to x); the rest of each head passes through.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (head_dim, rotary) = (x.dim(D::Minus1)?, self.cos.dim(D::Minus1)?);
        if rotary == head_dim {
            return Ok(lowrank_kernels::rope(x, &self.cos, &self.sin)?);
        }
        let rotated =
            lowrank_kernels::rope(&x.narrow(D::Minus1, 0, rotary)?, &self.cos, &self.sin)?;
        let passed = x.narrow(D::Minus1, rotary, head_dim - rotary)?;
        Ok(Tensor::cat(&[&rotated, &passed], D::Minus1)?)
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
