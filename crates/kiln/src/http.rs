//! The API's listener: a cap on open connections and timeouts on the ones
//! that send nothing, so that clients without a key cannot hold the
//! server's descriptors.
//!
//! Three rules, for each connection ([`Conn`]):
//!
//! - with no request in flight and nothing received, it is closed after the
//!   idle timeout (a keep-alive connection nobody uses);
//! - once the first byte of a request has arrived, its headers must be
//!   complete within the header timeout, and a request body may not pause
//!   longer than that either (half a request is never held);
//! - while a request is being answered (its body read, the handler
//!   running, the response being written) nothing is timed: an execution
//!   that runs for an hour keeps its connection.
//!
//! Past `max_connections`, new connections wait in the kernel's backlog
//! until one closes. The timeouts are enforced where hyper reads: a read
//! past its deadline fails with `TimedOut`, and hyper closes the
//! connection. The service around the router ([`Tracked`]) tells each
//! connection when a request starts and when its body and response end.

use axum::body::Body;
use axum::serve::IncomingStream;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Bounds on the API's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to send a request's headers once begun; longest pause inside a
    /// request body.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
}

/// A TCP listener that accepts at most `max_connections` at once.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: HttpLimits,
}

impl Listener {
    pub fn new(inner: TcpListener, limits: HttpLimits) -> Self {
        Listener { inner, slots: Arc::new(Semaphore::new(limits.max_connections)), limits }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        // The semaphore is never closed, so this never fails.
        let Ok(slot) = self.slots.clone().acquire_owned().await else { return std::future::pending().await };
        let mut pause = Duration::from_millis(20);
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Small writes (a streamed output, a short answer) go out
                    // at once: with Nagle's algorithm each waited for the
                    // client's delayed ACK, about 40 ms.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    return (Conn::new(stream, slot, self.limits), addr);
                }
                Err(e) => {
                    // Out of descriptors or memory: wait it out; anything
                    // else concerns that one connection only.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        tracing::warn!(error = %e, "cannot accept API connections for now; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// What a connection is doing, shared by its reads and its requests.
#[derive(Debug)]
struct State {
    limits: HttpLimits,
    /// Requests whose response has not been fully written.
    active: usize,
    /// Requests whose body has not been fully read.
    receiving: usize,
    /// Since when no request has been in flight.
    idle_since: Instant,
    /// When the first byte of the next request arrived, if it has.
    head_started: Option<Instant>,
    /// When the last byte arrived.
    last_read: Instant,
}

impl State {
    /// When a read that is still waiting must give up, if ever.
    fn deadline(&self) -> Option<Instant> {
        if self.receiving > 0 {
            Some(self.last_read + self.limits.header_timeout)
        } else if self.active > 0 {
            None
        } else if let Some(started) = self.head_started {
            Some(started + self.limits.header_timeout)
        } else {
            Some(self.idle_since + self.limits.idle_timeout)
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// An accepted connection: the stream, its slot under the cap, and its
/// deadlines.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    state: Shared,
    timer: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: HttpLimits) -> Self {
        let now = Instant::now();
        let state = State { limits, active: 0, receiving: 0, idle_since: now, head_started: None, last_read: now };
        Conn {
            stream,
            state: Arc::new(Mutex::new(state)),
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            _slot: slot,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let mut st = lock(&self.state);
                    let now = Instant::now();
                    st.last_read = now;
                    if st.active == 0 && st.head_started.is_none() {
                        st.head_started = Some(now);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = lock(&self.state).deadline() else { return Poll::Pending };
                let timer = self.timer.as_mut();
                if timer.deadline() != deadline {
                    timer.reset(deadline);
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing in time (idle, or a request left half-sent)",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Makes a [`Tracked`] service for each accepted connection.
#[derive(Debug, Clone)]
pub struct MakeTracked<S> {
    service: S,
}

impl<S> MakeTracked<S> {
    pub fn new(service: S) -> Self {
        MakeTracked { service }
    }
}

impl<'a, S: Clone + Send + 'static> tower::Service<IncomingStream<'a, Listener>> for MakeTracked<S> {
    type Response = Tracked<S>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Tracked<S>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: IncomingStream<'a, Listener>) -> Self::Future {
        let state = incoming.io().state.clone();
        std::future::ready(Ok(Tracked { inner: self.service.clone(), state }))
    }
}

/// The router, telling its connection when requests start and end.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    state: Shared,
}

type Request = axum::http::Request<Body>;
type Response = axum::http::Response<Body>;

impl<S> tower::Service<Request> for Tracked<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let answering = Answering::start(self.state.clone());
        let req = if http_body::Body::is_end_stream(req.body()) {
            req
        } else {
            let receiving = Some(Receiving::start(self.state.clone()));
            req.map(|body| Body::new(RequestBody { body, receiving, waiting: false }))
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Answered once hyper has written (and dropped) the body.
            Ok(resp.map(|body| Body::new(ResponseBody { body, answering: Some(answering) })))
        })
    }
}

/// A request in flight, from its head to the end of its response.
struct Answering(Shared);

impl Answering {
    fn start(state: Shared) -> Self {
        let mut st = lock(&state);
        st.active += 1;
        st.head_started = None;
        drop(st);
        Answering(state)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let mut st = lock(&self.0);
        st.active = st.active.saturating_sub(1);
        if st.active == 0 {
            st.idle_since = Instant::now();
        }
    }
}

/// A request body not yet read to its end.
struct Receiving(Shared);

impl Receiving {
    fn start(state: Shared) -> Self {
        let mut st = lock(&state);
        st.receiving += 1;
        st.last_read = Instant::now();
        drop(st);
        Receiving(state)
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut st = lock(&self.0);
        st.receiving = st.receiving.saturating_sub(1);
    }
}

/// A request body, telling its connection while it waits for the client.
struct RequestBody {
    body: Body,
    receiving: Option<Receiving>,
    /// Whether the last poll found nothing to read.
    waiting: bool,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // A pause counts from when the handler starts waiting (it may read
        // late, e.g. after `Expect: 100-continue`), or from the last byte.
        if !self.waiting {
            if let Some(r) = &self.receiving {
                lock(&r.0).last_read = Instant::now();
            }
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        self.waiting = polled.is_pending();
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.body.is_end_stream() {
            self.receiving = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body: the request is answered when it ends or is dropped.
struct ResponseBody {
    body: Body,
    answering: Option<Answering>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.answering = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
