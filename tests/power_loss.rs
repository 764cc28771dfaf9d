//! Power-loss simulation for the active segment, the seal sequence and the
//! upload journal.
//!
//! A workload drives the real library code (`ActiveSegment`, `seal_segment`,
//! `Journal`) on a real directory. Every persist step the code takes
//! (create, write, length change, msync of a range, fsync, fdatasync,
//! rename, unlink, directory fsync) goes through the library's persist seam
//! (`tierindex::durable`), which reports it to this test's observer as it
//! completes; the test reads the file's bytes at that moment and applies the
//! step to [`SimDisk`], a model of a disk that keeps, per file, what is
//! durable apart from what was written since the last sync, and per
//! directory the durable entries apart from the creates, renames and unlinks
//! not yet followed by a directory fsync. Nothing becomes durable in the
//! model unless the code reported the sync: a sync the library does not
//! make is one the model never applies. Bytes written into the mmap by
//! appends (no system call) are found by reading the file after each
//! append; they stay unsynced until a reported msync or fsync covers them.
//! A crash state can be taken after each reported step.
//!
//! At a simulated power cut, one crash state is materialised into a fresh
//! directory:
//! - each 4 KiB page that was written since it was last synced is, on its
//!   own, dropped (its durable content), kept (any version it had since the
//!   last sync: the kernel may have written it back at any moment, in any
//!   order) or garbled (a tear at 8, 64 or 512-byte granularity mixing the
//!   durable content, one unsynced version, and random bytes in place of the
//!   bytes that version changed);
//! - a file whose length changed since its last sync gets its durable length
//!   or any length it had since, sometimes plus an overhang of zeros or
//!   garbage;
//! - each pending directory operation is kept or dropped on its own, replayed
//!   in order over the durable entries (a dropped create leaves nothing, a
//!   dropped rename leaves the old name, a dropped unlink brings the file
//!   back).
//!
//! The real start-up then runs on it (`IndexWriter::open` for segments,
//! `Journal::open` for the journal) and the result is checked against a model
//! the test keeps itself:
//! - start-up never fails;
//! - every entry acknowledged by a flush is found, exactly once, in the
//!   segment it was appended to; each segment holds what was appended to
//!   it, nothing invented, gaps only among unacknowledged entries (salvage
//!   by item keeps an unflushed item that reached the disk after a torn one);
//! - a `.seg` present in the crash state is still there, byte for byte, with
//!   the CRC it was sealed with; every `.seg` left passes the full check; no
//!   `.seg.tmp` or unknown file is left;
//! - appending and flushing after recovery works, and a second start-up is
//!   clean and finds the same entries plus the new one;
//! - the journal replays to a state the writer had at a sync point at least as
//!   new as the last acknowledged append (or compaction), accepts a new append,
//!   and replays to that after a reopen.
//!
//! Some crash states become the starting point of the next "generation": the
//! workload goes on from the recovered directory, so crash, recover, write,
//! crash chains are covered too.
//!
//! Not modelled: I/O errors (a failed fsync or msync, ENOSPC); a crash in the
//! middle of start-up itself; a process crash whose page cache later meets a
//! power cut; damage to bytes that were already durable (bit rot, and torn
//! writes of bytes that did not change: the "powersafe overwrite" assumption
//! of `docs/format/segment.md`); metadata other than length and names
//! (extents, times). The seam's observer is per thread. At the sizes used
//! here a seal writes on the workload's thread (below
//! `PARALLEL_MIN_ITEMS`); a larger one writes from helper threads, seen
//! only at the seal's fsync (which reads the whole file). Every sync the
//! workload depends on is taken on the workload's thread.
//!
//! `TIERINDEX_POWER_LOSS_STATES` sets the crash states per campaign (default
//! 2000), `TIERINDEX_POWER_LOSS_SEED` the seed (decimal or 0x-hex),
//! `TIERINDEX_POWER_LOSS_DIR` where the scratch directories go (default
//! `/dev/shm` when usable, else the temp directory).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use fastrand::Rng;
use tierindex::datadir::{DataDir, JOURNAL_DIR, QUARANTINE_DIR, SEGMENTS_DIR};
use tierindex::durable::seam::{self, Step};
use tierindex::index::{IndexConfig, IndexWriter, seal_segment};
use tierindex::journal::{Journal, JournalOptions, Record, SegmentRecord, SegmentState, TMP_FILE};
use tierindex::segment::SealedMeta;
use tierindex::segment::active::{self, ActiveSegment, active_file_name};
use tierindex::segment::sealed::{SealedSegment, sealed_file_name, sealed_tmp_name};
use tierindex::{Entry, Error, SegmentId, TimeRange};

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

const DEFAULT_STATES: usize = 2000;
const DEFAULT_SEED: u64 = 0x7031_0d15_c0de_5eed;
/// The unit the simulated disk tracks (the kernel's page size on x86-64).
const PAGE: usize = 4096;
/// Distinct keys in the segment workloads (lookups enumerate all of them).
const KEYS: usize = 7;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn states_per_campaign() -> usize {
    env_u64("TIERINDEX_POWER_LOSS_STATES").map_or(DEFAULT_STATES, |v| v as usize)
}

fn master_seed() -> u64 {
    env_u64("TIERINDEX_POWER_LOSS_SEED").unwrap_or(DEFAULT_SEED)
}

fn scratch_base() -> PathBuf {
    if let Some(d) = std::env::var_os("TIERINDEX_POWER_LOSS_DIR") {
        return d.into();
    }
    // Start-up fsyncs a lot; on tmpfs that costs nothing, and the simulation
    // decides what survives anyway.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

// ---------------------------------------------------------------------------
// The simulated disk
// ---------------------------------------------------------------------------

type Page = Box<[u8]>;

fn zero_page() -> Page {
    vec![0u8; PAGE].into_boxed_slice()
}

/// One page of a file: its durable content and every version it had since.
#[derive(Clone)]
struct PageHist {
    durable: Page,
    /// Versions written since the last sync of this page, oldest first.
    pending: Vec<Page>,
}

impl PageHist {
    fn latest(&self) -> &[u8] {
        self.pending.last().unwrap_or(&self.durable)
    }

    fn settle(&mut self) {
        if let Some(p) = self.pending.pop() {
            self.durable = p;
        }
        self.pending.clear();
    }
}

#[derive(Clone, Default)]
struct SimFile {
    pages: Vec<PageHist>,
    durable_len: usize,
    /// Lengths the file had since its length was last synced, oldest first.
    pending_lens: Vec<usize>,
}

/// What happens to one unsynced page at the cut.
enum Fate {
    Drop,
    Keep,
    Garble,
}

/// How one crash state is drawn.
#[derive(Clone, Copy)]
struct How {
    preset: &'static str,
    /// Probability that an unsynced page is dropped; `keep` that it is kept;
    /// the rest is garbled.
    drop: f64,
    keep: f64,
    /// Probability that a pending directory operation survives.
    dir_keep: f64,
    /// Probability that a file with an unsynced length gets an overhang.
    overhang: f64,
}

fn random_how(rng: &mut Rng) -> How {
    let (preset, drop, keep) = match rng.u8(0..6) {
        0 => ("keep-all", 0.0, 1.0),
        1 => ("drop-all", 1.0, 0.0),
        2 => ("drop-or-keep", 0.5, 0.5),
        3 => ("thirds", 1.0 / 3.0, 1.0 / 3.0),
        4 => ("keep-or-garble", 0.0, 0.7),
        _ => {
            let d = rng.f64();
            ("random", d, rng.f64() * (1.0 - d))
        }
    };
    let dir_keep = match rng.u8(0..4) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.5,
        _ => rng.f64(),
    };
    let overhang = if rng.bool() { 0.0 } else { 0.3 };
    How {
        preset,
        drop,
        keep,
        dir_keep,
        overhang,
    }
}

impl How {
    fn describe(&self) -> String {
        format!(
            "{}(drop={:.2} keep={:.2} dir_keep={:.2} overhang={:.1})",
            self.preset, self.drop, self.keep, self.dir_keep, self.overhang
        )
    }

    fn fate(&self, rng: &mut Rng) -> Fate {
        let x = rng.f64();
        if x < self.drop {
            Fate::Drop
        } else if x < self.drop + self.keep {
            Fate::Keep
        } else {
            Fate::Garble
        }
    }
}

impl SimFile {
    fn latest_len(&self) -> usize {
        *self.pending_lens.last().unwrap_or(&self.durable_len)
    }

    fn durable(bytes: &[u8]) -> SimFile {
        let mut f = SimFile::default();
        f.write_image(bytes);
        f.fsync();
        f
    }

    /// The file now holds `img` (in the page cache, not synced).
    fn write_image(&mut self, img: &[u8]) {
        let n = img.len().div_ceil(PAGE);
        while self.pages.len() < n {
            self.pages.push(PageHist {
                durable: zero_page(),
                pending: Vec::new(),
            });
        }
        for (i, ph) in self.pages.iter_mut().enumerate() {
            let lo = (i * PAGE).min(img.len());
            let hi = ((i + 1) * PAGE).min(img.len());
            let src = &img[lo..hi];
            let latest = ph.latest();
            if latest[..src.len()] == *src && latest[src.len()..].iter().all(|&b| b == 0) {
                continue;
            }
            let mut p = zero_page();
            p[..src.len()].copy_from_slice(src);
            ph.pending.push(p);
        }
        if img.len() != self.latest_len() {
            self.pending_lens.push(img.len());
        }
    }

    /// msync of `[from, to)`: every page overlapping it becomes durable.
    fn sync_range(&mut self, from: usize, to: usize) {
        let end = to.div_ceil(PAGE).min(self.pages.len());
        for ph in &mut self.pages[(from / PAGE).min(end)..end] {
            ph.settle();
        }
    }

    /// fsync / fdatasync: every page and the length become durable.
    fn fsync(&mut self) {
        for ph in &mut self.pages {
            ph.settle();
        }
        self.durable_len = self.latest_len();
        self.pending_lens.clear();
    }

    fn pick_version<'a>(rng: &mut Rng, ph: &'a PageHist) -> &'a [u8] {
        if rng.bool() {
            ph.latest()
        } else {
            &ph.pending[rng.usize(0..ph.pending.len())]
        }
    }

    /// The file's content after a power cut drawn by `how`.
    fn crash_image(&self, rng: &mut Rng, how: &How) -> Vec<u8> {
        let max_len = self
            .pending_lens
            .iter()
            .copied()
            .chain([self.durable_len])
            .max()
            .unwrap_or(0);
        let mut len = self.durable_len;
        let mut overhang_garbage = false;
        if !self.pending_lens.is_empty() {
            let k = rng.usize(0..=self.pending_lens.len());
            if k > 0 {
                len = self.pending_lens[k - 1];
            }
            if rng.f64() < how.overhang {
                len = max_len + rng.usize(1..=PAGE);
                overhang_garbage = rng.bool();
            }
        }
        let cap = self.pages.len().max(len.div_ceil(PAGE)) * PAGE;
        let mut out = vec![0u8; cap];
        for (i, ph) in self.pages.iter().enumerate() {
            let dst = &mut out[i * PAGE..(i + 1) * PAGE];
            if ph.pending.is_empty() {
                dst.copy_from_slice(&ph.durable);
                continue;
            }
            match how.fate(rng) {
                Fate::Drop => dst.copy_from_slice(&ph.durable),
                Fate::Keep => dst.copy_from_slice(Self::pick_version(rng, ph)),
                Fate::Garble => {
                    let v = Self::pick_version(rng, ph);
                    let grain = [8usize, 64, 512][rng.usize(0..3)];
                    for c in (0..PAGE).step_by(grain) {
                        let r = c..c + grain;
                        match rng.u8(0..3) {
                            0 => dst[r.clone()].copy_from_slice(&ph.durable[r]),
                            1 => dst[r.clone()].copy_from_slice(&v[r]),
                            _ => {
                                for b in r {
                                    dst[b] = if v[b] != ph.durable[b] {
                                        rng.u8(..)
                                    } else {
                                        ph.durable[b]
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
        if overhang_garbage && len > max_len {
            rng.fill(&mut out[max_len..len]);
        }
        out.truncate(len);
        out
    }
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(String, usize),
    Rename(String, String, usize),
    Unlink(String, usize),
}

impl DirOp {
    fn apply(&self, map: &mut BTreeMap<String, usize>) {
        match self {
            DirOp::Link(name, ino) => {
                map.insert(name.clone(), *ino);
            }
            DirOp::Rename(from, to, ino) => {
                if map.get(from) == Some(ino) {
                    map.remove(from);
                }
                map.insert(to.clone(), *ino);
            }
            DirOp::Unlink(name, ino) => {
                if map.get(name) == Some(ino) {
                    map.remove(name);
                }
            }
        }
    }
}

#[derive(Clone, Default)]
struct SimDir {
    durable: BTreeMap<String, usize>,
    /// Operations since the last directory fsync, in order.
    pending: Vec<DirOp>,
}

impl SimDir {
    fn current(&self) -> BTreeMap<String, usize> {
        let mut m = self.durable.clone();
        for op in &self.pending {
            op.apply(&mut m);
        }
        m
    }
}

/// Directories (relative to a data directory) holding files (inodes).
#[derive(Clone, Default)]
struct SimDisk {
    dirs: BTreeMap<String, SimDir>,
    files: Vec<SimFile>,
}

/// A materialised crash state: directory -> file name -> bytes.
type Listing = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

impl SimDisk {
    fn with_dirs(dirs: &[&str]) -> SimDisk {
        SimDisk {
            dirs: dirs
                .iter()
                .map(|d| (d.to_string(), SimDir::default()))
                .collect(),
            files: Vec::new(),
        }
    }

    /// Everything under `root/<dir>` for each of `dirs`, all durable (what a
    /// completed start-up leaves: it syncs whatever it keeps or changes).
    fn from_real(root: &Path, dirs: &[&str]) -> io::Result<SimDisk> {
        let mut disk = SimDisk::with_dirs(dirs);
        for d in dirs {
            for ent in fs::read_dir(root.join(d))? {
                let ent = ent?;
                if !ent.file_type()?.is_file() {
                    continue;
                }
                let bytes = fs::read(ent.path())?;
                let ino = disk.files.len();
                disk.files.push(SimFile::durable(&bytes));
                let name = ent.file_name().to_string_lossy().into_owned();
                disk.dir(d).durable.insert(name, ino);
            }
        }
        Ok(disk)
    }

    fn dir(&mut self, dir: &str) -> &mut SimDir {
        self.dirs.get_mut(dir).expect("simulated directory")
    }

    /// `open(O_CREAT)` of a new name: a new empty inode, its name pending.
    fn create(&mut self, dir: &str, name: &str) -> usize {
        let ino = self.files.len();
        self.files.push(SimFile::default());
        self.dir(dir).pending.push(DirOp::Link(name.into(), ino));
        ino
    }

    fn ino(&self, dir: &str, name: &str) -> Option<usize> {
        self.dirs.get(dir)?.current().get(name).copied()
    }

    fn write(&mut self, ino: usize, img: &[u8]) {
        self.files[ino].write_image(img);
    }

    fn sync_range(&mut self, ino: usize, from: usize, to: usize) {
        self.files[ino].sync_range(from, to);
    }

    fn fsync(&mut self, ino: usize) {
        self.files[ino].fsync();
    }

    fn rename(&mut self, dir: &str, from: &str, to: &str) {
        let ino = self.ino(dir, from).expect("rename source exists");
        self.dir(dir)
            .pending
            .push(DirOp::Rename(from.into(), to.into(), ino));
    }

    fn unlink(&mut self, dir: &str, name: &str) {
        let ino = self.ino(dir, name).expect("unlinked file exists");
        self.dir(dir).pending.push(DirOp::Unlink(name.into(), ino));
    }

    fn fsync_dir(&mut self, dir: &str) {
        let d = self.dir(dir);
        for op in std::mem::take(&mut d.pending) {
            op.apply(&mut d.durable);
        }
        // An inode no name can reach any more (unlinked, or replaced by a
        // rename) can never show up in a crash state: free its history.
        let mut live = vec![false; self.files.len()];
        for d in self.dirs.values() {
            for ino in d.durable.values() {
                live[*ino] = true;
            }
            for op in &d.pending {
                let (DirOp::Link(_, ino) | DirOp::Rename(_, _, ino) | DirOp::Unlink(_, ino)) = op;
                live[*ino] = true;
            }
        }
        for (f, live) in self.files.iter_mut().zip(live) {
            if !live {
                *f = SimFile::default();
            }
        }
    }

    /// Draw one crash state and write it under `root` (whose directories
    /// must exist). Returns what was written.
    fn materialize(&self, rng: &mut Rng, how: &How, root: &Path) -> io::Result<Listing> {
        let mut images: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut listing = Listing::new();
        for (dname, dir) in &self.dirs {
            let mut names = dir.durable.clone();
            for op in &dir.pending {
                if rng.f64() < how.dir_keep {
                    op.apply(&mut names);
                }
            }
            let out = listing.entry(dname.clone()).or_default();
            for (name, ino) in names {
                let img = images
                    .entry(ino)
                    .or_insert_with(|| self.files[ino].crash_image(rng, how))
                    .clone();
                fs::write(root.join(dname).join(&name), &img)?;
                out.insert(name, img);
            }
        }
        Ok(listing)
    }
}

// ---------------------------------------------------------------------------
// The persist seam: what the library reports
// ---------------------------------------------------------------------------

/// One step the library reported, with the file's bytes right after it
/// (for a step on a file).
struct Seen {
    step: Step,
    bytes: Option<Vec<u8>>,
}

/// Runs `f` with this thread's persist observer recording every step.
fn recorded<T>(f: impl FnOnce() -> T) -> (T, Vec<Seen>) {
    let log: Rc<RefCell<Vec<Seen>>> = Rc::default();
    let sink = log.clone();
    let prev = seam::observe(Some(Box::new(move |step: &Step| {
        let file = match step {
            Step::Create(p)
            | Step::SetLen(p)
            | Step::Write(p)
            | Step::Fsync(p)
            | Step::Fdatasync(p)
            | Step::SyncRange { path: p, .. } => Some(p),
            Step::Rename { .. } | Step::Unlink(_) | Step::FsyncDir(_) => None,
        };
        let bytes = file.map(|p| fs::read(p).expect("read a file the library just reported"));
        sink.borrow_mut().push(Seen {
            step: step.clone(),
            bytes,
        });
    })));
    let out = f();
    seam::observe(prev);
    let steps = std::mem::take(&mut *log.borrow_mut());
    (out, steps)
}

/// The kind of a step, as crash points are labelled.
fn step_kind(step: &Step) -> &'static str {
    match step {
        Step::Create(_) => "create",
        Step::SetLen(_) => "set-len",
        Step::Write(_) => "write",
        Step::SyncRange { .. } => "msync",
        Step::Fsync(_) => "fsync",
        Step::Fdatasync(_) => "fdatasync",
        Step::Rename { .. } => "rename",
        Step::Unlink(_) => "unlink",
        Step::FsyncDir(_) => "dir-fsync",
    }
}

/// `phase/kind`, interned (crash points are counted per label).
fn label(phase: &str, kind: &str) -> &'static str {
    thread_local! {
        static LABELS: RefCell<HashMap<String, &'static str>> = RefCell::default();
    }
    let key = format!("{phase}/{kind}");
    LABELS.with(|l| {
        *l.borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| Box::leak(key.into_boxed_str()))
    })
}

/// `path` under `root` as (directory, name), both relative.
fn split(root: &Path, path: &Path) -> (String, String) {
    let rel = path
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("{} is not under {}", path.display(), root.display()));
    let dir = rel
        .parent()
        .map_or(String::new(), |d| d.to_string_lossy().into_owned());
    let name = rel
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    (dir, name)
}

impl SimDisk {
    /// The inode a reported step on a file names.
    fn ino_of(&self, root: &Path, path: &Path) -> usize {
        let (dir, name) = split(root, path);
        self.ino(&dir, &name).unwrap_or_else(|| {
            panic!("the library reported a step on {dir}/{name}, which the model does not hold")
        })
    }

    /// Applies one reported step (paths under `root`). A directory fsync of
    /// a directory the model does not track (the data directory itself)
    /// changes nothing.
    fn apply(&mut self, root: &Path, seen: &Seen) {
        let bytes = seen.bytes.as_deref().unwrap_or(&[]);
        match &seen.step {
            Step::Create(p) => {
                let (dir, name) = split(root, p);
                let ino = self.create(&dir, &name);
                self.write(ino, bytes);
            }
            Step::SetLen(p) | Step::Write(p) => {
                let ino = self.ino_of(root, p);
                self.write(ino, bytes);
            }
            Step::SyncRange { path, from, to } => {
                let ino = self.ino_of(root, path);
                self.write(ino, bytes);
                self.sync_range(ino, *from as usize, *to as usize);
            }
            Step::Fsync(p) | Step::Fdatasync(p) => {
                let ino = self.ino_of(root, p);
                self.write(ino, bytes);
                self.fsync(ino);
            }
            Step::Rename { from, to } => {
                let (dir, a) = split(root, from);
                let (dir_to, b) = split(root, to);
                assert_eq!(dir, dir_to, "a rename across directories");
                self.rename(&dir, &a, &b);
            }
            Step::Unlink(p) => {
                let (dir, name) = split(root, p);
                self.unlink(&dir, &name);
            }
            Step::FsyncDir(p) => {
                let (dir, name) = split(root, p);
                let rel = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                if self.dirs.contains_key(&rel) {
                    self.fsync_dir(&rel);
                }
            }
        }
    }
}

/// Applies the steps the library reported during `phase` to `disk` (those
/// of a kind the campaign's lie skips are dropped), and after each hands
/// `crash` a crash state to take with probability `p`. A file's first
/// write (a seal's or a compaction's tmp) may also be cut anywhere; later
/// writes tear within pages (`crash_image`).
fn drive_steps(
    camp: &mut Campaign,
    disk: &mut SimDisk,
    root: &Path,
    phase: &str,
    steps: &[Seen],
    p: f64,
    crash: &mut dyn FnMut(&mut Campaign, &'static str, &SimDisk),
) {
    for seen in steps {
        let kind = step_kind(&seen.step);
        if camp.lie == Lie::SkipStep(kind) {
            continue;
        }
        if let (Step::Write(path), Some(bytes)) = (&seen.step, &seen.bytes)
            && let ino = disk.ino_of(root, path)
            && disk.files[ino].latest_len() == 0
        {
            for _ in 0..camp.fire(p) {
                let mut partial = disk.clone();
                partial.write(ino, &bytes[..camp.rng.usize(0..=bytes.len())]);
                crash(camp, label(phase, "partial-write"), &partial);
            }
        }
        disk.apply(root, seen);
        for _ in 0..camp.fire(p) {
            crash(camp, label(phase, kind), disk);
        }
    }
}

fn describe(listing: &Listing) -> String {
    let mut parts = Vec::new();
    for (d, files) in listing {
        for (name, bytes) in files {
            parts.push(format!("{d}/{name}({})", bytes.len()));
        }
    }
    if parts.is_empty() {
        "(no files)".into()
    } else {
        parts.join(" ")
    }
}

// ---------------------------------------------------------------------------
// Campaign bookkeeping
// ---------------------------------------------------------------------------

/// Deliberate lies, to prove the checks can fail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lie {
    None,
    /// Segments: treat every appended entry as acknowledged, flushed or not.
    AckUnflushed,
    /// Journal: treat an append as acknowledged before its fdatasync.
    AckBeforeSync,
    /// Drop every reported step of this kind before it reaches the model:
    /// the library without that sync ("msync", "fdatasync", ...).
    SkipStep(&'static str),
}

/// Where crash states are taken and how many.
#[derive(Clone, Copy)]
struct Plan {
    /// Probability of a crash point after an append or a flush.
    p_op: f64,
    /// Probability of a crash point at each create / seal / compaction step.
    p_step: f64,
    /// Crash states drawn at a crash point: 1..=per_point.
    per_point: usize,
    /// Segment capacity range (segments only).
    capacity: (u32, u32),
    /// Operations per generation.
    ops: (usize, usize),
}

enum Fail {
    Startup(String),
    Invariant(String),
}

struct Campaign {
    name: &'static str,
    seed: u64,
    rng: Rng,
    target: usize,
    plan: Plan,
    lie: Lie,
    scratch: tempfile::TempDir,
    states: usize,
    recovered: usize,
    violations: Vec<String>,
    points: BTreeMap<&'static str, usize>,
    /// What start-up did, over all crash states (shows what was exercised).
    outcomes: BTreeMap<&'static str, usize>,
    world: usize,
    generation: usize,
    generations: usize,
    started: Instant,
}

impl Campaign {
    fn new(name: &'static str, salt: u64, plan: Plan, lie: Lie, target: usize) -> Campaign {
        let seed = master_seed();
        let scratch = tempfile::Builder::new()
            .prefix(&format!("tierindex-power-loss-{name}-"))
            .tempdir_in(scratch_base())
            .expect("scratch directory");
        Campaign {
            name,
            seed,
            rng: Rng::with_seed(seed ^ salt),
            target,
            plan,
            lie,
            scratch,
            states: 0,
            recovered: 0,
            violations: Vec::new(),
            points: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            world: 0,
            generation: 0,
            generations: 0,
            started: Instant::now(),
        }
    }

    fn done(&self) -> bool {
        self.states >= self.target
    }

    /// How many crash states to draw at a point fired with probability `p`.
    fn fire(&mut self, p: f64) -> usize {
        if self.done() || self.rng.f64() >= p {
            return 0;
        }
        let n = self.rng.usize(1..=self.plan.per_point);
        n.min(self.target - self.states)
    }

    /// A fresh directory tree for one crash state.
    fn state_root(&self, keep: Option<&Path>, dirs: &[&str]) -> PathBuf {
        let root = keep.map_or_else(|| self.scratch.path().join("state"), Path::to_path_buf);
        let _ = fs::remove_dir_all(&root);
        for d in dirs {
            fs::create_dir_all(root.join(d)).expect("create crash-state directory");
        }
        root
    }

    fn judge<T>(
        &mut self,
        label: &'static str,
        how: &How,
        listing: &Listing,
        r: Result<(T, Vec<&'static str>), Fail>,
    ) -> Option<T> {
        self.states += 1;
        *self.points.entry(label).or_default() += 1;
        let (kind, msg) = match r {
            Ok((v, tags)) => {
                self.recovered += 1;
                for t in tags {
                    *self.outcomes.entry(t).or_default() += 1;
                }
                return Some(v);
            }
            Err(Fail::Startup(m)) => ("start-up failed", m),
            Err(Fail::Invariant(m)) => {
                self.recovered += 1;
                ("invariant violated", m)
            }
        };
        self.violations.push(format!(
            "{} seed={:#x} state={} world={} generation={} point={label} how={}: {kind}: {msg}\n    crash state: {}",
            self.name,
            self.seed,
            self.states,
            self.world,
            self.generation,
            how.describe(),
            describe(listing),
        ));
        None
    }

    fn summary(&self) -> String {
        let points: Vec<String> = self
            .points
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        format!(
            "power-loss {}: states={} recovered={} violations={} seed={:#x} worlds={} generations={} secs={:.1} points=[{}] outcomes=[{}]",
            self.name,
            self.states,
            self.recovered,
            self.violations.len(),
            self.seed,
            self.world,
            self.generations,
            self.started.elapsed().as_secs_f64(),
            points.join(" "),
            outcomes.join(" ")
        )
    }

    /// Print the summary line; fail on any violation.
    fn finish(self) {
        eprintln!("{}", self.summary());
        if self.violations.is_empty() {
            return;
        }
        for v in self.violations.iter().take(20) {
            eprintln!("VIOLATION {v}");
        }
        panic!(
            "power-loss {}: {} violation(s) in {} crash states; reproduce with TIERINDEX_POWER_LOSS_SEED={:#x} TIERINDEX_POWER_LOSS_STATES={}",
            self.name,
            self.violations.len(),
            self.states,
            self.seed,
            self.target
        );
    }
}

// ---------------------------------------------------------------------------
// Segments: workload, model, checks
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Geometry {
    slots: u32,
    capacity: u32,
}

fn index_cfg(g: Geometry) -> IndexConfig {
    IndexConfig {
        slot_count: g.slots,
        segment_items: g.capacity,
        segment_max_age: None,
        max_chain_steps: 1 << 20,
        ..IndexConfig::default()
    }
}

fn key(k: usize) -> Vec<u8> {
    format!("power-loss-key-{k}").into_bytes()
}

fn entry(rng: &mut Rng, offset: u64) -> Entry {
    Entry {
        key_hash: tierindex::key_hash(&key(rng.usize(0..KEYS))),
        offset,
        size: rng.u32(1..100_000),
        timestamp_ms: 1_700_000_000_000 + offset,
    }
}

/// What the test knows about one segment.
#[derive(Clone, Debug, Default)]
struct SegModel {
    /// Appended, in order.
    entries: Vec<Entry>,
    /// How many of them a flush acknowledged.
    acked: usize,
    /// CRC of the sealed file, once `seal_segment` wrote one.
    sealed_crc: Option<u32>,
}

type SegModels = BTreeMap<SegmentId, SegModel>;

/// One segment file found after start-up.
struct DiskSeg {
    sealed: bool,
    /// In append order (sealed entries sorted by offset, which grows).
    entries: Vec<Entry>,
    crc: u32,
}

type OnDisk = BTreeMap<SegmentId, DiskSeg>;

fn parse_id(stem: &str) -> Option<SegmentId> {
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok().map(SegmentId))
        .flatten()
}

/// `DataDir::open`, waiting out the lock of a writer dropped a moment ago
/// (its sealer thread holds the lock until it has seen its queue close).
fn open_dd(root: &Path) -> Result<DataDir, String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match DataDir::open(root) {
            Ok(dd) => return Ok(dd),
            Err(Error::Locked { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("DataDir::open failed: {e}")),
        }
    }
}

/// Every entry the writer finds, by offset (offsets are unique per workload).
fn lookup_all(w: &IndexWriter) -> Result<BTreeMap<u64, Entry>, String> {
    let mut out = BTreeMap::new();
    for k in 0..KEYS {
        let l = w.lookup(&key(k), TimeRange::ALL);
        if l.truncated {
            return Err(format!("lookup of key {k} was truncated"));
        }
        for e in l.entries {
            if let Some(prev) = out.insert(e.offset, e) {
                return Err(format!(
                    "lookups return offset {} twice ({prev:?} and {e:?})",
                    e.offset
                ));
            }
        }
    }
    Ok(out)
}

/// Read `segments/` after start-up, without the writer. A dropped writer's
/// sealer thread may still be finishing a seal or the spare it was
/// preparing: it holds the directory lock until then, so wait for the lock
/// (as the next start-up would) before reading.
fn read_segments(root: &Path) -> Result<OnDisk, String> {
    drop(open_dd(root)?);
    let dir = root.join(SEGMENTS_DIR);
    let mut out = OnDisk::new();
    let rd = fs::read_dir(&dir).map_err(|e| format!("list segments/: {e}"))?;
    for ent in rd {
        let ent = ent.map_err(|e| format!("list segments/: {e}"))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let path = ent.path();
        let (id, seg) = if let Some(id) = name.strip_suffix(".seg").and_then(parse_id) {
            let s = SealedSegment::open(&path).map_err(|e| {
                format!("start-up kept {name}, which fails the full sealed check: {e}")
            })?;
            if s.id() != id {
                return Err(format!("{name} holds segment {}", s.id()));
            }
            let mut entries = s.entries();
            entries.sort_by_key(|e| e.offset);
            let bytes = fs::read(&path).map_err(|e| format!("read {name}: {e}"))?;
            (
                id,
                DiskSeg {
                    sealed: true,
                    entries,
                    crc: crc32fast::hash(&bytes),
                },
            )
        } else if let Some(id) = name.strip_suffix(".active").and_then(parse_id) {
            let (hid, entries) = active::read_entries(&path)
                .map_err(|e| format!("start-up kept {name}, which does not read: {e}"))?;
            if hid != id {
                return Err(format!("{name} holds segment {hid}"));
            }
            (
                id,
                DiskSeg {
                    sealed: false,
                    entries,
                    crc: 0,
                },
            )
        } else {
            return Err(format!("start-up left {name} in segments/"));
        };
        if out.insert(id, seg).is_some() {
            return Err(format!(
                "segment {id} is left both sealed and active after start-up"
            ));
        }
    }
    Ok(out)
}

struct SegCheck<'a> {
    model: &'a SegModels,
    /// `segments/` of the crash state.
    crash_segs: &'a BTreeMap<String, Vec<u8>>,
    geo: Geometry,
    /// Appended and flushed after start-up.
    probe: Entry,
}

fn check_segments(root: &Path, c: &SegCheck) -> Result<(OnDisk, Vec<&'static str>), Fail> {
    let inv = Fail::Invariant;
    // 1. Start-up must succeed on any crash state.
    let dd = open_dd(root).map_err(Fail::Startup)?;
    let (mut w, report) = IndexWriter::open(dd, index_cfg(c.geo), None, None)
        .map_err(|e| Fail::Startup(format!("IndexWriter::open failed: {e}")))?;
    let mut tags = Vec::new();
    if !report.quarantined.is_empty() {
        tags.push("quarantined-file");
    }
    if !report.to_reseal.is_empty() {
        tags.push("resealed");
    }
    if !report.removed.is_empty() {
        tags.push("removed-leftover");
    }
    if report.actives.iter().any(|a| a.torn_bytes_zeroed > 0) {
        tags.push("torn-tail-zeroed");
    }
    if report.actives.iter().any(|a| a.tail_saved_to.is_some()) {
        tags.push("tail-saved");
    }
    if report.actives.iter().any(|a| a.extended_from.is_some()) {
        tags.push("re-extended");
    }
    if report.is_clean() {
        tags.push("clean");
    }
    let found = lookup_all(&w).map_err(inv)?;
    // 2. And the writer must take new entries.
    w.append_entry(c.probe)
        .and_then(|()| w.flush())
        .map_err(|e| inv(format!("append + flush after start-up failed: {e}")))?;
    drop(w);

    // 3. What the files hold, entry by entry, against the model.
    let disk = read_segments(root).map_err(inv)?;
    let mut in_files: BTreeMap<u64, (SegmentId, Entry)> = BTreeMap::new();
    for (id, s) in &disk {
        for e in &s.entries {
            if let Some((other, _)) = in_files.insert(e.offset, (*id, *e)) {
                return Err(inv(format!(
                    "entry at offset {} is held twice (segments {other} and {id})",
                    e.offset
                )));
            }
        }
    }
    match in_files.remove(&c.probe.offset) {
        Some((_, e)) if e == c.probe => {}
        other => {
            return Err(inv(format!(
                "the entry appended and flushed after start-up is not in the files: {other:?}"
            )));
        }
    }
    let from_lookups: BTreeMap<u64, Entry> = found;
    let from_files: BTreeMap<u64, Entry> = in_files.iter().map(|(o, (_, e))| (*o, *e)).collect();
    if from_lookups != from_files {
        return Err(inv(format!(
            "lookups after start-up found {} entries, the files hold {}",
            from_lookups.len(),
            from_files.len()
        )));
    }
    let index: HashMap<u64, (SegmentId, usize)> = c
        .model
        .iter()
        .flat_map(|(id, m)| {
            m.entries
                .iter()
                .enumerate()
                .map(move |(i, e)| (e.offset, (*id, i)))
        })
        .collect();
    let mut present: BTreeMap<SegmentId, Vec<bool>> = c
        .model
        .iter()
        .map(|(id, m)| (*id, vec![false; m.entries.len()]))
        .collect();
    for (off, (fid, e)) in &in_files {
        let Some(&(mid, i)) = index.get(off) else {
            return Err(inv(format!(
                "segment {fid} holds an entry that was never appended: {e:?}"
            )));
        };
        if c.model[&mid].entries[i] != *e {
            return Err(inv(format!(
                "segment {fid} holds {e:?}, but {:?} was appended",
                c.model[&mid].entries[i]
            )));
        }
        if mid != *fid {
            return Err(inv(format!(
                "entry at offset {off} was appended to segment {mid} but is in segment {fid}"
            )));
        }
        present.get_mut(&mid).expect("model segment")[i] = true;
    }
    for (id, m) in c.model {
        let p = &present[id];
        let n = p.iter().take_while(|x| **x).count();
        // Salvage by item (docs/format/segment.md, recovery rule) keeps an
        // unacknowledged item that reached the disk after a torn one: a
        // gap is allowed, but only among unacknowledged entries.
        if let Some(j) = p[n..].iter().position(|x| *x) {
            if n < m.acked {
                return Err(inv(format!(
                    "segment {id}: entry {} is present but acknowledged entry {n} is not (a gap)",
                    n + j
                )));
            }
            if !tags.contains(&"salvaged-after-gap") {
                tags.push("salvaged-after-gap");
            }
        }
        if n < m.acked {
            return Err(inv(format!(
                "segment {id}: only {n} of {} acknowledged entries found ({} appended)",
                m.acked,
                m.entries.len()
            )));
        }
        if n > m.acked && !tags.contains(&"kept-unacked") {
            tags.push("kept-unacked");
        }
        if n < m.entries.len() && !tags.contains(&"lost-unacked") {
            tags.push("lost-unacked");
        }
    }

    // 4. Sealed files never change.
    for (name, bytes) in c.crash_segs {
        let Some(id) = name.strip_suffix(".seg").and_then(parse_id) else {
            continue;
        };
        if let Some(crc) = c.model.get(&id).and_then(|m| m.sealed_crc)
            && crc32fast::hash(bytes) != crc
        {
            return Err(inv(format!(
                "{name} exists at the cut without the bytes it was sealed with: its name became durable before its content"
            )));
        }
        match fs::read(root.join(SEGMENTS_DIR).join(name)) {
            Ok(after) if after == *bytes => {}
            Ok(_) => return Err(inv(format!("sealed file {name} changed during start-up"))),
            Err(e) => {
                return Err(inv(format!(
                    "sealed file {name} present at the cut is gone after start-up: {e}"
                )));
            }
        }
    }

    // 5. A second start-up finds nothing to repair and the same entries.
    // (It may still seal the newest active segment, when the entry appended
    // above filled it: a full newest segment is sealed at open, and the
    // report does not list it in `to_reseal`.)
    let dd = open_dd(root).map_err(|e| inv(format!("second start-up: {e}")))?;
    let (w2, report) = IndexWriter::open(dd, index_cfg(c.geo), None, None)
        .map_err(|e| inv(format!("second start-up failed: {e}")))?;
    if !report.is_clean() {
        return Err(inv(format!("second start-up was not clean: {report:?}")));
    }
    let mut again = lookup_all(&w2).map_err(inv)?;
    drop(w2);
    if again.remove(&c.probe.offset) != Some(c.probe) || again != from_files {
        return Err(inv(format!(
            "second start-up finds {} entries, the first found {} plus the new one",
            again.len(),
            from_files.len()
        )));
    }
    let disk2 = read_segments(root).map_err(|e| inv(format!("after the second start-up: {e}")))?;
    let offsets = |d: &OnDisk| -> Vec<(u64, SegmentId)> {
        let mut v: Vec<(u64, SegmentId)> = d
            .iter()
            .flat_map(|(id, s)| s.entries.iter().map(move |e| (e.offset, *id)))
            .collect();
        v.sort_unstable();
        v
    };
    if offsets(&disk2) != offsets(&disk) {
        return Err(inv(
            "the second start-up changed which entries the files hold".into(),
        ));
    }
    Ok((disk2, tags))
}

/// The active segment being written, with its inode in the simulation.
struct Active {
    seg: ActiveSegment,
    ino: usize,
}

struct SegWorld {
    root: PathBuf,
    geo: Geometry,
    disk: SimDisk,
    model: SegModels,
    active: Option<Active>,
    next_id: u64,
    next_offset: u64,
}

impl SegWorld {
    fn seg_dir(&self) -> PathBuf {
        self.root.join(SEGMENTS_DIR)
    }

    fn new(camp: &mut Campaign, root: PathBuf) -> SegWorld {
        for d in [SEGMENTS_DIR, JOURNAL_DIR, QUARANTINE_DIR] {
            fs::create_dir_all(root.join(d)).expect("create world directory");
        }
        let slots = [1u32, 2, 7, 64, 1024, 1500][camp.rng.usize(0..6)];
        let (lo, hi) = camp.plan.capacity;
        let geo = Geometry {
            slots,
            capacity: camp.rng.u32(lo..=hi),
        };
        let mut w = SegWorld {
            root,
            geo,
            disk: SimDisk::with_dirs(&[SEGMENTS_DIR]),
            model: SegModels::new(),
            active: None,
            next_id: 1,
            next_offset: 1,
        };
        w.create_active(camp);
        w
    }

    fn check_model(&self, lie: Lie) -> SegModels {
        let mut m = self.model.clone();
        if lie == Lie::AckUnflushed {
            for s in m.values_mut() {
                s.acked = s.entries.len();
            }
        }
        m
    }

    /// One crash state from `disk`, checked; with `keep`, materialised there
    /// and left for the next generation.
    fn crash_state(
        &self,
        camp: &mut Campaign,
        label: &'static str,
        disk: &SimDisk,
        keep: Option<&Path>,
    ) -> Option<OnDisk> {
        let root = camp.state_root(keep, &[SEGMENTS_DIR, JOURNAL_DIR, QUARANTINE_DIR]);
        let how = random_how(&mut camp.rng);
        let listing = disk
            .materialize(&mut camp.rng, &how, &root)
            .expect("materialise crash state");
        let model = self.check_model(camp.lie);
        let probe = entry(&mut camp.rng, self.next_offset);
        let r = check_segments(
            &root,
            &SegCheck {
                model: &model,
                crash_segs: listing.get(SEGMENTS_DIR).unwrap_or(&BTreeMap::new()),
                geo: self.geo,
                probe,
            },
        );
        let out = camp.judge(label, &how, &listing, r);
        if keep.is_none() {
            let _ = fs::remove_dir_all(&root);
        }
        out
    }

    fn point(&self, camp: &mut Campaign, label: &'static str, p: f64) {
        for _ in 0..camp.fire(p) {
            self.crash_state(camp, label, &self.disk, None);
        }
    }

    /// Applies the steps the library reported during `phase`, with crash
    /// states after each (see [`drive_steps`]).
    fn apply_steps(&mut self, camp: &mut Campaign, phase: &str, steps: &[Seen], p: f64) {
        let mut disk = std::mem::take(&mut self.disk);
        let root = self.root.clone();
        drive_steps(
            camp,
            &mut disk,
            &root,
            phase,
            steps,
            p,
            &mut |camp, label, d| {
                self.crash_state(camp, label, d, None);
            },
        );
        self.disk = disk;
    }

    /// `ActiveSegment::create`: open(O_CREAT|O_EXCL), fallocate, header,
    /// fsync, fsync dir, as the library reports them.
    fn create_active(&mut self, camp: &mut Campaign) {
        let id = SegmentId(self.next_id);
        self.next_id += 1;
        let (seg, steps) = recorded(|| {
            ActiveSegment::create(&self.seg_dir(), id, self.geo.slots, self.geo.capacity, 1)
        });
        let seg = seg.expect("create active segment");
        self.model.insert(id, SegModel::default());
        let p = camp.plan.p_step;
        self.apply_steps(camp, "create", &steps, p);
        let ino = self.disk.ino_of(&self.root, seg.path());
        self.active = Some(Active { seg, ino });
    }

    fn step(&mut self, camp: &mut Campaign) {
        let r = camp.rng.f64();
        if r < 0.80 {
            self.append(camp);
        } else if r < 0.96 {
            self.flush(camp);
        } else {
            self.roll(camp);
        }
    }

    fn append(&mut self, camp: &mut Campaign) {
        if self.active.as_ref().is_none_or(|a| a.seg.is_full()) {
            self.roll(camp);
        }
        let e = entry(&mut camp.rng, self.next_offset);
        self.next_offset += 1;
        let a = self.active.as_mut().expect("active segment");
        let (r, steps) = recorded(|| a.seg.append_entry(e));
        r.expect("append");
        // An append is a store into the map: no persist step.
        assert!(steps.is_empty(), "an append reported a persist step");
        self.model
            .get_mut(&a.seg.id())
            .expect("model")
            .entries
            .push(e);
        let img = fs::read(a.seg.path()).expect("read active segment");
        self.disk.write(a.ino, &img);
        let p = camp.plan.p_op;
        self.point(camp, "A-append", p);
    }

    /// `ActiveSegment::flush` (an msync of the unflushed items' pages, as
    /// the library reports it); what it returned for is acknowledged.
    fn flush_active(&mut self, camp: &mut Campaign, a: &mut Active) {
        let (r, steps) = recorded(|| a.seg.flush());
        r.expect("flush");
        for seen in &steps {
            if camp.lie != Lie::SkipStep(step_kind(&seen.step)) {
                self.disk.apply(&self.root, seen);
            }
        }
        self.model.get_mut(&a.seg.id()).expect("model").acked = a.seg.len() as usize;
    }

    fn flush(&mut self, camp: &mut Campaign) {
        if let Some(mut a) = self.active.take() {
            self.flush_active(camp, &mut a);
            self.active = Some(a);
            let p = camp.plan.p_op;
            self.point(camp, "F-flush", p);
        }
    }

    /// Roll as `IndexWriter::roll` does: no msync (R3 create the next, or
    /// take the prepared one); the sealer runs while the broker appends to
    /// the new segment, and a flush meanwhile also syncs the frozen one
    /// (`IndexWriter::flush`: `flush_frozen`, then the active segment).
    /// Or, as `close` and start-up do, flush and seal without creating
    /// first.
    fn roll(&mut self, camp: &mut Campaign) {
        let Some(mut a) = self.active.take() else {
            self.create_active(camp);
            return;
        };
        if a.seg.is_empty() {
            self.active = Some(a);
            return;
        }
        if camp.rng.bool() {
            self.create_active(camp);
            let p = camp.plan.p_step;
            self.point(camp, "R-rolled", p);
            let k = camp.rng.usize(0..(self.geo.capacity as usize).min(12));
            for _ in 0..k {
                if camp.rng.u8(0..5) == 0 {
                    self.flush_frozen(camp, &a);
                    self.flush(camp);
                } else {
                    self.append(camp);
                }
            }
            self.seal(camp, a);
        } else {
            self.flush_active(camp, &mut a);
            let p = camp.plan.p_step;
            self.point(camp, "R1-flush", p);
            self.seal(camp, a);
            self.create_active(camp);
        }
    }

    /// `ActiveSegment::flush_frozen` of a rolled segment not sealed yet,
    /// as `IndexWriter::flush` does before the active segment's msync.
    fn flush_frozen(&mut self, camp: &mut Campaign, a: &Active) {
        let (r, steps) = recorded(|| a.seg.flush_frozen());
        r.expect("flush of a frozen segment");
        for seen in &steps {
            if camp.lie != Lie::SkipStep(step_kind(&seen.step)) {
                self.disk.apply(&self.root, seen);
            }
        }
        self.model.get_mut(&a.seg.id()).expect("model").acked = a.seg.len() as usize;
    }

    /// `seal_segment`: the tmp's create and writes, its fsync, the rename,
    /// the directory fsync, the unlink of the active file and its directory
    /// fsync, as the library reports them.
    fn seal(&mut self, camp: &mut Campaign, a: Active) {
        let id = a.seg.id();
        let (meta, steps) = recorded(|| seal_segment(&self.seg_dir(), &a.seg));
        let meta = meta.expect("seal");
        let bytes = fs::read(self.seg_dir().join(sealed_file_name(id))).expect("read sealed file");
        assert_eq!(crc32fast::hash(&bytes), meta.file_crc, "sealed meta CRC");
        assert_eq!(meta.item_count, u64::from(a.seg.len()), "sealed item count");
        assert!(
            steps
                .iter()
                .any(|s| matches!(&s.step, Step::Create(p) if p.ends_with(sealed_tmp_name(id)))),
            "the seal reported no create of its tmp"
        );
        self.model.get_mut(&id).expect("model").sealed_crc = Some(meta.file_crc);
        let p = camp.plan.p_step;
        self.apply_steps(camp, "seal", &steps, p);
        drop(a);
    }

    /// Cut the power now and go on from what start-up makes of one crash
    /// state. `None` when that state violated an invariant (already recorded).
    fn restart(self, camp: &mut Campaign, next_root: PathBuf) -> Option<SegWorld> {
        let disk = self.disk.clone();
        let rec = self.crash_state(camp, "restart", &disk, Some(&next_root));
        let (geo, next_id, next_offset) = (self.geo, self.next_id, self.next_offset + 1);
        let old_root = self.root.clone();
        drop(self);
        let _ = fs::remove_dir_all(&old_root);
        let rec = rec?;
        let mut model = SegModels::new();
        for (id, d) in &rec {
            model.insert(
                *id,
                SegModel {
                    entries: d.entries.clone(),
                    acked: d.entries.len(),
                    sealed_crc: d.sealed.then_some(d.crc),
                },
            );
        }
        let disk =
            SimDisk::from_real(&next_root, &[SEGMENTS_DIR]).expect("mirror recovered directory");
        let mut w = SegWorld {
            root: next_root,
            geo,
            disk,
            model,
            active: None,
            next_id: next_id.max(rec.keys().next_back().map_or(1, |m| m.0 + 1)),
            next_offset,
        };
        let actives: Vec<SegmentId> = rec
            .iter()
            .filter(|(_, d)| !d.sealed)
            .map(|(id, _)| *id)
            .collect();
        if let [id] = actives[..] {
            let path = w.seg_dir().join(active_file_name(id));
            let (seg, r) = ActiveSegment::open(&path, None).expect("reopen recovered active");
            assert_eq!(r.valid_items as usize, w.model[&id].entries.len());
            let bytes = fs::read(&path).expect("read recovered active");
            let ino = w
                .disk
                .ino(SEGMENTS_DIR, &active_file_name(id))
                .expect("mirrored active");
            w.disk.write(ino, &bytes);
            w.disk.fsync(ino);
            w.active = Some(Active { seg, ino });
        } else {
            camp.violations.push(format!(
                "{} seed={:#x} world={}: start-up left {} active segments, want exactly 1",
                camp.name,
                camp.seed,
                camp.world,
                actives.len()
            ));
            return None;
        }
        Some(w)
    }
}

fn run_segments(name: &'static str, salt: u64, plan: Plan, lie: Lie, target: usize) -> Campaign {
    let mut camp = Campaign::new(name, salt, plan, lie, target);
    while !camp.done() {
        camp.world += 1;
        camp.generation = 0;
        let root = camp.scratch.path().join(format!("world-{}", camp.world));
        let mut w = SegWorld::new(&mut camp, root);
        let gens = camp.rng.usize(1..=4);
        for g in 0..gens {
            camp.generation = g;
            camp.generations += 1;
            let ops = camp.rng.usize(plan.ops.0..=plan.ops.1);
            for _ in 0..ops {
                if camp.done() {
                    break;
                }
                w.step(&mut camp);
            }
            if g + 1 == gens || camp.done() {
                break;
            }
            let next = camp
                .scratch
                .path()
                .join(format!("world-{}-gen-{}", camp.world, g + 1));
            match w.restart(&mut camp, next) {
                Some(nw) => w = nw,
                None => break,
            }
        }
    }
    camp
}

// ---------------------------------------------------------------------------
// Journal: workload, model, checks
// ---------------------------------------------------------------------------

/// The journal's content as the test models it.
#[derive(Clone, Debug, Default, PartialEq)]
struct JModel {
    segs: BTreeMap<SegmentId, SegmentRecord>,
    max: Option<SegmentId>,
}

impl JModel {
    fn of(j: &Journal) -> JModel {
        JModel {
            segs: j.segments().clone(),
            max: j.max_segment_id(),
        }
    }

    fn without_released(&self) -> JModel {
        // Compaction keeps the newest Released segment (the evidence of
        // what was committed, helper-88), and drops the others.
        let mut m = self.clone();
        let newest = m
            .segs
            .values()
            .rev()
            .find(|r| r.state == SegmentState::Released)
            .map(|r| r.meta.id);
        m.segs
            .retain(|_, r| r.state != SegmentState::Released || Some(r.meta.id) == newest);
        m
    }

    fn seal(&mut self, id: SegmentId) -> Record {
        self.segs.insert(
            id,
            SegmentRecord {
                meta: jmeta(id),
                state: SegmentState::Sealed,
                attempt: 0,
                key: None,
                multipart_id: None,
                etag: None,
                version: None,
                reason: None,
                resealed_into: None,
            },
        );
        self.max = self.max.max(Some(id));
        Record::Sealed { meta: jmeta(id) }
    }
}

fn jmeta(id: SegmentId) -> SealedMeta {
    SealedMeta {
        id,
        file_len: 4096 + id.0 * 32,
        file_crc: (id.0 as u32).wrapping_mul(0x9E37_79B9),
        crc64: None,
        item_count: id.0,
        min_ts: 1_700_000_000_000,
        max_ts: 1_700_000_000_000 + id.0,
        min_offset: id.0 * 1000,
        max_offset: id.0 * 1000 + 999,
        created_ms: 5,
        sealed_ms: 6,
    }
}

/// Mostly short, sometimes several KiB (frames that span pages).
fn text(rng: &mut Rng) -> String {
    let n = if rng.u8(0..8) == 0 {
        rng.usize(500..6000)
    } else {
        rng.usize(1..24)
    };
    (0..n).map(|_| rng.alphanumeric()).collect()
}

/// A legal next record for `m`, applied to `m` (the rules of
/// `journal::record`, written out independently).
fn next_record(rng: &mut Rng, m: &mut JModel) -> Record {
    use SegmentState as S;
    let live: Vec<SegmentId> = m
        .segs
        .values()
        .filter(|r| !matches!(r.state, S::Released | S::Quarantined | S::Resealed))
        .map(|r| r.meta.id)
        .collect();
    if live.is_empty() || rng.u8(0..4) == 0 {
        let id = SegmentId(m.max.map_or(1, |x| x.0 + 1) + rng.u64(0..3));
        return m.seal(id);
    }
    let id = live[rng.usize(0..live.len())];
    let r = m.segs.get_mut(&id).expect("live segment");
    if rng.u8(0..25) == 0 {
        let reason = text(rng);
        r.state = S::Quarantined;
        r.reason = Some(reason.clone());
        return Record::Quarantined { id, reason };
    }
    let new_attempt = |rng: &mut Rng, r: &mut SegmentRecord| {
        let attempt = r.attempt + rng.u32(1..3);
        let key = format!("stream/{id}-{}.seg", text(rng));
        let multipart_id = rng.bool().then(|| format!("mp-{}", text(rng)));
        r.state = S::Uploading;
        r.attempt = attempt;
        r.key = Some(key.clone());
        r.multipart_id = multipart_id.clone();
        r.etag = None;
        r.version = None;
        Record::Uploading {
            id,
            attempt,
            key,
            multipart_id,
        }
    };
    match r.state {
        S::Sealed => new_attempt(rng, r),
        S::Uploading => match rng.u8(0..4) {
            0 => new_attempt(rng, r),
            1 if r.multipart_id.is_some() => {
                let multipart_id = r.multipart_id.take().unwrap_or_default();
                Record::MultipartAborted { id, multipart_id }
            }
            _ => {
                let etag = rng.bool().then(|| format!("\"{}\"", text(rng)));
                let version = rng.bool().then(|| text(rng));
                r.state = S::Uploaded;
                r.multipart_id = None;
                r.etag = etag.clone();
                r.version = version.clone();
                Record::Uploaded { id, etag, version }
            }
        },
        S::Uploaded if rng.u8(0..5) == 0 => new_attempt(rng, r),
        S::Uploaded => {
            r.state = S::Verified;
            Record::Verified { id }
        }
        S::Verified if rng.u8(0..6) == 0 => {
            // Its id taken in the manifest: resealed into a later segment.
            let into = SegmentId(id.0 + rng.u64(1..5));
            let reason = text(rng);
            r.state = S::Resealing;
            r.resealed_into = Some(into);
            r.reason = Some(reason.clone());
            Record::Resealing { id, into, reason }
        }
        S::Verified => {
            r.state = S::Committed;
            Record::Committed { id }
        }
        S::Resealing => {
            r.state = S::Resealed;
            Record::Resealed { id }
        }
        S::Committed => {
            r.state = S::Released;
            Record::Released { id }
        }
        S::Released | S::Quarantined | S::Resealed => unreachable!("not live"),
    }
}

fn check_journal(
    root: &Path,
    states: &[JModel],
    lo: usize,
    hi: usize,
) -> Result<((Journal, JModel), Vec<&'static str>), Fail> {
    let inv = Fail::Invariant;
    let (mut j, report) = Journal::open(root, JournalOptions::default())
        .map_err(|e| Fail::Startup(format!("Journal::open failed: {e}")))?;
    let got = JModel::of(&j);
    if !states[lo..=hi].contains(&got) {
        return Err(inv(match states[..lo].iter().rposition(|s| *s == got) {
            Some(i) => format!(
                "replay went back to sync point {i}; the last acknowledged one is {lo} (report {report:?})"
            ),
            None => format!(
                "replay gives a state the writer never had at sync points {lo}..={hi}: {} segments, max id {:?} (report {report:?})",
                got.segs.len(),
                got.max
            ),
        }));
    }
    let mut tags = Vec::new();
    if report.truncated_bytes > 0 {
        tags.push("tail-cut");
    }
    if report.removed_tmp {
        tags.push("tmp-removed");
    }
    if lo < hi {
        tags.push(if got == states[hi] {
            "unacked-kept"
        } else {
            "unacked-lost"
        });
    }
    if root.join(JOURNAL_DIR).join(TMP_FILE).exists() {
        return Err(inv(format!("{TMP_FILE} left after open")));
    }
    let mut want = got.clone();
    let rec = want.seal(SegmentId(got.max.map_or(1, |m| m.0 + 1)));
    j.append(std::slice::from_ref(&rec))
        .map_err(|e| inv(format!("append after recovery failed: {e}")))?;
    if JModel::of(&j) != want {
        return Err(inv("state after the append differs from the model".into()));
    }
    drop(j);
    let (j, report) = Journal::open(root, JournalOptions::default())
        .map_err(|e| inv(format!("reopen after the append failed: {e}")))?;
    if JModel::of(&j) != want {
        return Err(inv(format!(
            "reopen after the append replays a different state (report {report:?})"
        )));
    }
    if report.truncated_bytes != 0 {
        return Err(inv(format!(
            "reopen after the append cut a tail again (report {report:?})"
        )));
    }
    Ok(((j, want), tags))
}

struct JWorld {
    root: PathBuf,
    disk: SimDisk,
    journal: Option<Journal>,
    model: JModel,
    /// The writer's state at each sync point, oldest first.
    states: Vec<JModel>,
    /// Index in `states` of the last acknowledged sync point.
    acked: usize,
}

impl JWorld {
    fn new(camp: &mut Campaign, root: PathBuf) -> JWorld {
        fs::create_dir_all(root.join(JOURNAL_DIR)).expect("create world directory");
        let mut w = JWorld {
            root,
            disk: SimDisk::with_dirs(&[JOURNAL_DIR]),
            journal: None,
            model: JModel::default(),
            states: vec![JModel::default()],
            acked: 0,
        };
        let p = camp.plan.p_step;
        w.point(camp, "J0-empty", p, 0, 0);
        // The first open writes an empty journal as tmp, fsync, rename,
        // fsync(journal/), as the library reports it.
        let (j, steps) = recorded(|| Journal::open(&w.root, JournalOptions::default()));
        let (j, _) = j.expect("first open");
        assert_eq!(JModel::of(&j), w.model);
        w.apply_steps(camp, "open", &steps, p, (0, 0));
        w.journal = Some(j);
        w
    }

    /// Applies the steps the library reported during `phase`, with crash
    /// states after each (see [`drive_steps`]); `lo..=hi` are the sync
    /// points a crash may show.
    fn apply_steps(
        &mut self,
        camp: &mut Campaign,
        phase: &str,
        steps: &[Seen],
        p: f64,
        (lo, hi): (usize, usize),
    ) {
        let mut disk = std::mem::take(&mut self.disk);
        let root = self.root.clone();
        drive_steps(
            camp,
            &mut disk,
            &root,
            phase,
            steps,
            p,
            &mut |camp, label, d| {
                self.crash_state(camp, label, d, (lo, hi), None);
            },
        );
        self.disk = disk;
    }

    fn crash_state(
        &self,
        camp: &mut Campaign,
        label: &'static str,
        disk: &SimDisk,
        (lo, hi): (usize, usize),
        keep: Option<&Path>,
    ) -> Option<(Journal, JModel)> {
        let root = camp.state_root(keep, &[JOURNAL_DIR]);
        let how = random_how(&mut camp.rng);
        let listing = disk
            .materialize(&mut camp.rng, &how, &root)
            .expect("materialise crash state");
        let lo = if camp.lie == Lie::AckBeforeSync {
            hi
        } else {
            lo
        };
        let r = check_journal(&root, &self.states, lo, hi);
        let out = camp.judge(label, &how, &listing, r);
        if keep.is_none() {
            let _ = fs::remove_dir_all(&root);
        }
        out
    }

    fn point(&self, camp: &mut Campaign, label: &'static str, p: f64, lo: usize, hi: usize) {
        for _ in 0..camp.fire(p) {
            self.crash_state(camp, label, &self.disk, (lo, hi), None);
        }
    }

    fn step(&mut self, camp: &mut Campaign) {
        if camp.rng.u8(0..16) == 0 {
            self.compact(camp);
        } else {
            self.append(camp);
        }
    }

    /// J4 pwrite of one frame, J5 fdatasync.
    fn append(&mut self, camp: &mut Campaign) {
        let mut next = self.model.clone();
        let n = camp.rng.usize(1..=4);
        let batch: Vec<Record> = (0..n)
            .map(|_| next_record(&mut camp.rng, &mut next))
            .collect();
        let j = self.journal.as_mut().expect("journal");
        let (r, steps) = recorded(|| j.append(&batch));
        r.expect("legal batch");
        assert_eq!(JModel::of(j), next, "writer and model disagree");
        self.states.push(next.clone());
        let hi = self.states.len() - 1;
        let p = camp.plan.p_op;
        // Until append returns, nothing of it is acknowledged.
        self.apply_steps(camp, "append", &steps, p, (self.acked, hi));
        self.acked = hi;
        self.model = next;
        self.point(camp, "append/acked", p / 4.0, hi, hi);
    }

    /// J6: tmp written, fsync, read back, rename, fsync(journal/).
    fn compact(&mut self, camp: &mut Campaign) {
        let next = self.model.without_released();
        let j = self.journal.as_mut().expect("journal");
        let (r, steps) = recorded(|| j.compact());
        r.expect("compact");
        assert_eq!(JModel::of(j), next, "writer and model disagree");
        self.states.push(next.clone());
        let hi = self.states.len() - 1;
        let lo = self.acked;
        let p = camp.plan.p_step;
        self.apply_steps(camp, "compact", &steps, p, (lo, hi));
        self.acked = hi;
        self.model = next;
    }

    fn restart(self, camp: &mut Campaign, next_root: PathBuf) -> Option<JWorld> {
        let disk = self.disk.clone();
        let hi = self.states.len() - 1;
        let rec = self.crash_state(camp, "restart", &disk, (self.acked, hi), Some(&next_root));
        let old_root = self.root.clone();
        drop(self);
        let _ = fs::remove_dir_all(&old_root);
        let (j, model) = rec?;
        Some(JWorld {
            disk: SimDisk::from_real(&next_root, &[JOURNAL_DIR]).expect("mirror journal"),
            root: next_root,
            journal: Some(j),
            states: vec![model.clone()],
            model,
            acked: 0,
        })
    }
}

fn run_journal(name: &'static str, salt: u64, plan: Plan, lie: Lie, target: usize) -> Campaign {
    let mut camp = Campaign::new(name, salt, plan, lie, target);
    while !camp.done() {
        camp.world += 1;
        camp.generation = 0;
        let root = camp.scratch.path().join(format!("world-{}", camp.world));
        let mut w = JWorld::new(&mut camp, root);
        let gens = camp.rng.usize(1..=4);
        for g in 0..gens {
            camp.generation = g;
            camp.generations += 1;
            let ops = camp.rng.usize(plan.ops.0..=plan.ops.1);
            for _ in 0..ops {
                if camp.done() {
                    break;
                }
                w.step(&mut camp);
            }
            if g + 1 == gens || camp.done() {
                break;
            }
            let next = camp
                .scratch
                .path()
                .join(format!("world-{}-gen-{}", camp.world, g + 1));
            match w.restart(&mut camp, next) {
                Some(nw) => w = nw,
                None => break,
            }
        }
    }
    camp
}

// ---------------------------------------------------------------------------
// The campaigns
// ---------------------------------------------------------------------------

const ACTIVE_PLAN: Plan = Plan {
    p_op: 0.12,
    p_step: 0.05,
    per_point: 3,
    capacity: (40, 300),
    ops: (40, 250),
};

const SEAL_PLAN: Plan = Plan {
    p_op: 0.01,
    p_step: 1.0,
    per_point: 2,
    capacity: (8, 60),
    ops: (30, 150),
};

const JOURNAL_PLAN: Plan = Plan {
    p_op: 0.5,
    p_step: 1.0,
    per_point: 3,
    capacity: (0, 0),
    ops: (10, 50),
};

/// Appends and flushes into the active segment (pages of items, the never
/// synced slot table, the header at create), cut anywhere.
#[test]
fn power_loss_active_segments() {
    let target = states_per_campaign();
    run_segments("segments-active", 0xA1, ACTIVE_PLAN, Lie::None, target).finish();
}

/// Every step of roll + seal: create (C1-C4), the tmp write (partial and
/// whole), its fsync, the rename, the directory fsync, the unlink of the
/// source; with the next active segment being written meanwhile.
#[test]
fn power_loss_seal_sequence() {
    let target = states_per_campaign();
    run_segments("segments-seal", 0x5E, SEAL_PLAN, Lie::None, target).finish();
}

/// The upload journal: creation, appends (write, fdatasync), compactions.
#[test]
fn power_loss_journal() {
    let target = states_per_campaign();
    run_journal("journal", 0x70, JOURNAL_PLAN, Lie::None, target).finish();
}

/// The checks can fail: with a planted lie (an unflushed entry counted as
/// acknowledged; a journal append counted before its fdatasync) the same
/// campaigns must report violations.
#[test]
fn power_loss_checks_catch_planted_lies() {
    let seg = run_segments("lie-segments", 0xBAD1, ACTIVE_PLAN, Lie::AckUnflushed, 150);
    assert!(
        seg.violations
            .iter()
            .any(|v| v.contains("acknowledged entries found")),
        "an acknowledged-but-unflushed entry lost at a power cut went unnoticed: {}",
        seg.summary()
    );
    let jr = run_journal("lie-journal", 0xBAD2, JOURNAL_PLAN, Lie::AckBeforeSync, 150);
    assert!(
        jr.violations.iter().any(|v| v.contains("went back")),
        "a journal append lost before its fdatasync went unnoticed: {}",
        jr.summary()
    );
}

/// The seam is what the model follows: a library that skipped a sync
/// (simulated by dropping the steps of that kind the library reported, so
/// the real files are as they were) loses acknowledged data at a power cut,
/// and the same campaigns report it.
#[test]
fn power_loss_finds_a_sync_the_library_skips() {
    // `fsync`: the seal's fsync of the sealed file before its rename.
    for (kind, salt) in [
        ("msync", 0x5EA1u64),
        ("dir-fsync", 0x5EA2),
        ("fsync", 0x5EA4),
    ] {
        let seg = run_segments("seam-segments", salt, ACTIVE_PLAN, Lie::SkipStep(kind), 150);
        assert!(
            seg.violations
                .iter()
                .any(|v| v.contains("acknowledged entries found")),
            "segments without their {kind}: no lost acknowledged entry found: {}",
            seg.summary()
        );
        eprintln!("without {kind}: {}", seg.violations[0]);
    }
    let jr = run_journal(
        "seam-journal",
        0x5EA3,
        JOURNAL_PLAN,
        Lie::SkipStep("fdatasync"),
        150,
    );
    assert!(
        jr.violations.iter().any(|v| v.contains("went back")),
        "a journal without its fdatasync: no lost append found: {}",
        jr.summary()
    );
}
