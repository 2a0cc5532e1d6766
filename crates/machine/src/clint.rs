//! CLINT (SiFive core-local interruptor, as on QEMU `virt`): `msip`,
//! `mtimecmp` and `mtime` for one hart. `mtime` is not a register of its
//! own: it is the hart's time, a function of the position, so it is
//! deterministic and cannot be written.

/// Register offsets.
const MSIP: u64 = 0x0;
const MTIMECMP: u64 = 0x4000;
const MTIME: u64 = 0xbff8;

/// CLINT state for one hart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Clint {
    pub msip: bool,
    pub mtimecmp: u64,
}

impl Default for Clint {
    fn default() -> Self {
        Clint { msip: false, mtimecmp: u64::MAX }
    }
}

impl Clint {
    /// A load at `offset`; `time` is the hart's current time.
    pub fn load(&self, offset: u64, size: u32, time: u64) -> Option<u64> {
        let (reg, shift) = match (offset, size) {
            (MSIP, 4) => return Some(self.msip as u64),
            (MTIMECMP, 8) | (MTIMECMP, 4) => (self.mtimecmp, 0),
            (o, 4) if o == MTIMECMP + 4 => (self.mtimecmp, 32),
            (MTIME, 8) | (MTIME, 4) => (time, 0),
            (o, 4) if o == MTIME + 4 => (time, 32),
            _ => return None,
        };
        let v = reg >> shift;
        Some(if size == 4 { v & 0xffff_ffff } else { v })
    }

    /// A store at `offset`. Writes to `mtime` are ignored: time is derived.
    pub fn store(&mut self, offset: u64, size: u32, val: u64) -> bool {
        match (offset, size) {
            (MSIP, 4) => self.msip = val & 1 != 0,
            (MTIMECMP, 8) => self.mtimecmp = val,
            (MTIMECMP, 4) => self.mtimecmp = (self.mtimecmp & !0xffff_ffff) | (val & 0xffff_ffff),
            (o, 4) if o == MTIMECMP + 4 => self.mtimecmp = (self.mtimecmp & 0xffff_ffff) | (val << 32),
            (MTIME, 8) | (MTIME, 4) => {}
            (o, 4) if o == MTIME + 4 => {}
            _ => return false,
        }
        true
    }

    /// Is the machine timer interrupt pending at `time`?
    pub fn mtip(&self, time: u64) -> bool {
        time >= self.mtimecmp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtimecmp_halves_and_mtip() {
        let mut c = Clint::default();
        assert!(!c.mtip(u64::MAX - 1));
        assert!(c.store(MTIMECMP, 4, 0x10));
        assert!(c.store(MTIMECMP + 4, 4, 0));
        assert_eq!(c.load(MTIMECMP, 8, 0), Some(0x10));
        assert!(!c.mtip(0xf));
        assert!(c.mtip(0x10));
        assert_eq!(c.load(MTIME + 4, 4, 0x1_2345_6789), Some(1));
    }

    #[test]
    fn unknown_offsets_are_not_answered() {
        let mut c = Clint::default();
        assert_eq!(c.load(0x8, 4, 0), None);
        assert!(!c.store(0x8, 4, 1));
        assert_eq!(c.load(MSIP, 1, 0), None);
    }
}
