//! `patchctl status`: one agent's host facts, readable or as JSON.

use crate::proto::{AgentClient, v1 as pb};
use anyhow::{Context, Result};
use serde::Serialize;
use std::time::{Duration, UNIX_EPOCH};

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
    ts.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        Some(humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string())
    })
    .unwrap_or_else(|| "-".into())
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
    StatusJson {
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

/// The human-readable summary.
pub fn render(s: &pb::GetStatusResponse) -> String {
    let j = to_json(s);
    let up = humantime::format_duration(uptime(s)).to_string();
    let caller = s.caller.clone().unwrap_or_default();
    format!(
        "Host       {host} (hostname {hn})\n\
         OS         {pretty} [{id} {ver}]\n\
         Kernel     {kernel} {arch}\n\
         Machine ID {mid}\n\
         Boot       {boot_id}, booted {boot} (up {up})\n\
         Agent      patch-agent {av}, running since {started}\n\
         You        {who} as {role} over {tr} from {peer}\n",
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
