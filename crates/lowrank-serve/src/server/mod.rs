//! The HTTP layer (axum): OpenAI-compatible endpoints, adapter management, health and metrics.
//! Every failure is a JSON error body with a status code; no request can panic the server.
//!
//! `routes` maps the endpoints to their handlers; `generation` (with `requests`) serves the
//! two generation endpoints; `access` decides what a caller may use; `state` is what the
//! handlers share, built by `startup`; `listener` accepts the connections.

mod access;
mod error;
mod generation;
mod listener;
mod requests;
mod routes;
mod startup;
mod state;

pub use error::ApiError;
pub use listener::serve_on;
pub use routes::router;
pub use startup::{build_state, ServeOptions, StartError};
pub use state::{AppState, ConnectionLimits, RequestLimits};
