//! Hooks a job names: files in `[jobs] hooks_dir` that must be root-owned executables no one
//! else can write, checked at admission and again before they run.

/// Checks that `dir/name` is a hook the agent may run: a regular executable file owned by root
/// and writable by no one else.
pub fn check_hook(dir: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| format!("hook {name:?}: {} cannot be read ({e})", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "hook {name:?}: {} is not a regular file",
            path.display()
        ));
    }
    // The same owner and mode rule as every file the agent trusts, with root as the owner.
    patch_agent_service::trusted_files::check_meta(
        &format!("hook {name:?}"),
        &path,
        meta.uid(),
        meta.mode(),
        0,
    )?;
    if meta.mode() & 0o100 == 0 {
        return Err(format!(
            "hook {name:?}: {} is not executable",
            path.display()
        ));
    }
    Ok(path)
}
