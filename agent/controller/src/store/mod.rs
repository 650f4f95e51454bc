//! Where the controller keeps what agents report.
//!
//! [`Store`] is what the controller asks of its database; [`SqlStore`] answers it from SQLite
//! (one file, for one controller) or PostgreSQL (for large fleets and several controllers on
//! one database), chosen by `--db` ([`Location`]). The store's SQL is written once, against
//! [`sql::Db`], and each backend runs it.
//!
//! Writes go to one writer thread per process, which applies everything queued (up to a
//! batch) in one transaction, commits, and only then answers each caller. An agent removes a
//! report from its outbox only after that answer, so a report is never lost between the two;
//! and the report id is a primary key, so a report sent twice (to two replicas, even) is
//! stored once.

use patch_agent_wire::proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::{broadcast, oneshot};

pub mod control;
pub mod dashboard;
pub mod enrollment;
pub mod ingest;
pub mod migrate;
pub mod postgres;
pub mod replicas;
pub mod sql;
mod sqlite;
pub mod views;
mod writer;

pub use control::{NewOccurrence, NewRollout, RolloutData};
pub use enrollment::{Enrolment, HostListRow, NewToken, Refusal, TokenRow};
pub use postgres::Notice;
pub use replicas::RelayTask;
use sql::{Db, DbResult, Dialect};

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
    /// Every row compliance is defined over, loaded: the reference the SQL figures
    /// ([`Store::compliance`]) are tested and benchmarked against; not for fleets at scale.
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

    /// A host opened its control channel to `replica` (refused when revoked); it counts as
    /// connected while that replica is alive.
    async fn channel_opened(
        &self,
        host_id: String,
        replica: String,
        labels: HashMap<String, String>,
        version: String,
        now: i64,
    ) -> Result<Admitted<()>>;
    /// The channel to `replica` closed (nothing changes if the host moved to another).
    async fn channel_closed(&self, host_id: String, replica: String, now: i64) -> Result<()>;
    /// Replica `id` is alive (every few seconds).
    async fn beat(&self, id: String, address: String, started_at: i64) -> Result<()>;
    /// The live replica holding the host's channel, if any.
    async fn holder(&self, host_id: String) -> Result<Option<String>>;
    /// Hosts connected to any live replica, not revoked, with their labels.
    async fn connected(&self) -> Result<Vec<(String, BTreeMap<String, String>)>>;
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

    /// Takes or renews the lease on driving a rollout; false while another replica holds it.
    async fn lease_rollout(&self, id: String, owner: String, ttl_secs: i64) -> Result<bool>;
    async fn release_rollout(&self, id: String, owner: String) -> Result<()>;

    /// Stores a push for a host that `replica` holds, and tells that replica.
    async fn relay_put(&self, relay: RelayTask, replica: String, now: i64) -> Result<()>;
    /// Claims the pushes waiting for `replica`.
    async fn relay_take(&self, replica: String, now: i64) -> Result<Vec<RelayTask>>;
    async fn relay_answer(&self, id: String, answer: Relayed, now: i64) -> Result<()>;
    /// The answer to a relayed push once there is one (read once).
    async fn relay_result(&self, id: String) -> Result<Option<Relayed>>;
    async fn relay_cancel(&self, id: String) -> Result<()>;
    /// Notices from other replicas; None where there can be no other (SQLite).
    fn notices(&self) -> Option<broadcast::Receiver<Notice>>;

    /// The compliance dashboard as of `now`, computed in the database.
    async fn compliance(&self, now: i64, stale_after: i64) -> Result<crate::compliance::Dashboard>;
    /// Records the day's headline figures (replacing the day's earlier ones).
    async fn record_compliance(&self, d: crate::compliance::Dashboard) -> Result<()>;
    /// Daily figures from `since_day` (days since 1970-01-01), oldest first.
    async fn compliance_history(&self, since_day: i64) -> Result<Vec<dashboard::Daily>>;
    /// A host's latest inventory.
    async fn inventory_of(&self, host_id: String) -> Result<Option<pb::Inventory>>;
    /// Every host (or only `only`) with its compliance state and pending counts (the
    /// dashboard's host pages).
    async fn host_views(
        &self,
        now: i64,
        stale_after: i64,
        only: Option<String>,
    ) -> Result<Vec<views::HostView>>;
    /// The pending updates that fix `cve` (checked and upper case), on every host.
    async fn exposed(&self, cve: String, now: i64) -> Result<Vec<views::Exposure>>;

    /// Deletes history older than `cutoff` (unix seconds), at most `batch` rows of each kind
    /// per call, so ingest waits for one small batch at most: final job results and their
    /// report ids, resolved-update history, and rollouts that ended. Returns the rows deleted.
    async fn prune(&self, cutoff: i64, batch: usize) -> Result<usize>;
}

/// What became of a relayed push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// The agent answered: its admission's code and message.
    Admission { code: i32, message: String },
    /// The holding replica could not push (the host left, did not answer).
    Failed(String),
}

/// Where the store lives: `--db` as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    File(PathBuf),
    /// A PostgreSQL URL (`postgres://USER@HOST[:PORT]/DB`, a host that is a path being a
    /// Unix socket directory).
    Postgres(String),
}

impl std::str::FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err("--db is empty: give a file path or a postgres:// URL".into());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<::postgres::Config>()
                .map_err(|e| format!("{} is not a PostgreSQL URL: {e}", postgres::redact(s)))?;
            return Ok(Location::Postgres(s.to_string()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "--db {s}: {scheme}:// is not a database this controller uses; give a file path (SQLite) or a postgres:// URL"
            ));
        }
        Ok(Location::File(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

enum Reader {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(Arc<postgres::Readers>),
}

/// The store over SQLite or PostgreSQL; see the module documentation.
pub struct SqlStore {
    location: Location,
    writer: Option<Mutex<mpsc::Sender<writer::Op>>>,
    reader: Reader,
    notices: Option<broadcast::Sender<Notice>>,
}

/// What `patchctl db migrate` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    pub from: i64,
    pub applied: Vec<i64>,
    pub to: i64,
}

/// Brings the database to `to` (the latest when None); runs on a blocking thread.
fn migrate_blocking(location: &Location, to: Option<i64>) -> Result<Migrated> {
    let now = crate::now();
    let run = |db: &mut dyn Db| -> DbResult<Migrated> {
        let from = migrate::current(db)?;
        let applied = migrate::migrate(db, to, now)?;
        Ok(Migrated {
            from,
            to: applied.last().copied().unwrap_or(from),
            applied,
        })
    };
    let fail = |e: sql::DbError| format!("cannot migrate {location}: {e}");
    match location {
        Location::File(path) => {
            let mut conn = sqlite::open(path, true)?;
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| fail(e.into()))?;
            let out = run(&mut sqlite::Lite(&tx)).map_err(fail)?;
            tx.commit().map_err(|e| fail(e.into()))?;
            Ok(out)
        }
        Location::Postgres(url) => {
            let mut client = postgres::connect(url)?;
            let mut cache = postgres::Cache::new();
            let mut tx = client.transaction().map_err(|e| fail(e.into()))?;
            let out = run(&mut postgres::PgDb {
                client: &mut tx,
                cache: &mut cache,
            })
            .map_err(fail)?;
            tx.commit().map_err(|e| fail(e.into()))?;
            Ok(out)
        }
    }
}

impl SqlStore {
    /// `patchctl db migrate`: applies the migrations the database lacks.
    pub async fn migrate(location: &Location, to: Option<i64>) -> Result<Migrated> {
        let location = location.clone();
        tokio::task::spawn_blocking(move || migrate_blocking(&location, to))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Opens the database for writing, creating and migrating it as needed, with its writer
    /// thread (`patchctl serve`, and the commands that change tokens and hosts).
    pub async fn open_writer(location: &Location) -> Result<Self> {
        let location = location.clone();
        tokio::task::spawn_blocking(move || Self::open_writer_blocking(location))
            .await
            .map_err(|e| e.to_string())?
    }

    fn open_writer_blocking(location: Location) -> Result<Self> {
        migrate_blocking(&location, None)?;
        let (tx, rx) = mpsc::channel::<writer::Op>();
        let reader = match &location {
            Location::File(path) => {
                let conn = sqlite::open(path, true)?;
                std::thread::Builder::new()
                    .name("store-writer".into())
                    .spawn(move || sqlite::writer(conn, rx))
                    .map_err(|e| format!("cannot start the database writer: {e}"))?;
                Reader::Sqlite(Arc::new(Mutex::new(sqlite::open(path, false)?)))
            }
            Location::Postgres(url) => {
                let client = postgres::connect(url)?;
                let url2 = url.clone();
                std::thread::Builder::new()
                    .name("store-writer".into())
                    .spawn(move || postgres::writer(url2, client, rx))
                    .map_err(|e| format!("cannot start the database writer: {e}"))?;
                Reader::Postgres(Arc::new(postgres::Readers::new(
                    url.clone(),
                    postgres::connect(url)?,
                )))
            }
        };
        Ok(Self {
            location,
            writer: Some(Mutex::new(tx)),
            reader,
            notices: None,
        })
    }

    /// Opens an existing database to read (`patchctl history`, `compliance`); it must be at
    /// the schema version this patchctl reads.
    pub async fn open_reader(location: &Location) -> Result<Self> {
        let location = location.clone();
        tokio::task::spawn_blocking(move || {
            let reader = match &location {
                Location::File(path) => {
                    if !path.exists() {
                        return Err(format!(
                            "{} does not exist; pass the --db that `patchctl serve` writes",
                            path.display()
                        ));
                    }
                    let conn = sqlite::open(path, false)?;
                    migrate::check(&mut sqlite::Lite(&conn), &location.to_string())
                        .map_err(|e| e.to_string())?;
                    Reader::Sqlite(Arc::new(Mutex::new(conn)))
                }
                Location::Postgres(url) => {
                    let mut client = postgres::connect(url)?;
                    migrate::check(
                        &mut postgres::PgDb {
                            client: &mut client,
                            cache: &mut postgres::Cache::new(),
                        },
                        &location.to_string(),
                    )
                    .map_err(|e| e.to_string())?;
                    Reader::Postgres(Arc::new(postgres::Readers::new(url.clone(), client)))
                }
            };
            Ok(Self {
                location,
                writer: None,
                reader,
                notices: None,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Listens for other replicas' notices (PostgreSQL; nothing to hear on SQLite).
    pub fn listen(&mut self) {
        if let Location::Postgres(url) = &self.location {
            self.notices = Some(postgres::listen(
                url.clone(),
                &[replicas::RELAY, replicas::RELAY_DONE],
            ));
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.location {
            Location::File(_) => Dialect::Sqlite,
            Location::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Queues `f` to the writer thread; answers after the commit that includes it. `key` is
    /// the host (or other row) it touches.
    async fn write<T, F>(&self, key: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn Db) -> DbResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| format!("{} is open read-only", self.location))?;
        writer
            .lock()
            .map_err(|_| "the database writer failed".to_string())?
            .send(Box::new(writer::Write {
                key: key.to_string(),
                f,
                out: None,
                tx,
            }))
            .map_err(|_| "the database writer stopped".to_string())?;
        rx.await
            .map_err(|_| "the database writer stopped".to_string())?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> DbResult<T> + Send + 'static,
    ) -> Result<T> {
        match &self.reader {
            Reader::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn
                        .lock()
                        .map_err(|_| "the database reader failed".to_string())?;
                    f(&mut sqlite::Lite(&conn)).map_err(|e| format!("database read failed: {e}"))
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Reader::Postgres(readers) => readers.read(f).await,
        }
    }
}

#[tonic::async_trait]
impl Store for SqlStore {
    async fn hello(&self, h: pb::HelloRequest, now: i64) -> Result<Admitted<bool>> {
        let key = h.host_id.clone();
        self.write(&key, move |db| {
            ingest::admitted(db, &h.host_id, |db| ingest::hello(db, &h, now))
        })
        .await
    }

    async fn job_report(&self, r: pb::JobReport, now: i64) -> Result<Admitted<bool>> {
        let key = r.host_id.clone();
        self.write(&key, move |db| ingest::job_report(db, &r, now))
            .await
    }

    async fn inventory(&self, r: pb::InventoryReport, now: i64) -> Result<Admitted<bool>> {
        let key = r.host_id.clone();
        self.write(&key, move |db| {
            ingest::admitted(db, &r.host_id, |db| ingest::inventory(db, &r, now))
        })
        .await
    }

    async fn history(&self, host: Option<String>, job: Option<String>) -> Result<Vec<JobRow>> {
        self.read(move |db| ingest::history(db, host.as_deref(), job.as_deref()))
            .await
    }

    async fn snapshot(&self) -> Result<FleetSnapshot> {
        self.read(ingest::snapshot).await
    }

    async fn create_token(&self, t: NewToken) -> Result<()> {
        let key = t.id.clone();
        self.write(&key, move |db| enrollment::create_token(db, &t))
            .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.read(enrollment::tokens).await
    }

    async fn revoke_token(&self, id: String, now: i64) -> Result<bool> {
        let key = id.clone();
        self.write(&key, move |db| enrollment::revoke_token(db, &id, now))
            .await
    }

    async fn enroll(
        &self,
        e: Enrolment,
        now: i64,
    ) -> Result<std::result::Result<BTreeMap<String, String>, Refusal>> {
        let key = e.host_id.clone();
        self.write(&key, move |db| enrollment::enroll(db, &e, now))
            .await
    }

    async fn renewable(
        &self,
        host_id: String,
    ) -> Result<std::result::Result<Vec<String>, Refusal>> {
        self.read(move |db| enrollment::renewable(db, &host_id))
            .await
    }

    async fn renewed(&self, host_id: String, serial: String, not_after: i64) -> Result<bool> {
        let key = host_id.clone();
        self.write(&key, move |db| {
            enrollment::renewed(db, &host_id, &serial, not_after)
        })
        .await
    }

    async fn revoke_host(&self, host_id: String, now: i64) -> Result<bool> {
        let key = host_id.clone();
        self.write(&key, move |db| enrollment::revoke_host(db, &host_id, now))
            .await
    }

    async fn host_list(&self) -> Result<Vec<HostListRow>> {
        self.read(enrollment::host_list).await
    }

    async fn channel_opened(
        &self,
        host_id: String,
        replica: String,
        labels: HashMap<String, String>,
        version: String,
        now: i64,
    ) -> Result<Admitted<()>> {
        let key = host_id.clone();
        self.write(&key, move |db| {
            replicas::channel_opened(db, &host_id, &replica, &labels, &version, now)
        })
        .await
    }

    async fn channel_closed(&self, host_id: String, replica: String, now: i64) -> Result<()> {
        let key = host_id.clone();
        self.write(&key, move |db| {
            replicas::channel_closed(db, &host_id, &replica, now)
        })
        .await
    }

    async fn beat(&self, id: String, address: String, started_at: i64) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| {
            replicas::beat(db, &id, &address, started_at)
        })
        .await
    }

    async fn holder(&self, host_id: String) -> Result<Option<String>> {
        self.read(move |db| replicas::holder(db, &host_id)).await
    }

    async fn connected(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        self.read(replicas::connected).await
    }

    async fn host_labels(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        self.read(control::host_labels).await
    }

    async fn job_final(&self, host_id: String, job_id: String) -> Result<Option<pb::JobStatus>> {
        self.read(move |db| control::job_final(db, &host_id, &job_id))
            .await
    }

    async fn create_rollout(&self, r: NewRollout) -> Result<()> {
        let key = r.id.clone();
        self.write(&key, move |db| control::create_rollout(db, &r))
            .await
    }

    async fn rollout(&self, id: String, hosts: bool) -> Result<Option<RolloutData>> {
        self.read(move |db| control::rollout(db, &id, hosts)).await
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
        let key = id.clone();
        self.write(&key, move |db| {
            control::set_state(db, &id, &from, to, &note)
        })
        .await
    }

    async fn occurrence_started(
        &self,
        id: String,
        idx: u32,
        hosts: Vec<(String, u32)>,
        now: i64,
    ) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| {
            control::occurrence_started(db, &id, idx, &hosts, now)
        })
        .await
    }

    async fn set_rollout_host(&self, id: String, idx: u32, h: pb::RolloutHost) -> Result<bool> {
        let key = id.clone();
        self.write(&key, move |db| control::set_host(db, &id, idx, &h))
            .await
    }

    async fn occurrence_finished(
        &self,
        id: String,
        idx: u32,
        stopped: bool,
        now: i64,
    ) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| {
            control::occurrence_finished(db, &id, idx, stopped, now)
        })
        .await
    }

    async fn lease_rollout(&self, id: String, owner: String, ttl_secs: i64) -> Result<bool> {
        let key = id.clone();
        self.write(&key, move |db| replicas::lease(db, &id, &owner, ttl_secs))
            .await
    }

    async fn release_rollout(&self, id: String, owner: String) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| replicas::release(db, &id, &owner))
            .await
    }

    async fn relay_put(&self, relay: RelayTask, replica: String, now: i64) -> Result<()> {
        let key = relay.host_id.clone();
        self.write(&key, move |db| {
            replicas::relay_put(
                db,
                &relay.id,
                &relay.host_id,
                &replica,
                relay.envelope.clone(),
                relay.timeout_ms,
                now,
            )
        })
        .await
    }

    async fn relay_take(&self, replica: String, now: i64) -> Result<Vec<RelayTask>> {
        let key = replica.clone();
        self.write(&key, move |db| replicas::relay_take(db, &replica, now))
            .await
    }

    async fn relay_answer(&self, id: String, answer: Relayed, now: i64) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| {
            replicas::relay_answer(db, &id, &answer, now)
        })
        .await
    }

    async fn relay_result(&self, id: String) -> Result<Option<Relayed>> {
        let key = id.clone();
        self.write(&key, move |db| replicas::relay_result(db, &id))
            .await
    }

    async fn relay_cancel(&self, id: String) -> Result<()> {
        let key = id.clone();
        self.write(&key, move |db| replicas::relay_cancel(db, &id))
            .await
    }

    fn notices(&self) -> Option<broadcast::Receiver<Notice>> {
        self.notices.as_ref().map(broadcast::Sender::subscribe)
    }

    async fn compliance(&self, now: i64, stale_after: i64) -> Result<crate::compliance::Dashboard> {
        self.read(move |db| dashboard::query(db, now, stale_after))
            .await
    }

    async fn record_compliance(&self, d: crate::compliance::Dashboard) -> Result<()> {
        self.write("compliance", move |db| dashboard::record(db, &d))
            .await
    }

    async fn compliance_history(&self, since_day: i64) -> Result<Vec<dashboard::Daily>> {
        self.read(move |db| dashboard::history(db, since_day)).await
    }

    async fn inventory_of(&self, host_id: String) -> Result<Option<pb::Inventory>> {
        self.read(move |db| ingest::read_inventory(db, &host_id))
            .await
    }

    async fn host_views(
        &self,
        now: i64,
        stale_after: i64,
        only: Option<String>,
    ) -> Result<Vec<views::HostView>> {
        self.read(move |db| views::hosts(db, now, stale_after, only.as_deref()))
            .await
    }

    async fn exposed(&self, cve: String, now: i64) -> Result<Vec<views::Exposure>> {
        self.read(move |db| views::exposed(db, &cve, now)).await
    }

    async fn prune(&self, cutoff: i64, batch: usize) -> Result<usize> {
        self.write("", move |db| ingest::prune(db, cutoff, batch))
            .await
    }
}

/// Runs a store test against SQLite and against a real PostgreSQL server.
#[cfg(test)]
pub(crate) async fn for_each_backend<F, Fut>(test: F)
where
    F: Fn(Location) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tmp");
    test(Location::File(dir.path().join("c.db"))).await;
    let url = crate::testing::Server::shared()
        .database()
        .expect("a PostgreSQL database for the test");
    test(Location::Postgres(url)).await;
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
        crate::store::for_each_backend(tokens_names_and_revocation_on).await;
    }

    async fn tokens_names_and_revocation_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
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
        crate::store::for_each_backend(
            history_older_than_the_retention_goes_in_batches_and_the_rest_stays_on,
        )
        .await;
    }

    async fn history_older_than_the_retention_goes_in_batches_and_the_rest_stays_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
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
        crate::store::for_each_backend(
            duplicates_are_stored_once_and_a_result_is_never_replaced_on,
        )
        .await;
    }

    async fn duplicates_are_stored_once_and_a_result_is_never_replaced_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
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
        let rows = SqlStore::open_reader(&db)
            .await
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
    async fn host_views_and_cve_exposure() {
        crate::store::for_each_backend(host_views_and_cve_exposure_on).await;
    }

    async fn host_views_and_cve_exposure_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
        let day = 86_400;
        let now = 100 * day;
        let upd =
            |name: &str, class: pb::SlaClass, sev: pb::Severity, issued: i64, cves: &[&str]| {
                pb::Update {
                    name: name.into(),
                    architecture: "amd64".into(),
                    candidate_version: "2".into(),
                    sla_class: class as i32,
                    severity: sev as i32,
                    issued: Some(prost_types::Timestamp {
                        seconds: issued,
                        nanos: 0,
                    }),
                    cve_ids: cves.iter().map(|c| (*c).to_string()).collect(),
                    ..Default::default()
                }
            };
        let report = |host: &str, updates: Vec<pb::Update>, errors: usize| pb::InventoryReport {
            host_id: host.into(),
            report_id: format!("{host}:1"),
            checksum: host.into(),
            scanned_at: Some(prost_types::Timestamp {
                seconds: now - 60,
                nanos: 0,
            }),
            inventory: Some(pb::Inventory {
                updates,
                scan_errors: vec!["x".into(); errors],
                reboot: Some(pb::RebootStatus {
                    required: host == "b",
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        // a: an overdue critical (issued 4 days ago) fixing two CVEs, and a fresh low one.
        let a = vec![
            upd(
                "openssl",
                pb::SlaClass::Critical,
                pb::Severity::Critical,
                now - 4 * day,
                &["cve-2024-0001", "CVE-2024-0002"],
            ),
            upd(
                "vim",
                pb::SlaClass::Low,
                pb::Severity::Unknown,
                now - day,
                &[],
            ),
        ];
        // b: the same CVE pending, not overdue (a High issued a day ago); needs a reboot.
        let b = vec![upd(
            "openssl",
            pb::SlaClass::High,
            pb::Severity::Important,
            now - day,
            &["CVE-2024-0001"],
        )];
        for (host, updates, errors) in [("a", a, 0), ("b", b, 0), ("c", vec![], 2)] {
            s.inventory(report(host, updates, errors), now)
                .await
                .expect("w")
                .expect("admitted");
        }
        s.hello(
            pb::HelloRequest {
                host_id: "d".into(),
                ..Default::default()
            },
            now,
        )
        .await
        .expect("w")
        .expect("admitted");
        let views = s.host_views(now, 2 * day, None).await.expect("views");
        let one = s
            .host_views(now, 2 * day, Some("a".into()))
            .await
            .expect("one");
        assert_eq!((one.len(), one[0].pending), (1, [1, 0, 0, 1]));
        let by = |id: &str| views.iter().find(|v| v.host_id == id).expect(id).clone();
        assert_eq!(views.len(), 4);
        let va = by("a");
        assert_eq!(
            (va.compliance, va.pending, va.overdue, va.worst_severity),
            ("overdue", [1, 0, 0, 1], 1, "critical")
        );
        let vb = by("b");
        assert_eq!(
            (vb.compliance, vb.reboot_required, vb.worst_severity),
            ("compliant", true, "important")
        );
        assert_eq!(
            (by("c").compliance, by("c").unknown),
            ("unknown", "scan errors")
        );
        assert_eq!(
            (by("d").compliance, by("d").unknown),
            ("unknown", "no inventory")
        );
        // The dashboard counts the same hosts compliant.
        let d = s.compliance(now, 2 * day).await.expect("figures");
        assert_eq!(
            d.hosts_compliant,
            views.iter().filter(|v| v.compliance == "compliant").count()
        );

        let hit = s
            .exposed("CVE-2024-0001".into(), now)
            .await
            .expect("exposed");
        let hosts: Vec<(&str, &str, bool)> = hit
            .iter()
            .map(|e| (e.host_id.as_str(), e.sla_class, e.overdue))
            .collect();
        assert_eq!(hosts, [("a", "critical", true), ("b", "high", false)]);
        assert_eq!(hit[0].deadline, now - 4 * day + 72 * 3600);
        assert_eq!(
            s.exposed("CVE-2024-0002".into(), now)
                .await
                .expect("x")
                .len(),
            1
        );
        // Fixed on a: the update is gone, and so is the exposure.
        let mut later = report("a", vec![], 0);
        later.checksum = "a2".into();
        s.inventory(later, now).await.expect("w").expect("admitted");
        let hit = s
            .exposed("CVE-2024-0001".into(), now)
            .await
            .expect("exposed");
        assert_eq!(
            hit.iter().map(|e| e.host_id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert!(
            s.exposed("CVE-2024-0002".into(), now)
                .await
                .expect("x")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn inventory_checksums_and_resolved_updates() {
        crate::store::for_each_backend(inventory_checksums_and_resolved_updates_on).await;
    }

    async fn inventory_checksums_and_resolved_updates_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
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
            // A name twice in one report is one pending update (the later one).
            updates: vec![upd("y"), upd("y")],
            ..Default::default()
        };
        s.inventory(report("b", Some(inv), 400), 400)
            .await
            .expect("w")
            .expect("admitted");
        let snap = SqlStore::open_reader(&db)
            .await
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

    /// Two replicas' writers on one database, the same reports sent to both at once (agents
    /// failing over mid-stream, and resending what was not acknowledged): every write is
    /// acknowledged, none fails on the other's locks or keys, each report is stored once.
    #[tokio::test]
    async fn two_writers_on_one_postgres_store_each_report_once() {
        let url = crate::testing::Server::shared().database().expect("db");
        let db = Location::Postgres(url);
        let a = Arc::new(SqlStore::open_writer(&db).await.expect("a"));
        let b = Arc::new(SqlStore::open_writer(&db).await.expect("b"));
        let mut set = tokio::task::JoinSet::new();
        for s in [a.clone(), b.clone()] {
            for h in 0..20 {
                let s = s.clone();
                set.spawn(async move {
                    let mut dups = 0;
                    for n in 0..20 {
                        let state = if n == 19 {
                            pb::JobState::Succeeded
                        } else {
                            pb::JobState::Applying
                        };
                        let tag = if n == 19 {
                            "final".into()
                        } else {
                            n.to_string()
                        };
                        dups += usize::from(
                            s.job_report(job(&format!("h{h}"), "j", state, &tag), n)
                                .await
                                .expect("every write is acknowledged")
                                .expect("admitted"),
                        );
                    }
                    dups
                });
            }
        }
        let mut dups = 0;
        while let Some(d) = set.join_next().await {
            dups += d.expect("task");
        }
        assert_eq!(
            dups, 400,
            "each of the 400 reports stored by one, a duplicate to the other"
        );
        let rows = a.history(None, None).await.expect("history");
        assert_eq!(rows.len(), 20);
        assert!(rows.iter().all(|r| r.r#final && r.state == "SUCCEEDED"));
    }

    /// The database goes away under a running controller and comes back: writes and reads
    /// fail with the reason meanwhile (the agents keep their reports), and work again after,
    /// without a restart.
    #[tokio::test]
    async fn postgres_going_away_and_coming_back_needs_no_restart() {
        let server = crate::testing::Server::start(false).expect("a server of its own");
        let db = Location::Postgres(server.database().expect("db"));
        let s = SqlStore::open_writer(&db).await.expect("open");
        let report = |n: &str| job("h1", "j", pb::JobState::Applying, n);
        assert!(!s.job_report(report("1"), 1).await.expect("w").expect("ok"));
        server.stop();
        let e = s.job_report(report("2"), 2).await.expect_err("down");
        assert!(e.contains("database write failed"), "{e}");
        let e = s.history(None, None).await.expect_err("down");
        assert!(e.contains("database read failed"), "{e}");
        server.restart().expect("restart");
        assert!(!s.job_report(report("2"), 3).await.expect("w").expect("ok"));
        assert!(
            s.job_report(report("1"), 4).await.expect("w").expect("ok"),
            "what was stored before is still a duplicate"
        );
        assert_eq!(s.history(None, None).await.expect("read").len(), 1);
        server.stop();
    }

    #[tokio::test]
    async fn reader_refuses_what_is_not_a_controller_database() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = SqlStore::open_reader(&Location::File(dir.path().join("nope.db"))).await;
        assert!(missing.err().is_some_and(|e| e.contains("does not exist")));
        let other = dir.path().join("other.db");
        std::fs::write(&other, b"hello").expect("write");
        assert!(SqlStore::open_reader(&Location::File(other)).await.is_err());
        // An empty PostgreSQL database is not one either, until migrated.
        let url = crate::testing::Server::shared().database().expect("pg");
        let empty = Location::Postgres(url);
        let e = SqlStore::open_reader(&empty).await.err().expect("refused");
        assert!(e.contains("patchctl db migrate"), "{e}");
    }
}
