//! Enrollment, end to end, with the real binaries: `patchctl tokens`, `patchctl serve` with an
//! enrolment CA, `patch-agent enroll` in network namespaces, the running agent renewing its
//! certificate, revocation, and the abuse cases (pin mismatch, raced tokens, reserved names,
//! rate limits, calls without a client certificate).

mod common;

use common::net::{Controller, Net, ca_hash, create_token, enrolling_controller};
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A controller with enrolment on, and what hosts need to join it.
struct Site {
    tmp: tempfile::TempDir,
    pki: Pki,
    ctl: Controller,
    /// `ctl_addr` as agents dial it.
    addr: String,
    /// The job-signing private key whose public half the controller publishes.
    signing_key: PathBuf,
    pin: String,
}

impl Site {
    /// `listen` is `IP:PORT`; `ns` the namespace the controller runs in, if any.
    fn new(name: &str, listen: &str, ns: Option<&str>, ttl: &str) -> Self {
        Self::with(name, listen, ns, ttl, &[])
    }

    /// [`Site::new`] with more `patchctl serve` arguments.
    fn with(name: &str, listen: &str, ns: Option<&str>, ttl: &str, more: &[&str]) -> Self {
        let (tmp, pki) = setup(name);
        // `trusted/signing.pem`: the public half, which the controller publishes.
        let (signing_key, published) = signing_key(tmp.path());
        let mut args = vec![
            "--reserve-names",
            "controller,viewer",
            "--agent-cert-ttl",
            ttl,
        ];
        args.extend_from_slice(more);
        let ctl = enrolling_controller(tmp.path(), &pki, listen, ns, Some(&published), &args);
        let addr = ctl.addr.clone();
        let pin = ca_hash(&pki.path("ca.pem"));
        Site {
            tmp,
            pki,
            ctl,
            addr,
            signing_key,
            pin,
        }
    }

    fn db(&self) -> PathBuf {
        self.tmp.path().join("controller.db")
    }

    fn token(&self, args: &[&str]) -> String {
        create_token(&self.db(), args)
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let out = run(Command::new(patchctl())
            .args(args)
            .args(["--json", "--db"])
            .arg(self.db()));
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    }

    fn hosts(&self) -> Vec<Value> {
        self.json(&["hosts", "list"])
    }

    fn tokens(&self) -> Vec<Value> {
        self.json(&["tokens", "list"])
    }

    /// A host directory with an agent.toml that names where enrolment writes.
    fn host(&self, name: &str, listen: &str, extra: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("agent.toml"), host_config(&dir, listen, extra)).expect("config");
        dir
    }

    /// `patch-agent enroll` for the host in `dir`, in namespace `ns` if given.
    fn enroll(
        &self,
        dir: &Path,
        token: &str,
        pin: &str,
        ns: Option<&str>,
        args: &[&str],
    ) -> Output {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args([
            "enroll",
            "--controller",
            &self.addr,
            "--ca-hash",
            pin,
            "--config",
        ])
        .arg(dir.join("agent.toml"))
        .args(args)
        // The token travels in the environment, as the package scripts pass it.
        .env("PATCH_AGENT_TOKEN", token);
        run(&mut cmd)
    }

    fn start(&self, dir: &Path, ns: Option<&str>) -> Agent {
        let config = std::fs::read_to_string(dir.join("agent.toml")).expect("config");
        Agent::start_in(dir, &config, &[], ns)
    }

    /// `patchctl status --json` over mutual TLS as the operator, with a fresh connection.
    fn status(&self, agent: &Agent, server_name: &str) -> Result<Value, String> {
        let out = run(Command::new(patchctl())
            .args([
                "status",
                "--json",
                "--agent",
                &agent.addr,
                "--server-name",
                server_name,
            ])
            .arg("--ca")
            .arg(self.pki.path("ca.pem"))
            .arg("--cert")
            .arg(self.pki.path("controller.pem"))
            .arg("--key")
            .arg(self.pki.path("controller.key")));
        if !out.status.success() {
            return Err(text(&out));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Calls the controller as the host itself (its enrolled key and certificate).
    fn as_host(&self, dir: &Path, method: &str, body: &str) -> Output {
        grpcurl(&strings(&[
            "-cacert",
            self.pki.path("ca.pem").to_str().expect("path"),
            "-cert",
            dir.join("tls/agent.pem").to_str().expect("path"),
            "-key",
            dir.join("tls/agent.key").to_str().expect("path"),
            "-d",
            body,
            &self.addr,
            method,
        ]))
    }
}

fn host_config(dir: &Path, listen: &str, extra: &str) -> String {
    let d = dir.display();
    format!(
        "[agent]\nstate_dir = \"{d}/state\"\n\
         [server]\nlisten = \"{listen}\"\nlocal_socket = \"{d}/agent.sock\"\ndrain_grace = \"100ms\"\ndrain_timeout = \"1s\"\n\
         [tls]\nca = \"{d}/tls/ca.pem\"\ncert = \"{d}/tls/agent.pem\"\nkey = \"{d}/tls/agent.key\"\n\
         [auth]\ncontrollers = [\"controller\"]\n\
         [jobs]\ntrusted_keys_dir = \"{d}/keys\"\nmin_free_mib = 1\nhooks_dir = \"{d}/hooks\"\n{extra}"
    )
}

/// Nothing of an enrolment was written in `dir`.
fn assert_untouched(dir: &Path) {
    for p in ["tls", "keys", "enrolled.toml"] {
        assert!(
            !dir.join(p).exists(),
            "{} was written",
            dir.join(p).display()
        );
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Three hosts in their own namespaces join with one token of three uses, a fourth is refused;
/// each reports with the token's labels, and a job signed by the published key runs.
#[test]
fn three_hosts_join_with_one_token_and_a_fourth_is_refused() {
    let mut net = Net::new("en", 111);
    let (ctl_ns, ctl_ip) = net.add(2);
    let site = Site::new("enroll-net", &format!("{ctl_ip}:7000"), Some(&ctl_ns), "7d");
    let token = site.token(&["--uses", "3", "--labels", "environment=staging,team=web"]);
    let mut hosts = Vec::new();
    for i in 0..4u8 {
        let (ns, addr) = net.add(11 + i);
        let name = format!("host{}", i + 1);
        let sandbox = site.tmp.path().join(&name).join("apt");
        let packages = if i == 0 {
            apt_sandbox(&sandbox);
            let s = sandbox.display();
            format!(
                "[packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n"
            )
        } else {
            "[packages]\nscan_on_start = false\n".to_string()
        };
        let dir = site.host(&name, &format!("{addr}:7443"), &packages);
        hosts.push((name, ns, addr, dir));
    }
    for (i, (name, ns, addr, dir)) in hosts.iter().enumerate() {
        let out = site.enroll(
            dir,
            &token,
            &site.pin,
            Some(ns),
            &["--host-id", name, "--san", addr],
        );
        if i < 3 {
            assert!(out.status.success(), "{name}: {}", text(&out));
            assert!(
                text(&out).contains(&format!("enrolled as {name}")),
                "{}",
                text(&out)
            );
            let enrolled =
                std::fs::read_to_string(dir.join("enrolled.toml")).expect("enrolled.toml");
            assert!(
                enrolled.contains(&format!("controller = \"{}\"", site.addr)),
                "{enrolled}"
            );
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.join("tls/agent.key"))
                    .expect("key")
                    .permissions(),
            ) & 0o777;
            assert_eq!(mode, 0o600);
            assert!(dir.join("keys/signing.pem").exists());
        } else {
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(text(&out).contains("no uses left"), "{}", text(&out));
            assert_untouched(dir);
        }
    }
    assert_eq!(site.tokens()[0]["uses_left"], 0);

    // Each enrolled host runs and reports; the controller shows it with the token's labels.
    let agents: Vec<Agent> = hosts[..3]
        .iter()
        .map(|(_, ns, _, dir)| site.start(dir, Some(ns)))
        .collect();
    let rows = wait_for("three hosts reporting", Duration::from_secs(30), || {
        let rows = site.hosts();
        let seen = rows.iter().filter(|h| !h["last_seen"].is_null()).count();
        (seen == 3).then_some(rows)
    });
    for (name, _, _, _) in &hosts[..3] {
        let h = rows
            .iter()
            .find(|h| h["host_id"] == name.as_str())
            .expect("host row");
        assert_eq!(h["labels"]["environment"], "staging", "{h}");
        assert_eq!(h["labels"]["team"], "web", "{h}");
        assert!(
            h["cert_serial"].as_str().is_some_and(|s| s.len() == 32),
            "{h}"
        );
        assert!(
            !h["enrolled_at"].is_null() && !h["cert_not_after"].is_null(),
            "{h}"
        );
        assert_eq!(h["agent_version"], "0.1.0");
    }
    assert!(!rows.iter().any(|h| h["host_id"] == "host4"));

    // A job signed by the published key runs on an enrolled host.
    let file = site.tmp.path().join("scan.job");
    let out = run(Command::new(patchctl())
        .args(["job", "sign", "--signing-key"])
        .arg(&site.signing_key)
        .arg("-o")
        .arg(&file)
        .args(["--id", "enrolled-scan-1", "--target", "host1", "--scan"]));
    assert!(out.status.success(), "sign: {}", text(&out));
    let local = format!("unix:{}", hosts[0].3.join("agent.sock").display());
    let out = run(Command::new(patchctl())
        .args(["submit", "--agent", &local])
        .arg(&file));
    assert!(out.status.success(), "submit: {}", text(&out));
    let out = run(Command::new(patchctl()).args(["watch", "--agent", &local, "enrolled-scan-1"]));
    assert!(out.status.success(), "watch: {}", text(&out));
    let result = wait_for(
        "the job's result at the controller",
        Duration::from_secs(30),
        || {
            let out = run(Command::new(patchctl())
                .args(["history", "--json", "--job", "enrolled-scan-1", "--db"])
                .arg(site.db()));
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
            rows.into_iter().find(|r| r["final"] == true)
        },
    );
    // The sandbox may report a reboot as needed; either way the job ran to success.
    assert!(
        result["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("SUCCEEDED")),
        "{result}"
    );
    assert_eq!(result["host_id"], "host1");
    drop(agents);
}

/// A controller with another CA (a man in the middle, as far as the host can tell): the host
/// refuses before sending the token, names the hash it saw, and writes nothing.
#[test]
fn a_controller_that_does_not_match_the_pin_gets_nothing() {
    let real = Site::new("enroll-real", "127.0.0.1:0", None, "7d");
    let impostor = Site::new("enroll-mitm", "127.0.0.1:0", None, "7d");
    let token = impostor.token(&[]);
    let dir = real.host("victim", "127.0.0.1:0", "");
    // The host pins the real controller's CA but reaches the impostor.
    let out = impostor.enroll(&dir, &token, &real.pin, None, &["--host-id", "victim"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("not the one pinned"), "{msg}");
    assert!(
        msg.contains(&impostor.pin),
        "the hash it saw is named: {msg}"
    );
    assert!(msg.contains("The token was not sent"), "{msg}");
    assert_untouched(&dir);
    // The token was never presented, so it still has its use.
    assert_eq!(impostor.tokens()[0]["uses_left"], 1);
    assert!(impostor.hosts().is_empty());

    // A malformed pin is a usage error (exit 2), also writing nothing.
    let out = real.enroll(&dir, &token, "sha256:abc", None, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("64 hex digits"), "{}", text(&out));
    assert_untouched(&dir);

    // The same host with the right pin at the right controller joins.
    let token = real.token(&[]);
    let out = real.enroll(&dir, &token, &real.pin, None, &["--host-id", "victim"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A 60 s certificate is renewed (new serial, new key) within 60 s while the agent keeps
/// answering over mutual TLS; then the host is revoked and both its reports and its renewal
/// are refused.
#[test]
fn certificates_renew_without_a_restart_and_revoked_hosts_are_refused() {
    let site = Site::new("enroll-renew", "127.0.0.1:0", None, "60s");
    let token = site.token(&[]);
    let dir = site.host("r1", "127.0.0.1:0", "[packages]\nscan_on_start = false\n");
    let out = site.enroll(&dir, &token, &site.pin, None, &["--host-id", "r1"]);
    assert!(out.status.success(), "{}", text(&out));
    let key_before = std::fs::read(dir.join("tls/agent.key")).expect("key");
    let agent = site.start(&dir, None);
    let first = site.status(&agent, "r1").expect("status");
    let serial0 = first["cert_serial"].as_str().expect("serial").to_string();
    assert_eq!(first["cert_state"], "valid", "{first}");
    assert_eq!(first["cert_enrolled"], true);

    // Every second a new mTLS connection and call succeed, until the serial changes.
    let started = Instant::now();
    let renewed = loop {
        let s = site.status(&agent, "r1").unwrap_or_else(|e| {
            panic!(
                "the agent stopped answering over mTLS after {:?}: {e}",
                started.elapsed()
            )
        });
        let serial = s["cert_serial"].as_str().unwrap_or_default().to_string();
        if serial != serial0 {
            break serial;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not renewed within 60 s: {s}\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_ne!(
        std::fs::read(dir.join("tls/agent.key")).expect("key"),
        key_before,
        "a new key"
    );
    // The listener serves the new certificate to new connections.
    let served = wait_for(
        "the new certificate served",
        Duration::from_secs(10),
        || {
            let s = served_serial(&site, &agent);
            (s == renewed).then_some(s)
        },
    );
    assert_eq!(served, renewed);
    // And the controller recorded it.
    let hosts = site.hosts();
    assert_eq!(hosts[0]["cert_serial"], renewed.as_str(), "{hosts:?}");

    // Before revocation the host's own certificate may report; after it, not.
    let hello = r#"{"host_id":"r1","agent_version":"test"}"#;
    let out = site.as_host(&dir, "patchagent.v1.Controller/Hello", hello);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(Command::new(patchctl())
        .args(["hosts", "revoke", "--db"])
        .arg(site.db())
        .arg("r1"));
    assert!(out.status.success(), "{}", text(&out));
    let out = site.as_host(&dir, "patchagent.v1.Controller/Hello", hello);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("PermissionDenied") && text(&out).contains("revoked"),
        "{}",
        text(&out)
    );
    let report = r#"{"report_id":"r1:j1:final","host_id":"r1","status":{"job_id":"j1","state":"JOB_STATE_SUCCEEDED"},"final":true}"#;
    let out = site.as_host(&dir, "patchagent.v1.Controller/ReportJob", report);
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    assert!(history_is_empty(&site));

    // The agent's next renewal is refused, and GetStatus says so and what to do.
    let failing = wait_for("the renewal refused", Duration::from_secs(60), || {
        let s = site.status(&agent, "r1").ok()?;
        (s["cert_state"] == "renewal-failing").then_some(s)
    });
    assert!(
        failing["cert_last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{failing}"
    );
    assert!(
        !failing["cert_action"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{failing}"
    );
    assert!(site.ctl.log_text().contains("revoked"));
}

fn history_is_empty(site: &Site) -> bool {
    let out = run(Command::new(patchctl())
        .args(["history", "--json", "--db"])
        .arg(site.db()));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).is_ok_and(|v| v.is_empty())
}

/// The serial of the certificate the agent's listener presents, as openssl sees it.
fn served_serial(site: &Site, agent: &Agent) -> String {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect {} -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
        agent.addr,
        site.pki.path("ca.pem").display(),
        site.pki.path("controller.pem").display(),
        site.pki.path("controller.key").display(),
    )));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

/// What an attacker or a broken image fleet may try.
#[test]
fn enrolment_abuse_is_refused() {
    // This part fails on purpose more often than the rate limit allows; that is tested below.
    let site = Site::with(
        "enroll-abuse",
        "127.0.0.1:0",
        None,
        "7d",
        &["--enroll-max-failures", "1000"],
    );

    // A single-use token raced by eight hosts enrolls exactly one.
    let token = site.token(&["--uses", "1"]);
    let dirs: Vec<PathBuf> = (0..8)
        .map(|i| site.host(&format!("race{i}"), "127.0.0.1:0", ""))
        .collect();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            Command::new(agent_bin())
                .args(["enroll", "--controller", &site.addr, "--ca-hash", &site.pin])
                .args(["--host-id", &format!("race{i}"), "--config"])
                .arg(dir.join("agent.toml"))
                .env("PATCH_AGENT_TOKEN", &token)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let winners: Vec<usize> = (0..8).filter(|i| outs[*i].status.success()).collect();
    assert_eq!(
        winners.len(),
        1,
        "{:?}",
        outs.iter().map(text).collect::<Vec<_>>()
    );
    for (i, dir) in dirs.iter().enumerate() {
        if i != winners[0] {
            assert!(
                text(&outs[i]).contains("no uses left"),
                "{}",
                text(&outs[i])
            );
            assert_untouched(dir);
        }
    }
    assert_eq!(site.hosts().len(), 1);
    let winner = format!("race{}", winners[0]);

    // Names: the controller's own, an operator's, another host's.
    let token = site.token(&["--uses", "10"]);
    let dir = site.host("names", "127.0.0.1:0", "");
    for (san, why) in [
        ("controller.fleet", "name of the controller"),
        ("controller", "name of the controller"),
        (winner.as_str(), "belongs to host"),
    ] {
        let out = site.enroll(
            &dir,
            &token,
            &site.pin,
            None,
            &["--host-id", "names", "--san", san],
        );
        assert_eq!(out.status.code(), Some(1), "{san}: {}", text(&out));
        assert!(text(&out).contains(why), "{san}: {}", text(&out));
        assert_untouched(&dir);
    }
    let out = site.enroll(&dir, &token, &site.pin, None, &["--host-id", &winner]);
    assert!(text(&out).contains("already known"), "{}", text(&out));
    assert_untouched(&dir);
    // Re-enrolment takes a token made for it.
    let again = site.token(&["--reenroll"]);
    let out = site.enroll(&dir, &again, &site.pin, None, &["--host-id", &winner]);
    assert!(out.status.success(), "{}", text(&out));

    // Revoked and expired tokens.
    let revoked = site.token(&[]);
    let id = revoked.split('.').next().expect("id");
    let out = run(Command::new(patchctl())
        .args(["tokens", "revoke", "--db"])
        .arg(site.db())
        .arg(id));
    assert!(out.status.success(), "{}", text(&out));
    let expired = site.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    let dir = site.host("late", "127.0.0.1:0", "");
    for (t, why) in [(&revoked, "revoked"), (&expired, "expired")] {
        let out = site.enroll(&dir, t, &site.pin, None, &["--host-id", "late"]);
        assert!(text(&out).contains(why), "{}", text(&out));
        assert_untouched(&dir);
    }
    // The list never shows a secret.
    let listed = serde_json::to_string(&site.tokens()).expect("json");
    let secret = revoked.split('.').nth(1).expect("secret");
    assert!(!listed.contains(secret));

    // Without a client certificate only Enroll answers (grpcurl, as an admin would try).
    let site = Site::new("enroll-rate", "127.0.0.1:0", None, "7d");
    let ca = site.pki.path("ca.pem");
    let anon = |args: &[&str]| {
        let mut a = strings(&["-cacert", ca.to_str().expect("path")]);
        a.extend(strings(args));
        grpcurl(&a)
    };
    let out = anon(&[
        "-d",
        r#"{"host_id":"x"}"#,
        &site.addr,
        "patchagent.v1.Controller/Hello",
    ]);
    assert!(text(&out).contains("Unauthenticated"), "{}", text(&out));
    let out = anon(&[&site.addr, "list"]);
    assert!(
        !out.status.success(),
        "reflection answered without a certificate: {}",
        text(&out)
    );
    let out = anon(&[
        "-import-path",
        "proto",
        "-proto",
        "patchagent/v1/enrollment.proto",
        "-d",
        r#"{"token":"0123456789abcdef.0123456789abcdef0123456789abcdef","host_id":"x"}"#,
        &site.addr,
        "patchagent.v1.Enrollment/Enroll",
    ]);
    // Enroll is reachable: the refusal is the service's own (no CSR in this request), not the
    // missing certificate's.
    assert!(
        text(&out).contains("InvalidArgument") && text(&out).contains("CSR"),
        "{}",
        text(&out)
    );

    // An anonymous caller cannot make the controller read more than 64 KiB.
    let big = format!(
        r#"{{"token":"x","host_id":"x","csr_der":"{}"}}"#,
        "A".repeat(100 * 1024)
    );
    let out = anon(&[
        "-import-path",
        "proto",
        "-proto",
        "patchagent/v1/enrollment.proto",
        "-d",
        &big,
        &site.addr,
        "patchagent.v1.Enrollment/Enroll",
    ]);
    assert!(
        text(&out).contains("message length too large"),
        "{}",
        text(&out)
    );

    // Failed attempts from one address are rate-limited (10 a minute by default; the grpcurl
    // call above was one).
    let dir = site.host("guess", "127.0.0.1:0", "");
    let mut limited = None;
    for i in 0..12 {
        let out = site.enroll(
            &dir,
            "0123456789abcdef.00000000000000000000000000000000",
            &site.pin,
            None,
            &["--host-id", "guess"],
        );
        if text(&out).contains("too many failed enrolments") {
            limited = Some(i);
            break;
        }
    }
    assert!(limited.is_some_and(|i| i >= 8), "{limited:?}");
    // Even a good token waits now.
    let good = site.token(&[]);
    let out = site.enroll(&dir, &good, &site.pin, None, &["--host-id", "guess"]);
    assert!(
        text(&out).contains("too many failed enrolments"),
        "{}",
        text(&out)
    );
    assert_untouched(&dir);
}

/// A host that was off past its certificate's expiry cannot renew (the controller would refuse
/// the certificate): it starts, and GetStatus says exactly what to do.
#[test]
fn an_expired_certificate_says_how_to_enroll_again() {
    let site = Site::new("enroll-expired", "127.0.0.1:0", None, "7d");
    let dir = site.host("old1", "127.0.0.1:0", "[packages]\nscan_on_start = false\n");
    std::fs::create_dir_all(dir.join("tls")).expect("tls");
    std::fs::create_dir_all(dir.join("keys")).expect("keys");
    site.pki.issue(
        &dir.join("tls/agent"),
        &[
            "--name",
            "old1",
            "--usage",
            "server",
            "--days",
            "1",
            "--start-days-ago",
            "2",
        ],
    );
    std::fs::copy(site.pki.path("ca.pem"), dir.join("tls/ca.pem")).expect("ca");
    std::fs::write(
        dir.join("enrolled.toml"),
        format!(
            "[agent]\nhost_id = \"old1\"\n[report]\ncontroller = \"{}\"\n",
            site.addr
        ),
    )
    .expect("enrolled");
    let _agent = site.start(&dir, None);
    let local = format!("unix:{}", dir.join("agent.sock").display());
    let status = wait_for("the expired state", Duration::from_secs(10), || {
        let out = run(Command::new(patchctl()).args(["status", "--json", "--agent", &local]));
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["cert_state"] == "expired").then_some(v)
    });
    let action = status["cert_action"].as_str().unwrap_or_default();
    assert!(
        action.contains("patchctl tokens create --reenroll")
            && action.contains(&format!("--controller {}", site.addr))
            && action.contains("--host-id old1"),
        "{status}"
    );
    assert_eq!(status["cert_enrolled"], true);
    let text_status = text(&run(
        Command::new(patchctl()).args(["status", "--agent", &local])
    ));
    assert!(
        text_status.contains("to do: the certificate expired"),
        "{text_status}"
    );
}

/// An agent that is not enrolled renews nothing, but GetStatus still shows its certificate,
/// read when first asked and again after a reload: expired, then replaced and valid.
#[test]
fn a_hand_made_certificate_is_shown_and_reread_after_sighup() {
    let site = Site::new("enroll-manual", "127.0.0.1:0", None, "7d");
    let dir = site.host(
        "manual1",
        "127.0.0.1:0",
        "[packages]\nscan_on_start = false\n",
    );
    std::fs::create_dir_all(dir.join("tls")).expect("tls");
    std::fs::create_dir_all(dir.join("keys")).expect("keys");
    let issue = |args: &[&str]| {
        let mut a = vec!["--name", "manual1", "--usage", "server", "--force"];
        a.extend_from_slice(args);
        site.pki.issue(&dir.join("tls/agent"), &a);
    };
    issue(&["--days", "1", "--start-days-ago", "2"]);
    std::fs::copy(site.pki.path("ca.pem"), dir.join("tls/ca.pem")).expect("ca");
    let agent = site.start(&dir, None);
    let local = format!("unix:{}", dir.join("agent.sock").display());
    let status = || -> Value {
        let out = run(Command::new(patchctl()).args(["status", "--json", "--agent", &local]));
        serde_json::from_slice(&out.stdout).expect("status json")
    };
    let s = status();
    assert_eq!(s["cert_state"], "expired", "{s}");
    assert_eq!(s["cert_enrolled"], false);
    assert_eq!(s["cert_renew_at"], "-");
    assert!(
        s["cert_action"]
            .as_str()
            .unwrap_or_default()
            .contains("send SIGHUP"),
        "{s}"
    );
    let old = s["cert_serial"].as_str().expect("serial").to_string();

    issue(&[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let s = wait_for(
        "the new certificate in GetStatus",
        Duration::from_secs(10),
        || {
            let s = status();
            (s["cert_state"] == "valid").then_some(s)
        },
    );
    assert_ne!(s["cert_serial"], old.as_str());
    assert_eq!(
        served_serial(&site, &agent),
        s["cert_serial"].as_str().expect("serial")
    );
}
