//! Peers' links read by the Raft loop itself: the direct lane's other end.
//!
//! Without this, a batch arriving from a peer wakes the tokio task that
//! reads its connection, which decodes it and hands it to the Raft loop
//! through a channel, waking the loop's thread: two wake-ups, each a
//! context switch and a wait for a core on two cores (BENCHMARKS.md,
//! sixteenth session), on both ends of every round. Here a plaintext
//! peer-wire connection, once its handshake is done (`wire.rs`), is
//! handed to the loop, which waits on its sockets and its input channels
//! at once (one `epoll` set, and an `eventfd` rung by whoever sends it an
//! input while it sleeps) and reads whatever arrived at the start of a
//! turn: one wake-up. With the direct lane a round on the wire is then
//! leader loop → follower loop → leader loop, with no task in between.
//!
//! What stays with tokio: TLS links (the session owns the bytes) and the
//! gRPC stream, which hand their batches over the channel as before.
//! Each message's sender is checked as there (`Transport::accepts`); a bad
//! frame, a message from another sender, the peer closing or the
//! isolating failpoint closes the link, and the peer reconnects.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_channel::{SendError, Sender, TrySendError};
use mio::{Events, Interest, Poll, Token, Waker};
use raft::eraftpb::Message;

use super::transport::Transport;
use super::wire;

/// The doorbell's token; links count from 1.
const BELL: Token = Token(0);
/// What one link may give a turn before the turn moves on (what is left
/// is read at the next turn, without waiting): a turn is never one
/// peer's alone.
const READ_PER_TURN: usize = 1 << 20;
/// Links read at once. A node keeps one per sender (a newer link from a
/// sender replaces its older one), so this bounds the senders; past it,
/// the oldest link is closed.
const LINKS_MAX: usize = 32;
/// What one read takes at most.
const READ_ROOM: usize = 64 << 10;
/// A link's buffer, once empty, goes back to nothing past this size.
const BUFFER_KEPT: usize = 1 << 20;

/// Wakes the Raft loop when it sleeps and something was sent to it.
pub struct Doorbell {
    /// Set by the loop just before it waits, cleared when it wakes.
    asleep: AtomicBool,
    waker: Waker,
}

impl Doorbell {
    fn ring(&self) {
        // Pairs with the fence in `Inbound::wait`: either this sees the
        // loop asleep, or the loop sees what was sent before this.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}

/// A sender of the Raft loop's inputs that rings its doorbell: every
/// input reaches a loop asleep in [`Inbound::wait`] at once. Without a
/// doorbell (the simulation drains its channels itself) a plain sender.
pub struct Inputs<T> {
    tx: Sender<T>,
    bell: Option<Arc<Doorbell>>,
}

impl<T> Clone for Inputs<T> {
    fn clone(&self) -> Self {
        Inputs {
            tx: self.tx.clone(),
            bell: self.bell.clone(),
        }
    }
}

impl<T> Inputs<T> {
    pub fn new(tx: Sender<T>, bell: Option<Arc<Doorbell>>) -> Inputs<T> {
        Inputs { tx, bell }
    }

    pub fn try_send(&self, input: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(input)?;
        self.ring();
        Ok(())
    }

    pub fn send(&self, input: T) -> Result<(), SendError<T>> {
        self.tx.send(input)?;
        self.ring();
        Ok(())
    }

    fn ring(&self) {
        if let Some(bell) = &self.bell {
            bell.ring();
        }
    }
}

/// A plaintext peer-wire connection past its handshake, for the loop to
/// read: `from` is the sender the handshake admitted.
pub struct InboundLink {
    pub(super) from: u64,
    pub(super) socket: std::net::TcpStream,
    /// The listener's place the connection holds while it is open.
    pub(super) place: Option<tokio::sync::OwnedSemaphorePermit>,
}

struct Reader {
    from: u64,
    socket: mio::net::TcpStream,
    buffer: BytesMut,
    /// When it was adopted, in adoptions: the oldest goes first.
    age: u64,
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The loop's wait: its links and its doorbell in one poll.
pub(super) struct Inbound {
    poll: Poll,
    events: Events,
    bell: Arc<Doorbell>,
    links: HashMap<Token, Reader>,
    next_token: usize,
    adopted: u64,
    /// Links to read this turn: readable, or not drained last turn.
    ready: Vec<Token>,
    /// What a read lands in before the link's buffer takes it.
    scratch: Vec<u8>,
}

impl Inbound {
    pub(super) fn new() -> std::io::Result<Inbound> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), BELL)?;
        Ok(Inbound {
            poll,
            events: Events::with_capacity(LINKS_MAX + 1),
            bell: Arc::new(Doorbell {
                asleep: AtomicBool::new(false),
                waker,
            }),
            links: HashMap::new(),
            next_token: 1,
            adopted: 0,
            ready: Vec::new(),
            scratch: vec![0; READ_ROOM],
        })
    }

    pub(super) fn bell(&self) -> Arc<Doorbell> {
        self.bell.clone()
    }

    /// Takes a link over. An older link from the same sender is closed
    /// (the sender has given it up), and the oldest link when there are
    /// [`LINKS_MAX`].
    pub(super) fn adopt(&mut self, link: InboundLink) {
        let InboundLink {
            from,
            socket,
            place,
        } = link;
        let older: Vec<Token> = self
            .links
            .iter()
            .filter(|(_, r)| r.from == from)
            .map(|(t, _)| *t)
            .collect();
        for token in older {
            self.close(token, "the sender opened a newer link");
        }
        if self.links.len() >= LINKS_MAX
            && let Some(oldest) = self
                .links
                .iter()
                .min_by_key(|(_, r)| r.age)
                .map(|(t, _)| *t)
        {
            self.close(oldest, "too many links");
        }
        let mut socket = mio::net::TcpStream::from_std(socket);
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
        {
            tracing::warn!(from, error = %e, "cannot wait on a peer's link; it is closed");
            return;
        }
        self.adopted += 1;
        self.links.insert(
            token,
            Reader {
                from,
                socket,
                buffer: BytesMut::new(),
                age: self.adopted,
                _place: place,
            },
        );
        // Bytes may have arrived between the handshake and now.
        self.ready.push(token);
    }

    /// Sleeps until a link has bytes, the doorbell rings or `timeout`
    /// passes — not at all when `idle` says inputs are waiting (asked after
    /// the loop is marked asleep, so a send in between rings) or a link
    /// was not drained.
    pub(super) fn wait(&mut self, timeout: Duration, idle: impl Fn() -> bool) {
        let mut timeout = if self.ready.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        if !timeout.is_zero() {
            self.bell.asleep.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if !idle() {
                timeout = Duration::ZERO;
            }
        }
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            tracing::error!(error = %e, "waiting on peers' links failed");
            std::thread::sleep(timeout.min(Duration::from_millis(10)));
        }
        self.bell.asleep.store(false, Ordering::Relaxed);
        for event in &self.events {
            let token = event.token();
            if token != BELL && !self.ready.contains(&token) {
                self.ready.push(token);
            }
        }
    }

    /// Reads the links that have bytes and returns the messages in them,
    /// each link's in the order sent. A link that ends (the peer closed,
    /// the connection failed: what it sent before is kept) or fails (a
    /// bad frame, a message not from its sender, isolated by the
    /// failpoint: nothing of that read is kept) is closed.
    pub(super) fn read(&mut self, transport: &Transport) -> Vec<Message> {
        let mut messages = Vec::new();
        let tokens = std::mem::take(&mut self.ready);
        for token in tokens {
            let Some(reader) = self.links.get_mut(&token) else {
                continue;
            };
            match reader.read(transport, &mut self.scratch, &mut messages) {
                Ok(Read::Drained) => {}
                Ok(Read::More) => self.ready.push(token),
                Ok(Read::Ended(why)) | Err(why) => self.close(token, &why),
            }
        }
        messages
    }

    fn close(&mut self, token: Token, why: &str) {
        if let Some(mut reader) = self.links.remove(&token) {
            tracing::debug!(from = reader.from, why, "a peer-wire link ended");
            let _ = self.poll.registry().deregister(&mut reader.socket);
            let _ = reader.socket.shutdown(std::net::Shutdown::Both);
        }
        self.ready.retain(|t| *t != token);
    }

    /// Links open (tests).
    #[cfg(test)]
    pub(super) fn links(&self) -> usize {
        self.links.len()
    }
}

/// How a link's read ended.
enum Read {
    /// The socket has nothing more now.
    Drained,
    /// The turn's share was read; more may wait (read next turn).
    More,
    /// The peer closed, or the connection failed: what came before is
    /// good, the link is done.
    Ended(String),
}

impl Reader {
    /// Reads what the socket holds, up to a turn's worth, and decodes the
    /// whole frames into `messages`. An error is a bad frame or a message
    /// not from the link's sender: then nothing of this read is kept.
    fn read(
        &mut self,
        transport: &Transport,
        scratch: &mut [u8],
        messages: &mut Vec<Message>,
    ) -> Result<Read, String> {
        let mut taken = 0;
        let end = loop {
            if taken >= READ_PER_TURN {
                break Read::More;
            }
            match self.socket.read(scratch) {
                Ok(0) => break Read::Ended("the peer closed the connection".into()),
                Ok(n) => {
                    self.buffer.extend_from_slice(&scratch[..n]);
                    taken += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Read::Drained,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Read::Ended(e.to_string()),
            }
        };
        if transport.isolated() {
            return Err("isolated by failpoint".into());
        }
        let start = messages.len();
        let decoded = (|| {
            while let Some(message) = wire::next_frame(&mut self.buffer)? {
                transport
                    .accepts(&message, self.from)
                    .map_err(|s| s.message().to_string())?;
                messages.push(message);
            }
            Ok::<_, String>(())
        })();
        if let Err(why) = decoded {
            messages.truncate(start);
            return Err(why);
        }
        if self.buffer.is_empty() && self.buffer.capacity() > BUFFER_KEPT {
            // A large message came through; do not hold its room.
            self.buffer = BytesMut::new();
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::transport::PeerNet;
    use crate::raft::wire::tests::{closed_soon, hello, message};
    use crate::raft::wire::{connect, starts_with_magic};
    use crossbeam_channel::Receiver;
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// Node 1 of cluster `c` on a loopback port, its plaintext links
    /// going to a loop of its own (as `server.rs` and `node.rs` do).
    async fn loop_node() -> (String, Transport, Receiver<InboundLink>, Inbound) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let transport = Transport::new(
            1,
            address.clone(),
            "c".into(),
            None,
            tokio::runtime::Handle::current(),
        );
        let inbound = Inbound::new().unwrap();
        let (peers, _) = crossbeam_channel::bounded(16);
        let (links_tx, links_rx) = crossbeam_channel::bounded(16);
        transport.set_loop(
            Inputs::new(peers, Some(inbound.bell())),
            Some(Inputs::new(links_tx, Some(inbound.bell()))),
        );
        let serving = transport.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if starts_with_magic(&tcp).await {
                    serving.serve_wire_tcp(tcp, None);
                }
            }
        });
        (address, transport, links_rx, inbound)
    }

    /// Runs the loop's side on a thread of its own until `count` messages
    /// were read or `within` passed; what was read, and the links left open.
    fn read_on_a_thread(
        transport: Transport,
        links: Receiver<InboundLink>,
        mut inbound: Inbound,
        count: usize,
        within: Duration,
    ) -> std::thread::JoinHandle<(Vec<Message>, usize)> {
        std::thread::spawn(move || {
            let deadline = Instant::now() + within;
            let mut got = Vec::new();
            while got.len() < count && Instant::now() < deadline {
                inbound.wait(Duration::from_millis(50), || links.is_empty());
                while let Ok(link) = links.try_recv() {
                    inbound.adopt(link);
                }
                got.extend(inbound.read(&transport));
            }
            (got, inbound.links())
        })
    }

    /// What a [`read_on_a_thread`] got and the links it kept open, waited
    /// for without holding up the runtime.
    async fn joined(
        reading: std::thread::JoinHandle<(Vec<Message>, usize)>,
    ) -> (Vec<Message>, usize) {
        tokio::task::spawn_blocking(move || reading.join().unwrap())
            .await
            .unwrap()
    }

    /// Atomicity (the log a follower builds is the leader's): what a peer's
    /// loop writes (directly, or finished by its task) reaches this loop's
    /// own reads whole and in the order sent — frames cut across reads,
    /// messages larger than a turn's read included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn atomicity_messages_read_by_the_loop_arrive_whole_and_in_order() {
        crate::raft::lane::enable(true);
        let (address, transport, links, inbound) = loop_node().await;
        let sent: Vec<Message> = (0..3_000)
            .map(|i| {
                let mut m = message(i);
                if i % 500 == 250 || i == 2_999 {
                    // More than a turn reads from one link; the last one
                    // with nothing after it to make the socket readable
                    // again (the rest must be read without a new event).
                    m.mut_entries()[0].data = vec![7u8; 8 << 20].into();
                }
                m
            })
            .collect();
        let reading = read_on_a_thread(
            transport,
            links,
            inbound,
            sent.len(),
            Duration::from_secs(20),
        );
        let sender = Transport::new(
            2,
            "127.0.0.1:7002".into(),
            "c".into(),
            None,
            tokio::runtime::Handle::current(),
        );
        sender.set_addresses(BTreeMap::from([(1, address)]));
        let batches: Vec<Vec<Message>> = sent.chunks(7).map(<[Message]>::to_vec).collect();
        let sending = std::thread::spawn(move || {
            for batch in batches {
                PeerNet::send(&sender, batch);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let (got, _) = joined(reading).await;
        sending.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the messages arrived changed or out of order");
    }

    /// Durability: a message not from the admitted sender closes the link,
    /// and nothing read with it reaches the loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durability_a_forged_sender_closes_a_link_the_loop_reads() {
        let (address, transport, links, inbound) = loop_node().await;
        let reading = read_on_a_thread(transport, links, inbound, 1, Duration::from_secs(3));
        let mut link = connect(&address, None, &hello("c", 2)).await.unwrap();
        let mut forged = message(1);
        forged.from = 3;
        link.send(&[message(0), forged]).await.unwrap();
        assert!(closed_soon(&mut link).await, "the loop kept the link open");
        let (got, _) = joined(reading).await;
        assert!(
            got.is_empty(),
            "a message of that read reached the loop: {got:?}"
        );
    }

    /// No blocking: what a peer sent just before it closed reaches the
    /// loop (read with the close, it is not dropped with the link: raft
    /// would only resend it a heartbeat later), and the link is let go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_blocking_what_a_peer_sent_before_closing_reaches_the_loop() {
        let (address, transport, links, inbound) = loop_node().await;
        let mut link = connect(&address, None, &hello("c", 2)).await.unwrap();
        let sent: Vec<Message> = (0..50).map(message).collect();
        link.send(&sent).await.unwrap();
        drop(link);
        // The bytes and the close are both there before the first read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reading = read_on_a_thread(
            transport,
            links,
            inbound,
            sent.len(),
            Duration::from_secs(5),
        );
        let (got, open) = joined(reading).await;
        assert_eq!(got, sent);
        assert_eq!(open, 0, "a closed link was kept");
    }

    /// No blocking: a sender that reconnects replaces its older link (the
    /// loop keeps one per sender), and what it sends on the new one is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_blocking_a_newer_link_from_a_sender_replaces_its_older_one() {
        let (address, transport, links, inbound) = loop_node().await;
        let reading = read_on_a_thread(transport, links, inbound, 2, Duration::from_secs(20));
        let mut first = connect(&address, None, &hello("c", 2)).await.unwrap();
        first.send(&[message(0)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut second = connect(&address, None, &hello("c", 2)).await.unwrap();
        second.send(&[message(1)]).await.unwrap();
        let (got, open) = joined(reading).await;
        assert_eq!(got, vec![message(0), message(1)]);
        assert_eq!(open, 1, "the older link was kept");
        assert!(
            closed_soon(&mut first).await,
            "the older link was not closed"
        );
    }

    /// No blocking: an input sent while the loop sleeps wakes it at once,
    /// not at the end of its wait — including one sent just as it goes to
    /// sleep (the doorbell's race), many times over.
    #[test]
    fn no_blocking_an_input_wakes_the_sleeping_loop_at_once() {
        let mut inbound = Inbound::new().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let inputs = Inputs::new(tx, Some(inbound.bell()));
        let sending = std::thread::spawn(move || {
            for i in 0..2_000u32 {
                if i % 2 == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
                inputs.send(i).unwrap();
            }
        });
        let mut got = 0;
        while got < 2_000 {
            let started = Instant::now();
            inbound.wait(Duration::from_secs(2), || rx.is_empty());
            let waited = started.elapsed();
            assert!(
                waited < Duration::from_secs(1),
                "a wait outlasted the input that should have ended it: {waited:?} after {got} inputs"
            );
            while rx.try_recv().is_ok() {
                got += 1;
            }
        }
        sending.join().unwrap();
    }
}
