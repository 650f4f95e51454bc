//! The control channel: one long-lived mutual-TLS stream to `[report] controller`
//! (`patchagent.v1.Controller/Connect`), so a host nobody can dial still receives jobs.
//!
//! The agent opens it and says who it is; the controller sends signed envelopes down it; the
//! agent admits each exactly as `SubmitJob` does (the engine's own admission: signature, host,
//! freshness, replay) and answers with the outcome and its gRPC code. Progress and results go
//! through the outbox like every other job's. HTTP/2 keepalive finds a dead peer; the agent
//! reconnects with exponential backoff and jitter, and at once on a SIGHUP that changed
//! `[report]` or `[tls]`.

use super::link::Link;
use super::{Backoff, Origin};
use crate::config::{ReportSection, TlsSection};
use crate::jobs::engine::Engine;
use patch_agent_wire::proto::{ControllerClient, v1 as pb};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A channel that stayed up this long resets the backoff: the next failure is a new outage.
const STABLE: Duration = Duration::from_secs(60);

pub struct ControlChannel {
    pub settings: watch::Receiver<(ReportSection, TlsSection)>,
    pub origin: Origin,
    pub engine: Arc<Engine>,
    /// The connection, shared with the reporter.
    pub link: Arc<Link>,
    /// What GetStatus says about the channel.
    pub state: ChannelState,
}

/// The channel's state as GetStatus reports it, with the outbox's length.
#[derive(Clone, Default)]
pub struct ChannelState {
    link: Arc<std::sync::Mutex<pb::ControllerLink>>,
    outbox: Option<Arc<super::outbox::Outbox>>,
}

impl ChannelState {
    pub fn new(address: &str, outbox: Arc<super::outbox::Outbox>) -> Self {
        Self {
            link: Arc::new(std::sync::Mutex::new(pb::ControllerLink {
                address: address.to_string(),
                ..Default::default()
            })),
            outbox: Some(outbox),
        }
    }

    pub fn get(&self) -> pb::ControllerLink {
        let mut link = self.link.lock().map(|l| l.clone()).unwrap_or_default();
        link.outbox_pending = self.outbox.as_ref().map_or(0, |o| o.len() as u32);
        link
    }

    fn set(&self, address: &str, open: bool, error: &str) {
        if let Ok(mut l) = self.link.lock() {
            l.address = address.to_string();
            l.channel_open = open;
            l.since = Some(std::time::SystemTime::now().into());
            l.last_error = error.to_string();
        }
    }
}

/// How a session ended.
enum End {
    /// `[report]` or `[tls]` changed: reconnect now.
    Reloaded,
    Failed(String),
    /// The controller has no control channel (UNIMPLEMENTED: an older `patchctl serve`); the
    /// connection is fine, and reports keep using it.
    Unsupported,
}

/// How often an agent asks again a controller that has no control channel.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);

impl ControlChannel {
    /// Holds the channel open forever.
    pub async fn run(mut self) {
        let mut backoff = {
            let cfg = &self.settings.borrow_and_update().0;
            Backoff::new(cfg.retry_initial, cfg.retry_max)
        };
        let mut failures = 0u64;
        loop {
            let started = Instant::now();
            match self.session().await {
                End::Reloaded => {
                    let cfg = &self.settings.borrow_and_update().0;
                    backoff = Backoff::new(cfg.retry_initial, cfg.retry_max);
                    tracing::info!("Reconnecting the control channel with the reloaded settings");
                    continue;
                }
                End::Unsupported => {
                    let address = self.settings.borrow().0.shown();
                    self.state.set(
                        &address,
                        false,
                        "the controller has no control channel (Controller/Connect is unimplemented)",
                    );
                    tracing::warn!(
                        controller = %self.settings.borrow().0.shown(),
                        retry_in = ?UNSUPPORTED_RETRY,
                        "The controller has no control channel (Controller/Connect is unimplemented); jobs reach this agent only through its listener"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(UNSUPPORTED_RETRY) => {}
                        _ = self.settings.changed() => {}
                    }
                }
                End::Failed(why) => {
                    let address = self.settings.borrow().0.shown();
                    self.state.set(&address, false, &why);
                    if started.elapsed() >= STABLE {
                        backoff.reset();
                        failures = 0;
                    }
                    failures += 1;
                    let pause = backoff.next(crate::pkg::scanner::random_u64());
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            controller = %self.settings.borrow().0.shown(),
                            error = %why,
                            retry_in = ?pause,
                            failed_attempts = failures,
                            "Control channel down"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = self.settings.changed() => {}
                    }
                }
            }
        }
    }

    /// One stream on the shared connection; a failure drops the connection for the reporter
    /// too (it is the same peer), so both dial again.
    async fn session(&mut self) -> End {
        let conn = match self.link.get().await {
            Ok(c) => c,
            Err(e) => return End::Failed(e),
        };
        let end = self.stream(conn.channel, &conn.address).await;
        if !matches!(end, End::Unsupported) {
            self.link.invalidate(conn.generation).await;
        }
        end
    }

    /// Hello, then deliveries until the stream ends or the settings change.
    async fn stream(&mut self, channel: tonic::transport::Channel, address: &str) -> End {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let hello = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(pb::ChannelHello {
                host_id: self.origin.host_id.clone(),
                labels: self.origin.labels.clone().into_iter().collect(),
                agent_version: crate::VERSION.to_string(),
            })),
        };
        if tx.send(hello).await.is_err() {
            return End::Failed("the channel closed before the hello".into());
        }
        let mut inbound = match ControllerClient::new(channel)
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return End::Unsupported,
            Err(s) => return End::Failed(format!("Connect: {:?}: {}", s.code(), s.message())),
        };
        tracing::info!(controller = %address, "Control channel open");
        self.state.set(address, true, "");
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some(a) = self.admit(m).await
                            && tx.send(a).await.is_err()
                        {
                            return End::Failed("the channel closed".into());
                        }
                    }
                    Ok(None) => return End::Failed("the controller closed the channel".into()),
                    Err(s) => return End::Failed(format!("{:?}: {}", s.code(), s.message())),
                },
                changed = self.settings.changed() => {
                    if changed.is_err() {
                        return End::Failed("the agent is stopping".into());
                    }
                    return End::Reloaded;
                }
            }
        }
    }

    /// Admits one delivery as SubmitJob would; the answer for the controller.
    async fn admit(&self, m: pb::ControllerMessage) -> Option<pb::AgentMessage> {
        let Some(pb::controller_message::Message::Delivery(d)) = m.message else {
            tracing::debug!("Ignoring an unknown control-channel message");
            return None;
        };
        let Some(job) = d.job else {
            return Some(admission(
                d.delivery_id,
                tonic::Code::InvalidArgument,
                "the delivery carries no signed job".into(),
                None,
            ));
        };
        Some(match self.engine.submit_fair(&job).await {
            Ok(record) => {
                tracing::info!(job = %record.job_id, via = "control channel", "Job submitted");
                admission(
                    d.delivery_id,
                    tonic::Code::Ok,
                    "queued".into(),
                    Some(crate::convert::status(&record)),
                )
            }
            Err(refused) => {
                let (why, stored) = *refused;
                tracing::warn!(reason = %why, code = ?why.code(), via = "control channel", "Job refused");
                admission(
                    d.delivery_id,
                    why.code(),
                    why.to_string(),
                    stored.map(|r| crate::convert::status(&r)),
                )
            }
        })
    }
}

fn admission(
    delivery_id: u64,
    code: tonic::Code,
    message: String,
    status: Option<pb::JobStatus>,
) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(pb::agent_message::Message::Admission(pb::Admission {
            delivery_id,
            code: code as i32,
            message,
            status,
        })),
    }
}
