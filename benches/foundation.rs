//! Foundation benchmark: start-to-READY, idle RSS, GetStatus load over mTLS, binary sizes.
//!
//!     cargo bench --bench foundation            # full run (about 40 s of load)
//!     BENCH_SECONDS=3 cargo bench --bench foundation
//!
//! Runs the release binaries (the bench profile) with a throwaway PKI; prints a table for
//! docs/PERFORMANCE.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn main() {
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");

    // Start to READY=1: spawn to the notification, ten times.
    let mut ready = Vec::new();
    for i in 0..10 {
        let dir = tmp.path().join(format!("start{i}"));
        let mut agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
        ready.push(agent.ready_in);
        agent.signal(nix::sys::signal::Signal::SIGTERM);
        agent.wait_exit(Duration::from_secs(10));
    }
    ready.sort();

    let dir = tmp.path().join("load");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    std::thread::sleep(Duration::from_secs(1));
    let pid = agent.child.id();
    let idle = memory(pid);

    let mut rows = Vec::new();
    for connections in [1, 4] {
        let out = Command::new(patchctl())
            .args([
                "bench",
                "status",
                "--agent",
                &agent.addr,
                "--json",
                "--concurrency",
                "64",
            ])
            .args([
                "--connections",
                &connections.to_string(),
                "--duration",
                &format!("{secs}s"),
            ])
            .args(["--agent-pid", &pid.to_string()])
            .env("PATCHCTL_CA", pki.path("ca.pem"))
            .env("PATCHCTL_CERT", pki.path("controller.pem"))
            .env("PATCHCTL_KEY", pki.path("controller.key"))
            .output()
            .expect("patchctl bench");
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        rows.push(v);
    }
    let after = memory(pid);

    let size = |name: &std::path::Path| {
        std::fs::metadata(name).map(|m| m.len()).unwrap_or(0) as f64 / 1_048_576.0
    };
    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!(
        "| start to READY=1 (10 starts) | median {:.1} ms, max {:.1} ms | ≤ 100 ms |",
        ms(ready[ready.len() / 2]),
        ms(ready[ready.len() - 1])
    );
    println!(
        "| agent RSS idle | {:.1} MiB | ≤ 8 MiB |",
        idle.0 as f64 / 1024.0
    );
    for v in &rows {
        let r = &v["report"];
        println!(
            "| GetStatus, 64 streams over {} conn, {}s | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors | ≥ 20,000 req/s, p99 ≤ 5 ms |",
            r["connections"],
            secs,
            r["requests_per_second"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["errors"]
        );
    }
    println!(
        "| agent RSS after load / peak | {:.1} MiB / {:.1} MiB | ≤ 16 MiB |",
        after.0 as f64 / 1024.0,
        after.1 as f64 / 1024.0
    );
    println!(
        "| patch-agent binary (stripped) | {:.2} MiB | ≤ 15 MiB |",
        size(&agent_bin())
    );
    println!(
        "| patchctl binary (stripped) | {:.2} MiB | — |",
        size(&patchctl())
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn memory(pid: u32) -> (u64, u64) {
    patchctl::bench::memory_kib(pid).expect("agent memory")
}
