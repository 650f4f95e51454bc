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
    current: Mutex<Current>,
}

#[derive(Default)]
struct Current {
    generation: u64,
    conn: Option<Conn>,
    /// The address last reached: tried first next time (an agent stays with the controller it
    /// failed over to until that one fails).
    preferred: String,
}

/// A connection and where it goes.
#[derive(Clone)]
pub struct Conn {
    pub generation: u64,
    pub channel: Channel,
    pub address: String,
}

impl Link {
    pub fn new(settings: watch::Receiver<(ReportSection, TlsSection)>) -> Self {
        Self {
            settings,
            current: Mutex::new(Current::default()),
        }
    }

    /// The current connection, dialling one if there is none: the controllers in order
    /// (`[report] controller`, then `controllers`), starting with the one last reached.
    pub async fn get(&self) -> Result<Conn, String> {
        let mut current = self.current.lock().await;
        if let Some(c) = &current.conn {
            return Ok(c.clone());
        }
        let (cfg, tls) = self.settings.borrow().clone();
        let ca = cfg.ca.as_deref().unwrap_or(&tls.ca);
        let config = patch_agent_service::tls::client_config(ca, &tls.cert, &tls.key)?;
        let mut order = cfg.addresses();
        if let Some(i) = order.iter().position(|a| *a == current.preferred) {
            order.rotate_left(i);
        }
        let mut errors = Vec::new();
        for address in order {
            match dial(&cfg, config.clone(), &address, None).await {
                Ok(channel) => {
                    if !current.preferred.is_empty() && current.preferred != address {
                        tracing::warn!(from = %current.preferred, to = %address, "Failed over to another controller");
                    }
                    current.generation += 1;
                    current.preferred = address.clone();
                    let conn = Conn {
                        generation: current.generation,
                        channel,
                        address,
                    };
                    current.conn = Some(conn.clone());
                    return Ok(conn);
                }
                Err(e) => errors.push(e),
            }
        }
        Err(errors.join("; "))
    }

    /// Drops connection `generation` (a call on it failed, or the settings changed since it
    /// was made); a newer one is left alone.
    pub async fn invalidate(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.generation == generation {
            current.conn = None;
        }
    }
}

/// A connection to the controller at `address` over TLS with `config`, keepalive pings even
/// while idle. `per_call`: a deadline on every call; the shared link has none (the control
/// channel's stream lives for hours; its unary calls set their own, `[report] timeout`).
pub(super) async fn dial(
    cfg: &ReportSection,
    config: std::sync::Arc<rustls::ClientConfig>,
    address: &str,
    per_call: Option<Duration>,
) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("controller {address:?}: {e}"))?
        .connect_timeout(cfg.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(cfg.timeout)
        .keep_alive_while_idle(true);
    if let Some(t) = per_call {
        endpoint = endpoint.timeout(t);
    }
    patch_agent_service::tls::connect(endpoint, address, cfg.server_name_for(address), config)
        .await
        .map_err(|e| format!("cannot connect to {address}: {}", error_chain(&e)))
}
