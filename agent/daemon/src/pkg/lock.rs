//! Waiting for package-manager locks, and naming who holds them.
//!
//! dpkg, apt and rpm take POSIX record locks (`fcntl(F_SETLK)`) on their lock files; `F_GETLK`
//! tells whether a lock is held and by which pid, without taking it. The agent waits up to
//! `[packages] lock_timeout` for the lock to be free before it scans or applies, then fails with
//! the holder's pid and command name (ansible #51663, salt #60627, osconfig #827).
//!
//! libzypp does not lock a file: it writes its pid to `/run/zypp.pid` and treats the lock as
//! held while that process lives ([`Lock::PidFile`]).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    /// The holder's command name from /proc, when readable.
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.comm.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.comm)
        }
    }
}

/// A package manager's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// A POSIX record lock on the file (dpkg, apt, rpm).
    Fcntl(PathBuf),
    /// A file holding the pid of the process that owns the lock, held while that process lives
    /// (libzypp's `/run/zypp.pid`).
    PidFile(PathBuf),
}

impl Lock {
    pub fn path(&self) -> &Path {
        match self {
            Lock::Fcntl(p) | Lock::PidFile(p) => p,
        }
    }

    /// Who holds it now, if anyone.
    pub fn holder(&self) -> std::io::Result<Option<Holder>> {
        match self {
            Lock::Fcntl(p) => holder(p),
            Lock::PidFile(p) => pid_file_holder(p),
        }
    }
}

/// The live process named in a pid file, other than this one. A missing or empty file, or a
/// pid whose process is gone, is an unheld lock (libzypp's own rule).
pub fn pid_file_holder(path: &Path) -> std::io::Result<Option<Holder>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(None);
    };
    if pid <= 0 || pid == std::process::id() as i32 {
        return Ok(None);
    }
    let comm = match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(c) => c.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => String::new(),
    };
    // A zombie has released everything it held.
    if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    }) {
        return Ok(None);
    }
    Ok(Some(Holder { pid, comm }))
}

/// The holder of a write lock on `path`, if any. A missing file is an unheld lock.
pub fn holder(path: &Path) -> std::io::Result<Option<Holder>> {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;
    let file = match std::fs::OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut query = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(file.as_fd(), FcntlArg::F_GETLK(&mut query)).map_err(std::io::Error::from)?;
    if query.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", query.l_pid))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Ok(Some(Holder {
        pid: query.l_pid,
        comm,
    }))
}

/// Waits until none of `paths` is locked, or fails after `timeout` naming the holder.
pub async fn wait_free(locks: &[Lock], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        let mut held = None;
        for l in locks {
            let p = l.path();
            match l.holder() {
                Ok(Some(h)) => {
                    held = Some((p, h));
                    break;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot check the lock {}: {e}", p.display())),
            }
        }
        let Some((path, h)) = held else { return Ok(()) };
        if Instant::now() >= deadline {
            return Err(format!(
                "{} is held by {h} and was not released within {timeout:?}; wait for that process to finish, or raise [packages] lock_timeout",
                path.display()
            ));
        }
        if !logged {
            tracing::info!(lock = %path.display(), holder = %h, "Waiting for package manager lock");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[tokio::test]
    async fn names_the_pid_holding_the_lock() {
        let dir = tempfile::tempdir().expect("tmp");
        let lock = dir.path().join("lock-frontend");
        assert_eq!(holder(&lock).expect("missing"), None);
        std::fs::write(&lock, "").expect("create");
        assert_eq!(holder(&lock).expect("free"), None);
        let script = format!(
            "import fcntl,sys,time\nf=open('{}','w')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('locked',flush=True)\ntime.sleep(30)",
            lock.display()
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
            &mut line,
        )
        .expect("read");
        let h = holder(&lock).expect("query").expect("held");
        assert_eq!(h.pid, child.id() as i32);
        let locks = [Lock::Fcntl(lock)];
        let err = wait_free(&locks, Duration::from_millis(300))
            .await
            .expect_err("held");
        assert!(err.contains(&format!("pid {}", child.id())), "{err}");
        let _ = child.kill();
        let _ = child.wait();
        wait_free(&locks, Duration::from_secs(2))
            .await
            .expect("released");
    }

    #[tokio::test]
    async fn a_pid_file_is_held_while_its_process_lives() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("zypp.pid");
        let lock = [Lock::PidFile(file.clone())];
        wait_free(&lock, Duration::ZERO).await.expect("missing");
        std::fs::write(&file, format!("{}\n", std::process::id())).expect("w");
        wait_free(&lock, Duration::ZERO).await.expect("our own pid");
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        std::fs::write(&file, format!("{}\n", child.id())).expect("w");
        let err = wait_free(&lock, Duration::from_millis(300))
            .await
            .expect_err("held");
        assert!(
            err.contains(&format!("pid {} (sleep)", child.id())) && err.contains("zypp.pid"),
            "{err}"
        );
        let _ = child.kill();
        let _ = child.wait();
        wait_free(&lock, Duration::from_secs(2))
            .await
            .expect("the process is gone");
        std::fs::write(&file, "garbage").expect("w");
        wait_free(&lock, Duration::ZERO).await.expect("no pid");
    }
}
