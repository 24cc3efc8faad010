//! The operations every surface offers, on domain types, with one typed
//! error: transactions (`transactions.rs`) and cluster administration
//! (`cluster.rs`). The gRPC handlers (`api/`) are thin adapters over this
//! layer; the HTTP/JSON API will be another.

pub mod checks;
pub mod cluster;
pub mod transactions;

pub use cluster::{ClusterAdmin, ClusterView, MemberStatus, Members};
pub use transactions::{
    BeginInput, ListInput, MessageInput, OptionsInput, Page, RegisterInput, RepairInput,
    RetryInput, SagaInput, StepInput, Transactions, wait_timeout,
};

use crate::model::Rejection;
use crate::raft::NodeError;

/// Why an operation was refused. Every variant says which transaction and
/// what was wrong; surfaces map the kind to their own codes.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input: nothing was proposed.
    #[error("{0}")]
    Invalid(String),
    /// A protocol this coordinator does not drive yet.
    #[error("{0}")]
    Unimplemented(String),
    /// Over a configured capacity; retry later.
    #[error("{0}")]
    Exhausted(String),
    #[error("transaction {gid} not found")]
    NotFound { gid: String },
    /// `apply` refused the command (the state did not allow it).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The node could not take it (not the leader, overloaded, …).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A wait the operation needs did not end in time; nothing was undone.
    #[error("{0}")]
    TimedOut(String),
    /// A bug: something the code does not expect.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ServiceError>;

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(message.into())
}
