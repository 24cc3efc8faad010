//! The direct lane to a peer: the Raft loop writes a turn's messages to
//! the peer's socket itself while the peer's task has nothing to write.
//!
//! Without it every batch is queued for the peer's task, and the task must
//! be woken to write it: on two cores each wake-up is a context switch and
//! a wait for a core, and a Raft round has two of them on its way (the
//! leader's appends out, a follower's answer back). The loop's write is a
//! non-blocking one on a second descriptor of the link's socket; what the
//! socket does not take at once goes to the task, which writes it before
//! anything else. Order is kept by one rule: the loop writes directly only
//! when nothing it queued before is still unwritten (`queued` is zero), so
//! bytes on a link are always in the order the loop sent them. Plaintext
//! peer-wire links only: under TLS the session owns every byte, over gRPC
//! the stream does (BENCHMARKS.md, sixteenth session).
//!
//! Its other end is `inbound.rs`: the receiving node's loop reads the
//! link itself. **Both on by default**; `TANDEM_RAFT_DIRECT_LANE=0` in a
//! node's environment turns both off (every batch then goes through the
//! peers' tasks, as before the lane), `=write` keeps this half only. How
//! batches leave is counted in `tandem_raft_peer_batches_total{way}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use raft::eraftpb::Message;
use tokio::sync::mpsc;

use super::wire;
use crate::metrics::PeerBatch;

/// Whether links offer the loop their socket (see the module's note).
static ENABLED: AtomicBool = AtomicBool::new(true);
/// Whether the loop reads admitted plaintext links itself (`inbound.rs`).
static READS: AtomicBool = AtomicBool::new(true);

/// Turns the direct lane on or off for links opened from now on.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Reads `TANDEM_RAFT_DIRECT_LANE` once, at a node's start: `0` turns
/// the lane off both ways, `write` leaves the loop writing but not
/// reading; anything else, or nothing, is both.
pub fn enable_from_env() {
    let setting = std::env::var("TANDEM_RAFT_DIRECT_LANE").unwrap_or_default();
    enable(setting != "0");
    READS.store(setting != "0" && setting != "write", Ordering::Relaxed);
}

pub(super) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a node's Raft loop reads its peers' plaintext links itself.
pub(super) fn reads() -> bool {
    READS.load(Ordering::Relaxed)
}

/// What a peer's task is given to send.
pub(super) enum Out {
    Message(Message),
    /// The frames the loop could not finish writing on link `link` (the
    /// socket's buffer was full): written first, and on that link only —
    /// on another they would begin with half a frame.
    Rest {
        link: u64,
        bytes: Vec<u8>,
    },
}

/// A plaintext link's socket, for the loop: a second descriptor of it
/// (non-blocking, as tokio set it), and whether the link has seen the
/// peer close.
pub struct DirectSocket {
    socket: std::net::TcpStream,
    closed: Arc<AtomicBool>,
}

impl DirectSocket {
    pub(super) fn new(socket: std::net::TcpStream, closed: Arc<AtomicBool>) -> DirectSocket {
        DirectSocket { socket, closed }
    }
}

/// How far a direct write got.
enum Written {
    /// Every byte is in the socket.
    All,
    /// The socket's buffer is full and took nothing: queue as usual.
    Nothing,
    /// The first `n` bytes went; the rest must follow on this link.
    Part(usize),
    /// The socket failed, perhaps with a frame cut.
    Failed,
}

impl DirectSocket {
    /// Writes `bytes` as far as the socket takes them in one write: a
    /// short write means its buffer is full, and the rest is the task's —
    /// the loop never writes on while a reader drains (it has a Raft
    /// round to run).
    fn write(&self, bytes: &[u8]) -> Written {
        use std::io::Write as _;
        if self.closed.load(Ordering::Relaxed) {
            return Written::Failed;
        }
        loop {
            return match (&self.socket).write(bytes) {
                Ok(n) if n == bytes.len() => Written::All,
                Ok(0) => Written::Failed,
                Ok(n) => Written::Part(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Written::Nothing,
                Err(_) => Written::Failed,
            };
        }
    }
}

/// One peer's lane, shared by the loop (which sends) and the peer's task
/// (which writes what was queued, and opens and closes links).
#[derive(Default)]
pub(super) struct Lane {
    /// The current link's number and its socket; `None` while the task has
    /// no plaintext link.
    socket: Option<(u64, DirectSocket)>,
    /// Items queued for the task and not yet written (or given up) by it.
    queued: usize,
    /// The loop's write buffer.
    out: Vec<u8>,
    /// Batches the loop wrote directly, and those it finished through the
    /// task (tests: that a run took both ways).
    #[cfg(test)]
    pub(super) counts: (usize, usize),
}

impl Lane {
    /// The task opened link `link`; `socket` when the loop may write to it.
    pub(super) fn open(&mut self, link: u64, socket: Option<DirectSocket>) {
        self.close();
        self.socket = socket.map(|s| (link, s));
    }

    /// Ends the lane: its link is gone, or a frame on it was cut and will
    /// never be finished (shut down, so the peer does not read what would
    /// follow as the frame's end).
    pub(super) fn close(&mut self) {
        if let Some((_, direct)) = self.socket.take() {
            let _ = direct.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Queues `out` for the task; false when its queue is full or gone.
    pub(super) fn queue(&mut self, queue: &mpsc::Sender<Out>, out: Out) -> bool {
        let queued = queue.try_send(out).is_ok();
        self.queued += usize::from(queued);
        queued
    }

    /// The task wrote (or gave up) `count` items it took from its queue.
    pub(super) fn written(&mut self, count: usize) {
        self.queued -= count;
    }

    /// Ordinary messages for the peer, in order: written to its socket now
    /// when nothing queued is unwritten, queued for the task otherwise (a
    /// full queue drops them, and raft sends them again).
    pub(super) fn send(&mut self, queue: &mpsc::Sender<Out>, messages: Vec<Message>) {
        let mut way = PeerBatch::Queued;
        if self.queued == 0
            && let Some((link, direct)) = &self.socket
        {
            let link = *link;
            self.out.clear();
            for message in &messages {
                wire::encode(&mut self.out, message);
            }
            match direct.write(&self.out) {
                Written::All => way = PeerBatch::Direct,
                Written::Part(n) => {
                    way = PeerBatch::Part;
                    let rest = Out::Rest {
                        link,
                        bytes: self.out[n..].to_vec(),
                    };
                    if !self.queue(queue, rest) {
                        // The task is gone, and its link with it.
                        self.close();
                    }
                }
                Written::Nothing => {}
                // The task finds the link broken, opens another and sends
                // these there; raft takes a message received twice as once.
                Written::Failed => self.close(),
            }
            wire::keep_buffer_small(&mut self.out);
        }
        crate::metrics::peer_batch(way);
        #[cfg(test)]
        {
            self.counts.0 += usize::from(way == PeerBatch::Direct);
            self.counts.1 += usize::from(way == PeerBatch::Part);
        }
        if way == PeerBatch::Queued {
            for message in messages {
                self.queue(queue, Out::Message(message));
            }
        }
    }
}
