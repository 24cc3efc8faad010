//! Linearizable reads: every read of a turn shares one ReadIndex request;
//! once raft confirms leadership at index *i* and the node has applied *i*,
//! the batch gets one view of the state.

use std::sync::Arc;
use std::time::Instant;

use super::handle::Reply;
use super::node::Loop;
use super::replicated::{Observer, Replicated};
use super::storage::LogStorage;
use super::transport::PeerNet;

pub(super) struct ReadBatch<V> {
    pub(super) replies: Vec<(Reply<Arc<V>>, Instant)>,
    /// The term it was asked in: raft drops read-index requests across a
    /// leadership change, so a batch not confirmed by then is failed fast.
    pub(super) term: u64,
    /// Set once raft has confirmed leadership for this batch.
    pub(super) read_index: Option<u64>,
}

impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    pub(super) fn request_read_index(&mut self) {
        if self.reads_waiting.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            let err = self.not_leader();
            for (reply, _) in self.reads_waiting.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_le_bytes().to_vec());
        let replies = std::mem::take(&mut self.reads_waiting);
        self.reads.insert(
            ctx,
            ReadBatch {
                replies,
                term: self.raw.raft.term,
                read_index: None,
            },
        );
    }

    pub(super) fn expire_reads(&mut self, now: Instant) {
        let term = self.raw.raft.term;
        let leader_known = self.raw.raft.leader_id != 0;
        let not_leader = self.not_leader();
        self.reads.retain(|_, batch| {
            // Raft drops read-index requests across leadership changes, and
            // a leader that stepped down (check-quorum) keeps its term: fail
            // unconfirmed reads fast so callers go elsewhere.
            let unconfirmable = batch.read_index.is_none() && (batch.term != term || !leader_known);
            let expired =
                batch.replies.iter().all(|(_, deadline)| *deadline <= now) || unconfirmable;

            if expired {
                for (reply, _) in batch.replies.drain(..) {
                    let _ = reply.send(Err(not_leader.clone()));
                }
            }
            !expired
        });
    }

    pub(super) fn answer_reads(&mut self) {
        let applied = self.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, b)| b.read_index.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        if ready.is_empty() {
            return;
        }
        let view = self.view();
        for ctx in ready {
            if let Some(batch) = self.reads.remove(&ctx) {
                for (reply, _) in batch.replies {
                    let _ = reply.send(Ok(view.clone()));
                }
            }
        }
    }

    /// A view for readers. Built per read batch and never kept: the table is
    /// a persistent map, so a view still alive makes every later write copy
    /// the nodes it touches.
    fn view(&self) -> Arc<S::View> {
        Arc::new(self.machine.view(self.applied))
    }
}
