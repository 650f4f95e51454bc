//! Accepting connections: TLS over TCP and the local Unix socket.
//!
//! Each accepted connection becomes a [`PeerStream`] that carries a [`Conn`] (its [`Peer`] and
//! its activity) to tonic, which puts it in every request's extensions for [`crate::auth`].
//!
//! Nobody can hold the agent's connection slots:
//! - a connection is counted against `max_connections` and, for TCP, against its source
//!   address's `max_connections_per_ip` from the moment it is accepted, so the accept loop never
//!   stops accepting. Over the per-address limit it is closed at once; when the whole table is
//!   full, the oldest connection still in its TLS handshake is closed to make room (only then is
//!   a newcomer refused), so connections that never finish a handshake cannot keep anyone out;
//! - the TLS handshake must finish within `handshake_timeout`;
//! - a client certificate that maps to no role is closed right after the handshake;
//! - a connection with no open stream for `idle_timeout` is closed ([`ActivityLayer`] counts
//!   the streams).
//!
//! The TLS configuration and the access policy are read from `watch` channels at each accept,
//! so a reload applies to the next connection without touching established ones.

use crate::auth::{AccessPolicy, Peer, certificate_names};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

/// What tonic hands every request of a connection: who is on the other end, and the
/// connection's stream count (for the idle timeout).
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: Arc<Peer>,
    pub activity: Arc<Activity>,
}

/// Open streams on one connection, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Milliseconds after `born` when the connection last had a stream end (or began).
    last_ms: AtomicU64,
    born: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_since(&self) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// A stream opened; the returned guard closes it when dropped.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

/// One open stream; see [`Activity::open`].
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes a connection that had no open stream for `timeout`: a read error makes the HTTP/2
/// server drop it. The timer is always armed, so the check runs even when the client is silent.
struct Idle {
    activity: Arc<Activity>,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.activity.open.load(Ordering::Relaxed) == 0 {
                let due = self.activity.idle_since() + self.timeout;
                if now >= due {
                    return true;
                }
                self.timer.as_mut().reset(due);
            } else {
                self.timer.as_mut().reset(now + self.timeout);
            }
        }
        false
    }
}

/// Open connections per source address.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection slot: counted in the total and per source address until dropped.
struct Slot {
    _total: OwnedSemaphorePermit,
    ip: Option<(IpAddr, PerIp)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ip, counts)) = &self.ip {
            let mut counts = locked(counts);
            if let Some(n) = counts.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(ip);
                }
            }
        }
    }
}

/// Connection limits shared by every accept loop of one server.
#[derive(Clone)]
pub struct Limits {
    total: Arc<Semaphore>,
    per_ip: usize,
    counts: PerIp,
    idle_timeout: Duration,
    handshakes: Arc<Mutex<Handshakes>>,
}

/// TLS handshakes under way, oldest first, each holding its connection's slot.
#[derive(Default)]
struct Handshakes {
    next: u64,
    running: std::collections::BTreeMap<u64, (Slot, Arc<tokio::sync::Notify>)>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Limits {
    pub fn new(max_connections: usize, max_per_ip: usize, idle_timeout: Duration) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_connections)),
            per_ip: max_per_ip,
            counts: Arc::default(),
            idle_timeout,
            handshakes: Arc::default(),
        }
    }

    /// A slot for a new connection from `ip` (None: the local socket), or why not. When every
    /// slot is taken, the oldest unfinished TLS handshake gives up its slot: connections that
    /// never finish a handshake can fill the table, but cannot keep a real client out.
    fn admit(&self, ip: Option<IpAddr>) -> Result<Slot, &'static str> {
        if let Some(ip) = ip
            && locked(&self.counts)
                .get(&ip)
                .is_some_and(|n| *n >= self.per_ip)
        {
            return Err("max_connections_per_ip reached");
        }
        let total = match self.total.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = locked(&self.handshakes).running.pop_first();
                let Some((_, (slot, cancel))) = oldest else {
                    return Err("max_connections reached");
                };
                drop(slot);
                cancel.notify_one();
                self.total
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "max_connections reached")?
            }
        };
        let ip = ip.map(|ip| {
            *locked(&self.counts).entry(ip).or_default() += 1;
            (ip, self.counts.clone())
        });
        Ok(Slot { _total: total, ip })
    }

    /// Parks a connection's slot while its handshake runs; the handshake stops when notified
    /// (its slot was given to a newer connection).
    fn start_handshake(&self, slot: Slot) -> (u64, Arc<tokio::sync::Notify>) {
        let cancel = Arc::new(tokio::sync::Notify::new());
        let mut h = locked(&self.handshakes);
        h.next += 1;
        let id = h.next;
        h.running.insert(id, (slot, cancel.clone()));
        (id, cancel)
    }

    /// The slot back from a handshake that ended; None if it was given away meanwhile.
    fn end_handshake(&self, id: u64) -> Option<Slot> {
        locked(&self.handshakes)
            .running
            .remove(&id)
            .map(|(slot, _)| slot)
    }

    fn wrap<S>(&self, io: S, peer: Peer, slot: Slot) -> PeerStream<S> {
        let activity = Arc::new(Activity::new());
        PeerStream {
            io,
            conn: Conn {
                peer: Arc::new(peer),
                activity: activity.clone(),
            },
            idle: Idle {
                activity,
                timeout: self.idle_timeout,
                timer: Box::pin(tokio::time::sleep(self.idle_timeout)),
            },
            _slot: slot,
        }
    }
}

/// A connection and who is on the other end.
pub struct PeerStream<S> {
    io: S,
    conn: Conn,
    idle: Idle,
    _slot: Slot,
}

impl<S> tonic::transport::server::Connected for PeerStream<S> {
    type ConnectInfo = Conn;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.conn.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idle.poll_expired(cx) {
            tracing::debug!(peer = ?self.conn.peer, "Closing an idle connection");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no open stream for server.idle_timeout",
            )));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PeerStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

pub type TlsPeerStream = PeerStream<tokio_rustls::server::TlsStream<TcpStream>>;
/// Local connections pass through [`crate::uds_authority`] (see there for why).
pub type UnixPeerStream = PeerStream<tokio::io::DuplexStream>;

/// Settings for the TLS accept loop.
pub struct TlsAccept {
    pub config: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// Who has a role; a certificate with none is closed after the handshake. None: every
    /// certificate the CA signed is kept (the controller authorizes per RPC instead).
    pub policy: Option<watch::Receiver<Arc<AccessPolicy>>>,
    pub handshake_timeout: Duration,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
}

/// Counts refused connections and logs at most one line a second about them.
struct RefusalLog {
    window: Instant,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&mut self, peer: &dyn std::fmt::Display, why: &str) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(peer = %peer, reason = why, suppressed = self.suppressed, "Refused connection");
            self.window = Instant::now();
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// Accepts TCP connections, runs TLS handshakes concurrently, and yields the authenticated ones.
pub fn tls_incoming(
    listener: TcpListener,
    opts: TlsAccept,
) -> ReceiverStream<Result<TlsPeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, opts, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    mut opts: TlsAccept,
    tx: mpsc::Sender<Result<TlsPeerStream, io::Error>>,
) {
    let mut log = RefusalLog {
        window: Instant::now() - Duration::from_secs(2),
        suppressed: 0,
    };
    loop {
        let (tcp, addr) = tokio::select! {
            _ = opts.shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match opts.limits.admit(Some(addr.ip())) {
            Ok(slot) => slot,
            Err(why) => {
                log.refused(&addr, why);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(opts.config.borrow().clone());
        let policy = opts.policy.as_ref().map(|p| p.borrow().clone());
        let deadline = opts.handshake_timeout;
        let limits = opts.limits.clone();
        let (handshake, cancel) = limits.start_handshake(slot);
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = tokio::time::timeout(deadline, acceptor.accept(tcp)) => r,
                () = cancel.notified() => {
                    tracing::debug!(peer = %addr, "Closed an unfinished TLS handshake to make room");
                    return;
                }
            };
            // None: the slot went to a newer connection just as this handshake ended.
            let Some(slot) = limits.end_handshake(handshake) else {
                return;
            };
            let tls = match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %addr, timeout = ?deadline, "TLS handshake timed out");
                    return;
                }
            };
            let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => match certificate_names(cert) {
                    Ok(names) => Peer::Tls { addr, names },
                    Err(e) => {
                        tracing::info!(peer = %addr, error = %e, "Rejected client certificate");
                        return;
                    }
                },
                // Only a verifier that allows it lets a client through without a certificate;
                // such a peer has no role (see `Peer::Anonymous`).
                None => Peer::Anonymous { addr },
            };
            if let Some(policy) = policy
                && let Err(why) = policy.resolve(&peer)
            {
                tracing::info!(peer = %addr, reason = %why, "Closed a connection with no role");
                return;
            }
            tracing::debug!(peer = %addr, "Accepted TLS connection");
            let _ = tx.send(Ok(limits.wrap(tls, peer, slot))).await;
        });
    }
}

/// Binds the local socket with mode 0600, replacing a stale socket file but nothing else.
pub fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?,
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; remove it or choose another server.local_socket",
                path.display()
            ));
        }
        Err(_) => {}
    }
    // umask is process-wide, but nothing else creates files while the listeners start, and this
    // makes the socket 0600 from the moment it exists rather than after a chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    Ok(listener)
}

/// Yields local-socket connections with their peer credentials, at most as many at once as
/// `limits` allows (`[server] max_local_connections`).
pub fn unix_incoming(
    listener: UnixListener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<UnixPeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut log = RefusalLog {
            window: Instant::now() - Duration::from_secs(2),
            suppressed: 0,
        };
        loop {
            let stream = tokio::select! {
                _ = shutdown.changed() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "Accept on local socket failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(cred) = stream.peer_cred() else {
                tracing::info!("Dropped local connection without peer credentials");
                continue;
            };
            let slot = match limits.admit(None) {
                Ok(slot) => slot,
                Err(_) => {
                    log.refused(
                        &format!("uid {}", cred.uid()),
                        "max_local_connections reached",
                    );
                    continue;
                }
            };
            let peer = Peer::Unix {
                uid: cred.uid(),
                pid: cred.pid(),
            };
            let s = limits.wrap(crate::uds_authority::interpose(stream), peer, slot);
            if tx.send(Ok(s)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Tower layer that counts a connection's open streams: a stream is open from its request
/// until its response body is done or dropped.
#[derive(Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = TrackStreams<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TrackStreams { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Clone)]
pub struct TrackStreams<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for TrackStreams<S>
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
        let guard = req.extensions().get::<Conn>().map(|c| c.activity.open());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(match guard {
                Some(guard) => resp.map(|body| {
                    tonic::body::Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its stream counted as open until it is done or dropped.
struct Guarded {
    inner: tonic::body::Body,
    _guard: StreamGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
