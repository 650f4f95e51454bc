//! The control channel, end to end: agents with no TCP listener behind a NAT namespace, which
//! the controller's namespace cannot route to, reached only through the channel each holds
//! open; rollouts driven by the controller (threshold, the operator's patchctl killed, the
//! controller killed, pause and resume); selector jobs; an untrusted envelope refused by the
//! agents; operator authorization; connected hosts; and a schedule of three occurrences.
//!
//! Every outcome is checked on the hosts (dpkg-query on each sandbox, hook run counts, the
//! agents' own job lists) and in the controller's database, not only in what patchctl prints.

mod common;

use common::net::{Controller, Nat, Net, created_id, issue_ctl_cert};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// One agent behind the NAT.
struct Host {
    id: String,
    ns: String,
    dir: PathBuf,
    sandbox: PathBuf,
    agent: Option<Agent>,
}

/// Fields drop in order: agents and controller first, then the networks, then the files.
struct Site {
    hosts: Vec<Host>,
    controller: Option<Controller>,
    nat: Nat,
    _net: Net,
    ctl_ns: String,
    ctl_ip: String,
    key: PathBuf,
    trusted: PathBuf,
    pki: Pki,
    tmp: tempfile::TempDir,
}

impl Site {
    /// A controller at 10.213.N.2 with `--operators operator`; a NAT gateway at .3; `n`
    /// agents inside 10.214.N.0/24 labelled in turn by `envs`.
    fn new(name: &str, subnet: u8, n: usize, envs: &[&str]) -> Self {
        let (tmp, pki) = setup(name);
        let mut net = Net::new(name, subnet);
        let (ctl_ns, ctl_ip) = net.add(2);
        let (gw_ns, _) = net.add(3);
        let nat = Nat::new(&gw_ns, subnet);
        issue_ctl_cert(tmp.path(), &pki, &ctl_ip);
        pki.issue(&tmp.path().join("operator"), &["--name", "operator"]);
        let (key, trusted) = signing_key(tmp.path());
        let mut site = Site {
            hosts: Vec::new(),
            controller: None,
            nat,
            _net: net,
            ctl_ns,
            ctl_ip,
            key,
            trusted,
            pki,
            tmp,
        };
        site.start_controller();
        for i in 0..n {
            let (ns, _) = site.nat.add(11 + i as u8);
            let id = format!("host{}", i + 1);
            let dir = site.tmp.path().join(&id);
            let sandbox = dir.join("apt");
            apt_sandbox(&sandbox);
            std::fs::create_dir_all(dir.join("hooks")).expect("hooks");
            site.pki
                .issue(&dir.join("agent"), &["--name", &id, "--usage", "server"]);
            site.hosts.push(Host {
                id,
                ns,
                dir,
                sandbox,
                agent: None,
            });
            site.start_agent(i, envs[i % envs.len()]);
        }
        site
    }

    fn start_controller(&mut self) {
        let extra = strings(&["--operators", "operator"]);
        self.controller = Some(Controller::start_with(
            self.tmp.path(),
            &self.pki,
            &format!("{}:7000", self.ctl_ip),
            Some(&self.ctl_ns),
            &extra,
        ));
    }

    fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
    }

    /// No `[server] listen`: the agent opens no TCP port.
    fn start_agent(&mut self, i: usize, env: &str) {
        let h = &self.hosts[i];
        let d = h.dir.display();
        let s = h.sandbox.display();
        let config = format!(
            "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"{id}\"\nlabels = {{ environment = \"{env}\" }}\n\
             [server]\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
             [auth]\ncontrollers = [\"controller\"]\n\
             [packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\ndpkg_args = [\"--root={s}/root\", \"--force-not-root\", \"--force-script-chrootless\", \"--log={s}/root/var/log/dpkg.log\"]\n\
             [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\nhooks_dir = \"{d}/hooks\"\n\
             [report]\ncontroller = \"{ctl}:7000\"\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ntimeout = \"3s\"\n",
            id = h.id,
            ca = self.pki.path("ca.pem").display(),
            t = self.trusted.display(),
            ctl = self.ctl_ip,
        );
        let agent = Agent::start_in(&h.dir, &config, &[], Some(&h.ns));
        assert!(
            agent.addr.is_empty(),
            "no TCP listener: {}",
            agent.log_text()
        );
        self.hosts[i].agent = Some(agent);
    }

    fn hook(&self, i: usize, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.hosts[i].dir.join("hooks").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// A hook on every host that counts its runs in `runs-NAME` and takes `secs`.
    fn counting_hook(&self, name: &str, secs: f32) {
        for (i, h) in self.hosts.iter().enumerate() {
            let runs = h.dir.join(format!("runs-{name}"));
            self.hook(
                i,
                name,
                &format!("echo run >> {}\nsleep {secs}", runs.display()),
            );
        }
    }

    fn runs(&self, i: usize, name: &str) -> usize {
        std::fs::read_to_string(self.hosts[i].dir.join(format!("runs-{name}")))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn db(&self) -> PathBuf {
        self.tmp.path().join("controller.db")
    }

    fn controller_addr(&self) -> String {
        format!("{}:7000", self.ctl_ip)
    }

    /// patchctl with the operator's certificate against the controller (from the root
    /// namespace, which reaches the controller's network).
    fn operator(&self, args: &[&str]) -> Command {
        self.as_identity(args, &self.tmp.path().join("operator"))
    }

    fn as_identity(&self, args: &[&str], prefix: &Path) -> Command {
        let mut c = Command::new(patchctl());
        c.args(args)
            .arg("--controller")
            .arg(self.controller_addr())
            .args(["--server-name", "controller.fleet", "--ca"])
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(prefix.with_extension("pem"))
            .arg("--key")
            .arg(prefix.with_extension("key"));
        c
    }

    /// `patchctl rollout --controller` with the signing key.
    fn rollout(&self, args: &[&str]) -> Command {
        let mut c = self.operator(&["rollout", "--json"]);
        c.arg("--signing-key").arg(&self.key).args(args);
        c
    }

    fn show(&self, id: &str) -> Value {
        let out = run(&mut self.operator(&["rollouts", "show", id, "--json"]));
        assert!(out.status.success(), "rollouts show: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("rollout JSON")
    }

    /// Waits until `done(rollout)`; panics with the rollout and the controller's log.
    fn wait_rollout(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.show(id);
            if done(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "rollout {id}: not {what} within {timeout:?}: {v:#}\ncontroller log:\n{}",
                    self.controller
                        .as_ref()
                        .map(|c| c.log_text())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_rollout(id, timeout, state, |v| v["state"] == state)
    }

    fn hosts_list(&self) -> Vec<Value> {
        let out = run(Command::new(patchctl())
            .args(["hosts", "list", "--json", "--db"])
            .arg(self.db()));
        assert!(out.status.success(), "hosts list: {}", text(&out));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("hosts JSON")
    }

    /// Waits until the controller's database shows exactly `want` connected.
    fn wait_connected(&self, want: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.hosts_list();
            let mut connected: Vec<&str> = rows
                .iter()
                .filter(|r| !r["connected_since"].is_null())
                .filter_map(|r| r["host_id"].as_str())
                .collect();
            connected.sort_unstable();
            if connected == want {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "connected hosts {connected:?}, not {want:?}, after {timeout:?}: {rows:#?}\n{}",
                    self.controller
                        .as_ref()
                        .map(|c| c.log_text())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn dpkg_version(&self, i: usize, package: &str) -> String {
        let out = run(Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}/root/var/lib/dpkg",
                self.hosts[i].sandbox.display()
            ))
            .args(["-W", "-f", "${Version}", package]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Final results the controller stored for `job`: (host, state), sorted. The sandboxes
    /// flag a reboot as required, so success is SUCCEEDED_REBOOT_REQUIRED; shown as SUCCEEDED.
    fn results(&self, job: &str) -> Vec<(String, String)> {
        let out = run(Command::new(patchctl())
            .args(["history", "--json", "--job", job, "--db"])
            .arg(self.db()));
        assert!(out.status.success(), "history: {}", text(&out));
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("history JSON");
        let mut v: Vec<(String, String)> = rows
            .iter()
            .filter(|r| r["final"] == true)
            .map(|r| {
                (
                    r["host_id"].as_str().unwrap_or_default().to_string(),
                    r["state"]
                        .as_str()
                        .unwrap_or_default()
                        .replace("SUCCEEDED_REBOOT_REQUIRED", "SUCCEEDED"),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The jobs an agent itself holds (its local socket works whatever its network does).
    fn agent_jobs(&self, i: usize) -> String {
        let sock = self.hosts[i].dir.join("agent.sock");
        let out = run(Command::new(patchctl())
            .args(["jobs", "--json", "--agent"])
            .arg(format!("unix:{}", sock.display())));
        assert!(out.status.success(), "jobs: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sign(&self, key: &Path, id: &str, hosts: &[&str], flags: &[&str]) -> PathBuf {
        let path = self.tmp.path().join(format!("{id}.job"));
        let out = run(Command::new(patchctl())
            .args(["job", "sign", "--signing-key"])
            .arg(key)
            .arg("-o")
            .arg(&path)
            .args(["--id", id])
            .args(hosts)
            .args(flags));
        assert!(out.status.success(), "sign: {}", text(&out));
        path
    }
}

fn host_results(v: &Value, occurrence: usize) -> Vec<(String, String)> {
    v["occurrences"][occurrence]["hosts"]
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

fn all(hosts: &[&str], result: &str) -> Vec<(String, String)> {
    hosts
        .iter()
        .map(|h| (h.to_string(), result.to_string()))
        .collect()
}

fn ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("host{i}")).collect()
}

#[test]
fn hosts_behind_nat_take_rollouts_through_their_channel_and_survive_kills() {
    let mut site = Site::new(
        "ch",
        121,
        5,
        &["prod", "prod", "prod", "staging", "staging"],
    );
    let names = ids(5);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    // The network: the controller's namespace has no route to the hosts, and no agent has a
    // TCP port open. Yet all five are connected.
    let route = net_route(&site.ctl_ns, "10.214.121.11");
    assert!(
        !route.status.success(),
        "the controller must not reach the NAT'd hosts: {}",
        text(&route)
    );
    for h in &site.hosts {
        let ss = run(Command::new("ip").args(["netns", "exec", &h.ns, "ss", "-Hltn"]));
        assert!(
            String::from_utf8_lossy(&ss.stdout).trim().is_empty(),
            "{} listens on TCP: {}",
            h.id,
            text(&ss)
        );
    }
    site.wait_connected(&names, Duration::from_secs(20));
    // The agent's own view (GetStatus over its local socket): the channel is open.
    let sock = format!("unix:{}", site.hosts[0].dir.join("agent.sock").display());
    let out = run(Command::new(patchctl()).args(["status", "--json", "--agent", &sock]));
    let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["channel_open"], true, "{status:#}");
    assert_eq!(
        status["controller_address"],
        site.controller_addr().as_str()
    );
    let out = run(Command::new(patchctl()).args(["status", "--agent", &sock]));
    assert!(
        text(&out).contains(&format!(
            "Controller {}: channel open since",
            site.controller_addr()
        )),
        "{}",
        text(&out)
    );
    let table = run(Command::new(patchctl())
        .args(["hosts", "list", "--db"])
        .arg(site.db()));
    let table = text(&table);
    assert!(table.contains("CONNECTED"), "{table}");
    assert_eq!(table.matches(" yes ").count(), 5, "{table}");

    // 1. The threshold: --serial 2 --max-fail-percent 30, host2's pre-hook fails. Batch 1 is
    // host1 and host2: 1 of 2 failed = 50% > 30%: stop; hosts 3-5 are skipped, untouched.
    for i in 0..5 {
        site.hook(
            i,
            "pre",
            if i == 1 {
                "echo 'host2 is not ready' >&2; exit 1"
            } else {
                "echo ready"
            },
        );
    }
    let mut cmd = site.rollout(&[
        "--id",
        "alpha-r",
        "--hosts",
        "host1,host2,host3,host4,host5",
        "--serial",
        "2",
        "--max-fail-percent",
        "30",
        "--host-timeout",
        "60s",
        "--install",
        "alpha=1.1",
        "--pre-hook",
        "pre",
    ]);
    let out = run(&mut cmd);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a stopped rollout exits 3: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stop when failed hosts exceed 30% of the hosts attempted so far"),
        "the rule is printed at creation: {err}"
    );
    assert!(
        err.contains("[host2] occurrence 1 batch 1: failed"),
        "live progress: {err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("rollout JSON");
    assert_eq!(v["state"], "stopped", "{v:#}");
    assert_eq!(
        host_results(&v, 0),
        vec![
            ("host1".to_string(), "succeeded".to_string()),
            ("host2".into(), "failed".into()),
            ("host3".into(), "skipped".into()),
            ("host4".into(), "skipped".into()),
            ("host5".into(), "skipped".into()),
        ],
        "{v:#}"
    );
    assert!(
        v["note"].as_str().unwrap_or_default().contains("1 of 2"),
        "{v:#}"
    );
    // On the hosts: only host1 changed.
    let alpha: Vec<String> = (0..5).map(|i| site.dpkg_version(i, "alpha")).collect();
    assert_eq!(alpha, ["1.1", "1.0", "1.0", "1.0", "1.0"]);
    assert_eq!(
        site.results("alpha-r"),
        vec![
            ("host1".to_string(), "SUCCEEDED".to_string()),
            ("host2".into(), "FAILED".into())
        ]
    );

    // 2. The operator's patchctl SIGKILLed mid-rollout: the rollout completes without it.
    site.counting_hook("count", 1.0);
    let mut follower = site
        .rollout(&[
            "--id",
            "beta-r",
            "--hosts",
            "host1,host2,host3,host4,host5",
            "--serial",
            "2",
            "--max-fail-percent",
            "0",
            "--install",
            "beta=1.2",
            "--pre-hook",
            "count",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("patchctl rollout");
    let err = follower.stderr.take().expect("stderr");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(err));
    let mut id = String::new();
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("rollout ") {
            id = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        if line.contains(": admitted") {
            break;
        }
    }
    assert!(!id.is_empty(), "the rollout id is printed first");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.id() as i32),
        Signal::SIGKILL,
    )
    .expect("kill patchctl");
    let _ = follower.wait();
    let v = site.wait_state(&id, "completed", Duration::from_secs(90));
    assert_eq!(host_results(&v, 0), all(&names, "succeeded"), "{v:#}");
    for i in 0..5 {
        assert_eq!(
            site.dpkg_version(i, "beta"),
            "1.2",
            "host{} on the host",
            i + 1
        );
        assert_eq!(site.runs(i, "count"), 1, "host{} ran the job once", i + 1);
    }
    assert_eq!(site.results("beta-r").len(), 5);

    // 3. Pause, then the controller SIGKILLed mid-rollout, then resume: it goes on where it
    // stood. No host runs the job twice and every result is stored once.
    site.counting_hook("count2", 1.0);
    let out = run(&mut site.rollout(&[
        "--id",
        "slow-r",
        "--detach",
        "--hosts",
        "host1,host2,host3,host4,host5",
        "--serial",
        "1",
        "--install",
        "slow=1.1",
        "--pre-hook",
        "count2",
    ]));
    assert!(out.status.success(), "detached create: {}", text(&out));
    let id = created_id(&out);
    site.wait_rollout(&id, Duration::from_secs(30), "admitted on host1", |v| {
        v["occurrences"][0]["hosts"][0]["result"] == "admitted"
    });
    let paused = run(&mut site.operator(&["rollouts", "pause", &id, "--json"]));
    assert!(paused.status.success(), "pause: {}", text(&paused));
    // The batch in flight ends; no further batch starts while paused.
    site.wait_rollout(&id, Duration::from_secs(30), "host1 done", |v| {
        v["occurrences"][0]["hosts"][0]["result"] == "succeeded"
    });
    std::thread::sleep(Duration::from_secs(3));
    let v = site.show(&id);
    assert_eq!(v["state"], "paused", "{v:#}");
    assert_eq!(
        v["occurrences"][0]["hosts"][1]["result"], "pending",
        "paused: {v:#}"
    );
    assert_eq!(site.runs(1, "count2"), 0, "host2 has not run it");
    // The pause survives a controller restart.
    site.kill_controller();
    site.start_controller();
    site.wait_connected(&names, Duration::from_secs(30));
    let v = site.show(&id);
    assert_eq!(v["state"], "paused", "paused after a restart: {v:#}");
    let resumed = run(&mut site.operator(&["rollouts", "resume", &id]));
    assert!(resumed.status.success(), "resume: {}", text(&resumed));
    // Kill -9 the controller while host3's job runs.
    site.wait_rollout(&id, Duration::from_secs(60), "admitted on host3", |v| {
        v["occurrences"][0]["hosts"][2]["result"] == "admitted"
    });
    site.kill_controller();
    std::thread::sleep(Duration::from_secs(2));
    site.start_controller();
    let v = site.wait_state(&id, "completed", Duration::from_secs(120));
    assert_eq!(host_results(&v, 0), all(&names, "succeeded"), "{v:#}");
    for i in 0..5 {
        assert_eq!(site.dpkg_version(i, "slow"), "1.1", "host{}", i + 1);
        assert_eq!(
            site.runs(i, "count2"),
            1,
            "host{} ran the job exactly once",
            i + 1
        );
    }
    assert_eq!(
        site.results("slow-r"),
        all(&names, "SUCCEEDED"),
        "one stored result per host"
    );
    let stored: usize = {
        let out = run(Command::new(patchctl())
            .args(["history", "--json", "--job", "slow-r", "--db"])
            .arg(site.db()));
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .expect("history")
            .len()
    };
    assert_eq!(stored, 5, "exactly one row per host");

    // 4. A selector job reaches only the hosts whose labels match.
    let job = site.sign(
        &site.key,
        "sel-1",
        &["--selector", "environment=staging"],
        &["--scan"],
    );
    let out = run(site.operator(&["submit"]).arg(&job));
    assert!(out.status.success(), "submit: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("host4: accepted") && said.contains("host5: accepted"),
        "{said}"
    );
    assert!(!said.contains("host1") && !said.contains("host3"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.results("sel-1").len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(site.results("sel-1"), all(&["host4", "host5"], "SUCCEEDED"));
    for i in 0..3 {
        assert!(
            !site.agent_jobs(i).contains("sel-1"),
            "host{} never got it",
            i + 1
        );
    }

    // 5. An envelope signed by a key the agents do not trust: the controller relays it, each
    // agent refuses it, and the operator sees the refusal.
    let other = site.tmp.path().join("other");
    let keys = run(Command::new(patchctl()).args(["keys", "new"]).arg(&other));
    assert!(keys.status.success(), "{}", text(&keys));
    let job = site.sign(
        &other.join("signing.key"),
        "untrusted-1",
        &["--target", "host1", "--target", "host2"],
        &["--scan"],
    );
    let out = run(site.operator(&["submit"]).arg(&job));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    for h in ["host1", "host2"] {
        assert!(
            said.contains(&format!("{h}: refused Unauthenticated")),
            "{h}'s refusal reaches the operator: {said}"
        );
    }
    assert!(!site.agent_jobs(0).contains("untrusted-1"));

    // 6. An agent's certificate may not call the operator API.
    let out = run(&mut site.as_identity(&["rollouts", "list"], &site.hosts[0].dir.join("agent")));
    assert!(!out.status.success());
    assert!(text(&out).contains("PermissionDenied"), "{}", text(&out));

    // A rollout scheduled for later can be cancelled before it starts; a second cancel is
    // refused, naming the state; list shows every rollout with its state.
    let later = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
        .to_string();
    let out = run(&mut site.rollout(&[
        "--id",
        "later-r",
        "--detach",
        "--hosts",
        "host1",
        "--start-at",
        &later,
        "--scan",
    ]));
    assert!(out.status.success(), "{}", text(&out));
    let later_id = created_id(&out);
    assert_eq!(site.show(&later_id)["state"], "scheduled");
    let out = run(&mut site.operator(&["rollouts", "cancel", &later_id, "--json"]));
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "cancelled");
    assert!(v["next_start"].is_null(), "{v:#}");
    let out = run(&mut site.operator(&["rollouts", "cancel", &later_id]));
    assert!(
        !out.status.success() && text(&out).contains("is cancelled; it cannot be cancelled"),
        "{}",
        text(&out)
    );
    let out = run(&mut site.operator(&["rollouts", "list", "--json"]));
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("list JSON");
    let states: std::collections::BTreeMap<String, String> = list
        .iter()
        .map(|r| {
            (
                r["occurrences"][0]["job_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(states["alpha-r"], "stopped");
    assert_eq!(states["beta-r"], "completed");
    assert_eq!(states["slow-r"], "completed");
    assert_eq!(states["later-r"], "cancelled");
    let table = text(&run(&mut site.operator(&["rollouts", "list"])));
    assert!(
        table.contains("ROLLOUT") && table.contains(&later_id),
        "{table}"
    );

    // 7. A host that is gone: hosts list shows it disconnected, and a rollout counts it failed
    // after --host-timeout.
    if let Some(mut a) = site.hosts[4].agent.take() {
        a.signal(Signal::SIGKILL);
        let _ = a.wait_exit(Duration::from_secs(5));
    }
    site.wait_connected(&names[..4], Duration::from_secs(20));
    let row = site
        .hosts_list()
        .into_iter()
        .find(|r| r["host_id"] == "host5")
        .expect("host5");
    assert!(
        row["connected_since"].is_null() && row["last_seen"].is_i64(),
        "{row:#}"
    );
    let out = run(&mut site.rollout(&[
        "--id",
        "gone-r",
        "--hosts",
        "host5",
        "--host-timeout",
        "3s",
        "--scan",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(host_results(&v, 0), all(&["host5"], "failed"));
    assert!(
        v["occurrences"][0]["hosts"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not connected within 3s"),
        "{v:#}"
    );
}

#[test]
fn a_schedule_of_three_occurrences_one_minute_apart_runs_three_times() {
    let site = Site::new("sc", 122, 2, &["prod"]);
    site.wait_connected(&["host1", "host2"], Duration::from_secs(20));
    let start = SystemTime::now() + Duration::from_secs(5);
    let start_text = humantime::format_rfc3339_seconds(start).to_string();
    let out = run(&mut site.rollout(&[
        "--id",
        "tick",
        "--detach",
        "--selector",
        "environment=prod",
        "--start-at",
        &start_text,
        "--every",
        "1m",
        "--occurrences",
        "3",
        "--dry-run",
        "--upgrade",
        "all",
    ]));
    assert!(out.status.success(), "create: {}", text(&out));
    let id = created_id(&out);
    let v = site.show(&id);
    assert_eq!(v["occurrences"].as_array().map(Vec::len), Some(3), "{v:#}");
    assert_eq!(
        v["next_start"], start_text,
        "the next occurrence is listed: {v:#}"
    );
    let shown = run(&mut site.operator(&["rollouts", "show", &id]));
    assert!(
        text(&shown).contains(&format!("next occurrence: {start_text}")),
        "{}",
        text(&shown)
    );
    let v = site.wait_rollout(&id, Duration::from_secs(200), "completed", |v| {
        v["state"] == "completed"
    });
    // Each occurrence ran on both hosts, at or after its own start, a minute apart.
    let mut starts = Vec::new();
    for (n, occ) in v["occurrences"]
        .as_array()
        .expect("occurrences")
        .iter()
        .enumerate()
    {
        let job = format!("tick-{}", n + 1);
        assert_eq!(occ["job_id"], job.as_str());
        assert_eq!(
            host_results(&v, n),
            all(&["host1", "host2"], "succeeded"),
            "{v:#}"
        );
        assert_eq!(site.results(&job), all(&["host1", "host2"], "SUCCEEDED"));
        let due = humantime::parse_rfc3339(occ["start_at"].as_str().expect("start_at")).expect("t");
        let began =
            humantime::parse_rfc3339(occ["started_at"].as_str().expect("started_at")).expect("t");
        assert!(
            began >= due,
            "occurrence {} started {began:?} before {due:?}",
            n + 1
        );
        starts.push(due);
    }
    assert_eq!(
        starts[1].duration_since(starts[0]).ok(),
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        starts[2].duration_since(starts[1]).ok(),
        Some(Duration::from_secs(60))
    );
    assert!(v["next_start"].is_null(), "nothing left to run: {v:#}");
    // The agents ran three distinct jobs each.
    for i in 0..2 {
        let jobs = site.agent_jobs(i);
        for n in 1..=3 {
            assert!(jobs.contains(&format!("tick-{n}")), "host{}: {jobs}", i + 1);
        }
    }
}

fn net_route(ns: &str, to: &str) -> Output {
    run(Command::new("ip").args(["-n", ns, "route", "get", to]))
}

/// Final results a controller database holds: job ids, sorted.
fn finals(db: &Path) -> Vec<String> {
    let out = run(Command::new(patchctl())
        .args(["history", "--json", "--db"])
        .arg(db));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut v: Vec<String> = rows
        .iter()
        .filter(|r| r["final"] == true)
        .filter_map(|r| r["job_id"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn wait_finals(db: &Path, want: &[&str], timeout: Duration, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = finals(db);
        if want.iter().all(|j| have.iter().any(|h| h == j)) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{want:?} not all in {} after {timeout:?}: {have:?}\n{}",
                db.display(),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_agent_fails_over_to_its_next_controller_and_loses_no_report() {
    let (tmp, pki) = setup("failover");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir_all(d).expect("dir");
        issue_ctl_cert(d, &pki, "127.0.0.1");
    }
    let mut a = Controller::start(&a_dir, &pki, "127.0.0.1:0", None);
    let b = Controller::start(&b_dir, &pki, "127.0.0.1:0", None);
    let (a_addr, b_addr) = (a.addr.clone(), b.addr.clone());
    let dir = tmp.path().join("host");
    let sandbox = dir.join("apt");
    apt_sandbox(&sandbox);
    pki.issue(
        &dir.join("agent"),
        &["--name", "fo-host", "--usage", "server"],
    );
    let (key, trusted) = signing_key(tmp.path());
    let (d, s) = (dir.display(), sandbox.display());
    let config = format!(
        "[agent]\nstate_dir = \"{d}/state\"\nhost_id = \"fo-host\"\n\
         [server]\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
         [tls]\nca = \"{ca}\"\ncert = \"{d}/agent.pem\"\nkey = \"{d}/agent.key\"\n\
         [auth]\ncontrollers = [\"controller\"]\n\
         [packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n\
         [jobs]\ntrusted_keys_dir = \"{t}\"\nmin_free_mib = 1\n\
         [report]\ncontrollers = [\"{a_addr}\", \"{b_addr}\"]\nserver_name = \"controller.fleet\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\ntimeout = \"3s\"\n",
        ca = pki.path("ca.pem").display(),
        t = trusted.display(),
    );
    let agent = Agent::start(&dir, &config);
    let sock = format!("unix:{}", dir.join("agent.sock").display());
    let job = |id: &str| {
        let file = tmp.path().join(format!("{id}.job"));
        let out = run(Command::new(patchctl())
            .args([
                "job", "sign", "--id", id, "--target", "fo-host", "--scan", "-o",
            ])
            .arg(&file)
            .arg("--signing-key")
            .arg(&key));
        assert!(out.status.success(), "sign: {}", text(&out));
        let out = run(Command::new(patchctl())
            .args(["submit", "--agent", &sock])
            .arg(&file));
        assert!(out.status.success(), "submit: {}", text(&out));
    };
    let (a_db, b_db) = (a_dir.join("controller.db"), b_dir.join("controller.db"));
    let log = || agent.log_text();

    // The first controller takes the reports while it is up.
    job("fo-1");
    wait_finals(&a_db, &["fo-1"], Duration::from_secs(30), &log);
    assert!(finals(&b_db).is_empty());

    // It dies: the reports that follow, and the control channel, go to the second. Nothing
    // written to the outbox meanwhile is lost.
    a.kill();
    job("fo-2");
    job("fo-3");
    wait_finals(&b_db, &["fo-2", "fo-3"], Duration::from_secs(30), &log);
    let status = run(Command::new(patchctl()).args(["status", "--json", "--agent", &sock]));
    let status: Value = serde_json::from_slice(&status.stdout).expect("status");
    assert_eq!(status["controller_address"], b_addr.as_str(), "{status:#}");
    assert_eq!(status["channel_open"], true);

    // The first comes back: the agent stays with the one it failed over to.
    let _a = Controller::start(&a_dir, &pki, &a_addr, None);
    job("fo-4");
    wait_finals(&b_db, &["fo-4"], Duration::from_secs(30), &log);
    let mut all = finals(&a_db);
    all.extend(finals(&b_db));
    all.sort();
    all.dedup();
    assert_eq!(
        all,
        ["fo-1", "fo-2", "fo-3", "fo-4"],
        "every result reached a controller"
    );
    let status = run(Command::new(patchctl()).args(["status", "--json", "--agent", &sock]));
    let status: Value = serde_json::from_slice(&status.stdout).expect("status");
    assert_eq!(status["outbox_pending"], 0, "{status:#}");
    assert!(
        agent
            .log_text()
            .contains("Failed over to another controller"),
        "{}",
        agent.log_text()
    );
}
