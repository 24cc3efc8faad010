//! A log entry's bytes, as a peer or the disk hands them over: they decode
//! to a command or to an error; a command that decodes is applied or
//! refused by `apply` (never a panic: a node that panics on an entry it
//! committed cannot come back), and the state it leaves snapshots and
//! reads back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_coordinator::codec;
use tandem_coordinator::model::{ApplyContext, Command};
use tandem_coordinator::state::StateMachine;

fuzz_target!(|data: &[u8]| {
    let Ok(command) = codec::decode::<Command>(data) else {
        return;
    };
    let mut sm = StateMachine::new(Default::default());
    let _ = sm.apply(command.clone(), ApplyContext { index: 1, term: 1 });
    // Twice: the second meets the state the first left (a duplicate entry).
    let _ = sm.apply(command, ApplyContext { index: 2, term: 1 });
    let bytes = sm.snapshot_source().encode();
    let back = StateMachine::decode_snapshot(&bytes).expect("a snapshot of any state reads back");
    assert_eq!(
        back.snapshot_source().encode(),
        bytes,
        "a snapshot reads back as it was"
    );
});
