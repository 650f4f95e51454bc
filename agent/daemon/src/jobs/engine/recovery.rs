//! Recovery: opening the journal at start, deciding what each unfinished job becomes, and
//! finishing jobs that were applying or rebooting when the agent stopped.

use super::*;

impl Engine {
    /// Opens the journal and recovers: APPLYING jobs become INTERRUPTED (after repairing the
    /// package database), QUEUED ones are queued again unless they expired meanwhile.
    pub async fn open(
        boot_id_path: &std::path::Path,
        state_dir: &std::path::Path,
        trust: TrustStore,
        policy: AdmissionPolicy,
        cfg: JobsSection,
        scanner: Option<Arc<Scanner>>,
        clock: Arc<dyn Clock>,
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
            entered: Mutex::new(BTreeMap::new()),
            log_limiter: Mutex::new((std::time::Instant::now(), 0, 0)),
            admission: tokio::sync::Semaphore::new(1),
            sink: std::sync::OnceLock::new(),
            clock,
        });
        let mut interrupted = false;
        for mut r in records.into_iter().filter(|r| !removed.contains(&r.job_id)) {
            let was = r.state;
            let next = engine.decide(&mut r);
            interrupted |= was == State::Applying && r.state != State::Applying;
            if r.state != was {
                engine.count_state(r.state);
            }
            if r.state != was
                && let Err(e) = engine.journal.write(&r)
            {
                tracing::error!(job = %r.job_id, error = %e, "Cannot update the journal during recovery");
            }
            engine.restore(r, next);
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

    /// What a journaled job becomes when the agent starts: its record is moved to where it
    /// ends (through the one transition function), and the work left is returned.
    fn decide(&self, r: &mut Record) -> Found {
        // A job that may go on is verified once more against the current trust store (its
        // key may have been removed while the agent was down) and validated again.
        let checked = matches!(
            r.state,
            State::Rebooting | State::Applying | State::Queued | State::WaitingWindow
        )
        .then(|| self.requeue(r));
        let now_ms = self.now_ms();
        let expired = r.expires_ms <= now_ms;
        match (r.state, checked) {
            (_, Some(Err(Recheck::Untrusted(why)))) => {
                recovered(r, &Event::Untrusted(why), now_ms);
                r.event(format!(
                    "FAILED: {} (found after an agent restart)",
                    r.reason
                ));
            }
            (State::Rebooting, Some(Ok(j))) => return Found::Resume(j),
            (State::Rebooting, Some(Err(why))) => {
                let why = format!("cannot be resumed after the reboot: {why}");
                recovered(r, &Event::Fail(why), now_ms);
                r.event(format!("FAILED: {}", r.reason));
            }
            (State::Applying, Some(Ok(j))) if !r.plan.is_empty() => return Found::Recover(j),
            (State::Applying, Some(Err(why))) if !r.plan.is_empty() => {
                recovered(r, &Event::Recovered, now_ms);
                r.reason = format!("the agent stopped while applying; cannot resume: {why}");
                r.event(format!("INTERRUPTED: {}", r.reason));
            }
            (State::Applying, _) => {
                recovered(r, &Event::Recovered, now_ms);
                r.reason = "the agent stopped while the job was applying".into();
                r.event("INTERRUPTED: found applying after an agent restart");
            }
            (state @ (State::PreHook | State::PostHook | State::Verifying), _) => {
                // A hook or a check was running: whether it finished is unknown, and
                // neither is safe to run twice.
                recovered(r, &Event::Recovered, now_ms);
                r.reason = format!(
                    "the agent stopped while the job was in {}",
                    patch_agent_wire::convert::state_name(state.to_proto() as i32)
                );
                r.event(format!("INTERRUPTED: {}", r.reason));
            }
            (State::Queued | State::WaitingWindow, _) if expired => {
                recovered(r, &Event::Expired, now_ms);
                r.reason = "expired before it could run".into();
                r.event("FAILED: expired while queued across a restart");
            }
            (State::Queued | State::WaitingWindow, Some(Ok(j))) => return Found::Queue(j),
            (State::Queued | State::WaitingWindow, Some(Err(why))) => {
                recovered(r, &Event::Fail(format!("cannot be resumed: {why}")), now_ms);
                r.event(format!("FAILED: {}", r.reason));
            }
            _ => {}
        }
        Found::Ended
    }

    /// Puts a recovered record back in the engine, with its work queued where it belongs.
    fn restore(&self, record: Record, found: Found) {
        let id = record.job_id.clone();
        let job = match &found {
            Found::Ended => None,
            Found::Queue(j) | Found::Resume(j) | Found::Recover(j) => Some(j.clone()),
        };
        let mut inner = lock(&self.inner);
        inner.jobs.insert(id.clone(), Entry::new(record, job));
        match found {
            Found::Queue(_) => inner.queue.push_back(id),
            Found::Resume(_) => inner.resume.push_back(id),
            Found::Recover(_) => inner.recover.push_back(id),
            Found::Ended => {}
        }
    }

    /// Verifies a journaled envelope again with the current trust store; returns the payload.
    /// The error says the key is no longer trusted (or why the check cannot be made).
    pub(super) fn verify_again(
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
    pub(super) fn requeue(&self, r: &Record) -> Result<ValidJob, Recheck> {
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
            self.clock.now(),
        )
        .map_err(|e| Recheck::Invalid(e.to_string()))
    }

    /// Completes a job found APPLYING at start. Its package manager ran in its own process group
    /// and may still be running: wait for its lock, repair an interrupted dpkg, then read what
    /// happened from a fresh inventory. Every planned package at its target: the job continues
    /// (reboot policy, checks, post-hooks) and can succeed; otherwise it is INTERRUPTED.
    pub(super) async fn recover_job(&self, id: &str, job: &ValidJob) {
        let Some(scanner) = self.scanner.clone() else {
            return;
        };
        let backend = scanner.backend();
        self.note(
            id,
            "the agent restarted while this job was applying; waiting for the package manager"
                .into(),
        );
        if let Err(e) = crate::pkg::lock::wait_free(&backend.locks(), job.max_duration).await {
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
    pub(super) async fn reboot(&self, id: &str, why: &str) -> Stop {
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
            entry.record.reboot_ms = Some(self.now_ms());
            let msg = format!(
                "REBOOTING: {why}; boot id {boot_id}; running `{}`",
                cmd.display()
            );
            if let Err(e) = self.transition(entry, &Event::Reboot, &msg) {
                return Stop::Failed(e.to_string());
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
    pub(super) async fn resume_job(&self, id: &str, job: &ValidJob) {
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
            let elapsed = self.now_ms().saturating_sub(at);
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
}

/// A transition found at start-up (recovery). The state machine allows every one of them;
/// one it refused would leave the record as it was, logged.
pub(super) fn recovered(r: &mut Record, event: &Event, now_ms: u64) {
    if let Err(e) = r.apply(event, now_ms) {
        tracing::error!(job = %r.job_id, error = %e, "Recovery transition refused");
    }
}

/// Why a journaled job cannot go on after a restart.
#[derive(Debug)]
pub(super) enum Recheck {
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

pub(super) fn read_boot_id(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(unreadable: {e})"))
}

/// What a job found in the journal at start still needs.
pub(super) enum Found {
    /// Nothing: it has ended (now, or before the restart).
    Ended,
    /// It waits in the queue (QUEUED or WAITING_WINDOW).
    Queue(ValidJob),
    /// It rebooted the host: confirm the reboot and finish.
    Resume(ValidJob),
    /// It was applying with a plan: judge what the package manager did.
    Recover(ValidJob),
}
