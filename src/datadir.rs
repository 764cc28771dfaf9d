//! The data directory: its lock, its layout, and the start-up check that
//! turns whatever a crash left into a consistent set of segments.
//!
//! ```text
//! DATA_DIR/
//!   LOCK                 flock'd by the owning process; holds pid/host/start
//!   segments/            NNN.active (in steady state one, plus an empty spare
//!                        with the next id once it is half full), NNN.seg
//!   journal/             upload journal (see journal module)
//!   quarantine/          files that failed their checks, moved aside, never deleted
//! ```
//!
//! Start-up rules (also tabled in `docs/crash-safety.md`):
//! - `NNN.seg` must pass the full sealed check, else it is quarantined.
//! - `NNN.active` that is empty or all zeros (its creation never became
//!   durable) is removed: it never held an entry.
//! - Every `.active` but the newest holding entries is sealed; an empty one
//!   (with a valid header) above it is a spare prepared ahead of a roll:
//!   not a leftover, the writer removes it (or takes it up when no segment
//!   holds entries).
//! - `NNN.active` with a bad header is quarantined; otherwise its torn tail
//!   is zeroed (a damaged span that still holds valid items is first copied
//!   to quarantine) and its slot table rebuilt. If a valid `NNN.seg` with
//!   the same item count exists, the active file is a leftover of a finished
//!   seal and is removed; if the `.seg` holds more items, the active file is
//!   quarantined; if fewer, the `.seg` is quarantined and the active one is
//!   sealed again.
//! - `NNN.seg.tmp` is an interrupted seal: removed when its `.active` source
//!   passed its check (the seal is redone), quarantined otherwise.
//! - A file of a newer format version stops start-up (`Unsupported`): it is
//!   not damaged, so it is not moved aside.
//! - Any other file is quarantined. Nothing is ever deleted to get past an
//!   error, and one bad file never stops the rest from opening.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::durable::{fsync_dir, fsync_path};
use crate::error::{Error, Result};
use crate::segment::active::{self, ActiveRecovery, ActiveSegment};
use crate::segment::salvage::{self, Geometry, LostSpan};
use crate::segment::local::SealedInfo;
use crate::segment::sealed::{PACKED_ENTRY_LEN, SealedSegment, write_sealed_streaming};
use crate::segment::{SegmentId, now_ms};

pub const SEGMENTS_DIR: &str = "segments";
pub const JOURNAL_DIR: &str = "journal";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const LOCK_FILE: &str = "LOCK";

/// True when `path` looks like a data directory: it has an identity, a
/// journal directory or a segments directory.
pub fn is_data_dir(path: &Path) -> bool {
    [
        crate::identity::IDENTITY_FILE,
        JOURNAL_DIR,
        SEGMENTS_DIR,
    ]
    .iter()
    .any(|n| path.join(n).exists())
}

/// An open, locked data directory.
pub struct DataDir {
    root: PathBuf,
    // Held for the life of the DataDir: the flock is released when it drops.
    _lock: File,
}

impl DataDir {
    /// Create the directory tree if missing and take the exclusive lock.
    pub fn open(root: &Path) -> Result<DataDir> {
        for d in [
            root.to_path_buf(),
            root.join(SEGMENTS_DIR),
            root.join(JOURNAL_DIR),
            root.join(QUARANTINE_DIR),
        ] {
            if !d.exists() {
                fs::create_dir_all(&d).map_err(|e| Error::io(&d, "create data directory", e))?;
                if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fsync_dir(parent)?;
                }
            }
        }
        let lock_path = root.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, "open lock file", e))?;
        if !crate::durable::try_lock(&lock, &lock_path, "lock data directory")? {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::Locked {
                path: root.to_path_buf(),
                holder: if holder.is_empty() {
                    "unknown holder".into()
                } else {
                    holder.into()
                },
            });
        }
        let me = format!(
            "pid={} host={} since_ms={}",
            std::process::id(),
            hostname(),
            now_ms()
        );
        // Informational only (who holds the lock); not a durability point.
        let _ = lock
            .set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| lock.write_all(me.as_bytes()));
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// [`DataDir::open`], then the directory's identity
    /// ([`crate::identity::ensure`]): written when there is none yet (a new
    /// data directory, or one from before identity files), else read. The
    /// broker's open uses this; the lock is held before the file is written.
    pub fn open_as(
        root: &Path,
        stream: &str,
        store: &str,
        endpoint: Option<&str>,
        mode: Option<crate::identity::Mode>,
        overrides: crate::identity::Overrides,
    ) -> Result<(DataDir, crate::identity::Identity)> {
        let dd = DataDir::open(root)?;
        let id = crate::identity::ensure(root, stream, store, endpoint, mode, overrides)?;
        Ok((dd, id))
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Whether `segments/` holds any file (active, spare or sealed; whatever
    /// it holds counts). Used to tell a data directory that holds nothing
    /// yet.
    pub fn holds_segment_files(&self) -> Result<bool> {
        let dir = self.segments_dir();
        match fs::read_dir(&dir) {
            Ok(mut rd) => Ok(rd.next().is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&dir, "list segments", e)),
        }
    }
    pub fn segments_dir(&self) -> PathBuf {
        self.root.join(SEGMENTS_DIR)
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join(JOURNAL_DIR)
    }
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join(QUARANTINE_DIR)
    }

    /// Move `path` into `quarantine/` under a unique name; durable (both
    /// directories fsync'd). Returns the new path.
    pub fn quarantine(&self, path: &Path) -> Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        let qdir = self.quarantine_dir();
        let mut dst = qdir.join(format!("{name}.{}", now_ms()));
        let mut n = 0;
        while dst.exists() {
            n += 1;
            dst = qdir.join(format!("{name}.{}.{n}", now_ms()));
        }
        crate::durable::rename(path, &dst).map_err(|e| Error::io(path, "move file to quarantine", e))?;
        fsync_dir(&qdir)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        tracing::warn!(from = %path.display(), to = %dst.display(), "quarantined");
        Ok(dst)
    }

    /// [`quarantine`](Self::quarantine), plus a record next to the moved
    /// file (`<moved name>.why.json`: where it came from, why, what was
    /// lost) that `tierindex quarantine list|show|retry` reads.
    pub fn quarantine_because(
        &self,
        path: &Path,
        reason: &str,
        loss: Option<&LossNote>,
    ) -> Result<PathBuf> {
        let dst = self.quarantine(path)?;
        let rec = QuarantineRecord {
            original: path.display().to_string(),
            moved_to: dst.display().to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
            loss: loss.cloned(),
        };
        write_record(&dst, &rec)?;
        Ok(dst)
    }
}

/// What `quarantine/<name>.why.json` holds.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub original: String,
    pub moved_to: String,
    pub reason: String,
    pub at_ms: u64,
    pub loss: Option<LossNote>,
}

/// Suffix of the record written next to a quarantined file.
pub const RECORD_SUFFIX: &str = ".why.json";

/// Write (durably) the record of the quarantined file `moved`.
pub fn write_record(moved: &Path, rec: &QuarantineRecord) -> Result<()> {
    let mut name = moved.as_os_str().to_owned();
    name.push(RECORD_SUFFIX);
    let p = PathBuf::from(name);
    let body = serde_json::to_vec_pretty(rec)
        .map_err(|e| Error::InvalidInput(format!("encode quarantine record: {e}")))?;
    crate::durable::write_file(&p, body.as_ref()).map_err(|e| Error::io(&p, "write quarantine record", e))?;
    fsync_path(&p)?;
    if let Some(dir) = p.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether start-up may change files.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Truncate torn tails, quarantine bad files, remove finished leftovers.
    Repair,
    /// Only report what `Repair` would do (`tierindex fsck` without --repair).
    CheckOnly,
}

/// One file moved (or, in check-only mode, to be moved) to quarantine.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct QuarantineNote {
    /// The file, as found.
    pub file: String,
    /// Why it was moved aside.
    pub reason: String,
    /// Where it went (under `quarantine/`).
    pub moved_to: Option<String>,
}

/// The check of one active segment.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ActiveNote {
    /// The segment.
    pub id: u64,
    /// Items that passed their checks.
    pub valid_items: u32,
    /// Bytes of a torn tail zeroed (never acknowledged).
    pub torn_bytes_zeroed: u64,
    /// The file's length before it was extended back to its full size.
    pub extended_from: Option<u64>,
    /// Where a damaged span holding checksum-valid items was copied.
    pub tail_saved_to: Option<String>,
}

/// One damaged segment file whose intact items were salvaged (or that
/// held none that could be), with exactly what could not be kept.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LossNote {
    /// The segment.
    pub segment: u64,
    /// The damaged file, where it was found.
    pub file: String,
    /// "active" or "sealed".
    pub kind: String,
    /// Items whose own CRC verified and that were kept.
    pub salvaged_items: u64,
    /// Items that did not verify, between verified ones (or anywhere in a
    /// sealed file): entries that may have been acknowledged and are gone.
    pub lost_items: u64,
    /// The runs of lost items: first index, count, byte offset, bytes.
    pub lost: Vec<LostSpan>,
    /// Loss that cannot be counted (a truncated file, a file with no
    /// readable layout), in words.
    pub unknown_loss: Option<String>,
    /// The active header did not decode and was rebuilt.
    pub header_rebuilt: bool,
    /// The new sealed file holding the salvaged items.
    pub sealed_as: Option<String>,
    /// Where the damaged original went (None in check-only mode).
    pub original_moved_to: Option<String>,
}

impl LossNote {
    /// True when acknowledged entries may be gone: an operator must look.
    pub fn is_loss(&self) -> bool {
        self.lost_items > 0 || self.unknown_loss.is_some()
    }

    /// One line for reports.
    pub fn line(&self) -> String {
        let mut s = format!(
            "segment {:020} ({} file {}): {} items salvaged, {} LOST",
            self.segment, self.kind, self.file, self.salvaged_items, self.lost_items
        );
        if !self.lost.is_empty() {
            s.push_str(&format!(": {}", salvage::describe(&self.lost)));
        }
        if let Some(u) = &self.unknown_loss {
            s.push_str(&format!("; {u}"));
        }
        if self.header_rebuilt {
            s.push_str("; header rebuilt from the configured geometry");
        }
        s
    }
}

/// Everything start-up found and did. Serializable for `--json`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sealed segments that passed their check.
    pub sealed_ok: Vec<u64>,
    /// Active segments checked (and their torn tails).
    pub actives: Vec<ActiveNote>,
    /// Files moved to `quarantine/`.
    pub quarantined: Vec<QuarantineNote>,
    /// Damaged files whose intact items were salvaged; what was lost.
    pub salvaged: Vec<LossNote>,
    /// Sealed files whose every byte was checked: the whole-body CRC-64
    /// for format 2 (items themselves only when it fails, to salvage),
    /// every item's CRC for format 1. The others got the structural check
    /// (footer, header, directory).
    pub sealed_item_checked: Vec<u64>,
    /// Files removed because a durable copy of their content exists.
    pub removed: Vec<String>,
    /// Active segments that must be (or were) sealed again.
    pub to_reseal: Vec<u64>,
    /// Time the checks took.
    pub elapsed_ms: u64,
}

impl RecoveryReport {
    /// Items that may have been acknowledged and could not be salvaged.
    pub fn lost_items(&self) -> u64 {
        self.salvaged.iter().map(|n| n.lost_items).sum()
    }

    /// The salvage notes that report a loss.
    pub fn losses(&self) -> Vec<&LossNote> {
        self.salvaged.iter().filter(|n| n.is_loss()).collect()
    }

    /// True when nothing needed repair.
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_empty()
            && self.salvaged.is_empty()
            && self.removed.is_empty()
            && self.to_reseal.is_empty()
            && self
                .actives
                .iter()
                .all(|a| a.torn_bytes_zeroed == 0 && a.extended_from.is_none())
    }
}

/// What a repairing start-up hands to the index writer.
pub struct Recovered {
    /// Checked sealed files, known by their footers (not mapped: a data
    /// directory may hold more than a process can map).
    pub sealed: BTreeMap<SegmentId, SealedInfo>,
    /// Active segments by id, oldest first. All but the newest must be sealed.
    pub actives: BTreeMap<SegmentId, ActiveSegment>,
    pub report: RecoveryReport,
    /// Highest segment id seen in any file name (including quarantined ones),
    /// so new ids never collide.
    pub max_id_seen: Option<SegmentId>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Sealed(SegmentId),
    Active(SegmentId),
    SealTmp(SegmentId),
    Unknown,
}

fn classify(name: &str) -> Kind {
    let parse = |stem: &str| -> Option<SegmentId> {
        (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stem.parse().ok().map(SegmentId))
            .flatten()
    };
    if let Some(stem) = name.strip_suffix(".seg.tmp") {
        return parse(stem).map_or(Kind::Unknown, Kind::SealTmp);
    }
    if let Some(stem) = name.strip_suffix(".seg") {
        return parse(stem).map_or(Kind::Unknown, Kind::Sealed);
    }
    if let Some(stem) = name.strip_suffix(".active") {
        return parse(stem).map_or(Kind::Unknown, Kind::Active);
    }
    Kind::Unknown
}

/// The segment id of a sealed (`NNN.seg`) or active (`NNN.active`) file
/// name; `None` for anything else (a `.seg.tmp` included).
pub fn segment_file_id(name: &str) -> Option<SegmentId> {
    match classify(name) {
        Kind::Sealed(id) | Kind::Active(id) => Some(id),
        Kind::SealTmp(_) | Kind::Unknown => None,
    }
}

/// Check (and in `Repair` mode, repair) the segments directory.
///
/// In `CheckOnly` mode the returned `Recovered` has no open segments; only
/// the report is filled.
#[cfg(any(test, feature = "testing"))]
pub fn recover(dir: &DataDir, mode: Mode) -> Result<Recovered> {
    recover_with(dir, mode, true)
}

/// [`recover`], choosing whether sealed files get the full check (every
/// byte's CRC: `fsck`) or the structural one (footer, header, directory:
/// start-up, whose cost must not grow with the segments kept locally).
#[cfg(any(test, feature = "testing"))]
pub fn recover_with(dir: &DataDir, mode: Mode, full_sealed_check: bool) -> Result<Recovered> {
    recover_with_geometry(dir, mode, full_sealed_check, None)
}

/// [`recover_with`], with the geometry the writer creates active segments
/// with: it bounds what a header may claim, and lets an active file whose
/// header is damaged be rebuilt (see `segment::salvage`).
pub fn recover_with_geometry(
    dir: &DataDir,
    mode: Mode,
    full_sealed_check: bool,
    geometry: Option<Geometry>,
) -> Result<Recovered> {
    recover_checking(dir, mode, &|_| full_sealed_check, geometry)
}

/// [`SealedSegment::open_summed`] of every `(id, path)`, on up to
/// `available_parallelism` (at most 4) threads; each map is dropped once
/// checked (only its footer and sums are kept).
fn open_summed_parallel(
    todo: Vec<(SegmentId, PathBuf)>,
) -> BTreeMap<SegmentId, Result<SealedInfo>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(todo.len().max(1));
    if threads <= 1 {
        return todo
            .into_iter()
            .map(|(id, p)| (id, SealedSegment::open_summed(&p).map(|s| SealedInfo::of(&s))))
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let todo = &todo;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((id, p)) = todo.get(i) else { break };
                        done.push((*id, SealedSegment::open_summed(p).map(|s| SealedInfo::of(&s))));
                    }
                    done
                })
            })
            .collect();
        let mut all = BTreeMap::new();
        for w in workers {
            match w.join() {
                Ok(done) => all.extend(done),
                // A panic in a check is a bug; re-raise it on this thread
                // rather than treat the files as checked.
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        all
    })
}

/// [`recover_with_geometry`], choosing per sealed file whether it gets the
/// full check (`full_check(id)`: every item's CRC) or the structural one.
/// The writer full-checks the files still to be uploaded, so damage is
/// found (and salvaged) before their bytes are journaled or uploaded.
pub fn recover_checking(
    dir: &DataDir,
    mode: Mode,
    full_check: &dyn Fn(SegmentId) -> bool,
    geometry: Option<Geometry>,
) -> Result<Recovered> {
    let started = std::time::Instant::now();
    let seg_dir = dir.segments_dir();
    let mut files: Vec<(Kind, PathBuf)> = Vec::new();
    let rd = fs::read_dir(&seg_dir).map_err(|e| Error::io(&seg_dir, "list segments", e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(&seg_dir, "list segments", e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        files.push((classify(&name), ent.path()));
    }
    files.sort();

    let mut out = Recovered {
        sealed: BTreeMap::new(),
        actives: BTreeMap::new(),
        report: RecoveryReport::default(),
        max_id_seen: None,
    };
    let bump = |id: SegmentId, out: &mut Recovered| {
        out.max_id_seen = Some(out.max_id_seen.map_or(id, |m| m.max(id)));
    };
    let quarantine = |path: &Path, reason: String, out: &mut Recovered| -> Result<()> {
        let moved_to = match mode {
            Mode::Repair => Some(
                dir.quarantine_because(path, &reason, None)?
                    .display()
                    .to_string(),
            ),
            Mode::CheckOnly => None,
        };
        out.report.quarantined.push(QuarantineNote {
            file: path.display().to_string(),
            reason,
            moved_to,
        });
        Ok(())
    };

    // Active segments that passed their check (files are sorted so every
    // `.active` is seen before any `.seg.tmp`).
    let mut accepted_actives: Vec<SegmentId> = Vec::new();
    // Item counts of valid sealed files, to compare with a same-id active.
    let mut sealed_counts: BTreeMap<SegmentId, (u64, PathBuf)> = BTreeMap::new();
    // Active files whose seal had finished (removed as leftovers).
    let mut superseded: Vec<u64> = Vec::new();

    // The whole-file checks read every byte of the files still to be
    // uploaded: run them on all cores at once (nothing else runs yet at
    // start-up); the decisions below stay sequential, in file order.
    let mut prechecked = open_summed_parallel(
        files
            .iter()
            .filter_map(|(kind, path)| match kind {
                Kind::Sealed(id) if full_check(*id) => Some((*id, path.clone())),
                _ => None,
            })
            .collect(),
    );

    for (kind, path) in &files {
        match kind {
            Kind::Sealed(id) => {
                bump(*id, &mut out);
                let full = prechecked.contains_key(id);
                if full {
                    out.report.sealed_item_checked.push(id.0);
                }
                let opened = match prechecked.remove(id) {
                    // Whole-body CRC-64 (every item for format 1); a
                    // failure is salvaged by item below.
                    Some(opened) => opened,
                    None => SealedSegment::open_light(path).map(|s| SealedInfo::of(&s)),
                };
                match opened {
                    Ok(s) if s.id() == *id => {
                        sealed_counts.insert(*id, (s.footer().item_count, path.clone()));
                        out.report.sealed_ok.push(id.0);
                        if mode == Mode::Repair {
                            out.sealed.insert(*id, s);
                        }
                    }
                    Ok(s) => quarantine(
                        path,
                        format!("file name says segment {id}, footer says {}", s.id()),
                        &mut out,
                    )?,
                    Err(e @ Error::Corrupt { .. }) => {
                        let note = salvage_sealed_file(dir, mode, path, *id, &e.to_string())?;
                        if let Some(p) = &note.sealed_as {
                            let s = SealedInfo::of(&SealedSegment::open(Path::new(p))?);
                            sealed_counts.insert(*id, (s.footer().item_count, path.clone()));
                            out.report.sealed_ok.push(id.0);
                            out.sealed.insert(*id, s);
                        } else if mode == Mode::CheckOnly && note.unknown_loss.is_none() {
                            sealed_counts.insert(*id, (note.salvaged_items, path.clone()));
                        }
                        out.report.quarantined.push(QuarantineNote {
                            file: path.display().to_string(),
                            reason: format!("{e}; {}", note.line()),
                            moved_to: note.original_moved_to.clone(),
                        });
                        out.report.salvaged.push(note);
                    }
                    // An unsupported version or an I/O error is not damage:
                    // refuse to start rather than move a good file aside.
                    Err(e) => return Err(e),
                }
            }
            Kind::SealTmp(id) => {
                bump(*id, &mut out);
                if !path.exists() {
                    // A salvage above sealed this id (through this very
                    // tmp name) after the listing was taken.
                    continue;
                }
                if accepted_actives.contains(id) {
                    if mode == Mode::Repair {
                        crate::durable::unlink(path)
                            .map_err(|e| Error::io(path, "remove interrupted seal", e))?;
                        fsync_dir(&seg_dir)?;
                    }
                    out.report.removed.push(format!(
                        "{} (interrupted seal; its active segment is intact and is sealed again)",
                        path.display()
                    ));
                    if !out.report.to_reseal.contains(&id.0) {
                        out.report.to_reseal.push(id.0);
                    }
                } else {
                    quarantine(
                        path,
                        "interrupted seal without its active segment".into(),
                        &mut out,
                    )?;
                }
            }
            Kind::Active(id) => {
                bump(*id, &mut out);
                // A crash between creating the file and the fsync of its
                // header leaves zeros only (or nothing). Such a file never
                // held an entry (the header is durable before any append
                // is acknowledged, and no valid item is all zeros), so it
                // is removed, not quarantined.
                if all_zero(path)? {
                    if mode == Mode::Repair {
                        crate::durable::unlink(path)
                            .map_err(|e| Error::io(path, "remove unborn active segment", e))?;
                        fsync_dir(&seg_dir)?;
                    }
                    out.report.removed.push(format!(
                        "{} (creation interrupted: no header, all zero)",
                        path.display()
                    ));
                    continue;
                }
                // Scan every item first: only a clean prefix (plus a torn
                // tail) is recovered in place; anything else is salvaged by
                // item into a sealed file and never appended to again.
                let bytes = match read_bounded_active(path, geometry) {
                    Ok(b) => b,
                    Err(e @ Error::Corrupt { .. }) => {
                        let note = whole_file_loss(path, *id, "active", &e.to_string());
                        quarantine_noted(dir, mode, path, &e.to_string(), note, &mut out)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let scan = match salvage::scan_active(&bytes, *id, geometry) {
                    Ok(s) => s,
                    Err(e @ Error::Corrupt { .. }) => {
                        let note = whole_file_loss(path, *id, "active", &e.to_string());
                        quarantine_noted(dir, mode, path, &e.to_string(), note, &mut out)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                drop(bytes);
                let torn_note = (!scan.torn.is_empty()).then(|| LossNote {
                    segment: id.0,
                    file: path.display().to_string(),
                    kind: "active".into(),
                    salvaged_items: scan.items.len() as u64,
                    lost_items: scan.torn_items(),
                    lost: scan.torn.clone(),
                    unknown_loss: None,
                    header_rebuilt: false,
                    sealed_as: None,
                    original_moved_to: None,
                });
                if !scan.in_place() {
                    salvage_active_file(
                        dir,
                        mode,
                        path,
                        &scan,
                        geometry,
                        &mut sealed_counts,
                        &mut out,
                    )?;
                    superseded.push(id.0);
                    continue;
                }
                let checked = match mode {
                    Mode::Repair => {
                        ActiveSegment::open_within(path, Some(&dir.quarantine_dir()), geometry)
                            .map(|(s, r)| (Some(s), r))
                    }
                    Mode::CheckOnly => active::check_active(path).and_then(|(hid, r)| {
                        if hid == *id {
                            Ok((None, r))
                        } else {
                            Err(Error::corrupt(
                                path.display().to_string(),
                                "header id differs from name",
                            ))
                        }
                    }),
                };
                let (seg, rec): (Option<ActiveSegment>, ActiveRecovery) = match checked {
                    Ok(v) => v,
                    Err(e @ Error::Corrupt { .. }) => {
                        quarantine(path, e.to_string(), &mut out)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Some(s) = &seg
                    && s.id() != *id
                {
                    drop(seg);
                    quarantine(path, "header id differs from file name".into(), &mut out)?;
                    continue;
                }
                out.report.actives.push(ActiveNote {
                    id: id.0,
                    valid_items: rec.valid_items,
                    torn_bytes_zeroed: rec.torn_bytes_zeroed,
                    extended_from: rec.extended_from,
                    tail_saved_to: rec.tail_saved_to.as_ref().map(|p| p.display().to_string()),
                });
                if let Some(mut n) = torn_note {
                    // A torn tail: written items after the last valid one.
                    // Unflushed (a power cut) or damaged after their flush:
                    // the file cannot tell, so they are reported.
                    n.original_moved_to =
                        rec.tail_saved_to.as_ref().map(|p| p.display().to_string());
                    tracing::error!(
                        segment = id.0,
                        "torn tail, possibly acknowledged: {}",
                        n.line()
                    );
                    out.report.salvaged.push(n);
                }
                match sealed_counts.get(id) {
                    Some((count, _)) if *count == u64::from(rec.valid_items) => {
                        // The seal finished; only the removal of the source did not.
                        drop(seg);
                        if mode == Mode::Repair {
                            crate::durable::unlink(path)
                                .map_err(|e| Error::io(path, "remove sealed source", e))?;
                            fsync_dir(&seg_dir)?;
                        }
                        out.report
                            .removed
                            .push(format!("{} (already sealed)", path.display()));
                        superseded.push(id.0);
                    }
                    Some((count, _)) if *count > u64::from(rec.valid_items) => {
                        // A seal copies every item of its source, so the
                        // source lost items after the seal: the checked
                        // sealed file is the better copy. Keep the active
                        // one aside for inspection.
                        drop(seg);
                        let reason = format!(
                            "sealed copy already holds {count} items; this source recovered only {}",
                            rec.valid_items
                        );
                        quarantine(path, reason, &mut out)?;
                        superseded.push(id.0);
                    }
                    Some((count, sealed_path)) => {
                        // The source holds more than its sealed copy: seal it
                        // again and keep the short copy aside.
                        let reason = format!(
                            "sealed copy has {count} items but its active source has {}",
                            rec.valid_items
                        );
                        let sealed_path = sealed_path.clone();
                        out.sealed.remove(id);
                        out.report.sealed_ok.retain(|x| *x != id.0);
                        quarantine(&sealed_path, reason, &mut out)?;
                        out.report.to_reseal.push(id.0);
                        accepted_actives.push(*id);
                        if let Some(s) = seg {
                            out.actives.insert(*id, s);
                        }
                    }
                    None => {
                        accepted_actives.push(*id);
                        if let Some(s) = seg {
                            out.actives.insert(*id, s);
                        }
                    }
                }
            }
            Kind::Unknown => {
                let reason = if path.is_dir() {
                    "unexpected directory in segments/".to_string()
                } else {
                    "unknown file in segments/".to_string()
                };
                quarantine(path, reason, &mut out)?;
            }
        }
    }
    // Every active segment but the newest is the leftover of a roll whose
    // seal did not finish. Empty ones above the newest holding entries are
    // spares the writer prepared ahead of a roll (not leftovers: the writer
    // removes them and keeps appending to the one holding entries).
    let holding = out
        .report
        .actives
        .iter()
        .filter(|a| a.valid_items > 0 && !superseded.contains(&a.id))
        .map(|a| a.id)
        .max();
    let live: Vec<u64> = out
        .report
        .actives
        .iter()
        .filter(|a| a.valid_items > 0 || holding.is_none_or(|h| a.id < h))
        .map(|a| a.id)
        .filter(|id| !superseded.contains(id))
        .collect();
    if let Some((_, older)) = live.split_last() {
        for id in older {
            if !out.report.to_reseal.contains(id) {
                out.report.to_reseal.push(*id);
            }
        }
    }
    // An active segment below a sealed one (a newer active was salvaged
    // into a sealed file) must not take appends: its seal would come after
    // the newer id's in the journal, which accepts new ids only in order.
    let max_sealed = sealed_counts.keys().next_back().map(|s| s.0);
    for id in &live {
        if max_sealed.is_some_and(|m| *id < m) && !out.report.to_reseal.contains(id) {
            out.report.to_reseal.push(*id);
        }
    }
    out.report.to_reseal.sort_unstable();
    out.report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// Read an active file whole, refusing one longer than its header (or,
/// the header unreadable, the configured geometry) implies: nothing is
/// read or allocated by a size the bytes themselves claim.
pub(crate) fn read_bounded_active(path: &Path, geometry: Option<Geometry>) -> Result<Vec<u8>> {
    use crate::segment::format::{ACTIVE_ITEM_LEN, ACTIVE_MAGIC, ActiveLayout, HEADER_LEN, Header};
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| Error::io(path, "open active segment", e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(path, "stat active segment", e))?
        .len();
    let mut hb = [0u8; HEADER_LEN];
    let got = f
        .read_at(&mut hb, 0)
        .map_err(|e| Error::io(path, "read active header", e))?;
    let claimed = Header::decode(&hb[..got], ACTIVE_MAGIC, ACTIVE_ITEM_LEN)
        .ok()
        .and_then(|h| ActiveLayout::new(h.slot_count, h.items).ok())
        .or_else(|| geometry.and_then(|g| ActiveLayout::new(g.slot_count, g.item_capacity).ok()))
        .map(|l| l.file_len);
    match claimed {
        Some(max) if len > max => Err(Error::corrupt(
            path.display().to_string(),
            format!("{len} bytes, longer than the {max} its layout implies"),
        )),
        None => Err(Error::corrupt(
            path.display().to_string(),
            "header does not decode and no geometry is configured to rebuild it",
        )),
        Some(_) => fs::read(path).map_err(|e| Error::io(path, "read active segment", e)),
    }
}

/// A loss note for a file whose items could not be located at all.
fn whole_file_loss(path: &Path, id: SegmentId, kind: &str, why: &str) -> LossNote {
    LossNote {
        segment: id.0,
        file: path.display().to_string(),
        kind: kind.into(),
        salvaged_items: 0,
        lost_items: 0,
        lost: Vec::new(),
        unknown_loss: Some(format!(
            "no item could be located ({why}): every entry of this file is unaccounted for"
        )),
        header_rebuilt: false,
        sealed_as: None,
        original_moved_to: None,
    }
}

/// Quarantine `path` with its loss note (and its record), and report both.
fn quarantine_noted(
    dir: &DataDir,
    mode: Mode,
    path: &Path,
    reason: &str,
    mut note: LossNote,
    out: &mut Recovered,
) -> Result<()> {
    let moved_to = match mode {
        Mode::Repair => Some(
            dir.quarantine_because(path, reason, Some(&note))?
                .display()
                .to_string(),
        ),
        Mode::CheckOnly => None,
    };
    note.original_moved_to = moved_to.clone();
    out.report.quarantined.push(QuarantineNote {
        file: path.display().to_string(),
        reason: format!("{reason}; {}", note.line()),
        moved_to,
    });
    out.report.salvaged.push(note);
    Ok(())
}

/// Modification time of `path` in ms (the created time of an active file
/// whose header had to be rebuilt).
fn mtime_ms(path: &Path) -> u64 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(now_ms, |d| d.as_millis() as u64)
}

/// Seal the verified items of a damaged active file under its own id and
/// move the original to quarantine, recording exactly which items were
/// lost. An existing sealed file of the id that holds at least as many
/// items wins (an earlier salvage cut short, or a seal finished before the
/// damage); one with fewer is quarantined and replaced.
#[allow(clippy::too_many_arguments)]
fn salvage_active_file(
    dir: &DataDir,
    mode: Mode,
    path: &Path,
    scan: &salvage::ActiveScan,
    geometry: Option<Geometry>,
    sealed_counts: &mut BTreeMap<SegmentId, (u64, PathBuf)>,
    out: &mut Recovered,
) -> Result<()> {
    let id = scan.id;
    let n = scan.items.len() as u64;
    let mut note = LossNote {
        segment: id.0,
        file: path.display().to_string(),
        kind: "active".into(),
        salvaged_items: n,
        lost_items: scan.lost_items() + scan.torn_items(),
        lost: scan.lost.iter().chain(&scan.torn).cloned().collect(),
        unknown_loss: scan.truncated_to.map(|t| {
            format!(
                "file cut to {t} of {} bytes: items past byte {t} are unaccounted for",
                scan.layout.file_len
            )
        }),
        header_rebuilt: scan.header_rebuilt,
        sealed_as: None,
        original_moved_to: None,
    };
    let mut why = format!("damaged active segment salvaged by item: {}", note.line());
    match sealed_counts.get(&id).cloned() {
        Some((count, sealed_path)) if count >= n => {
            if count > n {
                // Sealed before the damage: the sealed copy holds them all.
                note.lost_items = 0;
                note.lost.clear();
                note.unknown_loss = None;
                why = format!(
                    "sealed copy already holds {count} items; this damaged source only {n}"
                );
            }
            note.sealed_as = Some(sealed_path.display().to_string());
        }
        existing => {
            if let Some((count, sealed_path)) = existing {
                let reason = format!(
                    "sealed copy has {count} items; salvage of its damaged source keeps {n}"
                );
                if mode == Mode::Repair {
                    let moved = dir.quarantine_because(&sealed_path, &reason, None)?;
                    out.report.quarantined.push(QuarantineNote {
                        file: sealed_path.display().to_string(),
                        reason,
                        moved_to: Some(moved.display().to_string()),
                    });
                    out.sealed.remove(&id);
                } else {
                    out.report.quarantined.push(QuarantineNote {
                        file: sealed_path.display().to_string(),
                        reason,
                        moved_to: None,
                    });
                }
                out.report.sealed_ok.retain(|x| *x != id.0);
            }
            if n > 0 && mode == Mode::Repair {
                // The directory of a sealed file is rebuilt from the hashes,
                // so its slot count is free: the configured one, never a
                // size only an untrusted header claims.
                let slots = geometry.map_or_else(
                    || {
                        if scan.truncated_to.is_none() {
                            scan.layout.slot_count
                        } else {
                            scan.layout.slot_count.min(1 << 16)
                        }
                    },
                    |g| g.slot_count,
                );
                let created = scan.created_ms.unwrap_or_else(|| mtime_ms(path));
                let packed = salvage::pack(scan.items.iter().map(|(_, e)| *e));
                let (p, _meta) = write_sealed_streaming(
                    &dir.segments_dir(),
                    id,
                    created,
                    now_ms(),
                    slots,
                    &packed,
                    PACKED_ENTRY_LEN,
                )?;
                let s = SealedInfo::of(&SealedSegment::open(&p)?);
                sealed_counts.insert(id, (s.footer().item_count, p.clone()));
                out.report.sealed_ok.push(id.0);
                out.sealed.insert(id, s);
                note.sealed_as = Some(p.display().to_string());
            } else if n > 0 {
                sealed_counts.insert(id, (n, path.to_path_buf()));
            }
        }
    }
    if note.is_loss() {
        tracing::error!(segment = id.0, "{}", note.line());
    } else {
        tracing::warn!(segment = id.0, "{}", note.line());
    }
    quarantine_noted(dir, mode, path, &why, note, out)
}

/// Salvage a sealed file that failed its check: copy the original to
/// quarantine first (durably), then replace it with a sealed file of the
/// same id holding every item whose CRC verified. A file whose items
/// cannot be located is quarantined whole. Returns the note.
fn salvage_sealed_file(
    dir: &DataDir,
    mode: Mode,
    path: &Path,
    id: SegmentId,
    why: &str,
) -> Result<LossNote> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, "read sealed segment", e))?;
    let mut note = match salvage::salvage_sealed(&bytes, id) {
        Ok(s) => LossNote {
            segment: id.0,
            file: path.display().to_string(),
            kind: "sealed".into(),
            salvaged_items: s.entries.len() as u64,
            lost_items: s.lost_items(),
            lost: s.lost.clone(),
            unknown_loss: None,
            header_rebuilt: false,
            sealed_as: None,
            original_moved_to: None,
        },
        Err(e) => {
            let note = whole_file_loss(path, id, "sealed", &format!("{why}; {e}"));
            let mut n2 = note.clone();
            if mode == Mode::Repair {
                n2.original_moved_to = Some(
                    dir.quarantine_because(path, why, Some(&note))?
                        .display()
                        .to_string(),
                );
            }
            return Ok(n2);
        }
    };
    if mode == Mode::CheckOnly {
        return Ok(note);
    }
    let s = salvage::salvage_sealed(&bytes, id)?;
    // Copy first: until the rename below, the original stays in place, so
    // a crash in between redoes the salvage at the next start.
    let copy = copy_to_quarantine(dir, path)?;
    note.original_moved_to = Some(copy.display().to_string());
    write_record(
        &copy,
        &QuarantineRecord {
            original: path.display().to_string(),
            moved_to: copy.display().to_string(),
            reason: format!("{why}; salvaged by item"),
            at_ms: now_ms(),
            loss: Some(note.clone()),
        },
    )?;
    if !s.entries.is_empty() {
        let packed = salvage::pack(s.entries.iter().copied());
        let (p, _) = write_sealed_streaming(
            &dir.segments_dir(),
            id,
            s.created_ms,
            now_ms(),
            s.slot_count.min(1 << 20),
            &packed,
            PACKED_ENTRY_LEN,
        )?;
        note.sealed_as = Some(p.display().to_string());
    } else {
        crate::durable::unlink(path).map_err(|e| Error::io(path, "remove salvaged original", e))?;
        fsync_dir(&dir.segments_dir())?;
    }
    if note.is_loss() {
        tracing::error!(segment = id.0, "{}", note.line());
    }
    Ok(note)
}

/// Durable copy of `path` into `quarantine/` under a unique name.
fn copy_to_quarantine(dir: &DataDir, path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unnamed".into());
    let qdir = dir.quarantine_dir();
    let mut dst = qdir.join(format!("{name}.{}", now_ms()));
    let mut n = 0;
    while dst.exists() {
        n += 1;
        dst = qdir.join(format!("{name}.{}.{n}", now_ms()));
    }
    fs::copy(path, &dst).map_err(|e| Error::io(&dst, "copy damaged file to quarantine", e))?;
    crate::durable::created(&dst);
    crate::durable::written(&dst);
    fsync_path(&dst)?;
    fsync_dir(&qdir)?;
    Ok(dst)
}

/// What the segment files hold that the journal does not account for yet
/// (read-only: for `tierindex status` on a directory whose broker may run).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LocalPending {
    /// Verified items in `.active` files (read as a scan does, in place).
    pub unsealed_items: u64,
    /// Active files holding at least one verified item.
    pub active_segments: Vec<u64>,
    /// Sealed files the journal does not know: (id, bytes).
    pub unjournaled_sealed: Vec<(u64, u64)>,
}

/// Scan `root/segments` for unsealed entries and sealed files the journal
/// does not know (`known` says which ids it knows). Files that cannot be
/// read are skipped (fsck reports them).
pub fn local_pending(root: &Path, known: &dyn Fn(SegmentId) -> bool) -> LocalPending {
    let mut out = LocalPending::default();
    let Ok(rd) = fs::read_dir(root.join(SEGMENTS_DIR)) else {
        return out;
    };
    let mut files: Vec<(Kind, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .map(|e| (classify(&e.file_name().to_string_lossy()), e.path()))
        .collect();
    files.sort();
    for (kind, path) in files {
        match kind {
            Kind::Active(id) => {
                let n = fs::read(&path)
                    .ok()
                    .and_then(|b| salvage::scan_active(&b, id, None).ok())
                    .map_or(0, |s| s.items.len() as u64);
                if n > 0 {
                    out.unsealed_items += n;
                    out.active_segments.push(id.0);
                }
            }
            Kind::Sealed(id) if !known(id) => {
                let len = fs::metadata(&path).map_or(0, |m| m.len());
                out.unjournaled_sealed.push((id.0, len));
            }
            _ => {}
        }
    }
    out
}

/// Every quarantine record (`quarantine/*.why.json`), oldest name first.
pub fn quarantine_records(root: &Path) -> Vec<(PathBuf, QuarantineRecord)> {
    let Ok(rd) = fs::read_dir(root.join(QUARANTINE_DIR)) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, QuarantineRecord)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(RECORD_SUFFIX))
        .filter_map(|p| {
            let b = fs::read(&p).ok()?;
            let r: QuarantineRecord = serde_json::from_slice(&b).ok()?;
            Some((p, r))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// True when `path` is empty or holds only zero bytes.
fn all_zero(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, "open active segment", e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(path, "read active segment", e))?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Entry;
    use crate::segment::sealed::{build_sealed, write_sealed_file};

    #[test]
    fn second_open_is_refused_with_holder() {
        let d = tempfile::tempdir().unwrap();
        let _a = DataDir::open(d.path()).unwrap();
        match DataDir::open(d.path()) {
            Err(Error::Locked { holder, .. }) => assert!(holder.contains("pid="), "{holder}"),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("second open must fail"),
        }
    }

    #[test]
    fn garbage_truncated_and_unknown_files_are_quarantined_not_deleted() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let segs = dd.segments_dir();
        let es: Vec<Entry> = (0..50)
            .map(|i| Entry {
                key_hash: i,
                offset: i,
                size: 1,
                timestamp_ms: i,
            })
            .collect();
        let (bytes, _) = build_sealed(SegmentId(1), 0, 0, 8, &es).unwrap();
        write_sealed_file(&segs, SegmentId(1), &bytes).unwrap();
        write_sealed_file(&segs, SegmentId(2), &bytes[..bytes.len() - 7]).unwrap();
        fs::write(segs.join("00000000000000000003.seg"), b"garbage").unwrap();
        fs::write(segs.join("notes.txt"), b"hello").unwrap();

        let check = recover(&dd, Mode::CheckOnly).unwrap();
        assert_eq!(check.report.quarantined.len(), 3);
        assert!(
            segs.join("notes.txt").exists(),
            "check-only must not move files"
        );

        let r = recover(&dd, Mode::Repair).unwrap();
        // "Segment 2" holds segment 1's bytes (cut): none of its items
        // validates against the id in its name, so nothing is salvaged.
        assert_eq!(r.report.sealed_ok, vec![1]);
        assert!(
            r.report
                .salvaged
                .iter()
                .any(|n| n.segment == 2 && n.salvaged_items == 0 && n.unknown_loss.is_some())
        );
        assert_eq!(r.report.quarantined.len(), 3);
        let moved = fs::read_dir(dd.quarantine_dir())
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(RECORD_SUFFIX)
            })
            .count();
        assert_eq!(moved, 3);
        // Each move has its record: why, and what was lost.
        assert_eq!(quarantine_records(d.path()).len(), 3);
        assert_eq!(r.max_id_seen, Some(SegmentId(3)));
        assert!(r.sealed.contains_key(&SegmentId(1)));
    }
}
