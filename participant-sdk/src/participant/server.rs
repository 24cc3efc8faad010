//! One listener, two protocols: `tandem.v1.Participant` over gRPC and
//! `POST /tandem/{op}` over HTTP, both dispatched through the fencing checks.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_server::{Participant, ParticipantServer as GrpcServer};
use tokio::net::TcpListener;

use super::{BranchContext, BranchError, BranchRequest, Fence, Fences, Handler, dispatch, headers};

/// A participant's handler with its fencing table, servable over gRPC and
/// HTTP.
pub struct ParticipantServer<H> {
    handler: Arc<H>,
    fences: Arc<Fences>,
    verifier: Option<Arc<Verifier>>,
    /// Served by [`serve`], which takes pipelined connections: its HTTP
    /// answers say so (`tandem-pipeline`). Not in a router merged into an
    /// application's own server, which may not.
    pipelined: bool,
}

impl<H> Clone for ParticipantServer<H> {
    fn clone(&self) -> Self {
        ParticipantServer {
            handler: self.handler.clone(),
            fences: self.fences.clone(),
            verifier: self.verifier.clone(),
            pipelined: self.pipelined,
        }
    }
}

/// A signed call is accepted this long after (or before) its timestamp.
pub const SIGNATURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Signatures remembered to refuse replays (the oldest go first beyond it):
/// about 100 bytes each, so at most ~100 MiB, and room for 16,000 calls a
/// second within the window.
pub const SIGNATURES_REMEMBERED_MAX: usize = 1_000_000;

/// Checks the coordinator's signature on each call (`wire::signing`).
pub struct Verifier {
    key: Vec<u8>,
    seen: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    signatures: std::collections::HashSet<String>,
    /// (forgotten after, signature), oldest first.
    order: std::collections::VecDeque<(i64, String)>,
}

impl Verifier {
    /// Refuses an unsigned, forged, stale or replayed call with the reason.
    pub fn check(
        &self,
        ctx: &BranchContext,
        body: &[u8],
        timestamp: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(), String> {
        let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
            return Err(
                "unsigned call: this participant accepts only calls signed with the cluster's key"
                    .into(),
            );
        };
        let at: i64 = timestamp
            .parse()
            .map_err(|_| format!("bad {}", tandem_proto::wire::headers::TIMESTAMP))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let window = SIGNATURE_WINDOW.as_millis() as i64;
        if (now - at).abs() > window {
            return Err(format!(
                "the call was signed {}s from now, outside the {}s window (a replay, or clocks apart)",
                (at - now) / 1000,
                window / 1000
            ));
        }
        let valid = tandem_proto::wire::signing::verify(
            &self.key,
            &ctx.gid,
            &ctx.branch_id,
            &ctx.op,
            ctx.fence.term,
            ctx.fence.index,
            at,
            body,
            signature,
        );
        if !valid {
            return Err("bad signature: not signed with this participant's key".into());
        }
        let mut seen = self.seen.lock().expect("signature cache lock");
        while seen.order.front().is_some_and(|(until, _)| *until < now) {
            if let Some((_, old)) = seen.order.pop_front() {
                seen.signatures.remove(&old);
            }
        }
        if !seen.signatures.insert(signature.to_string()) {
            return Err("replayed call: this signature was used already".into());
        }
        seen.order.push_back((at + window, signature.to_string()));
        if seen.order.len() > SIGNATURES_REMEMBERED_MAX
            && let Some((_, old)) = seen.order.pop_front()
        {
            seen.signatures.remove(&old);
        }
        Ok(())
    }
}

impl<H: Handler> ParticipantServer<H> {
    pub fn new(handler: H) -> Self {
        ParticipantServer {
            handler: Arc::new(handler),
            fences: Arc::new(Fences::default()),
            verifier: None,
            pipelined: false,
        }
    }

    /// Accept only calls signed with `key` (the coordinator's
    /// `--participant-key`, at least 32 bytes): unsigned, forged, stale and
    /// replayed calls are refused (HTTP 401, gRPC UNAUTHENTICATED).
    pub fn with_key(mut self, key: impl AsRef<[u8]>) -> Self {
        let key = key.as_ref();
        assert!(
            key.len() >= tandem_proto::wire::signing::KEY_BYTES_MIN,
            "a participant key must be at least {} bytes",
            tandem_proto::wire::signing::KEY_BYTES_MIN
        );
        self.verifier = Some(Arc::new(Verifier {
            key: key.to_vec(),
            seen: Default::default(),
        }));
        self
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// gRPC and HTTP routes, to serve alone or merge into an application's
    /// own axum router.
    pub fn router(&self) -> axum::Router {
        let http = axum::Router::new()
            .route(
                &format!("{}{{op}}", tandem_proto::wire::HTTP_ROUTE_PREFIX),
                axum::routing::post(http_call::<H>),
            )
            .with_state(self.clone());
        let grpc = tonic::service::Routes::new(GrpcServer::new(self.clone())).into_axum_router();
        http.merge(grpc)
    }

    pub async fn call(&self, request: BranchRequest) -> Result<(), BranchError> {
        dispatch(&self.fences, self.handler.as_ref(), request).await
    }

    /// [`ParticipantServer::call`] as a coordinator's call arrives, with its
    /// W3C trace context: with the `otel` feature, the handler runs in a
    /// span that joins the coordinator's trace (the application installs
    /// the tracer and `opentelemetry::global`'s propagator).
    pub(super) async fn call_traced(
        &self,
        request: BranchRequest,
        traceparent: Option<&str>,
    ) -> Result<(), BranchError> {
        #[cfg(feature = "otel")]
        {
            use tracing::Instrument;
            let span = participant_span(&request.ctx, traceparent);
            self.call(request).instrument(span).await
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = traceparent;
            self.call(request).await
        }
    }

    /// [`ParticipantServer::call_traced`] on a task of its own, so that a
    /// caller who hangs up — a coordinator node that dies with the call in
    /// flight — does not cancel the handler at one of its await points.
    /// Cancelled mid-way, a handler can leave half-done work behind: a sqlx
    /// `begin` cancelled after its `BEGIN` went out hands the pool a
    /// connection inside a transaction that nobody ends. The coordinator
    /// calls again; fencing and the handler's idempotency absorb the
    /// repeat. (The pipelined server gets the same by finishing its calls
    /// in flight after the connection is gone.)
    pub(super) async fn call_to_the_end(
        &self,
        request: BranchRequest,
        traceparent: Option<String>,
    ) -> Result<(), BranchError> {
        let this = self.clone();
        tokio::spawn(async move { this.call_traced(request, traceparent.as_deref()).await })
            .await
            .unwrap_or_else(|e| Err(BranchError::Transient(format!("the handler failed: {e}"))))
    }
}

/// The span a call runs in, a child of the coordinator's branch call.
#[cfg(feature = "otel")]
fn participant_span(ctx: &BranchContext, traceparent: Option<&str>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        "tandem.participant",
        otel.name = %format_args!("{} {}", ctx.op, ctx.branch_id),
        otel.kind = "server",
        gid = %ctx.gid,
        branch = %ctx.branch_id,
        op = %ctx.op,
    );
    if let Some(value) = traceparent {
        let carrier =
            std::collections::HashMap::from([("traceparent".to_string(), value.to_string())]);
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(parent);
    }
    span
}

/// Serves `handler` on `listener` until `shutdown` resolves: gRPC and
/// HTTP as [`ParticipantServer::router`] does, and pipelined HTTP/1.1
/// connections from coordinators (docs/http-participants.md). On shutdown it
/// stops accepting, lets the calls in flight answer, and returns once every
/// connection has closed.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    server: ParticipantServer<H>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut server = server;
    server.pipelined = true;
    super::pipeline::serve(listener, server, shutdown).await
}

/// A header's value by name: `None` if absent, `""` if not text.
pub(super) type HeaderLookup<'a> = dyn Fn(&str) -> Option<&'a str> + 'a;

fn header<'a>(get: &HeaderLookup<'a>, name: &str) -> Result<&'a str, (StatusCode, String)> {
    get(name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("missing header {name}")))
}

fn number(get: &HeaderLookup<'_>, name: &str) -> Result<u64, (StatusCode, String)> {
    match get(name) {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("header {name} is not a number"),
            )
        }),
    }
}

/// An HTTP call as its route's `op`, its headers and its body carry it:
/// the request for the handler with its W3C trace context, or the answer
/// that refuses it (a header missing or malformed, a bad signature).
/// Shared by the axum route and pipelined connections.
pub(super) fn http_request<H>(
    server: &ParticipantServer<H>,
    op: String,
    get: &HeaderLookup<'_>,
    body: bytes::Bytes,
) -> Result<(BranchRequest, Option<String>), (StatusCode, String)> {
    let ctx = BranchContext {
        gid: header(get, headers::GID)?.to_string(),
        branch_id: header(get, headers::BRANCH_ID)?.to_string(),
        op,
        protocol: get(headers::PROTOCOL).unwrap_or_default().to_string(),
        fence: Fence {
            term: number(get, headers::FENCE_TERM)?,
            index: number(get, headers::FENCE_INDEX)?,
        },
    };
    if let Some(verifier) = &server.verifier
        && let Err(reason) = verifier.check(
            &ctx,
            &body,
            get(headers::TIMESTAMP),
            get(headers::SIGNATURE),
        )
    {
        tracing::warn!(gid = %ctx.gid, branch = %ctx.branch_id, op = %ctx.op, %reason, "refused a call");
        return Err((StatusCode::UNAUTHORIZED, reason));
    }
    let traceparent = get("traceparent")
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    Ok((BranchRequest { ctx, payload: body }, traceparent))
}

/// The handler's answer as an HTTP status and body.
pub(super) fn http_answer(result: Result<(), BranchError>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(BranchError::Failure(message)) => (StatusCode::CONFLICT, message),
        Err(BranchError::Transient(message)) => (StatusCode::SERVICE_UNAVAILABLE, message),
    }
}

async fn http_call<H: Handler>(
    State(server): State<ParticipantServer<H>>,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> (
    StatusCode,
    axum::response::AppendHeaders<Option<(&'static str, &'static str)>>,
    String,
) {
    let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or_default());
    let (status, text) = match http_request(&server, op, &get, body) {
        Ok((request, traceparent)) => {
            http_answer(server.call_to_the_end(request, traceparent).await)
        }
        Err(refused) => refused,
    };
    let advertised = server
        .pipelined
        .then_some((headers::PIPELINE, super::pipeline::DEPTH_TEXT));
    (status, axum::response::AppendHeaders(advertised), text)
}

fn protocol_name(value: i32) -> &'static str {
    pb::Protocol::try_from(value).map_or("", tandem_proto::wire::protocols::name)
}

#[tonic::async_trait]
impl<H: Handler> Participant for ParticipantServer<H> {
    async fn call(
        &self,
        request: tonic::Request<pb::BranchCallRequest>,
    ) -> Result<tonic::Response<pb::BranchCallResponse>, tonic::Status> {
        let metadata = request.metadata();
        let get = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let traceparent = get("traceparent");
        let signed = (get(headers::TIMESTAMP), get(headers::SIGNATURE));
        let r = request.into_inner();
        if r.gid.is_empty() || r.branch_id.is_empty() || r.op.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "gid, branch_id and op are required",
            ));
        }
        let ctx = BranchContext {
            gid: r.gid,
            branch_id: r.branch_id,
            op: r.op,
            protocol: protocol_name(r.protocol).to_string(),
            fence: Fence {
                term: r.fence_term,
                index: r.fence_index,
            },
        };
        if let Some(verifier) = &self.verifier
            && let Err(reason) =
                verifier.check(&ctx, &r.payload, signed.0.as_deref(), signed.1.as_deref())
        {
            tracing::warn!(gid = %ctx.gid, branch = %ctx.branch_id, op = %ctx.op, %reason, "refused a call");
            return Err(tonic::Status::unauthenticated(reason));
        }
        match self
            .call_to_the_end(
                BranchRequest {
                    ctx,
                    payload: r.payload.into(),
                },
                traceparent,
            )
            .await
        {
            Ok(()) => Ok(tonic::Response::new(pb::BranchCallResponse {})),
            Err(BranchError::Failure(m)) => Err(tonic::Status::failed_precondition(m)),
            Err(BranchError::Transient(m)) => Err(tonic::Status::unavailable(m)),
        }
    }
}
