//! Metrics and dashboard benchmark (release build), side by side in one run:
//!
//! 1. the agent's `/metrics`: a real agent on the apt sandbox (its scan done), BENCH_SCRAPES
//!    (default 10,000) scrapes one after another, each on a new connection; latency p50/p99/max
//!    and the agent's RSS before and after; next to it, what the textfile collector's apt.sh
//!    runs for every refresh (`apt-get --just-print upgrade` on the same sandbox);
//! 2. the dashboard over BENCH_HOSTS (default 10,000) hosts with 50 pending updates each, on
//!    SQLite and on PostgreSQL: the real `patchctl serve --http`, each page fetched 20 times
//!    (p50 and max), next to `patchctl compliance --json` on the same database.
//!
//! Run with `cargo bench --bench observability`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::http;
use common::net::{Controller, issue_ctl_cert};
use common::*;
use patch_agent_controller::store::Location;
use patch_agent_controller::testing::Server;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// (p50, p99, max) in milliseconds.
fn quantiles(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

fn time_get(addr: &str, path: &str) -> f64 {
    let t = Instant::now();
    let r = http::get(addr, path);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    ms
}

fn agent_scrapes(tmp: &Path, pki: &Pki, scrapes: usize) {
    let sandbox = tmp.join("apt");
    apt_sandbox(&sandbox);
    let s = sandbox.display();
    let dir = tmp.join("agent");
    let config = config_text(
        &dir,
        pki,
        &format!(
            "[packages]\nmanager = \"apt\"\nscan_on_start = true\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
        ),
    );
    let agent = Agent::start(&dir, &config);
    agent.wait_log("Serving metrics at /metrics", 1);
    let addr = agent
        .log_text()
        .lines()
        .find(|l| l.contains("Serving metrics at /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .expect("address")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http::get(&addr, "/metrics")
        .body
        .contains("apt_upgrades_pending")
    {
        assert!(Instant::now() < deadline, "no scan: {}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = agent.child.id();
    // Warm up, then measure.
    for _ in 0..100 {
        time_get(&addr, "/metrics");
    }
    let before = rss_kib(pid);
    let times: Vec<f64> = (0..scrapes).map(|_| time_get(&addr, "/metrics")).collect();
    let after = rss_kib(pid);
    let (p50, p99, max) = quantiles(times);
    let size = http::get(&addr, "/metrics").body.len();
    let mut apt = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = run(Command::new("apt-get")
            .arg("-c")
            .arg(sandbox.join("apt.conf"))
            .args(["--just-print", "upgrade"]));
        assert!(out.status.success(), "apt-get: {}", text(&out));
        apt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (apt_p50, _, _) = quantiles(apt);
    println!(
        "agent /metrics, {scrapes} scrapes (new connection each, {size} bytes): p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms"
    );
    println!(
        "  agent RSS: {before} KiB before, {after} KiB after ({:+} KiB)",
        after as i64 - before as i64
    );
    println!(
        "  side by side: apt.sh's `apt-get --just-print upgrade` on the same sandbox: p50 {apt_p50:.1} ms per refresh"
    );
}

/// `patchctl compliance --json`: best of three, milliseconds.
fn compliance_ms(db: &str) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let out = run(Command::new(patchctl()).args(["compliance", "--json", "--db", db]));
            assert!(out.status.success(), "compliance: {}", text(&out));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::MAX, f64::min)
}

/// In process, best of five each, ms: the dashboard from one row per host (now), and the
/// reference computation over every row loaded (`compliance::compute`); they must agree.
fn in_process(db: &Location) -> (f64, f64) {
    use patch_agent_controller::store::{SqlStore, Store};
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let store = SqlStore::open_reader(db).await.expect("store");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let (mut per_host, mut aggregates) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = Instant::now();
            let a = store.compliance(now, 48 * 3600).await.expect("per host");
            per_host = per_host.min(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let snapshot = store.snapshot().await.expect("snapshot");
            let b = patch_agent_controller::compliance::compute(&snapshot, now, 48 * 3600);
            aggregates = aggregates.min(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(a.hosts_compliant, b.hosts_compliant);
            assert_eq!(a.by_class[3].overdue, b.by_class[3].overdue);
        }
        (per_host, aggregates)
    })
}

fn dashboard(tmp: &Path, pki: &Pki, name: &str, db: &str, location: &Location) {
    let (per_host, aggregates) = in_process(location);
    println!(
        "  {name}: the figures in process: {per_host:.0} ms from one row per host, {aggregates:.0} ms loading every row and computing (best of 5)"
    );
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    issue_ctl_cert(&dir, pki, "127.0.0.1");
    std::fs::write(dir.join("db-url"), db).expect("db");
    let ctl = Controller::start_with(
        &dir,
        pki,
        "127.0.0.1:0",
        None,
        &strings(&["--http", "127.0.0.1:0"]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) = ctl
            .log_text()
            .split("dashboard and /metrics on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
        {
            break a.to_string();
        }
        assert!(Instant::now() < deadline, "{}", ctl.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "  {name}: `patchctl compliance --json` {:.0} ms (best of 3)",
        compliance_ms(db)
    );
    for path in [
        "/",
        "/?format=json",
        "/hosts",
        "/hosts?compliance=compliant",
        "/hosts/host-00042",
        "/cve?id=CVE-2026-1000",
        "/metrics",
    ] {
        time_get(&addr, path);
        let (p50, _, max) = quantiles((0..20).map(|_| time_get(&addr, path)).collect());
        let size = http::get(&addr, path).body.len();
        println!("  {name}: GET {path:<28} p50 {p50:>7.1} ms  max {max:>7.1} ms  ({size} bytes)");
    }
}

fn main() {
    patch_agent_service::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");
    agent_scrapes(tmp.path(), &pki, env_num("BENCH_SCRAPES", 10_000));

    let hosts = env_num("BENCH_HOSTS", 10_000);
    let pg = Server::start(true).expect("PostgreSQL");
    let sqlite = tmp.path().join("fleet.db");
    let s_build = common::dataset::fleet(&Location::File(sqlite.clone()), hosts);
    let url = pg.database().expect("db");
    let p_build = common::dataset::fleet(&Location::Postgres(url.clone()), hosts);
    println!(
        "dashboard over {hosts} hosts x 50 pending updates (written in {:.1} s SQLite, {:.1} s PostgreSQL), 20 fetches each:",
        s_build.as_secs_f64(),
        p_build.as_secs_f64()
    );
    dashboard(
        tmp.path(),
        &pki,
        "SQLite",
        &sqlite.display().to_string(),
        &Location::File(sqlite.clone()),
    );
    dashboard(
        tmp.path(),
        &pki,
        "PostgreSQL",
        &url,
        &Location::Postgres(url.clone()),
    );
    pg.stop();
}
