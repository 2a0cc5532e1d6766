//! The state hash, kept up to date incrementally. The RAM part is a hash of
//! each 4 KiB page, recomputed only for the pages written since the last
//! state hash (the same dirty tracking snapshots use: the hart's TLB marks
//! and the host side's writes), so a state hash of a 512 MiB guest costs
//! microseconds to a millisecond, not a pass over all of RAM. Storage
//! devices contribute a digest of the chunks the guest wrote since boot,
//! so the disk replicas are compared too.

use rv::bitmap::PageBitmap;

pub(crate) const PAGE: usize = 4096;

/// Hashes of RAM pages, and which of them are out of date.
#[derive(Clone)]
pub(crate) struct RamDigest {
    pages: Vec<u64>,
    stale: PageBitmap,
    /// Nothing computed yet (or RAM was replaced wholesale): hash every page.
    all_stale: bool,
}

impl RamDigest {
    pub(crate) fn new(ram_bytes: usize) -> RamDigest {
        let n = ram_bytes / PAGE;
        RamDigest { pages: vec![0; n], stale: PageBitmap::new(n), all_stale: true }
    }

    pub(crate) fn mark(&mut self, page: u64) {
        self.stale.set(page);
    }

    /// RAM was rewritten without tracking (a snapshot restored).
    pub(crate) fn invalidate(&mut self) {
        self.all_stale = true;
    }

    /// Bring the page hashes up to date with `ram`, and feed them to `h`.
    pub(crate) fn hash_into(&mut self, ram: &[u8], h: &mut xxhash_rust::xxh3::Xxh3) {
        let page = |p: usize| xxhash_rust::xxh3::xxh3_64(&ram[p * PAGE..(p + 1) * PAGE]);
        if std::mem::take(&mut self.all_stale) {
            let _ = self.stale.drain();
            for (p, slot) in self.pages.iter_mut().enumerate() {
                *slot = page(p);
            }
        } else {
            for p in self.stale.drain() {
                self.pages[p as usize] = page(p as usize);
            }
        }
        for v in &self.pages {
            h.update(&v.to_le_bytes());
        }
    }

    /// The same value from scratch, without the cache.
    #[cfg(test)]
    pub(crate) fn hash_fresh(ram: &[u8], h: &mut xxhash_rust::xxh3::Xxh3) {
        for chunk in ram.chunks(PAGE) {
            h.update(&xxhash_rust::xxh3::xxh3_64(chunk).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_digest_equals_a_fresh_one_after_tracked_writes() {
        let mut ram = vec![0u8; 64 * PAGE];
        let mut d = RamDigest::new(ram.len());
        let digest = |d: &mut RamDigest, ram: &[u8]| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            d.hash_into(ram, &mut h);
            let mut f = xxhash_rust::xxh3::Xxh3::new();
            RamDigest::hash_fresh(ram, &mut f);
            (h.digest(), f.digest())
        };
        let (a, b) = digest(&mut d, &ram);
        assert_eq!(a, b);
        ram[5 * PAGE + 7] = 1;
        d.mark(5);
        let (c, e) = digest(&mut d, &ram);
        assert_eq!(c, e);
        assert_ne!(c, a);
        // An untracked write is missed until the digest is invalidated.
        ram[9 * PAGE] = 2;
        let (stale, fresh) = digest(&mut d, &ram);
        assert_ne!(stale, fresh);
        d.invalidate();
        let (x, y) = digest(&mut d, &ram);
        assert_eq!(x, y);
    }
}
