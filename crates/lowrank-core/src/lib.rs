//! lowrank-core: the adapter math (LoRA, DoRA), adapter configs and files in HF PEFT's format,
//! and the adapted linear layer they attach to.

pub mod adalora;
mod adapter_tensors;
pub mod error;
pub mod files;
pub mod finite;
pub mod linear;
pub mod lora;
mod peft_config;
pub mod targets;

pub use error::{Error, Result};
pub use linear::{ActiveModule, AdaptedLinear, BaseWeight, QuantizeStats};
/// The 4-bit quantization a base is loaded with; defined in `lowrank-quant`.
pub use lowrank_quant::QuantSpec;
