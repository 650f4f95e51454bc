//! Store benchmark (release build): SQLite and PostgreSQL side by side in one run, against
//! the real `patchctl serve` and a real PostgreSQL server (fsync on, on this machine's disk,
//! sharing its cores with everything else).
//!
//! 1. ingest: 50 clients (each its own mTLS connection, one report at a time, as an agent's
//!    outbox sends) into one controller on SQLite, then into two replicas on one PostgreSQL
//!    database (25 clients each); new reports, then the same again (all duplicates);
//! 2. compliance: a fleet of BENCH_HOSTS (default 10,000) hosts with 50 pending updates each,
//!    written through the store, then `patchctl compliance --json` (the real command: process
//!    start, connect, the SQL, the output) on each store, best of three;
//! 3. failover: a rollout driven by replica A (waiting for a host that never connects); A is
//!    SIGKILLed; the time until replica B has taken its lease, three rounds.
//!
//! Run with `cargo bench --bench stores` (BENCH_REPORTS=N per client, default 400).

#[path = "../tests/common/mod.rs"]
mod common;

use common::net::{Controller, issue_ctl_cert};
use common::*;
use patch_agent_controller::store::{Location, SqlStore, Store};
use patch_agent_controller::testing::Server;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A controller in `dir` on `db`, quiet.
fn controller(dir: &Path, pki: &Pki, db: &str, extra: &[&str]) -> Controller {
    std::fs::create_dir_all(dir).expect("dir");
    if !dir.join("ctl.pem").exists() {
        issue_ctl_cert(dir, pki, "127.0.0.1");
    }
    std::fs::write(dir.join("db-url"), db).expect("db");
    let mut args = strings(&["--max-connections-per-ip", "1024"]);
    args.extend(strings(extra));
    Controller::start_env(
        dir,
        pki,
        "127.0.0.1:0",
        None,
        &args,
        &[("RUST_LOG", "info")],
    )
}

/// 50 clients spread over `addrs`; reports/s of new reports, then of duplicates.
fn ingest(
    tmp: &Path,
    pki: &Pki,
    addrs: &[String],
    clients: usize,
    per_client: usize,
) -> (f64, f64) {
    let mut args = strings(&["--name", "h0", "--usage", "server"]);
    for i in 1..clients {
        args.extend(["--san".to_string(), format!("h{i}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let prefix = tmp.join("hosts");
    let (cert, key) = if prefix.with_extension("pem").exists() {
        (prefix.with_extension("pem"), prefix.with_extension("key"))
    } else {
        pki.issue(&prefix, &args)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..clients {
            let addr = &addrs[i % addrs.len()];
            conns.push(
                controller_client(&pki.path("ca.pem"), &cert, &key, addr, "controller.fleet").await,
            );
        }
        let mut rates = Vec::new();
        for _round in ["new", "duplicate"] {
            let started = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for (i, c) in conns.iter().enumerate() {
                let mut c = c.clone();
                set.spawn(async move {
                    let host = format!("h{i}");
                    for n in 0..per_client {
                        c.report_job(job_report(&host, n)).await.expect("report");
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.expect("task");
            }
            rates.push((clients * per_client) as f64 / started.elapsed().as_secs_f64());
        }
        (rates[0], rates[1])
    })
}

/// `patchctl compliance --json` on `db`: best of three, seconds; and the hosts it counted.
fn compliance(db: &str) -> (f64, u64) {
    let mut best = f64::MAX;
    let mut hosts = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let out = run(Command::new(patchctl()).args(["compliance", "--json", "--db", db]));
        let secs = started.elapsed().as_secs_f64();
        assert!(out.status.success(), "compliance: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        hosts = v["hosts"].as_u64().unwrap_or(0);
        best = best.min(secs);
    }
    (best, hosts)
}

/// In process: the dashboard in SQL, and the way `compliance` used to work (every host,
/// pending update, resolved update and result loaded, then computed), seconds each.
fn in_process(db: &Location) -> (f64, f64) {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let store = SqlStore::open_reader(db).await.expect("store");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let t = Instant::now();
        let sql = store.compliance(now, 48 * 3600).await.expect("sql");
        let in_sql = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let snap = store.snapshot().await.expect("snapshot");
        let loaded = patch_agent_controller::compliance::compute(&snap, now, 48 * 3600);
        let loading = t.elapsed().as_secs_f64();
        assert_eq!(sql.hosts_compliant, loaded.hosts_compliant);
        assert_eq!(sql.by_class[0].overdue, loaded.by_class[0].overdue);
        (in_sql, loading)
    })
}

fn failover(tmp: &Path, pki: &Pki, url: &str, rounds: usize) -> Vec<f64> {
    pki.issue(&tmp.join("operator"), &["--name", "operator"]);
    let (key, _) = signing_key(tmp);
    let mut b = controller(&tmp.join("fb"), pki, url, &["--operators", "operator"]);
    let mut times = Vec::new();
    for round in 0..rounds {
        let a = controller(
            &tmp.join(format!("fa{round}")),
            pki,
            url,
            &["--operators", "operator"],
        );
        let prefix = tmp.join("operator");
        let out = run(Command::new(patchctl())
            .args(["rollout", "--json", "--detach", "--controller", &a.addr])
            .args(["--server-name", "controller.fleet", "--ca"])
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(prefix.with_extension("pem"))
            .arg("--key")
            .arg(prefix.with_extension("key"))
            .arg("--signing-key")
            .arg(&key)
            .args(["--hosts", "ghost", "--host-timeout", "1h", "--scan"]));
        assert!(out.status.success(), "rollout: {}", text(&out));
        let before = b.log_text().matches("lease taken").count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.log_text().contains("Driving rollout") {
            assert!(
                Instant::now() < deadline,
                "A does not drive: {}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut a = a;
        a.child.kill().expect("SIGKILL");
        let killed = Instant::now();
        let _ = a.child.wait();
        while b.log_text().matches("lease taken").count() == before {
            assert!(killed.elapsed() < Duration::from_secs(60), "no takeover");
            std::thread::sleep(Duration::from_millis(20));
        }
        times.push(killed.elapsed().as_secs_f64());
    }
    b.kill();
    times
}

fn main() {
    patch_agent_service::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");
    let pg = Server::start(true).expect("PostgreSQL");
    let per_client = env_num("BENCH_REPORTS", 400);
    let clients = 50;

    // 1. Ingest.
    let sqlite = tmp.path().join("ingest.db").display().to_string();
    let one = controller(&tmp.path().join("s"), &pki, &sqlite, &[]);
    let (s_new, s_dup) = ingest(
        tmp.path(),
        &pki,
        std::slice::from_ref(&one.addr),
        clients,
        per_client,
    );
    drop(one);
    let url = pg.database().expect("db");
    let a = controller(&tmp.path().join("pa"), &pki, &url, &[]);
    let b = controller(&tmp.path().join("pb"), &pki, &url, &[]);
    let (p_new, p_dup) = ingest(
        tmp.path(),
        &pki,
        &[a.addr.clone(), b.addr.clone()],
        clients,
        per_client,
    );
    drop((a, b));
    let total = clients * per_client;
    println!("ingest, {clients} clients, {total} reports each round:");
    println!(
        "  SQLite, one controller:        {s_new:>7.0} reports/s new, {s_dup:>7.0} duplicates"
    );
    println!(
        "  PostgreSQL, two replicas:      {p_new:>7.0} reports/s new, {p_dup:>7.0} duplicates"
    );

    // 2. Compliance at fleet scale.
    let hosts = env_num("BENCH_HOSTS", 10_000);
    let sqlite = tmp.path().join("fleet.db");
    let s_build = common::dataset::fleet(&Location::File(sqlite.clone()), hosts);
    let url = pg.database().expect("db");
    let p_build = common::dataset::fleet(&Location::Postgres(url.clone()), hosts);
    let (s_secs, s_hosts) = compliance(&sqlite.display().to_string());
    let (p_secs, p_hosts) = compliance(&url);
    assert_eq!((s_hosts, p_hosts), (hosts as u64, hosts as u64));
    println!(
        "compliance over {hosts} hosts x 50 pending updates (`patchctl compliance --json`, best of 3):"
    );
    println!(
        "  SQLite:      {s_secs:.3} s   (dataset written in {:.1} s)",
        s_build.as_secs_f64()
    );
    println!(
        "  PostgreSQL:  {p_secs:.3} s   (dataset written in {:.1} s)",
        p_build.as_secs_f64()
    );

    let (s_sql, s_load) = in_process(&Location::File(sqlite.clone()));
    let (p_sql, p_load) = in_process(&Location::Postgres(url.clone()));
    println!(
        "  in process, SQL vs loading every row: SQLite {s_sql:.3} s vs {s_load:.3} s, PostgreSQL {p_sql:.3} s vs {p_load:.3} s"
    );

    // 3. Failover of a driven rollout.
    let url = pg.database().expect("db");
    let times = failover(tmp.path(), &pki, &url, 3);
    println!(
        "failover: replica B drove the rollout {} s after replica A was SIGKILLed",
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    pg.stop();
}
