//! What every gRPC call passes before its service sees it: its client's
//! limits (`limits`) and its role (`auth`). One tower layer for both;
//! with neither configured (the loopback default) it adds nothing to a
//! call — no allocation, no lookup. A stream of submissions
//! (`SubmitSagas`) passes it once as a call, and then each submission
//! passes the same checks as it arrives ([`PerSubmission`]).

use std::net::IpAddr;
use std::sync::Arc;

use futures::future::{BoxFuture, Either};

use crate::auth::{Auth, Refusal, Role, grpc_role};
use crate::limits::{Admitted, ClientLimiter, limited, peer_ip};

/// The method whose every message carries calls of their own.
pub const SUBMIT_SAGAS_PATH: &str = "/tandem.v1.Coordinator/SubmitSagas";

/// What a stream of submissions checks for each one, as the gate checks a
/// call: the client's rate and calls in flight, and its credential's role
/// (a token can expire while its stream is open). Set by the gate on the
/// request; absent when neither limits nor auth are configured.
#[derive(Clone)]
pub struct PerSubmission {
    limits: Option<(Arc<ClientLimiter>, IpAddr)>,
    auth: Option<(Arc<Auth>, Option<String>)>,
}

impl PerSubmission {
    /// The credential the stream was opened with, checked again (once per
    /// message of submissions).
    pub fn check_credential(&self) -> Result<(), tonic::Status> {
        let Some((auth, authorization)) = &self.auth else {
            return Ok(());
        };
        auth.check(authorization.as_deref(), Role::App, "call SubmitSagas")
            .map(|_| ())
            .map_err(refusal_status)
    }

    /// One submission admitted within its client's rate and calls in
    /// flight: its place, given back when dropped (once it is answered).
    pub fn admit(&self) -> Result<Option<Admitted>, tonic::Status> {
        match &self.limits {
            None => Ok(None),
            Some((limiter, ip)) => limiter
                .admit(*ip)
                .map(Some)
                .map_err(tonic::Status::resource_exhausted),
        }
    }
}

/// A refused credential as the call's status.
fn refusal_status(refusal: Refusal) -> tonic::Status {
    match refusal {
        Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m),
        Refusal::PermissionDenied(m) => tonic::Status::permission_denied(m),
    }
}

#[derive(Clone)]
pub struct GateLayer {
    pub auth: Option<Arc<Auth>>,
    pub limits: Option<Arc<ClientLimiter>>,
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            auth: self.auth.clone(),
            limits: self.limits.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    auth: Option<Arc<Auth>>,
    limits: Option<Arc<ClientLimiter>>,
    inner: S,
}

type Answer = axum::http::Response<tonic::body::Body>;

fn refuse<E: Send + 'static>(status: tonic::Status) -> BoxFuture<'static, Result<Answer, E>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

impl<S, B> tower::Service<axum::http::Request<B>> for Gate<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Answer>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Answer;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Answer, S::Error>>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        if self.auth.is_none() && self.limits.is_none() {
            return Either::Left(self.inner.call(request));
        }
        let path = request.uri().path();
        let mut admitted = None;
        if let Some(limits) = &self.limits
            && limited(path)
            && let Some(ip) = peer_ip(&request)
        {
            match limits.admit(ip) {
                Ok(place) => admitted = Some(place),
                Err(message) => {
                    return Either::Right(refuse(tonic::Status::resource_exhausted(message)));
                }
            }
        }
        if let Some(auth) = &self.auth
            && let Some(need) = grpc_role(path)
        {
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let method = path.rsplit('/').next().unwrap_or_default();
            if let Err(refusal) = auth.check(authorization, need, &format!("call {method}")) {
                tracing::info!(path, %refusal, "refused a call");
                return Either::Right(refuse(refusal_status(refusal)));
            }
        }
        if request.uri().path() == SUBMIT_SAGAS_PATH {
            let per_submission = PerSubmission {
                limits: self
                    .limits
                    .clone()
                    .and_then(|l| peer_ip(&request).map(|ip| (l, ip))),
                auth: self.auth.clone().map(|auth| {
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    (auth, authorization)
                }),
            };
            request.extensions_mut().insert(per_submission);
        }
        let answer = self.inner.call(request);
        match admitted {
            None => Either::Left(answer),
            // The client's place is given back once the answer is made.
            Some(place) => Either::Right(Box::pin(async move {
                let answer = answer.await;
                drop(place);
                answer
            })),
        }
    }
}
