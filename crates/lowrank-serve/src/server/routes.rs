//! The routes, and the handlers other than generation: health, metrics, the model list and
//! adapter loading/unloading.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::generation::generation;
use super::state::AppState;
use crate::api::*;

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

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Parses a JSON body ourselves, so a malformed one gets our error shape and a precise message.
pub(super) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
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
