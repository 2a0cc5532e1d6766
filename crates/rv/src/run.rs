//! The dispatcher: `Hart::run`, block fetch (decoding a block on a cache
//! miss) and the cache maintenance executed ops ask for.
//!
//! See the module documentation of `hart` for the loop's steps. `run` keeps
//! running blocks back to back (`Core::exec_block`, `exec/block.rs`) until
//! the stop position or an op that may have made an interrupt takeable.

use crate::block::MAX_BLOCK_OPS;
use crate::bus::Bus;
use crate::csr::PRV_M;
use crate::decode::{decode, Kind, Op};
use crate::exec::End;
use crate::hart::{Exit, Flush, Hart, Position};
use crate::mmu::Access;
use crate::trap::{Trap, INTERRUPT_BIT};

impl Hart {
    /// Run until the position reaches `target`, the hart waits in `wfi`,
    /// a device is accessed, or (with `m_mode_exits`) a trap enters M-mode.
    pub fn run<B: Bus>(&mut self, bus: &mut B, target: Position) -> Exit {
        loop {
            let stop = target.0.min(self.core.stimer_pos);
            if self.core.position >= stop {
                if self.core.position >= target.0 {
                    return Exit::Reached;
                }
                self.core.update_stimer();
                continue;
            }
            if self.core.mip() & self.core.csr.mie != 0 {
                if let Some(code) = self.core.pending_interrupt() {
                    self.core.take_trap(code | INTERRUPT_BIT, 0);
                    if self.in_firmware() {
                        return Exit::MachineTrap;
                    }
                }
            }
            // Blocks back to back until something needs the checks above:
            // the stop position, or an instruction that may have made an
            // interrupt takeable (CSR access, xRET; traps leave this loop).
            self.core.attention = false;
            loop {
                let (start, count, block) = match self.cache.lookup(self.core.pc, self.core.fetch_ctx) {
                    Some(span) => span,
                    None => match self.fetch_block(bus) {
                        Ok(b) => self.cache.span(b),
                        Err(t) => {
                            self.exception(bus, t);
                            if self.in_firmware() {
                                return Exit::MachineTrap;
                            }
                            break;
                        }
                    },
                };
                let budget = (stop - self.core.position) as usize;
                let ops = self.cache.ops(start, count as usize);
                #[cfg(target_arch = "x86_64")]
                let code = translation::<B>(&mut self.jit, block, ops, budget);
                #[cfg(not(target_arch = "x86_64"))]
                let code = None::<usize>;
                #[allow(clippy::match_single_binding)]
                let end = match code {
                    #[cfg(target_arch = "x86_64")]
                    Some(code) => {
                        let from = self.core.position;
                        let jit = self.jit.as_mut().expect("a translation comes from the tier");
                        let end = crate::jit::enter(&mut self.core, &self.cache, jit, bus, code, budget);
                        jit.stats.positions += self.core.position - from;
                        jit.stats.entries += 1;
                        end
                    }
                    None => {
                        #[cfg(target_arch = "x86_64")]
                        let from = self.core.position;
                        let end = self.core.exec_block(bus, ops, budget);
                        #[cfg(target_arch = "x86_64")]
                        if let Some(jit) = &mut self.jit {
                            jit.stats.interp_positions += self.core.position - from;
                        }
                        end
                    }
                };
                if self.core.flush != Flush::None {
                    self.apply_flush();
                }
                match end {
                    End::Continue => {
                        if self.core.position >= stop || self.core.attention {
                            break;
                        }
                    }
                    End::Trap(t) => {
                        self.exception(bus, t);
                        if self.in_firmware() {
                            return Exit::MachineTrap;
                        }
                        break;
                    }
                    End::Wfi => return Exit::Wfi,
                    End::Device => return Exit::Device,
                }
            }
        }
    }

    pub(crate) fn apply_flush(&mut self) {
        match std::mem::replace(&mut self.core.flush, Flush::None) {
            Flush::None => {}
            Flush::Jumps => self.cache.flush_jumps(),
            Flush::Page(p) => {
                self.cache.drop_page(p);
                self.core.tlb.clear_code_page(p);
            }
            Flush::All => {
                self.flush_all_blocks();
                self.core.tlb.clear_all_code_pages();
            }
        }
    }

    /// Drop every decoded block and every translation of one.
    pub(crate) fn flush_all_blocks(&mut self) {
        self.cache.flush_all();
        #[cfg(target_arch = "x86_64")]
        if let Some(jit) = &mut self.jit {
            jit.clear();
        }
    }

    /// Find or decode the block at pc (after a jump-cache miss).
    #[inline(never)]
    fn fetch_block<B: Bus>(&mut self, bus: &mut B) -> Result<u32, Trap> {
        let pc = self.core.pc;
        let ctx = self.core.fetch_ctx;
        let paddr = self.core.lookup_or_translate(bus, pc, Access::Fetch)?;
        let ram_off = self.core.ram_off(paddr).ok_or(Access::Fetch.access_fault(pc))?;
        if let Some(b) = self.cache.find_paddr(paddr) {
            self.cache.remember(pc, ctx, b);
            return Ok(b);
        }
        let page_end = (ram_off | 0xfff) + 1;
        let mut ops: [Op; MAX_BLOCK_OPS] = [Op::illegal(0, 2); MAX_BLOCK_OPS];
        let mut n = 0;
        let mut off = ram_off;
        let ram_size = self.core.cfg.ram_size;
        let ram = bus.ram();
        let half = |ram: &[u8], o: u64| u16::from_le_bytes([ram[o as usize], ram[o as usize + 1]]);
        while n < MAX_BLOCK_OPS && off < page_end && off + 2 <= ram_size {
            let lo = half(ram, off);
            let raw = if lo & 3 == 3 {
                if off + 4 > page_end || off + 4 > ram_size {
                    if n == 0 {
                        return self.straddling_block(bus, lo);
                    }
                    break;
                }
                lo as u32 | (half(ram, off + 2) as u32) << 16
            } else {
                lo as u32
            };
            let mut op = decode(raw);
            op.off = (off - ram_off) as u16;
            // A direct jump forward within the page: write the link and
            // keep decoding at the target, so the block runs on through it.
            let target = off.wrapping_add(op.imm as i64 as u64);
            let follow = op.kind == Kind::Jal && target > off && target < page_end;
            if follow {
                op.kind = Kind::JalLink;
            }
            ops[n] = op;
            n += 1;
            off = if follow { target } else { off + op.len as u64 };
            if op.ends_block() {
                break;
            }
        }
        // A block never ends on a followed jump: make the last one a real jump.
        if ops[n - 1].kind == Kind::JalLink {
            ops[n - 1].kind = Kind::Jal;
        }
        let page = ram_off >> 12;
        if !self.core.tlb.is_code_page(page) {
            self.core.tlb.mark_code_page(page);
        }
        let idx = match self.cache.insert(paddr, page, &ops[..n]) {
            Some(i) => i,
            None => {
                self.flush_all_blocks();
                self.core.tlb.clear_all_code_pages();
                self.core.tlb.mark_code_page(page);
                self.cache.insert(paddr, page, &ops[..n]).expect("an empty cache holds one block")
            }
        };
        self.cache.remember(pc, ctx, idx);
        Ok(idx)
    }

    /// A 32-bit instruction whose upper half is on the next page: decoded
    /// each time into the scratch block, never cached.
    #[cold]
    fn straddling_block<B: Bus>(&mut self, bus: &mut B, lo: u16) -> Result<u32, Trap> {
        let pc2 = self.core.pc.wrapping_add(2);
        let paddr2 = self.core.translate(bus, pc2, Access::Fetch)?;
        let off2 = self.core.ram_off(paddr2).ok_or(Access::Fetch.access_fault(pc2))? as usize;
        let ram = bus.ram();
        let hi = u16::from_le_bytes([ram[off2], ram[off2 + 1]]);
        let op = decode(lo as u32 | (hi as u32) << 16);
        Ok(self.cache.set_scratch(op))
    }

    /// Did a trap just enter M-mode that the board must handle?
    fn in_firmware(&self) -> bool {
        self.core.cfg.m_mode_exits && self.core.prv == PRV_M
    }
}

/// The translated code for block `block`, if the translation tier is on,
/// the block is (or just became) hot, and all of it fits in `budget`: a
/// shorter budget must stop mid-block, which the interpreter does.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn translation<B: Bus>(
    jit: &mut Option<Box<crate::jit::Jit>>,
    block: u32,
    ops: &[crate::decode::Op],
    budget: usize,
) -> Option<usize> {
    match jit {
        Some(jit) if budget >= ops.len() => jit.code_for::<B>(block, ops),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::asm::*;
    use crate::csr::*;
    use crate::test_utils::*;
    use crate::{Exit, Position};

    /// Random words as code, in M-mode and then in S-mode under a random
    /// satp: whatever they do (traps, loads from anywhere, CSR writes), the
    /// hart must not panic, and two runs must agree exactly.
    #[test]
    fn random_code_never_panics_and_is_deterministic() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..40 {
            let words: Vec<u32> = (0..2048)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u32
                })
                .collect();
            let run_once = || {
                let (mut h, mut bus) = setup(&words);
                // Traps land back in the random code.
                h.core.csr.mtvec = BASE + 0x100;
                if round % 2 == 1 {
                    h.set_prv(PRV_S);
                    h.core.csr.satp = (8 << 60) | ((BASE >> 12) + (round as u64 % 16));
                    h.core.update_ctx();
                    h.core.csr.stvec = BASE + 0x200;
                }
                for _ in 0..200 {
                    let p = h.position().0;
                    if let Exit::Wfi = h.run(&mut bus, Position(p + 500)) {
                        h.idle(10);
                    }
                }
                (h.position(), h.pc(), (0..32).map(|i| h.x(i)).collect::<Vec<_>>(), bus.0)
            };
            assert!(run_once() == run_once(), "round {round}: two runs differ");
        }
    }

    #[test]
    fn store_into_decoded_code_is_seen_by_the_next_fetch() {
        // Overwrite the instruction after the store with `addi a0, a0, 100`.
        let patch = addi(A0, A0, 100);
        let mut w = with_regs(&[(A1, patch as u64)], &[]);
        let target_idx = w.len() + 2; // after auipc + sw
        w.push(auipc(A2, 0));
        w.push(sw(A1, A2, 8));
        w.push(addi(A0, A0, 1));
        assert_eq!(w.len(), target_idx + 1);
        let h = run(&w);
        assert_eq!(h.x(10), 100);
    }
}
