//! Runnable scenarios against a real coordinator and real databases. Each
//! binary in `src/bin` is a thin command line over a module here, so the
//! test suite runs exactly what the examples run.

pub mod order_events;
pub mod quickstart;
pub mod saga_order;
pub mod services;
pub mod sinks;
pub mod tcc_travel;
pub mod three_phase;
pub mod xa_bank;

/// The local PostgreSQL and MariaDB the examples use by default.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Logs to stderr (stdout is for results), filtered by RUST_LOG.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
