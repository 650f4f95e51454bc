//! The compliance dashboard computed in the database: a handful of aggregate queries, so
//! `patchctl compliance` answers without loading every pending update into the process.
//! The definitions are [`crate::compliance`]'s; its `compute` over a full snapshot is the
//! reference these queries are tested against. Also the daily history of the headline figures.

use super::sql::{Db, DbError, DbResult, p};
use crate::compliance::{CLASSES, ClassFigures, Dashboard, EnvFigures, mean_of, percent};
use std::collections::BTreeMap;

/// Each class's allowance in seconds, by `sla_class` in `column` (NULL for other classes).
pub(super) fn allowance(column: &str) -> String {
    let arms: String = CLASSES
        .iter()
        .map(|(class, _, allow)| format!(" WHEN {class} THEN {allow}"))
        .collect();
    format!("(CASE {column}{arms} END)")
}

fn sum(cond: &str) -> String {
    format!("CAST(coalesce(sum(CASE WHEN {cond} THEN 1 ELSE 0 END), 0) AS BIGINT)")
}

fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// The dashboard as of `now`; see [`crate::compliance`] for what each figure means.
///
/// The hosts and their pending updates come from one query, one row per host
/// ([`super::views::hosts`], the hosts page's): the pending updates are read once, grouped by
/// host in their primary key's order, and the fleet's figures are summed from those rows here.
/// Resolved updates and job results are two more aggregate queries.
pub fn query(db: &mut dyn Db, now: i64, stale_after: i64) -> DbResult<Dashboard> {
    let hosts = super::views::hosts(db, now, stale_after, None)?;
    let (resolved, jobs) = outcomes(db)?;
    Ok(summed(&hosts, &resolved, jobs, now, stale_after))
}

/// Resolved updates per class (count, total seconds to resolve), and job figures (ran,
/// failed, reboots, reboots that came back).
type Outcomes = (BTreeMap<i64, (i64, f64)>, [usize; 4]);

fn outcomes(db: &mut dyn Db) -> DbResult<Outcomes> {
    let mut resolved: BTreeMap<i64, (i64, f64)> = BTreeMap::new();
    for r in db.rows(
        "SELECT sla_class, count(*),
           CAST(sum(CASE WHEN resolved_at > since THEN resolved_at - since ELSE 0 END) AS DOUBLE PRECISION)
         FROM resolved GROUP BY sla_class",
        &[],
    )? {
        resolved.insert(r.i64(0)?, (r.i64(1)?, r.f64(2)?));
    }
    let jobs = db
        .row(
            &format!(
                "SELECT {}, {}, {}, {} FROM jobs WHERE final = 1",
                sum("dry_run = 0 AND state IN ('SUCCEEDED', 'SUCCEEDED_REBOOT_REQUIRED', 'FAILED', 'TIMED_OUT', 'INTERRUPTED')"),
                sum("dry_run = 0 AND state IN ('FAILED', 'TIMED_OUT', 'INTERRUPTED')"),
                sum("reboot_attempted <> 0"),
                sum("reboot_attempted <> 0 AND reboot_succeeded <> 0"),
            ),
            &[],
        )?
        .ok_or_else(|| DbError("the job figures returned no row".into()))?;
    Ok((
        resolved,
        [
            count(jobs.i64(0)?),
            count(jobs.i64(1)?),
            count(jobs.i64(2)?),
            count(jobs.i64(3)?),
        ],
    ))
}

/// The dashboard from one row per host and the outcome figures.
fn summed(
    hosts: &[super::views::HostView],
    resolved: &BTreeMap<i64, (i64, f64)>,
    jobs: [usize; 4],
    now: i64,
    stale_after: i64,
) -> Dashboard {
    let known: Vec<&super::views::HostView> =
        hosts.iter().filter(|h| h.compliance != "unknown").collect();
    let why = |w: &str| hosts.iter().filter(|h| h.unknown == w).count();
    let mut by_environment: BTreeMap<String, EnvFigures> = BTreeMap::new();
    for h in &known {
        let env = h
            .labels
            .get("environment")
            .cloned()
            .unwrap_or_else(|| "(none)".to_string());
        let e = by_environment.entry(env).or_insert(EnvFigures {
            hosts: 0,
            compliant: 0,
            compliance_percent: 0.0,
        });
        e.hosts += 1;
        e.compliant += usize::from(h.overdue == 0);
    }
    for e in by_environment.values_mut() {
        e.compliance_percent = percent(e.compliant, e.hosts).unwrap_or(0.0);
    }
    let by_class = CLASSES
        .iter()
        .enumerate()
        .map(|(k, (class, name, allow))| {
            let hosts_late = known.iter().filter(|h| h.overdue_by_class[k] > 0).count();
            let (n, total) = resolved
                .get(&i64::from(*class))
                .copied()
                .unwrap_or_default();
            ClassFigures {
                class: name,
                sla_hours: allow / 3600,
                compliance_percent: percent(known.len() - hosts_late, known.len()),
                pending: known.iter().map(|h| h.pending[k]).sum(),
                overdue: known.iter().map(|h| h.overdue_by_class[k]).sum(),
                hosts_overdue: hosts_late,
                max_days_overdue: known
                    .iter()
                    .filter_map(|h| h.max_late[k])
                    .max()
                    .map(|d| d as f64 / 86400.0),
                mean_time_to_patch_hours: mean_of(count(n), total),
            }
        })
        .collect();
    let compliant = known.iter().filter(|h| h.overdue == 0).count();
    let (n, total) = resolved
        .values()
        .fold((0, 0.0), |(n, t), (m, s)| (n + m, t + s));
    let [ran, failed, reboots, reboots_ok] = jobs;
    Dashboard {
        generated_at: now,
        hosts: hosts.len(),
        hosts_with_inventory: hosts.len() - why("no inventory"),
        hosts_known: known.len(),
        hosts_unknown: hosts.len() - known.len(),
        hosts_unknown_scan_errors: why("scan errors"),
        hosts_unknown_stale: why("stale"),
        hosts_unknown_no_inventory: why("no inventory"),
        stale_after_hours: stale_after as f64 / 3600.0,
        hosts_compliant: compliant,
        overall_compliance_percent: percent(compliant, known.len()),
        by_class,
        by_environment,
        mean_time_to_patch_hours: mean_of(count(n), total),
        jobs_ran: ran,
        jobs_failed: failed,
        patch_failure_rate_percent: percent(failed, ran),
        reboots,
        reboots_succeeded: reboots_ok,
        reboot_success_rate_percent: percent(reboots_ok, reboots),
        hosts_reboot_required: hosts.iter().filter(|h| h.reboot_required).count(),
        reports_dropped: hosts
            .iter()
            .fold((0, 0), |(p, f), h| (p + h.dropped.0, f + h.dropped.1)),
    }
}

/// One day's headline figures: what a trend is plotted from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Daily {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// When the figures were computed (the day's last snapshot wins).
    pub taken_at: i64,
    pub hosts: usize,
    pub hosts_known: usize,
    pub hosts_compliant: usize,
    pub overall_compliance_percent: Option<f64>,
    /// Compliance percent of each class, critical to low.
    pub class_compliance_percent: Vec<Option<f64>>,
    pub pending: usize,
    pub overdue: usize,
    pub mean_time_to_patch_hours: Option<f64>,
    pub patch_failure_rate_percent: Option<f64>,
    pub hosts_reboot_required: usize,
}

impl Daily {
    pub fn of(d: &Dashboard) -> Self {
        Daily {
            day: d.generated_at.div_euclid(86_400),
            taken_at: d.generated_at,
            hosts: d.hosts,
            hosts_known: d.hosts_known,
            hosts_compliant: d.hosts_compliant,
            overall_compliance_percent: d.overall_compliance_percent,
            class_compliance_percent: d.by_class.iter().map(|c| c.compliance_percent).collect(),
            pending: d.by_class.iter().map(|c| c.pending).sum(),
            overdue: d.by_class.iter().map(|c| c.overdue).sum(),
            mean_time_to_patch_hours: d.mean_time_to_patch_hours,
            patch_failure_rate_percent: d.patch_failure_rate_percent,
            hosts_reboot_required: d.hosts_reboot_required,
        }
    }
}

/// Records the day's figures, replacing an earlier snapshot of the same day.
pub fn record(db: &mut dyn Db, d: &Dashboard) -> DbResult<()> {
    let daily = Daily::of(d);
    let json = serde_json::to_string(&daily).map_err(|e| DbError(e.to_string()))?;
    db.exec(
        "INSERT INTO compliance_daily(day, taken_at, figures) VALUES(?1, ?2, ?3)
         ON CONFLICT(day) DO UPDATE SET taken_at = excluded.taken_at, figures = excluded.figures
         WHERE compliance_daily.taken_at <= excluded.taken_at",
        p![daily.day, daily.taken_at, json],
    )?;
    Ok(())
}

/// The daily figures from `since_day`, oldest first.
pub fn history(db: &mut dyn Db, since_day: i64) -> DbResult<Vec<Daily>> {
    db.rows(
        "SELECT figures FROM compliance_daily WHERE day >= ?1 ORDER BY day",
        p![since_day],
    )?
    .iter()
    .map(|r| {
        serde_json::from_str(&r.text(0)?)
            .map_err(|e| DbError(format!("a stored daily snapshot is unreadable: {e}")))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use crate::store::{Location, SqlStore, Store};
    use patch_agent_wire::proto::v1 as pb;

    fn ts(s: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    }

    /// A small, deterministic pseudo-random sequence.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Hosts of every kind (known, scan errors, stale, no inventory; three environments and
    /// none), updates of every class pending for various ages, updates resolved, and results
    /// of every state, dry runs and reboots among them.
    async fn fleet(s: &SqlStore, now: i64) {
        let mut r = Lcg(7);
        for h in 0..60 {
            let host = format!("h{h:02}");
            let mut labels = std::collections::HashMap::new();
            match h % 4 {
                0 => {}
                n => {
                    labels.insert("environment".to_string(), format!("env{n}"));
                }
            }
            let kind = r.next(10);
            if kind == 0 {
                s.hello(
                    pb::HelloRequest {
                        host_id: host.clone(),
                        labels,
                        ..Default::default()
                    },
                    now,
                )
                .await
                .expect("w")
                .expect("admitted");
                continue;
            }
            let scanned = if kind == 1 {
                now - 3 * 86_400
            } else {
                now - 600
            };
            let updates = |r: &mut Lcg, n: usize, tag: &str| -> Vec<pb::Update> {
                (0..n)
                    .map(|i| pb::Update {
                        name: format!("{tag}{i}"),
                        architecture: "amd64".into(),
                        sla_class: r.next(5) as i32,
                        issued: if r.next(2) == 0 {
                            ts(now - r.next(120) as i64 * 86_400)
                        } else {
                            None
                        },
                        first_seen: ts(now - r.next(40) as i64 * 86_400),
                        ..Default::default()
                    })
                    .collect()
            };
            let send = |inv: pb::Inventory, at: i64| {
                let bytes = prost::Message::encode_to_vec(&inv);
                s.inventory(
                    pb::InventoryReport {
                        host_id: host.clone(),
                        labels: labels.clone(),
                        checksum: format!("{}", bytes.len()),
                        inventory: Some(inv),
                        scanned_at: ts(at),
                        ..Default::default()
                    },
                    at,
                )
            };
            // A first scan, then a later one that resolved some of its updates.
            let first = updates(&mut r, 6, "p");
            send(
                pb::Inventory {
                    updates: first.clone(),
                    ..Default::default()
                },
                scanned - 86_400 * r.next(5) as i64 - 60,
            )
            .await
            .expect("w")
            .expect("admitted");
            let mut later: Vec<pb::Update> = first.into_iter().skip(r.next(4) as usize).collect();
            let extra = r.next(4) as usize;
            later.extend(updates(&mut r, extra, "q"));
            send(
                pb::Inventory {
                    updates: later,
                    scan_errors: if kind == 2 {
                        vec!["apt-get update failed".into()]
                    } else {
                        Vec::new()
                    },
                    reboot: Some(pb::RebootStatus {
                        required: r.next(3) == 0,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                scanned,
            )
            .await
            .expect("w")
            .expect("admitted");
            let states = [
                pb::JobState::Succeeded,
                pb::JobState::Failed,
                pb::JobState::TimedOut,
                pb::JobState::SucceededRebootRequired,
                pb::JobState::Interrupted,
                pb::JobState::Cancelled,
            ];
            for j in 0..r.next(4) {
                let reboot = r.next(3) == 0;
                s.job_report(
                    pb::JobReport {
                        report_id: format!("{host}-{j}"),
                        host_id: host.clone(),
                        status: Some(pb::JobStatus {
                            job_id: format!("j{j}"),
                            state: states[r.next(6) as usize] as i32,
                            dry_run: r.next(4) == 0,
                            ..Default::default()
                        }),
                        r#final: r.next(5) != 0,
                        reboot_attempted: reboot,
                        reboot_succeeded: reboot && r.next(2) == 0,
                        ..Default::default()
                    },
                    now,
                )
                .await
                .expect("w")
                .expect("admitted");
            }
        }
    }

    /// Floats rounded, so that sums taken in another order compare equal.
    fn rounded(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap_or_default();
                serde_json::json!((x * 1e6).round() / 1e6)
            }
            Value::Array(a) => Value::Array(a.into_iter().map(rounded).collect()),
            Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, rounded(v))).collect())
            }
            v => v,
        }
    }

    #[tokio::test]
    async fn the_figures_in_sql_are_the_reference_figures() {
        crate::store::for_each_backend(figures_on).await;
    }

    async fn figures_on(db: Location) {
        let s = SqlStore::open_writer(&db).await.expect("open");
        let now = 1_800_000_000;
        fleet(&s, now).await;
        let stale = 48 * 3600;
        let sql = s.compliance(now, stale).await.expect("sql figures");
        let reference =
            crate::compliance::compute(&s.snapshot().await.expect("snapshot"), now, stale);
        assert_eq!(
            rounded(serde_json::to_value(&sql).expect("json")),
            rounded(serde_json::to_value(&reference).expect("json")),
            "{db}"
        );
        // The fleet has a bit of everything, so the comparison means something.
        assert!(sql.hosts_unknown_no_inventory > 0 && sql.hosts_unknown_stale > 0);
        assert!(sql.hosts_unknown_scan_errors > 0 && sql.hosts_known > 20);
        assert!(sql.by_class.iter().all(|c| c.pending > 0), "{sql:?}");
        assert!(sql.by_class.iter().any(|c| c.overdue > 0));
        assert!(sql.jobs_failed > 0 && sql.jobs_ran > sql.jobs_failed);
        assert!(sql.reboots > sql.reboots_succeeded && sql.reboots_succeeded > 0);
        assert!(
            sql.by_environment.len() >= 3,
            "{:?}",
            sql.by_environment.keys()
        );
        assert!(sql.by_environment.contains_key("(none)"));
        assert!(sql.mean_time_to_patch_hours.is_some());

        // The daily history: one row a day, the day's later snapshot replacing the earlier.
        let mut later = sql.clone();
        later.generated_at += 60;
        later.hosts_compliant = 1;
        let mut next_day = sql.clone();
        next_day.generated_at += 86_400;
        for d in [later.clone(), sql.clone(), next_day] {
            s.record_compliance(d).await.expect("record");
        }
        let days = s.compliance_history(now / 86_400).await.expect("history");
        assert_eq!(days.len(), 2);
        assert_eq!(
            days[0].hosts_compliant, 1,
            "the day's last snapshot is kept"
        );
        assert_eq!(days[1].day, now / 86_400 + 1);
        assert_eq!(days[0].class_compliance_percent.len(), 4);
        assert!(
            s.compliance_history(now / 86_400 + 1)
                .await
                .expect("history")
                .len()
                == 1
        );
    }
}
