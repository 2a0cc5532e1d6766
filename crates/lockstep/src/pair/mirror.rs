//! The secondary's copy of the guest's network input.
//!
//! A client's packet sent as the primary dies reaches a dead process: the
//! switch still sends the guest's address to the primary's port until the
//! secondary announces it from its own. The client then recovers only by
//! retransmitting, after ~200 ms for TCP's first timeout, or never for UDP.
//! When the network delivers the guest's frames to both sides (a bridge or
//! switch that floods them to both ports, a hub, a port mirror: what COLO
//! asks of its network), the secondary's tap holds that packet too.
//!
//! So while it replays, the secondary reads its tap into an [`InputWindow`]
//! (the last [`KEEP`] of frames) and crosses off every frame the primary's
//! log delivered to the guest. Going live, it hands the frames left over
//! (what the network delivered but the guest of this execution never saw)
//! to its guest first. A frame the primary received but never logged is
//! one the secondary's execution never saw, so giving it to the guest is
//! the network delivering it late, never twice. Without a mirroring
//! network the tap sees only broadcasts, which the log also has: nothing
//! is left over and nothing changes.
//!
//! Just after a planned switchover the window also works the other way
//! (`forward`): the new secondary was the primary, and a learning switch
//! sends the guest's frames to its port until the new primary's
//! announcement lands. A frame the new primary's log has not delivered
//! within [`FORWARD_AFTER`] of reaching this tap is forwarded to it over
//! the channel, for [`FORWARD_WINDOW`]; on a mirroring network the log has
//! it by then, and nothing is forwarded.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hasher};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a frame stays in the window: longer than any delay between
/// the tap's copy and the log's copy of one frame reaching this side.
pub const KEEP: Duration = Duration::from_secs(2);
/// Bounds on what the window holds, whatever the traffic.
const MAX_FRAMES: usize = 65_536;
const MAX_BYTES: usize = 64 << 20;
/// At most this many frames (the newest) are handed to the guest.
pub const MAX_HANDED: usize = 512;
/// A tap frame the log has not delivered this long after it arrived is
/// forwarded (see the module documentation) ...
pub const FORWARD_AFTER: Duration = Duration::from_millis(8);
/// ... for this long after a switchover.
pub const FORWARD_WINDOW: Duration = Duration::from_secs(2);

/// A frame's identity: its Ethernet bytes. The virtio-net header in front
/// is the tap's note on offloads (checksum checked, segmentation), which
/// two taps on two paths may write differently for the same packet.
fn frame_hash(frame: &[u8]) -> u64 {
    // Fixed keys: the same frame hashes the same on every call.
    let mut h = DefaultHasher::new();
    h.write(frame.get(tap::VNET_HDR_LEN..).unwrap_or(frame));
    h.finish()
}

struct Seen {
    at: Instant,
    hash: u64,
    /// `None` once the log delivered it.
    frame: Option<Vec<u8>>,
}

/// The frames the tap delivered, less those the log delivered, over the
/// last [`KEEP`]. A frame and its copy are matched by content, whichever
/// arrives first.
#[derive(Default)]
pub struct InputWindow {
    seen: VecDeque<Seen>,
    /// Sequence number of `seen[0]`.
    first: u64,
    /// Unmatched tap frames by hash: their sequence numbers, oldest first.
    waiting: HashMap<u64, VecDeque<u64>>,
    bytes: usize,
    /// Log frames whose tap copy has not arrived (yet), by arrival.
    logged: VecDeque<(Instant, u64)>,
    unmatched_logged: HashMap<u64, u32>,
    /// The first tap frame not yet looked at for forwarding (a sequence
    /// number, see `first`).
    forward_from: u64,
    /// Totals, for the log line at go-live.
    pub tap_frames: u64,
    pub matched: u64,
    pub forwarded: u64,
}

impl InputWindow {
    /// A frame the tap delivered.
    pub fn on_tap(&mut self, frame: Vec<u8>, now: Instant) {
        self.prune(now);
        self.tap_frames += 1;
        let hash = frame_hash(&frame);
        if let Some(n) = self.unmatched_logged.get_mut(&hash) {
            *n -= 1;
            if *n == 0 {
                self.unmatched_logged.remove(&hash);
            }
            self.matched += 1;
            return;
        }
        let seq = self.first + self.seen.len() as u64;
        self.bytes += frame.len();
        self.seen.push_back(Seen { at: now, hash, frame: Some(frame) });
        self.waiting.entry(hash).or_default().push_back(seq);
    }

    /// A frame the primary's log delivered to the guest.
    pub fn on_log(&mut self, frame: &[u8], now: Instant) {
        self.prune(now);
        let hash = frame_hash(frame);
        if let Some(seqs) = self.waiting.get_mut(&hash) {
            let seq = seqs.pop_front().expect("empty lists are removed");
            if seqs.is_empty() {
                self.waiting.remove(&hash);
            }
            let seen = &mut self.seen[(seq - self.first) as usize];
            self.bytes -= seen.frame.take().map_or(0, |f| f.len());
            self.matched += 1;
            return;
        }
        self.logged.push_back((now, hash));
        *self.unmatched_logged.entry(hash).or_default() += 1;
    }

    fn prune(&mut self, now: Instant) {
        while let Some(front) = self.seen.front() {
            let old = now.saturating_duration_since(front.at) > KEEP;
            if !old && self.seen.len() <= MAX_FRAMES && self.bytes <= MAX_BYTES {
                break;
            }
            let front = self.seen.pop_front().expect("checked above");
            if let Some(frame) = front.frame {
                self.bytes -= frame.len();
                // The oldest unmatched frame of its hash: first in its list.
                if let Some(seqs) = self.waiting.get_mut(&front.hash) {
                    seqs.pop_front();
                    if seqs.is_empty() {
                        self.waiting.remove(&front.hash);
                    }
                }
            }
            self.first += 1;
        }
        while let Some(&(at, hash)) = self.logged.front() {
            if now.saturating_duration_since(at) <= KEEP && self.logged.len() <= MAX_FRAMES {
                break;
            }
            self.logged.pop_front();
            if let Some(n) = self.unmatched_logged.get_mut(&hash) {
                *n -= 1;
                if *n == 0 {
                    self.unmatched_logged.remove(&hash);
                }
            }
        }
    }

    /// Tap frames that arrived `after` ago or earlier and the log has not
    /// delivered, oldest first: taken out of the window (to forward).
    pub fn overdue(&mut self, now: Instant, after: Duration) -> Vec<Vec<u8>> {
        self.prune(now);
        let mut out = Vec::new();
        let mut seq = self.forward_from.max(self.first);
        while let Some(s) = self.seen.get_mut((seq - self.first) as usize) {
            if now.saturating_duration_since(s.at) < after {
                break;
            }
            if let Some(frame) = s.frame.take() {
                self.bytes -= frame.len();
                // The oldest unmatched frame of its hash: first in its list.
                if let Some(seqs) = self.waiting.get_mut(&s.hash) {
                    seqs.pop_front();
                    if seqs.is_empty() {
                        self.waiting.remove(&s.hash);
                    }
                }
                out.push(frame);
            }
            seq += 1;
        }
        self.forward_from = seq;
        self.forwarded += out.len() as u64;
        out
    }

    /// The tap frames the log did not deliver, oldest first (at most
    /// [`MAX_HANDED`], the newest).
    pub fn leftovers(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.prune(now);
        self.waiting.clear();
        self.bytes = 0;
        let mut left: Vec<Vec<u8>> = self.seen.iter_mut().filter_map(|s| s.frame.take()).collect();
        if left.len() > MAX_HANDED {
            left.drain(..left.len() - MAX_HANDED);
        }
        left
    }
}

/// The thread that reads the secondary's tap into the window while it
/// replays.
pub struct InputMirror {
    window: Arc<Mutex<InputWindow>>,
    wake: UnixStream,
    reader: Option<JoinHandle<()>>,
}

/// The log side's handle on the window (for `LinkSource`).
#[derive(Clone)]
pub struct LogTally(Arc<Mutex<InputWindow>>);

impl LogTally {
    pub fn delivered(&self, frame: &[u8]) {
        if let Ok(mut w) = self.0.lock() {
            w.on_log(frame, Instant::now());
        }
    }
}

/// What kind of frame this is, for the log: "IPv4 UDP unicast", "ARP
/// broadcast", ...
pub fn describe(frame: &[u8]) -> String {
    let Some(eth) = frame.get(tap::VNET_HDR_LEN..).filter(|e| e.len() >= 14) else {
        return "runt".to_string();
    };
    let cast = match eth[0] {
        0xff if eth[..6] == [0xff; 6] => "broadcast",
        b if b & 1 == 1 => "multicast",
        _ => "unicast",
    };
    let what = match u16::from_be_bytes([eth[12], eth[13]]) {
        0x0806 => "ARP".to_string(),
        0x8035 => "RARP".to_string(),
        0x0800 => match eth.get(14 + 9) {
            Some(6) => "IPv4 TCP".to_string(),
            Some(17) => "IPv4 UDP".to_string(),
            Some(1) => "IPv4 ICMP".to_string(),
            _ => "IPv4".to_string(),
        },
        0x86dd => match eth.get(14 + 6) {
            Some(6) => "IPv6 TCP".to_string(),
            Some(17) => "IPv6 UDP".to_string(),
            Some(58) => "IPv6 ICMP".to_string(),
            _ => "IPv6".to_string(),
        },
        t => format!("ethertype {t:#06x}"),
    };
    format!("{what} {cast}")
}

/// Counts of each kind of frame ([`describe`]), in order of first sight:
/// "2 ARP broadcast, 1 IPv4 UDP unicast".
pub fn summary(frames: &[Vec<u8>]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for kind in frames.iter().map(|f| describe(f)) {
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// Ethernet source address of a tap frame (after the virtio-net header).
fn source_mac(frame: &[u8]) -> Option<&[u8]> {
    frame.get(tap::VNET_HDR_LEN + 6..tap::VNET_HDR_LEN + 12)
}

impl InputMirror {
    /// Start reading `tap` (a second handle on the secondary's tap).
    /// Frames from `guest_mac` are the primary's guest talking, not input.
    /// `earlier`: frames for the guest this side read before (a primary
    /// that just handed over). With `forward`, frames the log does not
    /// deliver go to the primary for a while (see the module documentation).
    pub fn start(
        mut tap: tap::Tap,
        guest_mac: [u8; 6],
        earlier: Vec<Vec<u8>>,
        forward: Option<ft::link::Forwarder>,
    ) -> std::io::Result<InputMirror> {
        // What queued before pairing predates the log (after a switchover
        // it is the old primary's late input: kept, to forward).
        if forward.is_none() {
            tap.discard_queued()?;
        }
        let (wake, wait) = UnixStream::pair()?;
        let window = Arc::new(Mutex::new(InputWindow::default()));
        let now = Instant::now();
        for frame in earlier {
            window.lock().unwrap().on_tap(frame, now);
        }
        let w = window.clone();
        let until = now + FORWARD_WINDOW;
        let reader = std::thread::Builder::new().name("input-mirror".into()).spawn(move || {
            let mut buf = vec![0u8; tap::MAX_PACKET];
            loop {
                let forwarding = forward.as_ref().filter(|_| Instant::now() < until);
                let timeout = forwarding.map(|_| FORWARD_AFTER / 2);
                // Stops when woken, or when the tap fails (no more copies).
                let got = match tap.recv_until(&mut buf, wait.as_fd(), timeout) {
                    Ok(tap::Received::Frame(n)) => Some(&buf[..n]),
                    Ok(tap::Received::TimedOut) => None,
                    Ok(tap::Received::Woken) | Err(_) => return,
                };
                let Ok(mut w) = w.lock() else { return };
                let now = Instant::now();
                if let Some(frame) = got.filter(|f| source_mac(f) != Some(&guest_mac[..])) {
                    w.on_tap(frame.to_vec(), now);
                }
                if let Some(f) = forwarding {
                    for frame in w.overdue(now, FORWARD_AFTER) {
                        f.send(frame);
                    }
                }
            }
        })?;
        Ok(InputMirror { window, wake, reader: Some(reader) })
    }

    pub fn tally(&self) -> LogTally {
        LogTally(self.window.clone())
    }

    /// Stop reading (what arrives from now on stays queued on the tap for
    /// whoever reads it next) and return the leftovers with the totals
    /// (frames the tap delivered, frames matched with the log).
    pub fn finish(mut self) -> (Vec<Vec<u8>>, u64, u64) {
        use std::io::Write;
        let _ = self.wake.write_all(&[1]);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let Ok(mut w) = self.window.lock() else { return (Vec::new(), 0, 0) };
        let left = w.leftovers(Instant::now());
        if w.forwarded > 0 {
            tracing::info!("forwarded {} frames to the primary after the switchover", w.forwarded);
        }
        (left, w.tap_frames, w.matched)
    }
}

impl Drop for InputMirror {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.wake.write_all(&[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[20] = n;
        f
    }

    #[test]
    fn frames_the_log_delivered_are_crossed_off_whichever_copy_comes_first() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        w.on_tap(frame(1), t);
        w.on_log(&frame(2), t);
        w.on_log(&frame(1), t);
        w.on_tap(frame(2), t);
        w.on_tap(frame(3), t);
        assert_eq!(w.leftovers(t), vec![frame(3)]);
        assert_eq!(w.matched, 2);
    }

    #[test]
    fn copies_that_differ_only_in_the_tap_header_match() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        let mut copy = frame(5);
        copy[0] = 2; // VIRTIO_NET_HDR_F_DATA_VALID on one path only
        w.on_tap(copy, t);
        w.on_log(&frame(5), t);
        assert!(w.leftovers(t).is_empty());
    }

    #[test]
    fn a_frame_sent_twice_and_logged_once_is_left_over_once() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        w.on_tap(frame(7), t);
        w.on_tap(frame(7), t);
        w.on_log(&frame(7), t);
        assert_eq!(w.leftovers(t), vec![frame(7)]);
    }

    #[test]
    fn old_frames_are_forgotten_on_both_sides() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        w.on_tap(frame(1), t);
        w.on_log(&frame(2), t);
        let later = t + KEEP + Duration::from_millis(1);
        // The log's copy of 2 is forgotten: a new tap copy is left over.
        w.on_tap(frame(2), later);
        assert_eq!(w.leftovers(later), vec![frame(2)]);
        assert!(w.unmatched_logged.is_empty());
    }

    #[test]
    fn overdue_frames_are_taken_once_and_matched_ones_never() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        w.on_tap(frame(1), t);
        w.on_tap(frame(2), t);
        w.on_tap(frame(3), t + FORWARD_AFTER);
        w.on_log(&frame(2), t);
        assert!(w.overdue(t, FORWARD_AFTER).is_empty(), "nothing is overdue yet");
        assert_eq!(w.overdue(t + FORWARD_AFTER, FORWARD_AFTER), vec![frame(1)]);
        assert!(w.overdue(t + FORWARD_AFTER, FORWARD_AFTER).is_empty(), "taken once");
        assert_eq!(w.overdue(t + 2 * FORWARD_AFTER, FORWARD_AFTER), vec![frame(3)]);
        assert!(w.leftovers(t + 2 * FORWARD_AFTER).is_empty());
        assert_eq!(w.forwarded, 2);
    }

    #[test]
    fn frames_are_described_by_kind_and_cast() {
        let mut arp = vec![0u8; tap::VNET_HDR_LEN];
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.resize(arp.len() + 28, 0);
        let mut udp = vec![0u8; tap::VNET_HDR_LEN];
        udp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        udp.resize(udp.len() + 20, 0);
        udp[tap::VNET_HDR_LEN + 14 + 9] = 17;
        assert_eq!(summary(&[arp.clone(), udp, arp]), "2 ARP broadcast, 1 IPv4 UDP unicast");
        assert_eq!(describe(&[0u8; 3]), "runt");
    }

    #[test]
    fn the_window_is_bounded_and_hands_over_the_newest() {
        let t = Instant::now();
        let mut w = InputWindow::default();
        for i in 0..(MAX_FRAMES + 10) {
            let mut f = frame(0);
            f[30..38].copy_from_slice(&(i as u64).to_le_bytes());
            w.on_tap(f, t);
        }
        assert!(w.seen.len() <= MAX_FRAMES + 1);
        let left = w.leftovers(t);
        assert_eq!(left.len(), MAX_HANDED);
        let last = u64::from_le_bytes(left[MAX_HANDED - 1][30..38].try_into().unwrap());
        assert_eq!(last, (MAX_FRAMES + 9) as u64);
    }
}
