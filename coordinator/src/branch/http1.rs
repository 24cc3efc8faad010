//! HTTP/1.1 to `http://` participants, each call driving its own
//! connection. hyper's pooled client gives every connection a task of its
//! own and hands each request to it and each answer back through channels:
//! two wake-ups between tasks per call, and a pool locked on the way out and
//! back. Here the call's future polls the connection itself while it waits
//! for the answer, and an idle connection waits in a plain list until the
//! next call to the same participant takes it.
//!
//! An idle connection is not watched: a participant that closed it is
//! noticed when the next call polls it. The connection is then dropped at
//! once, so its request, not yet written, comes back, and the call sends
//! it on a new connection. A request that may have been written is never
//! sent again here: its failure is the call's outcome (transient), and the
//! driver retries it as it retries any transient failure.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections kept per participant address, and in all (each holds
/// hyper's buffers, usually ~16 KiB between calls, up to ~128 KiB after a
/// large error body). A connection beyond either is closed once its call
/// ends.
const IDLE_PER_ADDRESS_MAX: usize = 256;
const IDLE_MAX_TOTAL: usize = 1024;
/// An idle connection older than this is closed rather than reused (a
/// participant's server may have dropped it meanwhile).
const IDLE_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Http1Request = Request<Full<Bytes>>;
type Http1Connection = Pin<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>;

struct Conn {
    send: SendRequest<Full<Bytes>>,
    /// Dropped as soon as it ends (closed by the participant, or broken):
    /// that closes its request channel, so nothing waits on it.
    conn: Option<Http1Connection>,
}

/// How an exchange failed.
enum Failure {
    /// The request was not written: it may go on another connection.
    NotSent(Box<Http1Request>),
    /// It may have been written; what happened, for the outcome.
    Failed(String),
}

#[derive(Default)]
pub struct Http1Pool {
    idle: Mutex<Idle>,
}

/// Idle connections by address, oldest first (no address with none), and
/// their number.
#[derive(Default)]
struct Idle {
    by_address: HashMap<String, VecDeque<(Conn, Instant)>>,
    total: usize,
}

/// An answer: status and (at most `body_max` bytes of) body.
pub type Answer = (StatusCode, Bytes);
/// An answer, and the pipelining depth it announced (`tandem-pipeline`).
pub type Announced = (Answer, Option<usize>);

impl Http1Pool {
    /// One exchange with the participant at `address` (`host:port`).
    pub async fn exchange(
        &self,
        address: &str,
        request: Http1Request,
        body_max: usize,
    ) -> Result<Announced, String> {
        let mut request = request;
        if let Some(mut conn) = self.take(address) {
            match conn.exchange(request, body_max).await {
                Ok(answer) => {
                    self.give_back(address, conn);
                    return Ok(answer);
                }
                // The participant had closed it: a new connection.
                Err(Failure::NotSent(unsent)) => request = *unsent,
                Err(Failure::Failed(e)) => return Err(e),
            }
        }
        let mut conn = Conn::open(address).await?;
        match conn.exchange(request, body_max).await {
            Ok(answer) => {
                self.give_back(address, conn);
                Ok(answer)
            }
            Err(Failure::NotSent(_)) => Err(format!(
                "{address} closed the connection before the request"
            )),
            Err(Failure::Failed(e)) => Err(e),
        }
    }

    fn take(&self, address: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("http1 pool lock");
        let Idle { by_address, total } = &mut *idle;
        let list = by_address.get_mut(address)?;
        // The newest: the likeliest to be still open.
        let found = list.pop_back().map(|(conn, since)| {
            *total -= 1;
            (conn, since)
        });
        if list.is_empty() {
            by_address.remove(address);
        }
        found
            .filter(|(_, since)| since.elapsed() < IDLE_MAX)
            .map(|(conn, _)| conn)
    }

    fn give_back(&self, address: &str, conn: Conn) {
        if conn.conn.is_none() || conn.send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("http1 pool lock");
        let Idle { by_address, total } = &mut *idle;
        if *total >= IDLE_MAX_TOTAL {
            // Full: make room by closing what has been idle too long.
            by_address.retain(|_, list| {
                *total -= expire(list);
                !list.is_empty()
            });
            if *total >= IDLE_MAX_TOTAL {
                return;
            }
        }
        match by_address.get_mut(address) {
            Some(list) => {
                *total -= expire(list);
                if list.len() < IDLE_PER_ADDRESS_MAX {
                    list.push_back((conn, Instant::now()));
                    *total += 1;
                }
            }
            // The address is copied only the first time it is pooled.
            None => {
                let list = VecDeque::from([(conn, Instant::now())]);
                by_address.insert(address.to_string(), list);
                *total += 1;
            }
        }
    }
}

/// Closes a list's connections idle for too long (the oldest are first:
/// each was put back after all before it); how many.
fn expire(list: &mut VecDeque<(Conn, Instant)>) -> usize {
    let mut n = 0;
    while list
        .front()
        .is_some_and(|(_, since)| since.elapsed() >= IDLE_MAX)
    {
        list.pop_front();
        n += 1;
    }
    n
}

impl Conn {
    async fn open(address: &str) -> Result<Conn, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connect to {address}: no answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("connect to {address}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("connect to {address}: {e}"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("connect to {address}: {e}"))?;
        Ok(Conn {
            send,
            conn: Some(Box::pin(conn)),
        })
    }

    /// Sends `request` and reads the answer, polling the connection in the
    /// same future.
    async fn exchange(
        &mut self,
        request: Http1Request,
        body_max: usize,
    ) -> Result<Announced, Failure> {
        let Conn { send, conn } = self;
        let failed = |e: &hyper::Error| Failure::Failed(super::error_chain(e));
        let work = async {
            if poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
                return Err(Failure::NotSent(Box::new(request)));
            }
            let response = match send.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => {
                    return Err(match e.take_message() {
                        Some(request) => Failure::NotSent(Box::new(request)),
                        None => failed(e.error()),
                    });
                }
            };
            let status = response.status();
            let pipeline = response
                .headers()
                .get(tandem_proto::wire::headers::PIPELINE);
            let depth = super::pipeline::announced(pipeline.map(|v| v.as_bytes()));
            // Read to the end (bounded) so that the connection can serve the
            // next call; of an error body only the start is kept.
            let body = Limited::new(response.into_body(), body_max)
                .collect()
                .await
                .map(|b| b.to_bytes());
            Ok((status, body, depth))
        };
        let mut work = pin!(work);
        let (status, body, depth) = poll_fn(|cx| {
            if let Some(c) = conn.as_mut()
                && c.as_mut().poll(cx).is_ready()
            {
                *conn = None;
            }
            work.as_mut().poll(cx)
        })
        .await?;
        let body = body.unwrap_or_else(|_| {
            // A body over the limit was not read to its end: the
            // connection is not reusable.
            *conn = None;
            Bytes::new()
        });
        Ok(((status, body), depth))
    }
}
