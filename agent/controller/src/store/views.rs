//! What the dashboard's host pages and `patchctl hosts list --cve` read: one row per host with
//! its compliance state and pending counts, computed in the database (one query, whatever the
//! fleet's size), and the hosts exposed to one CVE.

use super::dashboard::allowance;
use super::ingest::labels;
use super::sql::{Db, DbResult, p};
use crate::compliance::CLASSES;
use std::collections::{BTreeMap, HashMap};

/// A host as the hosts page lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HostView {
    pub host_id: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub last_seen: Option<i64>,
    /// When the scan behind its last inventory ended (or, without that, when it arrived).
    pub scanned_at: Option<i64>,
    /// "compliant", "overdue" (known, an update past its SLA), or "unknown" (see `unknown`).
    pub compliance: &'static str,
    /// Why it is unknown: "scan errors", "stale", "no inventory"; empty when known.
    pub unknown: &'static str,
    pub reboot_required: bool,
    /// Pending updates per SLA class, critical to low.
    pub pending: [usize; 4],
    pub overdue: usize,
    /// The worst vendor severity among its pending updates: "critical", "important",
    /// "moderate", "low"; empty when none says.
    pub worst_severity: &'static str,
    pub connected: bool,
    pub revoked: bool,
    /// Overdue updates per SLA class, critical to low.
    pub overdue_by_class: [usize; 4],
    /// Per class, how many seconds past its SLA the most overdue update is (None: none is).
    #[serde(skip)]
    pub max_late: [Option<i64>; 4],
    /// Reports its agent dropped from a full outbox (progress, results).
    #[serde(skip)]
    pub dropped: (u64, u64),
}

/// Vendor severities as stored (`pb::Severity`), worst first.
pub const SEVERITIES: [(i64, &str); 4] = [
    (1, "critical"),
    (2, "important"),
    (3, "moderate"),
    (4, "low"),
];

fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Every host, ordered by id, as of `now`; a scan older than `stale_after` makes a host
/// unknown (the compliance dashboard's definitions). `only`: that one host.
///
/// Two queries: the hosts (one row each), and their pending updates summed per host and class
/// (`pending_by_host_class` covers it, so the pending rows themselves are never read, nor
/// sorted); the two are joined here.
pub fn hosts(
    db: &mut dyn Db,
    now: i64,
    stale_after: i64,
    only: Option<&str>,
) -> DbResult<Vec<HostView>> {
    let (host_filter, pending_filter) = match only {
        Some(_) => ("WHERE h.host_id = ?3", "WHERE host_id = ?2"),
        None => ("", ""),
    };
    let sql = format!(
        "SELECT h.host_id, h.labels, h.agent_version,
           CASE WHEN h.last_seen = 0 THEN NULL ELSE h.last_seen END,
           coalesce(i.scanned_at, i.received_at),
           CASE WHEN i.host_id IS NULL THEN 3
                WHEN i.scan_errors > 0 THEN 1
                WHEN ?1 - coalesce(i.scanned_at, i.received_at) > ?2 THEN 2
                ELSE 0 END,
           coalesce(i.reboot_required, 0),
           {connected}, h.revoked_at, h.dropped_progress, h.dropped_final
         FROM hosts h LEFT JOIN inventories i ON i.host_id = h.host_id
         {host_filter}
         ORDER BY h.host_id",
        connected = super::replicas::connected_since(db),
    );
    let args = match only {
        Some(id) => p![now, stale_after, id].to_vec(),
        None => p![now, stale_after].to_vec(),
    };
    let mut views = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for r in db.rows(&sql, &args)? {
        let why = r.i64(5)?;
        let host_id = r.text(0)?;
        at.insert(host_id.clone(), views.len());
        views.push(HostView {
            host_id,
            labels: labels(&r.text(1)?),
            agent_version: r.text(2)?,
            last_seen: r.opt_i64(3)?,
            scanned_at: r.opt_i64(4)?,
            // Known hosts are compliant until an overdue update says otherwise (below).
            compliance: if why == 0 { "compliant" } else { "unknown" },
            unknown: match why {
                1 => "scan errors",
                2 => "stale",
                3 => "no inventory",
                _ => "",
            },
            reboot_required: r.i64(6)? != 0,
            pending: [0; 4],
            overdue: 0,
            worst_severity: "",
            connected: r.opt_i64(7)?.is_some(),
            revoked: r.opt_i64(8)?.is_some(),
            overdue_by_class: [0; 4],
            max_late: [None; 4],
            dropped: (r.int(9)?, r.int(10)?),
        });
    }
    let pending = format!(
        "SELECT host_id, sla_class, count(*),
           CAST(sum(CASE WHEN deadline < ?1 THEN 1 ELSE 0 END) AS BIGINT),
           min(deadline),
           min(CASE WHEN severity BETWEEN 1 AND 4 THEN severity END)
         FROM pending {pending_filter} GROUP BY host_id, sla_class"
    );
    let args = match only {
        Some(id) => p![now, id].to_vec(),
        None => p![now].to_vec(),
    };
    for r in db.rows(&pending, &args)? {
        let Some(v) = at.get(&r.text(0)?).map(|i| &mut views[*i]) else {
            continue;
        };
        let class = r.i64(1)?;
        let Some(k) = CLASSES.iter().position(|(c, _, _)| i64::from(*c) == class) else {
            continue;
        };
        v.pending[k] = count(r.i64(2)?);
        v.overdue_by_class[k] = count(r.opt_i64(3)?.unwrap_or(0));
        v.max_late[k] = r.opt_i64(4)?.map(|d| now - d).filter(|late| *late > 0);
        if let Some(sev) = r.opt_i64(5)? {
            let name = SEVERITIES
                .iter()
                .find(|(s, _)| *s == sev)
                .map_or("", |(_, n)| n);
            let rank = |n: &str| SEVERITIES.iter().position(|(_, x)| *x == n);
            if v.worst_severity.is_empty() || rank(name) < rank(v.worst_severity) {
                v.worst_severity = name;
            }
        }
    }
    for v in &mut views {
        v.overdue = v.overdue_by_class.iter().sum();
        if v.compliance == "compliant" && v.overdue > 0 {
            v.compliance = "overdue";
        }
    }
    Ok(views)
}

/// A pending update that fixes a CVE, on one host.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Exposure {
    pub host_id: String,
    pub labels: BTreeMap<String, String>,
    pub package: String,
    pub arch: String,
    pub candidate: String,
    pub sla_class: &'static str,
    /// When its SLA clock started (the advisory's issue date, else first seen pending).
    pub since: i64,
    /// When it must be installed by: `since` plus its class's allowance.
    pub deadline: i64,
    pub overdue: bool,
}

/// Every pending update on every host that fixes `cve` (upper case), by host and package.
pub fn exposed(db: &mut dyn Db, cve: &str, now: i64) -> DbResult<Vec<Exposure>> {
    let sql = format!(
        "SELECT c.host_id, h.labels, c.name, c.arch, p.candidate, p.sla_class, p.since,
           p.since + {}
         FROM pending_cves c
         JOIN pending p ON p.host_id = c.host_id AND p.name = c.name AND p.arch = c.arch
         JOIN hosts h ON h.host_id = c.host_id
         WHERE c.cve = ?1 ORDER BY c.host_id, c.name, c.arch",
        allowance("p.sla_class")
    );
    db.rows(&sql, p![cve])?
        .iter()
        .map(|r| {
            let class = r.i64(5)?;
            let deadline = r.i64(7)?;
            Ok(Exposure {
                host_id: r.text(0)?,
                labels: labels(&r.text(1)?),
                package: r.text(2)?,
                arch: r.text(3)?,
                candidate: r.text(4)?,
                sla_class: CLASSES
                    .iter()
                    .find(|(c, _, _)| i64::from(*c) == class)
                    .map_or("low", |(_, n, _)| n),
                since: r.i64(6)?,
                deadline,
                overdue: now > deadline,
            })
        })
        .collect()
}

/// A CVE id as users type it, checked and upper-cased: `CVE-YYYY-NNNN` (four or more digits
/// after the year).
pub fn parse_cve(text: &str) -> Result<String, String> {
    let up = text.trim().to_ascii_uppercase();
    let ok = up
        .strip_prefix("CVE-")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(year, n)| {
            year.len() == 4
                && year.bytes().all(|b| b.is_ascii_digit())
                && (4..=19).contains(&n.len())
                && n.bytes().all(|b| b.is_ascii_digit())
        });
    if ok {
        Ok(up)
    } else {
        Err(format!(
            "{text:?} is not a CVE id; write it as CVE-YYYY-NNNN, e.g. CVE-2024-3094"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cve_ids() {
        assert_eq!(parse_cve(" cve-2024-3094 ").as_deref(), Ok("CVE-2024-3094"));
        assert_eq!(
            parse_cve("CVE-2021-1234567").as_deref(),
            Ok("CVE-2021-1234567")
        );
        for bad in [
            "",
            "CVE-24-1234",
            "CVE-2024-123",
            "CVE-2024-12a4",
            "2024-3094",
            "CVE-2024-1234' OR 1=1",
        ] {
            let e = parse_cve(bad).expect_err(bad);
            assert!(e.contains("CVE-YYYY-NNNN"), "{e}");
        }
    }
}
