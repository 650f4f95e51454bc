//! Reboot-required detection. Every method is wrong somewhere (needs-restarting false positives,
//! hosts without an RTC, stale flag files), so the answer always carries the method used and the
//! evidence, and the RHEL family combines methods with a defined fallback.

use super::RebootState;
use super::rpm::RpmRecord;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Packages whose update needs a reboot to take effect (the set the RHEL heuristics of osconfig
/// and needs-restarting share, and their SUSE names).
pub const CORE_PACKAGES: &[&str] = &[
    "kernel",
    "kernel-core",
    "kernel-default",
    "glibc",
    "systemd",
    "openssl-libs",
    "libopenssl3",
    "libopenssl1_1",
    "dbus",
    "dbus-1",
    "dbus-broker",
    "linux-firmware",
    "kernel-firmware",
];

const KERNEL_PACKAGES: &[&str] = &[
    "kernel",
    "kernel-core",
    "kernel-uek",
    "kernel-rt-core",
    "kernel-default",
    "kernel-azure",
    "kernel-rt",
    "kernel-64kb",
    "kernel-preempt",
];

/// The `uname -r` a kernel package boots: `VERSION-RELEASE.ARCH` on the RHEL family; on SUSE,
/// where the package is named for its flavor (`kernel-default`), `VERSION-RELEASE-FLAVOR` with
/// the release's last (rebuild) component dropped: kernel-default 6.4.0-150600.23.25.1 boots
/// 6.4.0-150600.23.25-default.
fn kernel_release(p: &crate::pkg::Package) -> String {
    let suse_flavor = p
        .name
        .strip_prefix("kernel-")
        .filter(|f| !matches!(*f, "core" | "uek" | "rt-core"));
    match suse_flavor {
        Some(flavor) => {
            let release = p
                .release
                .rsplit_once('.')
                .map_or(p.release.as_str(), |(r, _)| r);
            format!("{}-{release}-{flavor}", p.version)
        }
        None => format!("{}-{}.{}", p.version, p.release, p.arch),
    }
}

/// Interprets `zypper needs-rebooting`: exit 102 means a reboot is needed, 0 that none is
/// (zypper reads its flag, `flag`, which libzypp sets after updating core packages).
pub fn from_zypper(code: Option<i32>, stdout: &str, flag: &Path) -> Option<RebootState> {
    let required = match code {
        Some(0) => false,
        Some(102) => true,
        _ => return None,
    };
    let mut evidence: Vec<String> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    evidence.push(if flag.exists() {
        format!("{} exists{}", flag.display(), flag_level(flag))
    } else {
        format!("{} is absent", flag.display())
    });
    Some(RebootState {
        required,
        method: "zypper needs-rebooting".into(),
        evidence,
    })
}

/// zypper's flag alone, for a zypper without `needs-rebooting`.
pub fn zypper_flag(flag: &Path) -> RebootState {
    RebootState {
        required: true,
        method: "zypper reboot-needed flag".into(),
        evidence: vec![format!("{} exists{}", flag.display(), flag_level(flag))],
    }
}

/// The boot level a zypp plugin wrote into the flag ("reboot", "kexec", "soft-reboot").
fn flag_level(flag: &Path) -> String {
    match std::fs::read_to_string(flag) {
        Ok(t) if !t.trim().is_empty() => format!(" ({})", t.trim()),
        _ => String::new(),
    }
}

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
            let kver = kernel_release(&k.package);
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

/// The rpm-family fallback for the running host: [`rhel_fallback`] against `uname -r`, or,
/// when rpm could not be queried, "not known to be required", saying why.
pub fn core_packages(
    installed: Result<Vec<RpmRecord>, super::PkgError>,
    boot_time: SystemTime,
) -> RebootState {
    let running = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match installed {
        Ok(records) => rhel_fallback(&running, &records, boot_time),
        Err(e) => RebootState {
            required: false,
            method: "kernel and core package install times".into(),
            evidence: vec![format!("cannot query rpm: {e}")],
        },
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
    fn zypper_codes_and_suse_kernels() {
        let dir = tempfile::tempdir().expect("tmp");
        let flag = dir.path().join("reboot-needed");
        let s = from_zypper(Some(0), "Reboot is probably not necessary.\n", &flag).expect("0");
        assert!(!s.required && s.evidence[1].ends_with("is absent"), "{s:?}");
        std::fs::write(&flag, "reboot\n").expect("w");
        let s = from_zypper(Some(102), "Reboot is required\n", &flag).expect("102");
        assert!(
            s.required && s.evidence[1].ends_with("exists (reboot)"),
            "{s:?}"
        );
        assert_eq!(s.method, "zypper needs-rebooting");
        assert!(from_zypper(Some(2), "", &flag).is_none());
        let mut k = rec("kernel-default", "6.4.0", 500).package;
        k.release = "150600.23.25.1".into();
        assert_eq!(kernel_release(&k), "6.4.0-150600.23.25-default");
        k.name = "kernel-core".into();
        assert_eq!(kernel_release(&k), "6.4.0-150600.23.25.1.x86_64");
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
