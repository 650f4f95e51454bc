//! patch-agent, the daemon: it knows a Linux host's packages and runs signed patch jobs.
//!
//! Layout: `config` reads and checks `agent.toml` (each section checks itself); `reload` says
//! which keys a SIGHUP applies and which need a restart; `host` reads host facts; `exec` runs
//! commands with timeouts; `pkg` holds the package-manager backends and the scanner; `jobs`
//! admits, queues, runs and journals jobs; `report` keeps the outbox and sends reports to the
//! controller; `convert` maps the daemon's records to pb; `server` translates gRPC to domain
//! calls; `daemon` wires it all together with signals and systemd notifications.
//! TLS, the listener, peer identity and logging come from `patch_agent_service`; the protos,
//! identifiers and the job contract from `patch_agent_wire`.

#![deny(unsafe_code)]

pub mod config;
pub mod convert;
pub mod daemon;
pub mod enroll;
pub mod exec;
pub mod host;
pub mod jobs;
pub mod metrics;
pub mod pkg;
pub mod reload;
pub mod report;
pub mod server;

pub use patch_agent_wire::VERSION;
