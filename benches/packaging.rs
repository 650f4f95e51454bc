//! Packaging benchmark: package sizes, and the agent under a real systemd (a debootstrapped
//! Debian booted with `systemd-nspawn -b`, the .deb installed and enrolled):
//!
//! - `systemctl start` to READY over BENCH_STARTS (default 10) stop/start cycles, as systemd
//!   itself timestamps it (InactiveExit -> ActiveEnter, which includes ExecStartPre's
//!   check-config), and as the `systemctl start` command takes from outside;
//! - the agent's RSS after BENCH_IDLE_SECS (default 600) idle, after its start-up scan: VmRSS, VmHWM and
//!   smaps_rollup (Rss, Pss, Pss_Anon, Pss_File, Anonymous);
//! - with `BENCH_BASELINE_DEB=FILE`, the same for that package first, in the same container.
//!
//! Run with `cargo bench --bench packaging` (as root, with the tools `.ci/run` installs).

#[path = "../tests/common/mod.rs"]
mod common;

use common::container::*;
use common::env_num;
use std::time::{Duration, Instant};

fn main() {
    let deb = deb(V1);
    let rpm = rpm_file(V1);
    let mib =
        |p: &std::path::Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64) / 1048576.0;
    println!(
        "sizes: {} {:.2} MiB (target <= 6), {} {:.2} MiB (target <= 7)",
        deb.display(),
        mib(&deb),
        rpm.display(),
        mib(&rpm)
    );

    let tmp = tempfile::Builder::new()
        .prefix("pa-bench-boot-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let fs = tmp.path().join("root");
    rootfs(&fs);
    std::fs::write(fs.join("etc/apt/sources.list"), "").expect("sources");
    let c = Container::boot(&fs, &format!("pa-bench-{}", std::process::id()));
    // Side by side in one container: a baseline package first (BENCH_BASELINE_DEB, e.g. the
    // previous release), then this build's, upgraded in place.
    let mut runs = Vec::new();
    if let Some(base) = std::env::var_os("BENCH_BASELINE_DEB") {
        runs.push(("baseline", std::path::PathBuf::from(base)));
    }
    runs.push(("this build", deb));
    let mut enrolled = false;
    for (label, package) in runs {
        c.install(&package);
        if !enrolled {
            enroll(&fs, tmp.path(), None);
            enrolled = true;
        }
        println!("== {label}: {}", package.display());
        measure(&c);
    }
}

fn measure(c: &Container) {
    let starts = env_num("BENCH_STARTS", 10);
    let mut by_systemd = Vec::new();
    let mut by_command = Vec::new();
    for _ in 0..starts {
        // reset-failed: systemd refuses more than 5 starts in 10 s otherwise.
        c.sh_ok("systemctl stop patch-agent && systemctl reset-failed patch-agent");
        let t = Instant::now();
        c.sh_ok("systemctl start patch-agent");
        by_command.push(t.elapsed().as_secs_f64() * 1000.0);
        let v = c.sh_ok(
            "systemctl show -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic patch-agent",
        );
        let get = |k: &str| {
            v.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .and_then(|x| x.trim().parse::<f64>().ok())
        };
        if let (Some(exit), Some(active)) = (
            get("InactiveExitTimestampMonotonic"),
            get("ActiveEnterTimestampMonotonic"),
        ) {
            // Microseconds: the start job began (ExecStartPre) -> READY=1 made it active.
            by_systemd.push((active - exit) / 1000.0);
        }
    }
    let stats = |xs: &mut Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        (
            xs.get(xs.len() / 2).copied().unwrap_or(0.0),
            xs.last().copied().unwrap_or(0.0),
        )
    };
    let (m1, x1) = stats(&mut by_systemd);
    let (m2, x2) = stats(&mut by_command);
    println!(
        "start to READY over {starts} starts: systemd's timestamps median {m1:.1} ms, max {x1:.1} ms; `systemctl start` via nsenter median {m2:.1} ms, max {x2:.1} ms (target <= 200 ms)"
    );

    let idle = env_num("BENCH_IDLE_SECS", 600);
    let pid = c.main_pid();
    println!("idling {idle} s (agent pid {pid} in the container)...");
    std::thread::sleep(Duration::from_secs(idle));
    let status = c.sh_ok(&format!("grep -E '^(VmRSS|VmHWM)' /proc/{pid}/status"));
    let rollup = c.sh_ok(&format!(
        "grep -E '^(Rss|Pss|Pss_Anon|Pss_File|Anonymous):' /proc/{pid}/smaps_rollup"
    ));
    let line = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    println!(
        "after {idle} s idle under systemd: {} (target VmRSS <= 8 MiB); smaps_rollup: {} (target Anonymous <= 3 MiB)",
        line(&status),
        line(&rollup)
    );
    assert_eq!(c.main_pid(), pid, "the agent was not restarted meanwhile");
}
