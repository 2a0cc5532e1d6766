//! Liveness: the primary's run-loop pulse (a stuck run loop sends no
//! heartbeats), its lease on releasing output (nothing leaves after a
//! silence longer than the timeout, until arbitration is won or the
//! secondary answers a probe), each side's record of its own pauses, and
//! its watch on its disk (an operation under way is slow, not hung).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether this side's run loop is inside an operation on its disk
/// replica (a read, a write, a flush) and since when, or when the last
/// one ended. A flush on a busy host waits for every dirty page of the
/// file system before it (seen in CI: over a second for the guest's first
/// flush, right after the test copied the replica), which is slow, not
/// hung: the liveness checks give a run loop inside one, or a secondary
/// that says its run loop is ([`crate::PairConfig::disk_stall_timeout`]),
/// far longer than a run loop that computes. One per side, shared by its
/// disk, which reports to it ([`DiskWatch::during`]), and by every link
/// the side has in turn.
#[derive(Clone, Debug)]
pub struct DiskWatch(Arc<Mutex<DiskOp>>);

#[derive(Clone, Copy, Debug)]
struct DiskOp {
    busy: bool,
    /// When the operation under way began, or the last one ended.
    since: Instant,
}

impl Default for DiskWatch {
    fn default() -> DiskWatch {
        DiskWatch(Arc::new(Mutex::new(DiskOp { busy: false, since: Instant::now() })))
    }
}

impl DiskWatch {
    /// Run the disk operation `op`, marked as under way.
    pub fn during<T>(&self, op: impl FnOnce() -> T) -> T {
        /// Ends the mark however `op` ends.
        struct Ends<'a>(&'a DiskWatch);
        impl Drop for Ends<'_> {
            fn drop(&mut self) {
                self.0.mark(false);
            }
        }
        self.mark(true);
        let _ends = Ends(self);
        op()
    }

    fn mark(&self, busy: bool) {
        *self.0.lock().unwrap() = DiskOp { busy, since: Instant::now() };
    }

    /// Whether an operation is under way now.
    pub fn busy(&self) -> bool {
        self.0.lock().unwrap().busy
    }

    fn state(&self) -> DiskOp {
        *self.0.lock().unwrap()
    }
}

/// What the secondary's acknowledgements say of its disk, as the
/// primary's flow control reads it: whether the last one said its run loop
/// is inside a disk operation, and whether any since the last reading did.
/// The end of an operation is a sign of life (the next may follow at once,
/// its execution standing still throughout), and an acknowledgement sent
/// in the short gap between two operations must not hide the first: the
/// reports are latched until read.
#[derive(Debug, Default)]
pub(crate) struct PeerDisk {
    now: AtomicBool,
    reported: AtomicBool,
}

impl PeerDisk {
    /// An acknowledgement said whether the secondary is inside an operation.
    pub(crate) fn report(&self, in_disk: bool) {
        if in_disk {
            self.reported.store(true, Ordering::Relaxed);
        }
        self.now.store(in_disk, Ordering::Relaxed);
    }

    /// Whether the last acknowledgement said it is inside an operation.
    pub(crate) fn busy(&self) -> bool {
        self.now.load(Ordering::Relaxed)
    }

    /// Whether an operation reported since the last call has ended
    /// (`was_busy`: what the last call found, kept by the reader).
    pub(crate) fn ended(&self, was_busy: &mut bool) -> bool {
        let reported = self.reported.swap(false, Ordering::Relaxed);
        let busy = self.busy();
        let ended = (*was_busy || reported) && !busy;
        *was_busy = busy;
        ended
    }
}

/// When the primary's run loop last completed a slice, whether it is
/// waiting for input now (a wait is bounded by the run loop itself), and
/// how long it may be quiet: `stall` computing, `disk_stall` inside one
/// disk operation.
pub(crate) struct Pulse {
    last: Mutex<Instant>,
    waiting: AtomicBool,
    disk: DiskWatch,
    stall: Duration,
    disk_stall: Duration,
}

impl Pulse {
    pub(crate) fn new(cfg: &crate::PairConfig) -> Pulse {
        Pulse {
            last: Mutex::new(Instant::now()),
            waiting: AtomicBool::new(false),
            disk: cfg.disk.clone(),
            stall: cfg.stall_timeout(),
            disk_stall: cfg.disk_stall_timeout(),
        }
    }

    pub(crate) fn beat(&self) {
        *self.last.lock().unwrap() = Instant::now();
    }

    pub(crate) fn waiting(&self, waiting: bool) {
        self.beat();
        self.waiting.store(waiting, Ordering::Relaxed);
    }

    /// How long the run loop has been stuck, if it has been for longer
    /// than it may of the time this side ran (`ran_since`, see [`Awake`]).
    /// The end of a disk operation counts as a sign of life, as a slice.
    pub(crate) fn stuck_for(&self, ran_since: impl Fn(Instant) -> Duration) -> Option<Duration> {
        if self.waiting.load(Ordering::Relaxed) {
            return None;
        }
        let disk = self.disk.state();
        let last = self.last.lock().unwrap().max(disk.since);
        let limit = if disk.busy { self.disk_stall } else { self.stall };
        (ran_since(last) >= limit).then(|| last.elapsed())
    }
}

/// The primary's right to release output: it holds while the secondary
/// was heard within the timeout (monotonic clock). A side that was paused
/// (SIGSTOP, a stalled host) finds acks that waited in its socket when it
/// resumes; acting on them would release frames after the secondary may
/// have taken over, pulling the guest's address back to a dead port. So
/// once the lease has lapsed no acknowledgement renews it: only the answer
/// to a probe sent after the lapse does ([`Lease::probe`]). The secondary
/// answers only while it is paired (going live, it closes the channel
/// first), so that answer proves it had not taken over when the probe
/// arrived, and from there the lease holds as any renewed one.
pub struct Lease {
    state: Mutex<LeaseState>,
    timeout: Duration,
}

/// The lease has lapsed when the peer was last heard a timeout ago or
/// more (nothing but a probe's answer moves `heard` on after that), or a
/// probe went out.
struct LeaseState {
    heard: Instant,
    /// The first probe sent since the lease lapsed: its answer, or a later
    /// probe's, renews the lease.
    probe_from: Option<u64>,
    next_probe: u64,
}

impl Lease {
    pub fn new(timeout: Duration) -> Lease {
        let state = LeaseState { heard: Instant::now(), probe_from: None, next_probe: 1 };
        Lease { state: Mutex::new(state), timeout }
    }

    /// When the peer was last heard (or the lease renewed).
    pub fn heard_at(&self) -> Instant {
        self.state.lock().unwrap().heard
    }

    /// Word from the peer arrived: renew, unless the lease has lapsed
    /// (then the silence before it, and the lease stays lapsed).
    pub fn renew(&self) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap();
        let silent = st.heard.elapsed();
        if st.probe_from.is_some() || silent >= self.timeout {
            return Err(silent);
        }
        st.heard = Instant::now();
        Ok(())
    }

    /// Lapse the lease (if it has not) and number a probe whose answer
    /// renews it.
    pub fn probe(&self) -> u64 {
        let mut st = self.state.lock().unwrap();
        let nonce = st.next_probe;
        st.next_probe += 1;
        st.probe_from.get_or_insert(nonce);
        nonce
    }

    /// The answer to probe `nonce` arrived: it renews a lapsed lease when
    /// the probe was sent after the lapse. Whether it did.
    pub fn confirm(&self, nonce: u64) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.probe_from.is_none_or(|from| nonce < from) {
            return false;
        }
        st.probe_from = None;
        st.heard = Instant::now();
        true
    }
}

/// This side's own pauses, as seen by a loop that wakes every `period`. A
/// round that comes far late (by half the silence timeout or more) means
/// this process, or the host under it, did not run: a stopped process, a
/// host that stalled, both sides of a test on one stalled machine. Silence
/// measured across such a gap says nothing about the peer (its word may be
/// waiting unread in the socket, or it stalled with this side), so the
/// timeouts count only the time this side ran ([`Awake::ran_since`]). A
/// side starved round after round still decides: each round adds its
/// period, and pauses older than [`Awake::MEMORY`] timeouts are forgotten.
pub(crate) struct Awake {
    period: Duration,
    late: Duration,
    memory: Duration,
    last_round: Instant,
    /// Recent pauses: when each ended, and how long it was.
    pauses: VecDeque<(Instant, Duration)>,
}

impl Awake {
    /// How many timeouts back pauses are remembered.
    const MEMORY: u32 = 16;

    pub(crate) fn new(period: Duration, timeout: Duration) -> Awake {
        Awake::starting(Instant::now(), period, timeout)
    }

    fn starting(now: Instant, period: Duration, timeout: Duration) -> Awake {
        let memory = timeout * Awake::MEMORY;
        Awake { period, late: timeout / 2, memory, last_round: now, pauses: VecDeque::new() }
    }

    /// A round of the loop starts; the pause that ended with it, if any.
    pub(crate) fn round(&mut self) -> Option<Duration> {
        self.round_at(Instant::now())
    }

    fn round_at(&mut self, now: Instant) -> Option<Duration> {
        let gap = now.saturating_duration_since(self.last_round);
        self.last_round = now;
        let pause = (gap >= self.period + self.late).then(|| gap - self.period);
        if let Some(p) = pause {
            self.pauses.push_back((now, p));
        }
        while self.pauses.front().is_some_and(|&(end, _)| now.saturating_duration_since(end) > self.memory) {
            self.pauses.pop_front();
        }
        pause
    }

    /// A heartbeat loop's round: as [`Awake::round`], and a pause said on
    /// the log (a side that stalls should say so; it is also what tells a
    /// stalled host from a lost peer after the fact).
    pub(crate) fn heartbeat_round(&mut self) {
        if let Some(p) = self.round() {
            tracing::warn!(
                "this side did not run for {} ms (a stopped process or a stalled host): not counted as the peer's silence",
                p.as_millis()
            );
        }
    }

    /// How long this side ran since `since`: the time since, less the
    /// pauses in it.
    pub(crate) fn ran_since(&self, since: Instant) -> Duration {
        self.ran_between(since, Instant::now())
    }

    fn ran_between(&self, since: Instant, now: Instant) -> Duration {
        let paused: Duration =
            self.pauses.iter().map(|&(end, len)| end.saturating_duration_since(since).min(len)).sum();
        now.saturating_duration_since(since).saturating_sub(paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lapsed_lease_is_renewed_only_by_the_answer_to_a_later_probe() {
        let lease = Lease::new(Duration::from_millis(30));
        assert_eq!(lease.renew(), Ok(()));
        std::thread::sleep(Duration::from_millis(40));
        // The pause outlasted the timeout: the ack that arrives now, and
        // every one after it, releases nothing.
        assert!(lease.renew().unwrap_err() >= Duration::from_millis(30));
        assert!(lease.renew().is_err());
        // An answer to no probe, or to one older than the lapse, is no
        // proof either.
        assert!(!lease.confirm(0));
        let first = lease.probe();
        let second = lease.probe();
        assert!(!lease.confirm(first - 1));
        assert!(lease.renew().is_err());
        // The answer to the first probe since the lapse renews it, and acks
        // release again; a late answer to the second changes nothing.
        assert!(lease.confirm(first));
        assert_eq!(lease.renew(), Ok(()));
        assert!(!lease.confirm(second));
        // A probe lapses the lease at once: acks already on their way were
        // sent before it, and the next lapse needs a newer answer.
        let third = lease.probe();
        assert!(lease.renew().is_err());
        assert!(!lease.confirm(second));
        assert!(lease.confirm(third));
        assert_eq!(lease.renew(), Ok(()));
    }

    #[test]
    fn the_end_of_a_reported_disk_operation_is_seen_once_even_between_readings() {
        let disk = PeerDisk::default();
        let mut was = false;
        assert!(!disk.ended(&mut was));
        // Read while inside, then after: ended, once.
        disk.report(true);
        assert!(!disk.ended(&mut was) && disk.busy());
        disk.report(false);
        assert!(disk.ended(&mut was));
        assert!(!disk.ended(&mut was));
        // A whole operation between two readings, the last report saying
        // "not inside" (the gap before the next one): still ended.
        disk.report(false);
        disk.report(true);
        disk.report(false);
        assert!(disk.ended(&mut was));
        assert!(!disk.ended(&mut was));
        // Back to back: inside at both readings, nothing ended yet.
        disk.report(true);
        assert!(!disk.ended(&mut was));
        disk.report(false);
        disk.report(true);
        assert!(!disk.ended(&mut was) && disk.busy());
    }

    #[test]
    fn time_this_side_did_not_run_is_not_counted() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut awake = Awake::starting(t0, ms(25), ms(250));
        assert_eq!(awake.round_at(t0 + ms(25)), None);
        // Late, but by less than half the timeout: this side ran.
        assert_eq!(awake.round_at(t0 + ms(170)), None);
        assert_eq!(awake.ran_between(t0, t0 + ms(170)), ms(170));
        // A round 700 ms after the last: a pause of 675 ms (less the
        // period it meant to sleep), counted out of whatever it overlaps.
        assert_eq!(awake.round_at(t0 + ms(870)), Some(ms(675)));
        assert_eq!(awake.ran_between(t0, t0 + ms(900)), ms(225));
        assert_eq!(awake.ran_between(t0 + ms(500), t0 + ms(900)), ms(30));
        assert_eq!(awake.ran_between(t0 + ms(880), t0 + ms(900)), ms(20));
        // A second pause soon after counts out as well.
        awake.round_at(t0 + ms(895));
        awake.round_at(t0 + ms(1595));
        assert_eq!(awake.ran_between(t0 + ms(500), t0 + ms(1600)), ms(55));
        // Starved round after round, each round 200 ms late: the time
        // this side ran still grows by a period a round, so it decides.
        let mut t = t0 + ms(1600);
        awake.round_at(t);
        for _ in 0..10 {
            t += ms(225);
            awake.round_at(t);
        }
        assert_eq!(awake.ran_between(t0 + ms(1600), t), ms(250));
        // Pauses older than the memory are forgotten: after one more (this
        // round's own), only that one counts.
        let later = t + ms(250) * Awake::MEMORY + ms(1);
        awake.round_at(later);
        assert_eq!(awake.ran_between(t0, later), t + ms(25) - t0);
    }

    /// A pulse that may be quiet 20 ms computing, 200 ms in a disk
    /// operation.
    fn pulse() -> Pulse {
        let cfg = crate::PairConfig { timeout: Duration::from_millis(5), ..crate::PairConfig::default() };
        Pulse { disk_stall: Duration::from_millis(200), ..Pulse::new(&cfg) }
    }

    #[test]
    fn a_run_loop_is_stuck_only_for_time_this_side_ran() {
        let pulse = pulse();
        assert_eq!(pulse.stall, Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        let ms = Duration::from_millis;
        assert!(pulse.stuck_for(|t| t.elapsed()).unwrap() >= ms(30));
        // Most of that time this side was paused.
        assert!(pulse.stuck_for(|t| t.elapsed().saturating_sub(ms(25))).is_none());
        pulse.waiting(true);
        std::thread::sleep(ms(30));
        assert!(pulse.stuck_for(|t| t.elapsed()).is_none());
    }

    #[test]
    fn a_run_loop_inside_a_disk_operation_has_the_disk_allowance() {
        let ms = Duration::from_millis;
        let pulse = pulse();
        let disk = pulse.disk.clone();
        assert!(!disk.busy());
        // A flush that takes longer than the run loop may compute: not
        // stuck while it lasts, though no slice completed.
        disk.during(|| {
            assert!(disk.busy());
            std::thread::sleep(ms(60));
            assert!(pulse.stuck_for(|t| t.elapsed()).is_none());
        });
        assert!(!disk.busy());
        // Its end is a sign of life: the allowance for computing starts
        // over from there.
        assert!(pulse.stuck_for(|t| t.elapsed()).is_none());
        std::thread::sleep(ms(30));
        assert!(pulse.stuck_for(|t| t.elapsed()).is_some());
        // An operation that never ends is stuck after the disk allowance.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let hung = {
            let disk = disk.clone();
            std::thread::spawn(move || disk.during(|| rx.recv()))
        };
        while !disk.busy() {
            std::thread::yield_now();
        }
        std::thread::sleep(ms(60));
        assert!(pulse.stuck_for(|t| t.elapsed()).is_none());
        std::thread::sleep(ms(180));
        assert!(pulse.stuck_for(|t| t.elapsed()).unwrap() >= ms(200));
        // A panic inside an operation still ends it.
        tx.send(()).unwrap();
        hung.join().unwrap().unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| disk.during(|| panic!("disk"))));
        assert!(caught.is_err());
        assert!(!disk.busy());
    }
}
