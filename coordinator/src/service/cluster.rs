//! Cluster administration — every member's status, adding and removing
//! nodes — on domain types. A membership change waits out one still in
//! progress; adding a voter waits until it has caught up.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::cluster_client::ClusterClient;

use super::{Result, ServiceError, invalid};
use crate::raft::{MembershipChange, NodeError, NodeStatus, Role};
use crate::replica::{Node, Replica, ReplicaStatus};

/// How long a new node may take to catch up before AddNode gives up
/// promoting it (it stays a learner; AddNode again resumes).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a previous membership change to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one peer may take to tell its status.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The voting and non-voting members, each sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl Members {
    fn new(mut voters: Vec<u64>, mut learners: Vec<u64>) -> Members {
        voters.sort_unstable();
        learners.sort_unstable();
        Members { voters, learners }
    }
}

/// What one member says about itself, or why it could not be asked.
#[derive(Clone, Debug, Default)]
pub struct MemberStatus {
    pub id: u64,
    pub address: String,
    /// `leader`, `follower`, …, or `unreachable` (then `error` says why).
    pub role: String,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub leader_id: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub cluster_name: String,
    /// Empty until the cluster's first leader minted it.
    pub cluster_id: String,
    pub error: String,
}

impl MemberStatus {
    fn unreachable(id: u64, address: String, error: impl Into<String>) -> MemberStatus {
        MemberStatus {
            id,
            address,
            role: "unreachable".into(),
            error: error.into(),
            ..Default::default()
        }
    }

    fn of(node: &NodeStatus, replica: &ReplicaStatus) -> MemberStatus {
        MemberStatus {
            id: node.id,
            address: node.address.clone(),
            role: node.role.name().to_string(),
            term: node.term,
            commit: node.commit,
            applied: node.applied,
            leader_id: node.leader_id,
            last_index: node.last_index,
            snapshot_index: node.snapshot_index,
            cluster_name: node.cluster_name.clone(),
            cluster_id: cluster_id(replica),
            error: String::new(),
        }
    }
}

/// The cluster as this node sees it, with each member's own word.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub leader_id: u64,
    pub nodes: Vec<MemberStatus>,
    pub members: Members,
    pub cluster_id: String,
}

fn cluster_id(replica: &ReplicaStatus) -> String {
    replica
        .cluster_id
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// The cluster administration operations.
#[derive(Clone)]
pub struct ClusterAdmin {
    replica: Replica,
    /// How to reach peers (TLS when the node has certificates).
    tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

impl ClusterAdmin {
    pub fn new(replica: Replica) -> ClusterAdmin {
        ClusterAdmin { replica, tls: None }
    }

    /// Peers are asked over TLS with these certificates.
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<crate::tls::Tls>>) -> ClusterAdmin {
        self.tls = tls;
        self
    }

    fn node(&self) -> &Node {
        &self.replica.node
    }

    /// This node's own status.
    pub fn local_status(&self) -> MemberStatus {
        MemberStatus::of(&self.node().status(), &self.replica.status())
    }

    /// Every member's status, each asked in parallel (bounded in time).
    pub async fn status(&self) -> ClusterView {
        let own = self.node().status();
        let replica = self.replica.status();
        let mut ids: Vec<u64> = own.voters.iter().chain(&own.learners).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.contains(&own.id) {
            ids.push(own.id);
        }
        let calls = ids.iter().map(|&id| {
            let (own, replica, tls) = (own.clone(), replica.clone(), self.tls.clone());
            async move {
                if id == own.id {
                    return MemberStatus::of(&own, &replica);
                }
                match own.members.get(&id) {
                    Some(address) => peer_status(id, address.clone(), tls.as_deref()).await,
                    None => MemberStatus::unreachable(id, String::new(), "address unknown"),
                }
            }
        });
        let nodes = futures::future::join_all(calls).await;
        ClusterView {
            leader_id: own.leader_id,
            nodes,
            members: Members::new(own.voters.clone(), own.learners.clone()),
            cluster_id: cluster_id(&replica),
        }
    }

    /// Adds node `id` at `address` as a learner and, unless `learner_only`,
    /// promotes it to voter once it has caught up. Idempotent.
    pub async fn add_node(&self, id: u64, address: String, learner_only: bool) -> Result<Members> {
        if id == 0 {
            return Err(invalid("node id must be non-zero"));
        }
        crate::config::parse_peers(&format!("{id}={address}"))
            .map_err(|e| invalid(format!("node {id}: {e}")))?;
        self.node().ensure_leader()?;
        let status = self.node().status();
        if status.voters.contains(&id) {
            return Ok(self.members());
        }
        let mut members = self.members();
        if !status.learners.contains(&id) {
            members = self
                .change(MembershipChange::AddLearner { id, address })
                .await?;
        }
        if !learner_only {
            self.wait_caught_up(id).await?;
            members = self.change(MembershipChange::Promote { id }).await?;
        }
        Ok(members)
    }

    /// Removes node `id`. Idempotent: removing a non-member answers the
    /// membership as it is.
    pub async fn remove_node(&self, id: u64) -> Result<Members> {
        if id == 0 {
            return Err(invalid("node id must be non-zero"));
        }
        let status = self.node().status();
        if status.role == Role::Leader
            && !status.voters.contains(&id)
            && !status.learners.contains(&id)
        {
            return Ok(self.members());
        }
        self.change(MembershipChange::Remove { id }).await
    }

    fn members(&self) -> Members {
        let status = self.node().status();
        Members::new(status.voters.clone(), status.learners.clone())
    }

    /// Proposes a change, waiting out a previous change still in progress
    /// (for example the automatic leave of a joint configuration).
    async fn change(&self, change: MembershipChange) -> Result<Members> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            match self.node().change_membership(change.clone()).await {
                Ok(conf) => return Ok(Members::new(conf.voters, conf.learners)),
                Err(NodeError::MembershipInProgress) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn wait_caught_up(&self, id: u64) -> Result<()> {
        let target = self.node().status().commit;
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let status = self.node().status();
            if status.role != Role::Leader {
                return Err(NodeError::NotLeader {
                    node_id: status.id,
                    leader_id: status.leader_id,
                    leader_address: status.leader_address().map(str::to_string),
                }
                .into());
            }
            let matched = status.matched.get(&id).copied().unwrap_or(0);
            if matched >= target {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::TimedOut(format!(
                    "node {id} has not caught up (log index {matched} of {target}) within {CATCH_UP_TIMEOUT:?}; \
                     it stays a learner — check that it runs with --join, then add it again to promote it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Asks a peer for its own status over its Cluster service.
async fn peer_status(id: u64, address: String, tls: Option<&crate::tls::Tls>) -> MemberStatus {
    let endpoint = match crate::tls::endpoint(&address, tls) {
        Ok(e) => e
            .connect_timeout(PEER_STATUS_TIMEOUT)
            .timeout(PEER_STATUS_TIMEOUT),
        Err(e) => return MemberStatus::unreachable(id, address, e.to_string()),
    };
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        ClusterClient::new(channel)
            .local_status(pb::NodeStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(PEER_STATUS_TIMEOUT * 2, call).await {
        Ok(Ok(s)) => MemberStatus {
            id: s.id,
            address: s.address,
            role: s.role,
            term: s.term,
            commit: s.commit,
            applied: s.applied,
            leader_id: s.leader_id,
            last_index: s.last_index,
            snapshot_index: s.snapshot_index,
            cluster_name: s.cluster_name,
            cluster_id: s.cluster_id,
            error: s.error,
        },
        Ok(Err(e)) => MemberStatus::unreachable(id, address, e),
        Err(_) => MemberStatus::unreachable(id, address, "timed out"),
    }
}
