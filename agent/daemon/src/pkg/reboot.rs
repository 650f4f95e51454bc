//! Reboot-required detection. Every method is wrong somewhere (needs-restarting false positives,
//! hosts without an RTC, stale flag files), so the answer always carries the method used and the
//! evidence, and the RHEL family combines methods with a defined fallback.

use super::RebootState;
use super::rpm::RpmRecord;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Packages whose update needs a reboot to take effect (the set the RHEL heuristics of osconfig
/// and needs-restarting share).
pub const CORE_PACKAGES: &[&str] = &[
    "kernel",
    "kernel-core",
    "glibc",
    "systemd",
    "openssl-libs",
    "dbus",
    "dbus-broker",
    "linux-firmware",
];

const KERNEL_PACKAGES: &[&str] = &["kernel", "kernel-core", "kernel-uek", "kernel-rt-core"];

/// Debian family: `/var/run/reboot-required`, with the packages from `.pkgs` as evidence.
pub fn debian(flag: &Path) -> RebootState {
    let method = "reboot-required file".to_string();
    if !flag.exists() {
        return RebootState {
            required: false,
            method,
            evidence: vec![format!("{} is absent", flag.display())],
        };
    }
    let mut evidence = vec![format!("{} exists", flag.display())];
    let mut pkgs_path = flag.as_os_str().to_owned();
    pkgs_path.push(".pkgs");
    if let Ok(text) = std::fs::read_to_string(&pkgs_path) {
        let pkgs: Vec<&str> = text.split_whitespace().collect();
        if !pkgs.is_empty() {
            evidence.push(format!("requested by: {}", pkgs.join(", ")));
        }
    }
    RebootState {
        required: true,
        method,
        evidence,
    }
}

/// Interprets `needs-restarting -r`: exit 1 means a reboot is required, 0 that none is.
pub fn from_needs_restarting(code: Option<i32>, stdout: &str) -> Option<RebootState> {
    let required = match code {
        Some(0) => false,
        Some(1) => true,
        _ => return None,
    };
    Some(RebootState {
        required,
        method: "needs-restarting -r".into(),
        evidence: stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// RHEL-family fallback: the running kernel against the newest installed kernel, and install
/// times of core packages against the boot time.
pub fn rhel_fallback(
    running_kernel: &str,
    installed: &[RpmRecord],
    boot_time: SystemTime,
) -> RebootState {
    let mut evidence = Vec::new();
    let mut required = false;
    let newest_kernel = installed
        .iter()
        .filter(|r| KERNEL_PACKAGES.contains(&r.package.name.as_str()))
        .max_by_key(|r| r.install_time);
    match newest_kernel {
        Some(k) => {
            let kver = format!(
                "{}-{}.{}",
                k.package.version, k.package.release, k.package.arch
            );
            if kver == running_kernel {
                evidence.push(format!(
                    "running kernel {running_kernel} is the newest installed"
                ));
            } else {
                required = true;
                evidence.push(format!(
                    "running kernel {running_kernel}, newest installed kernel {} {kver}",
                    k.package.name
                ));
            }
        }
        None => evidence.push("no kernel package in the rpm database".into()),
    }
    let boot = secs(boot_time);
    for r in installed {
        if CORE_PACKAGES.contains(&r.package.name.as_str()) && r.install_time > boot {
            required = true;
            evidence.push(format!(
                "{}-{}-{}.{} installed at {}, after boot at {}",
                r.package.name,
                r.package.version,
                r.package.release,
                r.package.arch,
                rfc3339(r.install_time),
                rfc3339(boot)
            ));
        }
    }
    RebootState {
        required,
        method: "kernel and core package install times".into(),
        evidence,
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Install times come from the package database: any value must print, none may panic.
fn rfc3339(s: u64) -> String {
    patch_agent_wire::time::rfc3339_secs(i64::try_from(s).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(name: &str, version: &str, t: u64) -> RpmRecord {
        RpmRecord {
            package: crate::pkg::Package {
                name: name.into(),
                epoch: 0,
                version: version.into(),
                release: "1.el9".into(),
                arch: "x86_64".into(),
                source: String::new(),
                state: "installed",
                held: false,
            },
            install_time: t,
        }
    }

    #[test]
    fn debian_flag_and_pkgs() {
        let dir = tempfile::tempdir().expect("tmp");
        let flag = dir.path().join("reboot-required");
        let s = debian(&flag);
        assert!(!s.required && s.evidence[0].ends_with("is absent"));
        std::fs::write(&flag, "*** System restart required ***\n").expect("w");
        std::fs::write(
            dir.path().join("reboot-required.pkgs"),
            "linux-image-6.1\nlibc6\n",
        )
        .expect("w");
        let s = debian(&flag);
        assert!(s.required);
        assert_eq!(s.evidence[1], "requested by: linux-image-6.1, libc6");
    }

    #[test]
    fn needs_restarting_codes() {
        assert!(
            from_needs_restarting(Some(1), "Reboot is required\n")
                .expect("1")
                .required
        );
        assert!(!from_needs_restarting(Some(0), "").expect("0").required);
        assert!(from_needs_restarting(Some(2), "").is_none());
        assert!(from_needs_restarting(None, "").is_none());
    }

    #[test]
    fn rhel_kernel_and_core_packages() {
        let boot = UNIX_EPOCH + Duration::from_secs(1000);
        let running = "5.14.0-1.el9.x86_64";
        let same = [rec("kernel-core", "5.14.0", 500), rec("glibc", "2.34", 900)];
        assert!(!rhel_fallback(running, &same, boot).required);
        let newer_kernel = [
            rec("kernel-core", "5.14.0", 500),
            rec("kernel-core", "5.14.1", 800),
        ];
        let s = rhel_fallback(running, &newer_kernel, boot);
        assert!(
            s.required && s.evidence[0].contains("5.14.1-1.el9.x86_64"),
            "{s:?}"
        );
        let new_glibc = [
            rec("kernel-core", "5.14.0", 500),
            rec("glibc", "2.35", 2000),
        ];
        let s = rhel_fallback(running, &new_glibc, boot);
        assert!(
            s.required && s.evidence[1].starts_with("glibc-2.35-1.el9.x86_64 installed at"),
            "{s:?}"
        );
    }
}
