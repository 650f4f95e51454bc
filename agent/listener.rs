//! Accepting connections: TLS over TCP and the local Unix socket.
//!
//! Each accepted connection becomes a [`PeerStream`] that carries its [`Peer`] to tonic, which
//! puts it in every request's extensions for [`crate::auth`]. Handshakes run in their own tasks
//! with a deadline, so a slow or hostile client cannot stall the accept loop, and the TLS
//! configuration is read from a `watch` channel at each accept, so a reload applies to the next
//! connection without touching established ones.

use crate::auth::{Peer, certificate_names};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// A connection and who is on the other end.
pub struct PeerStream<S> {
    io: S,
    peer: Arc<Peer>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<S> tonic::transport::server::Connected for PeerStream<S> {
    type ConnectInfo = Arc<Peer>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PeerStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub shutdown: watch::Receiver<bool>,
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
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    loop {
        let permit = tokio::select! {
            _ = opts.shutdown.changed() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
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
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(opts.config.borrow().clone());
        let deadline = opts.handshake_timeout;
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
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
            let names = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(cert) => match certificate_names(cert) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::info!(peer = %addr, error = %e, "Rejected client certificate");
                        return;
                    }
                },
                // The verifier requires a certificate; this is defence in depth.
                None => return,
            };
            tracing::debug!(peer = %addr, ?names, "Accepted TLS connection");
            let stream = PeerStream {
                io: tls,
                peer: Arc::new(Peer::Tls { addr, names }),
                _permit: Some(permit),
            };
            let _ = tx.send(Ok(stream)).await;
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

/// Yields local-socket connections with their peer credentials.
pub fn unix_incoming(
    listener: UnixListener,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<UnixPeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
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
            let peer = Peer::Unix {
                uid: cred.uid(),
                pid: cred.pid(),
            };
            let s = PeerStream {
                io: crate::uds_authority::interpose(stream),
                peer: Arc::new(peer),
                _permit: None,
            };
            if tx.send(Ok(s)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
