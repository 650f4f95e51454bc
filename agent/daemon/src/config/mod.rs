//! The agent's configuration file (TOML).
//!
//! Every key is documented here and, with its default, in `packaging/agent.toml`. Unknown keys
//! are errors. [`load`] reports every problem it can find at once, each naming the file, the key
//! and what to do, so `patch-agent check-config` is useful in one run.

pub use layers::{ENROLLED_FILE, Layers};
pub use patch_agent_service::auth::AuthSection;
pub use patch_agent_service::telemetry::LogFormat;
pub use patch_agent_service::tls::TlsSection;
pub use patch_agent_wire::ids::check_host_id;

pub mod layers;
use patch_agent_wire::ids::{check_label, host_part, is_host_port};
use patch_agent_wire::job::AdmissionPolicy;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `patch-agent run` looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/patch-agent/agent.toml";

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentSection,
    pub server: ServerSection,
    pub tls: TlsSection,
    pub auth: AuthSection,
    pub log: LogSection,
    pub packages: PackagesSection,
    pub jobs: JobsSection,
    pub report: ReportSection,
    pub metrics: MetricsSection,
    /// The `enrolled.toml` that was merged in, if any (not a key: set by [`load`]).
    #[serde(skip)]
    pub enrolled: Option<PathBuf>,
}

/// `[agent]`: who this host is and where the agent keeps its state.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// The id jobs are addressed to. Default: empty, meaning the host's FQDN, else its hostname.
    pub host_id: String,
    /// Directory for the agent's durable state, created 0700. Default: `/var/lib/patch-agent`.
    pub state_dir: PathBuf,
    /// Where the current boot id is read (it changes at every boot; reboots are confirmed by
    /// it). Default: `/proc/sys/kernel/random/boot_id`.
    pub boot_id_path: PathBuf,
    /// Labels that travel with every report to the controller, e.g.
    /// `labels = { environment = "production", team = "web" }`. Keys: 1-63 of `[a-z0-9_.-]`;
    /// values: up to 256 printable characters. Default: none.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            host_id: String::new(),
            state_dir: PathBuf::from("/var/lib/patch-agent"),
            boot_id_path: PathBuf::from("/proc/sys/kernel/random/boot_id"),
            labels: std::collections::BTreeMap::new(),
        }
    }
}

/// `[server]`: where the agent listens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// TCP address for gRPC over mutual TLS. Port 0 picks a free port (tests). Default: unset,
    /// no TCP port at all: the agent is then managed through its control channel to
    /// `[report] controller` and the local socket. The packaged config sets `0.0.0.0:7443`.
    pub listen: String,
    /// Optional Unix socket without TLS for admins on the host, created 0600. uid 0 peers get the
    /// controller role, other peers the viewer role. Default: unset (no local socket).
    pub local_socket: Option<PathBuf>,
    /// How long a TLS handshake may take before the connection is dropped. Default: `10s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub handshake_timeout: Duration,
    /// On SIGTERM, how long health reports NOT_SERVING before the listeners close, so load
    /// balancers and watchers notice. Default: `1s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub drain_grace: Duration,
    /// On SIGTERM, how long in-flight calls may take to finish after the listeners close.
    /// Default: `10s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub drain_timeout: Duration,
    /// Most TCP connections served at once, counted from accept (before the handshake). When
    /// all are taken, the oldest connection still in its TLS handshake gives up its slot to the
    /// newcomer; with none in a handshake, the newcomer is closed at once. Default: `1024`.
    pub max_connections: usize,
    /// Most TCP connections from one source address at once; over it, a new connection is
    /// closed at once, so one client cannot take every slot. Default: `64`.
    pub max_connections_per_ip: usize,
    /// A connection (TCP or local) with no open stream for this long is closed. Default: `5m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub idle_timeout: Duration,
    /// Most local-socket connections at once; a connection over it is closed at once.
    /// Default: `64`.
    pub max_local_connections: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: String::new(),
            local_socket: None,
            handshake_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_ip: 64,
            idle_timeout: Duration::from_secs(300),
            max_local_connections: 64,
        }
    }
}

/// `[packages]`: which package manager, how often to scan, and where its database lives.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackagesSection {
    /// `auto` (from os-release ID/ID_LIKE, then the binaries present), `apt`, `dnf`, `yum` or
    /// `zypper`. Default: `auto`.
    pub manager: ManagerChoice,
    /// Scan installed packages, pending updates and reboot state this often (plus up to 10 %
    /// random jitter). Default: `1h`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub scan_interval: Duration,
    /// Scan once at start. Default: `true`.
    pub scan_on_start: bool,
    /// Refresh repository metadata (apt-get update, dnf makecache) when it is older than this;
    /// never more often unless a caller asks. Default: `6h`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub refresh_interval: Duration,
    /// Wait this long for a held dpkg/rpm lock, then fail naming the holder. Default: `5m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub lock_timeout: Duration,
    /// Deadline for one scan command (simulation, check-update, rpm -qa). Default: `10m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub command_timeout: Duration,
    /// Deadline for a metadata refresh. Default: `15m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub refresh_timeout: Duration,
    /// apt: `dist-upgrade` or `upgrade` defines what is pending. Default: `dist-upgrade`.
    pub apt_upgrade: crate::pkg::apt::UpgradeMode,
    /// apt: exported as APT_CONFIG for every apt command (point apt at another root).
    /// Default: unset.
    pub apt_config: Option<PathBuf>,
    /// apt: extra `-o` options for every apt command, e.g. `["Acquire::Retries=3"]`.
    /// Default: none.
    pub apt_options: Vec<String>,
    /// dpkg's status database, read directly for the inventory. Its directory holds the dpkg
    /// locks. Default: `/var/lib/dpkg/status`.
    pub dpkg_status: PathBuf,
    /// Debian family reboot flag; `.pkgs` beside it names the packages. Default:
    /// `/var/run/reboot-required`.
    pub reboot_required_file: PathBuf,
    /// dnf/yum: extra arguments for every command, e.g. `["--installroot=/srv/root",
    /// "--setopt=reposdir=/srv/repos"]`. Default: none.
    pub dnf_args: Vec<String>,
    /// rpm: `--root` for inventory and reboot checks. Default: unset (the host; with zypper,
    /// the `--root` of `zypper_args` if it has one).
    pub rpm_root: Option<PathBuf>,
    /// zypper: extra global options for every zypper command, e.g. `["--root", "/srv/root"]`
    /// (the agent's own reboot flag and lock file then live under that root too). Default: none.
    pub zypper_args: Vec<String>,
    /// dpkg: extra arguments when the agent runs dpkg itself (`--audit`, `--configure -a`),
    /// e.g. `["--root=/srv/root"]`; `--admindir` comes from `dpkg_status`. Default: none.
    pub dpkg_args: Vec<String>,
    /// Deadline for one package operation of a job. Default: `30m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub apply_timeout: Duration,
}

impl Default for PackagesSection {
    fn default() -> Self {
        Self {
            manager: ManagerChoice::Auto,
            scan_interval: Duration::from_secs(3600),
            scan_on_start: true,
            refresh_interval: Duration::from_secs(6 * 3600),
            lock_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(600),
            refresh_timeout: Duration::from_secs(900),
            apt_upgrade: crate::pkg::apt::UpgradeMode::DistUpgrade,
            apt_config: None,
            apt_options: Vec::new(),
            dpkg_status: PathBuf::from("/var/lib/dpkg/status"),
            reboot_required_file: PathBuf::from("/var/run/reboot-required"),
            dnf_args: Vec::new(),
            rpm_root: None,
            zypper_args: Vec::new(),
            dpkg_args: Vec::new(),
            apply_timeout: Duration::from_secs(1800),
        }
    }
}

/// `[jobs]`: who may sign jobs, and the limits every job lives within.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSection {
    /// Ed25519 public keys (PEM SubjectPublicKeyInfo, `*.pem` or `*.pub`) whose signatures are
    /// trusted. SIGHUP reloads it. Default: `/etc/patch-agent/trusted-keys`.
    pub trusted_keys_dir: PathBuf,
    /// Longest allowed time between a job's start of validity and its expiry. Default: `24h`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub max_job_lifetime: Duration,
    /// Allowance for clocks that disagree, on not_before and expires_at. Default: `5m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub clock_skew: Duration,
    /// Default and upper bound of a job's max_duration. Default: `2h`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub max_job_duration: Duration,
    /// Jobs waiting to run; a submission beyond this is refused (RESOURCE_EXHAUSTED).
    /// Default: `16`.
    pub queue_size: usize,
    /// Finished jobs stay in the journal at least this long, and always until they expire (so
    /// a replay is recognised). Default: `7d`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub history_retention: Duration,
    /// Refuse to apply when any of `free_space_paths` has less free space than this (MiB).
    /// Default: `500`.
    pub min_free_mib: u64,
    /// File systems checked before applying; missing paths are skipped. Default:
    /// `["/", "/var", "/boot"]`.
    pub free_space_paths: Vec<PathBuf>,
    /// Where hooks named by jobs live: root-owned executables, not group/world-writable.
    /// Default: `/etc/patch-agent/hooks.d`.
    pub hooks_dir: PathBuf,
    /// Deadline for one hook; its process group is killed after. Default: `5m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub hook_timeout: Duration,
    /// Post-patch checks: how long each may keep failing before the job fails. Default: `2m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub check_timeout: Duration,
    /// Post-patch checks: the pause between attempts. Default: `2s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub check_interval: Duration,
    /// The command that reboots the host (argv, no shell). Default: `["systemctl", "reboot"]`.
    pub reboot_command: Vec<String>,
    /// After the reboot command, how long until a job whose boot id has not changed fails with
    /// "reboot did not happen". Default: `10m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub reboot_grace: Duration,
}

impl Default for JobsSection {
    fn default() -> Self {
        Self {
            trusted_keys_dir: PathBuf::from("/etc/patch-agent/trusted-keys"),
            max_job_lifetime: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(300),
            max_job_duration: Duration::from_secs(2 * 3600),
            queue_size: 16,
            history_retention: Duration::from_secs(7 * 24 * 3600),
            min_free_mib: 500,
            free_space_paths: vec!["/".into(), "/var".into(), "/boot".into()],
            hooks_dir: PathBuf::from("/etc/patch-agent/hooks.d"),
            hook_timeout: Duration::from_secs(300),
            check_timeout: Duration::from_secs(120),
            check_interval: Duration::from_secs(2),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
            reboot_grace: Duration::from_secs(600),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint. Off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `ADDRESS:PORT` for plain HTTP `GET /metrics` (the Prometheus text format), e.g.
    /// `"127.0.0.1:9591"`. It tells whoever can reach it what this host lacks in patches, so
    /// keep it on loopback (node-exporter or a local Prometheus agent scrapes it) unless the
    /// network is trusted. Default: unset (no endpoint). Changing it needs a restart.
    pub listen: String,
}

impl MetricsSection {
    fn check(&self, out: &mut Findings) {
        if self.listen.is_empty() {
            return;
        }
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            out.bad(
                "metrics.listen",
                format!(
                    "`{}` is not an address:port ({e}); use e.g. \"127.0.0.1:9591\"",
                    self.listen
                ),
            );
        }
    }
}

/// `[report]`: where the agent reports job results and inventory. Unset `controller` means no
/// reporting. Reports wait in a durable outbox in `state_dir` until the controller has them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSection {
    /// The controller, `HOST:PORT`, reached over mutual TLS with the `[tls]` certificate and key.
    /// Default: unset (reports are not sent).
    pub controller: String,
    /// More controllers (replicas on one database), `HOST:PORT` each, tried in order after
    /// `controller` when the one in use cannot be reached. The agent stays with the one it
    /// reached until that fails. Default: none.
    pub controllers: Vec<String>,
    /// The name to verify in the controller's certificate. Default: the host part of the
    /// address dialled.
    pub server_name: String,
    /// The CA the controller's certificate must chain to. Default: `[tls] ca`.
    pub ca: Option<PathBuf>,
    /// Reports kept while the controller cannot be reached. When full, intermediate progress
    /// is dropped first, then the oldest results; drops are counted and reported. Default:
    /// `1000`.
    pub outbox_size: usize,
    /// First pause after a failed send; it doubles (with jitter) up to `retry_max`.
    /// Default: `1s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub retry_initial: Duration,
    /// Longest pause between attempts. Default: `5m`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub retry_max: Duration,
    /// Deadline for one call to the controller. Default: `15s`.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub timeout: Duration,
}

impl Default for ReportSection {
    fn default() -> Self {
        Self {
            controller: String::new(),
            controllers: Vec::new(),
            server_name: String::new(),
            ca: None,
            outbox_size: 1000,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            timeout: Duration::from_secs(15),
        }
    }
}

impl ReportSection {
    /// Every controller address, in the order they are tried: `controller`, then
    /// `controllers`, each once.
    pub fn addresses(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in std::iter::once(&self.controller).chain(&self.controllers) {
            if !a.is_empty() && !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Whether the agent reports to a controller at all.
    pub fn is_set(&self) -> bool {
        !self.addresses().is_empty()
    }

    /// The addresses as one line, for logs and messages.
    pub fn shown(&self) -> String {
        self.addresses().join(", ")
    }

    /// The name to verify in the certificate of the controller at `address`.
    pub fn server_name_for<'a>(&'a self, address: &'a str) -> &'a str {
        if !self.server_name.is_empty() {
            return &self.server_name;
        }
        host_part(address).unwrap_or_default()
    }
}

/// `[packages] manager`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ManagerChoice {
    #[default]
    Auto,
    Apt,
    Dnf,
    Yum,
    Zypper,
}

/// `[log]`: how the agent logs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `plain` (lines suited to journald) or `json`. `--log-format` overrides. Default: `plain`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `patch_agent=debug,info`. `RUST_LOG` overrides.
    /// Default: `info`.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Dotted key (`tls.key`), or empty when the problem is with the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The TCP listen address, already validated by [`load`]; None when `[server] listen` is
    /// unset (no TCP port).
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.server.listen.is_empty() {
            return Ok(None);
        }
        parse_listen(&self.server.listen).map(Some)
    }
}

fn parse_listen(listen: &str) -> Result<SocketAddr, String> {
    listen.parse().map_err(|e| {
        format!(
            "`{listen}` is not an address:port ({e}); use e.g. \"0.0.0.0:7443\" or \"[::]:7443\""
        )
    })
}

/// Reads, parses and checks the configuration at `path` (with the `enrolled.toml` beside it;
/// see [`layers`]), returning every problem found. Checks only the files themselves;
/// certificate files are checked by [`patch_agent_service::tls`].
pub fn load(path: &Path) -> Result<Config, Problems> {
    load_layers(path).map(|(config, _)| config)
}

/// [`load`], also returning both layers (for `check-config`'s origins).
pub fn load_layers(path: &Path) -> Result<(Config, Layers), Problems> {
    let layers = Layers::read(path)?;
    let (config, mut problems) = parse_table(layers.merged());
    let attribute = |problems: Vec<(String, String)>| {
        Problems(
            problems
                .into_iter()
                .map(|(key, message)| Problem {
                    file: layers.file_of(path, &key).unwrap_or(path).to_path_buf(),
                    key,
                    message,
                })
                .collect(),
        )
    };
    let Some(mut config) = config else {
        return Err(attribute(problems));
    };
    problems.extend(validate(&config));
    if !problems.is_empty() {
        return Err(attribute(problems));
    }
    config.enrolled = layers.enrolled.as_ref().map(|(p, _)| p.clone());
    Ok((config, layers))
}

/// Parses TOML text into a [`Config`], collecting every structural problem (syntax, unknown keys,
/// wrong types) as `(key, message)`. Returns `None` only when the text is not TOML at all.
pub fn parse(text: &str) -> (Option<Config>, Vec<(String, String)>) {
    match text.parse() {
        Ok(table) => parse_table(table),
        Err(e) => {
            let e: toml::de::Error = e;
            let msg = e.to_string().trim_end().replace('\n', " | ");
            (
                None,
                vec![(String::new(), format!("not valid TOML: {msg}"))],
            )
        }
    }
}

/// [`parse`] for a table already read.
pub fn parse_table(mut table: toml::Table) -> (Option<Config>, Vec<(String, String)>) {
    let mut problems = Vec::new();
    // A bad key is reported, removed, and parsing resumes, so all bad keys are found in one run.
    // Each round removes one key, so this terminates; the bound guards against surprises.
    for _ in 0..256 {
        let value = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, Config>(value) {
            Ok(config) => return (Some(config), problems),
            Err(err) => {
                let mut path: Vec<String> = err
                    .path()
                    .iter()
                    .filter_map(|seg| match seg {
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        _ => None,
                    })
                    .collect();
                let inner = err.inner().to_string();
                let message = if let Some(name) = unknown_field(&inner) {
                    if path.last().map(String::as_str) != Some(name) {
                        path.push(name.to_string());
                    }
                    match inner.split_once(", expected ") {
                        Some((_, expected)) => format!("unknown key; expected {expected}"),
                        None => "unknown key".to_string(),
                    }
                } else {
                    inner.clone()
                };
                let key = path.join(".");
                problems.push((key, message));
                if !remove_path(&mut table, &path) {
                    return (None, problems);
                }
            }
        }
    }
    (None, problems)
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(name, _)| name)
}

fn remove_path(table: &mut toml::Table, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => table.remove(last).is_some(),
        [first, rest @ ..] => match table.get_mut(first) {
            Some(toml::Value::Table(inner)) => remove_path(inner, rest),
            Some(toml::Value::Array(items)) => {
                // An element of an array: drop the whole array, reported once.
                let _ = items;
                table.remove(first).is_some()
            }
            _ => false,
        },
    }
}

/// Semantic checks on a structurally valid configuration; returns `(key, message)` pairs.
/// Each section checks itself.
pub fn validate(config: &Config) -> Vec<(String, String)> {
    let mut out = Findings::default();
    config.server.check(&mut out);
    config.agent.check(&mut out);
    check_tls(&config.tls, &mut out);
    check_auth(&config.auth, &mut out);
    config.packages.check(&mut out);
    config.report.check(&mut out);
    config.metrics.check(&mut out);
    config.jobs.check(&mut out);
    config.log.check(&mut out);
    out.0
}

/// Problems found by the section checks, as `(key, message)`.
#[derive(Default)]
struct Findings(Vec<(String, String)>);

impl Findings {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_string(), message.into()));
    }

    fn absolute(&mut self, key: &str, path: &Path) {
        if !path.is_absolute() {
            self.bad(
                key,
                format!("`{}` must be an absolute path", path.display()),
            );
        }
    }

    fn at_least_one(&mut self, key: &str, n: usize) {
        if n == 0 {
            self.bad(key, "must be at least 1");
        }
    }

    fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.bad(key, "must be greater than 0");
        }
    }
}

impl ServerSection {
    fn check(&self, out: &mut Findings) {
        if !self.listen.is_empty()
            && let Err(e) = parse_listen(&self.listen)
        {
            out.bad("server.listen", e);
        }
        if let Some(sock) = &self.local_socket {
            out.absolute("server.local_socket", sock);
        }
        out.positive("server.handshake_timeout", self.handshake_timeout);
        out.positive("server.idle_timeout", self.idle_timeout);
        out.at_least_one("server.max_connections_per_ip", self.max_connections_per_ip);
        out.at_least_one("server.max_local_connections", self.max_local_connections);
        out.at_least_one("server.max_connections", self.max_connections);
    }
}

impl AgentSection {
    fn check(&self, out: &mut Findings) {
        out.absolute("agent.state_dir", &self.state_dir);
        if !self.host_id.is_empty()
            && let Err(e) = check_host_id(&self.host_id)
        {
            out.bad("agent.host_id", e);
        }
        for (k, v) in &self.labels {
            if let Err(e) = check_label(k, v) {
                out.bad(&format!("agent.labels.{k}"), e);
            }
        }
    }
}

fn check_tls(tls: &TlsSection, out: &mut Findings) {
    for (key, path) in [
        ("tls.ca", &tls.ca),
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
    ] {
        if path.as_os_str().is_empty() {
            out.bad(key, "must name a PEM file");
        }
    }
}

fn check_auth(auth: &AuthSection, out: &mut Findings) {
    for (key, list) in [
        ("auth.controllers", &auth.controllers),
        ("auth.viewers", &auth.viewers),
    ] {
        for (i, id) in list.iter().enumerate() {
            if id.is_empty()
                || id.len() > 1024
                || id.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                out.bad(
                    &format!("{key}.{i}"),
                    format!(
                        "{id:?} is not an identity: use a certificate's SAN DNS name or URI, without spaces"
                    ),
                );
            }
        }
    }
    for id in &auth.controllers {
        if auth.viewers.contains(id) {
            out.bad(
                "auth.viewers",
                format!("{id:?} is listed as both controller and viewer; keep it in one list"),
            );
        }
    }
}

impl PackagesSection {
    fn check(&self, out: &mut Findings) {
        for (key, d) in [
            ("packages.scan_interval", self.scan_interval),
            ("packages.refresh_interval", self.refresh_interval),
            ("packages.command_timeout", self.command_timeout),
            ("packages.refresh_timeout", self.refresh_timeout),
        ] {
            if d < Duration::from_secs(1) {
                out.bad(key, "must be at least 1s");
            }
        }
        out.absolute("packages.dpkg_status", &self.dpkg_status);
        out.absolute("packages.reboot_required_file", &self.reboot_required_file);
        if let Some(p) = &self.apt_config {
            out.absolute("packages.apt_config", p);
        }
        if let Some(p) = &self.rpm_root {
            out.absolute("packages.rpm_root", p);
        }
        for (key, list) in [
            ("packages.apt_options", &self.apt_options),
            ("packages.dnf_args", &self.dnf_args),
            ("packages.zypper_args", &self.zypper_args),
        ] {
            for (i, o) in list.iter().enumerate() {
                if o.is_empty() || o.contains(['\n', '\0']) {
                    out.bad(
                        &format!("{key}.{i}"),
                        format!("{o:?} is not a usable option"),
                    );
                }
            }
        }
    }

    /// The scanner's schedule.
    pub fn schedule(&self) -> crate::pkg::scanner::Schedule {
        crate::pkg::scanner::Schedule {
            scan_interval: self.scan_interval,
            refresh_interval: self.refresh_interval,
            scan_on_start: self.scan_on_start,
        }
    }
}

impl ReportSection {
    fn check(&self, out: &mut Findings) {
        if !self.controller.is_empty() && !is_host_port(&self.controller) {
            out.bad(
                "report.controller",
                format!(
                    "`{}` is not HOST:PORT; use e.g. \"controller.example:7000\"",
                    self.controller
                ),
            );
        }
        for (i, a) in self.controllers.iter().enumerate() {
            if !is_host_port(a) {
                out.bad(
                    &format!("report.controllers.{i}"),
                    format!("`{a}` is not HOST:PORT; use e.g. \"controller-b.example:7000\""),
                );
            }
        }
        if self.controller.is_empty()
            && self.controllers.is_empty()
            && (!self.server_name.is_empty() || self.ca.is_some())
        {
            out.bad(
                "report.controller",
                "server_name and ca are set but controller is not; set controller = \"HOST:PORT\"",
            );
        }
        if self.outbox_size < 2 {
            out.bad("report.outbox_size", "must be at least 2");
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            out.bad(
                "report.retry_initial",
                "must be greater than 0 and at most report.retry_max",
            );
        }
        out.positive("report.timeout", self.timeout);
    }
}

impl JobsSection {
    fn check(&self, out: &mut Findings) {
        out.absolute("jobs.trusted_keys_dir", &self.trusted_keys_dir);
        if self.reboot_command.first().is_none_or(String::is_empty) {
            out.bad(
                "jobs.reboot_command",
                "must name a program, e.g. [\"systemctl\", \"reboot\"]",
            );
        }
        out.at_least_one("jobs.queue_size", self.queue_size);
        if self.max_job_lifetime.is_zero() || self.max_job_duration.is_zero() {
            out.bad(
                "jobs.max_job_lifetime",
                "max_job_lifetime and max_job_duration must be greater than 0",
            );
        }
    }

    /// What admission allows on this host (`host_id`, `machine_id`), with hook files checked
    /// in `hooks_dir`.
    pub fn admission_policy(
        &self,
        host_id: &str,
        machine_id: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> AdmissionPolicy {
        AdmissionPolicy {
            host_id: host_id.to_string(),
            machine_id: machine_id.to_string(),
            labels: labels.clone(),
            max_lifetime: self.max_job_lifetime,
            clock_skew: self.clock_skew,
            max_duration: self.max_job_duration,
            hooks: Some(patch_agent_wire::job::Hooks {
                dir: self.hooks_dir.clone(),
                check: crate::jobs::hooks::check_hook,
            }),
        }
    }
}

impl LogSection {
    fn check(&self, out: &mut Findings) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            out.bad(
                "log.level",
                format!(
                    "`{}` is not a log filter ({e}); use e.g. \"info\" or \"patch_agent=debug,info\"",
                    self.level
                ),
            );
        }
    }
}

/// A duration as the file writes it (`5m`, `1h 30m`), for `running-config.json`.
fn show_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"5m\" or \"6h\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let (c, p) = parse("");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(c, Some(Config::default()));
    }

    #[test]
    fn every_unknown_key_is_reported_at_once() {
        let (c, p) = parse(
            "bogus = 1\n[server]\nlisten = \"127.0.0.1:1\"\nlistne = \"x\"\n[tls]\ncert = \"/a\"\nkye = \"/b\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["bogus", "server.listne", "tls.kye"], "{p:?}");
        assert!(p[1].1.contains("listen"), "suggests valid keys: {}", p[1].1);
        let c = c.expect("rest still parses");
        assert_eq!(c.server.listen, "127.0.0.1:1");
        assert_eq!(c.tls.cert, PathBuf::from("/a"));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let (_, p) = parse("[server]\ndrain_timeout = \"soon\"\nmax_connections = \"many\"\n");
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["server.drain_timeout", "server.max_connections"],
            "{p:?}"
        );
        assert!(p[0].1.contains("not a duration"), "{}", p[0].1);
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let (c, p) = parse("[server\nlisten=");
        assert!(c.is_none());
        assert_eq!(p.len(), 1);
        assert!(p[0].1.starts_with("not valid TOML"), "{}", p[0].1);
    }

    #[test]
    fn semantic_problems() {
        let mut c = Config::default();
        c.server.listen = "localhost".into();
        c.agent.state_dir = "relative".into();
        c.agent.host_id = "bad host".into();
        c.auth.controllers = vec!["ops".into(), "".into()];
        c.auth.viewers = vec!["ops".into()];
        let keys: Vec<String> = validate(&c).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "server.listen",
                "agent.state_dir",
                "agent.host_id",
                "auth.controllers.1",
                "auth.viewers"
            ]
        );
    }

    #[test]
    fn metrics_listen_is_checked_and_names_its_key() {
        let (c, p) = parse("[metrics]\nlisten = \"localhost:9591\"\n");
        assert!(p.is_empty(), "{p:?}");
        let problems = validate(&c.expect("parses"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "metrics.listen");
        assert!(
            problems[0].1.contains("\"127.0.0.1:9591\""),
            "{}",
            problems[0].1
        );
        let (c, _) = parse("[metrics]\nlisten = \"127.0.0.1:9591\"\n");
        assert!(validate(&c.expect("parses")).is_empty());
        let (_, p) = parse("[metrics]\nport = 9591\n");
        assert_eq!(p[0].0, "metrics.port", "{p:?}");
    }

    #[test]
    fn packaged_config_is_valid() {
        let text = include_str!("../../../../packaging/agent.toml");
        let (c, p) = parse(text);
        assert!(p.is_empty(), "{p:?}");
        let c = c.expect("parses");
        assert!(validate(&c).is_empty());
        // The packaged file shows the defaults, and turns the TCP listener (for grpcurl and
        // direct rollouts) and the local socket on.
        let mut expected = Config::default();
        expected.server.listen = "0.0.0.0:7443".into();
        expected.server.local_socket = Some("/run/patch-agent/agent.sock".into());
        assert_eq!(c, expected);
    }

    #[test]
    fn report_and_labels_are_checked() {
        let text = "[agent]\nlabels = { Environment = \"x\", ok = \"a\\u0007b\" }\n\
                    [report]\ncontroller = \"nohost\"\noutbox_size = 1\nretry_initial = \"10m\"\n";
        let (c, p) = parse(text);
        assert!(p.is_empty(), "{p:?}");
        let keys: Vec<String> = validate(&c.expect("parses"))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for k in [
            "agent.labels.Environment",
            "agent.labels.ok",
            "report.controller",
            "report.outbox_size",
            "report.retry_initial",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
        }
        let (c, _) = parse("[report]\nserver_name = \"ctl\"\n");
        assert!(
            validate(&c.expect("parses"))
                .iter()
                .any(|(k, m)| k == "report.controller" && m.contains("HOST:PORT"))
        );
        let r = ReportSection {
            controller: "[::1]:7000".into(),
            ..ReportSection::default()
        };
        assert_eq!(r.server_name_for("[::1]:7000"), "::1");
        // Several controllers: tried in order, each once; each must be HOST:PORT.
        let (c, p) = parse(
            "[report]\ncontroller = \"a:7000\"\ncontrollers = [\"b:7000\", \"a:7000\", \"nohost\"]\n",
        );
        assert!(p.is_empty(), "{p:?}");
        let c = c.expect("parses");
        assert_eq!(c.report.addresses(), ["a:7000", "b:7000", "nohost"]);
        assert_eq!(c.report.server_name_for("b:7000"), "b");
        let bad = validate(&c);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0, "report.controllers.2");
        let (c, p) = parse("[report]\ncontrollers = [\"b:7000\"]\nserver_name = \"ctl\"\n");
        assert!(p.is_empty(), "{p:?}");
        let c = c.expect("parses");
        assert!(validate(&c).is_empty(), "controllers alone is enough");
        assert!(c.report.is_set());
        assert_eq!(c.report.server_name_for("b:7000"), "ctl");
    }

    #[test]
    fn parse_never_panics_on_junk() {
        for text in [
            "\u{0}",
            "[[agent]]",
            "agent = 3",
            "[auth]\ncontrollers = [1, {a=1}]",
            "[server]\nlisten = []",
        ] {
            let _ = parse(text);
        }
    }
}
