//! Figures from samples and from tools' output.

/// Median of a sample (NaN for none).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The first number before `unit` in `text` (e.g. "3.95 k iops").
pub fn number_before(text: &str, unit: &str) -> Option<f64> {
    let i = text.find(unit)?;
    let words: Vec<&str> = text[..i].split_whitespace().collect();
    let (num, scale) = match words.last()? {
        &"k" => (words.get(words.len() - 2)?, 1e3),
        &"M" => (words.get(words.len() - 2)?, 1e6),
        w => (w, 1.0),
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// The number right after `prefix` in `text` (e.g. "paused it 7 ms" with
/// "paused it ").
pub fn number_after(text: &str, prefix: &str) -> Option<f64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
}

/// CPU time (user and system, all threads) a process has used so far,
/// in seconds, from `/proc/PID/stat`.
pub fn process_cpu_secs(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    cpu_secs_of_stat(&stat, clock_ticks_per_sec()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("/proc/{pid}/stat has no CPU times"))
    })
}

/// The kernel's unit of CPU times in `/proc` (`USER_HZ`).
fn clock_ticks_per_sec() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

/// utime + stime of a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from the last `)`: state is the first after it,
/// utime the 12th, stime the 13th.
fn cpu_secs_of_stat(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / ticks_per_sec)
}

/// What each thread of a process has had of the host so far, summed over
/// threads of one name: seconds on a CPU and seconds runnable but waiting
/// for one (from `/proc/PID/task/*/schedstat`, nanoseconds). Threads that
/// ended are not counted.
pub fn thread_times(pid: u32) -> std::io::Result<std::collections::BTreeMap<String, ThreadTime>> {
    let mut times = std::collections::BTreeMap::<String, ThreadTime>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(sched)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("schedstat")))
        else {
            continue;
        };
        if let Some(t) = thread_time_of_schedstat(&sched) {
            let slot = times.entry(comm.trim().to_string()).or_default();
            slot.cpu_secs += t.cpu_secs;
            slot.wait_secs += t.wait_secs;
            slot.slices += t.slices;
        }
    }
    Ok(times)
}

/// Keep every thread of process `pid` on CPU `cpu` (threads it starts
/// later inherit the mask of the thread that starts them): a benchmark
/// that models each side of a pair as a host of its own. Threads that end
/// meanwhile are skipped; call it again once the process has started its
/// threads, in case one was started from a thread not yet pinned.
pub fn pin_to_cpu(pid: u32, cpu: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("there is no CPU {cpu}"))?;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("no process {pid}"))? {
        let tid = task?.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
        if let Some(tid) = tid {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
    Ok(())
}

/// A thread's time on a CPU and waiting for one, in seconds, and how many
/// times it was put on a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThreadTime {
    pub cpu_secs: f64,
    pub wait_secs: f64,
    pub slices: f64,
}

/// `schedstat` is "on-CPU ns, waiting ns, timeslices".
fn thread_time_of_schedstat(line: &str) -> Option<ThreadTime> {
    let mut f = line.split_whitespace().map(|w| w.parse::<u64>().ok());
    let (cpu, wait, slices) = (f.next()??, f.next()??, f.next()??);
    Some(ThreadTime { cpu_secs: cpu as f64 / 1e9, wait_secs: wait as f64 / 1e9, slices: slices as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_come_from_the_fields_after_the_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 3 0 1 2 3";
        assert_eq!(cpu_secs_of_stat(stat, 100.0), Some(3.8));
        assert_eq!(cpu_secs_of_stat("4242 (x) S 1", 100.0), None);
        assert_eq!(cpu_secs_of_stat("no parenthesis", 100.0), None);
        // This process's own line parses; a process that does not exist is an error.
        assert!(process_cpu_secs(std::process::id()).unwrap() >= 0.0);
        assert!(process_cpu_secs(u32::MAX).is_err());
    }

    #[test]
    fn a_pinned_process_runs_on_that_cpu_only() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        pin_to_cpu(child.id(), 0).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(allowed, "0");
        assert!(pin_to_cpu(child.id(), 0).is_err(), "the process is gone");
        assert!(pin_to_cpu(std::process::id(), 100_000).is_err());
    }

    #[test]
    fn thread_times_come_from_schedstat() {
        let t = thread_time_of_schedstat("2500000000 125000000 77\n").unwrap();
        assert_eq!((t.cpu_secs, t.wait_secs, t.slices), (2.5, 0.125, 77.0));
        assert_eq!(thread_time_of_schedstat("12"), None);
        // This process has at least its own (test) thread.
        let mine = thread_times(std::process::id()).unwrap();
        assert!(!mine.is_empty() && mine.values().all(|t| t.cpu_secs >= 0.0), "{mine:?}");
        assert!(thread_times(u32::MAX).is_err());
    }

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert!(median(&mut []).is_nan());
        assert_eq!(number_before("read 3.95 k iops", "iops"), Some(3950.0));
        assert_eq!(number_before("12.5 MB/s", "MB/s"), Some(12.5));
        assert_eq!(number_before("no figure", "iops"), None);
        assert_eq!(number_after("the last paused it 7 ms (the first 61 ms)", "paused it "), Some(7.0));
        assert_eq!(number_after("nothing", "paused it "), None);
    }
}
