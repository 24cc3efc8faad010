//! Raft messages between nodes over gRPC (`tandem.v1.RaftTransport`).
//!
//! Each peer has a bounded queue and one task that drains it: while a call is
//! in flight new messages queue up and leave together in the next call, so
//! batching grows with load. A failed call reports the peer unreachable to
//! raft (which retransmits) and backs off exponentially up to a second;
//! channels reconnect by themselves. Messages are raft-rs protobuf bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tandem_proto::v1::raft_transport_client::RaftTransportClient;
use tandem_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use tandem_proto::v1::{RaftAck, RaftBatch};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::node::Input;

/// Messages waiting per peer; beyond this they are dropped (raft resends).
const PEER_QUEUE_MAX: usize = 4096;
/// Messages per call.
const BATCH_MAX: usize = 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Snapshots can be large; give their call longer.
const SNAPSHOT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest message a node sends or accepts from a peer (snapshots included).
pub const PEER_MESSAGE_BYTES_MAX: usize = 1 << 30;

/// Drops every Raft message this node sends or receives while set: a network
/// partition of this node, for tests.
pub const FAILPOINT_ISOLATE: &str = "transport-isolate";

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    address: String,
    cluster_name: String,
    runtime: tokio::runtime::Handle,
    /// Where received messages and delivery reports go (the Raft loop).
    inputs: OnceLock<Sender<Input>>,
    /// Node id → address, as membership and configuration say.
    addresses: RwLock<BTreeMap<u64, String>>,
    /// Addresses learnt from peers' own batches, for nodes membership does
    /// not know yet (a joining node answering the leader).
    learnt: RwLock<HashMap<u64, String>>,
    peers: Mutex<HashMap<u64, Peer>>,
}

struct Peer {
    address: String,
    queue: mpsc::Sender<Message>,
}

impl Transport {
    pub fn new(
        id: u64,
        address: String,
        cluster_name: String,
        runtime: tokio::runtime::Handle,
    ) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                id,
                address,
                cluster_name,
                runtime,
                inputs: OnceLock::new(),
                addresses: RwLock::new(BTreeMap::new()),
                learnt: RwLock::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub(crate) fn set_inputs(&self, inputs: Sender<Input>) {
        let _ = self.inner.inputs.set(inputs);
    }

    fn report(&self, input: Input) {
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
        if messages.is_empty() || fail::eval(FAILPOINT_ISOLATE, |_| ()).is_some() {
            return;
        }
        let mut peers = self.inner.peers.lock().expect("peer table lock");
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
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            if peer.queue.try_send(message).is_err() && is_snapshot {
                self.report(Input::SnapshotSent {
                    to,
                    delivered: false,
                });
            }
        }
    }

    fn spawn_peer(&self, to: u64, address: String) -> Peer {
        let (queue, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let transport = self.clone();
        let peer_address = address.clone();
        self.inner
            .runtime
            .spawn(async move { transport.run_peer(to, peer_address, rx).await });
        Peer { address, queue }
    }

    async fn run_peer(self, to: u64, address: String, mut rx: mpsc::Receiver<Message>) {
        let endpoint = match Endpoint::from_shared(format!("http://{address}")) {
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
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u64;
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
            if fail::eval(FAILPOINT_ISOLATE, |_| ()).is_some() {
                continue;
            }
            let snapshots = batch
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .count();
            let encoded: Vec<Vec<u8>> = batch
                .iter()
                .filter_map(|m| m.write_to_bytes().ok())
                .collect();
            let request = RaftBatch {
                cluster_name: self.inner.cluster_name.clone(),
                from_id: self.inner.id,
                from_address: self.inner.address.clone(),
                messages: encoded,
            };
            let timeout = if snapshots > 0 {
                SNAPSHOT_CALL_TIMEOUT
            } else {
                CALL_TIMEOUT
            };
            let outcome = tokio::time::timeout(timeout, send(&mut client, request)).await;
            let delivered = matches!(outcome, Ok(Ok(())));
            for _ in 0..snapshots {
                self.report(Input::SnapshotSent { to, delivered });
            }
            if delivered {
                if failures > 0 {
                    tracing::info!(to, %address, "peer reachable again");
                }
                failures = 0;
                backoff = BACKOFF_MIN;
                continue;
            }
            failures += 1;
            if failures == 1 || failures.is_power_of_two() {
                let error = match outcome {
                    Ok(Err(status)) => status.message().to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::warn!(to, %address, failures, %error, "cannot reach peer");
            }
            self.report(Input::Unreachable(to));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
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

async fn send(
    client: &mut RaftTransportClient<Channel>,
    request: RaftBatch,
) -> Result<(), tonic::Status> {
    client.send(request).await.map(|_| ())
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
        let batch = request.into_inner();
        let inner = &self.transport.inner;
        if fail::eval(FAILPOINT_ISOLATE, |_| ()).is_some() {
            return Err(tonic::Status::unavailable("isolated by failpoint"));
        }
        if batch.cluster_name != inner.cluster_name {
            return Err(tonic::Status::failed_precondition(format!(
                "node {} belongs to cluster {:?}, not {:?}",
                inner.id, inner.cluster_name, batch.cluster_name
            )));
        }
        if !batch.from_address.is_empty() {
            let mut learnt = inner.learnt.write().expect("address book lock");
            if learnt.get(&batch.from_id) != Some(&batch.from_address) {
                learnt.insert(batch.from_id, batch.from_address.clone());
            }
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let mut message = Message::default();
            message
                .merge_from_bytes(bytes)
                .map_err(|e| tonic::Status::invalid_argument(format!("bad raft message: {e}")))?;
            if message.to != inner.id {
                return Err(tonic::Status::invalid_argument(format!(
                    "message for node {} reached node {}",
                    message.to, inner.id
                )));
            }
            messages.push(message);
        }
        if let Some(inputs) = inner.inputs.get()
            && inputs.try_send(Input::Raft(messages)).is_err()
        {
            return Err(tonic::Status::resource_exhausted("raft loop saturated"));
        }
        Ok(tonic::Response::new(RaftAck {}))
    }
}
