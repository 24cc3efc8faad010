//! Tandem: a distributed transaction coordinator whose decisions are
//! replicated through Raft. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod branch;
pub mod clock;
pub mod codec;
pub mod config;
pub mod driver;
pub mod http;
#[cfg(feature = "injected-bug")]
pub mod injected;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod raft;
pub mod replica;
pub mod server;
pub mod service;
#[cfg(feature = "sim")]
pub mod sim;
pub mod state;
pub mod telemetry;
pub mod tls;
