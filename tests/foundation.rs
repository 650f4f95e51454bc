//! The agent foundation, proven with the real binaries, real TLS and the real grpcurl.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::process::{Command, Stdio};
use std::time::Duration;

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "grpcurl failed: {}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

#[test]
fn grpcurl_lists_describes_and_gets_real_host_facts_over_mtls() {
    let (tmp, pki) = setup("mtls");
    let agent = Agent::start(
        &tmp.path().join("a"),
        &config_text(&tmp.path().join("a"), &pki, ""),
    );
    let ctl = pki.client("controller");

    let out = agent.grpcurl_tls(&ctl, &["list"]);
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    for svc in [
        "patchagent.v1.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l == svc),
            "{svc} missing from {listed}"
        );
    }

    let out = agent.grpcurl_tls(&ctl, &["describe", "patchagent.v1.Agent"]);
    assert!(text(&out).contains("rpc GetStatus ( .patchagent.v1.GetStatusRequest ) returns ( .patchagent.v1.GetStatusResponse )"), "{}", text(&out));
    let out = agent.grpcurl_tls(&ctl, &["describe", "patchagent.v1.GetStatusResponse"]);
    assert!(
        text(&out).contains(".google.protobuf.Timestamp boot_time"),
        "{}",
        text(&out)
    );
    let out = agent.grpcurl_tls(&ctl, &["describe", "grpc.health.v1.Health"]);
    assert!(text(&out).contains("rpc Check"), "{}", text(&out));

    let status = json(&agent.grpcurl_tls(&ctl, &["patchagent.v1.Agent/GetStatus"]));
    let read = |p: &str| std::fs::read_to_string(p).expect(p).trim().to_string();
    assert_eq!(status["hostId"], "test-host");
    let machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    assert_eq!(status["machineId"], machine_id.trim());
    assert_eq!(status["bootId"], read("/proc/sys/kernel/random/boot_id"));
    assert_eq!(status["kernelRelease"], read("/proc/sys/kernel/osrelease"));
    assert_eq!(status["hostname"], read("/proc/sys/kernel/hostname"));
    let arch = String::from_utf8(run(Command::new("uname").arg("-m")).stdout).expect("utf8");
    assert_eq!(status["architecture"], arch.trim());
    let os = read("/etc/os-release");
    let id = os
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .expect("ID")
        .trim_matches('"');
    assert_eq!(status["os"]["id"], id);
    assert!(os.contains(status["os"]["prettyName"].as_str().expect("pretty")));
    assert_eq!(status["agentVersion"], env!("CARGO_PKG_VERSION"));
    let up: f64 = status["uptime"]
        .as_str()
        .expect("uptime")
        .trim_end_matches('s')
        .parse()
        .expect("secs");
    let proc_up: f64 = read("/proc/uptime")
        .split_whitespace()
        .next()
        .expect("up")
        .parse()
        .expect("f64");
    assert!(
        (up - proc_up).abs() < 5.0,
        "uptime {up} vs /proc/uptime {proc_up}"
    );
    let btime = read("/proc/stat")
        .lines()
        .find_map(|l| l.strip_prefix("btime ").map(str::to_string))
        .expect("btime");
    let boot = status["bootTime"].as_str().expect("bootTime");
    let boot_secs = humantime::parse_rfc3339(boot)
        .expect("rfc3339")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs();
    assert_eq!(boot_secs.to_string(), btime);
    assert_eq!(status["caller"]["identity"], "controller");
    assert_eq!(status["caller"]["role"], "ROLE_CONTROLLER");
    assert_eq!(status["caller"]["transport"], "TRANSPORT_MTLS");

    let viewer =
        json(&agent.grpcurl_tls(&pki.client("viewer"), &["patchagent.v1.Agent/GetStatus"]));
    assert_eq!(viewer["caller"]["role"], "ROLE_VIEWER");

    let health = json(&agent.grpcurl_tls(&ctl, &["grpc.health.v1.Health/Check"]));
    assert_eq!(health["status"], "SERVING");
    let health = json(&agent.grpcurl_tls(
        &ctl,
        &[
            "-d",
            r#"{"service":"patchagent.v1.Agent"}"#,
            "grpc.health.v1.Health/Check",
        ],
    ));
    assert_eq!(health["status"], "SERVING");

    // patchctl status, readable and JSON, over mTLS.
    let out = run(Command::new(patchctl())
        .args(["status", "--agent", &agent.addr, "--json"])
        .env("PATCHCTL_CA", pki.path("ca.pem"))
        .env("PATCHCTL_CERT", pki.path("viewer.pem"))
        .env("PATCHCTL_KEY", pki.path("viewer.key")));
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(j["host_id"], "test-host");
    assert_eq!(j["caller_role"], "viewer");
    let out = run(Command::new(patchctl())
        .args(["status", "--agent", &agent.addr, "--ca"])
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("controller.pem"))
        .arg("--key")
        .arg(pki.path("controller.key")));
    let t = text(&out);
    assert!(
        out.status.success()
            && t.contains("test-host")
            && t.contains("controller as controller over mtls"),
        "{t}"
    );
}

#[test]
fn local_socket_is_root_only_and_maps_uids_to_roles() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let (tmp, pki) = setup("unix");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let meta = std::fs::metadata(&agent.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let out = agent.grpcurl_unix(&["list"]);
    assert!(text(&out).contains("patchagent.v1.Agent"), "{}", text(&out));
    let s = json(&agent.grpcurl_unix(&["patchagent.v1.Agent/GetStatus"]));
    assert_eq!(s["caller"]["identity"], "uid:0");
    assert_eq!(s["caller"]["role"], "ROLE_CONTROLLER");
    assert_eq!(s["caller"]["transport"], "TRANSPORT_UNIX");
    let h = json(&agent.grpcurl_unix(&["grpc.health.v1.Health/Check"]));
    assert_eq!(h["status"], "SERVING");

    let out = run(Command::new(patchctl()).args([
        "status",
        "--agent",
        &format!("unix:{}", agent.socket.display()),
    ]));
    assert!(
        text(&out).contains("uid:0 as controller over unix"),
        "{}",
        text(&out)
    );

    // Another uid cannot even connect while the socket is 0600 ...
    // (a copy of grpcurl that uid 65534 can execute)
    let bin = tmp.path().join("grpcurl");
    std::fs::copy(grpcurl_bin(), &bin).expect("copy grpcurl");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let as_nobody = |args: &[&str]| {
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["-plaintext", "-connect-timeout", "3", "-unix"])
            .arg(&agent.socket)
            .args(args))
    };
    let out = as_nobody(&["list"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("permission denied"), "{}", text(&out));
    // ... and is a viewer once an admin opens the socket up.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = as_nobody(&["patchagent.v1.Agent/GetStatus"]);
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(s["caller"]["identity"], "uid:65534");
    assert_eq!(s["caller"]["role"], "ROLE_VIEWER");
}

#[test]
fn patchctl_ends_quietly_when_its_reader_goes_away() {
    let (tmp, pki) = setup("epipe");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let socket = format!("unix:{}", agent.socket.display());
    for _ in 0..5 {
        // `patchctl status --json | true`: the pipe is closed before patchctl writes.
        let mut child = Command::new(patchctl())
            .args(["status", "--json", "--agent", &socket])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("patchctl");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(!text(&out).contains("panicked"), "{}", text(&out));
    }
}

#[test]
fn bad_clients_fail_the_handshake() {
    let (tmp, pki) = setup("handshake");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let other = Pki::new(tmp.path(), "other");
    let (exp_cert, exp_key) = pki.issue(
        &tmp.path().join("expired"),
        &[
            "--name",
            "controller",
            "--days",
            "1",
            "--start-days-ago",
            "10",
        ],
    );

    // Plaintext gRPC to the TLS port.
    let out = grpcurl(&strings(&["-plaintext", &agent.addr, "list"]));
    assert!(
        !out.status.success() && text(&out).contains("Failed to dial"),
        "{}",
        text(&out)
    );
    agent.wait_log("TLS handshake failed", 1);
    assert!(
        agent.log_text().contains("InvalidContentType"),
        "{}",
        agent.log_text()
    );

    // TLS without a client certificate.
    let out = grpcurl(&strings(&[
        "-cacert",
        &pki.path("ca.pem").display().to_string(),
        &agent.addr,
        "list",
    ]));
    assert!(
        !out.status.success() && text(&out).contains("Failed to dial"),
        "{}",
        text(&out)
    );
    assert!(
        agent.log_text().contains("peer sent no certificates"),
        "{}",
        agent.log_text()
    );

    // A client certificate from another CA. grpcurl (Go) declines to send a certificate that
    // does not match the CAs the server names, so also present it with openssl, which sends it.
    let mut tls = pki.client("controller");
    tls[3] = other.path("controller.pem").display().to_string();
    tls[5] = other.path("controller.key").display().to_string();
    let out = agent.grpcurl_tls(&tls, &["list"]);
    assert!(
        !out.status.success() && text(&out).contains("Failed to dial"),
        "{}",
        text(&out)
    );
    let out = run(Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-ign_eof",
            "-connect",
            &agent.addr,
            "-alpn",
            "h2",
            "-CAfile",
        ])
        .arg(pki.path("ca.pem"))
        .arg("-cert")
        .arg(other.path("controller.pem"))
        .arg("-key")
        .arg(other.path("controller.key"))
        .stdin(Stdio::null()));
    assert!(
        text(&out).contains("alert unknown ca"),
        "openssl: {}",
        text(&out)
    );
    agent.wait_log("UnknownIssuer", 1);

    // An expired client certificate.
    let tls = strings(&[
        "-cacert",
        &pki.path("ca.pem").display().to_string(),
        "-cert",
        &exp_cert.display().to_string(),
        "-key",
        &exp_key.display().to_string(),
    ]);
    let out = agent.grpcurl_tls(&tls, &["list"]);
    assert!(
        !out.status.success() && text(&out).contains("Failed to dial"),
        "{}",
        text(&out)
    );
    agent.wait_log("certificate expired", 1);

    // The agent is still healthy for good clients.
    let h = json(&agent.grpcurl_tls(&pki.client("controller"), &["grpc.health.v1.Health/Check"]));
    assert_eq!(h["status"], "SERVING");
}

#[test]
fn identity_in_no_role_is_refused() {
    let (tmp, pki) = setup("norole");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let (cert, key) = pki.issue(
        &tmp.path().join("stranger"),
        &["--name", "stranger.example"],
    );
    let tls = strings(&[
        "-cacert",
        &pki.path("ca.pem").display().to_string(),
        "-cert",
        &cert.display().to_string(),
        "-key",
        &key.display().to_string(),
    ]);
    for call in [
        &["patchagent.v1.Agent/GetStatus"][..],
        &["grpc.health.v1.Health/Check"],
        &["list"],
    ] {
        let out = agent.grpcurl_tls(&tls, call);
        let t = text(&out);
        assert!(!out.status.success(), "{call:?} succeeded: {t}");
    }
    // A certificate with no role is closed right after its handshake (it holds no slot), and
    // the agent says whose it was and how to give it a role.
    let log = agent.log_text();
    assert!(
        log.contains("Closed a connection with no role")
            && log.contains("stranger.example")
            && log.contains("has no role"),
        "{log}"
    );
}

#[test]
fn check_config_reports_every_problem_and_exits_2() {
    let (tmp, pki) = setup("check");
    let dir = tmp.path().join("a");
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("agent.toml");
    let good = config_text(&dir, &pki, "");
    std::fs::write(&cfg, &good).expect("write");
    let out = run(Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&cfg));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let bad = good
        .replace("[server]\n", "[server]\nlistne = \"0.0.0.0:1\"\n")
        .replace("[auth]\n", "[auth]\nadmins = []\n");
    std::fs::write(&cfg, bad).expect("write");
    let out = run(Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&cfg));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains(&format!("{}: server.listne: unknown key", cfg.display())),
        "{t}"
    );
    assert!(t.contains("auth.admins: unknown key"), "{t}");
    assert!(t.contains("2 problem(s)"), "{t}");

    // A key and a certificate that do not match, and a missing CA: both named at once.
    let mismatched = good
        .replace(
            &pki.path("agent.pem").display().to_string(),
            &pki.path("viewer.pem").display().to_string(),
        )
        .replace(
            &pki.path("ca.pem").display().to_string(),
            "/nonexistent/ca.pem",
        );
    std::fs::write(&cfg, mismatched).expect("write");
    let out = run(Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&cfg));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("tls.ca: cannot read /nonexistent/ca.pem"), "{t}");
    std::fs::write(
        &cfg,
        good.replace(
            &pki.path("agent.pem").display().to_string(),
            &pki.path("viewer.pem").display().to_string(),
        ),
    )
    .expect("write");
    let out = run(Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&cfg));
    assert!(text(&out).contains("do not match"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn world_readable_key_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, pki) = setup("keymode");
    std::fs::set_permissions(
        pki.path("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let dir = tmp.path().join("a");
    let (mut child, _n, log, _) = Agent::spawn(&dir, &config_text(&dir, &pki, ""), &[]);
    let status = child.wait().expect("wait");
    let t = std::fs::read_to_string(log).expect("log");
    assert_eq!(status.code(), Some(2), "{t}");
    let key = pki.path("agent.key").display().to_string();
    assert!(
        t.contains(&format!(
            "tls.key: {key} is accessible by group or others (mode 0644); run `chmod 600 {key}`"
        )),
        "{t}"
    );
    assert!(t.contains("refusing to start"), "{t}");
}

#[test]
fn sighup_reloads_a_good_cert_and_keeps_the_old_one_when_broken() {
    let (tmp, pki) = setup("sighup");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let ctl = pki.client("controller");
    let check = |servername: &str| {
        agent.grpcurl_tls(
            &ctl,
            &["-servername", servername, "grpc.health.v1.Health/Check"],
        )
    };
    assert!(
        !check("reloaded.test").status.success(),
        "old cert has no reloaded.test"
    );

    let (new_cert, new_key) = pki.issue(
        &tmp.path().join("new-agent"),
        &[
            "--name",
            "reloaded.test",
            "--san",
            "127.0.0.1",
            "--usage",
            "server",
        ],
    );
    std::fs::copy(&new_cert, pki.path("agent.pem")).expect("copy");
    std::fs::copy(&new_key, pki.path("agent.key")).expect("copy");
    agent.signal(Signal::SIGHUP);
    agent.wait_log("SIGHUP: reloaded", 1);
    let out = check("reloaded.test");
    assert!(out.status.success(), "new cert not served: {}", text(&out));

    // A broken certificate: the reload is rejected and the last good one stays.
    std::fs::write(
        pki.path("agent.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    agent.signal(Signal::SIGHUP);
    agent.wait_log("keeping the last good configuration", 1);
    assert!(
        agent.log_text().contains("tls.cert"),
        "{}",
        agent.log_text()
    );
    let out = check("reloaded.test");
    assert!(
        out.status.success(),
        "last good cert not kept: {}",
        text(&out)
    );
    let out = agent.grpcurl_tls(&ctl, &["patchagent.v1.Agent/GetStatus"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn sigterm_goes_not_serving_drains_and_exits_0() {
    let (tmp, pki) = setup("sigterm");
    let dir = tmp.path().join("a");
    let mut agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let mut args = pki.client("viewer");
    args.extend(strings(&[
        "-max-time",
        "20",
        &agent.addr,
        "grpc.health.v1.Health/Watch",
    ]));
    let watch = Command::new(grpcurl_bin())
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grpcurl watch");
    // Let the watch stream open and report SERVING before stopping the agent.
    agent.wait_log("Ready", 1);
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal(Signal::SIGTERM);
    agent.wait_notify("STOPPING=1", Duration::from_secs(5));
    let code = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", agent.log_text());
    let out = watch.wait_with_output().expect("watch output");
    let t = text(&out);
    let serving = t
        .find("\"SERVING\"")
        .unwrap_or_else(|| panic!("no SERVING: {t}"));
    let not_serving = t
        .find("\"NOT_SERVING\"")
        .unwrap_or_else(|| panic!("no NOT_SERVING: {t}"));
    assert!(serving < not_serving, "{t}");
    assert!(agent.log_text().contains("SIGTERM: draining"));
    assert!(!agent.socket.exists(), "socket removed on exit");
}

#[test]
fn sd_notify_ready_status_and_watchdog() {
    let (tmp, pki) = setup("notify");
    let dir = tmp.path().join("a");
    let mut agent = Agent::start_with_env(
        &dir,
        &config_text(&dir, &pki, ""),
        &[("WATCHDOG_USEC", "400000")],
    );
    // READY=1 arrived (start waits for it) with the listening addresses in STATUS.
    assert!(agent.addr.starts_with("127.0.0.1:"), "{}", agent.addr);
    agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    agent.wait_notify("WATCHDOG=1", Duration::from_secs(2));
    // A watchdog meant for another pid is ignored.
    let dir2 = tmp.path().join("b");
    let mut other = Agent::start_with_env(
        &dir2,
        &config_text(&dir2, &pki, ""),
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 256];
    while let Ok(n) = other.notify.recv(&mut buf) {
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG"),
            "watchdog for another pid"
        );
    }
    other.signal(Signal::SIGTERM);
    assert_eq!(other.wait_exit(Duration::from_secs(10)), Some(0));
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
}
