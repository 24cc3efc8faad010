//! Test harness: real `tandem` processes on loopback ports, which tests kill
//! (SIGKILL), pause (SIGSTOP), wipe and partition (failpoints over the Debug
//! service). Every wait is bounded.

#![allow(dead_code)]

pub mod netns;
pub mod participant;
pub mod proxy;
pub mod submissions;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_proto::v1 as pb;
use tandem_proto::v1::cluster_client::ClusterClient;
use tandem_proto::v1::debug_client::DebugClient;
use tandem_sdk::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// One metric's value in a Prometheus text page (0 when absent).
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A free loopback port (bound, then released for the node to take), never
/// one this process was given before: the kernel may hand a just-released
/// port out again, and a node given the same port for `--listen` and
/// `--http-listen` refuses to start (seen once in a full run: "timed out
/// waiting for a leader").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no port this process has not used already");
}

#[derive(Clone, Debug)]
pub struct Options {
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub snapshot_interval_entries: u64,
    pub log_retain_entries: u64,
    pub extra: Vec<String>,
    /// Start with `tandem serve`'s default cluster name instead of one of
    /// the test's own (as two clusters started with defaults would).
    pub default_cluster_name: bool,
    /// Run node `i` in network namespace `hosts[i - 1].0`, serving on
    /// `hosts[i - 1].1` (an IP address; see `netns::Net`). Empty: every
    /// node on loopback.
    pub hosts: Vec<(String, String)>,
    /// A directory written by `tandem certs dev`: node `i` serves with
    /// `node-i.pem`, the test's clients use `client.pem` and `ca.pem`.
    pub tls: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            election_timeout_ms: 500,
            heartbeat_interval_ms: 100,
            snapshot_interval_entries: 20_000,
            log_retain_entries: 5_000,
            extra: Vec::new(),
            default_cluster_name: false,
            hosts: Vec::new(),
            tls: None,
        }
    }
}

pub struct Node {
    pub id: u64,
    pub address: String,
    /// The HTTP API's HOST:PORT.
    pub http_address: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn endpoint(&self) -> String {
        self.address.clone()
    }

    /// The HTTP API's base URL.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_address)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub name: String,
    pub nodes: Vec<Node>,
    pub options: Options,
    /// Founding members, as passed to --peers.
    peers: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(size: u64) -> Cluster {
        Cluster::start_with(size, Options::default())
    }

    pub fn start_with(size: u64, options: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = format!("test-{}", uuid::Uuid::new_v4().simple());
        let address = |id: u64| match options.hosts.get(id as usize - 1) {
            Some((_, ip)) => format!("{ip}:7070"),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let http_address = |id: u64| match options.hosts.get(id as usize - 1) {
            Some((_, ip)) => format!("{ip}:7080"),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let nodes: Vec<Node> = (1..=size)
            .map(|id| Node {
                id,
                address: address(id),
                http_address: http_address(id),
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                child: None,
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.address))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            name,
            nodes,
            options,
            peers,
            dir,
        };
        for id in 1..=size {
            cluster.spawn(id, false);
        }
        cluster
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node id")
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    fn spawn(&mut self, id: u64, join: bool) {
        let options = self.options.clone();
        let name = self.name.clone();
        let peers = self.peers.clone();
        let node = self.node_mut(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let mut command = match options.hosts.get(id as usize - 1) {
            Some((ns, _)) => {
                // `ip netns exec` enters the namespace and execs the node:
                // the child is the node itself (kill, SIGSTOP reach it).
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, BIN]);
                command
            }
            None => Command::new(BIN),
        };
        command
            .arg("serve")
            .args(["--id", &id.to_string()])
            .args(["--listen", &node.address])
            .args(["--http-listen", &node.http_address])
            .args(["--data-dir", &node.data_dir.to_string_lossy()])
            .args([
                "--election-timeout-ms",
                &options.election_timeout_ms.to_string(),
            ])
            .args([
                "--heartbeat-interval-ms",
                &options.heartbeat_interval_ms.to_string(),
            ])
            .args([
                "--snapshot-interval-entries",
                &options.snapshot_interval_entries.to_string(),
            ])
            .args([
                "--log-retain-entries",
                &options.log_retain_entries.to_string(),
            ])
            .args(&options.extra)
            .env(
                "TANDEM_LOG",
                std::env::var("TEST_TANDEM_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if !options.hosts.is_empty() && options.tls.is_none() {
            // The test's own private network: plaintext on its addresses,
            // and no per-client limit on the workload.
            command.args(["--insecure", "--client-rate-max", "0"]);
        }
        if !options.default_cluster_name {
            command.args(["--cluster-name", &name]);
        }
        if let Some(dir) = &options.tls {
            command
                .arg("--tls-cert")
                .arg(dir.join(format!("node-{id}.pem")))
                .arg("--tls-key")
                .arg(dir.join(format!("node-{id}.key")))
                .arg("--tls-ca")
                .arg(dir.join("ca.pem"));
        }
        if join {
            command.arg("--join");
        } else {
            command.args(["--peers", &peers]);
        }
        node.child = Some(command.spawn().expect("spawn tandem"));
    }

    /// Adds a node process that starts empty with --join (not yet a member).
    pub fn spawn_joining(&mut self, id: u64) -> String {
        let address = format!("127.0.0.1:{}", free_port());
        self.nodes.push(Node {
            id,
            address: address.clone(),
            http_address: format!("127.0.0.1:{}", free_port()),
            data_dir: self.dir.path().join(format!("node-{id}")),
            log: self.dir.path().join(format!("node-{id}.log")),
            child: None,
        });
        self.spawn(id, true);
        address
    }

    /// The process id of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.as_ref().map(|c| c.id())
    }

    /// A running node's resident memory, from /proc.
    pub fn rss_bytes(&self, id: u64) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(id)?)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for a node to die by itself (a failpoint that panics aborts the
    /// process); returns whether it did within `timeout`.
    pub async fn wait_dead(&mut self, id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.node_mut(id);
            match node.child.as_mut().map(|c| c.try_wait()) {
                None => return true,
                Some(Ok(Some(_))) => {
                    node.child = None;
                    return true;
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.spawn(id, false);
    }

    pub fn restart_joining(&mut self, id: u64) {
        self.spawn(id, true);
    }

    pub fn wipe(&mut self, id: u64) {
        let node = self.node(id);
        assert!(!node.is_running(), "wipe a stopped node");
        let _ = std::fs::remove_dir_all(&node.data_dir);
    }

    fn signal(&self, id: u64, signal: nix::sys::signal::Signal) {
        let child = self.node(id).child.as_ref().expect("running node");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal");
    }

    pub fn pause(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM, then wait for a clean exit; returns its exit status code.
    pub fn terminate(&mut self, id: u64) -> Option<i32> {
        self.signal(id, nix::sys::signal::Signal::SIGTERM);
        let mut child = self.node_mut(id).child.take().expect("running node");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Node::endpoint)
            .collect()
    }

    /// The client certificates of a TLS cluster (`Options::tls`).
    pub fn client_tls(&self) -> Option<tandem_coordinator::tls::Tls> {
        let dir = self.options.tls.as_ref()?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("certificate");
        Some(tandem_coordinator::tls::Tls {
            cert_pem: read("client.pem"),
            key_pem: read("client.key"),
            ca_pem: read("ca.pem"),
        })
    }

    pub fn client(&self) -> Client {
        let mut builder = Client::builder(self.endpoints());
        if let Some(tls) = self.client_tls() {
            builder = builder
                .tls_ca(tls.ca_pem.clone())
                .tls_identity(tls.cert_pem.clone(), tls.key_pem.clone());
        }
        builder
            .retry_deadline(Duration::from_secs(30))
            .build()
            .expect("client")
    }

    pub async fn local_status(&self, id: u64) -> Option<pb::NodeStatus> {
        let tls = self.client_tls();
        let endpoint =
            tandem_coordinator::tls::endpoint(&self.node(id).address, tls.as_ref()).ok()?;
        let call = async {
            let mut client = ClusterClient::new(endpoint.connect().await.ok()?);
            client
                .local_status(pb::NodeStatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .ok()
            .flatten()
    }

    /// Waits until a running node is leader and the other running voters
    /// agree; returns (leader id, term).
    pub async fn wait_leader(&self, timeout: Duration) -> (u64, u64) {
        let ids: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect();
        wait_for(timeout, "a leader", || async {
            let mut statuses = Vec::new();
            for &id in &ids {
                if let Some(s) = self.local_status(id).await {
                    statuses.push(s);
                }
            }
            let leader = statuses.iter().find(|s| s.role == "leader")?;
            let agreeing = statuses
                .iter()
                .filter(|s| s.leader_id == leader.id && s.term == leader.term)
                .count();
            (agreeing * 2 > ids.len()).then_some((leader.id, leader.term))
        })
        .await
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, timeout: Duration) -> pb::NodeStatus {
        wait_for(timeout, &format!("node {id} to apply {index}"), || async {
            self.local_status(id).await.filter(|s| s.applied >= index)
        })
        .await
    }

    /// Node `id`'s value of one `/metrics` series (0 when absent).
    pub async fn metric(&self, id: u64, series: &str) -> f64 {
        let url = format!("{}/metrics", self.node(id).http_url());
        let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
        metric(&page, series)
    }

    pub async fn set_failpoint(&self, id: u64, name: &str, actions: &str) {
        let address = format!("http://{}", self.node(id).address);
        let mut client = DebugClient::connect(address)
            .await
            .expect("connect for failpoint");
        client
            .set_failpoint(pb::SetFailpointRequest {
                name: name.into(),
                actions: actions.into(),
            })
            .await
            .expect("set failpoint (is the binary built with --features failpoints?)");
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.node(id).log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} log (last lines) ---", node.id);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Polls `probe` until it yields a value; panics after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every gid the node at `endpoint` holds, read from that node alone.
pub async fn list_all_from(endpoint: &str) -> Vec<String> {
    try_list_all_from(endpoint)
        .await
        .unwrap_or_else(|e| panic!("list from {endpoint}: {e}"))
}

/// [`list_all_from`], or why the node could not answer (a node that knows
/// no leader yet answers UNAVAILABLE: a List is a linearizable read).
pub async fn try_list_all_from(endpoint: &str) -> Result<Vec<String>, String> {
    let mut client = tandem_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
        "http://{endpoint}"
    ))
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let mut gids = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                limit: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("list: {e}"))?
            .into_inner();
        gids.extend(page.transactions.into_iter().map(|t| t.gid));
        if page.next_page_token.is_empty() {
            return Ok(gids);
        }
        token = page.next_page_token;
    }
}

/// Begins `count` saga transactions with `concurrency` callers through the
/// SDK, each caller starting from a random node; returns the acknowledged gids.
pub async fn begin_many(
    cluster: &Cluster,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Vec<String> {
    use rand::seq::IndexedRandom;
    let endpoints = cluster.endpoints();
    let clients: Vec<Client> = endpoints
        .iter()
        .map(|first| {
            let mut order = vec![first.clone()];
            order.extend(endpoints.iter().filter(|e| *e != first).cloned());
            Client::builder(order)
                .retry_deadline(Duration::from_secs(30))
                .build()
                .expect("client")
        })
        .collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let clients = clients.clone();
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return acked;
                }
                let gid = format!("{prefix}-{i:06}");
                let client = clients.choose(&mut rand::rng()).expect("a client").clone();
                client
                    .begin(&gid, pb::Protocol::Saga)
                    .await
                    .unwrap_or_else(|e| panic!("begin {gid}: {e}"));
                acked.push(gid);
            }
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("begin task"));
    }
    acked.sort();
    acked
}

/// Every unfinished transaction the cluster lists, as "gid STATE".
pub async fn unfinished(client: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for s in [
        pb::TxState::Active,
        pb::TxState::Preparing,
        pb::TxState::Committing,
        pb::TxState::Aborting,
    ] {
        let page = client
            .list(pb::ListRequest {
                state: s as i32,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list");
        out.extend(
            page.transactions
                .into_iter()
                .map(|t| format!("{} {:?}", t.gid, s)),
        );
    }
    out
}
