//! `lockstep replay`: a recording replayed from its file. The header
//! rebuilds the machine (the kernel's, initrd's and disk's contents are
//! checked against it); `--from` starts at a snapshot taken while
//! recording and the log after its marker.

use super::{Fetched, MachineMaker, ReplayError, ReplayOpts as ReplayerOpts, Replayer, Source, Step};
use crate::host::log::report;
use crate::vm::record::Meta;
use crate::vm::{file_hash, print_final};
use crate::Outcome;
use anyhow::{anyhow, bail, Context, Result};
use replay::{EndReason, Event, LogReader, Record};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Overrides for a replay.
#[derive(Default)]
pub struct ReplayOpts {
    /// Use this disk image instead of the recorded path.
    pub disk: Option<PathBuf>,
    pub hash_every: Option<u64>,
    /// Start from this snapshot (and the log after its marker).
    pub from: Option<PathBuf>,
}

/// Records from a recording, one at a time; its end is the end of the
/// file (a truncated tail is where the recorder stopped).
pub struct FileSource {
    reader: LogReader<BufReader<File>>,
    path: PathBuf,
}

impl FileSource {
    /// Open a recording: its reader and its header.
    pub fn open(path: &Path) -> Result<(FileSource, Meta)> {
        let file = File::open(path).with_context(|| format!("cannot open the event log '{}'", path.display()))?;
        let (reader, meta) = LogReader::new(BufReader::new(file)).map_err(|e| anyhow!("'{}': {e}", path.display()))?;
        let meta: Meta = serde_json::from_slice(&meta)
            .map_err(|e| anyhow!("'{}': the header's VM description is unreadable: {e}", path.display()))?;
        Ok((FileSource { reader, path: path.to_path_buf() }, meta))
    }

    fn next(&mut self) -> Result<Option<Record>> {
        self.reader.next_record().map_err(|e| anyhow!("'{}': {e}", self.path.display()))
    }
}

impl Source for FileSource {
    fn fetch(&mut self, _: Duration) -> Result<Fetched, ReplayError> {
        Ok(match self.next()? {
            Some(r) => Fetched::Records(vec![r]),
            None => Fetched::Closed(match self.reader.truncated_at {
                Some(off) => format!("the log is truncated at byte {off} (the recorder stopped there)"),
                None => "the log ends without an end record".to_string(),
            }),
        })
    }
}

/// Replay a recording. Stops with an error at the first divergence.
pub fn replay(log: &Path, opts: &ReplayOpts) -> Result<Outcome> {
    let (mut source, meta) = FileSource::open(log)?;
    let mut vm = meta.vm.clone();
    if file_hash(&vm.kernel)? != meta.kernel_hash {
        bail!("kernel '{}' is not the one this log was recorded with", vm.kernel.display());
    }
    if let (Some(p), Some(h)) = (&vm.initrd, &meta.initrd_hash) {
        if &file_hash(p)? != h {
            bail!("initrd '{}' is not the one this log was recorded with", p.display());
        }
    }
    if let Some(d) = &opts.disk {
        match &mut vm.disk {
            Some((p, _)) => *p = d.clone(),
            None => bail!("--disk: this recording had no disk"),
        }
    }
    if vm.disk_hash()? != meta.disk_hash {
        let p = vm.disk.as_ref().map(|(p, _)| p.display().to_string()).unwrap_or_default();
        bail!(
            "disk '{p}' does not hold what it held when the recording started: replay needs a copy taken before \
             recording (--disk COPY)"
        );
    }
    // The first record is the boot seed; the log's entropy records before
    // the first other record go to the machine's feed.
    let maker = MachineMaker::new(&vm, opts.hash_every);
    let seed = match source.next()? {
        Some(Record { event: Event::Seed(s), .. }) => s,
        _ => bail!("'{}': the log does not start with a boot record", log.display()),
    };
    let mut m = maker.machine(seed)?;
    if let Some(from) = &opts.from {
        let chain = machine::snapshot::Snapshot::read_chain(from)?;
        let id = chain.last().map(|(_, id)| *id).unwrap_or(0);
        m.restore(&chain)?;
        // Skip the log up to this snapshot's marker.
        loop {
            match source.next()? {
                Some(Record { event: Event::Snapshot(i), .. }) if i == id => break,
                Some(_) => {}
                None => bail!("'{}' has no marker of snapshot '{}'", log.display(), from.display()),
            }
        }
        maker.drop_entropy();
        report(&format!("replay: starting from the snapshot at position {}", m.hart.position().0));
    }
    let mut r = Replayer::new(
        source,
        m,
        maker,
        ReplayerOpts {
            hash_every: opts.hash_every,
            print_hashes: opts.hash_every.is_some(),
            mac: None,
            keep_unreleased: false,
        },
    );
    let outcome = loop {
        match r.step(Duration::ZERO) {
            Ok(Step::Progress | Step::NeedMore) => {}
            Ok(Step::Ended(reason)) => {
                break if reason == EndReason::Panic { Outcome::GuestFailure } else { Outcome::Success }
            }
            Ok(Step::Exhausted(end) | Step::RebootUnseeded(end)) => {
                let pos = r.machine().hart.position().0;
                report(&format!("replay stopped at position {pos}: {end}"));
                print_final(r.machine_mut());
                bail!("{end}; replayed up to position {pos}");
            }
            Err(ReplayError::Log(e)) => bail!("'{}': {e}", log.display()),
            Err(e) => return Err(e.into()),
        }
    };
    if r.frames_out() > 0 {
        report(&format!("replay: the guest sent {} network frames (not delivered)", r.frames_out()));
    }
    print_final(r.machine_mut());
    Ok(outcome)
}
