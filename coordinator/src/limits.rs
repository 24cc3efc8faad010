//! Per-client limits: a request rate (`--client-rate-max`, per second per
//! client address, with a burst of twice that) and requests in flight
//! (`--client-concurrency-max`): one client flooding a node gets
//! RESOURCE_EXHAUSTED (HTTP 429 with Retry-After) while the others' calls
//! go on. The peer transport and health checks are not limited. Memory:
//! one small entry per client address seen in the last minute (rate) or
//! with a request in flight (concurrency). And `Limited`: connections a
//! listener holds at once (`--connections-max`).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct ClientLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_second: u32,
    /// Requests one client address may have in flight at once; 0: any.
    concurrency_max: usize,
    in_flight: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// A request admitted: its place among its client's requests in flight,
/// given back when it is dropped (the answer has been made).
pub struct Admitted {
    limiter: Arc<ClientLimiter>,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut in_flight = self.limiter.in_flight.lock().expect("in-flight lock");
        if let Some(n) = in_flight.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.client);
            }
        }
    }
}

impl ClientLimiter {
    /// `None` when both are 0 (no limit).
    pub fn new(per_second: u32, concurrency_max: usize) -> Option<Arc<ClientLimiter>> {
        if per_second == 0 && concurrency_max == 0 {
            return None;
        }
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let limiter = Arc::new(ClientLimiter {
            limiter,
            per_second,
            concurrency_max,
            in_flight: Default::default(),
        });
        // Forget clients that went quiet, so the table stays small.
        let weak = Arc::downgrade(&limiter);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(l) => {
                            if let Some(rate) = &l.limiter {
                                rate.retain_recent();
                            }
                        }
                        None => return,
                    }
                }
            });
        }
        Some(limiter)
    }

    /// Refuses a request over the client's rate, saying so.
    pub fn check(&self, client: IpAddr) -> Result<(), String> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|_| {
            format!(
                "client {client} sends more than {} requests a second (--client-rate-max); retry later",
                self.per_second
            )
        })
    }

    /// Admits a request within its client's rate and concurrency, or says
    /// which limit it is over.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, String> {
        self.check(client)?;
        if self.concurrency_max > 0 {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            let n = in_flight.entry(client).or_default();
            if *n >= self.concurrency_max {
                return Err(format!(
                    "client {client} has {} requests in flight, its limit (--client-concurrency-max); retry later",
                    self.concurrency_max
                ));
            }
            *n += 1;
        }
        Ok(Admitted {
            limiter: self.clone(),
            client,
        })
    }
}

/// Whether a gRPC method is limited (clients' calls; not the peer
/// transport, health checks or reflection).
pub fn limited(path: &str) -> bool {
    path.starts_with("/tandem.v1.Coordinator/") || path.starts_with("/tandem.v1.Cluster/")
}

/// The client address tonic records for a connection (plain or TLS).
pub fn peer_ip<B>(request: &axum::http::Request<B>) -> Option<IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|t| t.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// A connection holding one of its listener's places until it closes.
pub struct Limited<T> {
    inner: T,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl<T> Limited<T> {
    pub fn new(inner: T, place: tokio::sync::OwnedSemaphorePermit) -> Limited<T> {
        Limited {
            inner,
            _place: place,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The connection, and the place it holds (to keep while it is open).
    pub fn into_parts(self) -> (T, tokio::sync::OwnedSemaphorePermit) {
        (self.inner, self._place)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A client must send its first bytes within this long, or its connection
/// is closed (it would otherwise hold a place doing nothing).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Passes a connection on once it has sent something; `None` (closed) if
/// it stays silent for [`FIRST_BYTES_TIMEOUT`].
pub async fn first_bytes<E>(
    io: Result<Limited<tokio::net::TcpStream>, E>,
) -> Option<Result<Limited<tokio::net::TcpStream>, E>> {
    let io = match io {
        Ok(io) => io,
        Err(e) => return Some(Err(e)),
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, io.get_ref().peek(&mut first)).await {
        Ok(_) => Some(Ok(io)),
        Err(_) => {
            tracing::debug!(peer = ?io.get_ref().peer_addr().ok(), "closed a connection that sent nothing");
            None
        }
    }
}

/// The gRPC server's incoming connections, at most `places` at once: past
/// that, accepting waits until one closes (the kernel's backlog holds the
/// rest).
pub fn limit_connections<S, T, E>(
    incoming: S,
    places: Arc<tokio::sync::Semaphore>,
) -> impl futures::Stream<Item = Result<Limited<T>, E>>
where
    S: futures::Stream<Item = Result<T, E>>,
{
    use futures::StreamExt;
    incoming.then(move |io| {
        let places = places.clone();
        async move {
            let place = places
                .acquire_owned()
                .await
                .expect("the connection semaphore is never closed");
            io.map(|inner| Limited::new(inner, place))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_over_its_rate_is_refused_and_another_is_not() {
        let limiter = ClientLimiter::new(10, 0).unwrap();
        let flood: IpAddr = "10.0.0.1".parse().unwrap();
        let calm: IpAddr = "10.0.0.2".parse().unwrap();
        let accepted = (0..100).filter(|_| limiter.check(flood).is_ok()).count();
        assert!(
            (10..=25).contains(&accepted),
            "the burst, then refusals: {accepted}"
        );
        let e = limiter.check(flood).unwrap_err();
        assert!(
            e.contains("10.0.0.1") && e.contains("--client-rate-max"),
            "{e}"
        );
        assert!(
            limiter.check(calm).is_ok(),
            "another client is not held back"
        );
        assert!(ClientLimiter::new(0, 0).is_none());
        let limiter = ClientLimiter::new(0, 2).unwrap();
        let a = limiter.admit(flood).unwrap();
        let _b = limiter.admit(flood).unwrap();
        let e = limiter.admit(flood).err().unwrap();
        assert!(e.contains("2 requests in flight"), "{e}");
        assert!(limiter.admit(calm).is_ok(), "per client");
        drop(a);
        assert!(
            limiter.admit(flood).is_ok(),
            "a finished request gives its place back"
        );
        assert!(limited("/tandem.v1.Coordinator/Begin"));
        assert!(!limited("/tandem.v1.RaftTransport/Stream"));
        assert!(!limited("/grpc.health.v1.Health/Check"));
    }
}
