//! The replicated state machine: the transaction table, its derived indexes
//! and snapshots. `apply` hands each command to the protocol's rules
//! (`protocol/`). Pure: nothing here touches a clock, a socket or a disk.

pub mod machine;
mod stored;

pub use machine::{ListFilter, ListPage, ReadView, StateMachine};
