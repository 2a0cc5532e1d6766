//! SiFive PLIC (platform-level interrupt controller) as on QEMU `virt`, for
//! one hart: context 0 is its M-mode, context 1 its S-mode. Sources are
//! level-triggered: a source is pending while its line is high and it is
//! not claimed; completing it re-arms it.
//!
//! ```text
//!  0x00_0000 + 4*s   priority of source s (1..NSRC)
//!  0x00_1000         pending bits
//!  0x00_2000 + 0x80*c   enable bits of context c
//!  0x20_0000 + 0x1000*c threshold of context c; +4: claim / complete
//! ```

/// Sources 1..=NSRC (0 means "none").
pub const NSRC: usize = 31;
pub const CONTEXTS: usize = 2;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Plic {
    priority: [u32; NSRC + 1],
    /// Input line levels.
    level: u32,
    pending: u32,
    /// Claimed and not yet completed.
    in_service: u32,
    enable: [u32; CONTEXTS],
    threshold: [u32; CONTEXTS],
}

impl Plic {
    /// Drive the line of source `src`.
    pub fn set_line(&mut self, src: usize, high: bool) {
        let bit = 1u32 << src;
        if high {
            self.level |= bit;
            if self.in_service & bit == 0 {
                self.pending |= bit;
            }
        } else {
            self.level &= !bit;
            self.pending &= !bit;
        }
    }

    /// The best claimable source for context `c`.
    fn best(&self, c: usize) -> Option<usize> {
        let cand = self.pending & self.enable[c] & !1;
        (1..=NSRC)
            .filter(|&s| cand & (1 << s) != 0 && self.priority[s] > self.threshold[c])
            .max_by_key(|&s| (self.priority[s], std::cmp::Reverse(s)))
    }

    /// Interrupt output to context `c` (0: MEIP, 1: SEIP).
    pub fn output(&self, c: usize) -> bool {
        self.best(c).is_some()
    }

    pub fn load(&mut self, offset: u64) -> Option<u32> {
        Some(match offset {
            0..=0xfff => *self.priority.get((offset / 4) as usize)?,
            0x1000 => self.pending,
            0x2000..=0x1f_ffff => {
                let c = ((offset - 0x2000) / 0x80) as usize;
                if !(offset - 0x2000).is_multiple_of(0x80) {
                    return Some(0);
                }
                *self.enable.get(c)?
            }
            _ => {
                let c = ((offset.checked_sub(0x20_0000)?) / 0x1000) as usize;
                if c >= CONTEXTS {
                    return None;
                }
                match offset % 0x1000 {
                    0 => self.threshold[c],
                    4 => match self.best(c) {
                        Some(s) => {
                            self.pending &= !(1 << s);
                            self.in_service |= 1 << s;
                            s as u32
                        }
                        None => 0,
                    },
                    _ => 0,
                }
            }
        })
    }

    pub fn store(&mut self, offset: u64, val: u32) -> bool {
        match offset {
            0..=0xfff => match self.priority.get_mut((offset / 4) as usize) {
                Some(p) if offset >= 4 => *p = val & 7,
                Some(_) => {}
                None => return false,
            },
            0x1000 => {}
            0x2000..=0x1f_ffff => {
                let c = ((offset - 0x2000) / 0x80) as usize;
                if (offset - 0x2000).is_multiple_of(0x80) && c < CONTEXTS {
                    self.enable[c] = val & !1;
                } else if c >= CONTEXTS {
                    return false;
                }
            }
            _ => {
                let Some(rel) = offset.checked_sub(0x20_0000) else {
                    return false;
                };
                let c = (rel / 0x1000) as usize;
                if c >= CONTEXTS {
                    return false;
                }
                match rel % 0x1000 {
                    0 => self.threshold[c] = val & 7,
                    4 => {
                        let s = val as usize;
                        if (1..=NSRC).contains(&s) && self.in_service & (1 << s) != 0 {
                            self.in_service &= !(1 << s);
                            if self.level & (1 << s) != 0 {
                                self.pending |= 1 << s;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S_CLAIM: u64 = 0x20_1004;

    fn plic_with_source(src: usize) -> Plic {
        let mut p = Plic::default();
        p.store(4 * src as u64, 1);
        p.store(0x2080, 1 << src); // enable for context 1 (S)
        p
    }

    #[test]
    fn claim_complete_cycle() {
        let mut p = plic_with_source(10);
        assert!(!p.output(1));
        p.set_line(10, true);
        assert!(p.output(1));
        assert!(!p.output(0), "not enabled for M");
        assert_eq!(p.load(S_CLAIM), Some(10));
        assert!(!p.output(1), "claimed");
        assert_eq!(p.load(S_CLAIM), Some(0));
        p.store(S_CLAIM, 10);
        assert!(p.output(1), "line still high: pending again");
        p.set_line(10, false);
        assert!(!p.output(1));
    }

    #[test]
    fn threshold_and_priority() {
        let mut p = plic_with_source(3);
        p.store(4 * 5, 2);
        p.store(0x2080, (1 << 3) | (1 << 5));
        p.set_line(3, true);
        p.set_line(5, true);
        assert_eq!(p.load(S_CLAIM), Some(5), "higher priority first");
        p.store(0x20_1000, 1);
        assert!(!p.output(1), "source 3 (priority 1) is at the threshold");
    }

    #[test]
    fn out_of_range_offsets_are_not_answered() {
        let mut p = Plic::default();
        assert_eq!(p.load(0x20_2000), None);
        assert!(!p.store(0x20_2004, 1));
    }
}
