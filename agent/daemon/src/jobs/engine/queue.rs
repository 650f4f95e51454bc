//! Submission and the queue: admission of an envelope, the bounded FIFO queue, watch,
//! cancel, and `pick`, which chooses the next job (windows decide when a queued job may start).

use super::*;

impl Engine {
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
            self.clock.now(),
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
        let record = self.queued(&job, env);
        if let Err(e) = self.journal.write(&record) {
            drop(inner);
            let why = Rejection::Precondition(format!("cannot record the job durably: {e}"));
            return Err(self.refuse(why, &env.key_id, None));
        }
        tracing::info!(job = %job.id, key = %job.key_id, summary = %record.summary, "Accepted job");
        self.count_state(State::Queued);
        let mut entry = Entry::new(record.clone(), Some(job.clone()));
        entry.reported_state = self
            .sink
            .get()
            .is_some_and(|sink| sink.job(&record))
            .then_some(State::Queued);
        inner.jobs.insert(job.id.clone(), entry);
        inner.queue.push_back(job.id);
        drop(inner);
        self.wake.notify_one();
        Ok(record)
    }

    /// The journal record of a job just admitted.
    fn queued(&self, job: &ValidJob, env: &pb::SignedJob) -> Record {
        let mut record = Record {
            job_id: job.id.clone(),
            key_id: job.key_id.clone(),
            payload_hex: patch_agent_wire::ids::to_hex(&env.payload),
            state: State::Queued,
            reason: String::new(),
            summary: job.summary(),
            dry_run: job.dry_run,
            submitted_ms: self.now_ms(),
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
        record
    }

    pub(super) fn refuse(&self, why: Rejection, key_id: &str, record: Option<Record>) -> Refused {
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
    pub fn cancel(&self, id: &str) -> Result<Record, CancelError> {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.jobs.get_mut(id) else {
            return Err(CancelError::Unknown(id.to_string()));
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
            state if state.is_terminal() => Err(CancelError::Ended {
                id: id.to_string(),
                state,
            }),
            state => Err(CancelError::PastApplying {
                id: id.to_string(),
                state,
            }),
        }
    }

    /// The first queued job that may start now, and when to look again if none may.
    pub(super) fn pick(&self, now: SystemTime) -> (Option<Work>, Option<SystemTime>) {
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
}

/// Why a job cannot be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job {0}")]
    Unknown(String),
    #[error("job {id} has already ended ({state:?})")]
    Ended { id: String, state: State },
    #[error("job {id} is {state:?}: its packages are applied, so it can no longer be cancelled")]
    PastApplying { id: String, state: State },
    #[error(transparent)]
    Refused(#[from] NotAllowed),
}
