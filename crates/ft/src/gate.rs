//! The output gate: frames the guest sends wait here until the secondary
//! has acknowledged the log up to the position where they were produced.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Where released frames go (a tap).
pub trait FrameSink: Send {
    fn send(&mut self, frame: &[u8]);
}

impl FrameSink for tap::Tap {
    fn send(&mut self, frame: &[u8]) {
        // A frame the host does not take is lost, as on a wire.
        let _ = tap::Tap::send(self, frame);
    }
}

struct Held {
    position: u64,
    nic: usize,
    frame: Vec<u8>,
    since: Instant,
}

/// Figures about held output.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GateStats {
    pub held_now: u64,
    pub released: u64,
    /// Mean and largest hold time of released frames, in microseconds.
    pub hold_us_mean: f64,
    pub hold_us_max: u64,
}

struct Inner {
    held: VecDeque<Held>,
    /// Frames produced before this position may leave.
    acked: u64,
    /// No secondary to wait for: everything leaves at once.
    open: bool,
    released: u64,
    hold_us_total: u64,
    hold_us_max: u64,
}

/// The gate: what is held under one lock, the sinks under another. A
/// release takes the frames that may leave under the first, takes the
/// second before it lets the first go (so frames leave in order whoever
/// releases them), and writes them under the second alone: the run loop
/// pushing its next frame, or asking what is held, never waits for a
/// write to the tap.
pub struct OutputGate {
    inner: Mutex<Inner>,
    sinks: Mutex<Vec<Box<dyn FrameSink>>>,
    /// `held.len()` and `acked` as of the last change, for readers that
    /// take no lock at all (the run loop asks on every poll).
    held_now: AtomicUsize,
    acked_now: AtomicU64,
}

impl Inner {
    /// Count a frame as released (`since`: when it was held).
    fn count_release(&mut self, since: Option<Instant>) {
        self.released += 1;
        if let Some(t) = since {
            let us = t.elapsed().as_micros() as u64;
            self.hold_us_total += us;
            self.hold_us_max = self.hold_us_max.max(us);
        }
    }

    /// The held frames that may leave now, in order.
    fn take_releasable(&mut self) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(h) = self.held.front() {
            if !self.open && h.position > self.acked {
                break;
            }
            let h = self.held.pop_front().unwrap();
            self.count_release(Some(h.since));
            out.push(h);
        }
        out
    }
}

impl OutputGate {
    /// A closed gate in front of these sinks (one per network card).
    pub fn new(sinks: Vec<Box<dyn FrameSink>>) -> OutputGate {
        OutputGate {
            inner: Mutex::new(Inner {
                held: VecDeque::new(),
                acked: 0,
                open: false,
                released: 0,
                hold_us_total: 0,
                hold_us_max: 0,
            }),
            sinks: Mutex::new(sinks),
            held_now: AtomicUsize::new(0),
            acked_now: AtomicU64::new(0),
        }
    }

    /// Publish what the lock-free readers see (under the lock).
    fn publish(&self, g: &Inner) {
        self.held_now.store(g.held.len(), Ordering::Release);
        self.acked_now.store(g.acked, Ordering::Release);
    }

    /// Publish, then write `frames` (taken under `g`) to their sinks,
    /// holding only the sinks' lock.
    fn release<'a>(&self, g: MutexGuard<'_, Inner>, frames: impl IntoIterator<Item = (usize, &'a [u8])>) {
        self.publish(&g);
        let mut sinks = self.sinks.lock().unwrap();
        drop(g);
        for (nic, frame) in frames {
            if let Some(sink) = sinks.get_mut(nic) {
                sink.send(frame);
            }
        }
    }

    /// Release what `g` lets leave now (publishing either way; the sinks'
    /// lock only when something leaves).
    fn release_releasable(&self, mut g: MutexGuard<'_, Inner>) {
        let out = g.take_releasable();
        if out.is_empty() {
            self.publish(&g);
        } else {
            self.release(g, out.iter().map(|h| (h.nic, &h.frame[..])));
        }
    }

    /// A frame produced at `position` on card `nic`.
    pub fn push(&self, position: u64, nic: usize, frame: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        if g.open || (position <= g.acked && g.held.is_empty()) {
            g.count_release(None);
            self.release(g, [(nic, frame)]);
        } else {
            g.held.push_back(Held { position, nic, frame: frame.to_vec(), since: Instant::now() });
            self.publish(&g);
        }
    }

    /// The secondary holds the log up to `position`: release what it covers.
    pub fn acknowledge(&self, position: u64) {
        let mut g = self.inner.lock().unwrap();
        if position > g.acked {
            g.acked = position;
            self.release_releasable(g);
        }
    }

    /// No more holding (the primary runs alone): release everything.
    pub fn open(&self) {
        let mut g = self.inner.lock().unwrap();
        g.open = true;
        self.release_releasable(g);
    }

    /// Drop what is held without sending it (the side stops).
    pub fn discard(&self) -> usize {
        let mut g = self.inner.lock().unwrap();
        let n = g.held.len();
        g.held.clear();
        self.publish(&g);
        n
    }

    /// Frames waiting (without waiting for a release under way).
    pub fn held(&self) -> usize {
        self.held_now.load(Ordering::Acquire)
    }

    /// The acknowledged position (as `held`).
    pub fn acked(&self) -> u64 {
        self.acked_now.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> GateStats {
        let g = self.inner.lock().unwrap();
        let timed = g.released.max(1);
        GateStats {
            held_now: g.held.len() as u64,
            released: g.released,
            hold_us_mean: g.hold_us_total as f64 / timed as f64,
            hold_us_max: g.hold_us_max,
        }
    }
}

/// A sink that keeps what it is given (tests of the gate and the link).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Wire(pub(crate) std::sync::Arc<Mutex<Vec<Vec<u8>>>>);

#[cfg(test)]
impl FrameSink for Wire {
    fn send(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_in_order_once_their_position_is_acked() {
        let wire = Wire::default();
        let gate = OutputGate::new(vec![Box::new(wire.clone())]);
        gate.push(10, 0, b"a");
        gate.push(20, 0, b"b");
        gate.push(30, 0, b"c");
        assert!(wire.0.lock().unwrap().is_empty());
        gate.acknowledge(19);
        assert_eq!(*wire.0.lock().unwrap(), vec![b"a".to_vec()]);
        gate.acknowledge(15); // older acks change nothing
        gate.acknowledge(30);
        assert_eq!(wire.0.lock().unwrap().len(), 3);
        // Produced before the acked position, nothing held: straight out.
        gate.push(25, 0, b"d");
        assert_eq!(wire.0.lock().unwrap().len(), 4);
        let s = gate.stats();
        assert_eq!((s.held_now, s.released), (0, 4));
    }

    /// A sink that says when a write has begun, and waits until the test
    /// lets it end.
    struct Stalled {
        entered: std::sync::mpsc::SyncSender<()>,
        go: std::sync::mpsc::Receiver<()>,
    }

    impl FrameSink for Stalled {
        fn send(&mut self, _: &[u8]) {
            let _ = self.entered.try_send(());
            let _ = self.go.recv();
        }
    }

    #[test]
    fn readers_do_not_wait_behind_a_release() {
        let (go, go_rx) = std::sync::mpsc::channel();
        let (entered, entered_rx) = std::sync::mpsc::sync_channel(1);
        let gate = std::sync::Arc::new(OutputGate::new(vec![Box::new(Stalled { entered, go: go_rx })]));
        gate.push(10, 0, b"a");
        gate.push(20, 0, b"b");
        assert_eq!((gate.held(), gate.acked()), (2, 0));
        // The acknowledgement's release writes "a" and stalls in the sink.
        let releasing = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.acknowledge(15))
        };
        entered_rx.recv().unwrap();
        // The run loop pushes its next frame and asks what is held while
        // the write is under way: neither waits for it.
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.push(30, 0, b"c");
                tx.send((gate.held(), gate.acked())).unwrap()
            });
        }
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok((2, 15)));
        go.send(()).unwrap();
        releasing.join().unwrap();
        assert_eq!((gate.held(), gate.acked()), (2, 15));
        // The rest leaves on the next acknowledgement.
        go.send(()).unwrap();
        go.send(()).unwrap();
        gate.acknowledge(30);
        assert_eq!(gate.held(), 0);
        assert_eq!(gate.stats().released, 3);
    }

    #[test]
    fn open_releases_everything_and_discard_drops() {
        let wire = Wire::default();
        let gate = OutputGate::new(vec![Box::new(wire.clone())]);
        gate.push(10, 0, b"a");
        assert_eq!(gate.discard(), 1);
        gate.push(11, 0, b"b");
        gate.push(12, 1, b"nowhere"); // no card 1: counted, not sent
        gate.open();
        gate.push(99, 0, b"c");
        assert_eq!(*wire.0.lock().unwrap(), vec![b"b".to_vec(), b"c".to_vec()]);
    }

    /// A frame never leaves before the acknowledged position covers it,
    /// whatever the interleaving of pushes and acks.
    #[test]
    fn nothing_leaves_before_its_ack_random() {
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        let wire = Wire::default();
        let gate = OutputGate::new(vec![Box::new(wire.clone())]);
        let (mut pos, mut acked) = (0u64, 0u64);
        for _ in 0..5000 {
            if next() % 2 == 0 {
                pos += next() % 100;
                gate.push(pos, 0, &pos.to_le_bytes());
            } else {
                acked = acked.max(pos.saturating_sub(next() % 300));
                gate.acknowledge(acked);
                for f in wire.0.lock().unwrap().iter() {
                    assert!(u64::from_le_bytes(f[..].try_into().unwrap()) <= acked);
                }
            }
            // The lock-free readings are the locked state's.
            assert_eq!(gate.held() as u64, gate.stats().held_now);
            assert_eq!(gate.acked(), acked);
        }
        let out: Vec<u64> =
            wire.0.lock().unwrap().iter().map(|f| u64::from_le_bytes(f[..].try_into().unwrap())).collect();
        assert!(out.windows(2).all(|w| w[0] <= w[1]), "frames left out of order");
    }
}
