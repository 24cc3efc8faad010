//! The `SubmitSagas` stream on the wire, for tests that speak it without
//! the SDK.

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A one-step saga on the step service at `base`, waited for up to 10 s.
pub fn one_step(gid: &str, base: &str) -> pb::SubmitSagaRequest {
    pb::SubmitSagaRequest {
        gid: gid.to_string(),
        steps: vec![pb::SagaStep {
            branch_id: "a".into(),
            action: tandem_proto::wire::participant_endpoint(base, "action"),
            compensate: tandem_proto::wire::participant_endpoint(base, "compensate"),
            ..Default::default()
        }],
        wait: true,
        wait_timeout_ms: 10_000,
        ..Default::default()
    }
}

pub fn submission(id: u64, saga: Option<pb::SubmitSagaRequest>) -> pb::SagaSubmission {
    pb::SagaSubmission {
        id,
        saga,
        traceparent: String::new(),
    }
}

/// Opens a stream on `client`, with `token` as its bearer credential if
/// given: where to send its messages, and its answers.
pub async fn open(
    client: &mut CoordinatorClient<Channel>,
    token: Option<&str>,
) -> Result<
    (
        mpsc::Sender<pb::SubmitSagasRequest>,
        tonic::Streaming<pb::SubmitSagasResponse>,
    ),
    tonic::Status,
> {
    let (sender, outgoing) = mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let answers = client.submit_sagas(request).await?.into_inner();
    Ok((sender, answers))
}
