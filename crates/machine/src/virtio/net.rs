//! virtio-net (virtio 1.2, 5.1): queue 0 receives, queue 1 transmits.
//!
//! The device has no host I/O of its own. Received frames are handed to it
//! ([`VirtioDevice::push_input`]) by the run loop at a position, and wait in
//! a bounded backlog until the driver offers receive buffers; frames the
//! guest transmits are collected for the host ([`VirtioDevice::take_output`]).
//! So what the guest sees depends only on where frames were injected, which
//! is what the event log records, and every output frame has a position,
//! which is what the output gate holds back.
//!
//! Frames cross the host boundary (input, output, the event log, the tap)
//! with their 12-byte virtio-net header in front, exactly as a Linux tap
//! with IFF_VNET_HDR reads and writes them. With offloads on, the guest
//! may send and receive checksum-pending and TSO frames of up to 64 KiB,
//! and the header says so; the tap (kernel) finishes them. With offloads
//! off, headers are zero and frames are at most 1518 bytes.
//!
//! ```text
//!  buffer: virtio_net_hdr_v1 (12 B: flags, gso_type, hdr_len, gso_size,
//!          csum_start, csum_offset, num_buffers) | Ethernet frame
//!  config: mac[6] | status u16 (LINK_UP)
//! ```

use super::queue::{Queue, QueueError};
use super::{RestoreError, VirtioDevice};
use crate::ram::Ram;
use std::collections::VecDeque;

pub const ID_NET: u32 = 1;
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// What the device offers with offloads on; the tap is told the same.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The header in front of every frame (with VERSION_1 it always has
/// `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Largest frame carried: Ethernet with one VLAN tag, without the FCS.
pub const MAX_FRAME: usize = 1518;
/// Largest frame with offloads (a TSO frame: 64 KiB of IP plus headers).
pub const MAX_GSO_FRAME: usize = 65_550;
/// Smallest frame carried: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Received frames held while the guest offers no buffers; more are
/// dropped, as a NIC with a full ring would.
pub const RX_BACKLOG: usize = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Frame counters, for the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Received frames dropped: backlog full, too large or too small.
    pub rx_dropped: u64,
    /// Transmitted chains that held no valid frame.
    pub tx_dropped: u64,
}

pub struct Net {
    mac: [u8; 6],
    offloads: bool,
    backlog: VecDeque<Vec<u8>>,
    out: Vec<Vec<u8>>,
    pub stats: NetStats,
}

impl Net {
    /// A card without offloads.
    pub fn new(mac: [u8; 6]) -> Net {
        Net { mac, offloads: false, backlog: VecDeque::new(), out: Vec::new(), stats: NetStats::default() }
    }

    /// A card offering checksum and TSO offloads (for a tap with a vnet
    /// header and the same offloads).
    pub fn with_offloads(mac: [u8; 6]) -> Net {
        Net { offloads: true, ..Net::new(mac) }
    }

    fn max_frame(&self) -> usize {
        if self.offloads {
            MAX_GSO_FRAME
        } else {
            MAX_FRAME
        }
    }

    /// Put backlogged frames into the receive buffers the driver offers.
    fn receive(&mut self, queue: &mut Queue, ram: &mut Ram) -> Result<bool, QueueError> {
        let mut notify = false;
        while !self.backlog.is_empty() {
            let Some(chain) = queue.pop(ram)? else { break };
            let mut packet = self.backlog.pop_front().unwrap_or_default();
            packet[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let room: u64 = chain.buffers.iter().filter(|b| b.write).map(|b| b.len as u64).sum();
            let written = if room >= packet.len() as u64 {
                let mut rest = &packet[..];
                let mut total = 0u32;
                for b in chain.buffers.iter().filter(|b| b.write) {
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, tail) = rest.split_at((b.len as usize).min(rest.len()));
                    ram.write(b.addr, chunk);
                    total += chunk.len() as u32;
                    rest = tail;
                }
                self.stats.rx_frames += 1;
                total
            } else {
                // The driver offered less than a frame needs: return the
                // buffer empty (Linux counts it as a length error).
                self.stats.rx_dropped += 1;
                0
            };
            notify |= queue.push_used(ram, chain.head, written)?;
        }
        Ok(notify)
    }

    fn transmit(&mut self, queue: &mut Queue, ram: &mut Ram) -> Result<bool, QueueError> {
        let mut notify = false;
        while let Some(chain) = queue.pop(ram)? {
            let mut bytes = Vec::new();
            let max = HDR_LEN + self.max_frame();
            for b in chain.buffers.iter().filter(|b| !b.write) {
                let take = (b.len as usize).min(max - bytes.len());
                let start = bytes.len();
                bytes.resize(start + take, 0);
                ram.read(b.addr, &mut bytes[start..]);
            }
            if bytes.len() >= HDR_LEN + MIN_FRAME {
                if !self.offloads {
                    // Nothing to offload: the host gets a plain header.
                    bytes[..HDR_LEN].fill(0);
                }
                self.out.push(bytes);
                self.stats.tx_frames += 1;
            } else {
                self.stats.tx_dropped += 1;
            }
            notify |= queue.push_used(ram, chain.head, 0)?;
        }
        Ok(notify)
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        ID_NET
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | if self.offloads { OFFLOAD_FEATURES } else { 0 }
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn process(&mut self, index: usize, queue: &mut Queue, ram: &mut Ram) -> Result<bool, QueueError> {
        match index {
            RX => self.receive(queue, ram),
            TX => self.transmit(queue, ram),
            _ => Ok(false),
        }
    }
    fn push_input(&mut self, data: Vec<u8>) -> Option<usize> {
        let frame = data.len().saturating_sub(HDR_LEN);
        // Without offloads the guest cannot take a frame whose header asks
        // for anything (a pending checksum, segmentation).
        let acceptable = self.offloads || data.get(..HDR_LEN).is_some_and(|h| h.iter().all(|&b| b == 0));
        if !(MIN_FRAME..=self.max_frame()).contains(&frame) || !acceptable || self.backlog.len() >= RX_BACKLOG {
            self.stats.rx_dropped += 1;
            return None;
        }
        self.backlog.push_back(data);
        Some(RX)
    }
    fn take_output(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out)
    }
    fn reset(&mut self) {
        self.backlog.clear();
        self.out.clear();
    }
    fn save(&self) -> Vec<u8> {
        serde_json::to_vec(&(&self.backlog, &self.out)).unwrap_or_default()
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), RestoreError> {
        let (backlog, out): (VecDeque<Vec<u8>>, Vec<Vec<u8>>) =
            serde_json::from_slice(state).map_err(|source| RestoreError::Malformed { device: "virtio-net", source })?;
        self.backlog = backlog;
        self.out = out;
        Ok(())
    }
    fn hash_state(&self, mut h: &mut dyn std::hash::Hasher) {
        use std::hash::Hash;
        (&self.mac, self.offloads, &self.backlog, &self.out).hash(&mut h);
    }
}

/// A locally administered unicast MAC, stable for a given name (FNV-1a of
/// it), in QEMU's 52:54:00 prefix: a VM keeps its address across runs.
pub fn mac_for(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    [0x52, 0x54, 0x00, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

/// Why a text is not a NIC's MAC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("'{0}' is not a MAC address (example: 52:54:00:12:34:56)")]
    Syntax(String),
    #[error("'{0}' is a multicast address; a NIC needs a unicast one")]
    Multicast(String),
}

/// Parse `aa:bb:cc:dd:ee:ff`; a multicast address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(MacError::Syntax(s.into()));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(MacError::Syntax(s.into()));
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.into()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.into()));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::virtio::test_utils::put_desc;

    const BASE: u64 = 0x8000_0000;
    const DESC: u64 = BASE + 0x1000;
    const AVAIL: u64 = BASE + 0x2000;
    const USED: u64 = BASE + 0x3000;
    const BUF: u64 = BASE + 0x4000;

    fn setup() -> (Ram, Queue) {
        let ram = Ram::new(BASE, 1 << 20);
        let q = Queue { num: 8, ready: true, desc: DESC, avail: AVAIL, used: USED, ..Queue::default() };
        (ram, q)
    }

    fn offer(ram: &mut Ram, n: u16) {
        for i in 0..n {
            ram.write(AVAIL + 4 + 2 * i as u64, &i.to_le_bytes());
        }
        ram.write(AVAIL + 2, &n.to_le_bytes());
    }

    fn used_len(ram: &Ram, i: u64) -> u32 {
        let mut b = [0u8; 4];
        ram.read(USED + 4 + 8 * i + 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn frames_wait_for_buffers_then_arrive_in_order() {
        let (mut ram, mut q) = setup();
        let mut net = Net::new(mac_for("t"));
        assert_eq!(net.push_input(packet(0xaa, 60)), Some(RX));
        assert_eq!(net.push_input(packet(0xbb, 100)), Some(RX));
        // No buffers yet: the frames wait.
        assert!(!net.process(RX, &mut q, &mut ram).unwrap());
        // One buffer split in two descriptors, then a second buffer.
        put_desc(&mut ram, DESC, 0, BUF, 20, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mut ram, DESC, 1, BUF + 0x100, 2000, VIRTQ_DESC_F_WRITE, 0);
        put_desc(&mut ram, DESC, 2, BUF + 0x1000, 2000, VIRTQ_DESC_F_WRITE, 0);
        ram.write(AVAIL + 4, &0u16.to_le_bytes());
        ram.write(AVAIL + 6, &2u16.to_le_bytes());
        ram.write(AVAIL + 2, &2u16.to_le_bytes());
        assert!(net.process(RX, &mut q, &mut ram).unwrap());
        assert_eq!(used_len(&ram, 0), (HDR_LEN + 60) as u32);
        assert_eq!(used_len(&ram, 1), (HDR_LEN + 100) as u32);
        let mut first = [0u8; 20];
        ram.read(BUF, &mut first);
        assert_eq!(&first[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&first[12..20], &[0xaa; 8]);
        let mut rest = [0u8; 52];
        ram.read(BUF + 0x100, &mut rest);
        assert_eq!(rest, [0xaa; 52], "the frame continues in the next descriptor");
        assert_eq!(net.stats.rx_frames, 2);
    }

    /// A header (zero) and a frame of `len` bytes of `byte`.
    fn packet(byte: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN];
        p.extend(std::iter::repeat_n(byte, len));
        p
    }

    #[test]
    fn offloads_are_offered_and_big_frames_carried_only_with_them() {
        let plain = Net::new(mac_for("t"));
        assert_eq!(plain.features() & OFFLOAD_FEATURES, 0);
        let mut off = Net::with_offloads(mac_for("t"));
        assert_eq!(off.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
        // A 60 KiB TSO frame whose header asks for a checksum.
        let mut big = packet(7, 60_000);
        big[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        big[1] = 1; // GSO TCPv4
        assert_eq!(off.push_input(big.clone()), Some(RX));
        let mut plain = Net::new(mac_for("t"));
        assert_eq!(plain.push_input(big), None, "too big, and its header asks for offloads");
        let mut csum = packet(7, 100);
        csum[0] = 1;
        assert_eq!(plain.push_input(csum), None);
    }

    #[test]
    fn transmit_keeps_the_header_and_collects_frames() {
        let (mut ram, mut q) = setup();
        let mut net = Net::new(mac_for("t"));
        let mut buf = vec![0u8; HDR_LEN];
        buf[0] = 1; // a checksum request, which a card without offloads drops
        buf.extend((0..64).map(|i| i as u8));
        ram.write(BUF, &buf);
        put_desc(&mut ram, DESC, 0, BUF, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mut ram, DESC, 1, BUF + HDR_LEN as u64, 64, 0, 0);
        // A chain too short to hold a frame is returned and counted.
        put_desc(&mut ram, DESC, 2, BUF, 8, 0, 0);
        ram.write(AVAIL + 4, &0u16.to_le_bytes());
        ram.write(AVAIL + 6, &2u16.to_le_bytes());
        ram.write(AVAIL + 2, &2u16.to_le_bytes());
        assert!(net.process(TX, &mut q, &mut ram).unwrap());
        let out = net.take_output();
        let mut want = vec![0u8; HDR_LEN];
        want.extend((0..64).map(|i| i as u8));
        assert_eq!(out, vec![want]);
        assert_eq!(net.stats.tx_dropped, 1);
        assert!(net.take_output().is_empty());
    }

    #[test]
    fn oversized_runt_and_excess_frames_are_dropped() {
        let mut net = Net::new(mac_for("t"));
        assert_eq!(net.push_input(packet(0, MAX_FRAME + 1)), None);
        assert_eq!(net.push_input(packet(0, 10)), None);
        for _ in 0..RX_BACKLOG {
            assert!(net.push_input(packet(0, 60)).is_some());
        }
        assert_eq!(net.push_input(packet(0, 60)), None);
        assert_eq!(net.stats.rx_dropped, 3);
    }

    #[test]
    fn a_buffer_too_small_comes_back_empty() {
        let (mut ram, mut q) = setup();
        let mut net = Net::new(mac_for("t"));
        net.push_input(packet(1, 200));
        put_desc(&mut ram, DESC, 0, BUF, 100, VIRTQ_DESC_F_WRITE, 0);
        offer(&mut ram, 1);
        net.process(RX, &mut q, &mut ram).unwrap();
        assert_eq!(used_len(&ram, 0), 0);
        assert_eq!(net.stats.rx_dropped, 1);
    }

    #[test]
    fn config_space_holds_mac_and_link_up() {
        let net = Net::new([0x52, 0x54, 0, 1, 2, 3]);
        let mut b = [0u8; 8];
        net.read_config(0, &mut b);
        assert_eq!(b, [0x52, 0x54, 0, 1, 2, 3, 1, 0]);
        let mut w = [0u8; 2];
        net.read_config(6, &mut w);
        assert_eq!(w, [1, 0]);
    }

    #[test]
    fn macs_parse_and_default_ones_are_stable_unicast() {
        assert_eq!(parse_mac("52:54:00:ab:CD:01"), Ok([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        assert_eq!(parse_mac("01:00:5e:00:00:01"), Err(MacError::Multicast("01:00:5e:00:00:01".into())));
        assert!(matches!(parse_mac("52:54:00:ab:cd"), Err(MacError::Syntax(_))));
        let e = parse_mac("52:54:00:ab:cd:zz").unwrap_err();
        assert_eq!(e.to_string(), "'52:54:00:ab:cd:zz' is not a MAC address (example: 52:54:00:12:34:56)");
        assert_eq!(mac_for("tap0"), mac_for("tap0"));
        assert_ne!(mac_for("tap0"), mac_for("tap1"));
        assert_eq!(mac_for("x")[0] & 3, 2, "locally administered unicast");
    }
}
