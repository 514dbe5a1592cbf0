//! The HTTP layer (axum): OpenAI-compatible endpoints, adapter management, health and metrics.
//! Every failure is a JSON error body with a status code; no request can panic the server.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use lowrank_models::generate::SamplingParams;
use lowrank_models::{Message, Tokenizer};
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;

use crate::api::*;
use crate::auth::{ApiKeys, Grant};
use crate::continuous_batching::{Engine, EngineError, Request, SubmitError};
use crate::metrics::Metrics;
use crate::registry::{validate_id, AdapterLease, AdapterRegistry, RegistryError};
use crate::render::{self, ChunkHeader, CompletionRender, Echo, Events, StreamRender};
use crate::store::{is_remote, RemoteAdapters};

/// The most adapters one request may stack.
const MAX_STACKED: usize = 8;

/// Request limits enforced before anything reaches the engine.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_tokens: usize,
    pub max_body_bytes: usize,
    pub max_positions: usize,
    /// The most choices (`n`) one request may ask for: the batch size.
    pub max_choices: usize,
}

/// What a client may hold of the server's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time to send a request's head, from the connection's start or, on a kept-alive
    /// connection, from the previous response's end (so also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Time to send a request's body once its head has arrived.
    pub body_timeout: Duration,
}

pub struct AppState {
    pub base_name: String,
    /// Where the base model was loaded from (`root` in /v1/models).
    pub base_root: String,
    pub engine: Engine,
    pub registry: AdapterRegistry,
    pub tokenizer: Arc<Tokenizer>,
    pub stop_ids: Vec<u32>,
    pub keys: Option<ApiKeys>,
    pub metrics: Arc<Metrics>,
    pub limits: RequestLimits,
    pub connections: ConnectionLimits,
}

/// An error answer: status + OpenAI-style body.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError(render::engine_error_status(&e), e.to_string())
    }
}

/// Seconds a client told "at capacity" should wait before trying again.
const RETRY_AFTER_S: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(ErrorBody::new(self.0, self.1))).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        response
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
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generation::<CompletionRequest>))
        .route("/v1/chat/completions", post(generation::<ChatRequest>))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
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

    /// The adapter a request asks for: `model` names an adapter, or the base (or is absent)
    /// with an optional `adapter` field.
    fn resolve(
        &self,
        grant: Option<&Grant>,
        model: Option<&str>,
        adapter: Option<&str>,
    ) -> Result<(String, Option<AdapterLease>), ApiError> {
        let id = match model {
            None => adapter,
            Some(model) if model == self.base_name => adapter,
            Some(model) => {
                if adapter.is_some_and(|a| a != model) {
                    return Err(ApiError::bad(format!(
                        "`model` {model:?} and `adapter` {:?} disagree",
                        adapter.unwrap_or_default()
                    )));
                }
                Some(model)
            }
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
        model: Option<&str>,
        adapter: Option<&str>,
        stack: Option<&[StackedAdapter]>,
    ) -> Result<(String, Vec<(AdapterLease, f64)>), ApiError> {
        let Some(stack) = stack else {
            let (name, one) = self.resolve(grant, model, adapter)?;
            return Ok((name, one.into_iter().map(|a| (a, 1.0)).collect()));
        };
        if model.is_some_and(|m| m != self.base_name) || adapter.is_some() {
            return Err(ApiError::bad(format!(
                "`adapters` stacks adapters over the base: `model` must be {:?} or absent, without `adapter`",
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
            match self.resolve(grant, Some(&s.name), None)? {
                (_, Some(a)) => adapters.push((a, s.weight)),
                (_, None) => {
                    return Err(ApiError::bad(
                        "`adapters` names adapters; the base is always there",
                    ))
                }
            }
        }
        let reweighted = adapters.len() > 1 || adapters[0].1 != 1.0;
        let dora = |a: &AdapterLease| a.adapter().modules.values().any(|m| m.magnitude.is_some());
        if let Some((s, _)) = stack
            .iter()
            .zip(&adapters)
            .find(|(_, (a, _))| reweighted && dora(a))
        {
            let name = &s.name;
            return Err(ApiError::bad(format!(
                "`adapters`: {name:?} is a DoRA adapter, which cannot be stacked with others or re-weighted"
            )));
        }
        Ok((self.base_name.clone(), adapters))
    }

    /// [`Self::resolve_stack`] on a blocking thread: an adapter used for the first time is
    /// read from disk, or fetched from object storage.
    async fn lookup(
        self: &Arc<Self>,
        grant: Option<&Grant>,
        model: Option<&str>,
        adapter: Option<&str>,
        stack: Option<&[StackedAdapter]>,
    ) -> Result<(String, Vec<(AdapterLease, f64)>), ApiError> {
        let state = self.clone();
        let grant = grant.cloned();
        let model = model.map(String::from);
        let adapter = adapter.map(String::from);
        let stack = stack.map(<[_]>::to_vec);
        tokio::task::spawn_blocking(move || {
            state.resolve_stack(
                grant.as_ref(),
                model.as_deref(),
                adapter.as_deref(),
                stack.as_deref(),
            )
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    /// Reads a request body within the size limit and the body timeout.
    async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.limits.max_body_bytes;
        let read = async {
            let mut data = body.into_data_stream();
            let mut bytes = Vec::new();
            while let Some(chunk) = data.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
                if bytes.len() + chunk.len() > limit {
                    return Err(ApiError(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)"
                        ),
                    ));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(bytes))
        };
        let timeout = self.connections.body_timeout;
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s (--body-timeout-s)",
                        timeout.as_secs_f64()
                    ),
                ))
            })
    }

    /// Checks a generation request and submits its choices to the engine.
    fn start(&self, g: Generation) -> Result<Events, ApiError> {
        let s = g.sampling;
        let n = s.n.unwrap_or(1);
        if n == 0 || n > self.limits.max_choices {
            return Err(ApiError::bad(format!(
                "n must be between 1 and {} (the server's --max-batch)",
                self.limits.max_choices
            )));
        }
        let max_tokens = s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(g.default_max_tokens);
        // Only an echo may ask for no new tokens: it scores the prompt.
        let min_tokens = usize::from(!g.echo);
        if max_tokens < min_tokens || max_tokens > self.limits.max_tokens {
            return Err(ApiError::bad(format!(
                "max_tokens must be between {min_tokens} and {}",
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
        let top_k = match s.top_k {
            None | Some(0) | Some(-1) => None,
            Some(k) => Some(usize::try_from(k).map_err(|_| {
                ApiError::bad("top_k must be a positive number of tokens, or 0 or -1 for all")
            })?),
        };
        let prompt = g.prompt;
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
        let seed = s.seed.unwrap_or_else(now);
        let requests = (0..n)
            .map(|choice| Request {
                prompt: prompt.clone(),
                adapters: g.adapters.clone(),
                max_tokens,
                // Each choice its own draw, as vLLM seeds them (seed + index).
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p: Some(top_p),
                    seed: seed.wrapping_add(choice as u64),
                },
                stop_ids: self.stop_ids.clone(),
                stop_strings: stop_strings.clone(),
                logprobs: g.logprobs,
                prompt_logprobs: g.prompt_logprobs,
                choice,
                events: tx.clone(),
            })
            .collect();
        self.submit(requests)?;
        Ok(rx)
    }

    fn submit(&self, requests: Vec<Request>) -> Result<(), ApiError> {
        self.engine.submit(requests).map_err(|e| {
            let status = match e {
                SubmitError::QueueFull => {
                    self.metrics.requests_rejected.inc();
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
                self.metrics.requests_client_error.inc();
            }
            e.into_response()
        })
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render(state.registry.stats())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
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
        root: state.base_root.clone(),
        parent: None,
        max_model_len: Some(state.limits.max_positions),
    }];
    data.extend(
        state
            .registry
            .sources()
            .into_iter()
            .map(|(id, root)| ModelCard {
                id,
                object: "model",
                created,
                owned_by: "lowrank",
                root,
                parent: Some(state.base_name.clone()),
                max_model_len: None,
            }),
    );
    data.retain(|m| grant.is_none_or(|g| g.allows(&m.id)));
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// A generation request, checked by [`AppState::start`].
struct Generation<'a> {
    prompt: Vec<u32>,
    adapters: Vec<(AdapterLease, f64)>,
    sampling: &'a Sampling,
    default_max_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    echo: bool,
}

/// The most tokens `logprobs` / `top_logprobs` may ask for at each position (OpenAI's and
/// vLLM's default bound).
const MAX_TOP_LOGPROBS: usize = 20;

fn check_top(value: usize, field: &str) -> Result<usize, ApiError> {
    if value > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad(format!(
            "{field} must be between 0 and {MAX_TOP_LOGPROBS}"
        )));
    }
    Ok(value)
}

/// Refuses the first field of `other` that asks for something not implemented here.
fn refuse_unsupported(
    other: &serde_json::Map<String, serde_json::Value>,
    lists: &[&[Unsupported]],
) -> Result<(), ApiError> {
    match first_unsupported(other, lists) {
        Some(field) => Err(ApiError::bad(format!(
            "`{field}` is not supported by this server"
        ))),
        None => Ok(()),
    }
}

/// A generation endpoint's request (`/v1/completions`, `/v1/chat/completions`): what the one
/// handler, [`generation`], asks of it.
trait GenerationRequest: DeserializeOwned {
    /// The fields of OpenAI's (or vLLM's) request this endpoint refuses.
    const UNSUPPORTED: &'static [&'static [Unsupported]];
    /// The prefix of its response ids.
    const ID_PREFIX: &'static str;
    /// `max_tokens` when the request has none.
    const DEFAULT_MAX_TOKENS: usize;
    /// What [`Self::check`] found, for [`Self::prepare`].
    type Checked;

    fn sampling(&self) -> &Sampling;
    fn other(&self) -> &serde_json::Map<String, serde_json::Value>;
    /// `model`, `adapter` and `adapters`: the base or adapter(s) to generate with.
    fn target(&self) -> (Option<&str>, Option<&str>, Option<&[StackedAdapter]>);
    /// Checks the fields only this endpoint has, before the adapters are looked up.
    fn check(&self) -> Result<Self::Checked, ApiError>;
    /// Tokenizes the prompt and says how to report the answer.
    fn prepare(
        &self,
        checked: Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError>;
}

/// A generation request ready to start: its prompt, what it reports and how it is rendered.
struct Prepared {
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    echo: bool,
    render: StreamRender,
}

/// [`GenerationRequest`]'s accessors of the fields both requests have under the same names.
macro_rules! shared_request_fields {
    () => {
        fn sampling(&self) -> &Sampling {
            &self.sampling
        }

        fn other(&self) -> &serde_json::Map<String, serde_json::Value> {
            &self.other
        }

        fn target(&self) -> (Option<&str>, Option<&str>, Option<&[StackedAdapter]>) {
            let (model, adapter) = (self.model.as_deref(), self.adapter.as_deref());
            (model, adapter, self.adapters.as_deref())
        }
    };
}

impl GenerationRequest for CompletionRequest {
    const UNSUPPORTED: &'static [&'static [Unsupported]] = COMPLETION_UNSUPPORTED;
    const ID_PREFIX: &'static str = "cmpl";
    const DEFAULT_MAX_TOKENS: usize = 16;
    /// The prompt and `logprobs`.
    type Checked = (String, Option<usize>);

    shared_request_fields!();

    fn check(&self) -> Result<Self::Checked, ApiError> {
        let prompt = match &self.prompt {
            Prompt::One(p) => p.clone(),
            Prompt::Many(v) if v.len() == 1 => v[0].clone(),
            Prompt::Many(_) => {
                return Err(ApiError::bad(
                    "prompt must be a string or a list of exactly one string",
                ))
            }
        };
        let logprobs = self
            .logprobs
            .map(|k| check_top(k, "logprobs"))
            .transpose()?;
        Ok((prompt, logprobs))
    }

    fn prepare(
        &self,
        (prompt, logprobs): Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError> {
        let ids = tokenizer
            .encode(&prompt, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let render = CompletionRender {
            tokenizer: tokenizer.clone(),
            echo: self.echo.then(|| Echo {
                text: prompt,
                ids: ids.clone(),
            }),
            logprobs: logprobs.is_some(),
        };
        Ok(Prepared {
            prompt: ids,
            logprobs,
            prompt_logprobs: logprobs.filter(|_| self.echo),
            echo: self.echo,
            render: StreamRender::Completion(render),
        })
    }
}

impl GenerationRequest for ChatRequest {
    const UNSUPPORTED: &'static [&'static [Unsupported]] = CHAT_UNSUPPORTED;
    const ID_PREFIX: &'static str = "chatcmpl";
    const DEFAULT_MAX_TOKENS: usize = 256;
    /// `Some(top_logprobs)` when logprobs are asked for.
    type Checked = Option<usize>;

    shared_request_fields!();

    fn check(&self) -> Result<Self::Checked, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad("messages is empty"));
        }
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::bad("top_logprobs needs `logprobs: true`"));
        }
        let top_logprobs = check_top(self.top_logprobs.unwrap_or(0), "top_logprobs")?;
        Ok(self.logprobs.then_some(top_logprobs))
    }

    fn prepare(
        &self,
        logprobs: Self::Checked,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Prepared, ApiError> {
        let messages: Vec<Message> = self
            .messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let ids = tokenizer
            .encode_chat(&messages, true)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        Ok(Prepared {
            prompt: ids,
            logprobs,
            prompt_logprobs: None,
            echo: false,
            render: StreamRender::Chat { logprobs },
        })
    }
}

/// `POST /v1/completions` and `POST /v1/chat/completions`: checks the request, starts its
/// sequences and answers with the whole result or streams it.
async fn generation<R: GenerationRequest>(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let grant = state.authorize(&headers)?;
        let req: R = parse(&state.read_body(body).await?)?;
        refuse_unsupported(req.other(), R::UNSUPPORTED)?;
        let checked = req.check()?;
        let (model, adapter, stacked) = req.target();
        let (model, adapters) = state.lookup(grant, model, adapter, stacked).await?;
        let prepared = req.prepare(checked, &state.tokenizer)?;
        let sampling = req.sampling();
        let n = sampling.n.unwrap_or(1);
        let rx = state.start(Generation {
            prompt: prepared.prompt,
            adapters,
            sampling,
            default_max_tokens: R::DEFAULT_MAX_TOKENS,
            logprobs: prepared.logprobs,
            prompt_logprobs: prepared.prompt_logprobs,
            echo: prepared.echo,
        })?;
        let id = request_id(R::ID_PREFIX);
        let created = now();
        if sampling.stream {
            let include_usage = sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage);
            let header = ChunkHeader {
                id,
                created,
                model,
                tokenizer: state.tokenizer.clone(),
            };
            return Ok(render::stream(
                rx,
                n,
                prepared.render,
                header,
                include_usage,
            ));
        }
        let (outputs, usage) = render::collect(rx, n).await?;
        let response = match prepared.render {
            StreamRender::Completion(render) => {
                let choices = outputs
                    .into_iter()
                    .enumerate()
                    .map(|(index, output)| render.choice(index, output))
                    .collect();
                Json(CompletionResponse {
                    id,
                    object: "text_completion",
                    created,
                    model,
                    choices,
                    usage: Some(usage),
                })
                .into_response()
            }
            StreamRender::Chat { logprobs } => {
                let choices = outputs
                    .into_iter()
                    .enumerate()
                    .map(|(index, output)| {
                        let mut texts = render::TokenTexts::new(state.tokenizer.clone(), 0);
                        let logprobs =
                            logprobs.map(|_| texts.chat_logprobs(&output.logprobs, true));
                        ChatChoice {
                            index,
                            message: ChatMessage {
                                role: "assistant".into(),
                                content: output.text,
                            },
                            logprobs,
                            finish_reason: Some(output.finish_reason),
                        }
                    })
                    .collect();
                Json(ChatResponse {
                    id,
                    object: "chat.completion",
                    created,
                    model,
                    choices,
                    usage,
                })
                .into_response()
            }
        };
        Ok(response)
    }
    .await;
    state.respond(result)
}

async fn load_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.require_admin(&headers)?;
    let req: LoadAdapterRequest = parse(&state.read_body(body).await?)?;
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
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.require_admin(&headers)?;
    let req: UnloadAdapterRequest = parse(&state.read_body(body).await?)?;
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

/// Serves on a bound listener until `shutdown` resolves, then lets running requests finish.
/// Each connection is driven by hyper's HTTP/1 machinery with a header-read timeout, and at
/// most `max_connections` at once: the others wait in the listen backlog, so half-open clients
/// cannot take every file descriptor of the process.
pub async fn serve_on(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let app = router(state.clone());
    let limits = &state.connections;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.as_mut() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let metrics = state.metrics.clone();
        metrics.open_connections.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            metrics.open_connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    let engine_state = state.clone();
    tokio::task::spawn_blocking(move || engine_state.engine.shutdown())
        .await
        .ok();
    Ok(())
}

/// A failed accept: a connection that went away before being accepted is nothing; anything
/// else (out of file descriptors) is logged, and accepting pauses a moment rather than spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
