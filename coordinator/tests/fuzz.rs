//! Bounded fuzzing in CI (property tests with random and mutated inputs):
//! what comes from disk or from peers — log entries and snapshots — must
//! decode to an error or to a value, never a panic; and a command that
//! decodes, however odd, must be applied or refused by `apply`, never crash
//! the state machine (durability: a node that panics on an entry it
//! committed cannot come back). `cargo fuzz` needs a nightly toolchain this
//! machine does not have; these run the same decoders on stable.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tandem_coordinator::codec;
use tandem_coordinator::model::command::{BranchSpec, SagaStepSpec};
use tandem_coordinator::model::types::{Op, Protocol, RetryPolicy, TxOptions};
use tandem_coordinator::model::{ApplyContext, Command, OpOutcome};
use tandem_coordinator::state::StateMachine;

fn options() -> TxOptions {
    TxOptions {
        timeout_ms: 60_000,
        retry: RetryPolicy {
            initial_interval_ms: 100,
            max_interval_ms: 1_000,
            max_attempts: 3,
        },
        branch_timeout_ms: 1_000,
        concurrency: 0,
    }
}

/// Valid commands of every kind, to mutate.
fn seeds() -> Vec<Command> {
    let spec = |id: &str, ops: &[Op]| BranchSpec {
        branch_id: id.into(),
        ops: ops
            .iter()
            .map(|op| (*op, format!("http://svc/{id}")))
            .collect(),
        payload: vec![1, 2, 3].into(),
    };
    vec![
        Command::Begin {
            gid: "g1".into(),
            protocol: Protocol::TwoPc,
            options: options(),
            payload: vec![9; 16].into(),
            now_ms: 1,
        },
        Command::RegisterBranch {
            gid: "g1".into(),
            branch: spec("b1", &[Op::Prepare, Op::Commit, Op::Rollback]),
            now_ms: 2,
        },
        Command::SubmitSaga {
            gid: "s1".into(),
            options: options(),
            steps: vec![SagaStepSpec {
                branch_id: "a".into(),
                action: "http://svc/a".into(),
                compensate: "http://svc/a".into(),
                payload: Default::default(),
                after: vec![],
                retry: None,
            }],
            payload: Default::default(),
            now_ms: 3,
        },
        Command::Commit {
            gid: "g1".into(),
            now_ms: 4,
        },
        Command::OpResult {
            gid: "g1".into(),
            branch_id: "b1".into(),
            op: Op::Prepare,
            outcome: OpOutcome::Retrying {
                attempts: 2,
                error: "down".into(),
                refused: false,
            },
            now_ms: 5,
        },
        Command::OpResults {
            gid: "s1".into(),
            results: vec![
                ("a".into(), Op::Action, OpOutcome::Succeeded),
                ("a".into(), Op::Compensate, OpOutcome::Failed("no".into())),
            ],
            exact: true,
            now_ms: 5,
        },
        Command::Timeout {
            gid: "g1".into(),
            now_ms: 6,
        },
        Command::AbortV2 {
            gid: "s1".into(),
            reason: "no".into(),
            now_ms: 6,
        },
        Command::TimeoutV2 {
            gid: "s1".into(),
            now_ms: 7,
        },
        Command::Gc {
            gids: vec!["g1".into()],
        },
    ]
}

/// A machine holding a few transactions, so mutated commands meet state.
fn machine() -> StateMachine {
    let mut sm = StateMachine::new(BTreeMap::new());
    for (i, c) in seeds().into_iter().take(3).enumerate() {
        let _ = sm.apply(
            c,
            ApplyContext {
                index: i as u64 + 1,
                term: 1,
            },
        );
    }
    sm
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, value) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= value;
        }
    }
    if let Some(n) = cut {
        bytes.truncate(n % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_arbitrary_bytes_never_panic_the_entry_or_snapshot_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode::<Command>(&bytes);
        let _ = StateMachine::decode_snapshot(&bytes);
    }

    #[test]
    fn fuzz_mutated_commands_decode_or_fail_and_apply_never_panics(
        which in 0usize..7,
        edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let bytes = mutate(codec::encode(&seeds()[which]), &edits, cut);
        if let Ok(command) = codec::decode::<Command>(&bytes) {
            let mut sm = machine();
            let _ = sm.apply(command, ApplyContext { index: 10, term: 2 });
            // And the state it leaves still makes a snapshot that reads back.
            let snapshot = sm.snapshot_source().encode();
            prop_assert!(StateMachine::decode_snapshot(&snapshot).is_ok());
        }
    }

    #[test]
    fn fuzz_mutated_snapshots_are_refused_or_read_never_panic(
        edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let bytes = mutate(machine().snapshot_source().encode(), &edits, cut);
        let _ = StateMachine::decode_snapshot(&bytes);
    }
}

/// The mutation test above means something only if mutated bytes often
/// still decode (and so reach `apply`): count them over fixed mutations.
#[test]
fn fuzz_mutations_often_still_decode_and_reach_apply() {
    let (mut decoded, mut tried) = (0, 0);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for which in 0..7 {
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let edit = [((x >> 8) as usize, ((x & 0xfe) | 1) as u8)];
            let bytes = mutate(codec::encode(&seeds()[which]), &edit, None);
            tried += 1;
            if let Ok(command) = codec::decode::<Command>(&bytes) {
                decoded += 1;
                let _ = machine().apply(command, ApplyContext { index: 10, term: 2 });
            }
        }
    }
    assert!(
        decoded * 10 > tried,
        "only {decoded} of {tried} mutated commands decoded"
    );
}
