//! The controller's end of the control channels (`patchagent.v1.Controller/Connect`): the
//! [`Hub`] knows which hosts are connected now and pushes signed jobs down their streams,
//! waiting for each agent's admission.
//!
//! A host has at most one channel: a new one (the agent reconnected before the old connection
//! timed out) replaces the old. The database records when a channel opens and closes, so
//! `patchctl hosts list` shows connected hosts and when each was last seen.

use crate::store::Store;
use patch_agent_wire::proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

/// Deliveries queued to one agent before pushes wait.
const QUEUE: usize = 16;

/// How long an agent has to send its hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A counter bumped at every event a waiting rollout may care about (a channel opened or
/// closed, a job result stored, an operator's command); waiters re-read the database.
#[derive(Clone)]
pub struct Wake(Arc<watch::Sender<u64>>);

impl Default for Wake {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Wake {
    pub fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Boxed: a channel's queue allocates its slots up front (a block of 32), so each slot is a
/// pointer rather than a whole message.
type Outbound = mpsc::Sender<Box<pb::ControllerMessage>>;

/// One agent's open channel.
struct Conn {
    id: u64,
    labels: BTreeMap<String, String>,
    tx: Outbound,
    pending: Mutex<HashMap<u64, oneshot::Sender<pb::Admission>>>,
    next_delivery: AtomicU64,
}

/// Why a push got no admission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the host is not connected")]
    NotConnected,
    #[error("the host's channel closed before it answered")]
    Lost,
    #[error("the host did not answer within {0:?}")]
    Timeout(Duration),
}

/// The connected hosts.
pub struct Hub {
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    next_conn: AtomicU64,
    pub wake: Wake,
    /// This controller, as the database knows it among replicas.
    pub replica: String,
    /// How pushes reach hosts other replicas hold (PostgreSQL only).
    relay: std::sync::OnceLock<Arc<crate::relay::Relay>>,
}

impl Hub {
    pub fn new(wake: Wake, replica: String) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            wake,
            replica,
            relay: std::sync::OnceLock::new(),
        }
    }

    /// Pushes for hosts not connected here go through `relay`.
    pub fn set_relay(&self, relay: Arc<crate::relay::Relay>) {
        let _ = self.relay.set(relay);
    }

    /// True when pushes can reach hosts connected to other replicas.
    pub fn relays(&self) -> bool {
        self.relay.get().is_some()
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Conn>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.conns().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.conns().contains_key(host)
    }

    /// Connected hosts and their labels, sorted by host id.
    pub fn connected(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let mut v: Vec<_> = self
            .conns()
            .iter()
            .map(|(h, c)| (h.clone(), c.labels.clone()))
            .collect();
        v.sort();
        v
    }

    /// Sends a signed job to `host`, here or through the replica that holds its channel, and
    /// waits for its admission.
    pub async fn push(
        &self,
        host: &str,
        job: pb::SignedJob,
        timeout: Duration,
    ) -> Result<pb::Admission, PushError> {
        if !self.is_connected(host)
            && let Some(relay) = self.relay.get()
        {
            return relay.push(host, &job, timeout).await;
        }
        self.push_local(host, job, timeout).await
    }

    /// Sends a signed job down this controller's channel to `host`.
    pub async fn push_local(
        &self,
        host: &str,
        job: pb::SignedJob,
        timeout: Duration,
    ) -> Result<pb::Admission, PushError> {
        let conn = self
            .conns()
            .get(host)
            .cloned()
            .ok_or(PushError::NotConnected)?;
        let id = conn.next_delivery.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, tx);
        let msg = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Delivery(pb::Delivery {
                delivery_id: id,
                job: Some(job),
            })),
        };
        let answer = async {
            conn.tx
                .send(Box::new(msg))
                .await
                .map_err(|_| PushError::Lost)?;
            rx.await.map_err(|_| PushError::Lost)
        };
        let result = tokio::time::timeout(timeout, answer)
            .await
            .unwrap_or(Err(PushError::Timeout(timeout)));
        conn.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        result
    }

    /// Registers a new channel, replacing the host's old one.
    fn register(&self, host: &str, labels: BTreeMap<String, String>, tx: Outbound) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            labels,
            tx,
            pending: Mutex::new(HashMap::new()),
            next_delivery: AtomicU64::new(1),
        });
        if let Some(old) = self.conns().insert(host.to_string(), conn.clone()) {
            tracing::info!(host, "A new control channel replaces the host's old one");
            // Its pushes end as Lost when their senders drop with it.
            old.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
        self.wake.bump();
        conn
    }

    /// Removes the channel if it is still the host's current one; true when it was.
    fn unregister(&self, host: &str, id: u64) -> bool {
        let mut conns = self.conns();
        let current = conns.get(host).is_some_and(|c| c.id == id);
        if current {
            conns.remove(host);
        }
        drop(conns);
        self.wake.bump();
        current
    }
}

pub type ConnectStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ControllerMessage, Status>> + Send>,
>;

/// Serves one `Connect`: waits for the hello, checks the host, registers the channel, and
/// reads admissions until the stream ends.
pub async fn serve(
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    names: Result<Vec<String>, Status>,
    mut inbound: tonic::Streaming<pb::AgentMessage>,
) -> Result<ConnectStream, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded("no ChannelHello within 10s of opening the channel")
        })??;
    let Some(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    }) = first
    else {
        return Err(Status::invalid_argument(
            "the first message on the control channel must be a ChannelHello",
        ));
    };
    crate::authorize_names(names?, &hello.host_id)?;
    crate::check_labels(&hello.labels)?;
    if hello.agent_version.len() > 64 {
        return Err(Status::invalid_argument(
            "agent_version is at most 64 bytes",
        ));
    }
    let host = hello.host_id.clone();
    store
        .channel_opened(
            host.clone(),
            hub.replica.clone(),
            hello.labels.clone(),
            hello.agent_version.clone(),
            crate::now(),
        )
        .await
        .map_err(crate::stored)?
        .map_err(crate::revoked)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let conn = hub.register(&host, hello.labels.into_iter().collect(), tx);
    tracing::info!(host = %host, connected = hub.len(), "Control channel open");
    tokio::spawn(async move {
        let why = loop {
            match inbound.message().await {
                Ok(Some(pb::AgentMessage {
                    message: Some(pb::agent_message::Message::Admission(a)),
                })) => {
                    let waiter = conn
                        .pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&a.delivery_id);
                    if let Some(w) = waiter {
                        let _ = w.send(a);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break "closed by the agent".to_string(),
                Err(s) => break format!("{:?}: {}", s.code(), s.message()),
            }
        };
        if hub.unregister(&host, conn.id) {
            if let Err(e) = store
                .channel_closed(host.clone(), hub.replica.clone(), crate::now())
                .await
            {
                tracing::warn!(host = %host, error = %e, "Cannot record the closed channel");
            }
            tracing::info!(host = %host, reason = %why, connected = hub.len(), "Control channel closed");
        }
    });
    use tokio_stream::StreamExt;
    Ok(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| Ok(*m)),
    ))
}
