//! What verification found, as an attacker and as a new user would try it, each refused or
//! survived through the real binaries: apt and dnf sandboxes, grpcurl, openssl, real signals,
//! real connections from other loopback addresses.

mod common;

use common::jobs::*;
use common::*;
use patch_agent_wire::job::trust::SigningKey;
use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

fn break_apt_sources(f: &Fixture) {
    let sources = f.sandbox.join("root/etc/apt/sources.list");
    let mut text = std::fs::read_to_string(&sources).expect("sources");
    text.push_str("deb [trusted=yes] file:/nonexistent/patch-agent-repo ./\n");
    std::fs::write(&sources, text).expect("sources");
}

#[test]
fn a_job_over_an_unreadable_repository_fails_and_changes_nothing_unless_allowed() {
    let f = fixture("repoerr", "apt", &[]);
    break_apt_sources(&f);
    let agent = f.start("apt");
    let before = f.dpkg_versions();
    for (id, flags) in [
        ("upgrade-broken", &["--upgrade", "all"][..]),
        ("scan-broken", &["--scan"][..]),
        ("install-broken", &["--install", "alpha"][..]),
    ] {
        let s = f.run_job(&agent, id, flags);
        assert_eq!(state(&s), "JOB_STATE_FAILED", "{id}: {s:#}");
        let reason = s["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("/nonexistent/patch-agent-repo")
                && reason.contains("--allow-repo-errors")
                && reason.contains("Nothing was changed"),
            "{id}: {reason}"
        );
        assert_eq!(s["repoErrors"].as_array().map(Vec::len), Some(1), "{s:#}");
        assert_eq!(f.dpkg_versions(), before, "{id} changed the host");
    }
    // Allowed: it goes on with what could be read, and says so.
    let s = f.run_job(
        &agent,
        "upgrade-allowed",
        &[
            "--upgrade",
            "all",
            "--exclude",
            "slow",
            "--allow-repo-errors",
        ],
    );
    assert!(state(&s).starts_with("JOB_STATE_SUCCEEDED"), "{s:#}");
    assert_eq!(s["repoErrors"].as_array().map(Vec::len), Some(1), "{s:#}");
    assert!(history(&agent, "upgrade-allowed").contains("allow_repo_errors"));
    assert!(
        f.dpkg_versions().contains("alpha=1.1"),
        "{}",
        f.dpkg_versions()
    );

    // dnf: the same.
    let f = fixture("dnfrepoerr", "dnf", &[]);
    std::fs::write(
        f.sandbox.join("repos.d/broken.repo"),
        "[broken]\nname=broken\nbaseurl=file:///nonexistent/patch-agent-repo\ngpgcheck=0\n",
    )
    .expect("repo");
    let agent = f.start("dnf");
    let before = f.rpm_versions();
    let s = f.run_job(&agent, "dnf-broken", &["--upgrade", "all"]);
    assert_eq!(state(&s), "JOB_STATE_FAILED", "{s:#}");
    assert!(
        s["reason"].as_str().unwrap_or("").contains("broken"),
        "{s:#}"
    );
    assert_eq!(f.rpm_versions(), before);
    let s = f.run_job(
        &agent,
        "dnf-allowed",
        &["--upgrade", "all", "--allow-repo-errors"],
    );
    assert!(state(&s).starts_with("JOB_STATE_SUCCEEDED"), "{s:#}");
    assert_ne!(f.rpm_versions(), before);
}

#[test]
fn package_arguments_that_change_meaning_are_refused_and_unplanned_removals_fail_the_job() {
    let f = fixture("argtricks", "apt", &["extras"]);
    let agent = f.start("apt");
    let forge = Forge {
        key: SigningKey::read(&f.key()).expect("key"),
    };
    let before = f.dpkg_versions();
    let install = |id: &str, name: &str, version: &str| {
        let mut j = forge.job(id);
        j.action = Some(pb::job::Action::Install(pb::InstallAction {
            packages: vec![pb::PackageSpec {
                name: name.into(),
                version: version.into(),
            }],
        }));
        submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec()))
    };
    for (i, (name, version, field)) in [
        ("alpha-", "", "install.packages[0].name"),
        ("alpha+", "", "install.packages[0].name"),
        ("alpha", "1.1-", "install.packages[0].version"),
        ("alph*", "", "install.packages[0].name"),
        ("[a]lpha", "", "install.packages[0].name"),
        ("a|b", "", "install.packages[0].name"),
        ("@core", "", "install.packages[0].name"),
        ("/etc/passwd", "", "install.packages[0].name"),
    ]
    .into_iter()
    .enumerate()
    {
        expect_code(
            &install(&format!("trick-{i}"), name, version),
            "InvalidArgument",
            field,
        );
    }
    // Exclude globs are allowed, and validated.
    let mut j = forge.job("bad-glob");
    j.action = Some(pb::job::Action::Upgrade(pb::UpgradeAction {
        scope: pb::UpgradeScope::All as i32,
        exclude: vec!["linux-*".into(), "a[bc".into()],
        ..Default::default()
    }));
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "InvalidArgument",
        "upgrade.exclude[1]",
    );
    assert_eq!(f.dpkg_versions(), before, "a refused job changed the host");

    // The net behind the grammar: installing `breaker` makes apt remove alpha, which the plan
    // never said. The job fails and names it; the host is what dpkg says.
    let s = f.run_job(&agent, "breaker", &["--install", "breaker"]);
    assert_eq!(state(&s), "JOB_STATE_FAILED", "{s:#}");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("alpha 1.0: removed, but the plan did not remove it"),
        "{reason}"
    );
    assert_eq!(
        outcome(&s, "alpha").map(|o| o["outcome"].clone()),
        Some(Value::from("removed (not planned)")),
        "{s:#}"
    );
    let versions = f.dpkg_versions();
    assert!(
        !versions.contains("alpha=") && versions.contains("breaker=1.0"),
        "{versions}"
    );
    // A glob exclude works on a real upgrade.
    let s = f.run_job(
        &agent,
        "glob",
        &["--upgrade", "all", "--exclude", "sl*", "--exclude", "g?mma"],
    );
    assert!(state(&s).starts_with("JOB_STATE_SUCCEEDED"), "{s:#}");
    assert!(history(&agent, "glob").contains("excluded by pattern sl*"));
    assert!(f.dpkg_versions().contains("slow=1.0"));
}

/// An `apt-get` on PATH that records each `update` and makes it take `delay` seconds.
fn counting_apt_get(dir: &Path, delay: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let log = dir.join("apt-get-calls");
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = update ] && {{ echo update >> {}; sleep {delay}; }}; done\nexec /usr/bin/apt-get \"$@\"\n",
        log.display()
    );
    std::fs::write(bin.join("apt-get"), script).expect("wrapper");
    std::fs::set_permissions(bin.join("apt-get"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    log
}

#[test]
fn viewers_cannot_refresh_and_concurrent_refreshes_share_one_run() {
    let f = fixture("refresh", "apt", &[]);
    let calls = counting_apt_get(f.tmp.path(), "1");
    let path = format!(
        "{}:{}",
        f.tmp.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let agent = Agent::start_with_env(
        &f.tmp.path().join("agent"),
        &f.config("apt", ""),
        &[("PATH", &path)],
    );
    let count = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let out = agent.grpcurl_tls(
        &f.pki.client("viewer"),
        &[
            "-d",
            r#"{"refresh":true}"#,
            "patchagent.v1.Agent/ListUpdates",
        ],
    );
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("PermissionDenied"),
        "{t}"
    );
    assert!(t.contains("controller role"), "{t}");
    assert_eq!(count(), 0, "a viewer ran the package manager");
    // Without refresh, a viewer reads the last scan.
    let out = agent.grpcurl_tls(
        &f.pki.client("viewer"),
        &["patchagent.v1.Agent/ListUpdates"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // Eight controllers ask for a refresh at once, and a job arrives among them.
    let started = Instant::now();
    let refreshers: Vec<_> = (0..8)
        .map(|_| {
            Command::new(grpcurl_bin())
                .args(f.pki.client("controller"))
                .args(["-max-time", "60", "-d", r#"{"refresh":true}"#])
                .arg(&agent.addr)
                .arg("patchagent.v1.Agent/ListUpdates")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("grpcurl")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let s = f.run_job(&agent, "scan-among-refreshes", &["--scan"]);
    for mut r in refreshers {
        assert!(r.wait().expect("wait").success(), "a refresh failed");
    }
    assert!(state(&s).starts_with("JOB_STATE_SUCCEEDED"), "{s:#}");
    // One run for the eight, and the job shares it or runs one more: never nine.
    let runs = count();
    assert!(
        (1..=2).contains(&runs),
        "{runs} apt-get update runs for 8 refreshes and a job"
    );
    eprintln!(
        "8 refreshes + 1 job: {runs} runs in {:?}",
        started.elapsed()
    );
}

/// A raw TCP connection from `src` (another loopback address) to `addr`.
fn connect_from(src: &str, addr: &str) -> std::io::Result<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local: std::net::SocketAddr = format!("{src}:0").parse().expect("src");
    let remote: std::net::SocketAddr = addr.parse().expect("addr");
    let stream = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(local)?;
        sock.connect(remote).await
    })?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// True when the server closed `s` (EOF or reset) within `wait`.
fn closed_within(s: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn held_connections_cannot_lock_out_a_controller() {
    patch_agent_service::tls::install_default_provider();
    let (tmp, pki) = setup("slots");
    // A certificate the CA signed but that has no role on the agent.
    let (nobody_cert, nobody_key) = pki.issue(
        &tmp.path().join("nobody"),
        &["--name", "nobody", "--usage", "client"],
    );
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &config_text(&dir, &pki, "").replace(
            "drain_timeout = \"1s\"\n",
            "drain_timeout = \"1s\"\nhandshake_timeout = \"4s\"\nidle_timeout = \"2s\"\nmax_connections_per_ip = 20\nmax_connections = 100\n",
        ),
    );
    // 200 connections from 127.0.0.2 that never start a handshake: 20 are held, the rest are
    // over the per-address limit and closed at once.
    let mut silent: Vec<_> = (0..200)
        .filter_map(|_| connect_from("127.0.0.2", &agent.addr).ok())
        .collect();
    let mut over = 0;
    for s in &mut silent {
        if closed_within(s, Duration::from_millis(20)) {
            over += 1;
        }
    }
    assert!(
        over >= 150,
        "only {over} of 200 silent connections were refused at once"
    );
    // 150 more from ten other addresses (15 each): now more silent connections than the
    // 100 slots. Each one past the table takes the slot of the oldest unfinished handshake.
    for i in 0..150 {
        let src = format!("127.0.1.{}", 2 + i % 10);
        silent.extend(connect_from(&src, &agent.addr).ok());
    }
    // 20 mTLS connections from 127.0.0.3 with a no-role certificate, held open.
    let config =
        patch_agent_service::tls::client_config(&pki.path("ca.pem"), &nobody_cert, &nobody_key)
            .expect("client config");
    let mut noroles = Vec::new();
    for _ in 0..20 {
        let tcp = connect_from("127.0.0.3", &agent.addr).expect("connect");
        let mut conn =
            rustls::ClientConnection::new(config.clone(), "localhost".try_into().expect("name"))
                .expect("tls");
        let mut tcp = tcp;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("handshake");
        }
        noroles.push((conn, tcp));
    }
    // With the table full of silent connections, a controller on a new connection is
    // answered at once.
    let t = Instant::now();
    let out = agent.grpcurl_tls(
        &pki.client("controller"),
        &["patchagent.v1.Agent/GetStatus"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "GetStatus took {:?}",
        t.elapsed()
    );
    // No-role connections were closed right after their handshake.
    for (conn, tcp) in &mut noroles {
        let _ = conn.complete_io(tcp);
        assert!(
            closed_within(tcp, Duration::from_secs(2)),
            "a no-role connection is still open"
        );
    }
    // Every silent connection is gone by the handshake timeout (most gave up their slot
    // earlier, to the no-role connections and the controller).
    assert!(
        silent
            .iter_mut()
            .all(|s| closed_within(s, Duration::from_secs(5))),
        "a silent connection outlived handshake_timeout"
    );
    // An idle controller connection (handshake done, no stream) goes after idle_timeout.
    let config = patch_agent_service::tls::client_config(
        &pki.path("ca.pem"),
        &pki.path("controller.pem"),
        &pki.path("controller.key"),
    )
    .expect("client config");
    let mut conn =
        rustls::ClientConnection::new(config, "localhost".try_into().expect("name")).expect("tls");
    let mut tcp = std::net::TcpStream::connect(&agent.addr).expect("connect");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    let idle_from = Instant::now();
    assert!(
        !closed_within(&mut tcp, Duration::from_secs(1)),
        "closed before idle_timeout"
    );
    assert!(
        closed_within(&mut tcp, Duration::from_secs(4)),
        "idle connection kept"
    );
    assert!(idle_from.elapsed() >= Duration::from_secs(2));
    let rss = rss_kib(agent.child.id());
    assert!(rss < 32 * 1024, "agent RSS {rss} KiB");
    eprintln!("agent RSS after the hold: {rss} KiB");
}

#[test]
fn the_local_socket_refuses_huge_decoded_headers_and_connections_over_its_limit() {
    let (tmp, pki) = setup("uds");
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &config_text(&dir, &pki, "").replace(
            "drain_timeout = \"1s\"\n",
            "drain_timeout = \"1s\"\nmax_local_connections = 4\n",
        ),
    );
    use std::io::{Read, Write};
    // HTTP/2 preface, empty SETTINGS, then one HEADERS block of ~4 KB that decodes to ~4 MB:
    // a 4000-byte header entered into the HPACK table, then a thousand 1-byte references to it.
    let mut block = vec![0x40, 5];
    block.extend_from_slice(b"x-big");
    block.extend_from_slice(&[0x7f, 0xa1, 0x1e]);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, 1000));
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let len = (block.len() as u32).to_be_bytes();
    wire.extend_from_slice(&[len[1], len[2], len[3], 1, 0x5, 0, 0, 0, 1]);
    wire.extend_from_slice(&block);
    let before = rss_kib(agent.child.id());
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
    s.write_all(&wire).expect("write");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let after = rss_kib(agent.child.id());
    assert!(
        after < before + 2048,
        "RSS grew from {before} to {after} KiB"
    );
    // The agent still answers.
    let out = agent.grpcurl_unix(&["patchagent.v1.Agent/GetStatus"]);
    assert!(out.status.success(), "{}", text(&out));
    // Four idle local connections fill the limit; a fifth is closed at once; freeing one lets
    // an admin in again. (First let grpcurl's connection give its slot back: that is async.)
    std::thread::sleep(Duration::from_millis(500));
    let mut held: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
    fifth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut one = [0u8; 1];
    assert!(
        matches!(fifth.read(&mut one), Ok(0) | Err(_)),
        "fifth connection accepted"
    );
    held.pop();
    std::thread::sleep(Duration::from_millis(200));
    let out = agent.grpcurl_unix(&["patchagent.v1.Agent/GetStatus"]);
    assert!(out.status.success(), "{}", text(&out));
    drop(tmp);
}

#[test]
fn removing_a_key_fails_the_jobs_it_signed_before_they_start_and_after_a_restart() {
    let f = fixture("revoke", "apt", &[]);
    let agent = f.start("apt");
    let before = f.dpkg_versions();
    let now = SystemTime::now();
    let window = format!(
        "{}/{}",
        rfc3339(now + Duration::from_secs(4)),
        rfc3339(now + Duration::from_secs(1800))
    );
    // Two jobs waiting for their window.
    let wait_in_window = |agent: &Agent, id: &str, window: &str| {
        let flags = [
            "--upgrade",
            "all",
            "--window",
            window,
            "--max-duration",
            "10m",
        ];
        let out = f.patchctl(
            agent,
            &["submit", f.sign(id, &flags).to_str().expect("path")],
        );
        assert!(out.status.success(), "{}", text(&out));
        wait_state(agent, id, "JOB_STATE_WAITING_WINDOW");
    };
    for id in ["waiting-1", "waiting-2"] {
        wait_in_window(&agent, id, &window);
    }
    // The key is removed; SIGHUP. When the window opens, the first fails and nothing runs.
    std::fs::remove_file(f.trusted.join("signing.pem")).expect("remove key");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_log("SIGHUP: reloaded", 1);
    let s = wait_state(&agent, "waiting-1", "JOB_STATE_FAILED");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(reason.contains("no longer trusted"), "{reason}");
    // The second, whose window opened too, fails the same way.
    let s = wait_state(&agent, "waiting-2", "JOB_STATE_FAILED");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no longer trusted")
    );
    assert_eq!(
        f.dpkg_versions(),
        before,
        "a job signed by a removed key changed the host"
    );
    drop(agent);
    // Restart case: a queued job in the journal, its key removed while the agent is down.
    std::fs::copy(f.keys.join("signing.pem"), f.trusted.join("signing.pem")).expect("key back");
    let mut agent = f.start("apt");
    let later = format!(
        "{}/{}",
        rfc3339(SystemTime::now() + Duration::from_secs(600)),
        rfc3339(SystemTime::now() + Duration::from_secs(2400))
    );
    wait_in_window(&agent, "journaled", &later);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(10));
    std::fs::remove_file(f.trusted.join("signing.pem")).expect("remove key");
    let agent = f.start("apt");
    let s = wait_state(&agent, "journaled", "JOB_STATE_FAILED");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(reason.contains("no longer trusted"), "{reason}");
    assert!(history(&agent, "journaled").contains("found after an agent restart"));
    assert_eq!(f.dpkg_versions(), before);
}

#[test]
fn files_the_agent_trusts_must_be_its_own_and_not_writable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, pki) = setup("owners");
    let dir = tmp.path().join("a");
    let keys = tmp.path().join("agent-keys");
    let hooks = tmp.path().join("hooks");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::create_dir_all(&hooks).expect("hooks");
    let (_, trusted) = signing_key(tmp.path());
    std::fs::copy(trusted.join("signing.pem"), keys.join("signing.pem")).expect("key");
    std::fs::create_dir_all(dir.join("state")).expect("state");
    let config = config_text(
        &dir,
        &pki,
        &format!(
            "[jobs]\ntrusted_keys_dir = \"{}\"\nhooks_dir = \"{}\"\n",
            keys.display(),
            hooks.display()
        ),
    );
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, &config).expect("config");
    let check = || {
        let out = run(Command::new(agent_bin())
            .args(["check-config", "--config"])
            .arg(&cfg));
        (out.status.code(), text(&out))
    };
    let (code, t) = check();
    assert_eq!(code, Some(0), "{t}");
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    let cases: [(&Path, u32, u32); 3] = [
        (&cfg, 0o666, 0o644),
        (&keys, 0o777, 0o755),
        (&hooks, 0o775, 0o755),
    ];
    for (path, loose, good) in cases {
        mode(path, loose);
        let (code, t) = check();
        assert_eq!(code, Some(2), "{t}");
        assert!(
            t.contains(&path.display().to_string()) && t.contains("writable"),
            "{t}"
        );
        mode(path, good);
    }
    let state = dir.join("state");
    mode(&state, 0o777);
    let (code, t) = check();
    assert!(code == Some(2) && t.contains("state"), "{t}");
    mode(&state, 0o700);
    // Owned by someone else: a key file, and the TLS key.
    let key_file = keys.join("signing.pem");
    nix::unistd::chown(&key_file, nobody, None).expect("chown");
    let (code, t) = check();
    assert!(
        code == Some(2) && t.contains("uid 65534") && t.contains("signing.pem"),
        "{t}"
    );
    nix::unistd::chown(&key_file, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    let tls_key = pki.path("agent.key");
    nix::unistd::chown(&tls_key, nobody, None).expect("chown");
    let (code, t) = check();
    assert!(
        code == Some(2) && t.contains("agent.key") && t.contains("owned by uid 65534"),
        "{t}"
    );
    // The agent itself refuses to start, naming it.
    let (mut child, _n, log, _c) = Agent::spawn(&dir, &config, &[]);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(2));
    assert!(
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("agent.key")
    );
    nix::unistd::chown(&tls_key, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    assert_eq!(check().0, Some(0));
}

#[test]
fn extreme_timestamps_are_refused_and_random_jobs_never_panic_admission() {
    let f = fixture("extreme", "apt", &[]);
    let agent = f.start("apt");
    let forge = Forge {
        key: SigningKey::read(&f.key()).expect("key"),
    };
    let ts = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .as_secs() as i64;
    type Edit = Box<dyn Fn(&mut pb::Job)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "max",
            Box::new(move |j| j.expires_at = ts(i64::MAX)),
            "expires_at",
        ),
        (
            "neg",
            Box::new(move |j| j.expires_at = ts(-1)),
            "expires_at",
        ),
        (
            "y10k",
            Box::new(move |j| j.expires_at = ts(253_402_300_800)),
            "expires_at",
        ),
        (
            "nb-min",
            Box::new(move |j| j.not_before = ts(i64::MIN)),
            "not_before",
        ),
        (
            "win",
            Box::new(move |j| {
                j.window = Some(pb::MaintenanceWindow {
                    start: ts(now),
                    end: ts(i64::MAX),
                    allow_partial: false,
                })
            }),
            "window end",
        ),
        (
            "dur",
            Box::new(|j| {
                j.max_duration = Some(prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 999_999_999,
                })
            }),
            "max_duration",
        ),
    ];
    for (id, edit, field) in &cases {
        let mut j = forge.job(&format!("extreme-{id}"));
        edit(&mut j);
        expect_code(
            &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
            "InvalidArgument",
            field,
        );
    }
    let out = agent.grpcurl_unix(&["patchagent.v1.Agent/GetStatus"]);
    assert!(out.status.success(), "the agent died: {}", agent.log_text());
    // The property run: decoding and validation of random jobs never panic.
    // Some of them are admitted, so the accepting paths run too, not only the refusals.
    let (ran, admitted) = jobgen::admission_never_panics(3000);
    assert_eq!(ran, 3000);
    assert!(
        admitted >= 30,
        "only {admitted} of {ran} random jobs were admitted"
    );
    eprintln!("{admitted} of {ran} random jobs admitted");
}

/// An `openssl s_server` that speaks TLS 1.2 only, with the test PKI; returns it and its port.
fn tls12_server(pki: &Pki, log: &Path) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let child = Command::new("openssl")
        .args(["s_server", "-tls1_2", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(pki.path("agent.pem"))
        .arg("-key")
        .arg(pki.path("agent.key"))
        .arg("-CAfile")
        .arg(pki.path("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(log).expect("log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

#[test]
fn patchctl_and_the_reporter_refuse_tls12() {
    let (tmp, pki) = setup("tls12");
    let (mut server, port) = tls12_server(&pki, &tmp.path().join("s_server.log"));
    let out = run(Command::new(patchctl())
        .args(["status", "--agent", &format!("127.0.0.1:{port}")])
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("controller.pem"))
        .arg("--key")
        .arg(pki.path("controller.key"))
        .args(["--server-name", "localhost"]));
    let t = text(&out);
    assert!(
        !out.status.success(),
        "patchctl spoke to a TLS 1.2 server: {t}"
    );
    assert!(t.contains("TLS 1.3"), "{t}");
    // The agent's reporter, pointed at the same server, never completes a handshake.
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &format!(
            "{}[report]\ncontroller = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\nretry_initial = \"200ms\"\nretry_max = \"500ms\"\n",
            config_text(&dir, &pki, "")
        ),
    );
    agent.wait_log("cannot connect", 1);
    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(tmp.path().join("s_server.log")).unwrap_or_default();
    assert!(
        !log.contains("CIPHER is"),
        "a client completed a TLS 1.2 handshake: {log}"
    );
}

#[test]
fn max_duration_kills_hook_process_groups_but_never_the_package_manager() {
    let f = fixture("maxdur", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let pidfile = f.tmp.path().join("hook-child.pid");
    f.hook(
        "stall",
        &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()),
        0o755,
    );
    let agent = f.start("apt");
    // A pre-hook that never ends: TIMED_OUT at max_duration, and its whole group is gone.
    let started = Instant::now();
    let s = f.run_job(
        &agent,
        "stalled-hook",
        &[
            "--upgrade",
            "all",
            "--pre-hook",
            "stall",
            "--max-duration",
            "3s",
        ],
    );
    assert_eq!(state(&s), "JOB_STATE_TIMED_OUT", "{s:#}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("pre-hook stall"),
        "{s:#}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    // Gone, or a zombie waiting for init to reap it (killed, not yet collected).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(), "the hook's child {pid} survived");
    assert!(
        f.dpkg_versions().contains("alpha=1.0"),
        "the timed-out job applied packages"
    );
    // dpkg running slow's 4-second postinst outlives a 2-second max_duration: the job waits for
    // it, then records TIMED_OUT with the outcome read afterwards.
    let s = f.run_job(
        &agent,
        "slow-dpkg",
        &["--install", "slow=1.1", "--max-duration", "2s"],
    );
    assert_eq!(state(&s), "JOB_STATE_TIMED_OUT", "{s:#}");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("left to finish"),
        "{s:#}"
    );
    assert_eq!(
        outcome(&s, "slow").map(|o| o["toVersion"].clone()),
        Some(Value::from("1.1")),
        "{s:#}"
    );
    assert!(f.dpkg_versions().contains("slow=1.1"));
    f.assert_dpkg_consistent();
}

#[test]
fn a_chatty_package_is_recorded_in_batches_and_its_history_bounded() {
    let f = fixture("chatty", "apt", &["extras"]);
    let agent = f.start("apt");
    let s = f.run_job(&agent, "chatty", &["--install", "chatty"]);
    assert!(state(&s).starts_with("JOB_STATE_SUCCEEDED"), "{s:#}");
    let h = history(&agent, "chatty");
    assert!(h.contains("chatty: configuring step 1"), "{h}");
    assert!(h.contains("more output lines not kept"), "{h}");
    assert!(f.dpkg_versions().contains("chatty=1.0"));
    // The journal on disk has the whole kept history and the final state.
    let journal = f.tmp.path().join("agent/state/jobs/chatty.json");
    let j: Value = serde_json::from_slice(&std::fs::read(journal).expect("journal")).expect("json");
    assert!(j["state"].as_str().unwrap_or("").starts_with("SUCCEEDED"));
    assert!(j["events"].as_array().map_or(0, Vec::len) > 500);
}

#[test]
fn proto_comments_served_by_reflection_never_call_an_accepted_field_unsupported() {
    let (tmp, pki) = setup("protodoc");
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, ""));
    let out = agent.grpcurl_unix(&["list"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut symbols: Vec<String> = vec![
        "patchagent.v1.Agent".into(),
        "patchagent.v1.Controller".into(),
    ];
    // Every message of the contract, from the proto files.
    for file in ["agent", "controller", "jobs", "packages"] {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("proto/patchagent/v1/{file}.proto"));
        for line in std::fs::read_to_string(p).expect("proto").lines() {
            if let Some(rest) = line
                .strip_prefix("message ")
                .or_else(|| line.strip_prefix("enum "))
            {
                symbols.push(format!(
                    "patchagent.v1.{}",
                    rest.split_whitespace().next().unwrap_or("")
                ));
            }
        }
    }
    let mut described = String::new();
    for sym in &symbols {
        let out = agent.grpcurl_unix(&["describe", sym]);
        if sym == "patchagent.v1.Controller" && !out.status.success() {
            continue; // the agent does not serve the controller's service
        }
        assert!(out.status.success(), "describe {sym}: {}", text(&out));
        described.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    // Comments reach admins through reflection...
    assert!(
        described.contains("IF_REQUIRED reboots only then"),
        "{described}"
    );
    assert!(described.contains("allow_repo_errors"));
    // ...and none says a field is unsupported or not there yet: every field is accepted today.
    let lower = described.to_lowercase();
    for phrase in ["not supported", "not yet", "unsupported", "coming soon"] {
        assert!(
            !lower.contains(phrase),
            "a proto comment says {phrase:?}:\n{described}"
        );
    }
}
