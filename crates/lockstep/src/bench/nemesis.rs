//! `bench nemesis`: random faults against a pair of the default guest
//! under the numbered-write client for a given time (see `lab::nemesis`),
//! then figures per kind of fault: how long until the pair was protected
//! again, and the client's longest pause.

use anyhow::Result;
use lab::nemesis::{Fault, Options};
use lab::stats::median;
use std::time::Duration;

pub fn nemesis(minutes: u64, seed: Option<u64>) -> Result<()> {
    let (exe, g, dir) = super::pair::setup("nemesis")?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("nemesis: seed {seed} (replay with --seed {seed}), {minutes} min");
    let opts =
        Options { seed, steps: None, duration: Some(Duration::from_secs(minutes * 60)), faults: Fault::ALL.to_vec() };
    let report = lab::nemesis::run(&exe, &g, &dir, "bnem", 57, &opts, &mut |line| println!("  {line}"))
        .map_err(|e| e.context(format!("nemesis seed {seed}")))?;
    println!(
        "{} steps, {} writes acknowledged and read back, none lost, the connection never reset",
        report.steps.len(),
        report.writes
    );
    println!("{:16} {:>5} {:>22} {:>22}", "fault", "n", "protected again (ms)", "client pause (ms)");
    println!("{:16} {:>5} {:>11}{:>11} {:>11}{:>11}", "", "", "median", "max", "median", "max");
    for fault in Fault::ALL {
        let steps: Vec<_> = report.steps.iter().filter(|s| s.fault == fault).collect();
        if steps.is_empty() {
            continue;
        }
        let mut rec: Vec<f64> = steps.iter().map(|s| s.recovered.as_secs_f64() * 1e3).collect();
        let mut pause: Vec<f64> = steps.iter().map(|s| s.client_pause.as_secs_f64() * 1e3).collect();
        let (rmax, pmax) = (rec.iter().cloned().fold(0.0, f64::max), pause.iter().cloned().fold(0.0, f64::max));
        println!(
            "{:16} {:>5} {:>11.0}{:>11.0} {:>11.0}{:>11.0}",
            format!("{fault:?}"),
            steps.len(),
            median(&mut rec),
            rmax,
            median(&mut pause),
            pmax
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
