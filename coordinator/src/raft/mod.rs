//! Replication: the raft-rs loop, its durable log, and the transport between
//! peers.

pub mod logger;
pub mod node;
pub mod storage;
pub mod transport;

pub use node::{MembershipChange, NodeConfig, NodeError, NodeHandle, NodeStatus, Role};
