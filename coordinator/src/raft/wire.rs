//! The peer wire: Raft messages from one node to another on a stream of
//! their own, without HTTP/2 or gRPC around them.
//!
//! A node sends to a peer over one connection it opens to the peer's gRPC
//! port; answers come back over the connection the peer opens the other
//! way, so each connection carries bytes one way after its handshake. On
//! the port the server tells it from gRPC by its first bytes ([`MAGIC`];
//! an HTTP/2 client starts with `PRI`), or under TLS by the application
//! protocol the handshake agreed on ([`ALPN`]).
//!
//! ```text
//! opener → node   MAGIC, then a frame: the hello (a RaftBatch with no
//!                 messages: cluster name, sender id, sender address)
//! node → opener   MAGIC, then a frame: empty = admitted, else why not
//!                 (and the node closes)
//! opener → node   frames, one raft Message each, until either side closes
//! frame           u32 big-endian length, then that many bytes
//! ```
//!
//! Why not the gRPC stream it replaces (`RaftTransport.Stream`, still
//! served, and still used towards a node that does not speak this): per
//! batch, the stream cost a hop through tonic's encoder task and hyper's
//! connection task on the sender, HTTP/2 framing and flow control on both
//! ends, and the same two hops on the receiver, so a follower spent about
//! a quarter of its CPU on its transport (BENCHMARKS.md, thirteenth
//! session). Here the sender's Raft loop writes the frames itself when the
//! peer's task has nothing queued (the direct lane, `lane.rs`), the task
//! otherwise; the receiver's Raft loop reads a plaintext link itself once
//! it is admitted (`inbound.rs`), and under TLS the connection's task
//! decodes the frames and hands them over. The admission checks are the
//! gRPC path's (`Transport::admit`), made once per connection, and each
//! message's sender is checked as there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tandem_proto::v1::RaftBatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::inbound::InboundLink;
use super::lane::DirectSocket;
use super::transport::{PEER_MESSAGE_BYTES_MAX, Transport};

/// A peer-wire connection's first bytes, both ways.
pub const MAGIC: &[u8; 8] = b"TNDMRFT1";
/// The TLS application protocol a peer-wire connection asks for.
pub const ALPN: &[u8] = b"tandem-raft/1";
/// The hello and the answer to it are small.
const HELLO_BYTES_MAX: usize = 64 << 10;
/// Waiting for the other end's side of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A write that makes no progress for this long means a stopped or
/// unreachable peer: the connection is given up (raft resends).
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// What the receiver reads at a time, at least.
const READ_ROOM: usize = 64 << 10;
/// A sender's write buffer shrinks back to this after a large batch.
const WRITE_BUFFER_KEPT: usize = 256 << 10;

/// Why a connection to a peer did not become a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No connection (refused, timed out, TLS failed): the peer is
    /// unreachable for now.
    #[error("{0}")]
    Unreachable(String),
    /// The peer answered, but not in this wire: a node of an older
    /// version. Its gRPC stream is the way to it.
    #[error("the peer does not speak the peer wire: {0}")]
    NotSpoken(String),
    /// The peer speaks the wire and refused this node (another cluster,
    /// a certificate that does not name this member).
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// An open connection to a peer, admitted: messages written to it reach
/// the peer's Raft loop.
pub struct Link {
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    /// Reads the other half until the peer closes: done means closed.
    watch: tokio::task::JoinHandle<()>,
    out: Vec<u8>,
    /// In plaintext, the socket for the Raft loop to write to itself (the
    /// direct lane, `lane.rs`); taken once.
    direct: Option<DirectSocket>,
}

/// What a link runs over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

impl Link {
    /// Writes `messages` as one write. An error means the link is gone.
    pub async fn send(&mut self, messages: &[Message]) -> Result<(), String> {
        if self.watch.is_finished() {
            return Err("the peer closed the connection".into());
        }
        self.out.clear();
        for message in messages {
            encode(&mut self.out, message);
        }
        let out = std::mem::take(&mut self.out);
        let written = self.write(&out).await;
        self.out = out;
        keep_buffer_small(&mut self.out);
        written
    }

    /// Writes bytes already framed: the rest of a write the Raft loop
    /// began on this link's socket (the direct lane).
    pub async fn send_framed(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.watch.is_finished() {
            return Err("the peer closed the connection".into());
        }
        self.write(bytes).await
    }

    /// The socket under a plaintext link, for the Raft loop to write to
    /// without waking this link's task; `None` under TLS (its bytes must
    /// go through the session) or once taken.
    pub fn take_direct(&mut self) -> Option<DirectSocket> {
        self.direct.take()
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.writer.write_all(bytes)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "a write made no progress for {} s",
                WRITE_TIMEOUT.as_secs()
            )),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// A write buffer that held a large batch goes back to its usual size.
pub(super) fn keep_buffer_small(out: &mut Vec<u8>) {
    if out.capacity() > WRITE_BUFFER_KEPT {
        *out = Vec::with_capacity(WRITE_BUFFER_KEPT);
    }
}

/// Appends `message` as a frame.
pub(super) fn encode(out: &mut Vec<u8>, message: &Message) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Writing a message into memory cannot fail.
    message
        .write_to_vec(out)
        .expect("encoding a raft message into memory");
    let length = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&length.to_be_bytes());
}

/// MAGIC, then `body` as a frame.
fn greeting(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Why the other end's side of the handshake did not arrive.
enum Unheard {
    /// Its first bytes were not MAGIC: it does not speak the wire.
    Other,
    /// It closed, or the connection broke, before MAGIC.
    Closed(std::io::Error),
    /// MAGIC, then something wrong.
    Bad(String),
}

/// Reads MAGIC and one frame of at most [`HELLO_BYTES_MAX`]: the other
/// end's side of the handshake.
async fn read_greeting<R: AsyncRead + Unpin>(io: &mut R) -> Result<Vec<u8>, Unheard> {
    let mut magic = [0u8; 8];
    io.read_exact(&mut magic).await.map_err(Unheard::Closed)?;
    if &magic != MAGIC {
        return Err(Unheard::Other);
    }
    let bad = |e: std::io::Error| Unheard::Bad(format!("reading the handshake: {e}"));
    let length = io.read_u32().await.map_err(bad)? as usize;
    if length > HELLO_BYTES_MAX {
        return Err(Unheard::Bad(format!(
            "a handshake of {length} bytes; at most {HELLO_BYTES_MAX}"
        )));
    }
    let mut body = vec![0u8; length];
    io.read_exact(&mut body).await.map_err(bad)?;
    Ok(body)
}

/// Opens a link to the node at `address` (its gRPC port), over TLS with
/// `tls`, introducing this node with `hello`.
pub async fn connect(
    address: &str,
    tls: Option<&TlsConnector>,
    hello: &RaftBatch,
) -> Result<Link, LinkError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| LinkError::Unreachable(format!("connecting to {address} timed out")))?
        .map_err(|e| LinkError::Unreachable(format!("connecting to {address}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let secured = tls.is_some();
    // A second descriptor of the same socket (non-blocking, as tokio set
    // it); under TLS the session owns every byte, so there is none.
    let closed = Arc::new(AtomicBool::new(false));
    let direct = match tls {
        None if super::lane::enabled() => std::os::fd::AsFd::as_fd(&tcp)
            .try_clone_to_owned()
            .ok()
            .map(|fd| DirectSocket::new(std::net::TcpStream::from(fd), closed.clone())),
        _ => None,
    };
    let io: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(tls) => Box::new(tls.connect(address, tcp).await?),
    };
    let (mut reader, mut writer) = tokio::io::split(io);
    let hello = prost::Message::encode_to_vec(hello);
    let handshake = async {
        writer
            .write_all(&greeting(&hello))
            .await
            .map_err(|e| LinkError::Unreachable(format!("writing to {address}: {e}")))?;
        match read_greeting(&mut reader).await {
            Ok(answer) if answer.is_empty() => Ok(()),
            Ok(refusal) => Err(LinkError::Refused(
                String::from_utf8_lossy(&refusal).into_owned(),
            )),
            Err(Unheard::Other) => Err(LinkError::NotSpoken(format!(
                "{address} answered the handshake with something else"
            ))),
            // Under TLS the peer agreed to the wire (ALPN): closing now
            // is a refusal of this node's certificate, or a failure.
            Err(Unheard::Closed(e)) if secured => {
                Err(LinkError::Unreachable(format!("TLS to {address}: {e}")))
            }
            // In plaintext an older node may just close on bytes that are
            // not HTTP/2.
            Err(Unheard::Closed(e)) => Err(LinkError::NotSpoken(format!(
                "{address} closed the connection at the handshake: {e}"
            ))),
            Err(Unheard::Bad(e)) => Err(LinkError::Unreachable(e)),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| LinkError::Unreachable(format!("{address} did not answer the handshake")))??;
    let watch = tokio::spawn(async move {
        let mut sink = [0u8; 64];
        // Nothing comes this way after the handshake; a read that returns
        // is the connection's end.
        let _ = reader.read(&mut sink).await;
        closed.store(true, Ordering::Relaxed);
    });
    Ok(Link {
        writer,
        watch,
        out: Vec::with_capacity(64 << 10),
        direct,
    })
}

/// TLS towards peers, asking for the peer wire.
#[derive(Clone)]
pub struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    pub fn new(tls: &crate::tls::Tls) -> Result<TlsConnector, crate::tls::TlsError> {
        let config = tls.rustls_peer_client(&[ALPN])?;
        Ok(TlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    async fn connect(
        &self,
        address: &str,
        tcp: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, LinkError> {
        let host = crate::tls::host_of(address);
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| LinkError::Unreachable(format!("{host} as a TLS name: {e}")))?;
        let secured = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| LinkError::Unreachable(format!("TLS to {address} timed out")))?;
        match secured {
            Ok(stream) if stream.get_ref().1.alpn_protocol() == Some(ALPN) => Ok(stream),
            Ok(_) => Err(LinkError::NotSpoken(format!(
                "{address} did not agree to {}",
                String::from_utf8_lossy(ALPN)
            ))),
            // A node that offers no protocol of ours answers with this
            // alert: it is an older one.
            Err(e)
                if e.get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| {
                        matches!(
                            e,
                            rustls::Error::AlertReceived(
                                rustls::AlertDescription::NoApplicationProtocol
                            )
                        )
                    }) =>
            {
                Err(LinkError::NotSpoken(format!(
                    "{address} offers no {}",
                    String::from_utf8_lossy(ALPN)
                )))
            }
            Err(e) => Err(LinkError::Unreachable(format!("TLS to {address}: {e}"))),
        }
    }
}

/// Whether a plaintext connection to the gRPC port starts with [`MAGIC`]
/// (looked at, not taken: the connection is read from its start either
/// way). Waits for the first bytes up to a short bound; a connection that
/// diverges from MAGIC at any byte is not the wire.
pub async fn starts_with_magic(tcp: &tokio::net::TcpStream) -> bool {
    let mut seen = [0u8; 8];
    let look = async {
        loop {
            let n = tcp.peek(&mut seen).await.unwrap_or(0);
            if n == 0 || seen[..n] != MAGIC[..n] {
                return false;
            }
            if n == MAGIC.len() {
                return true;
            }
            // MAGIC arrives in one write; a split one is rare.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, look)
        .await
        .unwrap_or(false)
}

/// Serves one peer-wire connection that arrived on the gRPC port: checks
/// the hello (with the TLS client certificate in `certs`, if any), answers
/// it, then hands each batch of frames read to the Raft loop until the
/// peer closes, the node stops or a frame is bad.
pub async fn serve<IO>(
    transport: Transport,
    mut io: IO,
    certs: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Some(from) = handshake(&transport, &mut io, certs).await else {
        return;
    };
    if let Err(e) = receive(&transport, &mut io, from).await {
        tracing::debug!(from, error = %e, "a peer-wire connection ended");
    }
}

/// [`serve`] for a plaintext connection: once admitted, it goes to the
/// Raft loop to read itself (`inbound.rs`) when the loop takes links; it
/// holds the listener's `place` while open.
pub async fn serve_tcp(
    transport: Transport,
    mut tcp: tokio::net::TcpStream,
    place: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let Some(from) = handshake(&transport, &mut tcp, None).await else {
        return;
    };
    if transport.adopts_links() {
        match tcp.into_std() {
            Ok(socket) => transport.adopt(InboundLink {
                from,
                socket,
                place,
            }),
            Err(e) => tracing::debug!(from, error = %e, "a peer-wire connection ended"),
        }
        return;
    }
    if let Err(e) = receive(&transport, &mut tcp, from).await {
        tracing::debug!(from, error = %e, "a peer-wire connection ended");
    }
}

/// The node's side of the handshake: the sender's id once admitted
/// (answered), `None` when the connection is done with (refused, with the
/// reason sent, or gone).
async fn handshake<IO>(
    transport: &Transport,
    io: &mut IO,
    certs: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
) -> Option<u64>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_greeting(io)).await {
        Ok(Ok(body)) => body,
        Ok(Err(Unheard::Bad(e))) => {
            tracing::debug!(error = %e, "a peer-wire connection without a proper handshake");
            return None;
        }
        Ok(Err(_)) => return None,
        Err(_) => {
            tracing::debug!("a peer-wire connection sent no handshake in time");
            return None;
        }
    };
    let admitted = <RaftBatch as prost::Message>::decode(hello.as_slice())
        .map_err(|e| format!("InvalidArgument: a bad hello: {e}"))
        .and_then(|hello| {
            transport
                .admit(&hello, certs.as_deref())
                .map(|()| hello.from_id)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        });
    let answer = match &admitted {
        Ok(_) => greeting(b""),
        Err(why) => greeting(why.as_bytes()),
    };
    if io.write_all(&answer).await.is_err() {
        return None;
    }
    match admitted {
        Ok(from) => Some(from),
        Err(_) => {
            let _ = io.shutdown().await;
            None
        }
    }
}

/// Takes the first whole frame off `buffer` and decodes it; `None` when
/// the frame is not whole yet (room for the rest is then reserved).
pub(super) fn next_frame(buffer: &mut BytesMut) -> Result<Option<Message>, String> {
    if buffer.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
    if length > PEER_MESSAGE_BYTES_MAX {
        return Err(format!(
            "a frame of {length} bytes; at most {PEER_MESSAGE_BYTES_MAX}"
        ));
    }
    if buffer.len() < 4 + length {
        buffer.reserve(4 + length - buffer.len());
        return Ok(None);
    }
    let message = Message::parse_from_bytes(&buffer[4..4 + length])
        .map_err(|e| format!("bad raft message: {e}"))?;
    buffer.advance(4 + length);
    Ok(Some(message))
}

/// The receiving loop of [`serve`]: reads what has arrived, decodes every
/// whole frame in it and hands them over as one batch.
async fn receive<R: AsyncRead + Unpin>(
    transport: &Transport,
    io: &mut R,
    from: u64,
) -> Result<(), String> {
    let mut closing = transport.closing();
    let mut buffer = BytesMut::with_capacity(READ_ROOM);
    loop {
        if buffer.capacity() - buffer.len() < READ_ROOM / 4 {
            buffer.reserve(READ_ROOM);
        }
        let read = tokio::select! {
            read = io.read_buf(&mut buffer) => read.map_err(|e| e.to_string())?,
            _ = closing.wait_for(|closing| *closing) => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        if transport.isolated() {
            return Err("isolated by failpoint".into());
        }
        let mut messages = Vec::new();
        while let Some(message) = next_frame(&mut buffer)? {
            transport
                .accepts(&message, from)
                .map_err(|s| s.message().to_string())?;
            messages.push(message);
        }
        if !messages.is_empty() && !transport.hand_over(messages) {
            // Raft resends what a saturated loop could not take.
            tracing::debug!("raft loop saturated; messages from a peer were dropped");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::raft::transport::PeerEvent;
    use std::collections::BTreeMap;

    /// A node (id 1 of `cluster`) taking the peer wire on a loopback port,
    /// as `server.rs` takes it, and what it hands its Raft loop.
    async fn wire_node(cluster: &str) -> (String, crossbeam_channel::Receiver<PeerEvent>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (transport, inputs) = node(1, &address, cluster);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if starts_with_magic(&tcp).await {
                    transport.serve_wire(tcp, None);
                }
            }
        });
        (address, inputs)
    }

    fn node(
        id: u64,
        address: &str,
        cluster: &str,
    ) -> (Transport, crossbeam_channel::Receiver<PeerEvent>) {
        let transport = Transport::new(
            id,
            address.to_string(),
            cluster.to_string(),
            None,
            tokio::runtime::Handle::current(),
        );
        let (tx, rx) = crossbeam_channel::bounded(1 << 16);
        transport.set_loop(crate::raft::inbound::Inputs::new(tx, None), None);
        (transport, rx)
    }

    pub(in crate::raft) fn hello(cluster: &str, from: u64) -> RaftBatch {
        RaftBatch {
            cluster_name: cluster.into(),
            from_id: from,
            from_address: format!("127.0.0.1:{}", 7000 + from),
            messages: Vec::new(),
        }
    }

    /// Whether the other end closes `link` within 2 s (a write fails).
    pub(in crate::raft) async fn closed_soon(link: &mut Link) -> bool {
        for _ in 0..100 {
            if link.send(&[message(2)]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits (boundedly) for `count` messages from the loop's inputs.
    fn received(inputs: &crossbeam_channel::Receiver<PeerEvent>, count: usize) -> Vec<Message> {
        let mut got = Vec::new();
        while got.len() < count {
            match inputs.recv_timeout(Duration::from_secs(10)) {
                Ok(PeerEvent::Raft(messages)) => got.extend(messages),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        got
    }

    pub(in crate::raft) fn message(index: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
        m.from = 2;
        m.to = 1;
        m.index = index;
        let entry = raft::eraftpb::Entry {
            data: vec![index as u8; (index % 300) as usize].into(),
            ..Default::default()
        };
        m.entries = vec![entry].into();
        m
    }

    /// Frames written in one buffer come apart into the same messages, in
    /// order, however the bytes are cut.
    #[test]
    fn atomicity_frames_come_apart_into_the_messages_written() {
        let sent: Vec<Message> = (0..200).map(message).collect();
        let mut out = Vec::new();
        for m in &sent {
            encode(&mut out, m);
        }
        for cut in [1, 3, 4, 5, 17, 4096, out.len()] {
            let mut got = Vec::new();
            let mut buffer = BytesMut::new();
            for chunk in out.chunks(cut) {
                buffer.extend_from_slice(chunk);
                while let Some(m) = next_frame(&mut buffer).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, sent, "cut every {cut} bytes");
            assert!(buffer.is_empty());
        }
    }

    /// A length past the limit is refused before anything is allocated
    /// for it, and a frame that is not a raft message is refused.
    #[test]
    fn a_frame_too_long_or_not_a_message_is_refused() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&((PEER_MESSAGE_BYTES_MAX + 1) as u32).to_be_bytes());
        let e = next_frame(&mut buffer).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        assert!(buffer.capacity() < 1 << 20);
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&3u32.to_be_bytes());
        buffer.extend_from_slice(&[0xff, 0xff, 0xff]);
        let e = next_frame(&mut buffer).unwrap_err();
        assert!(e.contains("bad raft message"), "{e}");
    }

    /// Atomicity (the log a follower builds is the leader's): every
    /// message written on a link reaches the peer's loop, whole and in the
    /// order written, however the writes were batched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn atomicity_messages_on_a_link_reach_the_loop_whole_and_in_order() {
        let (address, inputs) = wire_node("c").await;
        let mut link = connect(&address, None, &hello("c", 2)).await.unwrap();
        let sent: Vec<Message> = (0..5_000).map(message).collect();
        for batch in sent.chunks(97) {
            link.send(batch).await.unwrap();
        }
        assert_eq!(received(&inputs, sent.len()), sent);
    }

    /// Atomicity (the log a follower builds is the leader's): messages the
    /// Raft loop sends reach the peer whole and in the order sent, whether
    /// the loop wrote them to the socket itself, began and left the rest
    /// to the peer's task (a batch larger than the socket takes at once),
    /// or queued them behind such a rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn atomicity_messages_reach_the_peer_in_order_written_directly_or_by_the_task() {
        crate::raft::lane::enable(true);
        let (address, inputs) = wire_node("c").await;
        let (sender, _) = node(2, "127.0.0.1:7002", "c");
        sender.set_addresses(BTreeMap::from([(1, address)]));
        // More than a socket's send buffer can ever hold, so more than one
        // write takes (however fast the reader drains).
        let large = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<usize>().ok())
            .map_or(8 << 20, |max| (2 * max).max(8 << 20));
        let sent: Vec<Message> = (0..3_000)
            .map(|i| {
                let mut m = message(i);
                if i % 500 == 250 {
                    m.mut_entries()[0].data = vec![7u8; large].into();
                }
                m
            })
            .collect();
        let batches: Vec<Vec<Message>> = sent.chunks(7).map(<[Message]>::to_vec).collect();
        let loop_side = sender.clone();
        // As the Raft loop does: from a thread of its own, never waiting.
        let sending = std::thread::spawn(move || {
            for batch in batches {
                crate::raft::transport::PeerNet::send(&loop_side, batch);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let count = sent.len();
        let got = tokio::task::spawn_blocking(move || received(&inputs, count))
            .await
            .unwrap();
        sending.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the messages arrived changed or out of order");
        let (direct, finished_by_task) = sender.lane_counts(1);
        assert!(
            direct > 0 && finished_by_task > 0,
            "the run took only one way: {direct} direct, {finished_by_task} finished by the task"
        );
    }

    /// Durability: a node of another cluster is refused at the handshake,
    /// told why, and nothing it sends reaches the loop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durability_another_cluster_is_refused_at_the_handshake() {
        let (address, inputs) = wire_node("c").await;
        let Err(LinkError::Refused(why)) = connect(&address, None, &hello("other", 2)).await else {
            panic!("a node of another cluster was admitted");
        };
        assert!(
            why.contains("FailedPrecondition") && why.contains("\"other\""),
            "{why}"
        );
        assert!(inputs.try_recv().is_err());
    }

    /// Durability: a message that is not from the admitted sender (or not
    /// for this node) closes the connection, and nothing read with it is
    /// handed over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durability_a_message_from_another_sender_closes_the_link() {
        let (address, inputs) = wire_node("c").await;
        let mut link = connect(&address, None, &hello("c", 2)).await.unwrap();
        let mut forged = message(1);
        forged.from = 3;
        link.send(&[message(0), forged]).await.unwrap();
        assert!(
            closed_soon(&mut link).await,
            "the node kept the connection open"
        );
        assert!(
            inputs.try_recv().is_err(),
            "a message of that read was handed over"
        );
    }

    /// Rolling upgrades: a node that serves only the gRPC transport (an
    /// older version) is told apart from one that refuses, and the peer
    /// task reaches it over its gRPC stream instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_the_wire_is_reached_over_grpc() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (old, inputs) = node(1, &address, "c");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(old.service())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let Err(LinkError::NotSpoken(_)) = connect(&address, None, &hello("c", 2)).await else {
            panic!("an HTTP/2 server was taken for the peer wire");
        };
        let (new, _) = node(2, "127.0.0.1:7002", "c");
        new.set_addresses(BTreeMap::from([(1, address.clone())]));
        let sent: Vec<Message> = (0..300).map(message).collect();
        for m in &sent {
            crate::raft::transport::PeerNet::send(&new, vec![m.clone()]);
        }
        assert_eq!(received(&inputs, sent.len()), sent);
    }
}
