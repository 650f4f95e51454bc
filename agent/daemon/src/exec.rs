//! The one place the agent spawns processes.
//!
//! Every child gets `LC_ALL=C` (parsers depend on English output; osconfig #647), stdin from
//! /dev/null, `DEBIAN_FRONTEND=noninteractive` and `NEEDRESTART_MODE=l` (no prompt can hang us;
//! salt #23663, calico #12136), none of the systemd notification variables (a child must not
//! speak for the agent), its own process group, and a deadline after which the whole group is
//! killed (osconfig #726: 15 days inside `apt-get update`). argv never goes through a shell. The
//! argv, exit status and the tail of stderr are kept for error messages.

use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bytes of stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// A command to run: program, arguments, extra environment and a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout,
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// The command line as a user would type it, for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            if a.is_empty()
                || a.contains(|c: char| c.is_whitespace() || "'\"$;&|<>()`\\".contains(c))
            {
                s.push('\'');
                s.push_str(&a.replace('\'', "'\\''"));
                s.push('\'');
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The last lines of stderr, for error messages.
    pub fn stderr_tail(&self) -> &str {
        tail(&self.stderr, STDERR_TAIL)
    }
}

/// Why a command did not produce an [`Output`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{cmd}` did not finish within {timeout:?}; its process group was killed. stderr: {stderr_tail}"
    )]
    Timeout {
        cmd: String,
        timeout: Duration,
        stderr_tail: String,
    },
    #[error("`{cmd}` failed while running: {source}")]
    Io {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// A command that ran but exited with a status the caller did not accept.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{cmd}` exited with {status}: {stderr_tail}")]
pub struct Failed {
    pub cmd: String,
    pub status: String,
    pub stderr_tail: String,
}

impl Failed {
    pub fn new(cmd: &Cmd, out: &Output) -> Self {
        Self {
            cmd: cmd.display(),
            status: out
                .code()
                .map_or_else(|| out.status.to_string(), |c| format!("code {c}")),
            stderr_tail: out.stderr_tail().trim().to_string(),
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Variables a child must not inherit.
const SCRUBBED: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LANGUAGE",
    "LANG",
];

/// Runs a command to completion (or its deadline), capturing stdout and stderr.
pub async fn run(cmd: &Cmd) -> Result<Output, ExecError> {
    run_streaming(cmd, None).await
}

/// Like [`run`], and also sends each stdout line to `lines` as it is printed.
///
/// Output goes to unlinked temporary files, not pipes: a package manager whose parent (the
/// agent) stops mid-run, as it does when a job upgrades the agent's own package and systemd
/// restarts it, keeps writing to a file instead of dying of SIGPIPE half-way through dpkg.
pub async fn run_streaming(
    cmd: &Cmd,
    lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<Output, ExecError> {
    let started = Instant::now();
    let io_err = |source| ExecError::Io {
        cmd: cmd.display(),
        source,
    };
    let (out_file, out_child) = capture_file().map_err(io_err)?;
    let (err_file, err_child) = capture_file().map_err(io_err)?;
    let mut c = tokio::process::Command::new(&cmd.program);
    c.args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_child))
        .stderr(Stdio::from(err_child))
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("NEEDRESTART_MODE", "l")
        .env("APT_LISTCHANGES_FRONTEND", "none")
        .process_group(0)
        // Never kill on drop: a package manager must outlive an agent that stops mid-run;
        // deadlines kill the process group explicitly.
        .kill_on_drop(false);
    for k in SCRUBBED {
        c.env_remove(k);
    }
    for (k, v) in &cmd.env {
        c.env(k, v);
    }
    let mut child = c.spawn().map_err(|source| ExecError::Spawn {
        cmd: cmd.display(),
        source,
    })?;
    // The child holds its own copies of the files now.
    drop(c);
    let pgid = child.id();
    let mut stdout = Capture::new(out_file);
    let mut stderr = Capture::new(err_file);
    let deadline = tokio::time::sleep(cmd.timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(io_err)?,
            () = &mut deadline => {
                if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
                    // The whole group: package managers fork helpers (methods, maintainer scripts).
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait().await;
                stderr.pump(None);
                return Err(ExecError::Timeout {
                    cmd: cmd.display(),
                    timeout: cmd.timeout,
                    stderr_tail: tail(&stderr.all, STDERR_TAIL).trim().to_string(),
                });
            }
            _ = tick.tick(), if lines.is_some() => stdout.pump(lines.as_ref()),
        }
    };
    stdout.pump(lines.as_ref());
    stdout.finish(lines.as_ref());
    stderr.pump(None);
    stderr.finish(None);
    Ok(Output {
        status,
        stdout: stdout.all,
        stderr: stderr.all,
        elapsed: started.elapsed(),
    })
}

/// Most output kept from one stream; package lists of very large hosts fit many times over.
const MAX_CAPTURE: u64 = 64 * 1024 * 1024;

/// An unlinked file opened for appending (the child's copy) and reading (ours, by offset).
fn capture_file() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".patch-agent-out-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&path);
                let child = f.try_clone()?;
                return Ok((f, child));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads what a child appended to its capture file so far.
struct Capture {
    file: std::fs::File,
    offset: u64,
    all: String,
    /// Bytes after the last complete line, not yet sent.
    partial: Vec<u8>,
}

impl Capture {
    fn new(file: std::fs::File) -> Self {
        Self {
            file,
            offset: 0,
            all: String::new(),
            partial: Vec::new(),
        }
    }

    /// Reads new output; sends each complete line.
    fn pump(&mut self, lines: Option<&tokio::sync::mpsc::UnboundedSender<String>>) {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 * 1024];
        while self.offset < MAX_CAPTURE {
            let n = match self.file.read_at(&mut buf, self.offset) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf[..n]);
            while let Some(i) = memchr::memchr(b'\n', &self.partial) {
                let line: Vec<u8> = self.partial.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                self.all.push_str(&text);
                if let Some(tx) = lines {
                    let _ = tx.send(text.trim_end().to_string());
                }
            }
        }
    }

    /// The last line, if it had no newline.
    fn finish(&mut self, lines: Option<&tokio::sync::mpsc::UnboundedSender<String>>) {
        if !self.partial.is_empty() {
            let text = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.all.push_str(&text);
            if let Some(tx) = lines {
                let _ = tx.send(text.trim_end().to_string());
            }
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn environment_is_controlled() {
        let out = run(&Cmd::new("/usr/bin/env", Duration::from_secs(5)).env("EXTRA", "1"))
            .await
            .expect("env");
        assert!(out.status.success());
        for want in [
            "LC_ALL=C",
            "DEBIAN_FRONTEND=noninteractive",
            "NEEDRESTART_MODE=l",
            "EXTRA=1",
        ] {
            assert!(
                out.stdout.lines().any(|l| l == want),
                "{want} missing: {}",
                out.stdout
            );
        }
        assert!(!out.stdout.contains("NOTIFY_SOCKET="));
    }

    #[tokio::test]
    async fn stdin_is_dev_null_and_argv_is_not_a_shell() {
        let out = run(&Cmd::new("/bin/cat", Duration::from_secs(5)))
            .await
            .expect("cat");
        assert!(out.status.success() && out.stdout.is_empty());
        let out = run(&Cmd::new("/bin/echo", Duration::from_secs(5)).arg("$(id);`id`"))
            .await
            .expect("echo");
        assert_eq!(out.stdout.trim(), "$(id);`id`");
    }

    #[tokio::test]
    async fn streams_lines_as_they_come() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cmd = Cmd::new("/bin/sh", Duration::from_secs(5))
            .args(["-c", "echo one; sleep 0.3; echo two"]);
        let run = tokio::spawn(async move { run_streaming(&cmd, Some(tx)).await });
        let first = tokio::time::timeout(Duration::from_millis(250), rx.recv()).await;
        assert_eq!(
            first
                .expect("first line before the command ends")
                .as_deref(),
            Some("one")
        );
        assert_eq!(rx.recv().await.as_deref(), Some("two"));
        let out = run.await.expect("join").expect("run");
        assert_eq!(out.stdout, "one\ntwo\n");
    }

    #[tokio::test]
    async fn large_output_and_a_last_line_without_newline_are_kept() {
        let cmd = Cmd::new("/bin/sh", Duration::from_secs(10))
            .args(["-c", "seq 1 200000; printf tail; echo err >&2"]);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let out = run_streaming(&cmd, Some(tx)).await.expect("run");
        assert!(out.stdout.starts_with("1\n2\n") && out.stdout.ends_with("200000\ntail"));
        assert_eq!(out.stderr, "err\n");
        let mut n = 0;
        let mut last = String::new();
        while let Ok(l) = rx.try_recv() {
            n += 1;
            last = l;
        }
        assert_eq!((n, last.as_str()), (200_001, "tail"));
    }

    #[tokio::test]
    async fn deadline_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tmp");
        let marker = dir.path().join("grandchild-survived");
        // The shell forks a grandchild that would write the marker after 2 s.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let cmd = Cmd::new("/bin/sh", Duration::from_millis(300)).args(["-c", &script]);
        let t = Instant::now();
        let err = run(&cmd).await.expect_err("must time out");
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "grandchild outlived the deadline");
    }

    #[tokio::test]
    async fn failures_keep_argv_status_and_stderr() {
        let cmd = Cmd::new("/bin/sh", Duration::from_secs(5)).args(["-c", "echo boom >&2; exit 3"]);
        let out = run(&cmd).await.expect("ran");
        let f = Failed::new(&cmd, &out);
        let msg = f.to_string();
        assert!(
            msg.contains("/bin/sh -c 'echo boom >&2; exit 3'")
                && msg.contains("code 3")
                && msg.contains("boom"),
            "{msg}"
        );
        let err = run(&Cmd::new("/nonexistent/x", Duration::from_secs(1)))
            .await
            .expect_err("spawn");
        assert!(err.to_string().contains("/nonexistent/x"));
    }

    #[test]
    fn tail_respects_char_boundaries() {
        let s = "é".repeat(3000);
        let t = tail(&s, 4095);
        assert!(t.len() <= 4095 && t.chars().all(|c| c == 'é'));
    }
}
