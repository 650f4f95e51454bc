//! One connection to the controller, shared by the reporter and the control channel: HTTP/2
//! multiplexes the channel's long-lived stream and the reports over it. So each agent holds
//! one connection, one slot of the controller's per-address limit (which matters behind a
//! NAT, where a whole site shares one address), and one TLS session's memory on each side.
//!
//! A failed call drops the connection for both users ([`Link::invalidate`]); the next
//! [`Link::get`] dials again, reading the certificate files anew, so a renewed certificate is
//! used from the next connection on.

use super::error_chain;
use crate::config::{ReportSection, TlsSection};
use std::time::Duration;
use tokio::sync::{Mutex, watch};
use tonic::transport::{Channel, Endpoint};

/// Keepalive pings on the connection, even while idle; a peer that does not answer within
/// `[report] timeout` is dead.
const KEEPALIVE: Duration = Duration::from_secs(30);

pub struct Link {
    settings: watch::Receiver<(ReportSection, TlsSection)>,
    current: Mutex<(u64, Option<Channel>)>,
}

impl Link {
    pub fn new(settings: watch::Receiver<(ReportSection, TlsSection)>) -> Self {
        Self {
            settings,
            current: Mutex::new((0, None)),
        }
    }

    /// The current connection and its generation, dialling one if there is none.
    pub async fn get(&self) -> Result<(u64, Channel), String> {
        let mut current = self.current.lock().await;
        if let Some(c) = &current.1 {
            return Ok((current.0, c.clone()));
        }
        let (cfg, tls) = self.settings.borrow().clone();
        let channel = connect(&cfg, &tls).await?;
        current.0 += 1;
        current.1 = Some(channel.clone());
        Ok((current.0, channel))
    }

    /// Drops connection `generation` (a call on it failed, or the settings changed since it
    /// was made); a newer one is left alone.
    pub async fn invalidate(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.0 == generation {
            current.1 = None;
        }
    }
}

/// A connection to `[report] controller` with the `[tls]` certificate, files read now. No
/// per-call deadline (the control channel's stream lives for hours; unary calls set their own,
/// `[report] timeout`), and keepalive pings even while idle.
async fn connect(cfg: &ReportSection, tls: &TlsSection) -> Result<Channel, String> {
    let ca = cfg.ca.as_deref().unwrap_or(&tls.ca);
    let config = patch_agent_service::tls::client_config(ca, &tls.cert, &tls.key)?;
    let endpoint = Endpoint::from_shared(format!("http://{}", cfg.controller))
        .map_err(|e| format!("report.controller {:?}: {e}", cfg.controller))?
        .connect_timeout(cfg.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(cfg.timeout)
        .keep_alive_while_idle(true);
    patch_agent_service::tls::connect(endpoint, &cfg.controller, cfg.server_name(), config)
        .await
        .map_err(|e| format!("cannot connect to {}: {}", cfg.controller, error_chain(&e)))
}
