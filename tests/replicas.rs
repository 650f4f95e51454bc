//! Several controllers on one PostgreSQL database: a real server (initdb and pg_ctl as an
//! unprivileged user, on a Unix socket), two `patchctl serve` replicas, three agents reached
//! only through their control channels.
//!
//! A rollout created on replica A is driven by A; its first host holds its channel to B, so
//! A's push reaches it through the database (LISTEN/NOTIFY). A is SIGKILLed mid-rollout: its
//! agents fail over to B, B takes the rollout's lease and finishes it from the stored state.
//! Every result is stored once and every host ran the job once, checked on the hosts
//! (dpkg-query, hook run counts) and in the database.

mod common;

use common::net::{Backend, Controller, created_id, db_of, issue_ctl_cert};
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Replicas {
    a: Option<Controller>,
    b: Controller,
    agents: Vec<(Agent, PathBuf)>,
    a_dir: PathBuf,
    key: PathBuf,
    pki: Pki,
    tmp: tempfile::TempDir,
}

impl Replicas {
    /// patchctl with the operator's certificate against replica `ctl`.
    fn operator(&self, ctl: &Controller, args: &[&str]) -> Command {
        let prefix = self.tmp.path().join("operator");
        let mut c = Command::new(patchctl());
        c.args(args)
            .arg("--controller")
            .arg(&ctl.addr)
            .args(["--server-name", "controller.fleet", "--ca"])
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(prefix.with_extension("pem"))
            .arg("--key")
            .arg(prefix.with_extension("key"));
        c
    }

    fn show(&self, ctl: &Controller, id: &str) -> Value {
        let out = run(&mut self.operator(ctl, &["rollouts", "show", id, "--json"]));
        assert!(out.status.success(), "rollouts show: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("rollout JSON")
    }

    fn wait(
        &self,
        ctl: &Controller,
        id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.show(ctl, id);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {id}: not {what} within {timeout:?}: {v:#}\nA:\n{}\nB:\n{}",
                self.a.as_ref().map(|c| c.log_text()).unwrap_or_default(),
                self.b.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn db(&self) -> String {
        db_of(&self.a_dir)
    }

    fn runs(&self, i: usize) -> usize {
        std::fs::read_to_string(self.agents[i].1.join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn dpkg_version(&self, i: usize, package: &str) -> String {
        let out = run(Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}/apt/root/var/lib/dpkg",
                self.agents[i].1.display()
            ))
            .args(["-W", "-f", "${Version}", package]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Two replicas (A and B) on one new database, and three agents: host1 lists B first, host2
/// and host3 list A first.
fn start() -> Replicas {
    let (tmp, pki) = setup("replicas");
    Backend::Postgres.prepare(tmp.path());
    let url = db_of(tmp.path());
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).expect("dir");
        std::fs::write(d.join("db-url"), &url).expect("db-url");
        issue_ctl_cert(d, &pki, "127.0.0.1");
    }
    pki.issue(&tmp.path().join("operator"), &["--name", "operator"]);
    let (key, trusted) = signing_key(tmp.path());
    let extra = strings(&["--operators", "operator"]);
    let a = Controller::start_with(&a_dir, &pki, "127.0.0.1:0", None, &extra);
    let b = Controller::start_with(&b_dir, &pki, "127.0.0.1:0", None, &extra);
    let mut agents = Vec::new();
    for i in 1..=3 {
        let id = format!("host{i}");
        let dir = tmp.path().join(&id);
        apt_sandbox(&dir.join("apt"));
        std::fs::create_dir_all(dir.join("hooks")).expect("hooks");
        hook(
            &dir,
            "pre",
            &format!("echo run >> {}\nsleep 3", dir.join("runs").display()),
        );
        pki.issue(&dir.join("agent"), &["--name", &id, "--usage", "server"]);
        let order = if i == 1 {
            [&b.addr, &a.addr]
        } else {
            [&a.addr, &b.addr]
        };
        let (d, s) = (dir.display(), dir.join("apt").display().to_string());
        let config = format!(
            "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"{id}\"\n\
             [server]\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
             [auth]\ncontrollers = [\"controller\"]\n\
             [packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\ndpkg_args = [\"--root={s}/root\", \"--force-not-root\", \"--force-script-chrootless\", \"--log={s}/root/var/log/dpkg.log\"]\n\
             [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\nhooks_dir = \"{d}/hooks\"\n\
             [report]\ncontrollers = [\"{first}\", \"{second}\"]\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ntimeout = \"3s\"\n",
            ca = pki.path("ca.pem").display(),
            t = trusted.display(),
            first = order[0],
            second = order[1],
        );
        agents.push((Agent::start(&dir, &config), dir));
    }
    Replicas {
        a: Some(a),
        b,
        agents,
        a_dir,
        key,
        pki,
        tmp,
    }
}

fn hook(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("hooks").join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn wait_log(ctl: &Controller, needle: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    while !ctl.log_text().contains(needle) {
        assert!(
            start.elapsed() < timeout,
            "no {needle:?} within {timeout:?}: {}",
            ctl.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn a_killed_replica_rollout_is_finished_by_another_and_every_result_is_stored_once() {
    let mut r = start();
    // Each host's channel where its list puts it: host1 on B, host2 and host3 on A.
    let a = r.a.as_ref().expect("a");
    wait_log(
        &r.b,
        "Control channel open host=host1",
        Duration::from_secs(20),
    );
    wait_log(
        a,
        "Control channel open host=host2",
        Duration::from_secs(20),
    );
    wait_log(
        a,
        "Control channel open host=host3",
        Duration::from_secs(20),
    );
    let out = run(r
        .operator(a, &["rollout", "--json"])
        .arg("--signing-key")
        .arg(&r.key)
        .args([
            "--id",
            "ha-r",
            "--detach",
            "--hosts",
            "host1,host2,host3",
            "--serial",
            "1",
            "--host-timeout",
            "90s",
            "--install",
            "alpha=1.1",
            "--pre-hook",
            "pre",
        ]));
    assert!(out.status.success(), "create on A: {}", text(&out));
    let id = created_id(&out);
    wait_log(a, "Driving rollout", Duration::from_secs(10));
    assert!(
        !r.b.log_text().contains("Driving rollout"),
        "one replica drives: {}",
        r.b.log_text()
    );

    // host1's channel is on B: A's push got there through the database.
    r.wait(a, &id, Duration::from_secs(60), "host1 succeeded", |v| {
        v["occurrences"][0]["hosts"][0]["result"] == "succeeded"
    });
    assert!(
        !a.log_text().contains("Control channel open host=host1"),
        "host1 never connected to A"
    );
    assert!(
        a.log_text()
            .contains("Push relayed to the controller that holds the host host=host1"),
        "{}",
        a.log_text()
    );
    assert!(
        !r.b.log_text().contains("Driving rollout"),
        "A still drives"
    );

    // A dies while host2 runs the job.
    r.wait(a, &id, Duration::from_secs(60), "admitted on host2", |v| {
        v["occurrences"][0]["hosts"][1]["result"] == "admitted"
    });
    let mut dead = r.a.take().expect("a");
    dead.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = dead.child.wait();
    let took = wait_log(
        &r.b,
        "Driving rollout (lease taken)",
        Duration::from_secs(40),
    );
    assert!(
        killed.elapsed() <= Duration::from_secs(30),
        "B took the rollout over after {took:?}: {}",
        r.b.log_text()
    );
    eprintln!("takeover after {:.1}s", killed.elapsed().as_secs_f64());
    let v = r.wait(&r.b, &id, Duration::from_secs(120), "completed", |v| {
        v["state"] == "completed"
    });
    for (i, h) in v["occurrences"][0]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .enumerate()
    {
        assert_eq!(h["result"], "succeeded", "host{}: {v:#}", i + 1);
    }
    // The database says the same to `patchctl rollouts --db`, with no controller asked.
    let out = run(Command::new(patchctl())
        .args(["rollouts", "show", &id, "--json", "--db"])
        .arg(r.db()));
    assert!(out.status.success(), "rollouts show --db: {}", text(&out));
    let stored: Value = serde_json::from_slice(&out.stdout).expect("rollout JSON");
    assert_eq!(stored["state"], "completed", "{stored:#}");
    let out = run(Command::new(patchctl())
        .args(["rollouts", "list", "--db"])
        .arg(r.db()));
    assert!(text(&out).contains(&id), "{}", text(&out));
    // The agents whose first controller died report through the second.
    wait_log(
        &r.b,
        "Control channel open host=host2",
        Duration::from_secs(5),
    );
    wait_log(
        &r.b,
        "Control channel open host=host3",
        Duration::from_secs(5),
    );

    // On the hosts: installed, and the job ran once on each (no second push after takeover).
    for i in 0..3 {
        assert_eq!(r.dpkg_version(i, "alpha"), "1.1", "host{}", i + 1);
        assert_eq!(r.runs(i), 1, "host{} ran the job once", i + 1);
    }
    // In the database: one final result per host.
    let job = v["occurrences"][0]["job_id"].as_str().expect("job id");
    let out = run(Command::new(patchctl())
        .args(["history", "--json", "--job", job, "--db"])
        .arg(r.db()));
    assert!(out.status.success(), "history: {}", text(&out));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("history JSON");
    let mut hosts: Vec<&str> = rows
        .iter()
        .filter(|row| row["final"] == true)
        .filter_map(|row| row["host_id"].as_str())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["host1", "host2", "host3"], "{rows:#?}");
}
