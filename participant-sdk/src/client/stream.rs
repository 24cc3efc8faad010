//! Sagas submitted concurrently share one stream (`SubmitSagas`) to the
//! node the client believes leads: a submission becomes an entry in the
//! next message instead of a call of its own (no HTTP/2 stream, header
//! block or task per saga here or on the node), and its answer comes back
//! by the id it was given.
//!
//! The stream is an optimisation, never the only way: whatever it cannot
//! settle — the node does not lead, the stream broke or stalled, the node
//! is older than the method — the submission takes the ordinary call,
//! which follows the leader, fails over and backs off. That is safe for
//! the same reason the call's own retries are: a submission is idempotent
//! for its gid and steps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tandem_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::{Client, Connection};

/// Submissions waiting for the stream's task to send them; a caller
/// beyond it waits for room.
const QUEUE_MAX: usize = 1024;
/// Submissions sent and not yet answered, per stream. Below the node's
/// own bound (4096), so the node always reads what this sends and flow
/// control never stands between an answer and the next message.
const IN_FLIGHT_MAX: usize = 2048;
/// A message's submissions: at most this many…
const PER_MESSAGE_MAX: usize = 256;
/// …and about this many bytes (one saga larger than that goes alone; the
/// node accepts a message of its largest transaction and more).
const MESSAGE_BYTES: usize = 1 << 20;
/// After a node answered that it does not know the method, calls only
/// for this long; then the stream is tried again (a rolling upgrade
/// brings the method to every node in time).
const UNSUPPORTED_FOR: Duration = Duration::from_secs(60);

type Answer = Result<pb::SubmitSagaResponse, Status>;

struct Waiting {
    saga: pb::SubmitSagaRequest,
    answer: oneshot::Sender<Answer>,
}

/// The client's stream of submissions, opened on first use.
#[derive(Default)]
pub(super) struct Submissions {
    open: Mutex<Slot>,
    /// When a node last answered the method UNIMPLEMENTED: calls only,
    /// for [`UNSUPPORTED_FOR`] from then.
    pub(super) unsupported_at: Mutex<Option<Instant>>,
    /// Off by the builder: calls only.
    disabled: bool,
}

#[derive(Default)]
struct Slot {
    /// Streams opened so far; names the open one.
    opened: u64,
    open: Option<Open>,
}

struct Open {
    endpoint: String,
    generation: u64,
    queue: mpsc::Sender<Waiting>,
}

impl Submissions {
    /// `enabled`: false for calls only.
    pub(super) fn new(enabled: bool) -> Submissions {
        Submissions {
            disabled: !enabled,
            ..Default::default()
        }
    }

    fn usable(&self) -> bool {
        !self.disabled
            && self
                .unsupported_at
                .lock()
                .expect("stream lock")
                .is_none_or(|at| at.elapsed() >= UNSUPPORTED_FOR)
    }

    /// Forgets the open stream if it is still `generation`: the next
    /// submission opens another. Its task ends once what it sent is
    /// answered.
    fn close(&self, generation: u64) {
        let mut slot = self.open.lock().expect("stream lock");
        if slot
            .open
            .as_ref()
            .is_some_and(|o| o.generation == generation)
        {
            slot.open = None;
        }
    }
}

impl Client {
    /// Submits a saga (as `SubmitSaga`), on the stream when it can.
    pub(super) async fn submit_saga_request(
        &self,
        request: pb::SubmitSagaRequest,
    ) -> Result<pb::SubmitSagaResponse, super::Error> {
        let deadline =
            Duration::from_millis(u64::from(request.wait_timeout_ms)) + self.inner.call_timeout;
        if self.inner.submissions.usable() {
            match self.submit_on_stream(request.clone(), deadline).await {
                Ok(response) => return Ok(response),
                // What the call would retry, the call may settle.
                Err(status) if !super::retryable(status.code()) => {
                    return Err(super::Error::Status(status));
                }
                Err(status) => {
                    tracing::debug!(gid = %request.gid, %status, "the submission stream did not settle a saga; calling");
                }
            }
        }
        self.call_with_timeout(deadline, |ch| {
            let request = request.clone();
            async move { super::coordinator(ch).submit_saga(request).await }
        })
        .await
    }

    async fn submit_on_stream(
        &self,
        saga: pb::SubmitSagaRequest,
        deadline: Duration,
    ) -> Result<pb::SubmitSagaResponse, Status> {
        let (generation, queue) = self.stream_queue();
        let (answer, answered) = oneshot::channel();
        let sent_and_answered = async move {
            if queue.send(Waiting { saga, answer }).await.is_err() {
                return Err(Status::unavailable("the submission stream closed"));
            }
            answered.await.unwrap_or_else(|_| {
                Err(Status::unavailable(
                    "the submission stream ended before answering",
                ))
            })
        };
        let result = match tokio::time::timeout(deadline, sent_and_answered).await {
            Ok(result) => result,
            Err(_) => {
                // A stream that stalls is not trusted with more.
                self.inner.submissions.close(generation);
                Err(Status::deadline_exceeded(format!(
                    "no answer on the submission stream within {deadline:?}"
                )))
            }
        };
        if let Err(status) = &result
            && let Some(leader) = self.leader_named_by(status)
        {
            // The next stream opens to the leader; the call this
            // submission now makes starts there too.
            self.set_current(&leader);
            self.inner.submissions.close(generation);
        }
        result
    }

    /// The open stream's queue, opening one to the node believed to lead
    /// when none is open or the open one goes elsewhere.
    fn stream_queue(&self) -> (u64, mpsc::Sender<Waiting>) {
        let submissions = &self.inner.submissions;
        let target = self.current();
        let mut slot = submissions.open.lock().expect("stream lock");
        if let Some(o) = slot.open.as_ref()
            && o.endpoint == target
            && !o.queue.is_closed()
        {
            return (o.generation, o.queue.clone());
        }
        slot.opened += 1;
        let generation = slot.opened;
        let (queue, waiting) = mpsc::channel(QUEUE_MAX);
        let connection = self.connection(&target);
        // Not a strong reference: the client's end drops the queue's
        // sender, which is what ends the task.
        let owner = Arc::downgrade(&self.inner.submissions);
        tokio::spawn(async move {
            run(connection, waiting, &owner).await;
            if let Some(owner) = owner.upgrade() {
                owner.close(generation);
            }
        });
        slot.open = Some(Open {
            endpoint: target,
            generation,
            queue: queue.clone(),
        });
        (generation, queue)
    }
}

/// One stream's life: sends what callers queue, in messages of what
/// waits together, and hands each answer to its caller. Whatever is
/// unanswered when it ends is told so (the callers then call).
async fn run(
    connection: Connection,
    mut queue: mpsc::Receiver<Waiting>,
    owner: &std::sync::Weak<Submissions>,
) {
    let (outgoing, mut to_send) = mpsc::channel::<pb::SubmitSagasRequest>(4);
    let requests = futures::stream::poll_fn(move |cx| to_send.poll_recv(cx));
    let mut answers = match super::coordinator(connection).submit_sagas(requests).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if status.code() == Code::Unimplemented
                && let Some(owner) = owner.upgrade()
            {
                *owner.unsupported_at.lock().expect("stream lock") = Some(Instant::now());
            }
            end(&mut queue, HashMap::new(), &status);
            return;
        }
    };
    let mut outgoing = Some(outgoing);
    // The message made and not yet taken by the stream. Answers are read
    // while it waits for room: a task that stopped reading answers while
    // it waited to send could stall both ends (the node sends answers only
    // as fast as this reads them, and reads requests only as it sends).
    let mut unsent: Option<pb::SubmitSagasRequest> = None;
    let mut waiting: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
    let mut next_id = 0u64;
    let ended = loop {
        let room_on = outgoing.clone().filter(|_| unsent.is_some());
        tokio::select! {
            biased;
            message = answers.message() => match message {
                Ok(Some(message)) => {
                    for answer in message.answers {
                        if let Some(caller) = waiting.remove(&answer.id) {
                            let _ = caller.send(settled(answer));
                        }
                    }
                    if outgoing.is_none() && waiting.is_empty() {
                        break Status::unavailable("the submission stream was closed");
                    }
                }
                Ok(None) => break Status::unavailable("the node ended the submission stream"),
                Err(status) => break status,
            },
            room = async move { room_on.expect("checked").reserve_owned().await }, if room_on.is_some() => {
                match room {
                    Ok(room) => {
                        room.send(unsent.take().expect("checked"));
                    }
                    Err(_) => break Status::unavailable("the submission stream broke"),
                }
            }
            first = queue.recv(), if unsent.is_none() && outgoing.is_some() && waiting.len() < IN_FLIGHT_MAX => {
                let Some(first) = first else {
                    // Closed by the client: no more submissions; end our
                    // side and wait for what was sent.
                    outgoing = None;
                    if waiting.is_empty() {
                        break Status::unavailable("the submission stream was closed");
                    }
                    continue;
                };
                let mut submissions = Vec::new();
                let mut bytes = 0;
                let mut next = Some(first);
                while let Some(Waiting { saga, answer }) = next.take() {
                    next_id += 1;
                    bytes += saga.encoded_len();
                    waiting.insert(next_id, answer);
                    submissions.push(pb::SagaSubmission {
                        id: next_id,
                        saga: Some(saga),
                        traceparent: String::new(),
                    });
                    if submissions.len() < PER_MESSAGE_MAX
                        && waiting.len() < IN_FLIGHT_MAX
                        && bytes < MESSAGE_BYTES
                    {
                        next = queue.try_recv().ok();
                    }
                }
                unsent = Some(pb::SubmitSagasRequest { submissions });
            }
        }
    };
    end(&mut queue, waiting, &ended);
}

/// Tells every caller still waiting, sent or queued, that this stream
/// will not answer it.
fn end(
    queue: &mut mpsc::Receiver<Waiting>,
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
    status: &Status,
) {
    // Not the node's answer to these submissions: one the call may settle.
    let unsettled =
        || Status::unavailable(format!("the submission stream ended: {}", status.message()));
    for (_, caller) in waiting {
        let _ = caller.send(Err(unsettled()));
    }
    queue.close();
    while let Ok(w) = queue.try_recv() {
        let _ = w.answer.send(Err(unsettled()));
    }
}

/// A submission's answer as the call's result would be.
fn settled(answer: pb::SagaAnswer) -> Answer {
    if answer.code == Code::Ok as i32 {
        return Ok(answer.response.unwrap_or_default());
    }
    let mut status = Status::new(Code::from_i32(answer.code), answer.message);
    if !answer.leader.is_empty()
        && let Ok(value) = answer.leader.parse()
    {
        status
            .metadata_mut()
            .insert(tandem_proto::LEADER_METADATA_KEY, value);
    }
    Err(status)
}
