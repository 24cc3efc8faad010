//! The participant side: what a service implements to take part in global
//! transactions, and one server that exposes it over gRPC
//! (`tandem.v1.Participant`, endpoints `grpc://host:port`) and HTTP
//! (`POST /tandem/{op}`, endpoints `http://host:port/tandem/{op}`) on the same
//! port. The HTTP contract is written down in `docs/http-participants.md`.
//!
//! Every call may arrive more than once, late, or out of order. Before a call
//! reaches the handler, the server
//! * refuses it if its fencing token is older than one already accepted for
//!   the gid (a deposed coordinator leader's late call);
//! * refuses a prepare, try, action, can-commit or pre-commit that arrives
//!   after the rollback, cancel, compensation or abort of its branch (the
//!   tombstone);
//! * serializes calls of one branch, so a rollback never runs beside the
//!   prepare it undoes.
//!
//! The fencing table lives in memory (bounded); handlers that keep state in
//! a database keep their own durable tombstone too (the XA helpers and the
//! barrier do).

mod pipeline;
mod roles;
mod server;
mod termination;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

pub use roles::{
    Saga, SagaStep, Tcc, TccResource, ThreePhase, ThreePhaseResource, TwoPhase, TwoPhaseResource,
};
pub use server::{ParticipantServer, serve};
pub use termination::{TerminationReport, spawn_termination, terminate};

/// The operations a participant can receive, the headers that carry a
/// call's identity, and the fencing token: the wire vocabulary the
/// coordinator speaks, defined once in `tandem-proto`.
pub use tandem_proto::wire::{Fence, headers, ops};

/// Who is calling and about what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchContext {
    pub gid: String,
    pub branch_id: String,
    pub op: String,
    /// saga, tcc, xa, 2pc, 3pc, msg (empty if the caller did not say).
    pub protocol: String,
    pub fence: Fence,
}

/// A call as it reaches a handler.
#[derive(Clone, Debug)]
pub struct BranchRequest {
    pub ctx: BranchContext,
    pub payload: bytes::Bytes,
}

/// How a participant says no.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BranchError {
    /// A business "no" (insufficient funds, vote no): final, not retried.
    /// HTTP 409, gRPC FAILED_PRECONDITION.
    #[error("{0}")]
    Failure(String),
    /// Try again later (database down, lock timeout). HTTP 503, gRPC
    /// UNAVAILABLE.
    #[error("{0}")]
    Transient(String),
}

/// Serves every operation of a participant. The role adapters
/// ([`TwoPhase`], [`Tcc`]) implement it from role traits; implement it
/// directly to route operations yourself.
///
/// Served by [`ParticipantServer`], a call runs to its end even when the
/// coordinator hangs up in the middle of it (its node died): it is never
/// cancelled at one of its await points with a local transaction open.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: BranchRequest,
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
}

/// Operations that undo a branch: after one of them, the branch's forward
/// operation is refused.
fn is_undo(op: &str) -> bool {
    matches!(
        op,
        ops::ROLLBACK | ops::CANCEL | ops::COMPENSATE | ops::ABORT
    )
}

fn is_forward(op: &str) -> bool {
    matches!(
        op,
        ops::PREPARE | ops::TRY | ops::ACTION | ops::CAN_COMMIT | ops::PRE_COMMIT
    )
}

/// Fencing tokens and tombstones seen per gid, and one lock per branch.
/// Bounded: the oldest gids are forgotten first, except one with a call
/// under way (its branch lock is held).
pub struct Fences {
    inner: Mutex<FenceTable>,
    capacity: usize,
}

#[derive(Default)]
struct FenceTable {
    gids: HashMap<String, GidFences>,
    /// The gids in the order they were first seen (each once).
    order: VecDeque<String>,
}

/// What is known of one gid: one entry, found with one lookup, and
/// forgotten in one removal.
#[derive(Default)]
struct GidFences {
    highest: Fence,
    /// Its branches seen so far; a transaction has few, so a list.
    branches: Vec<BranchFence>,
}

struct BranchFence {
    id: String,
    /// Undone (rolled back, cancelled, compensated, aborted): forward calls
    /// to it are refused.
    undone: bool,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl GidFences {
    fn branch(&mut self, id: &str) -> &mut BranchFence {
        let at = match self.branches.iter().position(|b| b.id == id) {
            Some(at) => at,
            None => {
                self.branches.push(BranchFence {
                    id: id.to_string(),
                    undone: false,
                    lock: Arc::default(),
                });
                self.branches.len() - 1
            }
        };
        &mut self.branches[at]
    }

    fn in_use(&self) -> bool {
        self.branches.iter().any(|b| Arc::strong_count(&b.lock) > 1)
    }
}

impl FenceTable {
    /// The gid's entry, made (and the oldest forgotten if over `capacity`)
    /// if it is new.
    fn gid(&mut self, gid: &str, capacity: usize) -> &mut GidFences {
        if !self.gids.contains_key(gid) {
            self.forget_beyond(capacity - 1);
            self.order.push_back(gid.to_string());
            self.gids.insert(gid.to_string(), GidFences::default());
        }
        self.gids.get_mut(gid).expect("just made")
    }

    /// Forgets the oldest gids until at most `keep` are left, skipping any
    /// with a call under way (a second call of its branch must still wait
    /// for the first); each is looked at once.
    fn forget_beyond(&mut self, keep: usize) {
        let mut looked = 0;
        while self.order.len() > keep && looked < self.order.len() {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.gids.get(&old).is_some_and(GidFences::in_use) {
                self.order.push_back(old);
                looked += 1;
            } else {
                self.gids.remove(&old);
            }
        }
    }
}

impl Default for Fences {
    fn default() -> Self {
        Fences::with_capacity(100_000)
    }
}

impl Fences {
    pub fn with_capacity(capacity: usize) -> Fences {
        Fences {
            inner: Mutex::new(FenceTable::default()),
            capacity: capacity.max(1),
        }
    }

    /// Checks a call against what was accepted before; records it if it
    /// passes. Returns why it is refused otherwise.
    pub fn admit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        let mut t = self.inner.lock().expect("fence lock");
        let known = t.gid(&ctx.gid, self.capacity);
        if ctx.fence < known.highest {
            return Err(BranchError::Failure(format!(
                "stale fencing token ({}, {}) for transaction {}: ({}, {}) was already accepted",
                ctx.fence.term, ctx.fence.index, ctx.gid, known.highest.term, known.highest.index
            )));
        }
        if is_forward(&ctx.op) && known.branch(&ctx.branch_id).undone {
            return Err(BranchError::Failure(format!(
                "branch {} of transaction {} was already undone; late {} refused",
                ctx.branch_id, ctx.gid, ctx.op
            )));
        }
        known.highest = ctx.fence;
        Ok(())
    }

    /// Records that a branch was undone (after its undo succeeded).
    pub fn tombstone(&self, ctx: &BranchContext) {
        let mut t = self.inner.lock().expect("fence lock");
        t.gid(&ctx.gid, self.capacity).branch(&ctx.branch_id).undone = true;
    }

    fn lock(&self, ctx: &BranchContext) -> Arc<tokio::sync::Mutex<()>> {
        let mut t = self.inner.lock().expect("fence lock");
        let known = t.gid(&ctx.gid, self.capacity);
        known.branch(&ctx.branch_id).lock.clone()
    }
}

/// Runs a call through the fencing checks and the branch lock, then the
/// handler.
pub async fn dispatch<H: Handler>(
    fences: &Fences,
    handler: &H,
    request: BranchRequest,
) -> Result<(), BranchError> {
    let lock = fences.lock(&request.ctx);
    let _serialized = lock.lock().await;
    fences.admit(&request.ctx)?;
    let ctx = request.ctx.clone();
    let result = handler.handle(request).await;
    if result.is_ok() && is_undo(&ctx.op) {
        fences.tombstone(&ctx);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(op: &str, term: u64, index: u64) -> BranchContext {
        BranchContext {
            gid: "g".into(),
            branch_id: "b".into(),
            op: op.into(),
            protocol: "2pc".into(),
            fence: Fence { term, index },
        }
    }

    #[test]
    fn idempotency_older_tokens_and_late_forward_calls_are_refused() {
        let fences = Fences::default();
        assert!(fences.admit(&ctx("prepare", 2, 10)).is_ok());
        assert!(
            fences.admit(&ctx("prepare", 2, 10)).is_ok(),
            "a repeat is fine"
        );
        assert!(fences.admit(&ctx("rollback", 3, 20)).is_ok());
        fences.tombstone(&ctx("rollback", 3, 20));
        // The deposed leader's prepare, older token.
        let e = fences.admit(&ctx("prepare", 2, 10)).unwrap_err();
        assert!(e.to_string().contains("stale fencing token"), "{e}");
        // Even with a current token, a prepare after the rollback is refused.
        let e = fences.admit(&ctx("prepare", 3, 20)).unwrap_err();
        assert!(e.to_string().contains("already undone"), "{e}");
        assert!(
            fences.admit(&ctx("rollback", 3, 20)).is_ok(),
            "undo again is fine"
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let fences = Fences::with_capacity(2);
        for gid in ["a", "b", "c"] {
            let mut c = ctx("prepare", 1, 1);
            c.gid = gid.into();
            fences.admit(&c).unwrap();
        }
        let t = fences.inner.lock().unwrap();
        assert_eq!(t.gids.len(), 2);
        assert_eq!(t.order.len(), 2);
        assert!(!t.gids.contains_key("a"));
    }

    #[test]
    fn idempotency_a_gid_with_a_call_under_way_is_not_forgotten() {
        let fences = Fences::with_capacity(2);
        let mut first = ctx("action", 1, 1);
        first.gid = "a".into();
        // A call of "a" is under way: it holds its branch's lock.
        let held = fences.lock(&first);
        for gid in ["b", "c", "d"] {
            let mut c = ctx("action", 1, 1);
            c.gid = gid.into();
            fences.admit(&c).unwrap();
        }
        // "a" was skipped, the others forgotten oldest first; a second
        // call of its branch gets the same lock, so it waits for the first.
        assert!(Arc::ptr_eq(&held, &fences.lock(&first)));
        {
            let t = fences.inner.lock().unwrap();
            assert!(t.gids.contains_key("a") && t.gids.contains_key("d"));
            assert_eq!(t.gids.len(), 2);
        }
        // Once the call ended, "a" is the next forgotten.
        drop(held);
        let mut e = ctx("action", 1, 1);
        e.gid = "e".into();
        fences.admit(&e).unwrap();
        let t = fences.inner.lock().unwrap();
        assert!(!t.gids.contains_key("a"));
        assert_eq!(t.gids.len(), 2);
        assert_eq!(t.order.len(), 2);
    }

    #[test]
    fn idempotency_a_tombstone_lives_and_goes_with_its_gid() {
        let fences = Fences::with_capacity(2);
        fences.admit(&ctx("compensate", 1, 1)).unwrap();
        fences.tombstone(&ctx("compensate", 1, 1));
        assert!(fences.admit(&ctx("action", 1, 1)).is_err());
        // Another branch of the same gid is not undone.
        let mut other = ctx("action", 1, 1);
        other.branch_id = "other".into();
        assert!(fences.admit(&other).is_ok());
        for gid in ["x", "y"] {
            let mut c = ctx("action", 1, 1);
            c.gid = gid.into();
            fences.admit(&c).unwrap();
        }
        // "g" is forgotten whole, its tombstone with it: nothing stays
        // behind for a gid the table no longer holds.
        let t = fences.inner.lock().unwrap();
        assert!(!t.gids.contains_key("g"));
        assert_eq!(t.gids.len(), 2);
    }
}
