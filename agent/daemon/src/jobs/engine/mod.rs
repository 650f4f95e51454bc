//! The job engine: admission, a bounded FIFO queue, one job at a time, the journal written
//! before each transition takes effect, and live updates for watchers. This module holds the
//! engine's state and its journal plumbing; `queue` admits and schedules, `runner` runs a job
//! phase by phase, `recovery` decides what each journaled job becomes at start, `checks` runs
//! hooks and post-patch checks, `plan` computes and judges the plan. It reads time from an
//! injected [`Clock`] and packages through the scanner's `PackageManager`, so `scenarios`
//! exercises it in process.
//!
//! The engine is the only writer of the journal. A job's history is both persisted (for
//! `GetJob`, `WatchJob` after the fact, and crash recovery) and broadcast to live watchers;
//! a watcher subscribes before it reads the history, and drops events it has already seen, so it
//! never misses one.

use super::clock::Clock;
use super::journal::{self, EventRecord, Journal, PackageOutcome, Record};
use super::state::{Event, NotAllowed, State};
use crate::config::JobsSection;
use crate::pkg::scanner::Scanner;
use crate::pkg::{Classification, Op, Severity, Update};
use patch_agent_wire::job::outcome::Outcome;
use patch_agent_wire::job::schema::Schema;
use patch_agent_wire::job::trust::TrustStore;
use patch_agent_wire::job::{Action, AdmissionPolicy, Rejection, ValidJob, WindowCheck, admit};
use patch_agent_wire::proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, broadcast};

mod checks;
mod plan;
mod queue;
mod recovery;
mod runner;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod tests;

use checks::free_space;
pub use plan::{PlanCheck, compare_with_plan, select};
pub use queue::CancelError;
use runner::installed_versions;

/// Something a watcher receives.
#[derive(Debug, Clone)]
pub enum Notice {
    /// An event and its number in the job's history.
    Event(u64, EventRecord),
    Done(Box<Record>),
}

struct Entry {
    record: Record,
    /// Bumped at every serialization of the record, so journal writes land in order.
    rev: u64,
    /// Output lines were added to the history and not yet written (see [`Engine::flush`]).
    dirty: bool,
    /// The state last sent to the report sink (progress is reported once per state).
    reported_state: Option<State>,
    job: Option<ValidJob>,
    cancel: Arc<AtomicBool>,
    tx: broadcast::Sender<Notice>,
}

impl Entry {
    fn new(record: Record, job: Option<ValidJob>) -> Self {
        let (tx, _) = broadcast::channel(256);
        Self {
            record,
            rev: 0,
            dirty: false,
            reported_state: None,
            job,
            cancel: Arc::default(),
            tx,
        }
    }
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Entry>,
    queue: VecDeque<String>,
    /// Jobs found REBOOTING at start: continued before anything else.
    resume: VecDeque<String>,
    /// Jobs found APPLYING at start: completed from what the package manager did.
    recover: VecDeque<String>,
}

/// What the engine does next.
enum Work {
    Run(String, ValidJob, Arc<AtomicBool>),
    Resume(String, ValidJob),
    Recover(String, ValidJob),
}

/// A refused submission: why, and the stored record when the job id was seen before.
pub type Refused = Box<(Rejection, Option<Record>)>;

/// Where job reports go (the durable outbox; see `crate::report`).
pub trait ReportSink: Send + Sync {
    /// Commits a report of `record` durably; false when it could not be committed.
    fn job(&self, record: &Record) -> bool;
}

/// Counts of refused submissions by reason.
pub type Rejections = BTreeMap<&'static str, u64>;

pub struct Engine {
    journal: Arc<Journal>,
    schema: Schema,
    trust: RwLock<Arc<TrustStore>>,
    /// `[jobs]` and the admission policy built from it; a SIGHUP replaces both. A running job
    /// reads them as it goes, so a new hook_timeout or reboot_grace applies to its next step.
    settings: RwLock<(Arc<AdmissionPolicy>, Arc<JobsSection>)>,
    scanner: Option<Arc<Scanner>>,
    boot_id_path: std::path::PathBuf,
    inner: Mutex<Inner>,
    wake: Notify,
    rejected: Mutex<Rejections>,
    /// Jobs admitted (QUEUED) and jobs ended, by state, since start: `patchagent_jobs_total`.
    entered: Mutex<BTreeMap<&'static str, u64>>,
    /// (window start, lines logged in it, lines suppressed in it).
    log_limiter: Mutex<(std::time::Instant, u32, u64)>,
    /// Admission is CPU work (signature, schema); one at a time leaves the other workers free
    /// for everything else when someone floods the agent.
    admission: tokio::sync::Semaphore,
    sink: std::sync::OnceLock<Arc<dyn ReportSink>>,
    clock: Arc<dyn Clock>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Engine {
    fn now_ms(&self) -> u64 {
        journal::ms(self.clock.now())
    }

    /// The current `[jobs]` section.
    fn cfg(&self) -> Arc<JobsSection> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// The current admission policy.
    fn policy(&self) -> Arc<AdmissionPolicy> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Applies a reloaded `[jobs]` section and the policy built from it.
    pub fn set_jobs(&self, policy: AdmissionPolicy, cfg: JobsSection) {
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (Arc::new(policy), Arc::new(cfg));
    }

    fn manager(&self) -> Option<&'static str> {
        self.scanner.as_ref().map(|s| s.manager())
    }

    /// Replaces the trust store (SIGHUP).
    pub fn set_trust(&self, store: TrustStore) {
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(store);
    }

    pub fn trusted_keys(&self) -> usize {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// (queued, the job applying now, refusals since start).
    pub fn summary(&self) -> (usize, Option<String>, u64) {
        let inner = lock(&self.inner);
        let running = inner
            .jobs
            .values()
            .find(|e| e.record.state == State::Applying)
            .map(|e| e.record.job_id.clone());
        let rejected = lock(&self.rejected).values().sum();
        (inner.queue.len(), running, rejected)
    }

    pub fn rejections(&self) -> Rejections {
        lock(&self.rejected).clone()
    }

    /// Jobs admitted (`QUEUED`) and jobs that ended, by state name, since start.
    pub fn jobs_by_state(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.entered).clone()
    }

    /// Counts a job entering `state` when it is admission or an end.
    fn count_state(&self, state: State) {
        if state == State::Queued || state.is_terminal() {
            *lock(&self.entered)
                .entry(patch_agent_wire::convert::state_name(
                    state.to_proto() as i32
                ))
                .or_default() += 1;
        }
    }

    fn transition(
        &self,
        entry: &mut Entry,
        event: &Event,
        message: &str,
    ) -> Result<(), NotAllowed> {
        entry.record.apply(event, self.now_ms())?;
        self.count_state(entry.record.state);
        let (n, ev) = entry.record.event(message);
        let _ = entry.tx.send(Notice::Event(n, ev));
        Ok(())
    }

    /// Attaches the report sink, and hands it every ended job whose result it has not had
    /// (jobs that ended in crash recovery, or before reporting was configured).
    pub fn set_report_sink(&self, sink: Arc<dyn ReportSink>) {
        if self.sink.set(sink).is_err() {
            return;
        }
        let mut inner = lock(&self.inner);
        let mut unreported: Vec<&mut Entry> = inner
            .jobs
            .values_mut()
            .filter(|e| !e.record.reported)
            .collect();
        unreported.sort_by_key(|e| e.record.submitted_ms);
        for entry in unreported {
            self.persist(entry);
        }
    }

    /// Writes the journal under the lock; for the rare paths (cancel, recovery, the report
    /// sink). The job's own steps and notes use [`Engine::stage`] and write after the lock.
    fn persist(&self, entry: &mut Entry) {
        let staged = self.stage(entry);
        self.write(staged);
    }

    /// Under the lock: reports the record to the sink when its state is new to it (a final
    /// result is committed to the sink before the journal says it was reported), and copies it
    /// as the entry's next revision, for [`Engine::write`] to serialize and write.
    fn stage(&self, entry: &mut Entry) -> Staged {
        if let Some(sink) = self.sink.get() {
            let state = entry.record.state;
            if state.is_terminal() {
                if !entry.record.reported && sink.job(&entry.record) {
                    entry.record.reported = true;
                }
            } else if entry.reported_state != Some(state) && sink.job(&entry.record) {
                entry.reported_state = Some(state);
            }
        }
        entry.rev += 1;
        entry.dirty = false;
        // A copy is all the lock is held for; serializing and writing happen after it.
        Staged {
            rev: entry.rev,
            record: entry.record.clone(),
        }
    }

    /// Writes a staged revision. Called without the engine's lock, so GetStatus and admission
    /// never wait for serialization or the disk; revisions still land in order.
    fn write(&self, staged: impl Into<Option<Staged>>) {
        let Some(s) = staged.into() else { return };
        if let Err(e) = s.write(&self.journal) {
            tracing::error!(job = %s.record.job_id, error = %e, "Cannot write the journal");
        }
    }

    /// Adds a line of command output to a job's history and sends it to watchers at once, but
    /// leaves writing it to [`Engine::flush`]: a package printing thousands of lines must not
    /// cost thousands of journal rewrites under the engine's lock.
    fn note_output(&self, id: &str, message: String) {
        let mut inner = lock(&self.inner);
        if let Some(entry) = inner.jobs.get_mut(id) {
            let (n, ev) = entry.record.event(message);
            entry.dirty = true;
            let _ = entry.tx.send(Notice::Event(n, ev));
        }
    }

    /// Writes a job's record if output lines were added since it was last written. The record
    /// is copied under the lock; serializing and writing (two fsyncs) happen outside it, on a
    /// blocking thread, and a newer revision written meanwhile wins.
    async fn flush(&self, id: &str) {
        let staged = {
            let mut inner = lock(&self.inner);
            match inner.jobs.get_mut(id) {
                Some(entry) if entry.dirty => self.stage(entry),
                _ => return,
            }
        };
        let journal = self.journal.clone();
        let written = tokio::task::spawn_blocking(move || staged.write(&journal)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(job = %id, error = %e, "Cannot write the journal"),
            Err(e) => tracing::error!(job = %id, error = %e, "Journal write task failed"),
        }
    }

    /// Records a transition durably before the caller acts on it; watchers hear that a job
    /// ended only once that is on disk.
    fn step(&self, id: &str, event: Event, message: String) -> Result<(), String> {
        let (staged, done) = {
            let mut inner = lock(&self.inner);
            let entry = inner.jobs.get_mut(id).ok_or("job vanished")?;
            self.transition(entry, &event, &message)
                .map_err(|e| e.to_string())?;
            let done = entry
                .record
                .state
                .is_terminal()
                .then(|| (entry.tx.clone(), entry.record.clone()));
            (self.stage(entry), done)
        };
        self.write(staged);
        if let Some((tx, record)) = done {
            let _ = tx.send(Notice::Done(Box::new(record)));
        }
        Ok(())
    }

    fn note(&self, id: &str, message: String) {
        let staged = {
            let mut inner = lock(&self.inner);
            let Some(entry) = inner.jobs.get_mut(id) else {
                return;
            };
            let (n, ev) = entry.record.event(message);
            let _ = entry.tx.send(Notice::Event(n, ev));
            self.stage(entry)
        };
        self.write(staged);
    }

    /// Forgets finished jobs past their expiry and the history retention (journal and memory).
    fn collect_garbage(&self) {
        let mut inner = lock(&self.inner);
        let removed = self.journal.gc(
            inner.jobs.values().map(|e| &e.record),
            self.cfg().history_retention,
        );
        for id in removed {
            inner.jobs.remove(&id);
        }
    }

    /// Changes a running job's record and writes it (after the lock).
    fn update(&self, id: &str, change: impl FnOnce(&mut Record)) {
        let staged = {
            let mut inner = lock(&self.inner);
            inner.jobs.get_mut(id).map(|e| {
                change(&mut e.record);
                self.stage(e)
            })
        };
        self.write(staged);
    }

    fn set_packages(&self, id: &str, packages: Vec<PackageOutcome>) {
        self.update(id, |r| r.packages = packages);
    }
}

/// A record serialized under the engine's lock, to be written after it.
struct Staged {
    rev: u64,
    record: Record,
}

impl Staged {
    /// Serializes and writes the record (two fsyncs), unless a newer revision is on disk.
    fn write(&self, journal: &Journal) -> std::io::Result<()> {
        let data = serde_json::to_vec(&self.record).map_err(std::io::Error::other)?;
        journal.write_revision(&self.record.job_id, self.rev, &data)
    }
}

/// Why a job stopped early.
#[derive(Debug)]
enum Stop {
    Cancelled,
    Failed(String),
    /// max_duration ran out; why and where.
    TimedOut(String),
}

/// Output lines are written to the journal at most this often (and at every state change).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// When a job's max_duration runs out.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    max: Duration,
}

impl Deadline {
    fn after(max: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            // A max_duration is bounded by [jobs] max_job_duration; saturate all the same.
            at: now
                .checked_add(max)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400)),
            max,
        }
    }

    /// Time left, zero once passed.
    fn left(&self) -> Duration {
        self.at
            .saturating_duration_since(tokio::time::Instant::now())
    }

    fn passed(&self) -> bool {
        self.left().is_zero()
    }

    /// A command timeout that ends no later than the deadline.
    fn cap(&self, timeout: Duration) -> Duration {
        timeout.min(self.left())
    }

    /// TimedOut if the deadline has passed, naming what the job was doing.
    fn check(&self, doing: &str) -> Result<(), Stop> {
        if self.passed() {
            Err(self.timed_out(doing))
        } else {
            Ok(())
        }
    }

    fn timed_out(&self, doing: &str) -> Stop {
        Stop::TimedOut(format!("max_duration {:?} ran out {doing}", self.max))
    }
}
