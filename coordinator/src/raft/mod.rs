//! Replication: the raft-rs loop over any [`Replicated`] state machine, its
//! durable log, and the transport between peers. Nothing here knows what is
//! replicated (the coordinator's side is `replica/`).
//!
//! * `node.rs` — the loop: the Ready contract, proposals, applying entries
//! * `handle.rs` — [`NodeHandle`], what callers hold; errors
//! * `reads.rs` — linearizable reads (ReadIndex)
//! * `membership.rs` — joint-consensus membership changes
//! * `snapshots.rs` — taking, adopting and installing snapshots
//! * `status.rs` — what a node says about itself
//! * `storage.rs` — raft-engine log and snapshot files
//! * `sync_mark.rs` — what the log held after its last fsync, checked on open
//! * `transport.rs` — peer messages: a task per peer, its connection
//! * `wire.rs` — the peer wire: frames on a stream of their own
//! * `lane.rs` — the loop writing to a peer's socket itself
//! * `inbound.rs` — the loop reading its peers' links itself, and its wait

mod entry_cache;
mod handle;
mod inbound;
pub mod lane;
mod log_files;
pub mod logger;
mod membership;
pub mod node;
mod reads;
pub mod replicated;
mod snapshots;
mod status;
pub mod storage;
mod sync_mark;
pub mod transport;
pub mod wire;

#[cfg(feature = "sim")]
pub(crate) use handle::Input;
pub use handle::{MembershipChange, NodeError, NodeHandle};
#[cfg(feature = "sim")]
pub(crate) use node::Loop;
pub use node::{NodeConfig, StartError, start};
pub use replicated::{Observer, Replicated};
pub use status::{NodeStatus, Role};
