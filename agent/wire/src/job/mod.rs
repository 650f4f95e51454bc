//! The signed job: what a job may say, and admission of an envelope into a [`ValidJob`]
//! (envelope, signature, schema, policy). `patchctl job sign` validates with the same rules
//! before it signs; the agent's queue, runner and journal live in `patch_agent::jobs`.
//!
//! Admission order, each step refusing with its own gRPC code before anything runs:
//! size (64 KiB) → key id and Ed25519 signature over the exact bytes received (UNAUTHENTICATED)
//! → strict decoding and field validation (INVALID_ARGUMENT) → target host (PERMISSION_DENIED)
//! → validity window and lifetime (FAILED_PRECONDITION) → replay (ALREADY_EXISTS).

pub mod names;
pub mod outcome;
pub mod schema;
pub mod trust;

use crate::ids::valid_job_id;
use crate::packages::Severity;
use crate::proto::v1 as pb;
use crate::time::{plus, timestamp};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest accepted envelope (payload, key id and signature).
pub const MAX_ENVELOPE: usize = 64 * 1024;

/// Why a submission was refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    OtherHost(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Replay(String),
    #[error("{0}")]
    QueueFull(String),
}

impl Rejection {
    /// A short label for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Unauthenticated(_) => "unauthenticated",
            Rejection::Invalid(_) => "invalid",
            Rejection::OtherHost(_) => "other_host",
            Rejection::Precondition(_) => "precondition",
            Rejection::Replay(_) => "replay",
            Rejection::QueueFull(_) => "queue_full",
        }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Rejection::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Rejection::Invalid(_) => tonic::Code::InvalidArgument,
            Rejection::OtherHost(_) => tonic::Code::PermissionDenied,
            Rejection::Precondition(_) => tonic::Code::FailedPrecondition,
            Rejection::Replay(_) => tonic::Code::AlreadyExists,
            Rejection::QueueFull(_) => tonic::Code::ResourceExhausted,
        }
    }
}

/// A package name to leave alone: exact, a glob, or a regex (written `/re/`) matching the whole
/// name.
#[derive(Debug, Clone)]
pub enum Exclude {
    Name(String),
    /// A glob or `/regex/` as written, and the anchored regex it compiled to.
    Pattern(String, regex::Regex),
}

impl Exclude {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Exclude::Name(n) => n == name,
            Exclude::Pattern(_, re) => re.is_match(name),
        }
    }
}

impl std::fmt::Display for Exclude {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exclude::Name(n) | Exclude::Pattern(n, _) => f.write_str(n),
        }
    }
}

/// What a job does.
#[derive(Debug, Clone)]
pub enum Action {
    Scan,
    Upgrade {
        security_only: bool,
        min_severity: Option<Severity>,
        exclude: Vec<Exclude>,
        approve_after_days: u32,
    },
    Install(Vec<(String, Option<String>)>),
    /// Reboot the host (and verify it came back); no package changes.
    Reboot,
}

/// When a job reboots the host after applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootPolicy {
    Never,
    IfRequired,
    Always,
}

/// A job that passed admission.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub id: String,
    pub key_id: String,
    pub targets: Vec<String>,
    pub not_before: Option<SystemTime>,
    pub expires_at: SystemTime,
    pub action: Action,
    pub dry_run: bool,
    pub max_duration: Duration,
    pub window: Option<Window>,
    pub pre_hooks: Vec<String>,
    pub post_hooks: Vec<String>,
    pub checks: Vec<Check>,
    pub reboot_policy: RebootPolicy,
    /// Go on over repositories the refresh could not read (recording them) instead of failing.
    pub allow_repo_errors: bool,
    /// Agree to licences packages ask to be confirmed.
    pub accept_licenses: bool,
}

/// One post-patch check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Unit(String),
    Port(u16),
    Http {
        host: String,
        port: u16,
        path: String,
        url: String,
    },
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Unit(u) => write!(f, "unit {u} active"),
            Check::Port(p) => write!(f, "tcp port {p} accepting connections"),
            Check::Http { url, .. } => write!(f, "{url} answering 200"),
        }
    }
}

/// A systemd unit name.
pub fn valid_unit(u: &str) -> bool {
    (1..=256).contains(&u.len())
        && !u.starts_with('-')
        && u.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'_' | b'-' | b':' | b'\\')
        })
}

/// Parses an `http://host[:port][/path]` URL (no userinfo, no fragment).
pub fn parse_http_url(url: &str) -> Result<Check, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs can be checked"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(['#', ' ', '\r', '\n']) {
        return Err(format!(
            "{url:?} is not a plain http://host[:port]/path URL"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_matches(['[', ']']),
            p.parse::<u16>().map_err(|_| format!("{url:?}: bad port"))?,
        ),
        _ => (authority.trim_matches(['[', ']']), 80),
    };
    if host.is_empty()
        || port == 0
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err(format!("{url:?}: bad host or port"));
    }
    Ok(Check::Http {
        host: host.to_string(),
        port,
        path: path.to_string(),
        url: url.to_string(),
    })
}

/// A maintenance window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
    pub allow_partial: bool,
}

/// Whether a job may start now, must wait, or can no longer start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowCheck {
    Open,
    WaitUntil(SystemTime),
    Missed(String),
}

impl Window {
    /// Decides for a job that would run up to `max_duration` starting at `now`.
    pub fn check(&self, now: SystemTime, max_duration: Duration) -> WindowCheck {
        let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let latest_start = if self.allow_partial {
            self.end
        } else {
            self.end.checked_sub(max_duration).unwrap_or(UNIX_EPOCH)
        };
        if now >= latest_start || latest_start < self.start {
            return WindowCheck::Missed(if self.allow_partial || now >= self.end {
                format!("the maintenance window closed at {}", fmt(self.end))
            } else {
                format!(
                    "less than max_duration ({:?}) left before the window closes at {}",
                    max_duration,
                    fmt(self.end)
                )
            });
        }
        if now < self.start {
            return WindowCheck::WaitUntil(self.start);
        }
        WindowCheck::Open
    }
}

impl ValidJob {
    /// One line describing what the job does, for status and logs.
    pub fn summary(&self) -> String {
        let mut s = match &self.action {
            Action::Scan => "scan".to_string(),
            Action::Upgrade {
                security_only,
                min_severity,
                exclude,
                approve_after_days,
            } => {
                let mut s = if *security_only {
                    "upgrade security"
                } else {
                    "upgrade all"
                }
                .to_string();
                if let Some(sev) = min_severity {
                    s.push_str(&format!(", min severity {}", sev.as_str()));
                }
                if !exclude.is_empty() {
                    let names: Vec<String> = exclude.iter().map(ToString::to_string).collect();
                    s.push_str(&format!(", exclude {}", names.join(" ")));
                }
                if *approve_after_days > 0 {
                    s.push_str(&format!(", approve after {approve_after_days} days"));
                }
                s
            }
            Action::Reboot => "reboot".to_string(),
            Action::Install(specs) => {
                let names: Vec<String> = specs
                    .iter()
                    .map(|(n, v)| v.as_ref().map_or_else(|| n.clone(), |v| format!("{n}={v}")))
                    .collect();
                format!("install {}", names.join(" "))
            }
        };
        if let Some(w) = &self.window {
            s.push_str(&format!(
                ", window {}/{}{}",
                humantime::format_rfc3339_seconds(w.start),
                humantime::format_rfc3339_seconds(w.end),
                if w.allow_partial {
                    " (partial allowed)"
                } else {
                    ""
                }
            ));
        }
        if !self.pre_hooks.is_empty() {
            s.push_str(&format!(", pre-hooks {}", self.pre_hooks.join(" ")));
        }
        if !self.post_hooks.is_empty() {
            s.push_str(&format!(", post-hooks {}", self.post_hooks.join(" ")));
        }
        match self.reboot_policy {
            RebootPolicy::Never => {}
            RebootPolicy::IfRequired => s.push_str(", reboot if required"),
            RebootPolicy::Always => s.push_str(", reboot always"),
        }
        if self.accept_licenses {
            s.push_str(", licences accepted");
        }
        if self.dry_run {
            s.push_str(" (dry run)");
        }
        s
    }
}

/// The host a job must name, and the limits admission applies.
#[derive(Debug, Clone)]
pub struct AdmissionPolicy {
    pub host_id: String,
    pub machine_id: String,
    /// The host's own labels, which a job's target_selector must match.
    pub labels: std::collections::BTreeMap<String, String>,
    pub max_lifetime: Duration,
    pub clock_skew: Duration,
    pub max_duration: Duration,
    /// Where hooks live and how a hook file there is checked (the agent's rule: a root-owned
    /// executable no one else can write); None skips the file checks (patchctl signing offline).
    pub hooks: Option<Hooks>,
}

/// The host's hooks directory and the check a named hook file must pass there.
#[derive(Debug, Clone)]
pub struct Hooks {
    pub dir: PathBuf,
    /// Returns the hook's path, or why it may not run.
    pub check: fn(&Path, &str) -> Result<PathBuf, String>,
}

/// A hook name: 1–64 of `[A-Za-z0-9._-]`, not starting with `-` or `.`; never a path.
pub fn valid_hook_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<Result<SystemTime, String>> {
    ts.as_ref().map(timestamp)
}

/// Checks a decoded job against the policy; `manager` is the backend's name, for name grammar.
/// Each field is checked in the order below, so the first problem is the one reported.
pub fn validate(
    job: pb::Job,
    key_id: &str,
    policy: &AdmissionPolicy,
    manager: Option<&str>,
    now: SystemTime,
) -> Result<ValidJob, Rejection> {
    let invalid = Rejection::Invalid;
    let grammar = names::Grammar::of(manager);
    if !valid_job_id(&job.job_id) {
        return Err(invalid(format!(
            "job_id {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            job.job_id
        )));
    }
    let reboot_policy = match pb::RebootPolicy::try_from(job.reboot_policy) {
        Ok(pb::RebootPolicy::IfRequired) => RebootPolicy::IfRequired,
        Ok(pb::RebootPolicy::Always) => RebootPolicy::Always,
        Ok(_) => RebootPolicy::Never,
        Err(_) => {
            return Err(invalid(format!(
                "unknown reboot_policy {}",
                job.reboot_policy
            )));
        }
    };
    let action = action(job.action, grammar).map_err(invalid)?;
    if let Some(t) = job.targets.iter().find(|t| t.is_empty() || t.len() > 253) {
        return Err(invalid(format!("target {t:?} is not a host id")));
    }
    check_selector(&job.targets, &job.target_selector).map_err(invalid)?;
    let expires_at = match time(&job.expires_at) {
        None => return Err(invalid("expires_at is required".into())),
        Some(t) => t.map_err(|e| invalid(format!("expires_at: {e}")))?,
    };
    let not_before = time(&job.not_before)
        .transpose()
        .map_err(|e| invalid(format!("not_before: {e}")))?;
    let max_duration = match job.max_duration {
        None => policy.max_duration,
        Some(d) => max_duration(d, policy.max_duration).map_err(invalid)?,
    };
    let window = match &job.window {
        None => None,
        Some(w) => Some(window(w, plus(expires_at, policy.clock_skew)).map_err(invalid)?),
    };
    for name in job.pre_hooks.iter().chain(&job.post_hooks) {
        hook(name, policy.hooks.as_ref()).map_err(invalid)?;
    }
    let checks = match &job.checks {
        None => Vec::new(),
        Some(c) => checks(c).map_err(invalid)?,
    };
    admissible_here_and_now(
        &job.job_id,
        (&job.targets, &job.target_selector),
        expires_at,
        not_before,
        policy,
        now,
    )?;
    Ok(ValidJob {
        id: job.job_id,
        key_id: key_id.to_string(),
        targets: job.targets,
        not_before,
        expires_at,
        action,
        dry_run: job.dry_run,
        max_duration,
        window,
        pre_hooks: job.pre_hooks,
        post_hooks: job.post_hooks,
        checks,
        reboot_policy,
        allow_repo_errors: job.allow_repo_errors,
        accept_licenses: job.accept_licenses,
    })
}

fn action(
    action: Option<pb::job::Action>,
    grammar: Option<names::Grammar>,
) -> Result<Action, String> {
    match action {
        None => Err("the job has no action (scan, upgrade or install)".into()),
        Some(pb::job::Action::Scan(_)) => Ok(Action::Scan),
        Some(pb::job::Action::Upgrade(u)) => upgrade(u, grammar),
        Some(pb::job::Action::Install(i)) => install(i, grammar),
        Some(pb::job::Action::Reboot(_)) => Ok(Action::Reboot),
    }
}

fn upgrade(u: pb::UpgradeAction, grammar: Option<names::Grammar>) -> Result<Action, String> {
    let scope = pb::UpgradeScope::try_from(u.scope)
        .map_err(|_| format!("unknown upgrade scope {}", u.scope))?;
    let min_severity = match pb::Severity::try_from(u.min_severity) {
        Ok(pb::Severity::Unspecified) => None,
        Ok(pb::Severity::Critical) => Some(Severity::Critical),
        Ok(pb::Severity::Important) => Some(Severity::Important),
        Ok(pb::Severity::Moderate) => Some(Severity::Moderate),
        Ok(pb::Severity::Low) => Some(Severity::Low),
        _ => {
            return Err(format!(
                "min_severity {} is not a severity floor",
                u.min_severity
            ));
        }
    };
    if scope == pb::UpgradeScope::Unspecified && min_severity.is_none() {
        return Err("upgrade needs a scope (ALL or SECURITY) or a min_severity".into());
    }
    let exclude = u
        .exclude
        .into_iter()
        .enumerate()
        .map(|(i, e)| exclude(i, e, grammar))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Action::Upgrade {
        security_only: scope == pb::UpgradeScope::Security || min_severity.is_some(),
        min_severity,
        exclude,
        approve_after_days: u.approve_after_days,
    })
}

/// `upgrade.exclude[i]`: a package name, a glob, or a `/regex/` matching the whole name.
fn exclude(i: usize, e: String, grammar: Option<names::Grammar>) -> Result<Exclude, String> {
    let field = format!("upgrade.exclude[{i}] {e:?}");
    if let Some(re) = e.strip_prefix('/').and_then(|r| r.strip_suffix('/')) {
        if re.is_empty() || re.len() > 1024 {
            return Err(format!("{field}: a /regex/ must be 1-1024 characters"));
        }
        let re = regex::RegexBuilder::new(&format!("^(?:{re})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|err| format!("{field} is not a valid regex: {err}"))?;
        return Ok(Exclude::Pattern(e, re));
    }
    if e.contains(['*', '?', '[']) {
        let re = names::glob_regex(&e).map_err(|why| format!("{field}: the glob {why}"))?;
        return Ok(Exclude::Pattern(e, re));
    }
    if let Some(why) = names::name_problem(grammar, &e) {
        return Err(format!(
            "{field} {why}; an exclude is a package name, a glob or /regex/"
        ));
    }
    Ok(Exclude::Name(e))
}

fn install(i: pb::InstallAction, grammar: Option<names::Grammar>) -> Result<Action, String> {
    if i.packages.is_empty() {
        return Err("install names no packages".into());
    }
    let mut specs = Vec::new();
    for (i, p) in i.packages.into_iter().enumerate() {
        if let Some(why) = names::name_problem(grammar, &p.name) {
            return Err(format!("install.packages[{i}].name {:?} {why}", p.name));
        }
        let version = if p.version.is_empty() {
            None
        } else if let Some(why) = names::version_problem(grammar, &p.version) {
            return Err(format!(
                "install.packages[{i}].version {:?} {why}",
                p.version
            ));
        } else {
            Some(p.version)
        };
        specs.push((p.name, version));
    }
    Ok(Action::Install(specs))
}

/// A job's own max_duration: positive, and at most the agent's.
fn max_duration(d: prost_types::Duration, most: Duration) -> Result<Duration, String> {
    // By hand: prost-types' conversion negates the seconds of a negative duration,
    // which overflows for i64::MIN (found by the property test).
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(format!(
            "max_duration {}s {}ns must be positive",
            d.seconds, d.nanos
        ));
    };
    if nanos >= 1_000_000_000 {
        return Err(format!("max_duration nanos {nanos} must be below 1e9"));
    }
    let d = Duration::new(secs, nanos);
    if d.is_zero() || d > most {
        return Err(format!("max_duration {d:?} must be between 0 and {most:?}"));
    }
    Ok(d)
}

/// A maintenance window that starts before it ends, and ends before `latest` (the expiry).
fn window(w: &pb::MaintenanceWindow, latest: SystemTime) -> Result<Window, String> {
    let (Some(start), Some(end)) = (time(&w.start), time(&w.end)) else {
        return Err("a maintenance window needs start and end".into());
    };
    let start = start.map_err(|e| format!("window start: {e}"))?;
    let end = end.map_err(|e| format!("window end: {e}"))?;
    if start >= end {
        return Err("the maintenance window ends before it starts".into());
    }
    if end > latest {
        return Err("the maintenance window ends after the job expires".into());
    }
    Ok(Window {
        start,
        end,
        allow_partial: w.allow_partial,
    })
}

/// A hook named by a job: a plain name, and a file the host allows when it has a hooks dir.
fn hook(name: &str, hooks: Option<&Hooks>) -> Result<(), String> {
    if !valid_hook_name(name) {
        return Err(format!(
            "hook {name:?} must be a name in the hooks directory (1-64 of [A-Za-z0-9._-]), never a path"
        ));
    }
    if let Some(hooks) = hooks {
        (hooks.check)(&hooks.dir, name)?;
    }
    Ok(())
}

fn checks(c: &pb::PostChecks) -> Result<Vec<Check>, String> {
    let mut checks = Vec::new();
    for u in &c.units {
        if !valid_unit(u) {
            return Err(format!("{u:?} is not a systemd unit name"));
        }
        checks.push(Check::Unit(u.clone()));
    }
    for p in &c.tcp_ports {
        let port = u16::try_from(*p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p} is not a TCP port"))?;
        checks.push(Check::Port(port));
    }
    for url in &c.http_urls {
        checks.push(parse_http_url(url)?);
    }
    Ok(checks)
}

/// Most pairs a target_selector may hold.
pub const MAX_SELECTOR: usize = 32;

/// A job names its hosts: by targets, by a selector of well-formed label pairs, or both.
pub fn check_selector(
    targets: &[String],
    selector: &std::collections::HashMap<String, String>,
) -> Result<(), String> {
    if targets.is_empty() && selector.is_empty() {
        return Err(
            "the job names no hosts: it needs targets (host ids) or a target_selector (labels)"
                .into(),
        );
    }
    if selector.len() > MAX_SELECTOR {
        return Err(format!(
            "target_selector has {} pairs; at most {MAX_SELECTOR}",
            selector.len()
        ));
    }
    for (k, v) in selector {
        crate::ids::check_label(k, v).map_err(|e| format!("target_selector: {e}"))?;
    }
    Ok(())
}

/// Whether `labels` hold every pair of `selector`.
pub fn selector_matches<'a>(
    selector: impl IntoIterator<Item = (&'a String, &'a String)>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector
        .into_iter()
        .all(|(k, v)| labels.get(k).is_some_and(|x| x == v))
}

/// Whether a well-formed job is for this host, valid now, and within the allowed lifetime.
fn admissible_here_and_now(
    id: &str,
    (targets, selector): (&[String], &std::collections::HashMap<String, String>),
    expires_at: SystemTime,
    not_before: Option<SystemTime>,
    policy: &AdmissionPolicy,
    now: SystemTime,
) -> Result<(), Rejection> {
    let me = [policy.host_id.as_str(), policy.machine_id.as_str()];
    if !targets.is_empty()
        && !targets
            .iter()
            .any(|t| !t.is_empty() && me.contains(&t.as_str()))
    {
        return Err(Rejection::OtherHost(format!(
            "job {} targets {:?}, not this host ({} / {})",
            id, targets, policy.host_id, policy.machine_id
        )));
    }
    if !selector_matches(selector, &policy.labels) {
        let mut want: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        want.sort();
        return Err(Rejection::OtherHost(format!(
            "job {} selects hosts labelled {}; this host ({}) is labelled {:?}",
            id,
            want.join(","),
            policy.host_id,
            policy.labels
        )));
    }
    if plus(expires_at, policy.clock_skew) <= now {
        return Err(Rejection::Precondition(format!(
            "job {} expired at {}",
            id,
            humantime::format_rfc3339_seconds(expires_at)
        )));
    }
    if let Some(nb) = not_before
        && nb > plus(now, policy.clock_skew)
    {
        return Err(Rejection::Precondition(format!(
            "job {} is not valid before {}",
            id,
            humantime::format_rfc3339_seconds(nb)
        )));
    }
    // Lifetime runs from the start of validity, or from now for a job valid at once.
    let start = not_before.unwrap_or(now);
    let lifetime = expires_at.duration_since(start).unwrap_or_default();
    if lifetime > policy.max_lifetime.saturating_add(policy.clock_skew) {
        return Err(Rejection::Precondition(format!(
            "job {} lives {:?}, longer than the allowed {:?} ([jobs] max_job_lifetime)",
            id,
            Duration::from_secs(lifetime.as_secs()),
            policy.max_lifetime
        )));
    }
    Ok(())
}

/// Verifies and decodes an envelope: size, signature over the exact payload bytes, strict
/// schema, then [`validate`].
pub fn admit(
    env: &pb::SignedJob,
    trust: &trust::TrustStore,
    schema: &schema::Schema,
    policy: &AdmissionPolicy,
    manager: Option<&str>,
    now: SystemTime,
) -> Result<ValidJob, Rejection> {
    let size = env.payload.len() + env.key_id.len() + env.signature.len();
    if size > MAX_ENVELOPE {
        return Err(Rejection::Invalid(format!(
            "the envelope is {size} bytes; the limit is {MAX_ENVELOPE}"
        )));
    }
    if env.key_id.is_empty() || env.signature.is_empty() {
        return Err(Rejection::Unauthenticated(
            "the envelope has no key_id or signature".into(),
        ));
    }
    trust
        .verify(&env.key_id, &env.payload, &env.signature)
        .map_err(Rejection::Unauthenticated)?;
    schema
        .check(".patchagent.v1.Job", &env.payload)
        .map_err(|e| Rejection::Invalid(format!("the payload is not a valid Job: {e}")))?;
    let job = <pb::Job as prost::Message>::decode(env.payload.as_slice())
        .map_err(|e| Rejection::Invalid(format!("the payload is not a valid Job: {e}")))?;
    validate(job, &env.key_id, policy, manager, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AdmissionPolicy {
        AdmissionPolicy {
            host_id: "web1".into(),
            machine_id: "m1".into(),
            labels: Default::default(),
            max_lifetime: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(300),
            max_duration: Duration::from_secs(7200),
            hooks: None,
        }
    }

    fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
        Some(t.into())
    }

    fn job(now: SystemTime) -> pb::Job {
        pb::Job {
            job_id: "job-1".into(),
            targets: vec!["web1".into()],
            expires_at: ts(now + Duration::from_secs(3600)),
            action: Some(pb::job::Action::Upgrade(pb::UpgradeAction {
                scope: pb::UpgradeScope::All as i32,
                exclude: vec!["linux-image-amd64".into(), "/^libc.*/".into()],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_job_passes() {
        let now = SystemTime::now();
        let v = validate(job(now), "k", &policy(), Some("apt"), now).expect("valid");
        assert!(
            matches!(&v.action, Action::Upgrade { security_only: false, exclude, .. } if exclude.len() == 2)
        );
        if let Action::Upgrade { exclude, .. } = &v.action {
            assert!(exclude[1].matches("libc6") && !exclude[1].matches("xlibc"));
            assert!(exclude[0].matches("linux-image-amd64"));
        }
        assert_eq!(
            v.summary(),
            "upgrade all, exclude linux-image-amd64 /^libc.*/"
        );
    }

    #[test]
    fn hosts_are_named_by_targets_or_by_a_selector_of_labels() {
        let now = SystemTime::now();
        let mut p = policy();
        p.labels = [
            ("env".to_string(), "prod".to_string()),
            ("role".into(), "web".into()),
        ]
        .into();
        let mut j = job(now);
        j.targets.clear();
        let e = validate(j.clone(), "k", &p, Some("apt"), now).expect_err("no hosts");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("names no hosts"), "{e}");
        j.target_selector = [("env".to_string(), "prod".to_string())].into();
        validate(j.clone(), "k", &p, Some("apt"), now).expect("selected by env=prod");
        j.target_selector.insert("role".into(), "db".into());
        let e = validate(j.clone(), "k", &p, Some("apt"), now).expect_err("role differs");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.to_string().contains("env=prod,role=db"), "{e}");
        // Both: listed and matching.
        j.target_selector = [("env".to_string(), "prod".to_string())].into();
        j.targets = vec!["web2".into(), "web1".into()];
        validate(j.clone(), "k", &p, Some("apt"), now).expect("listed and matching");
        j.targets = vec!["web2".into()];
        assert_eq!(
            validate(j.clone(), "k", &p, Some("apt"), now)
                .expect_err("not listed")
                .code(),
            tonic::Code::PermissionDenied
        );
        j.target_selector = [("Bad Key".to_string(), "x".to_string())].into();
        assert_eq!(
            validate(j, "k", &p, Some("apt"), now)
                .expect_err("bad key")
                .code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn codes_for_each_problem() {
        let now = SystemTime::now();
        let p = policy();
        let check = |j: pb::Job| validate(j, "k", &p, Some("apt"), now).expect_err("rejected");
        let mut j = job(now);
        j.targets = vec!["web2".into()];
        assert_eq!(check(j).code(), tonic::Code::PermissionDenied);
        let mut j = job(now);
        j.targets = vec!["m1".into()];
        assert!(
            validate(j, "k", &p, Some("apt"), now).is_ok(),
            "machine id targets"
        );
        let mut j = job(now);
        j.expires_at = ts(now - Duration::from_secs(600));
        assert_eq!(check(j).code(), tonic::Code::FailedPrecondition);
        let mut j = job(now);
        j.not_before = ts(now + Duration::from_secs(3600));
        j.expires_at = ts(now + Duration::from_secs(7200));
        assert_eq!(check(j).code(), tonic::Code::FailedPrecondition);
        let mut j = job(now);
        j.expires_at = ts(now + Duration::from_secs(25 * 3600 + 600));
        let e = check(j);
        assert!(
            e.code() == tonic::Code::FailedPrecondition
                && e.to_string().contains("max_job_lifetime"),
            "{e}"
        );
        let mut j = job(now);
        j.expires_at = None;
        assert_eq!(check(j).code(), tonic::Code::InvalidArgument);
        for bad in ["", "a b", "x/y", &"a".repeat(129)] {
            let mut j = job(now);
            j.job_id = bad.to_string();
            assert_eq!(check(j).code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let mut j = job(now);
        j.window = Some(pb::MaintenanceWindow::default());
        assert!(check(j).to_string().contains("needs start and end"));
        let mut j = job(now);
        j.window = Some(pb::MaintenanceWindow {
            start: ts(now + Duration::from_secs(60)),
            end: ts(now + Duration::from_secs(7200)),
            allow_partial: false,
        });
        assert!(check(j).to_string().contains("after the job expires"));
        let mut j = job(now);
        j.reboot_policy = 7;
        assert!(check(j).to_string().contains("unknown reboot_policy"));
        for bad in ["../x", "/bin/sh", "a/b", "..", ".", "-x", ""] {
            let mut j = job(now);
            j.pre_hooks = vec![bad.to_string()];
            assert_eq!(check(j).code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn hostile_package_names_and_versions() {
        let now = SystemTime::now();
        for name in [
            "-oAPT::Update::Pre-Invoke::=touch /tmp/pwned",
            "foo;id",
            "$(id)",
            "a b",
            "",
        ] {
            let mut j = job(now);
            j.action = Some(pb::job::Action::Install(pb::InstallAction {
                packages: vec![pb::PackageSpec {
                    name: name.into(),
                    version: String::new(),
                }],
            }));
            let e = validate(j, "k", &policy(), Some("apt"), now).expect_err(name);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}");
        }
        for version in ["-1", "1.0;id", "$(id)", "1 2"] {
            let mut j = job(now);
            j.action = Some(pb::job::Action::Install(pb::InstallAction {
                packages: vec![pb::PackageSpec {
                    name: "alpha".into(),
                    version: version.into(),
                }],
            }));
            assert!(
                validate(j, "k", &policy(), Some("apt"), now).is_err(),
                "{version}"
            );
        }
        let mut j = job(now);
        j.action = Some(pb::job::Action::Upgrade(pb::UpgradeAction {
            scope: 1,
            exclude: vec!["/(/".into()],
            ..Default::default()
        }));
        assert!(
            validate(j, "k", &policy(), Some("apt"), now)
                .expect_err("regex")
                .to_string()
                .contains("regex")
        );
    }

    #[test]
    fn windows() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = Duration::from_secs(3600);
        let w = Window {
            start: t0,
            end: t0 + 2 * h,
            allow_partial: false,
        };
        assert_eq!(w.check(t0 - h, h), WindowCheck::WaitUntil(t0));
        assert_eq!(w.check(t0, h), WindowCheck::Open);
        assert!(
            matches!(w.check(t0 + h + Duration::from_secs(1), h), WindowCheck::Missed(m) if m.contains("less than max_duration"))
        );
        assert!(matches!(w.check(t0 + 3 * h, h), WindowCheck::Missed(m) if m.contains("closed")));
        // A window shorter than the job can never open for it, unless partial runs are allowed.
        assert!(matches!(w.check(t0 - h, 3 * h), WindowCheck::Missed(_)));
        let p = Window {
            allow_partial: true,
            ..w
        };
        assert_eq!(
            p.check(t0 + h + Duration::from_secs(1), 3 * h),
            WindowCheck::Open
        );
        assert!(matches!(p.check(t0 + 2 * h, h), WindowCheck::Missed(_)));
    }

    #[test]
    fn check_inputs() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/health").expect("url"),
            Check::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/health".into(),
                url: "http://127.0.0.1:8080/health".into()
            }
        );
        assert!(matches!(
            parse_http_url("http://localhost").expect("url"),
            Check::Http { port: 80, .. }
        ));
        for bad in [
            "https://x/",
            "http://",
            "http://u@x/",
            "http://x:0/",
            "http://x/a b",
            "ftp://x",
            "http://x:99999/",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
        assert!(valid_unit("nginx.service") && valid_unit("getty@tty1.service"));
        assert!(!valid_unit("-x") && !valid_unit("a b") && !valid_unit("$(id)"));
    }

    #[test]
    fn versions_and_ids() {
        assert!(valid_job_id("rollout-2026.11.26_a"));
    }
}
