//! What every patch-agent server process needs, shared by the agent daemon and the controller:
//!
//! - [`tls`]: certificates and keys loaded, checked and reloaded; TLS 1.3 client connections;
//! - [`listener`]: the TCP (mutual TLS) and Unix-socket accept loops with connection limits;
//! - [`auth`]: peer identity from the certificate or the socket's credentials, and roles;
//! - [`uds_authority`]: the local socket's `:authority` fix-up for HTTP/2 clients;
//! - [`trusted_files`]: the owner and mode rule for every file a process trusts;
//! - [`hostname`]: the host's FQDN as certificates name it;
//! - [`notify`]: systemd `sd_notify` (READY, RELOADING, STOPPING, WATCHDOG);
//! - [`telemetry`]: logging (plain or JSON), with a filter that reloads.

#![deny(unsafe_code)]

pub mod auth;
pub mod hostname;
pub mod listener;
pub mod notify;
pub mod telemetry;
pub mod tls;
pub mod trusted_files;
pub mod uds_authority;
