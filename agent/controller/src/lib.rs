//! The reference controller (`patchctl serve`): receives agents' reports over mutual TLS and
//! keeps them in a [`store::Store`]; `patchctl history` and `patchctl compliance` read them.
//!
//! Trust: the TLS handshake admits only certificates chaining to `--ca`; each request's host_id
//! must then be one of the certificate's names, so an agent reports for itself only.

pub mod channel;
pub mod compliance;
pub mod enroll;
pub mod operator;
pub mod relay;
pub mod retention;
pub mod rollouts;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod web;

use patch_agent_service::auth::Peer;
use patch_agent_wire::proto::{ControllerServer, v1 as pb};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use store::Store;
use tonic::{Request, Response, Status};

/// Implements `patchagent.v1.Controller`.
pub struct ControllerService {
    store: Arc<dyn Store>,
    hub: Arc<channel::Hub>,
    counters: Arc<web::metrics::Counters>,
}

impl ControllerService {
    pub fn new(store: Arc<dyn Store>, hub: Arc<channel::Hub>) -> Self {
        Self {
            store,
            hub,
            counters: Arc::default(),
        }
    }

    /// Counts the reports it stores into `counters` (the controller's /metrics).
    pub fn with_counters(mut self, counters: Arc<web::metrics::Counters>) -> Self {
        self.counters = counters;
        self
    }
}

/// A revoked host's call, refused (`patchctl hosts revoke`); the store checks in the write's
/// own transaction.
pub(crate) fn revoked(refusal: store::Refusal) -> Status {
    tracing::warn!(reason = %refusal, "Refused a call from a revoked host");
    Status::permission_denied(format!(
        "{refusal} on this controller; enrol it again with a token made by `patchctl tokens create --reenroll`"
    ))
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The client certificate's names (SAN DNS names and URIs, or its CN).
pub(crate) fn peer_names<T>(req: &Request<T>) -> Result<Vec<String>, Status> {
    match req
        .extensions()
        .get::<patch_agent_service::listener::Conn>()
        .map(|c| c.peer.as_ref())
    {
        Some(Peer::Tls { names, .. }) => Ok(names.clone()),
        _ => Err(Status::unauthenticated(
            "no client certificate on this connection",
        )),
    }
}

/// The request's host_id must be one of the client certificate's names.
pub(crate) fn authorize<T>(req: &Request<T>, host_id: &str) -> Result<(), Status> {
    authorize_names(peer_names(req)?, host_id)
}

pub(crate) fn authorize_names(names: Vec<String>, host_id: &str) -> Result<(), Status> {
    if host_id.is_empty() || host_id.len() > 253 || host_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "host_id must be 1-253 printable characters",
        ));
    }
    if names.iter().any(|n| n == host_id) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "a certificate for {names:?} may not report for host_id {host_id:?}; an agent reports only for a host_id its certificate names"
    )))
}

pub(crate) fn check_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    if labels.len() > 64 {
        return Err(Status::invalid_argument("at most 64 labels"));
    }
    for (k, v) in labels {
        patch_agent_wire::ids::check_label(k, v).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

fn check_report_id(id: &str, host_id: &str) -> Result<(), Status> {
    if id.len() > 512 || !id.starts_with(&format!("{host_id}:")) {
        return Err(Status::invalid_argument(format!(
            "report_id {id:?} must start with \"{host_id}:\" and be at most 512 bytes"
        )));
    }
    Ok(())
}

pub(crate) fn stored(e: String) -> Status {
    tracing::error!(error = %e, "Store failed");
    Status::unavailable(format!("the controller could not store the report: {e}"))
}

#[tonic::async_trait]
impl patch_agent_wire::proto::Controller for ControllerService {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        authorize(&req, &req.get_ref().host_id)?;
        check_labels(&req.get_ref().labels)?;
        let h = req.into_inner();
        tracing::info!(host = %h.host_id, version = %h.agent_version, labels = ?h.labels, "Agent hello");
        let inventory_wanted = self
            .store
            .hello(h, now())
            .await
            .map_err(stored)?
            .map_err(revoked)?;
        Ok(Response::new(pb::HelloResponse {
            server_time: Some(SystemTime::now().into()),
            inventory_wanted,
        }))
    }

    async fn report_job(
        &self,
        req: Request<pb::JobReport>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let r = req.get_ref();
        authorize(&req, &r.host_id)?;
        check_labels(&r.labels)?;
        check_report_id(&r.report_id, &r.host_id)?;
        let Some(status) = &r.status else {
            return Err(Status::invalid_argument("a job report needs a status"));
        };
        if !patch_agent_wire::ids::valid_job_id(&status.job_id) {
            return Err(Status::invalid_argument(format!(
                "job_id {:?} must be 1-128 characters of [A-Za-z0-9._-]",
                status.job_id
            )));
        }
        let r = req.into_inner();
        let (host, job, state, is_final) = (
            r.host_id.clone(),
            r.status
                .as_ref()
                .map(|s| s.job_id.clone())
                .unwrap_or_default(),
            r.status.as_ref().map_or(0, |s| s.state),
            r.r#final,
        );
        let duplicate = self
            .store
            .job_report(r, now())
            .await
            .map_err(stored)?
            .map_err(revoked)?;
        tracing::info!(host = %host, job = %job, state = patch_agent_wire::convert::state_name(state), is_final, duplicate, "Job report");
        if !duplicate {
            self.counters
                .job_reports
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if is_final && !duplicate {
            // A rollout may be waiting for this result.
            self.hub.wake.bump();
        }
        Ok(Response::new(pb::ReportAck { duplicate }))
    }

    async fn report_inventory(
        &self,
        req: Request<pb::InventoryReport>,
    ) -> Result<Response<pb::InventoryAck>, Status> {
        let r = req.get_ref();
        authorize(&req, &r.host_id)?;
        check_labels(&r.labels)?;
        check_report_id(&r.report_id, &r.host_id)?;
        if r.checksum.len() != 64 || !r.checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "checksum must be the lowercase hex SHA-256 of the encoded inventory",
            ));
        }
        if let Some(inv) = &r.inventory {
            let bytes = prost::Message::encode_to_vec(inv);
            let sum = patch_agent_wire::ids::to_hex(
                ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
            );
            if sum != r.checksum {
                return Err(Status::invalid_argument(format!(
                    "the inventory's SHA-256 is {sum}, not the checksum {}",
                    r.checksum
                )));
            }
        }
        let r = req.into_inner();
        let full = r.inventory.is_some();
        let host = r.host_id.clone();
        let known = self
            .store
            .inventory(r, now())
            .await
            .map_err(stored)?
            .map_err(revoked)?;
        if full {
            tracing::info!(host = %host, "Inventory stored");
            self.counters
                .inventories
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Response::new(pb::InventoryAck {
            need_full: !full && !known,
        }))
    }

    type ConnectStream = channel::ConnectStream;

    async fn connect(
        &self,
        req: Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let names = peer_names(&req);
        channel::serve(
            self.hub.clone(),
            self.store.clone(),
            names,
            req.into_inner(),
        )
        .await
        .map(Response::new)
    }
}

/// `patchctl serve` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:7000 (port 0 picks one; the address is printed).
    #[arg(long)]
    pub listen: String,
    /// The database: an SQLite file (created if missing), or a PostgreSQL URL
    /// (postgres://USER@HOST[:PORT]/DB; several controllers may share one). Migrated on start.
    /// From the environment, a password in the URL stays out of the process list.
    #[arg(long, env = "PATCHCTL_DB", hide_env_values = true)]
    pub db: store::Location,
    /// CA certificate (PEM) that agent certificates must chain to.
    #[arg(long)]
    pub ca: std::path::PathBuf,
    /// The controller's certificate (PEM).
    #[arg(long)]
    pub cert: std::path::PathBuf,
    /// The controller's private key (PEM, 0600).
    #[arg(long)]
    pub key: std::path::PathBuf,
    /// Connections served at once, counted from accept; over it a connection is closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections from one source address at once (NAT gateways may need more).
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_ip: usize,
    /// A TLS handshake not finished in this long is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: std::time::Duration,
    /// A connection with no open stream for this long is closed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Largest request message, in bytes (a full inventory is the largest).
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE)]
    pub max_message_size: usize,
    /// Certificate identities (a name in the certificate: SAN or CN) that may call the operator
    /// API: relay signed jobs (`patchctl submit --controller`) and create and steer rollouts.
    /// Agents' certificates never may; these names are also reserved from enrolment.
    #[arg(long, value_delimiter = ',')]
    pub operators: Vec<String>,
    /// Job results, resolved-update history and ended rollouts older than this are deleted in
    /// the background, an hour apart, in small batches (ingest does not wait for them).
    #[arg(long, default_value = "400d", value_parser = retention::parse_retain)]
    pub retain: std::time::Duration,
    #[command(flatten)]
    pub enroll: EnrollArgs,
    #[command(flatten)]
    pub web: web::HttpArgs,
}

/// Enrolment settings of `patchctl serve`; enrolment is on when `--enroll-ca-cert` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// CA certificate (PEM) that signs enrolled agents' certificates: the --ca itself or an
    /// intermediate under it. Turns on patchagent.v1.Enrollment.
    #[arg(long, requires = "enroll_ca_key")]
    pub enroll_ca_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM, 0600).
    #[arg(long, requires = "enroll_ca_cert")]
    pub enroll_ca_key: Option<std::path::PathBuf>,
    /// Lifetime of the certificates it signs; agents renew at half of it.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub agent_cert_ttl: std::time::Duration,
    /// Directory of job-signing public keys (SPKI PEM, *.pem) that enrolled agents will trust.
    /// Only public keys: the controller never holds a key that can sign a job.
    #[arg(long, requires = "enroll_ca_cert")]
    pub publish_signing_keys: Option<std::path::PathBuf>,
    /// Names no host may enroll with, besides the controller's own certificate names: list
    /// the operator, controller and viewer identities agents trust in [auth].
    #[arg(long, value_delimiter = ',')]
    pub reserve_names: Vec<String>,
    /// Failed enrolments one source address may make per minute before it must wait.
    #[arg(long, default_value_t = 10)]
    pub enroll_max_failures: u32,
}

/// Default largest request: 4 MiB holds the inventory of a host with tens of thousands of
/// packages.
pub const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Concurrent streams per connection: an agent needs a few, an operator's rollout one per call.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Runs the controller until SIGTERM or SIGINT.
pub async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    let enrolling = a.enroll.enroll_ca_cert.is_some();
    let tls = tls_config(&a, enrolling)?;
    let mut opened = store::SqlStore::open_writer(&a.db)
        .await
        .map_err(anyhow::Error::msg)?;
    opened.listen();
    let store: Arc<dyn Store> = Arc::new(opened);
    let enrollment = enrollment_service(&a, &store)?;
    let listen: std::net::SocketAddr = a
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not ADDRESS:PORT", a.listen))?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = tcp.local_addr()?;
    let (_tls_tx, tls_rx) = tokio::sync::watch::channel(tls);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let incoming = patch_agent_service::listener::tls_incoming(
        tcp,
        patch_agent_service::listener::TlsAccept {
            config: tls_rx,
            // Agents and operators are authorized per RPC by their certificate's names.
            policy: None,
            handshake_timeout: a.handshake_timeout,
            limits: patch_agent_service::listener::Limits::new(
                a.max_connections,
                a.max_connections_per_ip,
                a.idle_timeout,
            ),
            shutdown: shutdown_rx.clone(),
        },
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControllerServer<ControllerService>>()
        .await;
    // This process among the replicas on the database: alive before it takes any channel.
    let replica = patch_agent_wire::ids::fresh_id("ctl");
    let started = now();
    store
        .beat(replica.clone(), addr.to_string(), started)
        .await
        .map_err(anyhow::Error::msg)?;
    tokio::spawn(beat(
        store.clone(),
        replica.clone(),
        addr.to_string(),
        started,
    ));
    let hub = Arc::new(channel::Hub::new(channel::Wake::default(), replica.clone()));
    if let Some(relay) = relay::Relay::new(store.clone(), replica.clone()) {
        hub.set_relay(relay.clone());
        tokio::spawn(relay.serve(hub.clone()));
    }
    // Rollouts left active (by a restart, or a replica that died) resume where they stood.
    let driver = rollouts::Driver::new(store.clone(), hub.clone());
    let resumed = driver.sweep().await.map_err(anyhow::Error::msg)?;
    tokio::spawn(driver.clone().run());
    tokio::spawn(retention::run(store.clone(), a.retain));
    tokio::spawn(retention::record_compliance(store.clone()));
    let operator = patch_agent_wire::proto::OperatorServer::new(operator::OperatorService::new(
        store.clone(),
        hub.clone(),
        driver.clone(),
        a.operators.clone(),
    ))
    .max_decoding_message_size(a.max_message_size);
    let counters = Arc::new(web::metrics::Counters::default());
    let dashboard = match &a.web.http {
        Some(_) => Some(start_dashboard(&a, &store, &counters, shutdown_rx.clone()).await?),
        None => None,
    };
    let service = ControllerServer::new(ControllerService::new(store, hub).with_counters(counters))
        .max_decoding_message_size(a.max_message_size);
    // Reflection, so admins can use grpcurl without the .proto files.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(patch_agent_wire::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1()?;
    let v1alpha = reflection().build_v1alpha()?;
    let mut stop = shutdown_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Finds control channels whose agent vanished (a NAT dropped the flow).
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .layer(patch_agent_service::listener::ActivityLayer)
            .layer(patch_agent_service::auth::AnonymousLayer::new(&[
                patch_agent_wire::proto::ENROLL_PATH,
            ]))
            .add_optional_service(enrollment)
            .add_service(service)
            .add_service(operator)
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
    );
    if resumed > 0 {
        tracing::info!(rollouts = resumed, "Resumed rollouts");
    }
    println!(
        "patchctl serve: listening on {addr} (mutual TLS{}), database {}",
        if enrolling {
            "; enrolment open without a client certificate"
        } else {
            ""
        },
        a.db
    );
    if let Some(addr) = dashboard {
        println!(
            "patchctl serve: dashboard and /metrics on {}://{addr}/",
            if a.web.http_tls { "https" } else { "http" }
        );
    }
    patch_agent_service::notify::Notifier::from_env()
        .notify(&format!("READY=1\nSTATUS=Listening on {addr}"));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("Stopping");
    let _ = shutdown_tx.send(true);
    // Another replica takes the rollouts over now rather than when the leases lapse.
    driver.release_all().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
    Ok(())
}

/// Starts `--http`: the dashboard and /metrics; the address bound.
async fn start_dashboard(
    a: &ServeArgs,
    store: &Arc<dyn Store>,
    counters: &Arc<web::metrics::Counters>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    let stale = i64::try_from(a.web.stale_after.as_secs()).unwrap_or(i64::MAX);
    let tls = if a.web.http_tls {
        let files = patch_agent_service::tls::TlsSection {
            ca: a.ca.clone(),
            cert: a.cert.clone(),
            key: a.key.clone(),
        };
        let config = patch_agent_service::tls::server_config_with(
            &files,
            &patch_agent_service::tls::ServerOptions {
                allow_anonymous: false,
                send_ca: false,
            },
        )
        .map_err(|ps| {
            anyhow::anyhow!(
                "--http-tls: {}",
                ps.into_iter()
                    .map(|(k, m)| format!("--{}: {m}", k.trim_start_matches("tls.")))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        Some(web::HttpTls {
            config,
            operators: a.operators.clone(),
            handshake_timeout: a.handshake_timeout,
        })
    } else {
        None
    };
    let site = Arc::new(web::Web::new(store.clone(), stale, counters.clone()));
    web::start(&a.web, tls, site, shutdown).await
}

/// How often a replica tells the database it is alive.
const BEAT: std::time::Duration = std::time::Duration::from_secs(5);

async fn beat(store: Arc<dyn Store>, replica: String, address: String, started: i64) {
    let mut tick = tokio::time::interval(BEAT);
    loop {
        tick.tick().await;
        if let Err(e) = store.beat(replica.clone(), address.clone(), started).await {
            tracing::warn!(error = %e, "Cannot record this controller as alive");
        }
    }
}

/// The listener's TLS: mutual, except that with enrolment on a client may come without a
/// certificate (for Enroll only) and the CA is sent for hosts that pin it.
fn tls_config(a: &ServeArgs, enrolling: bool) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let files = patch_agent_service::tls::TlsSection {
        ca: a.ca.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
    };
    let options = patch_agent_service::tls::ServerOptions {
        allow_anonymous: enrolling,
        send_ca: enrolling,
    };
    patch_agent_service::tls::server_config_with(&files, &options).map_err(|ps| {
        anyhow::anyhow!(
            "{}",
            ps.into_iter()
                .map(|(k, m)| format!("--{}: {m}", k.trim_start_matches("tls.")))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// The enrolment service when `--enroll-ca-cert` is given.
fn enrollment_service(
    a: &ServeArgs,
    store: &Arc<dyn Store>,
) -> anyhow::Result<Option<patch_agent_wire::proto::EnrollmentServer<enroll::EnrollmentService>>> {
    let (Some(cert), Some(key)) = (&a.enroll.enroll_ca_cert, &a.enroll.enroll_ca_key) else {
        return Ok(None);
    };
    let signer = enroll::ca::Signer::load(cert, key, &a.ca, a.enroll.agent_cert_ttl)
        .map_err(anyhow::Error::msg)?;
    let keys = match &a.enroll.publish_signing_keys {
        Some(dir) => enroll::published_keys(dir).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!(
                "No --publish-signing-keys: enrolled agents get no job-signing key and refuse every job until one is installed"
            );
            Vec::new()
        }
    };
    let own = patch_agent_service::tls::load_certs(&a.cert)
        .and_then(|c| patch_agent_service::tls::cert_info(&c[0]))
        .map_err(|e| anyhow::anyhow!("--cert: {e}"))?;
    let reserved = own
        .names
        .into_iter()
        .chain(a.enroll.reserve_names.iter().cloned())
        .chain(a.operators.iter().cloned())
        .collect();
    tracing::info!(ttl = ?a.enroll.agent_cert_ttl, signing_keys = keys.len(), "Enrolment open");
    Ok(Some(
        patch_agent_wire::proto::EnrollmentServer::new(enroll::EnrollmentService::new(
            store.clone(),
            Arc::new(signer),
            keys,
            reserved,
            enroll::limiter::Limiter::new(
                a.enroll.enroll_max_failures,
                std::time::Duration::from_secs(60),
            ),
        ))
        // Callers without a certificate reach this service: an enrolment request is a token, a
        // few names and a CSR of at most 8 KiB, so nothing near the inventory-sized default.
        .max_decoding_message_size(enroll::MAX_REQUEST),
    ))
}
