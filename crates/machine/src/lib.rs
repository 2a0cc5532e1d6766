//! `machine`: the board around the hart.
//!
//! Owns guest RAM, the bus, the CLINT, PLIC and 16550A UART, the device
//! tree, the kernel/ELF loaders, the SBI (implemented in Rust in place of
//! M-mode firmware), and the run loop that turns the hart's exits into
//! device, timer and idle work. It must not know about the network protocol
//! between hosts.
//!
//! Devices are state machines with no thread, fd or clock of their own.
//! Host input (console bytes, network frames) enters through the [`HostIo`]
//! trait at run-loop boundaries, as [`HostInput`] values given to
//! [`Machine::inject`]; host time enters in exactly one place, [`Machine::idle`],
//! which decides how far the guest clock jumps while the hart waits in
//! `wfi` (replay will log that decision).
//!
//! Host-side problems (a device's I/O error, a failed snapshot) are
//! `tracing` events, emitted where they happen; the binary installs the
//! subscriber.

pub mod boot;
pub mod clint;
mod digest;
pub mod fdt;
pub mod layout;
pub mod loader;
pub mod plic;
#[cfg(any(test, feature = "test-utils"))]
pub mod programs;
pub mod ram;
pub mod sbi;
pub mod snapshot;
pub mod uart;
pub mod virtio;

use clint::Clint;
use layout::*;
use plic::Plic;
use ram::Ram;
use rv::csr::{IRQ_MEI, IRQ_MSI, IRQ_MTI, IRQ_SEI, IRQ_STI};
use rv::{Bus, Exit, Hart, HartConfig, Position};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use uart::Uart;

/// Everything on the bus except the hart.
pub struct Board {
    pub ram: Ram,
    pub clint: Clint,
    pub plic: Plic,
    pub uart: Uart,
    /// Console bytes from the guest (UART and SBI), not yet written out.
    pub console_out: Vec<u8>,
    /// Console bytes for the guest, not yet accepted by the UART.
    pub console_in: VecDeque<u8>,
    /// virtio-mmio devices, in slot order.
    pub virtio: Vec<virtio::mmio::MmioTransport>,
}

impl Bus for Board {
    #[inline(always)]
    fn ram(&mut self) -> &mut [u8] {
        self.ram.bytes_mut()
    }

    fn mmio_load(&mut self, paddr: u64, size: u32, pos: u64) -> Option<u64> {
        match paddr {
            a if (CLINT_BASE..CLINT_BASE + CLINT_SIZE).contains(&a) => {
                self.clint.load(a - CLINT_BASE, size, pos / INSNS_PER_TICK)
            }
            a if (PLIC_BASE..PLIC_BASE + PLIC_SIZE).contains(&a) && size == 4 => {
                self.plic.load(a - PLIC_BASE).map(u64::from)
            }
            a if (UART0_BASE..UART0_BASE + UART0_SIZE).contains(&a) && size == 1 => {
                let v = self.uart.load(a - UART0_BASE) as u64;
                self.feed_uart();
                Some(v)
            }
            a if (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_SIZE * VIRTIO_SLOTS as u64).contains(&a) => {
                let slot = ((a - VIRTIO_BASE) / VIRTIO_SIZE) as usize;
                self.virtio.get_mut(slot)?.load((a - VIRTIO_BASE) % VIRTIO_SIZE, size)
            }
            _ => None,
        }
    }

    fn mmio_store(&mut self, paddr: u64, size: u32, val: u64, _pos: u64) -> bool {
        match paddr {
            a if (CLINT_BASE..CLINT_BASE + CLINT_SIZE).contains(&a) => self.clint.store(a - CLINT_BASE, size, val),
            a if (PLIC_BASE..PLIC_BASE + PLIC_SIZE).contains(&a) && size == 4 => {
                self.plic.store(a - PLIC_BASE, val as u32)
            }
            a if (UART0_BASE..UART0_BASE + UART0_SIZE).contains(&a) && size == 1 => {
                self.uart.store(a - UART0_BASE, val as u8);
                self.console_out.append(&mut self.uart.output);
                self.feed_uart();
                true
            }
            a if (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_SIZE * VIRTIO_SLOTS as u64).contains(&a) => {
                let slot = ((a - VIRTIO_BASE) / VIRTIO_SIZE) as usize;
                match self.virtio.get_mut(slot) {
                    Some(dev) => dev.store((a - VIRTIO_BASE) % VIRTIO_SIZE, size, val, &mut self.ram),
                    None => false,
                }
            }
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

/// How a Linux run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SBI system reset: shutdown.
    PowerOff,
    /// SBI system reset: cold or warm reboot.
    Reboot,
    /// The kernel panicked (its text is on the console).
    Panic,
    /// The console asked to quit (Ctrl-A x).
    Quit,
    /// The instruction limit was reached.
    Limit,
}

/// Why a device cannot be plugged in.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("all {VIRTIO_SLOTS} virtio slots are in use")]
    NoFreeSlot,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the guest waits for an interrupt (wfi at pc {pc:#x}) but no timer is armed and no device can wake it")]
    Stuck { pc: u64 },
    #[error("unexpected trap into M-mode (mcause {cause:#x}, mepc {epc:#x}, mtval {tval:#x}): the guest ran into firmware territory")]
    MachineTrap { cause: u64, epc: u64, tval: u64 },
    /// A device's host backend failed where failing must not reach the
    /// guest (a pair's disk replica: the guest would diverge from its
    /// twin); the machine stops before the guest sees anything of it.
    #[error("host fault: {0}")]
    HostFault(String),
}

/// What the host gives the run loop: every input from outside the machine
/// arrives as one of these, at a position the run loop chooses (the event
/// log records exactly these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostInput {
    /// Bytes typed on the console.
    Console(Vec<u8>),
    /// A frame received for network card `nic` (numbered in the order the
    /// cards were added).
    Frame {
        nic: usize,
        data: Vec<u8>,
    },
    Nothing,
    /// The user asked to quit.
    Quit,
}

/// The host side of the machine: console and network.
pub trait HostIo {
    /// Guest console output.
    fn console_write(&mut self, bytes: &[u8]);
    /// Wait up to `timeout` for input (zero: just poll).
    fn wait(&mut self, timeout: Duration) -> HostInput;
    /// The run loop reached `pos`: every input before it has been
    /// reported through `delivered`/`skipped`, and output reported next
    /// (`send_frame`) was produced before it. Called once per run-loop
    /// slice, before that slice's output.
    fn progress(&mut self, pos: u64) {
        let _ = pos;
    }
    /// A frame the guest sent on network card `nic`.
    fn send_frame(&mut self, nic: usize, frame: &[u8]) {
        let _ = (nic, frame);
    }
    /// An input took effect at position `pos` (what the event log records).
    fn delivered(&mut self, pos: u64, input: &HostInput) {
        let _ = (pos, input);
    }
    /// Guest time moved on by `steps` positions at `pos`, no instruction run
    /// (idle in `wfi`, or a correction towards host time).
    fn skipped(&mut self, pos: u64, steps: u64) {
        let _ = (pos, steps);
    }
    /// The machine's state hash at `pos` (every `Machine::hash_every`).
    fn state_hash(&mut self, pos: u64, hash: u64) {
        let _ = (pos, hash);
    }
    /// A snapshot taken at `snap.position` (every `Machine::snapshot_every`).
    /// Returns its id if it was kept: the next snapshot is a delta of it.
    fn snapshot_taken(&mut self, snap: snapshot::Snapshot) -> Option<u64> {
        let _ = snap;
        None
    }
}

/// How a bounded run (`Machine::run_to`) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunTo {
    /// The target position was reached.
    Reached,
    /// The hart waits in `wfi` with nothing to wake it before the target.
    Idle,
    /// The guest stopped the machine.
    Stopped(Stop),
}

/// A hart on a board.
pub struct Machine {
    pub hart: Hart,
    pub board: Board,
    /// Host time at boot and the guest time then (see `idle`).
    epoch: Option<(Instant, u64)>,
    /// Let guest time follow host time while idle (the default). Off, a
    /// `wfi` jumps straight to the next deadline: runs are then a function
    /// of their inputs alone (tests, and replay until it logs idle time).
    pub realtime: bool,
    /// Entropy for the kernel, passed in the device tree's
    /// `/chosen/rng-seed` at boot (a host input: replay will log it).
    pub rng_seed: Option<[u8; 32]>,
    /// Tail of the console output, to spot a kernel panic.
    panic_scan: Vec<u8>,
    panicked_at: Option<u64>,
    /// The hart stopped in `wfi` with nothing pending to wake it.
    waiting: bool,
    /// The virtio slot of each network card.
    nics: Vec<usize>,
    /// Report the state hash every this many positions (`HostIo::state_hash`).
    pub hash_every: Option<u64>,
    next_hash: u64,
    /// Hand the host a snapshot every this many positions
    /// (`HostIo::snapshot_taken`): full the first time, then deltas.
    pub snapshot_every: Option<u64>,
    next_snapshot: u64,
    last_snapshot: Option<u64>,
    /// The RAM part of the state hash, page by page.
    digest: digest::RamDigest,
    /// Pages written since the last snapshot (the dirty tracking is drained
    /// by the state hash too; each consumer keeps its own set).
    snap_dirty: rv::bitmap::PageBitmap,
}

/// Positions between two checks of `tohost`.
const TOHOST_POLL: u64 = 1 << 16;
/// Positions between two polls of the console while the guest runs (about
/// 2 ms at 400 MIPS).
const CONSOLE_POLL: u64 = 1 << 20;
/// How far guest time may fall behind host time while the guest is busy.
const MAX_TIME_LAG_NS: u64 = 500_000_000;
/// Host inputs delivered per poll while the guest runs.
const HOST_INPUTS_PER_POLL: usize = 64;
/// After a panic message, let the kernel print this much more.
const PANIC_GRACE: u64 = 200_000_000;
const PANIC_TEXT: &[u8] = b"Kernel panic - not syncing";

/// The engine new machines run their hart with (`rv::Engine` as a number:
/// 0 the host's default, 1 interp, 2 jit).
static ENGINE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Choose the engine of every machine this process makes from now on (the
/// `--engine` flag). The engines are interchangeable at every position, so
/// this is a speed policy, never guest state.
pub fn set_engine(engine: rv::Engine) {
    let n = match engine {
        rv::Engine::Interp => 1,
        rv::Engine::Jit => 2,
    };
    ENGINE.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// The engine new machines get: the one set, else `LOCKSTEP_ENGINE`
/// (`interp` or `jit`) from the environment, else the host's default.
pub fn engine() -> rv::Engine {
    match ENGINE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => rv::Engine::Interp,
        2 => rv::Engine::Jit,
        _ => default_engine(),
    }
}

/// `LOCKSTEP_ENGINE` if it names an engine, else the host's default (what
/// `--engine` falls back to; benches set the variable to compare engines
/// through every process they start).
pub fn default_engine() -> rv::Engine {
    std::env::var("LOCKSTEP_ENGINE").ok().and_then(|v| v.parse().ok()).unwrap_or(rv::Engine::host_default())
}

impl Machine {
    fn with_config(mem_bytes: u64, m_mode_exits: bool) -> Machine {
        let cfg = HartConfig {
            hartid: 0,
            ram_base: RAM_BASE,
            ram_size: mem_bytes,
            insns_per_tick: INSNS_PER_TICK,
            m_mode_exits,
            engine: engine(),
        };
        let hart = Hart::new(cfg);
        if hart.engine() != cfg.engine {
            // Only the translation tier can be missing: a host that refuses
            // writable executable memory (a hardened kernel or policy).
            tracing::warn!("the translation tier is unavailable on this host: running the interpreter");
        }
        Machine {
            hart,
            board: Board {
                ram: Ram::new(RAM_BASE, mem_bytes),
                clint: Clint::default(),
                plic: Plic::default(),
                uart: Uart::default(),
                console_out: Vec::new(),
                console_in: VecDeque::new(),
                virtio: Vec::new(),
            },
            epoch: None,
            realtime: true,
            rng_seed: None,
            panic_scan: Vec::new(),
            panicked_at: None,
            waiting: false,
            nics: Vec::new(),
            hash_every: None,
            next_hash: 0,
            snapshot_every: None,
            next_snapshot: 0,
            last_snapshot: None,
            digest: digest::RamDigest::new(mem_bytes as usize),
            snap_dirty: rv::bitmap::PageBitmap::new(mem_bytes as usize / digest::PAGE),
        }
    }

    /// Plug a virtio device into the next free slot (before booting).
    pub fn add_virtio(&mut self, device: Box<dyn virtio::VirtioDevice>) -> Result<(), DeviceError> {
        if self.board.virtio.len() >= VIRTIO_SLOTS {
            return Err(DeviceError::NoFreeSlot);
        }
        if device.device_id() == virtio::net::ID_NET {
            self.nics.push(self.board.virtio.len());
        }
        self.board.virtio.push(virtio::mmio::MmioTransport::new(device));
        Ok(())
    }

    /// Deliver one host input at the current position. Returns false for
    /// a quit request (the input is then not for the guest).
    pub fn inject(&mut self, input: HostInput) -> bool {
        match input {
            HostInput::Console(bytes) => {
                self.board.console_in.extend(bytes);
                self.board.feed_uart();
            }
            HostInput::Frame { nic, data } => {
                if let Some(&slot) = self.nics.get(nic) {
                    self.board.virtio[slot].input(data, &mut self.board.ram);
                }
            }
            HostInput::Nothing => {}
            HostInput::Quit => return false,
        }
        true
    }

    /// `inject`, reported to the host side (the event log).
    fn deliver(&mut self, io: &mut dyn HostIo, input: HostInput) -> bool {
        if input != HostInput::Quit && input != HostInput::Nothing {
            io.delivered(self.hart.position().0, &input);
        }
        self.inject(input)
    }

    /// Let guest time follow host time from now on, starting from the
    /// current guest time (a replica going live: the guest sees a pause,
    /// not a jump).
    pub fn resync_clock(&mut self) {
        self.epoch = None;
        self.realtime = true;
    }

    /// Move guest time on by `steps` positions without running (idle).
    pub fn skip(&mut self, steps: u64) {
        self.hart.idle(steps);
    }

    /// `skip`, reported to the host side (the event log).
    fn skip_reported(&mut self, io: &mut dyn HostIo, steps: u64) {
        if steps > 0 {
            io.skipped(self.hart.position().0, steps);
            self.hart.idle(steps);
            // A hash point reached by skipping is hashed on arrival, before
            // any input at that position (as after a step).
            self.maybe_hash(io);
        }
    }

    /// At a multiple of `hash_every`, report the state hash; at a multiple
    /// of `snapshot_every`, hand the host a snapshot (hash first).
    fn maybe_hash(&mut self, io: &mut dyn HostIo) {
        let pos = self.hart.position().0;
        if let Some(every) = self.hash_every {
            if pos == self.next_hash {
                io.state_hash(pos, self.state_hash());
            }
            self.next_hash = (pos / every + 1) * every;
        }
        if let Some(every) = self.snapshot_every {
            if pos == self.next_snapshot {
                match self.snapshot(self.last_snapshot) {
                    Ok(snap) => self.last_snapshot = io.snapshot_taken(snap),
                    Err(error) => tracing::error!(%error, "snapshot at position {pos} failed"),
                }
            }
            self.next_snapshot = (pos / every + 1) * every;
        }
    }

    /// The next position the run must stop at for a hash or a snapshot.
    fn hash_bound(&mut self) -> u64 {
        let pos = self.hart.position().0;
        let mut bound = u64::MAX;
        if let Some(every) = self.hash_every {
            if self.next_hash <= pos.saturating_sub(1) || self.next_hash == 0 {
                self.next_hash = (pos / every + 1) * every;
            }
            bound = bound.min(self.next_hash);
        }
        if let Some(every) = self.snapshot_every {
            if self.next_snapshot <= pos.saturating_sub(1) || self.next_snapshot == 0 {
                self.next_snapshot = (pos / every + 1) * every;
            }
            bound = bound.min(self.next_snapshot);
        }
        bound
    }

    /// Run until position `target` with no host input and no host time
    /// (replay): outputs go to `io`; the run ends early if the guest stops
    /// the machine or idles with nothing to wake it before `target`.
    pub fn run_to(&mut self, io: &mut dyn HostIo, target: u64) -> Result<RunTo, RunError> {
        loop {
            let now = self.hart.position().0;
            if now >= target {
                return Ok(RunTo::Reached);
            }
            if let Some(p) = self.panicked_at {
                if now >= p + PANIC_GRACE {
                    return Ok(RunTo::Stopped(Stop::Panic));
                }
            }
            let bound = match self.panicked_at {
                Some(p) => target.min(p + PANIC_GRACE),
                None => target,
            };
            let stop = self.step(bound)?;
            self.flush_output(io);
            if let Some(stop) = stop {
                return Ok(RunTo::Stopped(stop));
            }
            if self.waiting && self.hart.position().0 < target {
                return Ok(RunTo::Idle);
            }
        }
    }

    /// Poll the host for input (without waiting) and deliver what is there,
    /// a bounded amount at a time.
    fn poll_host(&mut self, io: &mut dyn HostIo) -> Option<Stop> {
        for _ in 0..HOST_INPUTS_PER_POLL {
            match io.wait(Duration::ZERO) {
                HostInput::Nothing => break,
                input => {
                    if !self.deliver(io, input) {
                        return Some(Stop::Quit);
                    }
                }
            }
        }
        None
    }

    /// Hand the guest's output (console bytes, network frames) to the host.
    fn flush_output(&mut self, io: &mut dyn HostIo) {
        self.flush_console(io);
        for (nic, &slot) in self.nics.iter().enumerate() {
            for frame in self.board.virtio[slot].take_output() {
                io.send_frame(nic, &frame);
            }
        }
    }

    /// A bare-metal machine: the program runs its own M-mode code.
    pub fn new(mem_bytes: u64) -> Machine {
        Machine::with_config(mem_bytes, false)
    }

    /// A machine for an S-mode kernel: M-mode is the board's SBI.
    pub fn new_firmware(mem_bytes: u64) -> Machine {
        Machine::with_config(mem_bytes, true)
    }

    /// Load a kernel and start the hart as the boot protocol says, with the
    /// delegation and counter access an SBI firmware would set up.
    pub fn boot_linux(
        &mut self,
        kernel: &std::path::Path,
        initrd: Option<&std::path::Path>,
        bootargs: &str,
    ) -> Result<boot::BootInfo, boot::BootError> {
        use rv::csr::*;
        let seed = self.rng_seed;
        let slots = self.board.virtio.len();
        let info = boot::load(&mut self.board.ram, kernel, initrd, bootargs, seed.as_ref().map(|s| &s[..]), slots)?;
        let h = &mut self.hart;
        // Delegate to S what S handles (as OpenSBI does): misaligned fetch,
        // illegal instruction, breakpoint, U ecall, page faults, S interrupts.
        h.write_csr_m(MEDELEG, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 8) | (1 << 12) | (1 << 13) | (1 << 15));
        h.write_csr_m(MIDELEG, S_INTERRUPTS);
        h.write_csr_m(MCOUNTEREN, 0xffff_ffff);
        // User mode may read `time` (the vDSO's clock_gettime does; Linux
        // sets this bit itself only when SBI's PMU extension is there).
        h.write_csr_m(SCOUNTEREN, 1 << 1);
        h.write_csr_m(MENVCFG, MENVCFG_STCE);
        h.write_csr_m(STIMECMP, u64::MAX);
        h.write_csr_m(MIE, IRQ_MEI);
        h.set_x(10, 0);
        h.set_x(11, info.dtb);
        h.set_pc(info.entry);
        h.set_prv(PRV_S);
        Ok(info)
    }

    /// A hash of the whole guest-visible machine: the hart's architectural
    /// state, RAM, and every device's state (including input not yet
    /// delivered). Equal hashes at equal positions mean the runs agree.
    pub fn state_hash(&mut self) -> u64 {
        self.drain_dirty();
        let mut h = self.hash_devices();
        for dev in &mut self.board.virtio {
            dev.storage_digest(&mut h);
        }
        self.digest.hash_into(self.board.ram.bytes(), &mut h);
        std::hash::Hasher::finish(&h)
    }

    /// The state hash's parts, each hashed on its own: the hart's and
    /// devices' state, the disks' written chunks, and RAM. When two state
    /// hashes differ, these say where.
    pub fn state_hash_parts(&mut self) -> [u64; 3] {
        self.drain_dirty();
        let devices = std::hash::Hasher::finish(&self.hash_devices());
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for dev in &mut self.board.virtio {
            dev.storage_digest(&mut h);
        }
        let storage = std::hash::Hasher::finish(&h);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.digest.hash_into(self.board.ram.bytes(), &mut h);
        [devices, storage, std::hash::Hasher::finish(&h)]
    }

    /// The hart's and devices' state, the start of every state hash.
    fn hash_devices(&self) -> xxhash_rust::xxh3::Xxh3 {
        use std::hash::Hash;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.hart.state().hash(&mut h);
        let b = &self.board;
        (&b.clint, &b.plic, &b.uart, &b.console_in, &b.console_out).hash(&mut h);
        for dev in &b.virtio {
            dev.hash_state(&mut h);
        }
        h
    }

    /// Hand the pages written since the last drain to both consumers of
    /// the dirty tracking: the state hash and snapshots.
    fn drain_dirty(&mut self) {
        let pages = self.hart.take_dirty_pages().into_iter().chain(self.board.ram.take_dirty());
        for page in pages {
            self.digest.mark(page);
            self.snap_dirty.set(page);
        }
    }

    /// Whether a device's host failure (a disk replica's I/O error) stops
    /// the machine with [`RunError::HostFault`] (a side of a pair: the
    /// guest must not see an error its twin did not) or reaches the guest
    /// as a device error (a VM alone).
    pub fn stop_on_host_errors(&mut self, stop: bool) {
        for dev in &mut self.board.virtio {
            dev.stop_on_host_error(stop, &mut self.board.ram);
        }
    }

    /// RAM was rewritten without tracking (a snapshot restored): the
    /// next state hash hashes every page.
    pub(crate) fn ram_replaced(&mut self) {
        self.digest.invalidate();
    }

    /// RAM pages (numbered from the start of RAM) written by the hart or the
    /// host side since the last call, ascending; re-arms the tracking.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        self.drain_dirty();
        self.snap_dirty.drain()
    }

    /// Position at which the CLINT timer fires, if it has not yet and ever
    /// can.
    fn clint_deadline(&self) -> Option<u64> {
        let cmp = self.board.clint.mtimecmp;
        (cmp > self.hart.time()).then(|| cmp.checked_mul(INSNS_PER_TICK)).flatten()
    }

    /// The earliest position at which a timer raises an interrupt that is
    /// enabled in `mie` and so could end a `wfi`.
    fn next_wakeup(&self) -> Option<u64> {
        let mie = self.hart.csrs().mie;
        let clint = self.clint_deadline().filter(|_| mie & IRQ_MTI != 0);
        let sstc = self.hart.next_internal_deadline().map(|p| p.0).filter(|_| mie & IRQ_STI != 0);
        [clint, sstc].into_iter().flatten().min()
    }

    /// Bring the hart's interrupt lines in line with the devices.
    fn sync_irqs(&mut self) {
        let time = self.hart.time();
        let b = &mut self.board;
        b.plic.set_line(UART0_IRQ, b.uart.irq());
        for (i, dev) in b.virtio.iter().enumerate() {
            b.plic.set_line(VIRTIO_IRQ + i, dev.irq());
        }
        self.hart.set_irq(IRQ_MTI, b.clint.mtip(time));
        self.hart.set_irq(IRQ_MSI, b.clint.msip);
        self.hart.set_irq(IRQ_MEI, b.plic.output(0));
        self.hart.set_irq(IRQ_SEI, b.plic.output(1));
    }

    /// One stretch of execution up to `target`. `Ok(None)`: keep going.
    fn step(&mut self, target: u64) -> Result<Option<Stop>, RunError> {
        self.sync_irqs();
        let now = self.hart.position().0;
        let deadline = self.clint_deadline().unwrap_or(u64::MAX);
        let slice_end = target.min(deadline.max(now + 1));
        // The host side (devices at a notify, SBI, loaders) may have written
        // guest RAM since the hart last ran: drop decoded code there first.
        for page in self.board.ram.take_written() {
            self.hart.invalidate_ram(page << 12, 1 << 12);
        }
        let exit = self.hart.run(&mut self.board, Position(slice_end));
        if let Some(fault) = self.board.virtio.iter().find_map(|d| d.host_fault()) {
            return Err(RunError::HostFault(fault));
        }
        self.waiting = false;
        match exit {
            Exit::Reached | Exit::Device => Ok(None),
            Exit::Wfi => {
                self.sync_irqs();
                self.waiting = !self.hart.wakeup_pending();
                Ok(None)
            }
            Exit::MachineTrap => {
                let c = self.hart.csrs();
                let (cause, epc, tval) = (c.mcause, c.mepc, c.mtval);
                if cause != rv::trap::ECALL_FROM_S {
                    return Err(RunError::MachineTrap { cause, epc, tval });
                }
                let outcome = sbi::handle(self);
                self.hart.mret_to(epc + 4);
                Ok(match outcome {
                    sbi::SbiOutcome::Continue => None,
                    sbi::SbiOutcome::Shutdown => Some(Stop::PowerOff),
                    sbi::SbiOutcome::Reboot => Some(Stop::Reboot),
                })
            }
        }
    }

    /// The hart waits in `wfi` with nothing pending: let guest time jump to
    /// the next timer deadline, but never ahead of host time since boot
    /// (sleeping until then or until host input arrives). This is the one
    /// place where host time reaches the guest.
    fn idle(&mut self, io: &mut dyn HostIo, limit: u64) -> Result<Option<Stop>, RunError> {
        let now = self.hart.position().0;
        let Some(next) = self.next_wakeup() else {
            // Only host input can wake the guest now.
            let input = io.wait(Duration::from_millis(100));
            let got_input = input != HostInput::Nothing;
            if !self.deliver(io, input) {
                return Ok(Some(Stop::Quit));
            }
            if got_input {
                if let Some(stop) = self.poll_host(io) {
                    return Ok(Some(stop));
                }
            }
            self.sync_irqs();
            let can_wake = self.board.uart_rx_enabled() || !self.nics.is_empty();
            return if self.hart.wakeup_pending() || can_wake {
                Ok(None)
            } else {
                Err(RunError::Stuck { pc: self.hart.pc() })
            };
        };
        // Input that is already there is delivered now, before time moves.
        let before = self.board.console_in.len();
        if let Some(stop) = self.poll_host(io) {
            return Ok(Some(stop));
        }
        self.sync_irqs();
        if self.hart.wakeup_pending() || self.board.console_in.len() != before {
            return Ok(None);
        }
        let next = next.min(limit);
        if !self.realtime {
            self.skip_reported(io, next - now);
            return Ok(None);
        }
        let (t0, g0) = *self.epoch.get_or_insert((Instant::now(), now));
        let guest_ns = (next - g0).saturating_mul(NS_PER_INSN);
        let host_ns = t0.elapsed().as_nanos() as u64;
        let mut wake = next;
        if guest_ns > host_ns {
            let input = io.wait(Duration::from_nanos(guest_ns - host_ns));
            if input != HostInput::Nothing {
                // Wake at the guest time matching now, and deliver there.
                let host_now = t0.elapsed().as_nanos() as u64;
                wake = (g0 + host_now / NS_PER_INSN).clamp(now, next);
                self.skip_reported(io, wake - now);
                if !self.deliver(io, input) {
                    return Ok(Some(Stop::Quit));
                }
                return Ok(self.poll_host(io));
            }
        }
        self.skip_reported(io, wake - now);
        Ok(None)
    }

    /// A busy guest's clock runs slower than the host's (it advances with
    /// instructions, and the interpreter retires fewer per second than the
    /// timebase assumes): when it lags host time by more than
    /// `MAX_TIME_LAG_NS`, move it on (a logged skip, as if the vCPU had been
    /// descheduled), never past the next hash point or the limit.
    fn correct_time(&mut self, io: &mut dyn HostIo, limit: u64) {
        if !self.realtime {
            return;
        }
        let now = self.hart.position().0;
        let (t0, g0) = *self.epoch.get_or_insert((Instant::now(), now));
        let host = g0 + t0.elapsed().as_nanos() as u64 / NS_PER_INSN;
        if host > now + MAX_TIME_LAG_NS / NS_PER_INSN {
            let to = host.min(limit).min(self.hash_bound());
            self.skip_reported(io, to.saturating_sub(now));
        }
    }

    /// Hand guest output to the console and watch it for a kernel panic.
    fn flush_console(&mut self, io: &mut dyn HostIo) {
        if self.board.console_out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.board.console_out);
        io.console_write(&out);
        if self.panicked_at.is_none() {
            self.panic_scan.extend_from_slice(&out);
            if self.panic_scan.windows(PANIC_TEXT.len()).any(|w| w == PANIC_TEXT) {
                self.panicked_at = Some(self.hart.position().0);
            }
            let keep = self.panic_scan.len().saturating_sub(PANIC_TEXT.len());
            self.panic_scan.drain(..keep);
        }
    }

    /// Run a booted kernel until it powers off, reboots, panics, the host
    /// quits, or `max_insns` positions pass.
    pub fn run_linux(&mut self, io: &mut dyn HostIo, max_insns: Option<u64>) -> Result<Stop, RunError> {
        let limit = max_insns.unwrap_or(u64::MAX);
        self.epoch.get_or_insert((Instant::now(), self.hart.position().0));
        loop {
            let now = self.hart.position().0;
            if now >= limit {
                self.flush_output(io);
                return Ok(Stop::Limit);
            }
            if let Some(p) = self.panicked_at {
                if now >= p + PANIC_GRACE {
                    return Ok(Stop::Panic);
                }
            }
            let bound = self.hash_bound();
            let stop = self.step(limit.min(now + CONSOLE_POLL).min(bound))?;
            io.progress(self.hart.position().0);
            self.flush_output(io);
            self.maybe_hash(io);
            if let Some(stop) = stop {
                return Ok(stop);
            }
            if self.waiting {
                let bound = self.hash_bound();
                if let Some(stop) = self.idle(io, limit.min(bound))? {
                    return Ok(stop);
                }
            } else if self.hart.position().0 >= now + CONSOLE_POLL || self.board.console_in.is_empty() {
                self.correct_time(io, limit);
                if let Some(stop) = self.poll_host(io) {
                    return Ok(stop);
                }
            }
        }
    }

    /// Run until the hart reaches `target`, handling timers and `wfi`, for
    /// bare-metal programs (no console, no host time: `wfi` jumps straight
    /// to the next deadline). Returns early (with `Ok(false)`) when `stop`
    /// says so after an exit.
    pub fn run_until(&mut self, target: Position, mut stop: impl FnMut(&Machine) -> bool) -> Result<bool, RunError> {
        loop {
            let now = self.hart.position().0;
            if now >= target.0 {
                return Ok(true);
            }
            // A bare-metal program has no SBI; treat a reset as the end.
            if self.step(target.0)?.is_some() {
                return Ok(false);
            }
            if self.waiting {
                self.sync_irqs();
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

impl Board {
    /// Move waiting console input into the UART's receive FIFO. This
    /// happens only at guest-determined points (an input's injection, a
    /// UART register access), never at run-loop boundaries, so where bytes
    /// appear depends on the guest and the input's position alone. Input
    /// waits until the driver enables the receive interrupt: a FIFO filled
    /// earlier would be cleared by the driver's start-up.
    fn feed_uart(&mut self) {
        if !self.console_in.is_empty() && self.uart.rx_room() > 0 && self.uart_rx_enabled() {
            let n = self.uart.rx_room().min(self.console_in.len());
            let bytes: Vec<u8> = self.console_in.drain(..n).collect();
            self.uart.receive(&bytes);
        }
    }

    /// Could console input wake the guest (UART receive interrupt on)?
    fn uart_rx_enabled(&self) -> bool {
        self.uart.ier() & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ninth_virtio_device_is_refused() {
        let mut m = Machine::new(1 << 20);
        for i in 0..VIRTIO_SLOTS {
            m.add_virtio(Box::new(virtio::net::Net::new([0x52, 0x54, 0, 0, 0, i as u8]))).unwrap();
        }
        let e = m.add_virtio(Box::new(virtio::net::Net::new([0x52, 0x54, 0, 0, 0, 9]))).unwrap_err();
        assert!(matches!(e, DeviceError::NoFreeSlot));
        assert_eq!(e.to_string(), "all 8 virtio slots are in use");
    }
}
