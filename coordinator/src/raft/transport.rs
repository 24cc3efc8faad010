//! Raft messages between nodes.
//!
//! Each peer has a bounded queue and one task that drains it into batches:
//! whatever waits when the task wakes leaves together, so batching grows with
//! load. While the task has nothing queued, the Raft loop writes a turn's
//! messages to a plaintext peer-wire link itself (`lane.rs`). Ordinary
//! messages flow over one long-lived connection per peer: the
//! peer wire (`wire.rs`: frames on a plain or TLS stream, admitted once),
//! or, towards a node that does not speak it (an older version during a
//! rolling upgrade), a gRPC client stream (`tandem.v1.RaftTransport.Stream`).
//! Either way no batch waits for the previous one's answer and no call
//! setup is paid per batch. Snapshots, which can be large, go in a gRPC
//! call of their own (`Send`) with a longer deadline. A failed connection
//! or call reports the peer unreachable to raft (which retransmits) and
//! backs off exponentially up to a quarter second; the next batch connects
//! again. Messages are raft-rs protobuf bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tandem_proto::v1::raft_transport_client::RaftTransportClient;
use tandem_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use tandem_proto::v1::{RaftAck, RaftBatch};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::inbound::{InboundLink, Inputs};
use super::lane::{Lane, Out};

/// Messages waiting per peer; beyond this they are dropped (raft resends).
const PEER_QUEUE_MAX: usize = 4096;
/// Messages per batch.
const BATCH_MAX: usize = 1024;
/// Batches in flight on a peer's stream before the sender waits.
const STREAM_BATCHES_MAX: usize = 64;
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Snapshots can be large; give their call longer.
const SNAPSHOT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Reconnecting to an unreachable peer: from this, doubling, to the max.
/// The max stays under the default election timeout (500 ms): after a
/// partition heals or a paused node resumes, the leader's stream is back
/// before its followers give up on it (with 1 s they timed out and
/// campaigned — harmlessly, pre-vote refused them — but had no leader to
/// answer from for up to a second; the nemesis test saw it).
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Largest message a node sends or accepts from a peer (snapshots included).
pub const PEER_MESSAGE_BYTES_MAX: usize = 1 << 30;

/// Drops every Raft message this node sends or receives while set: a network
/// partition of this node, for tests.
pub const FAILPOINT_ISOLATE: &str = "transport-isolate";

/// What the transport tells the Raft loop.
#[derive(Debug)]
pub enum PeerEvent {
    /// Messages from peers.
    Raft(Vec<Message>),
    /// A message to this peer could not be delivered.
    Unreachable(u64),
    /// A snapshot sent to a peer arrived (`true`) or did not.
    SnapshotSent { to: u64, delivered: bool },
}

/// How the Raft loop reaches its peers: [`Transport`] (gRPC streams) on a
/// node, the simulated network in the simulation. Neither call blocks;
/// what happens to a message later comes back as a [`PeerEvent`].
pub trait PeerNet {
    /// Queues messages for their peers.
    fn send(&self, messages: Vec<Message>);

    /// Node id → address, as membership and configuration say.
    fn set_addresses(&self, addresses: BTreeMap<u64, String>);
}

impl PeerNet for Transport {
    fn send(&self, messages: Vec<Message>) {
        Transport::send(self, messages)
    }

    fn set_addresses(&self, addresses: BTreeMap<u64, String>) {
        Transport::set_addresses(self, addresses)
    }
}

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    address: String,
    cluster_name: String,
    /// Mutual TLS to and from peers; `None`: plaintext.
    tls: Option<Arc<crate::tls::Tls>>,
    runtime: tokio::runtime::Handle,
    /// Where received messages and delivery reports go (the Raft loop).
    inputs: OnceLock<Inputs<PeerEvent>>,
    /// Where plaintext peer-wire links go once admitted, when the Raft
    /// loop reads them itself (`inbound.rs`); unset, tokio reads them.
    links: OnceLock<Inputs<InboundLink>>,
    /// Node id → address, as membership and configuration say.
    addresses: RwLock<BTreeMap<u64, String>>,
    /// Addresses learnt from peers' own batches, for nodes membership does
    /// not know yet (a joining node answering the leader).
    learnt: RwLock<HashMap<u64, String>>,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Set when the node stops serving: ends the peers' open streams, which
    /// a graceful server shutdown would otherwise wait on forever.
    closing: tokio::sync::watch::Sender<bool>,
    /// How this node opens peer-wire connections.
    wire: WireClient,
}

struct Peer {
    address: String,
    queue: mpsc::Sender<Out>,
    lane: Arc<Mutex<Lane>>,
}

impl Peer {
    fn lane(&self) -> std::sync::MutexGuard<'_, Lane> {
        self.lane.lock().expect("peer lane lock")
    }
}

impl Transport {
    pub fn new(
        id: u64,
        address: String,
        cluster_name: String,
        tls: Option<Arc<crate::tls::Tls>>,
        runtime: tokio::runtime::Handle,
    ) -> Transport {
        let wire = match &tls {
            None => WireClient::Plain,
            Some(tls) => match super::wire::TlsConnector::new(tls) {
                Ok(connector) => WireClient::Tls(connector),
                Err(e) => {
                    tracing::error!(error = %e, "no TLS client for the peer wire; peers are reached over gRPC");
                    WireClient::Off
                }
            },
        };
        Transport {
            inner: Arc::new(Inner {
                id,
                address,
                cluster_name,
                tls,
                runtime,
                inputs: OnceLock::new(),
                links: OnceLock::new(),
                addresses: RwLock::new(BTreeMap::new()),
                learnt: RwLock::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
                closing: tokio::sync::watch::channel(false).0,
                wire,
            }),
        }
    }

    /// Ends every open stream from a peer; call when the server stops.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Whether the node is stopping (see [`Transport::close`]).
    pub(super) fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    /// Whether the isolating failpoint is set (tests).
    pub(super) fn isolated(&self) -> bool {
        fail::eval(FAILPOINT_ISOLATE, |_| ()).is_some()
    }

    /// Serves a peer-wire connection that arrived on the gRPC port (see
    /// `wire.rs`), with the TLS client certificate, if any.
    pub fn serve_wire<IO>(
        &self,
        io: IO,
        certs: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        self.inner
            .runtime
            .spawn(super::wire::serve(self.clone(), io, certs));
    }

    /// Serves a plaintext peer-wire connection (see `wire.rs`); `place`
    /// is the listener's, held while the connection is open.
    pub fn serve_wire_tcp(
        &self,
        tcp: tokio::net::TcpStream,
        place: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        self.inner
            .runtime
            .spawn(super::wire::serve_tcp(self.clone(), tcp, place));
    }

    /// Where peer events go (the Raft loop), and — when the loop reads
    /// them itself (`inbound.rs`) — where admitted plaintext links go
    /// (`None`: tokio reads every link); set once, before serving.
    pub(super) fn set_loop(&self, inputs: Inputs<PeerEvent>, links: Option<Inputs<InboundLink>>) {
        let _ = self.inner.inputs.set(inputs);
        if let Some(links) = links {
            let _ = self.inner.links.set(links);
        }
    }

    /// Whether admitted plaintext links go to the Raft loop.
    pub(super) fn adopts_links(&self) -> bool {
        self.inner.links.get().is_some()
    }

    /// Gives an admitted link to the Raft loop (closed if it cannot take
    /// it: the peer reconnects).
    pub(super) fn adopt(&self, link: InboundLink) {
        if let Some(links) = self.inner.links.get()
            && links.try_send(link).is_err()
        {
            tracing::debug!("the raft loop took no more links; one was closed");
        }
    }

    fn report(&self, input: PeerEvent) {
        if let Some(inputs) = self.inner.inputs.get() {
            let _ = inputs.try_send(input);
        }
    }

    pub fn set_addresses(&self, addresses: BTreeMap<u64, String>) {
        *self.inner.addresses.write().expect("address book lock") = addresses;
    }

    fn address_of(&self, id: u64) -> Option<String> {
        if let Some(a) = self
            .inner
            .addresses
            .read()
            .expect("address book lock")
            .get(&id)
        {
            return Some(a.clone());
        }
        self.inner
            .learnt
            .read()
            .expect("address book lock")
            .get(&id)
            .cloned()
    }

    /// Queues messages for their peers. Never blocks.
    pub fn send(&self, messages: Vec<Message>) {
        if messages.is_empty() || self.isolated() {
            return;
        }
        let mut peers = self.inner.peers.lock().expect("peer table lock");
        // Ordinary messages by peer, in the order given: one write each.
        let mut ordinary: Vec<(u64, Vec<Message>)> = Vec::new();
        for message in messages {
            let to = message.to;
            let Some(address) = self.address_of(to) else {
                tracing::debug!(to, "no address for peer; message dropped");
                continue;
            };
            let stale = peers
                .get(&to)
                .is_some_and(|p| p.address != address || p.queue.is_closed());
            if stale {
                peers.remove(&to);
            }
            let peer = peers
                .entry(to)
                .or_insert_with(|| self.spawn_peer(to, address));
            if message.get_msg_type() != MessageType::MsgSnapshot {
                match ordinary.iter_mut().find(|(peer, _)| *peer == to) {
                    Some((_, batch)) => batch.push(message),
                    None => ordinary.push((to, vec![message])),
                }
                continue;
            }
            if !peer.lane().queue(&peer.queue, Out::Message(message)) {
                self.report(PeerEvent::SnapshotSent {
                    to,
                    delivered: false,
                });
            }
        }
        for (to, batch) in ordinary {
            if let Some(peer) = peers.get(&to) {
                peer.lane().send(&peer.queue, batch);
            }
        }
    }

    /// Batches written directly to peer `to`, and those finished by its
    /// task (tests).
    #[cfg(test)]
    pub(super) fn lane_counts(&self, to: u64) -> (usize, usize) {
        let peers = self.inner.peers.lock().expect("peer table lock");
        peers.get(&to).map_or((0, 0), |peer| peer.lane().counts)
    }

    fn spawn_peer(&self, to: u64, address: String) -> Peer {
        let (queue, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let transport = self.clone();
        let peer_address = address.clone();
        let lane = Arc::new(Mutex::new(Lane::default()));
        let task_lane = lane.clone();
        self.inner
            .runtime
            .spawn(async move { transport.run_peer(to, peer_address, rx, task_lane).await });
        Peer {
            address,
            queue,
            lane,
        }
    }

    async fn run_peer(
        self,
        to: u64,
        address: String,
        mut rx: mpsc::Receiver<Out>,
        lane: Arc<Mutex<Lane>>,
    ) {
        let endpoint = match crate::tls::endpoint(&address, self.inner.tls.as_deref()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(e) => {
                tracing::error!(to, %address, error = %e, "bad peer address");
                return;
            }
        };
        let mut client = RaftTransportClient::new(endpoint.connect_lazy())
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX);
        let schedule = ExponentialBuilder::new()
            .with_min_delay(BACKOFF_MIN)
            .with_max_delay(BACKOFF_MAX)
            .without_max_times();
        let mut backoff = schedule.build();
        let mut failures = 0u64;
        // The open route and its number (what a direct write's rest names).
        let mut route: Option<(u64, Route)> = None;
        let mut links = 0u64;
        let mut batch = Vec::with_capacity(64);
        while let Some(first) = rx.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let taken = batch.len();
            // Written (or given up) only when this iteration ends: until
            // then the Raft loop queues behind it rather than writing.
            let lane = || lane.lock().expect("peer lane lock");
            let written = || lane().written(taken);
            if self.isolated() {
                written();
                continue;
            }
            let mut rest = None;
            let mut snapshots = Vec::new();
            let mut ordinary = Vec::new();
            for out in batch.drain(..) {
                match out {
                    // Only ever first: the loop writes directly only when
                    // nothing is queued.
                    Out::Rest { link, bytes } => rest = Some((link, bytes)),
                    Out::Message(m) if m.get_msg_type() == MessageType::MsgSnapshot => {
                        snapshots.push(m)
                    }
                    Out::Message(m) => ordinary.push(m),
                }
            }
            let mut outcome = Ok(());
            if let Some((link, bytes)) = rest {
                outcome = match &mut route {
                    Some((open, Route::Wire(wire))) if *open == link => {
                        wire.send_framed(&bytes).await
                    }
                    // The link it began on is gone, and the lane with it.
                    _ => Err("a direct write's link closed before its end".to_string()),
                };
                if outcome.is_err() {
                    route = None;
                    lane().close();
                }
            }
            if !ordinary.is_empty() {
                if route.is_none() {
                    match self.open_route(&address, &client).await {
                        Ok(mut open) => {
                            links += 1;
                            let direct = match &mut open {
                                Route::Wire(wire) => wire.take_direct(),
                                Route::Grpc(_) => None,
                            };
                            lane().open(links, direct);
                            route = Some((links, open));
                        }
                        Err(e) => outcome = outcome.and(Err(e)),
                    }
                }
                if let Some((_, open)) = &mut route {
                    let sent = match open {
                        Route::Wire(link) => link.send(&ordinary).await,
                        Route::Grpc(stream) => stream.send(self.batch(&ordinary)).await,
                    };
                    if sent.is_err() {
                        route = None;
                        lane().close();
                    }
                    outcome = outcome.and(sent);
                }
            }
            if !snapshots.is_empty() {
                let result = tokio::time::timeout(
                    SNAPSHOT_CALL_TIMEOUT,
                    client.send(self.batch(&snapshots)),
                )
                .await;
                let result = match result {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(status.message().to_string()),
                    Err(_) => Err("timed out".to_string()),
                };
                for _ in &snapshots {
                    self.report(PeerEvent::SnapshotSent {
                        to,
                        delivered: result.is_ok(),
                    });
                }
                outcome = outcome.and(result);
            }
            written();
            let Err(error) = outcome else {
                if failures > 0 {
                    tracing::info!(to, %address, "peer reachable again");
                }
                failures = 0;
                backoff = schedule.build();
                continue;
            };
            failures += 1;
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(to, %address, failures, %error, "cannot reach peer");
            }
            self.report(PeerEvent::Unreachable(to));
            tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
        }
    }

    /// A connection to the peer at `address` for ordinary messages: the
    /// peer wire, or the gRPC stream when the peer does not speak it (an
    /// older node). Tried afresh after every failure, so a node upgraded
    /// in place is reached over the wire once it is back.
    async fn open_route(
        &self,
        address: &str,
        client: &RaftTransportClient<Channel>,
    ) -> Result<Route, String> {
        let tls = match &self.inner.wire {
            WireClient::Plain => None,
            WireClient::Tls(connector) => Some(connector),
            WireClient::Off => return Ok(Route::Grpc(PeerStream::open(client))),
        };
        match super::wire::connect(address, tls, &self.batch(&[])).await {
            Ok(link) => Ok(Route::Wire(link)),
            Err(super::wire::LinkError::NotSpoken(why)) => {
                tracing::info!(%address, %why, "reaching the peer over its gRPC stream");
                Ok(Route::Grpc(PeerStream::open(client)))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn batch(&self, messages: &[Message]) -> RaftBatch {
        RaftBatch {
            cluster_name: self.inner.cluster_name.clone(),
            from_id: self.inner.id,
            from_address: self.inner.address.clone(),
            messages: messages
                .iter()
                .filter_map(|m| m.write_to_bytes().ok())
                .collect(),
        }
    }

    /// The gRPC service peers send to.
    pub fn service(&self) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(RaftService {
            transport: self.clone(),
        })
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
    }
}

/// How a node opens peer-wire connections: in plaintext, over TLS, or not
/// at all (its TLS files did not make a client configuration: its peers are
/// reached over gRPC).
enum WireClient {
    Plain,
    Tls(super::wire::TlsConnector),
    Off,
}

/// How ordinary messages reach one peer.
enum Route {
    Wire(super::wire::Link),
    Grpc(PeerStream),
}

/// One open `Stream` call to a peer: batches go into `queue`; the call runs
/// in its own task and ends on the first error, which the next `send` sees.
struct PeerStream {
    queue: mpsc::Sender<RaftBatch>,
    call: tokio::task::JoinHandle<Result<(), tonic::Status>>,
}

impl PeerStream {
    fn open(client: &RaftTransportClient<Channel>) -> PeerStream {
        let (queue, batches) = mpsc::channel(STREAM_BATCHES_MAX);
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client
                .stream(tokio_stream::wrappers::ReceiverStream::new(batches))
                .await
                .map(|_| ())
        });
        PeerStream { queue, call }
    }

    /// Queues a batch; waits (up to the call timeout) while the stream is
    /// full, which is how a slow or stopped peer shows.
    async fn send(&mut self, batch: RaftBatch) -> Result<(), String> {
        match tokio::time::timeout(CALL_TIMEOUT, self.queue.send(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(match (&mut self.call).await {
                Ok(Err(status)) => status.message().to_string(),
                Ok(Ok(())) => "the peer ended the stream".to_string(),
                Err(e) => e.to_string(),
            }),
            Err(_) => Err("timed out".to_string()),
        }
    }
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.call.abort();
    }
}

pub struct RaftService {
    transport: Transport,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(
        &self,
        request: tonic::Request<RaftBatch>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        let certs = request.peer_certs();
        let batch = request.into_inner();
        self.transport
            .admit(&batch, certs.as_deref().map(Vec::as_slice))?;
        if !self.deliver(&batch.messages, batch.from_id)? {
            return Err(tonic::Status::resource_exhausted("raft loop saturated"));
        }
        Ok(tonic::Response::new(RaftAck {}))
    }

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        let certs = request.peer_certs();
        let mut batches = request.into_inner();
        let mut closing = self.transport.inner.closing.subscribe();
        let mut admitted = false;
        loop {
            let batch = tokio::select! {
                batch = batches.message() => batch?,
                _ = closing.wait_for(|closing| *closing) => {
                    return Err(tonic::Status::unavailable("node shutting down"));
                }
            };
            let Some(batch) = batch else { break };
            // A stream comes from one sender: check who it is once.
            if !admitted {
                self.transport
                    .admit(&batch, certs.as_deref().map(Vec::as_slice))?;
                admitted = true;
            }
            if !self.deliver(&batch.messages, batch.from_id)? {
                // Raft resends what a saturated loop could not take.
                tracing::debug!("raft loop saturated; a batch from a peer was dropped");
            }
        }
        Ok(tonic::Response::new(RaftAck {}))
    }
}

impl Transport {
    /// Refuses a sender from another cluster and, with TLS, one whose
    /// certificate (already checked against the CA) does not name the
    /// member it claims to be; learns where it serves.
    pub(super) fn admit(
        &self,
        batch: &RaftBatch,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<(), tonic::Status> {
        let inner = &self.inner;
        if batch.cluster_name != inner.cluster_name {
            return Err(tonic::Status::failed_precondition(format!(
                "node {} belongs to cluster {:?}, not {:?}",
                inner.id, inner.cluster_name, batch.cluster_name
            )));
        }
        if inner.tls.is_some() {
            let Some(cert) = certs.and_then(|c| c.first()) else {
                tracing::warn!(
                    from = batch.from_id,
                    "refused raft traffic without a client certificate"
                );
                return Err(tonic::Status::unauthenticated(
                    "raft traffic needs a client certificate signed by the cluster's CA",
                ));
            };
            let names = crate::tls::names_in(cert);
            if !crate::tls::names_member(&names, batch.from_id) {
                tracing::warn!(
                    from = batch.from_id,
                    ?names,
                    "refused raft traffic: the certificate does not name that member"
                );
                return Err(tonic::Status::permission_denied(format!(
                    "a certificate for {names:?} cannot speak for node {}: it must name node-{}",
                    batch.from_id, batch.from_id
                )));
            }
        }
        if !batch.from_address.is_empty() {
            let known = inner
                .learnt
                .read()
                .expect("address book lock")
                .get(&batch.from_id)
                == Some(&batch.from_address);
            if !known {
                inner
                    .learnt
                    .write()
                    .expect("address book lock")
                    .insert(batch.from_id, batch.from_address.clone());
            }
        }
        Ok(())
    }

    /// Refuses a message that is not for this node or not from `from` (the
    /// sender admitted).
    pub(super) fn accepts(&self, message: &Message, from: u64) -> Result<(), tonic::Status> {
        if message.to != self.inner.id {
            return Err(tonic::Status::invalid_argument(format!(
                "message for node {} reached node {}",
                message.to, self.inner.id
            )));
        }
        // A sender speaks for itself only (its certificate was checked
        // for `from` once per stream).
        if message.from != from {
            return Err(tonic::Status::permission_denied(format!(
                "node {from} sent a message from node {}",
                message.from
            )));
        }
        Ok(())
    }

    /// Hands messages to the Raft loop; false when it was too busy to take
    /// them.
    pub(super) fn hand_over(&self, messages: Vec<Message>) -> bool {
        self.inner
            .inputs
            .get()
            .is_none_or(|inputs| inputs.try_send(PeerEvent::Raft(messages)).is_ok())
    }
}

impl RaftService {
    /// Decodes messages and hands them to the Raft loop; false when the
    /// loop was too busy to take them.
    fn deliver(&self, encoded: &[Vec<u8>], from: u64) -> Result<bool, tonic::Status> {
        if self.transport.isolated() {
            return Err(tonic::Status::unavailable("isolated by failpoint"));
        }
        let mut messages = Vec::with_capacity(encoded.len());
        for bytes in encoded {
            let mut message = Message::default();
            message
                .merge_from_bytes(bytes)
                .map_err(|e| tonic::Status::invalid_argument(format!("bad raft message: {e}")))?;
            self.transport.accepts(&message, from)?;
            messages.push(message);
        }
        Ok(self.transport.hand_over(messages))
    }
}
