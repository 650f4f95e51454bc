//! What a job plans and how its result is judged: which updates an upgrade takes, and the
//! comparison of the packages found after applying with the plan.

use super::*;
use crate::pkg::scanner::Snapshot;

/// Which pending updates an upgrade job takes, and why it leaves the others.
pub fn select<'a>(
    updates: &'a [Update],
    security_only: bool,
    min_severity: Option<Severity>,
    exclude: &[patch_agent_wire::job::Exclude],
    approve_after_days: u32,
    now: SystemTime,
) -> (Vec<&'a Update>, Vec<(&'a Update, String)>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for u in updates {
        let security = u.classification == Classification::Security;
        // Without a vendor severity a security update counts as important, as in the SLA mapping.
        let severity = if security && u.severity == Severity::Unknown {
            Severity::Important
        } else {
            u.severity
        };
        let why = if security_only && !security {
            Some("not a security update".to_string())
        } else if let Some(floor) = min_severity.filter(|f| severity > *f) {
            Some(format!(
                "severity {} is below {}",
                u.severity.as_str(),
                floor.as_str()
            ))
        } else if let Some(e) = exclude.iter().find(|e| e.matches(&u.name)) {
            Some(match e {
                patch_agent_wire::job::Exclude::Name(n) => format!("excluded by {n}"),
                patch_agent_wire::job::Exclude::Pattern(p, _) => format!("excluded by pattern {p}"),
            })
        } else if approve_after_days > 0 {
            let since = u.issued.or(u.first_seen);
            let age = since
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let need = Duration::from_secs(u64::from(approve_after_days) * 86_400);
            (age < need).then(|| {
                format!(
                    "{} {} day(s) ago; approve_after_days is {approve_after_days}",
                    if u.issued.is_some() {
                        "advisory issued"
                    } else {
                        "first seen"
                    },
                    age.as_secs() / 86_400
                )
            })
        } else {
            None
        };
        match why {
            Some(w) => skipped.push((u, w)),
            None => chosen.push(u),
        }
    }
    (chosen, skipped)
}

/// What a job did to the host, package by package, and where that departs from its plan.
#[derive(Debug, Default)]
pub struct PlanCheck {
    pub outcomes: Vec<PackageOutcome>,
    /// One line per departure: a planned package missing or at another version, or a package
    /// removed that the plan did not name.
    pub problems: Vec<String>,
}

/// Compares the installed versions after applying with the plan and the versions before.
pub fn compare_with_plan(
    planned: &[PackageOutcome],
    before: &HashMap<&str, String>,
    after: &HashMap<String, String>,
) -> PlanCheck {
    use patch_agent_wire::job::names::version_matches;
    let mut check = PlanCheck::default();
    for p in planned {
        let found = after.get(&p.name);
        let to = found.cloned().unwrap_or_default();
        let on_plan = found.is_some_and(|v| p.to.is_empty() || version_matches(&p.to, v));
        let outcome = match found {
            None => Outcome::NotInstalled,
            Some(_) if !on_plan && to == p.from => Outcome::Unchanged,
            Some(_) if !on_plan => Outcome::OffPlan,
            Some(_) if p.from.is_empty() => Outcome::Installed,
            Some(_) if to == p.from => Outcome::Unchanged,
            Some(_) => Outcome::Changed,
        };
        if !on_plan {
            let planned_to = if p.to.is_empty() { "installed" } else { &p.to };
            check.problems.push(format!(
                "{}: planned {planned_to}, found {}",
                p.name,
                found.map_or("not installed", String::as_str)
            ));
        }
        check.outcomes.push(PackageOutcome {
            name: p.name.clone(),
            from: p.from.clone(),
            to,
            outcome,
        });
    }
    let mut removed: Vec<(&str, &String)> = before
        .iter()
        .filter(|(name, _)| {
            !after.contains_key(**name) && !planned.iter().any(|p| p.name == **name)
        })
        .map(|(n, v)| (*n, v))
        .collect();
    removed.sort();
    for (name, version) in removed {
        check.problems.push(format!(
            "{name} {version}: removed, but the plan did not remove it"
        ));
        check.outcomes.push(PackageOutcome {
            name: name.to_string(),
            from: version.clone(),
            to: String::new(),
            outcome: Outcome::RemovedUnplanned,
        });
    }
    check
}

/// The installed version of every package in a scan, by name.
pub(super) fn versions(snap: &Snapshot) -> HashMap<&str, String> {
    snap.packages
        .iter()
        .map(|p| (p.name.as_str(), p.full_version()))
        .collect()
}

/// Each operation with the version it starts from and the one it should end at (the exact
/// version asked for, else the scan's candidate).
pub(super) fn planned(
    ops: &[Op],
    before: &HashMap<&str, String>,
    snap: &Snapshot,
) -> Vec<PackageOutcome> {
    let candidate: HashMap<&str, &str> = snap
        .updates
        .updates
        .iter()
        .map(|u| (u.name.as_str(), u.candidate_version.as_str()))
        .collect();
    ops.iter()
        .map(|op| PackageOutcome {
            name: op.name().to_string(),
            from: before.get(op.name()).cloned().unwrap_or_default(),
            to: match op {
                Op::Install {
                    version: Some(v), ..
                } => v.clone(),
                _ => candidate
                    .get(op.name())
                    .map_or(String::new(), |c| c.to_string()),
            },
            outcome: Outcome::Planned,
        })
        .collect()
}

/// The plan as one history line.
pub(super) fn describe(planned: &[PackageOutcome]) -> String {
    if planned.is_empty() {
        return "nothing to do".into();
    }
    planned
        .iter()
        .map(|p| {
            let from = if p.from.is_empty() {
                "(not installed)"
            } else {
                &p.from
            };
            let to = if p.to.is_empty() { "candidate" } else { &p.to };
            format!("{} {from} -> {to}", p.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
