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

pub(crate) fn ts(secs: Option<i64>) -> Option<prost_types::Timestamp> {
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

/// Deletes up to `batch` rollouts that ended and were created before `cutoff`, with their
/// occurrences and hosts; rows deleted.
pub fn prune_rollouts(c: &Connection, cutoff: i64, batch: i64) -> rusqlite::Result<usize> {
    let ids: Vec<String> = c
        .prepare(
            "SELECT id FROM rollouts WHERE created_at < ?1 AND state IN (?2, ?3, ?4) LIMIT ?5",
        )?
        .query_map(
            params![
                cutoff,
                pb::RolloutState::Completed as i32,
                pb::RolloutState::Stopped as i32,
                pb::RolloutState::Cancelled as i32,
                batch
            ],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut n = 0;
    for id in &ids {
        n += c.execute("DELETE FROM rollout_hosts WHERE rollout_id = ?1", [id])?;
        n += c.execute(
            "DELETE FROM rollout_occurrences WHERE rollout_id = ?1",
            [id],
        )?;
        n += c.execute("DELETE FROM rollouts WHERE id = ?1", [id])?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, Store};
    use pb::{RolloutHostState as HostState, RolloutState as State};

    fn envelope(job_id: &str) -> pb::SignedJob {
        pb::SignedJob {
            payload: prost::Message::encode_to_vec(&pb::Job {
                job_id: job_id.into(),
                ..Default::default()
            }),
            key_id: "k".into(),
            signature: vec![1],
        }
    }

    fn new_rollout() -> NewRollout {
        NewRollout {
            id: "r1".into(),
            serial: "2".into(),
            max_fail_percent: 30.0,
            host_timeout_ms: 60_000,
            created_at: 100,
            created_by: "alice".into(),
            targets: vec!["a".into(), "b".into(), "c".into()],
            selector: BTreeMap::new(),
            occurrences: vec![
                NewOccurrence {
                    job_id: "j-1".into(),
                    envelope: envelope("j-1"),
                    start_at: 1000,
                    expires_at: 5000,
                },
                NewOccurrence {
                    job_id: "j-2".into(),
                    envelope: envelope("j-2"),
                    start_at: 2000,
                    expires_at: 6000,
                },
            ],
        }
    }

    fn host(id: &str, state: HostState) -> pb::RolloutHost {
        pb::RolloutHost {
            host_id: id.into(),
            batch: 1,
            state: state as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_rollout_round_trips_and_each_host_ends_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open_writer(&dir.path().join("c.db")).expect("db");
        s.create_rollout(new_rollout()).await.expect("create");
        let d = s
            .rollout("r1".into(), true)
            .await
            .expect("read")
            .expect("r1");
        assert_eq!(d.rollout.state, State::Scheduled as i32);
        assert_eq!(d.rollout.created_by, "alice");
        assert_eq!(d.rollout.occurrences.len(), 2);
        assert_eq!(
            d.envelopes[1],
            envelope("j-2"),
            "the envelope byte for byte"
        );
        assert_eq!(d.rollout.next_start.as_ref().map(|t| t.seconds), Some(1000));
        assert!(d.rollout.rule.contains("30%"));
        assert_eq!(s.active_rollouts().await.expect("active"), ["r1"]);

        // Hosts are fixed once: a second start (after a restart) changes nothing.
        let hosts = vec![("a".to_string(), 1), ("b".into(), 1), ("c".into(), 2)];
        s.occurrence_started("r1".into(), 1, hosts, 1001)
            .await
            .expect("start");
        s.occurrence_started("r1".into(), 1, vec![("z".into(), 1)], 1002)
            .await
            .expect("again");
        let d = s
            .rollout("r1".into(), true)
            .await
            .expect("read")
            .expect("r1");
        let o = &d.rollout.occurrences[0];
        let ids: Vec<&str> = o.hosts.iter().map(|h| h.host_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(o.started_at.as_ref().map(|t| t.seconds), Some(1001));
        assert_eq!(d.rollout.next_start.as_ref().map(|t| t.seconds), Some(2000));

        // A host's result is stored once: a later write cannot turn it into another.
        assert!(
            s.set_rollout_host("r1".into(), 1, host("a", HostState::Admitted))
                .await
                .expect("w")
        );
        assert!(
            s.set_rollout_host("r1".into(), 1, host("a", HostState::Succeeded))
                .await
                .expect("w")
        );
        assert!(
            !s.set_rollout_host("r1".into(), 1, host("a", HostState::Failed))
                .await
                .expect("w")
        );
        assert!(
            s.set_rollout_host("r1".into(), 1, host("b", HostState::Skipped))
                .await
                .expect("w")
        );
        let d = s
            .rollout("r1".into(), true)
            .await
            .expect("read")
            .expect("r1");
        let o = &d.rollout.occurrences[0];
        assert_eq!(o.hosts[0].state, HostState::Succeeded as i32);
        assert_eq!(
            (o.attempted, o.succeeded, o.failed, o.skipped),
            (1, 1, 0, 1)
        );
        // Lists leave the hosts out but keep the counts.
        let list = s.rollouts().await.expect("list");
        assert!(list[0].occurrences[0].hosts.is_empty());
        assert_eq!(list[0].occurrences[0].succeeded, 1);

        // State moves only from the states given.
        assert!(
            !s.set_rollout_state(
                "r1".into(),
                vec![State::Paused],
                State::Running,
                String::new()
            )
            .await
            .expect("w")
        );
        assert!(
            s.set_rollout_state(
                "r1".into(),
                vec![State::Scheduled],
                State::Paused,
                "paused by alice".into()
            )
            .await
            .expect("w")
        );
        assert!(
            s.set_rollout_state(
                "r1".into(),
                vec![State::Paused],
                State::Cancelled,
                "x".into()
            )
            .await
            .expect("w")
        );
        assert!(s.active_rollouts().await.expect("active").is_empty());
        let d = s
            .rollout("r1".into(), false)
            .await
            .expect("read")
            .expect("r1");
        assert!(
            d.rollout.next_start.is_none(),
            "an ended rollout has no next start"
        );
        assert!(
            s.rollout("nope".into(), true)
                .await
                .expect("read")
                .is_none()
        );
    }

    #[tokio::test]
    async fn channels_mark_hosts_connected_and_revoked_hosts_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open_writer(&dir.path().join("c.db")).expect("db");
        let labels: HashMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        s.channel_opened("h1".into(), labels.clone(), "1.0".into(), 10)
            .await
            .expect("w")
            .expect("admitted");
        s.channel_opened("h2".into(), HashMap::new(), "1.0".into(), 11)
            .await
            .expect("w")
            .expect("admitted");
        let rows = s.host_list().await.expect("list");
        assert_eq!(rows[0].connected_since, Some(10));
        assert_eq!(rows[0].labels["env"], "prod");
        let labelled = s.host_labels().await.expect("labels");
        assert_eq!(labelled.len(), 2);
        s.channel_closed("h1".into(), 20).await.expect("close");
        let rows = s.host_list().await.expect("list");
        assert_eq!(
            (rows[0].connected_since, rows[0].last_seen),
            (None, Some(20))
        );
        assert_eq!(rows[1].connected_since, Some(11));
        s.channels_reset().await.expect("reset");
        assert!(
            s.host_list()
                .await
                .expect("list")
                .iter()
                .all(|r| r.connected_since.is_none())
        );
        assert!(s.revoke_host("h2".into(), 30).await.expect("revoke"));
        let refused = s
            .channel_opened("h2".into(), HashMap::new(), "1.0".into(), 31)
            .await
            .expect("w");
        assert!(matches!(refused, Err(crate::store::Refusal::Revoked(_))));
        assert_eq!(
            s.host_labels().await.expect("labels").len(),
            1,
            "revoked hosts are not selected"
        );
        assert!(
            s.job_final("h1".into(), "j".into())
                .await
                .expect("read")
                .is_none()
        );
    }
}
