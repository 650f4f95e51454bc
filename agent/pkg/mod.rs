//! Package intelligence: what is installed, what updates are pending and how urgent they are,
//! and whether the host needs a reboot — for apt/dpkg and dnf(yum)/rpm.
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

use std::time::{Duration, SystemTime};

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    /// 0 when the version has no epoch.
    pub epoch: u32,
    /// Upstream version (dpkg) or VERSION (rpm).
    pub version: String,
    /// Debian revision or rpm RELEASE; empty for native Debian packages.
    pub release: String,
    pub arch: String,
    /// Source package name (without version).
    pub source: String,
    /// dpkg: the status word ("installed", "half-configured", ...); rpm: "installed".
    pub state: &'static str,
    /// dpkg: selection is "hold".
    pub held: bool,
}

impl Package {
    /// The full version as the package manager writes it (`epoch:version-release`).
    pub fn full_version(&self) -> String {
        let mut v = String::new();
        if self.epoch != 0 {
            v.push_str(&self.epoch.to_string());
            v.push(':');
        }
        v.push_str(&self.version);
        if !self.release.is_empty() {
            v.push('-');
            v.push_str(&self.release);
        }
        v
    }
}

/// Why an update exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Classification {
    Security,
    Bugfix,
    Enhancement,
    Other,
}

/// The vendor's severity for the update's advisory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Critical,
    Important,
    Moderate,
    Low,
    Unknown,
}

impl Severity {
    /// Parses a vendor severity word (RHEL/Fedora/SUSE/Ubuntu spellings).
    pub fn parse(word: &str) -> Self {
        match word.trim().to_ascii_lowercase().as_str() {
            "critical" | "urgent" => Severity::Critical,
            "important" | "high" => Severity::Important,
            "moderate" | "medium" => Severity::Moderate,
            "low" | "negligible" => Severity::Low,
            _ => Severity::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Important => "important",
            Severity::Moderate => "moderate",
            Severity::Low => "low",
            Severity::Unknown => "unknown",
        }
    }
}

/// The patch-management SLA classes (Critical 72h / High 7d / Medium 30d / Low 90d).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlaClass {
    Critical,
    High,
    Medium,
    Low,
}

impl SlaClass {
    /// The documented mapping (docs/PACKAGES.md):
    /// security updates take the class of their vendor severity — critical → Critical,
    /// important → High, moderate → Medium, low → Low — and a security update without a vendor
    /// severity (Debian and Ubuntu publish none in apt metadata) is High: a fix from the
    /// security archive is presumed remotely relevant until someone says otherwise. Every
    /// non-security update is Low.
    pub fn of(classification: Classification, severity: Severity) -> Self {
        match (classification, severity) {
            (Classification::Security, Severity::Critical) => SlaClass::Critical,
            (Classification::Security, Severity::Important | Severity::Unknown) => SlaClass::High,
            (Classification::Security, Severity::Moderate) => SlaClass::Medium,
            (Classification::Security, Severity::Low) => SlaClass::Low,
            (_, _) => SlaClass::Low,
        }
    }

    /// Time allowed from release to deployment.
    pub fn deadline(self) -> Duration {
        let h = match self {
            SlaClass::Critical => 72,
            SlaClass::High => 7 * 24,
            SlaClass::Medium => 30 * 24,
            SlaClass::Low => 90 * 24,
        };
        Duration::from_secs(h * 3600)
    }
}

/// One pending update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub name: String,
    pub arch: String,
    pub installed_version: String,
    pub candidate_version: String,
    /// Where the candidate comes from (apt: `Label:Version/Suite` list; dnf: repo id).
    pub origin: String,
    pub classification: Classification,
    pub severity: Severity,
    pub advisories: Vec<String>,
    pub cves: Vec<String>,
    /// When the advisory was issued, if the source says.
    pub issued: Option<SystemTime>,
    /// When this agent first saw this candidate pending (filled in by the scanner).
    pub first_seen: Option<SystemTime>,
    pub sla: SlaClass,
}

impl Update {
    /// The key under which the scanner remembers when it first saw this update.
    pub fn seen_key(&self) -> String {
        format!("{} {} {}", self.name, self.arch, self.candidate_version)
    }
}

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

/// An update the package manager will not install by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldUpdate {
    pub name: String,
    pub installed_version: String,
    pub candidate_version: String,
    /// "dpkg hold", "phased", "kept back".
    pub reason: String,
}

/// A repository that could not be read during a refresh or scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoError {
    pub repo: String,
    pub error: String,
}

/// Everything one update scan found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateScan {
    pub updates: Vec<Update>,
    pub held: Vec<HeldUpdate>,
    pub repo_errors: Vec<RepoError>,
}

/// Whether the host needs a reboot, how that was decided, and why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebootState {
    pub required: bool,
    /// e.g. "reboot-required file", "needs-restarting -r", "kernel and core package times".
    pub method: String,
    /// Human-readable facts behind the answer (files, packages, versions).
    pub evidence: Vec<String>,
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
}

/// A package manager backend.
#[tonic::async_trait]
pub trait PackageManager: Send + Sync {
    /// "apt", "dnf" or "yum".
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
    /// The package manager's lock files (held while it runs).
    fn lock_files(&self) -> Vec<std::path::PathBuf>;
    /// Applies one operation, sending its output lines to `lines` as they are printed.
    async fn apply(
        &self,
        op: &Op,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sla_mapping() {
        use Classification::*;
        assert_eq!(
            SlaClass::of(Security, Severity::Critical),
            SlaClass::Critical
        );
        assert_eq!(SlaClass::of(Security, Severity::Important), SlaClass::High);
        assert_eq!(SlaClass::of(Security, Severity::Unknown), SlaClass::High);
        assert_eq!(SlaClass::of(Security, Severity::Moderate), SlaClass::Medium);
        assert_eq!(SlaClass::of(Security, Severity::Low), SlaClass::Low);
        assert_eq!(SlaClass::of(Bugfix, Severity::Critical), SlaClass::Low);
        assert_eq!(
            SlaClass::Critical.deadline(),
            Duration::from_secs(72 * 3600)
        );
        assert_eq!(SlaClass::Low.deadline().as_secs(), 90 * 86400);
    }

    #[test]
    fn severity_words() {
        assert_eq!(Severity::parse("Critical"), Severity::Critical);
        assert_eq!(Severity::parse(" important "), Severity::Important);
        assert_eq!(Severity::parse("None"), Severity::Unknown);
        assert_eq!(Severity::parse(""), Severity::Unknown);
    }

    #[test]
    fn full_version() {
        let mut p = Package {
            name: "a".into(),
            epoch: 1,
            version: "2.0".into(),
            release: "3".into(),
            arch: "amd64".into(),
            source: "a".into(),
            state: "installed",
            held: false,
        };
        assert_eq!(p.full_version(), "1:2.0-3");
        p.epoch = 0;
        p.release.clear();
        assert_eq!(p.full_version(), "2.0");
    }
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
pub async fn wait_for_locks(
    files: &[std::path::PathBuf],
    timeout: Duration,
) -> Result<(), PkgError> {
    lock::wait_free(files, timeout)
        .await
        .map_err(PkgError::Lock)
}

/// Which backend `[packages] manager` and the host call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Apt,
    Dnf,
    Yum,
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
            _ => {}
        }
    }
    if has("apt-get") {
        Ok(Kind::Apt)
    } else if has("dnf") {
        Ok(Kind::Dnf)
    } else if has("yum") {
        Ok(Kind::Yum)
    } else {
        Err(format!(
            "no supported package manager for os-release ID {:?} (ID_LIKE {:?}) and none of apt-get, dnf, yum on PATH; set [packages] manager",
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
        Kind::Dnf | Kind::Yum => {
            let flavor = if kind == Kind::Dnf { "dnf" } else { "yum" };
            let eval = crate::exec::Cmd::new(find("rpm"), std::time::Duration::from_secs(30))
                .args(["--eval", "%{_dbpath}"]);
            let rpm_dbpath = match crate::exec::run(&eval).await {
                Ok(out) if out.status.success() && out.stdout.trim().starts_with('/') => {
                    std::path::PathBuf::from(out.stdout.trim())
                }
                _ => std::path::PathBuf::from("/var/lib/rpm"),
            };
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
        assert_eq!(
            choose(ManagerChoice::Dnf, &os("debian", &[]), &none),
            Ok(Kind::Dnf)
        );
    }
}
