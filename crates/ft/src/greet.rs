//! The secondary's side of opening a connection: the preamble, the key
//! exchange (with `--key`) and the hello, each connection on a thread of
//! its own within a deadline; and the refusal of anyone who connects once
//! the pair is formed.

use crate::auth::{self, Key, Seal};
use crate::wire::{self, Hello, Message, WireError};
use crate::ErrorChain;
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a connecting peer has to send its preamble and hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// A connection that said hello.
pub(crate) struct Greeting {
    pub(crate) stream: TcpStream,
    pub(crate) from: String,
    pub(crate) w: TcpStream,
    pub(crate) r: BufReader<Deadline>,
    pub(crate) epoch: u64,
    pub(crate) hello: Hello,
    /// With `--key`: the seals of the secondary-to-primary and
    /// primary-to-secondary directions.
    pub(crate) seal_out: Option<Seal>,
    pub(crate) seal_in: Option<Seal>,
}

/// Reads that fail once a deadline has passed, however slowly the peer
/// trickles bytes (a read timeout alone restarts with every byte); once
/// paired, every read that brings bytes stamps `heard`, so a large batch
/// crawling over a slow link counts as word from the peer while it comes
/// (the peer is silent only when nothing arrives).
pub(crate) struct Deadline {
    pub(crate) stream: TcpStream,
    pub(crate) at: Option<Instant>,
    pub(crate) heard: Option<Arc<Mutex<Instant>>>,
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(at) = self.at {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello within the deadline"));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        let n = self.stream.read(buf)?;
        if let (Some(heard), true) = (&self.heard, n > 0) {
            *heard.lock().unwrap() = Instant::now();
        }
        Ok(n)
    }
}

/// The secondary's writing end: its stream, and with `--key` the seal of
/// the secondary-to-primary direction.
pub(crate) struct SealedStream {
    pub(crate) stream: TcpStream,
    pub(crate) seal: Option<Seal>,
}

impl SealedStream {
    /// Write one message at `epoch`, sealed if the channel is keyed.
    pub(crate) fn send(&mut self, epoch: u64, msg: &Message) -> std::io::Result<()> {
        wire::send(&mut self.stream, epoch, msg, self.seal.as_mut())
    }
}

/// The preamble exchange, the key exchange (with `--key`) and the hello of
/// one connection, within [`HELLO_DEADLINE`]; `None` (with a warning) for
/// anything else. A keyed secondary refuses a primary without the key, and
/// an unkeyed one a primary that wants authentication, in so many words.
pub(crate) fn greet(stream: TcpStream, from: String, key: Option<&Key>) -> Option<Greeting> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let (Ok(mut w), Ok(r)) = (stream.try_clone(), stream.try_clone()) else { return None };
    let mut r = BufReader::new(Deadline { stream: r, at: Some(Instant::now() + HELLO_DEADLINE), heard: None });
    let refuse = |w: &mut TcpStream, why: &str| {
        let _ = wire::write_message(w, 0, &Message::Refuse(why.to_string()));
        tracing::warn!("refused a connection from {from}: {why}");
        None
    };
    let first = wire::write_preamble(&mut w)
        .map_err(WireError::from)
        .and_then(|_| wire::read_preamble(&mut r))
        .and_then(|_| wire::read_message(&mut r));
    let (mut seal_out, mut seal_in) = (None, None);
    let hello = match (first, key) {
        (Ok((_, Message::AuthInit { nonce: np })), Some(key)) => {
            let exchange = auth::random32().map_err(WireError::from).and_then(|ns| {
                let proof = key.secondary_proof(&np, &ns);
                wire::write_message(&mut w, 0, &Message::AuthChallenge { nonce: ns, proof })?;
                Ok((ns, wire::read_message(&mut r)?))
            });
            match exchange {
                Ok((ns, (_, Message::AuthProof { proof }))) if auth::same(&proof, &key.primary_proof(&np, &ns)) => {
                    let (into, out) = key.seals(&np, &ns);
                    (seal_out, seal_in) = (Some(out), Some(into));
                    wire::receive(&mut r, seal_in.as_mut())
                }
                Ok(_) => return refuse(&mut w, "it does not hold this pair's key (--key)"),
                Err(e) => Err(e),
            }
        }
        (Ok((_, Message::AuthInit { .. })), None) => {
            return refuse(&mut w, "the primary authenticates with a key (--key); this secondary has none")
        }
        (Ok((_, Message::Hello(_))), Some(_)) => {
            return refuse(&mut w, "this secondary requires an authenticated channel (--key); the primary has no key")
        }
        (first, _) => first,
    };
    match hello {
        Ok((epoch, Message::Hello(hello))) => {
            // Paired, the channel has no deadline (silence is the heartbeat's job).
            r.get_mut().at = None;
            let _ = stream.set_read_timeout(None);
            Some(Greeting { stream, from, w, r, epoch, hello, seal_out, seal_in })
        }
        Ok((_, m)) => {
            tracing::warn!("refused a connection from {from}: it sent {m:?} before a hello");
            None
        }
        Err(e) => {
            tracing::warn!("refused a connection from {from}: {}", ErrorChain(&e));
            None
        }
    }
}

/// After pairing: anyone else who connects is told so and dropped.
pub(crate) fn refuse_latecomers(listener: TcpListener, epoch: u64, peer: String) {
    for stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut s = stream;
        let _ = wire::write_preamble(&mut s);
        let why = format!("this secondary is already paired with {peer} at epoch {epoch}");
        let _ = wire::write_message(&mut s, epoch, &Message::Refuse(why));
    }
}
