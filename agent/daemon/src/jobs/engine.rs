//! The job engine: admission, a bounded FIFO queue, one job at a time, the journal written
//! before each transition takes effect, and live updates for watchers.
//!
//! The engine is the only writer of the journal. A job's history is both persisted (for
//! `GetJob`, `WatchJob` after the fact, and crash recovery) and broadcast to live watchers;
//! a watcher subscribes before it reads the history, and drops events it has already seen, so it
//! never misses one.

use super::journal::{self, EventRecord, Journal, PackageOutcome, Record};
use super::state::{Event, State};
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
    /// (window start, lines logged in it, lines suppressed in it).
    log_limiter: Mutex<(std::time::Instant, u32, u64)>,
    /// Admission is CPU work (signature, schema); one at a time leaves the other workers free
    /// for everything else when someone floods the agent.
    admission: tokio::sync::Semaphore,
    sink: std::sync::OnceLock<Arc<dyn ReportSink>>,
}

/// A transition found at start-up (recovery). The state machine allows every one of them;
/// one it refused would leave the record as it was, logged.
fn recovered(r: &mut Record, event: &Event) {
    if let Err(e) = r.apply(event, journal::now_ms()) {
        tracing::error!(job = %r.job_id, error = %e, "Recovery transition refused");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Engine {
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

    /// Opens the journal and recovers: APPLYING jobs become INTERRUPTED (after repairing the
    /// package database), QUEUED ones are queued again unless they expired meanwhile.
    pub async fn open(
        boot_id_path: &std::path::Path,
        state_dir: &std::path::Path,
        trust: TrustStore,
        policy: AdmissionPolicy,
        cfg: JobsSection,
        scanner: Option<Arc<Scanner>>,
    ) -> Result<Arc<Self>, String> {
        let journal = Journal::open(state_dir).map_err(|e| {
            format!(
                "cannot open the job journal in {}: {e}",
                state_dir.display()
            )
        })?;
        let schema = Schema::new(patch_agent_wire::proto::FILE_DESCRIPTOR_SET)?;
        let (records, quarantined) = journal.load();
        for q in &quarantined {
            tracing::error!(problem = %q, "Quarantined a corrupt journal file; it will not run");
        }
        let removed = journal.gc(&records, cfg.history_retention);
        let engine = Arc::new(Self {
            journal: Arc::new(journal),
            schema,
            trust: RwLock::new(Arc::new(trust)),
            settings: RwLock::new((Arc::new(policy), Arc::new(cfg))),
            scanner,
            boot_id_path: boot_id_path.to_path_buf(),
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            rejected: Mutex::new(Rejections::new()),
            log_limiter: Mutex::new((std::time::Instant::now(), 0, 0)),
            admission: tokio::sync::Semaphore::new(1),
            sink: std::sync::OnceLock::new(),
        });
        let mut interrupted = false;
        for mut r in records.into_iter().filter(|r| !removed.contains(&r.job_id)) {
            let mut job = None;
            let mut resume = false;
            let mut recover = false;
            // A job that may go on is verified once more against the current trust store (its
            // key may have been removed while the agent was down) and validated again.
            let checked = matches!(
                r.state,
                State::Rebooting | State::Applying | State::Queued | State::WaitingWindow
            )
            .then(|| engine.requeue(&r));
            let expired = r.expires_ms <= journal::now_ms();
            match (r.state, checked) {
                (_, Some(Err(Recheck::Untrusted(why)))) => {
                    interrupted |= r.state == State::Applying;
                    recovered(&mut r, &Event::Untrusted(why));
                    r.event(format!(
                        "FAILED: {} (found after an agent restart)",
                        r.reason
                    ));
                }
                (State::Rebooting, Some(Ok(j))) => {
                    job = Some(j);
                    resume = true;
                }
                (State::Rebooting, Some(Err(why))) => {
                    let why = format!("cannot be resumed after the reboot: {why}");
                    recovered(&mut r, &Event::Fail(why));
                    r.event(format!("FAILED: {}", r.reason));
                }
                (State::Applying, Some(Ok(j))) if !r.plan.is_empty() => {
                    job = Some(j);
                    recover = true;
                }
                (State::Applying, Some(Err(why))) if !r.plan.is_empty() => {
                    recovered(&mut r, &Event::Recovered);
                    r.reason = format!("the agent stopped while applying; cannot resume: {why}");
                    r.event(format!("INTERRUPTED: {}", r.reason));
                    interrupted = true;
                }
                (State::Applying, _) => {
                    recovered(&mut r, &Event::Recovered);
                    r.reason = "the agent stopped while the job was applying".into();
                    r.event("INTERRUPTED: found applying after an agent restart");
                    interrupted = true;
                }
                (State::Queued | State::WaitingWindow, _) if expired => {
                    recovered(&mut r, &Event::Expired);
                    r.reason = "expired before it could run".into();
                    r.event("FAILED: expired while queued across a restart");
                }
                (State::Queued | State::WaitingWindow, Some(Ok(j))) => job = Some(j),
                (State::Queued | State::WaitingWindow, Some(Err(why))) => {
                    recovered(&mut r, &Event::Fail(format!("cannot be resumed: {why}")));
                    r.event(format!("FAILED: {}", r.reason));
                }
                _ => {}
            }
            if let Err(e) = engine.journal.write(&r) {
                tracing::error!(job = %r.job_id, error = %e, "Cannot update the journal during recovery");
            }
            let queued = matches!(r.state, State::Queued | State::WaitingWindow);
            let id = r.job_id.clone();
            let (tx, _) = broadcast::channel(256);
            let mut inner = lock(&engine.inner);
            inner.jobs.insert(
                id.clone(),
                Entry {
                    record: r,
                    rev: 0,
                    dirty: false,
                    reported_state: None,
                    job,
                    cancel: Arc::default(),
                    tx,
                },
            );
            if resume {
                inner.resume.push_back(id);
            } else if recover {
                inner.recover.push_back(id);
            } else if queued {
                inner.queue.push_back(id);
            }
        }
        if interrupted && let Some(s) = &engine.scanner {
            match s.backend().repair().await {
                Ok(Some(what)) => {
                    tracing::warn!(repair = %what, "Repaired the package database after an interrupted job")
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "Package database repair failed"),
            }
        }
        Ok(engine)
    }

    /// Verifies a journaled envelope again with the current trust store; returns the payload.
    /// The error says the key is no longer trusted (or why the check cannot be made).
    fn verify_again(
        &self,
        key_id: &str,
        payload_hex: &str,
        signature_hex: &str,
    ) -> Result<Vec<u8>, String> {
        let payload = patch_agent_wire::ids::from_hex(payload_hex)
            .ok_or("the stored payload is not hex; it cannot be verified again")?;
        let signature = patch_agent_wire::ids::from_hex(signature_hex)
            .filter(|s| !s.is_empty())
            .ok_or("the journal holds no signature for this job (an older agent recorded it), so it cannot be verified against the current trust store; sign and submit it again")?;
        let trust = self
            .trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        trust.verify(key_id, &payload, &signature).map_err(|e| {
            format!(
                "the key {key_id} that signed this job is no longer trusted ({e}); nothing more of the job runs"
            )
        })?;
        Ok(payload)
    }

    /// A journaled job, verified again and validated again, for the engine to continue.
    fn requeue(&self, r: &Record) -> Result<ValidJob, Recheck> {
        let payload = self
            .verify_again(&r.key_id, &r.payload_hex, &r.signature_hex)
            .map_err(Recheck::Untrusted)?;
        let job = <pb::Job as prost::Message>::decode(payload.as_slice())
            .map_err(|e| Recheck::Invalid(e.to_string()))?;
        patch_agent_wire::job::validate(
            job,
            &r.key_id,
            &self.policy(),
            self.manager(),
            SystemTime::now(),
        )
        .map_err(|e| Recheck::Invalid(e.to_string()))
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

    /// [`Engine::submit`], one admission at a time.
    pub async fn submit_fair(&self, env: &pb::SignedJob) -> Result<Record, Refused> {
        let _permit = self.admission.acquire().await;
        self.submit(env)
    }

    /// Admits a signed job and queues it, or says why not. Nothing runs on refusal.
    pub fn submit(&self, env: &pb::SignedJob) -> Result<Record, Refused> {
        let trust = self
            .trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let result = admit(
            env,
            &trust,
            &self.schema,
            &self.policy(),
            self.manager(),
            SystemTime::now(),
        );
        let job = match result {
            Ok(j) => j,
            Err(e) => return Err(self.refuse(e, &env.key_id, None)),
        };
        let mut inner = lock(&self.inner);
        if let Some(existing) = inner.jobs.get(&job.id) {
            let record = existing.record.clone();
            drop(inner);
            let why = Rejection::Replay(format!(
                "job {} was submitted before (state {:?}); a job id runs at most once",
                job.id, record.state
            ));
            return Err(self.refuse(why, &env.key_id, Some(record)));
        }
        if inner.queue.len() >= self.cfg().queue_size {
            drop(inner);
            let why = Rejection::QueueFull(format!(
                "{} jobs are already queued ([jobs] queue_size)",
                self.cfg().queue_size
            ));
            return Err(self.refuse(why, &env.key_id, None));
        }
        let mut record = Record {
            job_id: job.id.clone(),
            key_id: job.key_id.clone(),
            payload_hex: patch_agent_wire::ids::to_hex(&env.payload),
            state: State::Queued,
            reason: String::new(),
            summary: job.summary(),
            dry_run: job.dry_run,
            submitted_ms: journal::now_ms(),
            started_ms: None,
            finished_ms: None,
            expires_ms: journal::ms(job.expires_at),
            events: Vec::new(),
            packages: Vec::new(),
            event_count: 0,
            reboot_boot_id: None,
            reboot_ms: None,
            plan: Vec::new(),
            reboot_verified: false,
            reported: false,
            signature_hex: patch_agent_wire::ids::to_hex(&env.signature),
            repo_errors: Vec::new(),
        };
        record.event(format!(
            "QUEUED: {} (signed by key {})",
            record.summary, record.key_id
        ));
        if let Err(e) = self.journal.write(&record) {
            drop(inner);
            let why = Rejection::Precondition(format!("cannot record the job durably: {e}"));
            return Err(self.refuse(why, &env.key_id, None));
        }
        tracing::info!(job = %job.id, key = %job.key_id, summary = %record.summary, "Accepted job");
        let (tx, _) = broadcast::channel(256);
        inner.jobs.insert(
            job.id.clone(),
            Entry {
                rev: 0,
                dirty: false,
                reported_state: self
                    .sink
                    .get()
                    .is_some_and(|sink| sink.job(&record))
                    .then_some(State::Queued),
                record: record.clone(),
                job: Some(job.clone()),
                cancel: Arc::default(),
                tx,
            },
        );
        inner.queue.push_back(job.id);
        drop(inner);
        self.wake.notify_one();
        Ok(record)
    }

    fn refuse(&self, why: Rejection, key_id: &str, record: Option<Record>) -> Refused {
        *lock(&self.rejected).entry(why.label()).or_default() += 1;
        // Every refusal is counted; logging is limited to ten lines a second so a flood of
        // hostile envelopes cannot turn into a flood of log lines.
        let now = std::time::Instant::now();
        let mut limiter = lock(&self.log_limiter);
        if now.duration_since(limiter.0) >= Duration::from_secs(1) {
            if limiter.2 > 0 {
                tracing::warn!(
                    suppressed = limiter.2,
                    "Rejected-job log lines suppressed in the last second"
                );
            }
            *limiter = (now, 0, 0);
        }
        if limiter.1 < 10 {
            limiter.1 += 1;
            tracing::warn!(reason = why.label(), key = %key_id, error = %why, "Rejected job");
        } else {
            limiter.2 += 1;
        }
        Box::new((why, record))
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        lock(&self.inner).jobs.get(id).map(|e| e.record.clone())
    }

    /// Most recent first.
    pub fn list(&self, limit: usize) -> Vec<Record> {
        let inner = lock(&self.inner);
        let mut all: Vec<&Record> = inner.jobs.values().map(|e| &e.record).collect();
        all.sort_by(|a, b| {
            b.submitted_ms
                .cmp(&a.submitted_ms)
                .then(b.job_id.cmp(&a.job_id))
        });
        all.into_iter().take(limit).cloned().collect()
    }

    /// The record so far and a receiver for what follows (subscribed first: nothing is lost).
    pub fn watch(&self, id: &str) -> Option<(Record, broadcast::Receiver<Notice>)> {
        let inner = lock(&self.inner);
        let e = inner.jobs.get(id)?;
        let rx = e.tx.subscribe();
        Some((e.record.clone(), rx))
    }

    /// Cancels a queued job at once; a running one stops before its next package.
    pub fn cancel(&self, id: &str) -> Result<Record, String> {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.jobs.get_mut(id) else {
            return Err(format!("no job {id}"));
        };
        match entry.record.state {
            State::Queued | State::WaitingWindow => {
                self.transition(entry, &Event::Cancel, "CANCELLED: cancelled while queued")?;
                entry.record.reason = "cancelled by a controller".into();
                self.persist(entry);
                let _ = entry.tx.send(Notice::Done(Box::new(entry.record.clone())));
                let record = entry.record.clone();
                inner.queue.retain(|q| q != id);
                Ok(record)
            }
            State::Applying | State::PreHook => {
                entry.cancel.store(true, Ordering::SeqCst);
                let msg = "cancel requested: the job stops before its next package";
                let (n, ev) = entry.record.event(msg);
                self.persist(entry);
                let _ = entry.tx.send(Notice::Event(n, ev));
                Ok(entry.record.clone())
            }
            s => Err(format!("job {id} has already ended ({s:?})")),
        }
    }

    fn transition(&self, entry: &mut Entry, event: &Event, message: &str) -> Result<(), String> {
        entry
            .record
            .apply(event, journal::now_ms())
            .map_err(|e| e.to_string())?;
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
            self.transition(entry, &event, &message)?;
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

    /// Runs queued jobs one at a time, forever. A job whose maintenance window has not opened
    /// waits (WAITING_WINDOW) without holding up the jobs behind it; one whose window can no
    /// longer fit it ends MISSED_WINDOW.
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = SystemTime::now();
            let (picked, wake_at) = self.pick(now);
            match (picked, wake_at) {
                (Some(Work::Run(id, job, cancel)), _) => self.run_job(&id, &job, &cancel).await,
                (Some(Work::Resume(id, job)), _) => self.resume_job(&id, &job).await,
                (Some(Work::Recover(id, job)), _) => self.recover_job(&id, &job).await,
                (None, Some(t)) => {
                    let d = t.duration_since(now).unwrap_or_default();
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                (None, None) => self.wake.notified().await,
            }
        }
    }

    /// The first queued job that may start now, and when to look again if none may.
    fn pick(&self, now: SystemTime) -> (Option<Work>, Option<SystemTime>) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        while let Some(id) = inner.resume.pop_front() {
            if let Some(job) = inner.jobs.get(&id).and_then(|e| e.job.clone()) {
                return (Some(Work::Resume(id, job)), None);
            }
        }
        while let Some(id) = inner.recover.pop_front() {
            if let Some(job) = inner.jobs.get(&id).and_then(|e| e.job.clone()) {
                return (Some(Work::Recover(id, job)), None);
            }
        }
        let mut wake_at: Option<SystemTime> = None;
        let mut i = 0;
        while i < inner.queue.len() {
            let id = inner.queue[i].clone();
            let Some(entry) = inner.jobs.get_mut(&id) else {
                inner.queue.remove(i);
                continue;
            };
            let Some(job) = entry.job.clone() else {
                inner.queue.remove(i);
                continue;
            };
            match job.window.map(|w| w.check(now, job.max_duration)) {
                None | Some(WindowCheck::Open) => {
                    inner.queue.remove(i);
                    return (Some(Work::Run(id, job, entry.cancel.clone())), None);
                }
                Some(WindowCheck::WaitUntil(t)) => {
                    if entry.record.state == State::Queued {
                        let msg = format!(
                            "WAITING_WINDOW: the maintenance window opens at {}",
                            humantime::format_rfc3339_seconds(t)
                        );
                        if self.transition(entry, &Event::WaitWindow, &msg).is_ok() {
                            self.persist(entry);
                        }
                    }
                    wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
                    i += 1;
                }
                Some(WindowCheck::Missed(why)) => {
                    if self
                        .transition(
                            entry,
                            &Event::WindowMissed,
                            &format!("MISSED_WINDOW: {why}"),
                        )
                        .is_ok()
                    {
                        entry.record.reason = why;
                        self.persist(entry);
                        let _ = entry.tx.send(Notice::Done(Box::new(entry.record.clone())));
                    }
                    inner.queue.remove(i);
                }
            }
        }
        (None, wake_at)
    }

    async fn run_job(&self, id: &str, job: &ValidJob, cancel: &AtomicBool) {
        if job.expires_at <= SystemTime::now() {
            let _ = self.step(
                id,
                Event::Expired,
                "FAILED: expired before it could start".into(),
            );
            return;
        }
        // The trust store may have changed since admission (a key removed and SIGHUP): the
        // envelope must still verify now, or nothing runs.
        let stored = lock(&self.inner).jobs.get(id).map(|e| {
            (
                e.record.key_id.clone(),
                e.record.payload_hex.clone(),
                e.record.signature_hex.clone(),
            )
        });
        if let Some((key, payload, signature)) = stored
            && let Err(why) = self.verify_again(&key, &payload, &signature)
        {
            tracing::warn!(job = %id, key = %key, reason = %why, "Job no longer trusted; not starting it");
            let message = format!("FAILED: {why}");
            if let Err(e) = self.step(id, Event::Untrusted(why), message) {
                tracing::error!(job = %id, error = %e, "Cannot fail untrusted job");
            }
            self.collect_garbage();
            return;
        }
        let start = if !job.pre_hooks.is_empty() && !job.dry_run {
            self.step(
                id,
                Event::StartHooks,
                format!("PRE_HOOK: {}", job.summary()),
            )
        } else {
            self.step(id, Event::Start, format!("APPLYING: {}", job.summary()))
        };
        if let Err(e) = start {
            tracing::error!(job = %id, error = %e, "Cannot start job");
            return;
        }
        let deadline = Deadline::after(job.max_duration);
        let outcome = self.execute(id, job, cancel, deadline).await;
        self.finish(
            id,
            outcome,
            "SUCCEEDED",
            "SUCCEEDED_REBOOT_REQUIRED: done; the host needs a reboot and reboot_policy is NEVER",
        );
        let state = self.get(id).map(|r| r.state);
        tracing::info!(job = %id, state = ?state, "Job finished");
        self.collect_garbage();
        if let Some(s) = &self.scanner {
            let s = s.clone();
            tokio::spawn(async move {
                s.scan(false).await;
            });
        }
    }

    /// Ends a job's work: the final transition for `outcome`, with its reason, durably.
    fn finish(
        &self,
        id: &str,
        outcome: Result<bool, Stop>,
        succeeded: &str,
        succeeded_reboot_required: &str,
    ) {
        let reason = match &outcome {
            Err(Stop::Cancelled) => Some("cancelled by a controller".to_string()),
            Err(Stop::TimedOut(why)) => Some(why.clone()),
            _ => None,
        };
        let (event, message) = conclude(outcome, succeeded, succeeded_reboot_required);
        if let Some(reason) = reason {
            let mut inner = lock(&self.inner);
            if let Some(e) = inner.jobs.get_mut(id) {
                e.record.reason = reason;
            }
        }
        if let Err(e) = self.step(id, event, message) {
            tracing::error!(job = %id, error = %e, "Cannot finish job");
        }
    }

    /// Puts a running command's output into the job's history as it comes (live for watchers),
    /// keeping at most `limit` non-empty lines and counting the rest. Lines reach the journal in
    /// batches, at most every [`FLUSH_INTERVAL`], and all of them when the command ends.
    async fn forward_lines(
        &self,
        id: &str,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
        limit: usize,
    ) {
        let mut kept = 0;
        let mut dropped = 0u64;
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(line) if line.trim().is_empty() => {}
                    Some(line) if kept < limit => {
                        kept += 1;
                        self.note_output(id, format!("  {line}"));
                    }
                    Some(_) => dropped += 1,
                    None => break,
                },
                _ = tick.tick() => self.flush(id).await,
            }
        }
        if dropped > 0 {
            self.note_output(
                id,
                format!("  ({dropped} more output lines not kept; the history keeps {limit} per command)"),
            );
        }
        self.flush(id).await;
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

    /// Does the work; Ok(reboot required).
    async fn execute(
        &self,
        id: &str,
        job: &ValidJob,
        cancel: &AtomicBool,
        deadline: Deadline,
    ) -> Result<bool, Stop> {
        let scanner = self
            .scanner
            .clone()
            .ok_or_else(|| Stop::Failed("no supported package manager on this host".into()))?;
        let backend = scanner.backend();
        self.note(id, "refreshing metadata and scanning".into());
        let snap = scanner.scan(true).await;
        if !snap.errors.is_empty() {
            return Err(Stop::Failed(format!(
                "scan failed: {}",
                snap.errors.join("; ")
            )));
        }
        deadline.check("while refreshing metadata")?;
        let repo_errors = &snap.updates.repo_errors;
        if !repo_errors.is_empty() {
            self.update(id, |r| {
                r.repo_errors = repo_errors
                    .iter()
                    .map(|e| journal::RepoErrorRecord {
                        repo: e.repo.clone(),
                        error: e.error.clone(),
                    })
                    .collect();
            });
            let list: Vec<String> = repo_errors
                .iter()
                .map(|e| format!("{}: {}", e.repo, e.error))
                .collect();
            // A plan made over unreadable repositories can say "nothing to do" for a host that
            // is far behind; a reboot needs no metadata.
            if !job.allow_repo_errors && !matches!(job.action, Action::Reboot) {
                return Err(Stop::Failed(format!(
                    "the metadata refresh could not read {} {}: {}. Nothing was changed; fix the {}, or sign the job with --allow-repo-errors to go on with what could be read",
                    list.len(),
                    if list.len() == 1 {
                        "repository"
                    } else {
                        "repositories"
                    },
                    list.join("; "),
                    if list.len() == 1 {
                        "repository"
                    } else {
                        "repositories"
                    },
                )));
            }
            for e in &list {
                self.note(
                    id,
                    format!("repository could not be read (allow_repo_errors: going on with what could be read): {e}"),
                );
            }
        }
        let ops: Vec<Op> = match &job.action {
            Action::Reboot => return Err(self.reboot(id, "the job is a reboot").await),
            Action::Scan => {
                self.note(
                    id,
                    format!(
                        "scan: {} packages installed, {} updates pending ({} security), {} held",
                        snap.packages.len(),
                        snap.updates.updates.len(),
                        snap.updates
                            .updates
                            .iter()
                            .filter(|u| u.classification == Classification::Security)
                            .count(),
                        snap.updates.held.len()
                    ),
                );
                return Ok(snap.reboot.required);
            }
            Action::Upgrade {
                security_only,
                min_severity,
                exclude,
                approve_after_days,
            } => {
                let (chosen, skipped) = select(
                    &snap.updates.updates,
                    *security_only,
                    *min_severity,
                    exclude,
                    *approve_after_days,
                    SystemTime::now(),
                );
                for (u, why) in &skipped {
                    self.note(
                        id,
                        format!("skip {} {}: {why}", u.name, u.candidate_version),
                    );
                }
                chosen.iter().map(|u| Op::Upgrade(u.name.clone())).collect()
            }
            Action::Install(specs) => specs
                .iter()
                .map(|(n, v)| Op::Install {
                    name: n.clone(),
                    version: v.clone(),
                })
                .collect(),
        };
        let before: HashMap<&str, String> = snap
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.full_version()))
            .collect();
        let candidate: HashMap<&str, &str> = snap
            .updates
            .updates
            .iter()
            .map(|u| (u.name.as_str(), u.candidate_version.as_str()))
            .collect();
        // What the job sets out to do, computed once: the history line, the journaled plan (what
        // a restarted agent checks against) and the dry-run results all come from it.
        let planned: Vec<PackageOutcome> = ops
            .iter()
            .map(|op| PackageOutcome {
                name: op.name().to_string(),
                from: before.get(op.name()).cloned().unwrap_or_default(),
                to: match op {
                    Op::Install {
                        version: Some(v), ..
                    } => v.clone(),
                    _ => candidate
                        .get(op.name())
                        .map_or(String::new(), |c| c.to_string()),
                },
                outcome: Outcome::Planned,
            })
            .collect();
        let plan: Vec<String> = planned
            .iter()
            .map(|p| {
                let from = if p.from.is_empty() {
                    "(not installed)"
                } else {
                    &p.from
                };
                let to = if p.to.is_empty() { "candidate" } else { &p.to };
                format!("{} {from} -> {to}", p.name)
            })
            .collect();
        self.note(
            id,
            format!(
                "plan: {}",
                if plan.is_empty() {
                    "nothing to do".to_string()
                } else {
                    plan.join(", ")
                }
            ),
        );
        self.update(id, |r| r.plan = planned.clone());
        if job.dry_run && !(job.pre_hooks.is_empty() && job.post_hooks.is_empty()) {
            self.note(id, "dry run: hooks are not run".into());
        }
        if job.dry_run {
            let outcomes = planned
                .into_iter()
                .map(|p| PackageOutcome {
                    outcome: Outcome::WouldChange,
                    ..p
                })
                .collect();
            self.set_packages(id, outcomes);
            self.note(id, "dry run: nothing was changed".into());
            return Ok(snap.reboot.required);
        }
        let in_pre_hook = !job.pre_hooks.is_empty();
        if ops.is_empty() {
            if in_pre_hook {
                self.step(
                    id,
                    Event::HooksDone,
                    "APPLYING: nothing to apply; hooks not run".into(),
                )
                .map_err(Stop::Failed)?;
            }
            return Ok(snap.reboot.required);
        }
        let names: Vec<&str> = ops.iter().map(Op::name).collect();
        if in_pre_hook {
            self.run_hooks(id, "pre", &job.pre_hooks, &names, deadline)
                .await?;
            self.step(id, Event::HooksDone, "APPLYING: pre-hooks succeeded".into())
                .map_err(Stop::Failed)?;
        }
        match backend.repair().await {
            Ok(Some(what)) => self.note(id, what),
            Ok(None) => {}
            Err(e) => return Err(Stop::Failed(format!("package database repair failed: {e}"))),
        }
        free_space(&self.cfg()).map_err(Stop::Failed)?;
        let mut failure = None;
        for op in &ops {
            if cancel.load(Ordering::SeqCst) {
                failure = Some(Stop::Cancelled);
                break;
            }
            if deadline.passed() {
                failure = Some(deadline.timed_out(&format!("before applying {}", op.name())));
                break;
            }
            self.note(id, format!("applying {}", op.name()));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            // Never cut short by max_duration: a package manager is not killed mid-transaction.
            let (result, ()) = tokio::join!(backend.apply(op, tx), self.forward_lines(id, rx, 500));
            if let Err(e) = result {
                failure = Some(Stop::Failed(format!("{} failed: {e}", op.name())));
                break;
            }
            if deadline.passed() {
                failure = Some(deadline.timed_out(&format!(
                    "while {} was being applied; the package manager was left to finish",
                    op.name()
                )));
                break;
            }
        }
        // Results from a fresh inventory, whatever happened.
        let after = match installed_versions(backend.as_ref()).await {
            Ok(after) => after,
            Err(e) => {
                let why = format!(
                    "cannot read the inventory after applying, so what changed is unknown: {e}"
                );
                return Err(failure.unwrap_or(Stop::Failed(why)));
            }
        };
        let check = compare_with_plan(&planned, &before, &after);
        self.set_packages(id, check.outcomes);
        if let Some(stop) = failure {
            return Err(stop);
        }
        if !check.problems.is_empty() {
            return Err(Stop::Failed(format!(
                "after applying, the host does not match the plan: {}",
                check.problems.join("; ")
            )));
        }
        self.note(
            id,
            format!(
                "verified against the plan: {} package(s) at their planned versions, nothing removed",
                planned.len()
            ),
        );
        self.after_apply(id, job, &names, deadline).await
    }

    /// After the packages: the reboot policy, post-patch checks, post-hooks. Ok(reboot needed).
    async fn after_apply(
        &self,
        id: &str,
        job: &ValidJob,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<bool, Stop> {
        let scanner = self
            .scanner
            .clone()
            .ok_or_else(|| Stop::Failed("no supported package manager on this host".into()))?;
        let reboot_state = scanner.backend().reboot_required(scanner.boot_time()).await;
        let reboot_required = reboot_state.required;
        let reboot = match job.reboot_policy {
            patch_agent_wire::job::RebootPolicy::Never => false,
            patch_agent_wire::job::RebootPolicy::IfRequired => reboot_required,
            patch_agent_wire::job::RebootPolicy::Always => true,
        };
        if reboot {
            let why = format!(
                "reboot policy {:?}; reboot required: {} by {} ({})",
                job.reboot_policy,
                reboot_required,
                reboot_state.method,
                reboot_state.evidence.join("; ")
            );
            return Err(self.reboot(id, &why).await);
        }
        if !job.checks.is_empty() {
            self.step(id, Event::Verify, "VERIFYING: post-patch checks".into())
                .map_err(Stop::Failed)?;
            self.verify(id, &job.checks, deadline).await?;
        }
        if !job.post_hooks.is_empty() {
            self.step(id, Event::PostHooks, "POST_HOOK: packages applied".into())
                .map_err(Stop::Failed)?;
            self.run_hooks(id, "post", &job.post_hooks, names, deadline)
                .await?;
        }
        Ok(reboot_required)
    }

    /// Completes a job found APPLYING at start. Its package manager ran in its own process group
    /// and may still be running: wait for its lock, repair an interrupted dpkg, then read what
    /// happened from a fresh inventory. Every planned package at its target: the job continues
    /// (reboot policy, checks, post-hooks) and can succeed; otherwise it is INTERRUPTED.
    async fn recover_job(&self, id: &str, job: &ValidJob) {
        let Some(scanner) = self.scanner.clone() else {
            return;
        };
        let backend = scanner.backend();
        self.note(
            id,
            "the agent restarted while this job was applying; waiting for the package manager"
                .into(),
        );
        if let Err(e) = crate::pkg::lock::wait_free(&backend.lock_files(), job.max_duration).await {
            self.note(id, e);
        }
        match backend.repair().await {
            Ok(Some(what)) => self.note(id, what),
            Ok(None) => {}
            Err(e) => self.note(id, format!("package database repair failed: {e}")),
        }
        let plan = lock(&self.inner)
            .jobs
            .get(id)
            .map(|e| e.record.plan.clone())
            .unwrap_or_default();
        let after = installed_versions(backend.as_ref())
            .await
            .unwrap_or_else(|e| {
                self.note(id, format!("cannot read the inventory: {e}"));
                HashMap::new()
            });
        // What the old process did before it stopped is unknown, so only the plan is checked:
        // every planned package at its planned version.
        let check = compare_with_plan(&plan, &HashMap::new(), &after);
        let complete = check.problems.is_empty();
        self.set_packages(id, check.outcomes);
        let names: Vec<String> = plan.iter().map(|p| p.name.clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if !complete {
            let why = "the agent stopped while applying; not every planned package was applied"
                .to_string();
            {
                let mut inner = lock(&self.inner);
                if let Some(e) = inner.jobs.get_mut(id) {
                    e.record.reason = why.clone();
                }
            }
            if let Err(e) = self.step(id, Event::Recovered, format!("INTERRUPTED: {why}")) {
                tracing::error!(job = %id, error = %e, "Cannot finish recovered job");
            }
        } else {
            self.note(
                id,
                "every planned package was applied; completing the job".into(),
            );
            let outcome = self
                .after_apply(id, job, &names, Deadline::after(job.max_duration))
                .await;
            self.finish(
                id,
                outcome,
                "SUCCEEDED: completed after an agent restart",
                "SUCCEEDED_REBOOT_REQUIRED: completed after an agent restart",
            );
        }
        self.collect_garbage();
    }

    /// Records REBOOTING with the current boot id, then runs the reboot command. Returns only if
    /// the host did not go down within the grace period (or the command failed).
    async fn reboot(&self, id: &str, why: &str) -> Stop {
        let boot_id = read_boot_id(&self.boot_id_path);
        let cmd = match self.cfg().reboot_command.split_first() {
            Some((program, args)) => {
                crate::exec::Cmd::new(program, Duration::from_secs(120)).args(args.iter().cloned())
            }
            None => return Stop::Failed("[jobs] reboot_command is empty".into()),
        };
        let staged = {
            let mut inner = lock(&self.inner);
            let Some(entry) = inner.jobs.get_mut(id) else {
                return Stop::Failed("job vanished".into());
            };
            entry.record.reboot_boot_id = Some(boot_id.clone());
            entry.record.reboot_ms = Some(journal::now_ms());
            let msg = format!(
                "REBOOTING: {why}; boot id {boot_id}; running `{}`",
                cmd.display()
            );
            if let Err(e) = self.transition(entry, &Event::Reboot, &msg) {
                return Stop::Failed(e);
            }
            self.stage(entry)
        };
        // Durable before the command runs: the next agent process decides from this record.
        self.write(staged);
        match crate::exec::run(&cmd).await {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Stop::Failed(format!(
                    "reboot command failed: {}",
                    crate::exec::Failed::new(&cmd, &out)
                ));
            }
            Err(e) => return Stop::Failed(format!("reboot command failed: {e}")),
        }
        tokio::time::sleep(self.cfg().reboot_grace).await;
        Stop::Failed(format!(
            "reboot did not happen: the boot id is still {} {:?} after the reboot command",
            read_boot_id(&self.boot_id_path),
            self.cfg().reboot_grace
        ))
    }

    /// Continues a job found REBOOTING at start: verifies the reboot happened (a new boot id),
    /// then runs the checks and post-hooks. Never reboots a second time.
    async fn resume_job(&self, id: &str, job: &ValidJob) {
        let (before, at, packages) = {
            let inner = lock(&self.inner);
            let Some(e) = inner.jobs.get(id) else { return };
            (
                e.record.reboot_boot_id.clone().unwrap_or_default(),
                e.record.reboot_ms.unwrap_or(0),
                e.record
                    .packages
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let now_id = read_boot_id(&self.boot_id_path);
        if now_id == before {
            let grace = self.cfg().reboot_grace.as_millis() as u64;
            let elapsed = journal::now_ms().saturating_sub(at);
            if elapsed < grace {
                tokio::time::sleep(Duration::from_millis(grace - elapsed)).await;
            }
            let why = format!(
                "reboot did not happen: the boot id is still {before} {:?} after the reboot command",
                self.cfg().reboot_grace
            );
            let _ = self.step(id, Event::Fail(why.clone()), format!("FAILED: {why}"));
            return;
        }
        if let Some(e) = lock(&self.inner).jobs.get_mut(id) {
            e.record.reboot_verified = true;
        }
        let msg = format!("VERIFYING: the host rebooted (boot id {before} -> {now_id})");
        if let Err(e) = self.step(id, Event::Rebooted, msg) {
            tracing::error!(job = %id, error = %e, "Cannot resume job");
            return;
        }
        let names: Vec<&str> = packages.iter().map(String::as_str).collect();
        let deadline = Deadline::after(job.max_duration);
        let outcome = async {
            let required = match &self.scanner {
                Some(s) => {
                    let snap = s.scan(false).await;
                    self.note(
                        id,
                        format!(
                            "after the reboot: reboot required {} by {} ({})",
                            snap.reboot.required,
                            snap.reboot.method,
                            snap.reboot.evidence.join("; ")
                        ),
                    );
                    snap.reboot.required
                }
                None => false,
            };
            self.verify(id, &job.checks, deadline).await?;
            if !job.post_hooks.is_empty() {
                self.step(id, Event::PostHooks, "POST_HOOK: the host is back".into())
                    .map_err(Stop::Failed)?;
                self.run_hooks(id, "post", &job.post_hooks, &names, deadline)
                    .await?;
            }
            Ok::<bool, Stop>(required)
        }
        .await;
        self.finish(
            id,
            outcome,
            "SUCCEEDED: verified after the reboot",
            "SUCCEEDED_REBOOT_REQUIRED: still needs a reboot; a job reboots at most once",
        );
        self.collect_garbage();
    }

    /// Runs each post-patch check until it passes or `check_timeout` has passed; the job's
    /// deadline cuts both short (a `systemctl` still running is killed with its group).
    async fn verify(
        &self,
        id: &str,
        checks: &[patch_agent_wire::job::Check],
        job_deadline: Deadline,
    ) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + self.cfg().check_timeout;
        for check in checks {
            let mut attempts = 0;
            loop {
                attempts += 1;
                job_deadline.check(&format!("while checking {check}"))?;
                match run_check(check, job_deadline.cap(Duration::from_secs(10))).await {
                    Ok(()) => {
                        self.note(id, format!("check passed: {check}"));
                        break;
                    }
                    Err(_) if job_deadline.passed() => {
                        return Err(job_deadline.timed_out(&format!("while checking {check}")));
                    }
                    Err(e)
                        if tokio::time::Instant::now() + self.cfg().check_interval >= deadline =>
                    {
                        return Err(Stop::Failed(format!(
                            "post-patch check failed: {check}: {e} (after {attempts} attempts)"
                        )));
                    }
                    Err(e) => {
                        if attempts == 1 {
                            self.note(id, format!("check not yet passing: {check}: {e}; retrying"));
                        }
                        tokio::time::sleep(job_deadline.cap(self.cfg().check_interval)).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs hooks in order, their output into the history; the first failure stops the job.
    async fn run_hooks(
        &self,
        id: &str,
        phase: &str,
        hooks: &[String],
        packages: &[&str],
        deadline: Deadline,
    ) -> Result<(), Stop> {
        for name in hooks {
            // Checked at admission, and again now: the file may have changed since.
            let path =
                super::hooks::check_hook(&self.cfg().hooks_dir, name).map_err(Stop::Failed)?;
            deadline.check(&format!("before {phase}-hook {name}"))?;
            self.note(id, format!("running {phase}-hook {name}"));
            // The hook's timeout ends with the job's: at either, exec kills its process group.
            let cmd = crate::exec::Cmd::new(path, deadline.cap(self.cfg().hook_timeout))
                .env("PATCH_AGENT_JOB_ID", id)
                .env("PATCH_AGENT_PHASE", phase)
                .env("PATCH_AGENT_PACKAGES", packages.join(" "));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let (out, ()) = tokio::join!(
                crate::exec::run_streaming(&cmd, Some(tx)),
                self.forward_lines(id, rx, 200)
            );
            let out = match out {
                Ok(out) => out,
                Err(crate::exec::ExecError::Timeout { .. }) if deadline.passed() => {
                    return Err(deadline.timed_out(&format!(
                        "during {phase}-hook {name}; its process group was killed"
                    )));
                }
                Err(e) => return Err(Stop::Failed(format!("{phase}-hook {name}: {e}"))),
            };
            if !out.status.success() {
                let f = crate::exec::Failed::new(&cmd, &out);
                return Err(Stop::Failed(format!("{phase}-hook {name} failed: {f}")));
            }
            self.note(id, format!("{phase}-hook {name} succeeded"));
        }
        Ok(())
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

/// Why a journaled job cannot go on after a restart.
#[derive(Debug)]
enum Recheck {
    /// Its envelope no longer verifies against the trust store.
    Untrusted(String),
    /// It no longer decodes or validates (expired, a hook gone, ...).
    Invalid(String),
}

impl std::fmt::Display for Recheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recheck::Untrusted(why) | Recheck::Invalid(why) => f.write_str(why),
        }
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

/// Which pending updates an upgrade job takes, and why it leaves the others.
pub fn select<'a>(
    updates: &'a [Update],
    security_only: bool,
    min_severity: Option<Severity>,
    exclude: &[patch_agent_wire::job::Exclude],
    approve_after_days: u32,
    now: SystemTime,
) -> (Vec<&'a Update>, Vec<(&'a Update, String)>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for u in updates {
        let security = u.classification == Classification::Security;
        // Without a vendor severity a security update counts as important, as in the SLA mapping.
        let severity = if security && u.severity == Severity::Unknown {
            Severity::Important
        } else {
            u.severity
        };
        let why = if security_only && !security {
            Some("not a security update".to_string())
        } else if let Some(floor) = min_severity.filter(|f| severity > *f) {
            Some(format!(
                "severity {} is below {}",
                u.severity.as_str(),
                floor.as_str()
            ))
        } else if let Some(e) = exclude.iter().find(|e| e.matches(&u.name)) {
            Some(match e {
                patch_agent_wire::job::Exclude::Name(n) => format!("excluded by {n}"),
                patch_agent_wire::job::Exclude::Pattern(p, _) => format!("excluded by pattern {p}"),
            })
        } else if approve_after_days > 0 {
            let since = u.issued.or(u.first_seen);
            let age = since
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let need = Duration::from_secs(u64::from(approve_after_days) * 86_400);
            (age < need).then(|| {
                format!(
                    "{} {} day(s) ago; approve_after_days is {approve_after_days}",
                    if u.issued.is_some() {
                        "advisory issued"
                    } else {
                        "first seen"
                    },
                    age.as_secs() / 86_400
                )
            })
        } else {
            None
        };
        match why {
            Some(w) => skipped.push((u, w)),
            None => chosen.push(u),
        }
    }
    (chosen, skipped)
}

/// What a job did to the host, package by package, and where that departs from its plan.
#[derive(Debug, Default)]
pub struct PlanCheck {
    pub outcomes: Vec<PackageOutcome>,
    /// One line per departure: a planned package missing or at another version, or a package
    /// removed that the plan did not name.
    pub problems: Vec<String>,
}

/// Compares the installed versions after applying with the plan and the versions before.
pub fn compare_with_plan(
    planned: &[PackageOutcome],
    before: &HashMap<&str, String>,
    after: &HashMap<String, String>,
) -> PlanCheck {
    use patch_agent_wire::job::names::version_matches;
    let mut check = PlanCheck::default();
    for p in planned {
        let found = after.get(&p.name);
        let to = found.cloned().unwrap_or_default();
        let on_plan = found.is_some_and(|v| p.to.is_empty() || version_matches(&p.to, v));
        let outcome = match found {
            None => Outcome::NotInstalled,
            Some(_) if !on_plan && to == p.from => Outcome::Unchanged,
            Some(_) if !on_plan => Outcome::OffPlan,
            Some(_) if p.from.is_empty() => Outcome::Installed,
            Some(_) if to == p.from => Outcome::Unchanged,
            Some(_) => Outcome::Changed,
        };
        if !on_plan {
            let planned_to = if p.to.is_empty() { "installed" } else { &p.to };
            check.problems.push(format!(
                "{}: planned {planned_to}, found {}",
                p.name,
                found.map_or("not installed", String::as_str)
            ));
        }
        check.outcomes.push(PackageOutcome {
            name: p.name.clone(),
            from: p.from.clone(),
            to,
            outcome,
        });
    }
    let mut removed: Vec<(&str, &String)> = before
        .iter()
        .filter(|(name, _)| {
            !after.contains_key(**name) && !planned.iter().any(|p| p.name == **name)
        })
        .map(|(n, v)| (*n, v))
        .collect();
    removed.sort();
    for (name, version) in removed {
        check.problems.push(format!(
            "{name} {version}: removed, but the plan did not remove it"
        ));
        check.outcomes.push(PackageOutcome {
            name: name.to_string(),
            from: version.clone(),
            to: String::new(),
            outcome: Outcome::RemovedUnplanned,
        });
    }
    check
}

/// The last transition of a job's work: timed out, stopped, or done (with the host needing a
/// reboot or not), with the history line for each.
fn conclude(
    outcome: Result<bool, Stop>,
    succeeded: &str,
    succeeded_reboot_required: &str,
) -> (Event, String) {
    match outcome {
        Err(Stop::TimedOut(why)) => (Event::Timeout, format!("TIMED_OUT: {why}")),
        Err(Stop::Cancelled) => (
            Event::Cancel,
            "CANCELLED: stopped between packages".to_string(),
        ),
        Err(Stop::Failed(why)) => (Event::Fail(why.clone()), format!("FAILED: {why}")),
        Ok(reboot_required) => (
            Event::Applied { reboot_required },
            if reboot_required {
                succeeded_reboot_required
            } else {
                succeeded
            }
            .to_string(),
        ),
    }
}

/// Installed versions by package name, from a fresh inventory.
async fn installed_versions(
    backend: &dyn crate::pkg::PackageManager,
) -> Result<HashMap<String, String>, crate::pkg::PkgError> {
    let mut out = HashMap::new();
    backend
        .inventory(&mut |p| {
            out.insert(p.name.clone(), p.full_version());
        })
        .await?;
    Ok(out)
}

fn read_boot_id(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(unreadable: {e})"))
}

/// One attempt at one check.
/// `limit` bounds the attempt (a `systemctl` past it is killed with its process group).
async fn run_check(check: &patch_agent_wire::job::Check, limit: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unit_limit = limit;
    let limit = limit.min(Duration::from_secs(5));
    match check {
        patch_agent_wire::job::Check::Unit(unit) => {
            let cmd = crate::exec::Cmd::new("systemctl", unit_limit)
                .args(["is-active", "--quiet", "--"])
                .arg(unit.clone());
            let out = crate::exec::run(&cmd).await.map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("systemctl is-active says no ({})", out.status))
            }
        }
        patch_agent_wire::job::Check::Port(port) => {
            tokio::time::timeout(limit, tokio::net::TcpStream::connect(("127.0.0.1", *port)))
                .await
                .map_err(|_| "connection timed out".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        patch_agent_wire::job::Check::Http {
            host, port, path, ..
        } => {
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| e.to_string())?;
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: patch-agent\r\nConnection: close\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut head = [0u8; 64];
                let mut n = 0;
                while n < head.len() {
                    let r = stream
                        .read(&mut head[n..])
                        .await
                        .map_err(|e| e.to_string())?;
                    if r == 0 || head[..n + r].contains(&b'\n') {
                        n += r;
                        break;
                    }
                    n += r;
                }
                let line = String::from_utf8_lossy(&head[..n]);
                let status = line.split_whitespace().nth(1).unwrap_or("");
                if line.starts_with("HTTP/1.") && status == "200" {
                    Ok(())
                } else {
                    Err(format!(
                        "answered {:?}",
                        line.lines().next().unwrap_or("").trim()
                    ))
                }
            };
            tokio::time::timeout(limit, attempt)
                .await
                .map_err(|_| format!("no answer within {limit:?}"))?
        }
    }
}

fn free_space(cfg: &JobsSection) -> Result<(), String> {
    for path in &cfg.free_space_paths {
        let Ok(st) = nix::sys::statvfs::statvfs(path) else {
            continue;
        };
        let free_mib = st.blocks_available() * st.fragment_size() / (1024 * 1024);
        if free_mib < cfg.min_free_mib {
            return Err(format!(
                "{} has {free_mib} MiB free, below the {} MiB floor ([jobs] min_free_mib); nothing was changed",
                path.display(),
                cfg.min_free_mib
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkg::SlaClass;

    fn u(name: &str, class: Classification, sev: Severity, issued_days_ago: Option<u64>) -> Update {
        let now = SystemTime::now();
        Update {
            name: name.into(),
            arch: "all".into(),
            installed_version: "1".into(),
            candidate_version: "2".into(),
            origin: String::new(),
            classification: class,
            severity: sev,
            advisories: vec![],
            cves: vec![],
            issued: issued_days_ago.map(|d| now - Duration::from_secs(d * 86_400)),
            first_seen: Some(now),
            sla: SlaClass::of(class, sev),
        }
    }

    #[test]
    fn selection_rules() {
        use Classification::*;
        let all = [
            u("crit", Security, Severity::Critical, Some(100)),
            u("mod", Security, Severity::Moderate, Some(40)),
            u("deb", Security, Severity::Unknown, None),
            u("bug", Bugfix, Severity::Unknown, Some(100)),
            u("libfoo", Other, Severity::Unknown, None),
        ];
        let names = |v: Vec<&Update>| v.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let now = SystemTime::now();
        assert_eq!(
            names(select(&all, false, None, &[], 0, now).0),
            ["crit", "mod", "deb", "bug", "libfoo"]
        );
        assert_eq!(
            names(select(&all, true, None, &[], 0, now).0),
            ["crit", "mod", "deb"]
        );
        assert_eq!(
            names(select(&all, true, Some(Severity::Important), &[], 0, now).0),
            ["crit", "deb"]
        );
        assert_eq!(
            names(select(&all, true, Some(Severity::Critical), &[], 0, now).0),
            ["crit"]
        );
        let ex = [
            patch_agent_wire::job::Exclude::Name("crit".into()),
            patch_agent_wire::job::Exclude::Pattern(
                "lib*".into(),
                regex::Regex::new("^(?:lib.*)$").expect("re"),
            ),
        ];
        assert_eq!(
            names(select(&all, false, None, &ex, 0, now).0),
            ["mod", "deb", "bug"]
        );
        let (chosen, skipped) = select(&all, false, None, &[], 50, now);
        assert_eq!(names(chosen), ["crit", "bug"]);
        assert!(
            skipped
                .iter()
                .any(|(u, why)| u.name == "deb" && why.contains("first seen 0 day"))
        );
        assert!(
            skipped
                .iter()
                .any(|(u, why)| u.name == "mod" && why.contains("advisory issued 40 day"))
        );
    }
}
