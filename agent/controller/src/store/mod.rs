//! Where the controller keeps what agents report.
//!
//! [`Store`] is the seam: [`SqliteStore`] is the embedded store (one file, WAL, one writer);
//! a PostgreSQL store for fleets that outgrow one controller implements the same trait.
//!
//! The SQLite writer is one thread that owns the write connection. Requests queue to it; it
//! takes everything queued (up to a batch), applies each in its own savepoint inside one
//! transaction, commits once (`synchronous = FULL`: durable before anyone is told), and only
//! then answers each caller. An agent removes a report from its outbox only after that answer,
//! so a report is never lost between the two; and the report id is a primary key, so a report
//! sent twice is stored once.

use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

pub mod control;
pub mod enrollment;

pub use control::{NewOccurrence, NewRollout, RolloutData};
pub use enrollment::{Enrolment, HostListRow, NewToken, Refusal, TokenRow};

pub type Result<T> = std::result::Result<T, String>;

/// One job on one host, as last reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobRow {
    pub host_id: String,
    pub job_id: String,
    pub state: String,
    /// The job ended: this is its result.
    pub r#final: bool,
    pub reason: String,
    pub summary: String,
    pub dry_run: bool,
    pub key_id: String,
    pub submitted_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub reboot_attempted: bool,
    pub reboot_succeeded: bool,
    pub packages: Vec<PackageRow>,
    /// When the controller received the latest report of it.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PackageRow {
    pub name: String,
    pub from_version: String,
    pub to_version: String,
    pub outcome: String,
}

/// A host as the controller knows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HostRow {
    pub host_id: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub last_seen: i64,
    pub has_inventory: bool,
    /// Scan and repository errors in the host's last inventory.
    pub scan_errors: i64,
    /// When the scan behind the last inventory finished (or, without that, when it arrived).
    pub scanned_at: Option<i64>,
    pub reboot_required: bool,
    pub dropped_progress: u64,
    pub dropped_final: u64,
}

/// A pending update on a host. `since` starts its SLA clock: the advisory's issue date, or
/// when it was first seen pending.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PendingRow {
    pub host_id: String,
    pub name: String,
    pub sla_class: i32,
    pub since: i64,
}

/// An update that was pending and no longer is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResolvedRow {
    pub host_id: String,
    pub name: String,
    pub sla_class: i32,
    pub since: i64,
    pub resolved_at: i64,
}

/// What the compliance dashboard is computed from.
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    pub hosts: Vec<HostRow>,
    pub pending: Vec<PendingRow>,
    pub resolved: Vec<ResolvedRow>,
    pub jobs: Vec<JobRow>,
}

/// A host's write, or its refusal: a revoked host's reports are refused (`patchctl hosts
/// revoke`), checked in the same transaction as the write.
pub type Admitted<T> = std::result::Result<T, Refusal>;

/// The controller's storage. Writes are durable when they return.
#[tonic::async_trait]
pub trait Store: Send + Sync {
    /// Records a hello; true when the store has no inventory for the host.
    async fn hello(&self, h: pb::HelloRequest, now: i64) -> Result<Admitted<bool>>;
    /// Stores a job report; true when its id was stored before (nothing changed).
    async fn job_report(&self, r: pb::JobReport, now: i64) -> Result<Admitted<bool>>;
    /// Stores an inventory report. Without an inventory, true when the stored checksum is the
    /// same (the host is marked seen); false means the full inventory is needed.
    async fn inventory(&self, r: pb::InventoryReport, now: i64) -> Result<Admitted<bool>>;
    async fn history(&self, host: Option<String>, job: Option<String>) -> Result<Vec<JobRow>>;
    async fn snapshot(&self) -> Result<FleetSnapshot>;

    /// Stores a new join token (its secret only as a hash).
    async fn create_token(&self, t: NewToken) -> Result<()>;
    async fn tokens(&self) -> Result<Vec<TokenRow>>;
    /// True when the token existed and was not revoked before.
    async fn revoke_token(&self, id: String, now: i64) -> Result<bool>;
    /// Spends one use of the token and records the host, in one transaction; or says why not
    /// (and changes nothing). Ok(labels) are the token's labels.
    async fn enroll(
        &self,
        e: Enrolment,
        now: i64,
    ) -> Result<std::result::Result<BTreeMap<String, String>, Refusal>>;
    /// An enrolled host's certificate names, for renewal; Err(refusal) when it is revoked or
    /// was never enrolled.
    async fn renewable(&self, host_id: String)
    -> Result<std::result::Result<Vec<String>, Refusal>>;
    /// Records a renewed certificate; false when the host was revoked meanwhile.
    async fn renewed(&self, host_id: String, serial: String, not_after: i64) -> Result<bool>;
    /// True when the host existed and was not revoked before.
    async fn revoke_host(&self, host_id: String, now: i64) -> Result<bool>;
    async fn host_list(&self) -> Result<Vec<HostListRow>>;

    /// A host opened its control channel (refused when revoked); it counts as connected.
    async fn channel_opened(
        &self,
        host_id: String,
        labels: HashMap<String, String>,
        version: String,
        now: i64,
    ) -> Result<Admitted<()>>;
    async fn channel_closed(&self, host_id: String, now: i64) -> Result<()>;
    /// At start: no host is connected yet.
    async fn channels_reset(&self) -> Result<()>;
    /// Hosts not revoked and their labels, for selectors.
    async fn host_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>>;
    /// The final status of a host's job, once its result is stored.
    async fn job_final(&self, host_id: String, job_id: String) -> Result<Option<pb::JobStatus>>;
    async fn create_rollout(&self, r: NewRollout) -> Result<()>;
    /// A rollout with (or, `hosts` false, without) its hosts' parts.
    async fn rollout(&self, id: String, hosts: bool) -> Result<Option<RolloutData>>;
    async fn rollouts(&self) -> Result<Vec<pb::Rollout>>;
    /// Rollouts to drive: scheduled, running or paused.
    async fn active_rollouts(&self) -> Result<Vec<String>>;
    /// Moves a rollout from one of `from` to `to`; false when it was in none of them.
    async fn set_rollout_state(
        &self,
        id: String,
        from: Vec<pb::RolloutState>,
        to: pb::RolloutState,
        note: String,
    ) -> Result<bool>;
    /// Fixes an occurrence's hosts and their batches, once.
    async fn occurrence_started(
        &self,
        id: String,
        idx: u32,
        hosts: Vec<(String, u32)>,
        now: i64,
    ) -> Result<()>;
    /// Records a host's part; false when it had already ended (nothing changed).
    async fn set_rollout_host(&self, id: String, idx: u32, h: pb::RolloutHost) -> Result<bool>;
    async fn occurrence_finished(
        &self,
        id: String,
        idx: u32,
        stopped: bool,
        now: i64,
    ) -> Result<()>;

    /// Deletes history older than `cutoff` (unix seconds), at most `batch` rows of each kind
    /// per call, so ingest waits for one small batch at most: final job results and their
    /// report ids, resolved-update history, and rollouts that ended. Returns the rows deleted.
    async fn prune(&self, cutoff: i64, batch: usize) -> Result<usize>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS hosts(
  host_id TEXT PRIMARY KEY,
  labels TEXT NOT NULL DEFAULT '{}',
  agent_version TEXT NOT NULL DEFAULT '',
  hello BLOB,
  first_seen INTEGER NOT NULL,
  last_seen INTEGER NOT NULL,
  dropped_progress INTEGER NOT NULL DEFAULT 0,
  dropped_final INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reports(
  report_id TEXT PRIMARY KEY,
  host_id TEXT NOT NULL,
  received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
  host_id TEXT NOT NULL,
  job_id TEXT NOT NULL,
  state TEXT NOT NULL,
  final INTEGER NOT NULL,
  reboot_attempted INTEGER NOT NULL,
  reboot_succeeded INTEGER NOT NULL,
  status BLOB NOT NULL,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY(host_id, job_id));
CREATE INDEX IF NOT EXISTS jobs_by_job ON jobs(job_id);
CREATE TABLE IF NOT EXISTS inventories(
  host_id TEXT PRIMARY KEY,
  checksum TEXT NOT NULL,
  data BLOB NOT NULL,
  reboot_required INTEGER NOT NULL,
  scanned_at INTEGER,
  received_at INTEGER NOT NULL,
  scan_errors INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS pending(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  candidate TEXT NOT NULL,
  sla_class INTEGER NOT NULL,
  since INTEGER NOT NULL,
  first_seen INTEGER NOT NULL,
  PRIMARY KEY(host_id, name, arch));
CREATE TABLE IF NOT EXISTS tokens(
  id TEXT PRIMARY KEY,
  secret_sha256 BLOB NOT NULL,
  labels TEXT NOT NULL,
  uses_left INTEGER NOT NULL,
  uses INTEGER NOT NULL DEFAULT 0,
  reenroll INTEGER NOT NULL DEFAULT 0,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  revoked_at INTEGER);
CREATE TABLE IF NOT EXISTS host_names(
  name TEXT PRIMARY KEY,
  host_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resolved(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  candidate TEXT NOT NULL,
  sla_class INTEGER NOT NULL,
  since INTEGER NOT NULL,
  resolved_at INTEGER NOT NULL);
";

fn open(path: &Path, write: bool) -> Result<Connection> {
    let flags = if write {
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
    } else {
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
    } | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        format!(
            "cannot open the database {}: {e}{}",
            path.display(),
            if write {
                ""
            } else {
                " (is it a controller database made by `patchctl serve --db`?)"
            }
        )
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    if write {
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .and_then(|()| conn.execute_batch(SCHEMA))
            .and_then(|()| conn.execute_batch(control::SCHEMA))
            .and_then(|()| add_missing_columns(&conn))
            .map_err(|e| format!("cannot prepare the database {}: {e}", path.display()))?;
    } else {
        let ok: bool = conn
            .query_row(
                "SELECT count(*) = 6 FROM sqlite_master WHERE type = 'table' AND name IN ('hosts','reports','jobs','inventories','pending','resolved')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| format!("{} is not a controller database: {e}", path.display()))?;
        if !ok {
            return Err(format!(
                "{} is not a controller database (made by `patchctl serve --db`)",
                path.display()
            ));
        }
    }
    Ok(conn)
}

/// Columns added after a database may have been created: added in place, once.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("inventories", "scan_errors", "INTEGER NOT NULL DEFAULT 0"),
    ("hosts", "enrolled_at", "INTEGER"),
    ("hosts", "cert_serial", "TEXT"),
    ("hosts", "cert_not_after", "INTEGER"),
    ("hosts", "revoked_at", "INTEGER"),
    ("hosts", "enroll_token", "TEXT"),
    ("hosts", "facts", "BLOB"),
    ("hosts", "connected_since", "INTEGER"),
];

fn add_missing_columns(c: &Connection) -> rusqlite::Result<()> {
    for (table, column, decl) in ADDED_COLUMNS {
        let has: bool = c.query_row(
            &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )?;
        if !has {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// One write, queued to the writer thread: applied inside the batch's transaction, answered
/// only after the commit.
trait Call: Send {
    fn apply(&mut self, c: &Connection) -> rusqlite::Result<()>;
    fn answer(self: Box<Self>, result: Result<()>);
}

struct Write<T, F> {
    f: Option<F>,
    out: Option<T>,
    tx: oneshot::Sender<Result<T>>,
}

impl<T, F> Call for Write<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
{
    fn apply(&mut self, c: &Connection) -> rusqlite::Result<()> {
        if let Some(f) = self.f.take() {
            self.out = Some(f(c)?);
        }
        Ok(())
    }

    fn answer(self: Box<Self>, result: Result<()>) {
        let Write { out, tx, .. } = *self;
        let _ =
            tx.send(result.and_then(|()| out.ok_or_else(|| "the write was not applied".into())));
    }
}

type Op = Box<dyn Call>;

/// The embedded store; see the module documentation.
pub struct SqliteStore {
    path: PathBuf,
    writer: Option<Mutex<mpsc::Sender<Op>>>,
    reader: Arc<Mutex<Connection>>,
}

/// Most requests applied in one transaction.
const BATCH: usize = 512;

impl SqliteStore {
    /// Opens (creating) the database for writing, with its writer thread.
    pub fn open_writer(path: &Path) -> Result<Self> {
        let conn = open(path, true)?;
        let reader = open(path, false)?;
        let (tx, rx) = mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| format!("cannot start the database writer: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Some(Mutex::new(tx)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Opens an existing database read-only (`patchctl history`, `compliance`).
    pub fn open_reader(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(format!(
                "{} does not exist; pass the --db that `patchctl serve` writes",
                path.display()
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            writer: None,
            reader: Arc::new(Mutex::new(open(path, false)?)),
        })
    }

    /// Queues `f` to the writer thread; answers after the commit that includes it.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| format!("{} is open read-only", self.path.display()))?;
        writer
            .lock()
            .map_err(|_| "the database writer failed".to_string())?
            .send(Box::new(Write {
                f: Some(f),
                out: None,
                tx,
            }))
            .map_err(|_| "the database writer stopped".to_string())?;
        rx.await
            .map_err(|_| "the database writer stopped".to_string())?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| "the database reader failed".to_string())?;
            f(&conn).map_err(|e| format!("database read failed: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let msg = format!("cannot start a transaction: {e}");
                for op in batch {
                    op.answer(Err(msg.clone()));
                }
                continue;
            }
        };
        for mut op in batch {
            let result = (|| {
                let sp = tx.savepoint()?;
                op.apply(&sp)?;
                sp.commit()
            })()
            .map_err(|e| format!("database write failed: {e}"));
            replies.push((op, result));
        }
        if let Err(e) = tx.commit() {
            let msg = format!("database commit failed: {e}");
            for (op, _) in replies {
                op.answer(Err(msg.clone()));
            }
            continue;
        }
        for (op, result) in replies {
            op.answer(result);
        }
    }
}

/// Runs `f` unless the host is revoked.
fn admitted<T>(
    c: &Connection,
    host_id: &str,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<Admitted<T>> {
    if enrollment::host_revoked(c, host_id)? {
        return Ok(Err(Refusal::Revoked(host_id.to_string())));
    }
    f(c).map(Ok)
}

fn labels_json(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_else(|_| "{}".into())
}

fn touch_host(
    c: &Connection,
    host_id: &str,
    labels: &HashMap<String, String>,
    outbox: Option<&pb::OutboxStats>,
    now: i64,
) -> rusqlite::Result<()> {
    let (dp, df) = outbox.map_or((None, None), |o| {
        (
            Some(o.dropped_progress as i64),
            Some(o.dropped_final as i64),
        )
    });
    c.execute(
        "INSERT INTO hosts(host_id, labels, first_seen, last_seen, dropped_progress, dropped_final)
         VALUES(?1, ?2, ?3, ?3, coalesce(?4, 0), coalesce(?5, 0))
         ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels, last_seen = ?3,
           dropped_progress = coalesce(?4, dropped_progress), dropped_final = coalesce(?5, dropped_final)",
        params![host_id, labels_json(labels), now, dp, df],
    )?;
    Ok(())
}

fn apply_hello(c: &Connection, h: &pb::HelloRequest, now: i64) -> rusqlite::Result<bool> {
    touch_host(c, &h.host_id, &h.labels, h.outbox.as_ref(), now)?;
    c.execute(
        "UPDATE hosts SET agent_version = ?2, hello = ?3 WHERE host_id = ?1",
        params![h.host_id, h.agent_version, h.encode_to_vec()],
    )?;
    let has: bool = c.query_row(
        "SELECT count(*) > 0 FROM inventories WHERE host_id = ?1",
        [&h.host_id],
        |r| r.get(0),
    )?;
    Ok(!has)
}

fn apply_job(c: &Connection, r: &pb::JobReport, now: i64) -> rusqlite::Result<bool> {
    let new = c.execute(
        "INSERT OR IGNORE INTO reports(report_id, host_id, received_at) VALUES(?1, ?2, ?3)",
        params![r.report_id, r.host_id, now],
    )?;
    if new == 0 {
        return Ok(true);
    }
    touch_host(c, &r.host_id, &r.labels, r.outbox.as_ref(), now)?;
    let Some(status) = &r.status else {
        return Ok(false);
    };
    // A result is final: a late progress report (or a second result) never replaces it.
    c.execute(
        "INSERT INTO jobs(host_id, job_id, state, final, reboot_attempted, reboot_succeeded, status, updated_at)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(host_id, job_id) DO UPDATE SET state = excluded.state, final = excluded.final,
           reboot_attempted = excluded.reboot_attempted, reboot_succeeded = excluded.reboot_succeeded,
           status = excluded.status, updated_at = excluded.updated_at
         WHERE jobs.final = 0",
        params![
            r.host_id,
            status.job_id,
            patch_agent_wire::convert::state_name(status.state),
            r.r#final,
            r.reboot_attempted,
            r.reboot_succeeded,
            status.encode_to_vec(),
            now
        ],
    )?;
    Ok(false)
}

/// A reported timestamp in unix seconds, clamped to 1970..=9999 so no later arithmetic on it
/// can overflow, whatever an agent sent.
fn secs(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| {
        t.seconds
            .clamp(0, patch_agent_wire::time::MAX_TIMESTAMP_SECS)
    })
}

fn apply_inventory(c: &Connection, r: &pb::InventoryReport, now: i64) -> rusqlite::Result<bool> {
    touch_host(c, &r.host_id, &r.labels, r.outbox.as_ref(), now)?;
    let Some(inv) = &r.inventory else {
        let same = c.execute(
            "UPDATE inventories SET scanned_at = ?3, received_at = ?4 WHERE host_id = ?1 AND checksum = ?2",
            params![r.host_id, r.checksum, secs(r.scanned_at.as_ref()), now],
        )?;
        return Ok(same > 0);
    };
    let reboot = inv.reboot.as_ref().is_some_and(|b| b.required);
    c.execute(
        "INSERT INTO inventories(host_id, checksum, data, reboot_required, scanned_at, received_at, scan_errors)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(host_id) DO UPDATE SET checksum = excluded.checksum, data = excluded.data,
           reboot_required = excluded.reboot_required, scanned_at = excluded.scanned_at,
           received_at = excluded.received_at, scan_errors = excluded.scan_errors",
        params![
            r.host_id,
            r.checksum,
            inv.encode_to_vec(),
            reboot,
            secs(r.scanned_at.as_ref()),
            now,
            (inv.repo_errors.len() + inv.scan_errors.len()) as i64
        ],
    )?;
    // Pending updates: keep the earliest first-seen time of each (name, arch); what is no
    // longer pending was resolved now.
    let mut old: HashMap<(String, String), (String, i32, i64, i64)> = HashMap::new();
    {
        let mut q = c.prepare(
            "SELECT name, arch, candidate, sla_class, since, first_seen FROM pending WHERE host_id = ?1",
        )?;
        let rows = q.query_map([&r.host_id], |row| {
            Ok((
                (row.get::<_, String>(0)?, row.get::<_, String>(1)?),
                (row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?),
            ))
        })?;
        for row in rows {
            let (k, v) = row?;
            old.insert(k, v);
        }
    }
    c.execute("DELETE FROM pending WHERE host_id = ?1", [&r.host_id])?;
    let resolved_at = secs(r.scanned_at.as_ref()).unwrap_or(now);
    {
        let mut ins = c.prepare(
            "INSERT OR REPLACE INTO pending(host_id, name, arch, candidate, sla_class, since, first_seen)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for u in &inv.updates {
            let key = (u.name.clone(), u.architecture.clone());
            let agent_seen = secs(u.first_seen.as_ref()).unwrap_or(now);
            let first_seen = old
                .remove(&key)
                .map_or(agent_seen, |(_, _, _, f)| f.min(agent_seen));
            let since = secs(u.issued.as_ref()).unwrap_or(first_seen);
            ins.execute(params![
                r.host_id,
                u.name,
                u.architecture,
                u.candidate_version,
                u.sla_class,
                since,
                first_seen
            ])?;
        }
    }
    let mut res = c.prepare(
        "INSERT INTO resolved(host_id, name, arch, candidate, sla_class, since, resolved_at)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for ((name, arch), (candidate, sla, since, _)) in old {
        res.execute(params![
            r.host_id,
            name,
            arch,
            candidate,
            sla,
            since,
            resolved_at
        ])?;
    }
    Ok(true)
}

fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let blob: Vec<u8> = row.get(6)?;
    let s = pb::JobStatus::decode(blob.as_slice()).unwrap_or_default();
    Ok(JobRow {
        host_id: row.get(0)?,
        job_id: row.get(1)?,
        state: row.get(2)?,
        r#final: row.get(3)?,
        reboot_attempted: row.get(4)?,
        reboot_succeeded: row.get(5)?,
        updated_at: row.get(7)?,
        reason: s.reason,
        summary: s.summary,
        dry_run: s.dry_run,
        key_id: s.key_id,
        submitted_at: secs(s.submitted_at.as_ref()),
        started_at: secs(s.started_at.as_ref()),
        finished_at: secs(s.finished_at.as_ref()),
        packages: s
            .packages
            .into_iter()
            .map(|p| PackageRow {
                name: p.name,
                from_version: p.from_version,
                to_version: p.to_version,
                outcome: p.outcome,
            })
            .collect(),
    })
}

const JOB_COLUMNS: &str =
    "host_id, job_id, state, final, reboot_attempted, reboot_succeeded, status, updated_at";

#[tonic::async_trait]
impl Store for SqliteStore {
    async fn hello(&self, h: pb::HelloRequest, now: i64) -> Result<Admitted<bool>> {
        self.write(move |c| admitted(c, &h.host_id, |c| apply_hello(c, &h, now)))
            .await
    }

    async fn job_report(&self, r: pb::JobReport, now: i64) -> Result<Admitted<bool>> {
        self.write(move |c| admitted(c, &r.host_id, |c| apply_job(c, &r, now)))
            .await
    }

    async fn inventory(&self, r: pb::InventoryReport, now: i64) -> Result<Admitted<bool>> {
        self.write(move |c| admitted(c, &r.host_id, |c| apply_inventory(c, &r, now)))
            .await
    }

    async fn history(&self, host: Option<String>, job: Option<String>) -> Result<Vec<JobRow>> {
        self.read(move |c| {
            let mut q = c.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR host_id = ?1)
                 AND (?2 IS NULL OR job_id = ?2) ORDER BY updated_at, host_id, job_id"
            ))?;
            q.query_map(params![host, job], job_row)?.collect()
        })
        .await
    }

    async fn snapshot(&self) -> Result<FleetSnapshot> {
        self.read(|c| {
            let hosts = c
                .prepare(
                    "SELECT h.host_id, h.labels, h.agent_version, h.last_seen, i.host_id IS NOT NULL,
                       coalesce(i.reboot_required, 0), h.dropped_progress, h.dropped_final,
                       coalesce(i.scan_errors, 0), coalesce(i.scanned_at, i.received_at)
                     FROM hosts h LEFT JOIN inventories i ON i.host_id = h.host_id ORDER BY h.host_id",
                )?
                .query_map([], |row| {
                    let labels: String = row.get(1)?;
                    Ok(HostRow {
                        host_id: row.get(0)?,
                        labels: serde_json::from_str(&labels).unwrap_or_default(),
                        agent_version: row.get(2)?,
                        last_seen: row.get(3)?,
                        has_inventory: row.get(4)?,
                        reboot_required: row.get(5)?,
                        dropped_progress: row.get::<_, i64>(6)? as u64,
                        dropped_final: row.get::<_, i64>(7)? as u64,
                        scan_errors: row.get(8)?,
                        scanned_at: row.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let pending = c
                .prepare("SELECT host_id, name, sla_class, since FROM pending ORDER BY host_id, name")?
                .query_map([], |row| {
                    Ok(PendingRow {
                        host_id: row.get(0)?,
                        name: row.get(1)?,
                        sla_class: row.get(2)?,
                        since: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let resolved = c
                .prepare("SELECT host_id, name, sla_class, since, resolved_at FROM resolved")?
                .query_map([], |row| {
                    Ok(ResolvedRow {
                        host_id: row.get(0)?,
                        name: row.get(1)?,
                        sla_class: row.get(2)?,
                        since: row.get(3)?,
                        resolved_at: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let jobs = c
                .prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE final = 1"))?
                .query_map([], job_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(FleetSnapshot {
                hosts,
                pending,
                resolved,
                jobs,
            })
        })
        .await
    }

    async fn create_token(&self, t: NewToken) -> Result<()> {
        self.write(move |c| enrollment::create_token(c, &t)).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.read(enrollment::tokens).await
    }

    async fn revoke_token(&self, id: String, now: i64) -> Result<bool> {
        self.write(move |c| enrollment::revoke_token(c, &id, now))
            .await
    }

    async fn enroll(
        &self,
        e: Enrolment,
        now: i64,
    ) -> Result<std::result::Result<BTreeMap<String, String>, Refusal>> {
        self.write(move |c| enrollment::enroll(c, &e, now)).await
    }

    async fn renewable(
        &self,
        host_id: String,
    ) -> Result<std::result::Result<Vec<String>, Refusal>> {
        self.read(move |c| enrollment::renewable(c, &host_id)).await
    }

    async fn renewed(&self, host_id: String, serial: String, not_after: i64) -> Result<bool> {
        self.write(move |c| enrollment::renewed(c, &host_id, &serial, not_after))
            .await
    }

    async fn revoke_host(&self, host_id: String, now: i64) -> Result<bool> {
        self.write(move |c| enrollment::revoke_host(c, &host_id, now))
            .await
    }

    async fn host_list(&self) -> Result<Vec<HostListRow>> {
        self.read(enrollment::host_list).await
    }

    async fn channel_opened(
        &self,
        host_id: String,
        labels: HashMap<String, String>,
        version: String,
        now: i64,
    ) -> Result<Admitted<()>> {
        self.write(move |c| control::channel_opened(c, &host_id, &labels, &version, now))
            .await
    }

    async fn channel_closed(&self, host_id: String, now: i64) -> Result<()> {
        self.write(move |c| control::channel_closed(c, &host_id, now))
            .await
    }

    async fn channels_reset(&self) -> Result<()> {
        self.write(control::channels_reset).await
    }

    async fn host_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        self.read(control::host_labels).await
    }

    async fn job_final(&self, host_id: String, job_id: String) -> Result<Option<pb::JobStatus>> {
        self.read(move |c| control::job_final(c, &host_id, &job_id))
            .await
    }

    async fn create_rollout(&self, r: NewRollout) -> Result<()> {
        self.write(move |c| control::create_rollout(c, &r)).await
    }

    async fn rollout(&self, id: String, hosts: bool) -> Result<Option<RolloutData>> {
        self.read(move |c| control::rollout(c, &id, hosts)).await
    }

    async fn rollouts(&self) -> Result<Vec<pb::Rollout>> {
        self.read(control::rollouts).await
    }

    async fn active_rollouts(&self) -> Result<Vec<String>> {
        self.read(control::active_rollouts).await
    }

    async fn set_rollout_state(
        &self,
        id: String,
        from: Vec<pb::RolloutState>,
        to: pb::RolloutState,
        note: String,
    ) -> Result<bool> {
        self.write(move |c| control::set_state(c, &id, &from, to, &note))
            .await
    }

    async fn occurrence_started(
        &self,
        id: String,
        idx: u32,
        hosts: Vec<(String, u32)>,
        now: i64,
    ) -> Result<()> {
        self.write(move |c| control::occurrence_started(c, &id, idx, &hosts, now))
            .await
    }

    async fn set_rollout_host(&self, id: String, idx: u32, h: pb::RolloutHost) -> Result<bool> {
        self.write(move |c| control::set_host(c, &id, idx, &h))
            .await
    }

    async fn occurrence_finished(
        &self,
        id: String,
        idx: u32,
        stopped: bool,
        now: i64,
    ) -> Result<()> {
        self.write(move |c| control::occurrence_finished(c, &id, idx, stopped, now))
            .await
    }

    async fn prune(&self, cutoff: i64, batch: usize) -> Result<usize> {
        self.write(move |c| prune(c, cutoff, batch)).await
    }
}

/// One batch of [`Store::prune`].
fn prune(c: &Connection, cutoff: i64, batch: usize) -> rusqlite::Result<usize> {
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let mut n = c.execute(
        "DELETE FROM jobs WHERE rowid IN
           (SELECT rowid FROM jobs WHERE final = 1 AND updated_at < ?1 LIMIT ?2)",
        params![cutoff, batch],
    )?;
    n += c.execute(
        "DELETE FROM reports WHERE rowid IN
           (SELECT rowid FROM reports WHERE received_at < ?1 LIMIT ?2)",
        params![cutoff, batch],
    )?;
    n += c.execute(
        "DELETE FROM resolved WHERE rowid IN
           (SELECT rowid FROM resolved WHERE resolved_at < ?1 LIMIT ?2)",
        params![cutoff, batch],
    )?;
    n += control::prune_rollouts(c, cutoff, batch)?;
    Ok(n)
}

/// The latest inventory of a host, if any (for `patchctl` views and tests).
pub fn read_inventory(path: &Path, host_id: &str) -> Result<Option<pb::Inventory>> {
    let c = open(path, false)?;
    let blob: Option<Vec<u8>> = c
        .query_row(
            "SELECT data FROM inventories WHERE host_id = ?1",
            [host_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    blob.map(|b| pb::Inventory::decode(b.as_slice()).map_err(|e| e.to_string()))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(host: &str, job: &str, state: pb::JobState, n: &str) -> pb::JobReport {
        pb::JobReport {
            report_id: format!("{host}:{job}:{n}"),
            host_id: host.into(),
            status: Some(pb::JobStatus {
                job_id: job.into(),
                state: state as i32,
                ..Default::default()
            }),
            r#final: n == "final",
            ..Default::default()
        }
    }

    fn token(id: &str, secret: &str, uses: u32, expires_at: i64, reenroll: bool) -> NewToken {
        NewToken {
            id: id.into(),
            secret_sha256: sha256(secret),
            labels: [("environment".to_string(), "prod".to_string())].into(),
            uses,
            reenroll,
            created_at: 0,
            expires_at,
        }
    }

    fn sha256(s: &str) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref());
        out
    }

    fn enrolment(token: &str, secret: &str, host: &str, names: &[&str]) -> Enrolment {
        Enrolment {
            token_id: token.into(),
            secret_sha256: sha256(secret),
            host_id: host.into(),
            names: std::iter::once(host)
                .chain(names.iter().copied())
                .map(String::from)
                .collect(),
            serial: format!("{host}-serial"),
            not_after: 1000,
            agent_version: "0.1.0".into(),
            facts: Vec::new(),
        }
    }

    #[tokio::test]
    async fn tokens_names_and_revocation() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open_writer(&dir.path().join("c.db")).expect("open");
        s.create_token(token("t1", "s1", 1, 100, false))
            .await
            .expect("t1");
        s.create_token(token("t2", "s2", 5, 100, false))
            .await
            .expect("t2");
        s.create_token(token("old", "s3", 5, 10, false))
            .await
            .expect("old");
        s.create_token(token("re", "s4", 5, 100, true))
            .await
            .expect("re");
        let enroll = |e: Enrolment| s.enroll(e, 50);
        let labels = enroll(enrolment("t1", "s1", "h1", &["h1.example"]))
            .await
            .expect("write")
            .expect("enrolled");
        assert_eq!(labels["environment"], "prod");
        let refused =
            |r: Result<Admitted<BTreeMap<String, String>>>| r.expect("write").expect_err("refused");
        assert_eq!(
            refused(enroll(enrolment("t1", "s1", "h2", &[])).await),
            Refusal::TokenUsedUp
        );
        assert_eq!(
            refused(enroll(enrolment("t2", "wrong", "h2", &[])).await),
            Refusal::UnknownToken
        );
        assert_eq!(
            refused(enroll(enrolment("nope", "s2", "h2", &[])).await),
            Refusal::UnknownToken
        );
        assert_eq!(
            refused(enroll(enrolment("old", "s3", "h2", &[])).await),
            Refusal::TokenExpired
        );
        assert_eq!(
            refused(enroll(enrolment("t2", "s2", "h1", &[])).await),
            Refusal::AlreadyEnrolled("h1".into())
        );
        assert_eq!(
            refused(enroll(enrolment("t2", "s2", "h2", &["h1.example"])).await),
            Refusal::NameTaken {
                name: "h1.example".into(),
                owner: "h1".into()
            }
        );
        // Refusals spent nothing.
        let t2 = s
            .tokens()
            .await
            .expect("tokens")
            .into_iter()
            .find(|t| t.id == "t2")
            .expect("t2");
        assert_eq!((t2.uses_left, t2.used), (5, 0));
        assert!(s.revoke_token("t2".into(), 60).await.expect("revoke"));
        assert!(!s.revoke_token("t2".into(), 61).await.expect("again"));
        assert_eq!(
            refused(enroll(enrolment("t2", "s2", "h2", &[])).await),
            Refusal::TokenRevoked
        );

        // A revoked host's reports and renewals are refused, in the write's transaction.
        assert_eq!(
            s.renewable("h1".into()).await.expect("r").expect("ok"),
            ["h1", "h1.example"]
        );
        assert!(s.revoke_host("h1".into(), 70).await.expect("revoke"));
        let r = s
            .job_report(job("h1", "j", pb::JobState::Succeeded, "final"), 71)
            .await
            .expect("write");
        assert_eq!(r, Err(Refusal::Revoked("h1".into())));
        assert!(s.history(None, None).await.expect("history").is_empty());
        assert_eq!(
            s.renewable("h1".into()).await.expect("r"),
            Err(Refusal::Revoked("h1".into()))
        );
        assert!(
            !s.renewed("h1".into(), "x".into(), 2000)
                .await
                .expect("renewed")
        );
        assert_eq!(
            s.renewable("never".into()).await.expect("r"),
            Err(Refusal::NotEnrolled("never".into()))
        );
        // Re-enrolment lifts the revocation.
        enroll(enrolment("re", "s4", "h1", &[]))
            .await
            .expect("write")
            .expect("re-enrolled");
        let r = s
            .job_report(job("h1", "j", pb::JobState::Succeeded, "final"), 72)
            .await
            .expect("write");
        assert_eq!(r, Ok(false));
        let hosts = s.host_list().await.expect("hosts");
        assert_eq!(hosts[0].revoked_at, None);
        assert_eq!(hosts[0].cert_serial.as_deref(), Some("h1-serial"));
    }

    #[tokio::test]
    async fn history_older_than_the_retention_goes_in_batches_and_the_rest_stays() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open_writer(&dir.path().join("c.db")).expect("open");
        for i in 0..25 {
            s.job_report(
                job("h1", &format!("old-{i}"), pb::JobState::Succeeded, "final"),
                1_000,
            )
            .await
            .expect("w")
            .expect("admitted");
        }
        // Still running: progress is kept, whatever its age.
        s.job_report(job("h1", "running", pb::JobState::Applying, "2"), 1_000)
            .await
            .expect("w")
            .expect("admitted");
        s.job_report(job("h1", "new", pb::JobState::Succeeded, "final"), 9_000)
            .await
            .expect("w")
            .expect("admitted");
        // One small batch per call: 10 results and their 10 report ids.
        assert_eq!(s.prune(5_000, 10).await.expect("prune"), 20);
        let left = crate::retention::prune_all(&s, 5_000).await.expect("all");
        assert_eq!(left, 15 + 16, "the other 15 results, 16 report ids");
        assert_eq!(
            s.prune(5_000, 10).await.expect("prune"),
            0,
            "nothing left to do"
        );
        let mut jobs: Vec<String> = s
            .history(None, None)
            .await
            .expect("history")
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        jobs.sort();
        assert_eq!(jobs, ["new", "running"]);
        // The recent report is still a duplicate when sent again.
        assert!(
            s.job_report(job("h1", "new", pb::JobState::Succeeded, "final"), 9_001)
                .await
                .expect("w")
                .expect("admitted")
        );
    }

    #[tokio::test]
    async fn duplicates_are_stored_once_and_a_result_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("c.db");
        let s = SqliteStore::open_writer(&db).expect("open");
        assert!(
            !s.job_report(job("h1", "j", pb::JobState::Applying, "3"), 10)
                .await
                .expect("w")
                .expect("admitted")
        );
        assert!(
            !s.job_report(job("h1", "j", pb::JobState::Succeeded, "final"), 11)
                .await
                .expect("w")
                .expect("admitted")
        );
        assert!(
            s.job_report(job("h1", "j", pb::JobState::Succeeded, "final"), 12)
                .await
                .expect("w")
                .expect("admitted")
        );
        // A late progress report does not turn a result back into progress.
        s.job_report(job("h1", "j", pb::JobState::Verifying, "9"), 13)
            .await
            .expect("w")
            .expect("admitted");
        let rows = SqliteStore::open_reader(&db)
            .expect("reader")
            .history(None, None)
            .await
            .expect("history");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].state.as_str(), rows[0].r#final),
            ("SUCCEEDED", true)
        );
    }

    #[tokio::test]
    async fn inventory_checksums_and_resolved_updates() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("c.db");
        let s = SqliteStore::open_writer(&db).expect("open");
        let upd = |name: &str| pb::Update {
            name: name.into(),
            sla_class: pb::SlaClass::High as i32,
            first_seen: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            ..Default::default()
        };
        let report = |sum: &str, inv: Option<pb::Inventory>, at: i64| pb::InventoryReport {
            host_id: "h1".into(),
            checksum: sum.into(),
            inventory: inv,
            scanned_at: Some(prost_types::Timestamp {
                seconds: at,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(
            !s.inventory(report("a", None, 150), 150)
                .await
                .expect("w")
                .expect("admitted")
        );
        let inv = pb::Inventory {
            updates: vec![upd("x"), upd("y")],
            ..Default::default()
        };
        assert!(
            s.inventory(report("a", Some(inv), 150), 150)
                .await
                .expect("w")
                .expect("admitted")
        );
        assert!(
            s.inventory(report("a", None, 160), 160)
                .await
                .expect("w")
                .expect("admitted")
        );
        let inv = pb::Inventory {
            updates: vec![upd("y")],
            ..Default::default()
        };
        s.inventory(report("b", Some(inv), 400), 400)
            .await
            .expect("w")
            .expect("admitted");
        let snap = SqliteStore::open_reader(&db)
            .expect("reader")
            .snapshot()
            .await
            .expect("snap");
        assert_eq!(snap.pending.len(), 1);
        assert_eq!(snap.pending[0].name, "y");
        assert_eq!(snap.pending[0].since, 100);
        assert_eq!(snap.resolved.len(), 1);
        assert_eq!(
            (snap.resolved[0].name.as_str(), snap.resolved[0].resolved_at),
            ("x", 400)
        );
    }

    #[test]
    fn reader_refuses_what_is_not_a_controller_database() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = SqliteStore::open_reader(&dir.path().join("nope.db"));
        assert!(missing.err().is_some_and(|e| e.contains("does not exist")));
        let other = dir.path().join("other.db");
        std::fs::write(&other, b"hello").expect("write");
        assert!(SqliteStore::open_reader(&other).is_err());
    }
}
