//! virtio devices over the MMIO transport (virtio 1.2, 4.2: version 2,
//! "modern"). A device is a state machine: the transport decodes the
//! register file, and on a queue notify the device processes that queue
//! synchronously, at the hart's position, so the result is deterministic.

pub mod blk;
pub mod mmio;
pub mod net;
/// A scripted network peer for tests (a fixture, not a device backend).
#[cfg(any(test, feature = "test-utils"))]
pub mod netsim;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;

use crate::ram::Ram;
use queue::Queue;

/// virtio device IDs (5).
pub const ID_RNG: u32 = 4;

/// Feature bits of every device (6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Why a device's saved state (a snapshot's, so untrusted) cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot has virtio device {found} where this machine has {expected}")]
    DeviceMismatch { found: u32, expected: u32 },
    #[error("the snapshot has {found} queues for virtio device {device}, which has {expected}")]
    QueueCount { device: u32, found: usize, expected: usize },
    #[error("the snapshot's {device} state is malformed")]
    Malformed {
        device: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// What a device model implements; the transport does the rest. Host-side
/// problems (a disk I/O error) are reported where they happen, as `tracing`
/// events, and reach the guest as the device's error status.
pub trait VirtioDevice {
    fn device_id(&self) -> u32;
    /// Device-specific feature bits (the transport adds VERSION_1 and
    /// INDIRECT_DESC).
    fn features(&self) -> u64;
    fn num_queues(&self) -> usize;
    /// Read from the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`: process what it offers. Returns
    /// whether an interrupt is due, or an error that breaks the device.
    fn process(&mut self, index: usize, queue: &mut Queue, ram: &mut Ram) -> Result<bool, queue::QueueError>;
    /// Input from the host for the guest (a received network frame). The
    /// device keeps it or drops it; `Some(queue)` asks the transport to
    /// process that queue now. Devices without host input drop it.
    fn push_input(&mut self, data: Vec<u8>) -> Option<usize> {
        let _ = data;
        None
    }
    /// Output for the host since the last call (transmitted frames).
    fn take_output(&mut self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// The driver reset the device: forget in-flight state.
    fn reset(&mut self) {}
    /// Feed the device's guest-visible state (not its host backend) to a
    /// state hash.
    fn hash_state(&self, h: &mut dyn std::hash::Hasher) {
        let _ = h;
    }
    /// The device's own state for a snapshot (empty if it has none).
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Load what `save` returned.
    fn restore(&mut self, state: &[u8]) -> Result<(), RestoreError> {
        let _ = state;
        Ok(())
    }
    /// Whether a host failure stops the machine (a pair's replica) or
    /// reaches the guest as a device error (a VM alone).
    fn stop_on_host_error(&mut self, stop: bool) {
        let _ = stop;
    }
    /// A host failure that stopped the device before the guest saw it
    /// (see `blk::Block::stop_on_host_error`).
    fn host_fault(&self) -> Option<String> {
        None
    }
    /// Feed the state hash a digest of the storage the guest changed since
    /// boot (updated for what changed since the last call); a device
    /// without storage adds nothing.
    fn storage_digest(&mut self, h: &mut xxhash_rust::xxh3::Xxh3) {
        let _ = h;
    }
    /// Storage written since the last call, as (byte offset, bytes)
    /// extents: what an incremental snapshot must carry of the disk.
    fn take_storage_delta(&mut self) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        Ok(Vec::new())
    }
    /// Forget what was written so far (the storage goes whole, some other
    /// way): the next delta carries only what is written from now on.
    fn forget_storage_delta(&mut self) {}
    /// Write an extent of a snapshot back to storage.
    fn apply_storage(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let _ = (offset, data);
        Ok(())
    }
}
