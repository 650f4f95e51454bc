//! Fleet benchmark (release build), both against the real `patchctl serve`:
//!
//! 1. ingest: 50 concurrent agents' worth of job reports (each client its own mTLS connection
//!    and certificate, sending one report at a time as an agent's outbox does) into SQLite;
//!    reports/s, then the same reports again (all duplicates);
//! 2. fan-out: BENCH_AGENTS (default 100) real agent processes on loopback, each with its own
//!    apt sandbox, all reporting to the controller; `patchctl rollout --serial 100%` of a
//!    dry-run scan to all of them: wall time, the longest job on any agent, the difference
//!    (the rollout's own overhead), and the peak RSS of `patchctl rollout` and of
//!    `patchctl serve`.
//!
//! Run with `cargo bench --bench fleet` (BENCH_REPORTS=N per client, default 400).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start_controller(dir: &Path, pki: &Pki) -> (Child, String) {
    pki.issue(
        &dir.join("ctl"),
        &[
            "--name",
            "controller.bench",
            "--san",
            "127.0.0.1",
            "--usage",
            "server",
        ],
    );
    let log = dir.join("controller.log");
    let mut child = Command::new(patchctl())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.join("controller.db"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(dir.join("ctl.pem"))
        .arg("--key")
        .arg(dir.join("ctl.key"))
        // All agents dial from 127.0.0.1, like a site behind one NAT address.
        .args([
            "--operators",
            "controller",
            "--max-connections-per-ip",
            "1024",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = t.split("listening on ").nth(1) {
            return (
                child,
                rest.split_whitespace().next().unwrap_or_default().into(),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("controller did not start");
}

fn ingest(tmp: &Path, pki: &Pki, addr: &str, clients: usize, per_client: usize) {
    // One certificate naming every bench host.
    let mut args = vec![
        "--name".to_string(),
        "h0".into(),
        "--usage".into(),
        "server".into(),
    ];
    for i in 1..clients {
        args.extend(["--san".to_string(), format!("h{i}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (cert, key) = pki.issue(&tmp.join("hosts"), &args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push(
                controller_client(&pki.path("ca.pem"), &cert, &key, addr, "controller.bench").await,
            );
        }
        for round in ["new", "duplicate"] {
            let started = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for (i, c) in conns.iter().enumerate() {
                let mut c = c.clone();
                set.spawn(async move {
                    let host = format!("h{i}");
                    let mut dup = 0;
                    for n in 0..per_client {
                        let ack = c
                            .report_job(job_report(&host, n))
                            .await
                            .expect("report")
                            .into_inner();
                        dup += usize::from(ack.duplicate);
                    }
                    dup
                });
            }
            let mut dups = 0;
            while let Some(r) = set.join_next().await {
                dups += r.expect("task");
            }
            let total = clients * per_client;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "ingest ({round}): {total} reports from {clients} clients in {secs:.2} s = {:.0} reports/s ({dups} acknowledged as duplicates)",
                total as f64 / secs
            );
        }
    });
}

fn fan_out(tmp: &Path, pki: &Pki, ctl_addr: &str, ctl_pid: u32, agents: usize) {
    let base = tmp.join("sandbox");
    apt_sandbox(&base);
    let (signing, trusted) = signing_key(tmp);
    let mut args = vec![
        "--name".to_string(),
        "a0".into(),
        "--san".into(),
        "127.0.0.1".into(),
        "--usage".into(),
        "server".into(),
    ];
    for i in 1..agents {
        args.extend(["--san".to_string(), format!("a{i}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (cert, key) = pki.issue(&tmp.join("agents"), &args);

    let started = Instant::now();
    let mut running: Vec<Agent> = Vec::new();
    let mut hosts = String::new();
    for i in 0..agents {
        let dir = tmp.join(format!("a{i}"));
        let s = dir.join("apt");
        std::fs::create_dir_all(&dir).expect("dir");
        // A copy of the sandbox with its paths rewritten.
        assert!(
            run(Command::new("cp").arg("-a").arg(&base).arg(&s))
                .status
                .success()
        );
        let from = base.display().to_string();
        let to = s.display().to_string();
        for f in ["apt.conf", "root/etc/apt/sources.list"] {
            let p = s.join(f);
            if let Ok(t) = std::fs::read_to_string(&p) {
                std::fs::write(&p, t.replace(&from, &to)).expect("rewrite");
            }
        }
        let sd = s.display();
        let config = format!(
            "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"a{i}\"\n\
             [server]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [auth]\ncontrollers = [\"controller\"]\n\
             [log]\nlevel = \"warn\"\n\
             [packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{sd}/apt.conf\"\ndpkg_status = \"{sd}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{sd}/root/run/reboot-required\"\n\
             [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\n\
             [report]\ncontroller = \"{ctl_addr}\"\nserver_name = \"controller.bench\"\nretry_initial = \"200ms\"\nretry_max = \"2s\"\n",
            d = dir.display(),
            ca = pki.path("ca.pem").display(),
            cert = cert.display(),
            key = key.display(),
            t = trusted.display(),
        );
        let agent = Agent::start(&dir, &config);
        hosts.push_str(&format!(
            "[[host]]\nid = \"a{i}\"\naddress = \"{}\"\n\n",
            agent.addr
        ));
        running.push(agent);
    }
    println!(
        "fan-out: {agents} agents started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let hosts_file = tmp.join("hosts.toml");
    std::fs::write(&hosts_file, hosts).expect("hosts");
    let t0 = Instant::now();
    let mut rollout = Command::new(patchctl())
        .args(["rollout", "--json", "--serial", "100%", "--inventory"])
        .arg(&hosts_file)
        .arg("--signing-key")
        .arg(&signing)
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("controller.pem"))
        .arg("--key")
        .arg(pki.path("controller.key"))
        .args(["--scan", "--dry-run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("rollout");
    let pid = rollout.id();
    let mut peak = 0;
    while rollout.try_wait().expect("wait").is_none() {
        if let Some((_, hwm)) = patchctl::bench::memory_kib(pid) {
            peak = peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed();
    let out = rollout.wait_with_output().expect("rollout");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rollout json");
    let longest = v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h["job_ms"].as_u64())
        .max()
        .unwrap_or(0);
    println!(
        "fan-out: dry-run scan to {agents} agents: {} succeeded; wall {:.2} s, longest job on an agent {:.2} s, beyond the agents' own work {:.2} s",
        v["succeeded"],
        wall.as_secs_f64(),
        longest as f64 / 1000.0,
        wall.as_secs_f64() - longest as f64 / 1000.0
    );
    println!(
        "fan-out: patchctl rollout peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
    // Every agent's result reaches the controller.
    let db = tmp.join("controller.db");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finals = 0;
    while Instant::now() < deadline {
        let out = run(Command::new(patchctl())
            .args(["history", "--json", "--db"])
            .arg(&db));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        finals = rows.iter().filter(|r| r["final"] == true).count();
        if finals >= agents {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "fan-out: {finals} of {agents} results at the controller {:.2} s after the rollout started",
        t0.elapsed().as_secs_f64()
    );
    if let Some((rss, hwm)) = patchctl::bench::memory_kib(ctl_pid) {
        println!(
            "controller (patchctl serve): RSS {:.1} MiB, peak {:.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    through_the_channel(pki, ctl_addr, &signing, agents);
    let agent_rss: Vec<u64> = running
        .iter()
        .filter_map(|a| patchctl::bench::memory_kib(a.child.id()).map(|m| m.0))
        .collect();
    if !agent_rss.is_empty() {
        println!(
            "agents: RSS mean {:.1} MiB, max {:.1} MiB",
            agent_rss.iter().sum::<u64>() as f64 / agent_rss.len() as f64 / 1024.0,
            *agent_rss.iter().max().unwrap_or(&0) as f64 / 1024.0
        );
    }
    drop(running);
}

/// The same fan-out driven by the controller through the agents' control channels
/// (`patchctl rollout --controller`): wall time from create to the last result.
fn through_the_channel(pki: &Pki, ctl_addr: &str, signing: &Path, agents: usize) {
    let hosts: Vec<String> = (0..agents).map(|i| format!("a{i}")).collect();
    let t0 = Instant::now();
    let out = run(Command::new(patchctl())
        .args([
            "rollout",
            "--json",
            "--serial",
            "100%",
            "--controller",
            ctl_addr,
        ])
        .args(["--server-name", "controller.bench", "--hosts"])
        .arg(hosts.join(","))
        .arg("--signing-key")
        .arg(signing)
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("controller.pem"))
        .arg("--key")
        .arg(pki.path("controller.key"))
        .args(["--scan", "--dry-run"]));
    let wall = t0.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("rollout json ({e}): {}", text(&out)));
    let ok = v["occurrences"][0]["succeeded"].as_u64().unwrap_or(0);
    println!(
        "fan-out through the control channel (patchctl rollout --controller): {ok} of {agents} succeeded; wall {:.2} s from create to the last result",
        wall.as_secs_f64()
    );
}

fn main() {
    patch_agent_service::tls::install_default_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");
    let (mut ctl, addr) = start_controller(tmp.path(), &pki);
    let per_client = env_num("BENCH_REPORTS", 400);
    ingest(tmp.path(), &pki, &addr, 50, per_client);
    if let Some((rss, hwm)) = patchctl::bench::memory_kib(ctl.id()) {
        println!(
            "controller after ingest: RSS {:.1} MiB, peak {:.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    let _ = ctl.kill();
    let _ = ctl.wait();
    // A fresh controller and database for the fan-out.
    let fan = tmp.path().join("fan");
    std::fs::create_dir_all(&fan).expect("dir");
    let (mut ctl, addr) = start_controller(&fan, &pki);
    fan_out(&fan, &pki, &addr, ctl.id(), env_num("BENCH_AGENTS", 100));
    let _ = ctl.kill();
    let _ = ctl.wait();
}
