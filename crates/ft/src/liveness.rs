//! Liveness: the primary's run-loop pulse (a stuck run loop sends no
//! heartbeats), its lease on releasing output (nothing leaves after a
//! silence longer than the timeout, until arbitration is won or the
//! secondary answers a probe), and each side's record of its own pauses.

use std::collections::VecDeque;
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

    /// How long the run loop has been stuck, if it has been for longer
    /// than `timeout` of the time this side ran (`ran_since`, see
    /// [`Awake`]).
    pub(crate) fn stuck_for(&self, timeout: Duration, ran_since: impl Fn(Instant) -> Duration) -> Option<Duration> {
        let last = *self.last.lock().unwrap();
        (!self.waiting.load(Ordering::Relaxed) && ran_since(last) >= timeout).then(|| last.elapsed())
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

    /// A round of the loop starts.
    pub(crate) fn round(&mut self) {
        self.round_at(Instant::now())
    }

    fn round_at(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_round);
        self.last_round = now;
        if gap >= self.period + self.late {
            self.pauses.push_back((now, gap - self.period));
        }
        while self.pauses.front().is_some_and(|&(end, _)| now.saturating_duration_since(end) > self.memory) {
            self.pauses.pop_front();
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
    fn time_this_side_did_not_run_is_not_counted() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut awake = Awake::starting(t0, ms(25), ms(250));
        awake.round_at(t0 + ms(25));
        // Late, but by less than half the timeout: this side ran.
        awake.round_at(t0 + ms(170));
        assert_eq!(awake.ran_between(t0, t0 + ms(170)), ms(170));
        // A round 700 ms after the last: a pause of 675 ms (less the
        // period it meant to sleep), counted out of whatever it overlaps.
        awake.round_at(t0 + ms(870));
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

    #[test]
    fn a_run_loop_is_stuck_only_for_time_this_side_ran() {
        let pulse = Pulse::new();
        std::thread::sleep(Duration::from_millis(30));
        let ms = Duration::from_millis;
        assert!(pulse.stuck_for(ms(20), |t| t.elapsed()).unwrap() >= ms(30));
        // Most of that time this side was paused.
        assert!(pulse.stuck_for(ms(20), |t| t.elapsed().saturating_sub(ms(25))).is_none());
        pulse.waiting(true);
        std::thread::sleep(ms(30));
        assert!(pulse.stuck_for(ms(20), |t| t.elapsed()).is_none());
    }
}
