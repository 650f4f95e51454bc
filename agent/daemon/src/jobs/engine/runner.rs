//! The runner: one job at a time, one function per phase (refresh and scan, plan, pre-hooks,
//! apply, compare with the plan, after apply), and the final transition.

use super::*;
use crate::pkg::PackageManager;

impl Engine {
    /// Runs queued jobs one at a time, forever. A job whose maintenance window has not opened
    /// waits (WAITING_WINDOW) without holding up the jobs behind it; one whose window can no
    /// longer fit it ends MISSED_WINDOW.
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = self.clock.now();
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

    pub(super) async fn run_job(&self, id: &str, job: &ValidJob, cancel: &AtomicBool) {
        if job.expires_at <= self.clock.now() {
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
    pub(super) fn finish(
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
    pub(super) async fn forward_lines(
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

    /// The scanner a job works through; a host without a package manager fails the job.
    fn scanner(&self) -> Result<Arc<Scanner>, Stop> {
        self.scanner
            .clone()
            .ok_or_else(|| Stop::Failed("no supported package manager on this host".into()))
    }

    /// Does the work, phase by phase; Ok(reboot required).
    pub(super) async fn execute(
        &self,
        id: &str,
        job: &ValidJob,
        cancel: &AtomicBool,
        deadline: Deadline,
    ) -> Result<bool, Stop> {
        let scanner = self.scanner()?;
        let backend = scanner.backend();
        let snap = self.refresh(id, job, &scanner, deadline).await?;
        let ops: Vec<Op> = match &job.action {
            Action::Reboot => return Err(self.reboot(id, "the job is a reboot").await),
            Action::Scan => {
                self.note_scan(id, &snap);
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
                    self.clock.now(),
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
        let before = plan::versions(&snap);
        let planned = self.plan(id, &ops, &before, &snap);
        let opts = crate::pkg::ApplyOptions {
            accept_licenses: job.accept_licenses,
            allow_repo_errors: job.allow_repo_errors,
        };
        if job.dry_run {
            self.dry_run(id, job, backend.as_ref(), &ops, opts, planned)
                .await?;
            return Ok(snap.reboot.required);
        }
        if ops.is_empty() {
            if !job.pre_hooks.is_empty() {
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
        if !job.pre_hooks.is_empty() {
            self.run_hooks(id, "pre", &job.pre_hooks, &names, deadline)
                .await?;
            self.step(id, Event::HooksDone, "APPLYING: pre-hooks succeeded".into())
                .map_err(Stop::Failed)?;
        }
        let stopped = self
            .apply(id, backend.as_ref(), &ops, opts, cancel, deadline)
            .await?;
        self.judge(id, backend.as_ref(), &planned, &before, stopped)
            .await?;
        self.after_apply(id, job, &names, deadline).await
    }

    /// Refreshes metadata and scans. Unreadable repositories fail the job (nothing changed)
    /// unless it allows them; a reboot needs no metadata.
    async fn refresh(
        &self,
        id: &str,
        job: &ValidJob,
        scanner: &Scanner,
        deadline: Deadline,
    ) -> Result<Arc<crate::pkg::scanner::Snapshot>, Stop> {
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
        if repo_errors.is_empty() {
            return Ok(snap);
        }
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
            let what = if list.len() == 1 {
                "repository"
            } else {
                "repositories"
            };
            return Err(Stop::Failed(format!(
                "the metadata refresh could not read {} {what}: {}. Nothing was changed; fix the {what}, or sign the job with --allow-repo-errors to go on with what could be read",
                list.len(),
                list.join("; "),
            )));
        }
        for e in &list {
            self.note(
                id,
                format!("repository could not be read (allow_repo_errors: going on with what could be read): {e}"),
            );
        }
        Ok(snap)
    }

    /// A scan job's one history line.
    fn note_scan(&self, id: &str, snap: &crate::pkg::scanner::Snapshot) {
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
    }

    /// What the job sets out to do, computed once: the history line, the journaled plan (what
    /// a restarted agent checks against) and the dry-run results all come from it.
    fn plan(
        &self,
        id: &str,
        ops: &[Op],
        before: &HashMap<&str, String>,
        snap: &crate::pkg::scanner::Snapshot,
    ) -> Vec<PackageOutcome> {
        let planned = plan::planned(ops, before, snap);
        self.note(id, format!("plan: {}", plan::describe(&planned)));
        self.update(id, |r| r.plan = planned.clone());
        planned
    }

    /// A dry run ends with the plan as its result; hooks are not run. Where the package
    /// manager can check an operation without doing it (zypper --dry-run), each one is checked,
    /// and one it would refuse fails the job, named, as applying it would.
    async fn dry_run(
        &self,
        id: &str,
        job: &ValidJob,
        backend: &dyn PackageManager,
        ops: &[Op],
        opts: crate::pkg::ApplyOptions,
        planned: Vec<PackageOutcome>,
    ) -> Result<(), Stop> {
        if !(job.pre_hooks.is_empty() && job.post_hooks.is_empty()) {
            self.note(id, "dry run: hooks are not run".into());
        }
        let mut checked = 0;
        let mut refused: Vec<(String, String)> = Vec::new();
        for op in ops {
            match backend.simulate(op, opts).await {
                Ok(true) => checked += 1,
                Ok(false) => {}
                Err(e) => refused.push((op.name().to_string(), e.to_string())),
            }
        }
        let outcomes = planned
            .into_iter()
            .map(|p| PackageOutcome {
                outcome: if refused.iter().any(|(n, _)| *n == p.name) {
                    Outcome::Planned
                } else {
                    Outcome::WouldChange
                },
                ..p
            })
            .collect();
        self.set_packages(id, outcomes);
        if checked > 0 {
            self.note(
                id,
                format!(
                    "dry run: {} --dry-run accepted {checked} of {} operation(s)",
                    backend.name(),
                    ops.len()
                ),
            );
        }
        self.note(id, "dry run: nothing was changed".into());
        if refused.is_empty() {
            return Ok(());
        }
        Err(Stop::Failed(format!(
            "dry run: {} would refuse {}",
            backend.name(),
            refused
                .iter()
                .map(|(_, why)| why.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }

    /// Applies the operations one by one, stopping between packages on cancel or when
    /// max_duration runs out. Returns why it stopped early, if it did.
    async fn apply(
        &self,
        id: &str,
        backend: &dyn PackageManager,
        ops: &[Op],
        opts: crate::pkg::ApplyOptions,
        cancel: &AtomicBool,
        deadline: Deadline,
    ) -> Result<Option<Stop>, Stop> {
        match backend.repair().await {
            Ok(Some(what)) => self.note(id, what),
            Ok(None) => {}
            Err(e) => return Err(Stop::Failed(format!("package database repair failed: {e}"))),
        }
        free_space(&self.cfg()).map_err(Stop::Failed)?;
        for op in ops {
            if cancel.load(Ordering::SeqCst) {
                return Ok(Some(Stop::Cancelled));
            }
            if deadline.passed() {
                return Ok(Some(
                    deadline.timed_out(&format!("before applying {}", op.name())),
                ));
            }
            self.note(id, format!("applying {}", op.name()));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            // Never cut short by max_duration: a package manager is not killed mid-transaction.
            let (result, ()) =
                tokio::join!(backend.apply(op, opts, tx), self.forward_lines(id, rx, 500));
            if let Err(e) = result {
                return Ok(Some(Stop::Failed(format!("{} failed: {e}", op.name()))));
            }
            if deadline.passed() {
                return Ok(Some(deadline.timed_out(&format!(
                    "while {} was being applied; the package manager was left to finish",
                    op.name()
                ))));
            }
        }
        Ok(None)
    }

    /// Reads what is installed now, whatever happened, records each package's outcome against
    /// the plan, and fails the job if it stopped early or the host does not match the plan.
    async fn judge(
        &self,
        id: &str,
        backend: &dyn PackageManager,
        planned: &[PackageOutcome],
        before: &HashMap<&str, String>,
        stopped: Option<Stop>,
    ) -> Result<(), Stop> {
        let after = match installed_versions(backend).await {
            Ok(after) => after,
            Err(e) => {
                let why = format!(
                    "cannot read the inventory after applying, so what changed is unknown: {e}"
                );
                return Err(stopped.unwrap_or(Stop::Failed(why)));
            }
        };
        let check = compare_with_plan(planned, before, &after);
        self.set_packages(id, check.outcomes);
        if let Some(stop) = stopped {
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
        Ok(())
    }

    /// After the packages: the reboot policy, post-patch checks, post-hooks. Ok(reboot needed).
    pub(super) async fn after_apply(
        &self,
        id: &str,
        job: &ValidJob,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<bool, Stop> {
        let scanner = self.scanner()?;
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
}

/// The last transition of a job's work: timed out, stopped, or done (with the host needing a
/// reboot or not), with the history line for each.
pub(super) fn conclude(
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
pub(super) async fn installed_versions(
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
