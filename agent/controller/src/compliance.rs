//! The compliance dashboard of the patch-management chapter, computed from stored reports.
//!
//! Definitions (docs/OPERATIONS.md repeats them):
//! - An update is **overdue** when it has been pending longer than its class allows (Critical
//!   72 h, High 7 d, Medium 30 d, Low 90 d), counted from the advisory's issue date, or from
//!   when it was first seen pending when there is none.
//! - A host is **known** when its last inventory has no scan or repository errors and its scan
//!   is no older than `stale_after` (default 48 h); every other host, including one that never
//!   sent an inventory, is **unknown**. A scan over unreadable repositories can miss updates, so
//!   it is not evidence of compliance.
//! - A known host is **compliant** in a class when none of its pending updates of that class is
//!   overdue; **compliant overall** when it is compliant in every class. Every figure about
//!   pending updates and every percentage is over the known hosts; the unknown count is shown
//!   next to them.
//! - **Mean time to patch**: the mean time from `since` to when an update stopped being pending.
//! - **Patch failure rate**: failed results (FAILED, TIMED_OUT, INTERRUPTED) over all results
//!   that ran (those plus SUCCEEDED and SUCCEEDED_REBOOT_REQUIRED), dry runs excluded.
//! - **Reboot success rate**: jobs whose host came back from their reboot over jobs that rebooted.

use super::store::FleetSnapshot;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// The four SLA classes, in order, with their allowance in seconds.
pub const CLASSES: [(i32, &str, i64); 4] = [
    (1, "critical", 72 * 3600),
    (2, "high", 7 * 86400),
    (3, "medium", 30 * 86400),
    (4, "low", 90 * 86400),
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassFigures {
    pub class: &'static str,
    pub sla_hours: i64,
    /// Hosts with no overdue update of this class, percent (None without hosts).
    pub compliance_percent: Option<f64>,
    pub pending: usize,
    pub overdue: usize,
    /// Hosts with at least one overdue update of this class.
    pub hosts_overdue: usize,
    /// How far past the SLA the most overdue update is.
    pub max_days_overdue: Option<f64>,
    pub mean_time_to_patch_hours: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnvFigures {
    pub hosts: usize,
    pub compliant: usize,
    pub compliance_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dashboard {
    pub generated_at: i64,
    pub hosts: usize,
    pub hosts_with_inventory: usize,
    /// Hosts whose last inventory is recent and free of errors: compliance is computed over these.
    pub hosts_known: usize,
    pub hosts_unknown: usize,
    /// Why hosts are unknown (a host with errors and a stale scan counts under errors).
    pub hosts_unknown_scan_errors: usize,
    pub hosts_unknown_stale: usize,
    pub hosts_unknown_no_inventory: usize,
    pub stale_after_hours: f64,
    pub hosts_compliant: usize,
    pub overall_compliance_percent: Option<f64>,
    pub by_class: Vec<ClassFigures>,
    /// By the `environment` label; hosts without one are under "(none)".
    pub by_environment: BTreeMap<String, EnvFigures>,
    pub mean_time_to_patch_hours: Option<f64>,
    pub jobs_ran: usize,
    pub jobs_failed: usize,
    pub patch_failure_rate_percent: Option<f64>,
    pub reboots: usize,
    pub reboots_succeeded: usize,
    pub reboot_success_rate_percent: Option<f64>,
    pub hosts_reboot_required: usize,
    /// Reports agents dropped because their outbox was full (progress, results).
    pub reports_dropped: (u64, u64),
}

pub(crate) fn percent(part: usize, whole: usize) -> Option<f64> {
    (whole > 0).then(|| (part as f64) * 100.0 / (whole as f64))
}

/// The mean in hours of `n` durations totalling `total_secs`.
pub(crate) fn mean_of(n: usize, total_secs: f64) -> Option<f64> {
    (n > 0).then(|| total_secs / n as f64 / 3600.0)
}

fn mean_hours(xs: impl Iterator<Item = i64>) -> Option<f64> {
    let (n, sum) = xs.fold((0u64, 0f64), |(n, s), x| (n + 1, s + x.max(0) as f64));
    (n > 0).then(|| sum / n as f64 / 3600.0)
}

/// Why a host is not known, if it is not.
fn unknown_because(h: &super::store::HostRow, now: i64, stale_after: i64) -> Option<Unknown> {
    if !h.has_inventory {
        Some(Unknown::NoInventory)
    } else if h.scan_errors > 0 {
        Some(Unknown::ScanErrors)
    } else if h
        .scanned_at
        .is_none_or(|t| now.saturating_sub(t) > stale_after)
    {
        Some(Unknown::Stale)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    NoInventory,
    ScanErrors,
    Stale,
}

/// Computes the dashboard as of `now` (unix seconds); an inventory older than `stale_after`
/// seconds makes its host unknown.
pub fn compute(s: &FleetSnapshot, now: i64, stale_after: i64) -> Dashboard {
    let why: Vec<Option<Unknown>> = s
        .hosts
        .iter()
        .map(|h| unknown_because(h, now, stale_after))
        .collect();
    let count = |u: Unknown| why.iter().filter(|w| **w == Some(u)).count();
    let inventoried: Vec<&str> = s
        .hosts
        .iter()
        .zip(&why)
        .filter(|(_, w)| w.is_none())
        .map(|(h, _)| h.host_id.as_str())
        .collect();
    let (by_class, non_compliant) = by_class(s, &inventoried, now);
    let by_environment = by_environment(s, &inventoried, &non_compliant);
    let jobs = job_figures(s);
    let compliant = inventoried.len() - non_compliant.len();
    Dashboard {
        generated_at: now,
        hosts: s.hosts.len(),
        hosts_with_inventory: s.hosts.iter().filter(|h| h.has_inventory).count(),
        hosts_known: inventoried.len(),
        hosts_unknown: s.hosts.len() - inventoried.len(),
        hosts_unknown_scan_errors: count(Unknown::ScanErrors),
        hosts_unknown_stale: count(Unknown::Stale),
        hosts_unknown_no_inventory: count(Unknown::NoInventory),
        stale_after_hours: stale_after as f64 / 3600.0,
        hosts_compliant: compliant,
        overall_compliance_percent: percent(compliant, inventoried.len()),
        by_class,
        by_environment,
        mean_time_to_patch_hours: mean_hours(
            s.resolved
                .iter()
                .map(|r| r.resolved_at.saturating_sub(r.since)),
        ),
        jobs_ran: jobs.ran,
        jobs_failed: jobs.failed,
        patch_failure_rate_percent: percent(jobs.failed, jobs.ran),
        reboots: jobs.reboots,
        reboots_succeeded: jobs.reboots_ok,
        reboot_success_rate_percent: percent(jobs.reboots_ok, jobs.reboots),
        hosts_reboot_required: s.hosts.iter().filter(|h| h.reboot_required).count(),
        reports_dropped: s.hosts.iter().fold((0, 0), |(p, f), h| {
            (p + h.dropped_progress, f + h.dropped_final)
        }),
    }
}

/// The figures of each SLA class over the hosts whose inventory is known, and the hosts with
/// any update past its class's allowance.
fn by_class<'a>(
    s: &'a FleetSnapshot,
    inventoried: &[&'a str],
    now: i64,
) -> (Vec<ClassFigures>, HashSet<&'a str>) {
    let known: HashSet<&str> = inventoried.iter().copied().collect();
    let mut non_compliant: HashSet<&str> = HashSet::new();
    let mut by_class = Vec::new();
    for (class, name, allow) in CLASSES {
        let pending: Vec<_> = s
            .pending
            .iter()
            .filter(|p| p.sla_class == class && known.contains(p.host_id.as_str()))
            .collect();
        let late: Vec<(&str, i64)> = pending
            .iter()
            .filter_map(|p| {
                let late = now.saturating_sub(p.since).saturating_sub(allow);
                (late > 0).then_some((p.host_id.as_str(), late))
            })
            .collect();
        let hosts_late: HashSet<&str> = late.iter().map(|(h, _)| *h).collect();
        non_compliant.extend(hosts_late.iter().copied());
        let compliant = inventoried
            .iter()
            .filter(|h| !hosts_late.contains(*h))
            .count();
        by_class.push(ClassFigures {
            class: name,
            sla_hours: allow / 3600,
            compliance_percent: percent(compliant, inventoried.len()),
            pending: pending.len(),
            overdue: late.len(),
            hosts_overdue: hosts_late.len(),
            max_days_overdue: late
                .iter()
                .map(|(_, d)| *d)
                .max()
                .map(|d| d as f64 / 86400.0),
            mean_time_to_patch_hours: mean_hours(
                s.resolved
                    .iter()
                    .filter(|r| r.sla_class == class)
                    .map(|r| r.resolved_at.saturating_sub(r.since)),
            ),
        });
    }
    (by_class, non_compliant)
}

/// Compliance by the hosts' `environment` label, over the hosts whose inventory is known.
fn by_environment(
    s: &FleetSnapshot,
    inventoried: &[&str],
    non_compliant: &HashSet<&str>,
) -> BTreeMap<String, EnvFigures> {
    let known: HashSet<&str> = inventoried.iter().copied().collect();
    let mut by_environment: BTreeMap<String, EnvFigures> = BTreeMap::new();
    for h in s
        .hosts
        .iter()
        .filter(|h| known.contains(h.host_id.as_str()))
    {
        let env = h
            .labels
            .get("environment")
            .cloned()
            .unwrap_or_else(|| "(none)".into());
        let e = by_environment.entry(env).or_insert(EnvFigures {
            hosts: 0,
            compliant: 0,
            compliance_percent: 0.0,
        });
        e.hosts += 1;
        if !non_compliant.contains(h.host_id.as_str()) {
            e.compliant += 1;
        }
    }
    for e in by_environment.values_mut() {
        e.compliance_percent = percent(e.compliant, e.hosts).unwrap_or(0.0);
    }
    by_environment
}

/// Counts over final job reports: jobs that ran (not dry runs, not refused), failures, and
/// reboots attempted and confirmed.
struct JobFigures {
    ran: usize,
    failed: usize,
    reboots: usize,
    reboots_ok: usize,
}

fn job_figures(s: &FleetSnapshot) -> JobFigures {
    let ran: Vec<_> = s
        .jobs
        .iter()
        .filter(|j| j.r#final && !j.dry_run)
        .filter(|j| {
            matches!(
                j.state.as_str(),
                "SUCCEEDED" | "SUCCEEDED_REBOOT_REQUIRED" | "FAILED" | "TIMED_OUT" | "INTERRUPTED"
            )
        })
        .collect();
    JobFigures {
        ran: ran.len(),
        failed: ran
            .iter()
            .filter(|j| matches!(j.state.as_str(), "FAILED" | "TIMED_OUT" | "INTERRUPTED"))
            .count(),
        reboots: s.jobs.iter().filter(|j| j.reboot_attempted).count(),
        reboots_ok: s
            .jobs
            .iter()
            .filter(|j| j.reboot_attempted && j.reboot_succeeded)
            .count(),
    }
}

fn pct(p: Option<f64>) -> String {
    p.map_or_else(|| "n/a".into(), |p| format!("{p:.1}%"))
}

fn bar(p: Option<f64>) -> String {
    let n = p.map_or(0, |p| (p / 10.0).round() as usize).min(10);
    format!("{}{}", "#".repeat(n), ".".repeat(10 - n))
}

/// The terminal view.
pub fn render(d: &Dashboard) -> String {
    let mut o = String::new();
    o.push_str("PATCH COMPLIANCE DASHBOARD\n");
    o.push_str(&format!(
        "as of {}\n\n",
        patch_agent_wire::time::rfc3339_secs(d.generated_at)
    ));
    o.push_str(&format!(
        "OVERALL COMPLIANCE: {}  ({} of {} known hosts)   UNKNOWN: {} of {} hosts\n",
        pct(d.overall_compliance_percent),
        d.hosts_compliant,
        d.hosts_known,
        d.hosts_unknown,
        d.hosts
    ));
    if d.hosts_unknown > 0 {
        o.push_str(&format!(
            "  unknown: {} with scan or repository errors, {} not scanned in {:.0}h, {} never sent an inventory\n",
            d.hosts_unknown_scan_errors,
            d.hosts_unknown_stale,
            d.stale_after_hours,
            d.hosts_unknown_no_inventory
        ));
    }
    o.push('\n');
    o.push_str(
        "By severity (SLA)        compliance             pending  overdue  max over  MTTP\n",
    );
    for c in &d.by_class {
        o.push_str(&format!(
            "  {:<8} {:>5}h      {:>6} {}  {:>7}  {:>7}  {:>8}  {}\n",
            c.class,
            c.sla_hours,
            pct(c.compliance_percent),
            bar(c.compliance_percent),
            c.pending,
            c.overdue,
            c.max_days_overdue
                .map_or_else(|| "-".into(), |d| format!("{d:.1}d")),
            c.mean_time_to_patch_hours
                .map_or_else(|| "-".into(), |h| format!("{h:.1}h")),
        ));
    }
    o.push_str("\nBy environment           compliance             hosts\n");
    for (env, e) in &d.by_environment {
        o.push_str(&format!(
            "  {:<22} {:>6} {}  {:>5}\n",
            env,
            pct(Some(e.compliance_percent)),
            bar(Some(e.compliance_percent)),
            e.hosts
        ));
    }
    o.push_str(&format!(
        "\nMean time to patch:   {}\n",
        d.mean_time_to_patch_hours
            .map_or_else(|| "n/a".into(), |h| format!("{h:.1} h"))
    ));
    o.push_str(&format!(
        "Patch failure rate:   {} ({} of {} jobs)\n",
        pct(d.patch_failure_rate_percent),
        d.jobs_failed,
        d.jobs_ran
    ));
    o.push_str(&format!(
        "Reboot success rate:  {} ({} of {} reboots)\n",
        pct(d.reboot_success_rate_percent),
        d.reboots_succeeded,
        d.reboots
    ));
    o.push_str(&format!(
        "Hosts needing a reboot: {}\n",
        d.hosts_reboot_required
    ));
    if d.reports_dropped != (0, 0) {
        o.push_str(&format!(
            "Reports dropped by full agent outboxes: {} progress, {} results\n",
            d.reports_dropped.0, d.reports_dropped.1
        ));
    }
    o
}

/// The terminal view of the daily history: one line a day, oldest first.
pub fn render_history(days: &[crate::store::dashboard::Daily]) -> String {
    let mut o = String::from(
        "DATE        HOSTS  KNOWN  COMPLIANT  CRITICAL  HIGH    MEDIUM  LOW     PENDING  OVERDUE  MTTP     FAILURES\n",
    );
    for d in days {
        let class = |i: usize| pct(d.class_compliance_percent.get(i).copied().flatten());
        o.push_str(&format!(
            "{:<10}  {:>5}  {:>5}  {:>9}  {:>8}  {:>6}  {:>6}  {:>6}  {:>7}  {:>7}  {:>7}  {:>8}\n",
            patch_agent_wire::time::rfc3339_secs(d.day * 86_400)
                .get(..10)
                .unwrap_or_default(),
            d.hosts,
            d.hosts_known,
            pct(d.overall_compliance_percent),
            class(0),
            class(1),
            class(2),
            class(3),
            d.pending,
            d.overdue,
            d.mean_time_to_patch_hours
                .map_or_else(|| "-".into(), |h| format!("{h:.1}h")),
            pct(d.patch_failure_rate_percent),
        ));
    }
    if days.is_empty() {
        o.push_str(
            "(no daily snapshots yet: `patchctl serve` records one at start and every hour)\n",
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::super::store::{HostRow, JobRow, PendingRow, ResolvedRow};
    use super::*;

    fn host(id: &str, env: Option<&str>) -> HostRow {
        HostRow {
            host_id: id.into(),
            labels: env
                .map(|e| [("environment".to_string(), e.to_string())].into())
                .unwrap_or_default(),
            agent_version: String::new(),
            last_seen: 0,
            has_inventory: true,
            scan_errors: 0,
            scanned_at: Some(1_000 * 86400 - 3600),
            reboot_required: false,
            dropped_progress: 0,
            dropped_final: 0,
        }
    }

    fn job(state: &str, dry: bool, reboot: Option<bool>) -> JobRow {
        JobRow {
            host_id: "a".into(),
            job_id: "j".into(),
            state: state.into(),
            r#final: true,
            reason: String::new(),
            summary: String::new(),
            dry_run: dry,
            key_id: String::new(),
            submitted_at: None,
            started_at: None,
            finished_at: None,
            reboot_attempted: reboot.is_some(),
            reboot_succeeded: reboot == Some(true),
            packages: vec![],
            updated_at: 0,
        }
    }

    #[test]
    fn figures_follow_the_definitions() {
        let now = 1_000 * 86400;
        let day = 86400;
        let s = FleetSnapshot {
            hosts: vec![
                host("a", Some("production")),
                host("b", Some("production")),
                host("c", Some("staging")),
                host("d", None),
            ],
            pending: vec![
                // a: critical 4 days old (overdue by 1 day).
                PendingRow {
                    host_id: "a".into(),
                    name: "openssl".into(),
                    sla_class: 1,
                    since: now - 4 * day,
                },
                // b: critical 2 days old (within 72 h), high 10 days old (overdue by 3 days).
                PendingRow {
                    host_id: "b".into(),
                    name: "bash".into(),
                    sla_class: 1,
                    since: now - 2 * day,
                },
                PendingRow {
                    host_id: "b".into(),
                    name: "curl".into(),
                    sla_class: 2,
                    since: now - 10 * day,
                },
                // c: low 50 days old (within 90 days).
                PendingRow {
                    host_id: "c".into(),
                    name: "vim".into(),
                    sla_class: 4,
                    since: now - 50 * day,
                },
            ],
            resolved: vec![
                ResolvedRow {
                    host_id: "d".into(),
                    name: "x".into(),
                    sla_class: 1,
                    since: 0,
                    resolved_at: 3600 * 24,
                },
                ResolvedRow {
                    host_id: "d".into(),
                    name: "y".into(),
                    sla_class: 3,
                    since: 0,
                    resolved_at: 3600 * 48,
                },
            ],
            jobs: vec![
                job("SUCCEEDED", false, Some(true)),
                job("SUCCEEDED_REBOOT_REQUIRED", false, None),
                job("FAILED", false, Some(false)),
                job("TIMED_OUT", false, None),
                job("FAILED", true, None),
                job("CANCELLED", false, None),
            ],
        };
        let d = compute(&s, now, 48 * 3600);
        assert_eq!(d.hosts_compliant, 2);
        assert_eq!(d.overall_compliance_percent, Some(50.0));
        let c = &d.by_class[0];
        assert_eq!((c.pending, c.overdue, c.hosts_overdue), (2, 1, 1));
        assert_eq!(c.compliance_percent, Some(75.0));
        assert_eq!(c.max_days_overdue, Some(1.0));
        assert_eq!(c.mean_time_to_patch_hours, Some(24.0));
        let h = &d.by_class[1];
        assert_eq!((h.overdue, h.compliance_percent), (1, Some(75.0)));
        assert_eq!(h.max_days_overdue, Some(3.0));
        assert_eq!(d.by_class[3].overdue, 0);
        assert_eq!(d.by_environment["production"].compliance_percent, 0.0);
        assert_eq!(d.by_environment["staging"].compliance_percent, 100.0);
        assert_eq!(d.by_environment["(none)"].hosts, 1);
        assert_eq!(d.mean_time_to_patch_hours, Some(36.0));
        assert_eq!((d.jobs_ran, d.jobs_failed), (4, 2));
        assert_eq!(d.patch_failure_rate_percent, Some(50.0));
        assert_eq!((d.reboots, d.reboots_succeeded), (2, 1));
        assert_eq!(d.reboot_success_rate_percent, Some(50.0));
        assert!(render(&d).contains("OVERALL COMPLIANCE: 50.0%"));
        assert_eq!((d.hosts_known, d.hosts_unknown), (4, 0));
    }

    #[test]
    fn hosts_with_scan_errors_stale_or_without_inventory_are_unknown() {
        let now = 1_000 * 86400;
        let mut errors = host("errors", None);
        errors.scan_errors = 1;
        let mut stale = host("stale", None);
        stale.scanned_at = Some(now - 49 * 3600);
        let mut never = host("never", None);
        never.has_inventory = false;
        let s = FleetSnapshot {
            hosts: vec![host("ok", None), errors, stale, never],
            pending: vec![PendingRow {
                // Overdue, but on a host whose scan is stale: not counted.
                host_id: "stale".into(),
                name: "openssl".into(),
                sla_class: 1,
                since: now - 10 * 86400,
            }],
            ..FleetSnapshot::default()
        };
        let d = compute(&s, now, 48 * 3600);
        assert_eq!((d.hosts_known, d.hosts_unknown), (1, 3));
        assert_eq!(
            (
                d.hosts_unknown_scan_errors,
                d.hosts_unknown_stale,
                d.hosts_unknown_no_inventory
            ),
            (1, 1, 1)
        );
        assert_eq!(d.overall_compliance_percent, Some(100.0));
        assert_eq!(d.by_class[0].overdue, 0);
        let text = render(&d);
        assert!(text.contains("UNKNOWN: 3 of 4 hosts"), "{text}");
        // Hostile stored times never overflow.
        let mut s = s;
        s.pending[0].since = i64::MIN;
        s.hosts[2].scanned_at = Some(i64::MIN);
        let _ = compute(&s, i64::MAX, i64::MAX);
    }
}
