//! `tandem.v1.Coordinator`: a thin adapter — wire types in, the service
//! layer (`service/`) does the work, wire types and one status out.

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_server::Coordinator;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{protocol_from_pb, state_from_pb, tx_to_pb};
use super::gate::PerSubmission;
use super::status::{from_service_error, invalid};
use crate::model::command::DestinationSpec;
use crate::service::{
    BeginInput, ListInput, MessageInput, OptionsInput, RegisterInput, RepairInput, RetryInput,
    SagaInput, StepInput, Transactions, wait_timeout,
};
use crate::telemetry;

pub struct CoordinatorService {
    service: Transactions,
}

impl CoordinatorService {
    pub fn new(service: Transactions) -> Self {
        CoordinatorService { service }
    }
}

/// The W3C trace context a client sent in the request's metadata.
fn client_traceparent<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The coordinator's span for a request that begins a transaction (a
/// child of the client's context; none when tracing is off), and the
/// context the transaction's later work continues.
fn request_span(
    name: &'static str,
    gid: &str,
    client: Option<&str>,
) -> (tracing::Span, Option<String>) {
    let span = telemetry::child_span(
        || {
            tracing::info_span!(
                "tandem.request",
                otel.name = name,
                otel.kind = "server",
                gid
            )
        },
        client,
    );
    let trace = telemetry::traceparent_for(&span, client);
    (span, trace)
}

fn retry_input(r: pb::RetryPolicy) -> RetryInput {
    RetryInput {
        initial_interval_ms: r.initial_interval_ms,
        max_interval_ms: r.max_interval_ms,
        max_attempts: r.max_attempts,
    }
}

fn options_input(o: Option<pb::TxOptions>) -> OptionsInput {
    let o = o.unwrap_or_default();
    OptionsInput {
        timeout_ms: o.timeout_ms,
        retry: o.retry.map(retry_input),
        branch_timeout_ms: o.branch_timeout_ms,
        concurrency: o.concurrency,
    }
}

/// A SubmitSaga request as the service takes it, and the span its work
/// runs in (the unary call and each submission on a stream alike).
pub(super) fn saga_input(
    request: pb::SubmitSagaRequest,
    client_trace: Option<&str>,
) -> (SagaInput, tracing::Span) {
    let (span, trace_parent) = request_span("SubmitSaga", &request.gid, client_trace);
    let steps = request
        .steps
        .into_iter()
        .map(|s| StepInput {
            branch_id: s.branch_id,
            action: s.action,
            compensate: s.compensate,
            payload: s.payload.into(),
            after: s.after,
            retry: s.retry.map(retry_input),
        })
        .collect();
    let input = SagaInput {
        gid: request.gid,
        options: options_input(request.options),
        steps,
        payload: request.payload.into(),
        concurrent: request.concurrent,
        wait: request.wait.then(|| wait_timeout(request.wait_timeout_ms)),
        trace_parent,
    };
    (input, span)
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let client = client_traceparent(&request);
        let request = request.into_inner();
        let (span, trace_parent) = request_span("Begin", &request.gid, client.as_deref());
        let protocol = match protocol_from_pb(request.protocol) {
            Ok(protocol) => protocol,
            Err(e) => {
                // Named in the answer, so checked first; the service checks
                // it again on every other path.
                crate::model::validate::gid(&request.gid).map_err(|e| invalid(e.to_string()))?;
                return Err(invalid(format!("transaction {}: {e}", request.gid)));
            }
        };
        let (tx, created) = self
            .service
            .begin(BeginInput {
                gid: request.gid,
                protocol,
                options: options_input(request.options),
                payload: request.payload.into(),
                trace_parent,
            })
            .instrument(span)
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::BeginResponse {
            transaction: Some(tx_to_pb(&tx)),
            created,
        }))
    }

    async fn submit_saga(
        &self,
        request: Request<pb::SubmitSagaRequest>,
    ) -> Result<Response<pb::SubmitSagaResponse>, Status> {
        let client = client_traceparent(&request);
        let (input, span) = saga_input(request.into_inner(), client.as_deref());
        let (tx, created) = self
            .service
            .submit_saga(input)
            .instrument(span)
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::SubmitSagaResponse {
            transaction: Some(tx_to_pb(&tx)),
            created,
        }))
    }

    type SubmitSagasStream = super::saga_stream::Answers;

    async fn submit_sagas(
        &self,
        request: Request<tonic::Streaming<pb::SubmitSagasRequest>>,
    ) -> Result<Response<Self::SubmitSagasStream>, Status> {
        let gate = request.extensions().get::<PerSubmission>().cloned();
        Ok(Response::new(super::saga_stream::Answers::new(
            self.service.clone(),
            request.into_inner(),
            gate,
        )))
    }

    async fn prepare_message(
        &self,
        request: Request<pb::PrepareMessageRequest>,
    ) -> Result<Response<pb::PrepareMessageResponse>, Status> {
        let client = client_traceparent(&request);
        let request = request.into_inner();
        let (span, trace_parent) = request_span("PrepareMessage", &request.gid, client.as_deref());
        let destinations = request
            .destinations
            .into_iter()
            .map(|d| DestinationSpec {
                branch_id: d.branch_id,
                endpoint: d.endpoint,
                payload: d.payload.into(),
            })
            .collect();
        let (tx, created) = self
            .service
            .prepare_message(MessageInput {
                gid: request.gid,
                options: options_input(request.options),
                check_back: request.check_back,
                destinations,
                payload: request.payload.into(),
                trace_parent,
            })
            .instrument(span)
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::PrepareMessageResponse {
            transaction: Some(tx_to_pb(&tx)),
            created,
        }))
    }

    async fn register_branch(
        &self,
        request: Request<pb::RegisterBranchRequest>,
    ) -> Result<Response<pb::RegisterBranchResponse>, Status> {
        let request = request.into_inner();
        let tx = self
            .service
            .register(RegisterInput {
                gid: request.gid,
                branch_id: request.branch_id,
                ops: request
                    .ops
                    .into_iter()
                    .map(|o| (o.op, o.endpoint))
                    .collect(),
                payload: request.payload.into(),
            })
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::RegisterBranchResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let request = request.into_inner();
        let tx = self
            .service
            .commit(
                request.gid,
                request.wait,
                wait_timeout(request.wait_timeout_ms),
            )
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::CommitResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let request = request.into_inner();
        let tx = self
            .service
            .abort(
                request.gid,
                request.reason,
                request.wait.then(|| wait_timeout(request.wait_timeout_ms)),
            )
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::AbortResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        let tx = if request.resolve {
            self.service.resolve(&request.gid).await
        } else {
            self.service.get(&request.gid).await
        }
        .map_err(from_service_error)?;
        Ok(Response::new(pb::GetResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .service
            .list(ListInput {
                state: state_from_pb(request.state).map_err(invalid)?,
                protocol: protocol_from_pb(request.protocol).map_err(invalid)?,
                limit: request.limit as usize,
                page_token: (!request.page_token.is_empty()).then_some(request.page_token),
                updated_since_ms: (request.updated_since_ms != 0)
                    .then_some(request.updated_since_ms),
                stuck: request.stuck,
            })
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::ListResponse {
            transactions: page.txs.iter().map(|tx| tx_to_pb(tx)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn retry(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let tx = self
            .service
            .retry(repair_input(request.into_inner()))
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::RepairResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn resolve(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        let tx = self
            .service
            .resolve_by_hand(repair_input(request.into_inner()))
            .await
            .map_err(from_service_error)?;
        Ok(Response::new(pb::RepairResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }
}

fn repair_input(r: pb::RepairRequest) -> RepairInput {
    RepairInput {
        gid: r.gid,
        branch_id: r.branch_id,
        reason: r.reason,
        by: r.by,
    }
}
