//! Packaging, proven with the real tools: the .deb through lintian and a real boot (a Debian
//! rootfs made with debootstrap, booted with `systemd-nspawn -b`, systemd as PID 1, the
//! package installed, restarted, upgraded, upgraded again by a signed job of its own, purged);
//! the .rpm through rpm and rpmlint and a scratch-root install whose scriptlets run.
//!
//! The packages come from `packaging/build.sh` (built here when missing): the version in
//! Cargo.toml, and two newer builds (PATCH_AGENT_VERSION) for the upgrades. The rootfs is
//! cached in /var/tmp between runs on one machine; CI makes it from nothing.

mod common;

use common::container::*;
use common::net::{ca_hash, create_token, enrolling_controller};
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn mode_of(listing: &str, path: &str) -> Option<String> {
    listing
        .lines()
        .find(|l| l.ends_with(&format!(".{path}")) || l.ends_with(&format!(".{path}/")))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
}

#[test]
fn deb_has_the_files_modes_conffile_and_scripts_and_lintian_finds_no_error() {
    let deb = deb(V1);
    let size = std::fs::metadata(&deb).expect("deb").len();
    assert!(
        size <= 6 * 1024 * 1024,
        "{} is {size} bytes (> 6 MiB)",
        deb.display()
    );
    let out = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let list = text(&out);
    for (path, mode) in [
        ("/usr/bin/patch-agent", "-rwxr-xr-x"),
        ("/usr/bin/patchctl", "-rwxr-xr-x"),
        ("/lib/systemd/system/patch-agent.service", "-rw-r--r--"),
        ("/etc/patch-agent/agent.toml", "-rw-r--r--"),
        ("/etc/patch-agent/tls/README", "-rw-r--r--"),
        ("/etc/patch-agent/trusted-keys/README", "-rw-r--r--"),
        ("/etc/patch-agent/hooks.d/README", "-rw-r--r--"),
        ("/usr/share/doc/patch-agent/README.md", "-rw-r--r--"),
        (
            "/usr/share/doc/patch-agent/changelog.Debian.gz",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/patch-agent/copyright", "-rw-r--r--"),
    ] {
        assert_eq!(
            mode_of(&list, path).as_deref(),
            Some(mode),
            "{path} in {list}"
        );
    }
    let info = text(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)));
    assert!(
        info.contains("Depends:") && info.contains("init-system-helpers"),
        "{info}"
    );
    let version = text(&run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Version")));
    assert_eq!(version.trim(), V1);
    let ctl = tempfile::tempdir().expect("tmp");
    let out = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    assert!(out.status.success(), "{}", text(&out));
    let conf = std::fs::read_to_string(ctl.path().join("conffiles")).expect("conffiles");
    assert!(
        conf.lines().any(|l| l == "/etc/patch-agent/agent.toml"),
        "{conf}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let meta = std::fs::metadata(ctl.path().join(script)).expect(script);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{script}");
    }
    let lintian = run(Command::new("lintian")
        .args(["--no-tag-display-limit", "--display-info"])
        .arg(&deb));
    let report = text(&lintian);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    eprintln!("lintian:\n{report}");
}

#[test]
fn rpm_has_the_files_modes_and_scriptlets_and_installs_into_a_scratch_root() {
    let rpm = rpm_file(V1);
    let size = std::fs::metadata(&rpm).expect("rpm").len();
    assert!(
        size <= 7 * 1024 * 1024,
        "{} is {size} bytes (> 7 MiB)",
        rpm.display()
    );
    let q = |args: &[&str]| {
        let out = run(Command::new("rpm").args(args).arg(&rpm));
        assert!(out.status.success(), "rpm {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let files = q(&["-qpl"]);
    for f in [
        "/usr/bin/patch-agent",
        "/usr/bin/patchctl",
        "/usr/lib/systemd/system/patch-agent.service",
        "/etc/patch-agent/agent.toml",
        "/etc/patch-agent/tls/README",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not in {files}");
    }
    // --dump: path size mtime digest mode owner group isconfig isdoc rdev symlink
    let dump = q(&["-qp", "--dump"]);
    let mode = |path: &str| {
        dump.lines()
            .find(|l| l.starts_with(&format!("{path} ")))
            .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
    };
    assert_eq!(mode("/usr/bin/patch-agent").as_deref(), Some("0100755"));
    assert_eq!(
        mode("/etc/patch-agent/agent.toml").as_deref(),
        Some("0100644")
    );
    assert_eq!(
        mode("/usr/lib/systemd/system/patch-agent.service").as_deref(),
        Some("0100644")
    );
    assert!(
        q(&["-qpc"])
            .lines()
            .any(|l| l == "/etc/patch-agent/agent.toml")
    );
    let scripts = q(&["-qp", "--scripts"]);
    for want in [
        "postinstall scriptlet",
        "systemctl --no-reload enable patch-agent.service",
        "patch-agent check-config",
        "preuninstall scriptlet",
        "systemctl --no-reload disable --now patch-agent.service",
        "postuninstall scriptlet",
        "systemctl try-restart patch-agent.service",
    ] {
        assert!(scripts.contains(want), "{want:?} not in:\n{scripts}");
    }
    let requires = q(&["-qpR"]);
    assert!(
        requires.lines().any(|l| l.starts_with("systemd")),
        "{requires}"
    );

    // rpmlint, with the exceptions in packaging/rpmlint.toml (each justified there).
    let lint = run(Command::new("rpmlint")
        .arg("-c")
        .arg(root().join("packaging/rpmlint.toml"))
        .arg(&rpm));
    assert!(lint.status.success(), "rpmlint:\n{}", text(&lint));
    eprintln!("rpmlint:\n{}", text(&lint));

    // A scratch root with a shell and systemctl (the Debian rootfs), so the scriptlets run.
    let tmp = tempfile::Builder::new()
        .prefix("pa-rpm-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let scratch = tmp.path().join("root");
    rootfs(&scratch);
    // %post enrolls from the environment: a controller outside, reached from the chroot.
    let pki = Pki::new(tmp.path(), "pki");
    let ctl = enrolling_controller(tmp.path(), &pki, "127.0.0.1:0", None, None, &[]);
    let db = tmp.path().join("controller.db");
    let token = create_token(&db, &[]);
    let pin = ca_hash(&pki.path("ca.pem"));
    let out = run(Command::new("rpm")
        .arg("--root")
        .arg(&scratch)
        .args(["--dbpath", "/var/lib/rpm", "-i", "--nodeps"])
        .arg(&rpm)
        .env("PATCH_AGENT_CONTROLLER", &ctl.addr)
        .env("PATCH_AGENT_TOKEN", &token)
        .env("PATCH_AGENT_CA_HASH", &pin)
        .env("PATCH_AGENT_HOST_ID", "rpm-scratch"));
    assert!(out.status.success(), "rpm -i: {}", text(&out));
    assert!(
        !text(&out).contains("scriptlet failed"),
        "scriptlets ran cleanly: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("enrolled as rpm-scratch"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(&token));
    assert!(scratch.join("etc/patch-agent/enrolled.toml").exists());
    assert!(scratch.join("etc/patch-agent/tls/agent.pem").exists());
    let hosts = text(&run(Command::new(patchctl())
        .args(["hosts", "list", "--json", "--db"])
        .arg(&db)));
    assert!(hosts.contains("\"rpm-scratch\""), "{hosts}");
    use std::os::unix::fs::PermissionsExt;
    for d in [
        "etc/patch-agent/tls",
        "etc/patch-agent/trusted-keys",
        "etc/patch-agent/hooks.d",
        "var/lib/patch-agent",
    ] {
        let m = std::fs::metadata(scratch.join(d))
            .expect(d)
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o700, "{d}");
    }
    let m = std::fs::metadata(scratch.join("etc/patch-agent/tls/agent.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(m & 0o777, 0o600, "the enrolled key");
    let m = std::fs::metadata(scratch.join("usr/bin/patch-agent"))
        .expect("bin")
        .permissions()
        .mode();
    assert_eq!(m & 0o777, 0o755);
    let wants = scratch.join("etc/systemd/system/multi-user.target.wants/patch-agent.service");
    assert!(wants.symlink_metadata().is_ok(), "%post enabled the unit");
    // A modified config survives an erase as .rpmsave; the unit is disabled; state is kept.
    std::fs::write(
        scratch.join("etc/patch-agent/agent.toml"),
        "[agent]\nhost_id = \"x\"\n",
    )
    .expect("edit");
    let out = run(Command::new("rpm").arg("--root").arg(&scratch).args([
        "--dbpath",
        "/var/lib/rpm",
        "-e",
        "patch-agent",
    ]));
    assert!(out.status.success(), "rpm -e: {}", text(&out));
    assert!(!scratch.join("usr/bin/patch-agent").exists());
    assert!(
        wants.symlink_metadata().is_err(),
        "%preun disabled the unit"
    );
    assert!(scratch.join("etc/patch-agent/agent.toml.rpmsave").exists());
    assert!(scratch.join("var/lib/patch-agent").exists());
}

#[test]
fn deb_in_a_booted_systemd_installs_restarts_upgrades_itself_by_a_signed_job_and_purges_clean() {
    let (v1, v2, v3) = (deb(V1), deb(V2), deb(V3));
    let tmp = tempfile::Builder::new()
        .prefix("pa-boot-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let fs = tmp.path().join("root");
    rootfs(&fs);
    // Hermetic apt: only a local repository, where the newer package will be.
    std::fs::create_dir_all(fs.join("srv/repo")).expect("repo");
    std::fs::write(
        fs.join("etc/apt/sources.list"),
        "deb [trusted=yes] file:/srv/repo ./\n",
    )
    .expect("sources");
    let name = format!("pa-boot-{}", std::process::id());
    let c = Container::boot(&fs, &name);
    let before = c.files();

    // 1. Install without certificates: enabled, not started, and told what is missing.
    let said = c.install(&v1);
    assert!(
        said.contains("not (re)started: the configuration check failed")
            && said.contains("/etc/patch-agent/tls/ca.pem"),
        "{said}"
    );
    assert_eq!(c.sh_ok("systemctl is-enabled patch-agent"), "enabled");
    assert_ne!(
        String::from_utf8_lossy(&c.sh("systemctl is-active patch-agent").stdout).trim(),
        "active"
    );
    let ls = c.sh_ok("stat -c '%a %n' /etc/patch-agent/tls /etc/patch-agent/trusted-keys /etc/patch-agent/hooks.d /var/lib/patch-agent");
    assert!(ls.lines().all(|l| l.starts_with("700 ")), "{ls}");

    // 2. Enroll: certificates and a trusted key, made outside with patchctl; start.
    let (_pki, key) = enroll(&fs, tmp.path(), Some("boot-test"));
    c.sh_ok("patch-agent check-config");
    c.sh_ok("systemctl start patch-agent");
    assert_eq!(c.sh_ok("systemctl is-active patch-agent"), "active");
    c.wait_serving();
    assert_eq!(c.status()["agentVersion"], V1);
    assert_eq!(c.status()["hostId"], "boot-test");
    let verify = c.sh("systemd-analyze verify /lib/systemd/system/patch-agent.service 2>&1");
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );

    // 3. systemctl restart keeps it healthy (a new process).
    let pid = c.main_pid();
    c.sh_ok("systemctl restart patch-agent");
    c.wait_serving();
    assert_ne!(c.main_pid(), pid);

    // 4. An upgrade with dpkg restarts it into the new version.
    let pid = c.main_pid();
    c.install(&v2);
    c.wait_serving();
    assert_ne!(c.main_pid(), pid);
    assert_eq!(c.status()["agentVersion"], V2);

    // 5. A signed job upgrades the agent's own package from the local repository: systemd
    // restarts the agent mid-job, dpkg finishes, the new agent records the result.
    std::fs::copy(&v3, fs.join("srv/repo").join(v3.file_name().expect("name"))).expect("copy");
    let scan = run(Command::new("sh")
        .arg("-c")
        .arg("dpkg-scanpackages -m . /dev/null > Packages")
        .current_dir(fs.join("srv/repo")));
    assert!(scan.status.success(), "{}", text(&scan));
    c.sh_ok("apt-get update -qq 2>&1");
    let job = tmp.path().join("self.job");
    let out = run(Command::new(patchctl())
        .args(["job", "sign", "--signing-key"])
        .arg(&key)
        .arg("-o")
        .arg(&job)
        .args([
            "--id",
            "self-upgrade",
            "--target",
            "boot-test",
            "--install",
            &format!("patch-agent={V3}"),
        ]));
    assert!(out.status.success(), "{}", text(&out));
    let agent = format!("unix:{}", c.socket().display());
    let out = run(Command::new(patchctl())
        .args(["submit", "--agent", &agent])
        .arg(&job));
    assert!(out.status.success(), "submit: {}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        let out = c.grpc_with("patchagent.v1.Agent/GetJob", r#"{"job_id":"self-upgrade"}"#);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            let state = v["state"].as_str().unwrap_or_default().to_string();
            if state.ends_with("SUCCEEDED")
                || state.ends_with("FAILED")
                || state.ends_with("INTERRUPTED")
                || state.ends_with("TIMED_OUT")
            {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the self-upgrade did not end: {}\n{}",
            text(&out),
            text(&c.sh("journalctl -u patch-agent --no-pager | tail -60"))
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        status["state"],
        "JOB_STATE_SUCCEEDED",
        "{status:#}\n{}",
        text(&c.sh("journalctl -u patch-agent --no-pager | tail -80"))
    );
    assert_eq!(c.sh_ok("dpkg --audit"), "", "dpkg is consistent");
    assert_eq!(
        c.sh_ok("dpkg-query -W -f '${Version} ${Status}' patch-agent"),
        format!("{V3} install ok installed")
    );
    c.wait_serving();
    assert_eq!(c.status()["agentVersion"], V3);
    let history = text(&run(
        Command::new(patchctl()).args(["jobs", "--agent", &agent, "--json"])
    ));
    assert!(history.contains("self-upgrade"), "{history}");

    // 6. Purge: stopped, and nothing of it left behind.
    c.sh_ok("dpkg --purge patch-agent 2>&1");
    assert_ne!(
        String::from_utf8_lossy(&c.sh("systemctl is-active patch-agent").stdout).trim(),
        "active"
    );
    let after = c.files();
    let left: Vec<&String> = after.difference(&before).collect();
    assert!(left.is_empty(), "left behind after purge: {left:#?}");
    let traces = c.sh(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /var/lib/dpkg -o -path /var/log -o -path /srv -o -path /tmp -o -path /var/tmp -o -path /var/cache \\) -prune -o -name '*patch-agent*' -print",
    );
    assert_eq!(
        String::from_utf8_lossy(&traces.stdout).trim(),
        "",
        "no patch-agent file remains"
    );
}

/// The .deb enrolls while it installs: with the PATCH_AGENT_* variables and a bad token it
/// installs, does not start, and prints the reason and the command; with the variables in
/// /etc/patch-agent/enroll.env (as an image would carry them) it enrolls, starts, and the
/// controller lists the host. The token ends up in no file and no log.
#[test]
fn deb_enrolls_during_install_and_a_bad_token_leaves_it_installed_but_stopped() {
    let v1 = deb(V1);
    let tmp = tempfile::Builder::new()
        .prefix("pa-enroll-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    // The controller runs outside; the container shares the host's network.
    let pki = Pki::new(tmp.path(), "pki");
    let (_key, published) = signing_key(tmp.path());
    let ctl = enrolling_controller(tmp.path(), &pki, "127.0.0.1:0", None, Some(&published), &[]);
    let db = tmp.path().join("controller.db");
    let token = create_token(&db, &["--labels", "environment=image"]);
    let pin = ca_hash(&pki.path("ca.pem"));

    let fs = tmp.path().join("root");
    rootfs(&fs);
    // An image's own agent.toml (kept over the package's with --force-confold): the container
    // shares the host's network, so listen on a free loopback port.
    let conf = std::fs::read_to_string(root().join("packaging/agent.toml"))
        .expect("conf")
        .replacen("listen = \"0.0.0.0:7443\"", "listen = \"127.0.0.1:0\"", 1);
    std::fs::create_dir_all(fs.join("etc/patch-agent")).expect("etc");
    std::fs::write(fs.join("etc/patch-agent/agent.toml"), conf).expect("conf");
    let name = format!("pa-enr-{}", std::process::id());
    let c = Container::boot(&fs, &name);
    let deb_name = v1.file_name().expect("name").to_string_lossy().to_string();
    std::fs::copy(&v1, fs.join("var/tmp").join(&deb_name)).expect("copy deb");

    // 1. A token the controller does not know, in the environment.
    let bad = "0123456789abcdef.0123456789abcdef0123456789abcdef";
    let out = c.sh(&format!(
        "PATCH_AGENT_CONTROLLER={} PATCH_AGENT_TOKEN={bad} PATCH_AGENT_CA_HASH={pin} PATCH_AGENT_HOST_ID=boxed-1 \
         dpkg -i --force-confold /var/tmp/{deb_name} 2>&1",
        ctl.addr
    ));
    let said = text(&out);
    assert!(out.status.success(), "the package installs anyway: {said}");
    assert!(
        said.contains("enrolment failed") && said.contains("unknown"),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "PATCH_AGENT_TOKEN=<token> patch-agent enroll --controller {} --ca-hash {pin} --host-id boxed-1",
            ctl.addr
        )),
        "the exact command is printed: {said}"
    );
    assert!(!said.contains(bad), "the token is not printed: {said}");
    assert_ne!(
        String::from_utf8_lossy(&c.sh("systemctl is-active patch-agent").stdout).trim(),
        "active"
    );
    assert!(!fs.join("etc/patch-agent/enrolled.toml").exists());
    assert_eq!(
        c.sh_ok("dpkg-query -W -f '${Status}' patch-agent"),
        "install ok installed"
    );

    // 2. Removed, then installed again with the variables in enroll.env (0600).
    c.sh_ok("dpkg -r patch-agent 2>&1");
    let env = fs.join("etc/patch-agent/enroll.env");
    std::fs::write(
        &env,
        format!(
            "# first-boot enrolment\nPATCH_AGENT_CONTROLLER={}\nPATCH_AGENT_TOKEN=\"{token}\"\nPATCH_AGENT_CA_HASH={pin}\nPATCH_AGENT_HOST_ID=boxed-1\n",
            ctl.addr
        ),
    )
    .expect("env");
    std::fs::set_permissions(&env, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let out = c.sh(&format!("dpkg -i --force-confold /var/tmp/{deb_name} 2>&1"));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("enrolled as boxed-1"), "{said}");
    assert!(!said.contains(&token), "the token is not printed: {said}");
    assert!(!env.exists(), "enroll.env is removed once used");
    assert_eq!(c.sh_ok("systemctl is-active patch-agent"), "active");
    c.wait_serving();
    let status = c.status();
    assert_eq!(status["hostId"], "boxed-1", "{status}");
    assert_eq!(status["certificate"]["enrolled"], true, "{status}");
    assert_eq!(status["certificate"]["state"], "valid", "{status}");
    // The controller lists it, heard from, with the token's labels.
    let deadline = Instant::now() + Duration::from_secs(30);
    let host = loop {
        let out = run(Command::new(patchctl())
            .args(["hosts", "list", "--json", "--db"])
            .arg(&db));
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(h) = rows
            .into_iter()
            .find(|h| h["host_id"] == "boxed-1" && !h["last_seen"].is_null())
        {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "boxed-1 never reported: {}\n{}",
            ctl.log_text(),
            text(&c.sh("journalctl -u patch-agent --no-pager | tail -40"))
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(host["labels"]["environment"], "image", "{host}");
    // The token is in no file and no log of the host.
    for t in [bad, token.as_str()] {
        let found = c.sh(&format!(
            "grep -rls '{t}' /etc /var/lib/patch-agent /var/log /run /tmp /root 2>/dev/null; journalctl --no-pager | grep -c '{t}'"
        ));
        let found = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert_eq!(found, "0", "the token was found: {found}");
    }
    let key_mode = c.sh_ok("stat -c %a /etc/patch-agent/tls/agent.key");
    assert_eq!(key_mode, "600");
}
