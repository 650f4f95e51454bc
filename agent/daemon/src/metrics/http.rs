//! The metrics endpoint's HTTP: `GET /metrics` (and `HEAD`), HTTP/1.x, one request per
//! connection, then closed, which is all a Prometheus scrape needs.
//!
//! Written out rather than served by axum (in the tree through tonic's router): `axum::serve`
//! bounds nothing, and this does: at most [`MAX_CONNECTIONS`] at once (more are closed at
//! accept), a request head of at most [`MAX_HEAD`] bytes, and [`DEADLINE`] for a connection
//! from accept to the last byte sent. The one route is a few dozen lines; axum's server and
//! router were 90 KB of the agent's binary (5.81 MB with them, 5.72 MB without).

use super::Sources;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_HEAD: usize = 8 * 1024;
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    sources: Arc<Sources>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stream = tokio::select! {
            r = shutdown.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "Metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Full: this connection is closed unanswered; the scraper retries at its next interval.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(DEADLINE, answer(stream, &sources)).await;
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        let found = memchr::memmem::find(&head, b"\r\n\r\n");
        if found.map_or(head.len(), |i| i) > MAX_HEAD {
            return reply(&mut stream, "431 Request Header Fields Too Large", "", b"").await;
        }
        if let Some(i) = found {
            break i;
        }
    };
    let line = head[..end]
        .split(|b| *b == b'\r')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|b| *b == b' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => {
            let body = sources.render().await;
            let body = if method == b"HEAD" { "" } else { body.as_str() };
            reply(&mut stream, "200 OK", super::CONTENT_TYPE, body.as_bytes()).await
        }
        (_, b"/metrics") => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET or HEAD\n",
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"patch-agent serves only GET /metrics here\n",
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !kind.is_empty() {
        out.push_str(&format!("Content-Type: {kind}\r\n"));
    }
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    async fn endpoint() -> (String, tokio::sync::watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let dir = tempfile::tempdir().expect("tmp");
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys).expect("keys dir");
        let cfg = crate::config::JobsSection::default();
        let engine = crate::jobs::engine::Engine::open(
            &dir.path().join("boot_id"),
            dir.path(),
            patch_agent_wire::job::trust::TrustStore::load(&keys).expect("trust"),
            cfg.admission_policy("h", "m", &Default::default()),
            cfg,
            None,
            Arc::new(crate::jobs::clock::SystemClock),
        )
        .await
        .expect("engine");
        let sources = Arc::new(Sources {
            scanner: None,
            engine,
            outbox: None,
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(listener, sources, rx));
        // The engine's directory lives as long as the test process needs it.
        std::mem::forget(dir);
        (addr, tx)
    }

    fn exchange(addr: &str, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        s.write_all(request).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_get_and_head_and_refuses_the_rest_by_name() {
        let (addr, _stop) = endpoint().await;
        let a = addr.clone();
        let (get, head, post, other, huge) = tokio::task::spawn_blocking(move || {
            (
                exchange(&a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                exchange(&a, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n"),
                exchange(&a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
                exchange(&a, b"GET /etc/passwd HTTP/1.1\r\n\r\n"),
                exchange(
                    &a,
                    format!(
                        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
                        "a".repeat(MAX_HEAD)
                    )
                    .as_bytes(),
                ),
            )
        })
        .await
        .expect("join");
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("patchagent_build_info{version="), "{get}");
        assert!(
            get.contains("Content-Type: application/openmetrics-text"),
            "{get}"
        );
        let (h, body) = get.split_once("\r\n\r\n").expect("head");
        assert!(
            h.contains(&format!("Content-Length: {}", body.len())),
            "{h}"
        );
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
        assert!(
            other.starts_with("HTTP/1.1 404") && other.contains("only GET /metrics"),
            "{other}"
        );
        assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_take_a_slot_only_until_the_deadline_and_never_block_scrapes_beyond_it()
     {
        let (addr, _stop) = endpoint().await;
        // Fill every slot with connections that never send a byte.
        let idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let a = addr.clone();
        let refused =
            tokio::task::spawn_blocking(move || exchange(&a, b"GET /metrics HTTP/1.1\r\n\r\n"))
                .await
                .expect("join");
        assert_eq!(
            refused, "",
            "over the limit a connection is closed unanswered"
        );
        // After the deadline the silent ones are gone, and a scrape is answered again.
        tokio::time::sleep(DEADLINE + Duration::from_millis(500)).await;
        let a = addr.clone();
        let ok =
            tokio::task::spawn_blocking(move || exchange(&a, b"GET /metrics HTTP/1.1\r\n\r\n"))
                .await
                .expect("join");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        drop(idle);
    }
}
