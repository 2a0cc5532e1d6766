//! Guest RAM: one contiguous region at a fixed physical base, with a
//! dirty-page bitmap for the writes made by the host side (loaders, SBI,
//! devices). The hart tracks its own writes (`Hart::take_dirty_pages`);
//! `Machine::take_dirty_pages` merges the two.

use rv::bitmap::PageBitmap;

/// Guest RAM. The hart reaches it directly through `Bus::ram`; loaders and
/// devices use the checked helpers here.
#[derive(Clone)]
pub struct Ram {
    base: u64,
    bytes: Vec<u8>,
    /// One bit per page written through `write`/`fill`.
    dirty: PageBitmap,
    /// The same, drained separately by the machine to drop decoded code in
    /// pages a device wrote (DMA).
    written: PageBitmap,
    written_any: bool,
}

impl Ram {
    pub fn new(base: u64, size: u64) -> Ram {
        Ram {
            base,
            bytes: vec![0; size as usize],
            dirty: PageBitmap::new(size as usize / 4096),
            written: PageBitmap::new(size as usize / 4096),
            written_any: false,
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Is `[addr, addr + len)` inside RAM?
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|end| end <= self.base + self.len())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Write `data` at physical `addr`. Panics if out of range: callers
    /// check with `contains` first (loaders report the error to the user).
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let off = (addr - self.base) as usize;
        self.bytes[off..off + data.len()].copy_from_slice(data);
        self.mark(off as u64, data.len() as u64);
    }

    pub fn fill(&mut self, addr: u64, len: u64, byte: u8) {
        let off = (addr - self.base) as usize;
        self.bytes[off..off + len as usize].fill(byte);
        self.mark(off as u64, len);
    }

    fn mark(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in off / 4096..=(off + len - 1) / 4096 {
            self.dirty.set(page);
            self.written.set(page);
            self.written_any = true;
        }
    }

    /// Pages written through `write`/`fill` since the last call, ascending.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        self.dirty.drain()
    }

    /// Pages written through `write`/`fill` since the last call (for code
    /// invalidation; independent of `take_dirty`).
    pub fn take_written(&mut self) -> Vec<u64> {
        if !std::mem::take(&mut self.written_any) {
            return Vec::new();
        }
        self.written.drain()
    }

    pub fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        if !self.contains(addr, out.len() as u64) {
            return false;
        }
        let off = (addr - self.base) as usize;
        out.copy_from_slice(&self.bytes[off..off + out.len()]);
        true
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}
