//! Every page and its JSON twin against a real SQLite store with a small fleet in it; hostile
//! input gets a clear 400 or 404.

use super::*;
use crate::store::{Location, SqlStore};
use patch_agent_wire::proto::v1 as pb;
use tower::ServiceExt;

const NOW_SLACK: i64 = 60;

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

async fn fleet() -> (tempfile::TempDir, Arc<Web>) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqlStore::open_writer(&Location::File(dir.path().join("c.db")))
        .await
        .expect("open");
    let now = crate::now();
    let update = |name: &str, class: pb::SlaClass, issued: i64, cves: &[&str]| pb::Update {
        name: name.into(),
        architecture: "amd64".into(),
        installed_version: "1.0".into(),
        candidate_version: "1.1".into(),
        classification: pb::Classification::Security as i32,
        severity: pb::Severity::Critical as i32,
        sla_class: class as i32,
        issued: ts(issued),
        advisory_ids: vec!["DSA-1".into()],
        cve_ids: cves.iter().map(|c| (*c).to_string()).collect(),
        ..Default::default()
    };
    for (host, env, updates) in [
        (
            "web-1",
            "production",
            vec![update(
                "openssl",
                pb::SlaClass::Critical,
                now - 5 * 86_400,
                &["CVE-2024-0001"],
            )],
        ),
        ("web-2", "production", vec![]),
        (
            "db-<1>",
            "staging\"<b>",
            vec![update(
                "openssl",
                pb::SlaClass::Critical,
                now - 3600,
                &["CVE-2024-0001"],
            )],
        ),
    ] {
        let report = pb::InventoryReport {
            report_id: format!("{host}:i1"),
            host_id: host.into(),
            labels: [("environment".to_string(), env.to_string())].into(),
            checksum: format!("{host}-sum"),
            scanned_at: ts(now - NOW_SLACK),
            inventory: Some(pb::Inventory {
                kernel_release: "6.1.0".into(),
                manager: "apt".into(),
                os: Some(pb::OsRelease {
                    pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
                    ..Default::default()
                }),
                updates,
                reboot: Some(pb::RebootStatus {
                    required: host == "web-2",
                    method: "reboot-required file".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        store
            .inventory(report, now)
            .await
            .expect("w")
            .expect("admitted");
    }
    store
        .job_report(
            pb::JobReport {
                report_id: "web-1:j1".into(),
                host_id: "web-1".into(),
                r#final: true,
                status: Some(pb::JobStatus {
                    job_id: "job-1".into(),
                    state: pb::JobState::Succeeded as i32,
                    summary: "upgrade <all>".into(),
                    packages: vec![pb::PackageResult {
                        name: "curl".into(),
                        from_version: "7".into(),
                        to_version: "8".into(),
                        outcome: "upgraded".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            now,
        )
        .await
        .expect("w")
        .expect("admitted");
    // A rollout whose first occurrence ran: web-1 succeeded, web-2 failed.
    store
        .create_rollout(crate::store::NewRollout {
            id: "r-web".into(),
            serial: "1".into(),
            max_fail_percent: 50.0,
            host_timeout_ms: 60_000,
            created_at: now - 600,
            created_by: "alice <ops>".into(),
            targets: vec!["web-1".into(), "web-2".into()],
            selector: Default::default(),
            occurrences: vec![crate::store::NewOccurrence {
                job_id: "job-1".into(),
                envelope: pb::SignedJob {
                    payload: vec![1],
                    key_id: "k".into(),
                    signature: vec![1],
                },
                start_at: now - 600,
                expires_at: now + 3600,
            }],
        })
        .await
        .expect("rollout");
    store
        .occurrence_started(
            "r-web".into(),
            1,
            vec![("web-1".into(), 1), ("web-2".into(), 2)],
            now - 500,
        )
        .await
        .expect("started");
    for (host, state, job_state) in [
        ("web-1", pb::RolloutHostState::Succeeded, "SUCCEEDED"),
        ("web-2", pb::RolloutHostState::Failed, "FAILED"),
    ] {
        store
            .set_rollout_host(
                "r-web".into(),
                1,
                pb::RolloutHost {
                    host_id: host.into(),
                    batch: 1,
                    state: state as i32,
                    job_state: job_state.into(),
                    reason: "<reason>".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("host");
    }
    let web = Arc::new(Web::new(Arc::new(store), 48 * 3600, Arc::default()));
    (dir, web)
}

async fn get(web: &Arc<Web>, uri: &str) -> (StatusCode, String, String) {
    let response = router(web.clone())
        .oneshot(
            axum::http::Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let status = response.status();
    let kind = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = axum::body::to_bytes(response.into_body(), 16 << 20)
        .await
        .expect("body");
    (status, kind, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_page_renders_and_has_a_json_twin() {
    let (_dir, web) = fleet().await;
    for page in [
        "/",
        "/hosts",
        "/hosts?compliance=overdue&severity=important&label=environment%3Dproduction",
        "/hosts/web-1",
        "/hosts/db-%3C1%3E",
        "/jobs/job-1",
        "/rollouts",
        "/rollouts/r-web",
        "/cve",
        "/cve?id=cve-2024-0001",
    ] {
        let (status, kind, html) = get(&web, page).await;
        assert_eq!(status, StatusCode::OK, "{page}: {html}");
        assert!(kind.starts_with("text/html"), "{page}: {kind}");
        assert!(html.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(
            !html.contains("<script"),
            "{page}: a script reached the page"
        );
        let sep = if page.contains('?') { '&' } else { '?' };
        let (status, kind, json) = get(&web, &format!("{page}{sep}format=json")).await;
        assert_eq!(status, StatusCode::OK, "{page}: {json}");
        assert_eq!(kind, "application/json", "{page}");
        serde_json::from_str::<serde_json::Value>(&json).expect("JSON");
    }
    // Hostile host data is escaped, in the page and in the SVG chart.
    let (_, _, html) = get(&web, "/").await;
    assert!(html.contains("staging&quot;&lt;b&gt;"), "{html}");
    assert!(!html.contains("staging\"<b>"), "{html}");
    let (_, _, html) = get(&web, "/hosts").await;
    assert!(html.contains("db-&lt;1&gt;"), "{html}");

    let (_, _, json) = get(&web, "/?format=json").await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["compliance"]["hosts"], 3);
    assert_eq!(v["compliance"]["hosts_compliant"], 2, "{v}");
    let (_, _, json) = get(&web, "/hosts?compliance=overdue&format=json").await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["matched"], 1);
    assert_eq!(v["hosts"][0]["host_id"], "web-1");
    let (_, _, json) = get(&web, "/hosts?reboot=1&format=json").await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["hosts"][0]["host_id"], "web-2");
    let (_, _, json) = get(&web, "/cve?id=CVE-2024-0001&format=json").await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["hosts"], 2, "{v}");
    let (_, _, html) = get(&web, "/jobs/job-1").await;
    assert!(
        html.contains("upgrade &lt;all&gt;") && html.contains("upgraded"),
        "{html}"
    );
    let (_, _, html) = get(&web, "/rollouts/r-web").await;
    assert!(
        html.contains("data-host=\"web-2\"")
            && html.contains("FAILED")
            && html.contains("&lt;reason&gt;"),
        "{html}"
    );
    let (_, _, json) = get(&web, "/rollouts?format=json").await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        (
            v["rollouts"][0]["succeeded"].as_u64(),
            v["rollouts"][0]["failed"].as_u64()
        ),
        (Some(1), Some(1)),
        "{v}"
    );
    let (_, kind, metrics) = get(&web, "/metrics").await;
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(metrics.contains("patchctl_hosts 3\n"), "{metrics}");
    assert!(
        metrics.contains("patchctl_rollouts{state=\"scheduled\"} 1")
            || metrics.contains("patchctl_rollouts{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("patchctl_hosts_overdue 1\n"), "{metrics}");
    assert!(
        metrics.contains(
            "patchctl_environment_compliance_percent{environment=\"staging\\\"<b>\"} 100.0"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_are_named_and_unknown_things_are_404() {
    let (_dir, web) = fleet().await;
    for (uri, status, says) in [
        (
            "/hosts?compliance=great",
            StatusCode::BAD_REQUEST,
            "compliance",
        ),
        ("/hosts?label=nokey", StatusCode::BAD_REQUEST, "KEY=VALUE"),
        ("/hosts?offset=-1", StatusCode::BAD_REQUEST, "offset"),
        ("/?format=xml", StatusCode::BAD_REQUEST, "format"),
        ("/cve?id=CVE-1", StatusCode::BAD_REQUEST, "CVE-YYYY-NNNN"),
        ("/hosts/nope", StatusCode::NOT_FOUND, "no host"),
        ("/jobs/nope", StatusCode::NOT_FOUND, "no host reported job"),
        ("/jobs/a%20b", StatusCode::BAD_REQUEST, "not a job id"),
        ("/rollouts/r-none", StatusCode::NOT_FOUND, "no rollout"),
        ("/etc/passwd", StatusCode::NOT_FOUND, "no such page"),
    ] {
        let (got, _, body) = get(&web, uri).await;
        assert_eq!(got, status, "{uri}: {body}");
        assert!(body.contains(says), "{uri}: {body}");
    }
    let (got, kind, body) = get(&web, "/hosts/nope?format=json").await;
    assert_eq!(
        (got, kind.as_str()),
        (StatusCode::NOT_FOUND, "application/json")
    );
    assert!(body.contains("\"error\""), "{body}");
}

#[tokio::test]
async fn the_html_export_is_self_contained_and_the_csv_matches_the_figures() {
    let (_dir, web) = fleet().await;
    let d = web
        .store
        .compliance(crate::now(), web.stale_after)
        .await
        .expect("figures");
    let html = export::html(&pages::Fleet {
        compliance: d.clone(),
        history: Vec::new(),
    })
    .expect("html");
    assert!(!html.contains("href=\"/"), "no link back into a dashboard");
    assert!(!html.contains("src="), "nothing fetched");
    assert!(html.contains("<svg"), "charts inline");
    let csv = export::csv(&d);
    assert!(csv.starts_with("scope,name,figure,value\n"));
    assert!(
        csv.contains(&format!("fleet,,hosts_compliant,{}\n", d.hosts_compliant)),
        "{csv}"
    );
    assert!(
        csv.contains("environment,\"staging\"\"<b>\",hosts,1\n"),
        "{csv}"
    );
}
