//! Package intelligence against the real tools: real dpkg/apt and real dnf/rpm on sandboxed roots
//! and local repositories that the tests build (tests/fixtures/*.sh), queried with the real
//! grpcurl through the real agent.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn fixture(script: &str, dir: &Path, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let out = run(Command::new("bash").arg(path).arg(dir).args(args));
    assert!(out.status.success(), "{script} failed: {}", text(&out));
}

fn apt_sandbox(tmp: &Path) -> PathBuf {
    let s = tmp.join("apt");
    fixture("apt-sandbox.sh", &s, &[]);
    s
}

fn apt_packages(s: &Path, extra: &str) -> String {
    format!(
        "[packages]\nmanager = \"apt\"\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n{extra}",
        s = s.display()
    )
}

fn dnf_sandbox(tmp: &Path, args: &[&str]) -> PathBuf {
    let s = tmp.join("dnf");
    fixture("dnf-sandbox.sh", &s, args);
    s
}

fn dnf_packages(s: &Path, extra: &str) -> String {
    format!(
        "[packages]\nmanager = \"dnf\"\nrpm_root = \"{s}/root\"\ndnf_args = [\"-c\", \"{s}/dnf.conf\", \"--installroot={s}/root\", \"--releasever=1\", \"--setopt=reposdir={s}/repos.d\", \"--setopt=cachedir={s}/cache\"]\n{extra}",
        s = s.display()
    )
}

/// Calls an RPC over the local socket with default values emitted; returns the JSON documents
/// (one per streamed message).
fn call(agent: &Agent, method: &str, data: &str) -> Vec<Value> {
    let out = agent.grpcurl_unix(&["-emit-defaults", "-max-time", "120", "-d", data, method]);
    assert!(
        out.status.success(),
        "{method}: {}\nagent log:\n{}",
        text(&out),
        agent.log_text()
    );
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|v| v.expect("JSON"))
        .collect()
}

fn one(agent: &Agent, method: &str, data: &str) -> Value {
    call(agent, method, data).remove(0)
}

/// Waits for the start-up scan to finish.
fn wait_for_scan(agent: &Agent) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = one(agent, "patchagent.v1.Agent/GetStatus", "{}");
        if s["packages"]["lastScanAt"].is_string() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no scan finished: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .expect(key)
        .iter()
        .map(|u| u["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn apt_inventory_pending_security_held_and_reboot_required() {
    let (tmp, pki) = setup("apt");
    let s = apt_sandbox(tmp.path());
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &apt_packages(&s, "")));
    let status = wait_for_scan(&agent);

    // Inventory: the agent's own parser against dpkg-query on the same database.
    let pkgs = call(&agent, "patchagent.v1.Agent/ListPackages", "{}");
    let mut ours: Vec<String> = pkgs
        .iter()
        .map(|p| {
            format!(
                "{} {} {}",
                p["name"].as_str().unwrap_or(""),
                p["fullVersion"].as_str().unwrap_or(""),
                p["architecture"].as_str().unwrap_or("")
            )
        })
        .collect();
    let dq = run(Command::new("dpkg-query")
        .arg(format!("--admindir={}/root/var/lib/dpkg", s.display()))
        .args(["-W", "-f", "${Package} ${Version} ${Architecture}\\n"]));
    let mut theirs: Vec<String> = String::from_utf8_lossy(&dq.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 5);
    let gamma = pkgs.iter().find(|p| p["name"] == "gamma").expect("gamma");
    assert_eq!(gamma["held"], true);
    assert_eq!(gamma["source"], "gamma-src");
    assert_eq!(gamma["state"], "installed");
    let only = call(
        &agent,
        "patchagent.v1.Agent/ListPackages",
        r#"{"name_prefix":"ga"}"#,
    );
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["name"], "gamma");

    // Pending updates: alpha and slow from the normal suite, beta from the security suite;
    // gamma held.
    let list = one(&agent, "patchagent.v1.Agent/ListUpdates", "{}");
    assert_eq!(list["manager"], "apt");
    assert_eq!(names(&list, "updates"), ["alpha", "beta", "slow"]);
    let alpha = update(&list, "alpha");
    assert_eq!(
        (
            alpha["installedVersion"].as_str(),
            alpha["candidateVersion"].as_str()
        ),
        (Some("1.0"), Some("1.1"))
    );
    assert_eq!(alpha["classification"], "CLASSIFICATION_OTHER");
    assert_eq!(alpha["slaClass"], "SLA_CLASS_LOW");
    assert_eq!(alpha["origin"], "Test:bookworm");
    let beta = update(&list, "beta");
    assert_eq!(beta["candidateVersion"], "1.2");
    assert_eq!(beta["classification"], "CLASSIFICATION_SECURITY");
    assert_eq!(beta["severity"], "SEVERITY_UNKNOWN");
    assert_eq!(beta["slaClass"], "SLA_CLASS_HIGH");
    assert_eq!(beta["origin"], "Debian-Security:bookworm-security");
    let held = &list["held"][0];
    assert_eq!(
        (held["name"].as_str(), held["reason"].as_str()),
        (Some("gamma"), Some("dpkg hold"))
    );
    assert_eq!(
        (
            held["installedVersion"].as_str(),
            held["candidateVersion"].as_str()
        ),
        (Some("1.0"), Some("2.0"))
    );
    assert_eq!(list["repoErrors"].as_array().map(Vec::len), Some(0));
    assert_eq!(list["scanErrors"].as_array().map(Vec::len), Some(0));

    // GetStatus: counts per SLA class, reboot-required with the file and its .pkgs as evidence.
    let p = &status["packages"];
    assert_eq!(
        (
            p["installed"].as_u64(),
            p["pendingHigh"].as_u64(),
            p["pendingLow"].as_u64()
        ),
        (Some(5), Some(1), Some(2))
    );
    assert_eq!(
        (p["pendingCritical"].as_u64(), p["pendingMedium"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        (p["pendingSecurity"].as_u64(), p["held"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(p["metadataRefreshedAt"].is_string());
    let r = &status["reboot"];
    assert_eq!(r["required"], true);
    assert_eq!(r["method"], "reboot-required file");
    assert_eq!(r["evidence"][1], "requested by: kernelish");

    // The flag goes away: the next scan says so.
    std::fs::remove_file(s.join("root/run/reboot-required")).expect("rm");
    one(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let r = one(&agent, "patchagent.v1.Agent/GetStatus", "{}");
    assert_eq!(r["reboot"]["required"], false);
    assert!(
        r["reboot"]["evidence"][0]
            .as_str()
            .unwrap_or("")
            .ends_with("is absent")
    );
}

#[test]
fn apt_unreachable_repository_is_reported_and_the_rest_still_scanned() {
    let (tmp, pki) = setup("aptbroken");
    let s = apt_sandbox(tmp.path());
    let sources = s.join("root/etc/apt/sources.list");
    let mut text = std::fs::read_to_string(&sources).expect("sources");
    text.push_str("deb [trusted=yes] file:/nonexistent/patch-agent-repo ./\n");
    std::fs::write(&sources, text).expect("sources");
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &config_text(&dir, &pki, &apt_packages(&s, "scan_on_start = false\n")),
    );
    let list = one(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let errors = list["repoErrors"].as_array().expect("repoErrors");
    assert_eq!(errors.len(), 1, "{list:#}");
    assert!(
        errors[0]["repo"]
            .as_str()
            .unwrap_or("")
            .contains("/nonexistent/patch-agent-repo"),
        "{list:#}"
    );
    assert!(!errors[0]["error"].as_str().unwrap_or("").is_empty());
    assert_eq!(names(&list, "updates"), ["alpha", "beta", "slow"]);
    let status = one(&agent, "patchagent.v1.Agent/GetStatus", "{}");
    assert_eq!(status["packages"]["repoErrors"], 1);
}

#[test]
fn apt_scan_waits_for_a_held_dpkg_lock_then_fails_naming_the_pid() {
    let (tmp, pki) = setup("aptlock");
    let s = apt_sandbox(tmp.path());
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &config_text(
            &dir,
            &pki,
            &apt_packages(&s, "scan_on_start = false\nlock_timeout = \"1500ms\"\n"),
        ),
    );
    let lock = s.join("root/var/lib/dpkg/lock-frontend");
    let mut holder = hold_lock(&lock);

    let started = Instant::now();
    let list = one(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let waited = started.elapsed();
    let errors: Vec<&str> = list["scanErrors"]
        .as_array()
        .expect("scanErrors")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pid = holder.id();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&format!("held by pid {pid}")) && e.contains("lock-frontend")),
        "{errors:?}"
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "did not wait: {waited:?}"
    );
    assert_eq!(
        list["updates"].as_array().map(Vec::len),
        Some(0),
        "nothing scanned under the lock"
    );

    let _ = holder.kill();
    let _ = holder.wait();
    let list = one(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    assert_eq!(
        list["scanErrors"].as_array().map(Vec::len),
        Some(0),
        "{list:#}"
    );
    assert_eq!(names(&list, "updates"), ["alpha", "beta", "slow"]);
}

#[test]
fn dnf_classification_severity_advisories_and_cves() {
    let (tmp, pki) = setup("dnf");
    let s = dnf_sandbox(tmp.path(), &[]);
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &dnf_packages(&s, "")));
    let status = wait_for_scan(&agent);

    let pkgs = call(&agent, "patchagent.v1.Agent/ListPackages", "{}");
    let ours: Vec<String> = pkgs.iter().map(nevra).collect();
    assert_eq!(
        ours,
        rpm_qa(&s.join("root")),
        "inventory sorted by name and equal to rpm -qa"
    );
    assert_eq!(ours.len(), 6);

    let list = one(&agent, "patchagent.v1.Agent/ListUpdates", "{}");
    assert_eq!(list["manager"], "dnf");
    let expect = [
        (
            "crit",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_CRITICAL",
            "SLA_CLASS_CRITICAL",
            "TEST-2026-0001",
            vec!["CVE-2026-0001", "CVE-2026-0002"],
            "2026-01-01T00:00:00Z",
        ),
        (
            "imp",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_IMPORTANT",
            "SLA_CLASS_HIGH",
            "TEST-2026-0002",
            vec!["CVE-2026-0003"],
            "2026-02-01T00:00:00Z",
        ),
        (
            "mod",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_MODERATE",
            "SLA_CLASS_MEDIUM",
            "TEST-2026-0003",
            vec!["CVE-2026-0004"],
            "2026-03-01T00:00:00Z",
        ),
        (
            "low",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_LOW",
            "SLA_CLASS_LOW",
            "TEST-2026-0004",
            vec!["CVE-2026-0005"],
            "2026-04-01T00:00:00Z",
        ),
        (
            "bug",
            "CLASSIFICATION_BUGFIX",
            "SEVERITY_UNKNOWN",
            "SLA_CLASS_LOW",
            "TEST-2026-0005",
            vec![],
            "2026-05-01T00:00:00Z",
        ),
    ];
    for (name, class, sev, sla, adv, cves, issued) in expect {
        let u = update(&list, name);
        assert_eq!(u["classification"], class, "{name}");
        assert_eq!(u["severity"], sev, "{name}");
        assert_eq!(u["slaClass"], sla, "{name}");
        assert_eq!(u["advisoryIds"], serde_json::json!([adv]), "{name}");
        assert_eq!(u["cveIds"], serde_json::json!(cves), "{name}");
        assert_eq!(u["issued"], issued, "{name}");
        assert_eq!(
            (
                u["installedVersion"].as_str(),
                u["candidateVersion"].as_str()
            ),
            (Some("1.0-1"), Some("1.1-1")),
            "{name}"
        );
        assert_eq!(u["origin"], "test");
    }
    let plain = update(&list, "plain");
    assert_eq!(
        (plain["classification"].as_str(), plain["slaClass"].as_str()),
        (Some("CLASSIFICATION_OTHER"), Some("SLA_CLASS_LOW"))
    );
    assert_eq!(plain["advisoryIds"], serde_json::json!([]));

    let p = &status["packages"];
    let counts = [
        "pendingCritical",
        "pendingHigh",
        "pendingMedium",
        "pendingLow",
        "pendingSecurity",
    ]
    .map(|k| p[k].as_u64().unwrap_or(99));
    assert_eq!(counts, [1, 1, 1, 3, 4]);
    assert_eq!(
        status["reboot"]["method"],
        "kernel and core package install times"
    );
    assert_eq!(status["reboot"]["required"], false);
}

#[test]
fn dnf_unreachable_repository_is_reported_and_the_rest_still_scanned() {
    let (tmp, pki) = setup("dnfbroken");
    let s = dnf_sandbox(tmp.path(), &[]);
    std::fs::write(
        s.join("repos.d/broken.repo"),
        "[broken]\nname=broken\nbaseurl=file:///nonexistent/patch-agent-repo\ngpgcheck=0\n",
    )
    .expect("repo");
    let dir = tmp.path().join("a");
    let agent = Agent::start(
        &dir,
        &config_text(&dir, &pki, &dnf_packages(&s, "scan_on_start = false\n")),
    );
    let list = one(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let errors = list["repoErrors"].as_array().expect("repoErrors");
    assert!(errors.iter().any(|e| e["repo"] == "broken"), "{list:#}");
    assert!(errors.iter().all(|e| e["repo"] != "test"), "{list:#}");
    assert_eq!(
        list["updates"].as_array().map(Vec::len),
        Some(6),
        "{list:#}"
    );
}

#[test]
fn dnf_reboot_required_when_a_core_package_was_installed_after_boot() {
    let (tmp, pki) = setup("dnfreboot");
    let s = dnf_sandbox(tmp.path(), &["with-glibc"]);
    let dir = tmp.path().join("a");
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &dnf_packages(&s, "")));
    let status = wait_for_scan(&agent);
    let r = &status["reboot"];
    assert_eq!(r["required"], true, "{r:#}");
    assert_eq!(r["method"], "kernel and core package install times");
    let evidence: Vec<&str> = r["evidence"]
        .as_array()
        .expect("evidence")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        evidence
            .iter()
            .any(|e| e.starts_with("glibc-2.99-1.noarch installed at")
                && e.contains("after boot at")),
        "{evidence:?}"
    );
}
