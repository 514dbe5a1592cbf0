//! The HTTP layer (axum): OpenAI-compatible endpoints, adapter management, health and metrics.
//! Every failure is a JSON error body with a status code; no request can panic the server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lowrank_core::lora::LoraAdapter;
use lowrank_models::generate::SamplingParams;
use lowrank_models::{Message, Tokenizer};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::*;
use crate::auth::{ApiKeys, Grant};
use crate::engine::{AdapterStack, Engine, Event, Request, SubmitError};
use crate::metrics::Metrics;
use crate::registry::{validate_id, AdapterRegistry, RegistryError};

/// The most adapters one request may stack.
const MAX_STACKED: usize = 8;

/// Request limits enforced before anything reaches the engine.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_tokens: usize,
    pub max_body_bytes: usize,
    pub max_positions: usize,
}

pub struct AppState {
    pub base_name: String,
    pub engine: Engine,
    pub registry: AdapterRegistry,
    pub tokenizer: Arc<Tokenizer>,
    pub stop_ids: Vec<u32>,
    pub keys: Option<ApiKeys>,
    pub metrics: Arc<Metrics>,
    pub limits: RequestLimits,
}

/// An error answer: status + OpenAI-style body.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.1,
                kind,
                code: self.0.as_u16(),
            },
        };
        (self.0, Json(body)).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            // The tenant's adapter files are broken: the server cannot serve this model.
            RegistryError::Broken { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, e.to_string())
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Parses a JSON body ourselves, so a malformed one gets our error shape and a precise message.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

impl AppState {
    /// The grant of the caller; `None` when the server has no keys (everything allowed).
    fn authorize(&self, headers: &HeaderMap) -> Result<Option<&Grant>, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let header = headers.get("authorization").and_then(|v| v.to_str().ok());
        keys.check(header).map(Some).ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or invalid API key (Authorization: Bearer <key>)".into(),
            )
        })
    }

    fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.authorize(headers)? {
            Some(g) if !g.is_admin() => Err(ApiError(
                StatusCode::FORBIDDEN,
                "managing adapters needs a \"*\" key".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The adapter a request asks for: `model` names an adapter, or the base with an optional
    /// `adapter` field.
    fn resolve(
        &self,
        grant: Option<&Grant>,
        model: &str,
        adapter: Option<&str>,
    ) -> Result<(String, Option<Arc<LoraAdapter>>), ApiError> {
        let id = if model == self.base_name {
            adapter
        } else {
            if adapter.is_some_and(|a| a != model) {
                return Err(ApiError::bad(format!(
                    "`model` {model:?} and `adapter` {:?} disagree",
                    adapter.unwrap_or_default()
                )));
            }
            Some(model)
        };
        let name = id.unwrap_or(&self.base_name).to_string();
        if grant.is_some_and(|g| !g.allows(&name)) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("this API key may not use {name:?}"),
            ));
        }
        match id {
            None => Ok((name, None)),
            Some(id) => {
                validate_id(id)?;
                Ok((name, Some(self.registry.get(id)?)))
            }
        }
    }

    /// The adapters a request asks for with their weights: the stack in `adapters` (over the
    /// base), or the one adapter [`Self::resolve`] finds.
    fn resolve_stack(
        &self,
        grant: Option<&Grant>,
        model: &str,
        adapter: Option<&str>,
        stack: Option<&[StackedAdapter]>,
    ) -> Result<(String, AdapterStack), ApiError> {
        let Some(stack) = stack else {
            let (name, one) = self.resolve(grant, model, adapter)?;
            return Ok((name, one.into_iter().map(|a| (a, 1.0)).collect()));
        };
        if model != self.base_name || adapter.is_some() {
            return Err(ApiError::bad(format!(
                "`adapters` stacks adapters over the base: `model` must be {:?}, without `adapter`",
                self.base_name
            )));
        }
        if stack.is_empty() || stack.len() > MAX_STACKED {
            return Err(ApiError::bad(format!(
                "`adapters` takes 1 to {MAX_STACKED} adapters"
            )));
        }
        let mut adapters = Vec::with_capacity(stack.len());
        for s in stack {
            if !s.weight.is_finite() {
                return Err(ApiError::bad(format!(
                    "`adapters`: the weight of {:?} must be a finite number",
                    s.name
                )));
            }
            match self.resolve(grant, &s.name, None)? {
                (_, Some(a)) => adapters.push((a, s.weight)),
                (_, None) => {
                    return Err(ApiError::bad(
                        "`adapters` names adapters; the base is always there",
                    ))
                }
            }
        }
        let reweighted = adapters.len() > 1 || adapters[0].1 != 1.0;
        let dora = |a: &LoraAdapter| a.modules.values().any(|m| m.magnitude.is_some());
        if let Some((a, _)) = adapters.iter().find(|(a, _)| reweighted && dora(a)) {
            let name = stack
                .iter()
                .zip(&adapters)
                .find(|(_, (b, _))| Arc::ptr_eq(a, b))
                .map_or("", |(s, _)| s.name.as_str());
            return Err(ApiError::bad(format!(
                "`adapters`: {name:?} is a DoRA adapter, which cannot be stacked with others or re-weighted"
            )));
        }
        Ok((self.base_name.clone(), adapters))
    }

    /// Checks the sampling fields and builds the engine request.
    fn build(
        &self,
        prompt: Vec<u32>,
        adapters: AdapterStack,
        s: &Sampling,
        default_max: usize,
    ) -> Result<(Request, UnboundedReceiver<Event>), ApiError> {
        let max_tokens = s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(default_max);
        if max_tokens == 0 || max_tokens > self.limits.max_tokens {
            return Err(ApiError::bad(format!(
                "max_tokens must be between 1 and {}",
                self.limits.max_tokens
            )));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad("temperature must be between 0 and 2"));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p must be in (0, 1]"));
        }
        if prompt.is_empty() {
            return Err(ApiError::bad("the prompt is empty"));
        }
        if prompt.len() + max_tokens > self.limits.max_positions {
            return Err(ApiError::bad(format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the model's {} positions",
                prompt.len(),
                self.limits.max_positions
            )));
        }
        let stop_strings = s.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop_strings.len() > 4 || stop_strings.iter().any(|x| x.is_empty()) {
            return Err(ApiError::bad("stop takes up to 4 non-empty strings"));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sampling = SamplingParams {
            temperature,
            top_k: None,
            top_p: Some(top_p),
            seed: s.seed.unwrap_or_else(now),
        };
        let req = Request {
            prompt,
            adapters,
            max_tokens,
            sampling,
            stop_ids: self.stop_ids.clone(),
            stop_strings,
            events: tx,
        };
        Ok((req, rx))
    }

    fn submit(&self, req: Request) -> Result<(), ApiError> {
        self.engine.submit(req).map_err(|e| {
            let status = match e {
                SubmitError::QueueFull => {
                    self.metrics
                        .requests_rejected
                        .fetch_add(1, Ordering::Relaxed);
                    StatusCode::TOO_MANY_REQUESTS
                }
                SubmitError::TooLarge { .. } => StatusCode::BAD_REQUEST,
                SubmitError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError(status, e.to_string())
        })
    }

    /// The response of a generation endpoint, counting client errors for /metrics.
    fn respond(&self, result: Result<Response, ApiError>) -> Response {
        result.unwrap_or_else(|e| {
            if e.0.is_client_error() {
                self.metrics
                    .requests_client_error
                    .fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        })
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let text = state.metrics.render(state.registry.stats());
    ([("content-type", "text/plain; version=0.0.4")], text)
}

async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<ModelList>, ApiError> {
    let grant = state.authorize(&headers)?;
    let created = now();
    let mut data = vec![ModelCard {
        id: state.base_name.clone(),
        object: "model",
        created,
        owned_by: "lowrank",
        parent: None,
    }];
    data.extend(state.registry.ids().into_iter().map(|id| ModelCard {
        id,
        object: "model",
        created,
        owned_by: "lowrank",
        parent: Some(state.base_name.clone()),
    }));
    data.retain(|m| grant.is_none_or(|g| g.allows(&m.id)));
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// Waits for the whole answer.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                return Ok((text, finish_reason, usage));
            }
            Event::Error(e) => return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped".into(),
    ))
}

/// Turns engine events into SSE `data:` lines, ending with `[DONE]`. A task forwards them, so
/// that a client hanging up drops the engine's channel and cancels the sequence.
fn sse_stream(
    mut rx: UnboundedReceiver<Event>,
    mut chunk: impl FnMut(Option<String>, Option<&'static str>, Option<Usage>) -> serde_json::Value
        + Send
        + 'static,
    include_usage: bool,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let events = match ev {
                Event::Text(t) => vec![chunk(Some(t), None, None).to_string()],
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let usage = Usage {
                        prompt_tokens,
                        completion_tokens,
                        total_tokens: prompt_tokens + completion_tokens,
                    };
                    let mut v = vec![chunk(None, Some(finish_reason), None).to_string()];
                    if include_usage {
                        v.push(chunk(None, None, Some(usage)).to_string());
                    }
                    v.push("[DONE]".to_string());
                    v
                }
                Event::Error(e) => {
                    let body = ErrorBody {
                        error: ErrorDetail {
                            message: e,
                            kind: "server_error",
                            code: 500,
                        },
                    };
                    vec![serde_json::to_string(&body).unwrap_or_default()]
                }
            };
            for data in events {
                if tx.send(Ok(SseEvent::default().data(data))).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let grant = state.authorize(&headers)?;
        let req: CompletionRequest = parse(&body)?;
        let prompt = match req.prompt {
            Prompt::One(p) => p,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(_) => {
                return Err(ApiError::bad(
                    "prompt must be a string or a list of exactly one string",
                ))
            }
        };
        let (model, adapters) = state.resolve_stack(
            grant,
            &req.model,
            req.adapter.as_deref(),
            req.adapters.as_deref(),
        )?;
        let ids = state
            .tokenizer
            .encode(&prompt, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let (engine_req, rx) = state.build(ids, adapters, &req.sampling, 16)?;
        state.submit(engine_req)?;
        let id = request_id("cmpl");
        let created = now();
        if req.sampling.stream {
            let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
            let chunk =
                move |text: Option<String>, finish: Option<&'static str>, usage: Option<Usage>| {
                    let choices = if usage.is_some() {
                        vec![]
                    } else {
                        vec![CompletionChoice {
                            index: 0,
                            text: text.unwrap_or_default(),
                            logprobs: None,
                            finish_reason: finish,
                        }]
                    };
                    serde_json::to_value(CompletionResponse {
                        id: id.clone(),
                        object: "text_completion",
                        created,
                        model: model.clone(),
                        choices,
                        usage,
                    })
                    .unwrap_or_default()
                };
            return Ok(sse_stream(rx, chunk, include_usage));
        }
        let (text, finish, usage) = collect(rx).await?;
        let choices = vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: Some(finish),
        }];
        Ok(Json(CompletionResponse {
            id,
            object: "text_completion",
            created,
            model,
            choices,
            usage: Some(usage),
        })
        .into_response())
    }
    .await;
    state.respond(result)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let grant = state.authorize(&headers)?;
        let req: ChatRequest = parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad("messages is empty"));
        }
        let (model, adapters) = state.resolve_stack(
            grant,
            &req.model,
            req.adapter.as_deref(),
            req.adapters.as_deref(),
        )?;
        let messages: Vec<Message> = req
            .messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let ids = state
            .tokenizer
            .encode_chat(&messages, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let (engine_req, rx) = state.build(ids, adapters, &req.sampling, 256)?;
        state.submit(engine_req)?;
        let id = request_id("chatcmpl");
        let created = now();
        if req.sampling.stream {
            let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
            let mut first = true;
            let chunk =
                move |text: Option<String>, finish: Option<&'static str>, usage: Option<Usage>| {
                    let role = std::mem::take(&mut first).then_some("assistant");
                    let choices = if usage.is_some() {
                        vec![]
                    } else {
                        vec![ChatChunkChoice {
                            index: 0,
                            delta: Delta {
                                role,
                                content: text,
                            },
                            finish_reason: finish,
                        }]
                    };
                    serde_json::to_value(ChatChunk {
                        id: id.clone(),
                        object: "chat.completion.chunk",
                        created,
                        model: model.clone(),
                        choices,
                        usage,
                    })
                    .unwrap_or_default()
                };
            return Ok(sse_stream(rx, chunk, include_usage));
        }
        let (text, finish, usage) = collect(rx).await?;
        let message = ChatMessage {
            role: "assistant".into(),
            content: text,
        };
        let choices = vec![ChatChoice {
            index: 0,
            message,
            finish_reason: Some(finish),
        }];
        Ok(Json(ChatResponse {
            id,
            object: "chat.completion",
            created,
            model,
            choices,
            usage,
        })
        .into_response())
    }
    .await;
    state.respond(result)
}

async fn load_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.require_admin(&headers)?;
    let req: LoadAdapterRequest = parse(&body)?;
    let registry_state = state.clone();
    let name = req.lora_name.clone();
    // Loading reads files: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        registry_state
            .registry
            .register(&req.lora_name, &req.lora_path)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(serde_json::json!({"status": "ok", "lora_name": name})))
}

async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.require_admin(&headers)?;
    let req: UnloadAdapterRequest = parse(&body)?;
    state.registry.unregister(&req.lora_name)?;
    Ok(Json(
        serde_json::json!({"status": "ok", "lora_name": req.lora_name}),
    ))
}

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
    pub request_timeout_s: u64,
    pub allow_any_adapter_path: bool,
    /// Serve this adapter merged into the base (single tenant, base speed).
    pub merge: Option<String>,
    pub served_model_name: Option<String>,
    /// Keep the base's linear weights and output head in bf16 (after `merge`).
    pub bf16_weights: bool,
    /// Quantize the base's linear weights to 4 bits at load (a pre-quantized checkpoint is
    /// served 4-bit without it).
    pub quantize: Option<lowrank_core::QuantSpec>,
}

/// Loads the model and builds the shared state.
pub fn build_state(opts: &ServeOptions) -> Result<Arc<AppState>, String> {
    let device = candle_core::Device::Cpu;
    let dir =
        lowrank_models::checkpoint::resolve_model_dir(&opts.model).map_err(|e| e.to_string())?;
    let load = lowrank_models::LoadOptions {
        quantize: opts.quantize,
    };
    let mut model =
        lowrank_models::Llama::load_with(&dir, &device, &load).map_err(|e| e.to_string())?;
    if model.is_quantized() {
        eprintln!("{}", model.linear_memory().summary());
    }
    let tokenizer = Arc::new(Tokenizer::load(&dir).map_err(|e| e.to_string())?);
    let stop_ids = lowrank_models::generate::stop_token_ids(&dir, &model, &tokenizer)
        .map_err(|e| e.to_string())?;
    if !opts.adapters.is_dir() {
        return Err(format!(
            "--adapters {}: not a folder",
            opts.adapters.display()
        ));
    }
    if let Some(name) = &opts.merge {
        validate_id(name).map_err(|e| e.to_string())?;
        let adapter = model
            .load_adapter(&opts.adapters.join(name))
            .map_err(|e| format!("--merge {name}: {e}"))?;
        model
            .merge_adapter(name, &adapter, 1.0)
            .map_err(|e| e.to_string())?;
    }
    if opts.bf16_weights {
        model
            .cast_for_inference(candle_core::DType::BF16)
            .map_err(|e| format!("--bf16-weights: {e}"))?;
    }
    let base_name = opts.served_model_name.clone().unwrap_or_else(|| {
        opts.merge.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or("base".into(), |n| n.to_string_lossy().into_owned())
        })
    });
    let keys = opts.api_keys.as_deref().map(ApiKeys::load).transpose()?;
    let metrics = Arc::new(Metrics::default());
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
    let registry = AdapterRegistry::new(
        &opts.adapters,
        linears,
        device,
        limits,
        opts.allow_any_adapter_path,
    )
    .map_err(|e| format!("--adapters {}: {e}", opts.adapters.display()))?;
    let max_positions = model.config().max_position_embeddings;
    let model = Arc::new(model);
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        crate::engine::EngineConfig {
            max_batch: opts.max_batch,
            max_queue: opts.max_queue,
            kv_cache_bytes: opts.kv_cache_mb * 1024 * 1024,
            prefill_chunk: 64,
            request_timeout: std::time::Duration::from_secs(opts.request_timeout_s),
        },
        metrics.clone(),
    );
    Ok(Arc::new(AppState {
        base_name,
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
        },
    }))
}

/// Binds and serves until `shutdown` resolves, then finishes running requests.
pub async fn serve(
    state: Arc<AppState>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(state, listener, shutdown).await
}

/// Serves on a bound listener (tests bind port 0 and read the port back).
pub async fn serve_on(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    let engine_state = state.clone();
    tokio::task::spawn_blocking(move || engine_state.engine.shutdown())
        .await
        .ok();
    Ok(())
}
