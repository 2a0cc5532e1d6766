//! `lockstep guest build`: the default guest, from Debian trixie riscv64
//! packages fetched with a private apt configuration (its own state, cache
//! and sources; the host's apt setup is never touched).
//!
//! Result, under the cache directory (`$LOCKSTEP_CACHE`, else
//! `$XDG_CACHE_HOME/lockstep`, else `~/.cache/lockstep`, else a directory
//! under the system's temporary directory):
//! ```text
//!  guest/Image            the distribution kernel (flat RISC-V Image)
//!  guest/initramfs.cpio   busybox-static + /init (uncompressed newc cpio)
//!  guest/VERSION          the recipe and package versions; a guest is
//!                         reused only if its recipe is the current one
//! ```
//! The build is idempotent: a finished guest is reused; a half-finished one
//! is built again from its downloads.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const SUITE: &str = "trixie";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Printed by /init once the guest is up; tests wait for it.
pub const READY_LINE: &str = "lockstep-guest: ready";
/// Kernel command line of the default guest (`lockstep.run=` chooses the
/// workload: `shell` (default) or `poweroff`).
/// - `cryptomgr.notests` skips the crypto self-tests the Debian kernel runs
///   at boot (0.46 G of its 1.19 G boot instructions).
/// - `initcall_blacklist=jent_mod_init` leaves out the CPU-jitter entropy
///   source: in a deterministic machine its "jitter" is a function of the
///   instruction count, so it yields no entropy, and its start-up tests
///   spin long on our regular clock. The guest's entropy comes from the
///   device tree's rng-seed (host random bytes, an input replay logs).
pub const DEFAULT_APPEND: &str = "console=ttyS0 quiet cryptomgr.notests initcall_blacklist=jent_mod_init";

/// The guest recipe's version: a cached guest built by another recipe is
/// rebuilt. Bump it whenever what goes into the guest changes.
const RECIPE: &str = "lockstep-guest-recipe 2 (busybox initramfs, virtio_mmio virtio_blk virtio-rng)";

/// The built guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("LOCKSTEP_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("lockstep"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache/lockstep")),
        None => Ok(std::env::temp_dir().join("lockstep-cache")),
    }
}

/// The guest if it is built.
pub fn existing() -> Result<Option<Guest>> {
    let dir = cache_dir()?.join("guest");
    let current = std::fs::read_to_string(dir.join("VERSION")).is_ok_and(|v| v.lines().next() == Some(RECIPE));
    Ok(current.then(|| Guest { kernel: dir.join("Image"), initrd: dir.join("initramfs.cpio") }))
}

/// The Debian mirror: `$LOCKSTEP_DEBIAN_MIRROR`, else the first Debian
/// archive URI in the host's own apt sources (read, never changed).
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("LOCKSTEP_DEBIAN_MIRROR") {
        return Ok(m.trim_end_matches('/').to_string());
    }
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "list" || e == "sources") {
                texts.push(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    for text in texts {
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            for word in line.split_whitespace() {
                if (word.starts_with("http://") || word.starts_with("https://"))
                    && word.trim_end_matches('/').ends_with("/debian")
                {
                    return Ok(word.trim_end_matches('/').to_string());
                }
            }
        }
    }
    bail!("no Debian mirror found in the host's apt sources; set LOCKSTEP_DEBIAN_MIRROR to one")
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        bail!("{what} failed: {last}");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Apt {
    conf: PathBuf,
    lists: PathBuf,
    mirror: String,
}

impl Apt {
    fn setup(root: &Path) -> Result<Apt> {
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing: install the debian-archive-keyring package");
        }
        let mirror = mirror()?;
        for d in ["state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let status = root.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let r = root.display();
        std::fs::write(
            root.join("sources.list"),
            format!("deb [arch=riscv64 signed-by={KEYRING}] {mirror} {SUITE} main\n"),
        )?;
        let conf = root.join("apt.conf");
        std::fs::write(
            &conf,
            format!(
                "APT::Architecture \"riscv64\";\nAPT::Architectures {{ \"riscv64\"; }};\n\
                 Dir::State \"{r}/state\";\nDir::State::status \"{r}/state/status\";\n\
                 Dir::Cache \"{r}/cache\";\nDir::Etc::SourceList \"{r}/sources.list\";\n\
                 Dir::Etc::SourceParts \"{r}/sources.list.d\";\nDir::Etc::PreferencesParts \"{r}/preferences.d\";\n\
                 Acquire::Languages \"none\";\nAPT::Sandbox::User \"root\";\n"
            ),
        )?;
        Ok(Apt { conf, lists: root.join("state/lists"), mirror })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("APT_CONFIG", &self.conf).env("LC_ALL", "C");
        c
    }

    /// apt's file name for a URL in its lists directory.
    fn list_name(&self, url: &str) -> String {
        let no_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        no_scheme.replace('/', "_")
    }

    /// `apt-get update`; if the mirror's riscv64 index does not match its
    /// signed Release file (some mirrors serve that), fetch InRelease and
    /// Packages.xz directly into the lists directory and warn. apt still
    /// checks every .deb against that index.
    fn update(&self) -> Result<()> {
        if run(self.cmd("apt-get").args(["-q", "update"]), "apt-get update").is_ok() && self.has_index()? {
            return Ok(());
        }
        eprintln!(
            "lockstep: warning: apt-get update rejected the mirror's riscv64 index; \
             fetching it directly (the .deb files are still checked against it)"
        );
        let base = format!("{}/dists/{SUITE}", self.mirror);
        let inrelease = self.lists.join(self.list_name(&format!("{base}/InRelease")));
        let packages = self.lists.join(self.list_name(&format!("{base}/main/binary-riscv64/Packages")));
        let xz = self.lists.join("partial/Packages.xz");
        for (url, dest) in
            [(format!("{base}/InRelease"), &inrelease), (format!("{base}/main/binary-riscv64/Packages.xz"), &xz)]
        {
            run(
                Command::new("/usr/lib/apt/apt-helper").arg("download-file").arg(&url).arg(dest),
                &format!("downloading {url}"),
            )?;
        }
        let out = run(Command::new("xz").arg("-dc").arg(&xz), "xz -d Packages.xz")?;
        let tmp = packages.with_extension("tmp");
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, &packages)?;
        Ok(())
    }

    fn has_index(&self) -> Result<bool> {
        Ok(std::fs::read_dir(&self.lists)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("binary-riscv64_Packages")))
    }

    /// The versioned package behind `linux-image-riscv64`.
    fn kernel_package(&self) -> Result<String> {
        let out =
            run(self.cmd("apt-cache").args(["show", "linux-image-riscv64"]), "apt-cache show linux-image-riscv64")?;
        out.lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .and_then(|d| d.split([',', ' ', '(']).find(|w| w.starts_with("linux-image-")))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("linux-image-riscv64 names no kernel package"))
    }

    fn download(&self, dir: &Path, pkgs: &[&str]) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let have = |p: &str| {
            std::fs::read_dir(dir)
                .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&format!("{p}_"))))
                .unwrap_or(false)
        };
        let pkgs: Vec<&str> = pkgs.iter().copied().filter(|p| !have(p)).collect();
        if pkgs.is_empty() {
            return Ok(());
        }
        run(self.cmd("apt-get").current_dir(dir).args(["-q", "download"]).args(&pkgs), "apt-get download")?;
        Ok(())
    }
}

fn find_file(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, pred) {
                return Some(f);
            }
        } else if pred(&e.file_name().to_string_lossy()) {
            return Some(p);
        }
    }
    None
}

/// Kernel modules the default guest loads, in dependency order.
const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio-rng"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
run=shell
for arg in $(cat /proc/cmdline); do
  case "$arg" in lockstep.run=*) run="${arg#lockstep.run=}" ;; esac
done
echo "lockstep-guest: ready"
case "$run" in
  poweroff) poweroff -f ;;
esac
# virtio drivers are modules in Debian's kernel.
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
# busybox poweroff/reboot/halt signal PID 1: act on them while the shell runs.
trap 'poweroff -f' USR2
trap 'reboot -f' TERM
trap 'halt -f' USR1
setsid cttyhack sh &
while kill -0 $! 2>/dev/null; do wait $!; done
poweroff -f
"#;

/// Build (or reuse) the default guest.
pub fn build(force: bool) -> Result<Guest> {
    if !force {
        if let Some(g) = existing()? {
            return Ok(g);
        }
    }
    let cache = cache_dir()?;
    eprintln!("lockstep: building the default guest in {} (Debian {SUITE} riscv64)", cache.display());
    let apt = Apt::setup(&cache.join("apt"))?;
    apt.update()?;
    let kpkg = apt.kernel_package()?;
    let debs = cache.join("debs");
    apt.download(&debs, &[&kpkg, "busybox-static"])?;
    let extract = cache.join("extract");
    let _ = std::fs::remove_dir_all(&extract);
    std::fs::create_dir_all(&extract)?;
    let mut versions = format!("{RECIPE}\n");
    for e in std::fs::read_dir(&debs)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && (name.starts_with(&format!("{kpkg}_")) || name.starts_with("busybox-static_")) {
            run(Command::new("dpkg-deb").arg("-x").arg(e.path()).arg(&extract), &format!("dpkg-deb -x {name}"))?;
            versions.push_str(&name);
            versions.push('\n');
        }
    }
    let kernel = find_file(&extract.join("boot"), &|n| n.starts_with("vmlinux-") || n.starts_with("vmlinuz-"))
        .context("the kernel package has no /boot/vmlinux-* or /boot/vmlinuz-*")?;
    let busybox = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|p| extract.join(p))
        .find(|p| p.exists())
        .context("busybox-static has no busybox binary")?;
    // Build into a fresh directory, then swap it in.
    let out = cache.join("guest.new");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::copy(&kernel, out.join("Image"))?;
    let mut cpio = crate::cpio::Writer::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root", "etc"] {
        cpio.dir(d);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.char_device("dev/null", 1, 3);
    cpio.file("bin/busybox", 0o755, &std::fs::read(&busybox)?);
    cpio.file("init", 0o755, INIT.as_bytes());
    // The virtio modules the board's devices need, decompressed (busybox
    // insmod cannot read .ko.xz), in load order.
    cpio.dir("lib");
    cpio.dir("lib/modules");
    for (i, name) in GUEST_MODULES.iter().enumerate() {
        let file = find_file(&extract, &|n| n == format!("{name}.ko.xz") || n == format!("{name}.ko"))
            .with_context(|| format!("the kernel package has no module {name}"))?;
        let bytes = if file.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").arg("-dc").arg(&file).output().context("cannot run xz")?;
            if !out.status.success() {
                bail!("xz -d {} failed", file.display());
            }
            out.stdout
        } else {
            std::fs::read(&file)?
        };
        cpio.file(&format!("lib/modules/{i:02}-{name}.ko"), 0o644, &bytes);
    }
    std::fs::write(out.join("initramfs.cpio"), cpio.finish())?;
    std::fs::write(out.join("VERSION"), versions)?;
    let guest_dir = cache.join("guest");
    let _ = std::fs::remove_dir_all(&guest_dir);
    std::fs::rename(&out, &guest_dir)?;
    eprintln!("lockstep: default guest ready: {}", guest_dir.display());
    Ok(Guest { kernel: guest_dir.join("Image"), initrd: guest_dir.join("initramfs.cpio") })
}
