//! `SubmitSagas`: many SubmitSaga calls on one stream. Each submission is
//! the call it stands for — checked, limited, proposed and awaited by the
//! same service code, answered with what the call would have returned —
//! but the stream, not a call each, carries them: no HTTP/2 stream, header
//! block or task per saga on either end, and the answers that are ready
//! together leave in one message.
//!
//! The answer stream does the work itself: polled by the connection's
//! task, it takes the client's messages in, keeps their submissions in
//! flight as futures (not tasks) and hands out what finished. It stops
//! reading while [`IN_FLIGHT_MAX`] submissions or [`IN_FLIGHT_BYTES_MAX`]
//! of them wait, so a client that floods it meets HTTP/2 flow control,
//! not a growing queue.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message as _;
use tandem_proto::v1 as pb;
use tonic::Status;
use tracing::Instrument;

use super::convert::tx_to_pb;
use super::gate::PerSubmission;
use super::status::from_service_error;
use crate::service::Transactions;

/// Submissions one message may carry.
pub const SUBMISSIONS_PER_MESSAGE_MAX: usize = 1024;
/// Submissions of one stream in flight at once; beyond it the stream's
/// messages are not read until some are answered.
pub const IN_FLIGHT_MAX: usize = 4096;
/// Encoded bytes of one stream's submissions in flight at once, with the
/// same effect (one message may cross it).
pub const IN_FLIGHT_BYTES_MAX: usize = 64 << 20;
/// Answers in one message at most.
const ANSWERS_PER_MESSAGE_MAX: usize = 1024;

/// The answer stream of one `SubmitSagas` call.
pub struct Answers {
    /// Shared by the submissions in flight (one reference count each, not
    /// a copy of the service's handles).
    service: Arc<Transactions>,
    input: tonic::Streaming<pb::SubmitSagasRequest>,
    /// The client ended its side (or broke it): take nothing more.
    input_done: bool,
    gate: Option<Arc<PerSubmission>>,
    /// Each submission's answer to be, with its encoded size.
    in_flight: FuturesUnordered<BoxFuture<'static, (pb::SagaAnswer, usize)>>,
    in_flight_bytes: usize,
}

impl Answers {
    pub fn new(
        service: Transactions,
        input: tonic::Streaming<pb::SubmitSagasRequest>,
        gate: Option<PerSubmission>,
    ) -> Answers {
        Answers {
            service: Arc::new(service),
            input,
            input_done: false,
            gate: gate.map(Arc::new),
            in_flight: FuturesUnordered::new(),
            in_flight_bytes: 0,
        }
    }

    /// Puts a message's submissions in flight; an error ends the stream.
    fn take(&mut self, message: pb::SubmitSagasRequest) -> Result<(), Status> {
        let count = message.submissions.len();
        if count > SUBMISSIONS_PER_MESSAGE_MAX {
            return Err(Status::invalid_argument(format!(
                "a SubmitSagas message holds {count} submissions; at most {SUBMISSIONS_PER_MESSAGE_MAX}"
            )));
        }
        // Checked per message, not once per stream: a token can expire,
        // or be withdrawn, while the stream is open.
        let credential = match &self.gate {
            Some(gate) => gate.check_credential(),
            None => Ok(()),
        };
        for submission in message.submissions {
            let id = submission.id;
            let bytes = submission.encoded_len();
            self.in_flight_bytes += bytes;
            let refused = credential.clone().err().or_else(|| {
                submission
                    .saga
                    .is_none()
                    .then(|| Status::invalid_argument(format!("submission {id} has no saga")))
            });
            if let Some(status) = refused {
                self.in_flight
                    .push(Box::pin(std::future::ready((refusal(id, &status), bytes))));
                continue;
            }
            let service = self.service.clone();
            let gate = self.gate.clone();
            self.in_flight.push(Box::pin(async move {
                let place = match gate.as_deref().map(PerSubmission::admit) {
                    Some(Err(status)) => return (refusal(id, &status), bytes),
                    Some(Ok(place)) => place,
                    None => None,
                };
                let trace = (!submission.traceparent.is_empty()).then_some(submission.traceparent);
                let saga = submission.saga.unwrap_or_default();
                let (input, span) = super::coordinator::saga_input(saga, trace.as_deref());
                let result = service.submit_saga(input).instrument(span).await;
                drop(place);
                let answer = match result {
                    Ok((tx, created)) => pb::SagaAnswer {
                        id,
                        response: Some(pb::SubmitSagaResponse {
                            transaction: Some(tx_to_pb(&tx)),
                            created,
                        }),
                        ..Default::default()
                    },
                    Err(e) => refusal(id, &from_service_error(e)),
                };
                (answer, bytes)
            }));
        }
        Ok(())
    }
}

/// A submission's answer when it failed: the status its call would have
/// ended with, and the leader's address when the status names one.
fn refusal(id: u64, status: &Status) -> pb::SagaAnswer {
    pb::SagaAnswer {
        id,
        response: None,
        code: status.code() as i32,
        message: status.message().to_string(),
        leader: status
            .metadata()
            .get(tandem_proto::LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    }
}

impl Stream for Answers {
    type Item = Result<pb::SubmitSagasResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.input_done
            && this.in_flight.len() < IN_FLIGHT_MAX
            && this.in_flight_bytes < IN_FLIGHT_BYTES_MAX
        {
            match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    if let Err(status) = this.take(message) {
                        this.input_done = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                // The client's side broke: what is in flight still gets
                // answered if the connection lets it.
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.input_done = true,
                Poll::Pending => break,
            }
        }
        let mut answers = Vec::new();
        while answers.len() < ANSWERS_PER_MESSAGE_MAX {
            match this.in_flight.poll_next_unpin(cx) {
                Poll::Ready(Some((answer, bytes))) => {
                    this.in_flight_bytes -= bytes;
                    answers.push(answer);
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if !answers.is_empty() {
            return Poll::Ready(Some(Ok(pb::SubmitSagasResponse { answers })));
        }
        if this.input_done && this.in_flight.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}
