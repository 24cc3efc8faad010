//! Calling participants: `grpc://host:port` (the `tandem.v1.Participant`
//! service) and `http(s)://…` (POST). Connections are pooled per endpoint;
//! every call has a deadline and carries the gid, branch, op, protocol and
//! fencing token; a message delivery also its message id. Messages may
//! also go to brokers (`nats://`, `amqp://`: [`broker`]).
//!
//! Outcomes: HTTP 2xx success, 409 business failure, anything else
//! transient; gRPC OK success, ABORTED / FAILED_PRECONDITION business
//! failure, anything else transient. A business failure's message is the
//! participant's own words (its response body or status message), kept and
//! shown by Get.

pub mod broker;
mod http1;
mod pipeline;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue};
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_proto::wire::headers;
use tonic::transport::{Channel, Endpoint};

use crate::api::convert::protocol_to_pb;
use crate::model::command::OpOutcome;
use crate::model::types::{Fence, Op, Payload, Protocol};

/// A call's headers as hyper takes them; a value HTTP cannot carry is
/// refused.
fn header_map(pairs: &[(&'static str, Cow<'_, str>)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(pairs.len() + 1);
    for (name, value) in pairs {
        let value = HeaderValue::from_str(value).map_err(|e| format!("{value:?}: {e}"))?;
        map.insert(hyper::header::HeaderName::from_static(name), value);
    }
    Ok(map)
}

/// How much of a participant's error text is kept.
const ERROR_BYTES_MAX: usize = 1024;
/// gRPC channels kept at most; beyond it the table is cleared (they reconnect).
const CHANNELS_MAX: usize = 4096;

/// One call to make.
#[derive(Clone, Debug)]
pub struct BranchCall<'a> {
    pub gid: &'a str,
    pub branch_id: &'a str,
    pub op: Op,
    pub protocol: Protocol,
    pub endpoint: &'a str,
    /// Shared with the transaction: sending it copies nothing (HTTP).
    pub payload: &'a Payload,
    pub fence: Fence,
    pub timeout: Duration,
    /// W3C trace context for the participant's work (`telemetry`).
    pub traceparent: Option<&'a str>,
}

pub struct BranchCaller {
    /// Signs every call (`wire::signing`) when the cluster has a key.
    key: Option<Arc<[u8]>>,
    /// `http://` participants: HTTP/1.1 connections each call drives.
    plain: http1::Http1Pool,
    /// `http://` participants that announced pipelining.
    pipelines: pipeline::Pipelines,
    /// `https://` participants (TLS roots, this node's certificate).
    http: reqwest::Client,
    grpc: Mutex<HashMap<String, Channel>>,
    brokers: broker::Brokers,
}

impl Default for BranchCaller {
    fn default() -> Self {
        Self::new(broker::BrokerConfig::default())
    }
}

/// How the driver reaches participants: behind a trait so that the real
/// driver also runs against simulated participants (and brokers later).
pub trait BranchTransport: Send + Sync + 'static {
    /// Makes one call; never fails, the outcome says what happened.
    fn call(&self, call: BranchCall<'_>) -> impl std::future::Future<Output = OpOutcome> + Send;
}

impl BranchTransport for BranchCaller {
    fn call(&self, call: BranchCall<'_>) -> impl std::future::Future<Output = OpOutcome> + Send {
        BranchCaller::call(self, call)
    }
}

impl BranchCaller {
    pub fn new(brokers: broker::BrokerConfig) -> BranchCaller {
        BranchCaller::with_key(brokers, None)
    }

    /// A caller that signs every call to a participant with `key`.
    pub fn with_key(brokers: broker::BrokerConfig, key: Option<Arc<[u8]>>) -> BranchCaller {
        let http = Self::http_client(None, None).expect("an HTTP client with static settings");
        BranchCaller {
            key,
            plain: http1::Http1Pool::default(),
            pipelines: pipeline::Pipelines::default(),
            http,
            grpc: Mutex::new(HashMap::new()),
            brokers: broker::Brokers::new(brokers),
        }
    }

    pub async fn call(&self, call: BranchCall<'_>) -> OpOutcome {
        let id = || tandem_proto::wire::message_id(call.gid, call.branch_id);
        if let Some(rest) = call.endpoint.strip_prefix("grpc://") {
            self.call_grpc(rest.trim_end_matches('/'), &call).await
        } else if let Some(subject) = call.endpoint.strip_prefix("nats://") {
            self.brokers.publish_nats(subject, &id(), &call).await
        } else if let Some(rest) = call.endpoint.strip_prefix("amqp://") {
            let (exchange, routing_key) = rest.split_once('/').unwrap_or((rest, ""));
            self.brokers
                .publish_amqp(exchange, routing_key, &id(), &call)
                .await
        } else if call.endpoint.starts_with("http://") {
            self.call_plain(&call).await
        } else {
            self.call_http(&call).await
        }
    }

    /// A call to an `http://` participant: pipelined with others if the
    /// participant announced it ([`pipeline`]), else on hyper's HTTP/1.1
    /// connection, driven by the call itself ([`http1`]). Redirects are not
    /// followed and
    /// no proxy from the environment is used: a branch call goes to the
    /// endpoint the transaction names, and a 3xx is an answer like any
    /// other non-2xx (transient).
    async fn call_plain(&self, call: &BranchCall<'_>) -> OpOutcome {
        let failed = |e: &dyn std::fmt::Display| {
            OpOutcome::Transient(truncate(&format!("{}: {e}", call.endpoint)))
        };
        let uri: hyper::Uri = match call.endpoint.parse() {
            Ok(uri) => uri,
            Err(e) => return failed(&e),
        };
        let mut parts = uri.into_parts();
        let Some(authority) = parts.authority.take() else {
            return failed(&"no host");
        };
        let address = match authority.port_u16() {
            Some(_) => std::borrow::Cow::Borrowed(authority.as_str()),
            None => std::borrow::Cow::Owned(format!("{}:80", authority.host())),
        };
        // Origin form (`/path?query`), parsed once with the endpoint.
        parts.scheme = None;
        let path = match hyper::Uri::from_parts(parts) {
            Ok(path) if path.path_and_query().is_some() => path,
            _ => hyper::Uri::from_static("/"),
        };
        let pairs = self.call_header_pairs(call);
        if self.pipelines.depth(&address).is_some() {
            let path = path.path_and_query().map_or("/", |p| p.as_str());
            let request =
                match pipeline::encode_request(path, authority.as_str(), &pairs, call.payload) {
                    Ok(request) => request,
                    Err(e) => return failed(&e),
                };
            let exchange =
                self.pipelines
                    .exchange(&address, request, call.timeout, ERROR_BODY_READ_MAX);
            return match tokio::time::timeout(call.timeout, exchange).await {
                Ok(Ok((status, body))) => http_outcome(status.as_u16(), &body),
                Ok(Err(e)) => failed(&e),
                Err(_) => OpOutcome::Transient(format!("no answer within {:?}", call.timeout)),
            };
        }
        let mut headers = match header_map(&pairs) {
            Ok(headers) => headers,
            Err(e) => return failed(&e),
        };
        match HeaderValue::from_str(authority.as_str()) {
            Ok(host) => headers.insert(hyper::header::HOST, host),
            Err(e) => return failed(&e),
        };
        let mut request = hyper::Request::new(Full::new(call.payload.clone()));
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = path;
        *request.headers_mut() = headers;
        let exchange = self.plain.exchange(&address, request, ERROR_BODY_READ_MAX);
        match tokio::time::timeout(call.timeout, exchange).await {
            Ok(Ok(((status, body), depth))) => {
                if depth.is_some() {
                    self.pipelines.announce(&address, depth);
                }
                http_outcome(status.as_u16(), &body)
            }
            Ok(Err(e)) => failed(&e),
            Err(_) => OpOutcome::Transient(format!("no answer within {:?}", call.timeout)),
        }
    }

    /// The headers of an HTTP call (docs/http-participants.md), for every
    /// HTTP path: names and values.
    fn call_header_pairs<'c>(&self, call: &BranchCall<'c>) -> Vec<(&'static str, Cow<'c, str>)> {
        let mut pairs = Vec::with_capacity(11);
        pairs.push((headers::GID, Cow::Borrowed(call.gid)));
        pairs.push((headers::BRANCH_ID, Cow::Borrowed(call.branch_id)));
        pairs.push((headers::OP, Cow::Borrowed(call.op.name())));
        pairs.push((headers::PROTOCOL, Cow::Borrowed(call.protocol.name())));
        pairs.push((headers::FENCE_TERM, Cow::Owned(call.fence.term.to_string())));
        pairs.push((
            headers::FENCE_INDEX,
            Cow::Owned(call.fence.index.to_string()),
        ));
        pairs.push(("content-type", Cow::Borrowed(content_type(call.payload))));
        if call.op == Op::Deliver {
            let id = tandem_proto::wire::message_id(call.gid, call.branch_id);
            pairs.push((headers::MESSAGE_ID, Cow::Owned(id)));
        }
        if let Some(traceparent) = call.traceparent {
            pairs.push((crate::telemetry::TRACEPARENT, Cow::Borrowed(traceparent)));
        }
        if let Some((timestamp, signature)) = self.sign(call) {
            pairs.push((headers::TIMESTAMP, Cow::Owned(timestamp)));
            pairs.push((headers::SIGNATURE, Cow::Owned(signature)));
        }
        pairs
    }

    async fn call_http(&self, call: &BranchCall<'_>) -> OpOutcome {
        let headers = match header_map(&self.call_header_pairs(call)) {
            Ok(headers) => headers,
            Err(e) => return OpOutcome::Transient(truncate(&format!("{}: {e}", call.endpoint))),
        };
        let request = self
            .http
            .post(call.endpoint)
            .timeout(call.timeout)
            .headers(headers);
        match request.body(call.payload.clone()).send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return OpOutcome::Succeeded;
                }
                let body = response.bytes().await.unwrap_or_default();
                http_outcome(status.as_u16(), &body)
            }
            Err(e) if e.is_timeout() => {
                OpOutcome::Transient(format!("no answer within {:?}", call.timeout))
            }
            Err(e) => {
                OpOutcome::Transient(truncate(&format!("{}: {}", call.endpoint, error_chain(&e))))
            }
        }
    }

    /// HTTPS to participants: trust `extra_ca` (PEM) and the cluster's CA
    /// besides the system's roots, and present this node's certificate to
    /// participants that ask for one.
    pub fn with_tls(
        mut self,
        tls: Option<&crate::tls::Tls>,
        extra_ca: Option<&str>,
    ) -> Result<BranchCaller, String> {
        self.http = Self::http_client(tls, extra_ca)?;
        Ok(self)
    }

    fn http_client(
        tls: Option<&crate::tls::Tls>,
        extra_ca: Option<&str>,
    ) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        let roots = tls.map(|t| t.ca_pem.as_str()).into_iter().chain(extra_ca);
        for pem in roots {
            for cert in reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("a participant CA: {e}"))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(tls) = tls {
            let identity = reqwest::Identity::from_pem(
                format!("{}\n{}", tls.cert_pem, tls.key_pem).as_bytes(),
            )
            .map_err(|e| format!("this node's certificate for participants: {e}"))?;
            builder = builder.identity(identity);
        }
        builder.build().map_err(|e| e.to_string())
    }

    /// The call's timestamp and signature, when the cluster has a key.
    fn sign(&self, call: &BranchCall<'_>) -> Option<(String, String)> {
        let key = self.key.as_deref()?;
        let now = crate::clock::now_ms();
        let signature = tandem_proto::wire::signing::sign(
            key,
            call.gid,
            call.branch_id,
            call.op.name(),
            call.fence.term,
            call.fence.index,
            now,
            call.payload,
        );
        Some((now.to_string(), signature))
    }

    fn channel(&self, authority: &str) -> Result<Channel, String> {
        let mut channels = self.grpc.lock().expect("channel table lock");
        if let Some(channel) = channels.get(authority) {
            return Ok(channel.clone());
        }
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        let channel = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(authority.to_string(), channel.clone());
        Ok(channel)
    }

    async fn call_grpc(&self, authority: &str, call: &BranchCall<'_>) -> OpOutcome {
        let channel = match self.channel(authority) {
            Ok(c) => c,
            Err(e) => return OpOutcome::Transient(format!("grpc://{authority}: {e}")),
        };
        let mut request = tonic::Request::new(pb::BranchCallRequest {
            gid: call.gid.to_string(),
            branch_id: call.branch_id.to_string(),
            op: call.op.name().to_string(),
            payload: call.payload.to_vec(),
            fence_term: call.fence.term,
            fence_index: call.fence.index,
            protocol: protocol_to_pb(call.protocol) as i32,
        });
        request.set_timeout(call.timeout);
        if let Some(value) = call.traceparent.and_then(|t| t.parse().ok()) {
            request
                .metadata_mut()
                .insert(crate::telemetry::TRACEPARENT, value);
        }
        if let Some((timestamp, signature)) = self.sign(call) {
            let metadata = request.metadata_mut();
            if let (Ok(t), Ok(s)) = (timestamp.parse(), signature.parse()) {
                metadata.insert(headers::TIMESTAMP, t);
                metadata.insert(headers::SIGNATURE, s);
            }
        }
        let mut client = ParticipantClient::new(channel);
        match tokio::time::timeout(call.timeout, client.call(request)).await {
            Ok(Ok(_)) => OpOutcome::Succeeded,
            Ok(Err(status)) => grpc_outcome(status.code(), status.message()),
            Err(_) => OpOutcome::Transient(format!("no answer within {:?}", call.timeout)),
        }
    }
}

/// How much of a participant's error body is read (of which
/// `ERROR_BYTES_MAX` are kept).
const ERROR_BODY_READ_MAX: usize = 64 << 10;

/// A payload's content type: JSON if it parses as JSON.
fn content_type(payload: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

/// What a participant's HTTP answer means (DESIGN §3): 2xx success, 409 a
/// business "no", anything else transient. The body, however large or
/// odd, becomes at most `ERROR_BYTES_MAX` bytes of text.
pub fn http_outcome(status: u16, body: &[u8]) -> OpOutcome {
    if (200..300).contains(&status) {
        return OpOutcome::Succeeded;
    }
    let text = truncate(String::from_utf8_lossy(body).trim());
    let message = if text.is_empty() {
        match reqwest::StatusCode::from_u16(status) {
            Ok(status) => format!("HTTP {status}"),
            Err(_) => format!("HTTP {status}"),
        }
    } else {
        text
    };
    if status == 409 {
        OpOutcome::Failed(message)
    } else {
        OpOutcome::Transient(format!("HTTP {status}: {message}"))
    }
}

/// What a participant's gRPC error means: ABORTED and FAILED_PRECONDITION a
/// business "no", any other code transient.
pub fn grpc_outcome(code: tonic::Code, message: &str) -> OpOutcome {
    match code {
        tonic::Code::Ok => OpOutcome::Succeeded,
        tonic::Code::Aborted | tonic::Code::FailedPrecondition => {
            OpOutcome::Failed(truncate(message))
        }
        code => OpOutcome::Transient(truncate(&format!("gRPC {code:?}: {message}"))),
    }
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn truncate(text: &str) -> String {
    if text.len() <= ERROR_BYTES_MAX {
        return text.to_string();
    }
    let mut end = ERROR_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::types::Fence;

    /// A participant on loopback answering each path its own way.
    async fn participant() -> String {
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::routing::post;
        let app = axum::Router::new()
            .route("/ok", post(|| async { "done" }))
            .route(
                "/no",
                post(|| async { (StatusCode::CONFLICT, "insufficient funds") }),
            )
            .route(
                "/moved",
                post(|| async {
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(header::LOCATION, "/ok")],
                        "",
                    )
                }),
            )
            .route(
                "/big-error",
                post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "x".repeat(200_000)) }),
            )
            .route(
                "/echo-fence",
                post(|headers: HeaderMap| async move {
                    let fence = headers
                        .get(headers::FENCE_INDEX)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if fence == "42" {
                        (StatusCode::OK, "")
                    } else {
                        (StatusCode::BAD_REQUEST, "wrong fence")
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    async fn call(caller: &BranchCaller, endpoint: &str) -> OpOutcome {
        let payload = Payload::from_static(b"{}");
        caller
            .call(BranchCall {
                gid: "g1",
                branch_id: "b1",
                op: Op::Action,
                protocol: Protocol::Saga,
                endpoint,
                payload: &payload,
                fence: Fence { term: 3, index: 42 },
                timeout: Duration::from_secs(5),
                traceparent: None,
            })
            .await
    }

    /// Atomicity rests on a success being a 2xx from the endpoint the
    /// transaction names: a redirect is not followed (the step did not run
    /// there), a 409 is the participant's "no" in its own words, anything
    /// else is transient, and the fencing token reaches the participant.
    #[tokio::test]
    async fn atomicity_only_a_2xx_from_the_named_endpoint_is_a_success() {
        let base = participant().await;
        let caller = BranchCaller::default();
        for _ in 0..3 {
            // Repeated: pooled connections are reused after each answer.
            assert_eq!(
                call(&caller, &format!("{base}/ok")).await,
                OpOutcome::Succeeded
            );
        }
        assert_eq!(
            call(&caller, &format!("{base}/echo-fence")).await,
            OpOutcome::Succeeded
        );
        assert_eq!(
            call(&caller, &format!("{base}/no")).await,
            OpOutcome::Failed("insufficient funds".into())
        );
        match call(&caller, &format!("{base}/moved")).await {
            OpOutcome::Transient(text) => assert!(text.starts_with("HTTP 307"), "{text}"),
            other => panic!("a redirect was taken for {other:?}"),
        }
        match call(&caller, &format!("{base}/big-error")).await {
            OpOutcome::Transient(text) => {
                assert!(text.len() < 2 * ERROR_BYTES_MAX, "{}", text.len())
            }
            other => panic!("{other:?}"),
        }
        match call(&caller, "http://127.0.0.1:1/nobody").await {
            OpOutcome::Transient(text) => assert!(text.contains("127.0.0.1:1"), "{text}"),
            other => panic!("{other:?}"),
        }
    }

    /// Reads one request (headers, then a body of its Content-Length);
    /// false if the connection ended first.
    async fn read_request(stream: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return true;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A participant on loopback, written by hand so that a test decides
    /// what each connection does: `answers(connection, request)` says
    /// whether the request (both counted from 1) gets a 200 or the
    /// connection is closed instead; with `close_after`, every connection
    /// is shut down 50 ms after its first answer, without a word. Returns the base
    /// URL and the connections and requests it saw.
    async fn raw_participant(
        answers: fn(usize, usize) -> bool,
        close_after: bool,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (connections, requests) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let connection = c.fetch_add(1, Ordering::SeqCst) + 1;
                let r = r.clone();
                tokio::spawn(async move {
                    for request in 1.. {
                        if !read_request(&mut stream).await {
                            return;
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        if !answers(connection, request) {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        if close_after {
                            // After the client took the answer and pooled
                            // the connection: it is closed while idle, in
                            // good order (a FIN, not a reset).
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = stream.shutdown().await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            return;
                        }
                    }
                });
            }
        });
        (base, connections, requests)
    }

    /// No blocking, and no failure that is not the participant's: a
    /// connection the participant closed while it sat idle in the pool
    /// (as servers do after their keep-alive timeout) is noticed before the
    /// next call's request is written, and that call goes on a new
    /// connection and succeeds — its request written once.
    #[tokio::test]
    async fn no_blocking_a_pooled_connection_the_participant_closed_is_replaced_not_failed() {
        use std::sync::atomic::Ordering;
        let (base, connections, requests) = raw_participant(|_, _| true, true).await;
        let caller = BranchCaller::default();
        for _ in 0..5 {
            assert_eq!(
                call(&caller, &format!("{base}/ok")).await,
                OpOutcome::Succeeded
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 5);
        assert_eq!(requests.load(Ordering::SeqCst), 5);
    }

    /// Idempotency (§4.6) is the participant's to keep, not a licence to
    /// repeat: a request written on a reused connection that then ends
    /// without an answer is a transient outcome (the driver retries it with
    /// its backoff), not a second request sent behind the driver's back;
    /// and a connection that answered goes back to the pool and serves the
    /// next call.
    #[tokio::test]
    async fn idempotency_a_request_written_on_a_connection_that_then_closed_is_not_sent_again() {
        use std::sync::atomic::Ordering;
        // The first connection answers its first request and drops its second.
        let (base, connections, requests) = raw_participant(
            |connection, request| !(connection == 1 && request == 2),
            false,
        )
        .await;
        let caller = BranchCaller::default();
        let endpoint = format!("{base}/ok");
        assert_eq!(call(&caller, &endpoint).await, OpOutcome::Succeeded);
        match call(&caller, &endpoint).await {
            OpOutcome::Transient(text) => assert!(text.contains(&base[7..]), "{text}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(call(&caller, &endpoint).await, OpOutcome::Succeeded);
        assert_eq!(call(&caller, &endpoint).await, OpOutcome::Succeeded);
        // Calls 1 and 2 on connection 1, call 2 not repeated; calls 3 and 4
        // on connection 2.
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(requests.load(Ordering::SeqCst), 4);
    }
}
