//! `[metrics] listen`: the Prometheus text format at `GET /metrics`, plain HTTP.
//!
//! A scrape never runs a package manager: it reads the scanner's last snapshot, the engine's
//! counters and the outbox's length, and renders them ([`render`]). Until the first scan has
//! ended the scan-derived series are absent rather than zero, so "no data" is never mistaken
//! for "nothing pending".

pub mod process;
pub mod render;

use crate::jobs::engine::Engine;
use crate::pkg::scanner::Scanner;
use crate::report::outbox::Outbox;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use std::sync::Arc;

/// What a scrape reads.
pub struct Sources {
    pub scanner: Option<Arc<Scanner>>,
    pub engine: Arc<Engine>,
    pub outbox: Option<Arc<Outbox>>,
}

/// The content type of [`render::render`]'s output (prometheus-client writes OpenMetrics).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Sources {
    /// Everything a scrape shows, as of now.
    pub async fn render(&self) -> String {
        let snapshot = match &self.scanner {
            Some(s) => Some(s.snapshot().await),
            None => None,
        };
        render::render(&render::Inputs {
            manager: self.scanner.as_ref().map(|s| s.manager()),
            snapshot: snapshot.as_deref(),
            now: std::time::SystemTime::now(),
            jobs: self.engine.jobs_by_state(),
            rejections: self.engine.rejections(),
            outbox: self.outbox.as_ref().map(|o| o.len()),
            version: crate::VERSION,
            process: process::Stats::read(),
        })
    }
}

/// Binds `listen` (checked by the configuration already); an error names the key.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("metrics.listen: cannot listen on {listen}: {e}"))
}

/// Serves `/metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Arc<Sources>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "patch-agent serves only GET /metrics here\n",
            )
        })
        .with_state(sources);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "The metrics endpoint stopped");
    }
}

async fn scrape(axum::extract::State(s): axum::extract::State<Arc<Sources>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.render().await)
}
