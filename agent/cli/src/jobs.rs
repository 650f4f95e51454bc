//! `patchctl keys`, `job sign`, `submit`, `watch`, `jobs`: signing stays separate from
//! submitting, so a signing key can live on an offline machine.

use crate::{Failure, invalid, outln};
use anyhow::{Context, Result, bail};
use patch_agent_wire::convert::state_name;
use patch_agent_wire::job::trust::{self, SigningKey};
use patch_agent_wire::proto::{AgentClient, v1 as pb};
use prost::Message;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What `patchctl job sign` builds a job from.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// Job id (1-128 of [A-Za-z0-9._-]). Default: a fresh unique id.
    #[arg(long)]
    pub id: Option<String>,
    /// Upgrade every pending update (all) or only security updates (security).
    #[arg(long, value_parser = ["all", "security"])]
    pub upgrade: Option<String>,
    /// Only security updates at least this severe: critical, important, moderate, low.
    #[arg(long, value_parser = ["critical", "important", "moderate", "low"])]
    pub min_severity: Option<String>,
    /// Install NAME or NAME=VERSION (repeatable).
    #[arg(long = "install")]
    pub install: Vec<String>,
    /// Never upgrade NAME, names matching a GLOB (`linux-image-*`), or /REGEX/ (repeatable).
    #[arg(long = "exclude")]
    pub exclude: Vec<String>,
    /// Refresh metadata and rescan; change nothing.
    #[arg(long)]
    pub scan: bool,
    /// The reboot action: reboot the host and verify it came back (no package changes).
    #[arg(long)]
    pub reboot_action: bool,
    /// Reboot policy after applying: never, if-required (uses reboot-required detection), always.
    #[arg(long, default_value = "never", value_parser = ["never", "if-required", "always"])]
    pub reboot: String,
    /// How long the job stays valid, e.g. 2h.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub expires: Duration,
    /// Only updates issued (or first seen) at least N days ago.
    #[arg(long, default_value_t = 0)]
    pub approve_after_days: u32,
    /// Plan and report; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Go on when the metadata refresh cannot read some repositories (they are recorded in the
    /// job's history and result). Without it such a job fails and changes nothing.
    #[arg(long)]
    pub allow_repo_errors: bool,
    /// Agree to the licences packages ask to be confirmed (zypper). Without it such a package
    /// fails, named, and nothing is agreed on your behalf.
    #[arg(long)]
    pub accept_licenses: bool,
    /// Maximum run time, e.g. 30m. Default: the agent's [jobs] max_job_duration.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_duration: Option<Duration>,
    /// Maintenance window START/END (RFC 3339, e.g. 2026-11-29T02:00:00Z/2026-11-29T04:00:00Z):
    /// the job waits for START and is missed if it cannot start with --max-duration left.
    #[arg(long, value_parser = parse_window)]
    pub window: Option<(SystemTime, SystemTime)>,
    /// After applying: this systemd unit must be active (repeatable).
    #[arg(long = "check-unit")]
    pub check_units: Vec<String>,
    /// After applying: this local TCP port must accept connections (repeatable).
    #[arg(long = "check-port")]
    pub check_ports: Vec<u32>,
    /// After applying: this http:// URL must answer 200 (repeatable).
    #[arg(long = "check-url")]
    pub check_urls: Vec<String>,
    /// A hook (by name, from the agents' hooks_dir) to run before applying (repeatable).
    #[arg(long = "pre-hook")]
    pub pre_hooks: Vec<String>,
    /// A hook to run after applying (repeatable).
    #[arg(long = "post-hook")]
    pub post_hooks: Vec<String>,
    /// Allow starting in the window even with less than max_duration left.
    #[arg(long, requires = "window")]
    pub window_allow_partial: bool,
    /// The agents' [jobs] max_job_lifetime, to refuse what they would refuse.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,
}

fn parse_window(s: &str) -> Result<(SystemTime, SystemTime), String> {
    let (a, b) = s
        .split_once('/')
        .ok_or("expected START/END, two RFC 3339 times separated by '/'")?;
    let parse =
        |t: &str| humantime::parse_rfc3339_weak(t.trim()).map_err(|e| format!("{t:?}: {e}"));
    Ok((parse(a)?, parse(b)?))
}

pub fn fresh_id() -> String {
    patch_agent_wire::ids::fresh_id("job")
}

/// Which hosts a job names: host ids, a selector of labels, or both (a host must then be
/// listed and match).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hosts {
    pub targets: Vec<String>,
    pub selector: std::collections::BTreeMap<String, String>,
}

impl Hosts {
    pub fn new(targets: &[String], selector: &[(String, String)]) -> Self {
        Self {
            targets: targets.to_vec(),
            selector: selector.iter().cloned().collect(),
        }
    }
}

/// `--selector k=v[,k=v]`: one pair.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    patch_agent_wire::ids::check_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// When a scheduled occurrence may run: valid from `start`, expiring `--expires` later, in a
/// window of the same span (the agent waits for it and never starts the job outside it).
#[derive(Debug, Clone, Copy)]
pub struct Occurrence {
    pub start: SystemTime,
}

/// Builds the Job message from flags, for `hosts`, with `id`; `at` schedules it.
pub fn build(
    a: &JobArgs,
    id: String,
    hosts: &Hosts,
    now: SystemTime,
    at: Option<Occurrence>,
) -> Result<pb::Job> {
    let actions = usize::from(a.scan)
        + usize::from(a.reboot_action)
        + usize::from(a.upgrade.is_some() || a.min_severity.is_some())
        + usize::from(!a.install.is_empty());
    if actions != 1 {
        invalid!(
            "choose exactly one action: --scan, --upgrade/--min-severity, --install or --reboot-action"
        );
    }
    let action = if a.scan {
        pb::job::Action::Scan(pb::ScanAction {})
    } else if a.reboot_action {
        pb::job::Action::Reboot(pb::RebootAction {})
    } else if !a.install.is_empty() {
        pb::job::Action::Install(pb::InstallAction {
            packages: a
                .install
                .iter()
                .map(|spec| {
                    let (name, version) = spec.split_once('=').unwrap_or((spec, ""));
                    pb::PackageSpec {
                        name: name.to_string(),
                        version: version.to_string(),
                    }
                })
                .collect(),
        })
    } else {
        let scope = match a.upgrade.as_deref() {
            Some("all") => pb::UpgradeScope::All,
            Some("security") => pb::UpgradeScope::Security,
            _ => pb::UpgradeScope::Unspecified,
        };
        let min_severity = match a.min_severity.as_deref() {
            Some("critical") => pb::Severity::Critical,
            Some("important") => pb::Severity::Important,
            Some("moderate") => pb::Severity::Moderate,
            Some("low") => pb::Severity::Low,
            _ => pb::Severity::Unspecified,
        };
        pb::job::Action::Upgrade(pb::UpgradeAction {
            scope: scope as i32,
            min_severity: min_severity as i32,
            exclude: a.exclude.clone(),
            approve_after_days: a.approve_after_days,
        })
    };
    if !a.exclude.is_empty() && !matches!(action, pb::job::Action::Upgrade(_)) {
        invalid!("--exclude only applies to --upgrade");
    }
    let reboot_policy = match a.reboot.as_str() {
        "if-required" => pb::RebootPolicy::IfRequired,
        "always" => pb::RebootPolicy::Always,
        _ => pb::RebootPolicy::Never,
    };
    let (not_before, expires_at, window) = match at {
        Some(o) => {
            if a.window.is_some() {
                invalid!(
                    "--window and a schedule (--start-at, --every) both set a window: use one"
                );
            }
            if let Some(d) = a.max_duration
                && d > a.expires
            {
                invalid!(
                    "--max-duration {} does not fit a scheduled occurrence's window (--expires {}): the agent would never start it",
                    humantime::format_duration(d),
                    humantime::format_duration(a.expires)
                );
            }
            let end = o.start + a.expires;
            (Some(o.start), end, Some((o.start, end)))
        }
        None => (None, now + a.expires, a.window),
    };
    // A scheduled occurrence's window bounds when the job may start. Without --max-duration
    // the agent's own maximum (2h by default) may not fit in it: the job starts anyway.
    let allow_partial = a.window_allow_partial || (at.is_some() && a.max_duration.is_none());
    Ok(pb::Job {
        job_id: id,
        targets: hosts.targets.clone(),
        target_selector: hosts
            .selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        not_before: not_before.map(Into::into),
        expires_at: Some(expires_at.into()),
        action: Some(action),
        reboot_policy: reboot_policy as i32,
        dry_run: a.dry_run,
        max_duration: a
            .max_duration
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        checks: (!a.check_units.is_empty()
            || !a.check_ports.is_empty()
            || !a.check_urls.is_empty())
        .then(|| pb::PostChecks {
            units: a.check_units.clone(),
            tcp_ports: a.check_ports.clone(),
            http_urls: a.check_urls.clone(),
        }),
        pre_hooks: a.pre_hooks.clone(),
        post_hooks: a.post_hooks.clone(),
        allow_repo_errors: a.allow_repo_errors,
        accept_licenses: a.accept_licenses,
        window: window.map(|(start, end)| pb::MaintenanceWindow {
            start: Some(start.into()),
            end: Some(end.into()),
            allow_partial,
        }),
    })
}

/// Signs a job after checking it exactly as an agent would (for its first target, or a host
/// with exactly the selector's labels).
pub fn sign(a: &JobArgs, hosts: &Hosts, key: &Path) -> Result<(pb::SignedJob, pb::Job)> {
    let signer = SigningKey::read(key).map_err(anyhow::Error::msg)?;
    let id = a.id.clone().unwrap_or_else(fresh_id);
    sign_with(&signer, a, id, hosts, SystemTime::now(), None)
}

/// [`sign`] with a loaded key and a chosen id; `at` schedules it (checked as an agent would
/// check it then).
pub fn sign_with(
    signer: &SigningKey,
    a: &JobArgs,
    id: String,
    hosts: &Hosts,
    now: SystemTime,
    at: Option<Occurrence>,
) -> Result<(pb::SignedJob, pb::Job)> {
    if hosts.targets.is_empty() && hosts.selector.is_empty() {
        invalid!("a job needs hosts: --target HOST (repeatable) or --selector KEY=VALUE[,...]");
    }
    let job = build(a, id, hosts, now, at)?;
    let policy = patch_agent_wire::job::AdmissionPolicy {
        host_id: hosts.targets.first().cloned().unwrap_or_default(),
        machine_id: String::new(),
        labels: hosts.selector.clone(),
        max_lifetime: a.max_lifetime,
        clock_skew: Duration::from_secs(300),
        max_duration: a
            .max_duration
            .unwrap_or(Duration::from_secs(2 * 3600))
            .max(Duration::from_secs(2 * 3600)),
        hooks: None,
    };
    let checked_at = at.map_or(now, |o| o.start.max(now));
    patch_agent_wire::job::validate(job.clone(), &signer.key_id(), &policy, None, checked_at)
        .map_err(|e| {
            Failure::Invalid(format!(
                "an agent would refuse this job ({:?}): {e}",
                e.code()
            ))
        })?;
    let payload = job.encode_to_vec();
    let signature = signer.sign(&payload);
    Ok((
        pb::SignedJob {
            payload,
            key_id: signer.key_id(),
            signature,
        },
        job,
    ))
}

/// `patchctl keys new DIR`: NAME.key (PKCS#8, 0600) and NAME.pem (SPKI).
pub fn keys_new(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf, String)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let (private, public, id) = trust::generate().map_err(anyhow::Error::msg)?;
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    for (path, data, mode) in [(&key, &private, 0o600), (&pem, &public, 0o644)] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
    }
    Ok((key, pem, id))
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| patch_agent_wire::time::rfc3339_secs(t.seconds),
    )
}

pub fn render_status(s: &pb::JobStatus) -> String {
    let mut out = format!(
        "job {}: {}{}\n  {}\n  key {}, submitted {}, started {}, finished {}\n",
        s.job_id,
        state_name(s.state),
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.reason)
        },
        s.summary,
        s.key_id,
        when(s.submitted_at.as_ref()),
        when(s.started_at.as_ref()),
        when(s.finished_at.as_ref())
    );
    for p in &s.packages {
        out.push_str(&format!(
            "  {:<30} {:>20} -> {:<20} {}\n",
            p.name, p.from_version, p.to_version, p.outcome
        ));
    }
    out
}

pub use patch_agent_wire::convert::succeeded;

pub async fn submit(channel: tonic::transport::Channel, file: &Path) -> Result<pb::JobStatus> {
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let env = pb::SignedJob::decode(data.as_slice())
        .with_context(|| format!("{} is not a signed job", file.display()))?;
    let resp = AgentClient::new(channel)
        .submit_job(env)
        .await
        .map_err(|s| anyhow::anyhow!("refused: {:?}: {}", s.code(), s.message()))?;
    resp.into_inner()
        .status
        .context("the agent returned no status")
}

/// Prints one event as `patchctl watch` shows it.
pub fn event_line(e: &pb::JobEvent) -> String {
    let t =
        e.at.as_ref()
            .map(|t| patch_agent_wire::time::rfc3339_secs(t.seconds));
    format!(
        "{} {:<10} {}",
        t.unwrap_or_default(),
        state_name(e.state),
        e.message
    )
}

/// Follows a job to its end, printing each event; returns its final status.
pub async fn watch(channel: tonic::transport::Channel, id: &str) -> Result<pb::JobStatus> {
    watch_with(channel, id, |e| {
        outln!("{}", super::terminal_safe(&event_line(e)));
    })
    .await
}

/// Follows a job to its end, handing each event to `on_event`; returns its final status.
pub async fn watch_with(
    channel: tonic::transport::Channel,
    id: &str,
    mut on_event: impl FnMut(&pb::JobEvent),
) -> Result<pb::JobStatus> {
    let mut stream = AgentClient::new(channel)
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(u) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        match u.update {
            Some(pb::job_update::Update::Event(e)) => on_event(&e),
            Some(pb::job_update::Update::Status(s)) => return Ok(s),
            None => {}
        }
    }
    bail!("the stream ended before job {id} finished")
}

pub async fn list(channel: tonic::transport::Channel, limit: u32) -> Result<Vec<pb::JobStatus>> {
    Ok(AgentClient::new(channel)
        .list_jobs(pb::ListJobsRequest { limit })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .jobs)
}

pub async fn cancel(channel: tonic::transport::Channel, id: &str) -> Result<pb::JobStatus> {
    Ok(AgentClient::new(channel)
        .cancel_job(pb::CancelJobRequest {
            job_id: id.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner())
}
