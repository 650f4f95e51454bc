//! The gRPC surface: `patchagent.v1.Agent`, `grpc.health.v1.Health` and server reflection (v1 and
//! v1alpha, so grpcurl 1.8 works). Thin translation only: facts come from [`crate::host`],
//! callers from [`crate::auth`].

use crate::auth::Caller;
use crate::host::{self, HostFacts};
use crate::proto::{self, v1 as pb};
use std::sync::Arc;
use std::time::SystemTime;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Largest request message accepted; job envelopes (64 KiB) fit with room to spare.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Implements `patchagent.v1.Agent`.
pub struct AgentService {
    facts: Arc<HostFacts>,
    started_at: SystemTime,
}

impl AgentService {
    pub fn new(facts: Arc<HostFacts>) -> Self {
        Self {
            facts,
            started_at: SystemTime::now(),
        }
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
        Ok(Response::new(pb::GetStatusResponse {
            host_id: f.host_id.clone(),
            hostname: f.hostname.clone(),
            machine_id: f.machine_id.clone(),
            boot_id: f.boot_id.clone(),
            os: Some(pb::OsRelease {
                id: f.os.id.clone(),
                id_like: f.os.id_like.clone(),
                version_id: f.os.version_id.clone(),
                pretty_name: f.os.pretty_name.clone(),
                version_codename: f.os.version_codename.clone(),
            }),
            kernel_release: f.kernel_release.clone(),
            architecture: f.architecture.clone(),
            uptime: prost_types::Duration::try_from(uptime).ok(),
            boot_time: Some(f.boot_time.into()),
            agent_version: crate::VERSION.to_string(),
            agent_started_at: Some(self.started_at.into()),
            caller: Some(caller.into()),
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
