//! A frozen linear layer that adapters attach to, with unmerged forward and in-place
//! merge/unmerge.
//!
//! The layer does not own adapters: the caller passes the adapters to apply on each call, so
//! one frozen base serves any number of adapters, each call choosing its own.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::lora::LoraModule;

/// An adapter applied in a forward call, with a multiplier on its ΔW (1.0 = as trained).
#[derive(Debug, Clone, Copy)]
pub struct ActiveModule<'a> {
    pub module: &'a LoraModule,
    pub weight: f64,
}

/// What a merge did, kept so that `unmerge` can undo it.
#[derive(Debug, Clone)]
enum Merged {
    /// W ← W + ΔW
    Lora { delta: Tensor },
    /// W ← f·(W + ΔW), f = m/‖W + ΔW‖ per output row.
    Dora { delta: Tensor, factor: Tensor },
}

/// y = x·Wᵀ + b, plus whatever adapters the call names.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    /// out × in, the compute dtype.
    weight: Tensor,
    bias: Option<Tensor>,
    merged: Vec<(String, Merged)>,
}

/// x·Wᵀ for x of shape (..., in).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("x has at least one dimension") = out_f;
    Ok(y.reshape(out_dims)?)
}

/// The L2 norm of each row of W + ΔW: DoRA's ‖·‖ over the input dimension, one per output.
pub fn row_norm(weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    Ok((weight + delta)?.sqr()?.sum(D::Minus1)?.sqrt()?)
}

impl AdaptedLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        AdaptedLinear {
            weight,
            bias,
            merged: Vec::new(),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out, in)
    pub fn shape(&self) -> (usize, usize) {
        self.weight.dims2().expect("linear weight is 2-D")
    }

    /// Names of the adapters merged into the weight, oldest first.
    pub fn merged_adapters(&self) -> impl Iterator<Item = &str> {
        self.merged.iter().map(|(n, _)| n.as_str())
    }

    /// Replaces the weight (e.g. with a trainable `Var`'s tensor, or PiSSA/OLoRA's residual).
    /// Merged adapters are forgotten: call this on an unmerged layer.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(Error::Msg(format!(
                "new weight has shape {:?}, the layer's is {:?}",
                weight.dims(),
                self.weight.dims()
            )));
        }
        self.weight = weight;
        self.merged.clear();
        Ok(())
    }

    /// Replaces the bias (same shape), e.g. with a trainable `Var`'s tensor.
    pub fn set_bias(&mut self, bias: Tensor) -> Result<()> {
        match &self.bias {
            Some(b) if b.dims() == bias.dims() => {
                self.bias = Some(bias);
                Ok(())
            }
            _ => Err(Error::Msg(
                "set_bias: the layer has no bias of that shape".into(),
            )),
        }
    }

    /// Training forward with LoRA dropout, as PEFT's `Linear.forward` in training mode: the
    /// adapters see `dropped` (x after dropout) while the base sees x. For DoRA PEFT recomputes
    /// the base result on the dropped input:
    /// y = W·x + b + (f − 1)·W·x_d + f·s·B(A·x_d), f = m/‖W + s·BA‖ (a constant in backward).
    /// With `dropped` = `None` this is `forward`.
    pub fn forward_dropped(
        &self,
        x: &Tensor,
        active: &[ActiveModule],
        dropped: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(xd) = dropped else {
            return self.forward(x, active);
        };
        let mut y = matmul_t(x, &self.weight)?;
        if let Some(dora) = active.iter().find(|a| a.module.magnitude.is_some()) {
            if active.len() > 1 || dora.weight != 1.0 {
                return Err(Error::Msg(
                    "a DoRA adapter cannot be stacked with other adapters".into(),
                ));
            }
            let m = dora.module;
            let magnitude = m.magnitude.as_ref().expect("checked above");
            let norm = row_norm(&self.weight, &m.delta_weight()?.detach())?.detach();
            let factor = (magnitude / norm)?;
            let base_d = matmul_t(xd, &self.weight)?;
            let extra = (base_d.broadcast_mul(&(&factor - 1.0)?)?
                + lora_path(xd, m, 1.0)?.broadcast_mul(&factor)?)?;
            y = (y + extra)?;
        } else {
            for a in active {
                y = (y + lora_path(xd, a.module, a.weight)?)?;
            }
        }
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Forward with `active` adapters applied unmerged.
    ///
    /// LoRA: y = W·x + b + Σ wᵢ·sᵢ·Bᵢ(Aᵢ·x).
    /// DoRA: y = (m/‖W + s·BA‖)·(W·x + s·B(A·x)) + b, the norm treated as a constant in
    /// backward, as the DoRA paper (§4.3) and PEFT do. A DoRA module must be the only adapter.
    pub fn forward(&self, x: &Tensor, active: &[ActiveModule]) -> Result<Tensor> {
        let mut y = matmul_t(x, &self.weight)?;
        let dora = active.iter().find(|a| a.module.magnitude.is_some());
        if let Some(dora) = dora {
            if active.len() > 1 || dora.weight != 1.0 {
                return Err(Error::Msg(
                    "a DoRA adapter cannot be stacked with other adapters or re-weighted at inference; merge it first".into(),
                ));
            }
            let m = dora.module;
            let magnitude = m.magnitude.as_ref().expect("checked above");
            let norm = row_norm(&self.weight, &m.delta_weight()?.detach())?.detach();
            let factor = (magnitude / norm)?;
            y = (y + lora_path(x, m, 1.0)?)?.broadcast_mul(&factor)?;
        } else {
            for a in active {
                y = (y + lora_path(x, a.module, a.weight)?)?;
            }
        }
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Folds an adapter into the weight (times `weight`, LoRA only) so later calls pay nothing for it.
    pub fn merge(&mut self, name: &str, module: &LoraModule, weight: f64) -> Result<()> {
        let delta = (module.delta_weight()? * weight)?;
        let merged = match &module.magnitude {
            None => {
                self.weight = (&self.weight + &delta)?;
                Merged::Lora { delta }
            }
            Some(magnitude) => {
                if weight != 1.0 {
                    return Err(Error::Msg(
                        "a DoRA adapter can only be merged with weight 1".into(),
                    ));
                }
                let factor = (magnitude / row_norm(&self.weight, &delta)?)?.unsqueeze(1)?;
                self.weight = (&self.weight + &delta)?.broadcast_mul(&factor)?;
                Merged::Dora { delta, factor }
            }
        };
        self.merged.push((name.to_string(), merged));
        Ok(())
    }

    /// Undoes the most recent merge and returns the adapter's name, or `None` if nothing is merged.
    pub fn unmerge(&mut self) -> Result<Option<String>> {
        let Some((name, merged)) = self.merged.pop() else {
            return Ok(None);
        };
        self.weight = match merged {
            Merged::Lora { delta } => (&self.weight - &delta)?,
            Merged::Dora { delta, factor } => (self.weight.broadcast_div(&factor)? - &delta)?,
        };
        Ok(Some(name))
    }
}

/// weight·s·B(A·x): two thin matmuls, never the out×in ΔW.
fn lora_path(x: &Tensor, m: &LoraModule, weight: f64) -> Result<Tensor> {
    let ax = matmul_t(x, &m.a)?;
    Ok((matmul_t(&ax, &m.b)? * (m.scale * weight))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn t(data: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    /// A 2×3 layer with a rank-1 adapter whose ΔW is easy to write by hand.
    fn layer_and_module(dora: bool) -> (AdaptedLinear, LoraModule) {
        let w = t(&[1., 0., 2., 0., 1., -1.], (2, 3));
        let bias = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
        let module = LoraModule {
            a: t(&[1., 1., 0.], (1, 3)),
            b: t(&[2., -1.], (2, 1)),
            magnitude: dora.then(|| Tensor::new(&[3f32, 1.], &Device::Cpu).unwrap()),
            scale: 0.5,
        };
        (AdaptedLinear::new(w, Some(bias)), module)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn lora_forward_matches_hand_computation() {
        let (layer, module) = layer_and_module(false);
        let x = t(&[1., 2., 3.], (1, 3));
        let y = layer
            .forward(
                &x,
                &[ActiveModule {
                    module: &module,
                    weight: 1.0,
                }],
            )
            .unwrap();
        // W·x = [7, -1]; A·x = 3; s·B·(A·x) = 0.5·[6, -3]; + bias.
        let expect = t(&[7. + 3. + 0.5, -1. - 1.5 - 0.5], (1, 2));
        assert!(max_diff(&y, &expect) < 1e-6);
    }

    #[test]
    fn dora_forward_matches_hand_computation() {
        let (layer, module) = layer_and_module(true);
        let x = t(&[1., 2., 3.], (1, 3));
        let y = layer
            .forward(
                &x,
                &[ActiveModule {
                    module: &module,
                    weight: 1.0,
                }],
            )
            .unwrap();
        // W + sBA = [[2, 1, 2], [-0.5, 0.5, -1]]; row norms 3 and √1.5.
        let n1 = 1.5f32.sqrt();
        let expect = t(
            &[(3. / 3.) * (7. + 3.) + 0.5, (1. / n1) * (-1. - 1.5) - 0.5],
            (1, 2),
        );
        assert!(max_diff(&y, &expect) < 1e-6, "{y}");
    }

    #[test]
    fn merge_equals_unmerged_and_unmerge_restores() {
        for dora in [false, true] {
            let (mut layer, module) = layer_and_module(dora);
            let original = layer.weight().clone();
            let x = Tensor::randn(0f32, 1., (4, 3), &Device::Cpu).unwrap();
            let unmerged = layer
                .forward(
                    &x,
                    &[ActiveModule {
                        module: &module,
                        weight: 1.0,
                    }],
                )
                .unwrap();
            layer.merge("a", &module, 1.0).unwrap();
            let merged = layer.forward(&x, &[]).unwrap();
            assert!(max_diff(&merged, &unmerged) < 1e-5, "dora={dora}");
            assert_eq!(layer.merged_adapters().collect::<Vec<_>>(), ["a"]);
            assert_eq!(layer.unmerge().unwrap().as_deref(), Some("a"));
            assert!(max_diff(layer.weight(), &original) < 1e-6);
            assert_eq!(layer.unmerge().unwrap(), None);
        }
    }

    #[test]
    fn stacked_adapters_add_weighted_deltas() {
        let (layer, module) = layer_and_module(false);
        let x = t(&[1., 2., 3.], (1, 3));
        let base = layer.forward(&x, &[]).unwrap();
        let one = layer
            .forward(
                &x,
                &[ActiveModule {
                    module: &module,
                    weight: 1.0,
                }],
            )
            .unwrap();
        let stacked = layer
            .forward(
                &x,
                &[
                    ActiveModule {
                        module: &module,
                        weight: 0.7,
                    },
                    ActiveModule {
                        module: &module,
                        weight: 0.3,
                    },
                ],
            )
            .unwrap();
        assert!(max_diff(&stacked, &one) < 1e-6);
        assert!(max_diff(&base, &one) > 1.0);
    }

    #[test]
    fn dora_refuses_stacking() {
        let (layer, module) = layer_and_module(true);
        let x = t(&[1., 2., 3.], (1, 3));
        let both = [
            ActiveModule {
                module: &module,
                weight: 1.0,
            },
            ActiveModule {
                module: &module,
                weight: 1.0,
            },
        ];
        assert!(layer.forward(&x, &both).is_err());
    }
}
