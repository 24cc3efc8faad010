//! Every error a client can see, as one gRPC status with a message naming the
//! gid and what was wrong. A redirect carries the leader's address in the
//! `tandem-leader` metadata key as well as in the message.

use tonic::{Code, Status};

use crate::model::Rejection;
use crate::raft::NodeError;
use crate::service::ServiceError;

pub fn from_node_error(error: NodeError) -> Status {
    let code = match &error {
        NodeError::NotLeader { .. }
        | NodeError::Unknown
        | NodeError::Timeout(_)
        | NodeError::Stopped(_)
        | NodeError::TransferringLeadership { .. } => Code::Unavailable,
        NodeError::Overloaded(_) => Code::ResourceExhausted,
        NodeError::Membership(_) => Code::FailedPrecondition,
        NodeError::MembershipInProgress => Code::Unavailable,
    };
    let mut status = Status::new(code, error.to_string());
    if let NodeError::NotLeader {
        leader_address: Some(address),
        ..
    } = &error
        && let Ok(value) = address.parse()
    {
        status
            .metadata_mut()
            .insert(tandem_proto::LEADER_METADATA_KEY, value);
    }
    status
}

pub fn from_rejection(rejection: Rejection) -> Status {
    let code = match &rejection {
        Rejection::ProtocolMismatch { .. } => Code::AlreadyExists,
        Rejection::NotFound { .. } => Code::NotFound,
        Rejection::InvalidState { .. } => Code::FailedPrecondition,
        Rejection::Invalid(_) => Code::InvalidArgument,
        Rejection::TooManyActive { .. } => Code::ResourceExhausted,
    };
    Status::new(code, rejection.to_string())
}

/// The service layer's error as one status; its message names the gid.
pub fn from_service_error(error: ServiceError) -> Status {
    match error {
        ServiceError::Invalid(m) => Status::invalid_argument(m),
        ServiceError::Unimplemented(m) => Status::unimplemented(m),
        ServiceError::Exhausted(m) => Status::resource_exhausted(m),
        e @ ServiceError::NotFound { .. } => Status::not_found(e.to_string()),
        ServiceError::Rejected(r) => from_rejection(r),
        ServiceError::Node(e) => from_node_error(e),
        ServiceError::TimedOut(m) => Status::deadline_exceeded(m),
        ServiceError::Internal(m) => Status::internal(m),
    }
}

pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}
