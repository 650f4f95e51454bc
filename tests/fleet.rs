//! The fleet, end to end: a controller (`patchctl serve`) and agents, each in its own network
//! namespace on a bridge the test creates, each agent with its own apt sandbox; rollouts in
//! batches with a failure threshold; reports that survive SIGKILL and cut links; trust; and the
//! compliance figures computed from a database the test builds.

mod common;

use common::net::{Backend, Controller, Net, db_of, issue_ctl_cert};
use common::*;
use nix::sys::signal::Signal;
use patch_agent_wire::proto::v1 as pb;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a test against each store: `NAME::sqlite` and `NAME::postgres`.
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Backend::Sqlite);
            }

            #[test]
            fn postgres() {
                super::$name(super::Backend::Postgres);
            }
        }
    };
}

/// One agent host of the fleet.
struct Node {
    id: String,
    index: u8,
    ns: String,
    addr: String,
    dir: PathBuf,
    sandbox: PathBuf,
    agent: Option<Agent>,
}

/// Fields drop in order: agents and controller first, then the network, then the files.
struct Fleet {
    nodes: Vec<Node>,
    controller: Option<Controller>,
    net: Net,
    ctl_ns: String,
    ctl_ip: String,
    key: PathBuf,
    trusted: PathBuf,
    pki: Pki,
    tmp: tempfile::TempDir,
}

impl Fleet {
    /// A controller on `backend` at .2 and `n` agents at .11, .12, ...; `envs` labels them
    /// in turn. The PostgreSQL run of a test takes another name and subnet than its SQLite run.
    fn new(name: &str, subnet: u8, n: u8, envs: &[&str], backend: Backend) -> Self {
        let name = format!("{name}{}", backend.tag());
        let subnet = if backend == Backend::Postgres {
            subnet + 100
        } else {
            subnet
        };
        let (tmp, pki) = setup(&name);
        backend.prepare(tmp.path());
        let mut net = Net::new(&name, subnet);
        let (ctl_ns, ctl_ip) = net.add(2);
        issue_ctl_cert(tmp.path(), &pki, &ctl_ip);
        let (key, trusted) = signing_key(tmp.path());
        let controller =
            Controller::start(tmp.path(), &pki, &format!("{ctl_ip}:7000"), Some(&ctl_ns));
        let mut fleet = Fleet {
            pki,
            net,
            controller: Some(controller),
            ctl_ns,
            ctl_ip,
            key,
            trusted,
            nodes: Vec::new(),
            tmp,
        };
        for i in 0..n {
            let index = 11 + i;
            let (ns, addr) = fleet.net.add(index);
            let id = format!("host{}", i + 1);
            let dir = fleet.tmp.path().join(&id);
            let sandbox = dir.join("apt");
            apt_sandbox(&sandbox);
            std::fs::create_dir_all(dir.join("hooks")).expect("hooks");
            fleet.pki.issue(
                &dir.join("agent"),
                &["--name", &id, "--san", &addr, "--usage", "server"],
            );
            fleet.nodes.push(Node {
                id,
                index,
                ns,
                addr,
                dir,
                sandbox,
                agent: None,
            });
            let env = envs[i as usize % envs.len()];
            fleet.start(i as usize, env);
        }
        fleet
    }

    fn config(&self, n: &Node, env: &str) -> String {
        let d = n.dir.display();
        let s = n.sandbox.display();
        format!(
            "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"{id}\"\nlabels = {{ environment = \"{env}\" }}\n\
             [server]\nlisten = \"{addr}:7443\"\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
             [auth]\ncontrollers = [\"controller\"]\n\
             [packages]\nmanager = \"apt\"\nscan_on_start = true\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\ndpkg_args = [\"--root={s}/root\", \"--force-not-root\", \"--force-script-chrootless\", \"--log={s}/root/var/log/dpkg.log\"]\n\
             [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\nhooks_dir = \"{d}/hooks\"\n\
             [report]\ncontroller = \"{ctl}:7000\"\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ntimeout = \"3s\"\n",
            id = n.id,
            addr = n.addr,
            ca = self.pki.path("ca.pem").display(),
            t = self.trusted.display(),
            ctl = self.ctl_ip,
        )
    }

    fn start(&mut self, i: usize, env: &str) {
        let config = self.config(&self.nodes[i], env);
        let n = &self.nodes[i];
        let agent = Agent::start_in(&n.dir, &config, &[], Some(&n.ns));
        self.nodes[i].agent = Some(agent);
    }

    fn restart_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
        self.controller = Some(Controller::start(
            self.tmp.path(),
            &self.pki,
            &format!("{}:7000", self.ctl_ip),
            Some(&self.ctl_ns),
        ));
    }

    fn hook(&self, i: usize, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.nodes[i].dir.join("hooks").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn hosts_file(&self) -> PathBuf {
        let mut t = String::new();
        for n in &self.nodes {
            t.push_str(&format!(
                "[[host]]\nid = \"{}\"\naddress = \"{}:7443\"\n\n",
                n.id, n.addr
            ));
        }
        let p = self.tmp.path().join("hosts.toml");
        std::fs::write(&p, t).expect("hosts");
        p
    }

    fn rollout_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(patchctl());
        c.args(["rollout", "--json", "--inventory"])
            .arg(self.hosts_file())
            .arg("--signing-key")
            .arg(&self.key)
            .arg("--ca")
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(self.pki.path("controller.pem"))
            .arg("--key")
            .arg(self.pki.path("controller.key"))
            .args(["--connect-timeout", "3s", "--host-timeout", "2m"])
            .args(args);
        c
    }

    fn rollout(&self, args: &[&str]) -> (Output, Value) {
        let out = run(&mut self.rollout_cmd(args));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("rollout JSON ({e}): {}", text(&out)));
        (out, v)
    }

    fn db(&self) -> String {
        db_of(self.tmp.path())
    }

    fn history(&self, job: Option<&str>) -> Vec<Value> {
        history(&self.db(), job)
    }

    /// Waits until the controller holds a final result for each (host, job).
    fn wait_results(&self, want: &[(&str, &str)], timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.history(None);
            let have = |h: &str, j: &str| {
                rows.iter()
                    .any(|r| r["host_id"] == h && r["job_id"] == j && r["final"] == true)
            };
            if want.iter().all(|(h, j)| have(h, j)) {
                return rows;
            }
            if Instant::now() > deadline {
                panic!(
                    "results {want:?} not all at the controller within {timeout:?}; it has {rows:#?}\ncontroller log:\n{}",
                    self.controller
                        .as_ref()
                        .map(|c| c.log_text())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `patchctl` against node i's local socket (reachable whatever its network does).
    fn local(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.nodes[i];
        run(Command::new(patchctl()).args(args).args([
            "--agent",
            &format!("unix:{}", n.dir.join("agent.sock").display()),
        ]))
    }

    fn sign(&self, id: &str, target: &str, flags: &[&str]) -> PathBuf {
        let file = self.tmp.path().join(format!("{id}.job"));
        let out = run(Command::new(patchctl())
            .args(["job", "sign", "--signing-key"])
            .arg(&self.key)
            .arg("-o")
            .arg(&file)
            .args(["--id", id, "--target", target])
            .args(flags));
        assert!(out.status.success(), "sign: {}", text(&out));
        file
    }

    /// Runs a job on node i through its local socket and waits for its end.
    fn run_local(&self, i: usize, id: &str, flags: &[&str]) {
        let file = self.sign(id, &self.nodes[i].id, flags);
        let out = self.local(i, &["submit", file.to_str().expect("path")]);
        assert!(out.status.success(), "submit: {}", text(&out));
        let out = self.local(i, &["watch", id]);
        assert!(out.status.success(), "watch: {}", text(&out));
    }

    fn outbox_finals(&self, i: usize) -> usize {
        std::fs::read_dir(self.nodes[i].dir.join("state/outbox"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".final.pb"))
                    .count()
            })
            .unwrap_or(0)
    }
}

fn history(db: &str, job: Option<&str>) -> Vec<Value> {
    let mut cmd = Command::new(patchctl());
    cmd.args(["history", "--json", "--db"]).arg(db);
    if let Some(j) = job {
        cmd.args(["--job", j]);
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "history: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("history JSON")
}

fn results(v: &Value) -> Vec<(String, String)> {
    v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap_or_default().to_string(),
                h["result"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

both_stores!(rollout_in_batches_stops_at_the_failure_threshold_and_results_reach_the_controller);

fn rollout_in_batches_stops_at_the_failure_threshold_and_results_reach_the_controller(
    backend: Backend,
) {
    let f = Fleet::new(
        "ro",
        101,
        4,
        &["production", "production", "staging"],
        backend,
    );
    for i in 0..4 {
        if i == 2 {
            f.hook(i, "pre", "echo 'host3 is not ready' >&2; exit 1");
        } else {
            f.hook(i, "pre", "echo ready");
        }
    }
    let job = ["--upgrade", "all", "--exclude", "slow", "--pre-hook", "pre"];
    // One host per batch; stop when failures exceed 30 % of the hosts attempted so far:
    // 0/1, 0/2, then 1/3 = 33 % > 30 % stops before host4.
    let mut args = vec!["--id", "r1", "--serial", "1", "--max-fail-percent", "30"];
    args.extend(job);
    let (out, v) = f.rollout(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stop when failed hosts exceed 30% of the hosts attempted so far"),
        "the rule is printed first: {err}"
    );
    assert!(err.contains("[host3]"), "live progress per host: {err}");
    assert_eq!(
        out.status.code(),
        Some(3),
        "a failed host fails the rollout (exit 3: it ran, and did not succeed)"
    );
    assert_eq!(
        results(&v),
        pairs(&[
            ("host1", "succeeded"),
            ("host2", "succeeded"),
            ("host3", "failed"),
            ("host4", "skipped")
        ]),
        "{v:#}"
    );
    assert_eq!(
        (
            v["attempted"].as_u64(),
            v["failed"].as_u64(),
            v["skipped"].as_u64()
        ),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(v["stopped_early"], true);
    assert!(
        v["hosts"][2]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("pre"),
        "the failure names the hook: {v:#}"
    );

    // Every attempted host reported its result; the skipped one has nothing.
    let rows = f.wait_results(
        &[
            ("host1", "r1-host1"),
            ("host2", "r1-host2"),
            ("host3", "r1-host3"),
        ],
        Duration::from_secs(30),
    );
    assert!(!rows.iter().any(|r| r["host_id"] == "host4"), "{rows:#?}");
    let h1 = rows
        .iter()
        .find(|r| r["host_id"] == "host1")
        .expect("host1");
    assert!(
        h1["state"]
            .as_str()
            .unwrap_or_default()
            .starts_with("SUCCEEDED")
    );
    let pkgs: Vec<(&str, &str)> = h1["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default(),
                p["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(pkgs.contains(&("alpha", "changed")), "{pkgs:?}");
    assert!(pkgs.contains(&("beta", "changed")), "{pkgs:?}");
    let h3 = rows
        .iter()
        .find(|r| r["host_id"] == "host3")
        .expect("host3");
    assert_eq!(h3["state"], "FAILED");

    // Batches of two, threshold 50 %: 0/2, then 1/4 = 25 % -> every host is attempted, and
    // the exit code still says one failed.
    let mut args = vec!["--id", "r2", "--serial", "50%", "--max-fail-percent", "50"];
    args.extend(job);
    let (out, v) = f.rollout(&args);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        results(&v),
        pairs(&[
            ("host1", "succeeded"),
            ("host2", "succeeded"),
            ("host3", "failed"),
            ("host4", "succeeded")
        ]),
        "{v:#}"
    );
    assert_eq!(v["stopped_early"], false);
    assert_eq!(v["hosts"][3]["batch"], 2);
    f.wait_results(
        &[
            ("host1", "r2-host1"),
            ("host2", "r2-host2"),
            ("host3", "r2-host3"),
            ("host4", "r2-host4"),
        ],
        Duration::from_secs(30),
    );

    // The dashboard over what the fleet reported: 7 results, 2 failed; every host sent its
    // inventory with its environment label.
    let out = run(Command::new(patchctl())
        .args(["compliance", "--json", "--db"])
        .arg(f.db()));
    assert!(out.status.success(), "{}", text(&out));
    let d: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(d["jobs_ran"], 7, "{d:#}");
    assert_eq!(d["jobs_failed"], 2, "{d:#}");
    let rate = d["patch_failure_rate_percent"].as_f64().expect("rate");
    assert!((rate - 200.0 / 7.0).abs() < 1e-9, "{rate}");
    assert_eq!(d["hosts_with_inventory"], 4, "{d:#}");
    assert_eq!(d["by_environment"]["production"]["hosts"], 3, "{d:#}");
    assert_eq!(d["by_environment"]["staging"]["hosts"], 1, "{d:#}");
}

both_stores!(nothing_is_lost_when_the_controller_or_an_agent_is_killed_or_a_link_is_cut);

fn nothing_is_lost_when_the_controller_or_an_agent_is_killed_or_a_link_is_cut(backend: Backend) {
    let mut f = Fleet::new("nl", 102, 3, &["production"], backend);
    // 1. SIGKILL the controller in the middle of a rollout; restart it on the same database.
    // Each job upgrades `slow`, whose maintainer script takes 4 s.
    let child = f
        .rollout_cmd(&[
            "--id",
            "k1",
            "--serial",
            "1",
            "--max-fail-percent",
            "0",
            "--upgrade",
            "all",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rollout");
    std::thread::sleep(Duration::from_secs(3));
    if let Some(c) = f.controller.as_mut() {
        c.kill();
    }
    std::thread::sleep(Duration::from_secs(4));
    f.restart_controller();
    let out = child.wait_with_output().expect("rollout");
    assert!(out.status.success(), "rollout: {}", text(&out));
    let rows = f.wait_results(
        &[
            ("host1", "k1-host1"),
            ("host2", "k1-host2"),
            ("host3", "k1-host3"),
        ],
        Duration::from_secs(30),
    );
    for h in ["host1", "host2", "host3"] {
        let n = rows
            .iter()
            .filter(|r| r["host_id"] == h && r["job_id"] == format!("k1-{h}"))
            .count();
        assert_eq!(n, 1, "one stored result per job and host: {rows:#?}");
    }

    // 2. A result waiting in the outbox survives SIGKILL of the agent.
    if let Some(c) = f.controller.as_mut() {
        c.kill();
    }
    f.run_local(0, "k2", &["--scan", "--dry-run"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.outbox_finals(0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(f.outbox_finals(0) >= 1, "the result waits in the outbox");
    if let Some(a) = f.nodes[0].agent.as_ref() {
        a.signal(Signal::SIGKILL);
    }
    f.nodes[0].agent = None;
    f.restart_controller();
    assert!(
        !f.history(Some("k2")).iter().any(|r| r["final"] == true),
        "not delivered while the agent is down"
    );
    f.start(0, "production");
    f.wait_results(&[("host1", "k2")], Duration::from_secs(20));
    assert_eq!(
        f.outbox_finals(0),
        0,
        "the outbox is emptied once acknowledged"
    );

    // 3. Cut host2's link, run a job there, restore the link: the result arrives.
    f.net.link(f.nodes[1].index, false);
    f.run_local(1, "k3", &["--scan", "--dry-run"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !f.history(Some("k3")).iter().any(|r| r["final"] == true),
        "nothing can arrive over a cut link"
    );
    assert!(f.outbox_finals(1) >= 1);
    f.net.link(f.nodes[1].index, true);
    f.wait_results(&[("host2", "k3")], Duration::from_secs(30));
}

both_stores!(the_controller_trusts_only_its_ca_refuses_plaintext_and_spoofed_host_ids);

fn the_controller_trusts_only_its_ca_refuses_plaintext_and_spoofed_host_ids(backend: Backend) {
    patch_agent_service::tls::install_default_provider();
    let (tmp, pki) = setup(&format!("trust{}", backend.tag()));
    backend.prepare(tmp.path());
    issue_ctl_cert(tmp.path(), &pki, "127.0.0.1");
    let ctl = Controller::start(tmp.path(), &pki, "127.0.0.1:0", None);
    let (h1_cert, h1_key) = pki.issue(
        &tmp.path().join("h1"),
        &["--name", "h1", "--usage", "server"],
    );
    let tls = |cert: &Path, key: &Path, ca: &Path| {
        strings(&[
            "-cacert",
            ca.to_str().expect("p"),
            "-cert",
            cert.to_str().expect("p"),
            "-key",
            key.to_str().expect("p"),
            "-servername",
            "controller.fleet",
        ])
    };
    let call = |mut flags: Vec<String>, method: &str, data: &str| {
        flags.extend(strings(&["-d", data, &ctl.addr, method]));
        grpcurl(&flags)
    };
    let hello = "patchagent.v1.Controller/Hello";

    // Its own host_id: accepted, and the controller asks for the inventory it lacks.
    let out = call(
        tls(&h1_cert, &h1_key, &pki.path("ca.pem")),
        hello,
        r#"{"host_id":"h1","agent_version":"t"}"#,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("inventoryWanted"), "{}", text(&out));

    // Another host's id with h1's certificate: refused.
    let out = call(
        tls(&h1_cert, &h1_key, &pki.path("ca.pem")),
        "patchagent.v1.Controller/ReportJob",
        r#"{"report_id":"h2:j:final","host_id":"h2","final":true,"status":{"job_id":"j","state":"JOB_STATE_SUCCEEDED"}}"#,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("PermissionDenied"), "{}", text(&out));
    assert!(
        text(&out).contains("may not report for host_id"),
        "{}",
        text(&out)
    );

    // Hostile fields: a job id that is not one, a report id for another host.
    let out = call(
        tls(&h1_cert, &h1_key, &pki.path("ca.pem")),
        "patchagent.v1.Controller/ReportJob",
        r#"{"report_id":"h1:x:final","host_id":"h1","status":{"job_id":"../../etc","state":"JOB_STATE_SUCCEEDED"}}"#,
    );
    assert!(text(&out).contains("InvalidArgument"), "{}", text(&out));
    let out = call(
        tls(&h1_cert, &h1_key, &pki.path("ca.pem")),
        "patchagent.v1.Controller/ReportJob",
        r#"{"report_id":"h2:x:final","host_id":"h1","status":{"job_id":"x"}}"#,
    );
    assert!(text(&out).contains("must start with"), "{}", text(&out));
    let out = call(
        tls(&h1_cert, &h1_key, &pki.path("ca.pem")),
        "patchagent.v1.Controller/ReportInventory",
        r#"{"report_id":"h1:inv","host_id":"h1","checksum":"abc"}"#,
    );
    assert!(text(&out).contains("checksum must be"), "{}", text(&out));

    // A certificate from another CA: the handshake fails.
    let other = Pki::new(tmp.path(), "other");
    let out = call(
        tls(
            &other.path("agent.pem"),
            &other.path("agent.key"),
            &pki.path("ca.pem"),
        ),
        hello,
        r#"{"host_id":"localhost"}"#,
    );
    assert!(!out.status.success(), "{}", text(&out));
    // Plaintext: refused.
    let out = grpcurl(&strings(&["-plaintext", &ctl.addr, "list"]));
    assert!(!out.status.success(), "{}", text(&out));

    // Nothing from the refused calls reached the database.
    let rows = history(&db_of(tmp.path()), None);
    assert!(rows.is_empty(), "{rows:#?}");
    assert!(ctl.log_text().contains("Agent hello host=h1"));
}

both_stores!(compliance_figures_from_a_database_built_by_reports);

fn compliance_figures_from_a_database_built_by_reports(backend: Backend) {
    patch_agent_service::tls::install_default_provider();
    let (tmp, pki) = setup(&format!("compliance{}", backend.tag()));
    backend.prepare(tmp.path());
    issue_ctl_cert(tmp.path(), &pki, "127.0.0.1");
    let ctl = Controller::start(tmp.path(), &pki, "127.0.0.1:0", None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    let day = 86400;
    let ts = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let update = |name: &str, sla: pb::SlaClass, issued: Option<i64>| pb::Update {
        name: name.into(),
        architecture: "amd64".into(),
        candidate_version: "2".into(),
        sla_class: sla as i32,
        issued: issued.and_then(ts),
        first_seen: ts(now),
        ..Default::default()
    };
    let overdue_critical = || {
        vec![update(
            "openssl",
            pb::SlaClass::Critical,
            Some(now - 5 * day),
        )]
    };
    // c1 production: a critical update issued 5 days ago (overdue by 2 days).
    // c2 production: a high update issued 2 days ago (within 7 days), then patched.
    // c3 staging: a medium update without an issue date, first seen now.
    // c4 staging: nothing pending.
    let hosts: Vec<(&str, &str, Vec<pb::Update>)> = vec![
        ("c1", "production", overdue_critical()),
        (
            "c2",
            "production",
            vec![update("curl", pb::SlaClass::High, Some(now - 2 * day))],
        ),
        (
            "c3",
            "staging",
            vec![update("vim", pb::SlaClass::Medium, None)],
        ),
        ("c4", "staging", vec![]),
        // c5: its last scan could not read a repository; c6: its last scan is 3 days old.
        // Both have an overdue critical update, and both are unknown, not counted.
        ("c5", "production", overdue_critical()),
        ("c6", "production", overdue_critical()),
    ];
    let jobs = [
        ("c1", pb::JobState::Succeeded, false, Some(true)),
        ("c2", pb::JobState::Failed, false, None),
        (
            "c3",
            pb::JobState::SucceededRebootRequired,
            false,
            Some(false),
        ),
        ("c4", pb::JobState::Succeeded, true, None),
        ("c5", pb::JobState::Cancelled, false, None),
        ("c6", pb::JobState::Cancelled, false, None),
    ];
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for (id, env, updates) in &hosts {
            let (cert, key) = pki.issue(&tmp.path().join(id), &["--name", id, "--usage", "server"]);
            let mut c = controller_client(
                &pki.path("ca.pem"),
                &cert,
                &key,
                &ctl.addr,
                "controller.fleet",
            )
            .await;
            let labels: std::collections::HashMap<String, String> =
                [("environment".to_string(), env.to_string())].into();
            let send = |inv: pb::Inventory, at: i64| {
                let bytes = prost::Message::encode_to_vec(&inv);
                let sum: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                pb::InventoryReport {
                    report_id: format!("{id}:inventory:{}", &sum[..16]),
                    host_id: id.to_string(),
                    labels: labels.clone(),
                    checksum: sum,
                    inventory: Some(inv),
                    scanned_at: ts(at),
                    outbox: None,
                }
            };
            let inv = pb::Inventory {
                hostname: id.to_string(),
                updates: updates.clone(),
                repo_errors: if *id == "c5" {
                    vec![pb::RepoError {
                        repo: "file:/nonexistent ./".into(),
                        error: "Release file not found".into(),
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let now = if *id == "c6" { now - 3 * day } else { now };
            // The checksum alone first: the controller does not have it and asks for it.
            let mut probe = send(inv.clone(), now);
            probe.inventory = None;
            let ack = c
                .report_inventory(probe.clone())
                .await
                .expect("inv")
                .into_inner();
            assert!(ack.need_full);
            c.report_inventory(send(inv, now)).await.expect("inv");
            let ack = c.report_inventory(probe).await.expect("inv").into_inner();
            assert!(!ack.need_full, "the same checksum is known now");
            if *id == "c2" {
                // Patched: the next inventory no longer lists curl.
                let inv = pb::Inventory {
                    hostname: id.to_string(),
                    ..Default::default()
                };
                c.report_inventory(send(inv, now)).await.expect("inv");
            }
            let (_, state, dry, reboot) = jobs.iter().find(|j| j.0 == *id).expect("job");
            let report = pb::JobReport {
                report_id: format!("{id}:job1:final"),
                host_id: id.to_string(),
                labels: labels.clone(),
                status: Some(pb::JobStatus {
                    job_id: "job1".into(),
                    state: *state as i32,
                    dry_run: *dry,
                    ..Default::default()
                }),
                r#final: true,
                reboot_attempted: reboot.is_some(),
                reboot_succeeded: *reboot == Some(true),
                reported_at: ts(now),
                outbox: None,
            };
            let first = c
                .report_job(report.clone())
                .await
                .expect("job")
                .into_inner();
            let again = c.report_job(report).await.expect("job").into_inner();
            assert!(!first.duplicate && again.duplicate, "stored once");
        }
        // A hostile report: terminal escapes in its text, timestamps at the ends of i64.
        let (cert, key) = pki.issue(
            &tmp.path().join("c1b"),
            &["--name", "c1", "--usage", "server"],
        );
        let mut c = controller_client(
            &pki.path("ca.pem"),
            &cert,
            &key,
            &ctl.addr,
            "controller.fleet",
        )
        .await;
        let extreme = |s: i64| {
            Some(prost_types::Timestamp {
                seconds: s,
                nanos: -1,
            })
        };
        c.report_job(pb::JobReport {
            report_id: "c1:evil:final".into(),
            host_id: "c1".into(),
            labels: [("environment".to_string(), "production".to_string())].into(),
            status: Some(pb::JobStatus {
                job_id: "evil".into(),
                state: pb::JobState::Cancelled as i32,
                reason: "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u{9b}31m".into(),
                summary: "upgrade \x1b[5mall".into(),
                submitted_at: extreme(i64::MIN),
                started_at: extreme(i64::MAX),
                finished_at: extreme(253_402_300_800),
                packages: vec![pb::PackageResult {
                    name: "x\x1b[1m".into(),
                    outcome: "changed\r".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            r#final: true,
            reported_at: extreme(i64::MAX),
            ..Default::default()
        })
        .await
        .expect("the controller stores what it can and never panics");
    });
    let out = run(Command::new(patchctl())
        .args(["history", "--db"])
        .arg(db_of(tmp.path()))
        .args(["--job", "evil"]));
    assert!(out.status.success(), "history: {}", text(&out));
    let t = text(&out);
    assert!(t.contains("red"), "{t}");
    assert!(
        !t.chars().any(|c| c != '\n' && c.is_control()),
        "control characters reached the terminal: {t:?}"
    );
    let out = run(Command::new(patchctl())
        .args(["compliance", "--json", "--db"])
        .arg(db_of(tmp.path())));
    assert!(out.status.success(), "{}", text(&out));
    let d: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(d["hosts_with_inventory"], 6, "{d:#}");
    assert_eq!(
        (&d["hosts_known"], &d["hosts_unknown"]),
        (&Value::from(4), &Value::from(2)),
        "{d:#}"
    );
    assert_eq!(d["hosts_unknown_scan_errors"], 1, "{d:#}");
    assert_eq!(d["hosts_unknown_stale"], 1, "{d:#}");
    assert_eq!(d["hosts_compliant"], 3, "{d:#}");
    assert_eq!(d["overall_compliance_percent"], 75.0, "{d:#}");
    let class = |name: &str| {
        d["by_class"]
            .as_array()
            .expect("classes")
            .iter()
            .find(|c| c["class"] == name)
            .cloned()
            .expect("class")
    };
    let critical = class("critical");
    assert_eq!(critical["compliance_percent"], 75.0);
    assert_eq!(
        (critical["pending"].as_u64(), critical["overdue"].as_u64()),
        (Some(1), Some(1))
    );
    let over = critical["max_days_overdue"].as_f64().expect("over");
    assert!((over - 2.0).abs() < 0.01, "{over}");
    let high = class("high");
    assert_eq!(
        (high["pending"].as_u64(), high["overdue"].as_u64()),
        (Some(0), Some(0))
    );
    let mttp = high["mean_time_to_patch_hours"].as_f64().expect("mttp");
    assert!((mttp - 48.0).abs() < 0.01, "{mttp}");
    assert_eq!(class("medium")["pending"], 1);
    assert_eq!(class("medium")["overdue"], 0);
    assert_eq!(
        d["by_environment"]["production"]["compliance_percent"],
        50.0
    );
    assert_eq!(d["by_environment"]["staging"]["compliance_percent"], 100.0);
    assert_eq!(
        (d["jobs_ran"].as_u64(), d["jobs_failed"].as_u64()),
        (Some(3), Some(1))
    );
    let rate = d["patch_failure_rate_percent"].as_f64().expect("rate");
    assert!((rate - 100.0 / 3.0).abs() < 1e-9);
    assert_eq!(d["reboot_success_rate_percent"], 50.0);
    // The terminal view shows the same figures.
    let out = run(Command::new(patchctl())
        .args(["compliance", "--db"])
        .arg(db_of(tmp.path())));
    let t = text(&out);
    assert!(t.contains("OVERALL COMPLIANCE: 75.0%"), "{t}");
    assert!(t.contains("UNKNOWN: 2 of 6 hosts"), "{t}");
    assert!(
        t.contains("1 with scan or repository errors, 1 not scanned in 48h"),
        "{t}"
    );
    // A tighter --stale-after makes every host unknown.
    let out = run(Command::new(patchctl())
        .args(["compliance", "--json", "--stale-after", "1s", "--db"])
        .arg(db_of(tmp.path())));
    let d: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(d["hosts_known"].as_u64() <= Some(4), "{d:#}");
    assert!(
        t.contains("Patch failure rate:   33.3% (1 of 3 jobs)"),
        "{t}"
    );
    assert!(
        t.contains("Reboot success rate:  50.0% (1 of 2 reboots)"),
        "{t}"
    );

    // The daily history: `serve` records the day's figures at start (and hourly), the
    // day's latest replacing the earlier. A restart records them now.
    drop(ctl);
    let _ctl = Controller::start(tmp.path(), &pki, "127.0.0.1:0", None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let days = loop {
        let out = run(Command::new(patchctl())
            .args(["compliance", "--history", "--days", "7", "--json", "--db"])
            .arg(db_of(tmp.path())));
        assert!(out.status.success(), "history: {}", text(&out));
        let days: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
        if days.last().is_some_and(|d| d["hosts"] == 6) {
            break days;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of 6 hosts: {days:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(days.len(), 1, "one row a day: {days:#?}");
    assert_eq!(days[0]["overall_compliance_percent"], 75.0, "{days:#?}");
    assert_eq!(days[0]["day"].as_i64(), Some(now.div_euclid(86_400)));
    let out = run(Command::new(patchctl())
        .args(["compliance", "--history", "--db"])
        .arg(db_of(tmp.path())));
    let t = text(&out);
    assert!(t.contains("DATE") && t.contains("75.0%"), "{t}");
    // Migrating a database at the latest version does nothing, and says so.
    let out = run(Command::new(patchctl())
        .args(["db", "migrate", "--db"])
        .arg(db_of(tmp.path())));
    assert!(out.status.success(), "migrate: {}", text(&out));
    assert!(text(&out).contains("nothing to do"), "{}", text(&out));
}

#[test]
fn an_unreachable_agent_counts_as_failed() {
    let (tmp, pki) = setup("unreachable");
    let s = tmp.path().join("apt");
    apt_sandbox(&s);
    let (key, trusted) = signing_key(tmp.path());
    let sd = s.display();
    let extra = format!(
        "[packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{sd}/apt.conf\"\ndpkg_status = \"{sd}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{sd}/root/run/reboot-required\"\n[jobs]\ntrusted_keys_dir = \"{}\"\nmin_free_mib = 1\n",
        trusted.display()
    );
    let dir = tmp.path().join("agent");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &extra));
    // Nothing listens on port 1.
    let hosts = tmp.path().join("hosts.toml");
    std::fs::write(
        &hosts,
        format!(
            "[[host]]\nid = \"gone\"\naddress = \"127.0.0.1:1\"\n\n[[host]]\nid = \"test-host\"\naddress = \"{}\"\n",
            agent.addr
        ),
    )
    .expect("hosts");
    let rollout = |id: &str, args: &[&str]| {
        let out = run(Command::new(patchctl())
            .args(["rollout", "--json", "--id", id, "--inventory"])
            .arg(&hosts)
            .arg("--signing-key")
            .arg(&key)
            .arg("--ca")
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("controller.pem"))
            .arg("--key")
            .arg(pki.path("controller.key"))
            .args(["--connect-timeout", "2s", "--scan", "--dry-run"])
            .args(args));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("rollout JSON ({e}): {}", text(&out)));
        (out, v)
    };
    // The unreachable host fails the first batch: with --max-fail-percent 0 the rollout stops.
    let (out, v) = rollout("u1", &["--serial", "1", "--max-fail-percent", "0"]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        results(&v),
        pairs(&[("gone", "unreachable"), ("test-host", "skipped")]),
        "{v:#}"
    );
    assert!(
        v["hosts"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1:1"),
        "{v:#}"
    );
    assert_eq!(
        (v["failed"].as_u64(), v["stopped_early"].as_bool()),
        (Some(1), Some(true))
    );
    // One batch of both: 1 of 2 failed is not beyond 50 %; the reachable host still runs, and
    // the exit code still says one host failed.
    let (out, v) = rollout("u2", &["--serial", "2", "--max-fail-percent", "50"]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        results(&v),
        pairs(&[("gone", "unreachable"), ("test-host", "succeeded")]),
        "{v:#}"
    );
    assert_eq!(
        (v["failed"].as_u64(), v["stopped_early"].as_bool()),
        (Some(1), Some(false))
    );
}

both_stores!(sighup_points_the_reporter_at_a_new_controller_and_the_outbox_loses_nothing);

fn sighup_points_the_reporter_at_a_new_controller_and_the_outbox_loses_nothing(backend: Backend) {
    let (tmp, pki) = setup(&format!("reportreload{}", backend.tag()));
    backend.prepare(tmp.path());
    issue_ctl_cert(tmp.path(), &pki, "127.0.0.1");
    let dir = tmp.path().join("a");
    let sandbox = dir.join("apt");
    apt_sandbox(&sandbox);
    pki.issue(
        &dir.join("agent"),
        &[
            "--name",
            "test-host",
            "--san",
            "127.0.0.1",
            "--usage",
            "server",
        ],
    );
    let s = sandbox.display();
    let d = dir.display();
    // Nothing listens on port 1 of loopback: reports wait in the outbox.
    let config = |controller: &str| {
        format!(
            "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"test-host\"\n\
             [server]\nlisten = \"127.0.0.1:0\"\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
             [auth]\ncontrollers = [\"controller\"]\n\
             [packages]\nmanager = \"apt\"\nscan_on_start = true\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n\
             [report]\ncontroller = \"{controller}\"\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"500ms\"\ntimeout = \"3s\"\n",
            ca = pki.path("ca.pem").display(),
        )
    };
    let agent = Agent::start(&dir, &config("127.0.0.1:1"));
    agent.wait_log("Cannot report to the controller", 1);
    let ctl = Controller::start(tmp.path(), &pki, "127.0.0.1:0", None);
    assert!(
        !ctl.log_text().contains("Inventory stored"),
        "nothing reached the controller before the reload"
    );
    std::fs::write(&agent.config, config(&ctl.addr)).expect("config");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_log("SIGHUP: reloaded", 1);
    // The inventory waiting in the outbox arrives, stored in the controller's database.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let out = run(Command::new(patchctl())
            .args(["compliance", "--json", "--db"])
            .arg(db_of(tmp.path())));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["hosts_with_inventory"] == 1 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no inventory after the reload: {}\n{}",
            agent.log_text(),
            ctl.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stored["hosts"], 1, "{stored:#}");
    assert!(
        ctl.log_text().contains("host=test-host"),
        "{}",
        ctl.log_text()
    );
    assert!(
        !agent.log_text().contains("restart needed for"),
        "a new controller address is live: {}",
        agent.log_text()
    );
}
