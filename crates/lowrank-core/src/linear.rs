//! A frozen linear layer that adapters attach to, with unmerged forward and in-place
//! merge/unmerge.
//!
//! The layer does not own adapters: the caller passes the adapters to apply on each call, so
//! one frozen base serves any number of adapters, each call choosing its own.
//!
//! The frozen base is either a dense tensor or a 4-bit (NF4/FP4) [`Quantized4Bit`] that stays
//! packed: its matmul goes through `lowrank_quant`'s fused kernel (tiles dequantized on the
//! fly, forward and gradient of the input), so adapters train over it unchanged.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use lowrank_kernels::FrozenMatmul;
use lowrank_quant::{QMatMul, QuantSpec, Quantized4Bit};

use crate::error::{Error, Result};
use crate::lora::LoraModule;

/// An adapter applied in a forward call, with a coefficient on its ΔW (1.0 = as trained).
#[derive(Debug, Clone, Copy)]
pub struct ActiveModule<'a> {
    pub module: &'a LoraModule,
    pub coefficient: f64,
}

/// The error a quantization introduced in one weight.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuantizeStats {
    pub numel: usize,
    /// Σ (w − q(w))²
    pub sq_error: f64,
    /// Σ w²
    pub sq_norm: f64,
    /// max |w − q(w)|
    pub max_abs_error: f64,
}

impl QuantizeStats {
    pub fn add(&mut self, other: &QuantizeStats) {
        self.numel += other.numel;
        self.sq_error += other.sq_error;
        self.sq_norm += other.sq_norm;
        self.max_abs_error = self.max_abs_error.max(other.max_abs_error);
    }
    /// ‖W − q(W)‖ / ‖W‖ over everything added.
    pub fn relative_error(&self) -> f64 {
        if self.sq_norm == 0.0 {
            0.0
        } else {
            (self.sq_error / self.sq_norm).sqrt()
        }
    }
    pub fn rms_error(&self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            (self.sq_error / self.numel as f64).sqrt()
        }
    }
}

/// The frozen base weight of a linear layer (out × in).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// A dense tensor in the compute dtype.
    Dense(Tensor),
    /// A 4-bit weight kept packed; never dequantized whole for the forward or backward.
    Quantized(Arc<Quantized4Bit>),
}

impl BaseWeight {
    /// (out, in)
    pub fn shape(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(w) => w.dims2().expect("linear weight is 2-D"),
            BaseWeight::Quantized(q) => q.dims2().expect("quantized linear weight is 2-D"),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, BaseWeight::Quantized(_))
    }

    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            BaseWeight::Dense(w) => Some(w),
            BaseWeight::Quantized(_) => None,
        }
    }

    pub fn as_quantized(&self) -> Option<&Arc<Quantized4Bit>> {
        match self {
            BaseWeight::Dense(_) => None,
            BaseWeight::Quantized(q) => Some(q),
        }
    }

    /// x·Wᵀ for x of shape (..., in); a 4-bit weight goes through the fused kernel
    /// (differentiable with respect to x).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // A trainable weight (full fine-tuning) needs candle's matmul and its weight
            // gradient; a frozen one goes through the kernel whose backward skips it.
            BaseWeight::Dense(w) if w.is_variable() || w.track_op() => matmul_t(x, w),
            BaseWeight::Dense(w) if w.dtype() == DType::BF16 => bf16_matmul_t(x, w),
            BaseWeight::Dense(w) => Ok(lowrank_kernels::frozen_linear(x, w)?),
            BaseWeight::Quantized(q) => Ok(QMatMul::new(q.clone())?.forward(x)?),
        }
    }

    /// The whole weight as a dense f32 tensor: a clone for a dense base, the dequantized
    /// weight for a 4-bit one (for merging, export and initialisation only).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => Ok(w.clone()),
            BaseWeight::Quantized(q) => Ok(q.dequantize_tensor(device)?),
        }
    }

    /// DoRA's ‖W + Δ‖ per output row. For a 4-bit W each row is dequantized into a small
    /// buffer in turn (one row resident at a time, never the whole weight).
    pub fn row_norm(&self, delta: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => row_norm(&w.to_dtype(delta.dtype())?, delta),
            BaseWeight::Quantized(q) => quantized_row_norm(q, delta),
        }
    }

    /// Bytes this weight holds: dense elements × dtype size, or the packed codes plus the
    /// absmax state.
    pub fn resident_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Quantized(q) => q.resident_bytes(),
        }
    }

    /// Parameters of the weight.
    pub fn numel(&self) -> usize {
        let (o, i) = self.shape();
        o * i
    }
}

/// ‖W + Δ‖ per row with W 4-bit: rows dequantized one at a time (f64 accumulation).
fn quantized_row_norm(q: &Quantized4Bit, delta: &Tensor) -> Result<Tensor> {
    let (out_f, in_f) = q.dims2()?;
    if delta.dims() != [out_f, in_f] {
        return Err(Error::Msg(format!(
            "ΔW has shape {:?}, the 4-bit base is {out_f}×{in_f}",
            delta.dims()
        )));
    }
    let d = delta
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let lut = q.pair_lut();
    let mut row = vec![0f32; in_f];
    let norms: Vec<f32> = (0..out_f)
        .map(|o| {
            q.dequantize_range(&lut, o * in_f, &mut row);
            let s: f64 = row
                .iter()
                .zip(&d[o * in_f..(o + 1) * in_f])
                .map(|(w, d)| {
                    let v = (w + d) as f64;
                    v * v
                })
                .sum();
            s.sqrt() as f32
        })
        .collect();
    Ok(Tensor::from_vec(norms, out_f, delta.device())?)
}

/// A 4-bit weight as the LoRA kernel's frozen base: its own matmul and grad-input products,
/// which dequantize a tile at a time.
struct FourBitBase(Arc<Quantized4Bit>);

impl lowrank_kernels::FrozenMatmul for FourBitBase {
    fn shape(&self) -> (usize, usize) {
        self.0.dims2().unwrap_or((0, 0))
    }

    fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        lowrank_quant::matmul_4bit(x, rows, &self.0)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn grad_input(&self, dy: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        lowrank_quant::matmul_4bit_grad_input(dy, rows, &self.0)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
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
    /// out × in: dense in the compute dtype, or 4-bit.
    base: BaseWeight,
    bias: Option<Tensor>,
    merged: Vec<(String, Merged)>,
    /// A merge over a 4-bit base dequantizes it into a dense weight; the packed original is
    /// kept so that unmerging the last adapter restores it exactly.
    quantized_before_merge: Option<Arc<Quantized4Bit>>,
    /// The base is bf16 and its matmuls take bf16 inputs (`--compute-dtype bf16` training);
    /// otherwise a bf16 base is storage only and computes in f32 (inference).
    bf16_compute: bool,
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

/// x·Wᵀ with W stored in bf16 (inference): a few rows (decoding) go through the bf16 GEMV
/// kernel, which reads W once and accumulates in f32; more rows (prefill) widen W to f32 for
/// the GEMM, whose cost dwarfs the conversion.
fn bf16_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && rows(x) <= lowrank_kernels::bf16_linear::MAX_ROWS {
        Ok(lowrank_kernels::gemv_bf16(x, w)?)
    } else {
        matmul_t(x, &w.to_dtype(x.dtype())?)
    }
}

/// Rows of x (all dimensions but the last).
fn rows(x: &Tensor) -> usize {
    x.dims().iter().rev().skip(1).product()
}

/// y·f with one factor per output feature (DoRA's m/‖W + ΔW‖): the fused parallel kernel for
/// f32 CPU tensors, candle's broadcast multiply elsewhere.
fn scale_columns(y: &Tensor, factor: &Tensor) -> Result<Tensor> {
    if y.device().is_cpu() && y.dtype() == DType::F32 && factor.dtype() == DType::F32 {
        Ok(lowrank_kernels::scale_columns(y, factor)?)
    } else {
        Ok(y.broadcast_mul(factor)?)
    }
}

/// The L2 norm of each row of W + ΔW: DoRA's ‖·‖ over the input dimension, one per output.
pub fn row_norm(weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
    Ok((weight + delta)?.sqr()?.sum(D::Minus1)?.sqrt()?)
}

impl AdaptedLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_base(BaseWeight::Dense(weight), bias)
    }

    /// A layer over a 4-bit base weight.
    pub fn new_quantized(weight: Arc<Quantized4Bit>, bias: Option<Tensor>) -> Result<Self> {
        weight.dims2()?;
        Ok(Self::with_base(BaseWeight::Quantized(weight), bias))
    }

    pub fn with_base(base: BaseWeight, bias: Option<Tensor>) -> Self {
        AdaptedLinear {
            base,
            bias,
            merged: Vec::new(),
            quantized_before_merge: None,
            bf16_compute: false,
        }
    }

    /// The base weight, dense or 4-bit.
    pub fn base(&self) -> &BaseWeight {
        &self.base
    }

    pub fn is_quantized(&self) -> bool {
        self.base.is_quantized()
    }

    /// The dense base weight; an error for a 4-bit base (use [`Self::base`]).
    pub fn weight(&self) -> Result<&Tensor> {
        self.base.as_dense().ok_or_else(|| {
            Error::Msg(
                "the base weight is 4-bit quantized; it has no dense tensor (dequantize it with base().to_dense())"
                    .into(),
            )
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out, in)
    pub fn shape(&self) -> (usize, usize) {
        self.base.shape()
    }

    /// Names of the adapters merged into the weight, oldest first.
    /// Stores a dense frozen base weight in `dtype` — bf16 for inference: half the memory and
    /// half the bytes each decoding step reads, products still accumulated in f32. A 4-bit base
    /// stays as it is; a trainable weight is an error.
    pub fn cast_base(&mut self, dtype: DType) -> Result<()> {
        if let BaseWeight::Dense(w) = &self.base {
            if w.is_variable() || w.track_op() {
                return Err(Error::Msg(
                    "a trainable base weight cannot change dtype".into(),
                ));
            }
            self.base = BaseWeight::Dense(w.to_dtype(dtype)?);
        }
        Ok(())
    }

    /// Mixed-precision training: the frozen dense base is stored in bf16 and both of its
    /// products (x·Wᵀ forward, dy·W backward) take bf16 inputs with f32 accumulation; adapters
    /// and everything else stay f32. A 4-bit or trainable base is an error.
    pub fn compute_in_bf16(&mut self) -> Result<()> {
        if self.is_quantized() {
            return Err(Error::Msg(
                "bf16 compute applies to a dense base; this one is 4-bit".into(),
            ));
        }
        self.cast_base(DType::BF16)?;
        self.bf16_compute = true;
        Ok(())
    }

    /// The bf16 base as a self-multiplying operand for the kernels, when this layer computes
    /// in bf16 on the CPU in f32 (what the bf16 GEMM takes).
    fn bf16_operand(&self, x: &Tensor) -> Result<Option<Arc<dyn FrozenMatmul>>> {
        match &self.base {
            BaseWeight::Dense(w)
                if self.bf16_compute && x.device().is_cpu() && x.dtype() == DType::F32 =>
            {
                Ok(Some(lowrank_kernels::Bf16Frozen::new(w)?))
            }
            _ => Ok(None),
        }
    }

    /// x·Wᵀ through the bf16 GEMM when the layer computes in bf16, else as the base does.
    fn base_matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self.bf16_operand(x)? {
            Some(base) => Ok(lowrank_kernels::frozen_linear_over(x, base)?),
            None => self.base.matmul_t(x),
        }
    }

    pub fn merged_adapters(&self) -> impl Iterator<Item = &str> {
        self.merged.iter().map(|(n, _)| n.as_str())
    }

    /// Replaces the weight (e.g. with a trainable `Var`'s tensor, or PiSSA/OLoRA's residual;
    /// a 4-bit base becomes dense). Merged adapters are forgotten: call this on an unmerged
    /// layer.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let (o, i) = self.shape();
        if weight.dims() != [o, i] {
            return Err(Error::Msg(format!(
                "new weight has shape {:?}, the layer's is {:?}",
                weight.dims(),
                [o, i]
            )));
        }
        self.base = BaseWeight::Dense(weight);
        self.merged.clear();
        self.quantized_before_merge = None;
        Ok(())
    }

    /// Quantizes the (dense) base weight to 4 bits and returns the error it introduced.
    /// Merged adapters stay in the weight but can no longer be unmerged. A base that is
    /// 4-bit already is left as is (zero error).
    pub fn quantize(&mut self, spec: &QuantSpec) -> Result<QuantizeStats> {
        let w = match &self.base {
            BaseWeight::Quantized(_) => return Ok(QuantizeStats::default()),
            BaseWeight::Dense(w) => w,
        };
        let q = Quantized4Bit::from_tensor(w, spec.kind, spec.block_size, spec.double_quant)?;
        let orig = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut stats = QuantizeStats {
            numel: orig.len(),
            ..Default::default()
        };
        for (a, b) in orig.iter().zip(q.dequantize()) {
            let e = (*a as f64) - (b as f64);
            stats.sq_error += e * e;
            stats.sq_norm += (*a as f64) * (*a as f64);
            stats.max_abs_error = stats.max_abs_error.max(e.abs());
        }
        self.base = BaseWeight::Quantized(Arc::new(q));
        self.merged.clear();
        self.quantized_before_merge = None;
        Ok(stats)
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
        let mut y = self.base_matmul_t(x)?;
        if let Some((m, factor)) = self.dora_factor(active)? {
            let base_d = self.base_matmul_t(xd)?;
            let extra = (scale_columns(&base_d, &(&factor - 1.0)?)?
                + scale_columns(&lora_path(xd, m, 1.0)?, &factor)?)?;
            y = (y + extra)?;
        } else {
            for a in active {
                y = (y + lora_path(xd, a.module, a.coefficient)?)?;
            }
        }
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The DoRA module among `active`, if any, with its factor m/‖W + s·BA‖ per output row
    /// (the norm a constant in backward). A DoRA module must be the only adapter.
    fn dora_factor<'a>(
        &self,
        active: &[ActiveModule<'a>],
    ) -> Result<Option<(&'a LoraModule, Tensor)>> {
        let Some(dora) = active.iter().find(|a| a.module.magnitude.is_some()) else {
            return Ok(None);
        };
        if active.len() > 1 || dora.coefficient != 1.0 {
            return Err(Error::Msg(
                "a DoRA adapter cannot be stacked with other adapters or re-weighted at inference; merge it first".into(),
            ));
        }
        let m = dora.module;
        let magnitude = m.magnitude.as_ref().expect("found by its magnitude");
        let norm = self.base.row_norm(&m.delta_weight()?.detach())?.detach();
        Ok(Some((m, (magnitude / norm)?)))
    }

    /// Forward with `active` adapters applied unmerged.
    ///
    /// LoRA: y = W·x + b + Σ wᵢ·sᵢ·Bᵢ(Aᵢ·x).
    /// DoRA: y = (m/‖W + s·BA‖)·(W·x + s·B(A·x)) + b, the norm treated as a constant in
    /// backward, as the DoRA paper (§4.3) and PEFT do. A DoRA module must be the only adapter.
    pub fn forward(&self, x: &Tensor, active: &[ActiveModule]) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x, active)? {
            return Ok(y);
        }
        let mut y = self.base_matmul_t(x)?;
        if let Some((m, factor)) = self.dora_factor(active)? {
            y = scale_columns(&(y + lora_path(x, m, 1.0)?)?, &factor)?;
        } else {
            for a in active {
                y = (y + lora_path(x, a.module, a.coefficient)?)?;
            }
        }
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The common case — one adapter over a frozen dense base — as one fused op whose backward
    /// computes only grad-x, grad-A, grad-B (and grad-m for DoRA), never W's. `None` when the
    /// case is not that one.
    fn forward_fused(&self, x: &Tensor, active: &[ActiveModule]) -> Result<Option<Tensor>> {
        if let ([one], BaseWeight::Quantized(q)) = (active, &self.base) {
            // QLoRA: the 4-bit matmul with the LoRA path fused around it (plain LoRA on the CPU).
            let m = one.module;
            if m.magnitude.is_some() || !x.device().is_cpu() || x.dtype() != DType::F32 {
                return Ok(None);
            }
            return Ok(Some(lowrank_kernels::lora_linear_over(
                x,
                Arc::new(FourBitBase(q.clone())),
                self.bias.as_ref(),
                &m.a,
                &m.b,
                m.scale * one.coefficient,
            )?));
        }
        let ([one], BaseWeight::Dense(w)) = (active, &self.base) else {
            return Ok(None);
        };
        if w.is_variable() || w.track_op() {
            return Ok(None);
        }
        let m = one.module;
        if w.dtype() == DType::BF16 {
            // Decoding over a bf16 base: the LoRA path rides along the one pass over W.
            let decode = m.magnitude.is_none()
                && x.device().is_cpu()
                && rows(x) <= lowrank_kernels::bf16_linear::MAX_ROWS;
            if let (false, Some(base)) = (decode, self.bf16_operand(x)?) {
                return Ok(match &m.magnitude {
                    None => Some(lowrank_kernels::lora_linear_over(
                        x,
                        base,
                        self.bias.as_ref(),
                        &m.a,
                        &m.b,
                        m.scale * one.coefficient,
                    )?),
                    Some(magnitude) if one.coefficient == 1.0 => {
                        Some(lowrank_kernels::dora_linear_over(
                            x,
                            base,
                            w,
                            self.bias.as_ref(),
                            &m.a,
                            &m.b,
                            magnitude,
                            m.scale,
                        )?)
                    }
                    Some(_) => None,
                });
            }
            return Ok(decode
                .then(|| {
                    lowrank_kernels::lora_linear_decode_bf16(
                        x,
                        w,
                        self.bias.as_ref(),
                        &m.a,
                        &m.b,
                        m.scale * one.coefficient,
                    )
                })
                .transpose()?);
        }
        let y = match &m.magnitude {
            None => lowrank_kernels::lora_linear(
                x,
                w,
                self.bias.as_ref(),
                &m.a,
                &m.b,
                m.scale * one.coefficient,
            )?,
            Some(magnitude) if one.coefficient == 1.0 => lowrank_kernels::dora_linear(
                x,
                w,
                self.bias.as_ref(),
                &m.a,
                &m.b,
                magnitude,
                m.scale,
            )?,
            Some(_) => return Ok(None),
        };
        Ok(Some(y))
    }

    /// Folds an adapter into the weight (times `weight`, LoRA only) so later calls pay nothing
    /// for it. Over a 4-bit base the layer's weight is dequantized into a dense one first
    /// (see [`Self::quantize`] to pack it again).
    pub fn merge(&mut self, name: &str, module: &LoraModule, coefficient: f64) -> Result<()> {
        if self
            .base
            .as_dense()
            .is_some_and(|w| w.dtype() == DType::BF16)
        {
            return Err(Error::Msg(
                "the base weight is stored in bf16 for inference; merge adapters before casting it"
                    .into(),
            ));
        }
        let delta = (module.delta_weight()? * coefficient)?;
        if let BaseWeight::Quantized(q) = &self.base {
            let q = q.clone();
            self.base = BaseWeight::Dense(q.dequantize_tensor(delta.device())?);
            self.quantized_before_merge = Some(q);
        }
        let w = self.weight()?.clone();
        let merged = match &module.magnitude {
            None => {
                self.base = BaseWeight::Dense((&w + &delta)?);
                Merged::Lora { delta }
            }
            Some(magnitude) => {
                if coefficient != 1.0 {
                    return Err(Error::Msg(
                        "a DoRA adapter can only be merged with weight 1".into(),
                    ));
                }
                let factor = (magnitude / row_norm(&w, &delta)?)?.unsqueeze(1)?;
                self.base = BaseWeight::Dense((&w + &delta)?.broadcast_mul(&factor)?);
                Merged::Dora { delta, factor }
            }
        };
        self.merged.push((name.to_string(), merged));
        Ok(())
    }

    /// Undoes the most recent merge and returns the adapter's name, or `None` if nothing is
    /// merged. Unmerging the last adapter over a 4-bit base restores the packed weight exactly.
    pub fn unmerge(&mut self) -> Result<Option<String>> {
        let Some((name, merged)) = self.merged.pop() else {
            return Ok(None);
        };
        if self.merged.is_empty() {
            if let Some(q) = self.quantized_before_merge.take() {
                self.base = BaseWeight::Quantized(q);
                return Ok(Some(name));
            }
        }
        let w = self.weight()?.clone();
        self.base = BaseWeight::Dense(match merged {
            Merged::Lora { delta } => (&w - &delta)?,
            Merged::Dora { delta, factor } => (w.broadcast_div(&factor)? - &delta)?,
        });
        Ok(Some(name))
    }
}

/// weight·s·B(A·x): two thin matmuls, never the out×in ΔW.
fn lora_path(x: &Tensor, m: &LoraModule, coefficient: f64) -> Result<Tensor> {
    let ax = matmul_t(x, &m.a)?;
    Ok((matmul_t(&ax, &m.b)? * (m.scale * coefficient))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use lowrank_quant::QuantType;

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
                    coefficient: 1.0,
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
                    coefficient: 1.0,
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
            let original = layer.weight().unwrap().clone();
            let x = Tensor::randn(0f32, 1., (4, 3), &Device::Cpu).unwrap();
            let unmerged = layer
                .forward(
                    &x,
                    &[ActiveModule {
                        module: &module,
                        coefficient: 1.0,
                    }],
                )
                .unwrap();
            layer.merge("a", &module, 1.0).unwrap();
            let merged = layer.forward(&x, &[]).unwrap();
            assert!(max_diff(&merged, &unmerged) < 1e-5, "dora={dora}");
            assert_eq!(layer.merged_adapters().collect::<Vec<_>>(), ["a"]);
            assert_eq!(layer.unmerge().unwrap().as_deref(), Some("a"));
            assert!(max_diff(layer.weight().unwrap(), &original) < 1e-6);
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
                    coefficient: 1.0,
                }],
            )
            .unwrap();
        let stacked = layer
            .forward(
                &x,
                &[
                    ActiveModule {
                        module: &module,
                        coefficient: 0.7,
                    },
                    ActiveModule {
                        module: &module,
                        coefficient: 0.3,
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
                coefficient: 1.0,
            },
            ActiveModule {
                module: &module,
                coefficient: 1.0,
            },
        ];
        assert!(layer.forward(&x, &both).is_err());
    }

    /// A 4-bit base computes what a dense base holding the dequantized weight computes
    /// (LoRA and DoRA, forward and dropout forward); merge dequantizes, unmerge restores the
    /// packed weight exactly; quantize reports its error.
    #[test]
    fn quantized_base_equals_dequantized_dense_base() {
        let dev = Device::Cpu;
        let (out_f, in_f) = (24, 80);
        let w = Tensor::randn(0f32, 0.5, (out_f, in_f), &dev).unwrap();
        let spec = QuantSpec::new(QuantType::Nf4, true, 64).unwrap();
        let mut qlayer = AdaptedLinear::new(w.clone(), None);
        let stats = qlayer.quantize(&spec).unwrap();
        assert!(qlayer.is_quantized() && qlayer.weight().is_err());
        assert_eq!(stats.numel, out_f * in_f);
        assert!(stats.relative_error() > 0.0 && stats.relative_error() < 0.2);
        let deq = qlayer.base().to_dense(&dev).unwrap();
        let dense = AdaptedLinear::new(deq.clone(), None);
        let x = Tensor::randn(0f32, 1., (2, 3, in_f), &dev).unwrap();
        let xd = Tensor::randn(0f32, 1., (2, 3, in_f), &dev).unwrap();
        for dora in [false, true] {
            let module = LoraModule {
                a: Tensor::randn(0f32, 0.3, (4, in_f), &dev).unwrap(),
                b: Tensor::randn(0f32, 0.3, (out_f, 4), &dev).unwrap(),
                magnitude: dora.then(|| Tensor::randn(1f32, 0.1, out_f, &dev).unwrap()),
                scale: 2.0,
            };
            let active = [ActiveModule {
                module: &module,
                coefficient: 1.0,
            }];
            let a = qlayer.forward(&x, &active).unwrap();
            let b = dense.forward(&x, &active).unwrap();
            assert!(max_diff(&a, &b) < 1e-4, "dora={dora}");
            let a = qlayer.forward_dropped(&x, &active, Some(&xd)).unwrap();
            let b = dense.forward_dropped(&x, &active, Some(&xd)).unwrap();
            assert!(max_diff(&a, &b) < 1e-4, "dropout dora={dora}");
            let delta = module.delta_weight().unwrap();
            let n1 = qlayer.base().row_norm(&delta).unwrap();
            let n2 = row_norm(&deq, &delta).unwrap();
            assert!(max_diff(&n1, &n2) < 1e-4);
            // Merge over the 4-bit base: dense, same function; unmerge: the packed weight back.
            let mut m = qlayer.clone();
            m.merge("a", &module, 1.0).unwrap();
            assert!(!m.is_quantized());
            let merged = m.forward(&x, &[]).unwrap();
            assert!(max_diff(&merged, &a_unmerged(&qlayer, &x, &module)) < 1e-4);
            m.unmerge().unwrap();
            assert_eq!(
                m.base().as_quantized().unwrap().as_ref(),
                qlayer.base().as_quantized().unwrap().as_ref()
            );
        }
        assert!(QuantSpec::new(QuantType::Fp4, false, 48).is_err());
    }

    fn a_unmerged(layer: &AdaptedLinear, x: &Tensor, module: &LoraModule) -> Tensor {
        layer
            .forward(
                x,
                &[ActiveModule {
                    module,
                    coefficient: 1.0,
                }],
            )
            .unwrap()
    }
}
