//! Fused CPU ops with hand-written backward, as candle `CustomOp`s, for LoRA/DoRA training and
//! decoding of Llama-family models.
//!
//! Every op is a plain function taking and returning [`candle_core::Tensor`]s; the tensors it
//! returns record the op, so `Tensor::backward` runs the hand-written backward. Only a CPU
//! implementation (f32) exists: on other devices the ops fail with a clear error
//! ("no cuda implementation for …" from candle, or "… has only a CPU implementation" from the
//! backward passes), so CUDA versions can be added later behind the same functions.
//!
//! Conventions shared by all ops:
//! - inputs are made contiguous by the public function (a no-op when they already are);
//! - row-parallel work uses rayon; GEMMs use the `gemm` crate (as candle does on CPU);
//! - backward recomputes what is cheap (RMS statistics, attention probabilities, logits) and
//!   keeps only small per-row statistics (attention and cross-entropy log-sum-exp).

pub mod adamw;
pub mod attention;
pub mod batch;
pub mod bf16_gemm;
pub mod bf16_linear;
mod bf16_rows;
pub mod column_scale;
mod cpu;
pub mod cross_entropy;
pub mod decode_team;
mod exp;
pub mod frozen_linear;
mod gemv;
pub mod heads;
pub mod huge_pages;
pub mod lora_linear;
pub mod probe;
pub mod process;
pub mod rms_norm;
pub mod rope;
pub mod rows_attention;
mod skinny;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod test_util;

pub use attention::{causal_attention, causal_attention_cached};

pub use adamw::adamw_step;
pub use bf16_gemm::Bf16Frozen;
pub use bf16_linear::{gemv_bf16, lora_linear_decode_bf16};
pub use column_scale::scale_columns;
pub use cross_entropy::chunked_cross_entropy;
pub use decode_team::{with_helpers, DecodeTeam};
pub use frozen_linear::{frozen_linear, frozen_linear_over, FrozenMatmul};
pub use heads::{merge_heads, split_heads};
pub use huge_pages::{back_slices_with_huge_pages, back_with_huge_pages};
pub use lora_linear::{
    dora_linear, dora_linear_over, dora_row_norm, lora_linear, lora_linear_over,
};
pub use rms_norm::{rms_norm, rms_norm_rows};
pub use rope::{rope, rope_rows};
pub use rows_attention::{attend_rows, CachedRow, Heads};
pub use swiglu::{gelu_tanh_glu_values, swiglu, swiglu_values};
