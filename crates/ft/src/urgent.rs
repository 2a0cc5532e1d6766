//! Threads on the path of held output: the primary's receivers of
//! acknowledgements, the secondary's receiver of the log, and the tap's
//! reader. While both sides run their guests flat out, a thread that wakes
//! for a message waits for a CPU behind a vCPU thread (on a two-core host,
//! `bench pair` measured ~100 µs per request for the secondary's receiver),
//! and every microsecond of that is added to the time the primary holds
//! the guest's output. These threads block on a socket almost all the
//! time, so running them ahead of the vCPU threads costs the guest little.

/// The nice value given to such threads (the vCPU threads keep 0).
const NICE: i32 = -10;

/// Run the calling thread ahead of ordinary threads (nice -10), if this
/// process may (it needs `CAP_SYS_NICE`); otherwise leave it as it is.
pub fn run_urgently() {
    // SAFETY: setpriority on PRIO_PROCESS with a thread id changes only that
    // thread's nice value on Linux; no memory is passed or kept.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if result != 0 {
        tracing::debug!("this thread keeps its priority: {}", std::io::Error::last_os_error());
    }
}

/// Start a named thread that runs urgently (see [`run_urgently`]).
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    crate::spawn_named(name, move || {
        run_urgently();
        f()
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_urgent_thread_runs_ahead_of_ordinary_ones() {
        let nice = || {
            // SAFETY: getpriority reads the calling thread's nice value.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        };
        let ordinary = nice();
        let (tx, rx) = std::sync::mpsc::channel();
        super::spawn("urgent-test", move || {
            tx.send((std::thread::current().name().map(String::from), nice())).unwrap();
        });
        let (name, urgent) = rx.recv().unwrap();
        assert_eq!(name.as_deref(), Some("urgent-test"));
        // Root (as the tests run) may raise it; anyone else keeps its own.
        // SAFETY: geteuid reads this process's effective user id.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(urgent, if root { super::NICE } else { ordinary });
    }
}
