//! Makes the local socket work with gRPC clients that send the socket *path* as `:authority`.
//!
//! grpcurl 1.8 (the one PyPI ships), grpc-java and grpc-python put the Unix socket path (or its
//! %-encoding) in the HTTP/2 `:authority` pseudo-header. h2, under tonic, rejects such a request
//! as malformed and resets the stream with PROTOCOL_ERROR (hyperium/h2#487, still open). So on
//! the local socket only, the client-to-server direction passes through this rewriter: it
//! re-frames HTTP/2 header blocks, decodes them with the client's HPACK state, replaces an
//! `:authority` that is not a valid URI authority with `localhost`, and re-encodes them with its
//! own HPACK state (the one h2 then decodes). Every other frame, and the whole server-to-client
//! direction, is copied byte for byte.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's initial value; h2 is never configured larger here.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (h2's own default header list limit is 16 KiB).
const MAX_BLOCK: usize = 256 * 1024;
/// The most a header block may decode to, counted as HTTP/2 counts a header list (name, value
/// and 32 bytes per field): h2's default maximum header list size. HPACK lets a few bytes name
/// a large table entry, so an encoded cap alone would let 256 KiB decode to a gigabyte.
pub const MAX_DECODED: usize = 64 * 1024;

/// Interposes the rewriter on a local connection; returns the end to hand to the server.
pub fn interpose(stream: UnixStream) -> DuplexStream {
    let (server_end, ours) = tokio::io::duplex(64 * 1024);
    let (mut client_rd, mut client_wr) = stream.into_split();
    let (mut ours_rd, mut ours_wr) = tokio::io::split(ours);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut ours_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    });
    tokio::spawn(async move {
        if let Err(e) = client_to_server(&mut client_rd, &mut ours_wr).await {
            tracing::debug!(error = %e, "Local connection closed by the HTTP/2 rewriter");
        }
        let _ = ours_wr.shutdown().await;
    });
    server_end
}

async fn client_to_server<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    w.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let h2 reject it with its own error.
        return tokio::io::copy(r, w).await.map(|_| ());
    }
    let mut fixer = Rewriter::new();
    loop {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if len > MAX_BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let out = fixer
            .frame(head, &payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        w.write_all(&out).await?;
    }
}

/// The frame-level state: HPACK contexts on both sides and a header block being assembled.
pub struct Rewriter {
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    pending: Option<(u32, u8, Vec<u8>)>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        // The client may not grow its table past the 4096 bytes the server allows.
        decoder.set_max_allowed_table_size(4096);
        Self {
            decoder,
            encoder: loona_hpack::Encoder::new(),
            pending: None,
        }
    }

    /// Takes one client frame (9-byte header and payload); returns the bytes to forward.
    pub fn frame(&mut self, head: [u8; 9], payload: &[u8]) -> Result<Vec<u8>, String> {
        let kind = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match (kind, self.pending.take()) {
            (HEADERS, None) => {
                let block = header_block(flags, payload)?;
                if flags & END_HEADERS != 0 {
                    self.emit(stream, flags, block)
                } else {
                    self.pending = Some((stream, flags, block.to_vec()));
                    Ok(Vec::new())
                }
            }
            (CONTINUATION, Some((id, first_flags, mut block))) if id == stream => {
                block.extend_from_slice(payload);
                if block.len() > MAX_BLOCK {
                    return Err("header block too large".into());
                }
                if flags & END_HEADERS != 0 {
                    self.emit(stream, first_flags, &block)
                } else {
                    self.pending = Some((id, first_flags, block));
                    Ok(Vec::new())
                }
            }
            (_, Some(_)) => Err("frame interleaved inside a header block".into()),
            (_, None) => {
                let mut out = Vec::with_capacity(9 + payload.len());
                out.extend_from_slice(&head);
                out.extend_from_slice(payload);
                Ok(out)
            }
        }
    }

    fn emit(&mut self, stream: u32, flags: u8, block: &[u8]) -> Result<Vec<u8>, String> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(block, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                // Past the cap nothing more is kept; the block is refused below.
                if decoded <= MAX_DECODED {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| format!("HPACK decoding failed: {e:?}"))?;
        if decoded > MAX_DECODED {
            return Err(format!(
                "header block decodes to more than {MAX_DECODED} bytes"
            ));
        }
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut out = Vec::with_capacity(encoded.len() + 9 * (1 + encoded.len() / MAX_FRAME));
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let mut f = if i == 0 { flags & END_STREAM } else { 0 };
            if i == last {
                f |= END_HEADERS;
            }
            let len = (chunk.len() as u32).to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, f]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }
}

/// The header block fragment of a HEADERS payload, without padding and priority fields.
fn header_block(flags: u8, payload: &[u8]) -> Result<&[u8], String> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&p, rest) = body
            .split_first()
            .ok_or("HEADERS frame too short for padding")?;
        pad = usize::from(p);
        body = rest;
    }
    if flags & PRIORITY != 0 {
        body = body
            .get(5..)
            .ok_or("HEADERS frame too short for priority")?;
    }
    if pad > body.len() {
        return Err("HEADERS padding longer than the frame".into());
    }
    Ok(&body[..body.len() - pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> ([u8; 9], Vec<u8>) {
        let len = (payload.len() as u32).to_be_bytes();
        let s = stream.to_be_bytes();
        (
            [len[1], len[2], len[3], kind, flags, s[0], s[1], s[2], s[3]],
            payload.to_vec(),
        )
    }

    fn decode_all(bytes: &[u8], dec: &mut loona_hpack::Decoder<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut block = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            block.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        dec.decode(&block).expect("decode")
    }

    #[test]
    fn path_authority_becomes_localhost_and_tables_stay_in_step() {
        let mut client = loona_hpack::Encoder::new();
        let mut server = loona_hpack::Decoder::new();
        let mut rw = Rewriter::new();
        for round in 0..3 {
            let block = client.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":path", b"/patchagent.v1.Agent/GetStatus"),
                (b":authority", b"/run/patch-agent/agent.sock"),
                (b"x-round", format!("{round}").as_bytes()),
            ]);
            let (h, p) = frame(HEADERS, END_HEADERS, 1 + 2 * round, &block);
            let out = rw.frame(h, &p).expect("rewrite");
            let got = decode_all(&out, &mut server);
            assert_eq!(got[2], (b":authority".to_vec(), b"localhost".to_vec()));
            assert_eq!(got[3].1, format!("{round}").into_bytes());
        }
    }

    #[test]
    fn valid_authority_padding_priority_and_continuation() {
        let mut client = loona_hpack::Encoder::new();
        let mut server = loona_hpack::Decoder::new();
        let mut rw = Rewriter::new();
        let block = client.encode([
            (&b":authority"[..], &b"agent1:7443"[..]),
            (b"big", &[b'a'; 100][..]),
        ]);
        let (a, b) = block.split_at(10);
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let (h, p) = frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded);
        assert!(rw.frame(h, &p).expect("first").is_empty());
        let (h, p) = frame(CONTINUATION, END_HEADERS, 3, b);
        let out = rw.frame(h, &p).expect("continuation");
        assert_eq!(out[3], HEADERS);
        assert_eq!(out[4], END_STREAM | END_HEADERS);
        let got = decode_all(&out, &mut server);
        assert_eq!(got[0].1, b"agent1:7443");
        // Other frames pass through untouched.
        let (h, p) = frame(0x0, 0x1, 3, b"data");
        assert_eq!(rw.frame(h, &p).expect("data")[9..], *b"data");
    }

    #[test]
    fn a_small_block_that_decodes_huge_is_refused() {
        // One 4000-byte header enters the table; then each 1-byte index repeats it.
        // Literal with incremental indexing, new name "x-big", value length 4000 (7-bit prefix:
        // 127, then 3873 as 0xa1 0x1e).
        let mut block = vec![0x40, 5];
        block.extend_from_slice(b"x-big");
        block.extend_from_slice(&[0x7f, 0xa1, 0x1e]);
        block.extend(std::iter::repeat_n(b'a', 4000));
        // Index 62: the newest dynamic-table entry.
        block.extend(std::iter::repeat_n(0xbe, 1000));
        let mut rw = Rewriter::new();
        let (h, p) = frame(HEADERS, END_HEADERS, 1, &block);
        let e = rw.frame(h, &p).expect_err("decodes to ~4 MB");
        assert!(e.contains("decodes to more than"), "{e}");
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        let mut rw = Rewriter::new();
        let (h, p) = frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 1, 2]);
        assert!(rw.frame(h, &p).is_err());
        let (h, p) = frame(HEADERS, PRIORITY | END_HEADERS, 1, &[1]);
        assert!(rw.frame(h, &p).is_err());
        let (h, p) = frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        );
        assert!(rw.frame(h, &p).is_err());
        let (h, p) = frame(HEADERS, 0, 1, &[0x82]);
        assert!(rw.frame(h, &p).expect("pending").is_empty());
        let (h, p) = frame(0x0, 0, 1, b"x");
        assert!(rw.frame(h, &p).is_err(), "DATA inside a header block");
        let mut rw = Rewriter::new();
        for seed in 0u32..2000 {
            let bytes: Vec<u8> = (0..(seed % 40))
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 8) as u8)
                .collect();
            let (h, p) = frame(HEADERS, (seed % 64) as u8, 1, &bytes);
            let _ = rw.frame(h, &p);
        }
    }
}
