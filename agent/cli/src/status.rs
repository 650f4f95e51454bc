//! `patchctl status`: one agent's host facts, readable or as JSON.

use anyhow::{Context, Result};
use patch_agent_wire::proto::{AgentClient, v1 as pb};
use serde::Serialize;
use std::time::Duration;

/// The JSON shape of `patchctl status --json`; stable for scripts.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub host_id: String,
    pub hostname: String,
    pub machine_id: String,
    pub boot_id: String,
    pub os_id: String,
    pub os_id_like: Vec<String>,
    pub os_version_id: String,
    pub os_pretty_name: String,
    pub kernel_release: String,
    pub architecture: String,
    pub uptime_seconds: u64,
    pub boot_time: String,
    pub agent_version: String,
    pub agent_started_at: String,
    pub caller_identity: String,
    pub caller_role: String,
    pub caller_transport: String,
    pub package_manager: String,
    pub packages_installed: u32,
    pub pending_critical: u32,
    pub pending_high: u32,
    pub pending_medium: u32,
    pub pending_low: u32,
    pub pending_security: u32,
    pub held: u32,
    pub last_scan_at: String,
    pub scan_errors: Vec<String>,
    pub reboot_required: bool,
    pub reboot_method: String,
    pub reboot_evidence: Vec<String>,
    pub trusted_keys: u32,
    pub jobs_queued: u32,
    pub job_running: String,
    pub jobs_rejected: u64,
    pub cert_serial: String,
    pub cert_not_after: String,
    pub cert_renew_at: String,
    /// "valid", "renewal-failing", "expired", "unreadable".
    pub cert_state: String,
    pub cert_enrolled: bool,
    pub cert_last_error: String,
    /// What an admin must do, if anything.
    pub cert_action: String,
    /// `[report] controller`; empty: the agent reports to none.
    pub controller_address: String,
    /// The control channel is open: jobs can reach the agent through the controller.
    pub channel_open: bool,
    pub channel_since: String,
    pub channel_last_error: String,
    pub outbox_pending: u32,
}

/// Fetches the status from a connected agent.
pub async fn fetch(channel: tonic::transport::Channel) -> Result<pb::GetStatusResponse> {
    let mut client = AgentClient::new(channel);
    let resp = client
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetStatus failed: {}: {}", s.code(), s.message()))
        .context("the agent refused or failed the call")?;
    Ok(resp.into_inner())
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(
        || "-".into(),
        |t| patch_agent_wire::time::rfc3339_secs(t.seconds),
    )
}

fn uptime(s: &pb::GetStatusResponse) -> Duration {
    s.uptime
        .and_then(|d| u64::try_from(d.seconds).ok())
        .map(Duration::from_secs)
        .unwrap_or_default()
}

fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Controller) => "controller",
        Ok(pb::Role::Viewer) => "viewer",
        _ => "none",
    }
}

fn transport(t: i32) -> &'static str {
    match pb::Transport::try_from(t) {
        Ok(pb::Transport::Mtls) => "mtls",
        Ok(pb::Transport::Unix) => "unix",
        _ => "unknown",
    }
}

pub fn to_json(s: &pb::GetStatusResponse) -> StatusJson {
    let os = s.os.clone().unwrap_or_default();
    let caller = s.caller.clone().unwrap_or_default();
    let p = s.packages.clone().unwrap_or_default();
    let r = s.reboot.clone().unwrap_or_default();
    let jobs = s.jobs.clone().unwrap_or_default();
    let cert = s.certificate.clone().unwrap_or_default();
    let link = s.controller.clone().unwrap_or_default();
    StatusJson {
        controller_address: link.address,
        channel_open: link.channel_open,
        channel_since: time(link.since.as_ref()),
        channel_last_error: link.last_error,
        outbox_pending: link.outbox_pending,
        cert_serial: cert.serial,
        cert_not_after: time(cert.not_after.as_ref()),
        cert_renew_at: time(cert.renew_at.as_ref()),
        cert_state: cert.state,
        cert_enrolled: cert.enrolled,
        cert_last_error: cert.last_error,
        cert_action: cert.action,
        trusted_keys: jobs.trusted_keys,
        jobs_queued: jobs.queued,
        job_running: jobs.running_job_id,
        jobs_rejected: jobs.rejected,
        package_manager: p.manager,
        packages_installed: p.installed,
        pending_critical: p.pending_critical,
        pending_high: p.pending_high,
        pending_medium: p.pending_medium,
        pending_low: p.pending_low,
        pending_security: p.pending_security,
        held: p.held,
        last_scan_at: time(p.last_scan_at.as_ref()),
        scan_errors: p.scan_errors,
        reboot_required: r.required,
        reboot_method: r.method,
        reboot_evidence: r.evidence,
        host_id: s.host_id.clone(),
        hostname: s.hostname.clone(),
        machine_id: s.machine_id.clone(),
        boot_id: s.boot_id.clone(),
        os_id: os.id,
        os_id_like: os.id_like,
        os_version_id: os.version_id,
        os_pretty_name: os.pretty_name,
        kernel_release: s.kernel_release.clone(),
        architecture: s.architecture.clone(),
        uptime_seconds: uptime(s).as_secs(),
        boot_time: time(s.boot_time.as_ref()),
        agent_version: s.agent_version.clone(),
        agent_started_at: time(s.agent_started_at.as_ref()),
        caller_identity: caller.identity,
        caller_role: role(caller.role).into(),
        caller_transport: transport(caller.transport).into(),
    }
}

fn certificate(j: &StatusJson) -> String {
    let mut out = format!(
        "{} {}, expires {}",
        if j.cert_state.is_empty() {
            "-"
        } else {
            &j.cert_state
        },
        if j.cert_serial.is_empty() {
            "-"
        } else {
            &j.cert_serial
        },
        j.cert_not_after
    );
    if j.cert_enrolled {
        out.push_str(&format!(", enrolled, renews at {}", j.cert_renew_at));
    }
    if !j.cert_last_error.is_empty() {
        out.push_str(&format!(
            "\n           last renewal error: {}",
            j.cert_last_error
        ));
    }
    if !j.cert_action.is_empty() {
        out.push_str(&format!("\n           to do: {}", j.cert_action));
    }
    out
}

fn controller(j: &StatusJson) -> String {
    if j.controller_address.is_empty() {
        return "none ([report] controller is unset)".into();
    }
    let mut out = format!(
        "{}: channel {} since {}, {} report(s) waiting",
        j.controller_address,
        if j.channel_open { "open" } else { "down" },
        j.channel_since,
        j.outbox_pending
    );
    if !j.channel_open && !j.channel_last_error.is_empty() {
        out.push_str(&format!(
            "\n           last error: {}",
            j.channel_last_error
        ));
    }
    out
}

/// The human-readable summary.
pub fn render(s: &pb::GetStatusResponse) -> String {
    let j = to_json(s);
    let up = humantime::format_duration(uptime(s)).to_string();
    let caller = s.caller.clone().unwrap_or_default();
    let pending = format!(
        "critical {} / high {} / medium {} / low {} ({} security, {} held){}",
        j.pending_critical,
        j.pending_high,
        j.pending_medium,
        j.pending_low,
        j.pending_security,
        j.held,
        if j.scan_errors.is_empty() {
            String::new()
        } else {
            format!("; last scan failed: {}", j.scan_errors.join("; "))
        }
    );
    let reboot = format!(
        "{} by {}{}",
        if j.reboot_required {
            "REQUIRED"
        } else {
            "not required"
        },
        if j.reboot_method.is_empty() {
            "-"
        } else {
            &j.reboot_method
        },
        if j.reboot_evidence.is_empty() {
            String::new()
        } else {
            format!(": {}", j.reboot_evidence.join("; "))
        }
    );
    let jobs = format!(
        "{} trusted key(s), {} queued, running {}, {} refused since start",
        j.trusted_keys,
        j.jobs_queued,
        if j.job_running.is_empty() {
            "none"
        } else {
            &j.job_running
        },
        j.jobs_rejected
    );
    format!(
        "Host       {host} (hostname {hn})\n\
         OS         {pretty} [{id} {ver}]\n\
         Kernel     {kernel} {arch}\n\
         Machine ID {mid}\n\
         Boot       {boot_id}, booted {boot} (up {up})\n\
         Agent      patch-agent {av}, running since {started}\n\
         You        {who} as {role} over {tr} from {peer}\n\
         Packages   {pkgs}\n\
         Pending    {pending}\n\
         Reboot     {reboot}\n\
         Jobs       {jobs}\n\
         Cert       {cert}\n\
         Controller {controller}\n",
        controller = controller(&j),
        jobs = jobs,
        cert = certificate(&j),
        pending = pending,
        reboot = reboot,
        pkgs = if j.package_manager.is_empty() {
            "no package manager".to_string()
        } else {
            format!(
                "{} installed ({}), last scan {}",
                j.packages_installed, j.package_manager, j.last_scan_at
            )
        },
        host = j.host_id,
        hn = j.hostname,
        pretty = j.os_pretty_name,
        id = j.os_id,
        ver = j.os_version_id,
        kernel = j.kernel_release,
        arch = j.architecture,
        mid = if j.machine_id.is_empty() {
            "-"
        } else {
            &j.machine_id
        },
        boot_id = j.boot_id,
        boot = j.boot_time,
        av = j.agent_version,
        started = j.agent_started_at,
        who = j.caller_identity,
        role = j.caller_role,
        tr = j.caller_transport,
        peer = caller.peer,
    )
}

pub fn when_secs(t: Option<i64>) -> String {
    t.map_or_else(|| "-".into(), patch_agent_wire::time::rfc3339_secs)
}

/// `patchctl history`: one block per job and host.
pub fn render_history(rows: &[patch_agent_controller::store::JobRow]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{} {}: {}{}{}\n  {}\n  submitted {}, started {}, finished {}{}\n",
            r.host_id,
            r.job_id,
            r.state,
            if r.r#final { "" } else { " (in progress)" },
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.reason)
            },
            r.summary,
            when_secs(r.submitted_at),
            when_secs(r.started_at),
            when_secs(r.finished_at),
            if r.reboot_attempted {
                if r.reboot_succeeded {
                    ", rebooted"
                } else {
                    ", reboot failed"
                }
            } else {
                ""
            }
        ));
        for p in &r.packages {
            out.push_str(&format!(
                "    {:<30} {:>20} -> {:<20} {}\n",
                p.name, p.from_version, p.to_version, p.outcome
            ));
        }
    }
    out
}
