//! Record and replay end to end: the real kernel recorded with console
//! input, entropy and idle time, replayed from the log alone; and every way
//! a log can be bad.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const APPEND: &str = "console=ttyS0 quiet cryptomgr.notests initcall_blacklist=jent_mod_init";
/// State hashes every 0.25 s of guest time: a hash of 256 MiB of RAM takes
/// ~18 ms, and guest time follows host time, so hashing much more often
/// would eat the guest's run time.
const HASH_EVERY: &str = "250000000";

fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// Kernel and initramfs of the default guest.
fn guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = lockstep().args(["guest", "build"]).output().unwrap();
        assert!(out.status.success(), "guest build failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        (PathBuf::from(lines.next().unwrap()), PathBuf::from(lines.next().unwrap()))
    })
}

/// Record a boot of the initramfs guest that runs `script` typed on its
/// console, with state hashes.
fn record(log: &Path, script: &str, extra: &[&str]) -> Output {
    let (kernel, initrd) = guest();
    let mut child = lockstep()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--append", APPEND, "--mem", "256M", "--hash-every", HASH_EVERY, "--record"])
        .arg(log)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn replay(log: &Path, extra: &[&str]) -> Output {
    lockstep().arg("replay").arg(log).args(["--hash-every", HASH_EVERY]).args(extra).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `hash`, `position` and `state-hash` lines of a run's stderr.
fn hash_lines(stderr: &[u8]) -> Vec<String> {
    text(stderr)
        .lines()
        .filter(|l| l.starts_with("hash ") || l.starts_with("position ") || l.starts_with("state-hash "))
        .map(str::to_string)
        .collect()
}

fn the_recording() -> &'static (PathBuf, Output) {
    static REC: OnceLock<(PathBuf, Output)> = OnceLock::new();
    REC.get_or_init(|| {
        let log = common::tmp_dir("replay").join("boot.log");
        let script = "echo typed-$((6*7)); head -c 16 /dev/hwrng | od -An -tx1; sleep 1; poweroff\n";
        let out = record(&log, script, &[]);
        assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
        (log, out)
    })
}

#[test]
fn a_recorded_boot_replays_identically() {
    let (log, rec) = the_recording();
    let console = text(&rec.stdout);
    assert!(console.contains("typed-42"), "{console}");
    let hashes = hash_lines(&rec.stderr);
    assert!(hashes.len() > 5, "hashes printed: {hashes:?}");
    assert!(hashes.last().unwrap().starts_with("state-hash "));
    let rep = replay(log, &[]);
    assert!(rep.status.success(), "{}", text(&rep.stderr));
    assert_eq!(text(&rep.stdout), console, "identical console output");
    assert_eq!(hash_lines(&rep.stderr), hashes, "identical hash sequence and final state");
}

/// The engines are interchangeable: a boot recorded with the translation
/// tier replays with the interpreter to the same hash at every point, and
/// one recorded with the interpreter replays with the translation tier.
#[test]
fn a_recording_made_with_one_engine_replays_with_the_other() {
    let (log, rec) = the_recording();
    let rep = replay(log, &["--engine", "interp"]);
    assert!(rep.status.success(), "{}", text(&rep.stderr));
    assert_eq!(hash_lines(&rep.stderr), hash_lines(&rec.stderr), "jit recording, interp replay");

    let log = common::tmp_dir("replay-engines").join("interp.log");
    let rec =
        record(&log, "echo typed-$((6*7)); head -c 16 /dev/hwrng | od -An -tx1; poweroff\n", &["--engine", "interp"]);
    assert!(rec.status.success(), "{}", text(&rec.stderr));
    assert!(hash_lines(&rec.stderr).len() > 5);
    let rep = replay(&log, &["--engine", "jit"]);
    assert!(rep.status.success(), "{}", text(&rep.stderr));
    assert_eq!(hash_lines(&rep.stderr), hash_lines(&rec.stderr), "interp recording, jit replay");
}

/// The recording, rewritten record by record by `edit` (with valid
/// checksums) into `name`.
fn rewritten(name: &str, mut edit: impl FnMut(&mut replay::Record)) -> PathBuf {
    let (log, _) = the_recording();
    let bytes = std::fs::read(log).unwrap();
    let (mut reader, meta) = replay::LogReader::new(&bytes[..]).unwrap();
    let out = common::tmp_dir("replay").join(name);
    let mut w = replay::LogWriter::new(std::fs::File::create(&out).unwrap(), &meta).unwrap();
    while let Some(mut r) = reader.next_record().unwrap() {
        edit(&mut r);
        w.append(&r).unwrap();
    }
    out
}

#[test]
fn a_tampered_hash_is_reported_as_a_divergence_interval() {
    // Rewrite the log (valid checksums) with the 5th state hash changed.
    let (mut n, mut at) = (0, 0);
    let bad = rewritten("tampered.log", |r| {
        if let replay::Event::Hash(h) = &mut r.event {
            n += 1;
            if n == 5 {
                *h ^= 1;
                at = r.position;
            }
        }
    });
    let out = replay(&bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let every: u64 = HASH_EVERY.parse().unwrap();
    assert!(
        err.contains(&format!("replay diverged between positions {} and {at}", at - every)),
        "the first bad interval is named: {err}"
    );
}

/// 14.8 A record whose position is behind the machine's is a divergence
/// (it used to be applied late, silently): the record after the first
/// idle skip is moved back into the skipped stretch.
#[test]
fn a_record_behind_the_machine_is_a_divergence() {
    let (mut skipped_to, mut at) = (None, None);
    let bad = rewritten("behind.log", |r| match (&r.event, skipped_to, at) {
        (replay::Event::Skip(n), None, None) if *n >= 2 => skipped_to = Some((r.position, *n)),
        (replay::Event::Entropy(_), _, _) => {}
        (_, Some((p, n)), None) => {
            r.position = p + n / 2;
            at = Some(r.position);
        }
        _ => {}
    });
    let at = at.expect("the recording has an idle skip followed by a record");
    let out = replay(&bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("the log has a record at position {at}, behind the machine")), "{err}");
}

#[test]
fn truncated_corrupt_foreign_and_other_version_logs() {
    let (log, rec) = the_recording();
    let bytes = std::fs::read(log).unwrap();
    let dir = common::tmp_dir("replay");

    // Truncated mid-record: replays up to the last whole record, says where.
    let cut = dir.join("cut.log");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3 + 3]).unwrap();
    let out = replay(&cut, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("truncated at byte"), "{err}");
    let replayed = text(&out.stdout);
    assert!(text(&rec.stdout).starts_with(&replayed), "the replayed console is a prefix of the recorded one");
    let rec_hashes = hash_lines(&rec.stderr);
    let got: Vec<String> = hash_lines(&out.stderr).into_iter().filter(|l| l.starts_with("hash ")).collect();
    assert!(!got.is_empty() && rec_hashes.starts_with(&got), "hashes so far agree");

    // A flipped byte: a checksum error with its offset.
    let mut bad = bytes.clone();
    let at = bytes.len() / 2;
    bad[at] ^= 0x10;
    let corrupt = dir.join("corrupt.log");
    std::fs::write(&corrupt, &bad).unwrap();
    let out = replay(&corrupt, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("corrupt at byte offset"), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "{err}");

    // Another format version.
    let mut v2 = bytes.clone();
    v2[8] = 99;
    let other = dir.join("v99.log");
    std::fs::write(&other, &v2).unwrap();
    let err = text(&replay(&other, &[]).stderr);
    assert!(err.contains("format version 99"), "{err}");

    // Not a log at all, and a missing one.
    let junk = dir.join("junk.log");
    std::fs::write(&junk, b"just some text").unwrap();
    let out = replay(&junk, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a lockstep event log"));
    let out = replay(&dir.join("missing.log"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot open the event log"));
}

#[test]
fn a_log_of_another_vm_is_refused() {
    // Record a tiny run against a copy of the initramfs, then change it.
    let (kernel, initrd) = guest();
    let dir = common::tmp_dir("replay-other");
    let my_initrd = dir.join("initrd.cpio");
    std::fs::copy(initrd, &my_initrd).unwrap();
    let log = dir.join("other.log");
    let out = lockstep()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&my_initrd)
        .args(["--append", &format!("{APPEND} lockstep.run=poweroff"), "--record"])
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(replay(&log, &[]).status.success());
    let mut f = std::fs::OpenOptions::new().append(true).open(&my_initrd).unwrap();
    f.write_all(&[0u8; 512]).unwrap();
    drop(f);
    let out = replay(&log, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not the one this log was recorded with"), "{}", text(&out.stderr));
}

/// SIGKILL the recorder mid-run: the log it leaves replays to its last
/// record, and what replay shows agrees with what the recorder showed.
#[test]
fn a_killed_recorder_leaves_a_log_that_replays() {
    let (kernel, initrd) = guest();
    let log = common::tmp_dir("replay-kill").join("killed.log");
    let _ = std::fs::remove_file(&log); // a previous run's log must not count
    let mut child = lockstep()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--append", APPEND, "--mem", "256M", "--hash-every", HASH_EVERY, "--record"])
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"while true; do echo tick-$((i=i+1)); sleep 0.2; done\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    // Kill it mid-run, once the loop has visibly run a while.
    let t = Instant::now();
    while !text(&seen.lock().unwrap()).contains("tick-4") && t.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    let recorded = text(&seen.lock().unwrap());
    assert!(recorded.contains("tick-3"), "stdout: {recorded}\nlog: {:?}", std::fs::metadata(&log).map(|m| m.len()));
    let out = replay(&log, &[]);
    let replayed = text(&out.stdout);
    assert!(replayed.contains("tick-1"), "replay got past the typed command: {replayed}");
    assert!(recorded.starts_with(&replayed), "replayed console is a prefix of the recorded one");
    let err = text(&out.stderr);
    assert!(err.contains("replay stopped at position"), "{err}");
}

/// A recording with a disk and snapshots: replay from the start and from a
/// snapshot in the middle both end with the recorded state and the same
/// disk image as the recorded run.
#[test]
fn replay_from_a_snapshot_matches_the_recording_and_its_disk() {
    let dir = common::tmp_dir("replay-snap");
    let _ = std::fs::remove_dir_all(dir.join("s.log.snapshots"));
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let start = dir.join("disk-at-start.img");
    std::fs::copy(&disk, &start).unwrap();
    let log = dir.join("s.log");
    let script = "sleep 1; dd if=/dev/hwrng of=/dev/vda bs=4k count=4 conv=fsync 2>/dev/null; echo wrote; \
                  sleep 1; dd if=/dev/hwrng of=/dev/vda bs=4k seek=100 count=2 conv=fsync 2>/dev/null; poweroff\n";
    let rec = record(&log, script, &["--disk", disk.to_str().unwrap(), "--snapshot-every", "1000000000"]);
    assert!(rec.status.success(), "{}", text(&rec.stderr));
    let hashes = hash_lines(&rec.stderr);
    let recorded_disk = std::fs::read(&disk).unwrap();
    assert_ne!(recorded_disk, std::fs::read(&start).unwrap(), "the guest wrote its disk");
    let snaps: Vec<String> =
        text(&rec.stderr).lines().filter(|l| l.starts_with("snapshot ")).map(String::from).collect();
    assert!(snaps.len() >= 2 && snaps[0].contains(" full ") && snaps[1].contains(" delta "), "{snaps:?}");

    // From the start, on a copy of the disk as it was then.
    let copy = dir.join("replay-disk.img");
    std::fs::copy(&start, &copy).unwrap();
    let out = replay(&log, &["--disk", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(hash_lines(&out.stderr), hashes);
    assert_eq!(std::fs::read(&copy).unwrap(), recorded_disk, "same disk image");
    assert_eq!(text(&out.stdout), text(&rec.stdout));

    // From the second snapshot: same hashes from there on, same end, same disk.
    let snap_path = snaps[1].split_whitespace().last().unwrap().to_string();
    let snap_pos: u64 = snaps[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    std::fs::copy(&start, &copy).unwrap();
    let out = replay(&log, &["--disk", copy.to_str().unwrap(), "--from", &snap_path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after: Vec<String> = hashes
        .iter()
        .filter(|l| !l.starts_with("hash ") || l.split(' ').nth(1).unwrap().parse::<u64>().unwrap() > snap_pos)
        .cloned()
        .collect();
    assert_eq!(hash_lines(&out.stderr), after);
    assert_eq!(std::fs::read(&copy).unwrap(), recorded_disk, "same disk image from the snapshot");

    // A disk that is not the recording's starting disk is refused.
    let out = replay(&log, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("does not hold what it held when the recording started"));
}

/// Property: random input streams (console bytes and network frames at
/// random run-loop points, idle skips as the machine decides) replay to the
/// same machine when fed back at their recorded positions.
#[test]
fn random_event_streams_replay_identically() {
    use machine::{HostInput, HostIo, Machine, RunTo};
    use std::time::Duration;

    #[derive(Clone, Debug)]
    enum Ev {
        Input(HostInput),
        Skip(u64),
    }
    struct RandomIo {
        x: u64,
        log: Vec<(u64, Ev)>,
    }
    impl RandomIo {
        fn next(&mut self) -> u64 {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            self.x
        }
    }
    impl HostIo for RandomIo {
        fn console_write(&mut self, _: &[u8]) {}
        fn wait(&mut self, _: Duration) -> HostInput {
            match self.next() % 16 {
                0 => {
                    let n = 1 + self.next() % 12;
                    let bytes = (0..n)
                        .map(|_| match self.next() % 10 {
                            0 => b'\n',
                            1 => b' ',
                            k => b'a' + (k as u8 * 3 + self.next() as u8 % 3) % 26,
                        })
                        .collect();
                    HostInput::Console(bytes)
                }
                1 => {
                    let len = 12 + 14 + (self.next() % 600) as usize;
                    let mut data: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
                    data[..12].fill(0); // virtio-net header: nothing to offload
                    HostInput::Frame { nic: 0, data }
                }
                _ => HostInput::Nothing,
            }
        }
        fn delivered(&mut self, pos: u64, input: &HostInput) {
            self.log.push((pos, Ev::Input(input.clone())));
        }
        fn skipped(&mut self, pos: u64, steps: u64) {
            self.log.push((pos, Ev::Skip(steps)));
        }
    }
    struct Quiet;
    impl HostIo for Quiet {
        fn console_write(&mut self, _: &[u8]) {}
        fn wait(&mut self, _: Duration) -> HostInput {
            HostInput::Nothing
        }
    }

    let (kernel, initrd) = guest();
    let machine = || {
        let mut m = Machine::new_firmware(128 << 20);
        m.realtime = false;
        m.rng_seed = Some([3; 32]);
        m.add_virtio(Box::new(machine::virtio::net::Net::new([0x52, 0x54, 0, 1, 2, 3]))).unwrap();
        m.boot_linux(kernel, Some(initrd), APPEND).unwrap();
        m
    };
    const LIMIT: u64 = 1_200_000_000;
    for seed in [0x1234_5678_u64, 0xdead_beef] {
        let mut live = machine();
        let mut io = RandomIo { x: seed, log: Vec::new() };
        let stop = live.run_linux(&mut io, Some(LIMIT)).unwrap();
        assert_eq!(stop, machine::Stop::Limit);
        let inputs = io.log.iter().filter(|e| matches!(e.1, Ev::Input(_))).count();
        assert!(inputs > 5, "the stream delivered inputs ({inputs})");

        let mut again = machine();
        for (pos, ev) in io.log {
            assert_eq!(again.run_to(&mut Quiet, pos).unwrap(), RunTo::Reached, "seed {seed:#x}: diverged before {pos}");
            match ev {
                Ev::Input(i) => {
                    again.inject(i);
                }
                Ev::Skip(n) => again.skip(n),
            }
        }
        assert_eq!(again.run_to(&mut Quiet, LIMIT).unwrap(), RunTo::Reached);
        assert_eq!(again.hart.position(), live.hart.position());
        assert_eq!(again.state_hash(), live.state_hash(), "seed {seed:#x}: same machine after replay");
    }
}
