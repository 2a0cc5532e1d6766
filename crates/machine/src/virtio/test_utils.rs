//! Driver-side fixtures for device tests: descriptor tables in guest RAM.

use crate::ram::Ram;

/// Write descriptor `i` of the table at `table`.
pub fn put_desc(ram: &mut Ram, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write(table + 16 * i as u64, &b);
}
