//! The authenticated log channel (`--key`): a pre-shared 256-bit key, a
//! mutual challenge-response when a connection opens, and an HMAC-SHA256
//! tag on every message after it.
//!
//! Handshake (right after the preambles): the primary sends a fresh nonce
//! (`AuthInit`); the secondary answers with its own nonce and
//! `HMAC(K, "lockstep-secondary" | nP | nS)`; the primary checks it and
//! proves itself with `HMAC(K, "lockstep-primary" | nP | nS)`. Each side
//! then tags its messages with a key of its direction,
//! `HMAC(K, "lockstep p->s" | nP | nS)` or `"s->p"`, over a sequence
//! number and the framed message. So a peer without the key cannot pair,
//! and a message that is altered, replayed (within or across connections:
//! the nonces are fresh) or reordered fails its tag. The channel is
//! authenticated, not encrypted: the log (the guest's inputs) travels in
//! the clear, as on a dedicated FT link.

use crate::wire::WireError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// A pair's pre-shared key.
#[derive(Clone)]
pub struct Key([u8; 32]);

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file '{path}'")]
    Read { path: String, source: std::io::Error },
    #[error("'{path}' is not a lockstep key (64 hex digits; make one with `lockstep key new FILE`)")]
    Format { path: String },
    #[error("cannot write the key file '{path}'")]
    Write { path: String, source: std::io::Error },
    #[error("'{path}' exists: a key is never overwritten (remove it first)")]
    Exists { path: String },
}

impl Key {
    /// 32 bytes from the host's random source.
    pub fn generate() -> std::io::Result<Key> {
        Ok(Key(random32()?))
    }

    /// Read a key file (64 hex digits, surrounding white space ignored).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        let text = text.trim();
        let bad = || KeyError::Format { path: path.display().to_string() };
        if text.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(Key(key))
    }

    /// Write a new key file, readable by its owner only; an existing file
    /// is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let name = || path.display().to_string();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: name() }
            } else {
                KeyError::Write { path: name(), source: e }
            }
        })?;
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{hex}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Write { path: name(), source })
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The secondary's proof for nonces `np`, `ns`.
    pub fn secondary_proof(&self, np: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
        self.mac(&[b"lockstep-secondary", np, ns])
    }

    /// The primary's proof for nonces `np`, `ns`.
    pub fn primary_proof(&self, np: &[u8; 32], ns: &[u8; 32]) -> [u8; 32] {
        self.mac(&[b"lockstep-primary", np, ns])
    }

    /// The two directions' seals for a connection: (primary → secondary,
    /// secondary → primary).
    pub fn seals(&self, np: &[u8; 32], ns: &[u8; 32]) -> (Seal, Seal) {
        let key = |dir: &[u8]| Seal { key: self.mac(&[b"lockstep ", dir, np, ns]), seq: 0 };
        (key(b"p->s"), key(b"s->p"))
    }
}

/// Compare two proofs in constant time.
pub fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One direction of an authenticated connection: its key and the number
/// of the next message.
pub struct Seal {
    key: [u8; 32],
    seq: u64,
}

impl Seal {
    fn mac(&self, framed: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(&self.seq.to_le_bytes());
        m.update(framed);
        m
    }

    /// A key for something else that belongs to this direction of the
    /// connection (`label`, `data`): HMAC-SHA256 under this seal's key.
    pub fn derive(&self, label: &[u8], data: &[u8]) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(label);
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// The tag of the next message sent.
    pub fn tag(&mut self, framed: &[u8]) -> [u8; 32] {
        let tag = self.mac(framed).finalize().into_bytes().into();
        self.seq += 1;
        tag
    }

    /// Check the tag of the next message received.
    pub fn check(&mut self, framed: &[u8], tag: &[u8; 32]) -> Result<(), WireError> {
        self.mac(framed).verify_slice(tag).map_err(|_| WireError::Unauthentic)?;
        self.seq += 1;
        Ok(())
    }
}

/// 32 bytes from the host's random source (nonces, keys).
pub fn random32() -> std::io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{receive, send, Message};

    #[test]
    fn keys_round_trip_through_files_and_are_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("ft-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pair.key");
        let k = Key::generate().unwrap();
        k.write_new(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Key::load(&path).unwrap().0, k.0);
        assert!(matches!(k.write_new(&path), Err(KeyError::Exists { .. })));
        std::fs::write(&path, "not a key\n").unwrap();
        let e = Key::load(&path).err().unwrap().to_string();
        assert!(e.contains("is not a lockstep key"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn sealed_messages_pass_and_tampered_replayed_or_foreign_ones_do_not() {
        let (np, ns) = ([1u8; 32], [2u8; 32]);
        let k = Key([9u8; 32]);
        let (mut tx, _) = k.seals(&np, &ns);
        let (mut rx, _) = k.seals(&np, &ns);
        let mut wire = Vec::new();
        send(&mut wire, 3, &Message::Through { through: 42, released: 0, urgent: false }, Some(&mut tx)).unwrap();
        send(&mut wire, 3, &Message::Through { through: 43, released: 0, urgent: false }, Some(&mut tx)).unwrap();
        let first_len = wire.len() / 2;
        let mut r = &wire[..];
        assert_eq!(
            receive(&mut r, Some(&mut rx)).unwrap(),
            (3, Message::Through { through: 42, released: 0, urgent: false })
        );
        // The first message again (a replay) fails: its number is spent.
        let mut replay = &wire[..first_len];
        assert!(matches!(receive(&mut replay, Some(&mut rx)), Err(WireError::Unauthentic)));
        // A flipped bit fails (the checksum is fixed up, the tag is not).
        let (mut tx2, _) = k.seals(&np, &ns);
        let (mut rx2, _) = k.seals(&np, &ns);
        let mut m =
            crate::wire::encode_sealed(&Message::Through { through: 7, released: 0, urgent: false }, 1, Some(&mut tx2));
        m[20] ^= 1;
        let crc = crc32fast::hash(&m[8..m.len() - 32]).to_le_bytes();
        m[4..8].copy_from_slice(&crc);
        assert!(matches!(receive(&mut &m[..], Some(&mut rx2)), Err(WireError::Unauthentic)));
        // Another key fails.
        let (mut other, _) = Key([8u8; 32]).seals(&np, &ns);
        let (mut rx3, _) = k.seals(&np, &ns);
        let m = crate::wire::encode_sealed(
            &Message::Through { through: 7, released: 0, urgent: false },
            1,
            Some(&mut other),
        );
        assert!(matches!(receive(&mut &m[..], Some(&mut rx3)), Err(WireError::Unauthentic)));
        // Proofs differ by role and by key.
        assert!(!same(&k.primary_proof(&np, &ns), &k.secondary_proof(&np, &ns)));
        assert!(same(&k.primary_proof(&np, &ns), &Key([9u8; 32]).primary_proof(&np, &ns)));
        assert!(!same(&k.primary_proof(&np, &ns), &Key([8u8; 32]).primary_proof(&np, &ns)));
    }
}
