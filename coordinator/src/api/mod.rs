//! The gRPC surface: the client API, cluster administration and (in test
//! builds) fault injection. Handlers validate, then go through the node
//! handle; they never touch the state machine directly.

pub mod cluster;
pub mod convert;
pub mod coordinator;
#[cfg(feature = "failpoints")]
pub mod debug;
pub mod gate;
pub mod saga_stream;
pub mod status;
