//! Loading a Linux kernel, initrd and device tree into RAM, following the
//! RISC-V boot protocol (Linux `Documentation/arch/riscv/boot.rst`): the
//! kernel starts in S-mode at its entry with a0 = hart id, a1 = the DTB's
//! physical address, translation off.
//!
//! The flat `Image` header (`Documentation/arch/riscv/boot-image-header.rst`):
//! ```text
//!  0  code0 (u32)   4 code1 (u32)   8 text_offset (u64)  16 image_size (u64)
//!  24 flags (u64)  32 version (u32) 36 res1  40 res2 (u64)
//!  48 magic "RISCV\0\0\0" (deprecated)   56 magic2 "RSC\x05"   60 res3
//! ```

use crate::fdt::{self, FdtConfig};
use crate::layout::{FDT_MAX_SIZE, RAM_BASE};
use crate::loader::{self, LoadError};
use crate::ram::Ram;

const IMAGE_MAGIC2: &[u8; 4] = b"RSC\x05";
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} '{path}'")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("kernel '{path}' is neither a RISC-V Image (no RSC\\x05 magic at offset 56) nor an ELF file")]
    NotAKernel { path: String },
    #[error(transparent)]
    Elf(#[from] LoadError),
    #[error("{what} needs {need} bytes but --mem gives {have}: kernel, initrd and device tree do not fit")]
    TooLittleMemory { what: &'static str, need: u64, have: u64 },
    #[error("cannot build the device tree")]
    Fdt(#[source] vm_fdt::Error),
}

/// Where things went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub entry: u64,
    pub dtb: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Is `data` a RISC-V flat Image? Returns (text_offset, image_size).
pub fn parse_image_header(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() < 64 || &data[56..60] != IMAGE_MAGIC2 {
        return None;
    }
    let text_offset = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let image_size = u64::from_le_bytes(data[16..24].try_into().ok()?);
    Some((text_offset, image_size.max(data.len() as u64)))
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read { what, path: path.display().to_string(), source })
}

/// Load everything; nothing is written to RAM unless it all fits.
pub fn load(
    ram: &mut Ram,
    kernel_path: &std::path::Path,
    initrd_path: Option<&std::path::Path>,
    bootargs: &str,
    rng_seed: Option<&[u8]>,
    virtio_slots: usize,
) -> Result<BootInfo, BootError> {
    let kernel = read("kernel", kernel_path)?;
    let initrd = initrd_path.map(|p| read("initrd", p)).transpose()?;
    let mem = ram.len();
    // Placement: the kernel at its text offset, the DTB in the top 64 KiB,
    // the initrd page-aligned just below it.
    let (kernel_end, image) = match parse_image_header(&kernel) {
        Some((text_offset, size)) => (text_offset + size, Some(text_offset)),
        None if kernel.starts_with(b"\x7fELF") => (0, None),
        None => return Err(BootError::NotAKernel { path: kernel_path.display().to_string() }),
    };
    let dtb_off = mem.checked_sub(FDT_MAX_SIZE).ok_or(BootError::TooLittleMemory {
        what: "the device tree",
        need: FDT_MAX_SIZE,
        have: mem,
    })?;
    let initrd_range = match &initrd {
        Some(bytes) => {
            let len = bytes.len() as u64;
            let start = dtb_off.checked_sub(len).map(|s| s & !(PAGE - 1));
            match start {
                Some(s) if s >= kernel_end => Some((RAM_BASE + s, RAM_BASE + s + len)),
                _ => {
                    return Err(BootError::TooLittleMemory {
                        what: "kernel + initrd + device tree",
                        need: kernel_end + len + FDT_MAX_SIZE,
                        have: mem,
                    })
                }
            }
        }
        None if kernel_end > dtb_off => {
            return Err(BootError::TooLittleMemory {
                what: "kernel + device tree",
                need: kernel_end + FDT_MAX_SIZE,
                have: mem,
            })
        }
        None => None,
    };
    let dtb = fdt::build(&FdtConfig {
        mem_bytes: mem,
        bootargs: bootargs.to_string(),
        initrd: initrd_range,
        rng_seed: rng_seed.map(<[u8]>::to_vec),
        virtio_slots,
    })
    .map_err(BootError::Fdt)?;
    let entry = match image {
        Some(text_offset) => {
            ram.write(RAM_BASE + text_offset, &kernel);
            RAM_BASE + text_offset
        }
        None => loader::load_elf_bytes(&kernel_path.display().to_string(), &kernel, ram)?.entry,
    };
    if let (Some(bytes), Some((start, _))) = (&initrd, initrd_range) {
        ram.write(start, bytes);
    }
    let dtb_addr = RAM_BASE + dtb_off;
    ram.write(dtb_addr, &dtb);
    Ok(BootInfo { entry, dtb: dtb_addr, initrd: initrd_range })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(text_offset: u64, size: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        v[8..16].copy_from_slice(&text_offset.to_le_bytes());
        v[16..24].copy_from_slice(&(size as u64).to_le_bytes());
        v[56..60].copy_from_slice(IMAGE_MAGIC2);
        v
    }

    #[test]
    fn image_header_is_recognised() {
        assert_eq!(parse_image_header(&fake_image(0x20_0000, 4096)), Some((0x20_0000, 4096)));
        assert_eq!(parse_image_header(&[0u8; 100]), None);
        assert_eq!(parse_image_header(b"short"), None);
    }

    #[test]
    fn placement_and_too_little_memory() {
        let dir = std::env::temp_dir().join(format!("lockstep-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("Image");
        let i = dir.join("initrd");
        std::fs::write(&k, fake_image(0x20_0000, 0x10_0000)).unwrap();
        std::fs::write(&i, vec![7u8; 0x3000]).unwrap();
        let mut ram = Ram::new(RAM_BASE, 8 << 20);
        let info = load(&mut ram, &k, Some(&i), "console=ttyS0", None, 0).unwrap();
        assert_eq!(info.entry, RAM_BASE + 0x20_0000);
        assert_eq!(info.dtb, RAM_BASE + (8 << 20) - FDT_MAX_SIZE);
        let (s, e) = info.initrd.unwrap();
        assert_eq!(e - s, 0x3000);
        assert!(e <= info.dtb && s % 4096 == 0);
        // 3 MiB cannot hold a 1 MiB kernel at 2 MiB plus a 2 MiB initrd.
        std::fs::write(&i, vec![7u8; 2 << 20]).unwrap();
        let mut small = Ram::new(RAM_BASE, 3 << 20);
        let e = load(&mut small, &k, Some(&i), "", None, 0).unwrap_err();
        assert!(matches!(e, BootError::TooLittleMemory { .. }), "{e}");
        assert!(small.bytes().iter().all(|&b| b == 0), "nothing written");
        // Garbage is not a kernel.
        std::fs::write(&k, b"not a kernel at all, just some text padding it out to 64 bytes......").unwrap();
        assert!(matches!(load(&mut ram, &k, None, "", None, 0), Err(BootError::NotAKernel { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
