//! pb conversions of the daemon's own records: a job's journal record and events, and the
//! scanner's snapshot summary. Shared package facts convert in `patch_agent_wire::convert`.

use crate::jobs::journal::{EventRecord, Record};
use crate::pkg::scanner::Snapshot;
use crate::pkg::{Classification, SlaClass};
use patch_agent_wire::convert::ts;
use patch_agent_wire::proto::v1 as pb;
use std::time::{Duration, UNIX_EPOCH};

/// Milliseconds since the epoch (as the journal keeps them) as a protobuf timestamp.
pub fn ms(ms: u64) -> prost_types::Timestamp {
    (UNIX_EPOCH + Duration::from_millis(ms)).into()
}

pub fn summary(manager: &str, s: &Snapshot) -> (pb::PackageSummary, pb::RebootStatus) {
    let count = |c: SlaClass| s.updates.updates.iter().filter(|u| u.sla == c).count() as u32;
    let summary = pb::PackageSummary {
        manager: manager.to_string(),
        installed: s.packages.len() as u32,
        pending_critical: count(SlaClass::Critical),
        pending_high: count(SlaClass::High),
        pending_medium: count(SlaClass::Medium),
        pending_low: count(SlaClass::Low),
        pending_security: s
            .updates
            .updates
            .iter()
            .filter(|u| u.classification == Classification::Security)
            .count() as u32,
        held: s.updates.held.len() as u32,
        last_scan_at: ts(s.updates_at.or(s.inventory_at)),
        metadata_refreshed_at: ts(s.refreshed_at),
        scan_errors: s.errors.clone(),
        repo_errors: s.updates.repo_errors.len() as u32,
    };
    let reboot = pb::RebootStatus {
        required: s.reboot.required,
        method: s.reboot.method.clone(),
        evidence: s.reboot.evidence.clone(),
        checked_at: ts(s.reboot_at),
    };
    (summary, reboot)
}

/// The wire form of a record.
pub fn status(r: &Record) -> pb::JobStatus {
    pb::JobStatus {
        job_id: r.job_id.clone(),
        state: r.state.to_proto() as i32,
        reason: r.reason.clone(),
        key_id: r.key_id.clone(),
        submitted_at: Some(ms(r.submitted_ms)),
        started_at: r.started_ms.map(ms),
        finished_at: r.finished_ms.map(ms),
        packages: r
            .packages
            .iter()
            .map(|p| pb::PackageResult {
                name: p.name.clone(),
                from_version: p.from.clone(),
                to_version: p.to.clone(),
                outcome: p.outcome.text().to_string(),
                result: p.outcome.to_proto() as i32,
            })
            .collect(),
        summary: r.summary.clone(),
        dry_run: r.dry_run,
        repo_errors: r
            .repo_errors
            .iter()
            .map(|e| pb::RepoError {
                repo: e.repo.clone(),
                error: e.error.clone(),
            })
            .collect(),
    }
}

pub fn event(e: &EventRecord) -> pb::JobEvent {
    pb::JobEvent {
        at: Some(ms(e.at_ms)),
        state: e.state.to_proto() as i32,
        message: e.message.clone(),
    }
}

pub fn os_release(os: &crate::host::OsRelease) -> pb::OsRelease {
    pb::OsRelease {
        id: os.id.clone(),
        id_like: os.id_like.clone(),
        version_id: os.version_id.clone(),
        pretty_name: os.pretty_name.clone(),
        version_codename: os.version_codename.clone(),
    }
}
