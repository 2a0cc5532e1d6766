//! Split virtqueues (virtio 1.2, 2.7), read and written in guest RAM.
//!
//! ```text
//!  descriptor (16 B): addr u64 | len u32 | flags u16 | next u16
//!  available ring:    flags u16 | idx u16 | ring[num] u16 | used_event u16
//!  used ring:         flags u16 | idx u16 | ring[num] {id u32, len u32} | avail_event u16
//! ```
//!
//! Guest memory is untrusted: every address is checked against RAM, a
//! chain may not be longer than the queue (so loops end), an indirect table
//! must be a whole number of descriptors and may not nest (2.7.5.3.1). A
//! violation makes the queue report [`QueueError`], and the device is then
//! marked broken; the host never panics.

use crate::ram::Ram;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest queue we offer.
pub const QUEUE_MAX: u16 = 256;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue memory at {0:#x} is outside guest RAM")]
    OutOfRam(u64),
    #[error("descriptor chain longer than the queue (a loop?)")]
    ChainTooLong,
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    #[error("indirect descriptor table of {0} bytes is not a whole number of descriptors")]
    BadIndirectLen(u32),
    #[error("nested indirect descriptor table")]
    NestedIndirect,
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// The device writes into it (otherwise it reads from it).
    pub write: bool,
}

/// A chain popped from the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

/// Queue registers as the driver set them, and the device's position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Queue {
    pub num: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub last_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated (2.7.7, 2.7.10).
    pub event_idx: bool,
}

/// Should the device interrupt, with EVENT_IDX? (2.7.10: the driver asks
/// for an interrupt when the used index moves past `used_event`.)
pub fn need_event(used_event: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(used_event).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

fn read_u16(ram: &Ram, addr: u64) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    ram.read(addr, &mut b).then(|| u16::from_le_bytes(b)).ok_or(QueueError::OutOfRam(addr))
}

fn read_desc(ram: &Ram, table: u64, i: u16) -> Result<(u64, u32, u16, u16), QueueError> {
    let addr = table + 16 * i as u64;
    let mut b = [0u8; 16];
    if !ram.read(addr, &mut b) {
        return Err(QueueError::OutOfRam(addr));
    }
    Ok((
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u16::from_le_bytes(b[12..14].try_into().unwrap()),
        u16::from_le_bytes(b[14..16].try_into().unwrap()),
    ))
}

impl Queue {
    /// Pop the next available chain, if any.
    pub fn pop(&mut self, ram: &mut Ram) -> Result<Option<Chain>, QueueError> {
        if !self.ready || self.num == 0 {
            return Ok(None);
        }
        let avail_idx = read_u16(ram, self.avail + 2)?;
        if avail_idx == self.last_avail {
            if self.event_idx {
                // Ask to be notified of the next buffer: a device that waits
                // for buffers (network receive) learns of them this way.
                self.write_avail_event(ram)?;
            }
            return Ok(None);
        }
        let slot = self.avail + 4 + 2 * (self.last_avail % self.num) as u64;
        let head = read_u16(ram, slot)?;
        if head >= self.num {
            return Err(QueueError::BadIndex(head));
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        let mut buffers = Vec::new();
        let (mut table, mut size, mut i) = (self.desc, self.num, head);
        let mut ttl = self.num as u32;
        let mut indirect = false;
        loop {
            if ttl == 0 {
                return Err(QueueError::ChainTooLong);
            }
            ttl -= 1;
            let (addr, len, flags, next) = read_desc(ram, table, i)?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if indirect {
                    return Err(QueueError::NestedIndirect);
                }
                if len == 0 || len % 16 != 0 {
                    return Err(QueueError::BadIndirectLen(len));
                }
                if !ram.contains(addr, len as u64) {
                    return Err(QueueError::OutOfRam(addr));
                }
                indirect = true;
                table = addr;
                size = (len / 16).min(u16::MAX as u32) as u16;
                ttl = size as u32;
                i = 0;
                continue;
            }
            if !ram.contains(addr, len as u64) {
                return Err(QueueError::OutOfRam(addr));
            }
            buffers.push(Buffer { addr, len, write: flags & VIRTQ_DESC_F_WRITE != 0 });
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if next >= size {
                return Err(QueueError::BadIndex(next));
            }
            i = next;
        }
        Ok(Some(Chain { head, buffers }))
    }

    /// Return a chain to the driver with `written` bytes written. Returns
    /// whether the driver wants an interrupt.
    pub fn push_used(&mut self, ram: &mut Ram, head: u16, written: u32) -> Result<bool, QueueError> {
        let idx = read_u16(ram, self.used + 2)?;
        let elem = self.used + 4 + 8 * (idx % self.num) as u64;
        if !ram.contains(elem, 8) || !ram.contains(self.used, 4) {
            return Err(QueueError::OutOfRam(elem));
        }
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&(head as u32).to_le_bytes());
        e[4..8].copy_from_slice(&written.to_le_bytes());
        ram.write(elem, &e);
        let new_idx = idx.wrapping_add(1);
        ram.write(self.used + 2, &new_idx.to_le_bytes());
        if self.event_idx {
            // avail_event: ask to be notified of every new buffer (requests
            // are served at once, so there is never a backlog to batch).
            self.write_avail_event(ram)?;
            let used_event = read_u16(ram, self.avail + 4 + 2 * self.num as u64)?;
            return Ok(need_event(used_event, new_idx, idx));
        }
        let flags = read_u16(ram, self.avail)?;
        Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
    }

    fn write_avail_event(&self, ram: &mut Ram) -> Result<(), QueueError> {
        let avail_event = self.used + 4 + 8 * self.num as u64;
        if !ram.contains(avail_event, 2) {
            return Err(QueueError::OutOfRam(avail_event));
        }
        ram.write(avail_event, &self.last_avail.to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::put_desc;

    const BASE: u64 = 0x8000_0000;
    const DESC: u64 = BASE + 0x1000;
    const AVAIL: u64 = BASE + 0x2000;
    const USED: u64 = BASE + 0x3000;

    fn ram() -> Ram {
        Ram::new(BASE, 1 << 16)
    }

    fn offer(ram: &mut Ram, heads: &[u16]) {
        for (k, h) in heads.iter().enumerate() {
            ram.write(AVAIL + 4 + 2 * k as u64, &h.to_le_bytes());
        }
        ram.write(AVAIL + 2, &(heads.len() as u16).to_le_bytes());
    }

    fn queue() -> Queue {
        Queue { num: 8, ready: true, desc: DESC, avail: AVAIL, used: USED, last_avail: 0, event_idx: false }
    }

    #[test]
    fn event_index_decides_interrupts() {
        // The driver wants an interrupt once used.idx passes used_event.
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 1, 0));
        assert!(need_event(5, 7, 4));
        assert!(need_event(u16::MAX, 0, u16::MAX), "wraps");
        let mut r = ram();
        put_desc(&mut r, DESC, 0, BASE + 0x4000, 8, VIRTQ_DESC_F_WRITE, 0);
        offer(&mut r, &[0, 0]);
        r.write(AVAIL + 4 + 2 * 8, &1u16.to_le_bytes()); // used_event = 1
        let mut q = Queue { event_idx: true, ..queue() };
        q.pop(&mut r).unwrap().unwrap();
        assert!(!q.push_used(&mut r, 0, 8).unwrap(), "used.idx 1 does not pass used_event 1");
        q.pop(&mut r).unwrap().unwrap();
        assert!(q.push_used(&mut r, 0, 8).unwrap(), "used.idx 2 does");
        assert_eq!(read_u16(&r, USED + 4 + 8 * 8).unwrap(), 2, "avail_event = next to serve");
    }

    #[test]
    fn pops_a_chain_and_pushes_used() {
        let mut r = ram();
        put_desc(&mut r, DESC, 0, BASE + 0x4000, 16, VIRTQ_DESC_F_NEXT, 3);
        put_desc(&mut r, DESC, 3, BASE + 0x5000, 32, VIRTQ_DESC_F_WRITE, 0);
        offer(&mut r, &[0]);
        let mut q = queue();
        let c = q.pop(&mut r).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(
            c.buffers,
            vec![
                Buffer { addr: BASE + 0x4000, len: 16, write: false },
                Buffer { addr: BASE + 0x5000, len: 32, write: true }
            ]
        );
        assert_eq!(q.pop(&mut r).unwrap(), None, "nothing more available");
        assert!(q.push_used(&mut r, 0, 32).unwrap());
        assert_eq!(read_u16(&r, USED + 2).unwrap(), 1);
        let mut e = [0u8; 8];
        r.read(USED + 4, &mut e);
        assert_eq!(e, [0, 0, 0, 0, 32, 0, 0, 0]);
    }

    #[test]
    fn indirect_tables_are_followed_once() {
        let mut r = ram();
        let table = BASE + 0x6000;
        put_desc(&mut r, DESC, 1, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&mut r, table, 0, BASE + 0x4000, 8, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mut r, table, 1, BASE + 0x4100, 8, VIRTQ_DESC_F_WRITE, 0);
        offer(&mut r, &[1]);
        let c = queue().pop(&mut r).unwrap().unwrap();
        assert_eq!(c.buffers.len(), 2);
        // Nested indirect is refused.
        put_desc(&mut r, table, 1, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(queue().pop(&mut r), Err(QueueError::NestedIndirect));
        // A length that is not a whole number of descriptors.
        put_desc(&mut r, DESC, 1, table, 24, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(queue().pop(&mut r), Err(QueueError::BadIndirectLen(24)));
    }

    #[test]
    fn malformed_chains_are_errors_not_panics() {
        // A loop: 0 -> 1 -> 0 ...
        let mut r = ram();
        put_desc(&mut r, DESC, 0, BASE + 0x4000, 8, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mut r, DESC, 1, BASE + 0x4000, 8, VIRTQ_DESC_F_NEXT, 0);
        offer(&mut r, &[0]);
        assert_eq!(queue().pop(&mut r), Err(QueueError::ChainTooLong));
        // A buffer outside RAM.
        put_desc(&mut r, DESC, 0, 0x1000, 8, 0, 0);
        assert_eq!(queue().pop(&mut r), Err(QueueError::OutOfRam(0x1000)));
        // A head index past the queue.
        offer(&mut r, &[9]);
        assert_eq!(queue().pop(&mut r), Err(QueueError::BadIndex(9)));
    }

    /// Random descriptor tables: pop returns Ok or Err, never panics.
    #[test]
    fn random_tables_never_panic() {
        let mut x = 0x0123_4567_89ab_cdef_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut r = ram();
            for i in 0..8u16 {
                let addr = if next() % 4 == 0 { next() } else { BASE + (next() % 0x10000) };
                put_desc(&mut r, DESC, i, addr, next() as u32 % 0x2000, next() as u16 & 7, next() as u16 % 10);
            }
            offer(&mut r, &[next() as u16 % 10, next() as u16 % 8]);
            let mut q = queue();
            for _ in 0..3 {
                let _ = q.pop(&mut r);
            }
        }
    }
}
