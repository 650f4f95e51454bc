//! The dashboard's pages: each reads the store, builds one serializable value (the JSON twin)
//! and renders it.

use super::{Failure, Format, Web, charts, respond};
use crate::store::views::{Exposure, HostView, SEVERITIES, parse_cve};
use crate::store::{JobRow, dashboard::Daily};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use patch_agent_wire::proto::v1 as pb;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

type Params = Query<HashMap<String, String>>;
type Page = Result<Response, Failure>;

/// Days of daily figures the trend shows.
pub const TREND_DAYS: i64 = 90;
/// Hosts per page of the hosts list.
pub const HOSTS_PER_PAGE: usize = 500;

fn format_of(q: &HashMap<String, String>) -> Result<Format, Failure> {
    Format::parse(q.get("format").map(String::as_str))
}

/// The fleet page's data: `patchctl compliance --json` and the daily history.
#[derive(Serialize)]
pub struct Fleet {
    pub compliance: crate::compliance::Dashboard,
    pub history: Vec<Daily>,
}

/// The fleet page's charts and derived figures, for the template (and the HTML export).
pub fn fleet_extras(f: &Fleet) -> minijinja::Value {
    let d = &f.compliance;
    let class_bars: Vec<(String, Option<f64>)> = d
        .by_class
        .iter()
        .map(|c| (c.class.to_string(), c.compliance_percent))
        .collect();
    let env_bars: Vec<(String, Option<f64>)> = d
        .by_environment
        .iter()
        .map(|(name, e)| (name.clone(), Some(e.compliance_percent)))
        .collect();
    let points: Vec<(i64, Option<f64>)> = f
        .history
        .iter()
        .map(|day| (day.day, day.overall_compliance_percent))
        .collect();
    minijinja::context! {
        d => minijinja::Value::from_serialize(d),
        hosts_overdue => d.hosts_known.saturating_sub(d.hosts_compliant),
        class_chart => minijinja::Value::from_safe_string(charts::percent_bars("Compliance by SLA class", &class_bars)),
        env_chart => minijinja::Value::from_safe_string(charts::percent_bars("Compliance by environment", &env_bars)),
        trend_chart => minijinja::Value::from_safe_string(charts::trend("Overall compliance, daily", &points)),
        generated_at => d.generated_at,
    }
}

pub async fn fleet(State(web): State<Arc<Web>>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    let now = crate::now();
    let compliance = web
        .store
        .compliance(now, web.stale_after)
        .await
        .map_err(|e| Failure::store(format, e))?;
    let history = web
        .store
        .compliance_history(now.div_euclid(86_400) - TREND_DAYS + 1)
        .await
        .map_err(|e| Failure::store(format, e))?;
    let data = Fleet {
        compliance,
        history,
    };
    let extra = fleet_extras(&data);
    respond(&web, format, "fleet.html", "Fleet compliance", &data, extra)
}

/// The hosts list's filters, as given (echoed into the form).
#[derive(Debug, Default, Serialize)]
struct HostFilter {
    label: String,
    compliance: String,
    severity: String,
    reboot: String,
}

impl HostFilter {
    fn parse(q: &HashMap<String, String>, format: Format) -> Result<Self, Failure> {
        let get = |k: &str| q.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
        let f = HostFilter {
            label: get("label"),
            compliance: get("compliance"),
            severity: get("severity"),
            reboot: get("reboot"),
        };
        if !f.label.is_empty() {
            let Some((k, v)) = f.label.split_once('=') else {
                return Err(Failure::bad(
                    format,
                    format!(
                        "label {:?}: write it as KEY=VALUE, e.g. environment=production",
                        f.label
                    ),
                ));
            };
            patch_agent_wire::ids::check_label(k, v)
                .map_err(|e| Failure::bad(format, format!("label {:?}: {e}", f.label)))?;
        }
        let one_of = |what: &str, v: &str, allowed: &[&str]| {
            if v.is_empty() || allowed.contains(&v) {
                Ok(())
            } else {
                Err(Failure::bad(
                    format,
                    format!("{what} {v:?} is not one of {}", allowed.join(", ")),
                ))
            }
        };
        one_of(
            "compliance",
            &f.compliance,
            &["compliant", "overdue", "unknown"],
        )?;
        one_of("severity", &f.severity, &SEVERITIES.map(|(_, name)| name))?;
        one_of("reboot", &f.reboot, &["1", "0"])?;
        Ok(f)
    }

    fn matches(&self, h: &HostView) -> bool {
        let rank = |name: &str| SEVERITIES.iter().find(|(_, n)| *n == name).map(|(r, _)| *r);
        (self.label.is_empty()
            || self
                .label
                .split_once('=')
                .is_some_and(|(k, v)| h.labels.get(k).is_some_and(|x| x == v)))
            && (self.compliance.is_empty() || h.compliance == self.compliance)
            && (self.severity.is_empty()
                || matches!((rank(h.worst_severity), rank(&self.severity)), (Some(w), Some(s)) if w <= s))
            && (self.reboot.is_empty() || h.reboot_required == (self.reboot == "1"))
    }

    /// The query string for these filters at `offset`.
    fn query(&self, offset: usize) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("label", &self.label),
            ("compliance", &self.compliance),
            ("severity", &self.severity),
            ("reboot", &self.reboot),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", encode(v)));
            }
        }
        parts.push(format!("offset={offset}"));
        parts.join("&")
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Serialize)]
struct HostsPage {
    filter: HostFilter,
    total: usize,
    matched: usize,
    offset: usize,
    shown: usize,
    next_page: Option<String>,
    hosts: Vec<HostView>,
}

pub async fn hosts(State(web): State<Arc<Web>>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    let filter = HostFilter::parse(&q, format)?;
    let offset = match q.get("offset").map(String::as_str) {
        None | Some("") => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Failure::bad(format, format!("offset {v:?} is not a number")))?,
    };
    let all = web
        .store
        .host_views(crate::now(), web.stale_after, None)
        .await
        .map_err(|e| Failure::store(format, e))?;
    let total = all.len();
    let matching: Vec<HostView> = all.into_iter().filter(|h| filter.matches(h)).collect();
    let matched = matching.len();
    let hosts: Vec<HostView> = matching
        .into_iter()
        .skip(offset)
        .take(HOSTS_PER_PAGE)
        .collect();
    let shown = hosts.len();
    let next_page =
        (offset + shown < matched).then(|| format!("/hosts?{}", filter.query(offset + shown)));
    let page = HostsPage {
        filter,
        total,
        matched,
        offset,
        shown,
        next_page,
        hosts,
    };
    respond(
        &web,
        format,
        "hosts.html",
        "Hosts",
        &page,
        minijinja::Value::UNDEFINED,
    )
}

/// A pending update as the host page shows it.
#[derive(Serialize)]
struct PendingUpdate {
    name: String,
    arch: String,
    installed: String,
    candidate: String,
    classification: String,
    severity: String,
    sla_class: String,
    /// Its SLA clock's start plus the class's allowance; None when the agent gave no time.
    deadline: Option<i64>,
    overdue: bool,
    advisories: Vec<String>,
    cves: Vec<String>,
    category: String,
}

/// An enum's proto name without its prefix, lower case ("SEVERITY_CRITICAL" -> "critical").
fn word(name: Option<&str>, prefix: &str) -> String {
    name.map(|n| n.trim_start_matches(prefix).to_ascii_lowercase())
        .unwrap_or_default()
}

fn pending_update(u: &pb::Update, now: i64) -> PendingUpdate {
    let since = u
        .issued
        .as_ref()
        .or(u.first_seen.as_ref())
        .map(|t| t.seconds);
    let allow = crate::compliance::CLASSES
        .iter()
        .find(|(c, _, _)| *c == u.sla_class)
        .map_or(90 * 86_400, |(_, _, a)| *a);
    let deadline = since.map(|s| s.saturating_add(allow));
    PendingUpdate {
        name: u.name.clone(),
        arch: u.architecture.clone(),
        installed: u.installed_version.clone(),
        candidate: u.candidate_version.clone(),
        classification: word(
            pb::Classification::try_from(u.classification)
                .ok()
                .map(|c| c.as_str_name()),
            "CLASSIFICATION_",
        ),
        severity: word(
            pb::Severity::try_from(u.severity)
                .ok()
                .map(|c| c.as_str_name()),
            "SEVERITY_",
        ),
        sla_class: word(
            pb::SlaClass::try_from(u.sla_class)
                .ok()
                .map(|c| c.as_str_name()),
            "SLA_CLASS_",
        ),
        deadline,
        overdue: deadline.is_some_and(|d| now > d),
        advisories: u.advisory_ids.clone(),
        cves: u.cve_ids.clone(),
        category: u.category.clone(),
    }
}

/// What the host's last inventory says about the machine.
#[derive(Serialize, Default)]
struct Facts {
    os: String,
    kernel: String,
    architecture: String,
    manager: String,
    boot_time: Option<i64>,
    packages: usize,
    reboot_method: String,
    reboot_evidence: Vec<String>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct HostPage {
    host: HostView,
    facts: Facts,
    updates: Vec<PendingUpdate>,
    held: Vec<Held>,
    jobs: Vec<JobRow>,
}

#[derive(Serialize)]
struct Held {
    name: String,
    installed_version: String,
    candidate_version: String,
    reason: String,
}

pub async fn host(State(web): State<Arc<Web>>, Path(id): Path<String>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    let now = crate::now();
    let fail = |e| Failure::store(format, e);
    let Some(host) = web
        .store
        .host_views(now, web.stale_after, Some(id.clone()))
        .await
        .map_err(fail)?
        .into_iter()
        .next()
    else {
        return Err(Failure::not_found(
            format,
            format!("the controller knows no host {id:?}; see /hosts"),
        ));
    };
    let inv = web.store.inventory_of(id.clone()).await.map_err(fail)?;
    let jobs = web.store.history(Some(id), None).await.map_err(fail)?;
    let (facts, updates, held) = match inv {
        None => (Facts::default(), Vec::new(), Vec::new()),
        Some(inv) => (
            Facts {
                os: inv
                    .os
                    .as_ref()
                    .map(|o| o.pretty_name.clone())
                    .unwrap_or_default(),
                kernel: inv.kernel_release.clone(),
                architecture: inv.architecture.clone(),
                manager: inv.manager.clone(),
                boot_time: inv.boot_time.as_ref().map(|t| t.seconds),
                packages: inv.packages.len(),
                reboot_method: inv
                    .reboot
                    .as_ref()
                    .map(|r| r.method.clone())
                    .unwrap_or_default(),
                reboot_evidence: inv
                    .reboot
                    .as_ref()
                    .map(|r| r.evidence.clone())
                    .unwrap_or_default(),
                errors: inv
                    .repo_errors
                    .iter()
                    .map(|e| format!("{}: {}", e.repo, e.error))
                    .chain(inv.scan_errors.iter().cloned())
                    .collect(),
            },
            inv.updates.iter().map(|u| pending_update(u, now)).collect(),
            inv.held
                .iter()
                .map(|h| Held {
                    name: h.name.clone(),
                    installed_version: h.installed_version.clone(),
                    candidate_version: h.candidate_version.clone(),
                    reason: h.reason.clone(),
                })
                .collect(),
        ),
    };
    let mut jobs = jobs;
    jobs.reverse();
    let title = format!("Host {}", host.host_id);
    let page = HostPage {
        host,
        facts,
        updates,
        held,
        jobs,
    };
    respond(
        &web,
        format,
        "host.html",
        &title,
        &page,
        minijinja::Value::UNDEFINED,
    )
}

#[derive(Serialize)]
struct JobPage {
    job_id: String,
    rows: Vec<JobRow>,
}

pub async fn job(State(web): State<Arc<Web>>, Path(id): Path<String>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    if !patch_agent_wire::ids::valid_job_id(&id) {
        return Err(Failure::bad(
            format,
            format!("{id:?} is not a job id (1-128 characters of A-Z a-z 0-9 . _ -)"),
        ));
    }
    let rows = web
        .store
        .history(None, Some(id.clone()))
        .await
        .map_err(|e| Failure::store(format, e))?;
    if rows.is_empty() {
        return Err(Failure::not_found(
            format,
            format!("no host reported job {id:?}"),
        ));
    }
    let title = format!("Job {id}");
    let page = JobPage { job_id: id, rows };
    respond(
        &web,
        format,
        "job.html",
        &title,
        &page,
        minijinja::Value::UNDEFINED,
    )
}

/// A rollout as the pages show it.
#[derive(Serialize)]
pub struct RolloutView {
    rollout_id: String,
    state: String,
    rule: String,
    created_at: Option<i64>,
    created_by: String,
    targets: Vec<String>,
    next_start: Option<i64>,
    note: String,
    succeeded: u32,
    failed: u32,
    skipped: u32,
    occurrences: Vec<OccurrenceView>,
}

#[derive(Serialize)]
struct OccurrenceView {
    index: u32,
    job_id: String,
    start_at: Option<i64>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    attempted: u32,
    succeeded: u32,
    failed: u32,
    skipped: u32,
    stopped: bool,
    hosts: Vec<RolloutHostView>,
}

#[derive(Serialize)]
struct RolloutHostView {
    host_id: String,
    batch: u32,
    state: String,
    job_state: String,
    reason: String,
}

pub fn rollout_state(state: i32) -> String {
    word(
        pb::RolloutState::try_from(state)
            .ok()
            .map(|s| s.as_str_name()),
        "ROLLOUT_STATE_",
    )
}

fn rollout_view(r: &pb::Rollout) -> RolloutView {
    let secs = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    let mut targets = r.targets.clone();
    targets.extend(r.selector.iter().map(|(k, v)| format!("{k}={v}")));
    RolloutView {
        rollout_id: r.rollout_id.clone(),
        state: rollout_state(r.state),
        rule: r.rule.clone(),
        created_at: secs(&r.created_at),
        created_by: r.created_by.clone(),
        targets,
        next_start: secs(&r.next_start),
        note: r.note.clone(),
        succeeded: r.occurrences.iter().map(|o| o.succeeded).sum(),
        failed: r.occurrences.iter().map(|o| o.failed).sum(),
        skipped: r.occurrences.iter().map(|o| o.skipped).sum(),
        occurrences: r
            .occurrences
            .iter()
            .map(|o| OccurrenceView {
                index: o.index,
                job_id: o.job_id.clone(),
                start_at: secs(&o.start_at),
                started_at: secs(&o.started_at),
                finished_at: secs(&o.finished_at),
                attempted: o.attempted,
                succeeded: o.succeeded,
                failed: o.failed,
                skipped: o.skipped,
                stopped: o.stopped,
                hosts: o
                    .hosts
                    .iter()
                    .map(|h| RolloutHostView {
                        host_id: h.host_id.clone(),
                        batch: h.batch,
                        state: word(
                            pb::RolloutHostState::try_from(h.state)
                                .ok()
                                .map(|s| s.as_str_name()),
                            "ROLLOUT_HOST_STATE_",
                        ),
                        job_state: h.job_state.clone(),
                        reason: h.reason.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[derive(Serialize)]
struct RolloutsPage {
    counts: BTreeMap<String, usize>,
    rollouts: Vec<RolloutView>,
}

pub async fn rollouts(State(web): State<Arc<Web>>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    let list = web
        .store
        .rollouts()
        .await
        .map_err(|e| Failure::store(format, e))?;
    let rollouts: Vec<RolloutView> = list.iter().map(rollout_view).collect();
    let mut counts = BTreeMap::new();
    for r in &rollouts {
        *counts.entry(r.state.clone()).or_insert(0) += 1;
    }
    let page = RolloutsPage { counts, rollouts };
    respond(
        &web,
        format,
        "rollouts.html",
        "Rollouts",
        &page,
        minijinja::Value::UNDEFINED,
    )
}

pub async fn rollout(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Page {
    let format = format_of(&q)?;
    if !patch_agent_wire::ids::valid_job_id(&id) {
        return Err(Failure::bad(format, format!("{id:?} is not a rollout id")));
    }
    let Some(data) = web
        .store
        .rollout(id.clone(), true)
        .await
        .map_err(|e| Failure::store(format, e))?
    else {
        return Err(Failure::not_found(
            format,
            format!("no rollout {id:?}; see /rollouts"),
        ));
    };
    let view = rollout_view(&data.rollout);
    let title = format!("Rollout {id}");
    respond(
        &web,
        format,
        "rollout.html",
        &title,
        &serde_json::json!({ "r": view }),
        minijinja::Value::UNDEFINED,
    )
}

#[derive(Serialize)]
struct CvePage {
    cve: String,
    /// Distinct hosts exposed.
    hosts: usize,
    exposures: Vec<Exposure>,
}

pub async fn cve(State(web): State<Arc<Web>>, Query(q): Params) -> Page {
    let format = format_of(&q)?;
    let page = match q.get("id").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => CvePage {
            cve: String::new(),
            hosts: 0,
            exposures: Vec::new(),
        },
        Some(id) => {
            let cve = parse_cve(id).map_err(|e| Failure::bad(format, e))?;
            let exposures = web
                .store
                .exposed(cve.clone(), crate::now())
                .await
                .map_err(|e| Failure::store(format, e))?;
            let hosts = exposures
                .iter()
                .map(|e| e.host_id.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            CvePage {
                cve,
                hosts,
                exposures,
            }
        }
    };
    respond(
        &web,
        format,
        "cve.html",
        "CVE search",
        &page,
        minijinja::Value::UNDEFINED,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_encoded() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        let f = HostFilter::parse(
            &q(&[
                ("label", "environment=prod & co"),
                ("severity", "important"),
            ]),
            Format::Html,
        )
        .expect("valid");
        assert_eq!(
            f.query(500),
            "label=environment%3Dprod%20%26%20co&severity=important&offset=500"
        );
        for bad in [
            ("label", "noequals"),
            ("compliance", "great"),
            ("severity", "urgent"),
            ("reboot", "yes"),
        ] {
            let e = HostFilter::parse(&q(&[bad]), Format::Html).expect_err(bad.0);
            assert!(e.message.contains(bad.1), "{}", e.message);
        }
        assert!(Format::parse(Some("xml")).is_err());
    }
}
