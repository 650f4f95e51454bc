//! What the controller drives, stored: which hosts hold a control channel now, and rollouts
//! (their signed jobs, one per occurrence, and every host's part), so a controller killed
//! mid-rollout resumes it where it stood.

use super::ingest::labels;
use super::sql::{Db, DbResult, Row, p};
use patch_agent_wire::proto::v1 as pb;
use std::collections::BTreeMap;

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

/// Hosts not revoked, with their labels: what a selector is matched against.
pub fn host_labels(db: &mut dyn Db) -> DbResult<Vec<(String, BTreeMap<String, String>)>> {
    db.rows(
        "SELECT host_id, labels FROM hosts WHERE revoked_at IS NULL ORDER BY host_id",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, labels(&r.text(1)?))))
    .collect()
}

/// The stored final status of a host's job, if its result arrived.
pub fn job_final(db: &mut dyn Db, host_id: &str, job_id: &str) -> DbResult<Option<pb::JobStatus>> {
    let blob = db.row(
        "SELECT status FROM jobs WHERE host_id = ?1 AND job_id = ?2 AND final = 1",
        p![host_id, job_id],
    )?;
    Ok(blob
        .map(|r| r.bytes(0))
        .transpose()?
        .and_then(|b| prost::Message::decode(b.as_slice()).ok()))
}

pub fn create_rollout(db: &mut dyn Db, r: &NewRollout) -> DbResult<()> {
    db.exec(
        "INSERT INTO rollouts(id, state, serial, max_fail, host_timeout_ms, created_at, created_by, targets, selector)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        p![
            &r.id,
            pb::RolloutState::Scheduled as i32,
            &r.serial,
            r.max_fail_percent,
            r.host_timeout_ms,
            r.created_at,
            &r.created_by,
            serde_json::to_string(&r.targets).unwrap_or_else(|_| "[]".into()),
            serde_json::to_string(&r.selector).unwrap_or_else(|_| "{}".into()),
        ],
    )?;
    for (i, o) in r.occurrences.iter().enumerate() {
        db.exec(
            "INSERT INTO rollout_occurrences(rollout_id, idx, job_id, envelope, start_at, expires_at)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
            p![
                &r.id,
                i + 1,
                &o.job_id,
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

fn head(r: &Row) -> DbResult<pb::Rollout> {
    let max = r.f64(3)?;
    let timeout_ms = r.i64(4)?;
    Ok(pb::Rollout {
        rollout_id: r.text(0)?,
        state: r.int(1)?,
        rule: rule(max),
        serial: r.text(2)?,
        max_fail_percent: max,
        host_timeout: prost_types::Duration::try_from(std::time::Duration::from_millis(
            timeout_ms.max(0) as u64,
        ))
        .ok(),
        created_at: ts(Some(r.i64(5)?)),
        created_by: r.text(6)?,
        targets: serde_json::from_str(&r.text(7)?).unwrap_or_default(),
        selector: serde_json::from_str(&r.text(8)?).unwrap_or_default(),
        occurrences: Vec::new(),
        next_start: None,
        note: r.text(9)?,
    })
}

/// One rollout; with `hosts` false, its occurrences without their hosts (for lists).
pub fn rollout(db: &mut dyn Db, id: &str, hosts: bool) -> DbResult<Option<RolloutData>> {
    let Some(row) = db.row(
        "SELECT id, state, serial, max_fail, host_timeout_ms, created_at, created_by, targets, selector, note
         FROM rollouts WHERE id = ?1",
        p![id],
    )?
    else {
        return Ok(None);
    };
    let mut rollout = head(&row)?;
    let mut envelopes = Vec::new();
    let rows = db.rows(
        "SELECT idx, job_id, envelope, start_at, expires_at, started_at, finished_at, stopped
         FROM rollout_occurrences WHERE rollout_id = ?1 ORDER BY idx",
        p![id],
    )?;
    for r in rows {
        let mut o = pb::Occurrence {
            index: r.int(0)?,
            job_id: r.text(1)?,
            start_at: ts(Some(r.i64(3)?)),
            expires_at: ts(Some(r.i64(4)?)),
            started_at: ts(r.opt_i64(5)?),
            finished_at: ts(r.opt_i64(6)?),
            stopped: r.bool(7)?,
            ..Default::default()
        };
        envelopes.push(prost::Message::decode(r.bytes(2)?.as_slice()).unwrap_or_default());
        occurrence_hosts(db, id, &mut o, hosts)?;
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
fn occurrence_hosts(db: &mut dyn Db, id: &str, o: &mut pb::Occurrence, keep: bool) -> DbResult<()> {
    let hosts = db
        .rows(
            "SELECT host_id, batch, state, job_state, reason, started_at, finished_at
             FROM rollout_hosts WHERE rollout_id = ?1 AND idx = ?2 ORDER BY batch, host_id",
            p![id, o.index],
        )?
        .iter()
        .map(|r| {
            Ok(pb::RolloutHost {
                host_id: r.text(0)?,
                batch: r.int(1)?,
                state: r.int(2)?,
                job_state: r.text(3)?,
                reason: r.text(4)?,
                started_at: ts(r.opt_i64(5)?),
                finished_at: ts(r.opt_i64(6)?),
            })
        })
        .collect::<DbResult<Vec<_>>>()?;
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
pub fn rollouts(db: &mut dyn Db) -> DbResult<Vec<pb::Rollout>> {
    let ids: Vec<String> = db
        .rows(
            "SELECT id FROM rollouts ORDER BY created_at DESC, id DESC",
            &[],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<DbResult<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = rollout(db, &id, false)? {
            out.push(r.rollout);
        }
    }
    Ok(out)
}

const ACTIVE: [pb::RolloutState; 3] = [
    pb::RolloutState::Scheduled,
    pb::RolloutState::Running,
    pb::RolloutState::Paused,
];

/// Rollouts a controller must drive: scheduled, running or paused.
pub fn active_rollouts(db: &mut dyn Db) -> DbResult<Vec<String>> {
    db.rows(
        "SELECT id FROM rollouts WHERE state IN (?1, ?2, ?3) ORDER BY created_at, id",
        p![ACTIVE[0] as i32, ACTIVE[1] as i32, ACTIVE[2] as i32],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// Moves a rollout to `to` if it is in one of `from`, in one statement (another replica may
/// move it at the same time); false when it was not (or is unknown).
pub fn set_state(
    db: &mut dyn Db,
    id: &str,
    from: &[pb::RolloutState],
    to: pb::RolloutState,
    note: &str,
) -> DbResult<bool> {
    if from.is_empty() {
        return Ok(false);
    }
    let states: Vec<String> = from.iter().map(|s| (*s as i32).to_string()).collect();
    Ok(db.exec(
        &format!(
            "UPDATE rollouts SET state = ?2, note = ?3 WHERE id = ?1 AND state IN ({})",
            states.join(", ")
        ),
        p![id, to as i32, note],
    )? == 1)
}

/// Fixes an occurrence's hosts and batches when it starts; does nothing if it had started.
pub fn occurrence_started(
    db: &mut dyn Db,
    id: &str,
    idx: u32,
    hosts: &[(String, u32)],
    now: i64,
) -> DbResult<()> {
    let n = db.exec(
        "UPDATE rollout_occurrences SET started_at = ?3 WHERE rollout_id = ?1 AND idx = ?2 AND started_at IS NULL",
        p![id, idx, now],
    )?;
    if n == 0 {
        return Ok(());
    }
    for (host, batch) in hosts {
        db.exec(
            "INSERT INTO rollout_hosts(rollout_id, idx, host_id, batch, state) VALUES(?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(rollout_id, idx, host_id) DO NOTHING",
            p![id, idx, host, *batch, pb::RolloutHostState::Pending as i32],
        )?;
    }
    Ok(())
}

/// Records a host's part. A host that ended (succeeded, failed, skipped) is never changed
/// again: its result is stored exactly once.
pub fn set_host(db: &mut dyn Db, id: &str, idx: u32, h: &pb::RolloutHost) -> DbResult<bool> {
    let secs = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    let n = db.exec(
        "UPDATE rollout_hosts SET state = ?4, job_state = ?5, reason = ?6, started_at = ?7, finished_at = ?8
         WHERE rollout_id = ?1 AND idx = ?2 AND host_id = ?3 AND state NOT IN (?9, ?10, ?11)",
        p![
            id,
            idx,
            &h.host_id,
            h.state,
            &h.job_state,
            &h.reason,
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
    db: &mut dyn Db,
    id: &str,
    idx: u32,
    stopped: bool,
    now: i64,
) -> DbResult<()> {
    db.exec(
        "UPDATE rollout_occurrences SET finished_at = ?3, stopped = ?4
         WHERE rollout_id = ?1 AND idx = ?2 AND finished_at IS NULL",
        p![id, idx, now, stopped],
    )?;
    Ok(())
}

/// Deletes up to `batch` rollouts that ended and were created before `cutoff`, with their
/// occurrences and hosts; rows deleted.
pub fn prune_rollouts(db: &mut dyn Db, cutoff: i64, batch: usize) -> DbResult<u64> {
    let ids: Vec<String> = db
        .rows(
            "SELECT id FROM rollouts WHERE created_at < ?1 AND state IN (?2, ?3, ?4) LIMIT ?5",
            p![
                cutoff,
                pb::RolloutState::Completed as i32,
                pb::RolloutState::Stopped as i32,
                pb::RolloutState::Cancelled as i32,
                batch
            ],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<DbResult<_>>()?;
    let mut n = 0;
    for id in &ids {
        n += db.exec("DELETE FROM rollout_hosts WHERE rollout_id = ?1", p![id])?;
        n += db.exec(
            "DELETE FROM rollout_occurrences WHERE rollout_id = ?1",
            p![id],
        )?;
        n += db.exec("DELETE FROM rollouts WHERE id = ?1", p![id])?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Location, SqlStore, Store};
    use pb::{RolloutHostState as HostState, RolloutState as State};
    use std::collections::HashMap;

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
        crate::store::for_each_backend(a_rollout_round_trips_and_each_host_ends_once_on).await;
    }

    async fn a_rollout_round_trips_and_each_host_ends_once_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
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
        crate::store::for_each_backend(
            channels_mark_hosts_connected_and_revoked_hosts_are_refused_on,
        )
        .await;
    }

    async fn channels_mark_hosts_connected_and_revoked_hosts_are_refused_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
        let labels: HashMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        // r1 is alive; r2 never beat (a replica that died).
        s.beat("r1".into(), "a:7000".into(), 1).await.expect("beat");
        let open = |h: &str, r: &str, l: HashMap<String, String>, at: i64| {
            s.channel_opened(h.into(), r.into(), l, "1.0".into(), at)
        };
        open("h1", "r1", labels.clone(), 10)
            .await
            .expect("w")
            .expect("admitted");
        open("h2", "r1", HashMap::new(), 11)
            .await
            .expect("w")
            .expect("admitted");
        open("h3", "r2", HashMap::new(), 12)
            .await
            .expect("w")
            .expect("admitted");
        let rows = s.host_list().await.expect("list");
        assert_eq!(rows[0].connected_since, Some(10));
        assert_eq!(rows[0].labels["env"], "prod");
        assert_eq!(rows[2].connected_since, None, "its replica is dead");
        assert_eq!(
            s.holder("h1".into()).await.expect("r").as_deref(),
            Some("r1")
        );
        assert_eq!(s.holder("h3".into()).await.expect("r"), None);
        assert_eq!(s.host_labels().await.expect("labels").len(), 3);
        // A close from a replica the host left changes nothing.
        s.channel_closed("h1".into(), "r2".into(), 19)
            .await
            .expect("close");
        assert_eq!(
            s.holder("h1".into()).await.expect("r").as_deref(),
            Some("r1")
        );
        s.channel_closed("h1".into(), "r1".into(), 20)
            .await
            .expect("close");
        let rows = s.host_list().await.expect("list");
        assert_eq!(
            (rows[0].connected_since, rows[0].last_seen),
            (None, Some(20))
        );
        assert_eq!(rows[1].connected_since, Some(11));
        let connected: Vec<String> = s
            .connected()
            .await
            .expect("connected")
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(connected, ["h2"]);
        assert!(s.revoke_host("h2".into(), 30).await.expect("revoke"));
        let refused = open("h2", "r1", HashMap::new(), 31).await.expect("w");
        assert!(matches!(refused, Err(crate::store::Refusal::Revoked(_))));
        assert!(s.connected().await.expect("connected").is_empty());
        assert_eq!(
            s.host_labels().await.expect("labels").len(),
            2,
            "revoked hosts are not selected"
        );
        assert!(
            s.job_final("h1".into(), "j".into())
                .await
                .expect("read")
                .is_none()
        );
    }

    #[tokio::test]
    async fn one_replica_holds_a_rollout_lease_and_relays_are_answered_once() {
        crate::store::for_each_backend(leases_and_relays_on).await;
    }

    async fn leases_and_relays_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
        s.create_rollout(new_rollout()).await.expect("create");
        let lease = |who: &str, ttl: i64| s.lease_rollout("r1".into(), who.into(), ttl);
        assert!(lease("a", 15).await.expect("w"));
        assert!(lease("a", 15).await.expect("w"), "renewed by its holder");
        assert!(!lease("b", 15).await.expect("w"), "held by a");
        s.release_rollout("r1".into(), "b".into())
            .await
            .expect("not b's to release");
        assert!(!lease("b", 15).await.expect("w"));
        s.release_rollout("r1".into(), "a".into()).await.expect("w");
        assert!(lease("b", -5).await.expect("w"), "released");
        assert!(lease("a", 15).await.expect("w"), "b's lease ran out");
        assert!(
            !s.lease_rollout("nope".into(), "a".into(), 15)
                .await
                .expect("w"),
            "no such rollout"
        );

        let task = crate::store::RelayTask {
            id: "relay-1".into(),
            host_id: "h1".into(),
            envelope: vec![1, 2, 3],
            timeout_ms: 1000,
        };
        s.relay_put(task, "r2".into(), 100).await.expect("put");
        assert!(
            s.relay_take("r1".into(), 101)
                .await
                .expect("take")
                .is_empty()
        );
        let taken = s.relay_take("r2".into(), 101).await.expect("take");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].envelope, [1, 2, 3]);
        assert!(
            s.relay_take("r2".into(), 102)
                .await
                .expect("take")
                .is_empty(),
            "claimed once"
        );
        assert_eq!(s.relay_result("relay-1".into()).await.expect("r"), None);
        let answer = crate::store::Relayed::Admission {
            code: 6,
            message: "already".into(),
        };
        s.relay_answer("relay-1".into(), answer.clone(), 103)
            .await
            .expect("answer");
        assert_eq!(
            s.relay_result("relay-1".into()).await.expect("r"),
            Some(answer)
        );
        assert_eq!(
            s.relay_result("relay-1".into()).await.expect("r"),
            None,
            "read once"
        );
    }
}
