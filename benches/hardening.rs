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
//! Run with `cargo bench --bench hardening` (needs `ulimit -n` above 3,000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::jobs::*;
use common::*;
use patch_agent::proto::{AgentClient, v1 as pb};
use std::time::{Duration, Instant};

fn main() {
    patch_agent::tls::install_default_provider();
    let cases: u32 = std::env::var("BENCH_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let t = Instant::now();
    let (ran, admitted) = jobgen::admission_never_panics(cases);
    println!(
        "property: {ran} random jobs (+{ran} random payloads) decoded and validated, {admitted} admitted, no panic, {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    hold(&rt);
    chatty(&rt);
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
    let nobody = patch_agent::tls::client_config(&pki.path("ca.pem"), &nobody_cert, &nobody_key)
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

fn chatty(rt: &tokio::runtime::Runtime) {
    let f = fixture("bench-chatty", "apt", &["extras"]);
    let agent = f.start("apt");
    let probe = agent_channel(rt, &f.pki, &agent.addr);
    let idle = rt.block_on(latencies(probe.clone(), Duration::from_secs(3)));
    let file = f.sign("chatty", &["--install", "chatty"]);
    let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
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
    let status = get_job(&agent, "chatty");
    println!(
        "chatty: install printing 20,000 lines took {:.1}s ({}); GetStatus p99 {:.2} ms during ({} calls) vs {:.2} ms idle: ratio {:.2}",
        started.elapsed().as_secs_f64(),
        status["state"].as_str().unwrap_or(""),
        pct(&during, 99),
        during.len(),
        pct(&idle, 99),
        pct(&during, 99) / pct(&idle, 99).max(0.001)
    );
}
