//! Writing what enrolment and renewal produce: all files or none.
//!
//! Every file is first written in full beside its target (`.NAME.new`, fsynced, with its final
//! mode); only when all are written are they renamed over their targets, so a failure before
//! that leaves the host exactly as it was.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One file to write: where, what, and its mode.
pub struct Planned {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
}

impl Planned {
    pub fn new(path: &Path, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.to_path_buf(),
            contents: contents.into(),
            mode,
        }
    }
}

fn staging(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.new"))
}

/// Writes every file, or none: on any failure the staged copies are removed and nothing
/// that existed is changed.
pub fn write_all(files: &[Planned]) -> Result<(), String> {
    let mut staged = Vec::new();
    let result = (|| {
        for f in files {
            if let Some(dir) = f.path.parent()
                && !dir.as_os_str().is_empty()
                && !dir.exists()
            {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            let tmp = staging(&f.path);
            let _ = std::fs::remove_file(&tmp);
            staged.push(tmp.clone());
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .open(&tmp)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            // The umask may have narrowed the mode; the key must be exactly 0600.
            file.set_permissions(std::fs::Permissions::from_mode(f.mode))
                .and_then(|()| file.write_all(&f.contents))
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for tmp in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for f in files {
        std::fs::rename(staging(&f.path), &f.path)
            .map_err(|e| format!("cannot move the new {} into place: {e}", f.path.display()))?;
    }
    let mut dirs: Vec<_> = files.iter().filter_map(|f| f.path.parent()).collect();
    dirs.dedup();
    for dir in dirs {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("a");
        std::fs::write(&a, "old").expect("write");
        // The second file's parent is a regular file: staging it fails.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").expect("write");
        let err = write_all(&[
            Planned::new(&a, "new", 0o644),
            Planned::new(&blocker.join("b"), "x", 0o600),
        ])
        .expect_err("must fail");
        assert!(err.contains("blocker"), "{err}");
        assert_eq!(std::fs::read_to_string(&a).expect("read"), "old");
        assert!(!dir.path().join(".a.new").exists());

        let key = dir.path().join("sub/key");
        write_all(&[
            Planned::new(&a, "new", 0o644),
            Planned::new(&key, "k", 0o600),
        ])
        .expect("write");
        assert_eq!(std::fs::read_to_string(&a).expect("read"), "new");
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
