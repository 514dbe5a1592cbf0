//! lowrank-serve: an OpenAI-compatible server for many LoRA/DoRA adapters over one frozen base,
//! mixed in one batch (continuous batching), swapped at run time.

pub mod api;
pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod continuous_batching;
pub mod logprobs;
pub mod metrics;
pub mod registry;
pub mod render;
pub mod server;
pub mod step_tokens;
pub mod store;

pub use server::{build_state, router, serve_on, AppState, ServeOptions};

/// Gives rustls its crypto (ring) before any HTTP client is built: reqwest's rustls, used by
/// object_store (and by the load benchmark), is built without a provider of its own. Idempotent.
pub fn install_tls_provider() {
    // ring has no post-quantum key exchange (hence the deprecation); the alternative,
    // aws-lc-rs, is a large C build. Installing fails only when a provider is already there.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}
