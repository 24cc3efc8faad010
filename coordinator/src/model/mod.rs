//! The coordinator's vocabulary, shared by every side and depending on
//! none: transactions and their parts (`types`), the commands that change
//! them and what applying one gives (`command`), and the input checks both
//! the API and `apply` make (`validate`). `protocol/` and `state/` import
//! this; it imports neither.

pub mod command;
pub mod types;
pub mod validate;

pub use command::{Applied, ApplyContext, ApplyResult, Command, OpOutcome, Rejection};
pub use types::*;
