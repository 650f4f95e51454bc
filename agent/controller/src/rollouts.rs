//! Rollouts in the controller: stored, driven batch by batch through the control channels,
//! resumed after a restart. The operator's terminal is not needed once a rollout is created.
//!
//! Every occurrence is one signed job (signed offline by the operator) for all the rollout's
//! hosts; the controller hands it to each host of a batch, waits for every host's result, and
//! applies the stop rule after each batch: stop when `failed * 100 > P * attempted`. A host
//! not connected within `host_timeout` of its batch's start counts as failed; so does a host
//! whose result has not arrived by then, or one that refused the job.
//!
//! Restart safety: each host's part is stored before and after every step. A host admitted
//! before a crash is not sent the job again but followed to its result; a host that may have
//! been sent it (a crash between the push and the write) gets it again, and its agent answers
//! ALREADY_EXISTS, which counts as admitted, never as a failure. Results come from the jobs
//! table, where each (host, job) result is stored exactly once.

use crate::channel::{Hub, PushError};
use crate::store::{RolloutData, Store};
use patch_agent_wire::proto::v1 as pb;
use pb::{RolloutHostState as HostState, RolloutState as State};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an agent has to answer a delivery.
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Waiters re-check the database at least this often, whatever wakes them.
const POLL: Duration = Duration::from_secs(2);

/// `--serial`: a batch size, absolute or a share of the hosts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Serial {
    Hosts(usize),
    Percent(u32),
}

impl std::str::FromStr for Serial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not N or N% (a batch size, e.g. 1, 10 or 25%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(format!("{s:?}: a percentage must be 1-100"));
            }
            Ok(Self::Percent(p))
        } else {
            let n: usize = s.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err("--serial must be at least 1".into());
            }
            Ok(Self::Hosts(n))
        }
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hosts(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serial {
    /// Hosts per batch for `total` hosts (a percentage rounds up; at least one).
    pub fn batch_size(self, total: usize) -> usize {
        match self {
            Self::Hosts(n) => n,
            Self::Percent(p) => (total * p as usize).div_ceil(100),
        }
        .max(1)
    }
}

/// The stop rule: failed hosts exceed `max` percent of those attempted.
pub fn should_stop(failed: usize, attempted: usize, max: f64) -> bool {
    attempted > 0 && (failed as f64) * 100.0 > max * (attempted as f64)
}

pub use patch_agent_wire::convert::succeeded;

pub fn is_active(state: i32) -> bool {
    matches!(
        State::try_from(state),
        Ok(State::Scheduled | State::Running | State::Paused)
    )
}

fn is_done(h: &pb::RolloutHost) -> bool {
    matches!(
        HostState::try_from(h.state),
        Ok(HostState::Succeeded | HostState::Failed | HostState::Skipped)
    )
}

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    crate::store::control::ts(Some(secs))
}

/// How an occurrence ended.
enum Ending {
    Done,
    Stopped(String),
    Cancelled,
}

/// How long a replica's lease on a rollout lasts unless renewed; another replica takes the
/// rollout over at most [`LEASE_TICK`] after it runs out.
pub const LEASE_TTL_SECS: i64 = 15;

/// How often leases are renewed, and unled active rollouts looked for.
pub const LEASE_TICK: Duration = Duration::from_secs(5);

/// Drives the active rollouts whose lease this replica holds, one task each.
///
/// Every [`LEASE_TICK`] it renews the leases of the rollouts it drives (a rollout whose
/// lease was lost, because this replica was cut off from the database for longer than the
/// lease, stops being driven here) and takes the lease of any active rollout nobody holds:
/// one left by a replica that died, or by a restart. Whoever takes it over goes on from the
/// stored state: each host's part ends once in the database, whoever writes it.
pub struct Driver {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Driver {
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>) -> Arc<Self> {
        Arc::new(Self {
            store,
            hub,
            running: Mutex::new(HashMap::new()),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn me(&self) -> String {
        self.hub.replica.clone()
    }

    /// Keeps leases, forever; see the type's documentation.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LEASE_TICK);
        loop {
            tick.tick().await;
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "Cannot renew or take rollout leases; trying again");
            }
        }
    }

    /// One round of [`Driver::run`]; how many rollouts it started driving.
    pub async fn sweep(self: &Arc<Self>) -> Result<usize, String> {
        let driven: Vec<String> = self.running().keys().cloned().collect();
        for id in driven {
            if !self
                .store
                .lease_rollout(id.clone(), self.me(), LEASE_TTL_SECS)
                .await?
            {
                tracing::warn!(rollout = %id, "Lost the rollout's lease to another controller; no longer driving it here");
                if let Some(task) = self.running().remove(&id) {
                    task.abort();
                }
            }
        }
        let mut started = 0;
        for id in self.store.active_rollouts().await? {
            if self.running().contains_key(&id) {
                continue;
            }
            if self
                .store
                .lease_rollout(id.clone(), self.me(), LEASE_TTL_SECS)
                .await?
            {
                tracing::info!(rollout = %id, replica = %self.hub.replica, "Driving rollout (lease taken)");
                self.start(id);
                started += 1;
            }
        }
        Ok(started)
    }

    /// Drives a rollout just created here, if its lease can be had now (else the next sweep
    /// of whichever replica gets it will).
    pub async fn claim(self: &Arc<Self>, id: String) -> Result<(), String> {
        if self
            .store
            .lease_rollout(id.clone(), self.me(), LEASE_TTL_SECS)
            .await?
        {
            tracing::info!(rollout = %id, replica = %self.hub.replica, "Driving rollout (created here)");
            self.start(id);
        }
        Ok(())
    }

    /// Stops driving here and gives every lease up, so another replica takes over at once
    /// (at shutdown).
    pub async fn release_all(&self) {
        let tasks: Vec<(String, tokio::task::AbortHandle)> = self.running().drain().collect();
        for (id, task) in tasks {
            task.abort();
            if let Err(e) = self.store.release_rollout(id.clone(), self.me()).await {
                tracing::warn!(rollout = %id, error = %e, "Cannot release the rollout's lease; it lapses by itself");
            }
        }
    }

    /// Starts driving a rollout unless a task already does.
    fn start(self: &Arc<Self>, id: String) {
        // The lock is held until the task is recorded, so its own removal comes after.
        let mut running = self.running();
        if running.contains_key(&id) {
            return;
        }
        let this = self.clone();
        let key = id.clone();
        let task = tokio::spawn(async move {
            // Store errors (a full disk) retry: the rollout's state is all in the database.
            loop {
                match this.drive(&id).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(rollout = %id, error = %e, "Rollout interrupted; retrying in 5s");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            this.running().remove(&id);
            let _ = this.store.release_rollout(id, this.me()).await;
        });
        running.insert(key, task.abort_handle());
    }

    async fn load(&self, id: &str) -> Result<RolloutData, String> {
        self.store
            .rollout(id.to_string(), true)
            .await?
            .ok_or_else(|| format!("rollout {id} is gone from the database"))
    }

    async fn set_state(
        &self,
        id: &str,
        from: &[State],
        to: State,
        note: String,
    ) -> Result<bool, String> {
        let changed = self
            .store
            .set_rollout_state(id.to_string(), from.to_vec(), to, note)
            .await?;
        self.hub.wake.bump();
        Ok(changed)
    }

    /// Waits for any event, at most `max`.
    async fn nap(&self, wake: &mut tokio::sync::watch::Receiver<u64>, max: Duration) {
        let _ = tokio::time::timeout(max.min(POLL), wake.changed()).await;
    }

    async fn drive(&self, id: &str) -> Result<(), String> {
        let mut wake = self.hub.wake.subscribe();
        loop {
            // A rollout removed from the database (by hand) is not retried forever.
            let Some(data) = self.store.rollout(id.to_string(), true).await? else {
                tracing::warn!(rollout = %id, "The rollout is gone from the database; not driving it");
                return Ok(());
            };
            let r = &data.rollout;
            if !is_active(r.state) {
                return Ok(());
            }
            let Some(i) = r.occurrences.iter().position(|o| o.finished_at.is_none()) else {
                let (ok, failed) = r
                    .occurrences
                    .iter()
                    .fold((0, 0), |(s, f), o| (s + o.succeeded, f + o.failed));
                self.set_state(
                    id,
                    &[State::Scheduled, State::Running, State::Paused],
                    State::Completed,
                    format!("completed: {ok} host result(s) succeeded, {failed} failed"),
                )
                .await?;
                tracing::info!(rollout = %id, "Rollout completed");
                return Ok(());
            };
            let occ = &r.occurrences[i];
            let start = occ.start_at.as_ref().map_or(0, |t| t.seconds);
            let now = crate::now();
            if occ.started_at.is_none() {
                if now < start {
                    self.nap(&mut wake, Duration::from_secs((start - now) as u64))
                        .await;
                    continue;
                }
                if r.state == State::Paused as i32 {
                    self.nap(&mut wake, POLL).await;
                    continue;
                }
                self.set_state(id, &[State::Scheduled], State::Running, String::new())
                    .await?;
                self.start_occurrence(id, r, occ, &data.envelopes[i])
                    .await?;
                continue;
            }
            let ending = self
                .run_occurrence(id, occ.index, &data.envelopes[i])
                .await?;
            match ending {
                Ending::Done => {}
                Ending::Stopped(note) => {
                    tracing::warn!(rollout = %id, %note, "Rollout stopped by its failure threshold");
                    self.set_state(id, &[State::Running, State::Paused], State::Stopped, note)
                        .await?;
                    return Ok(());
                }
                Ending::Cancelled => return Ok(()),
            }
        }
    }

    /// Fixes the occurrence's hosts and batches: the rollout's targets, or for a selector the
    /// matching hosts known now.
    async fn start_occurrence(
        &self,
        id: &str,
        r: &pb::Rollout,
        occ: &pb::Occurrence,
        env: &pb::SignedJob,
    ) -> Result<(), String> {
        let hosts: Vec<String> = if r.targets.is_empty() {
            self.store
                .host_labels()
                .await?
                .into_iter()
                .filter(|(_, labels)| patch_agent_wire::job::selector_matches(&r.selector, labels))
                .map(|(h, _)| h)
                .collect()
        } else {
            // A host listed twice runs the job once, in its first place.
            let mut seen = HashSet::new();
            r.targets
                .iter()
                .filter(|h| seen.insert(h.as_str()))
                .cloned()
                .collect()
        };
        let serial: Serial = r.serial.parse().unwrap_or(Serial::Hosts(1));
        let size = serial.batch_size(hosts.len());
        let batches: Vec<(String, u32)> = hosts
            .into_iter()
            .enumerate()
            .map(|(n, h)| (h, (n / size) as u32 + 1))
            .collect();
        tracing::info!(
            rollout = %id,
            occurrence = occ.index,
            job = %occ.job_id,
            hosts = batches.len(),
            batch_size = size,
            key = %env.key_id,
            "Occurrence starts"
        );
        self.store
            .occurrence_started(id.to_string(), occ.index, batches, crate::now())
            .await?;
        self.hub.wake.bump();
        Ok(())
    }

    /// Runs the occurrence's batches from the first unfinished one.
    async fn run_occurrence(
        &self,
        id: &str,
        idx: u32,
        env: &pb::SignedJob,
    ) -> Result<Ending, String> {
        let mut wake = self.hub.wake.subscribe();
        let mut batch = 1u32;
        loop {
            let data = self.load(id).await?;
            let r = &data.rollout;
            let occ = r
                .occurrences
                .iter()
                .find(|o| o.index == idx)
                .ok_or("occurrence missing")?;
            let last = occ.hosts.iter().map(|h| h.batch).max().unwrap_or(0);
            if batch > last {
                self.store
                    .occurrence_finished(id.to_string(), idx, false, crate::now())
                    .await?;
                self.hub.wake.bump();
                return Ok(Ending::Done);
            }
            let todo: Vec<pb::RolloutHost> = occ
                .hosts
                .iter()
                .filter(|h| h.batch == batch && !is_done(h))
                .cloned()
                .collect();
            if !todo.is_empty() {
                match State::try_from(r.state) {
                    Ok(State::Paused) => {
                        self.nap(&mut wake, POLL).await;
                        continue;
                    }
                    Ok(State::Cancelled) => {
                        self.skip_rest(id, occ, "not attempted: the rollout was cancelled")
                            .await?;
                        self.store
                            .occurrence_finished(id.to_string(), idx, false, crate::now())
                            .await?;
                        return Ok(Ending::Cancelled);
                    }
                    _ => {}
                }
                tracing::info!(rollout = %id, occurrence = idx, batch, hosts = todo.len(), "Batch starts");
                let timeout = r
                    .host_timeout
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or(Duration::from_secs(3 * 3600));
                let mut set = tokio::task::JoinSet::new();
                for h in todo {
                    let part = Part {
                        store: self.store.clone(),
                        hub: self.hub.clone(),
                        rollout: id.to_string(),
                        occurrence: idx,
                        job_id: occ.job_id.clone(),
                        env: env.clone(),
                        timeout,
                    };
                    set.spawn(async move { part.drive(h).await });
                }
                while let Some(done) = set.join_next().await {
                    done.map_err(|e| format!("a host task failed: {e}"))??;
                }
            }
            // The stop rule, over the batches so far.
            let data = self.load(id).await?;
            let occ = data
                .rollout
                .occurrences
                .iter()
                .find(|o| o.index == idx)
                .ok_or("occurrence missing")?;
            let so_far = occ.hosts.iter().filter(|h| h.batch <= batch);
            let attempted = so_far
                .clone()
                .filter(|h| h.state != HostState::Skipped as i32)
                .count();
            let failed = so_far
                .filter(|h| h.state == HostState::Failed as i32)
                .count();
            let max = data.rollout.max_fail_percent;
            if should_stop(failed, attempted, max) {
                let note = format!(
                    "stopped after batch {batch} of occurrence {idx}: {failed} of {attempted} attempted hosts failed ({:.1}% > {max}%)",
                    failed as f64 * 100.0 / attempted as f64
                );
                self.skip_rest(id, occ, "not attempted: the rollout stopped")
                    .await?;
                self.store
                    .occurrence_finished(id.to_string(), idx, true, crate::now())
                    .await?;
                return Ok(Ending::Stopped(note));
            }
            batch += 1;
        }
    }

    async fn skip_rest(&self, id: &str, occ: &pb::Occurrence, why: &str) -> Result<(), String> {
        for h in occ
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Pending as i32)
        {
            let mut h = h.clone();
            h.state = HostState::Skipped as i32;
            h.reason = why.to_string();
            self.store
                .set_rollout_host(id.to_string(), occ.index, h)
                .await?;
        }
        self.hub.wake.bump();
        Ok(())
    }
}

/// What one host's part of a batch needs: the rollout, the occurrence and its signed job.
struct Part {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    rollout: String,
    occurrence: u32,
    job_id: String,
    env: pb::SignedJob,
    timeout: Duration,
}

impl Part {
    /// Drives host `h`: wait for it to connect, hand it the job, follow the job to its result.
    async fn drive(self, mut h: pb::RolloutHost) -> Result<(), String> {
        let Part {
            store,
            hub,
            rollout,
            occurrence: idx,
            job_id,
            env,
            timeout,
        } = self;
        let (store, hub, id, job_id) = (&*store, &*hub, rollout.as_str(), job_id.as_str());
        let mut wake = hub.wake.subscribe();
        let save = |h: pb::RolloutHost| async move {
            store.set_rollout_host(id.to_string(), idx, h).await?;
            hub.wake.bump();
            Ok::<(), String>(())
        };
        if h.state == HostState::Pending as i32 {
            h.state = HostState::Waiting as i32;
            h.started_at = ts(crate::now());
            save(h.clone()).await?;
        }
        let started = h.started_at.as_ref().map_or_else(crate::now, |t| t.seconds);
        let deadline = started.saturating_add(timeout.as_secs() as i64);
        loop {
            if let Some(status) = store
                .job_final(h.host_id.clone(), job_id.to_string())
                .await?
            {
                h.state = if succeeded(status.state) {
                    HostState::Succeeded
                } else {
                    HostState::Failed
                } as i32;
                h.job_state = patch_agent_wire::convert::state_name(status.state).to_string();
                h.reason = status.reason;
                h.finished_at = ts(crate::now());
                return save(h).await;
            }
            let now = crate::now();
            if now >= deadline {
                h.reason = if h.state == HostState::Waiting as i32 {
                    format!(
                        "not connected within {} of its batch's start",
                        humantime::format_duration(timeout)
                    )
                } else {
                    format!("no result within {}", humantime::format_duration(timeout))
                };
                h.state = HostState::Failed as i32;
                h.finished_at = ts(now);
                return save(h).await;
            }
            if h.state == HostState::Waiting as i32
                && (hub.is_connected(&h.host_id) || hub.relays())
            {
                match hub.push(&h.host_id, env.clone(), ADMIT_TIMEOUT).await {
                    Ok(a)
                        if a.code == tonic::Code::Ok as i32
                            || a.code == tonic::Code::AlreadyExists as i32 =>
                    {
                        h.state = HostState::Admitted as i32;
                        h.reason = if a.code == tonic::Code::Ok as i32 {
                            String::new()
                        } else {
                            "the host had the job already (a replay); following its result".into()
                        };
                        save(h.clone()).await?;
                        continue;
                    }
                    Ok(a) => {
                        h.state = HostState::Failed as i32;
                        h.job_state = "REFUSED".into();
                        h.reason = format!(
                            "refused: {:?}: {}",
                            tonic::Code::from_i32(a.code),
                            a.message
                        );
                        h.finished_at = ts(crate::now());
                        tracing::warn!(rollout = %id, host = %h.host_id, reason = %h.reason, "Host refused the job");
                        return save(h).await;
                    }
                    Err(PushError::NotConnected) => {}
                    Err(e) => {
                        tracing::info!(rollout = %id, host = %h.host_id, error = %e, "Push failed; retrying while the host's time lasts");
                    }
                }
            }
            let left = Duration::from_secs((deadline - now).max(1) as u64);
            let _ = tokio::time::timeout(left.min(POLL), wake.changed()).await;
        }
    }
}
