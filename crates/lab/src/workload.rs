//! A client workload for a protected guest: numbered writes and read-backs
//! over one TCP connection to the guest's redis-server. Used by the demo,
//! the pair benchmarks and the pair tests.
//!
//! Every step `i` does `INCR lockstep:counter` (the guest's own write
//! counter: the reply must be exactly one more than the last one, so a lost
//! or doubled write, or a second live copy of the guest, shows at once),
//! `SET lockstep:w:i <value of i>`, and every 8th step reads a key back.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A minimal RESP client.
pub struct Redis(BufReader<TcpStream>);

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Error(String),
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Redis {
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Redis> {
        let sock = addr.parse().map_err(|e| bad(format!("{addr}: {e}")))?;
        let s = TcpStream::connect_timeout(&sock, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Redis(BufReader::new(s)))
    }

    pub fn command(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&req)?;
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        let body = line.trim_end().get(1..).unwrap_or("").to_string();
        match line.as_bytes().first() {
            Some(b'+') => Ok(Reply::Simple(body)),
            Some(b'-') => Ok(Reply::Error(body)),
            Some(b':') => body.parse().map(Reply::Int).map_err(|_| bad(format!("bad integer reply {line:?}"))),
            Some(b'$') => {
                let n: i64 = body.parse().map_err(|_| bad(format!("bad bulk length {line:?}")))?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.0.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Ok(Reply::Bulk(Some(buf)))
            }
            _ => Err(bad(format!("unexpected reply {line:?}"))),
        }
    }
}

/// The value written at step `i` (long enough to span a few segments now
/// and then).
pub fn value_of(i: u64) -> Vec<u8> {
    let len = if i.is_multiple_of(50) { 4000 } else { 40 };
    (0..len).map(|k| b'a' + ((i * 7 + k as u64) % 26) as u8).collect()
}

/// Numbered writes on one connection, with what was acknowledged.
pub struct Writer {
    redis: Redis,
    /// The counter's value before the first step.
    pub base: i64,
    /// Steps acknowledged (all of their replies seen and right).
    pub acked: u64,
    /// Longest time between two acknowledged steps, and when it ended.
    pub max_gap: Duration,
    pub latencies_us: Vec<u64>,
    last_ack: Instant,
}

impl Writer {
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Writer> {
        let mut redis = Redis::connect(addr, timeout)?;
        let base = match redis.command(&[b"INCRBY", b"lockstep:counter", b"0"])? {
            Reply::Int(n) => n,
            r => return Err(bad(format!("INCRBY answered {r:?}"))),
        };
        Ok(Writer {
            redis,
            base,
            acked: 0,
            max_gap: Duration::ZERO,
            latencies_us: Vec::new(),
            last_ack: Instant::now(),
        })
    }

    /// One numbered step; an error names what went wrong (a reset, a
    /// timeout, a counter that skipped).
    pub fn step(&mut self) -> Result<(), String> {
        let i = self.acked + 1;
        let t = Instant::now();
        let err = |e: std::io::Error| format!("step {i}: {e}");
        match self.redis.command(&[b"INCR", b"lockstep:counter"]).map_err(err)? {
            Reply::Int(n) if n == self.base + i as i64 => {}
            r => {
                return Err(format!(
                    "step {i}: the guest's write counter answered {r:?}, expected {}",
                    self.base + i as i64
                ))
            }
        }
        let key = format!("lockstep:w:{i}");
        match self.redis.command(&[b"SET", key.as_bytes(), &value_of(i)]).map_err(err)? {
            Reply::Simple(s) if s == "OK" => {}
            r => return Err(format!("step {i}: SET answered {r:?}")),
        }
        if i.is_multiple_of(8) {
            let back = format!("lockstep:w:{}", i / 2);
            match self.redis.command(&[b"GET", back.as_bytes()]).map_err(err)? {
                Reply::Bulk(Some(v)) if v == value_of(i / 2) => {}
                r => return Err(format!("step {i}: {back} read back as {r:?}")),
            }
        }
        let now = Instant::now();
        self.latencies_us.push(now.duration_since(t).as_micros() as u64);
        self.max_gap = self.max_gap.max(now.duration_since(self.last_ack));
        self.last_ack = now;
        self.acked = i;
        Ok(())
    }

    /// Read back every acknowledged write; the first missing or wrong one
    /// is an error.
    pub fn verify_all(&mut self) -> Result<(), String> {
        for i in 1..=self.acked {
            let key = format!("lockstep:w:{i}");
            match self.redis.command(&[b"GET", key.as_bytes()]).map_err(|e| format!("verify {key}: {e}"))? {
                Reply::Bulk(Some(v)) if v == value_of(i) => {}
                r => return Err(format!("acknowledged write {key} reads back as {r:?}")),
            }
        }
        Ok(())
    }
}
