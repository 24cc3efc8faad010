//! XA on the real PostgreSQL and MariaDB: money moved across both is
//! conserved, nothing stays prepared, a participant that dies after XA
//! PREPARE recovers with the coordinator's decision, timeouts roll back,
//! and a deposed leader's late prepare cannot leave a prepared xid behind.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use common::{Cluster, unfinished, wait_for};
use sqlx::Row;
use tandem_examples::xa_bank::{self, Accounts, INITIAL_BALANCE};
use tandem_examples::{DEFAULT_MYSQL_URL, DEFAULT_PG_URL};
use tandem_proto::v1 as pb;
use tandem_sdk::Client;
use tandem_sdk::participant::{
    BranchContext, BranchError, Fence, ParticipantServer, TwoPhase, TwoPhaseResource,
};
use tandem_sdk::xa::{MySqlXa, PgXa, XaStore, recover};
use tokio::net::TcpListener;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn state(tx: &pb::Transaction) -> pb::TxState {
    pb::TxState::try_from(tx.state).unwrap_or(pb::TxState::Unspecified)
}

async fn pg(client: &Client) -> PgXa {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(DEFAULT_PG_URL)
        .await
        .expect("PostgreSQL (run scripts/prepare-services.sh)");
    let cluster = client.cluster_id().await.expect("cluster id");
    PgXa::new(pool, cluster)
        .await
        .expect("PostgreSQL XA set-up")
}

async fn maria(client: &Client) -> MySqlXa {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .connect(DEFAULT_MYSQL_URL)
        .await
        .expect("MariaDB (run scripts/prepare-services.sh)");
    let cluster = client.cluster_id().await.expect("cluster id");
    MySqlXa::new(pool, cluster)
        .await
        .expect("MariaDB XA set-up")
}

fn branch_ctx(gid: &str, branch: &str) -> BranchContext {
    BranchContext {
        gid: gid.into(),
        branch_id: branch.into(),
        op: "prepare".into(),
        protocol: "xa".into(),
        fence: Fence::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_200_concurrent_transfers_across_postgres_and_mariadb() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let report = xa_bank::run(xa_bank::Config {
        endpoints: cluster.endpoints(),
        transfers: 200,
        concurrency: 32,
        fail_rate: 0.2,
        pg_url: DEFAULT_PG_URL.into(),
        mysql_url: DEFAULT_MYSQL_URL.into(),
        accounts: 50,
    })
    .await
    .expect("xa-bank");
    assert_eq!(report.unknown, 0, "{report:?}");
    assert_eq!(report.committed + report.aborted, 200, "{report:?}");
    assert!(
        report.aborted >= 10 && report.committed >= 100,
        "{report:?}"
    );
    assert_eq!(
        report.sum_before, report.sum_after,
        "money was created or lost: {report:?}"
    );
    assert_eq!(
        report.prepared_left, 0,
        "prepared xids left behind: {report:?}"
    );
    assert!(report.holds(), "{report:?}");
    assert!(
        unfinished(&cluster.client()).await.is_empty(),
        "every transaction is terminal"
    );
}

/// Starts a participant serving commit/rollback for `accounts` on `listener`.
fn serve<A: Accounts>(accounts: A, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let router = ParticipantServer::new(TwoPhase(accounts)).router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

/// One XA transfer of `amount` from PostgreSQL account 0 to MariaDB account
/// 0 (a fresh run of one account each), both banks served over HTTP:
/// begun, enlisted and prepared in both databases — not committed.
struct PreparedTransfer {
    scope: tandem_sdk::GlobalTx,
    run: String,
    _servers: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
}

async fn prepared_transfer(
    client: &Client,
    p: &PgXa,
    m: &MySqlXa,
    timeout_ms: u32,
    amount: i64,
) -> PreparedTransfer {
    let run = uuid::Uuid::now_v7().simple().to_string();
    p.setup(&run, 1).await.unwrap();
    m.setup(&run, 1).await.unwrap();
    let (lp, lm) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ap, am) = (lp.local_addr().unwrap(), lm.local_addr().unwrap());
    let servers = (serve(p.clone(), lp), serve(m.clone(), lm));
    let options = pb::TxOptions {
        timeout_ms,
        ..Default::default()
    };
    let scope = client.begin_scope(pb::Protocol::Xa, options).await.unwrap();
    for (branch, address) in [("pg", ap), ("maria", am)] {
        scope
            .enlist(branch, &format!("http://{address}"), Vec::new())
            .await
            .unwrap();
    }
    p.transfer(&branch_ctx(scope.gid(), "pg"), &run, 0, -amount)
        .await
        .unwrap();
    m.transfer(&branch_ctx(scope.gid(), "maria"), &run, 0, amount)
        .await
        .unwrap();
    PreparedTransfer {
        scope,
        run,
        _servers: servers,
    }
}

/// A participant dies right after XA PREPARE; the coordinator decides
/// commit while it is down; on restart, its recovery scan commits the
/// prepared branch (releasing its locks) and the coordinator's retries then
/// find it done.
async fn participant_restart_recovers<A: Accounts>(make: impl AsyncFn(&Client) -> A) {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let accounts = make(&client).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    accounts.setup(&run, 1).await.expect("set-up");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = serve(accounts.clone(), listener);
    let scope = client
        .begin_scope(pb::Protocol::Xa, pb::TxOptions::default())
        .await
        .expect("begin");
    scope
        .enlist("b", &format!("http://{address}"), Vec::new())
        .await
        .expect("enlist");
    // The application's call: the work and XA PREPARE.
    accounts
        .transfer(&branch_ctx(scope.gid(), "b"), &run, 0, 250)
        .await
        .expect("prepare");
    // The participant dies; its prepared branch stays in the database.
    server.abort();
    drop(accounts);
    let tx = client
        .commit(scope.gid(), false, Duration::ZERO)
        .await
        .expect("commit");
    assert_eq!(state(&tx), pb::TxState::Committing);

    // Restarted: the recovery scan asks the coordinator and commits — once
    // the dead process's database session is provably gone (a scan before
    // that leaves the branch for the next one).
    let accounts = make(&client).await;
    let report = wait_for(Duration::from_secs(10), "the recovery scan", || async {
        recover(&accounts, &client)
            .await
            .ok()
            .filter(|r| r.committed == 1)
    })
    .await;
    assert_eq!(report.rolled_back, 0, "{report:?}");
    assert!(accounts.prepared().await.unwrap().is_empty());
    assert_eq!(accounts.sum(&run).await.unwrap(), INITIAL_BALANCE + 250);
    // The row's lock is free again: another transfer goes through at once.
    let probe = branch_ctx(&tandem_sdk::new_gid(), "probe");
    accounts
        .transfer(&probe, &run, 0, 1)
        .await
        .expect("the recovered branch released its locks");
    XaStore::rollback(&accounts, &probe)
        .await
        .expect("roll the probe back");

    // The service is back on its address; the coordinator's retry finds the
    // branch committed and finishes the transaction.
    let listener = TcpListener::bind(address)
        .await
        .expect("rebind the participant's address");
    let _server = serve(accounts.clone(), listener);
    let done = client
        .commit(scope.gid(), true, Duration::from_secs(15))
        .await
        .expect("wait");
    assert_eq!(state(&done), pb::TxState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_blocking_postgres_participant_restarted_after_prepare_recovers() {
    participant_restart_recovers(async |c: &Client| pg(c).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_blocking_mariadb_participant_restarted_after_prepare_recovers() {
    participant_restart_recovers(async |c: &Client| maria(c).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_blocking_an_xa_transaction_never_committed_rolls_back_at_its_timeout() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let (p, m) = (pg(&client).await, maria(&client).await);
    let PreparedTransfer { scope, run, .. } = prepared_transfer(&client, &p, &m, 1_000, 100).await;
    // The application never commits.
    let tx = wait_for(Duration::from_secs(10), "the timeout abort", || async {
        client
            .get(scope.gid())
            .await
            .ok()
            .filter(|t| state(t) == pb::TxState::Aborted)
    })
    .await;
    assert!(tx.error.starts_with("timed out"), "{}", tx.error);
    assert!(p.prepared().await.unwrap().is_empty() && m.prepared().await.unwrap().is_empty());
    assert_eq!(
        p.sum(&run).await.unwrap() + m.sum(&run).await.unwrap(),
        2 * INITIAL_BALANCE
    );
}

/// A 2PC resource whose prepare does XA work in PostgreSQL.
#[derive(Clone)]
struct PgPrepare {
    xa: PgXa,
    run: String,
}

impl TwoPhaseResource for PgPrepare {
    async fn prepare(&self, ctx: &BranchContext, _payload: &[u8]) -> Result<(), BranchError> {
        self.xa.transfer(ctx, &self.run, 0, 1).await
    }

    async fn commit(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        TwoPhaseResource::commit(&self.xa, ctx).await
    }

    async fn rollback(&self, ctx: &BranchContext) -> Result<(), BranchError> {
        TwoPhaseResource::rollback(&self.xa, ctx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_a_deposed_leaders_late_prepare_is_refused() {
    let cluster = Cluster::start(3);
    let (old_leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
    let client = cluster.client();
    let xa = pg(&client).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    xa.setup(&run, 1).await.unwrap();

    // Prepares are held back for 3 s before the participant even looks at
    // them — as if they crossed a slow network — and their answers recorded.
    let late_answers: Arc<Mutex<Vec<u16>>> = Arc::default();
    let answers = late_answers.clone();
    let delay_prepares = move |request: Request, next: Next| {
        let answers = answers.clone();
        async move {
            if !request.uri().path().ends_with("/prepare") {
                return next.run(request).await;
            }
            // In flight on its own: it arrives even after its sender (a
            // deposed leader's driver) has given up on it.
            let delivered = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let response: Response = next.run(request).await;
                answers.lock().unwrap().push(response.status().as_u16());
                response
            });
            delivered.await.expect("delivery task")
        }
    };
    let router = ParticipantServer::new(TwoPhase(PgPrepare {
        xa: xa.clone(),
        run: run.clone(),
    }))
    .router()
    .layer(axum::middleware::from_fn(delay_prepares));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });

    let gid = tandem_sdk::new_gid();
    client
        .begin_with(pb::BeginRequest {
            gid: gid.clone(),
            protocol: pb::Protocol::TwoPc as i32,
            options: Some(pb::TxOptions {
                timeout_ms: 1_500,
                ..Default::default()
            }),
            payload: Vec::new(),
        })
        .await
        .unwrap();
    let ops: Vec<(String, String)> = ["prepare", "commit", "rollback"]
        .iter()
        .map(|op| (op.to_string(), format!("{base}/tandem/{op}")))
        .collect();
    let refs: Vec<(&str, &str)> = ops.iter().map(|(o, e)| (o.as_str(), e.as_str())).collect();
    client
        .register_branch(&gid, "pg", &refs, Vec::new())
        .await
        .unwrap();
    // Commit: the leader sends prepare (held back), then is cut off.
    let committing = {
        let client = client.clone();
        let gid = gid.clone();
        tokio::spawn(async move { client.commit(&gid, false, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster
        .set_failpoint(old_leader, "transport-isolate", "return")
        .await;

    // The new leader times the transaction out and rolls the branch back
    // while the prepares are still on their way.
    let tx = wait_for(Duration::from_secs(15), "the abort", || async {
        client
            .get(&gid)
            .await
            .ok()
            .filter(|t| state(t) == pb::TxState::Aborted)
    })
    .await;
    assert!(
        tx.decision
            .as_ref()
            .is_some_and(|d| d.outcome == pb::Outcome::Abort as i32)
    );
    let outcome = committing
        .await
        .unwrap()
        .expect("commit answers with the outcome");
    assert_ne!(state(&outcome), pb::TxState::Committed);

    // Every late prepare was refused, and nothing was left prepared.
    wait_for(
        Duration::from_secs(10),
        "the late prepares to arrive",
        || async { (!late_answers.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = late_answers.lock().unwrap().clone();
    assert!(
        answers.iter().all(|s| *s == 409),
        "late prepares must be refused: {answers:?}"
    );
    assert!(
        xa.prepared().await.unwrap().is_empty(),
        "a late prepare left a prepared xid"
    );
    assert_eq!(xa.sum(&run).await.unwrap(), INITIAL_BALANCE);
    let tombstone: String =
        sqlx::query("SELECT state FROM tandem_xa_branches WHERE gid = $1 AND branch_id = 'pg'")
            .bind(&gid)
            .fetch_one(xa.pool())
            .await
            .unwrap()
            .get(0);
    assert_eq!(tombstone, "rolledback");
    cluster
        .set_failpoint(old_leader, "transport-isolate", "off")
        .await;
}

fn soak_config(endpoints: Vec<String>) -> xa_bank::Config {
    xa_bank::Config {
        endpoints,
        transfers: 200,
        concurrency: 16,
        fail_rate: 0.1,
        pg_url: DEFAULT_PG_URL.into(),
        mysql_url: DEFAULT_MYSQL_URL.into(),
        accounts: 50,
    }
}

fn assert_run_holds(run: usize, report: &xa_bank::Report) {
    assert!(report.holds(), "run {run}: {report:?}");
    assert_eq!(report.unknown, 0, "run {run}: {report:?}");
    assert_eq!(
        report.committed + report.aborted,
        200,
        "run {run}: {report:?}"
    );
}

/// Atomicity at scale, checked per account and per transfer after every
/// run (a bug that shows once in 1,500 transfers is invisible to one run of
/// 200): 20 runs of 200 concurrent XA transfers on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_xa_soak_20_runs_of_200_transfers_checked_per_account_on_one_node() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(LEADER_TIMEOUT).await;
    for run in 0..20 {
        let report = xa_bank::run(soak_config(cluster.endpoints()))
            .await
            .unwrap_or_else(|e| panic!("run {run}: {e:#}"));
        assert_run_holds(run, &report);
    }
    assert!(unfinished(&cluster.client()).await.is_empty());
}

/// The same with the leader killed (SIGKILL) at a random instant of each of
/// 10 runs on 3 nodes, and brought back before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_xa_soak_10_runs_with_the_leader_killed_at_a_random_instant() {
    use rand::Rng;
    let mut cluster = Cluster::start(3);
    for run in 0..10 {
        let (leader, _) = cluster.wait_leader(LEADER_TIMEOUT).await;
        let work = tokio::spawn(xa_bank::run(soak_config(cluster.endpoints())));
        let after = Duration::from_millis(rand::rng().random_range(50..1_500));
        tokio::time::sleep(after).await;
        cluster.kill(leader);
        let report = work.await.expect("run task").unwrap_or_else(|e| {
            panic!("run {run} (leader {leader} killed after {after:?}): {e:#}")
        });
        assert_run_holds(run, &report);
        cluster.restart(leader);
    }
    cluster.wait_leader(LEADER_TIMEOUT).await;
    assert!(unfinished(&cluster.client()).await.is_empty());
}

/// Each cluster its own xids: two clusters started with the defaults (the
/// same --cluster-name) run the XA bank against the same databases at once
/// and both conserve money; then a branch of one is left prepared, and the
/// other's recovery scan over the same databases does not touch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn atomicity_two_default_clusters_share_the_databases_without_touching_each_others_xids() {
    let options = common::Options {
        default_cluster_name: true,
        ..common::Options::default()
    };
    let a = Cluster::start_with(1, options.clone());
    let b = Cluster::start_with(1, options);
    a.wait_leader(LEADER_TIMEOUT).await;
    b.wait_leader(LEADER_TIMEOUT).await;
    let (ca, cb) = (a.client(), b.client());
    let (id_a, id_b) = (
        ca.cluster_id().await.unwrap(),
        cb.cluster_id().await.unwrap(),
    );
    assert_ne!(id_a, id_b, "every cluster mints its own id");
    assert_ne!(id_a.xa_format_id(), id_b.xa_format_id());

    let (ra, rb) = tokio::join!(
        xa_bank::run(soak_config(a.endpoints())),
        xa_bank::run(soak_config(b.endpoints()))
    );
    assert_run_holds(0, &ra.expect("cluster a's run"));
    assert_run_holds(0, &rb.expect("cluster b's run"));

    // A transfer of cluster a, prepared in both databases, not yet committed.
    let (pa, ma) = (pg(&ca).await, maria(&ca).await);
    let PreparedTransfer {
        scope,
        run,
        _servers,
    } = prepared_transfer(&ca, &pa, &ma, 600_000, 10).await;

    // Cluster b's recovery over the same databases sees none of it.
    let (pb_, mb) = (pg(&cb).await, maria(&cb).await);
    for report in [
        recover(&pb_, &cb).await.unwrap(),
        recover(&mb, &cb).await.unwrap(),
    ] {
        assert_eq!(report, Default::default(), "b touched a's branches");
    }
    let mine = |p: Vec<tandem_sdk::xa::PreparedBranch>| {
        p.into_iter().filter(|x| x.gid == scope.gid()).count()
    };
    assert_eq!(mine(pa.prepared().await.unwrap()), 1);
    assert_eq!(mine(ma.prepared().await.unwrap()), 1);
    assert_eq!(mine(pb_.prepared().await.unwrap()), 0);
    assert_eq!(mine(mb.prepared().await.unwrap()), 0);

    // Cluster a finishes its own.
    let done = scope.commit().await.unwrap();
    assert_eq!(state(&done), pb::TxState::Committed);
    assert_eq!(
        pa.sum(&run).await.unwrap() + ma.sum(&run).await.unwrap(),
        2 * INITIAL_BALANCE
    );
    assert_eq!(ma.sum(&run).await.unwrap(), INITIAL_BALANCE + 10);
}
