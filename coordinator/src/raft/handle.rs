//! The async face of a Raft node: what the API and the driver hold. It
//! talks to the loop thread through a bounded input channel and reads the
//! status the loop publishes; there is no shared mutable state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use raft::eraftpb::{ConfState, Snapshot};
use tokio::sync::{oneshot, watch};

use super::inbound::Inputs;
use super::replicated::Replicated;
use super::status::{NodeStatus, Role};
use super::transport::PeerEvent;

/// Why the node could not do what was asked. None of these changed anything
/// that was not already recorded — except `Unknown`, where the outcome is not
/// known and a retry (every client call is idempotent) settles it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("{}", not_leader_message(*.node_id, *.leader_id, .leader_address.as_deref()))]
    NotLeader {
        node_id: u64,
        leader_id: u64,
        leader_address: Option<String>,
    },
    #[error(
        "the outcome is unknown: leadership changed while the request was in flight; retrying is safe"
    )]
    Unknown,
    #[error("node {0} is overloaded: too many requests waiting; retry later")]
    Overloaded(u64),
    #[error("no answer within {0:?}; the outcome is unknown and retrying is safe")]
    Timeout(Duration),
    #[error("node {0} is shutting down")]
    Stopped(u64),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("another membership change is still in progress; retry")]
    MembershipInProgress,
    #[error("leadership is moving from node {from} to node {to}; retry")]
    TransferringLeadership { from: u64, to: u64 },
}

fn not_leader_message(node_id: u64, leader_id: u64, leader_address: Option<&str>) -> String {
    match (leader_id, leader_address) {
        (0, _) => format!("node {node_id} is not the leader and no leader is known yet; retry"),
        (id, Some(addr)) => {
            format!("node {node_id} is not the leader; the leader is node {id} at {addr}")
        }
        (id, None) => format!("node {node_id} is not the leader; the leader is node {id}"),
    }
}

/// A membership change, as the admin API asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    AddLearner { id: u64, address: String },
    Promote { id: u64 },
    Remove { id: u64 },
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What the loop takes in.
pub(crate) enum Input<S: Replicated> {
    Propose {
        data: Vec<u8>,
        reply: Reply<S::Output>,
    },
    ChangeMembership {
        change: MembershipChange,
        reply: Reply<ConfState>,
    },
    Read {
        reply: Reply<Arc<S::View>>,
        deadline: Instant,
    },
    /// What the transport heard or could not do.
    Peer(PeerEvent),
    /// A snapshot this node made is durable on disk.
    SnapshotWritten(Box<Snapshot>),
    SnapshotFailed(String),
    Shutdown,
}

/// The async face of the node, cloned freely by the API and the driver.
pub struct NodeHandle<S: Replicated> {
    pub(super) inputs: Inputs<Input<S>>,
    pub(super) status: watch::Receiver<Arc<NodeStatus>>,
    pub(super) id: u64,
    /// How long a caller waits for a proposal or read before giving up.
    pub request_timeout: Duration,
}

impl<S: Replicated> Clone for NodeHandle<S> {
    fn clone(&self) -> Self {
        NodeHandle {
            inputs: self.inputs.clone(),
            status: self.status.clone(),
            id: self.id,
            request_timeout: self.request_timeout,
        }
    }
}

impl<S: Replicated> NodeHandle<S> {
    /// The handle of a loop the simulation drives: it drains `inputs`.
    #[cfg(feature = "sim")]
    pub(crate) fn simulated(
        inputs: crossbeam_channel::Sender<Input<S>>,
        status: watch::Receiver<Arc<NodeStatus>>,
        id: u64,
    ) -> NodeHandle<S> {
        NodeHandle {
            inputs: Inputs::new(inputs, None),
            status,
            id,
            request_timeout: Duration::from_secs(10),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self) -> Arc<NodeStatus> {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<Arc<NodeStatus>> {
        self.status.clone()
    }

    fn not_leader(&self, status: &NodeStatus) -> NodeError {
        NodeError::NotLeader {
            node_id: self.id,
            leader_id: status.leader_id,
            leader_address: status.leader_address().map(str::to_string),
        }
    }

    /// Fails fast when this node is known not to lead.
    pub fn ensure_leader(&self) -> Result<(), NodeError> {
        let status = self.status();
        if status.role == Role::Leader {
            Ok(())
        } else {
            Err(self.not_leader(&status))
        }
    }

    fn send(&self, input: Input<S>) -> Result<(), NodeError> {
        self.inputs.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => NodeError::Overloaded(self.id),
            TrySendError::Disconnected(_) => NodeError::Stopped(self.id),
        })
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, NodeError>>) -> Result<T, NodeError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NodeError::Stopped(self.id)),
            Err(_) => Err(NodeError::Timeout(self.request_timeout)),
        }
    }

    /// Replicates an entry and returns what the state machine made of it.
    pub async fn propose(&self, data: Vec<u8>) -> Result<S::Output, NodeError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose { data, reply })?;
        self.wait(rx).await
    }

    /// A view of the state machine at least as new as every write acknowledged
    /// before this call (ReadIndex), on any member that knows a leader.
    pub async fn read(&self) -> Result<Arc<S::View>, NodeError> {
        let (reply, rx) = oneshot::channel();
        // On tokio's clock: the same as the machine's, except in the
        // simulation, whose clock it is.
        let deadline = tokio::time::Instant::now().into_std() + self.request_timeout;
        self.send(Input::Read { reply, deadline })?;
        self.wait(rx).await
    }

    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<ConfState, NodeError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Input::ChangeMembership { change, reply })?;
        self.wait(rx).await
    }

    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }
}
