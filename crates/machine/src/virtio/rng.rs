//! virtio-rng (virtio 1.2, 5.4): one queue of device-writable buffers that
//! the device fills with random bytes. The bytes come from an
//! [`EntropySource`]: host randomness is a non-deterministic input, and this
//! is the one interface through which it reaches the guest (replay will log
//! what it returns).

use super::queue::{Queue, QueueError};
use super::{VirtioDevice, ID_RNG};
use crate::ram::Ram;

/// Where the random bytes come from.
pub trait EntropySource {
    fn fill(&mut self, buf: &mut [u8]);
}

/// Most bytes served per request, whatever the buffer claims.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

pub struct Rng {
    source: Box<dyn EntropySource>,
}

impl Rng {
    pub fn new(source: Box<dyn EntropySource>) -> Rng {
        Rng { source }
    }
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u32 {
        ID_RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process(&mut self, _index: usize, queue: &mut Queue, ram: &mut Ram) -> Result<bool, QueueError> {
        let mut notify = false;
        while let Some(chain) = queue.pop(ram)? {
            let mut written = 0u32;
            for b in chain.buffers.iter().filter(|b| b.write) {
                let n = (b.len as usize).min(MAX_BYTES_PER_REQUEST - written as usize);
                let mut bytes = vec![0u8; n];
                self.source.fill(&mut bytes);
                ram.write(b.addr, &bytes);
                written += n as u32;
            }
            notify |= queue.push_used(ram, chain.head, written)?;
        }
        Ok(notify)
    }
}
