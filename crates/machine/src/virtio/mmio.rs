//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! file, feature negotiation, queue setup, notifications and the interrupt
//! status. A driver error (a bad descriptor) sets DEVICE_NEEDS_RESET and
//! stops the device until the driver resets it.
//!
//! ```text
//!  0x000 MagicValue  0x004 Version  0x008 DeviceID  0x00c VendorID
//!  0x010 DeviceFeatures  0x014 DeviceFeaturesSel  0x020 DriverFeatures
//!  0x024 DriverFeaturesSel  0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum
//!  0x044 QueueReady  0x050 QueueNotify  0x060 InterruptStatus
//!  0x064 InterruptACK  0x070 Status  0x080/84 QueueDesc  0x090/94 QueueDriver
//!  0x0a0/a4 QueueDevice  0x0fc ConfigGeneration  0x100+ config space
//! ```

use super::queue::{Queue, QUEUE_MAX};
use super::{RestoreError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::ram::Ram;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x554d_4551; // as QEMU reports
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_USED_BUFFER: u32 = 1;

/// A transport's state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_id: u32,
    pub queues: Vec<Queue>,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub broken: Option<String>,
    /// The device's own state (`VirtioDevice::save`).
    pub device: Vec<u8>,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    /// Why the device stopped (until the driver resets it).
    pub broken: Option<String>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>) -> MmioTransport {
        let n = device.num_queues();
        MmioTransport {
            device,
            queues: vec![Queue::default(); n],
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            broken: None,
        }
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    pub fn irq(&self) -> bool {
        self.interrupt_status != 0
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Host input for the device (see [`VirtioDevice::push_input`]):
    /// dropped unless the driver has the device running.
    pub fn input(&mut self, data: Vec<u8>, ram: &mut Ram) {
        if self.broken.is_some() || self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        if let Some(queue) = self.device.push_input(data) {
            self.notify(queue, ram);
        }
    }

    /// The transport's and device's state, for a snapshot.
    pub fn save(&self) -> TransportState {
        TransportState {
            device_id: self.device.device_id(),
            queues: self.queues.clone(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            broken: self.broken.clone(),
            device: self.device.save(),
        }
    }

    /// Load a saved state; the device must be of the same kind.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), RestoreError> {
        let device = self.device.device_id();
        if s.device_id != device {
            return Err(RestoreError::DeviceMismatch { found: s.device_id, expected: device });
        }
        if s.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount { device, found: s.queues.len(), expected: self.queues.len() });
        }
        self.queues = s.queues.clone();
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        self.broken = s.broken.clone();
        self.device.restore(&s.device)
    }

    /// See [`VirtioDevice::stop_on_host_error`]. A device that stopped on
    /// a host fault and is told to run on finishes the request it stopped
    /// at (with its error status) and interrupts, as on a notify.
    pub fn stop_on_host_error(&mut self, stop: bool, ram: &mut Ram) {
        let stopped = self.device.host_fault().is_some();
        self.device.stop_on_host_error(stop);
        if stopped && !stop {
            for index in 0..self.queues.len() {
                self.notify(index, ram);
            }
        }
    }

    /// See [`VirtioDevice::host_fault`].
    pub fn host_fault(&self) -> Option<String> {
        self.device.host_fault()
    }

    /// See [`VirtioDevice::storage_digest`].
    pub fn storage_digest(&mut self, h: &mut xxhash_rust::xxh3::Xxh3) {
        self.device.storage_digest(h);
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Feed the transport's and device's state to a state hash.
    pub fn hash_state(&self, mut h: &mut dyn std::hash::Hasher) {
        use std::hash::Hash;
        (self.device.device_id(), &self.queues, self.device_features_sel, self.driver_features_sel).hash(&mut h);
        (self.driver_features, self.queue_sel, self.status, self.interrupt_status, self.broken.is_some()).hash(&mut h);
        self.device.hash_state(h);
    }

    /// Output the device produced for the host since the last call.
    pub fn take_output(&mut self) -> Vec<Vec<u8>> {
        self.device.take_output()
    }

    pub fn device_id(&self) -> u32 {
        self.device.device_id()
    }

    fn reset(&mut self) {
        self.device.reset();
        let n = self.queues.len();
        self.queues = vec![Queue::default(); n];
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.broken = None;
    }

    pub fn load(&mut self, offset: u64, size: u32) -> Option<u64> {
        if offset >= 0x100 {
            let mut b = [0u8; 8];
            self.device.read_config(offset - 0x100, &mut b[..size as usize]);
            return Some(u64::from_le_bytes(b));
        }
        if size != 4 {
            return None;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_id(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |_| QUEUE_MAX as u32),
            0x044 => q.map_or(0, |q| q.ready as u32),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0,
            _ => 0,
        };
        Some(v as u64)
    }

    /// A register write. Returns whether an interrupt may have changed.
    pub fn store(&mut self, offset: u64, size: u32, val: u64, ram: &mut Ram) -> bool {
        if size != 4 || offset >= 0x100 {
            return true; // config space is read-only here; ignore
        }
        let v = val as u32;
        let set_lo = |x: &mut u64, v: u32| *x = (*x & !0xffff_ffff) | v as u64;
        let set_hi = |x: &mut u64, v: u32| *x = (*x & 0xffff_ffff) | ((v as u64) << 32);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let sel = self.driver_features_sel;
                match sel {
                    0 => set_lo(&mut self.driver_features, v),
                    1 => set_hi(&mut self.driver_features, v),
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.num = (v as u16).min(QUEUE_MAX);
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.ready = v & 1 != 0;
                }
            }
            0x050 => self.notify(v as usize, ram),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                    let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                    self.queues.iter_mut().for_each(|q| q.event_idx = event_idx);
                }
            }
            0x080 => self.queue().into_iter().for_each(|q| set_lo(&mut q.desc, v)),
            0x084 => self.queue().into_iter().for_each(|q| set_hi(&mut q.desc, v)),
            0x090 => self.queue().into_iter().for_each(|q| set_lo(&mut q.avail, v)),
            0x094 => self.queue().into_iter().for_each(|q| set_hi(&mut q.avail, v)),
            0x0a0 => self.queue().into_iter().for_each(|q| set_lo(&mut q.used, v)),
            0x0a4 => self.queue().into_iter().for_each(|q| set_hi(&mut q.used, v)),
            _ => {}
        }
        true
    }

    fn notify(&mut self, index: usize, ram: &mut Ram) {
        if self.broken.is_some() || self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(index) else { return };
        match self.device.process(index, q, ram) {
            Ok(true) => self.interrupt_status |= INT_USED_BUFFER,
            Ok(false) => {}
            Err(e) => {
                let device = self.device.device_id();
                tracing::error!(device, error = %e, "virtio device {device} stopped");
                self.broken = Some(e.to_string());
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt_status |= 2; // configuration change
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::virtio::rng::{EntropySource, Rng};
    use crate::virtio::ID_RNG;

    const BASE: u64 = 0x8000_0000;
    const DESC: u64 = BASE + 0x1000;
    const AVAIL: u64 = BASE + 0x2000;
    const USED: u64 = BASE + 0x3000;
    const BUF: u64 = BASE + 0x4000;

    struct Counter(u8);
    impl EntropySource for Counter {
        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
        }
    }

    /// A driver's bring-up (virtio 1.2, 3.1.1) against the transport.
    fn bring_up(ram: &mut Ram) -> MmioTransport {
        let mut t = MmioTransport::new(Box::new(Rng::new(Box::new(Counter(0)))));
        assert_eq!(t.load(0x000, 4), Some(0x7472_6976));
        assert_eq!(t.load(0x004, 4), Some(2));
        assert_eq!(t.load(0x008, 4), Some(ID_RNG as u64));
        t.store(0x014, 4, 1, ram);
        assert_eq!(t.load(0x010, 4).unwrap() & 1, 1, "VERSION_1 offered");
        t.store(0x024, 4, 1, ram);
        t.store(0x020, 4, 1, ram);
        t.store(0x030, 4, 0, ram);
        assert_eq!(t.load(0x034, 4), Some(QUEUE_MAX as u64));
        t.store(0x038, 4, 8, ram);
        for (reg, addr) in [(0x080, DESC), (0x090, AVAIL), (0x0a0, USED)] {
            t.store(reg, 4, addr & 0xffff_ffff, ram);
            t.store(reg + 4, 4, addr >> 32, ram);
        }
        t.store(0x044, 4, 1, ram);
        t.store(0x070, 4, 0xf, ram); // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
        t
    }

    fn desc(ram: &mut Ram, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        crate::virtio::test_utils::put_desc(ram, DESC, i, addr, len, flags, next);
    }

    #[test]
    fn rng_request_fills_the_buffer_and_interrupts() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut t = bring_up(&mut ram);
        desc(&mut ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE, 0);
        ram.write(AVAIL + 4, &0u16.to_le_bytes());
        ram.write(AVAIL + 2, &1u16.to_le_bytes());
        t.store(0x050, 4, 0, &mut ram);
        let mut got = [0u8; 8];
        ram.read(BUF, &mut got);
        assert_eq!(got, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(ram.read_u64(USED).map(|v| (v >> 16) as u16), Some(1), "used.idx");
        assert!(t.irq());
        t.store(0x064, 4, 1, &mut ram);
        assert!(!t.irq(), "acknowledged");
    }

    #[test]
    fn a_looping_chain_breaks_the_device_not_the_host() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut t = bring_up(&mut ram);
        desc(&mut ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
        desc(&mut ram, 1, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
        ram.write(AVAIL + 2, &1u16.to_le_bytes());
        t.store(0x050, 4, 0, &mut ram);
        assert!(t.broken.is_some());
        assert_eq!(t.load(0x070, 4).unwrap() as u32 & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
        // A reset brings it back.
        t.store(0x070, 4, 0, &mut ram);
        assert!(t.broken.is_none());
    }

    #[test]
    fn restore_refuses_another_device_and_bad_state() {
        use crate::virtio::net::{Net, ID_NET};
        let mut ram = Ram::new(BASE, 1 << 16);
        let rng = bring_up(&mut ram);
        let mut net = MmioTransport::new(Box::new(Net::new([0x52, 0x54, 0, 0, 0, 1])));
        let e = net.restore(&rng.save()).unwrap_err();
        assert!(matches!(e, RestoreError::DeviceMismatch { found: ID_RNG, expected: ID_NET }), "{e:?}");
        assert_eq!(e.to_string(), "the snapshot has virtio device 4 where this machine has 1");
        let mut state = net.save();
        state.device = b"not json".to_vec();
        let e = net.restore(&state).unwrap_err();
        assert_eq!(e.to_string(), "the snapshot's virtio-net state is malformed");
        assert!(std::error::Error::source(&e).is_some(), "the parser's reason is the source, not in the message");
    }

    #[test]
    fn notify_before_driver_ok_does_nothing() {
        let mut ram = Ram::new(BASE, 1 << 16);
        let mut t = MmioTransport::new(Box::new(Rng::new(Box::new(Counter(0)))));
        t.store(0x050, 4, 0, &mut ram);
        t.store(0x050, 4, 7, &mut ram); // a queue that does not exist
        assert!(!t.irq());
    }

    /// Every device behind the transport, fed random descriptor tables,
    /// random request headers and random frames: never a host panic; a
    /// device either serves, refuses, or is marked broken.
    #[test]
    fn devices_survive_random_rings() {
        use crate::virtio::blk::{Block, BlockBackend};
        use crate::virtio::net::Net;
        use crate::virtio::test_utils::put_desc;
        struct Mem(Vec<u8>);
        impl BlockBackend for Mem {
            fn size_bytes(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_at(&mut self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
                buf.copy_from_slice(&self.0[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
                self.0[off as usize..off as usize + buf.len()].copy_from_slice(buf);
                Ok(())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut served, mut broken) = (0, 0);
        for round in 0..3000 {
            let mut ram = Ram::new(BASE, 1 << 16);
            let mut t = bring_up(&mut ram);
            // Swap in the device under test (same queue-0 setup; net gets
            // its TX queue set up too).
            let device: Box<dyn VirtioDevice> = match round % 3 {
                0 => Box::new(Block::new(Box::new(Mem(vec![0; 8192])), false, "fuzz")),
                1 => Box::new(Net::new([0x52, 0x54, 0, 0, 0, 1])),
                _ => Box::new(Rng::new(Box::new(Counter(0)))),
            };
            let queues = t.queues.clone();
            t.device = device;
            t.queues = vec![queues[0].clone(); t.device.num_queues()];
            for i in 0..8u16 {
                let addr = if next() % 5 == 0 { next() } else { BASE + 0x4000 + (next() % 0x8000) };
                let flags = next() as u16 & 7;
                put_desc(&mut ram, DESC, i, addr, next() as u32 % 0x3000, flags, next() as u16 % 9);
            }
            for a in (BASE + 0x4000..BASE + 0x4100).step_by(8) {
                ram.write(a, &next().to_le_bytes());
            }
            let heads: Vec<u16> = (0..3).map(|_| next() as u16 % 9).collect();
            for (k, h) in heads.iter().enumerate() {
                ram.write(AVAIL + 4 + 2 * k as u64, &h.to_le_bytes());
            }
            ram.write(AVAIL + 2, &(heads.len() as u16).to_le_bytes());
            for q in 0..t.queues.len() {
                t.store(0x050, 4, q as u64, &mut ram);
            }
            t.input(vec![0xab; 60 + (next() % 1500) as usize], &mut ram);
            if t.broken.is_some() {
                broken += 1;
            } else {
                served += 1;
            }
        }
        assert!(served > 50 && broken > 50, "both outcomes exercised: {served} served, {broken} broken");
    }
}
