//! patch-agent: a small daemon that knows a Linux host's packages and runs signed patch jobs,
//! and `patchctl`, its controller-side CLI.
//!
//! Layout: `server` translates gRPC to domain calls; `auth` decides who may call what;
//! `tls` owns certificates and their reload; `host` reads host facts; `daemon` wires it all
//! together with signals and systemd notifications; `ctl` holds the `patchctl` commands.

#![deny(unsafe_code)]

pub mod auth;
pub mod config;
pub mod controller;
pub mod ctl;
pub mod daemon;
pub mod exec;
pub mod host;
pub mod jobs;
pub mod listener;
pub mod notify;
pub mod pkg;
pub mod proto;
pub mod report;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod trusted_files;
pub mod uds_authority;

/// The agent's version, as `patch-agent --version` prints it: Cargo.toml's, unless the build
/// set `PATCH_AGENT_VERSION` (`packaging/build.sh` does, to build another package version).
pub const VERSION: &str = match option_env!("PATCH_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
