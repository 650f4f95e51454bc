//! What agents report, in SQL: hellos, job reports (idempotent by report id; a result is never
//! replaced), inventories (pending updates keep their first-seen time; what stops being
//! pending is recorded as resolved), the history views, and retention.

use super::sql::{Db, DbResult, Row, Value, p};
use super::{Admitted, FleetSnapshot, HostRow, JobRow, PackageRow, PendingRow, ResolvedRow};
use super::{Refusal, enrollment};
use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeMap, HashMap};

/// Runs `f` unless the host is revoked.
pub fn admitted<T>(
    db: &mut dyn Db,
    host_id: &str,
    f: impl FnOnce(&mut dyn Db) -> DbResult<T>,
) -> DbResult<Admitted<T>> {
    if enrollment::host_revoked(db, host_id)? {
        return Ok(Err(Refusal::Revoked(host_id.to_string())));
    }
    f(db).map(Ok)
}

pub fn labels_json(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_else(|_| "{}".into())
}

fn touch_host(
    db: &mut dyn Db,
    host_id: &str,
    labels: &HashMap<String, String>,
    outbox: Option<&pb::OutboxStats>,
    now: i64,
) -> DbResult<()> {
    let (dp, df) = outbox.map_or((None, None), |o| {
        (Some(o.dropped_progress), Some(o.dropped_final))
    });
    db.exec(
        "INSERT INTO hosts(host_id, labels, first_seen, last_seen, dropped_progress, dropped_final)
         VALUES(?1, ?2, ?3, ?3, coalesce(CAST(?4 AS BIGINT), 0), coalesce(CAST(?5 AS BIGINT), 0))
         ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels, last_seen = ?3,
           dropped_progress = coalesce(CAST(?4 AS BIGINT), hosts.dropped_progress),
           dropped_final = coalesce(CAST(?5 AS BIGINT), hosts.dropped_final)",
        p![host_id, labels_json(labels), now, dp, df],
    )?;
    Ok(())
}

pub fn hello(db: &mut dyn Db, h: &pb::HelloRequest, now: i64) -> DbResult<bool> {
    touch_host(db, &h.host_id, &h.labels, h.outbox.as_ref(), now)?;
    db.exec(
        "UPDATE hosts SET agent_version = ?2, hello = ?3 WHERE host_id = ?1",
        p![&h.host_id, &h.agent_version, h.encode_to_vec()],
    )?;
    let has = db.row(
        "SELECT count(*) FROM inventories WHERE host_id = ?1",
        p![&h.host_id],
    )?;
    Ok(has.map(|r| r.i64(0)).transpose()?.unwrap_or(0) == 0)
}

pub fn job(db: &mut dyn Db, r: &pb::JobReport, now: i64) -> DbResult<bool> {
    let new = db.exec(
        "INSERT INTO reports(report_id, host_id, received_at) VALUES(?1, ?2, ?3)
         ON CONFLICT(report_id) DO NOTHING",
        p![&r.report_id, &r.host_id, now],
    )?;
    if new == 0 {
        return Ok(true);
    }
    touch_host(db, &r.host_id, &r.labels, r.outbox.as_ref(), now)?;
    let Some(status) = &r.status else {
        return Ok(false);
    };
    // A result is final: a late progress report (or a second result) never replaces it.
    db.exec(
        "INSERT INTO jobs(host_id, job_id, state, final, reboot_attempted, reboot_succeeded, status,
           updated_at, dry_run)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(host_id, job_id) DO UPDATE SET state = excluded.state, final = excluded.final,
           reboot_attempted = excluded.reboot_attempted, reboot_succeeded = excluded.reboot_succeeded,
           status = excluded.status, updated_at = excluded.updated_at, dry_run = excluded.dry_run
         WHERE jobs.final = 0",
        p![
            &r.host_id,
            &status.job_id,
            patch_agent_wire::convert::state_name(status.state),
            r.r#final,
            r.reboot_attempted,
            r.reboot_succeeded,
            status.encode_to_vec(),
            now,
            status.dry_run
        ],
    )?;
    Ok(false)
}

/// A job report, unless its host is revoked: [`job`] behind the revocation check, or on
/// PostgreSQL the same in one statement (one round trip instead of four; the hot path of
/// ingest, where replicas share the database's cores).
pub fn job_report(db: &mut dyn Db, r: &pb::JobReport, now: i64) -> DbResult<Admitted<bool>> {
    if db.dialect() == super::sql::Dialect::Sqlite {
        return admitted(db, &r.host_id, |db| job(db, r, now));
    }
    let (dp, df) = r.outbox.as_ref().map_or((None, None), |o| {
        (Some(o.dropped_progress), Some(o.dropped_final))
    });
    let status = r.status.as_ref();
    let row = db
        .row(
            "WITH revoked AS (
               SELECT 1 FROM hosts WHERE host_id = ?2 AND revoked_at IS NOT NULL),
             new AS (
               INSERT INTO reports(report_id, host_id, received_at)
               SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM revoked)
               ON CONFLICT (report_id) DO NOTHING RETURNING 1),
             host AS (
               INSERT INTO hosts(host_id, labels, first_seen, last_seen, dropped_progress, dropped_final)
               SELECT ?2, ?4, ?3, ?3, coalesce(CAST(?5 AS BIGINT), 0), coalesce(CAST(?6 AS BIGINT), 0)
               WHERE EXISTS (SELECT 1 FROM new)
               ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels, last_seen = excluded.last_seen,
                 dropped_progress = coalesce(CAST(?5 AS BIGINT), hosts.dropped_progress),
                 dropped_final = coalesce(CAST(?6 AS BIGINT), hosts.dropped_final)
               RETURNING 1),
             job AS (
               INSERT INTO jobs(host_id, job_id, state, final, reboot_attempted, reboot_succeeded,
                 status, updated_at, dry_run)
               SELECT ?2, ?7, ?8, ?9, ?10, ?11, ?12, ?3, ?13
               WHERE EXISTS (SELECT 1 FROM new) AND CAST(?12 AS BYTEA) IS NOT NULL
               ON CONFLICT(host_id, job_id) DO UPDATE SET state = excluded.state,
                 final = excluded.final, reboot_attempted = excluded.reboot_attempted,
                 reboot_succeeded = excluded.reboot_succeeded, status = excluded.status,
                 updated_at = excluded.updated_at, dry_run = excluded.dry_run
               WHERE jobs.final = 0
               RETURNING 1)
             SELECT (SELECT count(*) FROM revoked), (SELECT count(*) FROM new),
               (SELECT count(*) FROM host), (SELECT count(*) FROM job)",
            p![
                &r.report_id,
                &r.host_id,
                now,
                labels_json(&r.labels),
                dp,
                df,
                status.map(|s| s.job_id.as_str()),
                status.map(|s| patch_agent_wire::convert::state_name(s.state)),
                r.r#final,
                r.reboot_attempted,
                r.reboot_succeeded,
                status.map(Message::encode_to_vec),
                status.is_some_and(|s| s.dry_run)
            ],
        )?
        .ok_or_else(|| super::sql::DbError("the job report returned no row".into()))?;
    if row.i64(0)? > 0 {
        return Ok(Err(Refusal::Revoked(r.host_id.clone())));
    }
    Ok(Ok(row.i64(1)? == 0))
}

/// A reported timestamp in unix seconds, clamped to 1970..=9999 so no later arithmetic on it
/// can overflow, whatever an agent sent.
pub fn secs(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| {
        t.seconds
            .clamp(0, patch_agent_wire::time::MAX_TIMESTAMP_SECS)
    })
}

pub fn inventory(db: &mut dyn Db, r: &pb::InventoryReport, now: i64) -> DbResult<bool> {
    touch_host(db, &r.host_id, &r.labels, r.outbox.as_ref(), now)?;
    let Some(inv) = &r.inventory else {
        let same = db.exec(
            "UPDATE inventories SET scanned_at = ?3, received_at = ?4 WHERE host_id = ?1 AND checksum = ?2",
            p![&r.host_id, &r.checksum, secs(r.scanned_at.as_ref()), now],
        )?;
        return Ok(same > 0);
    };
    let reboot = inv.reboot.as_ref().is_some_and(|b| b.required);
    db.exec(
        "INSERT INTO inventories(host_id, checksum, data, reboot_required, scanned_at, received_at, scan_errors)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(host_id) DO UPDATE SET checksum = excluded.checksum, data = excluded.data,
           reboot_required = excluded.reboot_required, scanned_at = excluded.scanned_at,
           received_at = excluded.received_at, scan_errors = excluded.scan_errors",
        p![
            &r.host_id,
            &r.checksum,
            inv.encode_to_vec(),
            reboot,
            secs(r.scanned_at.as_ref()),
            now,
            inv.repo_errors.len() + inv.scan_errors.len()
        ],
    )?;
    // Pending updates: keep the earliest first-seen time of each (name, arch); what is no
    // longer pending was resolved now.
    let mut old: HashMap<(String, String), (String, i64, i64, i64)> = HashMap::new();
    for row in db.rows(
        "SELECT name, arch, candidate, sla_class, since, first_seen FROM pending WHERE host_id = ?1",
        p![&r.host_id],
    )? {
        old.insert(
            (row.text(0)?, row.text(1)?),
            (row.text(2)?, row.i64(3)?, row.i64(4)?, row.i64(5)?),
        );
    }
    db.exec("DELETE FROM pending WHERE host_id = ?1", p![&r.host_id])?;
    let resolved_at = secs(r.scanned_at.as_ref()).unwrap_or(now);
    // One row per (name, arch): a later duplicate in the report replaces an earlier one.
    let mut rows: Vec<Vec<Value>> = Vec::with_capacity(inv.updates.len());
    let mut at: HashMap<(&str, &str), usize> = HashMap::new();
    for u in &inv.updates {
        let key = (u.name.clone(), u.architecture.clone());
        let agent_seen = secs(u.first_seen.as_ref()).unwrap_or(now);
        let first_seen = old
            .remove(&key)
            .map_or(agent_seen, |(_, _, _, f)| f.min(agent_seen));
        let since = secs(u.issued.as_ref()).unwrap_or(first_seen);
        let row = p![
            &r.host_id,
            &u.name,
            &u.architecture,
            &u.candidate_version,
            u.sla_class,
            since,
            first_seen,
            u.severity,
            deadline(u.sla_class, since)
        ]
        .to_vec();
        match at.entry((u.name.as_str(), u.architecture.as_str())) {
            std::collections::hash_map::Entry::Occupied(e) => rows[*e.get()] = row,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(rows.len());
                rows.push(row);
            }
        }
    }
    insert_rows(
        db,
        "INSERT INTO pending(host_id, name, arch, candidate, sla_class, since, first_seen, severity, deadline)",
        "ON CONFLICT(host_id, name, arch) DO UPDATE SET candidate = excluded.candidate,
           sla_class = excluded.sla_class, since = excluded.since, first_seen = excluded.first_seen,
           severity = excluded.severity, deadline = excluded.deadline",
        &rows,
    )?;
    pending_cves(db, &r.host_id, &inv.updates)?;
    let resolved: Vec<Vec<Value>> = old
        .into_iter()
        .map(|((name, arch), (candidate, sla, since, _))| {
            p![&r.host_id, name, arch, candidate, sla, since, resolved_at].to_vec()
        })
        .collect();
    insert_rows(
        db,
        "INSERT INTO resolved(host_id, name, arch, candidate, sla_class, since, resolved_at)",
        "",
        &resolved,
    )?;
    Ok(true)
}

/// When a pending update of `class` whose clock started at `since` becomes overdue; None for a
/// class outside the four (never overdue, as in the dashboard).
pub fn deadline(class: i32, since: i64) -> Option<i64> {
    crate::compliance::CLASSES
        .iter()
        .find(|(c, _, _)| *c == class)
        .map(|(_, _, allow)| since.saturating_add(*allow))
}

/// The CVEs a host's pending updates fix, one row each (upper case), for `hosts list --cve`
/// and the dashboard's search.
pub fn pending_cves(db: &mut dyn Db, host_id: &str, updates: &[pb::Update]) -> DbResult<()> {
    db.exec("DELETE FROM pending_cves WHERE host_id = ?1", p![host_id])?;
    let mut cves: Vec<Vec<Value>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for u in updates {
        for cve in &u.cve_ids {
            let cve = cve.trim().to_ascii_uppercase();
            if !cve.is_empty()
                && cve.len() <= 64
                && seen.insert((u.name.as_str(), u.architecture.as_str(), cve.clone()))
            {
                cves.push(p![host_id, &u.name, &u.architecture, cve].to_vec());
            }
        }
    }
    insert_rows(
        db,
        "INSERT INTO pending_cves(host_id, name, arch, cve)",
        "",
        &cves,
    )
}

/// Rows per multi-row insert: a few fixed sizes, so each connection prepares a few
/// statements, and a host's 50 pending updates take 5 statements, not 50.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// `head VALUES (...), (...) tail` for every row, in chunks of [`CHUNKS`] sizes.
fn insert_rows(db: &mut dyn Db, head: &str, tail: &str, rows: &[Vec<Value>]) -> DbResult<()> {
    let mut rest = rows;
    while let Some(first) = rest.first() {
        let n = CHUNKS.into_iter().find(|c| *c <= rest.len()).unwrap_or(1);
        let width = first.len();
        let values: Vec<String> = (0..n)
            .map(|i| {
                let cols: Vec<String> =
                    (1..=width).map(|c| format!("?{}", i * width + c)).collect();
                format!("({})", cols.join(", "))
            })
            .collect();
        let (chunk, more) = rest.split_at(n);
        let params: Vec<Value> = chunk.iter().flatten().cloned().collect();
        db.exec(
            &format!("{head} VALUES {} {tail}", values.join(", ")),
            &params,
        )?;
        rest = more;
    }
    Ok(())
}

const JOB_COLUMNS: &str =
    "host_id, job_id, state, final, reboot_attempted, reboot_succeeded, status, updated_at";

fn job_row(row: &Row) -> DbResult<JobRow> {
    let s = pb::JobStatus::decode(row.bytes(6)?.as_slice()).unwrap_or_default();
    Ok(JobRow {
        host_id: row.text(0)?,
        job_id: row.text(1)?,
        state: row.text(2)?,
        r#final: row.bool(3)?,
        reboot_attempted: row.bool(4)?,
        reboot_succeeded: row.bool(5)?,
        updated_at: row.i64(7)?,
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

pub fn history(db: &mut dyn Db, host: Option<&str>, job: Option<&str>) -> DbResult<Vec<JobRow>> {
    db.rows(
        &format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (CAST(?1 AS TEXT) IS NULL OR host_id = ?1)
             AND (CAST(?2 AS TEXT) IS NULL OR job_id = ?2) ORDER BY updated_at, host_id, job_id"
        ),
        p![host, job],
    )?
    .iter()
    .map(job_row)
    .collect()
}

pub fn labels(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Every row compliance is defined over (the reference the SQL figures are tested against).
pub fn snapshot(db: &mut dyn Db) -> DbResult<FleetSnapshot> {
    let hosts = db
        .rows(
            "SELECT h.host_id, h.labels, h.agent_version, h.last_seen,
               CASE WHEN i.host_id IS NULL THEN 0 ELSE 1 END,
               coalesce(i.reboot_required, 0), h.dropped_progress, h.dropped_final,
               coalesce(i.scan_errors, 0), coalesce(i.scanned_at, i.received_at)
             FROM hosts h LEFT JOIN inventories i ON i.host_id = h.host_id ORDER BY h.host_id",
            &[],
        )?
        .iter()
        .map(|row| {
            Ok(HostRow {
                host_id: row.text(0)?,
                labels: labels(&row.text(1)?),
                agent_version: row.text(2)?,
                last_seen: row.i64(3)?,
                has_inventory: row.bool(4)?,
                reboot_required: row.bool(5)?,
                dropped_progress: row.int(6)?,
                dropped_final: row.int(7)?,
                scan_errors: row.i64(8)?,
                scanned_at: row.opt_i64(9)?,
            })
        })
        .collect::<DbResult<Vec<_>>>()?;
    let pending = db
        .rows(
            "SELECT host_id, name, sla_class, since FROM pending ORDER BY host_id, name",
            &[],
        )?
        .iter()
        .map(|row| {
            Ok(PendingRow {
                host_id: row.text(0)?,
                name: row.text(1)?,
                sla_class: row.int(2)?,
                since: row.i64(3)?,
            })
        })
        .collect::<DbResult<Vec<_>>>()?;
    let resolved = db
        .rows(
            "SELECT host_id, name, sla_class, since, resolved_at FROM resolved",
            &[],
        )?
        .iter()
        .map(|row| {
            Ok(ResolvedRow {
                host_id: row.text(0)?,
                name: row.text(1)?,
                sla_class: row.int(2)?,
                since: row.i64(3)?,
                resolved_at: row.i64(4)?,
            })
        })
        .collect::<DbResult<Vec<_>>>()?;
    let jobs = db
        .rows(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE final = 1"),
            &[],
        )?
        .iter()
        .map(job_row)
        .collect::<DbResult<Vec<_>>>()?;
    Ok(FleetSnapshot {
        hosts,
        pending,
        resolved,
        jobs,
    })
}

/// One batch of [`super::Store::prune`].
pub fn prune(db: &mut dyn Db, cutoff: i64, batch: usize) -> DbResult<usize> {
    let id = db.dialect().row_id();
    let mut n = db.exec(
        "DELETE FROM jobs WHERE (host_id, job_id) IN
           (SELECT host_id, job_id FROM jobs WHERE final = 1 AND updated_at < ?1 LIMIT ?2)",
        p![cutoff, batch],
    )?;
    n += db.exec(
        "DELETE FROM reports WHERE report_id IN
           (SELECT report_id FROM reports WHERE received_at < ?1 LIMIT ?2)",
        p![cutoff, batch],
    )?;
    n += db.exec(
        &format!(
            "DELETE FROM resolved WHERE {id} IN
               (SELECT {id} FROM resolved WHERE resolved_at < ?1 LIMIT ?2)"
        ),
        p![cutoff, batch],
    )?;
    n += super::control::prune_rollouts(db, cutoff, batch)?;
    n += super::replicas::prune(db, cutoff, batch)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The latest inventory of a host, if any.
pub fn read_inventory(db: &mut dyn Db, host_id: &str) -> DbResult<Option<pb::Inventory>> {
    db.row(
        "SELECT data FROM inventories WHERE host_id = ?1",
        p![host_id],
    )?
    .map(|r| {
        pb::Inventory::decode(r.bytes(0)?.as_slice())
            .map_err(|e| super::sql::DbError(e.to_string()))
    })
    .transpose()
}
