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
