//! `patch-agent run`: wires configuration, TLS, listeners and services together, and handles the
//! process lifecycle: READY once listeners are up, SIGHUP reloads, SIGTERM drains and exits 0.

use crate::config::{self, Config, LogFormat};
use crate::enroll::renew::Renewer;
use crate::host::{HostFacts, Sources};
use crate::jobs::engine::Engine;
use crate::pkg::scanner::Scanner;
use crate::report::{self, outbox::Outbox};
use crate::server::{self, AgentService, Health};
use patch_agent_service::auth::{AccessPolicy, AuthLayer};
use patch_agent_service::listener::{self, TlsAccept};
use patch_agent_service::notify::{self, Notifier};
use patch_agent_service::telemetry::{self, FilterHandle};
use patch_agent_service::tls;
use patch_agent_wire::job::trust::TrustStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Why the agent could not start or stopped with an error; the kind chooses the exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or a TLS file is wrong: fix it and start again. Exit 2.
    #[error("refusing to start: {} problem(s) in the configuration", .0.len())]
    Config(Vec<String>),
    /// Start-up or running failed (cannot bind, state directory, a listener died). Exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit::CONFIG,
            Error::Runtime(_) => exit::RUNTIME,
        }
    }
}

impl From<String> for Error {
    fn from(why: String) -> Self {
        Error::Runtime(why)
    }
}

/// Exit statuses of `patch-agent` (README, "Exit status").
pub mod exit {
    /// A configuration or TLS file is wrong; fix it and start again.
    pub const CONFIG: i32 = 2;
    /// The agent could not start or failed while running.
    pub const RUNTIME: i32 = 1;
}

/// Everything `check` loads.
pub struct Checked {
    pub config: Config,
    pub tls: Arc<rustls::ServerConfig>,
    pub trust: TrustStore,
}

/// Loads the configuration, TLS material and trust store, returning every problem as
/// printable lines.
pub fn check(path: &Path) -> Result<Checked, Vec<String>> {
    let config =
        config::load(path).map_err(|p| p.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let problem = |key: &str, message: String| {
        config::Problem {
            file: path.to_path_buf(),
            key: key.to_string(),
            message,
        }
        .to_string()
    };
    let mut problems = Vec::new();
    // Whoever can write these can make the agent run code as root.
    let trusted = [
        patch_agent_service::trusted_files::check("config", path).err(),
        patch_agent_service::trusted_files::check("agent.state_dir", &config.agent.state_dir).err(),
        patch_agent_service::trusted_files::check("jobs.hooks_dir", &config.jobs.hooks_dir).err(),
    ];
    problems.extend(trusted.into_iter().flatten());
    problems.extend(patch_agent_service::trusted_files::check_dir_and_files(
        "jobs.trusted_keys_dir",
        &config.jobs.trusted_keys_dir,
        Some("pem"),
    ));
    let tls = tls::server_config(&config.tls)
        .map_err(|ps| problems.extend(ps.into_iter().map(|(key, msg)| problem(&key, msg))))
        .ok();
    let trust = TrustStore::load(&config.jobs.trusted_keys_dir)
        .map_err(|ps| {
            problems.extend(ps.into_iter().map(|m| problem("jobs.trusted_keys_dir", m)));
        })
        .ok();
    match (tls, trust) {
        (Some(tls), Some(trust)) if problems.is_empty() => Ok(Checked { config, tls, trust }),
        _ => Err(problems),
    }
}

/// What is allowed but probably not meant: printed by `check-config`, logged at start.
pub fn warnings(c: &Checked) -> Vec<String> {
    let mut out = Vec::new();
    if c.trust.is_empty() {
        out.push(format!(
            "jobs.trusted_keys_dir {} holds no key (*.pem): every job will be refused until one is added",
            c.config.jobs.trusted_keys_dir.display()
        ));
    }
    if c.config.server.listen.is_empty() && !c.config.report.is_set() {
        out.push(
            "server.listen and report.controller are both unset: no controller can reach this agent (only the local socket can)"
                .into(),
        );
    }
    if c.config.auth.controllers.is_empty() && c.config.auth.viewers.is_empty() {
        out.push(
            "auth: no controllers or viewers: only root on the local socket can call the agent"
                .into(),
        );
    }
    out
}

/// Runs the agent until SIGTERM or SIGINT. Returns the process exit code.
pub fn run(config_path: PathBuf, log_format: Option<LogFormat>) -> i32 {
    match start(config_path, log_format) {
        Ok(()) => 0,
        Err(e) => {
            if let Error::Config(problems) = &e {
                for p in problems {
                    eprintln!("patch-agent: {p}");
                }
                eprintln!("patch-agent: {e}");
            } else {
                tracing::error!(error = %e, "Agent stopped");
            }
            e.exit_code()
        }
    }
}

fn start(config_path: PathBuf, log_format: Option<LogFormat>) -> Result<(), Error> {
    let started = Instant::now();
    tls::install_default_provider();
    let checked = check(&config_path).map_err(Error::Config)?;
    let filter = telemetry::init(
        log_format.unwrap_or(checked.config.log.format),
        &checked.config.log.level,
    );
    for w in warnings(&checked) {
        tracing::warn!("{w}");
    }
    // Two workers at most: the agent serves a handful of admins and one controller, and every
    // thread costs resident memory on every host of the fleet.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .max_blocking_threads(16)
        .thread_name("patch-agent")
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(serve(config_path, checked, filter, started))
}

fn prepare_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("state_dir {} is not a directory", dir.display()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:04o}", meta.permissions().mode() & 0o7777), "Tightening state_dir to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    Ok(())
}

async fn serve(
    config_path: PathBuf,
    checked: Checked,
    filter: FilterHandle,
    started: Instant,
) -> Result<(), Error> {
    let Checked {
        config,
        tls: tls_config,
        trust,
    } = checked;
    let notifier = Notifier::from_env();
    prepare_state_dir(&config.agent.state_dir)?;
    let facts = host_facts(&config)?;

    let (tls_tx, tls_rx) = watch::channel(tls_config);
    let (policy_tx, policy_rx) = watch::channel(Arc::new(AccessPolicy::new(&config.auth)));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let scanner = open_scanner(&config, &facts).await;
    tracing::info!(keys = trust.len(), dir = %config.jobs.trusted_keys_dir.display(), "Trust store loaded");
    let engine = open_engine(&config, &facts, trust, &scanner).await?;
    let (report_tx, report_rx) = watch::channel((config.report.clone(), config.tls.clone()));
    let live_report = report_rx.clone();
    let reporter = open_reporter(&config, &facts, &engine, &scanner, report_rx)?;
    let renewer = Renewer::new(
        report_tx.subscribe(),
        &facts.host_id,
        config.enrolled.is_some(),
    );
    let reload_wanted = renewer.reload.clone();
    let channel_state = reporter.as_ref().map_or_else(Default::default, |r| {
        report::channel::ChannelState::new(&config.report.shown(), r.outbox.clone())
    });
    let (routes, health) = server::routes(
        AgentService::new(facts.clone(), scanner.clone(), engine.clone())
            .with_certificate(renewer.state.clone())
            .with_controller(channel_state.clone()),
    )
    .await?;
    let listeners = Listeners {
        routes,
        tls: tls_rx,
        policy: policy_rx,
        shutdown: shutdown_rx.clone(),
    };
    let (servers, status) = listeners.start(&config).await?;
    if !config.metrics.listen.is_empty() {
        let tcp = crate::metrics::bind(&config.metrics.listen).await?;
        let bound = tcp
            .local_addr()
            .map_or_else(|_| config.metrics.listen.clone(), |a| a.to_string());
        tracing::info!(address = %bound, "Serving metrics at /metrics");
        tokio::spawn(crate::metrics::serve(
            tcp,
            Arc::new(crate::metrics::Sources {
                scanner: scanner.clone(),
                engine: engine.clone(),
                outbox: reporter.as_ref().map(|r| r.outbox.clone()),
            }),
            shutdown_rx.clone(),
        ));
    }

    if let Some(scanner) = &scanner {
        tokio::spawn(scanner.clone().run());
    }
    tokio::spawn(engine.clone().run());
    if let Some(r) = reporter {
        tokio::spawn(
            report::channel::ControlChannel {
                settings: live_report.clone(),
                origin: r.origin.clone(),
                engine: engine.clone(),
                link: r.link.clone(),
                state: channel_state,
            }
            .run(),
        );
        tokio::spawn(r.run());
    }
    tokio::spawn(renewer.run());
    health.set(true).await;
    notifier.notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "Ready");
    feed_watchdog();

    let mut running = config.clone();
    crate::reload::record_running(&running);
    let live = Live {
        tls: tls_tx,
        policy: policy_tx,
        report: report_tx,
        filter,
        engine,
        scanner,
        facts,
        reload_wanted,
    };
    let (failure, servers) =
        until_stopped(&config_path, &mut running, &live, &notifier, servers).await?;
    drain(&health, &notifier, &running, shutdown_tx, servers).await;
    if let Some(path) = &config.server.local_socket {
        let _ = std::fs::remove_file(path);
    }
    match failure {
        None => tracing::info!("Stopped"),
        Some(why) => return Err(Error::Runtime(why)),
    }
    Ok(())
}

/// The jobs engine, with its journal recovered.
async fn open_engine(
    config: &Config,
    facts: &HostFacts,
    trust: TrustStore,
    scanner: &Option<Arc<Scanner>>,
) -> Result<Arc<Engine>, Error> {
    Ok(Engine::open(
        &config.agent.boot_id_path,
        &config.agent.state_dir,
        trust,
        config
            .jobs
            .admission_policy(&facts.host_id, &facts.machine_id, &config.agent.labels),
        config.jobs.clone(),
        scanner.clone(),
        Arc::new(crate::jobs::clock::SystemClock),
    )
    .await?)
}

/// This host's facts, read once at start.
fn host_facts(config: &Config) -> Result<Arc<HostFacts>, String> {
    let sources = Sources {
        boot_id: config.agent.boot_id_path.clone(),
        ..Sources::default()
    };
    let facts = HostFacts::read(&sources, &config.agent.host_id)?;
    tracing::info!(
        version = crate::VERSION,
        host_id = %facts.host_id,
        os = %facts.os.pretty_name,
        kernel = %facts.kernel_release,
        "Starting patch-agent"
    );
    Ok(Arc::new(facts))
}

/// The package backend and its scanner; None (package features off) when no backend fits.
async fn open_scanner(config: &Config, facts: &HostFacts) -> Option<Arc<Scanner>> {
    match crate::pkg::backend(&config.packages, &facts.os).await {
        Ok(backend) => {
            tracing::info!(manager = backend.name(), "Package manager");
            Some(Arc::new(Scanner::new(
                backend,
                config.packages.schedule(),
                facts.boot_time,
                &config.agent.state_dir,
            )))
        }
        Err(e) => {
            tracing::warn!(error = %e, "Package features disabled");
            None
        }
    }
}

/// The outbox and the reporter when `[report] controller` is set; the engine's job reports go
/// to the outbox from then on.
fn open_reporter(
    config: &Config,
    facts: &Arc<HostFacts>,
    engine: &Engine,
    scanner: &Option<Arc<Scanner>>,
    settings: watch::Receiver<(config::ReportSection, config::TlsSection)>,
) -> Result<Option<Arc<report::Reporter>>, String> {
    if !config.report.is_set() {
        tracing::info!("No [report] controller: job results and inventory are not reported");
        return Ok(None);
    }
    let outbox = Arc::new(Outbox::open(
        &config.agent.state_dir.join("outbox"),
        config.report.outbox_size,
    )?);
    let origin = report::Origin {
        host_id: facts.host_id.clone(),
        labels: config.agent.labels.clone(),
    };
    engine.set_report_sink(Arc::new(report::JobSink {
        origin: origin.clone(),
        outbox: outbox.clone(),
    }));
    // The controller may have lost it, or never had it: the checksum alone settles that.
    outbox.want_inventory();
    tracing::info!(controller = %config.report.shown(), pending = outbox.len(), "Reporting to the controller");
    Ok(Some(Arc::new(report::Reporter {
        link: Arc::new(report::link::Link::new(settings.clone())),
        settings,
        facts: facts.clone(),
        origin,
        scanner: scanner.clone(),
        outbox,
    })))
}

type Servers = tokio::task::JoinSet<Result<(), tonic::transport::Error>>;

/// What the gRPC listeners serve and watch.
struct Listeners {
    routes: tonic::service::Routes,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    policy: watch::Receiver<Arc<AccessPolicy>>,
    shutdown: watch::Receiver<bool>,
}

impl Listeners {
    /// Binds the TCP listener (mutual TLS) and the local socket if configured, and serves
    /// both; returns the servers and the status line for systemd.
    async fn start(self, config: &Config) -> Result<(Servers, String), String> {
        let server = || {
            tonic::transport::Server::builder()
                .max_concurrent_streams(Some(256))
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
                .layer(listener::ActivityLayer)
                .layer(AuthLayer::new(self.policy.clone()))
                .add_routes(self.routes.clone())
        };
        let mut servers = Servers::new();
        let stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut status = match config.listen_addr()? {
            Some(listen) => {
                let tcp = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
                let tcp_addr = tcp.local_addr().map_err(|e| e.to_string())?;
                let incoming = listener::tls_incoming(
                    tcp,
                    TlsAccept {
                        config: self.tls.clone(),
                        policy: Some(self.policy.clone()),
                        handshake_timeout: config.server.handshake_timeout,
                        limits: listener::Limits::new(
                            config.server.max_connections,
                            config.server.max_connections_per_ip,
                            config.server.idle_timeout,
                        ),
                        shutdown: self.shutdown.clone(),
                    },
                );
                servers.spawn(
                    server().serve_with_incoming_shutdown(incoming, stop(self.shutdown.clone())),
                );
                tracing::info!(address = %tcp_addr, "Listening for gRPC over mutual TLS");
                format!("Listening on {tcp_addr} (mTLS)")
            }
            None => {
                tracing::info!(
                    "No [server] listen: no TCP port; managed through the control channel and the local socket"
                );
                "No TCP listener".to_string()
            }
        };
        if let Some(path) = &config.server.local_socket {
            let unix = listener::bind_unix(path)?;
            let limits = listener::Limits::new(
                config.server.max_local_connections,
                config.server.max_local_connections,
                config.server.idle_timeout,
            );
            let incoming = listener::unix_incoming(unix, limits, self.shutdown.clone());
            servers.spawn(
                server().serve_with_incoming_shutdown(incoming, stop(self.shutdown.clone())),
            );
            tracing::info!(path = %path.display(), "Listening for gRPC on the local socket");
            status.push_str(&format!(" and {}", path.display()));
        }
        Ok((servers, status))
    }
}

/// Feeds the systemd watchdog when the unit has one.
fn feed_watchdog() {
    if let Some(every) = notify::watchdog_interval() {
        let notifier = Notifier::from_env();
        tracing::info!(interval = ?every, "Feeding the systemd watchdog");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notifier.notify("WATCHDOG=1");
            }
        });
    }
}

/// Reloads on SIGHUP until SIGTERM or SIGINT (None), or a listener ends on its own (why).
async fn until_stopped(
    config_path: &Path,
    running: &mut Config,
    live: &Live,
    notifier: &Notifier,
    mut servers: Servers,
) -> Result<(Option<String>, Servers), String> {
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let failure = loop {
        tokio::select! {
            _ = hup.recv() => {
                notifier.notify("RELOADING=1");
                reload(config_path, running, live).await;
                notifier.notify("READY=1");
            }
            () = live.reload_wanted.notified() => {
                tracing::info!("Reloading for the renewed certificate");
                reload(config_path, running, live).await;
            }
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break None; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break None; }
            Some(done) = servers.join_next() => {
                // A server ending on its own is a failure: stop everything and report it.
                let why = match done {
                    Ok(Ok(())) => "a listener stopped unexpectedly".to_string(),
                    Ok(Err(e)) => format!("a listener failed: {e}"),
                    Err(e) => format!("a listener task failed: {e}"),
                };
                break Some(why);
            }
        }
    };
    Ok((failure, servers))
}

async fn drain(
    health: &Health,
    notifier: &Notifier,
    config: &Config,
    shutdown: watch::Sender<bool>,
    mut servers: Servers,
) {
    health.set(false).await;
    notifier.notify("STOPPING=1");
    // Let health watchers and load balancers see NOT_SERVING before the listeners go away.
    tokio::time::sleep(config.server.drain_grace).await;
    let _ = shutdown.send(true);
    let drained = tokio::time::timeout(config.server.drain_timeout, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.server.drain_timeout, "Calls still open after drain_timeout; closing them");
        servers.abort_all();
    }
}

/// What a reload can reach: every part of the running agent that takes live settings.
struct Live {
    tls: watch::Sender<Arc<rustls::ServerConfig>>,
    policy: watch::Sender<Arc<AccessPolicy>>,
    report: watch::Sender<(config::ReportSection, config::TlsSection)>,
    filter: FilterHandle,
    engine: Arc<Engine>,
    scanner: Option<Arc<Scanner>>,
    facts: Arc<HostFacts>,
    /// A renewed certificate is in place: reload as on SIGHUP.
    reload_wanted: Arc<tokio::sync::Notify>,
}

/// Re-reads the configuration and applies every live key (see [`crate::reload`]); keeps the last
/// good configuration when the new one has problems, and names each key that needs a restart.
async fn reload(path: &Path, running: &mut Config, live: &Live) {
    let Checked {
        config: new,
        tls: tls_config,
        trust,
    } = match check(path) {
        Ok(ok) => ok,
        Err(problems) => {
            for p in &problems {
                tracing::error!(problem = %p, "Reload rejected");
            }
            tracing::error!(
                problems = problems.len(),
                "SIGHUP: keeping the last good configuration and certificates"
            );
            return;
        }
    };
    let live_packages = live.scanner.is_some();
    let changes = crate::reload::changes(
        &crate::reload::keys(running),
        &crate::reload::keys(&new),
        live_packages,
    );
    let mut new = crate::reload::effective(running, new, live_packages);
    if let Some(scanner) = &live.scanner
        && new.packages != running.packages
    {
        match crate::pkg::backend(&new.packages, &live.facts.os).await {
            Ok(backend) => scanner.reconfigure(backend, new.packages.schedule()),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: cannot rebuild the package backend; keeping the running [packages]");
                new.packages = running.packages.clone();
            }
        }
    }
    let _ = live.tls.send(tls_config);
    let keys = trust.len();
    live.engine.set_trust(trust);
    live.engine.set_jobs(
        new.jobs.admission_policy(
            &live.facts.host_id,
            &live.facts.machine_id,
            &new.agent.labels,
        ),
        new.jobs.clone(),
    );
    let _ = live.policy.send(Arc::new(AccessPolicy::new(&new.auth)));
    live.report
        .send_replace((new.report.clone(), new.tls.clone()));
    if let Err(e) = live.filter.set(&new.log.level) {
        tracing::warn!(error = %e, "Cannot apply log.level");
    }
    if !changes.restart.is_empty() {
        tracing::warn!("SIGHUP: restart needed for: {}", changes.restart.join(", "));
    }
    tracing::info!(
        controllers = new.auth.controllers.len(),
        viewers = new.auth.viewers.len(),
        trusted_keys = keys,
        applied = ?changes.live,
        "SIGHUP: reloaded certificates, access lists, trusted keys and every live key"
    );
    *running = new;
    crate::reload::record_running(running);
}
