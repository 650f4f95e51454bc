//! The gRPC surface: `patchagent.v1.Agent`, `grpc.health.v1.Health` and server reflection (v1 and
//! v1alpha, so grpcurl 1.8 works). Thin translation only: facts come from [`crate::host`],
//! callers from [`patch_agent_service::auth`].

use crate::convert;
use crate::enroll::renew::CertState;
use crate::host::{self, HostFacts};
use crate::jobs::engine::{CancelError, Engine, Notice};
use crate::pkg::scanner::Scanner;
use patch_agent_service::auth::Caller;
use patch_agent_wire::convert::{held, package, repo_errors, ts, update};
use patch_agent_wire::proto::{self, v1 as pb};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Largest request message accepted; job envelopes (64 KiB) fit with room to spare.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Implements `patchagent.v1.Agent`.
pub struct AgentService {
    facts: Arc<HostFacts>,
    started_at: SystemTime,
    /// None when no supported package manager was found; package RPCs then say so.
    scanner: Option<Arc<Scanner>>,
    engine: Arc<Engine>,
    certificate: CertState,
    controller: crate::report::channel::ChannelState,
}

impl AgentService {
    pub fn new(facts: Arc<HostFacts>, scanner: Option<Arc<Scanner>>, engine: Arc<Engine>) -> Self {
        Self {
            facts,
            started_at: SystemTime::now(),
            scanner,
            engine,
            certificate: CertState::default(),
            controller: Default::default(),
        }
    }

    /// GetStatus reports this control-channel state (kept by [`crate::report::channel`]).
    pub fn with_controller(mut self, state: crate::report::channel::ChannelState) -> Self {
        self.controller = state;
        self
    }

    /// GetStatus reports this certificate state (kept by [`crate::enroll::renew`]).
    pub fn with_certificate(mut self, state: CertState) -> Self {
        self.certificate = state;
        self
    }

    fn scanner(&self) -> Result<&Arc<Scanner>, Status> {
        self.scanner.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "no supported package manager on this host; set [packages] manager and restart",
            )
        })
    }
}

type PackageStream = Pin<Box<dyn Stream<Item = Result<pb::Package, Status>> + Send>>;
type JobStream = Pin<Box<dyn Stream<Item = Result<pb::JobUpdate, Status>> + Send>>;

fn job_id(id: &str) -> Result<&str, Status> {
    if patch_agent_wire::ids::valid_job_id(id) {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!(
            "job_id {id:?} must be 1-128 characters of [A-Za-z0-9._-]"
        )))
    }
}

fn caller<T>(req: &Request<T>) -> Result<&Caller, Status> {
    // The auth layer inserts the caller before any handler runs; absence is a wiring bug, and
    // refusing is the safe answer.
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

#[tonic::async_trait]
impl proto::Agent for AgentService {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let caller = caller(&req)?;
        let f = &self.facts;
        let uptime = host::uptime();
        let (packages, reboot) = match &self.scanner {
            Some(s) => {
                let (p, r) = convert::summary(s.manager(), &*s.snapshot().await);
                (Some(p), Some(r))
            }
            None => (None, None),
        };
        Ok(Response::new(pb::GetStatusResponse {
            host_id: f.host_id.clone(),
            hostname: f.hostname.clone(),
            machine_id: f.machine_id.clone(),
            boot_id: f.boot_id.clone(),
            os: Some(crate::convert::os_release(&f.os)),
            kernel_release: f.kernel_release.clone(),
            architecture: f.architecture.clone(),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            boot_time: Some(f.boot_time.into()),
            agent_version: crate::VERSION.to_string(),
            agent_started_at: Some(self.started_at.into()),
            caller: Some(caller.into()),
            packages,
            reboot,
            jobs: Some({
                let (queued, running, rejected) = self.engine.summary();
                pb::JobsSummary {
                    trusted_keys: self.engine.trusted_keys() as u32,
                    queued: queued as u32,
                    running_job_id: running.unwrap_or_default(),
                    rejected,
                }
            }),
            certificate: Some(self.certificate.get()),
            controller: Some(self.controller.get()),
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SignedJob>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let caller = caller(&req)?.identity.clone();
        match self.engine.submit_fair(req.get_ref()).await {
            Ok(record) => {
                tracing::info!(job = %record.job_id, caller = %caller, "Job submitted");
                Ok(Response::new(pb::SubmitJobResponse {
                    status: Some(convert::status(&record)),
                }))
            }
            Err(refused) => {
                let (why, stored) = *refused;
                let mut msg = why.to_string();
                let details = stored.map(|r| {
                    let st = convert::status(&r);
                    msg.push_str(&format!(
                        "; stored status: {:?}{}",
                        r.state,
                        if r.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.reason)
                        }
                    ));
                    prost::Message::encode_to_vec(&st)
                });
                let mut status = Status::new(why.code(), msg);
                if let Some(d) = details {
                    // The stored JobStatus, machine-readable, in binary trailing metadata.
                    status.metadata_mut().insert_bin(
                        "patchagent-job-status-bin",
                        tonic::metadata::MetadataValue::from_bytes(&d),
                    );
                }
                Err(status)
            }
        }
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = job_id(&req.get_ref().job_id)?;
        self.engine
            .get(id)
            .map(|r| Response::new(convert::status(&r)))
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = job_id(&req.get_ref().job_id)?.to_string();
        let (record, mut rx) = self
            .engine
            .watch(&id)
            .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let send = |u: pb::job_update::Update| pb::JobUpdate { update: Some(u) };
            // Events numbered below this were in the history already sent.
            let mut next = record.event_count;
            for e in &record.events {
                if tx
                    .send(Ok(send(pb::job_update::Update::Event(convert::event(e)))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if record.state.is_terminal() {
                let _ = tx
                    .send(Ok(send(pb::job_update::Update::Status(convert::status(
                        &record,
                    )))))
                    .await;
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(Notice::Event(n, e)) => {
                        // Subscribed before the history was read: skip what it already held.
                        if n < next {
                            continue;
                        }
                        next = n + 1;
                        if tx
                            .send(Ok(send(pb::job_update::Update::Event(convert::event(&e)))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Notice::Done(r)) => {
                        let _ = tx
                            .send(Ok(send(pb::job_update::Update::Status(convert::status(
                                &r,
                            )))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        // A chatty package can print faster than this watcher reads: say what
                        // was skipped (the journal keeps it for GetJob) and keep watching.
                        let gap = crate::jobs::journal::EventRecord {
                            at_ms: crate::jobs::journal::now_ms(),
                            state: record.state,
                            message: format!(
                                "({n} events skipped: this watcher fell behind; GetJob has the full history)"
                            ),
                        };
                        if tx
                            .send(Ok(send(pb::job_update::Update::Event(convert::event(
                                &gap,
                            )))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let limit = match req.get_ref().limit {
            0 => 20,
            n => n.min(1000) as usize,
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self
                .engine
                .list(limit)
                .iter()
                .map(convert::status)
                .collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = job_id(&req.get_ref().job_id)?;
        match self.engine.cancel(id) {
            Ok(r) => Ok(Response::new(convert::status(&r))),
            Err(e @ CancelError::Unknown(_)) => Err(Status::not_found(e.to_string())),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    type ListPackagesStream = PackageStream;

    async fn list_packages(
        &self,
        req: Request<pb::ListPackagesRequest>,
    ) -> Result<Response<Self::ListPackagesStream>, Status> {
        let scanner = self.scanner()?;
        let req = req.into_inner();
        let snap = if req.refresh {
            scanner.scan(false).await
        } else {
            scanner.snapshot().await
        };
        if snap.inventory_at.is_none() {
            return Err(Status::unavailable(
                "no inventory yet: the first scan has not finished; retry, or pass refresh",
            ));
        }
        let packages = snap.packages.clone();
        let prefix = req.name_prefix;
        // Binary search to the first match: the inventory is sorted by name.
        let start = packages.partition_point(|p| p.name.as_str() < prefix.as_str());
        let iter = (start..packages.len()).map_while(move |i| {
            let p = &packages[i];
            p.name.starts_with(prefix.as_str()).then(|| Ok(package(p)))
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(iter))))
    }

    async fn list_updates(
        &self,
        req: Request<pb::ListUpdatesRequest>,
    ) -> Result<Response<pb::ListUpdatesResponse>, Status> {
        let scanner = self.scanner()?;
        let snap = if req.get_ref().refresh {
            // A refresh runs the package manager as root: controllers only.
            let caller = caller(&req)?;
            if !caller
                .role
                .allows(patch_agent_service::auth::Permission::Control)
            {
                return Err(Status::permission_denied(format!(
                    "ListUpdates with refresh runs the package manager and needs the controller role; {} is a {} (omit refresh to read the last scan)",
                    caller.identity,
                    caller.role.as_str()
                )));
            }
            scanner.scan(true).await
        } else {
            scanner.snapshot().await
        };
        let u = &snap.updates;
        Ok(Response::new(pb::ListUpdatesResponse {
            manager: scanner.manager().to_string(),
            updates: u.updates.iter().map(update).collect(),
            held: held(u),
            repo_errors: repo_errors(u),
            scanned_at: ts(snap.updates_at),
            metadata_refreshed_at: ts(snap.refreshed_at),
            scan_errors: snap.errors.clone(),
        }))
    }
}

/// Health of the whole server ("") and of the agent service, flipped together.
#[derive(Clone)]
pub struct Health(HealthReporter);

impl Health {
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", proto::AGENT_SERVICE] {
            self.0.set_service_status(name, status).await;
        }
    }
}

/// All services, ready to be served on any listener. Health starts NOT_SERVING.
pub async fn routes(agent: AgentService) -> Result<(tonic::service::Routes, Health), String> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health(reporter);
    health.set(false).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| format!("reflection v1: {e}"))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| format!("reflection v1alpha: {e}"))?;
    let agent = proto::AgentServer::new(agent).max_decoding_message_size(MAX_REQUEST_BYTES);
    let mut builder = tonic::service::Routes::builder();
    builder
        .add_service(agent)
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha);
    Ok((builder.routes(), health))
}
