//! OpenTelemetry end to end: an application's span, the coordinator's
//! request and branch-call spans, and both participants' spans arrive at an
//! OTLP receiver (a tiny tonic server built from `opentelemetry-proto`)
//! under one trace id, each participant's span a child of the
//! coordinator's call to it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::participant::StepService;
use common::{Cluster, Options, free_port, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use tandem_proto::wire::participant_endpoint;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_holds_the_application_the_coordinator_and_both_participants() {
    let receiver = Receiver::default();
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let endpoint = format!("http://127.0.0.1:{port}");

    // This process plays the application and the participants.
    let (layer, telemetry) =
        tandem_coordinator::telemetry::layer(&endpoint, "participants").unwrap();
    tracing_subscriber::registry().with(layer).init();

    let cluster = Cluster::start_with(
        1,
        Options {
            extra: vec!["--otlp-endpoint".into(), endpoint.clone()],
            ..Options::default()
        },
    );
    cluster.wait_leader(LEADER_TIMEOUT).await;
    let service = StepService::start().await;

    let app = tracing::info_span!("checkout");
    let traceparent = tandem_coordinator::telemetry::traceparent_for(&app, None).unwrap();
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();
    let steps: Vec<serde_json::Value> = ["reserve", "charge"]
        .iter()
        .map(|s| {
            json!({
                "branch_id": s,
                "action": participant_endpoint(&service.saga, "action"),
                "compensate": participant_endpoint(&service.saga, "compensate"),
            })
        })
        .collect();
    let body = json!({"gid": "traced-1", "steps": steps, "wait": true});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/sagas", cluster.node(1).http_url()))
        .header("traceparent", &traceparent)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let saga: serde_json::Value = response.json().await.unwrap();
    assert_eq!(saga["transaction"]["state"], "committed");
    drop(app);
    drop(telemetry); // flushes this process's spans

    let spans = wait_for(Duration::from_secs(15), "every span of the trace", || {
        let receiver = receiver.clone();
        let trace_id = trace_id.clone();
        async move {
            let spans: Vec<Received> = receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            let of = |service: &str| spans.iter().filter(|s| s.service == service).count();
            // app + 2 participants; request + 2 branch calls.
            (of("participants") >= 3 && of("tandem") >= 3).then_some(spans)
        }
    })
    .await;
    let find = |service: &str, name: &str| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    let app = find("participants", "checkout");
    assert_eq!(app.len(), 1, "{spans:#?}");
    let request = find("tandem", "SubmitSaga");
    assert_eq!(request.len(), 1, "{spans:#?}");
    assert_eq!(
        request[0].parent_span_id, app[0].span_id,
        "the request is the app's child"
    );
    for step in ["reserve", "charge"] {
        let call = find("tandem", &format!("action {step}"));
        assert_eq!(call.len(), 1, "{step}: {spans:#?}");
        assert_eq!(
            call[0].parent_span_id, request[0].span_id,
            "{step}: a branch call is the request's child"
        );
        let work = find("participants", &format!("action {step}"));
        assert_eq!(work.len(), 1, "{step}: {spans:#?}");
        assert_eq!(
            work[0].parent_span_id, call[0].span_id,
            "{step}: the participant's span is the call's child"
        );
    }
}
