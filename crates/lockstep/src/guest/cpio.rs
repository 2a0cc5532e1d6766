//! A writer for the "newc" cpio format the kernel unpacks as an initramfs
//! (Linux `Documentation/driver-api/early-userspace/buffer-format.rst`).
//! Written here so that device nodes need no root and the archive is
//! byte-for-byte reproducible (all times are zero).
//!
//! Each entry: the ASCII header `070701` and thirteen 8-digit hex fields
//! (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
//! rdevmajor, rdevminor, namesize, check), the name with its NUL, padding to
//! 4 bytes, the data, padding to 4 bytes. A `TRAILER!!!` entry ends it.

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

pub struct Writer {
    out: Vec<u8>,
    ino: u32,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { out: Vec::new(), ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields =
            [self.ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut w = Writer::new();
        w.dir("bin");
        w.file("init", 0o755, b"#!/bin/sh\n");
        w.char_device("dev/console", 5, 1);
        let a = w.finish();
        assert_eq!(a.len() % 4, 0);
        // Walk the archive as the kernel does.
        let mut off = 0;
        let mut names = Vec::new();
        while off < a.len() {
            assert_eq!(&a[off..off + 6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[off + 6 + 8 * i..off + 14 + 8 * i]).unwrap(), 16).unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (field(1), field(6), field(9), field(10), field(11));
            let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize as usize - 1]).unwrap().to_string();
            if name == "dev/console" {
                assert_eq!((mode & 0o170000, rmaj, rmin), (S_IFCHR, 5, 1));
            }
            let data_start = (off + 110 + namesize as usize).div_ceil(4) * 4;
            if name == "init" {
                assert_eq!(&a[data_start..data_start + size as usize], b"#!/bin/sh\n");
            }
            names.push(name);
            off = (data_start + size as usize).div_ceil(4) * 4;
        }
        assert_eq!(names, ["bin", "init", "dev/console", "TRAILER!!!"]);
    }
}
