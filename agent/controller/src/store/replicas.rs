//! Several controllers on one database, in SQL: each replica's heartbeat, which replica holds
//! each host's control channel, rollout leases, and pushes relayed to the replica that holds
//! the host.
//!
//! Times here are the database's clock ([`super::sql::Dialect::now`]), so replicas on machines
//! whose clocks disagree still agree on who is alive and who holds a lease.

use super::ingest::{admitted, labels, labels_json};
use super::sql::{Db, DbResult, p};
use super::{Admitted, Relayed};
use std::collections::{BTreeMap, HashMap};

/// A replica that has not beaten for this long is dead: its channels count as closed and its
/// leases can be taken.
pub const ALIVE_SECS: i64 = 15;

/// The host's `connected_since` when its channel's replica is alive, else NULL (SQL over a
/// `hosts h`).
pub fn connected_since(db: &dyn Db) -> String {
    format!(
        "CASE WHEN EXISTS(SELECT 1 FROM replicas r WHERE r.id = h.connected_to
           AND r.seen_at >= {} - {ALIVE_SECS}) THEN h.connected_since END",
        db.dialect().now()
    )
}

/// Records that replica `id` is alive.
pub fn beat(db: &mut dyn Db, id: &str, address: &str, started_at: i64) -> DbResult<()> {
    db.exec(
        &format!(
            "INSERT INTO replicas(id, address, started_at, seen_at) VALUES(?1, ?2, ?3, {now})
             ON CONFLICT(id) DO UPDATE SET address = excluded.address, seen_at = {now}",
            now = db.dialect().now()
        ),
        p![id, address, started_at],
    )?;
    Ok(())
}

pub fn channel_opened(
    db: &mut dyn Db,
    host_id: &str,
    replica: &str,
    labels: &HashMap<String, String>,
    version: &str,
    now: i64,
) -> DbResult<Admitted<()>> {
    admitted(db, host_id, |db| {
        db.exec(
            "INSERT INTO hosts(host_id, labels, agent_version, first_seen, last_seen, connected_since, connected_to)
             VALUES(?1, ?2, ?3, ?4, ?4, ?4, ?5)
             ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels,
               agent_version = excluded.agent_version, last_seen = ?4, connected_since = ?4,
               connected_to = ?5",
            p![host_id, labels_json(labels), version, now, replica],
        )?;
        Ok(())
    })
}

/// The channel closed; unless the host meanwhile connected to another replica.
pub fn channel_closed(db: &mut dyn Db, host_id: &str, replica: &str, now: i64) -> DbResult<()> {
    db.exec(
        "UPDATE hosts SET connected_since = NULL, connected_to = NULL,
           last_seen = CASE WHEN last_seen > ?2 THEN last_seen ELSE ?2 END
         WHERE host_id = ?1 AND connected_to = ?3",
        p![host_id, now, replica],
    )?;
    Ok(())
}

/// The live replica that holds the host's channel, if any.
pub fn holder(db: &mut dyn Db, host_id: &str) -> DbResult<Option<String>> {
    db.row(
        &format!(
            "SELECT h.connected_to FROM hosts h JOIN replicas r ON r.id = h.connected_to
             WHERE h.host_id = ?1 AND h.connected_since IS NOT NULL AND h.revoked_at IS NULL
               AND r.seen_at >= {} - {ALIVE_SECS}",
            db.dialect().now()
        ),
        p![host_id],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// Hosts connected to any live replica, not revoked, with their labels.
pub fn connected(db: &mut dyn Db) -> DbResult<Vec<(String, BTreeMap<String, String>)>> {
    db.rows(
        &format!(
            "SELECT h.host_id, h.labels FROM hosts h JOIN replicas r ON r.id = h.connected_to
             WHERE h.connected_since IS NOT NULL AND h.revoked_at IS NULL
               AND r.seen_at >= {} - {ALIVE_SECS}
             ORDER BY h.host_id",
            db.dialect().now()
        ),
        &[],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, labels(&r.text(1)?))))
    .collect()
}

/// Takes or renews the lease on a rollout for `ttl_secs`; false while another replica holds it.
pub fn lease(db: &mut dyn Db, rollout: &str, owner: &str, ttl_secs: i64) -> DbResult<bool> {
    let now = db.dialect().now();
    Ok(db.exec(
        &format!(
            "UPDATE rollouts SET lease_owner = ?2, lease_until = {now} + ?3
             WHERE id = ?1 AND (lease_owner IS NULL OR lease_owner = ?2 OR lease_until < {now})"
        ),
        p![rollout, owner, ttl_secs],
    )? == 1)
}

/// Gives the lease up (the rollout ended, or the replica stops).
pub fn release(db: &mut dyn Db, rollout: &str, owner: &str) -> DbResult<()> {
    db.exec(
        "UPDATE rollouts SET lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND lease_owner = ?2",
        p![rollout, owner],
    )?;
    Ok(())
}

pub const RELAY: &str = "patchagent_relay";
pub const RELAY_DONE: &str = "patchagent_relay_done";

/// A push for a host another replica holds: stored, and that replica told.
pub fn relay_put(
    db: &mut dyn Db,
    id: &str,
    host_id: &str,
    replica: &str,
    envelope: Vec<u8>,
    timeout_ms: i64,
    now: i64,
) -> DbResult<()> {
    db.exec(
        "INSERT INTO relays(id, host_id, replica, envelope, timeout_ms, created_at)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
        p![id, host_id, replica, envelope, timeout_ms, now],
    )?;
    notify(db, RELAY, replica)
}

/// Sends a notice (delivered when the transaction commits); a no-op on SQLite, whose one
/// controller has no one to tell.
fn notify(db: &mut dyn Db, channel: &str, payload: &str) -> DbResult<()> {
    if db.dialect() == super::sql::Dialect::Postgres {
        db.rows("SELECT pg_notify(?1, ?2)", p![channel, payload])?;
    }
    Ok(())
}

/// A relayed push to carry out.
#[derive(Debug, Clone)]
pub struct RelayTask {
    pub id: String,
    pub host_id: String,
    pub envelope: Vec<u8>,
    pub timeout_ms: i64,
}

/// Claims the relays waiting for `replica`: each is returned to one caller once.
pub fn relay_take(db: &mut dyn Db, replica: &str, now: i64) -> DbResult<Vec<RelayTask>> {
    let open = db.rows(
        "SELECT id, host_id, envelope, timeout_ms FROM relays
         WHERE replica = ?1 AND taken_at IS NULL ORDER BY created_at, id",
        p![replica],
    )?;
    let mut out = Vec::new();
    for r in open {
        let id = r.text(0)?;
        if db.exec(
            "UPDATE relays SET taken_at = ?2 WHERE id = ?1 AND taken_at IS NULL",
            p![&id, now],
        )? == 1
        {
            out.push(RelayTask {
                id,
                host_id: r.text(1)?,
                envelope: r.bytes(2)?,
                timeout_ms: r.i64(3)?,
            });
        }
    }
    Ok(out)
}

pub fn relay_answer(db: &mut dyn Db, id: &str, answer: &Relayed, now: i64) -> DbResult<()> {
    let (code, message, error) = match answer {
        Relayed::Admission { code, message } => (Some(*code), message.as_str(), None),
        Relayed::Failed(e) => (None, "", Some(e.as_str())),
    };
    db.exec(
        "UPDATE relays SET answered_at = ?2, code = ?3, message = ?4, error = ?5 WHERE id = ?1",
        p![id, now, code, message, error],
    )?;
    notify(db, RELAY_DONE, id)
}

/// The answer to a relayed push, once there is one; the row is deleted when read.
pub fn relay_result(db: &mut dyn Db, id: &str) -> DbResult<Option<Relayed>> {
    let Some(r) = db.row(
        "SELECT code, message, error FROM relays WHERE id = ?1 AND answered_at IS NOT NULL",
        p![id],
    )?
    else {
        return Ok(None);
    };
    let answer = match (r.opt_i64(0)?, r.opt_text(2)?) {
        (Some(code), _) => Relayed::Admission {
            code: i32::try_from(code).unwrap_or(2),
            message: r.opt_text(1)?.unwrap_or_default(),
        },
        (None, e) => Relayed::Failed(e.unwrap_or_else(|| "no answer".into())),
    };
    db.exec("DELETE FROM relays WHERE id = ?1", p![id])?;
    Ok(Some(answer))
}

/// Withdraws a relay nobody answered in time.
pub fn relay_cancel(db: &mut dyn Db, id: &str) -> DbResult<()> {
    db.exec("DELETE FROM relays WHERE id = ?1", p![id])?;
    Ok(())
}

/// Retention: relays and replicas not heard of since `cutoff`.
pub fn prune(db: &mut dyn Db, cutoff: i64, batch: usize) -> DbResult<u64> {
    let mut n = db.exec(
        "DELETE FROM relays WHERE id IN (SELECT id FROM relays WHERE created_at < ?1 LIMIT ?2)",
        p![cutoff, batch],
    )?;
    n += db.exec(
        "DELETE FROM replicas WHERE id IN (SELECT id FROM replicas WHERE seen_at < ?1 LIMIT ?2)",
        p![cutoff, batch],
    )?;
    Ok(n)
}
