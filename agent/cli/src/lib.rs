//! `patchctl`, the controller-side CLI: development PKI (`pki`), signing keys and jobs
//! (`jobs`), submit/watch/cancel against an agent (`client`, `jobs`), rollouts in batches
//! (`rollout`), the controller (`serve`, from `patch_agent_controller`), reports and compliance
//! from its database (`status`), load generation (`bench`), and exit statuses (`failure`).

pub mod bench;
pub mod client;
pub mod failure;
pub mod fleet;
pub mod jobs;
pub mod operate;
pub mod output;
pub mod pki;
pub mod rollout;
pub mod status;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
pub use failure::Failure;
use patch_agent_wire::convert::state_name;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "patchctl", version = patch_agent_wire::VERSION, about = "Controller CLI for patch-agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificates for development and tests.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Show an agent's host facts and how it sees you.
    Status {
        #[command(flatten)]
        agent: client::AgentArgs,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Job signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Jobs: signing (offline).
    #[command(subcommand)]
    Job(Box<JobCommand>),
    /// Send a signed job file to an agent, or through a controller to every connected host it
    /// targets, and print the admission result(s).
    Submit {
        /// The agent: HOST:PORT (gRPC over mutual TLS) or unix:PATH (the local socket).
        #[arg(long, env = "PATCHCTL_AGENT", required_unless_present = "controller")]
        agent: Option<String>,
        /// Relay through this controller (HOST:PORT, an operator's certificate) to every
        /// connected host the job targets; prints each host's admission.
        #[arg(long, conflicts_with = "agent")]
        controller: Option<String>,
        #[command(flatten)]
        tls: client::TlsArgs,
        file: PathBuf,
    },
    /// Follow a job until it ends; exit non-zero unless it succeeded.
    Watch {
        #[command(flatten)]
        agent: client::AgentArgs,
        job_id: String,
    },
    /// Recent jobs on an agent, most recent first.
    Jobs {
        #[command(flatten)]
        agent: client::AgentArgs,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued job, or a running one before its next package.
    Cancel {
        #[command(flatten)]
        agent: client::AgentArgs,
        job_id: String,
    },
    /// Run the reference controller: receive agents' reports over mutual TLS into SQLite.
    Serve(patch_agent_controller::ServeArgs),
    /// Sign and push a job to a fleet in batches, stopping at a failure threshold: directly
    /// (--inventory), or driven by a controller (--controller), optionally on a schedule.
    Rollout(Box<rollout::RolloutArgs>),
    /// Rollouts a controller drives: list, show, watch, pause, resume, cancel.
    #[command(subcommand)]
    Rollouts(operate::RolloutsCommand),
    /// The controller's database: schema migrations.
    #[command(subcommand)]
    Db(DbCommand),
    /// Stored job results per host, with per-package outcomes.
    History {
        /// The controller's database (patchctl serve --db): a file, or a postgres:// URL.
        #[arg(long)]
        db: patch_agent_controller::store::Location,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Join tokens for `patch-agent enroll`.
    #[command(subcommand)]
    Tokens(fleet::TokensCommand),
    /// Hosts the controller knows: enrolment, certificate, last report; revocation.
    #[command(subcommand)]
    Hosts(fleet::HostsCommand),
    /// Print the pin `patch-agent enroll --ca-hash` takes: sha256 over the DER public key
    /// (SubjectPublicKeyInfo) of the first certificate in FILE.
    CaHash { file: PathBuf },
    /// The compliance dashboard from stored reports; with --format csv or html, an audit
    /// export (the HTML is one self-contained file with the dashboard's charts, fit to print).
    Compliance {
        /// The controller's database (patchctl serve --db): a file, or a postgres:// URL.
        #[arg(long)]
        db: patch_agent_controller::store::Location,
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// text (a terminal table), json, csv (scope,name,figure,value rows) or html.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
        /// The daily history of the headline figures instead (one line a day, for trends).
        #[arg(long)]
        history: bool,
        /// With --history: this many days back, today included.
        #[arg(long, default_value_t = 30, requires = "history", value_parser = clap::value_parser!(u32).range(1..=3660))]
        days: u32,
        /// A host whose last scan is older than this counts as unknown, not compliant.
        #[arg(long, default_value = "48h", value_parser = humantime::parse_duration)]
        stale_after: std::time::Duration,
    },
}

/// How `patchctl compliance` writes the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Csv,
    Html,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Bring the database's schema to the version this patchctl uses (`patchctl serve` does
    /// too, on start). Safe to run again, and with controllers running: one migration at a
    /// time, each in one transaction.
    Migrate {
        /// The controller's database: a file, or a postgres:// URL.
        #[arg(long)]
        db: patch_agent_controller::store::Location,
        /// Stop at this version instead of the latest.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        to: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write an Ed25519 key pair: DIR/NAME.key (PKCS#8 PEM, 0600) and DIR/NAME.pem (SPKI PEM,
    /// for agents' trusted_keys_dir).
    New {
        dir: PathBuf,
        #[arg(long, default_value = "signing")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Build a job from flags, check it as an agent would, sign it, write a binary SignedJob.
    Sign {
        /// PKCS#8 PEM Ed25519 private key (patchctl keys new, or openssl genpkey).
        #[arg(long)]
        signing_key: PathBuf,
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// A host_id or machine_id the job may run on (repeatable).
        #[arg(long = "target", required_unless_present = "selector")]
        targets: Vec<String>,
        /// Hosts whose own labels include every KEY=VALUE pair (comma-separated or repeated).
        /// With --target too, a host must be listed and match.
        #[arg(long, value_delimiter = ',', value_parser = jobs::parse_pair)]
        selector: Vec<(String, String)>,
        #[command(flatten)]
        job: jobs::JobArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write a dev CA and agent, controller and viewer certificates into DIR (keys 0600).
    Init {
        dir: PathBuf,
        /// Names for the agent certificate (first is the CN). Default: this host's FQDN,
        /// hostname, localhost, 127.0.0.1 and ::1.
        #[arg(long = "agent-name")]
        agent_names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more certificate from the CA in DIR, into OUT.pem and OUT.key.
    Issue {
        dir: PathBuf,
        /// The identity: CN and first SAN (a DNS name, an IP, or a URI with "://").
        #[arg(long)]
        name: String,
        /// More SANs.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, value_enum, default_value = "client")]
        usage: pki::Usage,
        /// Days of validity.
        #[arg(long, default_value_t = 825, allow_negative_numbers = true)]
        days: i64,
        /// Start validity this many days ago (with --days 1 this makes an expired certificate).
        #[arg(long, default_value_t = 0)]
        start_days_ago: i64,
        /// Output path prefix: writes OUT.pem and OUT.key.
        #[arg(long, short = 'o')]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Drive GetStatus with concurrent callers; print req/s, p50/p99 and the agent's RSS.
    Status {
        #[command(flatten)]
        agent: client::AgentArgs,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Connections the callers share.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The agent's pid, to report its RSS before and after (same host only).
        #[arg(long)]
        agent_pid: Option<u32>,
        /// Threads for the load generator itself; default: one per core. On a small machine,
        /// keep this below the core count so the generator does not starve the agent it
        /// measures.
        #[arg(long)]
        client_threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// Worker threads for the runtime when the command asks for a number (`bench status
    /// --client-threads`); None leaves tokio's default.
    pub fn worker_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Bench(BenchCommand::Status { client_threads, .. }) => {
                client_threads.map(|n| n.max(1))
            }
            _ => None,
        }
    }
}

/// `text` without terminal control characters: anything an agent or a report sent (reasons,
/// package output, summaries) is shown, never interpreted by the terminal. Newlines stay;
/// every other control character, C1 controls included, becomes U+FFFD.
pub fn terminal_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '\n' || !c.is_control() {
                c
            } else {
                '\u{fffd}'
            }
        })
        .collect()
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keys(KeysCommand::New { dir, name }) => {
            let (key, pem, id) = jobs::keys_new(&dir, &name)?;
            outln!(
                "wrote {} (private, 0600)\nwrote {} (public: copy it into the agents' trusted_keys_dir)\nkey id {id}",
                key.display(),
                pem.display()
            );
            Ok(())
        }
        Command::Job(cmd) => sign_job(*cmd),
        Command::Submit {
            agent,
            controller,
            tls,
            file,
        } => match (agent, controller) {
            (_, Some(controller)) => operate::submit(&controller, &tls, &file).await,
            (Some(agent), None) => {
                let agent = client::AgentArgs { agent, tls };
                let status = jobs::submit(agent.connect().await?, &file).await?;
                out!("accepted\n{}", terminal_safe(&jobs::render_status(&status)));
                Ok(())
            }
            (None, None) => invalid!("--agent ADDR or --controller ADDR"),
        },
        Command::Watch { agent, job_id } => {
            let status = jobs::watch(agent.connect().await?, &job_id).await?;
            out!("{}", terminal_safe(&jobs::render_status(&status)));
            if !jobs::succeeded(status.state) {
                return Err(Failure::NotSucceeded(format!(
                    "job {job_id} ended {}",
                    state_name(status.state)
                ))
                .into());
            }
            Ok(())
        }
        Command::Jobs { agent, limit, json } => list_jobs(&agent, limit, json).await,
        Command::Serve(args) => {
            patch_agent_service::telemetry::init(
                patch_agent_service::telemetry::LogFormat::Plain,
                "info",
            );
            patch_agent_controller::serve(args).await
        }
        Command::Rollout(args) => match args.controller.clone() {
            Some(controller) => operate::create(&args, &controller).await,
            None => rollout(*args).await,
        },
        Command::Rollouts(cmd) => operate::rollouts(cmd).await,
        Command::History {
            db,
            host,
            job,
            json,
        } => history(&db, host, job, json).await,
        Command::Compliance {
            db,
            history: true,
            days,
            json,
            format,
            ..
        } => match format {
            ReportFormat::Text | ReportFormat::Json => {
                compliance_history(&db, days, json || format == ReportFormat::Json).await
            }
            ReportFormat::Csv | ReportFormat::Html => invalid!(
                "--history prints text or json; the csv and html reports are of today's figures (without --history)"
            ),
        },
        Command::Compliance {
            db,
            json,
            format,
            stale_after,
            ..
        } => {
            let format = if json { ReportFormat::Json } else { format };
            compliance(&db, format, stale_after).await
        }
        Command::Cancel { agent, job_id } => {
            let status = jobs::cancel(agent.connect().await?, &job_id).await?;
            out!("{}", terminal_safe(&jobs::render_status(&status)));
            Ok(())
        }
        Command::Pki(cmd) => pki_command(cmd),
        Command::Status { agent, json } => {
            let status = status::fetch(agent.connect().await?).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&status::to_json(&status))?
                );
            } else {
                out!("{}", terminal_safe(&status::render(&status)));
            }
            Ok(())
        }
        Command::Bench(cmd) => bench_command(cmd).await,
        Command::Db(DbCommand::Migrate { db, to, json }) => migrate(&db, to, json).await,
        Command::Tokens(cmd) => fleet::tokens(cmd).await,
        Command::Hosts(cmd) => fleet::hosts(cmd).await,
        Command::CaHash { file } => fleet::ca_hash(&file),
    }
}

/// `patchctl job sign`: validates with the agents' rules, signs, writes the envelope.
fn sign_job(cmd: JobCommand) -> Result<()> {
    let JobCommand::Sign {
        signing_key,
        output,
        targets,
        selector,
        job,
    } = cmd;
    let (env, job) = jobs::sign(&job, &jobs::Hosts::new(&targets, &selector), &signing_key)?;
    let bytes = prost::Message::encode_to_vec(&env);
    std::fs::write(&output, &bytes)
        .with_context(|| format!("cannot write {}", output.display()))?;
    outln!(
        "signed job {} with key {} ({} bytes) -> {}",
        job.job_id,
        env.key_id,
        bytes.len(),
        output.display()
    );
    Ok(())
}

async fn list_jobs(agent: &client::AgentArgs, limit: u32, json: bool) -> Result<()> {
    let list = jobs::list(agent.connect().await?, limit).await?;
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|j| serde_json::json!({"job_id": j.job_id, "state": state_name(j.state), "summary": j.summary, "reason": j.reason}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for j in &list {
            outln!(
                "{:<40} {:<26} {}",
                terminal_safe(&j.job_id),
                state_name(j.state),
                terminal_safe(&j.summary)
            );
        }
    }
    Ok(())
}

async fn rollout(args: rollout::RolloutArgs) -> Result<()> {
    let json = args.json;
    let summary = rollout::run(args).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        out!("{}", terminal_safe(&rollout::render(&summary)));
    }
    if summary.succeeded != summary.hosts.len() {
        return Err(Failure::NotSucceeded(format!(
            "the rollout did not succeed on every host ({} failed, {} skipped)",
            summary.failed, summary.skipped
        ))
        .into());
    }
    Ok(())
}

async fn history(
    db: &patch_agent_controller::store::Location,
    host: Option<String>,
    job: Option<String>,
    json: bool,
) -> Result<()> {
    use patch_agent_controller::store::{SqlStore, Store};
    let rows = SqlStore::open_reader(db)
        .await
        .map_err(anyhow::Error::msg)?
        .history(host, job)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        outln!("no job reports match");
    } else {
        out!("{}", terminal_safe(&status::render_history(&rows)));
    }
    Ok(())
}

async fn migrate(
    db: &patch_agent_controller::store::Location,
    to: Option<i64>,
    json: bool,
) -> Result<()> {
    use patch_agent_controller::store::{SqlStore, migrate::LATEST};
    if let Some(to) = to
        && to > LATEST
    {
        invalid!("--to {to}: this patchctl knows schema versions up to {LATEST}");
    }
    let m = SqlStore::migrate(db, to)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&m)?);
    } else if m.applied.is_empty() {
        outln!("{db}: at schema version {}; nothing to do", m.from);
    } else {
        outln!(
            "{db}: schema version {} -> {} (applied {})",
            m.from,
            m.to,
            m.applied
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn compliance_history(
    db: &patch_agent_controller::store::Location,
    days: u32,
    json: bool,
) -> Result<()> {
    use patch_agent_controller::compliance;
    use patch_agent_controller::store::{SqlStore, Store};
    let since = unix_now().div_euclid(86_400) - i64::from(days) + 1;
    let rows = SqlStore::open_reader(db)
        .await
        .map_err(anyhow::Error::msg)?
        .compliance_history(since)
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        out!("{}", terminal_safe(&compliance::render_history(&rows)));
    }
    Ok(())
}

async fn compliance(
    db: &patch_agent_controller::store::Location,
    format: ReportFormat,
    stale_after: Duration,
) -> Result<()> {
    use patch_agent_controller::compliance;
    use patch_agent_controller::store::{SqlStore, Store};
    use patch_agent_controller::web::{export, pages};
    let stale = i64::try_from(stale_after.as_secs()).unwrap_or(i64::MAX);
    let store = SqlStore::open_reader(db)
        .await
        .map_err(anyhow::Error::msg)?;
    // Computed in the database: nothing but the figures comes back.
    let now = unix_now();
    let d = store
        .compliance(now, stale)
        .await
        .map_err(anyhow::Error::msg)?;
    match format {
        ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&d)?),
        ReportFormat::Text => out!("{}", terminal_safe(&compliance::render(&d))),
        ReportFormat::Csv => out!("{}", export::csv(&d)),
        ReportFormat::Html => {
            let history = store
                .compliance_history(now.div_euclid(86_400) - pages::TREND_DAYS + 1)
                .await
                .map_err(anyhow::Error::msg)?;
            let fleet = pages::Fleet {
                compliance: d,
                history,
            };
            out!("{}", export::html(&fleet).map_err(anyhow::Error::msg)?);
        }
    }
    Ok(())
}

fn pki_command(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init {
            dir,
            agent_names,
            force,
        } => {
            let files = pki::init(&dir, &agent_names, force)?;
            for f in &files {
                outln!("wrote {}", f.display());
            }
            outln!(
                "\nFor the agent's config:\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\n[auth]\ncontrollers = [\"controller\"]\nviewers = [\"viewer\"]",
                d = dir.display()
            );
            Ok(())
        }
        PkiCommand::Issue {
            dir,
            name,
            sans,
            usage,
            days,
            start_days_ago,
            out,
            force,
        } => {
            if days < 1 {
                invalid!("--days must be at least 1");
            }
            let spec = pki::Spec {
                name,
                sans,
                usage,
                days,
                start_days_ago,
            };
            for f in pki::issue(&dir, &spec, &out, force)? {
                outln!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}

async fn bench_command(cmd: BenchCommand) -> Result<()> {
    let BenchCommand::Status {
        agent,
        concurrency,
        connections,
        duration,
        agent_pid,
        json,
        client_threads: _,
    } = cmd;
    if concurrency == 0 || connections == 0 {
        invalid!("--concurrency and --connections must be at least 1");
    }
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(agent.connect().await.context("bench setup")?);
    }
    let before = agent_pid.and_then(bench::memory_kib);
    let report = bench::run_status_load(&channels, concurrency, duration).await;
    let after = agent_pid.and_then(bench::memory_kib);
    if json {
        let v = serde_json::json!({
            "report": report,
            "agent_rss_kib_before": before.map(|m| m.0),
            "agent_rss_kib_after": after.map(|m| m.0),
            "agent_peak_rss_kib": after.map(|m| m.1),
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("{report}");
        if let (Some(b), Some(a)) = (before, after) {
            outln!(
                "agent RSS: {} KiB before, {} KiB after, peak {} KiB",
                b.0,
                a.0,
                a.1
            );
        }
    }
    if report.requests == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}
