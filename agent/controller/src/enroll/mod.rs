//! `patchagent.v1.Enrollment`: hosts join with a token and renew their certificates.
//!
//! The controller signs certificates for keys it never sees and hands out the operators'
//! job-signing *public* keys; it holds no key that can sign a job. Failed enrolments are
//! counted per source address ([`limiter`]); tokens are checked in constant time and spent in
//! the store's writer transaction (see `store::enrollment`).

pub mod ca;
pub mod limiter;
pub mod tokens;

use crate::store::{Enrolment, Refusal, Store};
use patch_agent_service::auth::Peer;
use patch_agent_wire::proto::v1 as pb;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// Largest Enroll or Renew request, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Most extra names a host may ask for.
pub const MAX_EXTRA_SANS: usize = 16;

pub struct EnrollmentService {
    store: Arc<dyn Store>,
    signer: Arc<ca::Signer>,
    signing_keys: Vec<pb::PublishedKey>,
    /// Names no host may have: the controller's own, and `--reserve-names`.
    reserved: HashSet<String>,
    limiter: limiter::Limiter,
}

impl EnrollmentService {
    pub fn new(
        store: Arc<dyn Store>,
        signer: Arc<ca::Signer>,
        signing_keys: Vec<pb::PublishedKey>,
        reserved: HashSet<String>,
        limiter: limiter::Limiter,
    ) -> Self {
        Self {
            store,
            signer,
            signing_keys,
            reserved,
            limiter,
        }
    }

    /// The names a request asks for, checked: the host id first, then its extra names.
    fn names(&self, host_id: &str, extra: &[String]) -> Result<Vec<String>, Status> {
        patch_agent_wire::ids::check_host_id(host_id)
            .map_err(|e| Status::invalid_argument(format!("host_id: {e}")))?;
        if extra.len() > MAX_EXTRA_SANS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_EXTRA_SANS} extra names"
            )));
        }
        let mut names = vec![host_id.to_string()];
        for n in extra {
            patch_agent_wire::ids::check_host_id(n)
                .map_err(|e| Status::invalid_argument(format!("extra name: {e}")))?;
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        if let Some(n) = names.iter().find(|n| self.reserved.contains(*n)) {
            return Err(Status::permission_denied(format!(
                "{n:?} is a name of the controller or an operator; a host may not have it"
            )));
        }
        Ok(names)
    }

    async fn try_enroll(&self, r: pb::EnrollRequest) -> Result<pb::EnrollResponse, Status> {
        let token = tokens::Token::parse(&r.token).map_err(Status::permission_denied)?;
        let names = self.names(&r.host_id, &r.extra_sans)?;
        let issued = self
            .signer
            .issue(&names, &r.csr_der)
            .map_err(Status::invalid_argument)?;
        let facts = r.facts.unwrap_or_default();
        let enrolment = Enrolment {
            token_id: token.id.clone(),
            secret_sha256: token.secret_sha256(),
            host_id: r.host_id.clone(),
            names,
            serial: issued.serial.clone(),
            not_after: issued.not_after,
            agent_version: facts.agent_version.clone(),
            facts: prost::Message::encode_to_vec(&facts),
        };
        let labels = self
            .store
            .enroll(enrolment, crate::now())
            .await
            .map_err(crate::stored)?
            .map_err(|refusal| Status::permission_denied(refusal.to_string()))?;
        tracing::info!(host = %r.host_id, token = %token.id, serial = %issued.serial, labels = ?labels, "Host enrolled");
        Ok(pb::EnrollResponse {
            certificate: Some(issued_pb(issued)),
            ca_bundle_pem: self.signer.ca_bundle_pem.clone(),
            signing_keys: self.signing_keys.clone(),
            labels: labels.into_iter().collect(),
        })
    }
}

fn issued_pb(i: ca::Issued) -> pb::IssuedCertificate {
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    pb::IssuedCertificate {
        chain_pem: i.chain_pem,
        serial: i.serial,
        not_before: ts(i.not_before),
        not_after: ts(i.not_after),
    }
}

fn peer_ip<T>(req: &Request<T>) -> Option<std::net::IpAddr> {
    match req
        .extensions()
        .get::<patch_agent_service::listener::Conn>()
        .map(|c| c.peer.as_ref())
    {
        Some(Peer::Anonymous { addr } | Peer::Tls { addr, .. }) => Some(addr.ip()),
        _ => None,
    }
}

#[tonic::async_trait]
impl patch_agent_wire::proto::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let ip = peer_ip(&req);
        if let Some(ip) = ip
            && let Err(wait) = self.limiter.check(ip, Instant::now())
        {
            return Err(Status::resource_exhausted(format!(
                "too many failed enrolments from {ip}; try again in {} s",
                wait.as_secs().max(1)
            )));
        }
        let host = req.get_ref().host_id.clone();
        match self.try_enroll(req.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(status) => {
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                ) && let Some(ip) = ip
                {
                    self.limiter.failed(ip, Instant::now());
                }
                tracing::warn!(peer = ?ip, host = %host, code = ?status.code(), reason = %status.message(), "Enrolment refused");
                Err(status)
            }
        }
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        crate::authorize(&req, &req.get_ref().host_id)?;
        let r = req.into_inner();
        let names = match self
            .store
            .renewable(r.host_id.clone())
            .await
            .map_err(crate::stored)?
        {
            Ok(names) => names,
            Err(refusal @ Refusal::NotEnrolled(_)) => {
                return Err(Status::failed_precondition(refusal.to_string()));
            }
            Err(refusal) => {
                tracing::warn!(host = %r.host_id, reason = %refusal, "Renewal refused");
                return Err(Status::permission_denied(refusal.to_string()));
            }
        };
        let issued = self
            .signer
            .issue(&names, &r.csr_der)
            .map_err(Status::invalid_argument)?;
        if !self
            .store
            .renewed(r.host_id.clone(), issued.serial.clone(), issued.not_after)
            .await
            .map_err(crate::stored)?
        {
            return Err(Status::permission_denied(format!(
                "host {:?} is revoked",
                r.host_id
            )));
        }
        tracing::info!(host = %r.host_id, serial = %issued.serial, "Certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate: Some(issued_pb(issued)),
        }))
    }
}

/// The job-signing public keys in `dir` (`*.pem`, Ed25519 SPKI), as agents will store them.
pub fn published_keys(dir: &Path) -> Result<Vec<pb::PublishedKey>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("--publish-signing-keys: cannot read {}: {e}", dir.display()))?;
    let mut keys = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".pem") || name.starts_with('.') {
            continue;
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "--publish-signing-keys: {name:?}: rename it to [A-Za-z0-9._-].pem"
            ));
        }
        patch_agent_wire::job::trust::read_public_key(&path)
            .map_err(|e| format!("--publish-signing-keys: {e}"))?;
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| format!("--publish-signing-keys: {}: {e}", path.display()))?;
        keys.push(pb::PublishedKey { name, pem });
    }
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    if keys.is_empty() {
        return Err(format!(
            "--publish-signing-keys: {} holds no *.pem public key; enrolled agents would refuse every job",
            dir.display()
        ));
    }
    Ok(keys)
}
