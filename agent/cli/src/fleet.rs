//! The fleet's membership: join tokens (`patchctl tokens`), enrolled hosts (`patchctl hosts`),
//! and the CA pin hosts enroll with (`patchctl ca-hash`). Tokens and hosts live in the
//! controller's database; these commands read and write it directly, as `history` does.

use crate::status::when_secs;
use crate::{invalid, outln, terminal_safe};
use anyhow::Result;
use patch_agent_controller::enroll::tokens::Token;
use patch_agent_controller::store::{Location, NewToken, SqlStore, Store};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Make a join token; prints it as the last line (shown once: only its hash is stored).
    Create {
        /// The controller's database (patchctl serve --db).
        #[arg(long)]
        db: Location,
        /// Labels every host enrolled with it gets, e.g. environment=production,team=web.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Hosts it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// It may enroll a host id the controller already knows (replacing its certificate,
        /// and lifting a revocation).
        #[arg(long)]
        reenroll: bool,
    },
    /// Tokens: id, labels, uses left, expiry; never the secret.
    List {
        #[arg(long)]
        db: Location,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it enrolls no more hosts (hosts it enrolled stay).
    Revoke {
        #[arg(long)]
        db: Location,
        id: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum HostsCommand {
    /// Hosts: connected now (a control channel is open), labels, certificate serial and expiry,
    /// enrolled at, last seen, agent version.
    List {
        #[arg(long)]
        db: Location,
        #[arg(long)]
        json: bool,
        /// Instead: every host with a pending update that fixes this CVE (CVE-YYYY-NNNN),
        /// with the package and its SLA deadline.
        #[arg(long)]
        cve: Option<String>,
    },
    /// Revoke a host: the controller refuses its reports and renewals from now on; its
    /// certificate dies at its expiry.
    Revoke {
        #[arg(long)]
        db: Location,
        host: String,
    },
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in pairs.iter().filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            invalid!("--labels {pair:?}: expected KEY=VALUE");
        };
        if let Err(e) = patch_agent_wire::ids::check_label(k, v) {
            invalid!("--labels: {e}");
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

pub async fn tokens(cmd: TokensCommand) -> Result<()> {
    match cmd {
        TokensCommand::Create {
            db,
            labels,
            uses,
            ttl,
            reenroll,
        } => create_token(&db, &labels, uses, ttl, reenroll).await,
        TokensCommand::List { db, json } => list_tokens(&db, json).await,
        TokensCommand::Revoke { db, id } => {
            let store = SqlStore::open_writer(&db)
                .await
                .map_err(anyhow::Error::msg)?;
            if !store
                .revoke_token(id.clone(), now())
                .await
                .map_err(anyhow::Error::msg)?
            {
                invalid!(
                    "no token {id:?} that is not already revoked; see `patchctl tokens list --db {}`",
                    db
                );
            }
            outln!("token {id} revoked");
            Ok(())
        }
    }
}

async fn create_token(
    db: &Location,
    labels: &[String],
    uses: u32,
    ttl: Duration,
    reenroll: bool,
) -> Result<()> {
    let labels = parse_labels(labels)?;
    if !(1..=1_000_000).contains(&uses) {
        invalid!("--uses {uses}: expected 1 to 1000000");
    }
    if ttl < Duration::from_secs(1) {
        invalid!("--ttl must be at least 1s");
    }
    let token = Token::generate().map_err(anyhow::Error::msg)?;
    let created_at = now();
    let expires_at = created_at.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let store = SqlStore::open_writer(db)
        .await
        .map_err(anyhow::Error::msg)?;
    store
        .create_token(NewToken {
            id: token.id.clone(),
            secret_sha256: token.secret_sha256(),
            labels: labels.clone(),
            uses,
            reenroll,
            created_at,
            expires_at,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    outln!(
        "token {} for {uses} host(s), labels {labels:?}, expires {}{}",
        token.id,
        when_secs(Some(expires_at)),
        if reenroll {
            ", may re-enroll known hosts"
        } else {
            ""
        }
    );
    outln!("{token}");
    Ok(())
}

async fn list_tokens(db: &Location, json: bool) -> Result<()> {
    let rows = reader(db)
        .await?
        .tokens()
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    outln!(
        "{:<16}  {:>9}  {:>4}  {:<20}  {:<8}  LABELS",
        "ID",
        "USES LEFT",
        "USED",
        "EXPIRES",
        "STATE"
    );
    let now = now();
    for t in rows {
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at <= now {
            "expired"
        } else if t.uses_left <= 0 {
            "used up"
        } else {
            "valid"
        };
        outln!(
            "{:<16}  {:>9}  {:>4}  {:<20}  {:<8}  {}",
            t.id,
            t.uses_left,
            t.used,
            when_secs(Some(t.expires_at)),
            state,
            terminal_safe(&labels_text(&t.labels))
        );
    }
    Ok(())
}

async fn reader(db: &Location) -> Result<SqlStore> {
    SqlStore::open_reader(db).await.map_err(anyhow::Error::msg)
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn hosts(cmd: HostsCommand) -> Result<()> {
    match cmd {
        HostsCommand::List {
            db,
            json,
            cve: Some(cve),
        } => exposed(&db, &cve, json).await,
        HostsCommand::List { db, json, .. } => {
            let rows = reader(&db)
                .await?
                .host_list()
                .await
                .map_err(anyhow::Error::msg)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            outln!(
                "{:<28}  {:<9}  {:<20}  {:<20}  {:<20}  {:<10}  {:<34}  LABELS",
                "HOST",
                "CONNECTED",
                "ENROLLED",
                "LAST SEEN",
                "CERT EXPIRES",
                "VERSION",
                "CERT SERIAL"
            );
            for h in rows {
                let host = if h.revoked_at.is_some() {
                    format!("{} (revoked)", h.host_id)
                } else {
                    h.host_id.clone()
                };
                outln!(
                    "{:<28}  {:<9}  {:<20}  {:<20}  {:<20}  {:<10}  {:<34}  {}",
                    terminal_safe(&host),
                    if h.connected_since.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    when_secs(h.enrolled_at),
                    when_secs(h.last_seen),
                    when_secs(h.cert_not_after),
                    terminal_safe(&h.agent_version),
                    h.cert_serial.as_deref().unwrap_or("-"),
                    terminal_safe(&labels_text(&h.labels))
                );
            }
            Ok(())
        }
        HostsCommand::Revoke { db, host } => {
            let store = SqlStore::open_writer(&db)
                .await
                .map_err(anyhow::Error::msg)?;
            if !store
                .revoke_host(host.clone(), now())
                .await
                .map_err(anyhow::Error::msg)?
            {
                invalid!(
                    "no host {host:?} that is not already revoked; see `patchctl hosts list --db {}`",
                    db
                );
            }
            outln!(
                "host {host} revoked: its reports and renewals are refused from now on; its certificate ends at its expiry"
            );
            Ok(())
        }
    }
}

/// `patchctl hosts list --cve`: the hosts exposed to a CVE, one line per pending update that
/// fixes it.
async fn exposed(db: &Location, cve: &str, json: bool) -> Result<()> {
    let cve = match patch_agent_controller::store::views::parse_cve(cve) {
        Ok(c) => c,
        Err(e) => invalid!("--cve: {e}"),
    };
    let rows = reader(db)
        .await?
        .exposed(cve.clone(), now())
        .await
        .map_err(anyhow::Error::msg)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no host has a pending update that fixes {cve}");
        return Ok(());
    }
    outln!(
        "{:<28}  {:<32}  {:<24}  {:<8}  {:<20}  LABELS",
        "HOST",
        "PACKAGE",
        "CANDIDATE",
        "CLASS",
        "DEADLINE"
    );
    for e in &rows {
        outln!(
            "{:<28}  {:<32}  {:<24}  {:<8}  {:<20}  {}",
            terminal_safe(&e.host_id),
            terminal_safe(&format!("{}.{}", e.package, e.arch)),
            terminal_safe(&e.candidate),
            e.sla_class,
            format!(
                "{}{}",
                when_secs(Some(e.deadline)),
                if e.overdue { " OVERDUE" } else { "" }
            ),
            terminal_safe(&labels_text(&e.labels))
        );
    }
    let hosts: std::collections::BTreeSet<&str> = rows.iter().map(|e| e.host_id.as_str()).collect();
    outln!("{} host(s) exposed to {cve}", hosts.len());
    Ok(())
}

/// `patchctl ca-hash FILE`: the pin of the first certificate in FILE.
pub fn ca_hash(file: &Path) -> Result<()> {
    let certs = patch_agent_service::tls::load_certs(file).map_err(anyhow::Error::msg)?;
    let hash = patch_agent_service::tls::spki_sha256(&certs[0]).map_err(anyhow::Error::msg)?;
    outln!("{}", patch_agent_service::tls::pin_string(&hash));
    Ok(())
}
