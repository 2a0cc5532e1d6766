//! `machine`: the board around the hart.
//!
//! Owns guest RAM, the bus, the CLINT, loaders, and the run loop that turns
//! the hart's exits into device and timer work. (The PLIC, UART, virtio
//! devices, device tree and SBI arrive with the Linux board.) It must not
//! know about the network protocol between hosts.

pub mod clint;
pub mod layout;
pub mod loader;
pub mod programs;
pub mod ram;

use clint::Clint;
use layout::*;
use ram::Ram;
use rv::csr::{IRQ_MSI, IRQ_MTI, IRQ_STI};
use rv::{Bus, Exit, Hart, HartConfig, Position};

/// Everything on the bus except the hart.
pub struct Board {
    pub ram: Ram,
    pub clint: Clint,
}

impl Bus for Board {
    #[inline(always)]
    fn ram(&mut self) -> &mut [u8] {
        self.ram.bytes_mut()
    }

    fn mmio_load(&mut self, paddr: u64, size: u32, pos: u64) -> Option<u64> {
        match paddr {
            CLINT_BASE..=0x0200_ffff => {
                self.clint
                    .load(paddr - CLINT_BASE, size, pos / INSNS_PER_TICK)
            }
            _ => None,
        }
    }

    fn mmio_store(&mut self, paddr: u64, size: u32, val: u64, _pos: u64) -> bool {
        match paddr {
            CLINT_BASE..=0x0200_ffff => self.clint.store(paddr - CLINT_BASE, size, val),
            _ => false,
        }
    }
}

/// How a bare-metal program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareOutcome {
    /// `tohost` was written with 1.
    Pass,
    /// `tohost` was written with another value: the failing test number is
    /// `value >> 1`.
    Fail(u64),
    /// The instruction limit was reached first.
    Limit,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the guest waits for an interrupt (wfi at pc {pc:#x}) but no timer is armed and no device can wake it")]
    Stuck { pc: u64 },
}

/// A hart on a board.
pub struct Machine {
    pub hart: Hart,
    pub board: Board,
}

/// Positions between two checks of `tohost`.
const TOHOST_POLL: u64 = 1 << 16;

impl Machine {
    pub fn new(mem_bytes: u64) -> Machine {
        let cfg = HartConfig {
            hartid: 0,
            ram_base: RAM_BASE,
            ram_size: mem_bytes,
            insns_per_tick: INSNS_PER_TICK,
        };
        Machine {
            hart: Hart::new(cfg),
            board: Board {
                ram: Ram::new(RAM_BASE, mem_bytes),
                clint: Clint::default(),
            },
        }
    }

    /// Position at which the CLINT timer fires, if it has not yet and ever
    /// can.
    fn clint_deadline(&self) -> Option<u64> {
        let cmp = self.board.clint.mtimecmp;
        (cmp > self.hart.time())
            .then(|| cmp.checked_mul(INSNS_PER_TICK))
            .flatten()
    }

    /// The earliest position at which a timer raises an interrupt that is
    /// enabled in `mie` and so could end a `wfi`.
    fn next_wakeup(&self) -> Option<u64> {
        let mie = self.hart.csrs().mie;
        let clint = self.clint_deadline().filter(|_| mie & IRQ_MTI != 0);
        let sstc = self
            .hart
            .next_internal_deadline()
            .map(|p| p.0)
            .filter(|_| mie & IRQ_STI != 0);
        [clint, sstc].into_iter().flatten().min()
    }

    /// Bring the hart's interrupt lines in line with the devices.
    fn sync_irqs(&mut self) {
        let time = self.hart.time();
        self.hart.set_irq(IRQ_MTI, self.board.clint.mtip(time));
        self.hart.set_irq(IRQ_MSI, self.board.clint.msip);
    }

    /// Run until the hart reaches `target`, handling timers and `wfi`.
    /// Returns early (with `Ok(false)`) when `stop` says so after an exit.
    pub fn run_until(
        &mut self,
        target: Position,
        mut stop: impl FnMut(&Machine) -> bool,
    ) -> Result<bool, RunError> {
        loop {
            self.sync_irqs();
            let now = self.hart.position().0;
            if now >= target.0 {
                return Ok(true);
            }
            let deadline = self.clint_deadline().unwrap_or(u64::MAX);
            let slice_end = target.0.min(deadline.max(now + 1));
            match self.hart.run(&mut self.board, Position(slice_end)) {
                Exit::Reached | Exit::Device => {}
                Exit::Wfi => {
                    self.sync_irqs();
                    if !self.hart.wakeup_pending() {
                        // Idle until the next timer deadline: time is the
                        // position, so waiting is a jump forward.
                        match self.next_wakeup() {
                            Some(p) => {
                                let p = p.min(target.0);
                                let now = self.hart.position().0;
                                if p > now {
                                    self.hart.idle(p - now);
                                }
                            }
                            None => return Err(RunError::Stuck { pc: self.hart.pc() }),
                        }
                    }
                }
            }
            if stop(self) {
                return Ok(false);
            }
        }
    }

    /// Run a bare-metal test program until it writes `tohost` or reaches
    /// `max_insns` positions.
    pub fn run_bare(&mut self, tohost: u64, max_insns: u64) -> Result<BareOutcome, RunError> {
        let read_tohost = |m: &Machine| m.board.ram.read_u64(tohost).unwrap_or(0);
        loop {
            let now = self.hart.position().0;
            if now >= max_insns {
                return Ok(BareOutcome::Limit);
            }
            let target = max_insns.min(now + TOHOST_POLL);
            self.run_until(Position(target), |m| read_tohost(m) != 0)?;
            match read_tohost(self) {
                0 => {}
                1 => return Ok(BareOutcome::Pass),
                v => return Ok(BareOutcome::Fail(v >> 1)),
            }
        }
    }
}
