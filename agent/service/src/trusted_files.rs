//! Files and directories the agent trusts: whoever can write them can make the agent run code
//! as root (a hook, a trusted key, the config naming both, the journal of queued jobs). Salt
//! CVE-2020-17490 and SSM CVE-2022-29527 were loose key and sudoers files. So each must be
//! owned by the user the agent runs as and writable by nobody else, or the agent does not start.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The owner and mode of `path`, or why they are not acceptable for a file the agent trusts.
/// A path that does not exist is left to the code that needs it.
pub fn check(key: &str, path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{key}: cannot read {}: {e}", path.display())),
    };
    // A symlink is judged by what it points at, and by who could swap the link itself.
    let meta = if meta.file_type().is_symlink() {
        std::fs::metadata(path)
            .map_err(|e| format!("{key}: cannot follow {}: {e}", path.display()))?
    } else {
        meta
    };
    check_meta(
        key,
        path,
        meta.uid(),
        meta.mode(),
        nix::unistd::geteuid().as_raw(),
    )
}

/// Why `path`, owned by `uid`, is not the agent's own (`me`), if it is not.
pub fn owner_problem(path: &Path, uid: u32, me: u32) -> Option<String> {
    (uid != me).then(|| {
        format!(
            "{} is owned by uid {uid}, not by the agent's user (uid {me}); anyone who owns it can make the agent use what they like. Run `chown {me} {}`",
            path.display(),
            path.display()
        )
    })
}

/// The rule itself, on an owner and a mode: owned by `me`, not group- or world-writable.
pub fn check_meta(key: &str, path: &Path, uid: u32, mode: u32, me: u32) -> Result<(), String> {
    if let Some(why) = owner_problem(path, uid, me) {
        return Err(format!("{key}: {why}"));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "{key}: {} is writable by group or others (mode {:04o}); run `chmod go-w {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// Checks a directory and every regular file or symlink directly in it.
pub fn check_dir_and_files(key: &str, dir: &Path, ext: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = check(key, dir) {
        problems.push(e);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if ext.is_some_and(|x| path.extension().is_none_or(|e| e != x)) {
                continue;
            }
            if let Err(e) = check(key, &path) {
                problems.push(e);
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_mode_rules() {
        let p = Path::new("/x");
        assert!(check_meta("k", p, 0, 0o100600, 0).is_ok());
        assert!(check_meta("k", p, 0, 0o040755, 0).is_ok());
        let e = check_meta("k", p, 1000, 0o100600, 0).expect_err("owner");
        assert!(e.contains("uid 1000") && e.contains("chown"), "{e}");
        for mode in [0o100620, 0o100602, 0o040777, 0o040775] {
            let e = check_meta("k", p, 0, mode, 0).expect_err("mode");
            assert!(e.contains("writable") && e.contains("/x"), "{e}");
        }
    }

    #[test]
    fn missing_paths_are_left_alone() {
        assert!(check("k", Path::new("/nonexistent/patch-agent/x")).is_ok());
    }
}
