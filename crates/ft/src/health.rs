//! This process's view of its external network, for its peer.
//!
//! A side that watches its network (the host's link watcher, in the
//! binary) says here whether its tap and uplinks are up; the secondary's
//! link tells the primary ([`crate::wire::Message::Uplink`]), whose
//! failure policy switches over when its own network is down and the
//! secondary's is up. One value per process, as a process is one side.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

static UPLINK: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Set this side's network state (`None`: not watched).
pub fn set_uplink(up: Option<bool>) {
    let v = match up {
        None => UNKNOWN,
        Some(true) => UP,
        Some(false) => DOWN,
    };
    UPLINK.store(v, Ordering::Relaxed);
}

/// This side's network state, if it is watched.
pub fn uplink() -> Option<bool> {
    match UPLINK.load(Ordering::Relaxed) {
        UP => Some(true),
        DOWN => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_back() {
        for v in [Some(true), Some(false), None] {
            set_uplink(v);
            assert_eq!(uplink(), v);
        }
    }
}
