//! 4-bit (NF4 / FP4) blockwise quantization, bit-exact with bitsandbytes on CPU, for QLoRA.
//!
//! - [`codebook`]: the NF4 / FP4 tables and bitsandbytes' signed 8-bit dynamic map; [`QuantSpec`],
//!   the one description of a 4-bit quantization (type, double quantization, block size).
//! - [`blockwise`]: 4-bit quantize / dequantize and double quantization of the absmax.
//! - [`qtensor`]: [`Quantized4Bit`], a frozen weight that stays packed in memory, and its
//!   bitsandbytes / transformers tensor names and `quant_state` JSON.
//! - [`matmul`]: x·Wᵀ with W 4-bit, tiles dequantized on the fly (forward and grad of x).
//! - [`planes`]: the AVX2 decoder of 32 codes at a time that the 4-bit kernels share.
//! - [`checkpoint`]: read / write pre-quantized checkpoints and `quantization_config`.
//! - [`sgemm`]: the bounds-checked f32 GEMM wrapper (shared with `lowrank-kernels`).
//! - [`tiled`]: the AVX-512 engine for x·Wᵀ-shaped products that reads W in place (f32 and
//!   bf16 pairs), behind `sgemm_xwt` and `lowrank-kernels`' bf16 GEMM.

pub mod blockwise;
pub mod checkpoint;
pub mod codebook;
pub mod error;
pub mod matmul;
pub mod planes;
pub mod qtensor;
pub mod sgemm;
#[cfg(target_arch = "x86_64")]
pub mod tiled;

pub use blockwise::{validate_block_size, DEFAULT_BLOCK_SIZE, NESTED_BLOCK_SIZE};
pub use checkpoint::{BnbCheckpoint, QuantizationConfig};
pub use codebook::{QuantSpec, QuantType};
pub use error::{Error, Result};
pub use matmul::{matmul_4bit, matmul_4bit_grad_input, QMatMul};
pub use qtensor::{AbsmaxState, Quantized4Bit};
