//! The VM description, `vm.toml` (DESIGN.md): its keys are the long flag
//! names of `lockstep run`; relative paths are relative to the file; a flag
//! on the command line overrides the file; an unknown key is an error that
//! names it.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `mem` may be a size string ("512M") or a number of bytes.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum MemValue {
    Text(String),
    Bytes(u64),
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmFile {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub elf: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    pub disk_readonly: Option<bool>,
    pub mem: Option<MemValue>,
    pub max_insns: Option<u64>,
    pub net: Option<String>,
    pub mac: Option<String>,
    pub record: Option<PathBuf>,
    pub hash_every: Option<u64>,
    pub snapshot_every: Option<u64>,
    // Pair settings (`lockstep primary` / `secondary`).
    pub peer: Option<String>,
    pub listen: Option<String>,
    pub arbiter: Option<String>,
    pub metrics: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_lag: Option<u64>,
}

impl VmFile {
    /// Read `path`, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<VmFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VM description '{}'", path.display()))?;
        let mut vm: VmFile = toml::from_str(&text).map_err(|e| {
            // toml's message spans lines (it quotes the source): keep one line.
            let msg = e.message().to_string();
            anyhow::anyhow!("'{}': {msg}", path.display())
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut vm.kernel, &mut vm.initrd, &mut vm.elf, &mut vm.disk, &mut vm.record].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_paths_and_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("lockstep-vmfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(
            &f,
            "kernel = \"Image\"\ninitrd = \"/abs/initrd\"\nappend = \"console=ttyS0\"\nmem = \"256M\"\nmax-insns = 5\n",
        )
        .unwrap();
        let vm = VmFile::load(&f).unwrap();
        assert_eq!(vm.kernel, Some(dir.join("Image")));
        assert_eq!(vm.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(vm.mem, Some(MemValue::Text("256M".into())));
        assert_eq!(vm.max_insns, Some(5));
        std::fs::write(&f, "kernel = \"Image\"\nbogus-key = 1\n").unwrap();
        let e = VmFile::load(&f).unwrap_err().to_string();
        assert!(e.contains("bogus-key") && !e.contains('\n'), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
