//! apt/dpkg backend (Debian, Ubuntu): pure command builders and parsers, and the
//! [`PackageManager`] that runs them.
//!
//! Pending updates come from a simulation (`apt-get -s dist-upgrade`, or `upgrade`), parsed
//! from its `Inst` lines. An update is security when its candidate comes from a security suite
//! (Debian's `Debian-Security` label or any `*-security` suite, Ubuntu's `<codename>-security`).
//! dpkg holds are reported as held, not pending; Ubuntu's phased updates that apt defers are
//! reported as held with reason "phased".

use super::{
    Classification, HeldUpdate, Package, PackageManager, PkgError, RebootState, RepoError,
    Severity, SlaClass, Update, UpdateScan, dpkg,
};
use crate::exec::{self, Cmd, Failed};
use patch_agent_wire::ids::valid_debian_name as valid_name;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Which apt operation defines "pending".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeMode {
    DistUpgrade,
    Upgrade,
}

impl UpgradeMode {
    fn verb(self) -> &'static str {
        match self {
            UpgradeMode::DistUpgrade => "dist-upgrade",
            UpgradeMode::Upgrade => "upgrade",
        }
    }
}

/// Everything the apt backend needs to know about the host (or the root it manages).
#[derive(Debug, Clone)]
pub struct AptConfig {
    pub apt_get: PathBuf,
    pub apt_cache: PathBuf,
    /// Exported as `APT_CONFIG` for every apt command when set.
    pub apt_config: Option<PathBuf>,
    /// Passed as `-o VALUE` to every apt command.
    pub options: Vec<String>,
    pub dpkg_status: PathBuf,
    pub upgrade_mode: UpgradeMode,
    pub reboot_required_file: PathBuf,
    pub command_timeout: Duration,
    pub refresh_timeout: Duration,
    pub lock_timeout: Duration,
    pub dpkg: PathBuf,
    /// Extra arguments for direct dpkg calls (`--root=...`).
    pub dpkg_args: Vec<String>,
    pub apply_timeout: Duration,
}

impl AptConfig {
    /// `apt-get -y ... install [--only-upgrade] -- NAME[=VERSION]`: one package, never a prompt,
    /// old conffiles kept, apt itself waiting for dpkg's lock up to `lock_timeout`.
    pub fn apply_command(&self, op: &super::Op) -> Cmd {
        let mut cmd = self
            .base(&self.apt_get, self.apply_timeout)
            .args(["-y", "-q", "-o"])
            .arg(format!(
                "DPkg::Lock::Timeout={}",
                self.lock_timeout.as_secs()
            ))
            .args([
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                "install",
            ]);
        match op {
            super::Op::Upgrade(name) => cmd = cmd.args(["--only-upgrade", "--"]).arg(name.clone()),
            super::Op::Install { name, version } => {
                cmd = cmd.args(["--allow-downgrades", "--"]);
                cmd = cmd.arg(match version {
                    Some(v) => format!("{name}={v}"),
                    None => name.clone(),
                });
            }
        }
        cmd
    }

    fn dpkg_command(&self, args: &[&str], timeout: Duration) -> Cmd {
        let admindir = self
            .dpkg_status
            .parent()
            .map_or_else(|| "/var/lib/dpkg".to_string(), |d| d.display().to_string());
        Cmd::new(self.dpkg.clone(), timeout)
            .args(self.dpkg_args.iter().cloned())
            .arg(format!("--admindir={admindir}"))
            .args(args.iter().copied())
    }

    /// `dpkg --audit`: lists half-installed or half-configured packages.
    pub fn audit_command(&self) -> Cmd {
        self.dpkg_command(&["--audit"], self.command_timeout)
    }

    /// `dpkg --configure -a` with the same conffile policy as the apply commands.
    pub fn configure_pending_command(&self) -> Cmd {
        self.dpkg_command(
            &["--force-confdef", "--force-confold", "--configure", "-a"],
            self.apply_timeout,
        )
    }
    fn base(&self, program: &std::path::Path, timeout: Duration) -> Cmd {
        let mut cmd = Cmd::new(program, timeout);
        if let Some(cfg) = &self.apt_config {
            cmd = cmd.env("APT_CONFIG", cfg.display().to_string());
        }
        for o in &self.options {
            cmd = cmd.arg("-o").arg(o.clone());
        }
        cmd
    }

    /// `apt-get update`.
    pub fn update_command(&self) -> Cmd {
        self.base(&self.apt_get, self.refresh_timeout)
            .args(["-q", "update"])
    }

    /// The simulation whose `Inst` lines are the pending updates.
    pub fn simulate_command(&self) -> Cmd {
        self.base(&self.apt_get, self.command_timeout)
            .args([
                "-q",
                "-s",
                "-o",
                "APT::Get::Show-User-Simulation-Note=false",
            ])
            .arg(self.upgrade_mode.verb())
    }

    /// `apt-cache policy` for the named packages (names validated by the caller).
    pub fn policy_command(&self, names: &[String]) -> Cmd {
        self.base(&self.apt_cache, self.command_timeout)
            .arg("policy")
            .args(names.iter().cloned())
    }

    /// dpkg's lock files for the database apt is pointed at.
    pub fn locks(&self) -> Vec<super::lock::Lock> {
        let dir = self
            .dpkg_status
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/dpkg"));
        vec![
            super::lock::Lock::Fcntl(dir.join("lock-frontend")),
            super::lock::Lock::Fcntl(dir.join("lock")),
        ]
    }
}

/// One `Inst` line of a simulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inst {
    pub name: String,
    /// Empty for a newly installed package.
    pub installed: String,
    pub candidate: String,
    /// `Label:Version/Suite` entries.
    pub origins: Vec<String>,
    pub arch: String,
}

/// What a simulation says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Simulation {
    pub installs: Vec<Inst>,
    /// "The following packages have been kept back:".
    pub kept_back: Vec<String>,
    /// "The following upgrades have been deferred due to phasing:".
    pub phased: Vec<String>,
}

/// Parses `apt-get -s` output.
pub fn parse_simulation(text: &str) -> Simulation {
    let mut sim = Simulation::default();
    let mut section: Option<&mut Vec<String>> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Inst ") {
            section = None;
            if let Some(inst) = parse_inst(rest) {
                sim.installs.push(inst);
            }
            continue;
        }
        if line.starts_with("The following upgrades have been deferred due to phasing") {
            section = Some(&mut sim.phased);
            continue;
        }
        if line.starts_with("The following packages have been kept back") {
            section = Some(&mut sim.kept_back);
            continue;
        }
        match (&mut section, line.starts_with(' ')) {
            (Some(list), true) => list.extend(line.split_whitespace().map(str::to_string)),
            _ => section = None,
        }
    }
    sim
}

/// `NAME [OLD] (NEW ORIGIN, ORIGIN [ARCH]) [...]`
fn parse_inst(rest: &str) -> Option<Inst> {
    let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut rest = rest.trim_start();
    let mut installed = String::new();
    if let Some(r) = rest.strip_prefix('[') {
        let (old, after) = r.split_once(']')?;
        installed = old.to_string();
        rest = after.trim_start();
    }
    let inner = rest.strip_prefix('(')?;
    let close = inner.find(')')?;
    let inner = &inner[..close];
    let (candidate, rest) = inner.split_once(' ').unwrap_or((inner, ""));
    let (origins, arch) = match rest
        .rfind(" [")
        .or_else(|| rest.starts_with('[').then_some(0))
    {
        Some(i) => {
            let arch = rest[i..]
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']');
            (&rest[..i], arch.to_string())
        }
        None => (rest, String::new()),
    };
    let name = name.split(':').next().unwrap_or(name).to_string();
    if name.is_empty() || candidate.is_empty() {
        return None;
    }
    Some(Inst {
        name,
        installed,
        candidate: candidate.to_string(),
        origins: origins
            .split(", ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        arch,
    })
}

/// Whether an origin entry (`Label:Version/Suite` or `Label:Suite`) is a security suite.
pub fn is_security_origin(origin: &str) -> bool {
    let (label, rest) = origin.split_once(':').unwrap_or(("", origin));
    let suite = rest.rsplit('/').next().unwrap_or(rest);
    label == "Debian-Security" || suite.ends_with("-security")
}

/// `apt-cache policy` output: (name, installed, candidate) per package.
pub fn parse_policy(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String, String)> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            if let Some(c) = current.take() {
                out.push(c);
            }
            current = Some((
                line.trim_end_matches(':').to_string(),
                String::new(),
                String::new(),
            ));
        } else if let Some(c) = current.as_mut() {
            let t = line.trim();
            if let Some(v) = t.strip_prefix("Installed:") {
                c.1 = v.trim().to_string();
            } else if let Some(v) = t.strip_prefix("Candidate:") {
                c.2 = v.trim().to_string();
            }
        }
    }
    if let Some(c) = current {
        out.push(c);
    }
    out
}

/// Per-repository failures in `apt-get update` output (`Err:N URI SUITE ...` plus the indented
/// reason on the next line; `W:`/`E: Failed to fetch` lines as a fallback).
pub fn parse_update_errors(text: &str) -> Vec<RepoError> {
    let mut out: Vec<RepoError> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("Err:") {
            let repo = rest
                .split_once(' ')
                .map_or("", |(_, r)| r)
                .trim()
                .to_string();
            let mut error = String::new();
            while let Some(next) = lines.peek() {
                if !next.starts_with(' ') {
                    break;
                }
                if !error.is_empty() {
                    error.push(' ');
                }
                error.push_str(next.trim());
                lines.next();
            }
            // apt retries each index with several compressions; one entry per index, last word.
            match out.iter_mut().find(|e| e.repo == repo) {
                Some(existing) => existing.error = error,
                None => out.push(RepoError { repo, error }),
            }
        } else if let Some(rest) = line
            .strip_prefix("E: Failed to fetch ")
            .or_else(|| line.strip_prefix("W: Failed to fetch "))
        {
            let (uri, why) = rest.split_once("  ").unwrap_or((rest, ""));
            if !out
                .iter()
                .any(|e| uri.starts_with(e.repo.split(' ').next().unwrap_or("\u{0}")))
            {
                out.push(RepoError {
                    repo: uri.trim().to_string(),
                    error: why.trim().to_string(),
                });
            }
        }
    }
    out
}

/// Turns a simulation into pending and held updates.
pub fn classify(sim: &Simulation, held: &[HeldUpdate]) -> UpdateScan {
    let mut scan = UpdateScan::default();
    for inst in &sim.installs {
        if inst.installed.is_empty() {
            // A new dependency pulled in by the upgrade, not an update of something installed.
            continue;
        }
        let security = inst.origins.iter().any(|o| is_security_origin(o));
        let classification = if security {
            Classification::Security
        } else {
            Classification::Other
        };
        let severity = Severity::Unknown;
        scan.updates.push(Update {
            name: inst.name.clone(),
            arch: inst.arch.clone(),
            installed_version: inst.installed.clone(),
            candidate_version: inst.candidate.clone(),
            origin: inst.origins.join(", "),
            classification,
            severity,
            advisories: Vec::new(),
            cves: Vec::new(),
            issued: None,
            first_seen: None,
            sla: SlaClass::of(classification, severity),
            category: String::new(),
            bug_ids: Vec::new(),
            flags: Default::default(),
        });
    }
    scan.held = held.to_vec();
    for name in &sim.phased {
        if !scan.held.iter().any(|h| &h.name == name) {
            scan.held.push(HeldUpdate {
                name: name.clone(),
                installed_version: String::new(),
                candidate_version: String::new(),
                reason: "phased".into(),
            });
        }
    }
    scan
}

/// The apt [`PackageManager`].
pub struct Apt {
    pub config: AptConfig,
}

impl Apt {
    /// dpkg holds that have a newer candidate.
    async fn held_updates(&self) -> Result<Vec<HeldUpdate>, PkgError> {
        let path = self.config.dpkg_status.clone();
        let names = tokio::task::spawn_blocking(move || dpkg::held_names(&path))
            .await
            .map_err(|e| PkgError::Parse(e.to_string()))?
            .map_err(|source| PkgError::Read {
                path: self.config.dpkg_status.display().to_string(),
                source,
            })?;
        let names: Vec<String> = names.into_iter().filter(|n| valid_name(n)).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let out = super::run_checked(&self.config.policy_command(&names), None).await?;
        Ok(parse_policy(&out.stdout)
            .into_iter()
            .filter(|(_, installed, candidate)| {
                !candidate.is_empty() && candidate != "(none)" && installed != candidate
            })
            .map(|(name, installed_version, candidate_version)| HeldUpdate {
                name,
                installed_version,
                candidate_version,
                reason: "dpkg hold".into(),
            })
            .collect())
    }
}

#[tonic::async_trait]
impl PackageManager for Apt {
    fn name(&self) -> &'static str {
        "apt"
    }

    async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        // Parse on this task: the file is read in 64 KiB blocks and each package handed out at
        // once, so a blocking read here is short and bounded.
        dpkg::read_status(&self.config.dpkg_status, &mut |p| f(p)).map_err(|source| {
            PkgError::Read {
                path: self.config.dpkg_status.display().to_string(),
                source,
            }
        })?;
        Ok(())
    }

    async fn refresh(&self) -> Result<Vec<RepoError>, PkgError> {
        let cmd = self.config.update_command();
        let out = exec::run(&cmd).await?;
        let text = format!("{}\n{}", out.stdout, out.stderr);
        let errors = parse_update_errors(&text);
        // apt-get update exits 100 when some index failed; that is a per-repository problem as
        // long as we can name the repositories. Anything else is a failure of the whole refresh.
        if !out.status.success() && errors.is_empty() {
            return Err(Failed::new(&cmd, &out).into());
        }
        Ok(errors)
    }

    async fn updates(&self) -> Result<UpdateScan, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        // The hold query is independent of the simulation: run them side by side so the scan
        // costs little more than the bare simulation.
        let simulate = self.config.simulate_command();
        let (out, held) = tokio::join!(super::run_checked(&simulate, None), self.held_updates());
        let sim = parse_simulation(&out?.stdout);
        Ok(classify(&sim, &held?))
    }

    async fn reboot_required(&self, _boot_time: SystemTime) -> RebootState {
        super::reboot::debian(&self.config.reboot_required_file)
    }

    fn locks(&self) -> Vec<super::lock::Lock> {
        self.config.locks()
    }

    async fn repair(&self) -> Result<Option<String>, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let audit = exec::run(&self.config.audit_command()).await?;
        let findings = format!("{}{}", audit.stdout, audit.stderr);
        if audit.status.success() && findings.trim().is_empty() {
            return Ok(None);
        }
        let cmd = self.config.configure_pending_command();
        let out = super::run_checked(&cmd, None).await?;
        let _ = out;
        Ok(Some(format!(
            "dpkg --audit reported an interrupted run; ran `{}`",
            cmd.display()
        )))
    }

    async fn apply(
        &self,
        op: &super::Op,
        _opts: super::ApplyOptions,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError> {
        let cmd = self.config.apply_command(op);
        super::run_checked(&cmd, Some(lines)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIM: &str = "Reading package lists...\nBuilding dependency tree...\nCalculating upgrade...\nThe following packages have been kept back:\n  gamma delta\nThe following upgrades have been deferred due to phasing:\n  eps\nThe following packages will be upgraded:\n  alpha beta\n2 upgraded, 1 newly installed, 0 to remove and 1 not upgraded.\nInst alpha [1.0] (1.1 Test:bookworm [all])\nInst libssl3:amd64 [3.0.11-1~deb12u1] (3.0.11-1~deb12u2 Debian:12.5/stable, Debian-Security:12/stable-security [amd64]) []\nInst newdep (2.0 Debian:12.5/stable [amd64])\nInst ubu [1] (2 Ubuntu:22.04/jammy-security [amd64])\nConf alpha (1.1 Test:bookworm [all])\n";

    #[test]
    fn simulation() {
        let sim = parse_simulation(SIM);
        assert_eq!(sim.kept_back, ["gamma", "delta"]);
        assert_eq!(sim.phased, ["eps"]);
        assert_eq!(sim.installs.len(), 4);
        let ssl = &sim.installs[1];
        assert_eq!(ssl.name, "libssl3");
        assert_eq!(ssl.installed, "3.0.11-1~deb12u1");
        assert_eq!(ssl.candidate, "3.0.11-1~deb12u2");
        assert_eq!(
            ssl.origins,
            ["Debian:12.5/stable", "Debian-Security:12/stable-security"]
        );
        assert_eq!(ssl.arch, "amd64");
        assert_eq!(sim.installs[2].installed, "");
        let scan = classify(&sim, &[]);
        let classes: Vec<_> = scan
            .updates
            .iter()
            .map(|u| (u.name.as_str(), u.classification, u.sla))
            .collect();
        assert_eq!(
            classes,
            [
                ("alpha", Classification::Other, SlaClass::Low),
                ("libssl3", Classification::Security, SlaClass::High),
                ("ubu", Classification::Security, SlaClass::High),
            ]
        );
        assert_eq!(scan.held[0].reason, "phased");
    }

    #[test]
    fn security_origins() {
        assert!(is_security_origin("Debian-Security:12/stable-security"));
        assert!(is_security_origin("Debian-Security:bookworm-security"));
        assert!(is_security_origin("Ubuntu:22.04/jammy-security"));
        assert!(!is_security_origin("Ubuntu:22.04/jammy-updates"));
        assert!(!is_security_origin("Debian:12.5/stable"));
        assert!(!is_security_origin("Evil:security-not"));
    }

    #[test]
    fn policy() {
        let p = parse_policy(
            "gamma:\n  Installed: 1.0\n  Candidate: 2.0\n  Version table:\n     2.0 500\n        500 file:/x ./ Packages\n *** 1.0 100\nother:\n  Installed: (none)\n  Candidate: 3\n",
        );
        assert_eq!(
            p,
            [
                ("gamma".into(), "1.0".into(), "2.0".into()),
                ("other".into(), "(none)".into(), "3".into())
            ]
        );
    }

    #[test]
    fn update_errors() {
        let text = "Get:1 file:/ok ./ InRelease\nErr:2 file:/gone ./ Release\n  File not found - /gone/./Release.gz\nErr:2 file:/gone ./ Release\n  File not found - /gone/./Release (2: No such file or directory)\nReading package lists...\nE: The repository 'file:/gone ./ Release' does not have a Release file.\nW: Failed to fetch http://x/dists/y/InRelease  Could not resolve 'x'\n";
        let e = parse_update_errors(text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].repo, "file:/gone ./ Release");
        assert!(e[0].error.contains("File not found"));
        assert_eq!(e[1].repo, "http://x/dists/y/InRelease");
    }

    #[test]
    fn commands() {
        let cfg = AptConfig {
            apt_get: "apt-get".into(),
            apt_cache: "apt-cache".into(),
            apt_config: Some("/sb/apt.conf".into()),
            options: vec!["Dir=/sb/".into()],
            dpkg_status: "/sb/var/lib/dpkg/status".into(),
            upgrade_mode: UpgradeMode::Upgrade,
            reboot_required_file: "/run/reboot-required".into(),
            command_timeout: Duration::from_secs(60),
            refresh_timeout: Duration::from_secs(600),
            lock_timeout: Duration::from_secs(300),
            dpkg: "dpkg".into(),
            dpkg_args: vec!["--root=/sb".into()],
            apply_timeout: Duration::from_secs(1800),
        };
        let up = cfg.apply_command(&crate::pkg::Op::Upgrade("alpha".into()));
        assert_eq!(
            up.args[up.args.len() - 3..],
            ["--only-upgrade", "--", "alpha"]
        );
        assert!(up.args.contains(&"DPkg::Lock::Timeout=300".to_string()));
        assert!(
            up.args
                .contains(&"Dpkg::Options::=--force-confold".to_string())
        );
        let inst = cfg.apply_command(&crate::pkg::Op::Install {
            name: "beta".into(),
            version: Some("1.2".into()),
        });
        assert_eq!(inst.args.last().map(String::as_str), Some("beta=1.2"));
        assert_eq!(
            cfg.configure_pending_command().args,
            [
                "--root=/sb",
                "--admindir=/sb/var/lib/dpkg",
                "--force-confdef",
                "--force-confold",
                "--configure",
                "-a"
            ]
        );
        let sim = cfg.simulate_command();
        assert_eq!(
            sim.args,
            [
                "-o",
                "Dir=/sb/",
                "-q",
                "-s",
                "-o",
                "APT::Get::Show-User-Simulation-Note=false",
                "upgrade"
            ]
        );
        assert_eq!(
            sim.env,
            [("APT_CONFIG".to_string(), "/sb/apt.conf".to_string())]
        );
        assert_eq!(cfg.update_command().timeout, Duration::from_secs(600));
        assert_eq!(
            cfg.locks()[0],
            crate::pkg::lock::Lock::Fcntl(PathBuf::from("/sb/var/lib/dpkg/lock-frontend"))
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        proptest! {
            #[test]
            fn parsers_never_panic(s in "(?s).{0,1000}") {
                let _ = parse_simulation(&s);
                let _ = parse_policy(&s);
                let _ = parse_update_errors(&s);
            }
            #[test]
            fn inst_lines_never_panic(s in "Inst [ -~]{0,80}") {
                let _ = parse_simulation(&s);
            }
        }
    }
}
