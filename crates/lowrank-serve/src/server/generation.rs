//! `POST /v1/completions` and `POST /v1/chat/completions`: one handler for both, which checks
//! the sampling fields, submits one engine request per choice and answers whole or streamed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lowrank_models::generate::SamplingParams;

use super::error::ApiError;
use super::requests::{refuse_unsupported, GenerationRequest};
use super::routes::{now, parse, request_id};
use super::state::AppState;
use crate::api::*;
use crate::continuous_batching::{Request, SubmitError};
use crate::registry::AdapterLease;
use crate::render::{self, ChunkHeader, Events, StreamRender};

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

impl AppState {
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
}

/// `POST /v1/completions` and `POST /v1/chat/completions`: checks the request, starts its
/// sequences and answers with the whole result or streams it.
pub(super) async fn generation<R: GenerationRequest>(
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
