//! The pair's wire protocol on the log channel (one TCP connection).
//!
//! A connection starts with a preamble from each side: the magic `LSFT` and
//! the protocol version, so a peer of another version, or something that is
//! not a lockstep endpoint at all, is named as such before anything else is
//! read. Then messages follow, each framed as
//!
//! ```text
//! len: u32 LE (of what follows the checksum) | crc32: u32 LE | kind: u8 | epoch: u64 LE | payload
//! ```
//!
//! The epoch is the arbiter's fencing token: a receiver refuses messages
//! from an older epoch than its own.

use replay::Record;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub const MAGIC: [u8; 4] = *b"LSFT";
/// 2: the key exchange, and the hello's host, arbiter kind and build.
/// 3: the release point in marks. 4: the planned switchover, joining a
/// running primary. 5: the secondary's network state (`Uplink`).
/// 6: acknowledgements by datagram as well (`AckTo`). 8: a primary that
/// paused asks whether its secondary is still there (`Probe`, `Probed`).
/// 9: an acknowledgement says whether the secondary's run loop is inside
/// a disk operation.
pub const PROTOCOL_VERSION: u32 = 9;
/// The largest message accepted (a batch of records is cut well below).
pub const MAX_MESSAGE: usize = 16 << 20;

/// What the primary tells the secondary when it connects: enough to refuse
/// a pairing of two different VMs or two different disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// A hash of the VM description (kernel, initrd, command line, memory,
    /// MAC), not of paths.
    pub vm_id: String,
    /// xxh3 of the disk image's contents, if the VM has a disk.
    pub disk_hash: Option<String>,
    /// The boot seed the primary will log, so the secondary can build the
    /// same initial machine and compare its state.
    pub seed: [u8; 32],
    /// The initial machine's state hash (position 0, with `seed`).
    pub state_hash: u64,
    /// The guest's MAC address: the secondary's card takes the same one.
    pub mac: Option<[u8; 6]>,
    /// The primary's host (its machine id): a pair across hosts needs an
    /// arbiter both hosts share.
    #[serde(default)]
    pub host: String,
    /// Whether the primary's arbiter is one that sides on two hosts share
    /// (etcd), not a file on one host.
    #[serde(default)]
    pub shared_arbiter: bool,
    /// The primary's lockstep build: both sides must run the same engine.
    #[serde(default)]
    pub build: String,
    /// The primary's guest is already running: the secondary joins it by
    /// a transfer of its state (`Sync`), not by booting from `seed`.
    #[serde(default)]
    pub join: bool,
}

/// One message on the log channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary → secondary: who I am (the epoch is in the frame).
    Hello(Hello),
    /// Secondary → primary: paired.
    Welcome,
    /// Either way: no (and why), then the connection closes.
    Refuse(String),
    /// Primary → secondary: log records, in order.
    Records(Vec<Record>),
    /// Primary → secondary: every record before `through` has been sent,
    /// and every output item (frame, console chunk) produced at or before
    /// `released` has left the primary; also the primary's heartbeat. A
    /// secondary going live sends again what it produced after `released`.
    /// With `urgent` the primary waits for this mark's acknowledgement
    /// (output is held, or a handover, the end, a lagging secondary): it is
    /// sent at once; otherwise the next heartbeat's acknowledgement covers
    /// the mark.
    Through { through: u64, released: u64, urgent: bool },
    /// Secondary → primary: the log is received up to (not including)
    /// `received` and executed up to `executed`, and its run loop is
    /// inside a disk operation now (`in_disk`: its execution may stand
    /// still longer); also the secondary's heartbeat.
    Ack { received: u64, executed: u64, in_disk: bool },
    /// Primary → secondary, a planned switchover: the primary's guest
    /// stopped at `at` (every record before it sent, all output before it
    /// released); the secondary replays to there and takes over, and the
    /// primary becomes its secondary on this same connection.
    Handover { at: u64 },
    /// Secondary → primary, the answer: it replayed to the handover point
    /// and won `epoch` as the primary; from the next message on, the
    /// connection runs with the roles swapped, at that epoch.
    Switched { epoch: u64 },
    /// Primary → secondary, joining a running primary: a piece of its
    /// state (what the pieces are is the sides' business, not the wire's).
    Sync(Vec<u8>),
    /// Secondary → primary: the state is in place, and hashes to this.
    Synced { state_hash: u64 },
    /// Secondary → primary: a frame for the guest that reached this side's
    /// tap and not, it seems, the primary's (a switch still sending the
    /// guest's address to this port just after a switchover).
    Forward(Vec<u8>),
    /// Primary → secondary: stop, without going live (the primary moves
    /// the VM elsewhere and goes on alone meanwhile).
    Release,
    /// Secondary → primary: whether this side's external network (its tap
    /// and the uplinks it watches) is up; sent when it changes and every
    /// second, by a side that watches (see [`crate::health`]).
    Uplink { up: bool },
    /// Primary → secondary, first on a paired channel: send every
    /// heartbeat's acknowledgement also as a datagram to this UDP port on
    /// the primary's address, tagged under a key from `secret` (see
    /// [`crate::datagram`]).
    AckTo { port: u16, secret: [u8; 32] },
    /// Primary → secondary, first with `--key`: a fresh nonce.
    AuthInit { nonce: [u8; 32] },
    /// Secondary → primary: its nonce, and proof that it holds the key.
    AuthChallenge { nonce: [u8; 32], proof: [u8; 32] },
    /// Primary → secondary: proof that it holds the key.
    AuthProof { proof: [u8; 32] },
    /// Primary → secondary, after a pause of the primary long enough for
    /// its lease to lapse: are you still my secondary?
    Probe { nonce: u64 },
    /// Secondary → primary: yes (the answer to `Probe { nonce }`); it
    /// renews the primary's lease.
    Probed { nonce: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer is not a lockstep pair endpoint (it sent {0:02x?} where the preamble belongs)")]
    NotLockstep(Vec<u8>),
    #[error("the peer speaks pair protocol version {0}, this lockstep speaks version {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("the peer sent a message of {0} bytes (the limit is {MAX_MESSAGE})")]
    TooLarge(usize),
    #[error("the peer sent a message with a bad checksum")]
    Checksum,
    #[error("the peer sent a malformed message: {0}")]
    Malformed(Malformed),
    #[error("the peer sent a malformed hello")]
    BadHello(#[source] serde_json::Error),
    #[error("a message from the peer failed authentication (tampered with, replayed, or sent with another key)")]
    Unauthentic,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What is wrong with a malformed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a message of {0} bytes")]
    TooShort(usize),
    #[error("short integer")]
    ShortInteger,
    #[error("record length cut short")]
    RecordLengthCut,
    #[error("record cut short")]
    RecordCut,
    #[error("invalid record")]
    InvalidRecord,
    #[error("unknown kind {kind} or wrong length {len}")]
    UnknownKind { kind: u8, len: usize },
}

/// Write this side's preamble.
pub fn write_preamble(w: &mut impl Write) -> std::io::Result<()> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Read and check the peer's preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), WireError> {
    let mut b = [0u8; 8];
    read_full(r, &mut b)?;
    if b[..4] != MAGIC {
        return Err(WireError::NotLockstep(b.to_vec()));
    }
    let version = u32::from_le_bytes(b[4..].try_into().unwrap());
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(WireError::Io(e)),
    }
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome => 2,
            Message::Refuse(_) => 3,
            Message::Records(_) => 4,
            Message::Through { .. } => 5,
            Message::Ack { .. } => 6,
            Message::AuthInit { .. } => 7,
            Message::AuthChallenge { .. } => 8,
            Message::AuthProof { .. } => 9,
            Message::Handover { .. } => 10,
            Message::Switched { .. } => 11,
            Message::Sync(_) => 12,
            Message::Synced { .. } => 13,
            Message::Forward(_) => 14,
            Message::Release => 15,
            Message::Uplink { .. } => 16,
            Message::AckTo { .. } => 17,
            Message::Probe { .. } => 18,
            Message::Probed { .. } => 19,
        }
    }

    fn payload(&self) -> Vec<u8> {
        match self {
            Message::Hello(h) => serde_json::to_vec(h).expect("a Hello always serializes"),
            Message::Welcome | Message::Release => vec![],
            Message::Refuse(why) => why.as_bytes().to_vec(),
            Message::Records(records) => {
                let mut p = Vec::new();
                for r in records {
                    let body = r.encode_body();
                    p.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    p.extend_from_slice(&body);
                }
                p
            }
            Message::Through { through, released, urgent } => {
                [&through.to_le_bytes()[..], &released.to_le_bytes(), &[*urgent as u8]].concat()
            }
            Message::Ack { received: a, executed: b, in_disk } => {
                [&a.to_le_bytes()[..], &b.to_le_bytes(), &[*in_disk as u8]].concat()
            }
            Message::AuthInit { nonce } => nonce.to_vec(),
            Message::AuthChallenge { nonce, proof } => [nonce.as_slice(), proof.as_slice()].concat(),
            Message::AuthProof { proof } => proof.to_vec(),
            Message::Handover { at: v }
            | Message::Switched { epoch: v }
            | Message::Synced { state_hash: v }
            | Message::Probe { nonce: v }
            | Message::Probed { nonce: v } => v.to_le_bytes().to_vec(),
            Message::Sync(bytes) | Message::Forward(bytes) => bytes.clone(),
            Message::Uplink { up } => vec![*up as u8],
            Message::AckTo { port, secret } => [&port.to_le_bytes()[..], secret].concat(),
        }
    }

    fn parse(kind: u8, p: &[u8]) -> Result<Message, WireError> {
        let bad = WireError::Malformed;
        let u64_at = |p: &[u8], at: usize| -> Result<u64, WireError> {
            p.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).ok_or(bad(Malformed::ShortInteger))
        };
        Ok(match kind {
            1 => Message::Hello(serde_json::from_slice(p).map_err(WireError::BadHello)?),
            2 if p.is_empty() => Message::Welcome,
            3 => Message::Refuse(String::from_utf8_lossy(p).into_owned()),
            4 => {
                let mut records = Vec::new();
                let mut rest = p;
                while !rest.is_empty() {
                    let len = rest.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
                    let len = len.ok_or(bad(Malformed::RecordLengthCut))?;
                    let body = rest.get(4..4 + len).ok_or(bad(Malformed::RecordCut))?;
                    records.push(Record::decode_body(body).ok_or(bad(Malformed::InvalidRecord))?);
                    rest = &rest[4 + len..];
                }
                Message::Records(records)
            }
            5 if p.len() == 17 && p[16] <= 1 => {
                Message::Through { through: u64_at(p, 0)?, released: u64_at(p, 8)?, urgent: p[16] == 1 }
            }
            6 if p.len() == 17 && p[16] <= 1 => {
                Message::Ack { received: u64_at(p, 0)?, executed: u64_at(p, 8)?, in_disk: p[16] == 1 }
            }
            7 if p.len() == 32 => Message::AuthInit { nonce: p.try_into().unwrap() },
            8 if p.len() == 64 => {
                Message::AuthChallenge { nonce: p[..32].try_into().unwrap(), proof: p[32..].try_into().unwrap() }
            }
            9 if p.len() == 32 => Message::AuthProof { proof: p.try_into().unwrap() },
            10 if p.len() == 8 => Message::Handover { at: u64_at(p, 0)? },
            11 if p.len() == 8 => Message::Switched { epoch: u64_at(p, 0)? },
            12 => Message::Sync(p.to_vec()),
            13 if p.len() == 8 => Message::Synced { state_hash: u64_at(p, 0)? },
            14 => Message::Forward(p.to_vec()),
            15 if p.is_empty() => Message::Release,
            16 if p.len() == 1 && p[0] <= 1 => Message::Uplink { up: p[0] == 1 },
            17 if p.len() == 34 => {
                Message::AckTo { port: u16::from_le_bytes([p[0], p[1]]), secret: p[2..].try_into().unwrap() }
            }
            18 if p.len() == 8 => Message::Probe { nonce: u64_at(p, 0)? },
            19 if p.len() == 8 => Message::Probed { nonce: u64_at(p, 0)? },
            kind => return Err(bad(Malformed::UnknownKind { kind, len: p.len() })),
        })
    }

    /// The framed bytes of this message at `epoch`.
    pub fn encode(&self, epoch: u64) -> Vec<u8> {
        let mut body = vec![self.kind()];
        body.extend_from_slice(&epoch.to_le_bytes());
        body.extend_from_slice(&self.payload());
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Write one message and flush.
pub fn write_message(w: &mut impl Write, epoch: u64, msg: &Message) -> std::io::Result<()> {
    w.write_all(&msg.encode(epoch))?;
    w.flush()
}

/// Write one message, sealed with `seal` if the channel is authenticated.
pub fn send(
    w: &mut impl Write,
    epoch: u64,
    msg: &Message,
    seal: Option<&mut crate::auth::Seal>,
) -> std::io::Result<()> {
    w.write_all(&encode_sealed(msg, epoch, seal))?;
    w.flush()
}

/// The framed bytes of `msg`, followed by its tag if `seal` is given.
pub fn encode_sealed(msg: &Message, epoch: u64, seal: Option<&mut crate::auth::Seal>) -> Vec<u8> {
    let mut framed = msg.encode(epoch);
    if let Some(seal) = seal {
        let tag = seal.tag(&framed);
        framed.extend_from_slice(&tag);
    }
    framed
}

/// Read one message, checking its tag with `seal` if the channel is
/// authenticated.
pub fn receive(r: &mut impl Read, seal: Option<&mut crate::auth::Seal>) -> Result<(u64, Message), WireError> {
    let Some(seal) = seal else { return read_message(r) };
    let (framed, epoch, kind, start) = read_frame(r)?;
    let mut tag = [0u8; 32];
    read_full(r, &mut tag)?;
    seal.check(&framed, &tag)?;
    Ok((epoch, Message::parse(kind, &framed[start..])?))
}

/// Read one frame: its bytes, epoch, kind and where its payload starts.
fn read_frame(r: &mut impl Read) -> Result<(Vec<u8>, u64, u8, usize), WireError> {
    let mut head = [0u8; 8];
    read_full(r, &mut head)?;
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    if len < 9 {
        return Err(WireError::Malformed(Malformed::TooShort(len)));
    }
    let mut framed = head.to_vec();
    framed.resize(8 + len, 0);
    read_full(r, &mut framed[8..])?;
    if crc32fast::hash(&framed[8..]) != crc {
        return Err(WireError::Checksum);
    }
    let epoch = u64::from_le_bytes(framed[9..17].try_into().unwrap());
    let kind = framed[8];
    Ok((framed, epoch, kind, 17))
}

/// Read one message: its epoch and content.
pub fn read_message(r: &mut impl Read) -> Result<(u64, Message), WireError> {
    let (framed, epoch, kind, start) = read_frame(r)?;
    Ok((epoch, Message::parse(kind, &framed[start..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replay::Event;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                host: "h".into(),
                shared_arbiter: true,
                build: "b".into(),
                vm_id: "v".into(),
                disk_hash: Some("d".into()),
                seed: [7; 32],
                state_hash: 9,
                mac: None,
                join: false,
            }),
            Message::Welcome,
            Message::Refuse("no".into()),
            Message::Records(vec![
                Record { position: 5, event: Event::Console(b"hi".to_vec()) },
                Record { position: 9, event: Event::Frame { nic: 0, data: vec![1; 100] } },
                Record { position: 9, event: Event::Skip(1000) },
            ]),
            Message::Records(vec![]),
            Message::Through { through: 1 << 40, released: 1 << 39, urgent: false },
            Message::Through { through: 3, released: 2, urgent: true },
            Message::Ack { received: 3, executed: 2, in_disk: false },
            Message::Ack { received: 4, executed: 3, in_disk: true },
            Message::Handover { at: 77 },
            Message::Switched { epoch: 4 },
            Message::Sync(vec![1, 2, 3]),
            Message::Synced { state_hash: 5 },
            Message::Forward(vec![9; 60]),
            Message::Release,
            Message::Uplink { up: true },
            Message::Uplink { up: false },
            Message::AckTo { port: 7301, secret: [4; 32] },
            Message::Probe { nonce: 12 },
            Message::Probed { nonce: 1 << 50 },
        ]
    }

    #[test]
    fn messages_round_trip() {
        let mut stream = Vec::new();
        write_preamble(&mut stream).unwrap();
        for (i, m) in samples().iter().enumerate() {
            write_message(&mut stream, i as u64, m).unwrap();
        }
        let mut r = &stream[..];
        read_preamble(&mut r).unwrap();
        for (i, m) in samples().iter().enumerate() {
            assert_eq!(read_message(&mut r).unwrap(), (i as u64, m.clone()));
        }
        assert!(matches!(read_message(&mut r), Err(WireError::Closed)));
    }

    #[test]
    fn preamble_names_version_and_strangers() {
        let mut other = MAGIC.to_vec();
        other.extend_from_slice(&99u32.to_le_bytes());
        let e = read_preamble(&mut &other[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the peer speaks pair protocol version 99, this lockstep speaks version {PROTOCOL_VERSION}")
        );
        let e = read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap_err();
        assert!(matches!(e, WireError::NotLockstep(_)), "{e}");
    }

    #[test]
    fn oversized_and_damaged_messages_are_refused() {
        let mut big = ((MAX_MESSAGE + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 4]);
        assert!(matches!(read_message(&mut &big[..]), Err(WireError::TooLarge(_))));
        let mut m = Message::Through { through: 77, released: 70, urgent: true }.encode(1);
        let last = m.len() - 1;
        m[last] ^= 1;
        assert!(matches!(read_message(&mut &m[..]), Err(WireError::Checksum)));
    }

    /// Random bytes, and valid messages with random bytes flipped or cut,
    /// give an error or a message, never a panic or a huge allocation.
    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut errors, mut oks) = (0, 0);
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                let all = samples();
                all[(next() % all.len() as u64) as usize].encode(next() % 4)
            };
            if !bytes.is_empty() && round % 3 != 0 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] ^= 1 << (next() % 8);
            }
            if round % 5 == 0 {
                bytes.truncate((next() % (bytes.len() as u64 + 1)) as usize);
            }
            match read_message(&mut &bytes[..]) {
                Ok(_) => oks += 1,
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 1000 && oks > 100, "errors {errors}, oks {oks}");
    }

    #[test]
    fn a_corrupt_record_inside_a_valid_frame_is_malformed() {
        // Kind 4 with a record length pointing past the end, checksum valid.
        let mut body = vec![4u8];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&100u32.to_le_bytes());
        let mut m = (body.len() as u32).to_le_bytes().to_vec();
        m.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        m.extend_from_slice(&body);
        assert!(matches!(read_message(&mut &m[..]), Err(WireError::Malformed(Malformed::RecordCut))));
    }

    #[test]
    fn a_bad_hello_keeps_the_parser_error_as_its_source() {
        let mut body = vec![1u8];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(b"{not json");
        let mut m = (body.len() as u32).to_le_bytes().to_vec();
        m.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        m.extend_from_slice(&body);
        let e = read_message(&mut &m[..]).unwrap_err();
        assert!(matches!(e, WireError::BadHello(_)), "{e:?}");
        assert_eq!(e.to_string(), "the peer sent a malformed hello");
        assert!(std::error::Error::source(&e).is_some());
    }
}
