//! The application-side client: connects to any coordinator node, follows
//! redirects to the leader, and retries across the endpoints it was given
//! when a node is down. Every call it retries is idempotent on the
//! coordinator, so a retry after an ambiguous failure is safe.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tandem_proto::v1 as pb;
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

mod message;
mod saga;
mod scope;
mod stream;

pub use message::MessageBuilder;
pub use saga::{SagaBuilder, Step};
pub use scope::GlobalTx;

/// Largest answer the client reads: a List page of large transactions.
/// Coordinators bound a transaction by `--tx-bytes-max` (at most 16 MiB).
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// Between attempts of a failed call: from this, doubling with a jitter of
/// up to the same again, to the max.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The Coordinator service on a channel, reading answers up to
/// [`RESPONSE_BYTES_MAX`] (tonic's default, 4 MiB, is less than one large
/// transaction).
pub(crate) fn coordinator(channel: Connection) -> CoordinatorClient<Connection> {
    CoordinatorClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

/// A coordinator cluster's identity (a UUID minted by its first leader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId(uuid::Uuid);

impl ClusterId {
    pub fn parse(text: &str) -> Result<ClusterId, String> {
        uuid::Uuid::parse_str(text)
            .map(ClusterId)
            .map_err(|e| e.to_string())
    }

    pub fn from_uuid(id: uuid::Uuid) -> ClusterId {
        ClusterId(id)
    }

    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// The XA `formatID` of this cluster's xids: 31 bits of the id (XA
    /// reserves negative values; 0 means "OSI CCR naming", so never 0).
    pub fn xa_format_id(&self) -> i32 {
        let bytes = self.0.as_bytes();
        let bits = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & 0x7fff_ffff;
        bits.max(1) as i32
    }

    /// The first 64 bits in hex: how PostgreSQL xids name the cluster.
    pub fn short_hex(&self) -> String {
        self.0.as_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A fresh globally unique gid (UUID v7: time-ordered, so List pages follow
/// creation order).
pub fn new_gid() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad endpoint {endpoint:?}: {problem}")]
    InvalidEndpoint { endpoint: String, problem: String },
    /// A participant refused a call the application made through the SDK
    /// (a TCC Try): its own words.
    #[error("branch {branch_id} refused: {message}")]
    BranchRefused { branch_id: String, message: String },
    /// The coordinator answered with an error that retrying cannot fix.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    /// No node could take the call before the retry deadline.
    #[error("no coordinator node took the call within {elapsed:?}: {last}")]
    Unavailable { elapsed: Duration, last: String },
}

/// Whether a failed call is tried again (on the leader it names, another
/// node, or after a pause). Cancelled: the connection broke under the call
/// (a node died); the outcome is unknown, and every call the client
/// retries is idempotent.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
    )
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Aborted => "aborted",
        Code::PermissionDenied => "permission denied",
        Code::Unauthenticated => "unauthenticated",
        Code::Internal => "internal error",
        _ => "error",
    }
}

impl Error {
    /// The gRPC code behind this error, if the coordinator answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            Error::Unavailable { .. } => Some(Code::Unavailable),
            Error::InvalidEndpoint { .. } | Error::BranchRefused { .. } => None,
        }
    }
}

pub struct ClientBuilder {
    endpoints: Vec<String>,
    call_timeout: Duration,
    retry_deadline: Duration,
    connect_timeout: Duration,
    tls: Option<ClientTls>,
    token: Option<String>,
    submit_stream: bool,
}

/// A connection to one coordinator node: its channel, with the client's
/// bearer token (if any) on every call.
pub type Connection = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// TLS to the coordinator: its CA, and a client certificate if the
/// cluster asks for one.
#[derive(Clone, Debug)]
struct ClientTls {
    ca_pem: String,
    identity: Option<(String, String)>,
}

impl ClientBuilder {
    /// Deadline of one attempt. [default: 15s]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How long a call keeps retrying (redirects, failover, overload) before
    /// it gives up with [`Error::Unavailable`]. [default: 30s]
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// [default: 1s]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Talk TLS to the cluster, trusting this CA (PEM); endpoints without a
    /// scheme become `https://`.
    pub fn tls_ca(mut self, ca_pem: impl Into<String>) -> Self {
        let tls = self.tls.get_or_insert(ClientTls {
            ca_pem: String::new(),
            identity: None,
        });
        tls.ca_pem = ca_pem.into();
        self
    }

    /// Send the sagas this client submits concurrently on one stream to the
    /// leader (`SubmitSagas`) rather than a call each: fewer messages and
    /// less CPU on both ends. Whatever the stream cannot settle (a leader
    /// change, a broken connection, a node without the method) is sent as
    /// an ordinary call. [default: true]
    pub fn submit_stream(mut self, on: bool) -> Self {
        self.submit_stream = on;
        self
    }

    /// Send this bearer token with every call to the cluster (a static
    /// token from the node's `--auth-tokens` file, or a JWT).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Present this certificate and key (PEM) to the cluster.
    pub fn tls_identity(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        let tls = self.tls.get_or_insert(ClientTls {
            ca_pem: String::new(),
            identity: None,
        });
        tls.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Checks the endpoints; connections are made lazily, on first use.
    pub fn build(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                problem: "no endpoints given".into(),
            });
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| normalize_as(e, scheme))
            .collect::<Result<Vec<_>, _>>()?;
        let bearer = match &self.token {
            None => Bearer(None),
            Some(t) => Bearer(Some(format!("Bearer {}", t.trim()).parse().map_err(
                |_| Error::InvalidEndpoint {
                    endpoint: String::new(),
                    problem: "the token must be printable ASCII".into(),
                },
            )?)),
        };

        let current = endpoints[0].clone();
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                channels: Mutex::new(HashMap::new()),
                current: Mutex::new(current),
                call_timeout: self.call_timeout,
                retry_deadline: self.retry_deadline,
                connect_timeout: self.connect_timeout,
                tls: self.tls,
                bearer,
                submissions: Arc::new(stream::Submissions::new(self.submit_stream)),
                http: reqwest::Client::builder()
                    .timeout(self.call_timeout)
                    .build()
                    .map_err(|e| Error::InvalidEndpoint {
                        endpoint: String::new(),
                        problem: e.to_string(),
                    })?,
            }),
        })
    }
}

/// `host:port` or `http://host:port` → `http://host:port`.
#[cfg(test)]
fn normalize(endpoint: &str) -> Result<String, Error> {
    normalize_as(endpoint, "http")
}

/// `host:port` → `SCHEME://host:port`; a URL keeps its own scheme.
fn normalize_as(endpoint: &str, scheme: &str) -> Result<String, Error> {
    let endpoint = endpoint.trim();
    let bad = |problem: &str| Error::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        problem: problem.to_string(),
    };
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{scheme}://{endpoint}")
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("the scheme must be http or https"))?;
    let host_port = rest.trim_end_matches('/');
    let port_ok = host_port
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || host_port.contains('/') {
        return Err(bad("expected HOST:PORT"));
    }
    Endpoint::from_shared(url.clone()).map_err(|e| bad(&e.to_string()))?;
    Ok(url.trim_end_matches('/').to_string())
}

/// A handle to a coordinator cluster. Cheap to clone; clones share
/// connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// As given (normalized); tried in turn when a node is down.
    endpoints: Vec<String>,
    /// One multiplexed HTTP/2 channel per node.
    channels: Mutex<HashMap<String, Channel>>,
    /// The node believed to lead; calls go there first.
    current: Mutex<String>,
    call_timeout: Duration,
    retry_deadline: Duration,
    connect_timeout: Duration,
    tls: Option<ClientTls>,
    bearer: Bearer,
    /// Sagas submitted on one stream.
    submissions: Arc<stream::Submissions>,
    /// For the calls the application makes to participants through the SDK.
    http: reqwest::Client,
}

impl Client {
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// A client for the cluster reachable at any of `endpoints`
    /// (`host:port`, several nodes or all of them).
    pub fn connect<I, S>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::builder(endpoints).build()
    }

    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientBuilder {
            endpoints: endpoints
                .into_iter()
                .flat_map(|e| {
                    e.as_ref()
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .collect(),
            call_timeout: Duration::from_secs(15),
            retry_deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            tls: None,
            token: None,
            submit_stream: true,
        }
    }

    /// An endpoint as this client writes it (`https://` when it talks TLS).
    fn normalize(&self, endpoint: &str) -> Result<String, Error> {
        normalize_as(
            endpoint,
            if self.inner.tls.is_some() {
                "https"
            } else {
                "http"
            },
        )
    }

    pub(crate) fn channel(&self, endpoint: &str) -> Channel {
        let mut channels = self.inner.channels.lock().expect("channel table lock");
        channels
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let mut e = Endpoint::from_shared(endpoint.to_string())
                    .expect("endpoints are validated when they are added")
                    .connect_timeout(self.inner.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(20));
                if let (Some(tls), Some(rest)) =
                    (&self.inner.tls, endpoint.strip_prefix("https://"))
                {
                    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
                    let mut config = tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
                        .domain_name(host.trim_start_matches('[').trim_end_matches(']'));
                    if let Some((cert, key)) = &tls.identity {
                        config = config.identity(tonic::transport::Identity::from_pem(cert, key));
                    }
                    // A bad CA shows as a failed call naming the node.
                    if let Ok(secured) = e.clone().tls_config(config) {
                        e = secured;
                    }
                }
                e.connect_lazy()
            })
            .clone()
    }

    /// A node's channel with this client's token on every call.
    pub(crate) fn connection(&self, endpoint: &str) -> Connection {
        tonic::service::interceptor::InterceptedService::new(
            self.channel(endpoint),
            self.inner.bearer.clone(),
        )
    }

    fn current(&self) -> String {
        self.inner.current.lock().expect("current lock").clone()
    }

    fn set_current(&self, endpoint: &str) {
        *self.inner.current.lock().expect("current lock") = endpoint.to_string();
    }

    /// The leader's address a refusal names (`tandem-leader`), as this
    /// client writes endpoints.
    fn leader_named_by(&self, status: &Status) -> Option<String> {
        status
            .metadata()
            .get(tandem_proto::LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| self.normalize(a).ok())
    }

    fn next_endpoint(&self, after: &str) -> String {
        let eps = &self.inner.endpoints;
        let at = eps.iter().position(|e| e == after);
        match at {
            Some(i) => eps[(i + 1) % eps.len()].clone(),
            None => eps[0].clone(),
        }
    }

    /// Runs `call` against the leader, following redirects and failing over
    /// until it succeeds, fails for good, or the retry deadline passes.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with_timeout(self.inner.call_timeout, call).await
    }

    /// [`Client::call`] with its own per-attempt deadline, for calls that
    /// legitimately take long (adding a node waits for it to catch up).
    pub async fn call_with_timeout<T, F, Fut>(
        &self,
        call_timeout: Duration,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Connection) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut target = self.current();
        // Spread out, so that the clients of a failed node do not return in step.
        let mut backoff = ExponentialBuilder::new()
            .with_min_delay(RETRY_BACKOFF_MIN)
            .with_max_delay(RETRY_BACKOFF_MAX)
            .with_jitter()
            .without_max_times()
            .build();
        let mut redirects = 0;
        loop {
            let attempt = tokio::time::timeout(call_timeout, call(self.connection(&target))).await;
            let status = match attempt {
                Ok(Ok(response)) => {
                    self.set_current(&target);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!(
                    "{target} did not answer within {call_timeout:?}"
                )),
            };
            if !retryable(status.code()) {
                return Err(Error::Status(status));
            }
            if started.elapsed() >= self.inner.retry_deadline {
                return Err(Error::Unavailable {
                    elapsed: started.elapsed(),
                    last: format!("{target}: {}", status.message()),
                });
            }
            match self.leader_named_by(&status) {
                // Follow a redirect at once, a few times in a row at most.
                Some(leader) if leader != target && redirects < 3 => {
                    redirects += 1;
                    target = leader;
                    continue;
                }
                _ => {
                    redirects = 0;
                    if status.code() != Code::ResourceExhausted {
                        target = self.next_endpoint(&target);
                    }
                }
            }
            tokio::time::sleep(backoff.next().unwrap_or(RETRY_BACKOFF_MAX)).await;
        }
    }

    /// Starts a transaction. Idempotent: repeating it with the same gid and
    /// protocol returns the transaction already there.
    pub async fn begin(&self, gid: &str, protocol: pb::Protocol) -> Result<pb::Transaction, Error> {
        let request = pb::BeginRequest {
            gid: gid.to_string(),
            protocol: protocol as i32,
            ..Default::default()
        };
        Ok(self
            .begin_with(request)
            .await?
            .transaction
            .unwrap_or_default())
    }

    /// Begin with every option of the request.
    pub async fn begin_with(&self, request: pb::BeginRequest) -> Result<pb::BeginResponse, Error> {
        self.call(|ch| {
            let request = request.clone();
            async move { coordinator(ch).begin(request).await }
        })
        .await
    }

    /// Enlists a branch: `ops` pairs an operation name with the endpoint
    /// that serves it. Idempotent for the same branch id and spec.
    pub async fn register_branch(
        &self,
        gid: &str,
        branch_id: &str,
        ops: &[(&str, &str)],
        payload: Vec<u8>,
    ) -> Result<pb::Transaction, Error> {
        let request = pb::RegisterBranchRequest {
            gid: gid.to_string(),
            branch_id: branch_id.to_string(),
            ops: ops
                .iter()
                .map(|(op, endpoint)| pb::BranchEndpoint {
                    op: op.to_string(),
                    endpoint: endpoint.to_string(),
                })
                .collect(),
            payload,
        };
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { coordinator(ch).register_branch(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    /// Asks to commit; with `wait`, returns once the transaction is
    /// terminal (or `wait_timeout` passed). Safe to repeat: a repeat returns
    /// the outcome already decided.
    pub async fn commit(
        &self,
        gid: &str,
        wait: bool,
        wait_timeout: Duration,
    ) -> Result<pb::Transaction, Error> {
        let request = pb::CommitRequest {
            gid: gid.to_string(),
            wait,
            wait_timeout_ms: wait_timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        let response = self
            .call_with_timeout(wait_timeout + self.inner.call_timeout, |ch| {
                let request = request.clone();
                async move { coordinator(ch).commit(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    /// Asks to abort an undecided transaction. Safe to repeat.
    pub async fn abort(
        &self,
        gid: &str,
        reason: &str,
        wait: bool,
        wait_timeout: Duration,
    ) -> Result<pb::Transaction, Error> {
        let request = pb::AbortRequest {
            gid: gid.to_string(),
            reason: reason.to_string(),
            wait,
            wait_timeout_ms: wait_timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        let response = self
            .call_with_timeout(wait_timeout + self.inner.call_timeout, |ch| {
                let request = request.clone();
                async move { coordinator(ch).abort(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    /// Begins a transaction and returns a scope to enlist branches and end it.
    pub async fn begin_scope(
        &self,
        protocol: pb::Protocol,
        options: pb::TxOptions,
    ) -> Result<GlobalTx, Error> {
        let gid = new_gid();
        let request = pb::BeginRequest {
            gid: gid.clone(),
            protocol: protocol as i32,
            options: Some(options),
            payload: Vec::new(),
        };
        self.begin_with(request).await?;
        Ok(GlobalTx {
            client: self.clone(),
            gid,
            protocol,
        })
    }

    pub async fn get(&self, gid: &str) -> Result<pb::Transaction, Error> {
        self.get_with(pb::GetRequest {
            gid: gid.to_string(),
            resolve: false,
        })
        .await
    }

    /// The termination protocol's question, for a participant in doubt (a
    /// 3PC branch that voted or pre-committed and heard nothing): the
    /// transaction as the cluster has it — and if it is undecided past its
    /// deadline, the question itself decides it (abort). A participant acts
    /// on a decision it reads here, never on its own guess.
    pub async fn resolve(&self, gid: &str) -> Result<pb::Transaction, Error> {
        self.get_with(pb::GetRequest {
            gid: gid.to_string(),
            resolve: true,
        })
        .await
    }

    async fn get_with(&self, request: pb::GetRequest) -> Result<pb::Transaction, Error> {
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { coordinator(ch).get(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    pub async fn list(&self, request: pb::ListRequest) -> Result<pb::ListResponse, Error> {
        self.call(|ch| {
            let request = request.clone();
            async move { coordinator(ch).list(request).await }
        })
        .await
    }

    /// Repair: calls the open ops of a stuck transaction now (one branch,
    /// or every one when `branch_id` is empty) instead of after their
    /// backoff. Recorded in the transaction's history with `reason` and `by`.
    pub async fn retry_now(&self, request: pb::RepairRequest) -> Result<pb::Transaction, Error> {
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { coordinator(ch).retry(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    /// Repair: marks open phase-two ops done by hand (their participant can
    /// never acknowledge); the transaction ends with a heuristic outcome.
    /// `reason` is required and kept in the audit record.
    pub async fn resolve_by_hand(
        &self,
        request: pb::RepairRequest,
    ) -> Result<pb::Transaction, Error> {
        let response = self
            .call(|ch| {
                let request = request.clone();
                async move { coordinator(ch).resolve(request).await }
            })
            .await?;
        Ok(response.transaction.unwrap_or_default())
    }

    /// Calls one node only — no redirect, no failover. For reading a
    /// particular node (tests, diagnostics).
    pub async fn get_from(&self, endpoint: &str, gid: &str) -> Result<pb::Transaction, Error> {
        let endpoint = self.normalize(endpoint)?;
        let request = pb::GetRequest {
            gid: gid.to_string(),
            resolve: false,
        };
        coordinator(self.connection(&endpoint))
            .get(request)
            .await
            .map(|r| r.into_inner().transaction.unwrap_or_default())
            .map_err(Error::Status)
    }

    /// The cluster's id: minted by its first leader, the same on every
    /// member, never changed. XA helpers put it in their xids so that a
    /// recovery scan touches only this cluster's branches. Waits (within the
    /// retry deadline) while a brand-new cluster has not minted it yet.
    pub async fn cluster_id(&self) -> Result<ClusterId, Error> {
        self.call(|ch| async move {
            let status = ClusterClient::new(ch)
                .local_status(pb::NodeStatusRequest {})
                .await?;
            if status.get_ref().cluster_id.is_empty() {
                return Err(Status::unavailable(format!(
                    "node {} has not applied the cluster id yet",
                    status.get_ref().id
                )));
            }
            Ok(status)
        })
        .await
        .and_then(|status| {
            ClusterId::parse(&status.cluster_id).map_err(|problem| {
                Error::Status(Status::internal(format!(
                    "node {} reports cluster id {:?}: {problem}",
                    status.id, status.cluster_id
                )))
            })
        })
    }

    /// Every member's status, as the node asked sees the cluster. Goes to
    /// whichever node answers first (followers know the cluster too).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        self.call(|ch| async move {
            ClusterClient::new(ch)
                .status(pb::ClusterStatusRequest {})
                .await
        })
        .await
    }

    pub async fn add_node(
        &self,
        id: u64,
        address: &str,
        learner_only: bool,
    ) -> Result<pb::MembershipResponse, Error> {
        let request = pb::AddNodeRequest {
            id,
            address: address.to_string(),
            learner_only,
        };
        // The coordinator waits up to a minute for the node to catch up.
        self.call_with_timeout(Duration::from_secs(90), |ch| {
            let request = request.clone();
            async move { ClusterClient::new(ch).add_node(request).await }
        })
        .await
    }

    pub async fn remove_node(&self, id: u64) -> Result<pb::MembershipResponse, Error> {
        self.call(|ch| async move {
            ClusterClient::new(ch)
                .remove_node(pb::RemoveNodeRequest { id })
                .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized_and_malformed_ones_refused() {
        assert_eq!(
            normalize("127.0.0.1:7070").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert_eq!(
            normalize("http://node-1:7070/").unwrap(),
            "http://node-1:7070"
        );
        assert!(normalize("127.0.0.1").is_err());
        assert!(normalize("ftp://x:1").is_err());
        assert!(normalize("host:0").is_err());
        assert!(normalize("host:7070/path").is_err());
        assert!(Client::connect(Vec::<String>::new()).is_err());
        let client = Client::connect(["a:1,b:2", "c:3"]).unwrap();
        assert_eq!(client.inner.endpoints.len(), 3);
        assert_eq!(client.next_endpoint("http://c:3"), "http://a:1");
    }

    /// A call given its own deadline waits that long on each attempt, not
    /// the client-wide `call_timeout` (long waits and AddNode need it).
    #[tokio::test]
    async fn a_calls_own_timeout_governs_each_attempt() {
        // A node that accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let client = Client::builder([address.to_string()])
            .call_timeout(Duration::from_millis(100))
            .retry_deadline(Duration::ZERO)
            .build()
            .unwrap();
        let started = Instant::now();
        let result = client
            .call_with_timeout(Duration::from_millis(800), |ch| async move {
                ClusterClient::new(ch)
                    .local_status(pb::NodeStatusRequest {})
                    .await
            })
            .await;
        let elapsed = started.elapsed();
        assert!(result.is_err(), "nobody answers");
        assert!(
            elapsed >= Duration::from_millis(800),
            "the attempt was cut at {elapsed:?}, before its own 800 ms"
        );
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        silent.abort();
    }

    /// A node that does not know `SubmitSagas` (one older than it) turns
    /// the stream off for this client for a minute, and the saga goes as a call: the
    /// answer is the call's (this node knows no SubmitSaga either), not the
    /// stream's UNAVAILABLE.
    #[tokio::test]
    async fn a_node_without_the_stream_is_sent_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let node = tokio::spawn(async move {
            axum::serve(
                listener,
                tonic::service::Routes::default().into_axum_router(),
            )
            .await
        });
        let client = Client::builder([address.to_string()])
            .retry_deadline(Duration::ZERO)
            .build()
            .unwrap();
        let result = client
            .saga()
            .step(Step::new(
                "a",
                "http://127.0.0.1:9/a",
                "http://127.0.0.1:9/c",
            ))
            .submit()
            .await;
        let error = result.expect_err("this node knows no saga");
        assert_eq!(error.code(), Some(Code::Unimplemented), "{error}");
        assert!(
            client
                .inner
                .submissions
                .unsupported_at
                .lock()
                .unwrap()
                .is_some(),
            "the stream is off for this client, for a while"
        );
        node.abort();
    }
}
