//! Pushes between replicas: a replica that must push a job to a host whose control channel
//! another replica holds stores the push in the database and `NOTIFY`s that replica; the
//! holder pushes it down the channel and stores the agent's admission, and `NOTIFY`s back.
//! Either side also looks at the database every [`SWEEP`], so a lost notice costs a little
//! time, never the push. The signed job crosses as the operator signed it: no replica can
//! change it without the agent refusing it.

use crate::channel::{Hub, PushError};
use crate::store::{Notice, RelayTask, Relayed, Store, replicas};
use patch_agent_wire::proto::v1 as pb;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// How often each side looks at the database without a notice.
const SWEEP: Duration = Duration::from_secs(1);

/// This replica's side of relayed pushes.
pub struct Relay {
    store: Arc<dyn Store>,
    me: String,
}

impl Relay {
    /// None when the store has no other replicas to relay to (SQLite).
    pub fn new(store: Arc<dyn Store>, me: String) -> Option<Arc<Self>> {
        store.notices()?;
        Some(Arc::new(Self { store, me }))
    }

    /// Pushes `job` to `host` through the replica that holds its channel.
    pub async fn push(
        &self,
        host: &str,
        job: &pb::SignedJob,
        timeout: Duration,
    ) -> Result<pb::Admission, PushError> {
        let holder = match self.store.holder(host.to_string()).await {
            Ok(Some(h)) if h != self.me => h,
            Ok(_) => return Err(PushError::NotConnected),
            Err(e) => {
                tracing::warn!(host, error = %e, "Cannot look up which controller holds the host");
                return Err(PushError::NotConnected);
            }
        };
        let mut notices = self.store.notices();
        let id = patch_agent_wire::ids::fresh_id("relay");
        let task = RelayTask {
            id: id.clone(),
            host_id: host.to_string(),
            envelope: job.encode_to_vec(),
            timeout_ms: i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
        };
        if let Err(e) = self
            .store
            .relay_put(task, holder.clone(), crate::now())
            .await
        {
            tracing::warn!(host, error = %e, "Cannot relay a push");
            return Err(PushError::Lost);
        }
        tracing::info!(host = %host, holder = %holder, relay = %id, "Push relayed to the controller that holds the host");
        // The holder's own push may take `timeout`; a little more for the two database trips.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
        loop {
            match self.store.relay_result(id.clone()).await {
                Ok(Some(Relayed::Admission { code, message })) => {
                    return Ok(pb::Admission {
                        delivery_id: 0,
                        code,
                        message,
                        status: None,
                    });
                }
                Ok(Some(Relayed::Failed(why))) => {
                    tracing::info!(host, holder = %holder, reason = %why, "The holding controller could not push");
                    return Err(PushError::Lost);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(relay = %id, error = %e, "Cannot read a relay's answer"),
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.store.relay_cancel(id).await;
                return Err(PushError::Timeout(timeout));
            }
            wait(&mut notices, replicas::RELAY_DONE, &id).await;
        }
    }

    /// Carries out the pushes other replicas relay to this one, for the life of the process.
    pub async fn serve(self: Arc<Self>, hub: Arc<Hub>) {
        let mut notices = self.store.notices();
        loop {
            match self.store.relay_take(self.me.clone(), crate::now()).await {
                Ok(tasks) => {
                    for t in tasks {
                        let (this, hub) = (self.clone(), hub.clone());
                        tokio::spawn(async move { this.carry(&hub, t).await });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Cannot read relayed pushes"),
            }
            let me = self.me.clone();
            wait(&mut notices, replicas::RELAY, &me).await;
        }
    }

    async fn carry(&self, hub: &Hub, t: RelayTask) {
        let answer = match pb::SignedJob::decode(t.envelope.as_slice()) {
            Err(e) => Relayed::Failed(format!("the relayed job does not decode: {e}")),
            Ok(job) => {
                let timeout = Duration::from_millis(u64::try_from(t.timeout_ms).unwrap_or(0))
                    .min(crate::rollouts::ADMIT_TIMEOUT);
                match hub.push_local(&t.host_id, job, timeout).await {
                    Ok(a) => Relayed::Admission {
                        code: a.code,
                        message: a.message,
                    },
                    Err(e) => Relayed::Failed(e.to_string()),
                }
            }
        };
        tracing::debug!(relay = %t.id, host = %t.host_id, ?answer, "Relayed push carried out");
        if let Err(e) = self.store.relay_answer(t.id, answer, crate::now()).await {
            tracing::warn!(host = %t.host_id, error = %e, "Cannot store a relayed push's answer");
        }
    }
}

/// Waits for a notice on `channel` with `payload` (or a resync), at most [`SWEEP`].
async fn wait(notices: &mut Option<broadcast::Receiver<Notice>>, channel: &str, payload: &str) {
    let Some(rx) = notices else {
        tokio::time::sleep(SWEEP).await;
        return;
    };
    let _ = tokio::time::timeout(SWEEP, async {
        loop {
            match rx.recv().await {
                Ok(Notice::Notify {
                    channel: c,
                    payload: p,
                }) if c == channel && p == payload => {
                    return;
                }
                Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
        }
    })
    .await;
}
