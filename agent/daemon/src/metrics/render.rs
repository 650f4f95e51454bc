//! The metrics of one scrape, built with `prometheus-client` from what the agent already
//! knows.
//!
//! Names the node-exporter textfile collectors use (`apt_info.py`, `yum.sh` from
//! prometheus-community's node-exporter-textfile-collector-scripts) keep their meaning, so
//! dashboards and alerts built on them keep working when the agent replaces the scripts:
//! - `apt_upgrades_pending{origin,arch}`, `apt_upgrades_held{origin,arch}` on apt hosts;
//! - `yum_upgrades_pending{origin}` on dnf hosts;
//! - `node_reboot_required`.
//!
//! The agent's own are prefixed `patchagent_`; see docs/OPERATIONS.md for each.

use super::process::Stats;
use crate::jobs::engine::Rejections;
use crate::pkg::scanner::Snapshot;
use crate::pkg::{Classification, SlaClass};
use patch_agent_service::telemetry::metric_label as label;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// What one scrape reads.
pub struct Inputs<'a> {
    /// The package manager's name ("apt", "dnf", "zypper"); None without a backend.
    pub manager: Option<&'static str>,
    pub snapshot: Option<&'a Snapshot>,
    pub now: SystemTime,
    pub jobs: BTreeMap<&'static str, u64>,
    pub rejections: Rejections,
    /// Reports waiting in the outbox; None when the agent reports to no controller.
    pub outbox: Option<usize>,
    pub version: &'static str,
    pub process: Option<Stats>,
}

const CLASSES: [(SlaClass, &str); 4] = [
    (SlaClass::Critical, "critical"),
    (SlaClass::High, "high"),
    (SlaClass::Medium, "medium"),
    (SlaClass::Low, "low"),
];

fn class_name(c: SlaClass) -> &'static str {
    CLASSES
        .iter()
        .find(|(k, _)| *k == c)
        .map_or("low", |(_, n)| n)
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `apt_info.py`'s origin label: the candidate's origins, sorted, without repeats, joined by ",".
fn apt_origin(origin: &str) -> String {
    let mut parts: Vec<&str> = origin
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    parts.sort_unstable();
    parts.dedup();
    parts.join(",")
}

/// Counts per label set, registered as a gauge family; when `always` is given and nothing
/// was counted, that one series is written with 0 (as the textfile scripts do), so an alert
/// on the series sees a zero rather than nothing.
fn gauge_counts(
    registry: &mut Registry,
    name: &str,
    help: &str,
    counts: BTreeMap<Labels, i64>,
    always: Option<Labels>,
) {
    let family = Family::<Labels, Gauge>::default();
    if counts.is_empty()
        && let Some(labels) = always
    {
        family.get_or_create(&labels).set(0);
    }
    for (labels, n) in counts {
        family.get_or_create(&labels).set(n);
    }
    registry.register(name, help, family);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    registry.register(name, help, g);
}

fn float_gauge(registry: &mut Registry, name: &str, help: &str, v: f64) {
    let g = FloatGauge::default();
    g.set(v);
    registry.register(name, help, g);
}

/// The scrape's text (OpenMetrics, which Prometheus reads).
pub fn render(i: &Inputs) -> String {
    let mut r = Registry::default();
    if let Some(snap) = i.snapshot.filter(|s| s.updates_at.is_some()) {
        scan_metrics(&mut r, i, snap);
    }
    agent_metrics(&mut r, i);
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// What the last scan found: present once a scan has ended.
fn scan_metrics(r: &mut Registry, i: &Inputs, snap: &Snapshot) {
    let updates = &snap.updates.updates;
    match i.manager {
        Some("apt") => {
            let mut pending = BTreeMap::new();
            for u in updates {
                *pending
                    .entry(vec![
                        ("origin", label(&apt_origin(&u.origin))),
                        ("arch", label(&u.arch)),
                    ])
                    .or_insert(0) += 1;
            }
            let empty = vec![("origin", String::new()), ("arch", String::new())];
            gauge_counts(
                r,
                "apt_upgrades_pending",
                "Apt package pending updates by origin",
                pending,
                Some(empty.clone()),
            );
            let mut held = BTreeMap::new();
            for h in &snap.updates.held {
                // A held update's architecture is its installed package's; apt does not say
                // which origin the candidate it refuses comes from.
                let arch = snap
                    .packages
                    .iter()
                    .find(|p| p.name == h.name)
                    .map_or_else(String::new, |p| label(&p.arch));
                *held
                    .entry(vec![("origin", String::new()), ("arch", arch)])
                    .or_insert(0) += 1;
            }
            gauge_counts(
                r,
                "apt_upgrades_held",
                "Apt package updates that are held back",
                held,
                Some(empty),
            );
        }
        Some("dnf") => {
            let mut pending = BTreeMap::new();
            for u in updates {
                *pending
                    .entry(vec![("origin", label(&u.origin))])
                    .or_insert(0) += 1;
            }
            gauge_counts(
                r,
                "yum_upgrades_pending",
                "Yum package pending updates by origin",
                pending,
                Some(vec![("origin", String::new())]),
            );
        }
        _ => {}
    }
    gauge(
        r,
        "node_reboot_required",
        "Node reboot is required for software updates",
        i64::from(snap.reboot.required),
    );

    let mut by_class: BTreeMap<Labels, i64> = BTreeMap::new();
    let mut overdue: BTreeMap<Labels, i64> = BTreeMap::new();
    for (_, name) in CLASSES {
        for security in ["true", "false"] {
            by_class.insert(
                vec![("sla_class", name.into()), ("security", security.into())],
                0,
            );
        }
        overdue.insert(vec![("sla_class", name.into())], 0);
    }
    for u in updates {
        let class = class_name(u.sla);
        let security = u.classification == Classification::Security;
        *by_class
            .entry(vec![
                ("sla_class", class.into()),
                ("security", security.to_string()),
            ])
            .or_insert(0) += 1;
        let since = u.issued.or(u.first_seen);
        if since.is_some_and(|s| s + u.sla.deadline() < i.now) {
            *overdue
                .entry(vec![("sla_class", class.into())])
                .or_insert(0) += 1;
        }
    }
    gauge_counts(
        r,
        "patchagent_updates_pending",
        "Pending updates by SLA class (Critical 72h, High 7d, Medium 30d, Low 90d) and whether they fix a security issue",
        by_class,
        None,
    );
    gauge_counts(
        r,
        "patchagent_updates_overdue",
        "Pending updates past their SLA deadline (from the advisory's issue date, else from when the agent first saw them)",
        overdue,
        None,
    );
    if let Some(at) = snap.updates_at {
        float_gauge(
            r,
            "patchagent_last_scan_timestamp_seconds",
            "When the last update scan ended, unix seconds",
            secs(at),
        );
    }
    gauge(
        r,
        "patchagent_scan_errors",
        "Failures of the last scan: unreadable repositories and failed commands (0 when it succeeded)",
        (snap.errors.len() + snap.updates.repo_errors.len()) as i64,
    );
}

/// The agent's own counters and facts, always present.
fn agent_metrics(r: &mut Registry, i: &Inputs) {
    let jobs = Family::<Labels, Counter>::default();
    for (state, n) in &i.jobs {
        jobs.get_or_create(&vec![("state", (*state).to_string())])
            .inc_by(*n);
    }
    r.register(
        "patchagent_jobs",
        "Jobs admitted (state QUEUED) and jobs that ended, by state, since the agent started",
        jobs,
    );
    let refused = Family::<Labels, Counter>::default();
    for (code, n) in &i.rejections {
        refused
            .get_or_create(&vec![("code", (*code).to_string())])
            .inc_by(*n);
    }
    r.register(
        "patchagent_job_rejections",
        "Job submissions refused, by reason, since the agent started",
        refused,
    );
    if let Some(n) = i.outbox {
        gauge(
            r,
            "patchagent_outbox_reports",
            "Reports waiting in the outbox for the controller",
            n as i64,
        );
    }
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![("version", label(i.version))])
        .set(1);
    r.register("patchagent_build_info", "The agent's version", info);
    if let Some(p) = &i.process {
        let cpu = Counter::<f64, AtomicU64>::default();
        cpu.inc_by(p.cpu_seconds);
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        gauge(
            r,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes as i64,
        );
        gauge(
            r,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes as i64,
        );
        float_gauge(
            r,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            p.start_time_seconds,
        );
        gauge(
            r,
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds as i64,
        );
        if let Some(max) = p.max_fds {
            gauge(
                r,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max as i64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkg::{HeldUpdate, Package, RebootState, Severity, Update, UpdateScan};
    use std::sync::Arc;
    use std::time::Duration;

    fn update(
        name: &str,
        origin: &str,
        class: Classification,
        sev: Severity,
        age_days: u64,
    ) -> Update {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Update {
            name: name.into(),
            arch: "amd64".into(),
            installed_version: "1".into(),
            candidate_version: "2".into(),
            origin: origin.into(),
            classification: class,
            severity: sev,
            advisories: vec![],
            cves: vec![],
            issued: None,
            first_seen: Some(now - Duration::from_secs(age_days * 86_400)),
            sla: SlaClass::of(class, sev),
            category: String::new(),
            bug_ids: vec![],
            flags: Default::default(),
        }
    }

    fn inputs<'a>(manager: &'static str, snap: Option<&'a Snapshot>) -> Inputs<'a> {
        Inputs {
            manager: Some(manager),
            snapshot: snap,
            now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            jobs: BTreeMap::from([("QUEUED", 3), ("SUCCEEDED", 2)]),
            rejections: BTreeMap::from([("replay", 1)]),
            outbox: Some(4),
            version: "9.9.9",
            process: None,
        }
    }

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn apt_host_names_and_values() {
        let snap = Snapshot {
            updates: Arc::new(UpdateScan {
                updates: vec![
                    update(
                        "openssl",
                        "Debian-Security:12/stable-security, Debian:12/stable",
                        Classification::Security,
                        Severity::Critical,
                        4,
                    ),
                    update(
                        "curl",
                        "Debian:12/stable,Debian-Security:12/stable-security",
                        Classification::Security,
                        Severity::Unknown,
                        1,
                    ),
                    update(
                        "vim",
                        "Debian:12/stable",
                        Classification::Other,
                        Severity::Unknown,
                        0,
                    ),
                ],
                held: vec![HeldUpdate {
                    name: "linux-image".into(),
                    installed_version: "1".into(),
                    candidate_version: "2".into(),
                    reason: "dpkg hold".into(),
                }],
                repo_errors: vec![],
            }),
            packages: Arc::new(vec![Package {
                name: "linux-image".into(),
                epoch: 0,
                version: "1".into(),
                release: String::new(),
                arch: "amd64".into(),
                source: "linux".into(),
                state: "installed",
                held: true,
            }]),
            updates_at: Some(UNIX_EPOCH + Duration::from_secs(1_799_999_000)),
            reboot: RebootState {
                required: true,
                ..Default::default()
            },
            errors: vec!["one".into()],
            ..Default::default()
        };
        let text = render(&inputs("apt", Some(&snap)));
        // The two security updates share one origin set however apt ordered it.
        assert_eq!(
            line(
                &text,
                "apt_upgrades_pending{origin=\"Debian-Security:12/stable-security,Debian:12/stable\",arch=\"amd64\"}"
            ),
            Some(
                "apt_upgrades_pending{origin=\"Debian-Security:12/stable-security,Debian:12/stable\",arch=\"amd64\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("apt_upgrades_pending{origin=\"Debian:12/stable\",arch=\"amd64\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("apt_upgrades_held{origin=\"\",arch=\"amd64\"} 1"),
            "{text}"
        );
        assert!(text.contains("\nnode_reboot_required 1\n"), "{text}");
        assert!(
            text.contains("patchagent_updates_pending{sla_class=\"critical\",security=\"true\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_updates_pending{sla_class=\"high\",security=\"true\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_updates_pending{sla_class=\"low\",security=\"false\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_updates_pending{sla_class=\"medium\",security=\"true\"} 0"),
            "{text}"
        );
        // Critical allows 72 hours: four days is overdue; the High one a day old is not.
        assert!(
            text.contains("patchagent_updates_overdue{sla_class=\"critical\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_updates_overdue{sla_class=\"high\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_last_scan_timestamp_seconds 1799999000"),
            "{text}"
        );
        assert!(text.contains("\npatchagent_scan_errors 1\n"), "{text}");
        assert!(
            text.contains("patchagent_jobs_total{state=\"SUCCEEDED\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("patchagent_job_rejections_total{code=\"replay\"} 1"),
            "{text}"
        );
        assert!(text.contains("\npatchagent_outbox_reports 4\n"), "{text}");
        assert!(
            text.contains("patchagent_build_info{version=\"9.9.9\"} 1"),
            "{text}"
        );
        assert!(!text.contains("yum_"), "{text}");
        assert!(
            text.contains("# HELP apt_upgrades_pending Apt package pending updates by origin.\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("..\n"),
            "the encoder ends each HELP with its own period: {text}"
        );
    }

    #[test]
    fn dnf_host_and_no_updates() {
        let mut snap = Snapshot {
            updates_at: Some(UNIX_EPOCH),
            ..Default::default()
        };
        let text = render(&inputs("dnf", Some(&snap)));
        assert!(
            text.contains("yum_upgrades_pending{origin=\"\"} 0"),
            "{text}"
        );
        assert!(text.contains("\nnode_reboot_required 0\n"), "{text}");
        assert!(!text.contains("apt_"), "{text}");
        snap.updates = Arc::new(UpdateScan {
            updates: vec![update(
                "bash",
                "updates",
                Classification::Bugfix,
                Severity::Low,
                0,
            )],
            ..Default::default()
        });
        let text = render(&inputs("dnf", Some(&snap)));
        assert!(
            text.contains("yum_upgrades_pending{origin=\"updates\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("yum_upgrades_pending{origin=\"\"}"),
            "{text}"
        );
    }

    #[test]
    fn before_the_first_scan_there_is_no_scan_data_rather_than_zeros() {
        let snap = Snapshot::default();
        let text = render(&inputs("apt", Some(&snap)));
        for absent in [
            "apt_upgrades_pending",
            "node_reboot_required",
            "patchagent_updates_pending",
            "patchagent_last_scan",
        ] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
        assert!(text.contains("patchagent_build_info"), "{text}");
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let snap = Snapshot {
            updates: Arc::new(UpdateScan {
                updates: vec![update(
                    "x",
                    "evil\"} 1\nnode_reboot_required 0 #\\",
                    Classification::Other,
                    Severity::Low,
                    0,
                )],
                ..Default::default()
            }),
            updates_at: Some(UNIX_EPOCH),
            ..Default::default()
        };
        let text = render(&inputs("dnf", Some(&snap)));
        assert!(
            text.contains(
                r#"yum_upgrades_pending{origin="evil\"} 1\nnode_reboot_required 0 #\\"} 1"#
            ),
            "{text}"
        );
        assert_eq!(text.matches("\nnode_reboot_required ").count(), 1, "{text}");
    }
}
