//! `lowrank serve`: the multi-tenant OpenAI-compatible server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use lowrank_serve::ServeOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// Folder whose sub-folders are PEFT adapters, each served under its folder name.
    #[arg(long)]
    adapters: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// JSON or TOML file: API key → list of allowed model ids, or "*".
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests that may wait for a slot; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    #[arg(long, default_value_t = 64)]
    max_loaded_adapters: usize,
    #[arg(long, default_value_t = 1024)]
    adapter_memory_mb: u64,
    #[arg(long, default_value_t = 2048)]
    kv_cache_mb: u64,
    /// Upper bound on a request's max_tokens.
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// Let load_lora_adapter read folders outside --adapters.
    #[arg(long)]
    allow_any_adapter_path: bool,
    /// Let load_lora_adapter take a Hub id (org/name[@revision]) as lora_path: found in the HF
    /// cache or downloaded into it (as vLLM's Hub resolver). Off by default.
    #[arg(long)]
    allow_hub_adapters: bool,
    /// Serve this adapter (a folder under --adapters) merged into the base: one tenant at base speed.
    #[arg(long)]
    merge: Option<String>,
    /// The base's model id in the API (default: the model folder's name, or the merged adapter's).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Keep the base's linear weights and output head in bf16: half the memory and half the
    /// bytes read per decoded token; products still accumulate in f32.
    #[arg(long)]
    bf16_weights: bool,
    #[command(flatten)]
    quant: super::QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))?;
    let opts = ServeOptions {
        model: args.model,
        adapters: args.adapters,
        host: args.host,
        port: args.port,
        api_keys: args.api_keys,
        max_batch: args.max_batch.max(1),
        max_queue: args.max_queue,
        max_loaded_adapters: args.max_loaded_adapters.max(1),
        adapter_memory_mb: args.adapter_memory_mb,
        kv_cache_mb: args.kv_cache_mb,
        max_tokens_limit: args.max_tokens_limit,
        max_body_bytes: args.max_body_bytes,
        request_timeout_s: args.request_timeout_s,
        allow_any_adapter_path: args.allow_any_adapter_path,
        allow_hub_adapters: args.allow_hub_adapters,
        merge: args.merge,
        served_model_name: args.served_model_name,
        bf16_weights: args.bf16_weights,
        quantize: args.quant.spec()?,
    };
    let state = lowrank_serve::build_state(&opts).map_err(|e| anyhow!(e))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        eprintln!(
            "serving {} on http://{addr} (adapters from {})",
            state.base_name,
            opts.adapters.display()
        );
        lowrank_serve::serve(state, addr, shutdown_signal()).await
    })?;
    Ok(())
}

/// Ctrl-C or SIGTERM: stop accepting, finish running requests, exit.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("shutting down: finishing running requests");
}
