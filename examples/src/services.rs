//! Plumbing the examples share: database pools and serving a participant.

use std::time::Duration;

use anyhow::Context;
use tandem_sdk::participant::{BranchError, Handler, ParticipantServer};
use tandem_sdk::{Client, proto as pb};
use tokio::net::TcpListener;

pub async fn postgres(url: &str, max: u32) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {url}"))
}

pub async fn mysql(url: &str, max: u32) -> anyhow::Result<sqlx::MySqlPool> {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .with_context(|| format!("connecting to MariaDB at {url}"))
}

/// Runs PostgreSQL DDL such as `CREATE TABLE IF NOT EXISTS …` under a
/// transaction-scoped advisory lock. PostgreSQL's `IF NOT EXISTS` does not
/// hold against a concurrent creator: two sessions creating the same table
/// at once can fail with a unique violation on `pg_type` (seen when the
/// test suite first ran against a new database). MariaDB and SQLite need
/// no such lock.
pub async fn pg_ddl(pool: &sqlx::PgPool, sql: &str) -> Result<(), sqlx::Error> {
    /// One key for every example's DDL: it runs once per process start.
    const DDL_LOCK: i64 = 0x7461_6e64_656d_6464; // "tandemdd"
    let mut tx = pool.begin().await?;
    sqlx::Executor::execute(
        &mut *tx,
        sqlx::raw_sql(&format!("SELECT pg_advisory_xact_lock({DDL_LOCK})")),
    )
    .await?;
    sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(sql)).await?;
    tx.commit().await
}

/// A SQLite database in a file (created if missing).
pub async fn sqlite(path: &std::path::Path) -> anyhow::Result<sqlx::SqlitePool> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .with_context(|| format!("opening SQLite at {}", path.display()))
}

/// A participant served on a loopback port until dropped.
pub struct Service {
    /// http://127.0.0.1:PORT
    pub base: String,
    _stop: Stop,
}

/// Shuts a server down gracefully when dropped: it stops accepting and
/// closes its connections, idle keep-alive ones at once. (Aborting the
/// server's task would leave its connection tasks running — the
/// coordinator keeps them alive — and with them the handler and its
/// database pool.)
pub struct Stop(Option<tokio::sync::oneshot::Sender<()>>);

impl Stop {
    /// A stop and the future a server waits on for it.
    pub fn new() -> (Stop, impl std::future::Future<Output = ()> + Send + 'static) {
        let (send, receive) = tokio::sync::oneshot::channel::<()>();
        (Stop(Some(send)), async move {
            let _ = receive.await;
        })
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// Where the examples' participants listen: loopback, unless
/// `TANDEM_PARTICIPANT_HOST` names another local address (the nemesis runs
/// nodes in network namespaces, which reach the test through a bridge).
pub fn participant_host() -> String {
    std::env::var("TANDEM_PARTICIPANT_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

/// A listener for a participant, on [`participant_host`].
pub async fn participant_listener() -> anyhow::Result<TcpListener> {
    let host = participant_host();
    TcpListener::bind((host.as_str(), 0))
        .await
        .with_context(|| format!("listening on {host}"))
}

pub async fn serve<H: Handler>(handler: H) -> anyhow::Result<Service> {
    let listener = participant_listener().await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = ParticipantServer::new(handler);
    let (stop, stopped) = Stop::new();
    tokio::spawn(async move {
        if let Err(e) = tandem_sdk::participant::serve(listener, server, stopped).await {
            tracing::error!(error = %e, "participant server stopped");
        }
    });
    Ok(Service { base, _stop: stop })
}

pub fn db(e: sqlx::Error) -> BranchError {
    BranchError::Transient(e.to_string())
}

/// Parses a step's JSON payload.
pub fn payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, BranchError> {
    serde_json::from_slice(bytes).map_err(|e| BranchError::Failure(format!("bad payload: {e}")))
}

/// What became of a transaction whose answer was lost on its way back (a
/// coordinator node died, say).
#[derive(Debug)]
pub enum Settled {
    /// It ended: committed or aborted, as this says.
    Ended(Box<pb::Transaction>),
    /// The coordinator never had it (the request never took effect).
    Absent,
    /// Not ended within the time given.
    Unknown,
}

/// How long a gid the coordinator does not know is asked about before it
/// counts as never begun (a request still on its way would have landed).
const ABSENT_AFTER: Duration = Duration::from_secs(10);

/// Asks until the transaction has ended (its deadline ends it at the
/// latest) or `timeout` passed.
pub async fn settle(client: &Client, gid: &str, timeout: Duration) -> Settled {
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        match client.get(gid).await {
            Ok(tx) => {
                if matches!(
                    pb::TxState::try_from(tx.state),
                    Ok(pb::TxState::Committed | pb::TxState::Aborted)
                ) {
                    return Settled::Ended(Box::new(tx));
                }
            }
            Err(e)
                if e.code() == Some(tonic::Code::NotFound) && started.elapsed() > ABSENT_AFTER =>
            {
                return Settled::Absent;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Settled::Unknown
}

/// `?` placeholders → PostgreSQL's `$1, $2, …`, so one SQL text serves
/// both databases.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}
