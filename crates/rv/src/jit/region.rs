//! The executable region translations live in: one anonymous mapping,
//! filled from the front, emptied all at once except for the code it was
//! made with (the shared chain), which stays at its start.

/// Translations start on this boundary (a cache line).
const ALIGN: usize = 64;

pub(crate) struct CodeRegion {
    base: *mut u8,
    len: usize,
    used: usize,
    /// Bytes at the start that `reset` keeps (the code `new` was given).
    kept: usize,
}

// SAFETY: the region is owned memory like a `Vec<u8>`; nothing in it is
// tied to the thread that mapped it.
unsafe impl Send for CodeRegion {}

impl CodeRegion {
    /// Map `len` bytes readable, writable and executable, with `kept` at
    /// offset 0 for as long as the region lives; `None` if the host refuses
    /// (a kernel or policy that forbids writable code) or `kept` does not
    /// fit.
    pub(crate) fn new(len: usize, kept: &[u8]) -> Option<CodeRegion> {
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choice touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let mut region = CodeRegion { base: p as *mut u8, len, used: 0, kept: 0 };
        region.push(kept)?;
        region.kept = region.used;
        Some(region)
    }

    /// Copy `code` in; its offset, or `None` when it does not fit.
    pub(crate) fn push(&mut self, code: &[u8]) -> Option<u32> {
        let off = self.used.next_multiple_of(ALIGN);
        if off + code.len() > self.len {
            return None;
        }
        // SAFETY: `off + code.len()` is inside the mapping, which nothing
        // executes at these bytes yet (they are past every live translation).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(off), code.len()) };
        self.used = off + code.len();
        Some(off as u32)
    }

    pub(crate) fn addr(&self, off: u32) -> usize {
        self.base as usize + off as usize
    }

    /// Forget every translation (their code is overwritten from the front,
    /// after the kept code).
    pub(crate) fn reset(&mut self) {
        self.used = self.kept;
    }
}

impl Drop for CodeRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no translation can
        // run after its `Jit` is dropped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
