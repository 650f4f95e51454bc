//! `[metrics] listen`: the Prometheus text format at `GET /metrics`, plain HTTP (`http`).
//!
//! A scrape never runs a package manager: it reads the scanner's last snapshot, the engine's
//! counters and the outbox's length, and renders them ([`render`]). Until the first scan has
//! ended the scan-derived series are absent rather than zero, so "no data" is never mistaken
//! for "nothing pending".

mod http;
pub mod process;
pub mod render;

use crate::jobs::engine::Engine;
use crate::pkg::scanner::Scanner;
use crate::report::outbox::Outbox;
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

pub use http::serve;
