//! `replay`: the event log.
//!
//! Everything non-deterministic that reaches a guest is an [`Event`] at a
//! position (DESIGN.md: instructions retired + exceptions taken + idle
//! steps since reset). Recording writes each event when it takes effect;
//! replay feeds them back at the same positions and gets the same machine.
//! The format is a stream, so the same bytes can go to a file or, later,
//! over a socket to a secondary.
//!
//! ```text
//!  file    header | record*
//!  header  magic "LOCKSTEP" | version u32 | meta_len u32 | meta | crc32 u32
//!          (meta: the VM description, opaque here; crc over version..meta)
//!  record  len u32 | crc32 u32 (of body) | body[len]
//!  body    kind u8 | position u64 | payload (by kind, below)
//! ```
//! All integers little-endian. A record whose checksum fails is an error
//! naming its byte offset; a record cut short at the end of the stream is
//! a truncated log (the recorder died): reading stops there and says where.

use std::io::{Read, Write};

pub const MAGIC: [u8; 8] = *b"LOCKSTEP";
/// Version of the format; a log of another version is refused.
/// 2: state hashes are over page digests and the disk's written chunks.
pub const VERSION: u32 = 2;
/// Largest record body accepted (a frame or a console burst is far less).
pub const MAX_RECORD: u32 = 1 << 20;
/// Largest header metadata accepted.
pub const MAX_META: u32 = 1 << 20;

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    PowerOff,
    Reboot,
    Panic,
    Quit,
    Limit,
}

impl EndReason {
    fn code(self) -> u8 {
        match self {
            EndReason::PowerOff => 0,
            EndReason::Reboot => 1,
            EndReason::Panic => 2,
            EndReason::Quit => 3,
            EndReason::Limit => 4,
        }
    }
    fn from_code(c: u8) -> Option<EndReason> {
        Some(match c {
            0 => EndReason::PowerOff,
            1 => EndReason::Reboot,
            2 => EndReason::Panic,
            3 => EndReason::Quit,
            4 => EndReason::Limit,
            _ => return None,
        })
    }
}

/// A non-deterministic input (or a checkpoint) of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The boot's random seed (the device tree's rng-seed).
    Seed([u8; 32]),
    /// Console bytes typed.
    Console(Vec<u8>),
    /// A network frame received by card `nic`.
    Frame { nic: u8, data: Vec<u8> },
    /// Guest time moved on by this many positions with no instruction run:
    /// idle time in `wfi`, or a correction towards host time.
    Skip(u64),
    /// Bytes the entropy device handed out (consumed in order; the
    /// position is that of the run-loop slice that drew them).
    Entropy(Vec<u8>),
    /// The machine's state hash at this position (divergence check).
    Hash(u64),
    /// The run ended here; after `Reboot` a new machine starts at 0.
    End(EndReason),
    /// A snapshot of the machine (this id) was taken here: replay can
    /// start from it and the records after this one.
    Snapshot(u64),
}

/// An event and where it took effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub position: u64,
    pub event: Event,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("not a lockstep event log (bad magic)")]
    NotALog,
    #[error("event log format version {found}, this lockstep reads version {VERSION}")]
    Version { found: u32 },
    #[error("event log header is corrupt (checksum or length)")]
    BadHeader,
    #[error("event log is corrupt at byte offset {offset}: {what}")]
    Corrupt { offset: u64, what: Corruption },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What is wrong with a corrupt record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("record length {0} is implausible")]
    Length(u32),
    #[error("record checksum mismatch")]
    Checksum,
    #[error("unknown or malformed record")]
    Malformed,
}

impl Record {
    /// The record body (kind, position, payload).
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        let (kind, payload): (u8, Vec<u8>) = match &self.event {
            Event::Seed(s) => (1, s.to_vec()),
            Event::Console(bytes) => (2, bytes.clone()),
            Event::Frame { nic, data } => {
                let mut p = vec![*nic];
                p.extend_from_slice(data);
                (3, p)
            }
            Event::Skip(n) => (4, n.to_le_bytes().to_vec()),
            Event::Entropy(bytes) => (5, bytes.clone()),
            Event::Hash(h) => (6, h.to_le_bytes().to_vec()),
            Event::End(r) => (7, vec![r.code()]),
            Event::Snapshot(id) => (8, id.to_le_bytes().to_vec()),
        };
        b.push(kind);
        b.extend_from_slice(&self.position.to_le_bytes());
        b.extend_from_slice(&payload);
        b
    }

    /// Parse a record body; `None` if it is not a valid one.
    pub fn decode_body(body: &[u8]) -> Option<Record> {
        if body.len() < 9 {
            return None;
        }
        let position = u64::from_le_bytes(body[1..9].try_into().ok()?);
        let p = &body[9..];
        let u64_of = |p: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(p.try_into().ok()?)) };
        let event = match body[0] {
            1 => Event::Seed(p.try_into().ok()?),
            2 => Event::Console(p.to_vec()),
            3 => Event::Frame { nic: *p.first()?, data: p[1..].to_vec() },
            4 => Event::Skip(u64_of(p)?),
            5 => Event::Entropy(p.to_vec()),
            6 => Event::Hash(u64_of(p)?),
            7 if p.len() == 1 => Event::End(EndReason::from_code(p[0])?),
            8 => Event::Snapshot(u64_of(p)?),
            _ => return None,
        };
        Some(Record { position, event })
    }
}

/// Writes a log to any byte sink (a file, a socket).
pub struct LogWriter<W: Write> {
    out: W,
    /// Bytes written so far (header included).
    pub bytes: u64,
    pub records: u64,
}

impl<W: Write> LogWriter<W> {
    /// Start a log: writes the header carrying `meta`.
    pub fn new(mut out: W, meta: &[u8]) -> std::io::Result<LogWriter<W>> {
        let mut h = Vec::with_capacity(20 + meta.len());
        h.extend_from_slice(&MAGIC);
        let mut covered = VERSION.to_le_bytes().to_vec();
        covered.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        covered.extend_from_slice(meta);
        h.extend_from_slice(&covered);
        h.extend_from_slice(&crc32fast::hash(&covered).to_le_bytes());
        out.write_all(&h)?;
        Ok(LogWriter { out, bytes: h.len() as u64, records: 0 })
    }

    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let body = record.encode_body();
        let mut frame = Vec::with_capacity(8 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        self.out.write_all(&frame)?;
        self.bytes += frame.len() as u64;
        self.records += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Reads a log back.
pub struct LogReader<R: Read> {
    input: R,
    offset: u64,
    /// Set when the stream ended inside a record: the byte offset where
    /// that last, incomplete record starts.
    pub truncated_at: Option<u64>,
}

/// Read as much of `buf` as the stream has; returns the count.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> LogReader<R> {
    /// Check the header; returns the reader and the header's metadata.
    pub fn new(mut input: R) -> Result<(LogReader<R>, Vec<u8>), LogError> {
        let mut fixed = [0u8; 16];
        if read_full(&mut input, &mut fixed)? < 16 || fixed[..8] != MAGIC {
            return Err(LogError::NotALog);
        }
        let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(LogError::Version { found: version });
        }
        let meta_len = u32::from_le_bytes(fixed[12..16].try_into().unwrap());
        if meta_len > MAX_META {
            return Err(LogError::BadHeader);
        }
        let mut rest = vec![0u8; meta_len as usize + 4];
        if read_full(&mut input, &mut rest)? < rest.len() {
            return Err(LogError::BadHeader);
        }
        let meta = rest[..meta_len as usize].to_vec();
        let crc = u32::from_le_bytes(rest[meta_len as usize..].try_into().unwrap());
        let mut covered = fixed[8..16].to_vec();
        covered.extend_from_slice(&meta);
        if crc32fast::hash(&covered) != crc {
            return Err(LogError::BadHeader);
        }
        let offset = 16 + rest.len() as u64;
        Ok((LogReader { input, offset, truncated_at: None }, meta))
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record; `Ok(None)` at the end of the log (see
    /// `truncated_at` for whether it ended cleanly).
    pub fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.truncated_at.is_some() {
            return Ok(None);
        }
        let start = self.offset;
        let mut head = [0u8; 8];
        let n = read_full(&mut self.input, &mut head)?;
        if n == 0 {
            return Ok(None);
        }
        if n < 8 {
            self.truncated_at = Some(start);
            return Ok(None);
        }
        let len = u32::from_le_bytes(head[0..4].try_into().unwrap());
        let crc = u32::from_le_bytes(head[4..8].try_into().unwrap());
        if len > MAX_RECORD {
            return Err(LogError::Corrupt { offset: start, what: Corruption::Length(len) });
        }
        let mut body = vec![0u8; len as usize];
        if read_full(&mut self.input, &mut body)? < body.len() {
            self.truncated_at = Some(start);
            return Ok(None);
        }
        if crc32fast::hash(&body) != crc {
            return Err(LogError::Corrupt { offset: start, what: Corruption::Checksum });
        }
        let record =
            Record::decode_body(&body).ok_or(LogError::Corrupt { offset: start, what: Corruption::Malformed })?;
        self.offset += 8 + len as u64;
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record { position: 0, event: Event::Seed([7; 32]) },
            Record { position: 10, event: Event::Console(b"ls\n".to_vec()) },
            Record { position: 10, event: Event::Entropy(vec![1, 2, 3]) },
            Record { position: 99, event: Event::Frame { nic: 1, data: vec![0xab; 60] } },
            Record { position: 120, event: Event::Skip(5000) },
            Record { position: 5120, event: Event::Hash(0xdead_beef) },
            Record { position: 5120, event: Event::Snapshot(42) },
            Record { position: 6000, event: Event::End(EndReason::Reboot) },
            Record { position: 0, event: Event::Console(Vec::new()) },
            Record { position: 1, event: Event::End(EndReason::PowerOff) },
        ]
    }

    fn write(records: &[Record], meta: &[u8]) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), meta).unwrap();
        for r in records {
            w.append(r).unwrap();
        }
        assert_eq!(w.bytes as usize, w.get_mut().len());
        w.out
    }

    /// Records, header metadata, and where the log was truncated.
    type ReadBack = (Vec<Record>, Vec<u8>, Option<u64>);

    fn read_all(bytes: &[u8]) -> Result<ReadBack, LogError> {
        let (mut r, meta) = LogReader::new(bytes)?;
        let mut v = Vec::new();
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok((v, meta, r.truncated_at))
    }

    #[test]
    fn records_round_trip() {
        let bytes = write(&sample(), b"{\"vm\":1}");
        let (back, meta, trunc) = read_all(&bytes).unwrap();
        assert_eq!(back, sample());
        assert_eq!(meta, b"{\"vm\":1}");
        assert_eq!(trunc, None);
    }

    #[test]
    fn random_streams_round_trip() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut pos = 0;
            let recs: Vec<Record> = (0..rnd() % 50)
                .map(|_| {
                    pos += rnd() % 1000;
                    let len = (rnd() % 1600) as usize;
                    let data: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
                    let event = match rnd() % 6 {
                        0 => Event::Console(data),
                        1 => Event::Frame { nic: (rnd() % 4) as u8, data },
                        2 => Event::Skip(rnd()),
                        3 => Event::Entropy(data),
                        4 => Event::Hash(rnd()),
                        _ => Event::End(EndReason::Limit),
                    };
                    Record { position: pos, event }
                })
                .collect();
            assert_eq!(read_all(&write(&recs, b"")).unwrap().0, recs);
        }
    }

    #[test]
    fn a_truncated_log_reads_up_to_its_last_whole_record() {
        let bytes = write(&sample(), b"m");
        let header = 16 + 1 + 4;
        // Cut at every byte: never an error, always a prefix of the records.
        for cut in header..bytes.len() {
            let (recs, _, trunc) = read_all(&bytes[..cut]).unwrap();
            assert_eq!(recs, sample()[..recs.len()]);
            let whole = write(&sample()[..recs.len()], b"m").len();
            assert_eq!(trunc.is_some(), cut != whole, "cut at {cut}");
            if let Some(off) = trunc {
                assert_eq!(off as usize, whole, "truncation reported where the last record starts");
            }
        }
    }

    #[test]
    fn corruption_is_reported_with_its_offset() {
        let bytes = write(&sample(), b"m");
        let header = 16 + 1 + 4;
        let first_len = 8 + sample()[0].encode_body().len();
        // Flip one byte inside the second record's body.
        let mut bad = bytes.clone();
        bad[header + first_len + 8 + 3] ^= 0x40;
        match read_all(&bad) {
            Err(LogError::Corrupt { offset, .. }) => assert_eq!(offset as usize, header + first_len),
            other => panic!("expected corruption, got {other:?}"),
        }
        // An absurd length is corruption too, not a huge allocation.
        let mut bad = bytes.clone();
        bad[header..header + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        match read_all(&bad) {
            Err(e @ LogError::Corrupt { offset, what: Corruption::Length(u32::MAX) }) if offset as usize == header => {
                assert_eq!(
                    e.to_string(),
                    format!("event log is corrupt at byte offset {header}: record length {} is implausible", u32::MAX)
                );
            }
            other => panic!("expected an implausible length, got {other:?}"),
        }
    }

    #[test]
    fn foreign_files_and_versions_are_refused() {
        assert!(matches!(read_all(b"hello world, not a log"), Err(LogError::NotALog)));
        assert!(matches!(read_all(b""), Err(LogError::NotALog)));
        let mut bytes = write(&sample(), b"m");
        bytes[8] = 9;
        assert!(matches!(read_all(&bytes), Err(LogError::Version { found: 9 })));
        let mut bytes = write(&sample(), b"meta");
        bytes[17] ^= 1;
        assert!(matches!(read_all(&bytes), Err(LogError::BadHeader)));
    }
}
