//! The durable job journal: one JSON file per job in `state_dir/jobs`, rewritten atomically
//! (temporary file, fsync, rename, fsync of the directory) before the engine acts on a
//! transition. A file that cannot be read back is moved to `state_dir/quarantine` and never
//! executed. Records stay until the job has expired and `history_retention` has passed, so a
//! replayed job id is recognised for as long as its signature would be accepted.

use super::state::{Event, NotAllowed, State};
use patch_agent_wire::job::outcome::Outcome;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most this many history entries are kept per job; later ones replace a marker.
pub const MAX_EVENTS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub state: State,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageOutcome {
    pub name: String,
    pub from: String,
    pub to: String,
    pub outcome: Outcome,
}

/// Everything known about one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub job_id: String,
    pub key_id: String,
    /// The signed payload (hex), so a queued job can be run after a restart.
    pub payload_hex: String,
    pub state: State,
    pub reason: String,
    pub summary: String,
    pub dry_run: bool,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub expires_ms: u64,
    pub events: Vec<EventRecord>,
    pub packages: Vec<PackageOutcome>,
    /// Events ever recorded, including any beyond the kept history: the next event's number.
    #[serde(default)]
    pub event_count: u64,
    /// The boot id recorded just before the reboot command ran (at most one reboot per job).
    #[serde(default)]
    pub reboot_boot_id: Option<String>,
    /// When the reboot command ran (unix ms).
    #[serde(default)]
    pub reboot_ms: Option<u64>,
    /// The packages the job set out to change and their target versions, recorded before the
    /// first change, so a restarted agent can tell what happened.
    #[serde(default)]
    pub plan: Vec<PackageOutcome>,
    /// The host came back from the job's reboot (a new boot id).
    #[serde(default)]
    pub reboot_verified: bool,
    /// The final result was committed to the report outbox.
    #[serde(default)]
    pub reported: bool,
    /// The envelope's signature (hex), so the job can be verified again against the trust store
    /// when it starts and after a restart.
    #[serde(default)]
    pub signature_hex: String,
    /// Repositories the job's metadata refresh could not read.
    #[serde(default)]
    pub repo_errors: Vec<RepoErrorRecord>,
}

/// A repository a refresh could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoErrorRecord {
    pub repo: String,
    pub error: String,
}

pub fn now_ms() -> u64 {
    ms(SystemTime::now())
}

pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Record {
    /// The one place a job's state changes: `State::next` decides, and the record follows.
    /// Entering APPLYING stamps `started_ms`; a terminal state stamps `finished_ms` (the only
    /// place it is set); a failure's reason is recorded. Other reasons are the caller's.
    pub fn apply(&mut self, event: &Event, now_ms: u64) -> Result<State, NotAllowed> {
        let next = self.state.next(event)?;
        self.state = next;
        if next == State::Applying {
            self.started_ms = Some(now_ms);
        }
        if next.is_terminal() {
            self.finished_ms = Some(now_ms);
        }
        if let Event::Fail(why) | Event::Untrusted(why) = event {
            self.reason.clone_from(why);
        }
        Ok(next)
    }

    /// Appends a history entry (bounded); returns it with its number.
    pub fn event(&mut self, message: impl Into<String>) -> (u64, EventRecord) {
        let seq = self.event_count;
        self.event_count += 1;
        let e = EventRecord {
            at_ms: now_ms(),
            state: self.state,
            message: message.into(),
        };
        if self.events.len() < MAX_EVENTS {
            self.events.push(e.clone());
        } else if self.events.len() == MAX_EVENTS {
            self.events.push(EventRecord {
                message: "history truncated: further entries not kept".into(),
                ..e.clone()
            });
        }
        (seq, e)
    }
}

/// The journal directory.
pub struct Journal {
    dir: PathBuf,
    quarantine: PathBuf,
    /// The newest revision written per job: writes may be made off the engine's lock, and an
    /// older revision that arrives late must not replace a newer one.
    written: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Journal {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("jobs");
        let quarantine = state_dir.join("quarantine");
        for d in [&dir, &quarantine] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        Ok(Self {
            dir,
            quarantine,
            written: std::sync::Mutex::default(),
        })
    }

    fn path(&self, job_id: &str) -> PathBuf {
        // Job ids are validated ([A-Za-z0-9._-]), but never trust a name with a path in it.
        self.dir
            .join(format!("{}.json", job_id.replace(['/', '\0'], "_")))
    }

    /// Writes a record durably: the rename is atomic and both file and directory are synced,
    /// so after a crash the file holds either the old or the new record, never a mix.
    pub fn write(&self, r: &Record) -> std::io::Result<()> {
        let data = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        self.write_bytes(&r.job_id, &data)
    }

    /// Writes revision `rev` of a job's serialized record, unless a newer revision was written
    /// already (then it is dropped: the newer one holds everything this one did). Writes are
    /// serialized, so revisions land in order.
    pub fn write_revision(&self, job_id: &str, rev: u64, data: &[u8]) -> std::io::Result<()> {
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if written.get(job_id).is_some_and(|w| *w >= rev) {
            return Ok(());
        }
        self.write_bytes(job_id, data)?;
        written.insert(job_id.to_string(), rev);
        Ok(())
    }

    /// Forgets the revision of a job removed from the journal.
    pub fn forget(&self, job_id: &str) {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(job_id);
    }

    fn write_bytes(&self, job_id: &str, data: &[u8]) -> std::io::Result<()> {
        let path = self.path(job_id);
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Reads every record; unreadable files are quarantined and reported.
    pub fn load(&self) -> (Vec<Record>, Vec<String>) {
        let mut records = Vec::new();
        let mut quarantined = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (records, quarantined);
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json.tmp") {
                // A write that never reached its rename: the previous record (if any) stands.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<Record>(&d).map_err(|e| e.to_string()))
                .and_then(|r| {
                    if format!("{}.json", r.job_id) == name
                        && patch_agent_wire::ids::valid_job_id(&r.job_id)
                    {
                        Ok(r)
                    } else {
                        Err("the job id inside does not match the file name".into())
                    }
                });
            match parsed {
                Ok(r) => records.push(r),
                Err(why) => {
                    let dest = self.quarantine.join(format!("{name}.{}", now_ms()));
                    let moved = std::fs::rename(&path, &dest);
                    quarantined.push(format!(
                        "{}: {why}; {}",
                        path.display(),
                        match moved {
                            Ok(()) => format!("moved to {}", dest.display()),
                            Err(e) => format!("could not be moved ({e})"),
                        }
                    ));
                }
            }
        }
        records.sort_by_key(|r| r.submitted_ms);
        (records, quarantined)
    }

    /// Removes finished records past both their expiry and the retention; returns their ids.
    pub fn gc<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
        retention: Duration,
    ) -> Vec<String> {
        let now = now_ms();
        let keep_ms = retention.as_millis() as u64;
        let mut removed = Vec::new();
        for r in records {
            let finished = r.finished_ms.unwrap_or(r.submitted_ms);
            if r.state.is_terminal()
                && r.expires_ms < now
                && finished.saturating_add(keep_ms) < now
                && std::fs::remove_file(self.path(&r.job_id)).is_ok()
            {
                removed.push(r.job_id.clone());
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            job_id: id.into(),
            key_id: "k".into(),
            payload_hex: patch_agent_wire::ids::to_hex(b"\x01\x02"),
            state: State::Queued,
            reason: String::new(),
            summary: "scan".into(),
            dry_run: false,
            submitted_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            expires_ms: now_ms() + 3_600_000,
            events: vec![],
            packages: vec![],
            event_count: 0,
            reboot_boot_id: None,
            reboot_ms: None,
            plan: vec![],
            reboot_verified: false,
            reported: false,
            signature_hex: String::new(),
            repo_errors: vec![],
        }
    }

    #[test]
    fn write_load_quarantine_gc() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = Journal::open(dir.path()).expect("open");
        let mut r = record("a");
        r.event("queued");
        j.write(&r).expect("write");
        std::fs::write(dir.path().join("jobs/b.json"), b"{ torn").expect("corrupt");
        std::fs::write(dir.path().join("jobs/c.json.tmp"), b"partial").expect("tmp");
        let mut wrong = record("d");
        wrong.job_id = "e".into();
        std::fs::write(
            dir.path().join("jobs/d.json"),
            serde_json::to_vec(&wrong).expect("json"),
        )
        .expect("w");
        let (records, q) = j.load();
        assert_eq!(records, vec![r.clone()]);
        assert_eq!(q.len(), 2, "{q:?}");
        assert!(!dir.path().join("jobs/b.json").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .expect("q")
                .count(),
            2
        );
        assert!(!dir.path().join("jobs/c.json.tmp").exists());

        let mut old = record("old");
        old.state = State::Succeeded;
        old.expires_ms = 1;
        old.finished_ms = Some(1);
        j.write(&old).expect("w");
        assert_eq!(j.gc(&[old, r], Duration::from_secs(60)), ["old"]);
        assert_eq!(j.load().0.len(), 1);
    }

    #[test]
    fn events_are_bounded() {
        let mut r = record("x");
        for i in 0..MAX_EVENTS + 50 {
            r.event(format!("line {i}"));
        }
        assert_eq!(r.events.len(), MAX_EVENTS + 1);
        assert!(r.events.last().expect("last").message.contains("truncated"));
    }
}
