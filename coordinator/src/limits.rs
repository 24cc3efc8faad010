//! Per-client rate limits (`--client-rate-max`, requests per second per
//! client address, with a burst of twice that): one client flooding a node
//! gets RESOURCE_EXHAUSTED (HTTP 429 with Retry-After) while the others'
//! calls go on. The peer transport and health checks are not limited.
//! Memory: one small entry per client address seen in the last minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    per_second: u32,
}

impl ClientLimiter {
    /// `None` for 0 (no limit).
    pub fn new(per_second: u32) -> Option<Arc<ClientLimiter>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
        let limiter = Arc::new(ClientLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_second,
        });
        // Forget clients that went quiet, so the table stays small.
        let weak = Arc::downgrade(&limiter);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    match weak.upgrade() {
                        Some(l) => l.limiter.retain_recent(),
                        None => return,
                    }
                }
            });
        }
        Some(limiter)
    }

    /// Refuses a request over the client's rate, saying so.
    pub fn check(&self, client: IpAddr) -> Result<(), String> {
        self.limiter.check_key(&client).map_err(|_| {
            format!(
                "client {client} sends more than {} requests a second (--client-rate-max); retry later",
                self.per_second
            )
        })
    }
}

/// Whether a gRPC method is limited (clients' calls; not the peer
/// transport, health checks or reflection).
fn limited(path: &str) -> bool {
    path.starts_with("/tandem.v1.Coordinator/") || path.starts_with("/tandem.v1.Cluster/")
}

/// The client address tonic records for a connection (plain or TLS).
fn peer_ip<B>(request: &axum::http::Request<B>) -> Option<IpAddr> {
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

/// A tower layer for the gRPC server applying the per-client limit.
#[derive(Clone)]
pub struct GrpcRateLayer(pub Option<Arc<ClientLimiter>>);

impl<S> tower::Layer<S> for GrpcRateLayer {
    type Service = GrpcRate<S>;

    fn layer(&self, inner: S) -> GrpcRate<S> {
        GrpcRate {
            limiter: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct GrpcRate<S> {
    limiter: Option<Arc<ClientLimiter>>,
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcRate<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        if let Some(limiter) = &self.limiter
            && limited(request.uri().path())
            && let Some(ip) = peer_ip(&request)
            && let Err(message) = limiter.check(ip)
        {
            let status = tonic::Status::resource_exhausted(message);
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_over_its_rate_is_refused_and_another_is_not() {
        let limiter = ClientLimiter::new(10).unwrap();
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
        assert!(ClientLimiter::new(0).is_none());
        assert!(limited("/tandem.v1.Coordinator/Begin"));
        assert!(!limited("/tandem.v1.RaftTransport/Stream"));
        assert!(!limited("/grpc.health.v1.Health/Check"));
    }
}
