//! The wire contract of patch-agent, shared by the daemon, the controller and `patchctl`:
//!
//! - [`proto`]: the generated protobuf and gRPC code for `proto/patchagent/v1`;
//! - [`ids`]: identifiers (host, job, label, address, package name), each checked in one place;
//! - [`time`]: protobuf timestamps checked into `SystemTime`, and display that never panics;
//! - [`packages`]: the package facts an agent reports, and [`convert`]: their pb mapping;
//! - [`job`]: the signed job envelope: signing and verification, strict decoding, validation
//!   into a [`job::ValidJob`] — the same rules at `patchctl job sign` and at the agent's door.

#![deny(unsafe_code)]

pub mod codec;
pub mod convert;
pub mod ids;
pub mod job;
pub mod packages;
pub mod proto;
pub mod time;

/// The version the binaries report (`--version`, GetStatus, Hello): the workspace's, unless the
/// build set `PATCH_AGENT_VERSION` (`packaging/build.sh` does, to build another package version).
pub const VERSION: &str = match option_env!("PATCH_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
