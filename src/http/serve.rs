//! The accept loop: each TCP connection is served by hyper (HTTP/1.1 or HTTP/2, detected) with the router, and
//! no connection is kept open for free.
//!
//! - A request head must arrive within `header_read_timeout` (hyper's HTTP/1 timer; hyper also runs it while an
//!   HTTP/1.1 keep-alive connection waits for its next request).
//! - A connection on which no request has been in flight for `idle_timeout` is closed, whatever bytes move on it.
//!   hyper has no such timeout, and hyper-util's protocol detection runs no timer at all, so a client that
//!   connects and sends nothing would be kept forever, and an HTTP/2 client that sends no request but PINGs
//!   every 20 s would be too. The socket is therefore wrapped in [`IdleTimeout`], which fails a pending read or
//!   write with `io::ErrorKind::TimedOut` once `idle_timeout` has passed since the connection opened or its last
//!   request ended, unless a request is in flight ([`Activity`], shared with the connection's service). A request
//!   is in flight from its head until its response body has been sent, so a slow handler is bounded by the
//!   request timeout of the router and a slow download by nothing here.
//! - HTTP/2: the server PINGs a connection every 30 s and closes it when the PING is not answered within 20 s (a
//!   peer gone without a word), and allows 100 concurrent streams a connection.
//! - At most `max_connections` are open at once; one more is closed as soon as it is accepted (counted in
//!   `carebridge_connections_refused_total`), so a flood of sockets cannot take every file descriptor.
//! - On shutdown the listener is closed at once, each connection finishes the requests it is handling and is
//!   closed, and whatever is still open after the grace period is abandoned.
//!
//! - With TLS ([`crate::tls::ServerTls`]), the handshake runs in the connection's task, bounded by the header-read
//!   timeout (a client that opens a socket and never says hello holds no more than a plain one would); ALPN
//!   offers `h2` and `http/1.1`; the configuration is read at each handshake, so a reloaded certificate is used by
//!   the next one. A failed handshake (no client certificate where mutual TLS is required, an unknown CA, plain
//!   HTTP on the TLS port) is counted in `carebridge_tls_handshake_failures_total`.
//!
//! Every request carries the peer address as `ConnectInfo<SocketAddr>`, as with axum's own `serve`, and, over
//! mutual TLS, the client's verified certificate as [`ClientCertificate`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::config::Settings;
use crate::tls::ServerTls;
use rustls::pki_types::CertificateDer;

/// How long the accept loop waits after an accept error that is ours (out of file descriptors, of memory) before
/// it tries again: such errors last a moment, and retrying at once would only spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a connection may take over its parts, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// Longest a connection may stay open with no byte moving and no request being handled.
    pub idle_timeout: Duration,
    /// How long connections get to finish their requests after the shutdown signal.
    pub shutdown_grace: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The limits of `settings`.
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(settings.server.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(settings.server.idle_timeout_secs),
            shutdown_grace: Duration::from_secs(settings.server.shutdown_grace_secs),
            max_connections: settings.server.max_connections.max(1),
        }
    }
}

/// The certificate a client presented and the handshake verified (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Arc<CertificateDer<'static>>);

/// Serves `router` on `listener` (over TLS when `tls` is set) until `shutdown` completes; then stops accepting and
/// gives the open connections up to the grace period to finish the requests they are handling. Returns when they
/// have, or when it is over.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_EVERY))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics::counter!("carebridge_connections_refused_total").increment(1);
            tracing::debug!(%peer, max = limits.max_connections, "Connection refused: too many open.");
            drop(stream);
            continue;
        };
        metrics::gauge!("carebridge_connections_open").increment(1.0);
        let activity = Arc::new(Activity::new());
        let socket = IdleTimeout::new(stream, limits.idle_timeout, activity.clone());
        let mut service = ConnectionService { router: router.clone(), peer, activity, client_certificate: None };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = Open(permit);
            let served = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(socket), service)).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let stream = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return handshake_failed(&e.to_string(), "refused"),
                        Err(_) => return handshake_failed("no handshake in time", "timeout"),
                    };
                    service.client_certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(<[_]>::first)
                        .map(|c| ClientCertificate(Arc::new(c.clone().into_owned())));
                    watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await
                }
            };
            if let Err(e) = served {
                // Timeouts, resets and malformed requests end here; they are the client's, and not news.
                tracing::debug!(error = %e, "Connection closed.");
            }
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "Shutdown requested; finishing requests in flight.");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!(
            grace_secs = limits.shutdown_grace.as_secs(),
            "Requests still in flight after the grace period; stopping anyway."
        ),
    }
}

/// HTTP/2: how often the server PINGs a connection, and how long it waits for the answer before closing it.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2: most streams (requests) open at once on one connection.
const H2_MAX_STREAMS: u32 = 100;

/// An open connection's place under `max_connections`, given back (and the gauge lowered) when it closes.
struct Open(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!("carebridge_connections_open").decrement(1.0);
    }
}

/// Counts a failed TLS handshake (the client's doing: a debug line, not news).
fn handshake_failed(error: &str, reason: &'static str) {
    metrics::counter!("carebridge_tls_handshake_failures_total", "reason" => reason).increment(1);
    tracing::debug!(error, reason, "TLS handshake failed.");
}

/// Logs a failed accept; backs off when the failure is ours rather than one peer's.
async fn accept_failed(e: &io::Error) {
    let peer_gave_up = matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    );
    if peer_gave_up {
        tracing::debug!(error = %e, "A connection was reset before it was accepted.");
        return;
    }
    tracing::warn!(error = %e, backoff_ms = ACCEPT_BACKOFF.as_millis(), "Cannot accept connections; retrying.");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// What one connection is doing, shared by its socket wrapper and its service.
struct Activity {
    /// When the connection was accepted; `last` counts from here.
    opened: Instant,
    /// Nanoseconds from `opened` to the last byte read or written, or the end of the last request.
    last: AtomicU64,
    /// Requests on this connection being handled now.
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { opened: Instant::now(), last: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    /// Something happened now.
    fn touch(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Release);
    }

    /// When something last happened.
    fn last(&self) -> Instant {
        self.opened + Duration::from_nanos(self.last.load(Ordering::Acquire))
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

/// A request being handled; the connection is not idle while one lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle clock starts when the handler is done, not when its request arrived.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, for one connection: adds the peer address to each request and counts it as in flight.
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
    client_certificate: Option<ClientCertificate>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        if let Some(certificate) = &self.client_certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        let in_flight = InFlight::begin(&self.activity);
        let router = self.router.clone();
        Box::pin(async move {
            // The request stays in flight until its response body has been sent (or dropped).
            let response = router.oneshot(request).await;
            Ok(response?.map(|body| axum::body::Body::new(Sending { body, _in_flight: in_flight })))
        })
    }
}

/// A response body being sent: its request is in flight until the last frame (or the body is dropped).
struct Sending {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Sending {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket that fails once `limit` has passed since its last request ended (or it opened) while no request was
/// in flight; bytes moving do not keep it open (HTTP/2 PINGs, a head trickled in are not requests).
///
/// The timer is lazy: when it fires it is set again to the real deadline if a request began or ended meanwhile.
struct IdleTimeout {
    stream: TcpStream,
    limit: Duration,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    fn new(stream: TcpStream, limit: Duration, activity: Arc<Activity>) -> Self {
        activity.touch();
        IdleTimeout { stream, limit, activity, timer: Box::pin(tokio::time::sleep(limit)) }
    }

    /// Ready with an error once the connection has been idle for the limit; registers for a wake-up otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let now = Instant::now();
            let deadline = if self.activity.busy() { now + self.limit } else { self.activity.last() + self.limit };
            if deadline <= now {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            Poll::Ready(result) => Poll::Ready(result),
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            Poll::Ready(result) => Poll::Ready(result),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            Poll::Ready(result) => Poll::Ready(result),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(limit: Duration) -> (IdleTimeout, TcpStream, Arc<Activity>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let activity = Arc::new(Activity::new());
        (IdleTimeout::new(server, limit, activity.clone()), client, activity)
    }

    // Real time, kept short: the behaviour under test is a timeout.
    const LIMIT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_read_fails_with_timed_out_once_nothing_moved_for_the_limit() {
        let (mut server, _client, _) = pair(LIMIT).await;
        let started = Instant::now();
        let e = server.read(&mut [0; 8]).await.expect_err("times out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= LIMIT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn bytes_moving_without_a_request_do_not_keep_the_connection_open() {
        let (mut server, mut client, _) = pair(LIMIT).await;
        let opened = Instant::now();
        // A ping now and then, as an HTTP/2 client that never asks for anything would send.
        let pinger = tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(LIMIT / 4).await;
                if client.write_all(b"p").await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0; 8];
        let e = loop {
            if let Err(e) = server.read(&mut buf).await {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let after = opened.elapsed();
        assert!(after >= LIMIT * 9 / 10 && after < LIMIT * 2, "{after:?}");
        pinger.abort();
    }

    #[tokio::test]
    async fn a_request_in_flight_keeps_a_silent_connection_open_and_its_end_starts_the_clock() {
        let (mut server, _client, activity) = pair(LIMIT).await;
        let request = InFlight::begin(&activity);
        let silent = tokio::time::timeout(LIMIT * 4, server.read(&mut [0; 8])).await;
        assert!(silent.is_err(), "the read was cut while a request was in flight: {silent:?}");
        drop(request);
        let ended = Instant::now();
        let e = server.read(&mut [0; 8]).await.expect_err("times out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(ended.elapsed() >= LIMIT * 9 / 10, "{:?}", ended.elapsed());
    }
}
