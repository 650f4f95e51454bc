//! Who is calling, and what they may do.
//!
//! A connection carries a [`Peer`] (names from the client certificate, or the uid behind the Unix
//! socket). For each request, [`AuthLayer`] resolves the peer to a role with the current
//! [`AccessPolicy`] and checks the method against [`required_permission`]: an RPC not listed there is
//! denied to everyone, and a peer with no role is refused. Handlers find the resulting
//! [`Caller`] in the request extensions.

use patch_agent_wire::proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// `[auth]`: client identities per role (a SAN DNS name or URI; the CN only if there is no SAN).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// May read, submit and cancel jobs. Default: none.
    pub controllers: Vec<String>,
    /// May only read. Default: none.
    pub viewers: Vec<String>,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Controller,
}

impl Role {
    pub fn allows(self, p: Permission) -> bool {
        match (self, p) {
            (_, Permission::Read) => true,
            (Role::Controller, Permission::Control) => true,
            (Role::Viewer, Permission::Control) => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Controller => "controller",
        }
    }
}

impl From<Role> for pb::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Viewer => pb::Role::Viewer,
            Role::Controller => pb::Role::Controller,
        }
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Reading host facts, inventory, job state; health and reflection.
    Read,
    /// Submitting and cancelling jobs.
    Control,
}

/// The permission each RPC needs, by its gRPC path. Anything not listed is denied to everyone.
pub fn required_permission(path: &str) -> Option<Permission> {
    match path {
        "/patchagent.v1.Agent/GetStatus"
        | "/patchagent.v1.Agent/ListPackages"
        | "/patchagent.v1.Agent/ListUpdates"
        | "/patchagent.v1.Agent/GetJob"
        | "/patchagent.v1.Agent/WatchJob"
        | "/patchagent.v1.Agent/ListJobs"
        | "/grpc.health.v1.Health/Check"
        | "/grpc.health.v1.Health/Watch"
        | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => {
            Some(Permission::Read)
        }
        "/patchagent.v1.Agent/SubmitJob" | "/patchagent.v1.Agent/CancelJob" => {
            Some(Permission::Control)
        }
        _ => None,
    }
}

/// The other end of one connection, fixed when the connection is accepted.
#[derive(Debug, Clone)]
pub enum Peer {
    /// TCP with mutual TLS: the client certificate's SAN DNS names and URIs (its CN if none).
    Tls {
        addr: SocketAddr,
        names: Vec<String>,
    },
    /// The local Unix socket: SO_PEERCRED of the connecting process.
    Unix { uid: u32, pid: Option<i32> },
    /// TCP with TLS but no client certificate. Only a server whose verifier allows it (the
    /// controller, for enrolment) ever sees one; it has no role anywhere.
    Anonymous { addr: SocketAddr },
}

/// The caller of one request, as the agent authenticated and authorized it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: String,
    pub role: Role,
    pub transport: pb::Transport,
    pub peer: String,
}

impl From<&Caller> for pb::Caller {
    fn from(c: &Caller) -> Self {
        pb::Caller {
            identity: c.identity.clone(),
            role: pb::Role::from(c.role) as i32,
            transport: c.transport as i32,
            peer: c.peer.clone(),
        }
    }
}

/// Identities per role, from `[auth]`; replaced whole on reload.
#[derive(Debug, Default, Clone)]
pub struct AccessPolicy {
    controllers: HashSet<String>,
    viewers: HashSet<String>,
}

impl AccessPolicy {
    pub fn new(auth: &AuthSection) -> Self {
        Self {
            controllers: auth.controllers.iter().cloned().collect(),
            viewers: auth.viewers.iter().cloned().collect(),
        }
    }

    /// Resolves a peer to a caller, or explains why it has no role.
    pub fn resolve(&self, peer: &Peer) -> Result<Caller, String> {
        match peer {
            Peer::Unix { uid, pid } => Ok(Caller {
                identity: format!("uid:{uid}"),
                role: if *uid == 0 {
                    Role::Controller
                } else {
                    Role::Viewer
                },
                transport: pb::Transport::Unix,
                peer: pid.map_or_else(|| "unix".to_string(), |p| format!("pid:{p}")),
            }),
            Peer::Tls { addr, names } => {
                let found =
                    |set: &HashSet<String>| names.iter().find(|n| set.contains(*n)).cloned();
                let (identity, role) = if let Some(id) = found(&self.controllers) {
                    (id, Role::Controller)
                } else if let Some(id) = found(&self.viewers) {
                    (id, Role::Viewer)
                } else {
                    return Err(format!(
                        "client certificate identity {names:?} has no role on this agent; add one of these names to [auth] controllers or viewers"
                    ));
                };
                Ok(Caller {
                    identity,
                    role,
                    transport: pb::Transport::Mtls,
                    peer: addr.to_string(),
                })
            }
            Peer::Anonymous { addr } => Err(format!(
                "{addr} presented no client certificate; connect with one of [auth] controllers or viewers"
            )),
        }
    }
}

/// Checks one request: the caller must have a role, and the role must allow the method.
pub fn authorize(
    policy: &AccessPolicy,
    peer: Option<&Peer>,
    path: &str,
) -> Result<Caller, tonic::Status> {
    let Some(peer) = peer else {
        return Err(tonic::Status::unauthenticated(
            "no authenticated peer on this connection",
        ));
    };
    let caller = policy
        .resolve(peer)
        .map_err(tonic::Status::permission_denied)?;
    match required_permission(path) {
        Some(p) if caller.role.allows(p) => Ok(caller),
        Some(_) => Err(tonic::Status::permission_denied(format!(
            "{path} is not allowed for {} (role {}); it needs the controller role",
            caller.identity,
            caller.role.as_str()
        ))),
        None => Err(tonic::Status::permission_denied(format!(
            "{path} is not allowed for any role on this agent"
        ))),
    }
}

/// SAN DNS names and URIs of a DER certificate; its subject CN only when it has neither.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::URI(u) => names.push((*u).to_string()),
                _ => {}
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_string());
            }
        }
    }
    Ok(names)
}

/// Tower layer applying [`authorize`] to every request of a tonic server.
#[derive(Clone)]
pub struct AuthLayer {
    policy: watch::Receiver<Arc<AccessPolicy>>,
}

impl AuthLayer {
    pub fn new(policy: watch::Receiver<Arc<AccessPolicy>>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: watch::Receiver<Arc<AccessPolicy>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let policy = self.policy.borrow().clone();
        let peer = req
            .extensions()
            .get::<crate::listener::Conn>()
            .map(|c| c.peer.clone());
        match authorize(&policy, peer.as_deref(), req.uri().path()) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                // The clone is ready only if polled; take the ready one, leave the clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(status) => {
                tracing::info!(
                    path = %req.uri().path(),
                    peer = ?peer,
                    reason = %status.message(),
                    "Denied request"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Tower layer for a server whose TLS lets clients in without a certificate (the controller,
/// for enrolment): such a peer ([`Peer::Anonymous`]) may call only the `open` paths; anything
/// else is UNAUTHENTICATED before it reaches a service.
#[derive(Clone)]
pub struct AnonymousLayer {
    open: &'static [&'static str],
}

impl AnonymousLayer {
    pub fn new(open: &'static [&'static str]) -> Self {
        Self { open }
    }
}

impl<S> tower::Layer<S> for AnonymousLayer {
    type Service = AnonymousGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AnonymousGate {
            inner,
            open: self.open,
        }
    }
}

/// See [`AnonymousLayer`].
#[derive(Clone)]
pub struct AnonymousGate<S> {
    inner: S,
    open: &'static [&'static str],
}

impl<S, B> tower::Service<http::Request<B>> for AnonymousGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let anonymous = req
            .extensions()
            .get::<crate::listener::Conn>()
            .is_none_or(|c| matches!(*c.peer, Peer::Anonymous { .. }));
        if anonymous && !self.open.contains(&req.uri().path()) {
            let status = tonic::Status::unauthenticated(format!(
                "{} needs a client certificate; only {} may be called without one",
                req.uri().path(),
                self.open.join(", ")
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AccessPolicy {
        AccessPolicy::new(&AuthSection {
            controllers: vec!["ctl.example".into()],
            viewers: vec!["spiffe://fleet/viewer".into()],
        })
    }

    fn tls(names: &[&str]) -> Peer {
        Peer::Tls {
            addr: "127.0.0.1:1".parse().expect("addr"),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn roles_from_certificate_names() {
        let p = policy();
        let c = p.resolve(&tls(&["x", "ctl.example"])).expect("controller");
        assert_eq!(
            (c.identity.as_str(), c.role),
            ("ctl.example", Role::Controller)
        );
        let v = p.resolve(&tls(&["spiffe://fleet/viewer"])).expect("viewer");
        assert_eq!(v.role, Role::Viewer);
        let err = p.resolve(&tls(&["stranger"])).expect_err("no role");
        assert!(err.contains("stranger") && err.contains("[auth]"), "{err}");
        assert!(p.resolve(&tls(&[])).is_err());
    }

    #[test]
    fn unix_peers_by_uid() {
        let p = AccessPolicy::default();
        let root = p
            .resolve(&Peer::Unix {
                uid: 0,
                pid: Some(1),
            })
            .expect("root");
        assert_eq!(root.role, Role::Controller);
        let user = p
            .resolve(&Peer::Unix {
                uid: 1000,
                pid: None,
            })
            .expect("user");
        assert_eq!(
            (user.identity.as_str(), user.role),
            ("uid:1000", Role::Viewer)
        );
    }

    #[test]
    fn deny_by_default() {
        let p = policy();
        let ctl = tls(&["ctl.example"]);
        assert!(authorize(&p, Some(&ctl), "/patchagent.v1.Agent/GetStatus").is_ok());
        for path in ["/patchagent.v1.Agent/Nope", "/other.Svc/GetStatus", "", "/"] {
            let e = authorize(&p, Some(&ctl), path).expect_err(path);
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
        }
        let e = authorize(&p, None, "/patchagent.v1.Agent/GetStatus").expect_err("no peer");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let viewer = tls(&["spiffe://fleet/viewer"]);
        let e = authorize(&p, Some(&viewer), "/patchagent.v1.Agent/SubmitJob").expect_err("viewer");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(authorize(&p, Some(&ctl), "/patchagent.v1.Agent/SubmitJob").is_ok());
        let e = authorize(&p, Some(&tls(&["nobody"])), "/grpc.health.v1.Health/Check")
            .expect_err("no role");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn viewers_cannot_control() {
        assert!(!Role::Viewer.allows(Permission::Control));
        assert!(Role::Controller.allows(Permission::Control));
        assert!(Role::Viewer.allows(Permission::Read));
    }

    #[test]
    fn certificate_names_never_panic_on_junk() {
        for junk in [&b""[..], b"\x30", b"\x30\x82\xff\xff", &[0u8; 64]] {
            assert!(certificate_names(junk).is_err());
        }
    }
}
