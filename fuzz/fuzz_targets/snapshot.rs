//! A snapshot as it arrives from the leader or lies on disk: the file
//! layout (magic, checksum, metadata) and the state machine's encoding
//! inside it are refused or read, never a panic. The fuzzer's bytes are
//! also sealed with a valid checksum, so they reach the parser behind it;
//! a state that reads is written again, read again, and its transactions
//! (the finished ones kept encoded) read back the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tandem_coordinator::raft::storage::{decode_snapshot_file, frame_snapshot_file};
use tandem_coordinator::state::{ListFilter, StateMachine};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.snap");
    let _ = decode_snapshot_file(path, data);
    if let Ok(snapshot) = decode_snapshot_file(path, &frame_snapshot_file(data)) {
        let _ = StateMachine::decode_snapshot(snapshot.get_data());
    }
    if let Ok(sm) = StateMachine::decode_snapshot(data) {
        let bytes = sm.snapshot_source().encode();
        let again = StateMachine::decode_snapshot(&bytes).expect("re-encoded state reads back");
        assert_eq!(again.snapshot_source().encode(), bytes);
        // Finished transactions are kept sealed (encoded) and decoded when
        // read: every one a List page reads must decode, and the same on
        // both sides.
        let page = sm.view(0).list(&ListFilter::default(), 1_000, None);
        for tx in &page.txs {
            assert_eq!(again.get(&tx.gid).as_ref(), Some(tx), "{}", tx.gid);
        }
    }
});
