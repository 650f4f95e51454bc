//! What the controller drives, stored: which hosts hold a control channel now, and rollouts
//! (their signed jobs, one per occurrence, and every host's part), so a controller killed
//! mid-rollout resumes it where it stood.

use super::{Admitted, admitted, labels_json};
use patch_agent_wire::proto::v1 as pb;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};

pub const SCHEMA: &str = "
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

/// A rollout as created: everything but the hosts' parts.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub id: String,
    pub serial: String,
    pub max_fail_percent: f64,
    pub host_timeout_ms: i64,
    pub created_at: i64,
    pub created_by: String,
    pub targets: Vec<String>,
    pub selector: BTreeMap<String, String>,
    pub occurrences: Vec<NewOccurrence>,
}

#[derive(Debug, Clone)]
pub struct NewOccurrence {
    pub job_id: String,
    pub envelope: pb::SignedJob,
    pub start_at: i64,
    pub expires_at: i64,
}

/// A stored rollout: the view operators see, and each occurrence's signed job.
#[derive(Debug, Clone)]
pub struct RolloutData {
    pub rollout: pb::Rollout,
    pub envelopes: Vec<pb::SignedJob>,
}

pub fn channel_opened(
    c: &Connection,
    host_id: &str,
    labels: &HashMap<String, String>,
    version: &str,
    now: i64,
) -> rusqlite::Result<Admitted<()>> {
    admitted(c, host_id, |c| {
        c.execute(
            "INSERT INTO hosts(host_id, labels, agent_version, first_seen, last_seen, connected_since)
             VALUES(?1, ?2, ?3, ?4, ?4, ?4)
             ON CONFLICT(host_id) DO UPDATE SET labels = excluded.labels,
               agent_version = excluded.agent_version, last_seen = ?4, connected_since = ?4",
            params![host_id, labels_json(labels), version, now],
        )?;
        Ok(())
    })
}

pub fn channel_closed(c: &Connection, host_id: &str, now: i64) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE hosts SET connected_since = NULL, last_seen = max(last_seen, ?2) WHERE host_id = ?1",
        params![host_id, now],
    )?;
    Ok(())
}

/// At start: no host is connected to a controller that just started.
pub fn channels_reset(c: &Connection) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE hosts SET connected_since = NULL WHERE connected_since IS NOT NULL",
        [],
    )?;
    Ok(())
}

/// Hosts not revoked, with their labels: what a selector is matched against.
pub fn host_labels(c: &Connection) -> rusqlite::Result<Vec<(String, BTreeMap<String, String>)>> {
    c.prepare("SELECT host_id, labels FROM hosts WHERE revoked_at IS NULL ORDER BY host_id")?
        .query_map([], |r| {
            let labels: String = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_str(&labels).unwrap_or_default()))
        })?
        .collect()
}

/// The stored final status of a host's job, if its result arrived.
pub fn job_final(
    c: &Connection,
    host_id: &str,
    job_id: &str,
) -> rusqlite::Result<Option<pb::JobStatus>> {
    let blob: Option<Vec<u8>> = c
        .query_row(
            "SELECT status FROM jobs WHERE host_id = ?1 AND job_id = ?2 AND final = 1",
            params![host_id, job_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(blob.and_then(|b| prost::Message::decode(b.as_slice()).ok()))
}

pub fn create_rollout(c: &Connection, r: &NewRollout) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO rollouts(id, state, serial, max_fail, host_timeout_ms, created_at, created_by, targets, selector)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.id,
            pb::RolloutState::Scheduled as i32,
            r.serial,
            r.max_fail_percent,
            r.host_timeout_ms,
            r.created_at,
            r.created_by,
            serde_json::to_string(&r.targets).unwrap_or_else(|_| "[]".into()),
            serde_json::to_string(&r.selector).unwrap_or_else(|_| "{}".into()),
        ],
    )?;
    for (i, o) in r.occurrences.iter().enumerate() {
        c.execute(
            "INSERT INTO rollout_occurrences(rollout_id, idx, job_id, envelope, start_at, expires_at)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                r.id,
                i as i64 + 1,
                o.job_id,
                prost::Message::encode_to_vec(&o.envelope),
                o.start_at,
                o.expires_at
            ],
        )?;
    }
    Ok(())
}

fn ts(secs: Option<i64>) -> Option<prost_types::Timestamp> {
    secs.map(|s| prost_types::Timestamp {
        seconds: s,
        nanos: 0,
    })
}

/// The stop rule in words, as the direct rollout prints it.
pub fn rule(max_fail_percent: f64) -> String {
    format!(
        "stop when failed hosts exceed {max_fail_percent}% of the hosts attempted so far (checked after each batch; hosts not connected by --host-timeout count as failed)"
    )
}

/// One rollout; with `hosts` false, its occurrences without their hosts (for lists).
pub fn rollout(c: &Connection, id: &str, hosts: bool) -> rusqlite::Result<Option<RolloutData>> {
    let head = c
        .query_row(
            "SELECT id, state, serial, max_fail, host_timeout_ms, created_at, created_by, targets, selector, note
             FROM rollouts WHERE id = ?1",
            [id],
            |r| {
                let targets: String = r.get(7)?;
                let selector: String = r.get(8)?;
                let max: f64 = r.get(3)?;
                let timeout_ms: i64 = r.get(4)?;
                Ok(pb::Rollout {
                    rollout_id: r.get(0)?,
                    state: r.get(1)?,
                    rule: rule(max),
                    serial: r.get(2)?,
                    max_fail_percent: max,
                    host_timeout: prost_types::Duration::try_from(std::time::Duration::from_millis(
                        timeout_ms.max(0) as u64,
                    ))
                    .ok(),
                    created_at: ts(Some(r.get(5)?)),
                    created_by: r.get(6)?,
                    targets: serde_json::from_str(&targets).unwrap_or_default(),
                    selector: serde_json::from_str(&selector).unwrap_or_default(),
                    occurrences: Vec::new(),
                    next_start: None,
                    note: r.get(9)?,
                })
            },
        )
        .optional()?;
    let Some(mut rollout) = head else {
        return Ok(None);
    };
    let mut envelopes = Vec::new();
    let mut q = c.prepare(
        "SELECT idx, job_id, envelope, start_at, expires_at, started_at, finished_at, stopped
         FROM rollout_occurrences WHERE rollout_id = ?1 ORDER BY idx",
    )?;
    let rows = q.query_map([id], |r| {
        let env: Vec<u8> = r.get(2)?;
        Ok((
            pb::Occurrence {
                index: r.get(0)?,
                job_id: r.get(1)?,
                start_at: ts(Some(r.get(3)?)),
                expires_at: ts(Some(r.get(4)?)),
                started_at: ts(r.get(5)?),
                finished_at: ts(r.get(6)?),
                stopped: r.get(7)?,
                ..Default::default()
            },
            env,
        ))
    })?;
    for row in rows {
        let (mut o, env) = row?;
        envelopes.push(prost::Message::decode(env.as_slice()).unwrap_or_default());
        occurrence_hosts(c, id, &mut o, hosts)?;
        if rollout.next_start.is_none() && o.started_at.is_none() {
            rollout.next_start = o.start_at;
        }
        rollout.occurrences.push(o);
    }
    if !crate::rollouts::is_active(rollout.state) {
        rollout.next_start = None;
    }
    Ok(Some(RolloutData { rollout, envelopes }))
}

/// Fills an occurrence's hosts (when `keep`) and its counts.
fn occurrence_hosts(
    c: &Connection,
    id: &str,
    o: &mut pb::Occurrence,
    keep: bool,
) -> rusqlite::Result<()> {
    let mut q = c.prepare(
        "SELECT host_id, batch, state, job_state, reason, started_at, finished_at
         FROM rollout_hosts WHERE rollout_id = ?1 AND idx = ?2 ORDER BY batch, host_id",
    )?;
    let hosts = q
        .query_map(params![id, o.index], |r| {
            Ok(pb::RolloutHost {
                host_id: r.get(0)?,
                batch: r.get(1)?,
                state: r.get(2)?,
                job_state: r.get(3)?,
                reason: r.get(4)?,
                started_at: ts(r.get(5)?),
                finished_at: ts(r.get(6)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let count =
        |s: pb::RolloutHostState| hosts.iter().filter(|h| h.state == s as i32).count() as u32;
    o.succeeded = count(pb::RolloutHostState::Succeeded);
    o.failed = count(pb::RolloutHostState::Failed);
    o.skipped = count(pb::RolloutHostState::Skipped);
    o.attempted = o.succeeded + o.failed;
    if keep {
        o.hosts = hosts;
    }
    Ok(())
}

/// Every rollout, most recent first, without hosts.
pub fn rollouts(c: &Connection) -> rusqlite::Result<Vec<pb::Rollout>> {
    let ids: Vec<String> = c
        .prepare("SELECT id FROM rollouts ORDER BY created_at DESC, id DESC")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = rollout(c, &id, false)? {
            out.push(r.rollout);
        }
    }
    Ok(out)
}

/// Rollouts a controller must drive: scheduled, running or paused.
pub fn active_rollouts(c: &Connection) -> rusqlite::Result<Vec<String>> {
    c.prepare("SELECT id FROM rollouts WHERE state IN (?1, ?2, ?3) ORDER BY created_at, id")?
        .query_map(
            params![
                pb::RolloutState::Scheduled as i32,
                pb::RolloutState::Running as i32,
                pb::RolloutState::Paused as i32
            ],
            |r| r.get(0),
        )?
        .collect()
}

/// Moves a rollout to `to` if it is in one of `from`; false when it was not (or is unknown).
pub fn set_state(
    c: &Connection,
    id: &str,
    from: &[pb::RolloutState],
    to: pb::RolloutState,
    note: &str,
) -> rusqlite::Result<bool> {
    let state: Option<i32> = c
        .query_row("SELECT state FROM rollouts WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    match state {
        Some(s) if from.iter().any(|f| *f as i32 == s) => {
            c.execute(
                "UPDATE rollouts SET state = ?2, note = ?3 WHERE id = ?1",
                params![id, to as i32, note],
            )?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Fixes an occurrence's hosts and batches when it starts; does nothing if it had started.
pub fn occurrence_started(
    c: &Connection,
    id: &str,
    idx: u32,
    hosts: &[(String, u32)],
    now: i64,
) -> rusqlite::Result<()> {
    let n = c.execute(
        "UPDATE rollout_occurrences SET started_at = ?3 WHERE rollout_id = ?1 AND idx = ?2 AND started_at IS NULL",
        params![id, idx, now],
    )?;
    if n == 0 {
        return Ok(());
    }
    for (host, batch) in hosts {
        c.execute(
            "INSERT OR IGNORE INTO rollout_hosts(rollout_id, idx, host_id, batch, state) VALUES(?1, ?2, ?3, ?4, ?5)",
            params![id, idx, host, batch, pb::RolloutHostState::Pending as i32],
        )?;
    }
    Ok(())
}

/// Records a host's part. A host that ended (succeeded, failed, skipped) is never changed
/// again: its result is stored exactly once.
pub fn set_host(c: &Connection, id: &str, idx: u32, h: &pb::RolloutHost) -> rusqlite::Result<bool> {
    let secs = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    let n = c.execute(
        "UPDATE rollout_hosts SET state = ?4, job_state = ?5, reason = ?6, started_at = ?7, finished_at = ?8
         WHERE rollout_id = ?1 AND idx = ?2 AND host_id = ?3 AND state NOT IN (?9, ?10, ?11)",
        params![
            id,
            idx,
            h.host_id,
            h.state,
            h.job_state,
            h.reason,
            secs(&h.started_at),
            secs(&h.finished_at),
            pb::RolloutHostState::Succeeded as i32,
            pb::RolloutHostState::Failed as i32,
            pb::RolloutHostState::Skipped as i32,
        ],
    )?;
    Ok(n > 0)
}

pub fn occurrence_finished(
    c: &Connection,
    id: &str,
    idx: u32,
    stopped: bool,
    now: i64,
) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE rollout_occurrences SET finished_at = ?3, stopped = ?4
         WHERE rollout_id = ?1 AND idx = ?2 AND finished_at IS NULL",
        params![id, idx, now, stopped],
    )?;
    Ok(())
}
