//! The replicated state machine: commands, the transaction table, snapshots.
//! Pure: nothing here touches a clock, a socket or a disk.

pub use crate::codec;
pub mod command;
pub mod machine;
pub mod types;
pub mod validate;

pub use command::{Applied, ApplyResult, Command, Rejection};
pub use machine::{ListFilter, ListPage, ReadView, StateMachine};
pub use types::*;
