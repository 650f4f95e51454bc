//! Versioned schema changes, for both backends.
//!
//! `schema_migrations` records each version applied. `patchctl db migrate` and `patchctl serve`
//! apply what is missing, in order, in one transaction (on PostgreSQL under an advisory lock,
//! so replicas starting together migrate once). Version 1 is the schema as it stood before
//! versions were recorded: on SQLite it is written so that it also adopts a database made by
//! an earlier `patchctl serve` (tables created if missing, columns added if missing).
//! Readers (`history`, `compliance`) refuse a database that is not at [`LATEST`], naming the
//! command that brings it there.

use super::sql::{Db, DbError, DbResult, Dialect, p};
use patch_agent_wire::proto::v1 as pb;

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
    /// What SQL alone cannot do, after the statements.
    after: Option<fn(&mut dyn Db) -> DbResult<()>>,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "reports, inventories, enrolment, rollouts",
        sqlite: V1_SQLITE,
        postgres: V1_POSTGRES,
        after: Some(sqlite_columns),
    },
    Migration {
        version: 2,
        name: "replicas, rollout leases, relayed pushes, compliance in SQL and its daily history",
        sqlite: V2_SQLITE,
        postgres: V2_POSTGRES,
        after: Some(backfill_dry_run),
    },
    Migration {
        version: 3,
        name: "pending updates' severity, deadline and CVEs, for the dashboard and `hosts list --cve`",
        sqlite: V3_SQLITE,
        postgres: V3_POSTGRES,
        after: Some(backfill_cves),
    },
];

pub const LATEST: i64 = 3;

/// The version a database is at; 0 when it has none recorded (empty, or made before
/// versions were).
pub fn current(db: &mut dyn Db) -> DbResult<i64> {
    let exists = match db.dialect() {
        Dialect::Sqlite => {
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        }
        Dialect::Postgres => {
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
        }
    };
    let has = db.row(exists, &[])?.map(|r| r.i64(0)).transpose()?;
    if has.unwrap_or(0) == 0 {
        return Ok(0);
    }
    Ok(db
        .row("SELECT max(version) FROM schema_migrations", &[])?
        .map(|r| r.opt_i64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0))
}

/// Applies every migration after the database's version, up to `to` (all when None); the
/// versions applied. Run inside one transaction.
pub fn migrate(db: &mut dyn Db, to: Option<i64>, now: i64) -> DbResult<Vec<i64>> {
    if db.dialect() == Dialect::Postgres {
        // Replicas starting together: one migrates, the others then find nothing to do.
        db.rows("SELECT pg_advisory_xact_lock(7411931100)", &[])?;
    }
    let at = current(db)?;
    if at > LATEST {
        return Err(DbError(format!(
            "the database is at schema version {at}, newer than this patchctl knows ({LATEST}); run the newer patchctl"
        )));
    }
    db.script(
        "CREATE TABLE IF NOT EXISTS schema_migrations(
           version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )?;
    let mut applied = Vec::new();
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > at && to.is_none_or(|t| m.version <= t))
    {
        db.script(match db.dialect() {
            Dialect::Sqlite => m.sqlite,
            Dialect::Postgres => m.postgres,
        })
        .map_err(|e| DbError(format!("migration {} ({}): {e}", m.version, m.name)))?;
        if let Some(after) = m.after {
            after(db).map_err(|e| DbError(format!("migration {} ({}): {e}", m.version, m.name)))?;
        }
        db.exec(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES(?1, ?2, ?3)",
            p![m.version, m.name, now],
        )?;
        applied.push(m.version);
    }
    Ok(applied)
}

/// A reader's check: the database is a controller database at the latest version.
pub fn check(db: &mut dyn Db, what: &str) -> DbResult<()> {
    match current(db)? {
        LATEST => Ok(()),
        0 => Err(DbError(format!(
            "{what} is not a controller database at a known schema version; if an older `patchctl serve` made it, run `patchctl db migrate --db {what}`"
        ))),
        v if v < LATEST => Err(DbError(format!(
            "{what} is at schema version {v}, this patchctl reads version {LATEST}: run `patchctl db migrate --db {what}` (or start `patchctl serve` on it)"
        ))),
        v => Err(DbError(format!(
            "{what} is at schema version {v}, newer than this patchctl knows ({LATEST}); use the newer patchctl"
        ))),
    }
}

/// Columns SQLite databases of the first releases may lack (before versions were recorded).
const SQLITE_ADDED: &[(&str, &str, &str)] = &[
    ("inventories", "scan_errors", "INTEGER NOT NULL DEFAULT 0"),
    ("hosts", "enrolled_at", "INTEGER"),
    ("hosts", "cert_serial", "TEXT"),
    ("hosts", "cert_not_after", "INTEGER"),
    ("hosts", "revoked_at", "INTEGER"),
    ("hosts", "enroll_token", "TEXT"),
    ("hosts", "facts", "BLOB"),
    ("hosts", "connected_since", "INTEGER"),
];

fn sqlite_columns(db: &mut dyn Db) -> DbResult<()> {
    if db.dialect() != Dialect::Sqlite {
        return Ok(());
    }
    for (table, column, decl) in SQLITE_ADDED {
        let has = db
            .row(
                &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                p![*column],
            )?
            .map(|r| r.i64(0))
            .transpose()?
            .unwrap_or(0);
        if has == 0 {
            db.script(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

/// `jobs.dry_run` for results stored before the column: read from each stored status.
fn backfill_dry_run(db: &mut dyn Db) -> DbResult<()> {
    use prost::Message;
    let rows = db.rows("SELECT host_id, job_id, status FROM jobs", &[])?;
    for r in rows {
        let status = pb::JobStatus::decode(r.bytes(2)?.as_slice()).unwrap_or_default();
        if status.dry_run {
            db.exec(
                "UPDATE jobs SET dry_run = 1 WHERE host_id = ?1 AND job_id = ?2",
                p![r.text(0)?, r.text(1)?],
            )?;
        }
    }
    Ok(())
}

/// `pending.severity` and `pending_cves` from every stored inventory.
fn backfill_cves(db: &mut dyn Db) -> DbResult<()> {
    use prost::Message;
    for r in db.rows("SELECT host_id, data FROM inventories", &[])? {
        let host = r.text(0)?;
        let inv = pb::Inventory::decode(r.bytes(1)?.as_slice()).unwrap_or_default();
        for u in inv.updates.iter().filter(|u| u.severity != 0) {
            db.exec(
                "UPDATE pending SET severity = ?4 WHERE host_id = ?1 AND name = ?2 AND arch = ?3",
                p![&host, &u.name, &u.architecture, u.severity],
            )?;
        }
        super::ingest::pending_cves(db, &host, &inv.updates)?;
    }
    Ok(())
}

const V1_SQLITE: &str = "
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
CREATE TABLE IF NOT EXISTS rollouts(
  id TEXT PRIMARY KEY,
  state INTEGER NOT NULL,
  serial TEXT NOT NULL,
  max_fail REAL NOT NULL,
  host_timeout_ms INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  targets TEXT NOT NULL,
  selector TEXT NOT NULL,
  note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS rollout_occurrences(
  rollout_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  job_id TEXT NOT NULL,
  envelope BLOB NOT NULL,
  start_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  stopped INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(rollout_id, idx));
CREATE TABLE IF NOT EXISTS rollout_hosts(
  rollout_id TEXT NOT NULL,
  idx INTEGER NOT NULL,
  host_id TEXT NOT NULL,
  batch INTEGER NOT NULL,
  state INTEGER NOT NULL,
  job_state TEXT NOT NULL DEFAULT '',
  reason TEXT NOT NULL DEFAULT '',
  started_at INTEGER,
  finished_at INTEGER,
  PRIMARY KEY(rollout_id, idx, host_id));
";

const V1_POSTGRES: &str = "
CREATE TABLE hosts(
  host_id TEXT PRIMARY KEY,
  labels TEXT NOT NULL DEFAULT '{}',
  agent_version TEXT NOT NULL DEFAULT '',
  hello BYTEA,
  first_seen BIGINT NOT NULL,
  last_seen BIGINT NOT NULL,
  dropped_progress BIGINT NOT NULL DEFAULT 0,
  dropped_final BIGINT NOT NULL DEFAULT 0,
  enrolled_at BIGINT,
  cert_serial TEXT,
  cert_not_after BIGINT,
  revoked_at BIGINT,
  enroll_token TEXT,
  facts BYTEA,
  connected_since BIGINT);
CREATE TABLE reports(
  report_id TEXT PRIMARY KEY,
  host_id TEXT NOT NULL,
  received_at BIGINT NOT NULL);
CREATE TABLE jobs(
  host_id TEXT NOT NULL,
  job_id TEXT NOT NULL,
  state TEXT NOT NULL,
  final BIGINT NOT NULL,
  reboot_attempted BIGINT NOT NULL,
  reboot_succeeded BIGINT NOT NULL,
  status BYTEA NOT NULL,
  updated_at BIGINT NOT NULL,
  PRIMARY KEY(host_id, job_id));
CREATE INDEX jobs_by_job ON jobs(job_id);
CREATE TABLE inventories(
  host_id TEXT PRIMARY KEY,
  checksum TEXT NOT NULL,
  data BYTEA NOT NULL,
  reboot_required BIGINT NOT NULL,
  scanned_at BIGINT,
  received_at BIGINT NOT NULL,
  scan_errors BIGINT NOT NULL DEFAULT 0);
CREATE TABLE pending(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  candidate TEXT NOT NULL,
  sla_class BIGINT NOT NULL,
  since BIGINT NOT NULL,
  first_seen BIGINT NOT NULL,
  PRIMARY KEY(host_id, name, arch));
CREATE TABLE tokens(
  id TEXT PRIMARY KEY,
  secret_sha256 BYTEA NOT NULL,
  labels TEXT NOT NULL,
  uses_left BIGINT NOT NULL,
  uses BIGINT NOT NULL DEFAULT 0,
  reenroll BIGINT NOT NULL DEFAULT 0,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  revoked_at BIGINT);
CREATE TABLE host_names(
  name TEXT PRIMARY KEY,
  host_id TEXT NOT NULL);
CREATE TABLE resolved(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  candidate TEXT NOT NULL,
  sla_class BIGINT NOT NULL,
  since BIGINT NOT NULL,
  resolved_at BIGINT NOT NULL);
CREATE TABLE rollouts(
  id TEXT PRIMARY KEY,
  state BIGINT NOT NULL,
  serial TEXT NOT NULL,
  max_fail DOUBLE PRECISION NOT NULL,
  host_timeout_ms BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  created_by TEXT NOT NULL,
  targets TEXT NOT NULL,
  selector TEXT NOT NULL,
  note TEXT NOT NULL DEFAULT '');
CREATE TABLE rollout_occurrences(
  rollout_id TEXT NOT NULL,
  idx BIGINT NOT NULL,
  job_id TEXT NOT NULL,
  envelope BYTEA NOT NULL,
  start_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  started_at BIGINT,
  finished_at BIGINT,
  stopped BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY(rollout_id, idx));
CREATE TABLE rollout_hosts(
  rollout_id TEXT NOT NULL,
  idx BIGINT NOT NULL,
  host_id TEXT NOT NULL,
  batch BIGINT NOT NULL,
  state BIGINT NOT NULL,
  job_state TEXT NOT NULL DEFAULT '',
  reason TEXT NOT NULL DEFAULT '',
  started_at BIGINT,
  finished_at BIGINT,
  PRIMARY KEY(rollout_id, idx, host_id));
";

const V2_SQLITE: &str = "
ALTER TABLE jobs ADD COLUMN dry_run INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN connected_to TEXT;
ALTER TABLE rollouts ADD COLUMN lease_owner TEXT;
ALTER TABLE rollouts ADD COLUMN lease_until INTEGER;
CREATE TABLE replicas(
  id TEXT PRIMARY KEY,
  address TEXT NOT NULL,
  started_at INTEGER NOT NULL,
  seen_at INTEGER NOT NULL);
CREATE TABLE relays(
  id TEXT PRIMARY KEY,
  host_id TEXT NOT NULL,
  replica TEXT NOT NULL,
  envelope BLOB NOT NULL,
  timeout_ms INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  taken_at INTEGER,
  answered_at INTEGER,
  code INTEGER,
  message TEXT,
  error TEXT);
CREATE INDEX relays_open ON relays(replica, answered_at);
CREATE TABLE compliance_daily(
  day INTEGER PRIMARY KEY,
  taken_at INTEGER NOT NULL,
  figures TEXT NOT NULL);
CREATE INDEX reports_by_age ON reports(received_at);
CREATE INDEX resolved_by_age ON resolved(resolved_at);
CREATE INDEX jobs_by_age ON jobs(final, updated_at);
";

const V2_POSTGRES: &str = "
ALTER TABLE jobs ADD COLUMN dry_run BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN connected_to TEXT;
ALTER TABLE rollouts ADD COLUMN lease_owner TEXT;
ALTER TABLE rollouts ADD COLUMN lease_until BIGINT;
CREATE TABLE replicas(
  id TEXT PRIMARY KEY,
  address TEXT NOT NULL,
  started_at BIGINT NOT NULL,
  seen_at BIGINT NOT NULL);
CREATE TABLE relays(
  id TEXT PRIMARY KEY,
  host_id TEXT NOT NULL,
  replica TEXT NOT NULL,
  envelope BYTEA NOT NULL,
  timeout_ms BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  taken_at BIGINT,
  answered_at BIGINT,
  code BIGINT,
  message TEXT,
  error TEXT);
CREATE INDEX relays_open ON relays(replica, answered_at);
CREATE TABLE compliance_daily(
  day BIGINT PRIMARY KEY,
  taken_at BIGINT NOT NULL,
  figures TEXT NOT NULL);
CREATE INDEX reports_by_age ON reports(received_at);
CREATE INDEX resolved_by_age ON resolved(resolved_at);
CREATE INDEX jobs_by_age ON jobs(final, updated_at);
";

const V3_SQLITE: &str = "
ALTER TABLE pending ADD COLUMN severity INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pending ADD COLUMN deadline INTEGER;
UPDATE pending SET deadline = since + (CASE sla_class WHEN 1 THEN 259200 WHEN 2 THEN 604800 WHEN 3 THEN 2592000 WHEN 4 THEN 7776000 END);
CREATE TABLE pending_cves(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  cve TEXT NOT NULL,
  PRIMARY KEY(host_id, name, arch, cve));
CREATE INDEX pending_cves_by_cve ON pending_cves(cve);
CREATE INDEX pending_by_host_class ON pending(host_id, sla_class, deadline, severity);
";

const V3_POSTGRES: &str = "
ALTER TABLE pending ADD COLUMN severity BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pending ADD COLUMN deadline BIGINT;
UPDATE pending SET deadline = since + (CASE sla_class WHEN 1 THEN 259200 WHEN 2 THEN 604800 WHEN 3 THEN 2592000 WHEN 4 THEN 7776000 END);
CREATE TABLE pending_cves(
  host_id TEXT NOT NULL,
  name TEXT NOT NULL,
  arch TEXT NOT NULL,
  cve TEXT NOT NULL,
  PRIMARY KEY(host_id, name, arch, cve));
CREATE INDEX pending_cves_by_cve ON pending_cves(cve);
CREATE INDEX pending_by_host_class ON pending(host_id, sla_class, deadline, severity);
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Location, SqlStore, Store};
    use prost::Message;

    /// What a database holds before its migration: a host, a dry-run result and a real one,
    /// a pending update and an inventory.
    fn old_rows(db: &mut dyn Db) -> DbResult<()> {
        let status = |job: &str, dry: bool| pb::JobStatus {
            job_id: job.into(),
            state: pb::JobState::Failed as i32,
            dry_run: dry,
            ..Default::default()
        };
        db.exec(
            "INSERT INTO hosts(host_id, labels, first_seen, last_seen) VALUES('h1', '{}', 1, 2)",
            &[],
        )?;
        for (job, dry) in [("dry", true), ("real", false)] {
            db.exec(
                "INSERT INTO jobs(host_id, job_id, state, final, reboot_attempted, reboot_succeeded, status, updated_at)
                 VALUES('h1', ?1, 'FAILED', 1, 0, 0, ?2, 3)",
                p![job, status(job, dry).encode_to_vec()],
            )?;
        }
        db.exec(
            "INSERT INTO inventories(host_id, checksum, data, reboot_required, scanned_at, received_at)
             VALUES('h1', 'x', ?1, 0, 4, 4)",
            p![
                pb::Inventory {
                    updates: vec![pb::Update {
                        name: "openssl".into(),
                        architecture: "amd64".into(),
                        severity: pb::Severity::Critical as i32,
                        cve_ids: vec!["CVE-2024-0001".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }
                .encode_to_vec()
            ],
        )?;
        db.exec(
            "INSERT INTO pending(host_id, name, arch, candidate, sla_class, since, first_seen)
             VALUES('h1', 'openssl', 'amd64', '3', 1, 4, 4)",
            &[],
        )?;
        Ok(())
    }

    async fn after(db: &Location) {
        let s = SqlStore::open_writer(db).await.expect("migrated on open");
        let d = s.compliance(5, 3600).await.expect("figures");
        assert_eq!(d.hosts, 1);
        assert_eq!(d.by_class[0].pending, 1, "the pending update survived");
        assert_eq!(
            (d.jobs_ran, d.jobs_failed),
            (1, 1),
            "the dry run is known as one after the migration: {db}"
        );
        assert_eq!(s.history(None, None).await.expect("history").len(), 2);
        // Version 3 back-filled the CVEs and severities of the stored inventory.
        let exposed = s.exposed("CVE-2024-0001".into(), 5).await.expect("exposed");
        assert_eq!(exposed.len(), 1, "{db}");
        assert_eq!(
            (exposed[0].host_id.as_str(), exposed[0].package.as_str()),
            ("h1", "openssl")
        );
        let views = s.host_views(5, 3600, None).await.expect("views");
        assert_eq!(views[0].worst_severity, "critical", "{db}");
        let m = SqlStore::migrate(db, None).await.expect("again");
        assert_eq!((m.from, m.to, m.applied.len()), (LATEST, LATEST, 0));
        SqlStore::open_reader(db)
            .await
            .expect("a reader accepts it");
    }

    #[tokio::test]
    async fn a_sqlite_database_from_before_versions_is_adopted_and_migrated() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("old.db");
        {
            // What `patchctl serve` made before schema versions: the tables and columns,
            // and no schema_migrations.
            let conn = rusqlite::Connection::open(&path).expect("open");
            let mut db = crate::store::sqlite::Lite(&conn);
            db.script(V1_SQLITE).expect("v1");
            sqlite_columns(&mut db).expect("columns");
            old_rows(&mut db).expect("rows");
            assert_eq!(current(&mut db).expect("version"), 0);
        }
        let loc = Location::File(path);
        let e = SqlStore::open_reader(&loc).await.err().expect("refused");
        assert!(e.contains("patchctl db migrate --db"), "{e}");
        after(&loc).await;
    }

    #[tokio::test]
    async fn a_postgres_database_at_version_1_is_migrated() {
        let url = crate::testing::Server::shared().database().expect("pg");
        let loc = Location::Postgres(url.clone());
        let m = SqlStore::migrate(&loc, Some(1))
            .await
            .expect("to version 1");
        assert_eq!((m.from, m.to), (0, 1));
        tokio::task::spawn_blocking(move || {
            let mut client = crate::store::postgres::connect(&url).expect("connect");
            let mut cache = crate::store::postgres::Cache::new();
            let mut tx = client.transaction().expect("tx");
            old_rows(&mut crate::store::postgres::PgDb {
                client: &mut tx,
                cache: &mut cache,
            })
            .expect("rows");
            tx.commit().expect("commit");
        })
        .await
        .expect("join");
        let e = SqlStore::open_reader(&loc).await.err().expect("refused");
        assert!(e.contains("at schema version 1"), "{e}");
        after(&loc).await;
        // An empty database migrates from nothing.
        let fresh = Location::Postgres(crate::testing::Server::shared().database().expect("pg"));
        let m = SqlStore::migrate(&fresh, None).await.expect("fresh");
        assert_eq!((m.from, m.to), (0, LATEST));
    }
}
