//! pb ↔ domain conversions for the types both ends share: package facts (agent → controller)
//! and job state names. The daemon's own records (job status, events, the scan summary) convert
//! in `patch_agent::convert`; peer identity in `patch_agent_service::auth`.

use crate::packages::{self as pkg, Classification, Severity, SlaClass};
use crate::proto::v1 as pb;
use std::time::SystemTime;

pub fn ts(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(Into::into)
}

pub fn package(p: &pkg::Package) -> pb::Package {
    pb::Package {
        name: p.name.clone(),
        epoch: p.epoch,
        version: p.version.clone(),
        release: p.release.clone(),
        architecture: p.arch.clone(),
        source: p.source.clone(),
        state: p.state.to_string(),
        held: p.held,
        full_version: p.full_version(),
    }
}

pub fn update(u: &pkg::Update) -> pb::Update {
    let classification = match u.classification {
        Classification::Security => pb::Classification::Security,
        Classification::Bugfix => pb::Classification::Bugfix,
        Classification::Enhancement => pb::Classification::Enhancement,
        Classification::Other => pb::Classification::Other,
    };
    let severity = match u.severity {
        Severity::Critical => pb::Severity::Critical,
        Severity::Important => pb::Severity::Important,
        Severity::Moderate => pb::Severity::Moderate,
        Severity::Low => pb::Severity::Low,
        Severity::Unknown => pb::Severity::Unknown,
    };
    pb::Update {
        name: u.name.clone(),
        architecture: u.arch.clone(),
        installed_version: u.installed_version.clone(),
        candidate_version: u.candidate_version.clone(),
        origin: u.origin.clone(),
        classification: classification as i32,
        severity: severity as i32,
        advisory_ids: u.advisories.clone(),
        cve_ids: u.cves.clone(),
        issued: ts(u.issued),
        sla_class: sla(u.sla) as i32,
        first_seen: ts(u.first_seen),
        category: u.category.clone(),
        bug_ids: u.bug_ids.clone(),
        interactive: u.flags.interactive,
        update_stack: u.flags.update_stack,
        reboot_suggested: u.flags.reboot_suggested,
    }
}

pub fn held(u: &pkg::UpdateScan) -> Vec<pb::HeldUpdate> {
    u.held
        .iter()
        .map(|h| pb::HeldUpdate {
            name: h.name.clone(),
            installed_version: h.installed_version.clone(),
            candidate_version: h.candidate_version.clone(),
            reason: h.reason.clone(),
        })
        .collect()
}

pub fn repo_errors(u: &pkg::UpdateScan) -> Vec<pb::RepoError> {
    u.repo_errors
        .iter()
        .map(|e| pb::RepoError {
            repo: e.repo.clone(),
            error: e.error.clone(),
        })
        .collect()
}

pub fn sla(s: SlaClass) -> pb::SlaClass {
    match s {
        SlaClass::Critical => pb::SlaClass::Critical,
        SlaClass::High => pb::SlaClass::High,
        SlaClass::Medium => pb::SlaClass::Medium,
        SlaClass::Low => pb::SlaClass::Low,
    }
}

/// A job state as operators read it: `SUCCEEDED`, `FAILED`, ...; `UNKNOWN` for a value this
/// build does not know.
/// Whether a job's final state counts as success (for watch, rollouts and their thresholds).
pub fn succeeded(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::SucceededRebootRequired)
    )
}

pub fn state_name(s: i32) -> &'static str {
    pb::JobState::try_from(s).map_or("UNKNOWN", |s| {
        s.as_str_name().trim_start_matches("JOB_STATE_")
    })
}
