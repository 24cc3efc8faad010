//! The HTTP/JSON API (`--http-listen`, default 127.0.0.1:7080): every
//! client operation of the gRPC API with the same meaning, for
//! applications in any language, plus `/openapi.json` (generated from this
//! code), `/metrics` (Prometheus) and the dashboard.
//!
//! A thin adapter: a request becomes the gRPC API's message and goes to
//! this node's own `Coordinator` service, in process. A node that is not
//! the leader forwards it to the leader over gRPC (following redirects, as
//! the SDK does), so a client may talk to any node. Errors are RFC 9457
//! `application/problem+json` naming the gid and what was wrong; nothing is
//! proposed for a request that fails its checks.

mod extract;
pub mod types;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tandem_proto::v1 as pb;
use tonic::{Code, Status};
use utoipa::OpenApi;

use crate::api::convert::tx_to_pb;
use crate::api::coordinator::CoordinatorService;
use crate::service::Transactions;
use extract::{GidPath, JsonBody, QueryParams};
use types::*;

/// Server-sent-event watches one node serves at once.
pub const WATCHES_MAX: usize = 256;
/// A watch ends after this long unless asked for another (at most the max).
pub const WATCH_DEFAULT: Duration = Duration::from_secs(60);
pub const WATCH_MAX: Duration = Duration::from_secs(600);
/// How long a forwarded request may look for a leader.
const FORWARD_DEADLINE: Duration = Duration::from_secs(5);

/// What every handler shares.
pub struct ApiState {
    local: CoordinatorService,
    transactions: Transactions,
    cluster: crate::service::ClusterAdmin,
    /// A client of the leader a request was last forwarded to.
    forward: Mutex<Option<(String, tandem_sdk::Client)>>,
    watches: Arc<tokio::sync::Semaphore>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    tls: Option<Arc<crate::tls::Tls>>,
}

impl ApiState {
    pub fn new(
        transactions: Transactions,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> ApiState {
        ApiState {
            local: CoordinatorService::new(transactions.clone()),
            cluster: crate::service::ClusterAdmin::new(transactions.replica().clone())
                .with_tls(tls.clone()),
            tls,
            transactions,
            forward: Mutex::new(None),
            watches: Arc::new(tokio::sync::Semaphore::new(WATCHES_MAX)),
            metrics,
        }
    }

    fn leader_client(&self, leader: &str) -> Result<tandem_sdk::Client, ApiError> {
        let mut forward = self.forward.lock().expect("forward lock");
        if let Some((address, client)) = forward.as_ref()
            && address == leader
        {
            return Ok(client.clone());
        }
        let mut builder = tandem_sdk::Client::builder([leader]).retry_deadline(FORWARD_DEADLINE);
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_ca(tls.ca_pem.clone())
                .tls_identity(tls.cert_pem.clone(), tls.key_pem.clone());
        }
        let client = builder
            .build()
            .map_err(|e| ApiError::internal(format!("cannot reach the leader at {leader}: {e}")))?;
        *forward = Some((leader.to_string(), client.clone()));
        Ok(client)
    }
}

/// Calls this node's gRPC service in process; a node that is not the
/// leader forwards the same request to the leader it names.
macro_rules! call {
    ($state:expr, $method:ident, $request:expr) => {
        call!($state, $method, $request, None::<&str>)
    };
    ($state:expr, $method:ident, $request:expr, $traceparent:expr) => {{
        let request = $request;
        let traceparent: Option<&str> = $traceparent;
        let local = ::tandem_proto::v1::coordinator_server::Coordinator::$method(
            &$state.local,
            $crate::http::grpc_request(request.clone(), traceparent),
        )
        .await;
        match local {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => match $crate::http::leader_of(&status) {
                Some(leader) => {
                    let client = $state.leader_client(&leader)?;
                    client
                        .call(|channel| {
                            let request = $crate::http::grpc_request(request.clone(), traceparent);
                            async move {
                                ::tandem_proto::v1::coordinator_client::CoordinatorClient::new(
                                    channel,
                                )
                                .$method(request)
                                .await
                            }
                        })
                        .await
                        .map_err($crate::http::ApiError::from)
                }
                None => Err($crate::http::ApiError::from(status)),
            },
        }
    }};
}

tokio::task_local! {
    /// The bearer credential of the HTTP request being served, passed on
    /// when it is forwarded to the leader (which checks it again).
    static CREDENTIAL: Option<String>;
}

/// A gRPC request carrying the client's trace context, if it sent one,
/// and its credential.
pub(crate) fn grpc_request<T>(message: T, traceparent: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = CREDENTIAL
        .try_with(|c| c.clone())
        .ok()
        .flatten()
        .and_then(|c| c.parse().ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(value) = traceparent
        .and_then(crate::telemetry::valid_traceparent)
        .and_then(|v| v.parse().ok())
    {
        request
            .metadata_mut()
            .insert(crate::telemetry::TRACEPARENT, value);
    }
    request
}

/// The `traceparent` header of an HTTP request.
fn traceparent(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(crate::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
}

mod ui;

pub(crate) fn leader_of(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(tandem_proto::LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tandem HTTP/JSON API",
        description = "Begin, drive and inspect distributed transactions (saga, TCC, XA, 2PC, 3PC, transactional messages) on a Raft-replicated coordinator. Any node answers: a follower forwards to the leader. Errors are application/problem+json.",
        license(name = "Apache-2.0")
    ),
    paths(
        begin, submit_saga, prepare_message, register_branch, commit, abort, get_tx,
        list, watch, retry, resolve
    ),
    components(schemas(
        BeginBody, SagaBody, StepJson, MessageBody, DestinationJson, RegisterBody,
        OpEndpointJson, CommitBody, AbortBody, RepairBody, OptionsJson, RetryJson,
        ProtocolName, StateName, BegunJson, TxJson, ListJson, TransactionJson, BranchJson,
        OpJson, DecisionJson, RepairJson, Problem, SseEvent
    )),
    tags((name = "transactions", description = "Client operations, as in the gRPC API"),
         (name = "repair", description = "Operators' repairs, recorded in the transaction's history"))
)]
pub struct ApiDoc;

/// The routes: the API under `/v1`, the OpenAPI document, metrics, the
/// dashboard; with `auth`, each behind the role it needs.
pub fn router(
    state: Arc<ApiState>,
    body_limit: usize,
    auth: Option<Arc<crate::auth::Auth>>,
    rate: Option<Arc<crate::limits::ClientLimiter>>,
) -> Router {
    Router::new()
        .route("/v1/transactions", post(begin).get(list))
        .route("/v1/transactions/{gid}", get(get_tx))
        .route("/v1/transactions/{gid}/branches", post(register_branch))
        .route("/v1/transactions/{gid}/commit", post(commit))
        .route("/v1/transactions/{gid}/abort", post(abort))
        .route("/v1/transactions/{gid}/retry", post(retry))
        .route("/v1/transactions/{gid}/resolve", post(resolve))
        .route("/v1/transactions/{gid}/watch", get(watch))
        .route("/v1/sagas", post(submit_saga))
        .route("/v1/messages", post(prepare_message))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/ui", get(ui::overview))
        .route("/ui/", get(ui::overview))
        .route("/ui/tx/{gid}", get(ui::transaction))
        .route("/ui/login", get(ui::login_page).post(ui::login))
        .route("/", get(|| async { axum::response::Redirect::to("/ui") }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(auth, authorize))
        .layer(axum::middleware::from_fn_with_state(rate, limit_rate))
}

/// Refuses a client over its rate (429 with Retry-After).
async fn limit_rate(
    State(rate): State<Option<Arc<crate::limits::ClientLimiter>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut admitted = None;
    if let Some(rate) = &rate
        && let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>()
    {
        match rate.admit(peer.ip()) {
            Ok(place) => admitted = Some(place),
            Err(message) => {
                return ApiError::new(StatusCode::TOO_MANY_REQUESTS, "resource-exhausted", message)
                    .into_response();
            }
        }
    }
    let response = next.run(request).await;
    drop(admitted);
    response
}

/// The cookie the dashboard keeps its token in.
pub const TOKEN_COOKIE: &str = "tandem_token";

/// Refuses a request without the role it needs (401/403 problem, or the
/// dashboard's login page); runs the rest with its credential at hand.
async fn authorize(
    State(auth): State<Option<Arc<crate::auth::Auth>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
                .map(|t| format!("Bearer {t}"))
                .next()
        });
    if let Some(auth) = &auth
        && let Some(need) = crate::auth::http_role(request.method(), request.uri().path())
    {
        let what = format!("{} {}", request.method(), request.uri().path());
        if let Err(refusal) = auth.check(credential.as_deref(), need, &what) {
            tracing::info!(%what, %refusal, "refused an HTTP request");
            let dashboard = request.uri().path().starts_with("/ui");
            return match refusal {
                crate::auth::Refusal::Unauthenticated(_) if dashboard => {
                    axum::response::Redirect::to("/ui/login").into_response()
                }
                crate::auth::Refusal::Unauthenticated(m) => {
                    let mut response =
                        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m)
                            .into_response();
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"tandem\""),
                    );
                    response
                }
                crate::auth::Refusal::PermissionDenied(m) => {
                    ApiError::new(StatusCode::FORBIDDEN, "permission-denied", m).into_response()
                }
            };
        }
    }
    CREDENTIAL.scope(credential, next.run(request)).await
}

/// Serves the API until `shutdown` resolves; over TLS with `tls`; at most
/// `connections_max` connections at once (more wait to be accepted).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    tls: Option<Arc<crate::tls::Tls>>,
    connections_max: usize,
) -> std::io::Result<()> {
    let acceptor = match tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            tls.rustls_server().map_err(std::io::Error::other)?,
        ))),
        None => None,
    };
    let places = Arc::new(tokio::sync::Semaphore::new(connections_max));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let place = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            place = places.clone().acquire_owned() => place.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            // A client that connects and sends nothing is dropped after the
            // read timeout (hyper's own timeout starts only once it has
            // seen which HTTP version the client speaks).
            let mut first = [0u8; 1];
            if tokio::time::timeout(READ_TIMEOUT, stream.peek(&mut first))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "HTTP API: a connection sent nothing; closed");
                return;
            }
            let stream = crate::limits::Limited::new(stream, place);
            match acceptor {
                None => serve_connection(stream, router, peer).await,
                Some(acceptor) => {
                    match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, router, peer).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "HTTP API: TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "HTTP API: TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

/// A client has this long to send a request's headers (and to finish a
/// TLS handshake): a slow one cannot hold a connection's place.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_connection<S>(stream: S, router: Router, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Handlers and middleware find the client's address as axum's own
    // server would give it.
    let router = tower::ServiceExt::map_request(
        router,
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(READ_TIMEOUT);
    let _ = builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

// ---------------------------------------------------------------- errors

/// An error on its way to the client as problem+json.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    detail: String,
    gid: Option<String>,
    leader: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            detail: detail.into(),
            gid: None,
            leader: None,
        }
    }

    fn internal(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    fn about(mut self, gid: &str) -> ApiError {
        self.gid.get_or_insert_with(|| gid.to_string());
        self
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> ApiError {
        let (code, kind) = match status.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid-argument"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not-found"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "already-exists"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "failed-precondition"),
            Code::Aborted => (StatusCode::CONFLICT, "aborted"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource-exhausted"),
            Code::Unavailable | Code::Cancelled | Code::Unknown => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline-exceeded"),
            Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "unimplemented"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission-denied"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let mut error = ApiError::new(code, kind, status.message());
        error.leader = leader_of(&status);
        error
    }
}

impl From<tandem_sdk::Error> for ApiError {
    fn from(error: tandem_sdk::Error) -> ApiError {
        match error {
            tandem_sdk::Error::Status(status) => status.into(),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("urn:tandem:problem:{}", self.kind),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            gid: self.gid,
            leader: self.leader,
        };
        let mut response = (self.status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: end the connection, so the
            // client stops sending and reads this answer.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn invalid(gid: &str, detail: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid-argument", detail).about(gid)
}

fn tx_json(tx: Option<pb::Transaction>) -> TxJson {
    TxJson {
        transaction: TransactionJson::from_pb(&tx.unwrap_or_default()),
    }
}

fn begun(tx: Option<pb::Transaction>, created: bool) -> Response {
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(BegunJson {
            transaction: TransactionJson::from_pb(&tx.unwrap_or_default()),
            created,
        }),
    )
        .into_response()
}

// ---------------------------------------------------------------- handlers

/// Begin a transaction (TCC, XA, 2PC, 3PC; a saga is submitted whole at
/// `/v1/sagas`, a message prepared at `/v1/messages`). Idempotent per gid
/// and protocol: a repeat answers 200 with `created: false`.
#[utoipa::path(post, path = "/v1/transactions", tag = "transactions",
    request_body = BeginBody,
    responses(
        (status = 201, description = "Begun", body = BegunJson),
        (status = 200, description = "Already there (a repeat)", body = BegunJson),
        (status = "4XX", description = "Refused; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn begin(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<BeginBody>,
) -> ApiResult<Response> {
    let request = body.to_pb().map_err(|e| invalid(&body.gid, e))?;
    let response =
        call!(state, begin, request, traceparent(&headers)).map_err(|e| e.about(&body.gid))?;
    Ok(begun(response.transaction, response.created))
}

/// Submit a saga with all its steps. Idempotent per gid and steps. With
/// `wait`, answers once it ended: committed (every action done) or aborted
/// (every action that may have run compensated).
#[utoipa::path(post, path = "/v1/sagas", tag = "transactions",
    request_body = SagaBody,
    responses(
        (status = 201, description = "Submitted", body = BegunJson),
        (status = 200, description = "Already there (a repeat)", body = BegunJson),
        (status = "4XX", description = "Refused; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The wait ended first; the saga goes on", body = Problem, content_type = "application/problem+json"),
    ))]
async fn submit_saga(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<SagaBody>,
) -> ApiResult<Response> {
    let request = body.to_pb().map_err(|e| invalid(&body.gid, e))?;
    let response = call!(state, submit_saga, request, traceparent(&headers))
        .map_err(|e| e.about(&body.gid))?;
    Ok(begun(response.transaction, response.created))
}

/// Prepare a transactional message; nothing is delivered before a commit
/// (submit) or the producer's check-back says its local transaction
/// committed.
#[utoipa::path(post, path = "/v1/messages", tag = "transactions",
    request_body = MessageBody,
    responses(
        (status = 201, description = "Prepared", body = BegunJson),
        (status = 200, description = "Already there (a repeat)", body = BegunJson),
        (status = "4XX", description = "Refused; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn prepare_message(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<MessageBody>,
) -> ApiResult<Response> {
    let request = body.to_pb().map_err(|e| invalid(&body.gid, e))?;
    let response = call!(state, prepare_message, request, traceparent(&headers))
        .map_err(|e| e.about(&body.gid))?;
    Ok(begun(response.transaction, response.created))
}

/// Enlist a branch (TCC, XA, 2PC, 3PC) while the transaction is active.
/// Idempotent per branch id and spec.
#[utoipa::path(post, path = "/v1/transactions/{gid}/branches", tag = "transactions",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$")),
    request_body = RegisterBody,
    responses(
        (status = 200, description = "Registered", body = TxJson),
        (status = "4XX", description = "Refused; nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn register_branch(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<TxJson>> {
    let request = body.to_pb(&gid).map_err(|e| invalid(&gid, e))?;
    let response = call!(state, register_branch, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// Ask to commit (a message: submit it). Safe to repeat; answers with the
/// transaction as the request left it, or with `wait` once it ended.
#[utoipa::path(post, path = "/v1/transactions/{gid}/commit", tag = "transactions",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$")),
    request_body(content = CommitBody, description = "May be empty"),
    responses(
        (status = 200, description = "Commit recorded (or done, with wait)", body = TxJson),
        (status = "4XX", description = "Refused (for example: it was aborted)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The wait ended first", body = Problem, content_type = "application/problem+json"),
    ))]
async fn commit(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
    JsonBody(body): JsonBody<CommitBody>,
) -> ApiResult<Json<TxJson>> {
    let request = pb::CommitRequest {
        gid: gid.clone(),
        wait: body.wait,
        wait_timeout_ms: body.wait_timeout_ms,
    };
    let response = call!(state, commit, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// Abort an undecided transaction (a saga compensates, a message is
/// dropped). Safe to repeat; refused once the decision to commit is recorded.
#[utoipa::path(post, path = "/v1/transactions/{gid}/abort", tag = "transactions",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$")),
    request_body(content = AbortBody, description = "May be empty"),
    responses(
        (status = 200, description = "Abort recorded (or done, with wait)", body = TxJson),
        (status = "4XX", description = "Refused (for example: already committing)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The wait ended first", body = Problem, content_type = "application/problem+json"),
    ))]
async fn abort(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
    JsonBody(body): JsonBody<AbortBody>,
) -> ApiResult<Json<TxJson>> {
    let request = pb::AbortRequest {
        gid: gid.clone(),
        reason: body.reason,
        wait: body.wait,
        wait_timeout_ms: body.wait_timeout_ms,
    };
    let response = call!(state, abort, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// One transaction, as of a linearizable read.
#[utoipa::path(get, path = "/v1/transactions/{gid}", tag = "transactions",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$"), GetQuery),
    responses(
        (status = 200, description = "The transaction", body = TxJson),
        (status = "4XX", description = "Unknown gid or bad query", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_tx(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
    QueryParams(query): QueryParams<GetQuery>,
) -> ApiResult<Json<TxJson>> {
    let request = pb::GetRequest {
        gid: gid.clone(),
        resolve: query.resolve,
    };
    let response = call!(state, get, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// Transactions in gid order, one page at a time, filtered.
#[utoipa::path(get, path = "/v1/transactions", tag = "transactions",
    params(ListQuery),
    responses(
        (status = 200, description = "A page", body = ListJson),
        (status = 400, description = "Bad query", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list(
    State(state): State<Arc<ApiState>>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<ListJson>> {
    let bad = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid-argument", detail);
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad(format!("limit is {limit}; it must be 1 to 1000")));
    }
    let updated_since_ms = match &query.since {
        None => 0,
        Some(since) => {
            let d = humantime::parse_duration(since).map_err(|e| {
                bad(format!(
                    "since {since:?} is not a duration like 1h or 30m: {e}"
                ))
            })?;
            crate::clock::ms_ago(d)
        }
    };
    let request = pb::ListRequest {
        state: query.state.map_or(0, |s| s.to_pb() as i32),
        protocol: query.protocol.map_or(0, |p| p.to_pb() as i32),
        limit,
        page_token: query.page_token.unwrap_or_default(),
        updated_since_ms,
        stuck: query.stuck,
    };
    let response = call!(state, list, request)?;
    Ok(Json(ListJson {
        transactions: response
            .transactions
            .iter()
            .map(TransactionJson::from_pb)
            .collect(),
        next_page_token: (!response.next_page_token.is_empty()).then_some(response.next_page_token),
    }))
}

/// Repair: call the open ops of a stuck transaction now (one branch or
/// every one) instead of after their backoff. Recorded in its history.
#[utoipa::path(post, path = "/v1/transactions/{gid}/retry", tag = "repair",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$")),
    request_body(content = RepairBody, description = "May be empty"),
    responses(
        (status = 200, description = "Recorded; the calls go out now", body = TxJson),
        (status = "4XX", description = "Refused (finished, nothing to call, unknown branch); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn retry(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    GidPath(gid): GidPath,
    JsonBody(body): JsonBody<RepairBody>,
) -> ApiResult<Json<TxJson>> {
    let request = body.to_pb(&gid, peer);
    let response = call!(state, retry, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// Repair: mark open phase-two ops done by hand because their participant
/// can never acknowledge. The transaction finishes with a heuristic
/// outcome, shown as such everywhere. Only after the decision.
#[utoipa::path(post, path = "/v1/transactions/{gid}/resolve", tag = "repair",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$")),
    request_body = RepairBody,
    responses(
        (status = 200, description = "Resolved by hand", body = TxJson),
        (status = "4XX", description = "Refused (undecided, finished, nothing open, no reason); nothing changed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn resolve(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    GidPath(gid): GidPath,
    JsonBody(body): JsonBody<RepairBody>,
) -> ApiResult<Json<TxJson>> {
    let request = body.to_pb(&gid, peer);
    let response = call!(state, resolve, request).map_err(|e| e.about(&gid))?;
    Ok(Json(tx_json(response.transaction)))
}

/// Watch one transaction as server-sent events: a `transaction` event with
/// its state now, then one per change this node applies, until it has
/// finished or the watch's time is up.
#[utoipa::path(get, path = "/v1/transactions/{gid}/watch", tag = "transactions",
    params(("gid" = String, Path, description = "The transaction", pattern = "^[!-~]{1,128}$"), WatchQuery),
    responses(
        (status = 200, description = "An event stream: `transaction` events whose data is a TransactionJson", content_type = "text/event-stream", body = SseEvent),
        (status = "4XX", description = "Unknown gid, bad query, or too many watches", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No leader now; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn watch(
    State(state): State<Arc<ApiState>>,
    GidPath(gid): GidPath,
    QueryParams(query): QueryParams<WatchQuery>,
) -> ApiResult<Response> {
    let permit = state.watches.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "resource-exhausted",
            format!("this node serves {WATCHES_MAX} watches already; retry later"),
        )
        .about(&gid)
    })?;
    let timeout = query
        .timeout_ms
        .map_or(WATCH_DEFAULT, |ms| Duration::from_millis(u64::from(ms)))
        .min(WATCH_MAX);
    // Interest first, then the read: no change after the read is missed.
    let interest = state.transactions.replica().watch(&gid);
    let first = state
        .transactions
        .get(&gid)
        .await
        .map_err(|e| ApiError::from(crate::api::status::from_service_error(e)).about(&gid))?;
    let (events, rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut latest = first;
        loop {
            let json = TransactionJson::from_pb(&tx_to_pb(&latest));
            let event = Event::default()
                .event("transaction")
                .id(latest.version.to_string())
                .json_data(&json)
                .expect("a transaction serializes");
            if events.send(Ok(event)).await.is_err() || latest.state.is_terminal() {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let seen = latest.version;
            match interest
                .until(latest.clone(), left, |t| t.version > seen)
                .await
            {
                Ok(Some(tx)) if tx.version > seen => latest = tx,
                _ => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the document serializes"),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match &state.metrics {
        Some(handle) => {
            crate::metrics::refresh(&state.transactions);
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "metrics are off on this node",
        )
        .into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no such resource: {}; see /openapi.json", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{method} is not served at {}; see /openapi.json",
            uri.path()
        ),
    )
}
