//! HTTP/1.1 to `http://` participants, each call driving its own
//! connection. hyper's pooled client gives every connection a task of its
//! own and hands each request to it and each answer back through channels:
//! two wake-ups between tasks per call, and a pool locked on the way out and
//! back. Here the call's future polls the connection itself while it waits
//! for the answer, and an idle connection waits in a plain list until the
//! next call to the same participant takes it.
//!
//! An idle connection is not watched: a participant that closed it is
//! noticed when the next call polls it, before the request is written, and
//! that call then opens a new connection. A request written on a reused
//! connection that fails before any answer is sent once more on a new one:
//! branch calls are idempotent (DESIGN §3, the barrier), and the driver
//! would retry it anyway.

use std::collections::HashMap;
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
/// hyper's buffers, about 16 KiB between calls: 1,024 are ~16 MiB).
/// A connection beyond either is closed once its call ends.
const IDLE_PER_ADDRESS_MAX: usize = 256;
const IDLE_MAX_TOTAL: usize = 1024;
/// An idle connection older than this is closed rather than reused (a
/// participant's server may have dropped it meanwhile).
const IDLE_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

struct Conn {
    send: SendRequest<Full<Bytes>>,
    conn: Pin<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
    /// The connection ended (closed by the participant, or broken).
    ended: bool,
}

#[derive(Default)]
pub struct Http1Pool {
    idle: Mutex<Idle>,
}

/// Idle connections by address (no address with none), and their number.
#[derive(Default)]
struct Idle {
    by_address: HashMap<String, Vec<(Conn, Instant)>>,
    total: usize,
}

/// An answer: status and (at most `body_max` bytes of) body.
pub type Answer = (StatusCode, Bytes);

impl Http1Pool {
    /// One exchange with the participant at `address` (`host:port`);
    /// `request` makes the request (twice if a reused connection failed).
    pub async fn exchange(
        &self,
        address: &str,
        mut request: impl FnMut() -> Request<Full<Bytes>>,
        body_max: usize,
    ) -> Result<Answer, String> {
        if let Some(mut conn) = self.take(address)
            && let Ok(answer) = conn.exchange(request(), body_max).await
        {
            self.give_back(address, conn);
            return Ok(answer);
        }
        let mut conn = Conn::open(address).await?;
        let answer = conn
            .exchange(request(), body_max)
            .await
            .map_err(|e| super::error_chain(&e))?;
        self.give_back(address, conn);
        Ok(answer)
    }

    fn take(&self, address: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("http1 pool lock");
        let Idle { by_address, total } = &mut *idle;
        let list = by_address.get_mut(address)?;
        let mut found = None;
        while let Some((conn, since)) = list.pop() {
            *total -= 1;
            if since.elapsed() < IDLE_MAX {
                found = Some(conn);
                break;
            }
        }
        if list.is_empty() {
            by_address.remove(address);
        }
        found
    }

    fn give_back(&self, address: &str, conn: Conn) {
        if conn.ended || conn.send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("http1 pool lock");
        let Idle { by_address, total } = &mut *idle;
        if *total >= IDLE_MAX_TOTAL {
            return;
        }
        let list = by_address.entry(address.to_string()).or_default();
        if list.len() < IDLE_PER_ADDRESS_MAX {
            list.push((conn, Instant::now()));
            *total += 1;
        }
    }
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
            conn: Box::pin(conn),
            ended: false,
        })
    }

    /// Sends `request` and reads the answer, polling the connection in the
    /// same future.
    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
        body_max: usize,
    ) -> Result<Answer, hyper::Error> {
        let Conn { send, conn, ended } = self;
        let work = async {
            poll_fn(|cx| send.poll_ready(cx)).await?;
            let response = send.send_request(request).await?;
            let status = response.status();
            // Read to the end (bounded) so that the connection can serve the
            // next call; of an error body only the start is kept.
            let body = Limited::new(response.into_body(), body_max)
                .collect()
                .await
                .map(|b| b.to_bytes());
            Ok::<_, hyper::Error>((status, body))
        };
        let mut work = pin!(work);
        let (status, body) = poll_fn(|cx| {
            if !*ended && conn.as_mut().poll(cx).is_ready() {
                *ended = true;
            }
            work.as_mut().poll(cx)
        })
        .await?;
        // A body over the limit was not read to its end: the connection
        // is not reusable.
        let body = body.unwrap_or_else(|_| {
            *ended = true;
            Bytes::new()
        });
        Ok((status, body))
    }
}
