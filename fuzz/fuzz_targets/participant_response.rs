//! A participant's answer, however odd (any status, any body, any gRPC
//! code and message): it is classified as DESIGN §3 says — HTTP 2xx
//! success, 409 a business "no", anything else transient; gRPC ABORTED and
//! FAILED_PRECONDITION a "no" — its text is bounded, and recording it in
//! the log is applied or refused, never a panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tandem_coordinator::branch::{grpc_outcome, http_outcome};
use tandem_coordinator::model::command::BranchSpec;
use tandem_coordinator::model::validate::ERROR_BYTES_MAX;
use tandem_coordinator::model::{
    ApplyContext, Command, Op, OpOutcome, Protocol, RetryPolicy, TxOptions,
};
use tandem_coordinator::state::StateMachine;

#[derive(Arbitrary, Debug)]
struct Answer<'a> {
    status: u16,
    body: &'a [u8],
    grpc_code: i32,
    grpc_message: &'a str,
    op: u8,
}

/// Room for the fixed words put in front of a participant's own text.
const PREFIX_BYTES_MAX: usize = 64;

fn bounded(outcome: &OpOutcome) {
    let text = match outcome {
        OpOutcome::Failed(m) | OpOutcome::Transient(m) => m,
        _ => return,
    };
    assert!(
        text.len() <= ERROR_BYTES_MAX + PREFIX_BYTES_MAX,
        "{} bytes of error text",
        text.len()
    );
}

fn machine() -> StateMachine {
    let mut sm = StateMachine::new(Default::default());
    let begin = Command::Begin {
        gid: "g".into(),
        protocol: Protocol::TwoPc,
        options: TxOptions {
            timeout_ms: 60_000,
            retry: RetryPolicy {
                initial_interval_ms: 10,
                max_interval_ms: 100,
                max_attempts: 3,
            },
            branch_timeout_ms: 1_000,
            concurrency: 0,
        },
        payload: Default::default(),
        now_ms: 1,
    };
    let register = Command::RegisterBranch {
        gid: "g".into(),
        branch: BranchSpec {
            branch_id: "b".into(),
            ops: [Op::Prepare, Op::Commit, Op::Rollback]
                .into_iter()
                .map(|op| (op, "http://127.0.0.1:1/b".to_string()))
                .collect(),
            payload: Default::default(),
        },
        now_ms: 2,
    };
    let commit = Command::Commit {
        gid: "g".into(),
        now_ms: 3,
    };
    for (i, c) in [begin, register, commit].into_iter().enumerate() {
        sm.apply(
            c,
            ApplyContext {
                index: i as u64 + 1,
                term: 1,
            },
        )
        .expect("a valid 2PC start");
    }
    sm
}

fuzz_target!(|answer: Answer<'_>| {
    let http = http_outcome(answer.status, answer.body);
    match (answer.status, &http) {
        (200..=299, OpOutcome::Succeeded) => {}
        (409, OpOutcome::Failed(_)) => {}
        (s, OpOutcome::Transient(_)) if !(200..=299).contains(&s) && s != 409 => {}
        (s, o) => panic!("HTTP {s} classified as {o:?}"),
    }
    bounded(&http);
    let code = tonic::Code::from_i32(answer.grpc_code);
    let grpc = grpc_outcome(code, answer.grpc_message);
    match (code, &grpc) {
        (tonic::Code::Ok, OpOutcome::Succeeded) => {}
        (tonic::Code::Aborted | tonic::Code::FailedPrecondition, OpOutcome::Failed(_)) => {}
        (c, OpOutcome::Transient(_))
            if !matches!(
                c,
                tonic::Code::Ok | tonic::Code::Aborted | tonic::Code::FailedPrecondition
            ) => {}
        (c, o) => panic!("gRPC {c:?} classified as {o:?}"),
    }
    bounded(&grpc);
    // Recorded in the log, for any op of the branch: taken or refused.
    let op = [Op::Prepare, Op::Commit, Op::Rollback][usize::from(answer.op) % 3];
    let mut sm = machine();
    for (i, outcome) in [http, grpc].into_iter().enumerate() {
        let command = Command::OpResult {
            gid: "g".into(),
            branch_id: "b".into(),
            op,
            outcome,
            now_ms: 10,
        };
        let _ = sm.apply(
            command,
            ApplyContext {
                index: 10 + i as u64,
                term: 1,
            },
        );
    }
});
