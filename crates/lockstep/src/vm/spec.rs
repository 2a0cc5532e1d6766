//! The VM description: one definition for `run`'s flags, the pair's flags
//! and `vm.toml` (DESIGN.md). A field of [`VmSpec`] or [`PairSpec`] is at
//! once a long flag (clap) and a file key (serde, kebab-case), so adding a
//! setting is one edit here. Relative paths in a file are relative to the
//! file; a flag on the command line overrides the file's value; an unknown
//! key is an error that names it, and so is a pair key given to `run`.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// What makes the machine and how one run of it behaves.
#[derive(clap::Args, Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmSpec {
    /// Bare-metal ELF: hart 0 starts in M-mode at its entry; the run ends
    /// when the program writes its `tohost` symbol.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "append"])]
    pub elf: Option<PathBuf>,
    /// Linux kernel: a flat RISC-V `Image` (as Debian ships it) or an ELF.
    #[arg(long, value_name = "IMAGE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: `console=ttyS0`, and for the default
    /// guest `console=ttyS0 quiet`).
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Stop with an error after this many instructions.
    #[arg(long, value_name = "N")]
    pub max_insns: Option<u64>,
    /// Raw disk image, the guest's /dev/vda (virtio-blk).
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Attach the disk read-only.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub disk_readonly: Option<bool>,
    /// Guest RAM size, e.g. 512M or 1G (default 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "size_key")]
    pub mem: Option<u64>,
    /// Network card (virtio-net) on a host tap device, created if missing:
    /// `tap:NAME`.
    #[arg(long, value_name = "tap:NAME")]
    pub net: Option<String>,
    /// The network card's MAC address (default: derived from the tap name,
    /// stable across runs).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,
    /// Record the run's non-deterministic inputs to this event log (replay
    /// it with `lockstep replay LOG`).
    #[arg(long, value_name = "LOG", conflicts_with = "elf")]
    pub record: Option<PathBuf>,
    /// Print the machine's state hash every N positions (and record it in
    /// the log, where replay checks it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "elf")]
    pub hash_every: Option<u64>,
    /// With --record: snapshot the machine every N positions into
    /// `LOG.snapshots/` (full, then dirty-page deltas); replay can start
    /// from any of them (`replay --from`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "elf")]
    pub snapshot_every: Option<u64>,
    /// How the CPU runs: `jit` translates hot code to host code (the
    /// default on x86-64), `interp` only interprets. Both give the same
    /// state at every instruction, so the two sides of a pair, or a
    /// recording and its replay, may use different engines.
    #[arg(long, value_name = "interp|jit")]
    pub engine: Option<rv::Engine>,
}

impl VmSpec {
    /// The settings that name files (resolved against a VM file's folder).
    fn paths_mut(&mut self) -> [&mut Option<PathBuf>; 5] {
        [&mut self.kernel, &mut self.initrd, &mut self.elf, &mut self.disk, &mut self.record]
    }
}

/// How a side of a fault-tolerant pair reaches its peer and decides.
#[derive(clap::Args, Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PairSpec {
    /// Primary: the secondary's log channel, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: Option<String>,
    /// Secondary: where to wait for the primary, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Who decides which side goes on alone: `file:PATH` (pairs on one
    /// host; default: a file for this VM in the state directory,
    /// `/var/lib/lockstep` for root) or
    /// `etcd:http://HOST:PORT`.
    #[arg(long, value_name = "SPEC")]
    pub arbiter: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/status` (JSON) on HOST:PORT
    /// (default 127.0.0.1:9540 for the primary, 9541 for the secondary,
    /// skipped with a warning if taken).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Heartbeat interval on the log channel.
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which the peer is lost (a secondary that answers but
    /// executes none of the log it holds is given up after four times this).
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// The primary waits while the secondary's execution lags by more than
    /// this many positions (bounds failover time; 1 position = 1 ns of
    /// guest time).
    #[arg(long, value_name = "N")]
    pub max_lag: Option<u64>,
    /// Authenticate the log channel with this key (the same file on both
    /// sides; `lockstep key new FILE` makes one).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Keep this side's copy of the pair's event log in DIR, with a copy of
    /// its disk replica as it was at pairing, for post-mortem `lockstep
    /// replay` (after a divergence, say). The log grows with every input.
    #[arg(long, value_name = "DIR")]
    pub keep_log: Option<PathBuf>,
    /// Network interfaces whose failure counts as this host losing the
    /// guest's network, besides the tap (comma-separated; the bridge's
    /// uplink, say): see `on-uplink-down`.
    #[arg(long, value_name = "IF[,IF...]")]
    pub uplink: Option<String>,
    /// When the primary's network (its tap or an `uplink`) is down for
    /// `uplink-grace-ms` and the secondary's is up: `switchover` (the
    /// default) moves the VM to the secondary, `ignore` waits.
    #[arg(long, value_name = "POLICY")]
    pub on_uplink_down: Option<crate::pair::policy::OnUplinkDown>,
    /// How long the network must be down before `on-uplink-down` acts
    /// (default 500).
    #[arg(long, value_name = "MS")]
    pub uplink_grace_ms: Option<u64>,
}

/// A VM description file, split into its machine and pair settings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VmFile {
    pub vm: VmSpec,
    pub pair: PairSpec,
}

impl VmFile {
    /// Read `path`, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<VmFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VM description '{}'", path.display()))?;
        let at = |e: String| anyhow!("'{}': {e}", path.display());
        let table: toml::Table = toml::from_str(&text).map_err(|e| at(one_line(e)))?;
        // A key belongs to the pair if `PairSpec` knows it; everything else
        // must be a machine key, or the machine's parse names it unknown.
        let (mut vm_keys, mut pair_keys) = (toml::Table::new(), toml::Table::new());
        for (key, value) in table {
            let mut probe = toml::Table::new();
            probe.insert(key.clone(), value.clone());
            match probe.try_into::<PairSpec>() {
                Err(e) if e.to_string().contains("unknown field") => vm_keys.insert(key, value),
                _ => pair_keys.insert(key, value),
            };
        }
        let mut pair: PairSpec = pair_keys.try_into().map_err(|e| at(one_line(e)))?;
        let mut vm: VmSpec = vm_keys.try_into().map_err(|e| {
            // serde lists the machine's keys only; the pair's are valid too.
            let msg = one_line(e);
            match msg.split_once(", expected one of") {
                Some((unknown, _)) if msg.starts_with("unknown field") => at(format!(
                    "{}: the keys are the long flag names of `lockstep run`, `primary` and `secondary`",
                    unknown.replace("field", "key")
                )),
                _ => at(msg),
            }
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in vm.paths_mut().into_iter().chain([&mut pair.key, &mut pair.keep_log]).flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(VmFile { vm, pair })
    }
}

/// toml's messages quote the source over several lines: keep the first.
fn one_line(e: toml::de::Error) -> String {
    e.message().lines().next().unwrap_or("invalid TOML").to_string()
}

/// `over`'s settings, with those it leaves out taken from `under`.
pub fn overlay<T: Serialize + DeserializeOwned>(over: T, under: T) -> Result<T> {
    let (serde_json::Value::Object(over), serde_json::Value::Object(mut merged)) =
        (serde_json::to_value(over)?, serde_json::to_value(under)?)
    else {
        bail!("a VM description is a table of settings");
    };
    for (key, value) in over {
        if !value.is_null() {
            merged.insert(key, value);
        }
    }
    Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
}

/// The name of the first setting `spec` gives, if any.
pub fn first_key<T: Serialize>(spec: &T) -> Result<Option<String>> {
    let serde_json::Value::Object(map) = serde_json::to_value(spec)? else { return Ok(None) };
    Ok(map.into_iter().find(|(_, v)| !v.is_null()).map(|(k, _)| k))
}

/// `mem` in a file: a size string ("512M") or a number of bytes.
fn size_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Text(String),
        Bytes(u64),
    }
    let text = match Option::<Size>::deserialize(d)? {
        None => return Ok(None),
        Some(Size::Text(s)) => s,
        Some(Size::Bytes(b)) => b.to_string(),
    };
    parse_size(&text).map(Some).map_err(|e| serde::de::Error::custom(format!("mem: {e}")))
}

/// Parse a memory size: a number with an optional K, M or G suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 512M, 1G)"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < 1 << 20 || bytes % 4096 != 0 || bytes > 64 << 30 {
        return Err(format!("'{s}': memory must be a multiple of 4K between 1M and 64G"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lockstep-vmspec-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2097152"), Ok(2 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("1K").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn keys_paths_and_unknown_keys() {
        let dir = dir("keys");
        let f = dir.join("vm.toml");
        std::fs::write(
            &f,
            "kernel = \"Image\"\ninitrd = \"/abs/initrd\"\nappend = \"console=ttyS0\"\nmem = \"256M\"\nmax-insns = 5\n\
             disk-readonly = true\npeer = \"10.0.0.2:7300\"\ntimeout-ms = 400\nkeep-log = \"kept\"\n",
        )
        .unwrap();
        let file = VmFile::load(&f).unwrap();
        assert_eq!(file.vm.kernel, Some(dir.join("Image")));
        assert_eq!(file.vm.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(file.vm.mem, Some(256 << 20));
        assert_eq!(file.vm.max_insns, Some(5));
        assert_eq!(file.vm.disk_readonly, Some(true));
        assert_eq!(file.pair.peer.as_deref(), Some("10.0.0.2:7300"));
        assert_eq!(file.pair.timeout_ms, Some(400));
        assert_eq!(file.pair.keep_log, Some(dir.join("kept")));
        std::fs::write(&f, "kernel = \"Image\"\nbogus-key = 1\n").unwrap();
        let e = VmFile::load(&f).unwrap_err().to_string();
        assert!(e.contains("bogus-key") && !e.contains('\n'), "{e}");
        std::fs::write(&f, "mem = 1234\n").unwrap();
        let e = VmFile::load(&f).unwrap_err().to_string();
        assert!(e.contains("mem") && e.contains("multiple of 4K"), "{e}");
        std::fs::write(&f, "timeout-ms = \"soon\"\n").unwrap();
        let e = VmFile::load(&f).unwrap_err().to_string();
        assert!(e.contains("timeout-ms") || e.contains("invalid type"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = VmSpec {
            kernel: Some("/f/Image".into()),
            mem: Some(1 << 30),
            append: Some("a".into()),
            ..Default::default()
        };
        let cli = VmSpec { mem: Some(256 << 20), disk_readonly: Some(true), ..Default::default() };
        let merged = overlay(cli, file).unwrap();
        assert_eq!(merged.kernel, Some(PathBuf::from("/f/Image")));
        assert_eq!(merged.mem, Some(256 << 20));
        assert_eq!(merged.append.as_deref(), Some("a"));
        assert_eq!(merged.disk_readonly, Some(true));
    }
}
