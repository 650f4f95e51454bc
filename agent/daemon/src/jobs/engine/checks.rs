//! Hooks and checks around a job: pre- and post-hooks, post-patch checks, free space.

use super::*;

impl Engine {
    /// Runs each post-patch check until it passes or `check_timeout` has passed; the job's
    /// deadline cuts both short (a `systemctl` still running is killed with its group).
    pub(super) async fn verify(
        &self,
        id: &str,
        checks: &[patch_agent_wire::job::Check],
        job_deadline: Deadline,
    ) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + self.cfg().check_timeout;
        for check in checks {
            let mut attempts = 0;
            loop {
                attempts += 1;
                job_deadline.check(&format!("while checking {check}"))?;
                match run_check(check, job_deadline.cap(Duration::from_secs(10))).await {
                    Ok(()) => {
                        self.note(id, format!("check passed: {check}"));
                        break;
                    }
                    Err(_) if job_deadline.passed() => {
                        return Err(job_deadline.timed_out(&format!("while checking {check}")));
                    }
                    Err(e)
                        if tokio::time::Instant::now() + self.cfg().check_interval >= deadline =>
                    {
                        return Err(Stop::Failed(format!(
                            "post-patch check failed: {check}: {e} (after {attempts} attempts)"
                        )));
                    }
                    Err(e) => {
                        if attempts == 1 {
                            self.note(id, format!("check not yet passing: {check}: {e}; retrying"));
                        }
                        tokio::time::sleep(job_deadline.cap(self.cfg().check_interval)).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs hooks in order, their output into the history; the first failure stops the job.
    pub(super) async fn run_hooks(
        &self,
        id: &str,
        phase: &str,
        hooks: &[String],
        packages: &[&str],
        deadline: Deadline,
    ) -> Result<(), Stop> {
        for name in hooks {
            // Checked at admission, and again now: the file may have changed since.
            let path = crate::jobs::hooks::check_hook(&self.cfg().hooks_dir, name)
                .map_err(Stop::Failed)?;
            deadline.check(&format!("before {phase}-hook {name}"))?;
            self.note(id, format!("running {phase}-hook {name}"));
            // The hook's timeout ends with the job's: at either, exec kills its process group.
            let cmd = crate::exec::Cmd::new(path, deadline.cap(self.cfg().hook_timeout))
                .env("PATCH_AGENT_JOB_ID", id)
                .env("PATCH_AGENT_PHASE", phase)
                .env("PATCH_AGENT_PACKAGES", packages.join(" "));
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let (out, ()) = tokio::join!(
                crate::exec::run_streaming(&cmd, Some(tx)),
                self.forward_lines(id, rx, 200)
            );
            let out = match out {
                Ok(out) => out,
                Err(crate::exec::ExecError::Timeout { .. }) if deadline.passed() => {
                    return Err(deadline.timed_out(&format!(
                        "during {phase}-hook {name}; its process group was killed"
                    )));
                }
                Err(e) => return Err(Stop::Failed(format!("{phase}-hook {name}: {e}"))),
            };
            if !out.status.success() {
                let f = crate::exec::Failed::new(&cmd, &out);
                return Err(Stop::Failed(format!("{phase}-hook {name} failed: {f}")));
            }
            self.note(id, format!("{phase}-hook {name} succeeded"));
        }
        Ok(())
    }
}

/// One attempt at one check.
/// `limit` bounds the attempt (a `systemctl` past it is killed with its process group).
pub(super) async fn run_check(
    check: &patch_agent_wire::job::Check,
    limit: Duration,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unit_limit = limit;
    let limit = limit.min(Duration::from_secs(5));
    match check {
        patch_agent_wire::job::Check::Unit(unit) => {
            let cmd = crate::exec::Cmd::new("systemctl", unit_limit)
                .args(["is-active", "--quiet", "--"])
                .arg(unit.clone());
            let out = crate::exec::run(&cmd).await.map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("systemctl is-active says no ({})", out.status))
            }
        }
        patch_agent_wire::job::Check::Port(port) => {
            tokio::time::timeout(limit, tokio::net::TcpStream::connect(("127.0.0.1", *port)))
                .await
                .map_err(|_| "connection timed out".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        patch_agent_wire::job::Check::Http {
            host, port, path, ..
        } => {
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| e.to_string())?;
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: patch-agent\r\nConnection: close\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut head = [0u8; 64];
                let mut n = 0;
                while n < head.len() {
                    let r = stream
                        .read(&mut head[n..])
                        .await
                        .map_err(|e| e.to_string())?;
                    if r == 0 || head[..n + r].contains(&b'\n') {
                        n += r;
                        break;
                    }
                    n += r;
                }
                let line = String::from_utf8_lossy(&head[..n]);
                let status = line.split_whitespace().nth(1).unwrap_or("");
                if line.starts_with("HTTP/1.") && status == "200" {
                    Ok(())
                } else {
                    Err(format!(
                        "answered {:?}",
                        line.lines().next().unwrap_or("").trim()
                    ))
                }
            };
            tokio::time::timeout(limit, attempt)
                .await
                .map_err(|_| format!("no answer within {limit:?}"))?
        }
    }
}

pub(super) fn free_space(cfg: &JobsSection) -> Result<(), String> {
    for path in &cfg.free_space_paths {
        let Ok(st) = nix::sys::statvfs::statvfs(path) else {
            continue;
        };
        let free_mib = st.blocks_available() * st.fragment_size() / (1024 * 1024);
        if free_mib < cfg.min_free_mib {
            return Err(format!(
                "{} has {free_mib} MiB free, below the {} MiB floor ([jobs] min_free_mib); nothing was changed",
                path.display(),
                cfg.min_free_mib
            ));
        }
    }
    Ok(())
}
