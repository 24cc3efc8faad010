//! The participant server's pipelined HTTP/1.1 (docs/http-participants.md),
//! on a real socket. Invariant 1 (atomicity) rests on each answer reaching
//! the call it answers: on a pipelined connection that is their order, so
//! the answers must come back in the order of the requests, each saying
//! what its own call's handler said, while the handlers run concurrently.

use std::time::{Duration, Instant};

use tandem_sdk::participant::{BranchError, BranchRequest, Handler, ParticipantServer, headers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers 409 with the branch id as the reason; a branch named `slow-…`
/// first sleeps.
struct Echo;

impl Handler for Echo {
    async fn handle(&self, request: BranchRequest) -> Result<(), BranchError> {
        if request.ctx.branch_id.starts_with("slow") {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(BranchError::Failure(request.ctx.branch_id))
    }
}

async fn serve() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tandem_sdk::participant::serve(
        listener,
        ParticipantServer::new(Echo),
        async move {
            let _ = stopped.await;
        },
    ));
    (address, stop)
}

fn request(branch: &str, pipelined: bool) -> String {
    let marker = match pipelined {
        true => format!("{}: 1\r\n", headers::PIPELINE),
        false => String::new(),
    };
    format!(
        "POST /tandem/action HTTP/1.1\r\nhost: x\r\n{marker}{}: g-1\r\n{}: {branch}\r\n{}: 1\r\n{}: 7\r\ncontent-length: 2\r\n\r\n{{}}",
        headers::GID,
        headers::BRANCH_ID,
        headers::FENCE_TERM,
        headers::FENCE_INDEX,
    )
}

/// A connection to `address` on which `requests` were written.
async fn sent(address: &str, requests: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(requests.as_bytes()).await.expect("write");
    stream
}

/// Reads `n` answers (each with a content-length): (status, body, head).
async fn answers(stream: &mut TcpStream, n: usize) -> Vec<(u16, String, String)> {
    let mut read = Vec::new();
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.len() < n {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = response.parse(&read) {
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .expect("a content-length");
            if read.len() >= head + length {
                let code = response.code.unwrap();
                let text = String::from_utf8_lossy(&read[..head]).to_lowercase();
                let body = String::from_utf8_lossy(&read[head..head + length]).to_string();
                found.push((code, body, text));
                read.drain(..head + length);
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut chunk))
            .await
            .expect("answers within 10 s")
            .expect("read");
        assert!(n > 0, "closed after {} answers", found.len());
        read.extend_from_slice(&chunk[..n]);
    }
    found
}

#[tokio::test]
async fn atomicity_pipelined_calls_run_concurrently_and_are_answered_in_order() {
    let (address, _stop) = serve().await;
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    // Five slow calls among twenty, all written at once.
    let branches: Vec<String> = (0..20)
        .map(|i| match i % 4 {
            0 => format!("slow-{i}"),
            _ => format!("fast-{i}"),
        })
        .collect();
    let all: String = branches.iter().map(|b| request(b, true)).collect();
    let started = Instant::now();
    stream.write_all(all.as_bytes()).await.expect("write");
    let answered = answers(&mut stream, branches.len()).await;
    let took = started.elapsed();
    for ((code, body, head), branch) in answered.iter().zip(&branches) {
        assert_eq!(*code, 409, "{branch}: {head}");
        assert_eq!(body, branch, "answers out of order");
        assert!(head.contains("tandem-pipeline: 32"), "{head}");
    }
    // One after another, the slow ones alone would take 1.5 s.
    assert!(
        took < Duration::from_millis(1_000),
        "not concurrent: {took:?}"
    );
}

#[tokio::test]
async fn other_connections_are_served_as_before_and_told_of_pipelining() {
    let (address, _stop) = serve().await;
    let mut stream = sent(&address, &request("plain", false)).await;
    let answered = answers(&mut stream, 1).await;
    assert_eq!(answered[0].0, 409);
    assert_eq!(answered[0].1, "plain");
    assert!(answered[0].2.contains("tandem-pipeline: 32"));
    // An unknown route on a pipelined connection is a 404, and the
    // connection carries on.
    let unknown = request("x", true).replace("/tandem/action", "/elsewhere");
    let both = format!("{unknown}{}", request("after", true));
    let mut stream = sent(&address, &both).await;
    let answered = answers(&mut stream, 2).await;
    assert_eq!((answered[0].0, answered[1].0), (404, 409));
    assert_eq!(answered[1].1, "after");
}

#[tokio::test]
async fn a_request_that_cannot_be_framed_is_refused_and_the_connection_closed() {
    let (address, _stop) = serve().await;
    let chunked = request("c", true).replace(
        "content-length: 2\r\n\r\n{}",
        "transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    let both = format!(
        "{}{chunked}{}",
        request("before", true),
        request("never", true)
    );
    let mut stream = sent(&address, &both).await;
    let answered = answers(&mut stream, 2).await;
    assert_eq!(answered[0].1, "before");
    assert_eq!(answered[1].0, 501);
    assert!(answered[1].2.contains("connection: close"));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "not closed");
    assert!(!String::from_utf8_lossy(&rest).contains("never"));
}

#[tokio::test]
async fn shutdown_lets_the_calls_in_flight_answer() {
    let (address, stop) = serve().await;
    let mut stream = sent(&address, &request("slow-1", true)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop.send(());
    let answered = answers(&mut stream, 1).await;
    assert_eq!(answered[0].1, "slow-1");
}

/// Counts the calls whose handler ran to its end (each sleeps first).
#[derive(Clone, Default)]
struct Finishes(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Handler for Finishes {
    async fn handle(&self, _request: BranchRequest) -> Result<(), BranchError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// Atomicity (no half-done work): a call whose coordinator hangs up while
/// the handler runs — the connection reset, as when the node dies — still
/// runs its handler to the end, on a pipelined connection and on a plain
/// one; it is not cancelled at an await point in the middle of its work.
#[tokio::test]
async fn atomicity_a_handler_runs_to_its_end_when_the_caller_hangs_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let finished = Finishes::default();
    tokio::spawn(tandem_sdk::participant::serve(
        listener,
        ParticipantServer::new(finished.clone()),
        std::future::pending(),
    ));
    for pipelined in [true, false] {
        let before = finished.0.load(std::sync::atomic::Ordering::SeqCst);
        let stream = sent(&address, &request("b-1", pipelined)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A reset, not a polite close: what a killed process's peer sees.
        stream.set_zero_linger().expect("linger");
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(3);
        while finished.0.load(std::sync::atomic::Ordering::SeqCst) == before {
            assert!(
                Instant::now() < deadline,
                "the handler was cancelled with its connection (pipelined: {pipelined})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
