//! Tandem's SDK.
//!
//! * [`Client`] — for applications: begin, register, commit, abort, get;
//!   follows the coordinator's leader and fails over between nodes.
//! * [`participant`] — for services taking part: role traits (2PC/XA, TCC)
//!   served over gRPC and HTTP with fencing.
//! * [`barrier`] — the sub-transaction barrier on PostgreSQL, MariaDB/MySQL
//!   and SQLite (feature `db`).
//! * [`outbox`] — transactional messages: the business change and a marker
//!   row in one local transaction, and the check-back that answers from it
//!   (feature `db`).
//! * [`xa`] — XA branches on PostgreSQL and MariaDB/MySQL with in-doubt
//!   recovery (feature `db`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_sdk::Error> {
//! use tandem_sdk::{Client, proto::Protocol};
//! let client = Client::connect(["127.0.0.1:7070"])?;
//! let tx = client.begin(&tandem_sdk::new_gid(), Protocol::Saga).await?;
//! println!("began {}", tx.gid);
//! # Ok(()) }
//! ```

#[cfg(feature = "db")]
pub mod barrier;
pub mod client;
#[cfg(feature = "db")]
pub mod outbox;
pub mod participant;
#[cfg(feature = "db")]
pub mod xa;

pub use client::{
    Client, ClientBuilder, ClusterId, Error, GlobalTx, MessageBuilder, SagaBuilder, Step, new_gid,
};
/// The `tandem.v1` wire types.
pub use tandem_proto::v1 as proto;
/// The words on the wire besides the messages: headers, op and protocol
/// names, the fencing token.
pub use tandem_proto::wire;
