//! `patchctl rollout`: one signed job per host, pushed in batches, each batch watched to its
//! end before the next starts, stopping when failed hosts exceed a share of those attempted.
//!
//! The rule, printed at the start: after each batch, if `failed * 100 > P * attempted` the
//! rollout stops and the hosts not yet attempted are skipped. An agent that cannot be reached,
//! refuses the job, or is lost while the job runs counts as failed.

use super::client::{AgentArgs, TlsArgs};
use super::jobs::{self, JobArgs};
use crate::{Failure, invalid, outln};
use anyhow::{Context, Result, bail};
use patch_agent_wire::job::outcome::Outcome;
use patch_agent_wire::proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub use patch_agent_controller::rollouts::{Serial, should_stop};

fn parse_percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (0-100)"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{s:?}: a percentage must be 0-100"));
    }
    Ok(p)
}

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// Direct mode: the hosts, a TOML file with a [[host]] table per host (id, address =
    /// "HOST:PORT", optional labels); patchctl dials each agent and drives the rollout itself.
    #[arg(
        long,
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    pub inventory: Option<PathBuf>,
    /// Controller mode: upload the rollout to this controller (HOST:PORT, with an operator's
    /// certificate), which drives it through the agents' control channels and keeps it
    /// running without this terminal.
    #[arg(long)]
    pub controller: Option<String>,
    /// Controller mode: the hosts, by host id.
    #[arg(long, value_delimiter = ',', requires = "controller")]
    pub hosts: Vec<String>,
    /// Controller mode: the hosts whose own labels include every KEY=VALUE (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = jobs::parse_pair, requires = "controller")]
    pub selector: Vec<(String, String)>,
    /// Controller mode: return once the rollout is created (its id is printed).
    #[arg(long, requires = "controller")]
    pub detach: bool,
    /// Controller mode: the first occurrence starts at this time (RFC 3339), not now. Each
    /// occurrence is signed now, valid only from its start, in a window of --expires.
    #[arg(long, value_parser = parse_time, requires = "controller")]
    pub start_at: Option<SystemTime>,
    /// Controller mode: occurrences repeat this often (with --occurrences).
    #[arg(long, value_parser = humantime::parse_duration, requires_all = ["controller", "occurrences"])]
    pub every: Option<Duration>,
    /// Controller mode: how many occurrences (with --every); one signed job each.
    #[arg(long, requires = "every")]
    pub occurrences: Option<u32>,
    /// PKCS#8 PEM Ed25519 private key to sign the jobs with.
    #[arg(long)]
    pub signing_key: PathBuf,
    /// Batch size: N hosts, or N% of them.
    #[arg(long, default_value = "1")]
    pub serial: Serial,
    /// Stop when failed hosts exceed this percentage of the hosts attempted so far (checked
    /// after each batch). 0 stops at the first failure.
    #[arg(long, default_value = "0", value_parser = parse_percent)]
    pub max_fail_percent: f64,
    /// Direct mode: only inventory hosts whose labels include KEY=VALUE (repeatable; all must
    /// match). With --controller, use --selector.
    #[arg(long = "label", value_parser = parse_label, conflicts_with = "controller")]
    pub labels: Vec<(String, String)>,
    /// Give up on a host whose job has not ended after this long.
    #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
    pub host_timeout: Duration,
    /// Print the summary as JSON (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub job: JobArgs,
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time (2026-12-01T02:00:00Z): {e}"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// One `[[host]]` of the inventory file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub id: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The name to verify in the agent's certificate. Default: the host part of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    host: Vec<Host>,
}

/// Reads and checks an inventory file.
pub fn read_hosts(path: &Path) -> Result<Vec<Host>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: HostsFile = toml::from_str(&text).map_err(|e| {
        Failure::Invalid(format!(
            "{} is not a hosts file ([[host]] tables with id and address): {}",
            path.display(),
            e.to_string().trim_end()
        ))
    })?;
    let mut seen = std::collections::HashSet::new();
    for (i, h) in file.host.iter().enumerate() {
        if h.id.is_empty() || h.id.len() > 253 || h.id.chars().any(|c| c.is_control()) {
            invalid!("{}: host {} has no usable id", path.display(), i + 1);
        }
        if !seen.insert(&h.id) {
            invalid!("{}: host id {:?} appears twice", path.display(), h.id);
        }
        if !patch_agent_wire::ids::is_host_port(&h.address) {
            invalid!(
                "{}: host {:?}: address {:?} is not HOST:PORT",
                path.display(),
                h.id,
                h.address
            );
        }
    }
    if file.host.is_empty() {
        invalid!("{} lists no [[host]]", path.display());
    }
    Ok(file.host)
}

/// How a host's part of the rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostResult {
    Succeeded,
    Failed,
    Unreachable,
    Skipped,
}

impl HostResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Unreachable => "unreachable",
            Self::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostOutcome {
    pub host: String,
    pub address: String,
    pub job_id: String,
    pub batch: usize,
    pub result: HostResult,
    pub state: String,
    pub reason: String,
    pub duration_ms: u64,
    /// How long the job ran on the host (started to finished, by the agent's clock).
    pub job_ms: Option<u64>,
    pub packages_changed: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rule: String,
    pub hosts: Vec<HostOutcome>,
    pub attempted: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    pub stopped_early: bool,
}

/// A job id for one host: PREFIX-HOST, with characters a job id cannot hold replaced.
fn job_id(prefix: &str, host: &str) -> String {
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut id = format!("{prefix}-{clean}");
    id.truncate(128);
    id
}

fn say(json: bool, line: &str) {
    let line = super::terminal_safe(line);
    if json {
        eprintln!("{line}");
    } else {
        outln!("{line}");
    }
}

pub async fn run(a: RolloutArgs) -> Result<Summary> {
    let hosts = select_hosts(&a)?;
    let prefix = a.job.id.clone().unwrap_or_else(jobs::fresh_id);
    let signed = sign_all(&a, &hosts, &prefix)?;
    let size = a.serial.batch_size(hosts.len());
    let rule = format!(
        "stop when failed hosts exceed {}% of the hosts attempted so far (checked after each batch; unreachable hosts count as failed)",
        a.max_fail_percent
    );
    say(
        a.json,
        &format!(
            "rollout {prefix}: {} hosts in batches of {size}; {rule}",
            hosts.len()
        ),
    );
    let mut outcomes: Vec<HostOutcome> = Vec::with_capacity(hosts.len());
    let mut failed = 0;
    let mut stopped = false;
    let batches: Vec<_> = hosts.iter().zip(signed).collect::<Vec<_>>();
    for (b, batch) in batches.chunks(size).enumerate() {
        if stopped {
            for (h, (_, id)) in batch {
                outcomes.push(skipped(h, id, b + 1));
            }
            continue;
        }
        for o in run_batch(&a, b + 1, batch).await? {
            if o.result != HostResult::Succeeded {
                failed += 1;
            }
            outcomes.push(o);
        }
        let attempted = outcomes.len();
        if should_stop(failed, attempted, a.max_fail_percent) {
            say(
                a.json,
                &format!(
                    "stopping: {failed} of {attempted} attempted hosts failed ({:.1}% > {}%)",
                    failed as f64 * 100.0 / attempted as f64,
                    a.max_fail_percent
                ),
            );
            stopped = true;
        }
    }
    let count = |r: HostResult| outcomes.iter().filter(|o| o.result == r).count();
    Ok(Summary {
        rule,
        attempted: outcomes
            .iter()
            .filter(|o| o.result != HostResult::Skipped)
            .count(),
        succeeded: count(HostResult::Succeeded),
        failed: count(HostResult::Failed) + count(HostResult::Unreachable),
        skipped: count(HostResult::Skipped),
        stopped_early: stopped,
        hosts: outcomes,
    })
}

/// The inventory's hosts that carry every `--label`.
fn select_hosts(a: &RolloutArgs) -> Result<Vec<Host>> {
    let Some(inventory) = &a.inventory else {
        invalid!("--inventory FILE or --controller ADDR");
    };
    let hosts: Vec<Host> = read_hosts(inventory)?
        .into_iter()
        .filter(|h| {
            a.labels
                .iter()
                .all(|(k, v)| h.labels.get(k).is_some_and(|x| x == v))
        })
        .collect();
    if hosts.is_empty() {
        invalid!("no host in {} matches the labels", inventory.display());
    }
    Ok(hosts)
}

/// One signed job per host. Everything is signed first: a template an agent would refuse
/// stops the rollout before any host is touched.
fn sign_all(a: &RolloutArgs, hosts: &[Host], prefix: &str) -> Result<Vec<(pb::SignedJob, String)>> {
    let signer = patch_agent_wire::job::trust::SigningKey::read(&a.signing_key)
        .map_err(anyhow::Error::msg)?;
    let now = SystemTime::now();
    hosts
        .iter()
        .map(|h| {
            let (env, job) = jobs::sign_with(
                &signer,
                &a.job,
                job_id(prefix, &h.id),
                &jobs::Hosts::new(std::slice::from_ref(&h.id), &[]),
                now,
                None,
            )?;
            Ok((env, job.job_id))
        })
        .collect()
}

/// Runs one batch, its hosts at once; their outcomes in the batch's order.
async fn run_batch(
    a: &RolloutArgs,
    number: usize,
    batch: &[(&Host, (pb::SignedJob, String))],
) -> Result<Vec<HostOutcome>> {
    say(
        a.json,
        &format!(
            "batch {number}: {}",
            batch
                .iter()
                .map(|(h, _)| h.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let mut set = tokio::task::JoinSet::new();
    for (i, (h, (env, id))) in batch.iter().enumerate() {
        let agent = AgentArgs {
            agent: h.address.clone(),
            tls: TlsArgs {
                server_name: h.server_name.clone().or(a.tls.server_name.clone()),
                ..a.tls.clone()
            },
        };
        let (host, env, id, json, timeout) = (
            (*h).clone(),
            env.clone(),
            id.clone(),
            a.json,
            a.host_timeout,
        );
        set.spawn(async move {
            let o = run_host(&host, &agent, env, &id, number, json, timeout).await;
            (i, o)
        });
    }
    let mut done: Vec<(usize, HostOutcome)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(x) => done.push(x),
            Err(e) => bail!("a host task failed: {e}"),
        }
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, o)| o).collect())
}

fn skipped(h: &Host, id: &str, batch: usize) -> HostOutcome {
    HostOutcome {
        host: h.id.clone(),
        address: h.address.clone(),
        job_id: id.to_string(),
        batch,
        result: HostResult::Skipped,
        state: "-".into(),
        reason: "not attempted: the rollout stopped".into(),
        duration_ms: 0,
        job_ms: None,
        packages_changed: 0,
    }
}

/// Submits one host's job and follows it to its end; reconnects if the watch is lost (an
/// agent restarting, e.g. after upgrading itself) until `timeout`.
async fn run_host(
    h: &Host,
    agent: &AgentArgs,
    env: pb::SignedJob,
    id: &str,
    batch: usize,
    json: bool,
    timeout: Duration,
) -> HostOutcome {
    let started = Instant::now();
    let outcome = |result, state: &str, reason: String, packages, job_ms| HostOutcome {
        host: h.id.clone(),
        address: h.address.clone(),
        job_id: id.to_string(),
        batch,
        result,
        state: state.to_string(),
        reason,
        duration_ms: started.elapsed().as_millis() as u64,
        job_ms,
        packages_changed: packages,
    };
    let channel = match submit(h, agent, env, id, json).await {
        Ok(c) => c,
        Err((result, state, why)) => return outcome(result, state, why, 0, None),
    };
    let deadline = started + timeout;
    let mut channel = Some(channel);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let ch = match channel.take() {
            Some(c) => c,
            None => match agent.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last_error = format!("{e:#}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
        };
        let host = h.id.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let watched = tokio::time::timeout(
            left,
            jobs::watch_with(ch, id, |e| {
                say(json, &format!("[{host}] {}", jobs::event_line(e)));
            }),
        )
        .await;
        match watched {
            Ok(Ok(status)) => {
                let (result, changed, job_ms) = result_of(&status);
                let state = patch_agent_wire::convert::state_name(status.state);
                return outcome(result, state, status.reason, changed, job_ms);
            }
            Ok(Err(e)) => {
                last_error = format!("{e:#}");
                say(
                    json,
                    &format!(
                        "[{}] lost the job's progress ({last_error}); reconnecting",
                        h.id
                    ),
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(_) => break,
        }
    }
    let why = format!(
        "no result within {}{}",
        humantime::format_duration(timeout),
        if last_error.is_empty() {
            String::new()
        } else {
            format!(" (last error: {last_error})")
        }
    );
    outcome(HostResult::Failed, "UNKNOWN", why, 0, None)
}

/// Submits one host's job; the connection to follow it on, or how the host failed.
async fn submit(
    h: &Host,
    agent: &AgentArgs,
    env: pb::SignedJob,
    id: &str,
    json: bool,
) -> Result<tonic::transport::Channel, (HostResult, &'static str, String)> {
    let channel = agent.connect().await.map_err(|e| {
        let why = format!("{e:#}");
        say(json, &format!("[{}] UNREACHABLE {why}", h.id));
        (HostResult::Unreachable, "-", why)
    })?;
    match patch_agent_wire::proto::AgentClient::new(channel.clone())
        .submit_job(env)
        .await
    {
        Ok(_) => say(json, &format!("[{}] submitted {id}", h.id)),
        // Submitted before (a re-run of the same rollout): follow that job.
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            say(
                json,
                &format!("[{}] {id} was submitted before; following it", h.id),
            );
        }
        Err(s) => {
            let why = format!("refused: {:?}: {}", s.code(), s.message());
            say(json, &format!("[{}] {why}", h.id));
            return Err((HostResult::Failed, "REFUSED", why));
        }
    }
    Ok(channel)
}

/// A finished job's result for the rollout: succeeded or not, packages changed, how long it
/// ran on the host.
fn result_of(status: &pb::JobStatus) -> (HostResult, usize, Option<u64>) {
    let changed = status
        .packages
        .iter()
        .filter(|p| Outcome::of(p).is_some_and(Outcome::changed_the_host))
        .count();
    let result = if jobs::succeeded(status.state) {
        HostResult::Succeeded
    } else {
        HostResult::Failed
    };
    let ms =
        |t: &prost_types::Timestamp| t.seconds as i128 * 1000 + i128::from(t.nanos / 1_000_000);
    let job_ms = match (&status.started_at, &status.finished_at) {
        (Some(a), Some(b)) => u64::try_from(ms(b) - ms(a)).ok(),
        _ => None,
    };
    (result, changed, job_ms)
}

/// The summary table.
pub fn render(s: &Summary) -> String {
    let mut o = format!(
        "\n{:<20} {:<22} {:<6} {:<12} {:<26} {:>9}  {}\n",
        "HOST", "ADDRESS", "BATCH", "RESULT", "STATE", "TIME", "DETAIL"
    );
    for h in &s.hosts {
        o.push_str(&format!(
            "{:<20} {:<22} {:<6} {:<12} {:<26} {:>8.1}s  {}\n",
            h.host,
            h.address,
            h.batch,
            h.result.as_str(),
            h.state,
            h.duration_ms as f64 / 1000.0,
            if h.reason.is_empty() {
                format!("{} package(s) changed", h.packages_changed)
            } else {
                h.reason.clone()
            }
        ));
    }
    o.push_str(&format!(
        "\n{} attempted: {} succeeded, {} failed; {} skipped{}\n",
        s.attempted,
        s.succeeded,
        s.failed,
        s.skipped,
        if s.stopped_early {
            " (stopped by the failure threshold)"
        } else {
            ""
        }
    ));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_parses_and_sizes_batches() {
        assert_eq!("3".parse::<Serial>(), Ok(Serial::Hosts(3)));
        assert_eq!("25%".parse::<Serial>(), Ok(Serial::Percent(25)));
        assert!("0".parse::<Serial>().is_err());
        assert!("0%".parse::<Serial>().is_err());
        assert!("101%".parse::<Serial>().is_err());
        assert!("x".parse::<Serial>().is_err());
        assert_eq!(Serial::Percent(25).batch_size(10), 3);
        assert_eq!(Serial::Percent(1).batch_size(3), 1);
        assert_eq!(Serial::Hosts(5).batch_size(2), 5);
    }

    #[test]
    fn the_stop_rule() {
        // --serial 1 --max-fail-percent 30 with the third of four hosts failing.
        assert!(!should_stop(0, 1, 30.0));
        assert!(!should_stop(0, 2, 30.0));
        assert!(should_stop(1, 3, 30.0));
        // Exactly at the threshold is not beyond it.
        assert!(!should_stop(1, 4, 25.0));
        assert!(should_stop(1, 4, 24.9));
        assert!(should_stop(1, 100, 0.0));
        assert!(!should_stop(0, 0, 0.0));
    }

    #[test]
    fn job_ids_per_host_are_valid() {
        assert_eq!(job_id("r1", "web-1.example"), "r1-web-1.example");
        assert_eq!(job_id("r1", "spiffe://x/y"), "r1-spiffe___x_y");
        assert!(patch_agent_wire::ids::valid_job_id(&job_id(
            "r",
            &"h".repeat(300)
        )));
    }

    #[test]
    fn hosts_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("hosts.toml");
        std::fs::write(&p, "[[host]]\nid = \"a\"\naddress = \"nohost\"\n").expect("w");
        let e = read_hosts(&p).expect_err("bad").to_string();
        assert!(e.contains("not HOST:PORT"), "{e}");
        std::fs::write(
            &p,
            "[[host]]\nid = \"a\"\naddress = \"h:1\"\n[[host]]\nid = \"a\"\naddress = \"h:2\"\n",
        )
        .expect("w");
        assert!(
            read_hosts(&p)
                .expect_err("dup")
                .to_string()
                .contains("twice")
        );
        std::fs::write(&p, "[[host]]\nid = \"a\"\naddres = \"h:1\"\n").expect("w");
        assert!(read_hosts(&p).is_err());
        std::fs::write(
            &p,
            "[[host]]\nid = \"a\"\naddress = \"h:1\"\nlabels = { environment = \"prod\" }\n",
        )
        .expect("w");
        assert_eq!(read_hosts(&p).expect("ok")[0].labels["environment"], "prod");
    }
}
