//! What a node says about itself, republished by the loop as it changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use raft::StateRole;

use super::node::{Loop, STATUS_INTERVAL};
use super::replicated::{Observer, Replicated};
use super::storage::LogStorage;
use super::transport::PeerNet;

/// The role this node plays, as shown by `tandem cluster status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    Leader,
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    /// A non-voting member catching up before promotion.
    Learner,
    /// Not (or no longer) a member of the cluster's configuration.
    Detached,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Learner => "learner",
            Role::Detached => "detached",
        }
    }
}

/// A node's view of itself, republished by the loop as it changes.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub address: String,
    pub cluster_name: String,
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Every member's address (replicated membership, then founding peers).
    pub members: BTreeMap<u64, String>,
    /// On the leader: each peer's matched log index.
    pub matched: BTreeMap<u64, u64>,
}

impl NodeStatus {
    pub fn leader_address(&self) -> Option<&str> {
        (self.leader_id != 0)
            .then(|| self.members.get(&self.leader_id).map(String::as_str))
            .flatten()
    }
}

impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    pub(super) fn publish_status(&mut self, force: bool) {
        let raft = &self.raw.raft;
        let role_now = (raft.state, raft.term, raft.leader_id);
        let changed = role_now != self.last_role || self.status_stale;
        if !force && !changed && self.last_status.elapsed() < STATUS_INTERVAL {
            return;
        }
        self.status_stale = false;
        let role_changed = role_now != self.last_role;
        self.last_role = role_now;
        self.last_status = Instant::now();
        let id = self.config.id;
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if self.conf_state.learners.contains(&id) => Role::Learner,
            StateRole::Follower
                if !self.conf_state.voters.contains(&id)
                    && !self.conf_state.voters_outgoing.contains(&id) =>
            {
                Role::Detached
            }
            StateRole::Follower => Role::Follower,
        };
        let matched = if raft.state == StateRole::Leader {
            raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        let mut members = self.config.peers.clone();
        members.extend(self.machine.members().iter().map(|(k, v)| (*k, v.clone())));
        members.insert(id, self.config.address.clone());
        let status = NodeStatus {
            id,
            address: self.config.address.clone(),
            cluster_name: self.config.cluster_name.clone(),
            role,
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.raw.store().snapshot_index(),
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            members,
            matched,
        };
        if role_changed {
            tracing::info!(
                role = role.name(),
                term = status.term,
                leader = status.leader_id,
                "raft role changed"
            );
        }
        self.status_tx.send_replace(Arc::new(status));
    }
}
