//! The host's randomness: the guest's boot seed and virtio-rng's bytes.
//! What the guest draws is an input like any other: a recording or a
//! primary keeps every draw ([`Draws`]) to put it in the log.

use anyhow::{Context, Result};
use machine::virtio::rng::EntropySource;
use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

/// The host's random source behind virtio-rng.
pub struct HostEntropy {
    urandom: std::fs::File,
    /// Where each draw is kept for the log, if it is logged.
    draws: Option<Draws>,
}

impl HostEntropy {
    pub fn open() -> Result<HostEntropy> {
        let urandom = std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom for virtio-rng")?;
        Ok(HostEntropy { urandom, draws: None })
    }

    /// A source whose draws are also kept in `draws`.
    pub fn logged(draws: &Draws) -> Result<HostEntropy> {
        Ok(HostEntropy { draws: Some(draws.clone()), ..HostEntropy::open()? })
    }
}

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // /dev/urandom does not fail once open; if it ever did, the guest
        // would get zeros rather than the run stopping.
        if self.urandom.read_exact(buf).is_err() {
            buf.fill(0);
        }
        if let Some(d) = &self.draws {
            d.0.borrow_mut().push(buf.to_vec());
        }
    }
}

/// Entropy the guest drew and the log has not taken yet. The host side
/// takes them before it logs anything else, so they land in the log in
/// the order they were drawn, stamped with the last record's position.
#[derive(Clone, Default)]
pub struct Draws(Rc<RefCell<Vec<Vec<u8>>>>);

impl Draws {
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// 32 bytes from the host's random source, for the guest's rng-seed.
pub fn host_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom for the guest's rng-seed")?;
    Ok(seed)
}
