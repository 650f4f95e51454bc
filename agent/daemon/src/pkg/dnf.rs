//! dnf/yum and rpm backend (RHEL 8+, Fedora, Rocky, Alma; yum where dnf is absent).
//!
//! Pending updates come from `check-update` (exit 100: updates, 0: none, 1: error), joined with
//! `updateinfo list` (advisory, type and severity per package), `updateinfo list --with-cve`
//! (CVE ids) and `updateinfo info` (issue dates). Scans run from the metadata cache (`-C`); only
//! [`PackageManager::refresh`] downloads metadata, and a repository that cannot be reached is
//! skipped and reported rather than failing the scan.

use super::rpm::{self, RpmRecord};
use super::{
    Classification, Package, PackageManager, PkgError, RebootState, RepoError, Severity, SlaClass,
    Update, UpdateScan, reboot,
};
use crate::exec::{self, Cmd, Failed};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Everything the dnf backend needs to know about the host (or the root it manages).
#[derive(Debug, Clone)]
pub struct DnfConfig {
    /// `dnf` or `yum`.
    pub program: PathBuf,
    /// Extra arguments for every dnf command (e.g. `--installroot=/sb`, `--setopt=...`).
    pub args: Vec<String>,
    pub rpm: PathBuf,
    /// `rpm --root` for inventory and reboot checks; None for the host.
    pub rpm_root: Option<PathBuf>,
    /// `needs-restarting`, if installed.
    pub needs_restarting: Option<PathBuf>,
    /// rpm's database directory (`rpm --eval %_dbpath`), relative to the root.
    pub rpm_dbpath: PathBuf,
    pub command_timeout: Duration,
    pub refresh_timeout: Duration,
    pub lock_timeout: Duration,
    pub apply_timeout: Duration,
}

impl DnfConfig {
    /// `dnf -y upgrade -- NAME` or `dnf -y install -- NAME[-VERSION]`, from the cache.
    pub fn apply_command(&self, op: &super::Op) -> Cmd {
        // From the cache, and like every dnf command here skipping unreadable repositories: a
        // job allowed to go on over repository errors must not fail on them here.
        let cmd = self.base(self.apply_timeout).arg("-C");
        match op {
            super::Op::Upgrade(name) => cmd.args(["upgrade", "--"]).arg(name.clone()),
            super::Op::Install { name, version } => {
                cmd.args(["install", "--"]).arg(match version {
                    Some(v) => format!("{name}-{v}"),
                    None => name.clone(),
                })
            }
        }
    }
    fn base(&self, timeout: Duration) -> Cmd {
        Cmd::new(self.program.clone(), timeout)
            .args(self.args.iter().cloned())
            .args(["-y", "--setopt=skip_if_unavailable=True"])
    }

    /// Downloads metadata for every enabled repository.
    pub fn makecache_command(&self) -> Cmd {
        self.base(self.refresh_timeout).arg("makecache")
    }

    pub fn check_update_command(&self) -> Cmd {
        self.base(self.command_timeout).args(["-C", "check-update"])
    }

    pub fn updateinfo_command(&self, extra: &[&str]) -> Cmd {
        self.base(self.command_timeout)
            .args(["-C", "updateinfo"])
            .args(extra.iter().copied())
    }

    pub fn rpm_query_command(&self) -> Cmd {
        rpm::query_all_command(&self.rpm, self.rpm_root.as_deref(), self.command_timeout)
    }

    /// rpm's transaction lock, inside the root rpm is pointed at.
    pub fn locks(&self) -> Vec<super::lock::Lock> {
        let root = self.rpm_root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let db = self
            .rpm_dbpath
            .strip_prefix("/")
            .unwrap_or(&self.rpm_dbpath);
        vec![super::lock::Lock::Fcntl(root.join(db).join(".rpm.lock"))]
    }
}

/// One line of `check-update`: `name.arch  [epoch:]version-release  repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub name: String,
    pub arch: String,
    pub version: String,
    pub repo: String,
}

/// Parses `check-update` output, joining lines that dnf wrapped after a long `name.arch`.
pub fn parse_check_update(text: &str) -> Vec<Available> {
    let mut out = Vec::new();
    let mut carry: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("Obsoleting Packages") || line.starts_with("Security:") {
            break;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let fields: Vec<&str> = match (carry.take(), fields.len()) {
            (None, 1) if !line.starts_with(' ') && fields[0].contains('.') => {
                carry = Some(fields[0].to_string());
                continue;
            }
            (Some(first), 2) => {
                let (v, r) = (fields[0], fields[1]);
                if let Some(a) = available(&first, v, r) {
                    out.push(a);
                }
                continue;
            }
            (_, 3) => fields,
            _ => continue,
        };
        if let Some(a) = available(fields[0], fields[1], fields[2]) {
            out.push(a);
        }
    }
    out
}

fn available(name_arch: &str, version: &str, repo: &str) -> Option<Available> {
    let (name, arch) = name_arch.rsplit_once('.')?;
    if name.is_empty() || arch.is_empty() || !version.contains('-') {
        return None;
    }
    Some(Available {
        name: name.to_string(),
        arch: arch.to_string(),
        version: version.to_string(),
        repo: repo.to_string(),
    })
}

/// Splits `name-[epoch:]version-release.arch` into (name, arch).
pub fn nevra_name_arch(nevra: &str) -> Option<(&str, &str)> {
    let (nvr, arch) = nevra.rsplit_once('.')?;
    let (nv, _release) = nvr.rsplit_once('-')?;
    let (name, _version) = nv.rsplit_once('-')?;
    (!name.is_empty() && !arch.is_empty()).then_some((name, arch))
}

/// One row of `updateinfo list`: advisory (or CVE) id, type/severity, package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvisoryRow {
    pub id: String,
    pub classification: Classification,
    /// The advisory type as dnf prints it (security, bugfix, enhancement, newpackage, ...).
    pub kind: String,
    pub severity: Severity,
    pub name: String,
    pub arch: String,
}

/// Parses `updateinfo list [--with-cve]` output.
pub fn parse_updateinfo_list(text: &str) -> Vec<AdvisoryRow> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [id, kind, nevra] = f.as_slice() else {
                return None;
            };
            let (name, arch) = nevra_name_arch(nevra)?;
            let (classification, severity, kind) = match kind.split_once('/') {
                Some((sev, "Sec.")) => (
                    Classification::Security,
                    Severity::parse(sev),
                    "security".to_string(),
                ),
                _ => {
                    let kind = kind.to_ascii_lowercase();
                    let classification = match kind.as_str() {
                        "security" => Classification::Security,
                        "bugfix" => Classification::Bugfix,
                        "enhancement" => Classification::Enhancement,
                        _ => Classification::Other,
                    };
                    (classification, Severity::Unknown, kind)
                }
            };
            Some(AdvisoryRow {
                id: id.to_string(),
                classification,
                kind,
                severity,
                name: name.to_string(),
                arch: arch.to_string(),
            })
        })
        .collect()
}

/// Issue dates per advisory id from `updateinfo info` ("Issued:" if present, else "Updated:").
pub fn parse_updateinfo_dates(text: &str) -> HashMap<String, SystemTime> {
    let mut out = HashMap::new();
    let mut id: Option<String> = None;
    let mut issued_seen = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        match key.trim() {
            "Update ID" => {
                id = Some(value.trim().to_string());
                issued_seen = false;
            }
            k @ ("Issued" | "Updated") => {
                let Some(current) = &id else { continue };
                if k == "Updated" && issued_seen {
                    continue;
                }
                if let Ok(t) = humantime::parse_rfc3339_weak(value.trim()) {
                    out.insert(current.clone(), t);
                    issued_seen |= k == "Issued";
                }
            }
            _ => {}
        }
    }
    out
}

/// The error recorded for a repository whose metadata was never downloaded.
pub const NO_CACHE: &str = "no metadata in the cache; a refresh is needed";

/// Per-repository errors from dnf's stderr.
pub fn parse_repo_errors(text: &str) -> Vec<RepoError> {
    let mut out: Vec<RepoError> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let rest = line
            .strip_prefix("Error: Failed to download metadata for repo '")
            .or_else(|| line.strip_prefix("Failed to download metadata for repo '"));
        if let Some(rest) = rest {
            if let Some((repo, why)) = rest.split_once("'") {
                out.push(RepoError {
                    repo: repo.to_string(),
                    error: why.trim_start_matches(':').trim().to_string(),
                });
            }
        } else if let Some(rest) = line.strip_prefix("Error: Cache-only enabled but no cache for '")
        {
            if let Some((repo, _)) = rest.split_once('\'') {
                out.push(RepoError {
                    repo: repo.to_string(),
                    error: NO_CACHE.into(),
                });
            }
        } else if let Some(list) = line.strip_prefix("Ignoring repositories:") {
            for repo in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                if !out.iter().any(|e| e.repo == repo) {
                    out.push(RepoError {
                        repo: repo.to_string(),
                        error: "metadata could not be downloaded; repository skipped".into(),
                    });
                }
            }
        }
    }
    out
}

/// Joins check-update rows with advisories and installed versions.
pub fn assemble(
    available: &[Available],
    advisories: &[AdvisoryRow],
    cves: &[AdvisoryRow],
    dates: &HashMap<String, SystemTime>,
    installed: &HashMap<(String, String), String>,
) -> Vec<Update> {
    available
        .iter()
        .map(|a| {
            let key = (a.name.clone(), a.arch.clone());
            let mine: Vec<&AdvisoryRow> = advisories
                .iter()
                .filter(|r| r.name == a.name && r.arch == a.arch)
                .collect();
            let strongest = mine.iter().min_by_key(|r| r.classification);
            let classification = strongest.map_or(Classification::Other, |r| r.classification);
            let severity = mine
                .iter()
                .filter(|r| r.classification == Classification::Security)
                .map(|r| r.severity)
                .min()
                .unwrap_or(Severity::Unknown);
            let ids: BTreeSet<String> = mine.iter().map(|r| r.id.clone()).collect();
            let cve_ids: BTreeSet<String> = cves
                .iter()
                .filter(|r| r.name == a.name && r.arch == a.arch && r.id.starts_with("CVE-"))
                .map(|r| r.id.clone())
                .collect();
            let issued = ids.iter().filter_map(|id| dates.get(id)).min().copied();
            Update {
                name: a.name.clone(),
                arch: a.arch.clone(),
                installed_version: installed.get(&key).cloned().unwrap_or_default(),
                candidate_version: a.version.clone(),
                origin: a.repo.clone(),
                classification,
                severity,
                advisories: ids.into_iter().collect(),
                cves: cve_ids.into_iter().collect(),
                issued,
                first_seen: None,
                sla: SlaClass::of(classification, severity),
                category: strongest.map(|r| r.kind.clone()).unwrap_or_default(),
                bug_ids: Vec::new(),
                flags: Default::default(),
            }
        })
        .collect()
}

/// The dnf/yum [`PackageManager`].
pub struct Dnf {
    pub config: DnfConfig,
    /// "dnf" or "yum".
    pub flavor: &'static str,
}

impl Dnf {
    async fn installed(&self) -> Result<Vec<RpmRecord>, PkgError> {
        rpm::installed(&self.config.rpm_query_command()).await
    }
}

#[tonic::async_trait]
impl PackageManager for Dnf {
    fn name(&self) -> &'static str {
        self.flavor
    }

    async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        for r in self.installed().await? {
            f(r.package);
        }
        Ok(())
    }

    async fn refresh(&self) -> Result<Vec<RepoError>, PkgError> {
        let cmd = self.config.makecache_command();
        let out = exec::run(&cmd).await?;
        let errors = parse_repo_errors(&out.stderr);
        if !out.status.success() && errors.is_empty() {
            return Err(Failed::new(&cmd, &out).into());
        }
        Ok(errors)
    }

    async fn updates(&self) -> Result<UpdateScan, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let cmd = self.config.check_update_command();
        let mut out = exec::run(&cmd).await?;
        if parse_repo_errors(&out.stderr)
            .iter()
            .any(|e| e.error == NO_CACHE)
        {
            // Never-downloaded metadata is as stale as it gets: fetch it once, then scan.
            tracing::info!("Repository metadata missing from the cache; refreshing");
            self.refresh().await?;
            out = exec::run(&cmd).await?;
        }
        let available = match out.code() {
            Some(100) => parse_check_update(&out.stdout),
            Some(0) => Vec::new(),
            _ => return Err(Failed::new(&cmd, &out).into()),
        };
        let mut scan = UpdateScan {
            repo_errors: parse_repo_errors(&out.stderr),
            ..UpdateScan::default()
        };
        if available.is_empty() {
            return Ok(scan);
        }
        let list = super::run_checked(
            &self.config.updateinfo_command(&["list", "--updates"]),
            None,
        )
        .await?;
        let cves = super::run_checked(
            &self
                .config
                .updateinfo_command(&["list", "--updates", "--with-cve"]),
            None,
        )
        .await?;
        let info = super::run_checked(
            &self.config.updateinfo_command(&["info", "--updates"]),
            None,
        )
        .await?;
        let installed: HashMap<(String, String), String> = self
            .installed()
            .await?
            .into_iter()
            .map(|r| {
                let v = r.package.full_version();
                ((r.package.name, r.package.arch), v)
            })
            .collect();
        scan.updates = assemble(
            &available,
            &parse_updateinfo_list(&list.stdout),
            &parse_updateinfo_list(&cves.stdout),
            &parse_updateinfo_dates(&info.stdout),
            &installed,
        );
        Ok(scan)
    }

    fn locks(&self) -> Vec<super::lock::Lock> {
        self.config.locks()
    }

    async fn apply(
        &self,
        op: &super::Op,
        _opts: super::ApplyOptions,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let cmd = self.config.apply_command(op);
        super::run_checked(&cmd, Some(lines)).await?;
        Ok(())
    }

    async fn reboot_required(&self, boot_time: SystemTime) -> RebootState {
        if let Some(nr) = &self.config.needs_restarting {
            let cmd = Cmd::new(nr.clone(), self.config.command_timeout).arg("-r");
            if let Ok(out) = exec::run(&cmd).await
                && let Some(state) = reboot::from_needs_restarting(out.code(), &out.stdout)
            {
                return state;
            }
        }
        reboot::core_packages(self.installed().await, boot_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_update_with_wrapping_and_obsoletes() {
        let text = "\nbug.noarch                               1.1-1                              test\nvery-long-package-name-that-wraps-the-column.x86_64\n                                         2:3.4-5.el9                        baseos\ncrit.noarch  1.1-1  test\nObsoleting Packages\nfoo.x86_64 1-1 repo\n";
        let a = parse_check_update(text);
        let names: Vec<_> = a
            .iter()
            .map(|a| {
                (
                    a.name.as_str(),
                    a.arch.as_str(),
                    a.version.as_str(),
                    a.repo.as_str(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("bug", "noarch", "1.1-1", "test"),
                (
                    "very-long-package-name-that-wraps-the-column",
                    "x86_64",
                    "2:3.4-5.el9",
                    "baseos"
                ),
                ("crit", "noarch", "1.1-1", "test"),
            ]
        );
    }

    #[test]
    fn updateinfo_rows() {
        let rows = parse_updateinfo_list(
            "TEST-2026-0005 bugfix        bug-1.1-1.noarch\nTEST-2026-0001 Critical/Sec. crit-1.1-1.noarch\nRHSA-1 Important/Sec. openssl-libs-1:3.0.7-2.el9.x86_64\nnoise\n",
        );
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].classification, rows[0].severity),
            (Classification::Bugfix, Severity::Unknown)
        );
        assert_eq!(
            (
                rows[1].classification,
                rows[1].severity,
                rows[1].name.as_str()
            ),
            (Classification::Security, Severity::Critical, "crit")
        );
        assert_eq!(
            (rows[2].name.as_str(), rows[2].arch.as_str()),
            ("openssl-libs", "x86_64")
        );
    }

    #[test]
    fn dates() {
        let d = parse_updateinfo_dates(
            "  Update ID: A-1\n       Type: security\n    Updated: 2026-01-02 00:00:00\n     Issued: 2026-01-01 00:00:00\n  Update ID: B-2\n    Updated: 2026-11-20 00:00:00\n",
        );
        let a = d["A-1"]
            .duration_since(std::time::UNIX_EPOCH)
            .expect("t")
            .as_secs();
        assert_eq!(a, 1_767_225_600);
        assert!(d.contains_key("B-2"));
    }

    #[test]
    fn assembles_classification_severity_cves() {
        let available = parse_check_update("crit.noarch 1.1-1 test\nplain.noarch 1.1-1 test\n");
        let adv = parse_updateinfo_list(
            "A Critical/Sec. crit-1.1-1.noarch\nB bugfix crit-1.1-1.noarch\n",
        );
        let cves = parse_updateinfo_list(
            "CVE-2026-0001 Critical/Sec. crit-1.1-1.noarch\nCVE-2026-0002 Critical/Sec. crit-1.1-1.noarch\n",
        );
        let mut installed = HashMap::new();
        installed.insert(
            ("crit".to_string(), "noarch".to_string()),
            "1.0-1".to_string(),
        );
        let u = assemble(&available, &adv, &cves, &HashMap::new(), &installed);
        assert_eq!(u[0].classification, Classification::Security);
        assert_eq!(u[0].category, "security");
        assert_eq!(u[1].category, "");
        assert_eq!(u[0].severity, Severity::Critical);
        assert_eq!(u[0].sla, SlaClass::Critical);
        assert_eq!(u[0].advisories, ["A", "B"]);
        assert_eq!(u[0].cves, ["CVE-2026-0001", "CVE-2026-0002"]);
        assert_eq!(u[0].installed_version, "1.0-1");
        assert_eq!(
            (u[1].classification, u[1].sla),
            (Classification::Other, SlaClass::Low)
        );
    }

    #[test]
    fn repo_errors() {
        let e = parse_repo_errors(
            "Error: Failed to download metadata for repo 'broken': Cannot download repomd.xml: Curl error (37)\nError: Cache-only enabled but no cache for 'third'\nIgnoring repositories: broken, other\n",
        );
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].repo, "broken");
        assert!(e[0].error.starts_with("Cannot download repomd.xml"));
        assert_eq!(
            (e[1].repo.as_str(), e[1].error.as_str()),
            ("third", NO_CACHE)
        );
        assert_eq!(e[2].repo, "other");
    }

    #[test]
    fn nevra() {
        assert_eq!(
            nevra_name_arch("crit-1.1-1.noarch"),
            Some(("crit", "noarch"))
        );
        assert_eq!(
            nevra_name_arch("openssl-libs-1:3.0.7-2.el9.x86_64"),
            Some(("openssl-libs", "x86_64"))
        );
        assert_eq!(nevra_name_arch("nonsense"), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        proptest! {
            #[test]
            fn parsers_never_panic(s in "(?s).{0,800}") {
                let _ = parse_check_update(&s);
                let _ = parse_updateinfo_list(&s);
                let _ = parse_updateinfo_dates(&s);
                let _ = parse_repo_errors(&s);
                let _ = nevra_name_arch(&s);
            }
        }
    }
}
