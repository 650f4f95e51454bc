//! The engine's state machine in process: a fake package manager and a clock that moves with
//! tokio's paused time, so windows, expiry, max_duration and restarts are exercised in
//! milliseconds. Each case checks the journal record (what a restarted agent and `GetJob` read)
//! and the fake's own state (what the "host" has), never only the engine's answer.

use super::*;
use crate::jobs::clock::Clock;
use crate::pkg::scanner::{Scanner, Schedule};
use crate::pkg::{
    HeldUpdate, Package, PackageManager, PkgError, RebootState, RepoError, SlaClass, UpdateScan,
};
use patch_agent_wire::job::trust::{self, SigningKey};
use prost::Message;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What the fake "host" has, and how its package manager behaves.
#[derive(Default)]
struct Host {
    installed: BTreeMap<String, String>,
    candidates: BTreeMap<String, String>,
    repo_errors: Vec<RepoError>,
    /// Packages whose apply fails.
    failing: Vec<String>,
    /// Applying this package removes that one (a conflict the plan did not foresee).
    removes: Option<(String, String)>,
    /// How long each apply takes (virtual time).
    apply_time: Duration,
    /// Applies that never return (the agent "dies" mid-transaction).
    hang: bool,
    applied: Vec<String>,
}

#[derive(Default)]
struct FakeManager(std::sync::Mutex<Host>);

impl FakeManager {
    fn host(&self) -> std::sync::MutexGuard<'_, Host> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl PackageManager for FakeManager {
    fn name(&self) -> &'static str {
        "apt"
    }
    async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError> {
        let installed = self.host().installed.clone();
        for (name, version) in installed {
            f(Package {
                source: name.clone(),
                name,
                epoch: 0,
                version,
                release: String::new(),
                arch: "amd64".into(),
                state: "installed",
                held: false,
            });
        }
        Ok(())
    }
    async fn refresh(&self) -> Result<Vec<RepoError>, PkgError> {
        Ok(self.host().repo_errors.clone())
    }
    async fn updates(&self) -> Result<UpdateScan, PkgError> {
        let h = self.host();
        let updates = h
            .candidates
            .iter()
            .filter(|(n, v)| h.installed.get(*n) != Some(v))
            .map(|(n, v)| Update {
                name: n.clone(),
                arch: "amd64".into(),
                installed_version: h.installed.get(n).cloned().unwrap_or_default(),
                candidate_version: v.clone(),
                origin: "Debian-Security".into(),
                classification: Classification::Security,
                severity: Severity::Important,
                advisories: vec![],
                cves: vec![],
                issued: None,
                first_seen: None,
                sla: SlaClass::High,
                category: "security".into(),
                bug_ids: vec![],
                flags: Default::default(),
            })
            .collect();
        Ok(UpdateScan {
            updates,
            held: Vec::<HeldUpdate>::new(),
            repo_errors: h.repo_errors.clone(),
        })
    }
    async fn reboot_required(&self, _: SystemTime) -> RebootState {
        RebootState::default()
    }
    fn locks(&self) -> Vec<crate::pkg::lock::Lock> {
        vec![]
    }
    async fn apply(
        &self,
        op: &Op,
        _opts: crate::pkg::ApplyOptions,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError> {
        let (time, hang) = {
            let h = self.host();
            (h.apply_time, h.hang)
        };
        let _ = lines.send(format!("Setting up {}", op.name()));
        if hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(time).await;
        let mut h = self.host();
        h.applied.push(op.name().to_string());
        if h.failing.iter().any(|f| f == op.name()) {
            return Err(PkgError::Parse(format!(
                "{}: post-installation script failed",
                op.name()
            )));
        }
        let to = match op {
            Op::Install {
                version: Some(v), ..
            } => v.clone(),
            _ => h.candidates.get(op.name()).cloned().unwrap_or_default(),
        };
        h.installed.insert(op.name().to_string(), to);
        if let Some((by, gone)) = h.removes.clone()
            && by == op.name()
        {
            h.installed.remove(&gone);
        }
        Ok(())
    }
}

/// Wall time that moves with tokio's (paused) clock.
struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

const HOST: &str = "test-host";

struct Harness {
    dir: tempfile::TempDir,
    key: SigningKey,
    pm: Arc<FakeManager>,
    clock: Arc<TokioClock>,
    cfg: JobsSection,
}

impl Harness {
    fn new(host: Host) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (private, public, _) = trust::generate().expect("key");
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys).expect("keys");
        std::fs::write(keys.join("op.pem"), public).expect("public key");
        std::fs::write(dir.path().join("op.key"), private).expect("private key");
        let key = SigningKey::read(&dir.path().join("op.key")).expect("signing key");
        std::fs::write(dir.path().join("boot_id"), "boot-1\n").expect("boot id");
        let cfg = JobsSection {
            trusted_keys_dir: keys,
            min_free_mib: 0,
            free_space_paths: vec![dir.path().to_path_buf()],
            queue_size: 3,
            reboot_grace: Duration::from_secs(60),
            ..JobsSection::default()
        };
        Self {
            dir,
            key,
            pm: Arc::new(FakeManager(std::sync::Mutex::new(host))),
            clock: Arc::new(TokioClock {
                base: epoch(),
                start: tokio::time::Instant::now(),
            }),
            cfg,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// An engine on the state directory, as a fresh agent process opens it (recovery runs).
    async fn open(&self) -> Arc<Engine> {
        let state = self.state_dir();
        std::fs::create_dir_all(&state).expect("state dir");
        let scanner = Arc::new(Scanner::new(
            self.pm.clone(),
            Schedule {
                scan_interval: Duration::from_secs(3600),
                refresh_interval: Duration::ZERO,
                scan_on_start: false,
            },
            epoch(),
            &state,
        ));
        let policy = AdmissionPolicy {
            host_id: HOST.into(),
            machine_id: "machine".into(),
            labels: Default::default(),
            max_lifetime: self.cfg.max_job_lifetime,
            clock_skew: self.cfg.clock_skew,
            max_duration: self.cfg.max_job_duration,
            hooks: None,
        };
        let trust = TrustStore::load(&self.cfg.trusted_keys_dir).expect("trust store");
        Engine::open(
            &self.dir.path().join("boot_id"),
            &state,
            trust,
            policy,
            self.cfg.clone(),
            Some(scanner),
            self.clock.clone(),
        )
        .await
        .expect("engine")
    }

    /// An engine that runs its queue, as `patch-agent run` does.
    async fn start(&self) -> (Arc<Engine>, tokio::task::JoinHandle<()>) {
        let engine = self.open().await;
        let task = tokio::spawn(engine.clone().run());
        (engine, task)
    }

    fn job(&self, id: &str, action: pb::job::Action) -> pb::Job {
        pb::Job {
            job_id: id.into(),
            targets: vec![HOST.into()],
            expires_at: Some((self.clock.now() + Duration::from_secs(3600)).into()),
            action: Some(action),
            ..Default::default()
        }
    }

    fn sign(&self, job: &pb::Job) -> pb::SignedJob {
        let payload = job.encode_to_vec();
        pb::SignedJob {
            signature: self.key.sign(&payload),
            key_id: self.key.key_id(),
            payload,
        }
    }

    fn submit(&self, engine: &Engine, job: &pb::Job) -> Record {
        engine
            .submit(&self.sign(job))
            .unwrap_or_else(|r| panic!("refused: {:?}", r.0))
    }

    /// The journal as a new process would read it.
    fn journaled(&self, id: &str) -> Record {
        let (records, _) = Journal::open(&self.state_dir()).expect("journal").load();
        records
            .into_iter()
            .find(|r| r.job_id == id)
            .unwrap_or_else(|| panic!("{id} is not in the journal"))
    }

    /// Rewrites a journaled record, as if the agent had stopped with it so.
    fn rewrite(&self, id: &str, change: impl FnOnce(&mut Record)) {
        let journal = Journal::open(&self.state_dir()).expect("journal");
        let mut r = self.journaled(id);
        change(&mut r);
        journal.write(&r).expect("write");
    }

    fn installed(&self, name: &str) -> Option<String> {
        self.pm.host().installed.get(name).cloned()
    }
}

/// 2027-01-15T07:00:00Z: where the fake wall clock starts.
fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_996_400)
}

fn host(installed: &[(&str, &str)], candidates: &[(&str, &str)]) -> Host {
    let map = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    Host {
        installed: map(installed),
        candidates: map(candidates),
        ..Host::default()
    }
}

fn upgrade() -> pb::job::Action {
    pb::job::Action::Upgrade(pb::UpgradeAction {
        scope: pb::UpgradeScope::All as i32,
        ..Default::default()
    })
}

fn scan() -> pb::job::Action {
    pb::job::Action::Scan(pb::ScanAction {})
}

fn install(specs: &[(&str, &str)]) -> pb::job::Action {
    pb::job::Action::Install(pb::InstallAction {
        packages: specs
            .iter()
            .map(|(n, v)| pb::PackageSpec {
                name: n.to_string(),
                version: v.to_string(),
            })
            .collect(),
    })
}

/// Waits (up to 7 hours of virtual time) until the job reaches `want`, or panics with its
/// record.
async fn wait_for(engine: &Engine, id: &str, want: impl Fn(State) -> bool) -> Record {
    for _ in 0..100_000 {
        if let Some(r) = engine.get(id)
            && want(r.state)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{id} never reached the state wanted: {:#?}", engine.get(id));
}

async fn wait_end(engine: &Engine, id: &str) -> Record {
    wait_for(engine, id, State::is_terminal).await
}

fn outcome(r: &Record, name: &str) -> Option<Outcome> {
    r.packages
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.outcome)
}

fn history(r: &Record) -> String {
    r.events
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(start_paused = true)]
async fn a_scan_succeeds_and_changes_nothing() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("scan-1", scan()));
    let r = wait_end(&engine, "scan-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert!(history(&r).contains("1 updates pending"), "{}", history(&r));
    assert_eq!(h.installed("alpha").as_deref(), Some("1.0"));
    let j = h.journaled("scan-1");
    assert_eq!(j.state, State::Succeeded);
    assert!(j.started_ms.is_some() && j.finished_ms >= j.started_ms);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_applies_the_plan_and_checks_it() {
    let h = Harness::new(host(
        &[("alpha", "1.0"), ("beta", "2.0")],
        &[("alpha", "1.1"), ("beta", "2.1")],
    ));
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("up-1", upgrade()));
    let r = wait_end(&engine, "up-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::Changed));
    assert_eq!(outcome(&r, "beta"), Some(Outcome::Changed));
    assert_eq!(h.installed("alpha").as_deref(), Some("1.1"));
    assert_eq!(h.installed("beta").as_deref(), Some("2.1"));
    assert_eq!(h.journaled("up-1").plan.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_exact_install_lands_at_that_version() {
    let h = Harness::new(host(&[], &[("gamma", "3.0")]));
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("inst-1", install(&[("gamma", "2.5")])));
    let r = wait_end(&engine, "inst-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert_eq!(outcome(&r, "gamma"), Some(Outcome::Installed));
    assert_eq!(h.installed("gamma").as_deref(), Some("2.5"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_package_fails_the_job_naming_it_and_nothing_after_it_runs() {
    let mut hst = host(
        &[("alpha", "1.0"), ("beta", "2.0")],
        &[("alpha", "1.1"), ("beta", "2.1")],
    );
    hst.failing = vec!["alpha".into()];
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("fail-1", upgrade()));
    let r = wait_end(&engine, "fail-1").await;
    assert_eq!(r.state, State::Failed);
    assert!(r.reason.contains("alpha failed"), "{}", r.reason);
    assert_eq!(h.pm.host().applied, ["alpha"]);
    assert_eq!(h.installed("beta").as_deref(), Some("2.0"));
    assert_eq!(outcome(&r, "beta"), Some(Outcome::Unchanged));
}

#[tokio::test(start_paused = true)]
async fn an_unplanned_removal_fails_a_job_that_the_package_manager_called_a_success() {
    let mut hst = host(&[("alpha", "1.0"), ("keep", "1")], &[("alpha", "1.1")]);
    hst.removes = Some(("alpha".into(), "keep".into()));
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("rm-1", upgrade()));
    let r = wait_end(&engine, "rm-1").await;
    assert_eq!(r.state, State::Failed);
    assert!(r.reason.contains("keep 1: removed"), "{}", r.reason);
    assert_eq!(outcome(&r, "keep"), Some(Outcome::RemovedUnplanned));
    assert_eq!(h.installed("keep"), None);
}

#[tokio::test(start_paused = true)]
async fn unreadable_repositories_fail_the_job_unless_it_allows_them() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.repo_errors = vec![RepoError {
        repo: "file:/gone".into(),
        error: "not found".into(),
    }];
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("repo-1", upgrade()));
    let r = wait_end(&engine, "repo-1").await;
    assert_eq!(r.state, State::Failed);
    assert!(r.reason.contains("file:/gone"), "{}", r.reason);
    assert_eq!(h.installed("alpha").as_deref(), Some("1.0"));
    let mut allowed = h.job("repo-2", upgrade());
    allowed.allow_repo_errors = true;
    h.submit(&engine, &allowed);
    let r = wait_end(&engine, "repo-2").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert_eq!(r.repo_errors.len(), 1);
    assert_eq!(h.installed("alpha").as_deref(), Some("1.1"));
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_plans_and_changes_nothing() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let (engine, _run) = h.start().await;
    let mut job = h.job("dry-1", upgrade());
    job.dry_run = true;
    h.submit(&engine, &job);
    let r = wait_end(&engine, "dry-1").await;
    assert_eq!(r.state, State::Succeeded);
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::WouldChange));
    assert!(h.pm.host().applied.is_empty());
    assert_eq!(h.installed("alpha").as_deref(), Some("1.0"));
}

#[tokio::test(start_paused = true)]
async fn cancel_while_queued_ends_it_before_it_starts() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.apply_time = Duration::from_secs(30);
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("first", upgrade()));
    h.submit(&engine, &h.job("second", scan()));
    wait_for(&engine, "first", |s| s == State::Applying).await;
    let r = engine.cancel("second").expect("cancel");
    assert_eq!(r.state, State::Cancelled);
    assert_eq!(r.reason, "cancelled by a controller");
    assert_eq!(h.journaled("second").state, State::Cancelled);
    assert!(h.journaled("second").finished_ms.is_some());
    assert_eq!(wait_end(&engine, "first").await.state, State::Succeeded);
    assert!(
        h.journaled("second").started_ms.is_none(),
        "it never started"
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_while_applying_stops_before_the_next_package() {
    let mut hst = host(
        &[("alpha", "1.0"), ("beta", "2.0")],
        &[("alpha", "1.1"), ("beta", "2.1")],
    );
    hst.apply_time = Duration::from_secs(30);
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("c-1", upgrade()));
    wait_for(&engine, "c-1", |s| s == State::Applying).await;
    let r = engine.cancel("c-1").expect("cancel");
    assert_eq!(r.state, State::Applying, "the package in progress finishes");
    let r = wait_end(&engine, "c-1").await;
    assert_eq!(r.state, State::Cancelled, "{}", history(&r));
    assert_eq!(h.pm.host().applied, ["alpha"]);
    assert_eq!(h.installed("beta").as_deref(), Some("2.0"));
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::Changed));
}

#[tokio::test(start_paused = true)]
async fn cancel_after_the_end_or_of_an_unknown_job_is_refused() {
    let h = Harness::new(host(&[], &[]));
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("done-1", scan()));
    wait_end(&engine, "done-1").await;
    let e = engine.cancel("done-1").expect_err("ended");
    assert!(
        matches!(
            e,
            CancelError::Ended {
                state: State::Succeeded,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("already ended"), "{e}");
    let e = engine.cancel("nope").expect_err("unknown");
    assert!(matches!(e, CancelError::Unknown(_)), "{e}");
    assert_eq!(h.journaled("done-1").state, State::Succeeded);
}

fn window(job: &mut pb::Job, start: SystemTime, end: SystemTime) {
    job.window = Some(pb::MaintenanceWindow {
        start: Some(start.into()),
        end: Some(end.into()),
        allow_partial: false,
    });
}

#[tokio::test(start_paused = true)]
async fn a_job_waits_for_its_window_then_runs_without_holding_up_others() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let (engine, _run) = h.start().await;
    let now = h.clock.now();
    let mut job = h.job("win-1", upgrade());
    job.max_duration = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    window(
        &mut job,
        now + Duration::from_secs(1800),
        now + Duration::from_secs(3500),
    );
    h.submit(&engine, &job);
    let r = wait_for(&engine, "win-1", |s| s == State::WaitingWindow).await;
    assert!(history(&r).contains("WAITING_WINDOW"));
    // A job behind it runs meanwhile.
    h.submit(&engine, &h.job("scan-behind", scan()));
    assert_eq!(
        wait_end(&engine, "scan-behind").await.state,
        State::Succeeded
    );
    assert_eq!(
        engine.get("win-1").map(|r| r.state),
        Some(State::WaitingWindow)
    );
    let r = wait_end(&engine, "win-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    let started = r.started_ms.expect("started");
    assert!(
        started >= journal::ms(now + Duration::from_secs(1800)),
        "started inside the window"
    );
    assert_eq!(h.installed("alpha").as_deref(), Some("1.1"));
}

#[tokio::test(start_paused = true)]
async fn a_window_too_short_for_the_job_is_missed() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let (engine, _run) = h.start().await;
    let now = h.clock.now();
    let mut job = h.job("miss-1", upgrade());
    job.max_duration = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    window(
        &mut job,
        now - Duration::from_secs(600),
        now + Duration::from_secs(600),
    );
    h.submit(&engine, &job);
    let r = wait_end(&engine, "miss-1").await;
    assert_eq!(r.state, State::MissedWindow, "{}", history(&r));
    assert!(h.pm.host().applied.is_empty());
    assert_eq!(h.journaled("miss-1").state, State::MissedWindow);
}

#[tokio::test(start_paused = true)]
async fn max_duration_stops_the_job_between_packages() {
    let mut hst = host(
        &[("alpha", "1.0"), ("beta", "2.0")],
        &[("alpha", "1.1"), ("beta", "2.1")],
    );
    hst.apply_time = Duration::from_secs(90);
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    let mut job = h.job("slow-1", upgrade());
    job.max_duration = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    h.submit(&engine, &job);
    let r = wait_end(&engine, "slow-1").await;
    assert_eq!(r.state, State::TimedOut, "{}", history(&r));
    assert!(r.reason.contains("alpha was being applied"), "{}", r.reason);
    assert_eq!(h.pm.host().applied, ["alpha"], "beta never started");
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::Changed));
}

#[tokio::test(start_paused = true)]
async fn a_job_that_expires_in_the_queue_fails_without_running() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.apply_time = Duration::from_secs(120);
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    h.submit(&engine, &h.job("long", upgrade()));
    let mut short = h.job("short", scan());
    short.expires_at = Some((h.clock.now() + Duration::from_secs(60)).into());
    h.submit(&engine, &short);
    let r = wait_end(&engine, "short").await;
    assert_eq!(r.state, State::Failed);
    assert!(
        history(&r).contains("expired before it could start"),
        "{}",
        history(&r)
    );
    assert!(r.started_ms.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_replay_and_a_full_queue_are_refused_and_recorded_nowhere() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.apply_time = Duration::from_secs(600);
    let h = Harness::new(hst);
    let (engine, _run) = h.start().await;
    let first = h.job("q-0", upgrade());
    h.submit(&engine, &first);
    let replay = engine.submit(&h.sign(&first)).expect_err("replay");
    assert!(matches!(replay.0, Rejection::Replay(_)), "{:?}", replay.0);
    wait_for(&engine, "q-0", |s| s == State::Applying).await;
    for i in 1..=3 {
        h.submit(&engine, &h.job(&format!("q-{i}"), scan()));
    }
    let full = engine
        .submit(&h.sign(&h.job("q-4", scan())))
        .expect_err("full");
    assert!(matches!(full.0, Rejection::QueueFull(_)), "{:?}", full.0);
    assert!(engine.get("q-4").is_none());
    let (records, _) = Journal::open(&h.state_dir()).expect("journal").load();
    assert!(!records.iter().any(|r| r.job_id == "q-4"));
}

/// Leaves `id` journaled in `state` (as an agent that stopped then would), and closes.
async fn stopped_in(h: &Harness, id: &str, action: pb::job::Action, state: State) {
    let engine = h.open().await;
    h.submit(&engine, &h.job(id, action));
    drop(engine);
    h.rewrite(id, |r| {
        r.state = state;
        if state != State::Queued && state != State::WaitingWindow {
            r.started_ms = Some(r.submitted_ms);
        }
    });
}

#[tokio::test(start_paused = true)]
async fn recovery_runs_a_job_found_queued() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    stopped_in(&h, "rq-1", upgrade(), State::Queued).await;
    let (engine, _run) = h.start().await;
    let r = wait_end(&engine, "rq-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert_eq!(h.installed("alpha").as_deref(), Some("1.1"));
}

#[tokio::test(start_paused = true)]
async fn recovery_keeps_a_job_found_waiting_for_its_window() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let now = h.clock.now();
    let engine = h.open().await;
    let mut job = h.job("rw-1", upgrade());
    job.max_duration = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    window(
        &mut job,
        now + Duration::from_secs(900),
        now + Duration::from_secs(3000),
    );
    h.submit(&engine, &job);
    drop(engine);
    h.rewrite("rw-1", |r| r.state = State::WaitingWindow);
    let (engine, _run) = h.start().await;
    assert_eq!(
        engine.get("rw-1").map(|r| r.state),
        Some(State::WaitingWindow)
    );
    let r = wait_end(&engine, "rw-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert!(r.started_ms.expect("started") >= journal::ms(now + Duration::from_secs(900)));
}

#[tokio::test(start_paused = true)]
async fn recovery_fails_a_job_that_expired_while_the_agent_was_down() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    stopped_in(&h, "rx-1", upgrade(), State::Queued).await;
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let (engine, _run) = h.start().await;
    let r = engine.get("rx-1").expect("record");
    assert_eq!(r.state, State::Failed);
    assert!(r.reason.contains("expired"), "{}", r.reason);
    assert_eq!(h.journaled("rx-1").state, State::Failed);
    assert_eq!(h.installed("alpha").as_deref(), Some("1.0"));
}

#[tokio::test(start_paused = true)]
async fn recovery_fails_a_job_whose_key_was_removed() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    stopped_in(&h, "rk-1", upgrade(), State::Queued).await;
    std::fs::remove_file(h.cfg.trusted_keys_dir.join("op.pem")).expect("rm key");
    let (engine, _run) = h.start().await;
    let r = engine.get("rk-1").expect("record");
    assert_eq!(r.state, State::Failed);
    assert!(
        history(&r).contains("found after an agent restart"),
        "{}",
        history(&r)
    );
    assert!(h.pm.host().applied.is_empty());
}

#[tokio::test(start_paused = true)]
async fn recovery_completes_a_job_whose_plan_was_applied_before_the_crash() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.hang = true;
    let h = Harness::new(hst);
    let (engine, run) = h.start().await;
    h.submit(&engine, &h.job("ra-1", upgrade()));
    wait_for(&engine, "ra-1", |s| s == State::Applying).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.abort();
    drop(engine);
    assert_eq!(h.journaled("ra-1").state, State::Applying);
    assert_eq!(h.journaled("ra-1").plan.len(), 1);
    {
        // The package manager finished the transaction after the agent died.
        let mut host = h.pm.host();
        host.hang = false;
        host.installed.insert("alpha".into(), "1.1".into());
    }
    let (engine, _run) = h.start().await;
    let r = wait_end(&engine, "ra-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert!(history(&r).contains("completed after an agent restart"));
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::Changed));
}

#[tokio::test(start_paused = true)]
async fn recovery_interrupts_a_job_whose_plan_was_not_applied() {
    let mut hst = host(&[("alpha", "1.0")], &[("alpha", "1.1")]);
    hst.hang = true;
    let h = Harness::new(hst);
    let (engine, run) = h.start().await;
    h.submit(&engine, &h.job("ri-1", upgrade()));
    wait_for(&engine, "ri-1", |s| s == State::Applying).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.abort();
    drop(engine);
    h.pm.host().hang = false;
    let (engine, _run) = h.start().await;
    let r = wait_end(&engine, "ri-1").await;
    assert_eq!(r.state, State::Interrupted, "{}", history(&r));
    assert_eq!(outcome(&r, "alpha"), Some(Outcome::Unchanged));
    assert_eq!(h.installed("alpha").as_deref(), Some("1.0"));
}

#[tokio::test(start_paused = true)]
async fn recovery_interrupts_a_job_found_applying_with_no_plan_yet() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    stopped_in(&h, "rn-1", upgrade(), State::Applying).await;
    let (engine, _run) = h.start().await;
    let r = engine.get("rn-1").expect("record");
    assert_eq!(r.state, State::Interrupted);
    assert!(r.finished_ms.is_some());
    assert!(h.pm.host().applied.is_empty());
}

#[tokio::test(start_paused = true)]
async fn recovery_interrupts_a_job_found_in_a_hook_or_verifying() {
    for (i, state) in [State::PreHook, State::PostHook, State::Verifying]
        .into_iter()
        .enumerate()
    {
        let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
        let id = format!("rh-{i}");
        stopped_in(&h, &id, upgrade(), state).await;
        let (engine, _run) = h.start().await;
        let r = engine.get(&id).expect("record");
        assert_eq!(
            r.state,
            State::Interrupted,
            "found in {state:?}: {}",
            history(&r)
        );
        assert!(r.finished_ms.is_some());
        assert_eq!(h.journaled(&id).state, State::Interrupted);
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_after_a_reboot_verifies_and_succeeds() {
    let h = Harness::new(host(&[("alpha", "1.1")], &[("alpha", "1.1")]));
    stopped_in(&h, "rb-1", upgrade(), State::Rebooting).await;
    h.rewrite("rb-1", |r| {
        r.reboot_boot_id = Some("boot-1".into());
        r.reboot_ms = r.started_ms;
    });
    std::fs::write(h.dir.path().join("boot_id"), "boot-2\n").expect("new boot");
    let (engine, _run) = h.start().await;
    let r = wait_end(&engine, "rb-1").await;
    assert_eq!(r.state, State::Succeeded, "{}", history(&r));
    assert!(r.reboot_verified);
    assert!(history(&r).contains("boot-1 -> boot-2"), "{}", history(&r));
}

#[tokio::test(start_paused = true)]
async fn recovery_fails_a_reboot_that_did_not_happen() {
    let h = Harness::new(host(&[("alpha", "1.1")], &[]));
    stopped_in(&h, "rb-2", upgrade(), State::Rebooting).await;
    h.rewrite("rb-2", |r| {
        r.reboot_boot_id = Some("boot-1".into());
        r.reboot_ms = r.started_ms;
    });
    let (engine, _run) = h.start().await;
    let r = wait_end(&engine, "rb-2").await;
    assert_eq!(r.state, State::Failed);
    assert!(r.reason.contains("reboot did not happen"), "{}", r.reason);
    assert!(!r.reboot_verified);
}

#[tokio::test(start_paused = true)]
async fn cancel_is_refused_once_a_job_is_past_applying() {
    let h = Harness::new(host(&[("alpha", "1.1")], &[]));
    stopped_in(&h, "rb-3", upgrade(), State::Rebooting).await;
    h.rewrite("rb-3", |r| {
        r.reboot_boot_id = Some("boot-1".into());
        r.reboot_ms = r.started_ms;
    });
    let engine = h.open().await;
    let e = engine.cancel("rb-3").expect_err("rebooting");
    assert!(
        matches!(
            e,
            CancelError::PastApplying {
                state: State::Rebooting,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("can no longer be cancelled"), "{e}");
    assert_eq!(h.journaled("rb-3").state, State::Rebooting);
}

#[tokio::test(start_paused = true)]
async fn cancel_while_waiting_for_the_window_ends_it_and_it_never_runs() {
    let h = Harness::new(host(&[("alpha", "1.0")], &[("alpha", "1.1")]));
    let (engine, _run) = h.start().await;
    let now = h.clock.now();
    let mut job = h.job("cw-1", upgrade());
    job.max_duration = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    window(
        &mut job,
        now + Duration::from_secs(600),
        now + Duration::from_secs(3000),
    );
    h.submit(&engine, &job);
    wait_for(&engine, "cw-1", |s| s == State::WaitingWindow).await;
    let r = engine.cancel("cw-1").expect("cancel");
    assert_eq!(r.state, State::Cancelled);
    // Past the window's opening: still cancelled, nothing applied.
    tokio::time::sleep(Duration::from_secs(1200)).await;
    assert_eq!(engine.get("cw-1").map(|r| r.state), Some(State::Cancelled));
    assert_eq!(h.journaled("cw-1").state, State::Cancelled);
    assert!(h.pm.host().applied.is_empty());
}
