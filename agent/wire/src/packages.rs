//! The package facts an agent reports: installed packages, pending updates with their
//! classification, severity and SLA class, held updates, repository errors and the reboot state.
//! Agent backends produce them; the controller stores them; `crate::convert` maps them to pb.

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
    /// The vendor's own word for the kind of update (zypper patch category, dnf advisory type),
    /// before the mapping to `classification`; empty when there is none.
    pub category: String,
    /// Bug-tracker ids of its advisories.
    pub bug_ids: Vec<String>,
    /// Patch flags (zypper): what `zypper patch` would stop for, what updates the package
    /// manager itself, what suggests a reboot.
    pub flags: PatchFlags,
}

/// What a zypper patch says about how it must be installed; all false elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PatchFlags {
    /// It carries a message, a licence or a reboot suggestion (zypper's `interactive`).
    pub interactive: bool,
    /// It updates the package manager stack (`pkgmanager="true"`): applied first.
    pub update_stack: bool,
    /// It suggests a reboot once installed (zypper's `restart="true"`).
    pub reboot_suggested: bool,
}

impl Update {
    /// The key under which the scanner remembers when it first saw this update.
    pub fn seen_key(&self) -> String {
        format!("{} {} {}", self.name, self.arch, self.candidate_version)
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
