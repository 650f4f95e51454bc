//! Package intelligence: what is installed, what updates are pending and how urgent they are,
//! and whether the host needs a reboot — for apt/dpkg, dnf(yum)/rpm and zypper/rpm.
//!
//! Each backend is split the same way: pure command builders and pure parsers (unit-tested and
//! fuzzed) and a thin [`PackageManager`] implementation that runs them through [`crate::exec`].
//! Backends know nothing about gRPC.

pub mod apt;
pub mod dnf;
pub mod dpkg;
pub mod lock;
pub mod reboot;
pub mod rpm;
pub mod scanner;
pub mod zypper;

pub use patch_agent_wire::packages::{
    Classification, HeldUpdate, Package, RebootState, RepoError, Severity, SlaClass, Update,
    UpdateScan,
};
use std::time::{Duration, SystemTime};

/// One package operation of a job, applied on its own so a job can stop between packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Upgrade an installed package to its candidate.
    Upgrade(String),
    /// Install (or move to) a package, at an exact version if given.
    Install {
        name: String,
        version: Option<String>,
    },
}

impl Op {
    pub fn name(&self) -> &str {
        match self {
            Op::Upgrade(n) | Op::Install { name: n, .. } => n,
        }
    }
}

/// What a job says about how its operations may be applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Agree to the licences packages ask to be confirmed (the job's `accept_licenses`);
    /// otherwise such a package fails, named.
    pub accept_licenses: bool,
    /// The job goes on over repositories that cannot be read (its `allow_repo_errors`).
    pub allow_repo_errors: bool,
}

/// Errors from a backend.
#[derive(Debug, thiserror::Error)]
pub enum PkgError {
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecError),
    #[error(transparent)]
    Failed(#[from] crate::exec::Failed),
    #[error("{0}")]
    Lock(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    /// The package manager ran and said why one operation failed (a scriptlet, a licence, a
    /// package not found, skipped repositories).
    #[error("{0}")]
    Operation(String),
}

/// A package manager backend.
#[tonic::async_trait]
pub trait PackageManager: Send + Sync {
    /// "apt", "dnf", "yum" or "zypper".
    fn name(&self) -> &'static str;
    /// Every installed package, calling `f` for each (streaming: nothing is held in memory).
    async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError>;
    /// Refreshes repository metadata (apt-get update, dnf makecache). Per-repository failures
    /// are returned, not raised.
    async fn refresh(&self) -> Result<Vec<RepoError>, PkgError>;
    /// Pending updates from the current metadata.
    async fn updates(&self) -> Result<UpdateScan, PkgError>;
    /// Reboot-required detection.
    async fn reboot_required(&self, boot_time: SystemTime) -> RebootState;
    /// Repairs a package database left half-configured by an interrupted run (dpkg
    /// `--configure -a` when `dpkg --audit` reports problems). Returns what it did.
    async fn repair(&self) -> Result<Option<String>, PkgError> {
        Ok(None)
    }
    /// The package manager's locks (held while it runs).
    fn locks(&self) -> Vec<lock::Lock>;
    /// Asks the package manager whether it would apply `op` (a dry run: its solver, licences
    /// and repositories checked, nothing changed). Ok(false) when this backend has no such
    /// check and the plan alone answers.
    async fn simulate(&self, _op: &Op, _opts: ApplyOptions) -> Result<bool, PkgError> {
        Ok(false)
    }
    /// Applies one operation, sending its output lines to `lines` as they are printed.
    async fn apply(
        &self,
        op: &Op,
        opts: ApplyOptions,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError>;
}

/// Runs a package-manager command; a non-zero exit is an error carrying argv, status and the
/// stderr tail. With `lines`, stdout lines are sent as they are printed.
pub async fn run_checked(
    cmd: &crate::exec::Cmd,
    lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<crate::exec::Output, PkgError> {
    let out = crate::exec::run_streaming(cmd, lines).await?;
    if !out.status.success() {
        return Err(crate::exec::Failed::new(cmd, &out).into());
    }
    Ok(out)
}

/// Waits for a package manager's locks, or fails naming the holder.
pub async fn wait_for_locks(locks: &[lock::Lock], timeout: Duration) -> Result<(), PkgError> {
    lock::wait_free(locks, timeout)
        .await
        .map_err(PkgError::Lock)
}

/// Which backend `[packages] manager` and the host call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Apt,
    Dnf,
    Yum,
    Zypper,
}

/// Chooses the backend: an explicit choice wins; `auto` looks at os-release `ID` and `ID_LIKE`,
/// then at which binaries exist (`has`).
pub fn choose(
    choice: crate::config::ManagerChoice,
    os: &crate::host::OsRelease,
    has: &dyn Fn(&str) -> bool,
) -> Result<Kind, String> {
    use crate::config::ManagerChoice;
    let rpm_family = || if has("dnf") { Kind::Dnf } else { Kind::Yum };
    match choice {
        ManagerChoice::Apt => return Ok(Kind::Apt),
        ManagerChoice::Dnf => return Ok(Kind::Dnf),
        ManagerChoice::Yum => return Ok(Kind::Yum),
        ManagerChoice::Zypper => return Ok(Kind::Zypper),
        ManagerChoice::Auto => {}
    }
    let ids: Vec<&str> = std::iter::once(os.id.as_str())
        .chain(os.id_like.iter().map(String::as_str))
        .collect();
    for id in &ids {
        match *id {
            "debian" | "ubuntu" => return Ok(Kind::Apt),
            "rhel" | "fedora" | "centos" | "rocky" | "almalinux" | "ol" | "amzn" => {
                return Ok(rpm_family());
            }
            "suse"
            | "sles"
            | "sled"
            | "sle-micro"
            | "opensuse"
            | "opensuse-leap"
            | "opensuse-tumbleweed"
            | "opensuse-slowroll" => return Ok(Kind::Zypper),
            _ => {}
        }
    }
    if has("apt-get") {
        Ok(Kind::Apt)
    } else if has("dnf") {
        Ok(Kind::Dnf)
    } else if has("yum") {
        Ok(Kind::Yum)
    } else if has("zypper") {
        Ok(Kind::Zypper)
    } else {
        Err(format!(
            "no supported package manager for os-release ID {:?} (ID_LIKE {:?}) and none of apt-get, dnf, yum, zypper on PATH; set [packages] manager",
            os.id, os.id_like
        ))
    }
}

/// Finds `program` on `$PATH`.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Builds the backend for this host from `[packages]`.
pub async fn backend(
    section: &crate::config::PackagesSection,
    os: &crate::host::OsRelease,
) -> Result<std::sync::Arc<dyn PackageManager>, String> {
    let kind = choose(section.manager, os, &|p| which(p).is_some())?;
    let find = |p: &str| which(p).unwrap_or_else(|| std::path::PathBuf::from(p));
    Ok(match kind {
        Kind::Apt => std::sync::Arc::new(apt::Apt {
            config: apt::AptConfig {
                apt_get: find("apt-get"),
                apt_cache: find("apt-cache"),
                apt_config: section.apt_config.clone(),
                options: section.apt_options.clone(),
                dpkg_status: section.dpkg_status.clone(),
                upgrade_mode: section.apt_upgrade,
                reboot_required_file: section.reboot_required_file.clone(),
                command_timeout: section.command_timeout,
                refresh_timeout: section.refresh_timeout,
                lock_timeout: section.lock_timeout,
                dpkg: find("dpkg"),
                dpkg_args: section.dpkg_args.clone(),
                apply_timeout: section.apply_timeout,
            },
        }),
        Kind::Zypper => std::sync::Arc::new(zypper::Zypper::new(zypper::ZypperConfig {
            program: find("zypper"),
            args: section.zypper_args.clone(),
            rpm: find("rpm"),
            root: section
                .rpm_root
                .clone()
                .or_else(|| zypper::root_of(&section.zypper_args)),
            rpm_dbpath: rpm_dbpath(&find("rpm")).await,
            command_timeout: section.command_timeout,
            refresh_timeout: section.refresh_timeout,
            lock_timeout: section.lock_timeout,
            apply_timeout: section.apply_timeout,
        })),
        Kind::Dnf | Kind::Yum => {
            let flavor = if kind == Kind::Dnf { "dnf" } else { "yum" };
            let rpm_dbpath = rpm_dbpath(&find("rpm")).await;
            std::sync::Arc::new(dnf::Dnf {
                flavor,
                config: dnf::DnfConfig {
                    program: find(flavor),
                    args: section.dnf_args.clone(),
                    rpm: find("rpm"),
                    rpm_root: section.rpm_root.clone(),
                    // needs-restarting inspects the running host, so it only speaks for it.
                    needs_restarting: if section.rpm_root.is_none() {
                        which("needs-restarting")
                    } else {
                        None
                    },
                    rpm_dbpath,
                    apply_timeout: section.apply_timeout,
                    command_timeout: section.command_timeout,
                    refresh_timeout: section.refresh_timeout,
                    lock_timeout: section.lock_timeout,
                },
            })
        }
    })
}

/// rpm's database directory (`rpm --eval %{_dbpath}`), `/var/lib/rpm` if rpm cannot say.
async fn rpm_dbpath(rpm: &std::path::Path) -> std::path::PathBuf {
    let eval = crate::exec::Cmd::new(rpm, std::time::Duration::from_secs(30))
        .args(["--eval", "%{_dbpath}"]);
    match crate::exec::run(&eval).await {
        Ok(out) if out.status.success() && out.stdout.trim().starts_with('/') => {
            std::path::PathBuf::from(out.stdout.trim())
        }
        _ => std::path::PathBuf::from("/var/lib/rpm"),
    }
}

#[cfg(test)]
mod choose_tests {
    use super::*;
    use crate::config::ManagerChoice;
    use crate::host::OsRelease;

    fn os(id: &str, like: &[&str]) -> OsRelease {
        OsRelease {
            id: id.into(),
            id_like: like.iter().map(|s| s.to_string()).collect(),
            ..OsRelease::default()
        }
    }

    #[test]
    fn auto_from_os_release_then_binaries() {
        let all = |_: &str| true;
        let none = |_: &str| false;
        let no_dnf = |p: &str| p != "dnf";
        assert_eq!(
            choose(ManagerChoice::Auto, &os("debian", &[]), &all),
            Ok(Kind::Apt)
        );
        assert_eq!(
            choose(
                ManagerChoice::Auto,
                &os("linuxmint", &["ubuntu", "debian"]),
                &all
            ),
            Ok(Kind::Apt)
        );
        assert_eq!(
            choose(
                ManagerChoice::Auto,
                &os("rocky", &["rhel", "centos", "fedora"]),
                &all
            ),
            Ok(Kind::Dnf)
        );
        assert_eq!(
            choose(ManagerChoice::Auto, &os("centos", &["rhel"]), &no_dnf),
            Ok(Kind::Yum)
        );
        assert_eq!(
            choose(ManagerChoice::Auto, &os("weird", &[]), &|p: &str| p
                == "dnf"),
            Ok(Kind::Dnf)
        );
        assert!(choose(ManagerChoice::Auto, &os("weird", &[]), &none).is_err());
        for (id, like) in [
            ("sles", &["suse"][..]),
            ("opensuse-leap", &["suse", "opensuse"][..]),
            ("opensuse-tumbleweed", &["opensuse", "suse"][..]),
            ("sled", &["suse"][..]),
        ] {
            assert_eq!(
                choose(ManagerChoice::Auto, &os(id, like), &all),
                Ok(Kind::Zypper),
                "{id}"
            );
        }
        assert_eq!(
            choose(ManagerChoice::Auto, &os("derivative", &["suse"]), &all),
            Ok(Kind::Zypper)
        );
        assert_eq!(
            choose(ManagerChoice::Auto, &os("weird", &[]), &|p: &str| p
                == "zypper"),
            Ok(Kind::Zypper)
        );
        assert_eq!(
            choose(ManagerChoice::Zypper, &os("debian", &[]), &none),
            Ok(Kind::Zypper)
        );
        assert_eq!(
            choose(ManagerChoice::Dnf, &os("debian", &[]), &none),
            Ok(Kind::Dnf)
        );
    }
}
