//! Which host this is, and where lockstep keeps its state on it.

use std::path::PathBuf;

/// This host's identity: `LOCKSTEP_HOST_ID` if set (containers that share
/// a machine id, tests), else the machine id, else the host name.
pub fn host_id() -> String {
    if let Ok(id) = std::env::var("LOCKSTEP_HOST_ID") {
        return id;
    }
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/hostname"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let id = text.trim();
            if !id.is_empty() {
                return id.to_string();
            }
        }
    }
    "unknown-host".to_string()
}

/// This build of lockstep: a hash of the running executable. Two sides
/// replay each other's instructions, so they must run the same engine; a
/// build is identified exactly (also a rebuild with the same version).
/// Computed once per process: hashing the 25 MB executable took ~30 ms,
/// and a secondary going live builds a hello (for joiners) on its way.
pub fn build_id() -> String {
    static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILD
        .get_or_init(|| match crate::vm::file_hash(std::path::Path::new("/proc/self/exe")) {
            Ok(h) => format!("{}-{h}", env!("CARGO_PKG_VERSION")),
            Err(_) => format!("{}-unknown", env!("CARGO_PKG_VERSION")),
        })
        .clone()
}

/// Where state that must outlive a run lives (the file arbiter's epochs):
/// `LOCKSTEP_STATE_DIR`, else `/var/lib/lockstep` for root, else
/// `$XDG_STATE_HOME/lockstep` or `~/.local/state/lockstep`. Not the
/// temporary directory: temp cleaners delete old files, and a lost epoch
/// file would let a stale side win.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOCKSTEP_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/lockstep");
    }
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(state), _) => PathBuf::from(state).join("lockstep"),
        (None, Some(home)) => PathBuf::from(home).join(".local/state/lockstep"),
        (None, None) => PathBuf::from("/var/lib/lockstep"),
    }
}
