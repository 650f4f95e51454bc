//! The zypper backend against the real zypper: a sandboxed root (`zypper --root`) with an
//! os-release of SLES 15 SP6 and a local rpm-md repository carrying patches
//! (tests/fixtures/zypper-sandbox.sh), driven through the real agent, patchctl and grpcurl.
//! Every job's effect is read back with `rpm -q` on the root, not taken from the agent.

mod common;

use common::jobs::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn list_updates(agent: &Agent, refresh: bool) -> Value {
    let out = grpc(
        agent,
        "patchagent.v1.Agent/ListUpdates",
        &format!(r#"{{"refresh":{refresh}}}"#),
    );
    assert!(out.status.success(), "ListUpdates: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn status(agent: &Agent) -> Value {
    let out = grpc(agent, "patchagent.v1.Agent/GetStatus", "{}");
    assert!(out.status.success(), "GetStatus: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The real zypper on the sandbox. The agent may be running zypper itself (a scan after a
/// job): wait for its lock rather than fail at once.
fn zypper(root: &Path) -> Command {
    let mut c = Command::new("zypper");
    c.env("ZYPP_LOCK_TIMEOUT", "60")
        .arg("--root")
        .arg(root)
        .args(["--non-interactive", "--no-color"]);
    c
}

/// The packages zypper's own `patch --category security` would upgrade (a dry run).
fn zypper_security_patch_set(root: &Path) -> Vec<String> {
    let out = run(zypper(root).args([
        "--no-refresh",
        "patch",
        "--category",
        "security",
        "--with-interactive",
        "--dry-run",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    lines
        .find(|l| l.contains("going to be upgraded"))
        .unwrap_or_else(|| panic!("zypper patch --dry-run: {}", common::text(&out)));
    let mut names: Vec<String> = lines
        .take_while(|l| l.starts_with(' '))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn planned(status: &Value) -> Vec<String> {
    let mut names: Vec<String> = status["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect();
    names.sort();
    names
}

/// The reason of a job that must have failed.
fn failure(s: &Value) -> &str {
    assert_eq!(s["state"], "JOB_STATE_FAILED", "{s:#}");
    s["reason"].as_str().unwrap_or_default()
}

/// A real zypper holding the zypp lock: `zypper shell` takes it and waits on its stdin.
fn hold_zypp_lock(root: &Path) -> Child {
    let child = zypper(root)
        .arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("zypper shell");
    let pid_file = root.join("run/zypp.pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&pid_file)
        .unwrap_or_default()
        .trim()
        != child.id().to_string()
    {
        assert!(
            Instant::now() < deadline,
            "zypper shell never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn scan_reports_patches_with_category_severity_cves_and_sla_and_the_inventory_is_rpm_qa() {
    let f = fixture("zyscan", "zypper", &[]);
    let root = f.sandbox.join("root");
    let agent = f.start("zypper");
    let list = list_updates(&agent, true);
    assert_eq!(list["manager"], "zypper");
    assert_eq!(list["repoErrors"], serde_json::json!([]), "{list:#}");
    // (name, category, classification, severity, SLA, patch, CVEs, bugs, issued)
    let expect = [
        (
            "crit",
            "security",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_CRITICAL",
            "SLA_CLASS_CRITICAL",
            "SUSE-2026-1",
            vec!["CVE-2026-0001", "CVE-2026-0002"],
            vec!["1001"],
            "2026-01-01T00:00:00Z",
        ),
        (
            "imp",
            "security",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_IMPORTANT",
            "SLA_CLASS_HIGH",
            "SUSE-2026-2",
            vec!["CVE-2026-0003"],
            vec![],
            "2026-02-01T00:00:00Z",
        ),
        (
            "mod",
            "security",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_MODERATE",
            "SLA_CLASS_MEDIUM",
            "SUSE-2026-3",
            vec!["CVE-2026-0004"],
            vec![],
            "2026-03-01T00:00:00Z",
        ),
        (
            "bug",
            "recommended",
            "CLASSIFICATION_BUGFIX",
            "SEVERITY_UNKNOWN",
            "SLA_CLASS_LOW",
            "SUSE-2026-4",
            vec![],
            vec!["1004"],
            "2026-04-01T00:00:00Z",
        ),
        (
            "notice",
            "security",
            "CLASSIFICATION_SECURITY",
            "SEVERITY_LOW",
            "SLA_CLASS_LOW",
            "SUSE-2026-6",
            vec![],
            vec![],
            "2026-04-01T00:00:00Z",
        ),
    ];
    for (name, category, class, sev, sla, patch, cves, bugs, issued) in expect {
        let u = update(&list, name);
        assert_eq!(u["category"], category, "{name}");
        assert_eq!(u["classification"], class, "{name}");
        assert_eq!(u["severity"], sev, "{name}");
        assert_eq!(u["slaClass"], sla, "{name}");
        assert_eq!(u["advisoryIds"], serde_json::json!([patch]), "{name}");
        assert_eq!(u["cveIds"], serde_json::json!(cves), "{name}");
        assert_eq!(u["bugIds"], serde_json::json!(bugs), "{name}");
        assert_eq!(u["issued"], issued, "{name}");
        assert_eq!(u["origin"], "test", "{name}");
        assert_eq!(
            (
                u["installedVersion"].as_str(),
                u["candidateVersion"].as_str()
            ),
            (Some("1.0-1"), Some("1.1-1")),
            "{name}"
        );
    }
    // The update-stack patch and the interactive one are reported as such.
    let stack = update(&list, "stack");
    assert_eq!(stack["updateStack"], true, "{stack:#}");
    assert_eq!(stack["classification"], "CLASSIFICATION_BUGFIX");
    let notice = update(&list, "notice");
    assert_eq!(
        (&notice["interactive"], &notice["rebootSuggested"]),
        (&Value::Bool(true), &Value::Bool(true)),
        "{notice:#}"
    );
    assert_eq!(update(&list, "crit")["interactive"], false);
    // A plain update, and packages in no patch.
    for name in ["plain", "broken", "lic"] {
        let u = update(&list, name);
        assert_eq!(u["classification"], "CLASSIFICATION_OTHER", "{name}");
        assert_eq!(u["slaClass"], "SLA_CLASS_LOW", "{name}");
        assert_eq!(u["advisoryIds"], serde_json::json!([]), "{name}");
    }
    assert_eq!(
        list["updates"].as_array().map(Vec::len),
        Some(9),
        "{list:#}"
    );

    // The inventory is rpm -qa of the root.
    let pkgs = grpc(&agent, "patchagent.v1.Agent/ListPackages", "{}");
    assert!(pkgs.status.success(), "{}", text(&pkgs));
    let ours: Vec<String> = serde_json::Deserializer::from_slice(&pkgs.stdout)
        .into_iter::<Value>()
        .map(|p| nevra(&p.expect("json")))
        .collect();
    assert_eq!(ours, rpm_qa(&root), "sorted by name and equal to rpm -qa");
    assert_eq!(ours.len(), 10);

    // A patch published later (the repository's metadata rebuilt) is seen on the next
    // refresh: the patch view kept between scans follows the metadata.
    let list = list_updates(&agent, false);
    assert_eq!(update(&list, "plain")["advisoryIds"], serde_json::json!([]));
    let info = f.sandbox.join("updateinfo.xml");
    let xml = std::fs::read_to_string(&info).expect("updateinfo");
    let late = r#"<update from="m@example.com" status="stable" type="security" version="1"><id>SUSE-2026-9</id><title>plain</title><severity>important</severity><issued date="1780000000"/><references><reference href="h" id="CVE-2026-0009" type="cve" title="c"/></references><description>late</description><pkglist><collection><package name="plain" version="1.1" release="1" epoch="0" arch="noarch"><filename>plain-1.1-1.noarch.rpm</filename></package></collection></pkglist></update></updates>"#;
    std::fs::write(&info, xml.replace("</updates>", late)).expect("write");
    // Published as a repository is: its metadata generated afresh.
    std::thread::sleep(Duration::from_millis(1100));
    let repo = f.sandbox.join("repo");
    std::fs::remove_dir_all(repo.join("repodata")).expect("rm repodata");
    let out = run(Command::new("createrepo_c").arg("-q").arg(&repo));
    assert!(out.status.success(), "{}", text(&out));
    for (kind, file) in [
        ("updateinfo", "updateinfo.xml"),
        ("susedata", "susedata.xml"),
    ] {
        let out = run(Command::new("modifyrepo_c")
            .arg(format!("--mdtype={kind}"))
            .arg(f.sandbox.join(file))
            .arg(repo.join("repodata")));
        assert!(out.status.success(), "{}", text(&out));
    }
    let list = list_updates(&agent, true);
    let plain = update(&list, "plain");
    assert_eq!(
        plain["advisoryIds"],
        serde_json::json!(["SUSE-2026-9"]),
        "{plain:#}"
    );
    assert_eq!(plain["slaClass"], "SLA_CLASS_HIGH");
    assert_eq!(plain["cveIds"], serde_json::json!(["CVE-2026-0009"]));

    // Reboot: zypper needs-rebooting says no, then yes once zypper's flag is there.
    let s = status(&agent);
    assert_eq!(s["reboot"]["method"], "zypper needs-rebooting", "{s:#}");
    assert_eq!(s["reboot"]["required"], false, "{s:#}");
    assert_eq!(s["packages"]["pendingSecurity"], 5, "{s:#}");
    std::fs::write(root.join("run/reboot-needed"), "reboot\n").expect("flag");
    list_updates(&agent, true);
    let r = &status(&agent)["reboot"];
    assert_eq!(r["required"], true, "{r:#}");
    let evidence = r["evidence"].to_string();
    assert!(
        evidence.contains("Reboot is required") && evidence.contains("reboot-needed exists"),
        "{r:#}"
    );
}

#[test]
fn jobs_security_only_severity_approval_exclude_install_dry_run_scriptlets_and_licences() {
    let f = fixture("zyjobs", "zypper", &[]);
    let root = f.sandbox.join("root");
    let agent = f.start("zypper");
    let all_old = "broken=1.0 bug=1.0 crit=1.0 imp=1.0 lic=1.0 mod=1.0 notice=1.0 plain=1.0 shell=1.0 stack=1.0";
    assert_eq!(f.rpm_versions(), all_old);

    // Patches were issued months ago: ten years of approval delay leaves everything alone.
    let s = f.run_job(
        &agent,
        "zy-approve",
        &["--upgrade", "all", "--approve-after-days", "3650"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(0), "{s:#}");

    // A security-only dry run plans exactly what zypper's own `patch --category security`
    // would upgrade, and changes nothing.
    let s = f.run_job(&agent, "zy-dry", &["--upgrade", "security", "--dry-run"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(planned(&s), ["crit", "imp", "mod", "notice"]);
    assert_eq!(planned(&s), zypper_security_patch_set(&root));
    assert!(
        history(&agent, "zy-dry").contains("zypper --dry-run accepted 4 of 4 operation(s)"),
        "{}",
        history(&agent, "zy-dry")
    );
    // zypper's own dry run refuses what applying would refuse: a licence nobody agreed to, a
    // version no repository has.
    let s = f.run_job(
        &agent,
        "zy-dry-refused",
        &["--install", "lic", "--install", "crit=9.9-1", "--dry-run"],
    );
    let reason = failure(&s);
    assert!(
        reason.contains("lic: ")
            && reason.contains("licence")
            && reason.contains("crit: not found"),
        "{reason}"
    );
    assert_eq!(f.rpm_versions(), all_old);

    let s = f.run_job(&agent, "zy-crit", &["--min-severity", "critical"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        f.rpm_versions(),
        "broken=1.0 bug=1.0 crit=1.1 imp=1.0 lic=1.0 mod=1.0 notice=1.0 plain=1.0 shell=1.0 stack=1.0"
    );

    // Security only, one excluded: only security packages move. `notice`'s patch suggests a
    // reboot, so the job ends needing one and zypper's flag says so.
    let s = f.run_job(
        &agent,
        "zy-sec",
        &["--upgrade", "security", "--exclude", "mod"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED_REBOOT_REQUIRED", "{s:#}");
    assert_eq!(
        f.rpm_versions(),
        "broken=1.0 bug=1.0 crit=1.1 imp=1.1 lic=1.0 mod=1.0 notice=1.1 plain=1.0 shell=1.0 stack=1.0"
    );
    assert!(root.join("run/reboot-needed").exists());
    let nr = run(zypper(&root).arg("needs-rebooting"));
    assert_eq!(nr.status.code(), Some(102), "{}", text(&nr));
    std::fs::remove_file(root.join("run/reboot-needed")).expect("rm flag");

    // An exact version.
    let s = f.run_job(&agent, "zy-inst", &["--install", "plain=1.1-1"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        outcome(&s, "plain").expect("plain")["toVersion"],
        "1.1-1",
        "{s:#}"
    );

    // Everything else but the two troublemakers; the update stack goes first.
    let s = f.run_job(
        &agent,
        "zy-all",
        &[
            "--upgrade",
            "all",
            "--exclude",
            "broken",
            "--exclude",
            "lic",
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        f.rpm_versions(),
        "broken=1.0 bug=1.1 crit=1.1 imp=1.1 lic=1.0 mod=1.1 notice=1.1 plain=1.1 shell=1.0 stack=1.1"
    );
    let h = history(&agent, "zy-all");
    let first =
        ["stack", "bug", "mod"].map(|p| h.find(&format!("applying {p}")).unwrap_or(usize::MAX));
    assert!(first[0] < first[1] && first[0] < first[2], "{h}");

    // A %post that fails fails the job and is named.
    let s = f.run_job(&agent, "zy-broken", &["--install", "broken"]);
    let reason = failure(&s);
    assert!(
        reason.contains("broken-1.1-1.noarch %post failed, exit status 1")
            && reason.contains("exit 107"),
        "{reason}"
    );

    // A licence is never agreed on the operator's behalf...
    let s = f.run_job(&agent, "zy-lic", &["--upgrade", "all"]);
    let reason = failure(&s);
    assert!(
        reason.contains("lic") && reason.contains("--accept-licenses"),
        "{reason}"
    );
    assert!(f.rpm_versions().contains("lic=1.0"));
    // ...and is when the signed job says so.
    let s = f.run_job(
        &agent,
        "zy-lic-ok",
        &["--upgrade", "all", "--accept-licenses"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert!(
        s["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("licences accepted")
    );
    assert!(f.rpm_versions().contains("lic=1.1"));
}

#[test]
fn an_unreachable_repository_fails_the_job_unless_allowed_and_a_held_zypp_lock_is_waited_for_then_named()
 {
    let f = fixture("zyrepo", "zypper", &["unreachable"]);
    let root = f.sandbox.join("root");
    let dir = f.tmp.path().join("agent");
    let agent = Agent::start(&dir, &f.config("zypper", "lock_timeout = \"3s\"\n"));

    // The scan reports the repository and still reads the rest.
    let list = list_updates(&agent, true);
    let errors = list["repoErrors"].as_array().expect("repoErrors");
    assert_eq!(errors.len(), 1, "{list:#}\n{}", agent.log_text());
    assert_eq!(errors[0]["repo"], "gone");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("nonexistent"),
        "{list:#}"
    );
    assert_eq!(list["updates"].as_array().map(Vec::len), Some(9));

    let s = f.run_job(&agent, "zy-norepo", &["--install", "crit"]);
    let reason = failure(&s);
    assert!(
        reason.contains("gone") && reason.contains("--allow-repo-errors"),
        "{reason}"
    );
    assert!(f.rpm_versions().contains("crit=1.0"));
    let s = f.run_job(
        &agent,
        "zy-allowed",
        &["--install", "crit", "--allow-repo-errors"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert!(f.rpm_versions().contains("crit=1.1"));

    // A zypper holding the lock longer than lock_timeout: the job fails naming its pid.
    let mut holder = hold_zypp_lock(&root);
    let s = f.run_job(
        &agent,
        "zy-locked",
        &["--install", "imp", "--allow-repo-errors"],
    );
    let reason = failure(&s);
    assert!(
        reason.contains(&format!("pid {} (zypper)", holder.id())) && reason.contains("zypp.pid"),
        "{reason}"
    );
    assert!(f.rpm_versions().contains("imp=1.0"));

    // One that lets go within lock_timeout: the job waits for it, then runs.
    let file = f.sign("zy-waits", &["--install", "imp", "--allow-repo-errors"]);
    let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent
        .log_text()
        .contains("Waiting for package manager lock")
    {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holder.stdin.take());
    let _ = holder.wait();
    let s = wait_state(&agent, "zy-waits", "JOB_STATE_SUCCEEDED");
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert!(f.rpm_versions().contains("imp=1.1"));
}

#[test]
fn auto_chooses_zypper_on_an_sles_os_release_in_a_mount_namespace() {
    let f = fixture("zyauto", "zypper", &[]);
    let dir = f.tmp.path().join("agent");
    let config = f
        .config("zypper", "")
        .replacen("manager = \"zypper\"", "manager = \"auto\"", 1);
    assert!(config.contains("manager = \"auto\""));
    // /etc/os-release is a link to /usr/lib/os-release on Debian: both read SLES 15 SP6 in the
    // agent's own mount namespace, and nowhere else.
    let script = format!(
        "mount --bind {os} /usr/lib/os-release && exec \"$0\" \"$@\"",
        os = f.sandbox.join("root/etc/os-release").display()
    );
    let agent = Agent::start_wrapped(
        &dir,
        &config,
        &[],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(
        agent.log_text().contains("manager=\"zypper\""),
        "{}",
        agent.log_text()
    );
    let s = status(&agent);
    assert!(
        s.to_string()
            .contains("SUSE Linux Enterprise Server 15 SP6"),
        "{s:#}"
    );
    let list = list_updates(&agent, true);
    assert_eq!(list["manager"], "zypper");
    assert_eq!(update(&list, "crit")["slaClass"], "SLA_CLASS_CRITICAL");
    // The host's own os-release is untouched.
    let host = std::fs::read_to_string("/usr/lib/os-release").expect("os-release");
    assert!(!host.contains("SLES"), "{host}");
}
