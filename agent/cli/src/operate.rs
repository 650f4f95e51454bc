//! Operating through a controller (`--controller ADDR`): relaying a signed job to the hosts it
//! targets (`submit`), rollouts the controller drives (`rollout --controller`), and steering
//! them (`rollouts list|show|watch|pause|resume|cancel`). Jobs are signed here, offline from
//! the controller's point of view: it only ever receives signed envelopes.

use crate::client::{AgentArgs, TlsArgs};
use crate::jobs::{self, Hosts, Occurrence};
use crate::rollout::RolloutArgs;
use crate::{Failure, invalid, outln, terminal_safe};
use anyhow::{Context, Result};
use patch_agent_controller::operator::state_word;
use patch_agent_controller::store::Store as _;
use patch_agent_wire::proto::{OperatorClient, v1 as pb};
use pb::{RolloutHostState as HostState, RolloutState as State};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tonic::transport::Channel;

/// How to reach a controller's operator API.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// The controller: HOST:PORT (mutual TLS with an operator's certificate).
    #[arg(long, env = "PATCHCTL_CONTROLLER")]
    pub controller: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl ControllerArgs {
    pub async fn client(&self) -> Result<OperatorClient<Channel>> {
        client(&self.controller, &self.tls).await
    }
}

async fn client(controller: &str, tls: &TlsArgs) -> Result<OperatorClient<Channel>> {
    let channel = AgentArgs {
        agent: controller.to_string(),
        tls: tls.clone(),
    }
    .connect()
    .await
    .with_context(|| format!("controller {controller}"))?;
    Ok(OperatorClient::new(channel))
}

/// Where `rollouts list` and `show` read: a controller, or its database directly.
#[derive(Debug, Clone, clap::Args)]
pub struct Source {
    /// The controller: HOST:PORT (mutual TLS with an operator's certificate).
    #[arg(long, env = "PATCHCTL_CONTROLLER", required_unless_present = "db")]
    pub controller: Option<String>,
    /// Or read the controller's database (a file, or a postgres:// URL) without a controller.
    #[arg(long, conflicts_with = "controller")]
    pub db: Option<patch_agent_controller::store::Location>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl Source {
    async fn list(&self) -> Result<Vec<pb::Rollout>> {
        if let Some(db) = &self.db {
            return store(db)
                .await?
                .rollouts()
                .await
                .map_err(anyhow::Error::msg);
        }
        Ok(self
            .client()
            .await?
            .list_rollouts(pb::ListRolloutsRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .rollouts)
    }

    async fn get(&self, id: String) -> Result<pb::Rollout> {
        if let Some(db) = &self.db {
            return store(db)
                .await?
                .rollout(id.clone(), true)
                .await
                .map_err(anyhow::Error::msg)?
                .map(|d| d.rollout)
                .ok_or_else(|| anyhow::anyhow!("no rollout {id:?} in {db}"));
        }
        Ok(self
            .client()
            .await?
            .get_rollout(pb::RolloutRef { rollout_id: id })
            .await
            .map_err(refused)?
            .into_inner())
    }

    async fn client(&self) -> Result<OperatorClient<Channel>> {
        let controller = self
            .controller
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("give --controller or --db"))?;
        client(controller, &self.tls).await
    }
}

async fn store(
    db: &patch_agent_controller::store::Location,
) -> Result<patch_agent_controller::store::SqlStore> {
    patch_agent_controller::store::SqlStore::open_reader(db)
        .await
        .map_err(anyhow::Error::msg)
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutsCommand {
    /// Rollouts the controller holds, most recent first.
    List {
        #[command(flatten)]
        source: Source,
        #[arg(long)]
        json: bool,
    },
    /// One rollout: every occurrence and host, and the next occurrence due.
    Show {
        #[command(flatten)]
        source: Source,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a rollout until it ends; exit non-zero unless every host succeeded.
    Watch {
        #[command(flatten)]
        controller: ControllerArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Start no further batch until resumed (hosts already given the job run to their end).
    Pause {
        #[command(flatten)]
        controller: ControllerArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
    Resume {
        #[command(flatten)]
        controller: ControllerArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End the rollout: no further batch or occurrence starts.
    Cancel {
        #[command(flatten)]
        controller: ControllerArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn rollouts(cmd: RolloutsCommand) -> Result<()> {
    match cmd {
        RolloutsCommand::List { source, json } => {
            let list = source.list().await?;
            if json {
                let v: Vec<Value> = list.iter().map(rollout_json).collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "{:<32} {:<10} {:<12} {:<24} {:<20} NOTE",
                    "ROLLOUT",
                    "STATE",
                    "OCCURRENCES",
                    "HOSTS (ok/failed/skip)",
                    "NEXT"
                );
                for x in &list {
                    let done = x
                        .occurrences
                        .iter()
                        .filter(|o| o.finished_at.is_some())
                        .count();
                    let (ok, failed, skipped) = counts(x);
                    outln!(
                        "{:<32} {:<10} {:<12} {:<24} {:<20} {}",
                        terminal_safe(&x.rollout_id),
                        state_word(x.state),
                        format!("{done}/{}", x.occurrences.len()),
                        format!("{ok}/{failed}/{skipped}"),
                        when(x.next_start.as_ref()),
                        terminal_safe(&x.note)
                    );
                }
            }
            Ok(())
        }
        RolloutsCommand::Show { source, id, json } => print(&source.get(id).await?, json),
        RolloutsCommand::Watch {
            controller,
            id,
            json,
        } => follow(controller.client().await?, id, json).await,
        RolloutsCommand::Pause {
            controller,
            id,
            json,
        } => steer(&controller, Steer::Pause, id, json).await,
        RolloutsCommand::Resume {
            controller,
            id,
            json,
        } => steer(&controller, Steer::Resume, id, json).await,
        RolloutsCommand::Cancel {
            controller,
            id,
            json,
        } => steer(&controller, Steer::Cancel, id, json).await,
    }
}

enum Steer {
    Pause,
    Resume,
    Cancel,
}

/// Pauses, resumes or cancels a rollout; prints it as it is then.
async fn steer(controller: &ControllerArgs, how: Steer, id: String, json: bool) -> Result<()> {
    let mut c = controller.client().await?;
    let r = pb::RolloutRef { rollout_id: id };
    let x = match how {
        Steer::Pause => c.pause_rollout(r).await,
        Steer::Resume => c.resume_rollout(r).await,
        Steer::Cancel => c.cancel_rollout(r).await,
    }
    .map_err(refused)?
    .into_inner();
    print(&x, json)
}

/// A refusal from the controller, with its code.
fn refused(s: tonic::Status) -> anyhow::Error {
    let msg = format!("the controller refused: {:?}: {}", s.code(), s.message());
    if s.code() == tonic::Code::InvalidArgument {
        Failure::Invalid(msg).into()
    } else {
        anyhow::anyhow!(msg)
    }
}

fn print(x: &pb::Rollout, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&rollout_json(x))?);
    } else {
        crate::out!("{}", terminal_safe(&render(x)));
    }
    Ok(())
}

/// `patchctl submit --controller ADDR FILE`: relays one signed envelope; prints each host's
/// admission. Fails (exit 3) when a host refused it or a targeted host is not connected.
pub async fn submit(controller: &str, tls: &TlsArgs, file: &Path) -> Result<()> {
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let env: pb::SignedJob = prost::Message::decode(data.as_slice()).map_err(|e| {
        Failure::Invalid(format!(
            "{} is not a signed job (patchctl job sign writes one): {e}",
            file.display()
        ))
    })?;
    let result = client(controller, tls)
        .await?
        .submit_job(env)
        .await
        .map_err(refused)?
        .into_inner();
    let mut bad = 0;
    for h in &result.hosts {
        let code = tonic::Code::from_i32(h.code);
        let line = if code == tonic::Code::Ok {
            format!(
                "{}: accepted, {}",
                h.host_id,
                patch_agent_wire::convert::state_name(h.status.as_ref().map_or(0, |s| s.state))
            )
        } else {
            bad += 1;
            format!("{}: refused {code:?}: {}", h.host_id, h.message)
        };
        outln!("{}", terminal_safe(&line));
    }
    for h in &result.not_connected {
        bad += 1;
        outln!("{}: not connected (not sent)", terminal_safe(h));
    }
    if result.hosts.is_empty() && result.not_connected.is_empty() {
        return Err(Failure::NotSucceeded(format!(
            "job {}: no connected host matches it",
            result.job_id
        ))
        .into());
    }
    if bad > 0 {
        return Err(Failure::NotSucceeded(format!(
            "job {}: {bad} host(s) did not accept it",
            result.job_id
        ))
        .into());
    }
    Ok(())
}

/// When each occurrence starts: none (start now, unscheduled), or `--start-at` and every
/// `--every` after it, `--occurrences` times.
fn schedule(a: &RolloutArgs, now: SystemTime) -> Result<Vec<Option<SystemTime>>> {
    let n = a.occurrences.unwrap_or(1);
    if n == 0 || n as usize > patch_agent_controller::operator::MAX_OCCURRENCES {
        invalid!(
            "--occurrences must be 1-{}",
            patch_agent_controller::operator::MAX_OCCURRENCES
        );
    }
    if a.start_at.is_none() && a.every.is_none() {
        return Ok(vec![None]);
    }
    let first = a.start_at.unwrap_or(now);
    let every = a.every.unwrap_or_default();
    if a.every.is_some() && every < Duration::from_secs(1) {
        invalid!("--every must be at least 1s");
    }
    Ok((0..n).map(|i| Some(first + every * i)).collect())
}

/// `patchctl rollout --controller ADDR`: signs one job per occurrence here, uploads the
/// rollout, prints its id, and follows it unless `--detach`.
pub async fn create(a: &RolloutArgs, controller: &str) -> Result<()> {
    let hosts = Hosts::new(&a.hosts, &a.selector);
    if hosts.targets.is_empty() && hosts.selector.is_empty() {
        invalid!("name the hosts: --hosts h1,h2,... or --selector KEY=VALUE[,...]");
    }
    let signer = patch_agent_wire::job::trust::SigningKey::read(&a.signing_key)
        .map_err(anyhow::Error::msg)?;
    let now = SystemTime::now();
    let starts = schedule(a, now)?;
    let prefix = a.job.id.clone().unwrap_or_else(jobs::fresh_id);
    let mut occurrences = Vec::with_capacity(starts.len());
    for (i, start) in starts.iter().enumerate() {
        let id = if starts.len() == 1 {
            prefix.clone()
        } else {
            format!("{prefix}-{}", i + 1)
        };
        let at = start.map(|start| Occurrence { start });
        let (env, _) = jobs::sign_with(&signer, &a.job, id, &hosts, now, at)?;
        occurrences.push(env);
    }
    let req = pb::CreateRolloutRequest {
        occurrences,
        starts: starts.iter().flatten().map(|t| (*t).into()).collect(),
        serial: a.serial.to_string(),
        max_fail_percent: a.max_fail_percent,
        host_timeout: prost_types::Duration::try_from(a.host_timeout).ok(),
    };
    let mut c = client(controller, &a.tls).await?;
    let r = c.create_rollout(req).await.map_err(refused)?.into_inner();
    let say = |line: String| {
        if a.json {
            eprintln!("{line}");
        } else {
            outln!("{line}");
        }
    };
    say(format!(
        "rollout {} created: {} occurrence(s), batches of {}; {}",
        r.rollout_id,
        r.occurrences.len(),
        r.serial,
        r.rule
    ));
    if a.detach {
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&rollout_json(&r))?);
        } else {
            outln!("{}", r.rollout_id);
        }
        return Ok(());
    }
    follow(c, r.rollout_id, a.json).await
}

/// Follows a rollout to its end, printing each host's changes; the summary at the end.
async fn follow(mut c: OperatorClient<Channel>, id: String, json: bool) -> Result<()> {
    let mut stream = c
        .watch_rollout(pb::RolloutRef {
            rollout_id: id.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let mut seen: BTreeMap<(u32, String), (i32, String)> = BTreeMap::new();
    let mut last = None;
    while let Some(x) = stream.message().await.map_err(refused)? {
        for o in &x.occurrences {
            for h in &o.hosts {
                let key = (o.index, h.host_id.clone());
                let now = (h.state, h.job_state.clone());
                if seen.get(&key) == Some(&now) {
                    continue;
                }
                seen.insert(key, now);
                let line = format!(
                    "[{}] occurrence {} batch {}: {}{}{}",
                    h.host_id,
                    o.index,
                    h.batch,
                    host_word(h.state),
                    if h.job_state.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", h.job_state)
                    },
                    if h.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", h.reason)
                    }
                );
                let line = terminal_safe(&line);
                if json {
                    eprintln!("{line}");
                } else {
                    outln!("{line}");
                }
            }
        }
        last = Some(x);
    }
    let Some(x) = last else {
        anyhow::bail!("the controller ended the watch of {id} without a state");
    };
    print(&x, json)?;
    if patch_agent_controller::rollouts::is_active(x.state) {
        anyhow::bail!(
            "the watch of {id} ended before the rollout did; `patchctl rollouts watch {id}` follows it again"
        );
    }
    let (ok, failed, skipped) = counts(&x);
    if x.state != State::Completed as i32 || failed > 0 || skipped > 0 {
        return Err(Failure::NotSucceeded(format!(
            "rollout {id} {}: {ok} succeeded, {failed} failed, {skipped} skipped",
            state_word(x.state)
        ))
        .into());
    }
    Ok(())
}

fn counts(x: &pb::Rollout) -> (u32, u32, u32) {
    x.occurrences.iter().fold((0, 0, 0), |(a, b, c), o| {
        (a + o.succeeded, b + o.failed, c + o.skipped)
    })
}

fn host_word(state: i32) -> &'static str {
    match HostState::try_from(state) {
        Ok(HostState::Pending) => "pending",
        Ok(HostState::Waiting) => "waiting for the host to connect",
        Ok(HostState::Admitted) => "admitted",
        Ok(HostState::Succeeded) => "succeeded",
        Ok(HostState::Failed) => "failed",
        Ok(HostState::Skipped) => "skipped",
        _ => "unknown",
    }
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| u64::try_from(t.seconds).ok())
        .map(|s| {
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

fn when_json(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |_| Value::String(when(t)))
}

pub fn rollout_json(x: &pb::Rollout) -> Value {
    json!({
        "rollout_id": x.rollout_id,
        "state": state_word(x.state),
        "rule": x.rule,
        "serial": x.serial,
        "max_fail_percent": x.max_fail_percent,
        "host_timeout_secs": x.host_timeout.as_ref().map(|d| d.seconds),
        "created_at": when_json(x.created_at.as_ref()),
        "created_by": x.created_by,
        "targets": x.targets,
        "selector": x.selector,
        "next_start": when_json(x.next_start.as_ref()),
        "note": x.note,
        "occurrences": x.occurrences.iter().map(|o| json!({
            "index": o.index,
            "job_id": o.job_id,
            "start_at": when_json(o.start_at.as_ref()),
            "expires_at": when_json(o.expires_at.as_ref()),
            "started_at": when_json(o.started_at.as_ref()),
            "finished_at": when_json(o.finished_at.as_ref()),
            "attempted": o.attempted,
            "succeeded": o.succeeded,
            "failed": o.failed,
            "skipped": o.skipped,
            "stopped": o.stopped,
            "hosts": o.hosts.iter().map(|h| json!({
                "host": h.host_id,
                "batch": h.batch,
                "result": host_word(h.state),
                "state": h.job_state,
                "reason": h.reason,
                "started_at": when_json(h.started_at.as_ref()),
                "finished_at": when_json(h.finished_at.as_ref()),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A rollout as text: its state, rule, next occurrence, and a table per occurrence.
pub fn render(x: &pb::Rollout) -> String {
    let mut o = format!(
        "rollout {}: {}{}\n  {}\n  batches of {}, host timeout {}s, created {} by {}\n  hosts: {}\n  next occurrence: {}\n",
        x.rollout_id,
        state_word(x.state),
        if x.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", x.note)
        },
        x.rule,
        x.serial,
        x.host_timeout.as_ref().map_or(0, |d| d.seconds),
        when(x.created_at.as_ref()),
        x.created_by,
        if x.targets.is_empty() {
            x.selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            x.targets.join(",")
        },
        when(x.next_start.as_ref()),
    );
    for occ in &x.occurrences {
        o.push_str(&format!(
            "\noccurrence {} (job {}): starts {}{}, {} attempted, {} succeeded, {} failed, {} skipped{}\n",
            occ.index,
            occ.job_id,
            when(occ.start_at.as_ref()),
            if occ.finished_at.is_some() {
                format!(", ended {}", when(occ.finished_at.as_ref()))
            } else {
                String::new()
            },
            occ.attempted,
            occ.succeeded,
            occ.failed,
            occ.skipped,
            if occ.stopped {
                " (stopped by the failure threshold)"
            } else {
                ""
            }
        ));
        for h in &occ.hosts {
            o.push_str(&format!(
                "  {:<24} batch {:<3} {:<34} {:<24} {}\n",
                h.host_id,
                h.batch,
                host_word(h.state),
                h.job_state,
                h.reason
            ));
        }
    }
    o
}
