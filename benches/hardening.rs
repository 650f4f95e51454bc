//! Hardening figures against the real agent (release build):
//!
//! 1. property run: 100,000 random `Job` payloads (and as many random byte strings) through
//!    the strict schema check, decoding and validation, for apt and dnf: no panic;
//! 2. connection hold: 2,000 TCP connections that never start a handshake plus 500 mTLS
//!    connections with a certificate that has no role, from other loopback addresses, all
//!    opened at once; meanwhile a controller's GetStatus latency, and the agent's RSS;
//! 3. chatty package: GetStatus p99 at idle, then during the install of a package whose
//!    maintainer script prints 20,000 lines.
//!
//! Run with `cargo bench --bench hardening` (needs `ulimit -n` above 3,000). `BENCH_PARTS`
//! picks parts (default `property,hold,chatty`); `PATCH_AGENT_BIN` runs another agent build,
//! e.g. the chatty part against the previous release for a side-by-side figure.

#[path = "../tests/common/mod.rs"]
mod common;

use common::jobs::*;
use common::*;
use patch_agent_wire::proto::{AgentClient, v1 as pb};
use std::time::{Duration, Instant};

fn main() {
    patch_agent_service::tls::install_default_provider();
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "property,hold,chatty".into());
    let part = |name: &str| parts.split(',').any(|p| p == name);
    let cases: u32 = std::env::var("BENCH_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    if part("property") {
        let t = Instant::now();
        let (ran, admitted) = jobgen::admission_never_panics(cases);
        println!(
            "property: {ran} random jobs (+{ran} random payloads) decoded and validated, {admitted} admitted, no panic, {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    if part("hold") {
        hold(&rt);
    }
    if part("chatty") {
        chatty(&rt);
    }
}

async fn latencies(channel: tonic::transport::Channel, limit: Duration) -> Vec<f64> {
    let mut client = AgentClient::new(channel);
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        client
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

fn pct(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

fn hold(rt: &tokio::runtime::Runtime) {
    let (tmp, pki) = setup("bench-hold");
    let (nobody_cert, nobody_key) = pki.issue(
        &tmp.path().join("nobody"),
        &["--name", "nobody", "--usage", "client"],
    );
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let pid = agent.child.id();
    let probe = agent_channel(rt, &pki, &agent.addr);
    let idle = rt.block_on(latencies(probe.clone(), Duration::from_secs(3)));
    let rss_idle = rss_kib(pid);
    let addr: std::net::SocketAddr = agent.addr.parse().expect("addr");
    let nobody =
        patch_agent_service::tls::client_config(&pki.path("ca.pem"), &nobody_cert, &nobody_key)
            .expect("config");
    let (silent, noroles, during, fresh) = rt.block_on(async {
        // 2,000 silent connections from 32 addresses (under the 64-per-address limit).
        let mut silent = Vec::new();
        for i in 0..2000u32 {
            let src: std::net::SocketAddr =
                format!("127.0.1.{}:0", 2 + i % 32).parse().expect("src");
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind(src).expect("bind");
            if let Ok(s) = sock.connect(addr).await {
                silent.push(s);
            }
        }
        // 500 no-role mTLS connections from 8 more addresses, concurrently.
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let nobody = nobody.clone();
            tasks.push(tokio::spawn(async move {
                let src: std::net::SocketAddr =
                    format!("127.0.2.{}:0", 2 + i % 8).parse().expect("src");
                let sock = tokio::net::TcpSocket::new_v4().ok()?;
                sock.bind(src).ok()?;
                let tcp = sock.connect(addr).await.ok()?;
                let tls = tokio_rustls::TlsConnector::from(nobody)
                    .connect("localhost".try_into().ok()?, tcp)
                    .await
                    .ok()?;
                Some(tls)
            }));
        }
        // A controller that connects now, while the table is full: connect, handshake, call.
        let mut fresh = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let channel = controller_args(&pki, &agent.addr)
                .connect()
                .await
                .expect("a fresh controller connection during the hold");
            AgentClient::new(channel)
                .get_status(pb::GetStatusRequest {})
                .await
                .expect("status");
            fresh.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let during = latencies(probe.clone(), Duration::from_secs(3)).await;
        let mut noroles = 0;
        for t in tasks {
            if let Ok(Some(_)) = t.await {
                noroles += 1;
            }
        }
        (silent.len(), noroles, during, fresh)
    });
    let rss_held = rss_kib(pid);
    println!(
        "hold: {silent} silent TCP + {noroles} no-role mTLS handshakes completed; controller GetStatus on its open connection p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} calls; idle p99 {:.2} ms); on a new connection (connect + TLS + call) median {:.1} ms, max {:.1} ms (20 connections); agent RSS {} KiB idle, {} KiB during the hold",
        pct(&during, 50),
        pct(&during, 99),
        pct(&during, 100),
        during.len(),
        pct(&idle, 99),
        pct(&fresh, 50),
        pct(&fresh, 100),
        rss_idle,
        rss_held
    );
}

/// GetStatus latencies while one job installs `chatty` with its postinst printing `lines`
/// lines, on a fresh sandbox; and at idle on the same agent before it.
/// CPU time (user + system) a process has used, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat (11 and 12 after the name).
    (ticks(11) + ticks(12)) * 1000.0 / 100.0
}

fn install_chatty(
    rt: &tokio::runtime::Runtime,
    lines: u32,
    round: u32,
) -> (Vec<f64>, Vec<f64>, f64) {
    let f = fixture(&format!("bench-chatty-{lines}-{round}"), "apt", &["extras"]);
    let dir = f.tmp.path().join("agent");
    let agent = Agent::start_with_env(
        &dir,
        &f.config("apt", ""),
        &[("CHATTY_LINES", &lines.to_string())],
    );
    let probe = agent_channel(rt, &f.pki, &agent.addr);
    let idle = rt.block_on(latencies(probe.clone(), Duration::from_secs(2)));
    let file = f.sign("chatty", &["--install", "chatty"]);
    let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let cpu_before = cpu_ms(agent.child.id());
    let mut during = Vec::new();
    rt.block_on(async {
        let mut client = AgentClient::new(probe.clone());
        loop {
            let t = Instant::now();
            let s = client
                .get_status(pb::GetStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            during.push(t.elapsed().as_secs_f64() * 1000.0);
            let running = s.jobs.is_some_and(|j| !j.running_job_id.is_empty());
            if !running && started.elapsed() > Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let cpu = cpu_ms(agent.child.id()) - cpu_before;
    let state = get_job(&agent, "chatty")["state"].clone();
    assert!(
        state
            .as_str()
            .unwrap_or("")
            .starts_with("JOB_STATE_SUCCEEDED"),
        "{state}"
    );
    (idle, during, cpu)
}

fn chatty(rt: &tokio::runtime::Runtime) {
    // Side by side, alternating: the same package printing 20,000 lines or none, so what the
    // agent does with the lines is told apart from apt and dpkg sharing its two cores.
    let (mut idle, mut loud, mut quiet) = (Vec::new(), Vec::new(), Vec::new());
    let (mut loud_cpu, mut quiet_cpu) = (0.0, 0.0);
    for round in 0..3 {
        for (lines, into, cpu) in [
            (20_000, &mut loud, &mut loud_cpu),
            (0, &mut quiet, &mut quiet_cpu),
        ] {
            let (i, d, c) = install_chatty(rt, lines, round);
            idle.extend(i);
            into.extend(d);
            *cpu += c / 3.0;
        }
    }
    let p = |v: &[f64]| pct(v, 99);
    println!(
        "chatty: GetStatus p99 {:.2} ms during installs printing 20,000 lines ({} calls), {:.2} ms during the same installs printing none ({} calls), {:.2} ms idle ({} calls); ratio to idle {:.2} (silent install {:.2})",
        p(&loud),
        loud.len(),
        p(&quiet),
        quiet.len(),
        p(&idle),
        idle.len(),
        p(&loud) / p(&idle).max(0.001),
        p(&quiet) / p(&idle).max(0.001)
    );
    println!(
        "chatty: the agent's own CPU per install job (mean of 3): {loud_cpu:.0} ms printing 20,000 lines, {quiet_cpu:.0} ms printing none"
    );
}
