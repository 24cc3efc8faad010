//! XA on MariaDB/MySQL: `XA START`, the work, the branch row, `XA END`,
//! `XA PREPARE`; later `XA COMMIT` / `XA ROLLBACK`; `XA RECOVER` lists what
//! is prepared.
//!
//! # Phase two runs on the session that prepared
//!
//! MariaDB (10.5 and later) keeps a prepared XA transaction when its session
//! disconnects, and another session may then commit it by xid. But the
//! disconnect is not atomic: the server first makes the xid visible to
//! other sessions (`XA RECOVER` lists it, `XA COMMIT` accepts it) and only
//! afterwards detaches the InnoDB transaction from the closing session. An
//! `XA COMMIT` from another session that lands in between answers OK, finds
//! nothing to commit in InnoDB and forgets the xid; the InnoDB transaction
//! then stays prepared with no xid (its locks held, its changes invisible)
//! until the server restarts. That is a commit acknowledged and lost — about
//! one in 1,500 when every commit is a takeover (`tests/xa_mariadb.rs`
//! reproduces it against the real server).
//!
//! So this helper never relies on that hand-over while the preparing
//! session may be closing:
//! * the session that prepares a branch stays open ("held"), and commit or
//!   rollback of that branch runs on it — no other session, no race;
//! * another session (another process, a restarted one, or this one after
//!   the held session broke or was released) takes over only once the
//!   preparing session is provably gone: it is absent from
//!   `information_schema.PROCESSLIST` **and** a snapshot of
//!   `information_schema.INNODB_TRX` taken after that shows no InnoDB
//!   transaction attached to it ([`SessionProbe`] — which also proves the
//!   snapshot is not the server's cached one). Until then the call is a
//!   transient error, which the coordinator retries with backoff. The
//!   preparing session's id travels in the xid's branch qualifier, so any
//!   process can check it.
//!
//! # Evidence, not claims
//! A prepare answers OK only once `XA RECOVER` lists the xid; a commit only
//! once the branch row (written inside the XA transaction) is visible in
//! state `committed`. An OK from the server without that evidence is an
//! error, never a silent success.
//!
//! # After a server restart
//! MariaDB numbers sessions from 1 again when it starts, so after a crash a
//! new session can carry the number of the session that prepared a branch
//! before it, and the `PROCESSLIST` half of the condition would wait for
//! that stranger to leave. A restart ends every session, so the xid also
//! records which life of the server prepared it: a random token in the
//! MEMORY table `tandem_xa_incarnation`, whose row the server loses when it
//! stops, read on the preparing session itself (the first prepare of a new
//! life writes a new token). A takeover that finds another token skips the
//! `PROCESSLIST` half and keeps the `INNODB_TRX` one.
//!
//! # The xid
//! gtrid = the gid; formatID = the cluster's format id; bqual = the branch
//! id, then
//! * the server's token (4 bytes), a one byte, the preparing session's id
//!   (8 bytes, big-endian) — branch ids up to 51 bytes;
//! * or, for branch ids of 52 to 55 bytes, on a server where the token
//!   cannot be kept, and in xids written before it was, a zero byte and the
//!   session's id. Such branches wait out a new session with the
//!   preparer's number after a restart.
//!
//! The byte ninth from the end tells the two apart; the SDK before this
//! format requires a zero there, so it leaves the new xids alone (reports
//! them as foreign) rather than misread them. Written as hex literals, so
//! no character needs escaping. MySQL limits gtrid and bqual to 64 bytes
//! each: gids up to 64 bytes, branch ids up to 55.
//!
//! Takeover needs the `PROCESS` privilege (to read INNODB_TRX).
//!
//! It used to read `SHOW ENGINE INNODB STATUS` instead, until MariaDB
//! 10.11.19 crashed (signal 11) inside that statement while printing a
//! session being torn down — exactly the moment a takeover asks about
//! (RELIABILITY.md, "The takeover condition could crash MariaDB").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{Connection, MySqlConnection, MySqlPool, Row};

use super::{
    BranchRow, Dialect, PreparedBranch, commit_by_row, late_prepare, rollback_by_row, transient,
};
use crate::client::ClusterId;
use crate::participant::{BranchContext, BranchError};

/// MySQL's limit on gtrid and on bqual.
const PART_BYTES_MAX: usize = 64;
/// The bqual's tail without the server's token: a zero byte and the
/// session id.
const SESSION_SUFFIX_BYTES: usize = 9;
/// The bqual's tail with the server's token (4 bytes), a one byte, the session.
const LIFE_SUFFIX_BYTES: usize = 13;
/// The byte that separates the branch id (or the token) from the session.
const OLD_FORMAT: u8 = 0;
const LIFE_FORMAT: u8 = 1;
/// Seconds a rollback waits for a concurrent prepare's row lock.
const LOCK_WAIT_SECONDS: u32 = 2;

/// How many prepared sessions to hold open, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct HoldOptions {
    /// Prepared sessions held open at most; a prepare beyond it closes its
    /// session, and phase two takes over once that session is gone. Each held
    /// session is a database connection outside the pool. [default: 64]
    pub max: usize,
    /// A held session older than this is released (closed), so that another
    /// process of the same service can take the branch over. [default: 60s]
    pub max_age: Duration,
}

impl Default for HoldOptions {
    fn default() -> Self {
        HoldOptions {
            max: 64,
            max_age: Duration::from_secs(60),
        }
    }
}

/// XA branches in one MariaDB/MySQL database, for one coordinator cluster.
/// Cheap to clone; clones share the held sessions.
#[derive(Clone)]
pub struct MySqlXa {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    format_id: i32,
    hold: HoldOptions,
    /// Sessions that prepared a branch and stay open for its phase two.
    held: Mutex<HashMap<BranchKey, Held>>,
    /// Proves a preparing session gone before a takeover.
    probe: SessionProbe,
}

type BranchKey = (String, String);

struct Held {
    conn: MySqlConnection,
    xid: Xid,
    since: Instant,
}

/// One branch's xid as this helper writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Xid {
    gid: String,
    branch_id: String,
    /// `CONNECTION_ID()` of the session that prepared it.
    session: u64,
    /// The life of the server that prepared it ([`session_and_life`]);
    /// `None` in the old format.
    server_life: Option<u32>,
    format_id: i32,
}

impl Xid {
    fn bqual(&self) -> Vec<u8> {
        let mut bqual = self.branch_id.as_bytes().to_vec();
        match self.server_life {
            Some(life) => {
                bqual.extend_from_slice(&life.to_be_bytes());
                bqual.push(LIFE_FORMAT);
            }
            None => bqual.push(OLD_FORMAT),
        }
        bqual.extend_from_slice(&self.session.to_be_bytes());
        bqual
    }

    /// As SQL after `XA COMMIT` and friends.
    fn sql(&self) -> String {
        format!(
            "X'{}',X'{}',{}",
            hex(self.gid.as_bytes()),
            hex(&self.bqual()),
            self.format_id
        )
    }

    /// Reads an `XA RECOVER` row's parts back; `None` for xids this helper
    /// did not write.
    fn parse(format_id: i32, gtrid: &[u8], bqual: &[u8]) -> Option<Xid> {
        let (rest, session) = bqual.split_at_checked(bqual.len().checked_sub(8)?)?;
        let (format, rest) = rest.split_last()?;
        let (branch, server_life) = match *format {
            OLD_FORMAT => (rest, None),
            LIFE_FORMAT => {
                let (branch, life) = rest.split_at_checked(rest.len().checked_sub(4)?)?;
                (branch, Some(u32::from_be_bytes(life.try_into().ok()?)))
            }
            _ => return None,
        };
        Some(Xid {
            gid: String::from_utf8(gtrid.to_vec()).ok()?,
            branch_id: String::from_utf8(branch.to_vec()).ok()?,
            session: u64::from_be_bytes(session.try_into().ok()?),
            server_life,
            format_id,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_lengths(ctx: &BranchContext) -> Result<(), BranchError> {
    for (what, part, max) in [
        ("gid", &ctx.gid, PART_BYTES_MAX),
        (
            "branch id",
            &ctx.branch_id,
            PART_BYTES_MAX - SESSION_SUFFIX_BYTES,
        ),
    ] {
        if part.len() > max {
            return Err(BranchError::Failure(format!(
                "transaction {}: the {what} is {} bytes; XA on MySQL/MariaDB allows {max}",
                ctx.gid,
                part.len()
            )));
        }
    }
    Ok(())
}

async fn execute(conn: &mut MySqlConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, sqlx::raw_sql(sql))
        .await
        .map(|_| ())
}

/// A row of `XA RECOVER`: (formatID, gtrid, bqual).
type RecoveredXid = (i64, Vec<u8>, Vec<u8>);

/// Every prepared xid in the database, as `XA RECOVER` lists it.
fn xa_recover(conn: &mut MySqlConnection) -> BoxFuture<'_, Result<Vec<RecoveredXid>, BranchError>> {
    Box::pin(async move {
        // Through Executor directly: RawSql::fetch_all's generic executor
        // bound defeats rustc's Send proof inside spawned tasks.
        let rows = sqlx::Executor::fetch_all(&mut *conn, sqlx::raw_sql("XA RECOVER"))
            .await
            .map_err(transient)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let format: i64 = row.try_get(0).map_err(transient)?;
            let gtrid_len: i64 = row.try_get(1).map_err(transient)?;
            let bqual_len: i64 = row.try_get(2).map_err(transient)?;
            let data: Vec<u8> = match row.try_get::<Vec<u8>, _>(3) {
                Ok(d) => d,
                Err(_) => row.try_get::<String, _>(3).map_err(transient)?.into_bytes(),
            };
            let g = (gtrid_len.max(0) as usize).min(data.len());
            let b = (g + bqual_len.max(0) as usize).min(data.len());
            out.push((format, data[..g].to_vec(), data[g..b].to_vec()));
        }
        Ok(out)
    })
}

fn row_state<'a>(
    conn: &'a mut MySqlConnection,
    ctx: &'a BranchContext,
) -> BoxFuture<'a, Result<Option<BranchRow>, BranchError>> {
    Box::pin(async move {
        let row = sqlx::query(
            "SELECT state, fence_term, fence_index FROM tandem_xa_branches WHERE gid = ? AND branch_id = ?",
        )
        .bind(&ctx.gid)
        .bind(&ctx.branch_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(transient)?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    })
}

/// Proves that a database session is gone and its XA transaction, if it
/// had one, detached from it — the condition for another session to commit
/// or roll back what it prepared (see the module doc).
///
/// Two reads, in this order:
/// 1. `information_schema.PROCESSLIST` no longer lists the session (on the
///    caller's connection);
/// 2. a snapshot of `information_schema.INNODB_TRX`, read on the probe's own
///    session once the first answered, shows no InnoDB transaction attached
///    to it (`trx_mysql_thread_id`; a detached prepared transaction shows 0). Detaching is one-way, so a
///    snapshot taken later than step 1 that shows it detached is proof.
///
/// INNODB_TRX is served from a cache that the server refreshes only when
/// nobody has read it for 100 ms, so a snapshot is proven fresh by the
/// reading session finding its own row carrying the text of the very query
/// that read it (a random marker). A stale one proves nothing and is read
/// again after a pause. The probe paces its reads (one at a time, at least
/// [`PROBE_PACE`] apart) so that it does not keep the cache stale itself, and
/// one fresh snapshot answers every caller that asked before it was read.
///
/// It never reads `SHOW ENGINE INNODB STATUS`, which MariaDB 10.11.19 has
/// crashed in while printing a session being torn down (RELIABILITY.md).
pub struct SessionProbe {
    /// Where the probe opens its own connection.
    options: MySqlConnectOptions,
    state: tokio::sync::Mutex<ProbeState>,
}

/// Reads of INNODB_TRX by one probe are at least this far apart, counted
/// from the end of the last one: the server's cache refreshes only after
/// 100 ms without a read.
pub const PROBE_PACE: Duration = Duration::from_millis(110);
/// How long one read of INNODB_TRX may take, connecting included.
const PROBE_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Stale snapshots tolerated in one call before it answers "not proven".
const PROBE_ATTEMPTS: u32 = 4;
/// The server fills INNODB_TRX, INNODB_LOCKS and INNODB_LOCK_WAITS in one
/// cache of 16 MiB and, once it is full, leaves rows out without a word to
/// the client — a snapshot that might be truncated proves nothing. Below
/// these counts it cannot be: a transaction row takes at most ~1.5 KiB (1
/// KiB of query text), a lock row at most ~8.3 KiB (8 KiB of lock data), a
/// wait row a few dozen bytes — under 12 MiB in all.
const PROBE_TRX_ROWS_MAX: i64 = 2_000;
const PROBE_LOCK_ROWS_MAX: i64 = 1_000;
const PROBE_WAIT_ROWS_MAX: i64 = 10_000;

#[derive(Default)]
struct ProbeState {
    /// The probe's own session: its transaction and its reads never touch
    /// a connection the application's pool hands out. Dropped (closed) on
    /// any error or timeout, reopened on the next read.
    conn: Option<MySqlConnection>,
    /// When the last read ended.
    last_read: Option<Instant>,
    snapshot: Option<Snapshot>,
}

/// A fresh INNODB_TRX snapshot: the sessions with an attached InnoDB
/// transaction, and when the read that produced it was sent.
struct Snapshot {
    sent: Instant,
    attached: Attached,
}

impl SessionProbe {
    /// A probe that reads INNODB_TRX on a session of its own, opened with
    /// `options` (`pool.connect_options()`; the user needs the `PROCESS`
    /// privilege).
    pub fn new(options: MySqlConnectOptions) -> SessionProbe {
        SessionProbe {
            options,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// `Ok(Ok(()))` once database session `session` is provably gone and its
    /// XA transaction (if any) detached; `Ok(Err(why))` while it is not, or
    /// cannot be proven yet. `conn` is used for one PROCESSLIST query.
    pub fn session_gone<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        session: u64,
    ) -> BoxFuture<'a, Result<Result<(), String>, BranchError>> {
        Box::pin(async move {
            let open: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
            )
            .bind(session)
            .fetch_one(&mut *conn)
            .await
            .map_err(transient)?;
            if open > 0 {
                return Ok(Err(format!("database session {session} is still open")));
            }
            self.detached(session).await
        })
    }

    /// The second half of [`SessionProbe::session_gone`] alone: a fresh
    /// INNODB_TRX snapshot, taken after this call began, shows no InnoDB
    /// transaction attached to session `session`. On its own it proves the
    /// takeover condition only where the session cannot be the preparer's
    /// any more — the server restarted since the prepare.
    pub fn detached(&self, session: u64) -> BoxFuture<'_, Result<Result<(), String>, BranchError>> {
        Box::pin(async move {
            let asked = Instant::now();
            let mut state = self.state.lock().await;
            for _ in 0..PROBE_ATTEMPTS {
                if let Some(snapshot) = &state.snapshot
                    && snapshot.sent > asked
                {
                    return Ok(snapshot.verdict(session));
                }
                if let Some(last) = state.last_read {
                    // A little jitter, so that two processes probing one server
                    // do not keep meeting inside each other's 100 ms.
                    let jitter =
                        Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 40));
                    tokio::time::sleep_until((last + PROBE_PACE + jitter).into()).await;
                }
                let sent = Instant::now();
                // Bounded: the probe is shared, and a read hung on a sick
                // server must not hold every other takeover behind it. The
                // session is taken out, so that a read that fails, times out
                // or is cancelled closes it rather than leave it mid-way.
                let probe_conn = state.conn.take();
                let read = tokio::time::timeout(PROBE_READ_TIMEOUT, async {
                    let mut probe_conn = match probe_conn {
                        Some(c) => c,
                        None => MySqlConnection::connect_with(&self.options)
                            .await
                            .map_err(transient)?,
                    };
                    let read = innodb_trx_snapshot(&mut probe_conn).await?;
                    Ok::<_, BranchError>((probe_conn, read))
                })
                .await;
                state.last_read = Some(Instant::now());
                let (probe_conn, read) = read.map_err(|_| {
                    BranchError::Transient(format!(
                        "information_schema.INNODB_TRX did not answer within {PROBE_READ_TIMEOUT:?}"
                    ))
                })??;
                state.conn = Some(probe_conn);
                match read {
                    Ok(Some(attached)) => {
                        let snapshot = Snapshot { sent, attached };
                        let verdict = snapshot.verdict(session);
                        state.snapshot = Some(snapshot);
                        return Ok(verdict);
                    }
                    Ok(None) => continue,
                    Err(why) => return Ok(Err(why)),
                }
            }
            Ok(Err(format!(
                "cannot prove database session {session} is gone: information_schema.INNODB_TRX \
                 answered from its cache {PROBE_ATTEMPTS} times (another client reads it more \
                 often than every 100 ms)"
            )))
        })
    }
}

impl Snapshot {
    fn verdict(&self, session: u64) -> Result<(), String> {
        if self.attached.contains(&session) {
            Err(format!(
                "database session {session} is closing but its XA transaction is still attached to it"
            ))
        } else {
            Ok(())
        }
    }
}

/// Sessions with an InnoDB transaction attached.
type Attached = std::collections::HashSet<u64>;

/// One read of INNODB_TRX: `Ok(Some(sessions with an attached InnoDB
/// transaction))` if the snapshot was taken by this very read, `Ok(None)`
/// if it came from the server's cache, `Err(why)` if it cannot prove
/// anything.
fn innodb_trx_snapshot(
    conn: &mut MySqlConnection,
) -> BoxFuture<'_, Result<Result<Option<Attached>, String>, BranchError>> {
    Box::pin(async move {
        let marker = uuid::Uuid::new_v4().simple().to_string();
        // An InnoDB transaction of this session's own, so that it has a row.
        let mut tx = conn
            .begin_with("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(transient)?;
        let sql = format!(
            "SELECT CAST(trx_mysql_thread_id AS UNSIGNED), \
                    CAST(COALESCE(trx_mysql_thread_id = CONNECTION_ID() \
                         AND trx_query LIKE '%tandem-probe-{marker}%', 0) AS SIGNED), \
                    (SELECT COUNT(*) FROM information_schema.INNODB_LOCKS), \
                    (SELECT COUNT(*) FROM information_schema.INNODB_LOCK_WAITS) \
             FROM information_schema.INNODB_TRX"
        );
        let rows = sqlx::Executor::fetch_all(&mut *tx, sqlx::raw_sql(&sql))
            .await
            .map_err(|e| {
                BranchError::Transient(format!(
                    "cannot read information_schema.INNODB_TRX to prove a database session is \
                     gone (XA takeover needs the PROCESS privilege): {e}"
                ))
            })?;
        tx.rollback().await.map_err(transient)?;
        if let Some(row) = rows.first() {
            let locks: i64 = row.try_get(2).map_err(transient)?;
            let waits: i64 = row.try_get(3).map_err(transient)?;
            let trx = rows.len() as i64;
            if trx > PROBE_TRX_ROWS_MAX
                || locks > PROBE_LOCK_ROWS_MAX
                || waits > PROBE_WAIT_ROWS_MAX
            {
                return Ok(Err(format!(
                    "{trx} InnoDB transactions, {locks} locks and {waits} lock waits: above \
                     {PROBE_TRX_ROWS_MAX}, {PROBE_LOCK_ROWS_MAX} or {PROBE_WAIT_ROWS_MAX} the \
                     server may leave rows out of information_schema.INNODB_TRX without saying so"
                )));
            }
        }
        let mut fresh = false;
        let mut attached = Attached::with_capacity(rows.len());
        for row in &rows {
            let thread: u64 = row.try_get(0).map_err(transient)?;
            let mine: i64 = row.try_get(1).map_err(transient)?;
            fresh |= mine == 1;
            if thread != 0 {
                attached.insert(thread);
            }
        }
        Ok(Ok(fresh.then_some(attached)))
    })
}

impl MySqlXa {
    /// XA branches in the database behind `pool`, for the coordinator
    /// cluster `cluster` ([`crate::Client::cluster_id`]). Applies
    /// `migrations/mysql`.
    pub async fn new(pool: MySqlPool, cluster: ClusterId) -> Result<MySqlXa, sqlx::Error> {
        MySqlXa::with_hold(pool, cluster, HoldOptions::default()).await
    }

    /// [`MySqlXa::new`] with its own limits on held sessions.
    pub async fn with_hold(
        pool: MySqlPool,
        cluster: ClusterId,
        hold: HoldOptions,
    ) -> Result<MySqlXa, sqlx::Error> {
        crate::barrier::tolerant(sqlx::migrate!("../migrations/mysql"))
            .run(&pool)
            .await?;
        // Not a migration: an instance of an earlier SDK refuses to start on
        // a database that has a migration it does not know, and a rolling
        // upgrade has both at once. Idempotent, and MariaDB's `IF NOT
        // EXISTS` holds against concurrent creators. Without it the xids
        // keep the old layout (a server with the MEMORY engine disabled).
        if let Err(e) = sqlx::query(INCARNATION_TABLE).execute(&pool).await {
            tracing::warn!(error = %e, "cannot create tandem_xa_incarnation: after a database \
                restart, a takeover may wait for a new session numbered like the crashed preparer");
        }
        let probe = SessionProbe::new((*pool.connect_options()).clone());
        Ok(MySqlXa {
            inner: Arc::new(Inner {
                pool,
                format_id: cluster.xa_format_id(),
                hold,
                held: Mutex::new(HashMap::new()),
                probe,
            }),
        })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// Prepared sessions this helper holds open right now.
    pub fn held_sessions(&self) -> usize {
        self.held_table().len()
    }

    fn held_table(&self) -> std::sync::MutexGuard<'_, HashMap<BranchKey, Held>> {
        self.inner.held.lock().expect("held sessions lock")
    }

    fn take_held(&self, ctx: &BranchContext) -> Option<Held> {
        self.held_table()
            .remove(&(ctx.gid.clone(), ctx.branch_id.clone()))
    }

    /// Keeps a prepared session for phase two, or closes it when the table
    /// is full (phase two then takes over once it is gone).
    fn hold(&self, held: Held) {
        let mut table = self.held_table();
        if table.len() >= self.inner.hold.max {
            drop(table);
            tracing::debug!(gid = %held.xid.gid, branch = %held.xid.branch_id, "hold table full; closing the prepared session");
            close(held.conn);
            return;
        }
        table.insert((held.xid.gid.clone(), held.xid.branch_id.clone()), held);
    }

    /// Closes held sessions past their age, so another process can take
    /// their branches over.
    fn release_expired(&self) {
        let max_age = self.inner.hold.max_age;
        let expired: Vec<Held> = {
            let mut table = self.held_table();
            let keys: Vec<BranchKey> = table
                .iter()
                .filter(|(_, h)| h.since.elapsed() > max_age)
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| table.remove(k)).collect()
        };
        for held in expired {
            tracing::info!(gid = %held.xid.gid, branch = %held.xid.branch_id, "releasing a prepared session held past its age");
            close(held.conn);
        }
    }

    /// This cluster's prepared xid for a branch, if there is one.
    fn find_prepared<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<Option<Xid>, BranchError>> {
        Box::pin(async move {
            let format_id = self.inner.format_id;
            Ok(xa_recover(conn)
                .await?
                .into_iter()
                .filter(|(format, ..)| *format == i64::from(format_id))
                .filter_map(|(_, gtrid, bqual)| Xid::parse(format_id, &gtrid, &bqual))
                .find(|x| x.gid == ctx.gid && x.branch_id == ctx.branch_id))
        })
    }

    /// Runs `work` inside `XA START … XA END` on a session of its own,
    /// records the branch, prepares it, checks that `XA RECOVER` lists it,
    /// and keeps the session open for phase two. Repeating it for a branch
    /// already prepared or committed succeeds without running `work` again;
    /// after a rollback it is refused.
    pub async fn prepare<F>(&self, ctx: &BranchContext, work: F) -> Result<(), BranchError>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'static,
    {
        check_lengths(ctx)?;
        let this = self.clone();
        let ctx = ctx.clone();
        // Spawned so that a caller who gives up cannot cancel it half-way.
        tokio::spawn(async move { this.prepare_inner(&ctx, work).await })
            .await
            .map_err(transient)?
    }

    /// Boxed with an explicit `Send` bound: rustc cannot prove the future
    /// of an `async fn` that borrows a sqlx connection `Send` for any
    /// lifetime inside `tokio::spawn`.
    fn prepare_inner<'a, F>(
        &'a self,
        ctx: &'a BranchContext,
        work: F,
    ) -> BoxFuture<'a, Result<(), BranchError>>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<(), BranchError>>
            + Send
            + 'a,
    {
        Box::pin(async move {
            self.release_expired();
            let pooled = self.inner.pool.acquire().await.map_err(transient)?;
            // A session that prepared an XA branch can do nothing else until
            // the branch ends: this connection leaves the pool for good.
            let mut conn = pooled.detach();
            if self.find_prepared(&mut conn, ctx).await?.is_some() {
                return Ok(());
            }
            match row_state(&mut conn, ctx).await? {
                Some((state, ..)) if state == "committed" => return Ok(()),
                Some(_) => return Err(late_prepare(ctx)),
                None => {}
            }
            // On this very session, so that both name the server instance
            // that prepares.
            let (session, server_life) = session_and_life(&mut conn).await?;
            let xid = Xid {
                gid: ctx.gid.clone(),
                branch_id: ctx.branch_id.clone(),
                session,
                server_life: server_life
                    .filter(|_| ctx.branch_id.len() <= PART_BYTES_MAX - LIFE_SUFFIX_BYTES),
                format_id: self.inner.format_id,
            };
            let sql = xid.sql();
            execute(&mut conn, &format!("XA START {sql}"))
                .await
                .map_err(transient)?;
            let result = async {
                work(&mut conn).await?;
                sqlx::query(
                    "INSERT INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES (?, ?, 'committed', ?, ?)",
                )
                .bind(&ctx.gid)
                .bind(&ctx.branch_id)
                .bind(ctx.fence.term as i64)
                .bind(ctx.fence.index as i64)
                .execute(&mut conn)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => late_prepare(ctx),
                    _ => transient(e),
                })?;
                execute(&mut conn, &format!("XA END {sql}"))
                    .await
                    .map_err(transient)?;
                execute(&mut conn, &format!("XA PREPARE {sql}"))
                    .await
                    .map_err(transient)?;
                Ok(())
            }
            .await;
            if let Err(e) = result {
                // Undo on this session; if even that fails, closing it rolls
                // back whatever was not prepared.
                let _ = execute(&mut conn, &format!("XA END {sql}")).await;
                let _ = execute(&mut conn, &format!("XA ROLLBACK {sql}")).await;
                close(conn);
                return Err(e);
            }
            // Evidence: the server lists the xid as prepared.
            let listed = xa_recover(&mut conn).await.map(|rows| {
                rows.into_iter()
                    .any(|(f, g, b)| Xid::parse(f as i32, &g, &b).as_ref() == Some(&xid))
            });
            if !matches!(listed, Ok(true)) {
                close(conn);
                return Err(BranchError::Transient(format!(
                    "branch {} of transaction {}: XA PREPARE answered OK but XA RECOVER does not list the xid ({})",
                    ctx.branch_id,
                    ctx.gid,
                    listed
                        .err()
                        .map_or_else(|| "absent".to_string(), |e| e.to_string())
                )));
            }
            self.hold(Held {
                conn,
                xid,
                since: Instant::now(),
            });
            Ok(())
        })
    }

    /// `XA COMMIT` or `XA ROLLBACK` on the session that prepared the
    /// branch; the session back when the server answered OK. `None` means
    /// the session broke (it is closed), and the caller takes over with
    /// another session once this one is provably gone.
    fn end_on_held(
        &self,
        mut held: Held,
        commit: bool,
    ) -> BoxFuture<'static, Option<MySqlConnection>> {
        Box::pin(async move {
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            match execute(&mut held.conn, &format!("XA {verb} {}", held.xid.sql())).await {
                Ok(()) => Some(held.conn),
                Err(e) => {
                    tracing::warn!(gid = %held.xid.gid, branch = %held.xid.branch_id, error = %e,
                        "XA {verb} on the preparing session failed; taking over once that session is gone");
                    close(held.conn);
                    None
                }
            }
        })
    }

    /// Commits a prepared branch from another session, once the session
    /// that prepared it is provably gone: absent and detached, or — if the
    /// server restarted since the prepare, so that a session with its number
    /// is someone else — detached.
    fn take_over<'a>(
        &'a self,
        conn: &'a mut MySqlConnection,
        xid: &'a Xid,
        commit: bool,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            let restarted = match xid.server_life {
                Some(then) => session_and_life(conn)
                    .await?
                    .1
                    .is_some_and(|now| now != then),
                None => false,
            };
            let gone = if restarted {
                self.inner.probe.detached(xid.session).await?
            } else {
                self.inner.probe.session_gone(conn, xid.session).await?
            };
            if let Err(why) = gone {
                return Err(BranchError::Transient(format!(
                    "branch {} of transaction {} is prepared by another session; waiting until it is gone before taking over: {why}",
                    xid.branch_id, xid.gid
                )));
            }
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            execute(conn, &format!("XA {verb} {}", xid.sql()))
                .await
                .map_err(transient)
        })
    }

    fn commit_inner<'a>(
        &'a self,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            check_lengths(ctx)?;
            if let Some(held) = self.take_held(ctx)
                && let Some(mut conn) = self.end_on_held(held, true).await
            {
                let result = verify_committed(&mut conn, ctx).await;
                close(conn);
                return result;
            }
            let mut conn = self.inner.pool.acquire().await.map_err(transient)?;
            if let Some(xid) = self.find_prepared(&mut conn, ctx).await? {
                self.take_over(&mut conn, &xid, true).await?;
                return verify_committed(&mut conn, ctx).await;
            }
            commit_by_row(ctx, row_state(&mut conn, ctx).await?)
        })
    }

    fn rollback_inner<'a>(
        &'a self,
        ctx: &'a BranchContext,
    ) -> BoxFuture<'a, Result<(), BranchError>> {
        Box::pin(async move {
            check_lengths(ctx)?;
            if let Some(held) = self.take_held(ctx)
                && let Some(conn) = self.end_on_held(held, false).await
            {
                close(conn);
            }
            let mut conn = self.inner.pool.acquire().await.map_err(transient)?;
            if let Some(done) = rollback_by_row(ctx, row_state(&mut conn, ctx).await?) {
                return done;
            }
            if let Some(xid) = self.find_prepared(&mut conn, ctx).await? {
                self.take_over(&mut conn, &xid, false).await?;
            }
            // The tombstone. A prepare still running holds this key's lock:
            // wait briefly, then let the coordinator retry.
            execute(
                &mut conn,
                &format!("SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}"),
            )
            .await
            .map_err(transient)?;
            let mut tx = conn.begin().await.map_err(transient)?;
            let inserted = sqlx::query(
                "INSERT IGNORE INTO tandem_xa_branches (gid, branch_id, state, fence_term, fence_index) VALUES (?, ?, 'rolledback', ?, ?)",
            )
            .bind(&ctx.gid)
            .bind(&ctx.branch_id)
            .bind(ctx.fence.term as i64)
            .bind(ctx.fence.index as i64)
            .execute(&mut *tx)
            .await
            .map_err(transient)?;
            tx.commit().await.map_err(transient)?;
            if inserted.rows_affected() == 0 {
                return Err(BranchError::Transient(
                    "branch row changed during rollback; retry".into(),
                ));
            }
            Ok(())
        })
    }
}

/// The evidence of a commit: the branch row, written inside the XA
/// transaction, is visible and says `committed`.
fn verify_committed<'a>(
    conn: &'a mut MySqlConnection,
    ctx: &'a BranchContext,
) -> BoxFuture<'a, Result<(), BranchError>> {
    Box::pin(async move {
        match row_state(conn, ctx).await? {
            Some((state, ..)) if state == "committed" => Ok(()),
            other => Err(BranchError::Transient(format!(
                "branch {} of transaction {}: XA COMMIT answered OK but the branch row is {}; \
                 the commit is not acknowledged (check the database's XA state)",
                ctx.branch_id,
                ctx.gid,
                other.map_or_else(|| "absent".to_string(), |(s, ..)| format!("in state {s}"))
            ))),
        }
    })
}

/// One row naming the current life of the server: a random token, written
/// by the first prepare after the server starts. A MEMORY table, so the row
/// is gone when the server stops or crashes and its next life gets a new
/// token.
const INCARNATION_TABLE: &str = "CREATE TABLE IF NOT EXISTS tandem_xa_incarnation (\
     id TINYINT UNSIGNED NOT NULL PRIMARY KEY, token INT UNSIGNED NOT NULL) ENGINE = MEMORY";

/// `CONNECTION_ID()`, and the token of the server's current life (`None`
/// where the server cannot keep it): the row of `tandem_xa_incarnation`,
/// written here with a new random token if the server has none yet — it
/// loses the row whenever it stops. Both read on `conn`, so they name the
/// same server. Costs one primary-key read beside `CONNECTION_ID()`; an
/// earlier version read `Uptime` from `GLOBAL_STATUS` instead, which sums
/// every session's counters — ~0.2 ms of the server's CPU per prepare,
/// growing with its connections.
fn session_and_life(
    conn: &mut MySqlConnection,
) -> BoxFuture<'_, Result<(u64, Option<u32>), BranchError>> {
    Box::pin(async move {
        const READ: &str =
            "SELECT CONNECTION_ID(), (SELECT token FROM tandem_xa_incarnation WHERE id = 1)";
        let read = || sqlx::query_as::<_, (u64, Option<u32>)>(READ);
        match read().fetch_one(&mut *conn).await {
            Ok((session, Some(life))) => return Ok((session, Some(life))),
            Ok((_, None)) => {
                let token = u32::from_be_bytes(
                    uuid::Uuid::new_v4().as_bytes()[..4]
                        .try_into()
                        .expect("4 bytes"),
                );
                // The first writer of this life wins; everyone reads its token.
                let written = sqlx::query(
                    "INSERT IGNORE INTO tandem_xa_incarnation (id, token) VALUES (1, ?)",
                )
                .bind(token)
                .execute(&mut *conn)
                .await;
                match written {
                    Ok(_) => {
                        let (session, life) =
                            read().fetch_one(&mut *conn).await.map_err(transient)?;
                        return Ok((session, life));
                    }
                    Err(sqlx::Error::Database(e)) => {
                        tracing::debug!(error = %e, "cannot write the server's token");
                    }
                    Err(e) => return Err(transient(e)),
                }
            }
            // No such table (a server without the MEMORY engine, or the
            // table dropped since): the xid in the old format.
            Err(sqlx::Error::Database(e)) => {
                tracing::debug!(error = %e, "cannot read the server's token");
            }
            Err(e) => return Err(transient(e)),
        }
        let session: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut *conn)
            .await
            .map_err(transient)?;
        Ok((session, None))
    })
}

/// Closes a connection in the background (a clean `COM_QUIT`).
fn close(conn: MySqlConnection) {
    tokio::spawn(async move {
        let _ = conn.close().await;
    });
}

impl Dialect for MySqlXa {
    const LISTING: &'static str = "XA RECOVER";

    async fn scan(&self) -> Result<(Vec<PreparedBranch>, Vec<String>), BranchError> {
        self.release_expired();
        let mut conn = self.inner.pool.acquire().await.map_err(transient)?;
        let format_id = self.inner.format_id;
        let mut ours = Vec::new();
        let mut others = Vec::new();
        for (format, gtrid, bqual) in xa_recover(&mut conn).await? {
            match Xid::parse(format as i32, &gtrid, &bqual) {
                Some(xid) if format == i64::from(format_id) => ours.push(PreparedBranch {
                    gid: xid.gid,
                    branch_id: xid.branch_id,
                }),
                _ => others.push(format!("{format}:{}", String::from_utf8_lossy(&gtrid))),
            }
        }
        Ok((ours, others))
    }

    async fn commit_prepared(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.commit_inner(ctx).await
    }

    async fn rollback_prepared(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        self.rollback_inner(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_round_trip_through_their_parts_and_foreign_ones_are_ignored() {
        for server_life in [Some(0x0a0b_0c0d), Some(0), None] {
            let xid = Xid {
                gid: "0199-abc".into(),
                branch_id: "maria".into(),
                session: 0x0102_0304_0506_0708,
                server_life,
                format_id: 7,
            };
            assert_eq!(
                Xid::parse(7, xid.gid.as_bytes(), &xid.bqual()),
                Some(xid.clone())
            );
            assert!(xid.sql().ends_with(",7"));
        }
        // Written by someone else: no zero byte and session suffix.
        assert_eq!(Xid::parse(7, b"g", b"maria"), None);
        assert_eq!(Xid::parse(7, b"g", b"maria\x02\0\0\0\0\0\0\0\x65"), None);
        assert_eq!(Xid::parse(7, b"g", b""), None);
        assert_eq!(Xid::parse(7, b"g", b"\x01\0\0\0\0\0\0\0\x65"), None);
    }

    /// Rolling upgrades: the SDK before the server's token was recorded parses an
    /// xid by its last nine bytes and needs a zero byte first. It must find
    /// none in an xid of the new format, whatever the token and session, so
    /// that it leaves the branch alone rather than misread its session.
    #[test]
    fn the_previous_format_reader_rejects_every_new_xid() {
        let previous_reader_accepts = |bqual: &[u8]| bqual[bqual.len() - 9] == 0;
        for session in [0, 1, 101, u64::from(u32::MAX), u64::MAX] {
            for life in [0, 1, 0x6a00_0000, u32::MAX] {
                let xid = Xid {
                    gid: "g".into(),
                    branch_id: "b".into(),
                    session,
                    server_life: Some(life),
                    format_id: 7,
                };
                assert!(!previous_reader_accepts(&xid.bqual()));
            }
        }
    }

    #[test]
    fn lengths_leave_room_for_the_session_in_bqual() {
        let ctx = |gid: &str, branch: &str| BranchContext {
            gid: gid.into(),
            branch_id: branch.into(),
            op: "prepare".into(),
            protocol: "xa".into(),
            fence: Default::default(),
        };
        assert!(check_lengths(&ctx(&"g".repeat(64), &"b".repeat(55))).is_ok());
        assert!(check_lengths(&ctx(&"g".repeat(65), "b")).is_err());
        assert!(check_lengths(&ctx("g", &"b".repeat(56))).is_err());
        // The longest branch id of each format fills bqual exactly.
        for (branch_bytes, server_life) in [(51, Some(1)), (55, None)] {
            let xid = Xid {
                gid: "g".into(),
                branch_id: "b".repeat(branch_bytes),
                session: 1,
                server_life,
                format_id: 7,
            };
            assert_eq!(xid.bqual().len(), PART_BYTES_MAX);
        }
    }
}
