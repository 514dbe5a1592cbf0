//! `lowrank serve`: the multi-tenant OpenAI-compatible server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lowrank_serve::ServeOptions;

/// Connections served at once unless `--max-connections` says otherwise (fewer when the
/// process may not open that many files).
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept for everything but connections: the listener, model and adapter files
/// being read, standard streams.
const RESERVED_FILES: usize = 128;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3), or Hub id org/name[@revision] (from the HF cache, else downloaded into it).
    #[arg(long)]
    model: String,
    /// Folder whose sub-folders are PEFT adapters, each served under its folder name; or an
    /// object-store folder (s3://bucket/prefix, gs://…, az://…, http(s)://…) whose sub-folders
    /// are fetched on first use into --adapter-cache-dir (credentials from the environment).
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
    /// A request still running after this long ends with 504.
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// HTTP connections served at once; more wait until one closes [default: 1024, or fewer
    /// if the open-files limit (raised to its hard limit at start) cannot hold them].
    #[arg(long)]
    max_connections: Option<usize>,
    /// A client must send a request's head within this time, from connecting or from the end
    /// of its previous response: slow or idle (kept-alive) connections are closed after it.
    #[arg(long, default_value_t = 10)]
    header_timeout_s: u64,
    /// A client must send a request's body within this time once its head has arrived (408).
    #[arg(long, default_value_t = 30)]
    body_timeout_s: u64,
    /// Let load_lora_adapter read folders outside --adapters.
    #[arg(long)]
    allow_any_adapter_path: bool,
    /// Let load_lora_adapter's lora_path name an object-store folder under this prefix (e.g.
    /// s3://bucket/adapters, https://host/adapters). Repeatable; others are refused.
    #[arg(long = "allow-adapter-source", value_name = "PREFIX")]
    allow_adapter_sources: Vec<String>,
    /// Where adapters from object storage are cached [default: $XDG_CACHE_HOME/lowrank/adapters,
    /// else ~/.cache/lowrank/adapters].
    #[arg(long)]
    adapter_cache_dir: Option<PathBuf>,
    /// The most the adapter cache holds on disk, in MiB; least recently used adapters are removed.
    #[arg(long, default_value_t = 4096)]
    adapter_cache_mb: u64,
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
    /// bytes read per decoded token; products still accumulate in f32; with
    /// --quantize, the embedding/output head (the decoder layers stay 4-bit).
    #[arg(long)]
    bf16_weights: bool,
    /// Round the input of every bf16 linear to bf16, as PyTorch's bf16 models and llama.cpp's
    /// bf16 matmul do (products exact, sums in f32): prefill runs on AVX512-BF16 dot products
    /// where the CPU has them. Needs --bf16-weights.
    #[arg(long, requires = "bf16_weights")]
    bf16_activations: bool,
    #[command(flatten)]
    quant: super::QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))?;
    let max_connections = connection_limit(args.max_connections)?;
    let opts = ServeOptions {
        model: args.model,
        adapters: args.adapters,
        host: args.host,
        port: args.port,
        api_keys: args.api_keys,
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_loaded_adapters: args.max_loaded_adapters,
        adapter_memory_mb: args.adapter_memory_mb,
        kv_cache_mb: args.kv_cache_mb,
        max_tokens_limit: args.max_tokens_limit,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout_s),
        max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_s),
        body_timeout: Duration::from_secs(args.body_timeout_s),
        allow_any_adapter_path: args.allow_any_adapter_path,
        allow_adapter_sources: args.allow_adapter_sources,
        adapter_cache_dir: args.adapter_cache_dir,
        adapter_cache_mb: args.adapter_cache_mb,
        allow_hub_adapters: args.allow_hub_adapters,
        merge: args.merge,
        served_model_name: args.served_model_name,
        bf16_weights: args.bf16_weights,
        bf16_activations: args.bf16_activations,
        quantize: args.quant.spec()?,
    };
    opts.validate()?;
    // Bound before the model loads, so a taken port fails at once.
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("--host {} --port {}: cannot listen", opts.host, opts.port))?;
    let state = lowrank_serve::build_state(&opts)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        eprintln!(
            "serving {} on http://{} (adapters from {})",
            state.base_name,
            listener.local_addr()?,
            opts.adapters.display()
        );
        lowrank_serve::serve_on(state, listener, shutdown_signal()).await
    })?;
    Ok(())
}

/// `--max-connections`, checked against the open-files limit after raising it.
fn connection_limit(asked: Option<usize>) -> Result<usize> {
    let Some(files) = raise_open_files_limit() else {
        return Ok(asked.unwrap_or(DEFAULT_MAX_CONNECTIONS));
    };
    let room = files.saturating_sub(RESERVED_FILES);
    match asked {
        Some(n) if n > room => bail!(
            "--max-connections {n}: this process may open only {files} files (ulimit -n, hard \
             limit included), which leaves room for {room} connections"
        ),
        Some(n) => Ok(n),
        None if room == 0 => bail!(
            "this process may open only {files} files (ulimit -n): too few to serve connections"
        ),
        None => Ok(DEFAULT_MAX_CONNECTIONS.min(room)),
    }
}

/// Raises the soft limit on open files to the hard limit, as servers do: each connection is
/// a file descriptor, and the soft limit is often a small default (1024). Returns the limit in
/// force, if the platform has one.
#[cfg(unix)]
fn raise_open_files_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into memory we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct. It may refuse (macOS caps the soft limit
        // below an unlimited hard one); then the old limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(not(unix))]
fn raise_open_files_limit() -> Option<usize> {
    None
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
