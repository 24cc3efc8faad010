//! `tandem.v1.Cluster`: a thin adapter over the service layer's
//! [`ClusterAdmin`] — wire types in, domain types and one status out.

use tandem_proto::v1 as pb;
use tandem_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::status::from_service_error;
use crate::service::{ClusterAdmin, MemberStatus, Members};

pub struct ClusterService {
    admin: ClusterAdmin,
}

impl ClusterService {
    pub fn new(admin: ClusterAdmin) -> Self {
        ClusterService { admin }
    }
}

fn member_to_pb(m: MemberStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        id: m.id,
        address: m.address,
        role: m.role,
        term: m.term,
        commit: m.commit,
        applied: m.applied,
        leader_id: m.leader_id,
        last_index: m.last_index,
        snapshot_index: m.snapshot_index,
        cluster_name: m.cluster_name,
        error: m.error,
        cluster_id: m.cluster_id,
    }
}

fn members_to_pb(m: Members) -> pb::MembershipResponse {
    pb::MembershipResponse {
        voters: m.voters,
        learners: m.learners,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let view = self.admin.status().await;
        Ok(Response::new(pb::ClusterStatusResponse {
            leader_id: view.leader_id,
            nodes: view.nodes.into_iter().map(member_to_pb).collect(),
            voters: view.members.voters,
            learners: view.members.learners,
            cluster_id: view.cluster_id,
        }))
    }

    async fn local_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(member_to_pb(self.admin.local_status())))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = request.into_inner();
        let members = self
            .admin
            .add_node(r.id, r.address, r.learner_only)
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(members_to_pb(members)))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let members = self
            .admin
            .remove_node(request.into_inner().id)
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(members_to_pb(members)))
    }
}
