//! The read-only web dashboard and the controller's `/metrics`, on `patchctl serve --http ADDR`.
//!
//! Pages are rendered by the server from templates (minijinja, compiled into the binary and
//! auto-escaped) with charts drawn as inline SVG: no script, no external resource, so a page
//! works with scripts disabled, behind any proxy, and prints. Every page has a stable URL and a
//! `?format=json` twin holding the same data. Nothing here writes: the handlers only read the
//! store.
//!
//! Plain HTTP listens on loopback only; `--http-tls` serves HTTPS with the controller's own
//! certificate and admits only clients whose certificate (from `--ca`) names an operator.

pub mod charts;
pub mod export;
pub mod metrics;
pub mod pages;

use crate::store::Store;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

/// `patchctl serve` settings of the dashboard.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Serve the read-only web dashboard and Prometheus /metrics on ADDRESS:PORT. Plain HTTP
    /// listens on loopback only (127.0.0.1, ::1); any other address needs --http-tls.
    #[arg(long)]
    pub http: Option<String>,
    /// Serve --http as HTTPS with the controller's --cert and --key, admitting only clients
    /// whose certificate chains to --ca and names one of --operators.
    #[arg(long, requires = "http")]
    pub http_tls: bool,
    /// For the dashboard and /metrics: a host whose last scan is older than this counts as
    /// unknown, not compliant.
    #[arg(long, default_value = "48h", value_parser = humantime::parse_duration)]
    pub stale_after: std::time::Duration,
}

/// What the pages read.
pub struct Web {
    pub store: Arc<dyn Store>,
    pub templates: minijinja::Environment<'static>,
    pub stale_after: i64,
    pub counters: Arc<metrics::Counters>,
}

impl Web {
    pub fn new(store: Arc<dyn Store>, stale_after: i64, counters: Arc<metrics::Counters>) -> Self {
        Self {
            store,
            templates: templates(),
            stale_after,
            counters,
        }
    }
}

/// The page templates, compiled once. Their names end in `.html`, so every value is escaped.
pub fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("fleet.html", include_str!("templates/fleet.html")),
        ("hosts.html", include_str!("templates/hosts.html")),
        ("host.html", include_str!("templates/host.html")),
        ("job.html", include_str!("templates/job.html")),
        ("rollouts.html", include_str!("templates/rollouts.html")),
        ("rollout.html", include_str!("templates/rollout.html")),
        ("cve.html", include_str!("templates/cve.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        // The templates are part of the binary and compiled by the tests: an error here is
        // a bug in them, reported at the first page rather than by a panic.
        if let Err(e) = env.add_template(name, text) {
            tracing::error!(template = name, error = %e, "A dashboard template does not compile");
        }
    }
    env.add_filter("when", |t: Option<i64>| {
        t.map_or_else(|| "—".to_string(), time_text)
    });
    env.add_filter("pct", |v: Option<f64>| {
        v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} %"))
    });
    env.add_filter("hours", |v: Option<f64>| {
        v.map_or_else(|| "—".to_string(), |v| format!("{v:.1} h"))
    });
    env.add_filter("days", |v: Option<f64>| {
        v.map_or_else(|| "—".to_string(), |v| format!("{v:.1} days"))
    });
    env
}

/// `2026-12-01 14:05 UTC`.
pub fn time_text(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => unix.to_string(),
    }
}

/// `2026-12-01` for a day number (days since 1970-01-01).
pub fn day_text(day: i64) -> String {
    time_text(day.saturating_mul(86_400))
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// How a page is asked for: `?format=html` (the default) or `?format=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Html,
    Json,
}

impl Format {
    fn parse(v: Option<&str>) -> Result<Self, Failure> {
        match v {
            None | Some("" | "html") => Ok(Format::Html),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(Failure::bad(
                Format::Html,
                format!("format {other:?} is not one of html, json"),
            )),
        }
    }
}

/// A page that could not be shown, and why.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    message: String,
    format: Format,
}

impl Failure {
    fn bad(format: Format, message: impl Into<String>) -> Self {
        Failure {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            format,
        }
    }

    fn not_found(format: Format, message: impl Into<String>) -> Self {
        Failure {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            format,
        }
    }

    fn store(format: Format, e: String) -> Self {
        tracing::error!(error = %e, "Dashboard read failed");
        Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the controller's database could not be read: {e}"),
            format,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = match self.format {
            Format::Json => {
                return with_headers(
                    self.status,
                    "application/json",
                    serde_json::json!({ "error": self.message }).to_string(),
                );
            }
            Format::Html => templates()
                .get_template("error.html")
                .and_then(|t| {
                    t.render(minijinja::context! {
                        title => self.status.canonical_reason().unwrap_or("Error"),
                        message => &self.message,
                        standalone => false,
                        generated_at => crate::now(),
                    })
                })
                .unwrap_or_else(|_| charts::esc(&self.message)),
        };
        with_headers(self.status, "text/html; charset=utf-8", body)
    }
}

/// A response with the type and the headers every page carries: no script may run, nothing
/// is fetched from elsewhere, and the page is never framed.
fn with_headers(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Renders `template` with `data` (and the page chrome), or `data` as JSON.
fn respond<T: serde::Serialize>(
    web: &Web,
    format: Format,
    template: &str,
    title: &str,
    data: &T,
    extra: minijinja::Value,
) -> Result<Response, Failure> {
    match format {
        Format::Json => serde_json::to_string_pretty(data)
            .map(|body| with_headers(StatusCode::OK, "application/json", body))
            .map_err(|e| Failure::store(format, e.to_string())),
        Format::Html => {
            let ctx = minijinja::value::merge_maps([
                minijinja::context! {
                    title => title,
                    standalone => false,
                    generated_at => crate::now(),
                },
                extra,
                minijinja::Value::from_serialize(data),
            ]);
            web.templates
                .get_template(template)
                .and_then(|t| t.render(ctx))
                .map(|body| with_headers(StatusCode::OK, "text/html; charset=utf-8", body))
                .map_err(|e| Failure::store(format, format!("template {template}: {e}")))
        }
    }
}

/// The dashboard's routes.
pub fn router(web: Arc<Web>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(pages::fleet))
        .route("/hosts", get(pages::hosts))
        .route("/hosts/{id}", get(pages::host))
        .route("/jobs/{id}", get(pages::job))
        .route("/rollouts", get(pages::rollouts))
        .route("/rollouts/{id}", get(pages::rollout))
        .route("/cve", get(pages::cve))
        .route("/metrics", get(metrics::scrape))
        .fallback(|| async {
            Failure::not_found(
                Format::Html,
                "no such page; start at / (compliance), /hosts, /rollouts or /cve",
            )
        })
        .with_state(web)
}

/// TLS for `--http-tls`: the controller's certificate; client certificates from `ca`, and
/// only those naming one of `operators`.
pub struct HttpTls {
    pub config: Arc<rustls::ServerConfig>,
    pub operators: Vec<String>,
    pub handshake_timeout: std::time::Duration,
}

/// Binds `--http` and serves the dashboard until `shutdown`; the bound address.
pub async fn start(
    args: &HttpArgs,
    tls: Option<HttpTls>,
    web: Arc<Web>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let Some(listen) = &args.http else {
        anyhow::bail!("--http is not set");
    };
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--http {listen:?} is not ADDRESS:PORT, e.g. 127.0.0.1:8080"))?;
    if tls.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "--http {addr}: plain HTTP is served on loopback only (127.0.0.1 or [::1]); add --http-tls to serve HTTPS to operators' certificates on another address"
        );
    }
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
    let bound = tcp.local_addr()?;
    let app = router(web);
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, app).with_graceful_shutdown(stopped).await {
                    tracing::error!(error = %e, "The dashboard stopped");
                }
            });
        }
        Some(tls) => {
            if tls.operators.is_empty() {
                anyhow::bail!(
                    "--http-tls admits operators' certificates only: name them with --operators"
                );
            }
            let mut config = (*tls.config).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let policy = patch_agent_service::auth::AccessPolicy::new(
                &patch_agent_service::auth::AuthSection {
                    controllers: Vec::new(),
                    viewers: tls.operators,
                },
            );
            let (config_tx, config_rx) = tokio::sync::watch::channel(Arc::new(config));
            let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(policy));
            let incoming = patch_agent_service::listener::tls_incoming(
                tcp,
                patch_agent_service::listener::TlsAccept {
                    config: config_rx,
                    policy: Some(policy_rx),
                    handshake_timeout: tls.handshake_timeout,
                    limits: patch_agent_service::listener::Limits::new(
                        256,
                        32,
                        std::time::Duration::from_secs(120),
                    ),
                    shutdown,
                },
            );
            tokio::spawn(async move {
                // The senders live as long as the server: the settings never change.
                let _keep = (config_tx, policy_tx);
                let listener = TlsListener { incoming, bound };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!(error = %e, "The dashboard stopped");
                }
            });
        }
    }
    Ok(bound)
}

/// Authenticated TLS connections (handshakes run concurrently in the shared accept loop).
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<
        Result<patch_agent_service::listener::TlsPeerStream, std::io::Error>,
    >,
    bound: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = patch_agent_service::listener::TlsPeerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => return (conn, self.bound),
                Some(Err(e)) => tracing::debug!(error = %e, "Dashboard connection failed"),
                // The accept loop ended (shutdown): wait for the server to stop.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.bound)
    }
}

#[cfg(test)]
mod tests;
