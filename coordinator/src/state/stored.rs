//! How the table keeps a transaction. Unfinished, as the structure the
//! protocol rules change; finished, *sealed*: as its encoding — the very
//! bytes a snapshot lays it out as — beside the few fields a List filter
//! and Gc look at.
//!
//! A finished transaction is read rarely (a status call, a List page, a
//! repeated submission, an operator's repair) and kept long (the
//! retention): held as a structure it was ~40 allocations scattered over
//! the heap, re-encoded by every snapshot while retained and freed, cold,
//! by Gc. Sealed it is two allocations, a snapshot copies its bytes, and a
//! read decodes it. The encoding is the snapshot's, so a sealed
//! transaction and an open one are the same record on disk.

use std::sync::Arc;

use crate::model::types::{Protocol, Transaction, TxState};

/// The encoding buffer is kept between seals up to this size.
const SCRATCH_KEPT_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub(super) enum Stored {
    /// Unfinished (or restored unfinished): changed in place by `apply`.
    Open(Arc<Transaction>),
    /// Finished: kept encoded.
    Sealed(Arc<Sealed>),
}

#[derive(Debug)]
pub(super) struct Sealed {
    protocol: Protocol,
    state: TxState,
    updated_at_ms: i64,
    finished_at_ms: i64,
    /// `postcard` of the [`Transaction`], as a snapshot's sequence holds it.
    encoded: Box<[u8]>,
}

impl Stored {
    /// How the table keeps `tx`: sealed once it is finished. `scratch` is
    /// the caller's reusable encoding buffer.
    pub fn keep(tx: Arc<Transaction>, scratch: &mut Vec<u8>) -> Stored {
        let Some(finished_at_ms) = tx.finished_at_ms else {
            return Stored::Open(tx);
        };
        scratch.clear();
        crate::codec::append(tx.as_ref(), scratch);
        let sealed = Stored::Sealed(Arc::new(Sealed {
            protocol: tx.protocol,
            state: tx.state,
            updated_at_ms: tx.updated_at_ms,
            finished_at_ms,
            encoded: scratch.as_slice().into(),
        }));
        // A large transaction (up to the 16 MiB hard limit) does not leave
        // its size behind in the buffer.
        if scratch.capacity() > SCRATCH_KEPT_MAX {
            *scratch = Vec::new();
        }
        sealed
    }

    /// The transaction, decoded if it is sealed (a new copy each time).
    pub fn transaction(&self) -> Arc<Transaction> {
        match self {
            Stored::Open(tx) => tx.clone(),
            Stored::Sealed(sealed) => Arc::new(
                // The bytes were encoded from a `Transaction` by this
                // build: a failure is a bug, not an input to handle.
                postcard::from_bytes(&sealed.encoded)
                    .expect("a sealed transaction decodes as it was encoded"),
            ),
        }
    }

    /// The transaction if it is unfinished (never sealed).
    pub fn open(&self) -> Option<&Arc<Transaction>> {
        match self {
            Stored::Open(tx) => Some(tx),
            Stored::Sealed(_) => None,
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Stored::Open(tx) => tx.protocol,
            Stored::Sealed(s) => s.protocol,
        }
    }

    pub fn state(&self) -> TxState {
        match self {
            Stored::Open(tx) => tx.state,
            Stored::Sealed(s) => s.state,
        }
    }

    pub fn updated_at_ms(&self) -> i64 {
        match self {
            Stored::Open(tx) => tx.updated_at_ms,
            Stored::Sealed(s) => s.updated_at_ms,
        }
    }

    pub fn finished_at_ms(&self) -> Option<i64> {
        match self {
            Stored::Open(tx) => tx.finished_at_ms,
            Stored::Sealed(s) => Some(s.finished_at_ms),
        }
    }

    /// Appends the transaction's snapshot record: the sealed bytes as they
    /// are, an open transaction encoded now.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Stored::Open(tx) => crate::codec::append(tx.as_ref(), out),
            Stored::Sealed(s) => out.extend_from_slice(&s.encoded),
        }
    }
}
