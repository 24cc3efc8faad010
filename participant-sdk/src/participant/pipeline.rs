//! Pipelined HTTP/1.1 from coordinators (docs/http-participants.md).
//!
//! A coordinator that has seen `tandem-pipeline: N` on an answer may write
//! up to N calls on one connection without waiting for each answer, and
//! marks such a connection by the same header on its requests. hyper's
//! server takes pipelined requests one at a time: a slow handler would hold
//! every call behind it. Here the calls of one connection run concurrently
//! and their answers go back in order, as many in one write as are ready.
//!
//! [`serve`] reads the head of each new connection's first request: a
//! pipelined connection is served here, anything else (HTTP/1.1 from other
//! clients, HTTP/2, gRPC) goes to axum with the bytes already read put back
//! in front.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{self, BoxFuture, Either, Shared};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::server::{ParticipantServer, http_request};
use tandem_proto::wire::http1;

use super::{Handler, headers};

/// Calls in flight on one pipelined connection; beyond it the connection
/// is not read until answers go out. What the answers announce.
pub const DEPTH: usize = 32;
pub const DEPTH_TEXT: &str = "32";
/// A request's head (request line and headers), and its number of headers.
const HEAD_BYTES_MAX: usize = 64 * 1024;
const HEADERS_MAX: usize = 64;
/// Each read has room for at least `READ_ROOM_MIN` bytes, made `READ_ROOM`.
const READ_ROOM_MIN: usize = 4 << 10;
const READ_ROOM: usize = 32 << 10;
/// A request's body: axum's default limit, as on other connections.
const BODY_BYTES_MAX: usize = 2 * 1024 * 1024;
/// How long a new connection may take to send its first request's head.
const FIRST_HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A pipelined connection with nothing in flight is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections handed to axum and not yet taken by it.
const HANDOFF_QUEUE: usize = 64;
/// The bodies of a connection's calls in flight, and its answers not yet
/// written: beyond either, it is not read until they go down.
const BODIES_IN_FLIGHT_MAX: usize = 4 << 20;
const ANSWERS_UNWRITTEN_MAX: usize = 1 << 20;

type Stop = Shared<BoxFuture<'static, ()>>;

pub(super) async fn serve<H: Handler>(
    listener: TcpListener,
    server: ParticipantServer<H>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let stop: Stop = shutdown.boxed().shared();
    let (to_axum, handed) = mpsc::channel(HANDOFF_QUEUE);
    let handed = Handed {
        connections: handed,
        local,
    };
    let axum = axum::serve(handed, server.router()).with_graceful_shutdown(stop.clone());
    let (served, ()) = tokio::join!(
        std::future::IntoFuture::into_future(axum),
        accept(listener, server, to_axum, stop)
    );
    served
}

/// Accepts connections until `stop`; serves the pipelined ones, hands the
/// rest to axum; then waits for the pipelined ones to answer what is in
/// flight. They are tasks of a set this future owns: dropping it (the
/// server's future) ends them, as it ends accepting.
async fn accept<H: Handler>(
    listener: TcpListener,
    server: ParticipantServer<H>,
    to_axum: mpsc::Sender<(Rewind, SocketAddr)>,
    stop: Stop,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut stopped = pin!(stop.clone());
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (server, to_axum, stop) = (server.clone(), to_axum.clone(), stop.clone());
                connections.spawn(async move {
                    // Until it is handed on, a connection holds up shutdown
                    // by at most the time its first head takes.
                    let first = tokio::select! {
                        _ = stop.clone() => return,
                        first = tokio::time::timeout(FIRST_HEAD_TIMEOUT, first_head(stream)) => first,
                    };
                    match first {
                        Ok(Some((stream, read, true))) => {
                            serve_pipelined(server, stream, read, stop).await;
                        }
                        Ok(Some((stream, read, false))) => {
                            let rewind = Rewind {
                                prefix: read.freeze(),
                                stream,
                            };
                            tokio::select! {
                                _ = stop => {}
                                _ = to_axum.send((rewind, peer)) => {}
                            }
                        }
                        // Closed, or silent: nothing to serve.
                        Ok(None) | Err(_) => {}
                    }
                });
            }
            // A connection gone before it was accepted: the next one.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            // Out of file descriptors and the like: as axum does, wait a
            // moment rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Reads until the first request's head is complete (or cannot be one):
/// the stream, what was read, and whether the connection is pipelined.
/// `None` if it closed first.
async fn first_head(mut stream: TcpStream) -> Option<(TcpStream, BytesMut, bool)> {
    let mut read = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut read).await.ok()? == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut request = httparse::Request::new(&mut headers);
        let pipelined = match request.parse(&read) {
            Ok(httparse::Status::Complete(_)) => {
                http1::header(request.headers, headers::PIPELINE).is_some()
            }
            Ok(httparse::Status::Partial) if read.len() < HEAD_BYTES_MAX => continue,
            // HTTP/2's preface, or something axum will refuse in its words.
            Ok(httparse::Status::Partial) | Err(_) => false,
        };
        return Some((stream, read, pipelined));
    }
}

/// A request taken off the front of the buffer, or why none is.
enum Next {
    Request {
        head: Bytes,
        body: Bytes,
        close: bool,
    },
    /// Not all of it has arrived.
    Partial,
    /// Cannot be read as a request: answered, then the connection closes.
    Bad(StatusCode, &'static str),
}

fn next_request(read: &mut BytesMut) -> Next {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(read) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if read.len() <= HEAD_BYTES_MAX => return Next::Partial,
        Ok(httparse::Status::Partial) => {
            return Next::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large",
            );
        }
        Err(_) => return Next::Bad(StatusCode::BAD_REQUEST, "malformed request"),
    };
    let value = |name: &str| http1::header(request.headers, name);
    if value("transfer-encoding").is_some() {
        return Next::Bad(
            StatusCode::NOT_IMPLEMENTED,
            "a pipelined call's body must have a content-length",
        );
    }
    let body_len = match value("content-length") {
        None => 0,
        Some(v) => match std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) {
            Some(n) if n <= BODY_BYTES_MAX => n,
            Some(_) => return Next::Bad(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            None => return Next::Bad(StatusCode::BAD_REQUEST, "bad content-length"),
        },
    };
    let close = http1::closes(request.headers);
    if read.len() < head_len + body_len {
        read.reserve(head_len + body_len - read.len());
        return Next::Partial;
    }
    let head = read.split_to(head_len).freeze();
    let body = read.split_to(body_len).freeze();
    Next::Request { head, body, close }
}

/// The answer to one pipelined request (its head parsed again, from its
/// own bytes, so that the read buffer is free meanwhile).
async fn answer<H: Handler>(
    server: ParticipantServer<H>,
    head: Bytes,
    body: Bytes,
) -> (StatusCode, String) {
    let parsed = {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut request = httparse::Request::new(&mut headers);
        let _ = request.parse(&head);
        let route = request
            .path
            .unwrap_or_default()
            .split('?')
            .next()
            .unwrap_or_default()
            .strip_prefix(tandem_proto::wire::HTTP_ROUTE_PREFIX)
            .filter(|op| !op.is_empty() && !op.contains('/'));
        match (request.method, route) {
            (Some("POST"), Some(op)) => {
                let get = |name: &str| {
                    http1::header(request.headers, name)
                        .map(|v| std::str::from_utf8(v).unwrap_or_default())
                };
                http_request(&server, op.to_string(), &get, body)
            }
            (_, Some(_)) => Err((StatusCode::METHOD_NOT_ALLOWED, String::new())),
            (_, None) => Err((StatusCode::NOT_FOUND, String::new())),
        }
    };
    match parsed {
        Ok((request, traceparent)) => {
            super::server::http_answer(server.call_traced(request, traceparent.as_deref()).await)
        }
        Err(refused) => refused,
    }
}

fn encode(out: &mut Vec<u8>, (status, text): (StatusCode, String), close: bool) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}: {}\r\n{}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default(),
        text.len(),
        headers::PIPELINE,
        DEPTH_TEXT,
        if close { "connection: close\r\n" } else { "" },
    );
    out.extend_from_slice(text.as_bytes());
}

/// Serves a pipelined connection: reads requests while fewer than
/// [`DEPTH`] are in flight (and their bodies and the answers not yet
/// written stay under their bounds), runs them concurrently, writes the
/// answers in order. After a request it cannot read, a `connection: close`, the
/// peer's end of input or `stop`, it reads no more, answers what is in
/// flight and closes.
async fn serve_pipelined<H: Handler>(
    server: ParticipantServer<H>,
    stream: TcpStream,
    read: BytesMut,
    stop: Stop,
) {
    let _ = stream.set_nodelay(true);
    let mut read = read;
    let mut in_flight = FuturesOrdered::new();
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut written = 0;
    let mut closing = false;
    // Body bytes of the calls in flight.
    let mut held = 0;
    let mut stop = pin!(stop);
    let mut idle = pin!(tokio::time::sleep(IDLE_TIMEOUT));
    poll_fn(|cx: &mut Context<'_>| {
        loop {
            if !closing && stop.as_mut().poll(cx).is_ready() {
                closing = true;
            }
            let room = |in_flight: usize, held: usize, out: &[u8]| {
                in_flight < DEPTH
                    && held < BODIES_IN_FLIGHT_MAX
                    && out.len() < ANSWERS_UNWRITTEN_MAX
            };
            // Take every complete request off the buffer.
            while !closing && room(in_flight.len(), held, &out) {
                match next_request(&mut read) {
                    Next::Request { head, body, close } => {
                        let size = body.len();
                        held += size;
                        let call = answer(server.clone(), head, body);
                        let call = call.map(move |a| (a, close, size));
                        in_flight.push_back(Either::Left(call));
                        closing = close;
                    }
                    Next::Partial => break,
                    Next::Bad(status, why) => {
                        let refused = ((status, why.to_string()), true, 0);
                        in_flight.push_back(Either::Right(future::ready(refused)));
                        closing = true;
                    }
                }
            }
            // Answers, in order, as far as they are ready.
            let mut answered = false;
            while let Poll::Ready(Some((answer, close, size))) = in_flight.poll_next_unpin(cx) {
                encode(&mut out, answer, close);
                held -= size;
                answered = true;
            }
            while written < out.len() {
                match stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => break,
                }
                match stream.try_write(&out[written..]) {
                    Ok(0) => return Poll::Ready(()),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Poll::Ready(()),
                }
            }
            if written == out.len() {
                out.clear();
                written = 0;
            }
            // Answers made room: requests already read may be taken now.
            if answered && !closing && !read.is_empty() && room(in_flight.len(), held, &out) {
                continue;
            }
            let quiet = in_flight.is_empty() && out.is_empty();
            if closing && quiet {
                return Poll::Ready(());
            }
            if !closing && room(in_flight.len(), held, &out) {
                // Room for a batch: an empty BytesMut would read 64 bytes at a time.
                if read.capacity() - read.len() < READ_ROOM_MIN {
                    read.reserve(READ_ROOM);
                }
                match stream.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => match stream.try_read_buf(&mut read) {
                        // The peer will send no more.
                        Ok(0) => closing = true,
                        Ok(_) => {
                            idle.as_mut()
                                .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                            continue;
                        }
                        // Readiness was stale: poll it again.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => return Poll::Ready(()),
                    },
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
                if closing {
                    continue;
                }
            }
            if quiet && idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            return Poll::Pending;
        }
    })
    .await;
    // The connection may be gone with calls still running: they run to
    // their end, unanswered, rather than being cancelled half-way (see
    // `ParticipantServer::call_to_the_end`). On this connection's task, so
    // that a shutdown still waits for them.
    while in_flight.next().await.is_some() {}
}

/// The connections [`accept`] hands to axum.
struct Handed {
    connections: mpsc::Receiver<(Rewind, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Handed {
    type Io = Rewind;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Rewind, SocketAddr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop stopped: so did axum's (graceful shutdown).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A stream with the bytes already read from it put back in front.
pub(super) struct Rewind {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
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
