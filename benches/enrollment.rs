//! Enrollment benchmark (release build), against the real `patchctl serve` with an enrolment
//! CA: BENCH_ENROLLMENTS (default 1,000) hosts enroll, BENCH_CONCURRENCY (default 50) at a
//! time, each over its own new TLS connection, checked by the agent's own CA-pin verifier and
//! carrying a CSR made by the agent's own code. Reported: wall time, enrolments/s, p50/p99
//! latency, and the controller's RSS and peak RSS.
//!
//! Side by side in the same run, the same number of connections that only complete the TLS
//! handshake and HTTP/2 setup: what enrolment costs beyond connecting.
//!
//! All of them dial from 127.0.0.1, so the controller runs with `--max-connections-per-ip
//! 4096` (its default of 64 is meant for one address, not for a fleet behind it).
//!
//! Keys and CSRs are made before the clock starts (each host makes its own; here they would
//! only compete with the controller for the same two cores).
//!
//! Run with `cargo bench --bench enrollment`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::net::{ca_hash, create_token, enrolling_controller};
use common::*;
use patch_agent::enroll::{csr::NewKey, pin::PinnedCa};
use patch_agent_wire::proto::{EnrollmentClient, v1 as pb};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(30));
    patch_agent_service::tls::connect(endpoint, addr, "127.0.0.1", tls)
        .await
        .map_err(|e| e.to_string())
}

/// Runs `jobs` with `concurrency` at a time; returns each one's latency, or the first error.
async fn drive<F, Fut>(
    n: usize,
    concurrency: usize,
    f: F,
) -> (Duration, Vec<Duration>, Option<String>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (f, next) = (f.clone(), next.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut err = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match f(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
            }
            (lat, err)
        });
    }
    let mut all = Vec::new();
    let mut first = None;
    while let Some(Ok((lat, err))) = tasks.join_next().await {
        all.extend(lat);
        if first.is_none() {
            first = err;
        }
    }
    all.sort_unstable();
    (start.elapsed(), all, first)
}

fn pct(all: &[Duration], p: f64) -> f64 {
    if all.is_empty() {
        return 0.0;
    }
    let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
    all[i].as_secs_f64() * 1000.0
}

fn main() {
    patch_agent_service::tls::install_default_provider();
    let n = env_num("BENCH_ENROLLMENTS", 1000);
    let concurrency = env_num("BENCH_CONCURRENCY", 50);
    let (tmp, pki) = setup("bench-enroll");
    let (_key, published) = signing_key(tmp.path());
    // Every simulated host dials from 127.0.0.1; real hosts come from their own addresses, so
    // lift the per-address connection limit (default 64) that closing connections would hit.
    let ctl = enrolling_controller(
        tmp.path(),
        &pki,
        "127.0.0.1:0",
        None,
        Some(&published),
        &["--max-connections-per-ip", "4096"],
    );
    let pid = ctl.child.id();
    let n_uses = n.to_string();
    let token = create_token(
        &tmp.path().join("controller.db"),
        &["--uses", &n_uses, "--labels", "bench=yes"],
    );
    let pin = patch_agent_service::tls::parse_pin(&ca_hash(&pki.path("ca.pem"))).expect("pin");
    let tls = PinnedCa::new(pin).client_config().expect("tls");

    let made = Instant::now();
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| {
                NewKey::generate(&format!("bench-{i:05}"))
                    .expect("key")
                    .csr_der
            })
            .collect(),
    );
    let keygen = made.elapsed();
    let (rss0, _) = patchctl::bench::memory_kib(pid).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Connections only: TLS 1.3 handshake (the controller's chain checked against the pin)
    // and HTTP/2 setup, then closed.
    let (addr, t) = (ctl.addr.clone(), tls.clone());
    let (conn_wall, conn_lat, conn_err) = rt.block_on(drive(n, concurrency, move |_| {
        let (addr, t) = (addr.clone(), t.clone());
        async move { connect(&addr, t).await.map(drop) }
    }));
    let (_, hwm_connect) = patchctl::bench::memory_kib(pid).unwrap_or_default();

    // Enrolments: connect, Enroll, close.
    let (addr, t, token2, csrs2) = (ctl.addr.clone(), tls.clone(), token.clone(), csrs.clone());
    let (wall, lat, err) = rt.block_on(drive(n, concurrency, move |i| {
        let (addr, t, token, csrs) = (addr.clone(), t.clone(), token2.clone(), csrs2.clone());
        async move {
            let channel = connect(&addr, t).await?;
            EnrollmentClient::new(channel)
                .enroll(pb::EnrollRequest {
                    token,
                    host_id: format!("bench-{i:05}"),
                    extra_sans: vec![],
                    csr_der: csrs[i].clone(),
                    facts: None,
                })
                .await
                .map(drop)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    }));
    let (rss, hwm) = patchctl::bench::memory_kib(pid).unwrap_or_default();
    let hosts = text(&run(Command::new(patchctl())
        .args(["hosts", "list", "--json", "--db"])
        .arg(tmp.path().join("controller.db"))));
    let enrolled = serde_json::from_str::<Vec<serde_json::Value>>(&hosts)
        .map(|v| v.len())
        .unwrap_or(0);

    println!(
        "enrollment benchmark: {n} hosts, {concurrency} at a time, one controller (release build), keys made beforehand in {:.2} s",
        keygen.as_secs_f64()
    );
    println!(
        "  connect only (TLS 1.3 + HTTP/2, pinned CA): {:>7.2} s  {:>7.0}/s  p50 {:.1} ms  p99 {:.1} ms{}",
        conn_wall.as_secs_f64(),
        conn_lat.len() as f64 / conn_wall.as_secs_f64(),
        pct(&conn_lat, 0.5),
        pct(&conn_lat, 0.99),
        conn_err
            .map(|e| format!("  first error: {e}"))
            .unwrap_or_default()
    );
    println!(
        "  enroll (connect + CSR check + sign + store): {:>7.2} s  {:>7.0}/s  p50 {:.1} ms  p99 {:.1} ms  ok {}/{n}{}",
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.len(),
        err.map(|e| format!("  first error: {e}"))
            .unwrap_or_default()
    );
    println!(
        "  controller RSS: {rss0} KiB before, {rss} KiB after; peak {hwm_connect} KiB after the connections, {hwm} KiB after the enrolments"
    );
    println!("  hosts in the database: {enrolled}");
    assert_eq!(lat.len(), n, "every enrolment succeeded");
    assert_eq!(enrolled, n);
    drop(ctl);
}
