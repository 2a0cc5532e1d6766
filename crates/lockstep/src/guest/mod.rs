//! `lockstep guest build`: the default guest, from Debian trixie riscv64
//! packages fetched with a private apt configuration (its own state, cache
//! and sources; the host's apt setup is never touched).
//!
//! Result, under the cache directory (`$LOCKSTEP_CACHE`, else
//! `$XDG_CACHE_HOME/lockstep`, else `~/.cache/lockstep`, else a directory
//! under the system's temporary directory):
//! ```text
//!  guest/Image            the distribution kernel (flat RISC-V Image)
//!  guest/initramfs.cpio   busybox-static + /init + the virtio and ext4
//!                         modules (uncompressed newc cpio); with `root=`
//!                         on the command line /init mounts that disk and
//!                         switches to its /sbin/lockstep-init
//!  guest/rootfs.ext4      the root disk (sparse, 1 GiB, label
//!                         lockstep-root): the Depends/Pre-Depends closure
//!                         of busybox, redis-server, mini-httpd, iperf3 and
//!                         ioping, and /sbin/lockstep-init, which starts
//!                         redis-server (6379) and mini_httpd (80)
//!  guest/VERSION          the recipe and package versions; a guest is
//!                         reused only if its recipe is the current one
//! ```
//! The build is idempotent: a finished guest is reused; a half-finished one
//! is built again from its downloads, which are kept (with the package
//! index) so that a rebuild works offline.

mod cpio;

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const SUITE: &str = "trixie";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Printed once the guest is up (by the initramfs's /init without a root
/// disk; by the root disk's /sbin/lockstep-init once redis-server answers
/// PING); tests wait for it.
pub const READY_LINE: &str = "lockstep-guest: ready";
/// Kernel command line of the default guest (`lockstep.run=` chooses the
/// workload: `shell` (default) or `poweroff`; `root=/dev/vda`, which `run`
/// adds with the root disk, boots from it; on the root disk
/// `lockstep.ip=ADDR/PREFIX` and `lockstep.gw=GW` configure eth0).
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
const RECIPE: &str = "lockstep-guest-recipe 3 (busybox initramfs with virtio and ext4 modules, \
                      ext4 root disk: redis-server mini-httpd iperf3 ioping, /sbin/lockstep-init)";

/// The root disk's packages: apt installs their Depends and Pre-Depends
/// (not Recommends) closure. mini-httpd is the HTTP server: trixie has no
/// darkhttpd for riscv64.
const ROOTFS_PACKAGES: &[&str] = &["busybox", "redis-server", "mini-httpd", "iperf3", "ioping"];
/// The root disk's size (a sparse file: unused blocks take no host space).
const ROOTFS_SIZE: u64 = 1 << 30;
const ROOTFS_LABEL: &str = "lockstep-root";
/// Left out of the root disk to keep it small.
/// (gconv: glibc's iconv modules for charsets beyond the built-in ones.)
const ROOTFS_SKIP: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/doc-base",
    "usr/lib/riscv64-linux-gnu/gconv",
];

/// The built guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The root disk (ext4), the default guest's /dev/vda.
    pub disk: PathBuf,
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
    let g = Guest { kernel: dir.join("Image"), initrd: dir.join("initramfs.cpio"), disk: dir.join("rootfs.ext4") };
    Ok((current && [&g.kernel, &g.initrd, &g.disk].iter().all(|p| p.is_file())).then_some(g))
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

    /// Refresh the package index; offline, a cached index is used as it is
    /// (with a warning), so that a guest can be rebuilt from its downloads.
    fn update(&self) -> Result<()> {
        let cached = self.has_index()?;
        match self.fetch_index() {
            Err(e) if cached => {
                eprintln!("lockstep: warning: cannot refresh the package index ({e:#}); using the cached one");
                Ok(())
            }
            r => r,
        }
    }

    /// `apt-get update`; if the mirror's riscv64 index does not match its
    /// signed Release file (some mirrors serve that), fetch InRelease and
    /// Packages.xz directly into the lists directory and warn. apt still
    /// checks every .deb against that index.
    fn fetch_index(&self) -> Result<()> {
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

/// A package as apt resolved it.
struct Deb {
    name: String,
    version: String,
    arch: String,
}

impl Deb {
    /// The file name `apt-get download` gives it.
    fn file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.name, self.version.replace(':', "%3a"), self.arch)
    }
}

impl Apt {
    /// The packages `apt-get install --no-install-recommends pkgs` would
    /// install on an empty system (the private status file is empty): the
    /// Depends and Pre-Depends closure, with apt's choices for alternatives
    /// and virtual packages. Sorted by name; a function of the index alone.
    fn resolve(&self, pkgs: &[&str]) -> Result<Vec<Deb>> {
        let out = run(
            self.cmd("apt-get").args(["-s", "-q", "install", "--no-install-recommends"]).args(pkgs),
            "apt-get -s install (resolving the root disk's packages)",
        )?;
        let mut debs = parse_simulation(&out)?;
        if debs.is_empty() {
            bail!("apt-get -s install {} selected no packages", pkgs.join(" "));
        }
        debs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(debs)
    }

    /// Download the exact versions that are not in `dir` yet; the paths of
    /// all of them.
    fn fetch(&self, dir: &Path, debs: &[Deb]) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let missing: Vec<String> = debs
            .iter()
            .filter(|d| !dir.join(d.file_name()).is_file())
            .map(|d| format!("{}={}", d.name, d.version))
            .collect();
        if !missing.is_empty() {
            run(self.cmd("apt-get").current_dir(dir).args(["-q", "download"]).args(&missing), "apt-get download")?;
        }
        debs.iter()
            .map(|d| {
                let p = dir.join(d.file_name());
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(anyhow!("apt-get download left no {} in {}", d.file_name(), dir.display()))
                }
            })
            .collect()
    }
}

/// The `Inst NAME (VERSION ARCHIVES [ARCH])` lines of `apt-get -s install`.
fn parse_simulation(out: &str) -> Result<Vec<Deb>> {
    let mut debs = Vec::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("Inst ") else { continue };
        let bad = || anyhow!("cannot parse apt-get's line '{line}'");
        let name = rest.split_whitespace().next().ok_or_else(bad)?;
        let inside = rest.split_once('(').and_then(|(_, r)| r.split_once(')')).map(|(i, _)| i).ok_or_else(bad)?;
        let version = inside.split_whitespace().next().ok_or_else(bad)?;
        let arch =
            inside.split_whitespace().last().and_then(|w| w.strip_prefix('[')?.strip_suffix(']')).ok_or_else(bad)?;
        debs.push(Deb { name: name.to_string(), version: version.to_string(), arch: arch.to_string() });
    }
    Ok(debs)
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

/// Kernel modules the default guest loads; each comes with its
/// dependencies, first, as the host's kmod orders them. The initramfs's
/// /init loads these always (/lib/modules/*.ko) ...
const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "virtio-rng"];
/// ... and these only to mount a root disk (/lib/modules/root/*.ko).
const ROOT_MODULES: &[&str] = &["ext4"];

/// The initramfs's /init (busybox-static). Without `root=` on the kernel
/// command line the guest lives in the initramfs; with `root=DEVICE` it
/// mounts that ext4 disk and hands over to its /sbin/lockstep-init.
const INIT: &str = include_str!("files/init.sh");

/// The root disk's init, PID 1 after the initramfs's switch_root.
const ROOT_INIT: &str = include_str!("files/lockstep-init.sh");

/// redis-server's configuration on the root disk (instead of the Debian
/// package's): every write is on the disk before it is acknowledged.
const REDIS_CONF: &str = include_str!("files/redis.conf");

/// Files of the root disk beside the packages': (path, mode, contents).
const ROOTFS_FILES: &[(&str, u32, &str)] = &[
    ("usr/sbin/lockstep-init", 0o755, ROOT_INIT),
    ("etc/redis/redis.conf", 0o644, REDIS_CONF),
    (
        "etc/passwd",
        0o644,
        "root:x:0:0:root:/root:/bin/sh\n\
         daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    ),
    ("etc/group", 0o644, "root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n"),
    ("etc/nsswitch.conf", 0o644, "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"),
    ("etc/hostname", 0o644, "lockstep\n"),
    ("etc/hosts", 0o644, "127.0.0.1\tlocalhost\n127.0.1.1\tlockstep\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    (
        "srv/www/index.html",
        0o644,
        "<!DOCTYPE html>\n<html><head><title>lockstep</title></head>\
         <body><p>lockstep guest</p></body></html>\n",
    ),
];

/// Directories of the root disk beside the packages', with their modes.
const ROOTFS_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("var/tmp", 0o1777),
    ("root", 0o700),
    ("mnt", 0o755),
    ("srv/www", 0o755),
    ("var/lib/redis", 0o750),
    ("var/log/redis", 0o750),
    ("var/lib/lockstep", 0o755),
];

/// A host program, looked up in PATH and the sbin directories (which a
/// non-root PATH often leaves out).
fn host_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Make sure the host has `tools`; as root, install `package` with the
/// host's apt when one is missing (`why` says what they are for).
pub fn ensure_host_tools(tools: &[&str], package: &str, why: &str) -> Result<Vec<PathBuf>> {
    let find = || tools.iter().map(|t| host_tool(t)).collect::<Option<Vec<_>>>();
    if let Some(found) = find() {
        return Ok(found);
    }
    let names = tools.join(", ");
    if !is_root() {
        bail!("{names} missing: install {package} ({why})");
    }
    eprintln!("lockstep: installing the host's {package} package ({why})");
    let install = || {
        run(
            Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["-q", "-y", "install", package]),
            &format!("apt-get install {package}"),
        )
    };
    if install().is_err() {
        run(Command::new("apt-get").args(["-q", "update"]), "apt-get update")?;
        install()?;
    }
    find().with_context(|| format!("{names} still missing after installing {package}"))
}

/// The host's depmod and modprobe (kmod).
fn kmod_tools() -> Result<(PathBuf, PathBuf)> {
    let t = ensure_host_tools(&["depmod", "modprobe"], "kmod", "depmod and modprobe order the guest's kernel modules")?;
    Ok((t[0].clone(), t[1].clone()))
}

/// The module files each group of `groups` needs, dependencies (and soft
/// pre-dependencies) first, each file once (in the first group that needs
/// it): `depmod` on the extracted kernel package, then `modprobe
/// --show-depends` for each module.
fn module_order(extract: &Path, groups: &[&[&str]]) -> Result<Vec<Vec<PathBuf>>> {
    let (depmod, modprobe) = kmod_tools()?;
    // trixie installs modules in /usr/lib/modules; kmod looks in /lib/modules.
    let lib = extract.join("lib");
    if !lib.exists() {
        std::os::unix::fs::symlink("usr/lib", &lib)?;
    }
    let mut versions: Vec<String> = std::fs::read_dir(lib.join("modules"))
        .context("the kernel package has no /usr/lib/modules")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    let [version] = &versions[..] else {
        bail!("the kernel package has {} module trees, not one: {}", versions.len(), versions.join(" "))
    };
    run(Command::new(&depmod).arg("-b").arg(extract).arg(version), "depmod")?;
    // An empty configuration: the host's /etc/modprobe.d is not the guest's.
    let conf = extract.join("lockstep-modprobe.d");
    std::fs::create_dir_all(&conf)?;
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for mods in groups {
        let mut order = Vec::new();
        for m in *mods {
            let deps = run(
                Command::new(&modprobe)
                    .arg("-d")
                    .arg(extract)
                    .args(["-S", version])
                    .arg("-C")
                    .arg(&conf)
                    .args(["--show-depends", m]),
                &format!("modprobe --show-depends {m}"),
            )?;
            for line in deps.lines() {
                if let Some(path) = line.strip_prefix("insmod ").and_then(|r| r.split_whitespace().next()) {
                    let path = PathBuf::from(path);
                    if !seen.contains(&path) {
                        seen.push(path.clone());
                        order.push(path);
                    }
                }
            }
        }
        out.push(order);
    }
    Ok(out)
}

/// A module without its appended signature (`struct module_signature` and
/// the magic string end the file). The kernel checks a signature by
/// hashing the whole module, which costs ext4 (7 MB with its symbol table)
/// about a second of emulated time, while these modules come from packages
/// apt has already checked against the signed archive index; unsigned,
/// they load with the kernel tainted 'E'.
fn strip_signature(mut ko: Vec<u8>) -> Vec<u8> {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    let Some(end) = ko.len().checked_sub(MAGIC.len() + 12) else { return ko };
    if !ko.ends_with(MAGIC) {
        return ko;
    }
    let info = &ko[end..end + 12];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = sig_len + info[3] as usize + info[4] as usize;
    if let Some(len) = end.checked_sub(extra) {
        ko.truncate(len);
    }
    ko
}

/// A module's bytes, decompressed (busybox insmod cannot read .ko.xz).
fn module_bytes(file: &Path) -> Result<Vec<u8>> {
    if file.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz").arg("-dc").arg(file).output().context("cannot run xz")?;
        if !out.status.success() {
            bail!("xz -d {} failed", file.display());
        }
        Ok(out.stdout)
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

/// The root disk's tree in `dir`: the packages unpacked (no maintainer
/// scripts run) on merged-/usr symlinks, less documentation, plus
/// lockstep's files.
fn stage_rootfs(dir: &Path, debs: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(dir);
    for d in ["usr/bin", "usr/sbin", "usr/lib"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    for l in ["bin", "sbin", "lib"] {
        std::os::unix::fs::symlink(format!("usr/{l}"), dir.join(l))?;
    }
    for deb in debs {
        let name = deb.file_name().unwrap_or_default().to_string_lossy();
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir), &format!("dpkg-deb -x {name}"))?;
    }
    for l in ["bin", "sbin", "lib"] {
        if !dir.join(l).is_symlink() {
            bail!("a root disk package replaced the merged-/usr symlink /{l} with a directory");
        }
    }
    for d in ROOTFS_SKIP {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
    if !dir.join("lib/ld-linux-riscv64-lp64d.so.1").exists() {
        bail!("the root disk has no dynamic loader /lib/ld-linux-riscv64-lp64d.so.1");
    }
    if !dir.join("usr/bin/busybox").is_file() {
        bail!("the root disk has no /usr/bin/busybox");
    }
    if !dir.join("usr/bin/sh").exists() {
        std::os::unix::fs::symlink("busybox", dir.join("usr/bin/sh"))?;
    }
    for (d, mode) in ROOTFS_DIRS {
        let p = dir.join(d);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    // The wall clock's starting point (see ROOT_INIT).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    std::fs::write(dir.join("var/lib/lockstep/clock"), format!("{now}\n"))?;
    for (path, mode, text) in ROOTFS_FILES {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).with_context(|| format!("cannot write the root disk's /{path}"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// `out`: a sparse ext4 image of `tree`, made under a temporary name and
/// renamed when complete.
fn make_ext4(tree: &Path, out: &Path) -> Result<()> {
    let mkfs = host_tool("mkfs.ext4").context("mkfs.ext4 is missing: install e2fsprogs")?;
    let tmp = out.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::create(&tmp)
        .and_then(|f| f.set_len(ROOTFS_SIZE))
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    // The new file reads as zeros, so the journal needs no zeroing: its
    // blocks stay holes.
    run(
        Command::new(mkfs)
            .args(["-q", "-F", "-L", ROOTFS_LABEL, "-E", "lazy_journal_init=1", "-d"])
            .arg(tree)
            .arg(&tmp),
        "mkfs.ext4 (the root disk)",
    )?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

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
    let root_debs = apt.resolve(ROOTFS_PACKAGES)?;
    let root_files = apt.fetch(&debs, &root_debs)?;
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
    versions.push_str(&format!("root disk ({} packages):\n", root_debs.len()));
    for d in &root_debs {
        versions.push_str(&d.file_name());
        versions.push('\n');
    }
    let kernel = find_file(&extract.join("boot"), &|n| n.starts_with("vmlinux-") || n.starts_with("vmlinuz-"))
        .context("the kernel package has no /boot/vmlinux-* or /boot/vmlinuz-*")?;
    let busybox = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|p| extract.join(p))
        .find(|p| p.exists())
        .context("busybox-static has no busybox binary")?;
    let modules = module_order(&extract, &[GUEST_MODULES, ROOT_MODULES])?;
    // Build into a fresh directory, then swap it in.
    let out = cache.join("guest.new");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::copy(&kernel, out.join("Image"))?;
    let mut cpio = cpio::Writer::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root", "etc"] {
        cpio.dir(d);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.char_device("dev/null", 1, 3);
    // The modules, decompressed and unsigned, named so that the shell's
    // glob sorts them in load order.
    cpio.dir("lib");
    cpio.dir("lib/modules");
    cpio.dir("lib/modules/root");
    for (dir, files) in ["lib/modules", "lib/modules/root"].iter().zip(&modules) {
        for (i, file) in files.iter().enumerate() {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let name = name.trim_end_matches(".xz").trim_end_matches(".ko");
            cpio.file(&format!("{dir}/{i:02}-{name}.ko"), 0o644, &strip_signature(module_bytes(file)?));
        }
    }
    // busybox and /init last: an archive cut short anywhere has no /init,
    // and the kernel says so, rather than starting a guest without modules.
    cpio.file("bin/busybox", 0o755, &std::fs::read(&busybox)?);
    cpio.file("init", 0o755, INIT.as_bytes());
    std::fs::write(out.join("initramfs.cpio"), cpio.finish())?;
    let staging = cache.join("rootfs");
    stage_rootfs(&staging, &root_files)?;
    make_ext4(&staging, &out.join("rootfs.ext4"))?;
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::write(out.join("VERSION"), versions)?;
    let guest_dir = cache.join("guest");
    let _ = std::fs::remove_dir_all(&guest_dir);
    std::fs::rename(&out, &guest_dir)?;
    eprintln!("lockstep: default guest ready: {}", guest_dir.display());
    Ok(Guest {
        kernel: guest_dir.join("Image"),
        initrd: guest_dir.join("initramfs.cpio"),
        disk: guest_dir.join("rootfs.ext4"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_simulation_lines_name_the_files_apt_downloads() {
        let out = "Reading package lists...\n\
                   Inst libc6 (2.41-12+deb13u4 Debian:13.8/stable [riscv64]) []\n\
                   Inst init-system-helpers (1.69~deb13u1 Debian:13.8/stable [all])\n\
                   Inst busybox (1:1.37.0-6+b9 Debian:13.8/stable [riscv64])\n\
                   Conf busybox (1:1.37.0-6+b9 Debian:13.8/stable [riscv64])\n";
        let debs = parse_simulation(out).unwrap();
        let names: Vec<String> = debs.iter().map(Deb::file_name).collect();
        assert_eq!(
            names,
            [
                "libc6_2.41-12+deb13u4_riscv64.deb",
                "init-system-helpers_1.69~deb13u1_all.deb",
                "busybox_1%3a1.37.0-6+b9_riscv64.deb"
            ]
        );
        assert!(parse_simulation("Inst broken\n").is_err());
    }

    #[test]
    fn module_signatures_are_cut_off() {
        let body = b"\x7fELF module body".to_vec();
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xaa; 7]); // the PKCS#7 signature
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 7]); // struct module_signature
        signed.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(strip_signature(signed), body);
        assert_eq!(strip_signature(body.clone()), body, "an unsigned module stays as it is");
        let mut bogus = b"x".to_vec();
        bogus.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        bogus.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(strip_signature(bogus.clone()), bogus, "a signature longer than the file is left alone");
    }
}
