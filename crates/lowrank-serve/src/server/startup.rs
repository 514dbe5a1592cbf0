//! `lowrank serve`'s options and start-up: the model, the tokenizer, the adapter registry
//! (local or remote), an adapter merged in, and the engine, or why the server cannot start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lowrank_models::Tokenizer;

use super::state::{AppState, ConnectionLimits, RequestLimits};
use crate::auth::ApiKeys;
use crate::continuous_batching::Engine;
use crate::metrics::Metrics;
use crate::registry::{validate_id, AdapterRegistry};
use crate::store::{is_remote, RemoteAdapters};

/// Everything `lowrank serve` needs to start.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    pub adapters: PathBuf,
    pub host: String,
    pub port: u16,
    pub api_keys: Option<PathBuf>,
    pub max_batch: usize,
    pub max_queue: usize,
    pub max_loaded_adapters: usize,
    pub adapter_memory_mb: u64,
    pub kv_cache_mb: u64,
    pub max_tokens_limit: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub allow_any_adapter_path: bool,
    /// Object-store prefixes adapters may come from (besides a remote `adapters` root).
    pub allow_adapter_sources: Vec<String>,
    /// Where remote adapters are cached (default: the user's cache folder).
    pub adapter_cache_dir: Option<PathBuf>,
    /// The most the adapter cache holds, in MiB.
    pub adapter_cache_mb: u64,
    /// load_lora_adapter may name a Hub id as lora_path (fetched into the HF cache).
    pub allow_hub_adapters: bool,
    /// Serve this adapter merged into the base (single tenant, base speed).
    pub merge: Option<String>,
    pub served_model_name: Option<String>,
    /// Keep the base's linear weights and output head in bf16 (after `merge`).
    pub bf16_weights: bool,
    /// Round each bf16 linear's input to bf16, as PyTorch's bf16 models and llama.cpp do
    /// (needs `bf16_weights`; see `Llama::round_activations_to_bf16`).
    pub bf16_activations: bool,
    /// Quantize the base's linear weights to 4 bits at load (a pre-quantized checkpoint is
    /// served 4-bit without it).
    pub quantize: Option<lowrank_core::QuantSpec>,
}

/// Why the server cannot start; each message names the flag or the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A limit or a combination of flags the server cannot run with.
    #[error("{0}")]
    Options(String),
    /// The model, its tokenizer or the adapter to merge could not be loaded or prepared.
    #[error("{0}")]
    Model(String),
    /// A folder, store or file a flag names (the adapters, the API keys) could not be opened.
    #[error("{0}")]
    Open(String),
    /// The metrics registry refused a metric.
    #[error("metrics: {0}")]
    Metrics(String),
}

impl ServeOptions {
    /// Refuses limits that would make the server refuse everything, naming the flag.
    pub fn validate(&self) -> Result<(), StartError> {
        let zero = |is_zero: bool, flag: &str| {
            if is_zero {
                Err(StartError::Options(format!(
                    "{flag} 0 would refuse every request; give a positive value"
                )))
            } else {
                Ok(())
            }
        };
        zero(self.max_batch == 0, "--max-batch")?;
        zero(self.max_loaded_adapters == 0, "--max-loaded-adapters")?;
        zero(self.kv_cache_mb == 0, "--kv-cache-mb")?;
        zero(self.max_tokens_limit == 0, "--max-tokens-limit")?;
        zero(self.max_body_bytes == 0, "--max-body-bytes")?;
        zero(self.request_timeout.is_zero(), "--request-timeout-s")?;
        zero(self.max_connections == 0, "--max-connections")?;
        zero(self.adapter_cache_mb == 0, "--adapter-cache-mb")?;
        zero(self.header_timeout.is_zero(), "--header-timeout-s")?;
        zero(self.body_timeout.is_zero(), "--body-timeout-s")
    }
}

/// Loads the model and builds the shared state.
pub fn build_state(opts: &ServeOptions) -> Result<Arc<AppState>, StartError> {
    opts.validate()?;
    crate::install_tls_provider();
    let device = candle_core::Device::Cpu;
    let model_error = |e: lowrank_core::Error| StartError::Model(e.to_string());
    let dir = lowrank_models::checkpoint::resolve_model_dir(&opts.model).map_err(model_error)?;
    let load = lowrank_models::LoadOptions {
        quantize: opts.quantize,
    };
    let mut model = lowrank_models::Llama::load_with(&dir, &device, &load).map_err(model_error)?;
    if model.is_quantized() {
        eprintln!("{}", model.linear_memory().summary());
    }
    let tokenizer = Arc::new(Tokenizer::load(&dir).map_err(model_error)?);
    let stop_ids =
        lowrank_models::generate::stop_token_ids(&dir, &model, &tokenizer).map_err(model_error)?;
    let adapters_url = opts.adapters.to_str().filter(|s| is_remote(s));
    if adapters_url.is_none() && !opts.adapters.is_dir() {
        return Err(StartError::Options(format!(
            "--adapters {}: not a folder",
            opts.adapters.display()
        )));
    }
    if adapters_url.is_some() && opts.merge.is_some() {
        return Err(StartError::Options(
            "--merge needs a local --adapters folder".into(),
        ));
    }
    if let Some(name) = &opts.merge {
        validate_id(name).map_err(|e| StartError::Options(e.to_string()))?;
        let adapter = model
            .load_adapter(&opts.adapters.join(name))
            .map_err(|e| StartError::Model(format!("--merge {name}: {e}")))?;
        model
            .merge_adapter(name, &adapter, 1.0)
            .map_err(model_error)?;
    }
    if opts.bf16_weights {
        model
            .cast_for_inference(candle_core::DType::BF16)
            .map_err(|e| StartError::Model(format!("--bf16-weights: {e}")))?;
    }
    if opts.bf16_activations {
        model
            .round_activations_to_bf16()
            .map_err(|e| StartError::Options(format!("--bf16-activations: {e}")))?;
    }
    let base_name = opts.served_model_name.clone().unwrap_or_else(|| {
        opts.merge.clone().unwrap_or_else(|| {
            if dir.as_path() != Path::new(&opts.model) {
                // A Hub id, whose folder is a snapshot named by its commit: serve it by its id.
                return opts.model.clone();
            }
            dir.file_name()
                .map_or("base".into(), |n| n.to_string_lossy().into_owned())
        })
    });
    let keys = opts
        .api_keys
        .as_deref()
        .map(ApiKeys::load)
        .transpose()
        .map_err(StartError::Open)?;
    let limits = crate::registry::Limits {
        max_loaded: opts.max_loaded_adapters,
        max_bytes: opts.adapter_memory_mb * 1024 * 1024,
    };
    // A merged deployment serves only the merged model: no adapters on top.
    let linears = if opts.merge.is_some() {
        vec![]
    } else {
        model.linears()
    };
    let remote = |root: Option<&str>| {
        let mut allowed = opts.allow_adapter_sources.clone();
        allowed.extend(root.map(String::from));
        let dir = opts
            .adapter_cache_dir
            .clone()
            .unwrap_or_else(default_adapter_cache_dir);
        RemoteAdapters::new(allowed, &dir, opts.adapter_cache_mb * 1024 * 1024)
            .map_err(|e| StartError::Open(e.to_string()))
    };
    let registry = match adapters_url {
        Some(url) => AdapterRegistry::new_remote(
            url,
            remote(Some(url))?,
            &base_name,
            linears,
            device,
            limits,
        )
        .map_err(|e| StartError::Open(format!("--adapters {url}: {e}")))?,
        None => {
            let registry = AdapterRegistry::new(
                &opts.adapters,
                &base_name,
                linears,
                device,
                limits,
                opts.allow_any_adapter_path,
            )
            .map_err(|e| StartError::Open(format!("--adapters {}: {e}", opts.adapters.display())))?
            .with_hub_adapters(opts.allow_hub_adapters);
            if opts.allow_adapter_sources.is_empty() {
                registry
            } else {
                registry.with_remote(remote(None)?)
            }
        }
    };
    let max_positions = model.config().max_position_embeddings;
    let kv_cache_bytes = opts.kv_cache_mb * 1024 * 1024;
    let metrics = Arc::new(
        Metrics::new(crate::metrics::Protocol {
            model_name: base_name.clone(),
            // A merged deployment serves no adapter on top of the base.
            max_lora: if opts.merge.is_some() {
                0
            } else {
                opts.max_loaded_adapters.min(opts.max_batch)
            },
            kv_cache_tokens: kv_cache_bytes
                / crate::continuous_batching::kv_bytes_per_token(&model),
        })
        .map_err(|e| StartError::Metrics(e.to_string()))?,
    );
    let model = Arc::new(model);
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        crate::continuous_batching::EngineConfig {
            max_batch: opts.max_batch,
            max_queue: opts.max_queue,
            kv_cache_bytes,
            prefill_chunk: 64,
            request_timeout: opts.request_timeout,
        },
        metrics.clone(),
    );
    Ok(Arc::new(AppState {
        base_name,
        base_root: dir.display().to_string(),
        engine,
        registry,
        tokenizer,
        stop_ids,
        keys,
        metrics,
        limits: RequestLimits {
            max_tokens: opts.max_tokens_limit,
            max_body_bytes: opts.max_body_bytes,
            max_positions,
            max_choices: opts.max_batch,
        },
        connections: ConnectionLimits {
            max_connections: opts.max_connections,
            header_timeout: opts.header_timeout,
            body_timeout: opts.body_timeout,
        },
    }))
}

/// `$XDG_CACHE_HOME/lowrank/adapters`, else `~/.cache/lowrank/adapters`, else a folder in the
/// system's temporary folder.
fn default_adapter_cache_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("lowrank").join("adapters")
}
