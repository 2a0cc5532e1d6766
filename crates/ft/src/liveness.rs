//! Liveness: the primary's run-loop pulse (a stuck run loop sends no
//! heartbeats) and its lease on releasing output (nothing leaves after a
//! silence longer than the timeout, until arbitration is won).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the primary's run loop last completed a slice, and whether it is
/// waiting for input now (a wait is bounded by the run loop itself).
pub(crate) struct Pulse {
    last: Mutex<Instant>,
    waiting: AtomicBool,
}

impl Pulse {
    pub(crate) fn new() -> Pulse {
        Pulse { last: Mutex::new(Instant::now()), waiting: AtomicBool::new(false) }
    }

    pub(crate) fn beat(&self) {
        *self.last.lock().unwrap() = Instant::now();
    }

    pub(crate) fn waiting(&self, waiting: bool) {
        self.beat();
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    /// How long the run loop has been stuck, if longer than `timeout`.
    pub(crate) fn stuck_for(&self, timeout: Duration) -> Option<Duration> {
        let quiet = self.last.lock().unwrap().elapsed();
        (!self.waiting.load(Ordering::Relaxed) && quiet >= timeout).then_some(quiet)
    }
}

/// The primary's right to release output: it holds while the secondary
/// was heard within the timeout (monotonic clock), and once it has lapsed
/// nothing renews it. A side that was paused (SIGSTOP, a stalled host)
/// finds acks that waited in its socket when it resumes; acting on them
/// would release frames after the secondary may have taken over, pulling
/// the guest's address back to a dead port. Such a side must win
/// arbitration first.
pub struct Lease {
    heard: Mutex<Instant>,
    timeout: Duration,
}

impl Lease {
    pub fn new(timeout: Duration) -> Lease {
        Lease { heard: Mutex::new(Instant::now()), timeout }
    }

    /// How long the peer has been silent.
    pub fn silence(&self) -> Duration {
        self.heard.lock().unwrap().elapsed()
    }

    /// Word from the peer arrived: renew, unless the lease has lapsed
    /// (then the silence before it, and the lease stays lapsed).
    pub fn renew(&self) -> Result<(), Duration> {
        let mut heard = self.heard.lock().unwrap();
        let silent = heard.elapsed();
        if silent >= self.timeout {
            return Err(silent);
        }
        *heard = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lapsed_lease_is_never_renewed() {
        let lease = Lease::new(Duration::from_millis(30));
        assert_eq!(lease.renew(), Ok(()));
        std::thread::sleep(Duration::from_millis(40));
        // The pause outlasted the timeout: the ack that arrives now, and
        // every one after it, releases nothing.
        assert!(lease.renew().unwrap_err() >= Duration::from_millis(30));
        assert!(lease.renew().is_err());
    }
}
