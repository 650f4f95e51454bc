//! The controller's `/metrics`: the fleet's compliance as Prometheus gauges, read from the
//! store at each scrape (the same SQL as `patchctl compliance`), and this process's ingest
//! counters.

use super::Web;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use patch_agent_service::telemetry::metric_label as label;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reports this controller process stored (duplicates not counted).
#[derive(Debug, Default)]
pub struct Counters {
    pub job_reports: AtomicU64,
    pub inventories: AtomicU64,
}

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge(r: &mut Registry, name: &str, help: &str, v: usize) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    r.register(name, help, g);
}

/// The scrape's text; an error when the store cannot be read (Prometheus then records the
/// target as down rather than stale figures).
pub async fn render(web: &Web) -> Result<String, String> {
    let d = web.store.compliance(crate::now(), web.stale_after).await?;
    let connected = web.store.connected().await?.len();
    let rollouts = web.store.rollouts().await?;
    let mut r = Registry::default();

    if let Some(p) = d.overall_compliance_percent {
        let g = FloatGauge::default();
        g.set(p);
        r.register(
            "patchctl_compliance_percent",
            "Known hosts with no update past its SLA, percent of known hosts",
            g,
        );
    }
    let by_class = Family::<Labels, FloatGauge>::default();
    for c in &d.by_class {
        if let Some(p) = c.compliance_percent {
            by_class
                .get_or_create(&vec![("sla_class", c.class.to_string())])
                .set(p);
        }
    }
    r.register(
        "patchctl_class_compliance_percent",
        "Known hosts with no overdue update of the class, percent of known hosts",
        by_class,
    );
    let by_env = Family::<Labels, FloatGauge>::default();
    for (name, e) in &d.by_environment {
        by_env
            .get_or_create(&vec![("environment", label(name))])
            .set(e.compliance_percent);
    }
    r.register(
        "patchctl_environment_compliance_percent",
        "Known hosts compliant, percent, by the hosts' environment label",
        by_env,
    );
    let overdue = Family::<Labels, Gauge>::default();
    for c in &d.by_class {
        overdue
            .get_or_create(&vec![("sla_class", c.class.to_string())])
            .set(c.overdue as i64);
    }
    r.register(
        "patchctl_updates_overdue",
        "Pending updates past their SLA on known hosts, by class",
        overdue,
    );
    gauge(
        &mut r,
        "patchctl_hosts",
        "Hosts the controller knows",
        d.hosts,
    );
    gauge(
        &mut r,
        "patchctl_hosts_known",
        "Hosts whose last inventory is recent and free of errors",
        d.hosts_known,
    );
    gauge(
        &mut r,
        "patchctl_hosts_unknown",
        "Hosts with no inventory, a stale one, or one with scan or repository errors",
        d.hosts_unknown,
    );
    gauge(
        &mut r,
        "patchctl_hosts_overdue",
        "Known hosts with at least one update past its SLA",
        d.hosts_known.saturating_sub(d.hosts_compliant),
    );
    gauge(
        &mut r,
        "patchctl_hosts_reboot_required",
        "Hosts whose last inventory says a reboot is required",
        d.hosts_reboot_required,
    );
    gauge(
        &mut r,
        "patchctl_agents_connected",
        "Agents holding a control channel to a live controller",
        connected,
    );
    let ingested = Family::<Labels, Counter>::default();
    for (kind, n) in [
        ("job", &web.counters.job_reports),
        ("inventory", &web.counters.inventories),
    ] {
        ingested
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc_by(n.load(Ordering::Relaxed));
    }
    r.register(
        "patchctl_reports_ingested",
        "Reports this controller process stored, by kind (duplicates not counted)",
        ingested,
    );
    let mut states: BTreeMap<String, i64> = [
        "scheduled",
        "running",
        "paused",
        "completed",
        "stopped",
        "cancelled",
    ]
    .into_iter()
    .map(|s| (s.to_string(), 0))
    .collect();
    for x in &rollouts {
        *states
            .entry(super::pages::rollout_state(x.state))
            .or_insert(0) += 1;
    }
    let by_state = Family::<Labels, Gauge>::default();
    for (state, n) in states {
        by_state.get_or_create(&vec![("state", state)]).set(n);
    }
    r.register("patchctl_rollouts", "Rollouts by state", by_state);
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![("version", label(patch_agent_wire::VERSION))])
        .set(1);
    r.register("patchctl_build_info", "The controller's version", info);

    let mut out = String::with_capacity(4096);
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    Ok(out)
}

pub async fn scrape(State(web): State<Arc<Web>>) -> Response {
    match render(&web).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "Metrics: the store could not be read");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the controller's database could not be read: {e}\n"),
            )
                .into_response()
        }
    }
}
