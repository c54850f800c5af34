//! Which HTTP version a connection speaks, decided before hyper gets it, so each connection holds
//! only the machinery of its own version: HTTP/1.1 or HTTP/2 (with TLS: by ALPN; without: by
//! whether the first bytes are the HTTP/2 connection preface, RFC 9113 §3.4).
//!
//! hyper-util's version-detecting connection does the same, but as one value large enough for
//! either version (about 1.5 KiB, where an HTTP/1 connection alone is 0.7), held by every open
//! connection for its life (README, "Performance", memory per idle connection).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The HTTP version of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// The start of the HTTP/2 connection preface; no HTTP/1 request starts with it (RFC 9113 §3.4:
/// `PRI` is the method reserved for it).
const PREFACE_START: &[u8] = b"PRI";

/// How long to wait before looking again when the first bytes are too few to tell (a client that
/// sends `P` or `PR` alone in its first segment): rare, so a short pause, not a busy loop.
const RETRY_AFTER: Duration = Duration::from_millis(5);

/// The version the first bytes of a plain TCP connection announce, or `None` when they are too
/// few to tell (a prefix of `PRI`, including nothing).
pub(super) fn from_first_bytes(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(PREFACE_START.len());
    if first[..n] != PREFACE_START[..n] {
        Some(Protocol::Http1)
    } else if n == PREFACE_START.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// The version agreed in the TLS handshake: `h2` by ALPN, otherwise HTTP/1.1 (HTTP/2 over TLS
/// is negotiated by ALPN, RFC 9113 §3.2).
pub(super) fn from_alpn(alpn: Option<&[u8]>) -> Protocol {
    if alpn == Some(b"h2") {
        Protocol::Http2
    } else {
        Protocol::Http1
    }
}

/// Looks at the first bytes of a plain connection without taking them (hyper reads them next).
/// `None`: the peer closed, failed, or sent too little to tell before `by`.
pub(super) async fn sniff(stream: &TcpStream, by: Instant) -> Option<Protocol> {
    let look = async {
        let mut buf = [0u8; PREFACE_START.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if let Some(p) = from_first_bytes(&buf[..n]) {
                return Some(p);
            }
            tokio::time::sleep(RETRY_AFTER).await;
        }
    };
    tokio::time::timeout_at(by, look).await.ok().flatten()
}

/// The HTTP/1.1 and HTTP/2 connection settings of one listener.
pub(super) struct Builders {
    pub http1: hyper::server::conn::http1::Builder,
    pub http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new(first_request: Duration, max_header_bytes: usize) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(first_request)
            .max_buf_size(max_header_bytes.max(8192))
            .max_headers(100);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(max_header_bytes as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Builders { http1, http2 }
    }
}

/// A connection being served, of either version: what [`super::conn::drive`] needs of it.
pub(super) trait Served: Send {
    /// Ready when the connection has ended (cleanly or not: either way there is nothing left
    /// to do with it).
    fn poll_served(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
    /// HTTP/1: close after the response in flight; HTTP/2: GOAWAY.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection + Send> Served for C {
    fn poll_served(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.poll(cx).map(|_| ())
    }

    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self)
    }
}

/// `io` served in `protocol` with `service`, boxed: the one allocation a connection holds for
/// hyper's state, of its own version's size. Not an `async fn`, so nothing of `io` stays behind
/// in the caller's task.
pub(super) fn serve<I, S, B>(
    builders: &Builders,
    protocol: Protocol,
    io: I,
    service: S,
) -> Pin<Box<dyn Served>>
where
    I: Read + Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match protocol {
        Protocol::Http1 => Box::pin(builders.http1.serve_connection(io, service)),
        Protocol::Http2 => Box::pin(builders.http2.serve_connection(io, service)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_of_an_http1_request_mean_http1_at_once() {
        for first in [
            &b"GET /v1"[..],
            b"POST",
            b"PUT",
            b"PATCH",
            b"G",
            b"\r\n",
            b"PRX",
        ] {
            assert_eq!(from_first_bytes(first), Some(Protocol::Http1), "{first:?}");
        }
    }

    #[test]
    fn the_http2_preface_means_http2_from_its_third_byte() {
        assert_eq!(
            from_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(from_first_bytes(b"PRI"), Some(Protocol::Http2));
    }

    #[test]
    fn too_few_bytes_to_tell_wait_for_more() {
        for first in [&b""[..], b"P", b"PR"] {
            assert_eq!(from_first_bytes(first), None, "{first:?}");
        }
    }

    #[test]
    fn alpn_h2_means_http2_anything_else_http1() {
        assert_eq!(from_alpn(Some(b"h2")), Protocol::Http2);
        assert_eq!(from_alpn(Some(b"http/1.1")), Protocol::Http1);
        assert_eq!(from_alpn(None), Protocol::Http1);
    }
}
