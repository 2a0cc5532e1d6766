//! The secondary's heartbeat as a UDP datagram beside the log channel.
//!
//! On the log channel the secondary's acknowledgements are TCP data, and
//! TCP sends data only as the other direction's ACKs come back. When the
//! log link's queue toward the secondary is deep (a slow link under bulk
//! input, seconds of data queued), the primary's ACKs of the secondary's
//! data wait in that same queue: the secondary's acknowledgements leave
//! in bursts, with gaps longer than the silence timeout, and a healthy
//! secondary is taken for lost. A datagram waits for nothing.
//!
//! The primary binds a UDP socket on the channel's local address and
//! tells the secondary its port and a fresh secret ([`Message::AckTo`]).
//! Every heartbeat, the secondary also sends its acknowledgement there:
//!
//! ```text
//! "LSAK" | epoch u64 | seq u64 | received u64 | executed u64 | in_disk u64 | tag [32]
//! ```
//!
//! with an HMAC-SHA256 tag under a key derived from the secret (and, with
//! `--key`, from the session's key for that direction too, so that the
//! secret, which crosses the channel authenticated but readable, does not
//! let anyone forge a datagram). The primary takes a datagram only from
//! the secondary's address, at its epoch, with a sequence number past the
//! last one and a good tag: as word from the secondary and as an
//! acknowledgement, as if it had come on the channel.
//!
//! [`Message::AckTo`]: crate::wire::Message::AckTo

use crate::auth::Seal;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const MAGIC: &[u8; 4] = b"LSAK";
const SIGNED: usize = 4 + 8 * 5;
const DATAGRAM: usize = SIGNED + 32;

/// The key that tags the datagrams of one channel.
fn datagram_key(secret: &[u8; 32], session: Option<&Seal>) -> [u8; 32] {
    match session {
        Some(seal) => seal.derive(b"lockstep ack datagrams", secret),
        None => {
            let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
            m.update(b"lockstep ack datagrams");
            m.finalize().into_bytes().into()
        }
    }
}

fn tag(key: &[u8; 32], signed: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(signed);
    m
}

/// An acknowledgement that came by datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub received: u64,
    pub executed: u64,
    /// The secondary's run loop is inside a disk operation.
    pub in_disk: bool,
}

/// The primary's end: where the datagrams arrive.
pub struct AckSocket {
    socket: UdpSocket,
    peer: IpAddr,
    key: [u8; 32],
    epoch: u64,
    last_seq: u64,
}

impl AckSocket {
    /// Bind beside `stream` (the channel) for its secondary at `epoch`;
    /// returns the socket, and the port and secret to tell the secondary.
    /// `session`: the secondary → primary seal, with `--key`.
    pub fn bind(stream: &TcpStream, epoch: u64, session: Option<&Seal>) -> std::io::Result<(AckSocket, u16, [u8; 32])> {
        let local = stream.local_addr()?;
        let peer = stream.peer_addr()?.ip();
        let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        let port = socket.local_addr()?.port();
        let secret = crate::auth::random32()?;
        let key = datagram_key(&secret, session);
        Ok((AckSocket { socket, peer, key, epoch, last_seq: 0 }, port, secret))
    }

    /// The next good datagram within `wait` (`None`: none came; datagrams
    /// from elsewhere, of another epoch, replayed or forged are dropped).
    pub fn receive(&mut self, wait: Duration) -> Option<Acked> {
        let _ = self.socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let deadline = std::time::Instant::now() + wait;
        let mut buf = [0u8; 128];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).ok()?;
            if let Some(acked) = self.accept(&buf[..n], from) {
                return Some(acked);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.socket.set_read_timeout(Some(left));
        }
    }

    fn accept(&mut self, d: &[u8], from: SocketAddr) -> Option<Acked> {
        if from.ip() != self.peer || d.len() != DATAGRAM || &d[..4] != MAGIC {
            return None;
        }
        tag(&self.key, &d[..SIGNED]).verify_slice(&d[SIGNED..]).ok()?;
        let at = |i: usize| u64::from_le_bytes(d[4 + 8 * i..12 + 8 * i].try_into().unwrap());
        let (epoch, seq) = (at(0), at(1));
        if epoch != self.epoch || seq <= self.last_seq || at(4) > 1 {
            return None;
        }
        self.last_seq = seq;
        Some(Acked { received: at(2), executed: at(3), in_disk: at(4) == 1 })
    }
}

/// The secondary's end: sends its acknowledgements to the primary's socket.
pub struct AckSender {
    socket: UdpSocket,
    to: SocketAddr,
    key: [u8; 32],
    epoch: u64,
    seq: u64,
}

impl AckSender {
    /// To `port` on the primary at `primary` (the channel's peer), with
    /// the `secret` it gave; `session`: the secondary → primary seal.
    pub fn new(
        primary: IpAddr,
        port: u16,
        secret: &[u8; 32],
        session: Option<&Seal>,
        epoch: u64,
    ) -> std::io::Result<AckSender> {
        let any: IpAddr = if primary.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
        let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
        socket.set_nonblocking(true)?;
        let key = datagram_key(secret, session);
        Ok(AckSender { socket, to: SocketAddr::new(primary, port), key, epoch, seq: 0 })
    }

    /// Send one acknowledgement (a datagram lost is not an error: the next
    /// heartbeat sends another).
    pub fn send(&mut self, acked: Acked) {
        self.seq += 1;
        let mut d = Vec::with_capacity(DATAGRAM);
        d.extend_from_slice(MAGIC);
        for v in [self.epoch, self.seq, acked.received, acked.executed, acked.in_disk as u64] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        let t: [u8; 32] = tag(&self.key, &d).finalize().into_bytes().into();
        d.extend_from_slice(&t);
        let _ = self.socket.send_to(&d, self.to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A channel on loopback, and the primary's socket beside it.
    fn channel(epoch: u64) -> (AckSocket, u16, [u8; 32], TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let primary = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (secondary, _) = l.accept().unwrap();
        let (sock, port, secret) = AckSocket::bind(&primary, epoch, None).unwrap();
        (sock, port, secret, primary, secondary)
    }

    #[test]
    fn acknowledgements_arrive_in_order_and_only_once() {
        let (mut sock, port, secret, _p, s) = channel(3);
        let mut tx = AckSender::new(s.peer_addr().unwrap().ip(), port, &secret, None, 3).unwrap();
        tx.send(Acked { received: 10, executed: 7, in_disk: false });
        assert_eq!(sock.receive(Duration::from_secs(2)), Some(Acked { received: 10, executed: 7, in_disk: false }));
        tx.send(Acked { received: 12, executed: 9, in_disk: true });
        assert_eq!(sock.receive(Duration::from_secs(2)), Some(Acked { received: 12, executed: 9, in_disk: true }));
        assert_eq!(sock.receive(Duration::from_millis(50)), None, "nothing more came");
    }

    #[test]
    fn forged_replayed_and_foreign_datagrams_are_dropped() {
        let (mut sock, port, secret, _p, s) = channel(3);
        let primary = s.peer_addr().unwrap().ip();
        let good = |tx: &mut AckSender| {
            let d = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.to = d.local_addr().unwrap();
            tx.send(Acked { received: 5, executed: 5, in_disk: false });
            let mut b = [0u8; 128];
            let n = d.recv(&mut b).unwrap();
            b[..n].to_vec()
        };
        let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddr::new(primary, port);
        // Another secret (a forger who did not read it), another epoch.
        for (secret, epoch) in [([9u8; 32], 3), (secret, 4)] {
            let mut tx = AckSender::new(primary, port, &secret, None, epoch).unwrap();
            raw.send_to(&good(&mut tx), to).unwrap();
            assert_eq!(sock.receive(Duration::from_millis(100)), None);
        }
        // A good one, then the same bytes again (a replay), then junk.
        let mut tx = AckSender::new(primary, port, &secret, None, 3).unwrap();
        let d = good(&mut tx);
        raw.send_to(&d, to).unwrap();
        assert_eq!(sock.receive(Duration::from_secs(2)), Some(Acked { received: 5, executed: 5, in_disk: false }));
        raw.send_to(&d, to).unwrap();
        raw.send_to(b"LSAK not a datagram", to).unwrap();
        let mut flipped = d.clone();
        flipped[20] ^= 1;
        raw.send_to(&flipped, to).unwrap();
        assert_eq!(sock.receive(Duration::from_millis(100)), None);
    }

    #[test]
    fn with_a_pair_key_the_secret_alone_forges_nothing() {
        let key = crate::auth::Key::generate().unwrap();
        let (np, ns) = ([1u8; 32], [2u8; 32]);
        let (_, s2p_primary) = key.seals(&np, &ns);
        let (_, s2p_secondary) = key.seals(&np, &ns);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (mut sock, port, secret) = AckSocket::bind(&p, 1, Some(&s2p_primary)).unwrap();
        let primary = s.peer_addr().unwrap().ip();
        // Someone who read the secret off the channel, without the key.
        AckSender::new(primary, port, &secret, None, 1).unwrap().send(Acked {
            received: 1,
            executed: 1,
            in_disk: false,
        });
        assert_eq!(sock.receive(Duration::from_millis(100)), None);
        // The secondary, with it.
        let mut tx = AckSender::new(primary, port, &secret, Some(&s2p_secondary), 1).unwrap();
        tx.send(Acked { received: 2, executed: 2, in_disk: false });
        assert_eq!(sock.receive(Duration::from_secs(2)), Some(Acked { received: 2, executed: 2, in_disk: false }));
    }
}
