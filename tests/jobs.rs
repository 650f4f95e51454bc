//! Signed jobs, end to end: real keys (patchctl and stock openssl), the real patchctl and
//! grpcurl, real apt/dpkg and dnf/rpm sandboxes, real signals.

mod common;

use common::jobs::*;
use common::*;
use nix::sys::signal::Signal;
use patch_agent_wire::job::trust::SigningKey;
use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

#[test]
fn apt_jobs_upgrade_security_exclude_install_dry_run_scan_and_approval() {
    let f = fixture("aptjobs", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let agent = f.start("apt");
    let before = f.dpkg_versions();

    // Dry run: a plan, nothing changed.
    let s = f.run_job(&agent, "dry-1", &["--upgrade", "all", "--dry-run"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        outcome(&s, "alpha").expect("alpha")["outcome"],
        "would change (dry run)"
    );
    assert_eq!(
        outcome(&s, "alpha").expect("alpha")["result"],
        "PACKAGE_OUTCOME_WOULD_CHANGE"
    );
    assert_eq!(f.dpkg_versions(), before);

    // Approval delay: every update was first seen today, so nothing is old enough.
    let s = f.run_job(
        &agent,
        "approve-1",
        &["--upgrade", "all", "--approve-after-days", "1"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(0), "{s:#}");
    assert_eq!(f.dpkg_versions(), before);

    // Security only: beta (security suite) moves, alpha and slow (normal suite) stay.
    let s = f.run_job(&agent, "sec-1", &["--upgrade", "security"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    let beta = outcome(&s, "beta").expect("beta");
    assert_eq!(
        (
            beta["fromVersion"].as_str(),
            beta["toVersion"].as_str(),
            beta["outcome"].as_str(),
            beta["result"].as_str()
        ),
        (
            Some("1.0"),
            Some("1.2"),
            Some("changed"),
            Some("PACKAGE_OUTCOME_CHANGED")
        )
    );
    assert!(outcome(&s, "alpha").is_none());
    assert!(f.dpkg_versions().contains("alpha=1.0") && f.dpkg_versions().contains("beta=1.2"));

    // Minimum severity: with no security update left, nothing qualifies.
    let s = f.run_job(&agent, "sev-1", &["--min-severity", "important"]);
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(0), "{s:#}");

    // Excludes by name and by /regex/: nothing of alpha or slow is touched.
    let s = f.run_job(
        &agent,
        "excl-1",
        &[
            "--upgrade",
            "all",
            "--exclude",
            "alpha",
            "--exclude",
            "/^sl.w$/",
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(0), "{s:#}");
    assert!(f.dpkg_versions().contains("alpha=1.0") && f.dpkg_versions().contains("slow=1.0"));

    // Install one package at an exact version.
    let s = f.run_job(&agent, "inst-1", &["--install", "alpha=1.1"]);
    assert_eq!(
        outcome(&s, "alpha").expect("alpha")["toVersion"],
        "1.1",
        "{s:#}"
    );
    assert!(f.dpkg_versions().contains("alpha=1.1"));

    // A scan job, and a job that leaves the host needing a reboot under policy NEVER.
    let s = f.run_job(&agent, "scan-1", &["--scan"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED");
    std::fs::write(
        f.sandbox.join("root/run/reboot-required"),
        "*** System restart required ***\n",
    )
    .expect("flag");
    let s = f.run_job(&agent, "slow-1", &["--upgrade", "all"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED_REBOOT_REQUIRED", "{s:#}");
    assert!(f.dpkg_versions().contains("slow=1.1"));

    // The history and the list.
    let out = f.patchctl(&agent, &["jobs", "--json"]);
    let jobs: Value = serde_json::from_slice(&out.stdout).expect("jobs json");
    assert_eq!(jobs[0]["job_id"], "slow-1");
    assert_eq!(jobs.as_array().map(Vec::len), Some(8));
    f.assert_dpkg_consistent();
}

/// Builds and signs envelopes by hand, for inputs patchctl refuses to make.

#[test]
fn hostile_envelopes_are_refused_with_the_right_code_and_nothing_runs() {
    let f = fixture("hostile", "apt", &[]);
    let mut agent = f.start("apt");
    let forge = Forge {
        key: SigningKey::read(&f.key()).expect("key"),
    };
    let before = f.dpkg_versions();
    let pwned = f.tmp.path().join("pwned");
    let mut refusals = 0;

    // Bad signature.
    let mut env = forge.seal(forge.job("badsig").encode_to_vec());
    env.signature[0] ^= 1;
    expect_code(
        &submit(&agent, &f.pki, "controller", &env),
        "Unauthenticated",
        "does not verify",
    );
    refusals += 1;
    // A key the agent does not trust.
    let other = f.tmp.path().join("other");
    let out = run(Command::new(patchctl()).args(["keys", "new"]).arg(&other));
    assert!(out.status.success());
    let stranger = Forge {
        key: SigningKey::read(&other.join("signing.key")).expect("key"),
    };
    let env = stranger.seal(stranger.job("untrusted").encode_to_vec());
    expect_code(
        &submit(&agent, &f.pki, "controller", &env),
        "Unauthenticated",
        "not in the trust store",
    );
    refusals += 1;
    // Times.
    let now = SystemTime::now();
    let mut j = forge.job("expired");
    j.expires_at = Some((now - Duration::from_secs(3600)).into());
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "FailedPrecondition",
        "expired",
    );
    let mut j = forge.job("future");
    j.not_before = Some((now + Duration::from_secs(7200)).into());
    j.expires_at = Some((now + Duration::from_secs(9000)).into());
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "FailedPrecondition",
        "not valid before",
    );
    let mut j = forge.job("toolong");
    j.expires_at = Some((now + Duration::from_secs(48 * 3600)).into());
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "FailedPrecondition",
        "max_job_lifetime",
    );
    refusals += 3;
    // Another host.
    let mut j = forge.job("elsewhere");
    j.targets = vec!["web99".into()];
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "PermissionDenied",
        "not this host",
    );
    refusals += 1;
    // 65 KiB envelope.
    let mut j = forge.job("huge");
    j.targets.push("x".repeat(65 * 1024));
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
        "InvalidArgument",
        "the limit is 65536",
    );
    refusals += 1;
    // Truncated payload and trailing bytes, each properly signed: the decoder refuses them.
    let full = forge.job("cut").encode_to_vec();
    expect_code(
        &submit(
            &agent,
            &f.pki,
            "controller",
            &forge.seal(full[..full.len() - 3].to_vec()),
        ),
        "InvalidArgument",
        "not a valid Job",
    );
    let mut trailing = forge.job("trail").encode_to_vec();
    trailing.extend_from_slice(&[0xa8, 0x06, 0x01]);
    expect_code(
        &submit(&agent, &f.pki, "controller", &forge.seal(trailing)),
        "InvalidArgument",
        "unknown field 101",
    );
    // A signature over a truncated copy does not verify.
    let mut env = forge.seal(full.clone());
    env.payload.truncate(full.len() - 3);
    expect_code(
        &submit(&agent, &f.pki, "controller", &env),
        "Unauthenticated",
        "does not verify",
    );
    refusals += 3;
    // Hostile package names.
    for (i, name) in [
        format!("-oAPT::Update::Pre-Invoke::=touch {}", pwned.display()),
        "foo;id".into(),
        "$(id)".into(),
        "a b".into(),
    ]
    .iter()
    .enumerate()
    {
        let mut j = forge.job(&format!("name{i}"));
        j.action = Some(pb::job::Action::Install(pb::InstallAction {
            packages: vec![pb::PackageSpec {
                name: name.clone(),
                version: String::new(),
            }],
        }));
        expect_code(
            &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
            "InvalidArgument",
            "install.packages[0].name",
        );
        refusals += 1;
    }
    // A viewer may not submit (the auth layer refuses before admission; not counted there).
    let env = forge.seal(forge.job("viewer").encode_to_vec());
    expect_code(
        &submit(&agent, &f.pki, "viewer", &env),
        "PermissionDenied",
        "controller role",
    );

    // Nothing ran.
    assert_eq!(f.dpkg_versions(), before);
    assert!(!pwned.exists());
    let status: Value =
        serde_json::from_slice(&grpc(&agent, "patchagent.v1.Agent/GetStatus", "{}").stdout)
            .expect("status");
    let rejected: Option<u64> = status["jobs"]["rejected"]
        .as_str()
        .and_then(|s| s.parse().ok());
    assert_eq!(rejected, Some(refusals), "{status:#}");
    assert!(agent.log_text().contains("Rejected job"));

    // A job signed by stock openssl (raw Ed25519 over the context and payload) is accepted.
    let okey = f.tmp.path().join("openssl.key");
    let ok = |c: &mut Command| assert!(c.status().expect("openssl").success());
    ok(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&okey));
    ok(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&okey)
        .arg("-out")
        .arg(f.trusted.join("openssl.pem")));
    agent.signal(Signal::SIGHUP);
    agent.wait_log("trusted_keys=2", 1);
    let osigner = SigningKey::read(&okey).expect("openssl key");
    let mut j = forge.job("openssl-1");
    j.dry_run = true;
    let payload = j.encode_to_vec();
    let msg = f.tmp.path().join("msg.bin");
    let mut data = b"patchagent-job-v1\0".to_vec();
    data.extend_from_slice(&payload);
    std::fs::write(&msg, data).expect("msg");
    let sig = f.tmp.path().join("msg.sig");
    ok(Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(&okey)
        .arg("-in")
        .arg(&msg)
        .arg("-out")
        .arg(&sig));
    let env = pb::SignedJob {
        payload,
        key_id: osigner.key_id(),
        signature: std::fs::read(&sig).expect("sig"),
    };
    let out = submit(&agent, &f.pki, "controller", &env);
    assert!(
        out.status.success(),
        "openssl-signed job refused: {}",
        text(&out)
    );

    // Remove that key and SIGHUP: it no longer verifies.
    std::fs::remove_file(f.trusted.join("openssl.pem")).expect("rm");
    agent.signal(Signal::SIGHUP);
    agent.wait_log("trusted_keys=1", 1);
    let mut j = forge.job("openssl-2");
    j.dry_run = true;
    let payload = j.encode_to_vec();
    let mut data = b"patchagent-job-v1\0".to_vec();
    data.extend_from_slice(&payload);
    std::fs::write(&msg, data).expect("msg");
    ok(Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(&okey)
        .arg("-in")
        .arg(&msg)
        .arg("-out")
        .arg(&sig));
    let env = pb::SignedJob {
        payload,
        key_id: osigner.key_id(),
        signature: std::fs::read(&sig).expect("sig"),
    };
    expect_code(
        &submit(&agent, &f.pki, "controller", &env),
        "Unauthenticated",
        "not in the trust store",
    );

    // Replay: the same job id again, before and after a restart, returns the stored status.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_job(&agent, "openssl-1")["state"] == "JOB_STATE_QUEUED"
        || get_job(&agent, "openssl-1")["state"] == "JOB_STATE_APPLYING"
    {
        assert!(Instant::now() < deadline, "job did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let replay = forge.seal(forge.job("openssl-1").encode_to_vec());
    expect_code(
        &submit(&agent, &f.pki, "controller", &replay),
        "AlreadyExists",
        "stored status: Succeeded",
    );
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)), Some(0));
    let agent = f.start("apt");
    expect_code(
        &submit(&agent, &f.pki, "unix", &replay),
        "AlreadyExists",
        "stored status: Succeeded",
    );
    assert_eq!(f.dpkg_versions(), before);
}

#[test]
fn sigkill_during_applying_is_interrupted_after_restart_and_dpkg_is_consistent() {
    let f = fixture("sigkill", "apt", &[]);
    let mut agent = f.start("apt");
    // slow first: the kill lands while its postinst runs; alpha is never reached.
    let file = f.sign(
        "slow-kill",
        &["--install", "slow=1.1", "--install", "alpha=1.1"],
    );
    let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    let journal = agent.dir.join("state/jobs/slow-kill.json");
    wait_for_history(&journal, "applying slow");
    let history = std::fs::read_to_string(&journal).expect("journal");
    assert!(
        history.contains("\"state\":\"APPLYING\"") && history.contains("\"plan\":[{"),
        "APPLYING and the plan recorded before acting: {history}"
    );
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    drop(agent);

    // The package manager was not killed with the agent (its own process group); the new agent
    // waits for it, then reads what happened.
    let agent = f.start("apt");
    let s = wait_state(&agent, "slow-kill", "JOB_STATE_INTERRUPTED");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not every planned package was applied"),
        "{s:#}"
    );
    assert_eq!(
        outcome(&s, "slow").expect("slow")["outcome"],
        "changed",
        "{s:#}"
    );
    assert_eq!(
        outcome(&s, "alpha").expect("alpha")["outcome"],
        "unchanged",
        "{s:#}"
    );
    assert!(f.dpkg_versions().contains("slow=1.1") && f.dpkg_versions().contains("alpha=1.0"));
    f.assert_dpkg_consistent();
}

#[test]
fn sigterm_during_applying_lets_dpkg_finish_and_the_restarted_agent_completes_the_job() {
    let f = fixture("sigterm", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let mut agent = f.start("apt");
    // slow last: SIGTERM lands while its postinst sleeps; everything planned still completes.
    let file = f.sign(
        "term-1",
        &["--install", "alpha=1.1", "--install", "slow=1.1"],
    );
    assert!(
        f.patchctl(&agent, &["submit", file.to_str().expect("path")])
            .status
            .success()
    );
    wait_for_history(&agent.dir.join("state/jobs/term-1.json"), "applying slow");
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(Signal::SIGTERM);
    assert_eq!(
        agent.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        agent.log_text()
    );
    drop(agent);
    let agent = f.start("apt");
    let s = wait_state(&agent, "term-1", "JOB_STATE_SUCCEEDED");
    assert_eq!(
        outcome(&s, "slow").expect("slow")["toVersion"],
        "1.1",
        "{s:#}"
    );
    assert_eq!(
        outcome(&s, "alpha").expect("alpha")["toVersion"],
        "1.1",
        "{s:#}"
    );
    assert!(f.dpkg_versions().contains("slow=1.1") && f.dpkg_versions().contains("alpha=1.1"));
    let h = history(&agent, "term-1");
    assert!(h.contains("completed after an agent restart"), "{h}");
    f.assert_dpkg_consistent();
}

#[test]
fn corrupt_journal_is_quarantined_watchers_see_full_history_and_queued_jobs_cancel() {
    let f = fixture("journal", "apt", &[]);
    let state = f.tmp.path().join("agent/state/jobs");
    std::fs::create_dir_all(&state).expect("state");
    std::fs::write(
        state.join("torn.json"),
        b"{\"job_id\": \"torn\", \"state\": ",
    )
    .expect("corrupt");
    let agent = f.start("apt");
    assert!(
        agent
            .log_text()
            .contains("Quarantined a corrupt journal file"),
        "{}",
        agent.log_text()
    );
    assert!(!state.join("torn.json").exists());
    assert_eq!(
        std::fs::read_dir(f.tmp.path().join("agent/state/quarantine"))
            .expect("q")
            .count(),
        1
    );
    let out = grpc(&agent, "patchagent.v1.Agent/GetJob", r#"{"job_id":"torn"}"#);
    assert!(text(&out).contains("NotFound"), "{}", text(&out));

    // A slow job, a second queued behind it, cancelled while queued.
    let slow = f.sign("slow-watch", &["--upgrade", "all", "--exclude", "alpha"]);
    let second = f.sign("queued-2", &["--install", "alpha=1.1"]);
    for file in [&slow, &second] {
        let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let w1 = Command::new(patchctl())
        .args([
            "watch",
            "--agent",
            &format!("unix:{}", agent.socket.display()),
            "slow-watch",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch 1");
    let out = f.patchctl(&agent, &["cancel", "queued-2"]);
    assert!(text(&out).contains("CANCELLED"), "{}", text(&out));
    // The second watcher joins mid-job.
    wait_for_history(
        &agent.dir.join("state/jobs/slow-watch.json"),
        "applying slow",
    );
    let w2 = f.patchctl(&agent, &["watch", "slow-watch"]);
    let w1 = w1.wait_with_output().expect("watch 1");
    for out in [&w1, &w2] {
        let t = text(out);
        assert!(out.status.success(), "{t}");
        for needle in [
            "QUEUED: upgrade all",
            "APPLYING: upgrade all",
            "plan: beta 1.0 -> 1.2, slow 1.0 -> 1.1",
            "applying slow",
            "SUCCEEDED",
            "slow                                            1.0 -> 1.1",
        ] {
            assert!(
                t.contains(needle),
                "{needle:?} missing from watcher output:\n{t}"
            );
        }
        assert_eq!(
            t.matches("QUEUED: upgrade all").count(),
            1,
            "no duplicates: {t}"
        );
    }
    let q = get_job(&agent, "queued-2");
    assert_eq!(q["state"], "JOB_STATE_CANCELLED");
    assert!(q["startedAt"].is_null(), "never started: {q:#}");
    assert!(f.dpkg_versions().contains("alpha=1.0"));
}

#[test]
fn dnf_jobs_severity_security_exclude_install_and_approval() {
    let f = fixture("dnfjobs", "dnf", &[]);
    let agent = f.start("dnf");
    let vers = |f: &Fixture| f.rpm_versions();
    assert_eq!(
        vers(&f),
        "bug=1.0 crit=1.0 imp=1.0 low=1.0 mod=1.0 plain=1.0"
    );

    // Advisories are months old; ten years of approval delay leaves everything alone.
    let s = f.run_job(
        &agent,
        "dnf-approve",
        &["--upgrade", "all", "--approve-after-days", "3650"],
    );
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(0), "{s:#}");
    let s = f.run_job(&agent, "dnf-dry", &["--upgrade", "all", "--dry-run"]);
    assert_eq!(s["packages"].as_array().map(Vec::len), Some(6));
    assert_eq!(
        vers(&f),
        "bug=1.0 crit=1.0 imp=1.0 low=1.0 mod=1.0 plain=1.0"
    );

    let s = f.run_job(&agent, "dnf-crit", &["--min-severity", "critical"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        vers(&f),
        "bug=1.0 crit=1.1 imp=1.0 low=1.0 mod=1.0 plain=1.0"
    );
    let s = f.run_job(
        &agent,
        "dnf-sec",
        &["--upgrade", "security", "--exclude", "low"],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        vers(&f),
        "bug=1.0 crit=1.1 imp=1.1 low=1.0 mod=1.1 plain=1.0"
    );
    let s = f.run_job(
        &agent,
        "dnf-all",
        &["--upgrade", "all", "--exclude", "/^pl.*/"],
    );
    assert_eq!(outcome(&s, "bug").expect("bug")["toVersion"], "1.1-1");
    assert_eq!(
        vers(&f),
        "bug=1.1 crit=1.1 imp=1.1 low=1.1 mod=1.1 plain=1.0"
    );
    let s = f.run_job(&agent, "dnf-inst", &["--install", "plain=1.1-1"]);
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(
        vers(&f),
        "bug=1.1 crit=1.1 imp=1.1 low=1.1 mod=1.1 plain=1.1"
    );
}

#[test]
fn maintenance_windows_wait_run_and_miss() {
    let f = fixture("windows", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let agent = f.start("apt");
    let now = SystemTime::now();
    let h = Duration::from_secs(3600);
    let submit = |id: &str, flags: &[&str]| {
        let file = f.sign(id, flags);
        let out = f.patchctl(&agent, &["submit", file.to_str().expect("path")]);
        assert!(out.status.success(), "submit {id}: {}", text(&out));
    };

    // A window that has already closed, and one too short for the job's max_duration.
    let closed = format!("{}/{}", rfc3339(now - 2 * h), rfc3339(now - h));
    submit("win-closed", &["--scan", "--window", &closed]);
    let s = wait_state(&agent, "win-closed", "JOB_STATE_MISSED_WINDOW");
    assert!(
        s["reason"].as_str().unwrap_or("").contains("closed"),
        "{s:#}"
    );
    let short = format!(
        "{}/{}",
        rfc3339(now - Duration::from_secs(60)),
        rfc3339(now + Duration::from_secs(600))
    );
    submit(
        "win-short",
        &["--scan", "--window", &short, "--max-duration", "1h"],
    );
    let s = wait_state(&agent, "win-short", "JOB_STATE_MISSED_WINDOW");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("less than max_duration"),
        "{s:#}"
    );
    // The same window is fine when the job allows a partial window.
    submit(
        "win-partial",
        &[
            "--scan",
            "--window",
            &short,
            "--max-duration",
            "1h",
            "--window-allow-partial",
        ],
    );
    wait_state(&agent, "win-partial", "JOB_STATE_SUCCEEDED");

    // A window in the future: the job waits, then runs.
    let soon = format!(
        "{}/{}",
        rfc3339(SystemTime::now() + Duration::from_secs(6)),
        rfc3339(SystemTime::now() + Duration::from_secs(1800))
    );
    submit(
        "win-future",
        &[
            "--upgrade",
            "all",
            "--dry-run",
            "--window",
            &soon,
            "--max-duration",
            "10m",
        ],
    );
    wait_state(&agent, "win-future", "JOB_STATE_WAITING_WINDOW");
    let s = wait_state(&agent, "win-future", "JOB_STATE_SUCCEEDED");
    let history =
        std::fs::read_to_string(agent.dir.join("state/jobs/win-future.json")).expect("journal");
    assert!(
        history.contains("WAITING_WINDOW: the maintenance window opens at"),
        "{history}"
    );
    assert!(outcome(&s, "alpha").is_some(), "{s:#}");

    // A window that closes while the job waits in the queue behind a slow one.
    submit("slow-first", &["--upgrade", "all", "--exclude", "alpha"]);
    let brief = format!(
        "{}/{}",
        rfc3339(SystemTime::now() - Duration::from_secs(1)),
        rfc3339(SystemTime::now() + Duration::from_secs(2))
    );
    submit(
        "win-queued",
        &["--scan", "--window", &brief, "--window-allow-partial"],
    );
    wait_state(&agent, "slow-first", "JOB_STATE_SUCCEEDED");
    let s = wait_state(&agent, "win-queued", "JOB_STATE_MISSED_WINDOW");
    assert!(s["startedAt"].is_null(), "never started: {s:#}");
    let out = f.patchctl(&agent, &["watch", "win-queued"]);
    assert!(
        !out.status.success(),
        "watch fails for a missed window: {}",
        text(&out)
    );
}

#[test]
fn hooks_run_around_packages_and_bad_hooks_are_refused_at_admission() {
    let f = fixture("hooks", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let hook = |name: &str, body: &str, mode: u32| f.hook(name, body, mode);
    hook(
        "drain",
        "echo \"draining for $PATCH_AGENT_JOB_ID: $PATCH_AGENT_PACKAGES ($PATCH_AGENT_PHASE)\"",
        0o755,
    );
    hook(
        "enable",
        "echo \"re-enabled after $PATCH_AGENT_PHASE\"",
        0o755,
    );
    hook(
        "fail",
        "echo 'load balancer unreachable' >&2; exit 3",
        0o755,
    );
    hook("loose", "true", 0o777);
    let theirs = hook("theirs", "true", 0o755);
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let agent = f.start("apt");
    let before = f.dpkg_versions();

    // A failing pre-hook stops the job before any package changes.
    let s = f.run_job(
        &agent,
        "hook-fail",
        &[
            "--upgrade",
            "all",
            "--pre-hook",
            "fail",
            "--post-hook",
            "enable",
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_FAILED", "{s:#}");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("pre-hook fail failed") && reason.contains("load balancer unreachable"),
        "{reason}"
    );
    assert_eq!(f.dpkg_versions(), before);
    let history =
        std::fs::read_to_string(agent.dir.join("state/jobs/hook-fail.json")).expect("journal");
    assert!(
        history.contains("PRE_HOOK") && !history.contains("re-enabled"),
        "{history}"
    );

    // Hooks around a real change, with their environment and output in the history.
    let s = f.run_job(
        &agent,
        "hook-ok",
        &[
            "--install",
            "alpha=1.1",
            "--pre-hook",
            "drain",
            "--post-hook",
            "enable",
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert!(f.dpkg_versions().contains("alpha=1.1"));
    let history =
        std::fs::read_to_string(agent.dir.join("state/jobs/hook-ok.json")).expect("journal");
    for needle in [
        "draining for hook-ok: alpha (pre)",
        "APPLYING: pre-hooks succeeded",
        "POST_HOOK: packages applied",
        "re-enabled after post",
    ] {
        assert!(history.contains(needle), "{needle:?} missing: {history}");
    }

    // Refused at admission, nothing run: paths, a world-writable hook, one owned by another user.
    let forge = Forge {
        key: SigningKey::read(&f.key()).expect("key"),
    };
    for (i, (name, needle)) in [
        ("../x", "never a path"),
        ("/bin/sh", "never a path"),
        ("loose", "writable by group or others"),
        ("theirs", "owned by uid 65534"),
        ("missing", "cannot be read"),
    ]
    .iter()
    .enumerate()
    {
        let mut j = forge.job(&format!("badhook{i}"));
        j.pre_hooks = vec![name.to_string()];
        expect_code(
            &submit(&agent, &f.pki, "controller", &forge.seal(j.encode_to_vec())),
            "InvalidArgument",
            needle,
        );
    }
    // patchctl refuses to sign a path as a hook.
    let out = run(Command::new(patchctl())
        .args(["job", "sign", "--signing-key"])
        .arg(f.key())
        .args([
            "-o",
            "/dev/null",
            "--target",
            "test-host",
            "--scan",
            "--pre-hook",
            "../x",
        ]));
    assert!(
        out.status.code() == Some(2) && text(&out).contains("never a path"),
        "an invalid job template exits 2: {}",
        text(&out)
    );
}

/// A tiny HTTP server: 200 for /ok, 500 for anything else. Returns its port.
fn http_server() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let reply = if req.starts_with("GET /ok ") {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    port
}

#[test]
fn post_patch_checks_pass_or_fail_the_job_naming_the_check() {
    let f = fixture("checks", "apt", &[]);
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("no reboot flag");
    let agent = f.start("apt");
    let http = http_server();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let ok_url = format!("http://127.0.0.1:{http}/ok");
    let s = f.run_job(
        &agent,
        "check-ok",
        &[
            "--install",
            "alpha=1.1",
            "--check-port",
            &http.to_string(),
            "--check-url",
            &ok_url,
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    let history =
        std::fs::read_to_string(agent.dir.join("state/jobs/check-ok.json")).expect("journal");
    assert!(
        history.contains("VERIFYING: post-patch checks")
            && history.contains(&format!("check passed: {ok_url} answering 200")),
        "{history}"
    );

    let s = f.run_job(
        &agent,
        "check-port",
        &["--upgrade", "security", "--check-port", &closed.to_string()],
    );
    assert_eq!(s["state"], "JOB_STATE_FAILED", "{s:#}");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!(
            "post-patch check failed: tcp port {closed} accepting connections"
        )),
        "{reason}"
    );

    let bad_url = format!("http://127.0.0.1:{http}/bad");
    let s = f.run_job(
        &agent,
        "check-url",
        &["--install", "slow=1.1", "--check-url", &bad_url],
    );
    assert_eq!(s["state"], "JOB_STATE_FAILED", "{s:#}");
    let reason = s["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!("{bad_url} answering 200"))
            && reason.contains("500 Internal Server Error"),
        "{reason}"
    );
}

#[test]
fn reboots_are_recorded_verified_after_restart_and_happen_at_most_once() {
    let f = fixture("reboot", "apt", &[]);
    let reboots = || {
        std::fs::read_to_string(f.tmp.path().join("reboots"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let http = http_server();

    // ALWAYS: the agent records REBOOTING with the boot id, runs the command, and is stopped.
    let mut agent = f.start("apt");
    let file = f.sign(
        "reboot-always",
        &[
            "--install",
            "alpha=1.1",
            "--reboot",
            "always",
            "--check-port",
            &http.to_string(),
        ],
    );
    assert!(
        f.patchctl(&agent, &["submit", file.to_str().expect("path")])
            .status
            .success()
    );
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        agent.log_text()
    );
    let h = history(&agent, "reboot-always");
    assert!(
        h.contains("\"state\":\"REBOOTING\"") && h.contains("boot id boot-1"),
        "{h}"
    );
    drop(agent);
    // The restarted agent sees a new boot id, verifies, and completes the job.
    let agent = f.start("apt");
    let s = wait_state(
        &agent,
        "reboot-always",
        "JOB_STATE_SUCCEEDED_REBOOT_REQUIRED",
    );
    let h = history(&agent, "reboot-always");
    for needle in [
        "VERIFYING: the host rebooted (boot id boot-1 -> boot-after-1)",
        "after the reboot: reboot required",
        "check passed: tcp port",
    ] {
        assert!(h.contains(needle), "{needle:?} missing: {h}");
    }
    assert_eq!(outcome(&s, "alpha").expect("alpha")["toVersion"], "1.1");
    assert_eq!(reboots(), "1");

    // IF_REQUIRED with the flag set: one reboot; the flag is still set afterwards, and the job
    // does not reboot a second time.
    let mut agent = agent;
    let file = f.sign(
        "reboot-if",
        &["--upgrade", "security", "--reboot", "if-required"],
    );
    assert!(
        f.patchctl(&agent, &["submit", file.to_str().expect("path")])
            .status
            .success()
    );
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        agent.log_text()
    );
    drop(agent);
    let mut agent = f.start("apt");
    wait_state(&agent, "reboot-if", "JOB_STATE_SUCCEEDED_REBOOT_REQUIRED");
    assert!(history(&agent, "reboot-if").contains("a job reboots at most once"));
    assert_eq!(reboots(), "2");

    // IF_REQUIRED without the flag: no reboot.
    std::fs::remove_file(f.sandbox.join("root/run/reboot-required")).expect("rm flag");
    let s = f.run_job(
        &agent,
        "reboot-not-needed",
        &[
            "--upgrade",
            "all",
            "--exclude",
            "slow",
            "--reboot",
            "if-required",
        ],
    );
    assert_eq!(s["state"], "JOB_STATE_SUCCEEDED", "{s:#}");
    assert_eq!(reboots(), "2");

    // A reboot command that does nothing: FAILED "reboot did not happen" after the grace period.
    std::fs::write(f.tmp.path().join("noop"), "").expect("noop");
    let s = f.run_job(&agent, "reboot-noop", &["--reboot-action"]);
    assert_eq!(s["state"], "JOB_STATE_FAILED", "{s:#}");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("reboot did not happen"),
        "{s:#}"
    );
    // The same verdict when the agent restarts with the boot id unchanged.
    let file = f.sign("reboot-noop-2", &["--reboot-action"]);
    assert!(
        f.patchctl(&agent, &["submit", file.to_str().expect("path")])
            .status
            .success()
    );
    wait_state(&agent, "reboot-noop-2", "JOB_STATE_REBOOTING");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(20));
    drop(agent);
    let agent = f.start("apt");
    let s = wait_state(&agent, "reboot-noop-2", "JOB_STATE_FAILED");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or("")
            .contains("reboot did not happen"),
        "{s:#}"
    );
    assert_eq!(reboots(), "2");
}

/// One unary call over the local socket, as JSON.
fn call(agent: &Agent, method: &str, body: &str) -> Value {
    let out = agent.grpcurl_unix(&["-d", body, method]);
    assert!(out.status.success(), "{method}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn sighup_applies_jobs_and_packages_and_names_each_key_that_needs_a_restart() {
    let f = fixture("reload", "apt", &[]);
    let agent = f.start("apt");
    let flag = f.sandbox.join("root/run/reboot-required");
    let _ = std::fs::remove_file(&flag);
    call(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let status = call(&agent, "patchagent.v1.Agent/GetStatus", "{}");
    // proto3 JSON leaves out a false field.
    assert!(
        !status["reboot"]["required"].as_bool().unwrap_or(false),
        "{status:#}"
    );

    // A job living 1h is admitted under the default max_job_lifetime (24h).
    let job = f.sign("reload-1", &["--scan"]);
    let out = f.patchctl(&agent, &["submit", job.to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    // Its scan ends before the reload, so the refresh below is a scan of its own.
    let out = f.patchctl(&agent, &["watch", "reload-1"]);
    assert!(out.status.success(), "{}", text(&out));

    // The new file: [jobs] max_job_lifetime 10m, [packages] a reboot flag that exists, and two
    // keys that need a restart.
    let other_flag = f.tmp.path().join("other-reboot-required");
    std::fs::write(&other_flag, "").expect("flag");
    let mut config = f
        .config("apt", "[report]\ntimeout = \"7s\"\n")
        .replace(
            &format!("reboot_required_file = \"{}\"", flag.display()),
            &format!("reboot_required_file = \"{}\"", other_flag.display()),
        )
        .replace("[jobs]\n", "[jobs]\nmax_job_lifetime = \"10m\"\n")
        .replace("[server]\n", "[server]\nmax_connections = 7\n");
    config = config.replacen("[agent]\n", "[agent]\nlabels = { team = \"web\" }\n", 1);
    std::fs::write(&agent.config, &config).expect("config");
    let check = |expect: Option<&str>| {
        let out = run(Command::new(agent_bin())
            .args(["check-config", "-c"])
            .arg(&agent.config));
        assert!(out.status.success(), "check-config: {}", text(&out));
        let said = text(&out)
            .lines()
            .find(|l| l.starts_with("restart needed for: "))
            .map(str::to_string);
        assert_eq!(said.as_deref(), expect, "{}", text(&out));
    };
    let restart = "restart needed for: agent.labels.team, server.max_connections";
    // Before the reload: check-config compares with what runs.
    check(Some(restart));
    agent.signal(Signal::SIGHUP);
    agent.wait_log("SIGHUP: reloaded", 1);
    agent.wait_log(restart, 1);
    // After it, the restart keys are still what differs; nothing else.
    check(Some(restart));

    // [jobs]: the same kind of job is now refused, naming the key.
    let job = f.sign("reload-2", &["--scan"]);
    let out = f.patchctl(&agent, &["submit", job.to_str().expect("path")]);
    assert!(
        !out.status.success(),
        "admitted after the reload: {}",
        text(&out)
    );
    assert!(text(&out).contains("max_job_lifetime"), "{}", text(&out));

    // [packages]: the rebuilt backend reads the new reboot flag.
    call(
        &agent,
        "patchagent.v1.Agent/ListUpdates",
        r#"{"refresh":true}"#,
    );
    let status = call(&agent, "patchagent.v1.Agent/GetStatus", "{}");
    assert_eq!(
        status["reboot"]["required"],
        true,
        "{status:#}\n{}",
        agent.log_text()
    );
    let evidence = status["reboot"]["evidence"].to_string();
    assert!(
        evidence.contains(&other_flag.display().to_string()),
        "{status:#}"
    );

    // Back to the running values of the restart keys: nothing needs a restart.
    let config = config
        .replace("max_connections = 7\n", "")
        .replace("labels = { team = \"web\" }\n", "");
    std::fs::write(&agent.config, &config).expect("config");
    check(None);
}
