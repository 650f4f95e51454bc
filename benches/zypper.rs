//! zypper scan benchmark, side by side in one run, on a root of 1,500 installed packages with
//! 300 pending updates in 100 needed patches (benches/zypper-bulk.sh):
//!
//! 1. the agent's pending-update scan (`Zypper::updates`: lock check, list-updates, the patch
//!    view, the join) against the bare `zypper --xmlout list-updates` on the same root,
//!    interleaved: steady state (nothing changed since the last scan, so the patch view is
//!    kept); after the rpm database changed (list-patches runs again, the patches' packages
//!    are known); and cold (a new backend every round: list-patches and info -t patch run);
//! 2. the real agent's peak RSS (VmHWM; children excluded) across a full scan of that root.
//!
//!     cargo bench --bench zypper

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use patch_agent::pkg::PackageManager;
use patch_agent::pkg::zypper::{Zypper, ZypperConfig};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const INSTALLED: usize = 1500;
const UPDATES: usize = 300;
const PATCHES: usize = 100;
const ROUNDS: usize = 15;

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("bulk");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/zypper-bulk.sh");
    let t = Instant::now();
    let out = run(Command::new("bash").arg(&script).arg(&s).args([
        INSTALLED.to_string(),
        UPDATES.to_string(),
        PATCHES.to_string(),
    ]));
    assert!(out.status.success(), "{}", text(&out));
    println!(
        "root: {INSTALLED} packages, {UPDATES} updates, {PATCHES} patches (built in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let root = s.join("root");
    let rpm_dbpath = Command::new("rpm")
        .args(["--eval", "%{_dbpath}"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .expect("rpm --eval");
    let config = ZypperConfig {
        program: "zypper".into(),
        args: vec!["--root".into(), root.display().to_string()],
        rpm: "rpm".into(),
        root: Some(root.clone()),
        rpm_dbpath: rpm_dbpath.clone().into(),
        command_timeout: Duration::from_secs(300),
        refresh_timeout: Duration::from_secs(300),
        lock_timeout: Duration::from_secs(10),
        apply_timeout: Duration::from_secs(300),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let steady = Zypper::new(config.clone());
    let first = rt.block_on(steady.updates()).expect("scan");
    assert_eq!(first.updates.len(), UPDATES);
    assert!(first.updates.iter().all(|u| !u.advisories.is_empty()));

    let rpmdb = root.join(rpm_dbpath.trim_start_matches('/'));
    let db_file = std::fs::read_dir(&rpmdb)
        .expect("rpm database")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sqlite") || p.ends_with("Packages"))
        .expect("rpm database file");
    let (mut bare, mut warm, mut touched, mut cold) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let out = Command::new("zypper")
            .env("LC_ALL", "C")
            .arg("--root")
            .arg(&root)
            .args([
                "--non-interactive",
                "--no-color",
                "--xmlout",
                "--no-refresh",
                "list-updates",
            ])
            .output()
            .expect("zypper");
        bare.push(t.elapsed());
        assert!(out.status.success());

        let t = Instant::now();
        let scan = rt.block_on(steady.updates()).expect("scan");
        warm.push(t.elapsed());
        assert_eq!(scan, first, "the kept patch view answers as a fresh one");

        // The rpm database changes (as a job or another tool would change it).
        let out = run(Command::new("touch").arg(&db_file));
        assert!(out.status.success());
        let t = Instant::now();
        let scan = rt.block_on(steady.updates()).expect("scan");
        touched.push(t.elapsed());
        assert_eq!(scan, first);

        let fresh = Zypper::new(config.clone());
        let t = Instant::now();
        let scan = rt.block_on(fresh.updates()).expect("scan");
        cold.push(t.elapsed());
        assert_eq!(scan, first);
    }
    let (b, w, d, c) = (
        median(&mut bare),
        median(&mut warm),
        median(&mut touched),
        median(&mut cold),
    );
    let pct = |x: Duration| (x.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
    println!(
        "| pending-update scan, steady state (median of {ROUNDS}) | agent {:.1} ms, bare zypper list-updates {:.1} ms: overhead {:+.1}% | <= 10% |",
        ms(w),
        ms(b),
        pct(w)
    );
    println!(
        "| pending-update scan after an rpm database change (median of {ROUNDS}) | agent {:.1} ms (list-updates, list-patches), bare list-updates {:.1} ms: {:+.1}% | reported |",
        ms(d),
        ms(b),
        pct(d)
    );
    println!(
        "| pending-update scan, nothing known (median of {ROUNDS}) | agent {:.1} ms (list-updates, list-patches, info -t patch for {PATCHES} patches), bare list-updates {:.1} ms: {:+.1}% | reported |",
        ms(c),
        ms(b),
        pct(c)
    );

    // 2. The real agent scanning that root: its peak RSS, children excluded.
    let pki = Pki::new(tmp.path(), "pki");
    let dir = tmp.path().join("agent");
    let packages = format!(
        "[packages]\nmanager = \"zypper\"\nzypper_args = [\"--root\", \"{}\"]\n",
        root.display()
    );
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &packages));
    agent.wait_log("Scan finished", 1);
    let (rss, peak) = patchctl::bench::memory_kib(agent.child.id()).expect("memory");
    println!(
        "| agent during a scan of {INSTALLED} packages, {UPDATES} updates, {PATCHES} patches | peak RSS {:.1} MiB (RSS after {:.1} MiB) | <= 16 MiB |",
        peak as f64 / 1024.0,
        rss as f64 / 1024.0
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
