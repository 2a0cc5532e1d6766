//! Loading guest programs into RAM.

use crate::ram::Ram;
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read '{path}'")]
    Read { path: String, source: std::io::Error },
    #[error("'{path}' is not a 64-bit ELF file")]
    NotElf64 { path: String, source: object::read::Error },
    #[error("'{path}' is an ELF for machine {machine}, not RISC-V")]
    NotRiscv { path: String, machine: u16 },
    #[error("'{path}': segment at {start:#x}..{end:#x} lies outside RAM {ram_start:#x}..{ram_end:#x}")]
    OutsideRam { path: String, start: u64, end: u64, ram_start: u64, ram_end: u64 },
    #[error("'{path}': segment at {start:#x} claims bytes beyond the end of the file")]
    Truncated { path: String, start: u64 },
}

/// What a loaded ELF tells the runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedElf {
    pub entry: u64,
    /// Address of the `tohost` symbol, if the program has one.
    pub tohost: Option<u64>,
}

/// Load every PT_LOAD segment of a RISC-V ELF64 at its physical address.
pub fn load_elf(path: &Path, ram: &mut Ram) -> Result<LoadedElf, LoadError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| LoadError::Read { path: p.clone(), source })?;
    load_elf_bytes(&p, &data, ram)
}

pub fn load_elf_bytes(p: &str, data: &[u8], ram: &mut Ram) -> Result<LoadedElf, LoadError> {
    let not_elf = |source| LoadError::NotElf64 { path: p.to_string(), source };
    let file = ElfFile64::<Endianness>::parse(data).map_err(not_elf)?;
    let header = file.elf_header();
    let endian = file.endian();
    let machine = header.e_machine(endian);
    if machine != elf::EM_RISCV {
        return Err(LoadError::NotRiscv { path: p.to_string(), machine });
    }
    // Check every segment before writing any, so a bad file loads nothing.
    let mut segments = Vec::new();
    for ph in header.program_headers(endian, data).map_err(not_elf)? {
        if ph.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let start = ph.p_paddr(endian);
        let memsz = ph.p_memsz(endian);
        let bytes = ph.data(endian, data).map_err(|_| LoadError::Truncated { path: p.to_string(), start })?;
        let end = start.saturating_add(memsz);
        if !ram.contains(start, memsz) || (bytes.len() as u64) > memsz {
            return Err(LoadError::OutsideRam {
                path: p.to_string(),
                start,
                end,
                ram_start: ram.base(),
                ram_end: ram.base() + ram.len(),
            });
        }
        segments.push((start, memsz, bytes));
    }
    for (start, memsz, bytes) in segments {
        ram.write(start, bytes);
        ram.fill(start + bytes.len() as u64, memsz - bytes.len() as u64, 0);
    }
    let tohost = file.symbols().find(|s| s.name() == Ok("tohost")).map(|s| s.address());
    Ok(LoadedElf { entry: header.e_entry(endian), tohost })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal RISC-V ELF64: header, one PT_LOAD of 16 bytes at RAM.
    fn tiny_elf() -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56 + 16];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&elf::EM_RISCV.to_le_bytes());
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x8000_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&elf::PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&0x8000_0000u64.to_le_bytes()); // vaddr
        ph[24..32].copy_from_slice(&0x8000_0000u64.to_le_bytes()); // paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // filesz
        ph[40..48].copy_from_slice(&16u64.to_le_bytes()); // memsz
        e[120..136].copy_from_slice(&[0x13; 16]);
        e
    }

    #[test]
    fn tiny_elf_loads_and_mutations_never_panic() {
        let mut ram = Ram::new(0x8000_0000, 4096);
        let l = load_elf_bytes("tiny", &tiny_elf(), &mut ram).unwrap();
        assert_eq!(l.entry, 0x8000_0000);
        let mut x = 0x1234_5678_9abc_def1_u64;
        for _ in 0..20_000 {
            let mut e = tiny_elf();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x >> 8) as usize % e.len();
                e[i] = x as u8;
            }
            x ^= x << 13;
            e.truncate(e.len() - x.is_multiple_of(4) as usize * ((x >> 20) as usize % e.len()));
            let mut ram = Ram::new(0x8000_0000, 4096);
            let _ = load_elf_bytes("mutant", &e, &mut ram);
        }
    }

    #[test]
    fn garbage_is_not_an_elf() {
        let mut ram = Ram::new(0x8000_0000, 4096);
        let e = load_elf_bytes("x", b"hello world, definitely not elf", &mut ram).unwrap_err();
        assert!(matches!(e, LoadError::NotElf64 { .. }), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let mut ram = Ram::new(0x8000_0000, 4096);
        let e = load_elf(Path::new("/nonexistent/prog.elf"), &mut ram).unwrap_err();
        assert_eq!(e.to_string(), "cannot read '/nonexistent/prog.elf'", "the reason is the source, not repeated");
        assert!(std::error::Error::source(&e).is_some());
    }
}
