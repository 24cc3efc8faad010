//! Membership changes: joint consensus for every change, the address of an
//! added node carried in the entry's context (so every replica, and every
//! snapshot, knows how to reach it), a leader that hands over before it is
//! removed.

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType,
};
use serde::{Deserialize, Serialize};

use super::handle::{MembershipChange, NodeError, Reply};
use super::node::{Loop, Pending, codec};
use super::replicated::{Observer, Replicated};
use super::storage::LogStorage;
use super::transport::PeerNet;

/// Carried in a conf-change entry's context, so every replica learns the
/// address of a node the entry adds.
#[derive(Serialize, Deserialize)]
pub(super) struct MembershipContext {
    pub(super) id: u64,
    pub(super) address: Option<String>,
}

impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    pub(super) fn change_membership(&mut self, change: MembershipChange, reply: Reply<ConfState>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.raw.raft.has_pending_conf() || !self.conf_state.voters_outgoing.is_empty() {
            let _ = reply.send(Err(NodeError::MembershipInProgress));
            return;
        }
        let voters = &self.conf_state.voters;
        let learners = &self.conf_state.learners;
        let known = |id: u64| voters.contains(&id) || learners.contains(&id);
        let (id, change_type, address) = match change {
            MembershipChange::AddLearner { id, address } => {
                if known(id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is already a member"
                    ))));
                    return;
                }
                (id, ConfChangeType::AddLearnerNode, Some(address))
            }
            MembershipChange::Promote { id } => {
                if !learners.contains(&id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is not a learner"
                    ))));
                    return;
                }
                (id, ConfChangeType::AddNode, None)
            }
            MembershipChange::Remove { id } => {
                if !known(id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is not a member"
                    ))));
                    return;
                }
                if voters.len() == 1 && voters.contains(&id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is the only voter; a cluster needs one"
                    ))));
                    return;
                }
                if id == self.config.id {
                    // A leader cannot safely drive its own removal; hand over first.
                    match self.best_transferee() {
                        Some(to) => {
                            self.raw.transfer_leader(to);
                            let _ =
                                reply.send(Err(NodeError::TransferringLeadership { from: id, to }));
                        }
                        None => {
                            let _ = reply.send(Err(NodeError::Membership(
                                "no other voter is caught up to take over leadership".into(),
                            )));
                        }
                    }
                    return;
                }
                (id, ConfChangeType::RemoveNode, None)
            }
        };
        let cc = joint_change(id, change_type);
        let context = codec::encode(&MembershipContext { id, address });
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => self.track(Pending::Membership(reply)),
            Err(e) => {
                let _ = reply.send(Err(NodeError::Membership(e.to_string())));
            }
        }
    }

    fn best_transferee(&self) -> Option<u64> {
        best_transferee(&self.raw.raft, &self.conf_state.voters)
    }

    pub(super) fn apply_conf_change(&mut self, entry: &Entry) -> Result<ConfState, NodeError> {
        let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
            let mut v1 = ConfChange::default();
            #[allow(unused_mut)]
            v1.merge_from_bytes(&entry.data)
                .unwrap_or_else(|e| panic!("conf change at {} is corrupt: {e}", entry.index));
            // Tandem proposes only V2; a V1 entry is one simple change.
            let single = single_change(v1.node_id, v1.get_change_type());
            let mut v2 = ConfChangeV2::default();
            v2.set_changes(vec![single].into());
            v2.set_context(v1.take_context());
            v2
        } else {
            let mut v2 = ConfChangeV2::default();
            v2.merge_from_bytes(&entry.data)
                .unwrap_or_else(|e| panic!("conf change at {} is corrupt: {e}", entry.index));
            v2
        };
        let conf_state = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "a committed conf change was refused by raft");
                self.observer.membership_changed(entry.index, None, false);
                return Err(NodeError::Membership(e.to_string()));
            }
        };
        let stepped_down = step_down_if_removed(&mut self.raw.raft);
        if stepped_down {
            tracing::warn!(
                index = entry.index,
                "this leader applied its own removal (proposed under an earlier leader): stepped down"
            );
        }
        if let Ok(ctx) = codec::decode::<MembershipContext>(&entry.context) {
            for change in cc.get_changes() {
                if change.node_id != ctx.id {
                    continue;
                }
                match change.get_change_type() {
                    ConfChangeType::RemoveNode => self.machine.set_member(ctx.id, None),
                    _ => {
                        if let Some(address) = &ctx.address {
                            self.machine.set_member(ctx.id, Some(address.clone()));
                        }
                    }
                }
            }
        }
        tracing::info!(
            index = entry.index,
            voters = ?conf_state.voters,
            learners = ?conf_state.learners,
            outgoing = ?conf_state.voters_outgoing,
            "membership changed"
        );
        self.conf_state = conf_state.clone();
        self.status_stale = true;
        self.refresh_addresses();
        self.observer
            .membership_changed(entry.index, Some(&conf_state), stepped_down);
        Ok(conf_state)
    }

    pub(super) fn refresh_addresses(&self) {
        let mut book = self.config.peers.clone();
        book.extend(self.machine.members().iter().map(|(k, v)| (*k, v.clone())));
        self.transport.set_addresses(book);
    }
}

/// A leader that has just applied a change leaving it out of the voters
/// steps down (same term, no leader known), and reports that it did.
///
/// Tandem never proposes a leader's own removal (it hands over first), but
/// a removal proposed under an earlier leader can commit under the node it
/// removes. raft-rs leaves that leader leading (its `post_conf_change` says
/// the branch is untested) with no progress of its own, and the next write
/// it persists panics on the missing progress. Found by the simulation
/// once it changed membership (RELIABILITY.md). As a follower it proposes
/// nothing more; the remaining voters elect a leader after their timeout.
fn step_down_if_removed<T: raft::Storage>(raft: &mut raft::Raft<T>) -> bool {
    let removed = !raft.prs().conf().voters().contains(raft.id);
    if removed && raft.state == raft::StateRole::Leader {
        let term = raft.term;
        raft.become_follower(term, raft::INVALID_ID);
        return true;
    }
    false
}

/// One change as a joint-consensus entry, left automatically once
/// committed (every change Tandem makes).
fn joint_change(node_id: u64, change_type: ConfChangeType) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single_change(node_id, change_type)].into());
    cc.set_transition(ConfChangeTransition::Implicit);
    cc
}

/// The voter other than this (leading) node with the most of the log:
/// whom it hands over to before its removal.
fn best_transferee<T: raft::Storage>(raft: &raft::Raft<T>, voters: &[u64]) -> Option<u64> {
    voters
        .iter()
        .filter(|&&id| id != raft.id)
        .filter_map(|&id| raft.prs().get(id).map(|p| (p.matched, id)))
        .max()
        .map(|(_, id)| id)
}

pub(super) fn single_change(node_id: u64, change_type: ConfChangeType) -> ConfChangeSingle {
    let mut single = ConfChangeSingle {
        node_id,
        ..Default::default()
    };
    single.set_change_type(change_type);
    single
}
