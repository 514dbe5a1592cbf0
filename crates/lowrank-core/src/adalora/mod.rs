//! AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"), mirroring PEFT's `tuners/adalora`: ΔW = P·Λ·Q scaled by α/(ranknum + 1e-5),
//! an importance-driven [`RankAllocator`] that masks singular values down to a budget, the
//! orthogonality regularizer, and PEFT's `adapter_config.json` / safetensors layout.
//!
//! For inference an AdaLoRA adapter becomes an ordinary [`crate::lora::LoraAdapter`]
//! ([`AdaloraAdapter::to_lora`]), so every LoRA code path (eval, generate, merge, serve)
//! applies it unchanged.

mod allocator;
mod config;
mod weights;

pub use allocator::{orth_regularizer, Allocation, BudgetSchedule, ModuleGrads, RankAllocator};
pub use config::{rank_pattern_key, AdaloraConfig, AdaloraConfigFile, AdaloraSchedule};
pub use weights::{is_adalora_dir, AdaloraAdapter, AdaloraModule};
