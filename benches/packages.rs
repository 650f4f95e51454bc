//! Package-intelligence benchmark, side by side in one run:
//!
//! 1. inventory of a generated 5,000-package dpkg status file: the agent's parser against
//!    `dpkg-query -W --admindir=... -f='${Package} ${Version} ${Architecture}\n'`;
//! 2. the agent's peak RSS (VmHWM; children excluded) across a full scan of that host;
//! 3. a pending-update scan (`Apt::updates`: lock check, simulation, hold query, parse) against
//!    the bare `apt-get -s dist-upgrade` on the same root.
//!
//!     cargo bench --bench packages
//!
//! The 5,000 packages are this host's own dpkg stanzas, repeated under new names (relations
//! other than Depends dropped from the copies so the database stays consistent), appended to the
//! apt sandbox of tests/fixtures/apt-sandbox.sh so the simulation has real updates to find.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use patch_agent::pkg::PackageManager;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET_PACKAGES: usize = 5000;
const ROUNDS: usize = 15;

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("apt");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apt-sandbox.sh");
    let out = run(Command::new("bash").arg(&fixture).arg(&s));
    assert!(out.status.success(), "{}", text(&out));
    let status = s.join("root/var/lib/dpkg/status");
    let total = grow_status(&status, TARGET_PACKAGES);
    let size = std::fs::metadata(&status).map(|m| m.len()).unwrap_or(0);
    println!(
        "status file: {total} packages, {:.1} MiB",
        size as f64 / 1_048_576.0
    );

    if std::env::var_os("BENCH_PROFILE").is_some() {
        for _ in 0..3 {
            let t = Instant::now();
            let data = std::fs::read(&status).expect("read");
            let read = t.elapsed();
            let t = Instant::now();
            let lines = memchr::memchr_iter(b'\n', &data).count();
            let scan = t.elapsed();
            let t = Instant::now();
            let mut n = 0;
            patch_agent::pkg::dpkg::parse_status(&data[..], &mut |_| n += 1).expect("parse");
            let parse = t.elapsed();
            println!(
                "read {:.2} ms, newline scan {:.2} ms ({lines} lines), parse from memory {:.2} ms",
                ms(read),
                ms(scan),
                ms(parse)
            );
        }
    }
    // 1. Inventory: parser vs dpkg-query, interleaved.
    let admindir = s.join("root/var/lib/dpkg");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut count = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let mut n = 0;
        patch_agent::pkg::dpkg::read_status(&status, &mut |_| n += 1).expect("parse");
        ours.push(t.elapsed());
        count = n;
        let t = Instant::now();
        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={}", admindir.display()))
            .args(["-W", "-f=${Package} ${Version} ${Architecture}\\n"])
            .output()
            .expect("dpkg-query");
        theirs.push(t.elapsed());
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            n,
            "same package count"
        );
    }
    let (o, d) = (median(&mut ours), median(&mut theirs));
    println!(
        "| inventory of {count} packages (median of {ROUNDS}) | agent parser {:.2} ms, dpkg-query {:.2} ms: {:.1}x faster | >= 10x |",
        ms(o),
        ms(d),
        d.as_secs_f64() / o.as_secs_f64()
    );

    // 3. Pending-update scan vs the bare simulation.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let apt = patch_agent::pkg::apt::Apt {
        config: patch_agent::pkg::apt::AptConfig {
            apt_get: "apt-get".into(),
            apt_cache: "apt-cache".into(),
            apt_config: Some(s.join("apt.conf")),
            options: vec![],
            dpkg_status: status.clone(),
            upgrade_mode: patch_agent::pkg::apt::UpgradeMode::DistUpgrade,
            reboot_required_file: s.join("root/run/reboot-required"),
            command_timeout: Duration::from_secs(300),
            refresh_timeout: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(10),
            dpkg: "dpkg".into(),
            dpkg_args: vec![],
            apply_timeout: Duration::from_secs(300),
        },
    };
    rt.block_on(apt.refresh()).expect("apt-get update");
    let (mut scan, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let result = rt.block_on(apt.updates()).expect("scan");
        scan.push(t.elapsed());
        assert_eq!(result.updates.len(), 3);
        let t = Instant::now();
        let out = Command::new("apt-get")
            .env("APT_CONFIG", s.join("apt.conf"))
            .env("LC_ALL", "C")
            .args(["-q", "-s", "dist-upgrade"])
            .output()
            .expect("apt-get");
        bare.push(t.elapsed());
        assert!(out.status.success());
    }
    let (sc, b) = (median(&mut scan), median(&mut bare));
    println!(
        "| pending-update scan (median of {ROUNDS}) | agent {:.1} ms, bare apt-get -s dist-upgrade {:.1} ms: overhead {:+.1}% | <= 10% |",
        ms(sc),
        ms(b),
        (sc.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0
    );

    // 2. The real agent scanning that host: its peak RSS, children excluded.
    let pki = Pki::new(tmp.path(), "pki");
    let dir = tmp.path().join("agent");
    let packages = format!(
        "[packages]\nmanager = \"apt\"\napt_config = \"{s}/apt.conf\"\ndpkg_status = \"{s}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{s}/root/run/reboot-required\"\n",
        s = s.display()
    );
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &packages));
    agent.wait_log("Scan finished", 1);
    let (rss, peak) = patchctl::bench::memory_kib(agent.child.id()).expect("memory");
    println!(
        "| agent during a scan of {count} packages | peak RSS {:.1} MiB (RSS after {:.1} MiB) | <= 16 MiB |",
        peak as f64 / 1024.0,
        rss as f64 / 1024.0
    );
}

/// Appends copies of this host's dpkg stanzas under new names until `target` packages exist.
fn grow_status(status: &Path, target: usize) -> usize {
    let host = std::fs::read_to_string("/var/lib/dpkg/status").expect("host status");
    let stanzas: Vec<&str> = host
        .split("\n\n")
        .filter(|s| s.contains("Status: install ok installed"))
        .collect();
    let mut text = std::fs::read_to_string(status).expect("sandbox status");
    let mut n = text.matches("\nPackage: ").count() + usize::from(text.starts_with("Package: "));
    // Copy 0 is the host's own stanzas, unchanged (a consistent database); later copies are
    // renamed and keep only Depends, which the originals satisfy.
    let mut copy = 0;
    while n < target {
        for st in &stanzas {
            if n >= target {
                break;
            }
            let mut out = String::new();
            let mut skip_continuation = false;
            for line in st.lines() {
                if line.starts_with(' ') {
                    if !skip_continuation {
                        out.push_str(line);
                        out.push('\n');
                    }
                    continue;
                }
                let key = line.split(':').next().unwrap_or("");
                skip_continuation = copy > 0
                    && matches!(
                        key,
                        "Conflicts"
                            | "Breaks"
                            | "Replaces"
                            | "Provides"
                            | "Pre-Depends"
                            | "Conffiles"
                            | "Essential"
                            | "Protected"
                    );
                if skip_continuation {
                    continue;
                }
                if let Some(name) = line.strip_prefix("Package: ").filter(|_| copy > 0) {
                    out.push_str(&format!("Package: {name}-copy{copy}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            text.push('\n');
            text.push_str(out.trim_end());
            text.push('\n');
            n += 1;
        }
        copy += 1;
    }
    std::fs::write(status, text).expect("write status");
    n
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
