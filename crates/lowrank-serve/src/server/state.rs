//! The state every handler shares: the engine, the adapter registry, the tokenizer, the API
//! keys, the metrics and the limits; reading a request body within them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lowrank_models::Tokenizer;
use tokio_stream::StreamExt;

use super::error::ApiError;
use crate::auth::ApiKeys;
use crate::continuous_batching::Engine;
use crate::metrics::Metrics;
use crate::registry::AdapterRegistry;

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

/// What every handler shares, built once by [`super::build_state`].
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

impl AppState {
    /// Reads a request body within the size limit and the body timeout.
    pub(super) async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
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
    /// The response of a generation endpoint, counting client errors for /metrics.
    pub(super) fn respond(&self, result: Result<Response, ApiError>) -> Response {
        result.unwrap_or_else(|e| {
            if e.0.is_client_error() {
                self.metrics.requests_client_error.inc();
            }
            e.into_response()
        })
    }
}
