//! lowrank-serve: an OpenAI-compatible server for many LoRA/DoRA adapters over one frozen base,
//! mixed in one batch (continuous batching), swapped at run time.

pub mod api;
pub mod auth;
pub mod bench;
pub mod engine;
pub mod logprobs;
pub mod metrics;
pub mod registry;
pub mod render;
pub mod server;

pub use server::{build_state, router, serve_on, AppState, ServeOptions};
