//! zypper backend (SLES, SLED, openSUSE Leap and Tumbleweed), with the inventory from rpm.
//!
//! Pending updates come from `zypper --xmlout list-updates`, joined with the needed patches of
//! `zypper --xmlout list-patches --with-optional` (category, severity, CVE and bugzilla
//! references, issue date, the interactive and update-stack flags) and, for which packages each
//! patch updates, the `Conflicts` of `zypper info -t patch` (a patch conflicts with every older
//! version of its packages). Scans run with `--no-refresh`; only [`PackageManager::refresh`]
//! downloads metadata. Every command runs with `--non-interactive --no-color` and
//! `ZYPP_LOCK_TIMEOUT`; exit codes are read as zypper(8) defines them ([`Exit`]).

mod parse;
mod patches;

pub use parse::*;

use super::rpm::{self, RpmRecord};
use super::{
    ApplyOptions, Package, PackageManager, PkgError, RebootState, RepoError, UpdateScan,
    lock::Lock, reboot,
};
use crate::exec::{self, Cmd, Failed, Output};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Everything the zypper backend needs to know about the host (or the root it manages).
#[derive(Debug, Clone)]
pub struct ZypperConfig {
    pub program: PathBuf,
    /// `[packages] zypper_args`: global options before every command (e.g. `--root /sb`).
    pub args: Vec<String>,
    pub rpm: PathBuf,
    /// The root zypper and rpm work on (`[packages] rpm_root`, else the `--root` of `args`);
    /// None for the host. `/run/zypp.pid` and `/run/reboot-needed` are read under it.
    pub root: Option<PathBuf>,
    /// rpm's database directory (`rpm --eval %_dbpath`), relative to the root.
    pub rpm_dbpath: PathBuf,
    pub command_timeout: Duration,
    pub refresh_timeout: Duration,
    pub lock_timeout: Duration,
    pub apply_timeout: Duration,
}

/// The root named by `--root DIR`, `--root=DIR` or `-R DIR` in zypper's global options.
pub fn root_of(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--root" || a == "-R" {
            return it.next().map(PathBuf::from);
        }
        if let Some(r) = a.strip_prefix("--root=") {
            return Some(PathBuf::from(r));
        }
    }
    None
}

impl ZypperConfig {
    fn base(&self, timeout: Duration) -> Cmd {
        Cmd::new(self.program.clone(), timeout)
            // libzypp waits this long for another holder of the zypp lock itself, as dpkg's
            // DPkg::Lock::Timeout does.
            .env("ZYPP_LOCK_TIMEOUT", self.lock_timeout.as_secs().to_string())
            .args(self.args.iter().cloned())
            .args(["--non-interactive", "--no-color"])
    }

    /// Downloads metadata for every enabled repository.
    pub fn refresh_command(&self) -> Cmd {
        self.base(self.refresh_timeout)
            .args(["--xmlout", "refresh"])
    }

    pub fn list_updates_command(&self) -> Cmd {
        self.base(self.command_timeout)
            .args(["--xmlout", "--no-refresh", "list-updates"])
    }

    /// Every needed patch, optional ones included (they are pending updates too).
    pub fn list_patches_command(&self) -> Cmd {
        self.base(self.command_timeout).args([
            "--xmlout",
            "--no-refresh",
            "list-patches",
            "--with-optional",
        ])
    }

    /// `info -t patch` for the given patches: their `Conflicts` name the packages they update.
    pub fn patch_info_command(&self, ids: &[&str]) -> Cmd {
        self.base(self.command_timeout)
            .args(["--no-refresh", "info", "-t", "patch", "--"])
            .args(ids.iter().copied())
    }

    pub fn needs_rebooting_command(&self) -> Cmd {
        self.base(self.command_timeout).arg("needs-rebooting")
    }

    /// `zypper update -- NAME` or `zypper install --oldpackage -- NAME[=VERSION]`, from the
    /// metadata the job's refresh fetched; licences agreed only when the job says so.
    pub fn apply_command(&self, op: &super::Op, opts: ApplyOptions) -> Cmd {
        self.op_command(op, opts, false)
    }

    /// The same command with `--dry-run`: the solver, licences and repositories are checked,
    /// nothing is installed.
    pub fn simulate_command(&self, op: &super::Op, opts: ApplyOptions) -> Cmd {
        self.op_command(op, opts, true)
    }

    fn op_command(&self, op: &super::Op, opts: ApplyOptions, dry_run: bool) -> Cmd {
        let cmd = self.base(self.apply_timeout).arg("--no-refresh");
        let dry = dry_run.then_some("--dry-run");
        match op {
            super::Op::Upgrade(name) => cmd
                .arg("update")
                .args(dry)
                .args(licences(opts))
                .arg("--")
                .arg(name),
            super::Op::Install { name, version } => cmd
                .arg("install")
                .args(dry)
                .args(licences(opts))
                // The exact version asked for, even below the installed one (apt and dnf jobs
                // allow downgrades the same way).
                .arg("--oldpackage")
                .arg("--")
                .arg(match version {
                    Some(v) => format!("{name}={v}"),
                    None => name.clone(),
                }),
        }
    }

    pub fn rpm_query_command(&self) -> Cmd {
        rpm::query_all_command(&self.rpm, self.root.as_deref(), self.command_timeout)
    }

    /// A path of the managed system (under the root, if there is one).
    fn system_path(&self, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        self.root.as_deref().unwrap_or(Path::new("/")).join(rel)
    }

    /// What decides zypper's patch view ([`patches::fingerprint`]): its solv caches first,
    /// then the repository definitions, zypp.conf, package locks and rpm's database.
    pub fn patch_inputs(&self) -> Vec<PathBuf> {
        let db = self.rpm_dbpath.to_string_lossy().into_owned();
        vec![
            self.system_path("/var/cache/zypp/solv"),
            self.system_path("/etc/zypp/repos.d"),
            self.system_path("/etc/zypp/zypp.conf"),
            self.system_path("/etc/zypp/locks"),
            self.system_path(&db),
        ]
    }

    /// zypper's flag for "a reboot is needed", which `zypper needs-rebooting` reads.
    pub fn reboot_flag(&self) -> PathBuf {
        self.system_path("/run/reboot-needed")
    }

    /// libzypp's lock (a pid file) and rpm's transaction lock.
    pub fn locks(&self) -> Vec<Lock> {
        let db = self.rpm_dbpath.to_string_lossy().into_owned();
        vec![
            Lock::PidFile(self.system_path("/run/zypp.pid")),
            Lock::Fcntl(self.system_path(&db).join(".rpm.lock")),
        ]
    }
}

fn licences(opts: ApplyOptions) -> Option<&'static str> {
    opts.accept_licenses.then_some("--auto-agree-with-licenses")
}

/// zypper's exit codes (zypper(8), "EXIT CODES").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok,
    /// 7: another process holds the zypp lock.
    Locked,
    /// 100, 101: updates (security updates) are needed — information, not failure.
    UpdatesNeeded,
    /// 102: done; a reboot is needed.
    RebootNeeded,
    /// 103: zypper updated itself (the update stack); run the same command again.
    RestartNeeded,
    /// 104: a package or capability asked for was not found.
    NotFound,
    /// 105: zypper was interrupted by a signal.
    Signal,
    /// 106: some repositories were skipped because they could not be read.
    ReposSkipped,
    /// 107: done, but an rpm scriptlet failed.
    ScriptFailed,
    /// Any other code (1–6, 8: errors) or death by a signal.
    Error(Option<i32>),
}

impl Exit {
    pub fn of(code: Option<i32>) -> Self {
        match code {
            Some(0) => Exit::Ok,
            Some(7) => Exit::Locked,
            Some(100 | 101) => Exit::UpdatesNeeded,
            Some(102) => Exit::RebootNeeded,
            Some(103) => Exit::RestartNeeded,
            Some(104) => Exit::NotFound,
            Some(105) => Exit::Signal,
            Some(106) => Exit::ReposSkipped,
            Some(107) => Exit::ScriptFailed,
            other => Exit::Error(other),
        }
    }
}

/// The zypper [`PackageManager`].
pub struct Zypper {
    pub config: ZypperConfig,
    /// Packages of needed patches that suggest a reboot, from the last scan. The agent updates
    /// package by package, so zypper never sees the patch being installed; once such a package
    /// is applied the agent sets zypper's reboot flag itself, as `zypper patch` would have
    /// answered 102.
    reboot_suggested: std::sync::Mutex<BTreeSet<String>>,
    /// Needed patches and their packages, kept while nothing they depend on changes.
    patches: std::sync::Mutex<patches::PatchCache>,
}

impl Zypper {
    pub fn new(config: ZypperConfig) -> Self {
        Self {
            config,
            reboot_suggested: std::sync::Mutex::default(),
            patches: std::sync::Mutex::default(),
        }
    }

    /// Sets zypper's reboot flag (what libzypp does after updating a package that needs a
    /// reboot), so the need survives an agent restart and `zypper needs-rebooting` agrees.
    fn flag_reboot(&self, why: &str) {
        let flag = self.config.reboot_flag();
        if flag.exists() {
            return;
        }
        match std::fs::write(&flag, "reboot\n") {
            Ok(()) => tracing::info!(flag = %flag.display(), why, "A reboot is needed"),
            Err(e) => {
                tracing::warn!(flag = %flag.display(), error = %e, why, "Cannot record that a reboot is needed");
            }
        }
    }

    async fn installed(&self) -> Result<Vec<RpmRecord>, PkgError> {
        rpm::installed(&self.config.rpm_query_command()).await
    }

    /// Runs a query (`--xmlout`), accepting what zypper means by success: 0, 100/101 (updates
    /// needed) and 106 (some repositories skipped: the caller reports them).
    async fn query(&self, cmd: &Cmd) -> Result<XmlStream, PkgError> {
        let out = self.read_only(cmd).await?;
        parse_xml(&out.stdout).map_err(PkgError::Parse)
    }

    /// Runs a command that changes nothing, accepting 0, 100/101 and 106 as above.
    async fn read_only(&self, cmd: &Cmd) -> Result<Output, PkgError> {
        let out = exec::run(cmd).await?;
        match Exit::of(out.code()) {
            Exit::Ok | Exit::UpdatesNeeded | Exit::ReposSkipped => Ok(out),
            Exit::Locked => Err(self.locked(cmd, &out)),
            _ => Err(failed(cmd, &out).into()),
        }
    }

    /// What a zypper run that applies (or, `dry_run`, simulates) one operation means, by its
    /// exit code (zypper(8)) and what it printed.
    fn judge(
        &self,
        op: &super::Op,
        opts: ApplyOptions,
        cmd: &Cmd,
        out: &Output,
        dry_run: bool,
    ) -> Result<(), PkgError> {
        let all = format!("{}\n{}", out.stdout, out.stderr);
        let suggested = self
            .reboot_suggested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(op.name());
        match Exit::of(out.code()) {
            Exit::Ok if suggested && !dry_run => {
                self.flag_reboot(&format!("a patch of {} suggests a reboot", op.name()));
                Ok(())
            }
            Exit::Ok => Ok(()),
            Exit::RebootNeeded if dry_run => Ok(()),
            Exit::RebootNeeded => {
                self.flag_reboot(&format!("zypper exited 102 after {}", op.name()));
                Ok(())
            }
            Exit::ScriptFailed => {
                let which = failed_scriptlets(&all);
                Err(PkgError::Operation(format!(
                    "an rpm scriptlet failed while applying {} (zypper exit 107): {}",
                    op.name(),
                    if which.is_empty() {
                        "zypper did not say which".to_string()
                    } else {
                        which.join("; ")
                    }
                )))
            }
            Exit::ReposSkipped if opts.allow_repo_errors => {
                let skipped = repo_errors(&[("error".into(), all)]);
                let repos: Vec<&str> = skipped.iter().map(|e| e.repo.as_str()).collect();
                tracing::warn!(
                    package = op.name(),
                    repos = ?repos,
                    "Repositories skipped while applying (allow_repo_errors)"
                );
                Ok(())
            }
            Exit::ReposSkipped => Err(PkgError::Operation(format!(
                "{}: zypper skipped repositories it could not read (exit 106); fix them, or sign the job with --allow-repo-errors",
                op.name()
            ))),
            Exit::NotFound => Err(PkgError::Operation(format!(
                "{}: not found in any enabled repository (zypper exit 104)",
                super::Op::name(op)
            ))),
            Exit::Locked => Err(self.locked(cmd, out)),
            _ => match licence_refusal(&all) {
                Some(why) => Err(PkgError::Operation(format!(
                    "{}: {why}; nothing was agreed on your behalf: sign the job with --accept-licenses to agree",
                    op.name()
                ))),
                None => Err(failed(cmd, out).into()),
            },
        }
    }

    /// The needed patches and the packages of each: from the last scan when neither the
    /// metadata nor the rpm database changed since ([`patches`]), else from `list-patches`
    /// and, for patches not seen before, `info -t patch`.
    async fn needed_patches(
        &self,
    ) -> Result<
        (
            Vec<XmlUpdate>,
            std::collections::HashMap<String, Vec<String>>,
        ),
        PkgError,
    > {
        let fingerprint = patches::fingerprint(&self.config.patch_inputs());
        let cache = || {
            self.patches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let kept = cache().needed(fingerprint.as_ref());
        if let Some(needed) = kept {
            let members = cache().members(&needed);
            return Ok((needed, members));
        }
        let listed = self.query(&self.config.list_patches_command()).await?;
        let needed: Vec<XmlUpdate> = listed
            .updates
            .into_iter()
            .filter(|p| p.kind == "patch" && p.status != "applied")
            .collect();
        let unknown: Vec<String> = cache()
            .unknown(&needed)
            .into_iter()
            .map(str::to_string)
            .collect();
        let info = if unknown.is_empty() {
            std::collections::HashMap::new()
        } else {
            let ids: Vec<&str> = unknown.iter().map(String::as_str).collect();
            let out = self
                .read_only(&self.config.patch_info_command(&ids))
                .await?;
            parse_patch_info(&out.stdout)
        };
        let mut c = cache();
        c.store(fingerprint, &needed, info);
        let members = c.members(&needed);
        Ok((needed, members))
    }

    /// Exit 7: names the process in the pid file, as the lock wait does.
    fn locked(&self, cmd: &Cmd, out: &Output) -> PkgError {
        let pid_file = self.config.system_path("/run/zypp.pid");
        // zypper names the holder too ("... locked by the application with pid N (zypper).");
        // the pid file is read again in case that process is still there.
        let who = match super::lock::pid_file_holder(&pid_file) {
            Ok(Some(h)) => h.to_string(),
            _ => format!("another process ({})", out.stderr_tail().trim()),
        };
        PkgError::Lock(format!(
            "`{}`: the zypp lock ({}) is held by {who}, still after {:?}; wait for that process to finish, or raise [packages] lock_timeout",
            cmd.display(),
            pid_file.display(),
            self.config.lock_timeout
        ))
    }
}

/// A failed zypper run, with what it printed: zypper writes most errors to stdout.
fn failed(cmd: &Cmd, out: &Output) -> Failed {
    let mut f = Failed::new(cmd, out);
    if f.stderr_tail.is_empty() {
        let text = out.stdout.trim();
        let start = text.len().saturating_sub(2048);
        let start = (start..=text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        f.stderr_tail = text[start..].to_string();
    }
    f
}

#[tonic::async_trait]
impl PackageManager for Zypper {
    fn name(&self) -> &'static str {
        "zypper"
    }

    async fn inventory(&self, f: &mut (dyn FnMut(Package) + Send)) -> Result<(), PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        for r in self.installed().await? {
            f(r.package);
        }
        Ok(())
    }

    async fn refresh(&self) -> Result<Vec<RepoError>, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let cmd = self.config.refresh_command();
        let out = exec::run(&cmd).await?;
        let stream = parse_xml(&out.stdout).unwrap_or_default();
        let errors = repo_errors(&stream.messages);
        match Exit::of(out.code()) {
            Exit::Ok => Ok(errors),
            Exit::Locked => Err(self.locked(&cmd, &out)),
            // zypper refresh exits 4 (ZYPP error) or 106 when some repositories failed.
            _ if !errors.is_empty() => Ok(errors),
            _ => Err(failed(&cmd, &out).into()),
        }
    }

    async fn updates(&self) -> Result<UpdateScan, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let packages = self.query(&self.config.list_updates_command()).await?;
        let mut scan = UpdateScan {
            repo_errors: repo_errors(&packages.messages),
            ..UpdateScan::default()
        };
        if packages.updates.is_empty() {
            return Ok(scan);
        }
        let (needed, members) = self.needed_patches().await?;
        scan.updates = assemble(&packages.updates, &needed, &members);
        *self
            .reboot_suggested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = scan
            .updates
            .iter()
            .filter(|u| u.flags.reboot_suggested)
            .map(|u| u.name.clone())
            .collect();
        Ok(scan)
    }

    fn locks(&self) -> Vec<Lock> {
        self.config.locks()
    }

    async fn apply(
        &self,
        op: &super::Op,
        opts: ApplyOptions,
        lines: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let cmd = self.config.apply_command(op, opts);
        let mut out = exec::run_streaming(&cmd, Some(lines.clone())).await?;
        if Exit::of(out.code()) == Exit::RestartNeeded {
            // zypper updated itself; the same command again, once, with the new zypper.
            let _ =
                lines.send("zypper updated itself (exit 103); running the command again".into());
            out = exec::run_streaming(&cmd, Some(lines.clone())).await?;
        }
        self.judge(op, opts, &cmd, &out, false)
    }

    async fn simulate(&self, op: &super::Op, opts: ApplyOptions) -> Result<bool, PkgError> {
        super::wait_for_locks(&self.config.locks(), self.config.lock_timeout).await?;
        let cmd = self.config.simulate_command(op, opts);
        let out = exec::run(&cmd).await?;
        self.judge(op, opts, &cmd, &out, true)?;
        Ok(true)
    }

    async fn reboot_required(&self, boot_time: SystemTime) -> RebootState {
        let flag = self.config.reboot_flag();
        let cmd = self.config.needs_rebooting_command();
        if let Ok(out) = exec::run(&cmd).await
            && let Some(state) = reboot::from_zypper(out.code(), &out.stdout, &flag)
        {
            return state;
        }
        // An old zypper without needs-rebooting: its flag, then the core-package rule.
        if flag.exists() {
            return reboot::zypper_flag(&flag);
        }
        reboot::core_packages(self.installed().await, boot_time)
    }
}

#[cfg(test)]
mod tests;
