//! Pipelined HTTP/1.1 to `http://` participants that announce it
//! (`tandem-pipeline: N` on their answers; docs/http-participants.md).
//!
//! Calls to such a participant share a few connections, up to N in flight
//! on each: the calls that arrive together go out in one write, and their
//! answers come back in one read, instead of a write and a read per call on
//! each side. A connection is driven by a task of its own; the calls reach
//! it through a channel, so one wake-up of the task serves every call sent
//! meanwhile.
//!
//! Never sent twice here: when a connection breaks, every call on it, sent
//! or not, fails as transient (its outcome is unknown), and the driver
//! retries it as it retries any transient failure. A participant's calls
//! are idempotent (fenced, the barrier), so that is safe.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io::Write;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use tandem_proto::wire::http1;

use super::http1::Answer;

/// Connections per participant address; beyond it calls queue on the
/// least busy one.
const CONNECTIONS_PER_ADDRESS_MAX: usize = 8;
/// Addresses remembered as pipelining (each with its connections): with
/// [`CONNECTIONS_PER_ADDRESS_MAX`], at most 1,024 pipelined connections.
/// Beyond it a participant's calls take the path of one call per
/// connection.
const ADDRESSES_MAX: usize = 128;
/// A connection's write buffer keeps at most this much room between
/// bursts (a burst of large payloads would otherwise keep its size).
const OUT_KEPT_MAX: usize = 256 << 10;
/// Calls in flight per connection at most, whatever a participant
/// announces.
pub const DEPTH_MAX: usize = 64;
/// An answer's head on a pipelined connection; a larger one breaks the
/// connection (its calls are retried).
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Of an answer's body, this much is kept (what the outcome reads of it);
/// the rest is read and dropped.
const BODY_KEPT_MAX: usize = 64 << 10;
const HEADERS_MAX: usize = 64;
/// Each read has room for at least `READ_ROOM_MIN` bytes, made `READ_ROOM`.
const READ_ROOM_MIN: usize = 4 << 10;
const READ_ROOM: usize = 32 << 10;
/// A connection with nothing in flight is closed after this (a
/// participant's server may drop it meanwhile).
const IDLE_MAX: Duration = Duration::from_secs(30);
/// A connection whose oldest unanswered call has waited this long takes no
/// new calls while another can (its answers are held behind that one).
const HELD_AFTER: Duration = Duration::from_millis(100);
/// An answer later than its call's deadline by this much means the
/// connection is stuck behind it: it is closed and its calls fail.
const STUCK_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A call's answer, and the depth its participant still announces (`None`:
/// no longer).
type Outcome = Result<(Answer, Option<usize>), Failed>;

enum Failed {
    /// Never written: it may go on another connection.
    Unsent(Vec<u8>),
    /// It may have been written; what happened.
    Broken(String),
    /// As `Broken`, because an answer could not be framed: the participant
    /// does not pipeline as announced, and is no longer pipelined.
    Unframed(String),
}

/// Why a connection ended.
struct End {
    why: String,
    unframed: bool,
}

impl End {
    fn broken(why: impl Into<String>) -> End {
        End {
            why: why.into(),
            unframed: false,
        }
    }

    fn unframed(why: impl Into<String>) -> End {
        End {
            why: why.into(),
            unframed: true,
        }
    }
}

/// The depth an answer's `tandem-pipeline` header announces.
pub fn announced(value: Option<&[u8]>) -> Option<usize> {
    let depth: usize = std::str::from_utf8(value?).ok()?.trim().parse().ok()?;
    (depth > 1).then_some(depth.min(DEPTH_MAX))
}

#[derive(Default)]
pub struct Pipelines {
    by_address: Mutex<HashMap<String, Address>>,
}

struct Address {
    depth: usize,
    connections: Vec<Arc<Connection>>,
}

struct Connection {
    calls: mpsc::UnboundedSender<Call>,
    /// Calls sent to the task and not yet answered or failed.
    in_flight: Arc<AtomicUsize>,
    /// Since when the oldest call written and not yet answered has waited
    /// ([`micros`]; 0: none).
    head_since: Arc<AtomicU64>,
}

/// Microseconds since the first use, never 0: an instant a connection's
/// task can share through an atomic.
fn micros(at: Instant) -> u64 {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    at.saturating_duration_since(*START).as_micros() as u64 + 1
}

struct Call {
    /// The whole request, encoded.
    request: Vec<u8>,
    deadline: Instant,
    answer: oneshot::Sender<Outcome>,
}

impl Pipelines {
    /// The depth `address` announced, if it pipelines.
    pub fn depth(&self, address: &str) -> Option<usize> {
        let by_address = self.by_address.lock().expect("pipelines lock");
        by_address.get(address).map(|a| a.depth)
    }

    /// Notes what an answer from `address` announced.
    pub fn announce(&self, address: &str, depth: Option<usize>) {
        let mut by_address = self.by_address.lock().expect("pipelines lock");
        if depth.is_some() && by_address.len() >= ADDRESSES_MAX {
            // Make room: forget the addresses with no connection open.
            by_address.retain(|_, a| a.connections.iter().any(|c| !c.calls.is_closed()));
        }
        let full = by_address.len() >= ADDRESSES_MAX;
        match (depth, by_address.get_mut(address)) {
            (Some(depth), Some(known)) => known.depth = depth,
            (Some(depth), None) if !full => {
                let connections = Vec::new();
                by_address.insert(address.to_string(), Address { depth, connections });
            }
            (Some(_), None) => {}
            // Its connections end once their calls are answered.
            (None, _) => {
                by_address.remove(address);
            }
        }
    }

    /// One call on a pipelined connection to `address`: on the least busy
    /// one, or on a new one when every one has `depth` calls in flight.
    pub async fn exchange(
        &self,
        address: &str,
        request: Vec<u8>,
        timeout: Duration,
        body_max: usize,
    ) -> Result<Answer, String> {
        let deadline = Instant::now() + timeout;
        let mut outcome = send(&self.choose(address, false), request, deadline).await;
        if let Err(Failed::Unsent(request)) = outcome {
            // Its connection ended before writing it (idle, or broken): once
            // more, on a new one.
            outcome = send(&self.choose(address, true), request, deadline).await;
        }
        let ((status, mut body), depth) = outcome.map_err(|failed| match failed {
            Failed::Unsent(_) => format!("{address}: the connection closed before the call"),
            Failed::Broken(why) => format!("{address}: {why}"),
            Failed::Unframed(why) => {
                self.announce(address, None);
                format!("{address}: {why}; no longer pipelined")
            }
        })?;
        body.truncate(body_max);
        if depth.is_none() {
            self.announce(address, None);
        }
        Ok((status, body))
    }

    /// The connection a call goes on, its place counted: the least busy,
    /// or a new one (connecting meanwhile; calls queue on it) when every
    /// one has `depth` in flight, there are none, or `new` asks for one.
    fn choose(&self, address: &str, new: bool) -> Arc<Connection> {
        let mut by_address = self.by_address.lock().expect("pipelines lock");
        let Some(known) = by_address.get_mut(address) else {
            // No longer pipelining: a connection for this call alone.
            return Connection::open(address, 1);
        };
        known.connections.retain(|c| !c.calls.is_closed());
        // A connection whose oldest answer is late holds every answer
        // behind it: new calls go elsewhere.
        let now = micros(Instant::now());
        let held = |c: &Connection| {
            let since = c.head_since.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) > HELD_AFTER.as_micros() as u64
        };
        let least = known
            .connections
            .iter()
            .filter(|c| !held(c))
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
            .filter(|c| !new && c.in_flight.load(Ordering::Relaxed) < known.depth);
        let connection = match least {
            Some(least) => least.clone(),
            None if known.connections.len() < CONNECTIONS_PER_ADDRESS_MAX => {
                let connection = Connection::open(address, known.depth);
                known.connections.push(connection.clone());
                connection
            }
            // All busy or held, and no room for more: queue on the least
            // busy.
            None => known
                .connections
                .iter()
                .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
                .expect("at the limit, there are connections")
                .clone(),
        };
        connection.in_flight.fetch_add(1, Ordering::Relaxed);
        connection
    }
}

impl Connection {
    /// A new connection's handle; its task connects, then drives it.
    fn open(address: &str, depth: usize) -> Arc<Connection> {
        let (calls, queued) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let head_since = Arc::new(AtomicU64::new(0));
        tokio::spawn(connect_and_drive(
            address.to_string(),
            queued,
            depth,
            in_flight.clone(),
            head_since.clone(),
        ));
        Arc::new(Connection {
            calls,
            in_flight,
            head_since,
        })
    }
}

/// Hands a call to the connection chosen for it (its place already
/// counted) and waits for its outcome.
async fn send(connection: &Connection, request: Vec<u8>, deadline: Instant) -> Outcome {
    let (answer, answered) = oneshot::channel();
    let call = Call {
        request,
        deadline,
        answer,
    };
    if let Err(unsent) = connection.calls.send(call) {
        connection.in_flight.fetch_sub(1, Ordering::Relaxed);
        return Err(Failed::Unsent(unsent.0.request));
    }
    answered
        .await
        .unwrap_or_else(|_| Err(Failed::Broken("the connection's task ended".into())))
}

/// Writes a pipelined request: `POST {path}`, the `host`, the marker, the
/// call's headers and the body. A header value that HTTP cannot carry
/// (control characters) is refused.
pub fn encode_request(
    path: &str,
    host: &str,
    headers: &[(&'static str, std::borrow::Cow<'_, str>)],
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nhost: {host}\r\n{}: 1\r\n",
        tandem_proto::wire::headers::PIPELINE
    );
    for (name, value) in headers {
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(format!("{value:?}: not a valid header value"));
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n\r\n", body.len());
    out.extend_from_slice(body);
    Ok(out)
}

/// An answer taken off the front of the buffer.
enum Next {
    Answer {
        status: StatusCode,
        body: Bytes,
        depth: Option<usize>,
        close: bool,
        /// Bytes of the body past what was kept, still to be dropped.
        skip: usize,
    },
    Partial,
    /// Not an answer this connection can carry on after.
    Unframed(String),
}

fn next_answer(read: &mut BytesMut) -> Next {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(read) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if read.len() <= HEAD_BYTES_MAX => return Next::Partial,
        Ok(httparse::Status::Partial) => return Next::Unframed("answer head too large".into()),
        Err(e) => return Next::Unframed(format!("malformed answer: {e}")),
    };
    let status = match response.code.map(StatusCode::from_u16) {
        Some(Ok(status)) if status.as_u16() >= 200 => status,
        _ => return Next::Unframed(format!("unexpected status {:?}", response.code)),
    };
    let value = |name: &str| http1::header(response.headers, name);
    let unframed = || Next::Unframed("a pipelined answer must have a content-length".into());
    if value("transfer-encoding").is_some() {
        return unframed();
    }
    let Some(body_len) = value("content-length")
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
    else {
        return unframed();
    };
    let depth = announced(value(tandem_proto::wire::headers::PIPELINE));
    let close = http1::closes(response.headers);
    let kept = body_len.min(BODY_KEPT_MAX);
    if read.len() < head_len + kept {
        read.reserve(head_len + kept - read.len());
        return Next::Partial;
    }
    let _ = read.split_to(head_len);
    let body = read.split_to(kept).freeze();
    let dropped = (body_len - kept).min(read.len());
    read.advance(dropped);
    Next::Answer {
        status,
        body,
        depth,
        close,
        skip: body_len - kept - dropped,
    }
}

/// A connection's task: connects, then drives the connection. If it
/// cannot connect, the calls queued on it fail.
async fn connect_and_drive(
    address: String,
    mut queued: mpsc::UnboundedReceiver<Call>,
    depth: usize,
    in_flight: Arc<AtomicUsize>,
    head_since: Arc<AtomicU64>,
) {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&address)).await;
    let stream = match connected {
        Ok(Ok(stream)) => stream.set_nodelay(true).map(|()| stream),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    };
    match stream {
        Ok(stream) => drive(stream, queued, depth, in_flight, head_since).await,
        Err(e) => {
            queued.close();
            while let Ok(call) = queued.try_recv() {
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let why = format!("connect to {address}: {e}");
                let _ = call.answer.send(Err(Failed::Broken(why)));
            }
        }
    }
}

/// A connection's task: writes the calls as they come (up to `depth` in
/// flight), reads the answers and hands each to its call, in order. Ends
/// when the connection breaks, closes, is stuck behind a late answer, or
/// has been idle for [`IDLE_MAX`]; then every call still on it fails.
async fn drive(
    stream: TcpStream,
    mut queued: mpsc::UnboundedReceiver<Call>,
    depth: usize,
    in_flight: Arc<AtomicUsize>,
    head_since: Arc<AtomicU64>,
) {
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut written = 0;
    let mut read = BytesMut::with_capacity(4096);
    // Each call written: its answer's way back, its deadline, and since
    // when it waits.
    let mut waiting: VecDeque<(oneshot::Sender<Outcome>, Instant, Instant)> = VecDeque::new();
    let note_head = |waiting: &VecDeque<(_, _, Instant)>| {
        let since = waiting.front().map_or(0, |(_, _, since)| micros(*since));
        head_since.store(since, Ordering::Relaxed);
    };
    let mut no_more_calls = false;
    let mut timer = pin!(tokio::time::sleep(IDLE_MAX));
    let mut idle_since = Instant::now();
    let mut skip = 0;
    let ended: Result<(), End> = poll_fn(|cx| {
        loop {
            // New calls, while fewer than `depth` are in flight.
            while !no_more_calls && waiting.len() < depth {
                match queued.poll_recv(cx) {
                    Poll::Ready(Some(call)) => {
                        if call.answer.is_closed() {
                            // Its caller gave up before it was sent.
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            continue;
                        }
                        out.extend_from_slice(&call.request);
                        waiting.push_back((call.answer, call.deadline, Instant::now()));
                        if waiting.len() == 1 {
                            note_head(&waiting);
                        }
                    }
                    Poll::Ready(None) => no_more_calls = true,
                    Poll::Pending => break,
                }
            }
            while written < out.len() {
                match stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(End::broken(e.to_string()))),
                    Poll::Pending => break,
                }
                match stream.try_write(&out[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(End::broken(e.to_string()))),
                }
            }
            if written == out.len() {
                out.clear();
                out.shrink_to(OUT_KEPT_MAX);
                written = 0;
            }
            // Answers, in order, after the rest of a long body.
            let dropped = skip.min(read.len());
            read.advance(dropped);
            skip -= dropped;
            while skip == 0 {
                match next_answer(&mut read) {
                    Next::Answer {
                        status,
                        body,
                        depth: announced,
                        close,
                        skip: rest,
                    } => {
                        let Some((answer, _, _)) = waiting.pop_front() else {
                            return Poll::Ready(Err(End::unframed("an answer to no call")));
                        };
                        skip = rest;
                        note_head(&waiting);
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        let _ = answer.send(Ok(((status, body), announced)));
                        if waiting.is_empty() {
                            idle_since = Instant::now();
                        }
                        if close {
                            let why = "the participant closed the connection";
                            return Poll::Ready(Err(End::broken(why)));
                        }
                    }
                    Next::Partial => break,
                    Next::Unframed(why) => return Poll::Ready(Err(End::unframed(why))),
                }
            }
            if no_more_calls && waiting.is_empty() && out.is_empty() {
                return Poll::Ready(Ok(()));
            }
            // Room for a batch: an empty BytesMut would read 64 bytes at a time.
            if read.capacity() - read.len() < READ_ROOM_MIN {
                read.reserve(READ_ROOM);
            }
            match stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => match stream.try_read_buf(&mut read) {
                    Ok(0) => {
                        return Poll::Ready(match waiting.is_empty() {
                            true => Ok(()),
                            false => Err(End::broken("the participant closed the connection")),
                        });
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(End::broken(e.to_string()))),
                },
                Poll::Ready(Err(e)) => return Poll::Ready(Err(End::broken(e.to_string()))),
                Poll::Pending => {}
            }
            // Nothing more to do now: wait for the first of the socket, a
            // new call, or the timer (a stuck answer, or idleness).
            let wake_at = match waiting.front() {
                Some((_, deadline, _)) => *deadline + STUCK_AFTER,
                None => idle_since + IDLE_MAX,
            };
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(match waiting.is_empty() {
                    true => Ok(()),
                    false => Err(End::broken("no answer long after the call's deadline")),
                });
            }
            return Poll::Pending;
        }
    })
    .await;
    // Whatever is still on it, sent or queued, fails: its outcome is
    // unknown (or it was never sent), and the driver retries it.
    queued.close();
    let end = ended
        .err()
        .unwrap_or_else(|| End::broken("the connection closed"));
    head_since.store(0, Ordering::Relaxed);
    for (answer, _, _) in waiting.drain(..) {
        in_flight.fetch_sub(1, Ordering::Relaxed);
        let failed = match end.unframed {
            true => Failed::Unframed(end.why.clone()),
            false => Failed::Broken(end.why.clone()),
        };
        let _ = answer.send(Err(failed));
    }
    // `recv`, not `try_recv`: it waits out a send under way as the channel
    // closed, which `try_recv` would miss (its call then lost until its
    // timeout).
    while let Some(call) = queued.recv().await {
        in_flight.fetch_sub(1, Ordering::Relaxed);
        let _ = call.answer.send(Err(Failed::Unsent(call.request)));
    }
}

#[cfg(test)]
mod tests {
    //! Invariant 1 (atomicity) on pipelined connections: an answer must
    //! reach the call it answers, and a call whose answer never came must
    //! not pass for answered.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Participant {
        address: String,
        connections: Arc<AtomicUsize>,
        most_in_one_read: Arc<AtomicUsize>,
    }

    /// The body of the first whole request in `read`, taken off it; `None`
    /// while the request is not whole (the test participants' framing).
    fn take_request(read: &mut BytesMut) -> Option<Vec<u8>> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = request.parse(read) else {
            return None;
        };
        let length: usize = tandem_proto::wire::http1::header(request.headers, "content-length")
            .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
            .unwrap();
        if read.len() < head + length {
            return None;
        }
        let body = read[head..head + length].to_vec();
        read.advance(head + length);
        Some(body)
    }

    /// A participant that answers 409 with the request's own body, in
    /// order, as many in one write as it read (a body starting `slow` after
    /// a second); announcing pipelining if `announce`, closing each
    /// connection after `answers_per_connection`.
    async fn participant(announce: bool, answers_per_connection: Option<usize>) -> Participant {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let most_in_one_read = Arc::new(AtomicUsize::new(0));
        let (opened, most) = (connections.clone(), most_in_one_read.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                opened.fetch_add(1, Ordering::Relaxed);
                let most = most.clone();
                tokio::spawn(async move {
                    let mut read = BytesMut::with_capacity(64 << 10);
                    let mut answered = 0;
                    loop {
                        read.reserve(64 << 10);
                        if stream.read_buf(&mut read).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let (mut out, mut in_this_read) = (Vec::new(), 0);
                        while let Some(body) = take_request(&mut read) {
                            if body.starts_with(b"slow") {
                                let _ = stream.write_all(&out).await;
                                out.clear();
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            let announced = match announce {
                                true => "tandem-pipeline: 32\r\n",
                                false => "",
                            };
                            let _ = write!(
                                out,
                                "HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n{announced}\r\n",
                                body.len()
                            );
                            out.extend_from_slice(&body);
                            in_this_read += 1;
                            answered += 1;
                            if Some(answered) == answers_per_connection {
                                let _ = stream.write_all(&out).await;
                                return;
                            }
                        }
                        most.fetch_max(in_this_read, Ordering::Relaxed);
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Participant {
            address,
            connections,
            most_in_one_read,
        }
    }

    /// Pipelines that know `participant` as announcing a depth of 32.
    fn pipelining_to(participant: &Participant) -> Pipelines {
        pipelining_at(&participant.address)
    }

    fn pipelining_at(address: &str) -> Pipelines {
        let pipelines = Pipelines::default();
        pipelines.announce(address, Some(32));
        pipelines
    }

    /// A participant that reads calls and never answers them.
    struct Silent {
        address: String,
        /// Whole requests read, over every connection.
        requests: Arc<AtomicUsize>,
        /// When the other end first closed a connection.
        closed_at: Arc<std::sync::Mutex<Option<Instant>>>,
    }

    /// A participant that reads calls and never answers; it closes a
    /// connection itself once it has read `close_after` requests on it.
    async fn silent(close_after: Option<usize>) -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let closed_at = Arc::new(std::sync::Mutex::new(None));
        let (counted, closed) = (requests.clone(), closed_at.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counted, closed) = (counted.clone(), closed.clone());
                tokio::spawn(async move {
                    let mut read = BytesMut::with_capacity(64 << 10);
                    let mut here = 0;
                    loop {
                        read.reserve(64 << 10);
                        if stream.read_buf(&mut read).await.unwrap_or(0) == 0 {
                            closed.lock().unwrap().get_or_insert_with(Instant::now);
                            return;
                        }
                        while take_request(&mut read).is_some() {
                            counted.fetch_add(1, Ordering::Relaxed);
                            here += 1;
                            if Some(here) == close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Silent {
            address,
            requests,
            closed_at,
        }
    }

    /// `body` to `address` (echoed back by the test participant).
    async fn call(pipelines: &Pipelines, address: &str, body: &str) -> Result<Answer, String> {
        let headers = [("tandem-gid", std::borrow::Cow::Borrowed("g"))];
        let request = encode_request("/tandem/action", address, &headers, body.as_bytes())?;
        pipelines
            .exchange(address, request, Duration::from_secs(5), 1024)
            .await
    }

    #[tokio::test]
    async fn atomicity_pipelined_answers_reach_their_own_calls() {
        let participant = participant(true, None).await;
        let pipelines = pipelining_to(&participant);
        let calls = (0..2_000).map(|i| {
            let (pipelines, address) = (&pipelines, &participant.address);
            async move { (i, call(pipelines, address, &format!("call-{i}")).await) }
        });
        for (i, answer) in futures::future::join_all(calls).await {
            let (status, body) = answer.expect("answered");
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(
                body,
                format!("call-{i}"),
                "call {i} got another call's answer"
            );
        }
        let connections = participant.connections.load(Ordering::Relaxed);
        assert!(
            connections <= CONNECTIONS_PER_ADDRESS_MAX,
            "{connections} connections"
        );
        let most = participant.most_in_one_read.load(Ordering::Relaxed);
        assert!(
            most > 1,
            "never more than one call in one write: {most}, {connections} connections"
        );
    }

    #[tokio::test]
    async fn atomicity_a_broken_connection_fails_every_call_on_it_unanswered() {
        // Each connection answers 3 calls, then closes with more in flight.
        let participant = participant(true, Some(3)).await;
        let pipelines = pipelining_to(&participant);
        let calls = (0..200).map(|i| {
            let (pipelines, address) = (&pipelines, &participant.address);
            async move { (i, call(pipelines, address, &format!("call-{i}")).await) }
        });
        let mut failed = 0;
        for (i, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok((_, body)) => assert_eq!(body, format!("call-{i}")),
                Err(_) => failed += 1,
            }
        }
        assert!(
            failed > 0,
            "the broken connections' calls all passed for answered"
        );
    }

    #[tokio::test]
    async fn atomicity_a_long_answer_is_read_to_its_end_and_the_next_is_its_own() {
        let participant = participant(true, None).await;
        let pipelines = pipelining_to(&participant);
        // Echoed bodies of 200 KiB (more than is kept) among short ones,
        // all on one connection (fewer than its depth).
        let calls = (0..30).map(|i| {
            let (pipelines, address) = (&pipelines, &participant.address);
            let body = match i % 2 {
                0 => format!("{i:06}").repeat((200 << 10) / 6),
                _ => format!("call-{i}"),
            };
            async move {
                let answer = call(pipelines, address, &body).await;
                (body, answer)
            }
        });
        for (body, answer) in futures::future::join_all(calls).await {
            let (_, answered) = answer.expect("answered");
            assert_eq!(
                answered,
                body.as_bytes()[..body.len().min(1024)],
                "not its own answer"
            );
        }
        assert_eq!(participant.connections.load(Ordering::Relaxed), 1);
        assert_eq!(pipelines.depth(&participant.address), Some(32));
    }

    #[tokio::test]
    async fn no_blocking_new_calls_avoid_a_connection_held_by_a_late_answer() {
        let participant = participant(true, None).await;
        let pipelines = pipelining_to(&participant);
        let slow = call(&pipelines, &participant.address, "slow-1");
        let fast = async {
            tokio::time::sleep(HELD_AFTER * 2).await;
            let started = std::time::Instant::now();
            let calls = (0..10).map(|_| call(&pipelines, &participant.address, "fast"));
            for answer in futures::future::join_all(calls).await {
                assert_eq!(answer.expect("answered").1, "fast");
            }
            started.elapsed()
        };
        let (slow, took) = tokio::join!(slow, fast);
        assert_eq!(slow.expect("answered").1, "slow-1");
        assert!(
            took < Duration::from_millis(500),
            "held behind the slow answer: {took:?}"
        );
        assert_eq!(participant.connections.load(Ordering::Relaxed), 2);
    }

    /// Idempotency: a call written on a connection that then breaks fails,
    /// as a transient outcome the driver retries under fencing; the
    /// transport itself never writes it again (only a call it never wrote
    /// goes on another connection).
    #[tokio::test]
    async fn idempotency_a_written_call_is_not_sent_again_when_its_connection_breaks() {
        let participant = silent(Some(1)).await;
        let pipelines = pipelining_at(&participant.address);
        let answer = call(&pipelines, &participant.address, "once").await;
        assert!(answer.is_err(), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            participant.requests.load(Ordering::Relaxed),
            1,
            "the transport wrote the call again"
        );
    }

    /// No blocking: an answer still missing a second past its call's
    /// deadline closes the connection, so whatever is queued behind it is
    /// failed (and retried by the driver) rather than held.
    #[tokio::test]
    async fn no_blocking_an_answer_stuck_past_its_deadline_closes_the_connection() {
        let participant = silent(None).await;
        let pipelines = pipelining_at(&participant.address);
        let headers = [("tandem-gid", std::borrow::Cow::Borrowed("g"))];
        let request =
            encode_request("/tandem/action", &participant.address, &headers, b"stuck").unwrap();
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let exchange = pipelines.exchange(&participant.address, request, timeout, 1024);
        // As the branch caller does: the call itself ends at its deadline.
        assert!(tokio::time::timeout(timeout, exchange).await.is_err());
        let mut closed = None;
        for _ in 0..100 {
            closed = *participant.closed_at.lock().unwrap();
            if closed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = closed.expect("the connection was never closed") - started;
        assert!(
            after >= timeout + STUCK_AFTER && after < timeout + STUCK_AFTER * 3,
            "closed {after:?} after the call"
        );
        assert_eq!(participant.requests.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_participant_that_stops_announcing_is_no_longer_pipelined() {
        let participant = participant(false, None).await;
        let pipelines = pipelining_to(&participant);
        let (_, body) = call(&pipelines, &participant.address, "once")
            .await
            .unwrap();
        assert_eq!(body, "once");
        assert_eq!(pipelines.depth(&participant.address), None);
    }

    #[test]
    fn the_announced_depth_is_bounded() {
        assert_eq!(announced(Some(b"32")), Some(32));
        assert_eq!(announced(Some(b" 8 ")), Some(8));
        assert_eq!(announced(Some(b"100000")), Some(DEPTH_MAX));
        assert_eq!(announced(Some(b"1")), None);
        assert_eq!(announced(Some(b"0")), None);
        assert_eq!(announced(Some(b"yes")), None);
        assert_eq!(announced(None), None);
    }

    #[test]
    fn a_header_value_http_cannot_carry_is_refused() {
        let bad = [("tandem-gid", std::borrow::Cow::Borrowed("a\r\nx: y"))];
        assert!(encode_request("/", "h", &bad, b"").is_err());
    }
}
