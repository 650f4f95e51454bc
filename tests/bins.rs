//! Where the workspace's real binaries are, for the integration tests and benchmarks.
//!
//! The binaries belong to their own crates (`patch-agent` in agent/daemon, `patchctl` in
//! agent/cli), so Cargo does not build them for this package's tests: `scripts/test.sh` runs
//! `cargo build --workspace --bins` first. Benches run the release build, and the daemon as
//! shipped (target/agent/, from `packaging/build.sh`) when there is one. `PATCH_AGENT_BIN` and `PATCHCTL_BIN` point at other
//! builds (a release build, or the previous version for a side-by-side benchmark).

use std::path::PathBuf;

/// The profile directory the running test or bench was built into (`target/debug`,
/// `target/release`): the test executable sits in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(PathBuf::from).unwrap_or(dir)
    } else {
        dir
    }
}

fn binary(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let dir = profile_dir();
    // Benches (release) measure the daemon as shipped: the `agent` profile's build, when
    // packaging/build.sh has made one.
    if name == "patch-agent" && dir.ends_with("release") {
        let shipped = dir.with_file_name("agent").join(name);
        if shipped.is_file() {
            return shipped;
        }
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, \
         with --release for benches; scripts/test.sh does it), or set {var}",
        path.display()
    );
    path
}

/// The `patch-agent` daemon under test (`PATCH_AGENT_BIN` overrides).
pub fn agent() -> PathBuf {
    binary("patch-agent", "PATCH_AGENT_BIN")
}

/// The `patchctl` under test (`PATCHCTL_BIN` overrides).
pub fn patchctl() -> PathBuf {
    binary("patchctl", "PATCHCTL_BIN")
}
