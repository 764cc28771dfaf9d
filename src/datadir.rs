//! The data directory: its lock, its layout, and the start-up check that
//! turns whatever a crash left into a consistent set of segments.
//!
//! ```text
//! DATA_DIR/
//!   LOCK                 flock'd by the owning process; holds pid/host/start
//!   segments/            NNN.active (at most one in steady state), NNN.seg
//!   journal/             upload journal (see journal module)
//!   quarantine/          files that failed their checks, moved aside, never deleted
//! ```
//!
//! Start-up rules (also tabled in `docs/crash-safety.md`):
//! - `NNN.seg` must pass the full sealed check, else it is quarantined.
//! - `NNN.active` that is empty or all zeros (its creation never became
//!   durable) is removed: it never held an entry.
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

use crate::error::{Error, Result};
use crate::segment::active::{self, ActiveRecovery, ActiveSegment};
use crate::segment::sealed::{SealedSegment, fsync_dir};
use crate::segment::{SegmentId, now_ms};

pub const SEGMENTS_DIR: &str = "segments";
pub const JOURNAL_DIR: &str = "journal";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const LOCK_FILE: &str = "LOCK";

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
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
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
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(&lock_path, "lock data directory", e));
            }
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
    ) -> Result<(DataDir, crate::identity::Identity)> {
        let dd = DataDir::open(root)?;
        let id = crate::identity::ensure(root, stream, store, endpoint)?;
        Ok((dd, id))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn segments_dir(&self) -> PathBuf {
        self.root.join(SEGMENTS_DIR)
    }
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
        fs::rename(path, &dst).map_err(|e| Error::io(path, "move file to quarantine", e))?;
        fsync_dir(&qdir)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        tracing::warn!(from = %path.display(), to = %dst.display(), "quarantined");
        Ok(dst)
    }
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
    pub file: String,
    pub reason: String,
    pub moved_to: Option<String>,
}

/// The check of one active segment.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ActiveNote {
    pub id: u64,
    pub valid_items: u32,
    pub torn_bytes_zeroed: u64,
    pub extended_from: Option<u64>,
    /// Where a damaged span holding checksum-valid items was copied.
    pub tail_saved_to: Option<String>,
}

/// Everything start-up found and did. Serializable for `--json`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RecoveryReport {
    pub sealed_ok: Vec<u64>,
    pub actives: Vec<ActiveNote>,
    pub quarantined: Vec<QuarantineNote>,
    /// Files removed because a durable copy of their content exists.
    pub removed: Vec<String>,
    /// Active segments that must be (or were) sealed again.
    pub to_reseal: Vec<u64>,
    pub elapsed_ms: u64,
}

impl RecoveryReport {
    /// True when nothing needed repair.
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_empty()
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
    pub sealed: BTreeMap<SegmentId, SealedSegment>,
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
pub fn recover(dir: &DataDir, mode: Mode) -> Result<Recovered> {
    recover_with(dir, mode, true)
}

/// [`recover`], choosing whether sealed files get the full check (every
/// byte's CRC: `fsck`) or the structural one (footer, header, directory:
/// start-up, whose cost must not grow with the segments kept locally).
pub fn recover_with(dir: &DataDir, mode: Mode, full_sealed_check: bool) -> Result<Recovered> {
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
            Mode::Repair => Some(dir.quarantine(path)?.display().to_string()),
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

    for (kind, path) in &files {
        match kind {
            Kind::Sealed(id) => {
                bump(*id, &mut out);
                let opened = if full_sealed_check {
                    SealedSegment::open(path)
                } else {
                    SealedSegment::open_light(path)
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
                    Err(e @ Error::Corrupt { .. }) => quarantine(path, e.to_string(), &mut out)?,
                    // An unsupported version or an I/O error is not damage:
                    // refuse to start rather than move a good file aside.
                    Err(e) => return Err(e),
                }
            }
            Kind::SealTmp(id) => {
                bump(*id, &mut out);
                if accepted_actives.contains(id) {
                    if mode == Mode::Repair {
                        fs::remove_file(path)
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
                        fs::remove_file(path)
                            .map_err(|e| Error::io(path, "remove unborn active segment", e))?;
                        fsync_dir(&seg_dir)?;
                    }
                    out.report.removed.push(format!(
                        "{} (creation interrupted: no header, all zero)",
                        path.display()
                    ));
                    continue;
                }
                let checked = match mode {
                    Mode::Repair => ActiveSegment::open(path, Some(&dir.quarantine_dir()))
                        .map(|(s, r)| (Some(s), r)),
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
                match sealed_counts.get(id) {
                    Some((count, _)) if *count == u64::from(rec.valid_items) => {
                        // The seal finished; only the removal of the source did not.
                        drop(seg);
                        if mode == Mode::Repair {
                            fs::remove_file(path)
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
    // seal did not finish.
    let live: Vec<u64> = out
        .report
        .actives
        .iter()
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
    out.report.to_reseal.sort_unstable();
    out.report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(out)
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
        assert_eq!(r.report.sealed_ok, vec![1]);
        assert_eq!(r.report.quarantined.len(), 3);
        assert_eq!(fs::read_dir(dd.quarantine_dir()).unwrap().count(), 3);
        assert_eq!(r.max_id_seen, Some(SegmentId(3)));
        assert!(r.sealed.contains_key(&SegmentId(1)));
    }
}
