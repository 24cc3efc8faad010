//! `tandem.v1.Cluster`: status of every member, and membership changes.

use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::status::{from_node_error, invalid};
use crate::raft::{MembershipChange, NodeError, NodeStatus, Role};
use crate::replica::{Node, Replica, ReplicaStatus};

/// How long a new node may take to catch up before AddNode gives up
/// promoting it (it stays a learner; AddNode again resumes).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a previous membership change to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

pub struct ClusterService {
    node: Node,
    replica: Replica,
}

impl ClusterService {
    pub fn new(replica: Replica) -> Self {
        ClusterService {
            node: replica.node.clone(),
            replica,
        }
    }

    /// Proposes a change, waiting out a previous change still in progress
    /// (for example the automatic leave of a joint configuration).
    async fn change(&self, change: MembershipChange) -> Result<pb::MembershipResponse, Status> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            match self.node.change_membership(change.clone()).await {
                Ok(conf) => {
                    let sorted = |mut ids: Vec<u64>| {
                        ids.sort_unstable();
                        ids
                    };
                    return Ok(pb::MembershipResponse {
                        voters: sorted(conf.voters),
                        learners: sorted(conf.learners),
                    });
                }

                Err(NodeError::MembershipInProgress) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(from_node_error(e)),
            }
        }
    }

    fn membership(&self) -> pb::MembershipResponse {
        let status = self.node.status();
        pb::MembershipResponse {
            voters: status.voters.clone(),
            learners: status.learners.clone(),
        }
    }

    async fn wait_caught_up(&self, id: u64) -> Result<(), Status> {
        let target = self.node.status().commit;
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let status = self.node.status();
            if status.role != Role::Leader {
                return Err(from_node_error(NodeError::NotLeader {
                    node_id: status.id,
                    leader_id: status.leader_id,
                    leader_address: status.leader_address().map(str::to_string),
                }));
            }
            let matched = status.matched.get(&id).copied().unwrap_or(0);
            if matched >= target {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "node {id} has not caught up (log index {matched} of {target}) within {CATCH_UP_TIMEOUT:?}; \
                     it stays a learner — check that it runs with --join, then add it again to promote it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn node_status_to_pb(s: &NodeStatus, replica: &ReplicaStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        id: s.id,
        address: s.address.clone(),
        role: s.role.name().to_string(),
        term: s.term,
        commit: s.commit,
        applied: s.applied,
        leader_id: s.leader_id,
        last_index: s.last_index,
        snapshot_index: s.snapshot_index,
        cluster_name: s.cluster_name.clone(),
        error: String::new(),
        cluster_id: replica
            .cluster_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
    }
}

async fn peer_status(id: u64, address: String) -> pb::NodeStatus {
    let unreachable = |error: String| pb::NodeStatus {
        id,
        address: address.clone(),
        role: "unreachable".into(),
        error,
        ..Default::default()
    };
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(e) => e
            .connect_timeout(PEER_STATUS_TIMEOUT)
            .timeout(PEER_STATUS_TIMEOUT),
        Err(e) => return unreachable(e.to_string()),
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
        Ok(Ok(status)) => status,
        Ok(Err(e)) => unreachable(e),
        Err(_) => unreachable("timed out".into()),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let own = self.node.status();
        let replica = self.replica.status();
        let mut ids: Vec<u64> = own.voters.iter().chain(&own.learners).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.contains(&own.id) {
            ids.push(own.id);
        }
        let calls = ids.iter().map(|&id| {
            let (own, replica) = (own.clone(), replica.clone());
            async move {
                if id == own.id {
                    return node_status_to_pb(&own, &replica);
                }
                match own.members.get(&id) {
                    Some(address) => peer_status(id, address.clone()).await,
                    None => pb::NodeStatus {
                        id,
                        role: "unreachable".into(),
                        error: "address unknown".into(),
                        ..Default::default()
                    },
                }
            }
        });
        let nodes = futures::future::join_all(calls).await;
        Ok(Response::new(pb::ClusterStatusResponse {
            leader_id: own.leader_id,
            nodes,
            voters: own.voters.clone(),
            learners: own.learners.clone(),
            cluster_id: replica
                .cluster_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn local_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(node_status_to_pb(
            &self.node.status(),
            &self.replica.status(),
        )))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let request = request.into_inner();
        let id = request.id;
        if id == 0 {
            return Err(invalid("node id must be non-zero"));
        }
        crate::config::parse_peers(&format!("{id}={}", request.address))
            .map_err(|e| invalid(format!("node {id}: {e}")))?;
        self.node.ensure_leader().map_err(from_node_error)?;
        let status = self.node.status();
        if status.voters.contains(&id) {
            return Ok(Response::new(self.membership()));
        }
        let mut membership = self.membership();
        if !status.learners.contains(&id) {
            membership = self
                .change(MembershipChange::AddLearner {
                    id,
                    address: request.address,
                })
                .await?;
        }
        if !request.learner_only {
            self.wait_caught_up(id).await?;
            membership = self.change(MembershipChange::Promote { id }).await?;
        }
        Ok(Response::new(membership))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = request.into_inner().id;
        if id == 0 {
            return Err(invalid("node id must be non-zero"));
        }
        let status = self.node.status();
        if status.role == Role::Leader
            && !status.voters.contains(&id)
            && !status.learners.contains(&id)
        {
            return Ok(Response::new(self.membership()));
        }
        Ok(Response::new(
            self.change(MembershipChange::Remove { id }).await?,
        ))
    }
}
