//! Scheduled scans and their last results.
//!
//! Scans run at start and then every `[packages] scan_interval` plus up to 10 % random jitter
//! (so a fleet started together does not hit its mirrors together). Metadata is refreshed only
//! when asked or when older than `refresh_interval`; the time of the last refresh is kept in
//! `state_dir` so a restart does not trigger one. RPCs read the last results; only an explicit
//! `refresh` runs the package manager on behalf of a caller, and concurrent refreshes coalesce
//! into one scan.

use super::{Package, PackageManager, RebootState, UpdateScan};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, RwLock};

/// Scan timing.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub scan_interval: Duration,
    pub refresh_interval: Duration,
    pub scan_on_start: bool,
}

/// What the last scans found.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub packages: Arc<Vec<Package>>,
    pub inventory_at: Option<SystemTime>,
    pub updates: Arc<UpdateScan>,
    pub updates_at: Option<SystemTime>,
    pub refreshed_at: Option<SystemTime>,
    pub reboot: RebootState,
    pub reboot_at: Option<SystemTime>,
    /// The last scan's failures, one line each (empty when it succeeded).
    pub errors: Vec<String>,
    /// Completed scans since start.
    pub scans: u64,
    /// Completed scans that refreshed metadata (or tried to), since start.
    pub refreshes: u64,
}

/// Owns the backend and the latest snapshot.
pub struct Scanner {
    /// The backend and the schedule; a SIGHUP that changes `[packages]` replaces both.
    setup: std::sync::RwLock<(Arc<dyn PackageManager>, Schedule)>,
    /// Wakes the schedule loop when the schedule changes.
    reconfigured: tokio::sync::Notify,
    boot_time: SystemTime,
    refresh_stamp: PathBuf,
    seen_file: PathBuf,
    /// When each pending update (name, arch, candidate) was first seen, unix seconds; persisted
    /// so `approve_after_days` survives restarts.
    first_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    snapshot: RwLock<Arc<Snapshot>>,
    running: Mutex<()>,
    /// Completed scans, for whoever wants to know when one ends (the reporter).
    scans: tokio::sync::watch::Sender<u64>,
}

impl Scanner {
    pub fn new(
        backend: Arc<dyn PackageManager>,
        schedule: Schedule,
        boot_time: SystemTime,
        state_dir: &std::path::Path,
    ) -> Self {
        let refresh_stamp = state_dir.join("last-metadata-refresh");
        let refreshed_at = std::fs::read_to_string(&refresh_stamp)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        let seen_file = state_dir.join("first-seen.json");
        let first_seen = std::fs::read(&seen_file)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        Self {
            setup: std::sync::RwLock::new((backend, schedule)),
            reconfigured: tokio::sync::Notify::new(),
            boot_time,
            refresh_stamp,
            seen_file,
            first_seen: std::sync::Mutex::new(first_seen),
            snapshot: RwLock::new(Arc::new(Snapshot {
                refreshed_at,
                ..Snapshot::default()
            })),
            running: Mutex::new(()),
            scans: tokio::sync::watch::Sender::new(0),
        }
    }

    fn setup(&self) -> (Arc<dyn PackageManager>, Schedule) {
        self.setup
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn manager(&self) -> &'static str {
        self.backend().name()
    }

    /// The current backend; a job keeps the one it started with.
    pub fn backend(&self) -> Arc<dyn PackageManager> {
        self.setup().0
    }

    /// Applies a reloaded `[packages]` section: a new backend (same manager) and schedule.
    pub fn reconfigure(&self, backend: Arc<dyn PackageManager>, schedule: Schedule) {
        *self
            .setup
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (backend, schedule);
        self.reconfigured.notify_one();
    }

    pub fn boot_time(&self) -> SystemTime {
        self.boot_time
    }

    /// Records first-seen times for the current updates, forgets ones no longer pending, and
    /// stamps each update with its time.
    fn stamp_first_seen(&self, scan: &mut UpdateScan) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Ok(mut seen) = self.first_seen.lock() else {
            return;
        };
        let current: std::collections::HashSet<String> =
            scan.updates.iter().map(|u| u.seen_key()).collect();
        seen.retain(|k, _| current.contains(k));
        for u in &mut scan.updates {
            let t = *seen.entry(u.seen_key()).or_insert(now);
            u.first_seen = Some(UNIX_EPOCH + Duration::from_secs(t));
        }
        let tmp = self.seen_file.with_extension("json.tmp");
        let written = serde_json::to_vec(&*seen)
            .map_err(std::io::Error::other)
            .and_then(|d| std::fs::write(&tmp, d))
            .and_then(|()| std::fs::rename(&tmp, &self.seen_file));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.seen_file.display(), "Cannot record first-seen times");
        }
    }

    /// The latest results (cheap: an `Arc` clone).
    pub async fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().await.clone()
    }

    /// Runs one scan. `refresh` forces a metadata refresh; otherwise metadata is refreshed only
    /// when older than the refresh interval. Single flight: a caller takes the result of any
    /// scan that ended after it arrived, provided that scan refreshed when the caller asked for
    /// a refresh. So concurrent refresh requests share one run, and a caller (a job) waits
    /// behind at most one refresh however many are requested.
    pub async fn scan(&self, refresh: bool) -> Arc<Snapshot> {
        let before = self.snapshot().await;
        let _guard = self.running.lock().await;
        let now = self.snapshot().await;
        let served = if refresh {
            now.refreshes > before.refreshes
        } else {
            now.scans > before.scans
        };
        if served {
            return now;
        }
        let started = SystemTime::now();
        let (backend, schedule) = self.setup();
        let mut next = (*now).clone();
        next.errors.clear();

        let stale = now.refreshed_at.is_none_or(|t| {
            started.duration_since(t).unwrap_or_default() >= schedule.refresh_interval
        });
        let mut repo_errors = Vec::new();
        if refresh || stale {
            next.refreshes += 1;
            match backend.refresh().await {
                Ok(errs) => {
                    repo_errors = errs;
                    next.refreshed_at = Some(started);
                    let secs = started
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    if let Err(e) = std::fs::write(&self.refresh_stamp, secs.to_string()) {
                        tracing::warn!(error = %e, path = %self.refresh_stamp.display(), "Cannot record the refresh time");
                    }
                }
                Err(e) => next.errors.push(format!("metadata refresh: {e}")),
            }
        }

        let mut packages = Vec::new();
        match backend.inventory(&mut |p| packages.push(p)).await {
            Ok(()) => {
                packages.sort_unstable_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
                packages.shrink_to_fit();
                next.packages = Arc::new(packages);
                next.inventory_at = Some(SystemTime::now());
            }
            Err(e) => next.errors.push(format!("inventory: {e}")),
        }
        match backend.updates().await {
            Ok(mut scan) => {
                self.stamp_first_seen(&mut scan);
                for e in repo_errors {
                    if !scan.repo_errors.contains(&e) {
                        scan.repo_errors.push(e);
                    }
                }
                next.updates = Arc::new(scan);
                next.updates_at = Some(SystemTime::now());
            }
            Err(e) => next.errors.push(format!("pending updates: {e}")),
        }
        next.reboot = backend.reboot_required(self.boot_time).await;
        next.reboot_at = Some(SystemTime::now());
        next.scans += 1;
        let elapsed = started.elapsed().unwrap_or_default();
        if next.errors.is_empty() {
            tracing::info!(
                manager = backend.name(),
                packages = next.packages.len(),
                updates = next.updates.updates.len(),
                held = next.updates.held.len(),
                repo_errors = next.updates.repo_errors.len(),
                reboot_required = next.reboot.required,
                elapsed_ms = elapsed.as_millis() as u64,
                "Scan finished"
            );
        } else {
            tracing::warn!(manager = backend.name(), errors = ?next.errors, "Scan finished with errors");
        }
        let next = Arc::new(next);
        *self.snapshot.write().await = next.clone();
        self.scans.send_replace(next.scans);
        next
    }

    /// Changes whenever a scan ends.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.scans.subscribe()
    }

    /// Scans at start (if configured) and then on the schedule, forever.
    pub async fn run(self: Arc<Self>) {
        if self.setup().1.scan_on_start {
            self.scan(false).await;
        }
        loop {
            let every = with_jitter(self.setup().1.scan_interval, random_u64());
            tokio::select! {
                () = tokio::time::sleep(every) => {
                    self.scan(false).await;
                }
                // A new schedule starts a new wait.
                () = self.reconfigured.notified() => {}
            }
        }
    }
}

/// `interval` plus up to 10 % of it, chosen by `r`.
pub fn with_jitter(interval: Duration, r: u64) -> Duration {
    let max = interval.as_millis() as u64 / 10;
    if max == 0 {
        return interval;
    }
    interval + Duration::from_millis(r % (max + 1))
}

pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per instance: enough for jitter, no extra dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkg::{PkgError, RepoError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake {
        refreshes: AtomicUsize,
        scans: AtomicUsize,
    }

    #[tonic::async_trait]
    impl PackageManager for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError> {
            f(Package {
                name: "a".into(),
                epoch: 0,
                version: "1".into(),
                release: String::new(),
                arch: "all".into(),
                source: "a".into(),
                state: "installed",
                held: false,
            });
            Ok(())
        }
        async fn refresh(&self) -> Result<Vec<RepoError>, PkgError> {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
            Ok(vec![RepoError {
                repo: "r".into(),
                error: "down".into(),
            }])
        }
        async fn updates(&self) -> Result<UpdateScan, PkgError> {
            self.scans.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(PkgError::Parse("boom".into()))
        }
        async fn reboot_required(&self, _: SystemTime) -> RebootState {
            RebootState::default()
        }
        fn locks(&self) -> Vec<crate::pkg::lock::Lock> {
            Vec::new()
        }
        async fn apply(
            &self,
            _: &crate::pkg::Op,
            _: crate::pkg::ApplyOptions,
            _: tokio::sync::mpsc::UnboundedSender<String>,
        ) -> Result<(), PkgError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn refreshes_only_when_stale_or_asked_and_coalesces() {
        let dir = tempfile::tempdir().expect("tmp");
        let fake = Arc::new(Fake {
            refreshes: AtomicUsize::new(0),
            scans: AtomicUsize::new(0),
        });
        let schedule = Schedule {
            scan_interval: Duration::from_secs(3600),
            refresh_interval: Duration::from_secs(3600),
            scan_on_start: false,
        };
        let s = Arc::new(Scanner::new(
            fake.clone(),
            schedule.clone(),
            UNIX_EPOCH,
            dir.path(),
        ));
        let snap = s.scan(false).await;
        assert_eq!(
            fake.refreshes.load(Ordering::SeqCst),
            1,
            "first scan refreshes stale metadata"
        );
        assert_eq!(snap.packages.len(), 1);
        assert_eq!(snap.errors, ["pending updates: boom"]);
        s.scan(false).await;
        assert_eq!(
            fake.refreshes.load(Ordering::SeqCst),
            1,
            "fresh metadata is not refreshed"
        );
        s.scan(true).await;
        assert_eq!(
            fake.refreshes.load(Ordering::SeqCst),
            2,
            "refresh on request"
        );
        // Concurrent plain scans coalesce with the one running.
        let before = fake.scans.load(Ordering::SeqCst);
        let (a, b, c) = tokio::join!(s.scan(false), s.scan(false), s.scan(false));
        assert!(a.scans >= 4 && b.scans >= 4 && c.scans >= 4);
        assert!(fake.scans.load(Ordering::SeqCst) - before <= 2, "coalesced");
        // A restart remembers the last refresh.
        let s2 = Scanner::new(fake.clone(), schedule, UNIX_EPOCH, dir.path());
        s2.scan(false).await;
        assert_eq!(fake.refreshes.load(Ordering::SeqCst), 2);
        // Ten concurrent refreshes: single flight. At most two runs (one may have started
        // before the others arrived), never ten.
        let before = fake.refreshes.load(Ordering::SeqCst);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.scan(true).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.expect("scan task").refreshes > 0);
        }
        let ran = fake.refreshes.load(Ordering::SeqCst) - before;
        assert!((1..=2).contains(&ran), "{ran} refreshes for 10 requests");
    }

    #[test]
    fn jitter_is_bounded() {
        let i = Duration::from_secs(3600);
        for r in [0, 1, 359_999, 360_000, u64::MAX] {
            let d = with_jitter(i, r);
            assert!(d >= i && d <= i + Duration::from_secs(360), "{d:?}");
        }
        assert_eq!(
            with_jitter(Duration::from_millis(5), 7),
            Duration::from_millis(5)
        );
    }
}
