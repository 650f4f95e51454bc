//! The durable outbox: every job report is a file in `state_dir/outbox` before it is sent, and
//! is removed only once the controller has acknowledged it, so reports survive agent restarts
//! and controller outages of any length.
//!
//! Files are `SEQ.final.pb` or `SEQ.progress.pb` (an encoded `JobReport`), written to a
//! temporary name, fsynced and renamed, so a crash leaves either the whole report or none.
//! They are sent oldest first. The outbox is bounded: when it is full, the oldest progress
//! report goes first (or the new one, when it is progress and everything queued is a result),
//! and only when it holds nothing but results does the oldest result go. Every drop is counted,
//! the counts are kept in `dropped` and travel with every report.
//!
//! Inventory is not queued: only its latest state matters, so a marker file (`inventory.due`)
//! says one is owed, and the sender builds it from the latest scan when it sends.

use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
struct Meta {
    is_final: bool,
}

#[derive(Debug, Default)]
struct State {
    items: BTreeMap<u64, Meta>,
    next_seq: u64,
    dropped_progress: u64,
    dropped_final: u64,
    inventory_due: bool,
}

/// See the module documentation.
pub struct Outbox {
    dir: PathBuf,
    capacity: usize,
    state: Mutex<State>,
    wake: Notify,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `data` to `path` atomically and durably.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn item_name(seq: u64, is_final: bool) -> String {
    format!(
        "{seq:020}.{}.pb",
        if is_final { "final" } else { "progress" }
    )
}

fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (seq, rest) = name.split_once('.')?;
    let is_final = match rest {
        "final.pb" => true,
        "progress.pb" => false,
        _ => return None,
    };
    Some((seq.parse().ok()?, is_final))
}

impl Outbox {
    /// Opens (creating 0700) `dir` and loads what a previous run left. Unreadable items are
    /// renamed `*.bad` and logged, never sent.
    pub fn open(dir: &Path, capacity: usize) -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the outbox {}: {e}", dir.display()))?;
        let mut state = State::default();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read the outbox {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, is_final)) = parse_name(&name) else {
                continue;
            };
            let readable = std::fs::read(entry.path())
                .ok()
                .is_some_and(|d| pb::JobReport::decode(d.as_slice()).is_ok());
            if !readable {
                tracing::error!(file = %entry.path().display(), "Unreadable outbox item; renamed to .bad and not sent");
                let _ = std::fs::rename(entry.path(), entry.path().with_extension("bad"));
                continue;
            }
            state.items.insert(seq, Meta { is_final });
            state.next_seq = state.next_seq.max(seq + 1);
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("dropped")) {
            let mut it = text
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            state.dropped_progress = it.next().unwrap_or(0);
            state.dropped_final = it.next().unwrap_or(0);
        }
        state.inventory_due = dir.join("inventory.due").exists();
        Ok(Self {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(state),
            wake: Notify::new(),
        })
    }

    /// Commits one report durably; false when it could not be written (it is logged).
    pub fn push(&self, report: &pb::JobReport) -> bool {
        let mut st = lock(&self.state);
        if st.items.len() >= self.capacity {
            let oldest_progress = st
                .items
                .iter()
                .find(|(_, m)| !m.is_final)
                .map(|(seq, _)| *seq);
            let victim = match (oldest_progress, report.r#final) {
                (Some(seq), _) => Some((seq, false)),
                // Full of results: a progress report is the one to lose.
                (None, false) => None,
                (None, true) => st.items.keys().next().map(|seq| (*seq, true)),
            };
            match victim {
                Some((seq, is_final)) => {
                    st.items.remove(&seq);
                    let _ = std::fs::remove_file(self.dir.join(item_name(seq, is_final)));
                    if is_final {
                        st.dropped_final += 1;
                    } else {
                        st.dropped_progress += 1;
                    }
                }
                None => st.dropped_progress += 1,
            }
            self.save_counts(&st);
            tracing::warn!(
                capacity = self.capacity,
                dropped_progress = st.dropped_progress,
                dropped_final = st.dropped_final,
                "Report outbox full; dropped a report"
            );
            if victim.is_none() {
                return true;
            }
        }
        let seq = st.next_seq;
        let mut report = report.clone();
        report.outbox = Some(stats(&st));
        let path = self.dir.join(item_name(seq, report.r#final));
        if let Err(e) = write_durably(&path, &report.encode_to_vec()) {
            tracing::error!(error = %e, path = %path.display(), report = %report.report_id, "Cannot commit a report to the outbox");
            return false;
        }
        st.next_seq += 1;
        st.items.insert(
            seq,
            Meta {
                is_final: report.r#final,
            },
        );
        drop(st);
        self.wake.notify_one();
        true
    }

    fn save_counts(&self, st: &State) {
        let text = format!("{} {}\n", st.dropped_progress, st.dropped_final);
        if let Err(e) = write_durably(&self.dir.join("dropped"), text.as_bytes()) {
            tracing::warn!(error = %e, "Cannot record the outbox drop counts");
        }
    }

    /// The oldest report, with its sequence number for [`Outbox::ack`].
    pub fn oldest(&self) -> Option<(u64, pb::JobReport)> {
        loop {
            let (seq, is_final) = {
                let st = lock(&self.state);
                let (seq, m) = st.items.iter().next()?;
                (*seq, m.is_final)
            };
            let path = self.dir.join(item_name(seq, is_final));
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| pb::JobReport::decode(d.as_slice()).map_err(|e| e.to_string()))
            {
                Ok(mut r) => {
                    // The counts as they are now, not as they were when it was queued.
                    r.outbox = Some(self.stats());
                    return Some((seq, r));
                }
                Err(e) => {
                    tracing::error!(error = %e, path = %path.display(), "Unreadable outbox item; renamed to .bad and not sent");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    lock(&self.state).items.remove(&seq);
                }
            }
        }
    }

    /// The controller has report `seq`: forget it.
    pub fn ack(&self, seq: u64) {
        let mut st = lock(&self.state);
        if let Some(m) = st.items.remove(&seq) {
            let path = self.dir.join(item_name(seq, m.is_final));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, path = %path.display(), "Cannot remove a sent report; it may be sent again");
            }
        }
    }

    /// Records durably that an inventory report is owed.
    pub fn want_inventory(&self) {
        let mut st = lock(&self.state);
        if !st.inventory_due {
            if let Err(e) = write_durably(&self.dir.join("inventory.due"), b"") {
                tracing::warn!(error = %e, "Cannot record that an inventory report is owed");
            }
            st.inventory_due = true;
        }
        drop(st);
        self.wake.notify_one();
    }

    pub fn inventory_due(&self) -> bool {
        lock(&self.state).inventory_due
    }

    /// The owed inventory was delivered.
    pub fn inventory_sent(&self) {
        let mut st = lock(&self.state);
        st.inventory_due = false;
        let _ = std::fs::remove_file(self.dir.join("inventory.due"));
    }

    pub fn has_work(&self) -> bool {
        let st = lock(&self.state);
        !st.items.is_empty() || st.inventory_due
    }

    /// Waits until something is pushed (or returns at once if something was pushed since the
    /// last wait).
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    pub fn stats(&self) -> pb::OutboxStats {
        stats(&lock(&self.state))
    }

    pub fn len(&self) -> usize {
        lock(&self.state).items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn stats(st: &State) -> pb::OutboxStats {
    pb::OutboxStats {
        pending: st.items.len() as u32,
        dropped_progress: st.dropped_progress,
        dropped_final: st.dropped_final,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(job: &str, n: u64, is_final: bool) -> pb::JobReport {
        pb::JobReport {
            report_id: format!(
                "h:{job}:{}",
                if is_final {
                    "final".into()
                } else {
                    n.to_string()
                }
            ),
            host_id: "h".into(),
            r#final: is_final,
            ..Default::default()
        }
    }

    fn ids(o: &Outbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((seq, r)) = o.oldest() {
            out.push(r.report_id);
            o.ack(seq);
        }
        out
    }

    #[test]
    fn survives_reopen_in_order_and_acks_remove_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let o = Outbox::open(dir.path(), 10).expect("open");
        assert!(o.push(&report("a", 1, false)));
        assert!(o.push(&report("a", 0, true)));
        o.want_inventory();
        drop(o);
        let o = Outbox::open(dir.path(), 10).expect("reopen");
        assert!(o.inventory_due());
        assert_eq!(o.len(), 2);
        assert!(o.push(&report("b", 0, true)));
        assert_eq!(ids(&o), ["h:a:1", "h:a:final", "h:b:final"]);
        o.inventory_sent();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn when_full_progress_goes_before_results_and_drops_are_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let o = Outbox::open(dir.path(), 3).expect("open");
        o.push(&report("a", 1, false));
        o.push(&report("a", 0, true));
        o.push(&report("b", 1, false));
        // Full: a result pushes out the oldest progress report.
        o.push(&report("b", 0, true));
        // Full: the next progress report pushes out the remaining progress report.
        o.push(&report("c", 1, false));
        // Full of results and one progress: a result replaces the progress report.
        o.push(&report("c", 0, true));
        // Full of results: a progress report is itself dropped.
        o.push(&report("d", 1, false));
        let s = o.stats();
        assert_eq!((s.pending, s.dropped_progress, s.dropped_final), (3, 4, 0));
        // Full of results: a new result pushes out the oldest result.
        o.push(&report("d", 0, true));
        let s = o.stats();
        assert_eq!((s.pending, s.dropped_progress, s.dropped_final), (3, 4, 1));
        drop(o);
        let o = Outbox::open(dir.path(), 3).expect("reopen");
        let (_, first) = o.oldest().expect("item");
        assert_eq!(first.outbox.map(|s| s.dropped_final), Some(1));
        assert_eq!(ids(&o), ["h:b:final", "h:c:final", "h:d:final"]);
    }

    #[test]
    fn a_corrupt_item_is_set_aside_not_sent() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(item_name(5, true)), b"\xff\xff\xff").expect("write");
        let o = Outbox::open(dir.path(), 3).expect("open");
        assert!(o.is_empty());
        assert!(dir.path().join("00000000000000000005.final.bad").exists());
        o.push(&report("a", 0, true));
        assert_eq!(ids(&o), ["h:a:final"]);
    }
}
