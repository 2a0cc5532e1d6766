//! 16550A UART (the `ns16550a` of QEMU `virt`), as a state machine with no
//! fd and no thread: the guest's writes collect in `output`, the board
//! feeds received bytes with `receive`, and `irq()` is the interrupt line.
//! Transmission is instantaneous, so THR is always empty.
//!
//! Register map (offsets, DLAB = LCR bit 7), from the 16550A data sheet:
//! ```text
//!  0  RBR (read) / THR (write)      DLAB: DLL
//!  1  IER                           DLAB: DLM
//!  2  IIR (read) / FCR (write)
//!  3  LCR   4 MCR   5 LSR   6 MSR   7 SCR
//! ```

use std::collections::VecDeque;

const IER_RX: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RX: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
/// Receive FIFO depth; further input waits in the board's queue.
pub const RX_FIFO: usize = 16;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Uart {
    rx: VecDeque<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// A "THR empty" interrupt is owed to the guest.
    thre_pending: bool,
    /// Bytes the guest transmitted, not yet taken by the board.
    pub output: Vec<u8>,
}

impl Uart {
    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        RX_FIFO.saturating_sub(self.rx.len())
    }

    /// Bytes arriving on the line (at most `rx_room()` are kept).
    pub fn receive(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.rx_room());
        self.rx.extend(&bytes[..n]);
    }

    /// The interrupt enable register.
    pub fn ier(&self) -> u8 {
        self.ier
    }

    pub fn irq(&self) -> bool {
        (self.ier & IER_RX != 0 && !self.rx.is_empty()) || (self.ier & IER_THRE != 0 && self.thre_pending)
    }

    fn iir(&self) -> u8 {
        let id = if self.ier & IER_RX != 0 && !self.rx.is_empty() {
            IIR_RX
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        };
        id | if self.fifo_enabled { IIR_FIFO } else { 0 }
    }

    pub fn load(&mut self, offset: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRE {
                    self.thre_pending = false;
                }
                iir
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
            6 => 0xb0, // DCD, DSR, CTS
            7 => self.scr,
            _ => 0,
        }
    }

    pub fn store(&mut self, offset: u64, val: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = val,
            0 => {
                self.output.push(val);
                self.thre_pending = true;
            }
            1 if dlab => self.dlm = val,
            1 => {
                // Enabling the THRE interrupt with THR empty raises it.
                if val & IER_THRE != 0 && self.ier & IER_THRE == 0 {
                    self.thre_pending = true;
                }
                self.ier = val & 0x0f;
            }
            2 => {
                self.fifo_enabled = val & 1 != 0;
                if val & 2 != 0 {
                    self.rx.clear();
                }
            }
            3 => self.lcr = val,
            4 => self.mcr = val,
            7 => self.scr = val,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_collects_output_and_raises_thre() {
        let mut u = Uart::default();
        u.store(1, IER_THRE);
        assert!(u.irq(), "enabling THRE with THR empty interrupts");
        assert_eq!(u.load(2) & 0x0f, IIR_THRE);
        assert!(!u.irq(), "reading IIR acknowledges THRE");
        u.store(0, b'h');
        u.store(0, b'i');
        assert_eq!(u.output, b"hi");
        assert!(u.irq());
    }

    #[test]
    fn receive_sets_data_ready_and_interrupts() {
        let mut u = Uart::default();
        u.store(1, IER_RX);
        assert!(!u.irq());
        u.receive(b"ab");
        assert!(u.irq());
        assert_eq!(u.load(5) & LSR_DR, LSR_DR);
        assert_eq!(u.load(2) & 0x0f, IIR_RX);
        assert_eq!(u.load(0), b'a');
        assert_eq!(u.load(0), b'b');
        assert_eq!(u.load(5) & LSR_DR, 0);
        assert!(!u.irq());
    }

    #[test]
    fn divisor_latch_hides_data_registers() {
        let mut u = Uart::default();
        u.store(3, LCR_DLAB);
        u.store(0, 0x12);
        u.store(1, 0x34);
        assert!(u.output.is_empty());
        assert_eq!((u.load(0), u.load(1)), (0x12, 0x34));
        u.store(3, 0x03);
        assert_eq!(u.load(1), 0);
    }

    #[test]
    fn receive_fifo_is_bounded() {
        let mut u = Uart::default();
        u.receive(&[b'x'; 40]);
        assert_eq!(u.rx_room(), 0);
    }
}
