//! lowrank-models: Llama-family model code, Hugging Face checkpoint loading (and GGUF files),
//! tokenizers and chat templates.

mod active;
pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_tokenizer;
pub mod hub;
mod kv_cache;
pub mod llama;
pub mod rope;
pub mod tokenizer;

pub use config::ModelConfig;
pub use llama::{ActiveAdapter, KvCache, LinearMemory, Llama, LoadOptions, RowStep};
pub use tokenizer::{Message, Tokenizer};
