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
//! The money is conserved whatever fails: the sum over both databases is the
//! same before and after, and no prepared xid is left behind.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// The coordinator cluster's name (xids carry it).
    pub cluster_name: String,
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
    /// Transfers whose outcome could not be learnt (coordinator unreachable).
    pub unknown: u64,
}

/// A bank: accounts in one database, served as an XA participant.
pub trait Accounts: XaStore + TwoPhaseResource + Clone + 'static {
    fn setup(&self, run: &str, accounts: u32) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn sum(&self, run: &str) -> impl Future<Output = anyhow::Result<i64>> + Send;
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
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS tandem_bank_accounts (run VARCHAR(40) NOT NULL, id INT NOT NULL, balance BIGINT NOT NULL, PRIMARY KEY (run, id))",
        )
        .execute(self.pool())
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
    server: tokio::task::JoinHandle<()>,
}

impl<A> Drop for Bank<A> {
    fn drop(&mut self) {
        self.server.abort();
    }
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
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "bank server stopped");
        }
    });
    Ok(Bank {
        accounts,
        base_url,
        server,
    })
}

/// One transfer; true if committed, false if aborted.
async fn transfer(
    client: &Client,
    http: &reqwest::Client,
    run: &str,
    banks: [&str; 2],
    accounts: u32,
    fail: bool,
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
    let pg_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.concurrency.clamp(4, 64) as u32 + 4)
        .connect(&config.pg_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", config.pg_url))?;
    let my_pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(config.concurrency.clamp(4, 64) as u32 + 4)
        .connect(&config.mysql_url)
        .await
        .with_context(|| format!("connecting to MariaDB at {}", config.mysql_url))?;
    let pg = PgXa::new(pg_pool, &config.cluster_name)
        .await
        .context("PostgreSQL XA set-up")?;
    let my = MySqlXa::new(my_pool, &config.cluster_name)
        .await
        .context("MariaDB XA set-up")?;
    let client = Client::connect(&config.endpoints)?;

    // A crashed earlier run may have left prepared branches: resolve them.
    tandem_sdk::xa::recover(&pg, &client).await?;
    tandem_sdk::xa::recover(&my, &client).await?;

    let run = uuid::Uuid::now_v7().simple().to_string();
    pg.setup(&run, config.accounts).await?;
    my.setup(&run, config.accounts).await?;
    let sum_before = pg.sum(&run).await? + my.sum(&run).await?;

    let pg_bank = serve_bank(pg.clone(), TcpListener::bind("127.0.0.1:0").await?)?;
    let my_bank = serve_bank(my.clone(), TcpListener::bind("127.0.0.1:0").await?)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let committed = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let banks = [pg_bank.base_url.clone(), my_bank.base_url.clone()];
    futures::stream::iter(0..config.transfers)
        .for_each_concurrent(config.concurrency.max(1), |_| {
            let (client, http, run, banks) = (&client, &http, &run, &banks);
            let (committed, aborted, unknown) = (&committed, &aborted, &unknown);
            let fail = rand::rng().random_bool(config.fail_rate);
            async move {
                match transfer(
                    client,
                    http,
                    run,
                    [&banks[0], &banks[1]],
                    config.accounts,
                    fail,
                )
                .await
                {
                    Ok(true) => committed.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => aborted.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(error = %e, "transfer outcome unknown");
                        unknown.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
        .await;

    let sum_after = pg.sum(&run).await? + my.sum(&run).await?;
    let prepared_left = pg.prepared().await.map_err(anyhow::Error::msg)?.len()
        + my.prepared().await.map_err(anyhow::Error::msg)?.len();
    Ok(Report {
        committed: committed.load(Ordering::Relaxed),
        aborted: aborted.load(Ordering::Relaxed),
        sum_before,
        sum_after,
        prepared_left,
        unknown: unknown.load(Ordering::Relaxed),
    })
}
