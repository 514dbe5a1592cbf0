//! The accept loop: HTTP/1 connections with a header-read timeout, a bounded number at once,
//! and a graceful shutdown that lets running requests finish.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use super::routes::router;
use super::state::AppState;

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
