//! Building and submitting a saga.

use std::time::Duration;

use tandem_proto::v1 as pb;

use super::{Client, Error, new_gid};
use tandem_proto::wire::{ops, participant_endpoint};

/// One step: an action and its compensation.
#[derive(Clone, Debug)]
pub struct Step {
    inner: pb::SagaStep,
}

impl Step {
    /// A step with explicit endpoints (`grpc://host:port` or
    /// `http(s)://host[:port]/path`).
    pub fn new(branch_id: &str, action: &str, compensate: &str) -> Step {
        Step {
            inner: pb::SagaStep {
                branch_id: branch_id.to_string(),
                action: action.to_string(),
                compensate: compensate.to_string(),
                ..Default::default()
            },
        }
    }

    /// A step served by the SDK's `ParticipantServer` at `base`
    /// (`http://host:port` or `grpc://host:port`).
    pub fn service(branch_id: &str, base: &str) -> Step {
        Step::new(
            branch_id,
            &participant_endpoint(base, ops::ACTION),
            &participant_endpoint(base, ops::COMPENSATE),
        )
    }

    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Step {
        self.inner.payload = payload.into();
        self
    }

    /// Runs only after these steps' actions succeeded (concurrent sagas).
    pub fn after(mut self, steps: &[&str]) -> Step {
        self.inner.after = steps.iter().map(|s| s.to_string()).collect();
        self
    }

    /// This step's own retry policy.
    pub fn retry(mut self, retry: pb::RetryPolicy) -> Step {
        self.inner.retry = Some(retry);
        self
    }
}

/// A saga under construction: `client.saga().step(…).step(…).submit()`.
pub struct SagaBuilder {
    client: Client,
    request: pb::SubmitSagaRequest,
}

impl SagaBuilder {
    pub(super) fn new(client: Client) -> SagaBuilder {
        SagaBuilder {
            client,
            request: pb::SubmitSagaRequest {
                gid: new_gid(),
                ..Default::default()
            },
        }
    }

    /// Chooses the gid (default: a new UUID v7).
    pub fn gid(mut self, gid: &str) -> SagaBuilder {
        self.request.gid = gid.to_string();
        self
    }

    pub fn step(mut self, step: Step) -> SagaBuilder {
        self.request.steps.push(step.inner);
        self
    }

    /// Runs steps as their `after` lists allow, `limit` at a time (0: no
    /// limit). Without it, steps run one after another in order.
    pub fn concurrent(mut self, limit: u32) -> SagaBuilder {
        self.request.concurrent = true;
        self.options().concurrency = limit;
        self
    }

    /// Compensate if not finished within this long.
    pub fn timeout(mut self, timeout: Duration) -> SagaBuilder {
        self.options().timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        self
    }

    pub fn retry(mut self, retry: pb::RetryPolicy) -> SagaBuilder {
        self.options().retry = Some(retry);
        self
    }

    /// Deadline of one call to a participant.
    pub fn branch_timeout(mut self, timeout: Duration) -> SagaBuilder {
        self.options().branch_timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        self
    }

    fn options(&mut self) -> &mut pb::TxOptions {
        self.request.options.get_or_insert_with(Default::default)
    }

    pub fn gid_str(&self) -> &str {
        &self.request.gid
    }

    /// Submits the saga and returns at once (it runs on the coordinator).
    pub async fn submit(self) -> Result<pb::Transaction, Error> {
        self.send(false, Duration::ZERO).await
    }

    /// Submits the saga and waits until it is terminal (or `timeout`).
    pub async fn submit_and_wait(self, timeout: Duration) -> Result<pb::Transaction, Error> {
        self.send(true, timeout).await
    }

    async fn send(mut self, wait: bool, timeout: Duration) -> Result<pb::Transaction, Error> {
        self.request.wait = wait;
        self.request.wait_timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        let response = self.client.submit_saga_request(self.request).await?;
        Ok(response.transaction.unwrap_or_default())
    }
}

impl Client {
    /// Starts building a saga.
    pub fn saga(&self) -> SagaBuilder {
        SagaBuilder::new(self.clone())
    }

    /// Submits a saga request as it is (the CLI's `tx submit-saga`).
    pub async fn submit_saga_with(
        &self,
        request: pb::SubmitSagaRequest,
    ) -> Result<pb::SubmitSagaResponse, Error> {
        self.submit_saga_request(request).await
    }
}
