//! XA across two databases: accounts in PostgreSQL and accounts in MariaDB,
//! each behind its own participant service, and an application moving money
//! between them in XA transactions.
//!
//! Each transfer: begin (XA) → enlist both banks → call PostgreSQL's
//! `/transfer`, then MariaDB's (each does its update inside an XA branch and
//! prepares it) → commit if both prepared, abort otherwise. The coordinator
//! then commits or rolls back both branches. Calling the banks in a fixed
//! order keeps concurrent transfers from deadlocking across the databases.
//!
//! The money is conserved whatever fails, and the run checks it per item,
//! not only on the sum: every account pair (account N in PostgreSQL and
//! account N in MariaDB — a transfer moves money within one pair) still
//! holds twice the initial balance; every committed transfer has its branch
//! row in both databases and every aborted one in neither; no prepared xid
//! is left behind.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::services;
use anyhow::{Context, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tandem_sdk::participant::{
    BranchContext, BranchError, Fence, ParticipantServer, TwoPhase, TwoPhaseResource, headers,
};
use tandem_sdk::xa::{MySqlXa, PgXa, XaStore};
use tandem_sdk::{Client, proto as pb};
use tokio::net::TcpListener;

/// Money every account starts with.
pub const INITIAL_BALANCE: i64 = 1_000;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub transfers: usize,
    pub concurrency: usize,
    /// Share of transfers whose second branch refuses to prepare on purpose.
    pub fail_rate: f64,
    pub pg_url: String,
    pub mysql_url: String,
    pub accounts: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub committed: u64,
    pub aborted: u64,
    pub sum_before: i64,
    pub sum_after: i64,
    /// Prepared xids of this cluster still in either database at the end.
    pub prepared_left: usize,
    /// Transfers whose outcome could not be learnt: not begun (Begin
    /// failed: no transaction, no effect) or not terminal 90 s after the run.
    pub unknown: u64,
    /// Account pairs whose money is not what it started as: "account N: …".
    pub accounts_broken: Vec<String>,
    /// Transfers whose databases disagree with the coordinator's outcome:
    /// "GID: …".
    pub transfers_broken: Vec<String>,
}

impl Report {
    /// Every invariant the run checks holds.
    pub fn holds(&self) -> bool {
        self.sum_before == self.sum_after
            && self.prepared_left == 0
            && self.accounts_broken.is_empty()
            && self.transfers_broken.is_empty()
    }
}

/// A bank: accounts in one database, served as an XA participant.
pub trait Accounts: XaStore + TwoPhaseResource + Clone + 'static {
    fn setup(&self, run: &str, accounts: u32) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn sum(&self, run: &str) -> impl Future<Output = anyhow::Result<i64>> + Send;
    /// Every account's balance, by account id.
    fn balances(&self, run: &str) -> impl Future<Output = anyhow::Result<Vec<(u32, i64)>>> + Send;
    /// The state of the branch rows (`tandem_xa_branches`) of these gids.
    fn branch_states(
        &self,
        gids: &[String],
    ) -> impl Future<Output = anyhow::Result<HashMap<String, String>>> + Send;
    /// Adds `amount` (negative: takes it) inside this branch's XA
    /// transaction and prepares it; refuses to overdraw.
    fn transfer(
        &self,
        ctx: &BranchContext,
        run: &str,
        account: u32,
        amount: i64,
    ) -> impl Future<Output = Result<(), BranchError>> + Send;
}

fn db_error(e: sqlx::Error) -> BranchError {
    BranchError::Transient(e.to_string())
}

impl Accounts for PgXa {
    async fn setup(&self, run: &str, accounts: u32) -> anyhow::Result<()> {
        services::pg_ddl(
            self.pool(),
            "CREATE TABLE IF NOT EXISTS tandem_bank_accounts (run VARCHAR(40) NOT NULL, id INT NOT NULL, balance BIGINT NOT NULL, PRIMARY KEY (run, id))",
        )
        .await?;
        for id in 0..accounts as i32 {
            sqlx::query("INSERT INTO tandem_bank_accounts (run, id, balance) VALUES ($1, $2, $3)")
                .bind(run)
                .bind(id)
                .bind(INITIAL_BALANCE)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    async fn sum(&self, run: &str) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(balance), 0)::BIGINT FROM tandem_bank_accounts WHERE run = $1",
        )
        .bind(run)
        .fetch_one(self.pool())
        .await?;
        Ok(row.get(0))
    }

    async fn balances(&self, run: &str) -> anyhow::Result<Vec<(u32, i64)>> {
        let rows = sqlx::query("SELECT id, balance FROM tandem_bank_accounts WHERE run = $1")
            .bind(run)
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i32, _>(0) as u32, r.get::<i64, _>(1)))
            .collect())
    }

    async fn branch_states(&self, gids: &[String]) -> anyhow::Result<HashMap<String, String>> {
        let rows = sqlx::query("SELECT gid, state FROM tandem_xa_branches WHERE gid = ANY($1)")
            .bind(gids)
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn transfer(
        &self,
        ctx: &BranchContext,
        run: &str,
        account: u32,
        amount: i64,
    ) -> Result<(), BranchError> {
        let run = run.to_string();
        self.prepare(ctx, move |conn| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("SET LOCAL lock_timeout = '2s'"))
                    .await
                    .map_err(db_error)?;
                let updated = sqlx::query(
                    "UPDATE tandem_bank_accounts SET balance = balance + $1 WHERE run = $2 AND id = $3 AND balance + $1 >= 0",
                )
                .bind(amount)
                .bind(&run)
                .bind(account as i32)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
                if updated.rows_affected() == 0 {
                    return Err(BranchError::Failure(format!("account {account}: insufficient funds")));
                }
                Ok(())
            })
        })
        .await
    }
}

impl Accounts for MySqlXa {
    async fn setup(&self, run: &str, accounts: u32) -> anyhow::Result<()> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tandem_bank_accounts (run VARCHAR(40) NOT NULL, id INT NOT NULL, balance BIGINT NOT NULL, PRIMARY KEY (run, id)) ENGINE = InnoDB",
        )
        .execute(self.pool())
        .await?;
        for id in 0..accounts as i32 {
            sqlx::query("INSERT INTO tandem_bank_accounts (run, id, balance) VALUES (?, ?, ?)")
                .bind(run)
                .bind(id)
                .bind(INITIAL_BALANCE)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    async fn sum(&self, run: &str) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT CAST(COALESCE(SUM(balance), 0) AS SIGNED) FROM tandem_bank_accounts WHERE run = ?")
            .bind(run)
            .fetch_one(self.pool())
            .await?;
        Ok(row.get(0))
    }

    async fn balances(&self, run: &str) -> anyhow::Result<Vec<(u32, i64)>> {
        let rows = sqlx::query("SELECT id, balance FROM tandem_bank_accounts WHERE run = ?")
            .bind(run)
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i32, _>(0) as u32, r.get::<i64, _>(1)))
            .collect())
    }

    async fn branch_states(&self, gids: &[String]) -> anyhow::Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        // In chunks: one IN list per query, bounded.
        for chunk in gids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!("SELECT gid, state FROM tandem_xa_branches WHERE gid IN ({marks})");
            let mut query = sqlx::query(&sql);
            for gid in chunk {
                query = query.bind(gid);
            }
            for row in query.fetch_all(self.pool()).await? {
                out.insert(row.get(0), row.get(1));
            }
        }
        Ok(out)
    }

    async fn transfer(
        &self,
        ctx: &BranchContext,
        run: &str,
        account: u32,
        amount: i64,
    ) -> Result<(), BranchError> {
        let run = run.to_string();
        self.prepare(ctx, move |conn| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql("SET SESSION innodb_lock_wait_timeout = 2"))
                    .await
                    .map_err(db_error)?;
                let updated = sqlx::query(
                    "UPDATE tandem_bank_accounts SET balance = balance + ? WHERE run = ? AND id = ? AND balance + ? >= 0",
                )
                .bind(amount)
                .bind(&run)
                .bind(account as i32)
                .bind(amount)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
                if updated.rows_affected() == 0 {
                    return Err(BranchError::Failure(format!("account {account}: insufficient funds")));
                }
                Ok(())
            })
        })
        .await
    }
}

/// What the application posts to a bank's `/transfer`.
#[derive(Serialize, Deserialize)]
struct TransferRequest {
    run: String,
    account: u32,
    amount: i64,
    /// Refuse on purpose (the example's failure injection).
    fail: bool,
}

/// A running bank service.
pub struct Bank<A> {
    pub accounts: A,
    /// http://127.0.0.1:PORT
    pub base_url: String,
    _stop: services::Stop,
}

fn header_ctx(h: &HeaderMap) -> Result<BranchContext, (StatusCode, String)> {
    let get = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or((StatusCode::BAD_REQUEST, format!("missing header {name}")))
    };
    Ok(BranchContext {
        gid: get(headers::GID)?,
        branch_id: get(headers::BRANCH_ID)?,
        op: "prepare".into(),
        protocol: "xa".into(),
        fence: Fence::default(),
    })
}

async fn transfer_route<A: Accounts>(
    State(accounts): State<A>,
    h: HeaderMap,
    axum::Json(request): axum::Json<TransferRequest>,
) -> (StatusCode, String) {
    let ctx = match header_ctx(&h) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if request.fail {
        return (StatusCode::CONFLICT, "refused on purpose".into());
    }
    match accounts
        .transfer(&ctx, &request.run, request.account, request.amount)
        .await
    {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(BranchError::Failure(m)) => (StatusCode::CONFLICT, m),
        Err(BranchError::Transient(m)) => (StatusCode::SERVICE_UNAVAILABLE, m),
    }
}

/// Serves a bank on `listener`: `/transfer` for the application, and the
/// participant routes (`/tandem/commit`, `/tandem/rollback`) for the
/// coordinator.
pub fn serve_bank<A: Accounts>(accounts: A, listener: TcpListener) -> anyhow::Result<Bank<A>> {
    let base_url = format!("http://{}", listener.local_addr()?);
    let participant = ParticipantServer::new(TwoPhase(accounts.clone()));
    let router = axum::Router::new()
        .route("/transfer", axum::routing::post(transfer_route::<A>))
        .with_state(accounts.clone())
        .merge(participant.router());
    let (stop, stopped) = services::Stop::new();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "bank server stopped");
        }
    });
    Ok(Bank {
        accounts,
        base_url,
        _stop: stop,
    })
}

/// One transfer: its gid, and whether it committed (`Ok(true)`), aborted
/// (`Ok(false)`) or ended unknown (`Err`).
async fn transfer(
    client: &Client,
    http: &reqwest::Client,
    run: &str,
    banks: [&str; 2],
    accounts: u32,
    fail: bool,
) -> (Option<String>, anyhow::Result<bool>) {
    let mut gid = None;
    let result = transfer_inner(client, http, run, banks, accounts, fail, &mut gid).await;
    (gid, result)
}

async fn transfer_inner(
    client: &Client,
    http: &reqwest::Client,
    run: &str,
    banks: [&str; 2],
    accounts: u32,
    fail: bool,
    gid: &mut Option<String>,
) -> anyhow::Result<bool> {
    let (account, amount, pg_gives) = {
        let mut rng = rand::rng();
        (
            rng.random_range(0..accounts),
            rng.random_range(1..=100i64),
            rng.random_bool(0.5),
        )
    };
    let options = pb::TxOptions {
        timeout_ms: 30_000,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let scope = client.begin_scope(pb::Protocol::Xa, options).await?;
    *gid = Some(scope.gid().to_string());
    let begun = started.elapsed();
    scope.enlist("pg", banks[0], Vec::new()).await?;
    scope.enlist("maria", banks[1], Vec::new()).await?;
    let enlisted = started.elapsed();
    let legs = [
        (
            "pg",
            banks[0],
            if pg_gives { -amount } else { amount },
            false,
        ),
        (
            "maria",
            banks[1],
            if pg_gives { amount } else { -amount },
            fail,
        ),
    ];
    let mut refusal = None;
    for (branch, base, amount, fail) in legs {
        let mut request = http
            .post(format!("{base}/transfer"))
            .json(&TransferRequest {
                run: run.to_string(),
                account,
                amount,
                fail,
            });
        for (name, value) in scope.headers(branch) {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                let status = r.status();
                refusal = Some(format!(
                    "{branch}: {status} {}",
                    r.text().await.unwrap_or_default()
                ));
                break;
            }
            Err(e) => {
                refusal = Some(format!("{branch}: {e}"));
                break;
            }
        }
    }
    let called = started.elapsed();
    let tx = match refusal {
        None => scope.commit().await?,
        Some(reason) => scope.abort(&format!("transfer refused: {reason}")).await?,
    };
    tracing::debug!(
        gid = %tx.gid,
        ?begun,
        ?enlisted,
        ?called,
        ended = ?started.elapsed(),
        "transfer finished"
    );
    match pb::TxState::try_from(tx.state) {
        Ok(pb::TxState::Committed) => Ok(true),
        Ok(pb::TxState::Aborted) => Ok(false),
        _ => bail!(
            "transaction {} did not finish in time (state {})",
            tx.gid,
            tx.state
        ),
    }
}

/// Runs the whole scenario: two banks, `transfers` transfers.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    if config.transfers > 0 && config.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&config.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let pool_max = config.concurrency.clamp(4, 64) as u32 + 4;
    let pg_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(pool_max)
        .connect(&config.pg_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", config.pg_url))?;
    let my_pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(pool_max)
        .connect(&config.mysql_url)
        .await
        .with_context(|| format!("connecting to MariaDB at {}", config.mysql_url))?;
    let report = run_on(config, pg_pool.clone(), my_pool.clone()).await;
    // Close the pools now: the banks' HTTP connections (the coordinator
    // keeps them alive) would otherwise keep them open well past the run,
    // and runs one after another would fill the database's
    // max_connections (found by the long nemesis: "pool timed out").
    let close = async { tokio::join!(pg_pool.close(), my_pool.close()) };
    if tokio::time::timeout(Duration::from_secs(10), close)
        .await
        .is_err()
    {
        tracing::warn!("the database pools did not close within 10 s");
    }
    report
}

async fn run_on(
    config: Config,
    pg_pool: sqlx::PgPool,
    my_pool: sqlx::MySqlPool,
) -> anyhow::Result<Report> {
    let client = Client::connect(&config.endpoints)?;
    let cluster = client
        .cluster_id()
        .await
        .context("learning the coordinator cluster's id")?;
    let pg = PgXa::new(pg_pool, cluster)
        .await
        .context("PostgreSQL XA set-up")?;
    let my = MySqlXa::new(my_pool, cluster)
        .await
        .context("MariaDB XA set-up")?;

    // A crashed earlier run may have left prepared branches: resolve them.
    tandem_sdk::xa::recover(&pg, &client)
        .await
        .context("recovering PostgreSQL's prepared branches")?;
    tandem_sdk::xa::recover(&my, &client)
        .await
        .context("recovering MariaDB's prepared branches")?;

    let run = uuid::Uuid::now_v7().simple().to_string();
    pg.setup(&run, config.accounts)
        .await
        .context("PostgreSQL accounts")?;
    my.setup(&run, config.accounts)
        .await
        .context("MariaDB accounts")?;
    let sum_before = pg.sum(&run).await.context("PostgreSQL sum before")?
        + my.sum(&run).await.context("MariaDB sum before")?;

    let pg_bank = serve_bank(pg.clone(), services::participant_listener().await?)?;
    let my_bank = serve_bank(my.clone(), services::participant_listener().await?)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let outcomes: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());
    let in_doubt: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let unknown = AtomicU64::new(0);
    let banks = [pg_bank.base_url.clone(), my_bank.base_url.clone()];
    futures::stream::iter(0..config.transfers)
        .for_each_concurrent(config.concurrency.max(1), |_| {
            let (client, http, run, banks) = (&client, &http, &run, &banks);
            let (outcomes, in_doubt, unknown) = (&outcomes, &in_doubt, &unknown);
            let fail = rand::rng().random_bool(config.fail_rate);
            async move {
                let banks = [banks[0].as_str(), banks[1].as_str()];
                match transfer(client, http, run, banks, config.accounts, fail).await {
                    (Some(gid), Ok(committed)) => {
                        outcomes.lock().expect("outcomes").push((gid, committed))
                    }
                    (Some(gid), Err(e)) => {
                        // Begun, but the answer was lost (a coordinator node
                        // died, say): the outcome is learnt below.
                        tracing::info!(%gid, error = %e, "transfer outcome not known yet");
                        in_doubt.lock().expect("in doubt").push(gid);
                    }
                    (None, _) => {
                        tracing::warn!("transfer not begun (no transaction, no effect)");
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;

    let mut outcomes = outcomes.into_inner().expect("outcomes");
    // Every begun transfer ends (its deadline aborts it at the latest): wait
    // for the outcome of those whose answer was lost, and check them too.
    for gid in in_doubt.into_inner().expect("in doubt") {
        match wait_terminal(&client, &gid, Duration::from_secs(90)).await {
            Some(committed) => outcomes.push((gid, committed)),
            None => {
                tracing::warn!(%gid, "transfer outcome unknown");
                unknown.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let sum_after = pg.sum(&run).await.context("PostgreSQL sum after")?
        + my.sum(&run).await.context("MariaDB sum after")?;
    let prepared_left = pg
        .prepared()
        .await
        .map_err(anyhow::Error::msg)
        .context("PostgreSQL's prepared branches after the run")?
        .len()
        + my.prepared()
            .await
            .map_err(anyhow::Error::msg)
            .context("MariaDB's prepared branches after the run")?
            .len();
    let accounts_broken = check_accounts(&pg, &my, &run, config.accounts)
        .await
        .context("checking accounts")?;
    let transfers_broken = check_transfers(&pg, &my, &outcomes)
        .await
        .context("checking transfers")?;
    Ok(Report {
        committed: outcomes.iter().filter(|(_, c)| *c).count() as u64,
        aborted: outcomes.iter().filter(|(_, c)| !*c).count() as u64,
        sum_before,
        sum_after,
        prepared_left,
        unknown: unknown.load(Ordering::Relaxed),
        accounts_broken,
        transfers_broken,
    })
}

/// Whether `gid` committed, once it is terminal; `None` if it is not within
/// `timeout`.
async fn wait_terminal(client: &Client, gid: &str, timeout: Duration) -> Option<bool> {
    match services::settle(client, gid, timeout).await {
        services::Settled::Ended(tx) => Some(tx.state == pb::TxState::Committed as i32),
        services::Settled::Absent | services::Settled::Unknown => None,
    }
}

/// Account N in PostgreSQL and account N in MariaDB together hold twice the
/// initial balance, whatever was committed or aborted.
async fn check_accounts(
    pg: &PgXa,
    my: &MySqlXa,
    run: &str,
    accounts: u32,
) -> anyhow::Result<Vec<String>> {
    let pg_balances: HashMap<u32, i64> = pg.balances(run).await?.into_iter().collect();
    let my_balances: HashMap<u32, i64> = my.balances(run).await?.into_iter().collect();
    let mut broken = Vec::new();
    for id in 0..accounts {
        let (p, m) = (pg_balances.get(&id), my_balances.get(&id));
        match (p, m) {
            (Some(p), Some(m)) if p + m == 2 * INITIAL_BALANCE => {}
            _ => broken.push(format!(
                "account {id}: PostgreSQL {p:?} + MariaDB {m:?} != {}",
                2 * INITIAL_BALANCE
            )),
        }
    }
    Ok(broken)
}

/// Each transfer's branch rows agree with the coordinator's outcome: a
/// committed transfer committed in both databases, an aborted one in
/// neither.
async fn check_transfers(
    pg: &PgXa,
    my: &MySqlXa,
    outcomes: &[(String, bool)],
) -> anyhow::Result<Vec<String>> {
    let gids: Vec<String> = outcomes.iter().map(|(g, _)| g.clone()).collect();
    let pg_rows = pg.branch_states(&gids).await?;
    let my_rows = my.branch_states(&gids).await?;
    let committed_in =
        |rows: &HashMap<String, String>, gid: &str| rows.get(gid).is_some_and(|s| s == "committed");
    let mut broken = Vec::new();
    for (gid, committed) in outcomes {
        let (p, m) = (committed_in(&pg_rows, gid), committed_in(&my_rows, gid));
        if (p, m) != (*committed, *committed) {
            broken.push(format!(
                "{gid}: coordinator says {}, PostgreSQL branch {}, MariaDB branch {}",
                if *committed { "committed" } else { "aborted" },
                if p { "committed" } else { "not committed" },
                if m { "committed" } else { "not committed" },
            ));
        }
    }
    Ok(broken)
}
