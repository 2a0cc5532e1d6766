//! Arbitration: who may run the VM after the pair loses contact.
//!
//! The arbiter holds one record per VM: the current **epoch** and the side
//! that owns it. Starting a pair, going live (secondary) and going on alone
//! (primary) each need a compare-and-swap from the epoch the side knows to
//! the next one; of two sides that lost each other exactly one can win, and
//! the loser stops its guest. The epoch travels in every message on the log
//! channel as a fencing token.
//!
//! Two arbiters: a file (for pairs on one host; an exclusive `flock` makes
//! the read-compare-write atomic) and etcd (pairs on two hosts), through its
//! v3 JSON gateway: a transaction comparing the key's `mod_revision`, which
//! is etcd's documented fencing primitive. Leases are not used: a lease is
//! kept alive by clocks, and no lease is short enough for sub-second failover.

use base64::Engine;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Who holds which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub epoch: u64,
    pub owner: String,
    /// The last epoch at which a side claimed to run alone (a secondary
    /// going live, a primary going on without its secondary): from then
    /// on that side's replica is ahead, and a replica that last ran at an
    /// earlier epoch is stale. Carried over by every claim; 0: never.
    #[serde(default)]
    pub alone: u64,
}

impl Holder {
    fn none() -> Holder {
        Holder { epoch: 0, owner: String::new(), alone: 0 }
    }

    /// The record a claim from `current` by `owner` writes.
    fn next(current: Option<&Holder>, owner: &str, alone: bool) -> Holder {
        let epoch = current.map_or(0, |h| h.epoch) + 1;
        let before = current.map_or(0, |h| h.alone);
        Holder { epoch, owner: owner.to_string(), alone: if alone { epoch } else { before } }
    }
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This side now owns this epoch.
    Won(u64),
    /// Someone else moved the epoch first.
    Lost(Holder),
}

/// Why an arbiter gave no answer. `arbiter` is its `describe()`; the
/// source says what failed underneath (and is not repeated in the message).
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("arbiter {arbiter} is unreachable")]
    Unreachable {
        arbiter: String,
        #[source]
        source: BoxError,
    },
    #[error("arbiter {arbiter} holds something that is not an epoch record")]
    Corrupt {
        arbiter: String,
        #[source]
        source: BoxError,
    },
}

/// The cause under an [`ArbiterError`]: an I/O, HTTP, JSON or base64 error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An arbiter spec that `from_spec` cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("--arbiter file: needs a path (file:/run/lockstep/vm.epoch)")]
    NoPath,
    #[error("--arbiter etcd:{0}: expected etcd:http://HOST:PORT")]
    EtcdUrl(String),
    #[error("--arbiter '{0}': expected file:PATH or etcd:http://HOST:PORT")]
    Unknown(String),
}

/// A failed etcd request. ureq's error already prints its source in its
/// own message, so this one reports none: a chain printer would print it
/// twice.
#[derive(Debug)]
struct HttpError(Box<ureq::Error>);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HttpError {}

pub trait Arbiter: Send + Sync {
    /// What and where it is, for messages.
    fn describe(&self) -> String;
    /// The current holder, if any epoch was ever claimed.
    fn read(&self) -> Result<Option<Holder>, ArbiterError>;
    /// If the current epoch is `expected` (0: none yet), make it
    /// `expected + 1`, owned by `owner`; `alone`: to run without a partner
    /// (see [`Holder::alone`]).
    fn claim(&self, expected: u64, owner: &str, alone: bool) -> Result<Claim, ArbiterError>;
    /// Do sides on two hosts see the same arbiter? (A file is one host's.)
    fn shared_across_hosts(&self) -> bool;
}

/// Parse an arbiter spec: `file:PATH` or `etcd:http://HOST:PORT`.
pub fn from_spec(spec: &str, vm_id: &str) -> Result<Box<dyn Arbiter>, SpecError> {
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(SpecError::NoPath);
        }
        Ok(Box::new(FileArbiter::new(path)))
    } else if let Some(url) = spec.strip_prefix("etcd:") {
        if !url.starts_with("http://") {
            return Err(SpecError::EtcdUrl(url.into()));
        }
        Ok(Box::new(EtcdArbiter::new(url, &format!("/lockstep/{vm_id}/epoch"))))
    } else {
        Err(SpecError::Unknown(spec.into()))
    }
}

/// The epoch in a file, for pairs on one host.
pub struct FileArbiter {
    path: PathBuf,
}

impl FileArbiter {
    pub fn new(path: impl AsRef<Path>) -> FileArbiter {
        FileArbiter { path: path.as_ref().to_path_buf() }
    }

    fn err(&self, e: std::io::Error) -> ArbiterError {
        ArbiterError::Unreachable { arbiter: self.describe(), source: e.into() }
    }

    fn lock_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn read_unlocked(&self) -> Result<Option<Holder>, ArbiterError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ArbiterError::Corrupt { arbiter: self.describe(), source: e.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

impl Arbiter for FileArbiter {
    fn describe(&self) -> String {
        format!("file '{}'", self.path.display())
    }

    fn read(&self) -> Result<Option<Holder>, ArbiterError> {
        self.read_unlocked()
    }

    fn shared_across_hosts(&self) -> bool {
        false
    }

    fn claim(&self, expected: u64, owner: &str, alone: bool) -> Result<Claim, ArbiterError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())
            .map_err(|e| self.err(e))?;
        lock.lock().map_err(|e| self.err(e))?;
        let current = self.read_unlocked()?;
        let epoch = current.as_ref().map_or(0, |h| h.epoch);
        if epoch != expected {
            return Ok(Claim::Lost(current.unwrap_or_else(Holder::none)));
        }
        let next = Holder::next(current.as_ref(), owner, alone);
        // Write a new file and rename it over the old: a crash leaves the
        // old record or the new one, never half of one.
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        f.write_all(&serde_json::to_vec(&next).unwrap()).map_err(|e| self.err(e))?;
        f.sync_all().map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        Ok(Claim::Won(next.epoch))
    }
}

/// The epoch under a key in etcd (v3 JSON gateway).
pub struct EtcdArbiter {
    url: String,
    key: String,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(default)]
    mod_revision: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
}

impl EtcdArbiter {
    pub fn new(url: &str, key: &str) -> EtcdArbiter {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        EtcdArbiter { url: url.trim_end_matches('/').to_string(), key: key.to_string(), agent }
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn unreachable(&self, source: BoxError) -> ArbiterError {
        ArbiterError::Unreachable { arbiter: self.describe(), source }
    }

    fn corrupt(&self, source: BoxError) -> ArbiterError {
        ArbiterError::Corrupt { arbiter: self.describe(), source }
    }

    fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value, ArbiterError> {
        let resp = self
            .agent
            .post(&format!("{}{path}", self.url))
            .send_json(body)
            .map_err(|e| self.unreachable(Box::new(HttpError(Box::new(e)))))?;
        resp.into_json().map_err(|e| self.unreachable(e.into()))
    }

    /// The holder and the key's mod_revision.
    fn range(&self) -> Result<Option<(Holder, String)>, ArbiterError> {
        let v = self.post("/v3/kv/range", serde_json::json!({ "key": Self::b64(self.key.as_bytes()) }))?;
        let r: RangeResponse = serde_json::from_value(v).map_err(|e| self.corrupt(e.into()))?;
        let Some(kv) = r.kvs.into_iter().next() else { return Ok(None) };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(kv.value.unwrap_or_default())
            .map_err(|e| self.corrupt(e.into()))?;
        let holder: Holder = serde_json::from_slice(&raw).map_err(|e| self.corrupt(e.into()))?;
        Ok(Some((holder, kv.mod_revision.unwrap_or_default())))
    }
}

impl Arbiter for EtcdArbiter {
    fn describe(&self) -> String {
        format!("etcd {} key {}", self.url, self.key)
    }

    fn read(&self) -> Result<Option<Holder>, ArbiterError> {
        Ok(self.range()?.map(|(h, _)| h))
    }

    fn shared_across_hosts(&self) -> bool {
        true
    }

    fn claim(&self, expected: u64, owner: &str, alone: bool) -> Result<Claim, ArbiterError> {
        let current = self.range()?;
        let epoch = current.as_ref().map_or(0, |(h, _)| h.epoch);
        if epoch != expected {
            let holder = current.map(|(h, _)| h).unwrap_or_else(Holder::none);
            return Ok(Claim::Lost(holder));
        }
        let key = Self::b64(self.key.as_bytes());
        let next = Holder::next(current.as_ref().map(|(h, _)| h), owner, alone);
        // The swap happens only if nobody wrote the key since we read it.
        let compare = match &current {
            Some((_, rev)) => serde_json::json!({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": rev}),
            None => serde_json::json!({"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}),
        };
        let txn = serde_json::json!({
            "compare": [compare],
            "success": [{"request_put": {"key": key, "value": Self::b64(&serde_json::to_vec(&next).unwrap())}}],
        });
        let v = match self.post("/v3/kv/txn", txn) {
            Ok(v) => v,
            // The transaction may have committed with its reply lost: if the
            // key now names this side at the next epoch, the claim is won
            // (no other side writes this owner's name).
            Err(e) => match self.read() {
                Ok(Some(h)) if h == next => return Ok(Claim::Won(next.epoch)),
                _ => return Err(e),
            },
        };
        let r: TxnResponse = serde_json::from_value(v).map_err(|e| self.corrupt(e.into()))?;
        if r.succeeded {
            Ok(Claim::Won(next.epoch))
        } else {
            let holder = self.read()?.unwrap_or_else(Holder::none);
            Ok(Claim::Lost(holder))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-arbiter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("vm.epoch")
    }

    /// 14.3 The record remembers the last epoch a side ran alone, across
    /// later claims, so a replica that last ran before it is known stale.
    #[test]
    fn the_last_epoch_run_alone_is_carried_over() {
        let a = FileArbiter::new(tmp("alone"));
        assert_eq!(a.claim(0, "p", false).unwrap(), Claim::Won(1));
        assert_eq!(a.read().unwrap().unwrap().alone, 0);
        assert_eq!(a.claim(1, "s", true).unwrap(), Claim::Won(2));
        assert_eq!(a.claim(2, "s-again", false).unwrap(), Claim::Won(3));
        assert_eq!(a.read().unwrap(), Some(Holder { epoch: 3, owner: "s-again".into(), alone: 2 }));
    }

    #[test]
    fn file_arbiter_compare_and_swap() {
        let a = FileArbiter::new(tmp("cas"));
        assert_eq!(a.read().unwrap(), None);
        assert_eq!(a.claim(0, "primary", false).unwrap(), Claim::Won(1));
        assert_eq!(
            a.claim(0, "secondary", false).unwrap(),
            Claim::Lost(Holder { epoch: 1, owner: "primary".into(), alone: 0 })
        );
        assert_eq!(a.claim(1, "secondary", false).unwrap(), Claim::Won(2));
        assert_eq!(
            a.claim(1, "primary", false).unwrap(),
            Claim::Lost(Holder { epoch: 2, owner: "secondary".into(), alone: 0 })
        );
        assert_eq!(a.read().unwrap(), Some(Holder { epoch: 2, owner: "secondary".into(), alone: 0 }));
    }

    /// Many threads claim the same epoch at once: exactly one wins.
    #[test]
    fn exactly_one_concurrent_claim_wins() {
        let path = tmp("race");
        FileArbiter::new(&path).claim(0, "start", false).unwrap();
        let outcomes: Vec<Claim> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || FileArbiter::new(&path).claim(1, &format!("t{i}"), false).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners = outcomes.iter().filter(|c| **c == Claim::Won(2)).count();
        assert_eq!(winners, 1, "{outcomes:?}");
        let holder = FileArbiter::new(&path).read().unwrap().unwrap();
        assert_eq!(holder.epoch, 2);
    }

    #[test]
    fn damaged_file_and_bad_specs_are_named() {
        let path = tmp("bad");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"garbage").unwrap();
        let e = FileArbiter::new(&path).claim(0, "p", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("arbiter file '{}' holds something that is not an epoch record", path.display())
        );
        assert!(std::error::Error::source(&e).is_some(), "the parser's reason is the source");
        assert_eq!(from_spec("bogus:x", "v").err(), Some(SpecError::Unknown("bogus:x".into())));
        assert_eq!(from_spec("etcd:127.0.0.1:2379", "v").err(), Some(SpecError::EtcdUrl("127.0.0.1:2379".into())));
        assert_eq!(from_spec("file:", "v").err(), Some(SpecError::NoPath));
        assert!(from_spec("file:/tmp/x.epoch", "v").is_ok());
    }

    #[test]
    fn unreachable_etcd_is_an_error_not_a_verdict() {
        // Port 9 (discard) on loopback: nothing listens.
        let a = EtcdArbiter::new("http://127.0.0.1:9", "/lockstep/t/epoch");
        let e = a.claim(0, "p", false).unwrap_err();
        assert!(matches!(e, ArbiterError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.to_string(), "arbiter etcd http://127.0.0.1:9 key /lockstep/t/epoch is unreachable");
        let why = std::error::Error::source(&e).unwrap().to_string();
        assert!(std::error::Error::source(&e).unwrap().source().is_none(), "ureq's cause is in its text: {why}");
    }

    /// A stand-in for etcd's JSON gateway that commits every transaction
    /// but (while `drop_txn_replies`) closes the connection instead of
    /// answering it, as a network that loses the reply would.
    fn lossy_etcd(drop_txn_replies: bool) -> String {
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut stored: Option<(String, u64)> = None;
            for stream in listener.incoming().flatten().take(16) {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if h.trim().is_empty() {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let answer = if line.contains("/v3/kv/txn") {
                    let value = req["success"][0]["request_put"]["value"].as_str().unwrap().to_string();
                    let rev = stored.as_ref().map_or(1, |(_, r)| r + 1);
                    stored = Some((value, rev));
                    if drop_txn_replies {
                        continue; // committed; the reply is lost
                    }
                    serde_json::json!({"succeeded": true})
                } else {
                    match &stored {
                        Some((v, rev)) => serde_json::json!({"kvs": [{"value": v, "mod_revision": rev.to_string()}]}),
                        None => serde_json::json!({}),
                    }
                };
                let body = answer.to_string();
                let mut w = stream;
                let _ =
                    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        url
    }

    /// 14.3 A compare-and-swap that committed but whose reply was lost is
    /// a win when the key names this side (it used to be "unreachable",
    /// and the side then never went on although it held the epoch).
    #[test]
    fn an_etcd_claim_whose_reply_was_lost_is_won_if_the_key_names_this_side() {
        let a = EtcdArbiter::new(&lossy_etcd(true), "/lockstep/t/epoch");
        assert_eq!(a.claim(0, "secondary@b:1", false).unwrap(), Claim::Won(1));
        assert_eq!(a.read().unwrap(), Some(Holder { epoch: 1, owner: "secondary@b:1".into(), alone: 0 }));
        // Another side's claim from the same epoch finds it taken.
        let b = EtcdArbiter::new(&lossy_etcd(false), "/lockstep/t/epoch");
        assert_eq!(b.claim(0, "x", false).unwrap(), Claim::Won(1));
        assert_eq!(b.claim(0, "y", false).unwrap(), Claim::Lost(Holder { epoch: 1, owner: "x".into(), alone: 0 }));
        assert!(a.shared_across_hosts() && !FileArbiter::new(tmp("kind")).shared_across_hosts());
    }
}
