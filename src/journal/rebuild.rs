//! Rebuilding a damaged (or lost) journal from what survives: every intact
//! frame of the old file, before and after the damage, and the sealed
//! segment files on disk. Used by `tierindex fsck --repair`.
//!
//! ## What it keeps, and why nothing is forgotten
//! - Every CRC-valid frame is read, in file order, resynchronising after a
//!   damaged span on the next intact frame. Records are folded *forward*:
//!   a record that does not follow from the state seen so far (because the
//!   frame holding its predecessor was lost) is still applied when it moves
//!   its segment forward, since the writer only ever wrote it after that
//!   predecessor was durable. A record for a segment whose `Sealed` record
//!   was lost is taken only if a local sealed file supplies the metadata.
//! - Every sealed file in `segments/` that passes the full check and that the
//!   folded journal does not know (or knows only as `Released`) is registered
//!   as `Sealed` with the metadata read from the file. The pipeline then
//!   drives it again; every step of the drive compares before it writes, so
//!   an object already in the store is found, never written over.
//! - A segment known with another CRC than its local file keeps the
//!   journal's record (the drive quarantines a local copy that does not
//!   match; nothing is deleted).
//! - Nothing is deleted: the old file is kept as `journal.log.damaged.<ms>`
//!   (fsynced) before the new one is installed, less a tail of zero bytes
//!   after its last non-zero byte (a zero-extended or sparse file: its
//!   length is logged); segment files and store
//!   objects are not touched. Segments that exist only in the store and
//!   whose records were in the damaged span are not re-registered (their
//!   objects are kept: the reconciler never deletes an object no journal
//!   record of ours names).
//!
//! ## Order
//! 1. hold the data directory's lock (`rebuild_in`: the caller's
//!    `DataDir`; `rebuild` takes it);
//! 2. read and salvage the old file, fold, add the local sealed files;
//! 3. copy the old file to `journal.log.damaged.<ms>`, fsync it and the
//!    directory;
//! 4. write the new file as a compaction does (tmp, fsync, read back and
//!    compare, rename, fsync the directory).
//!
//! A crash before 4's rename leaves the old file in place (and maybe the
//! copy); running the rebuild again gives the same result.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{Frame, JournalState, Record, SegmentRecord, SegmentState};
use super::replay::{FRAME_HEADER_LEN, HEADER_LEN, decode_header, find_resync};
use super::compact::remove_tmp;
use crate::durable::fsync_dir;
use super::{LOG_FILE, TMP_FILE, TailKind, compact, journal_dir};
use crate::error::{Error, Result};
use crate::segment::sealed::SealedSegment;
use crate::segment::{SealedMeta, SegmentId};

/// What a rebuild found and wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    /// Where the old journal was kept (absent when there was none).
    pub damaged_copy: Option<PathBuf>,
    /// Intact frames read from the old journal.
    pub frames_salvaged: u64,
    /// Bytes of the old journal that were not part of an intact frame.
    pub bytes_skipped: u64,
    /// Records applied although their predecessor was lost.
    pub records_forced: u64,
    /// Records dropped: no metadata for their segment (its `Sealed` record
    /// was lost and no local file has it), or they move a segment backwards.
    pub records_dropped: u64,
    /// Segments registered as `Sealed` from their local files.
    pub registered_from_files: Vec<u64>,
    /// Local sealed files that disagree with the journal's record of their
    /// id, or fail their check: left in place, named here.
    pub conflicts: Vec<String>,
    /// Segments in the new journal.
    pub segments: usize,
    /// Highest segment id kept (never lowered: ids are not reused).
    pub max_segment_id: Option<u64>,
}

/// Rank of a state along the happy path, for the forward fold.
fn rank(s: SegmentState) -> u8 {
    match s {
        SegmentState::Sealed => 0,
        SegmentState::Uploading => 1,
        SegmentState::Uploaded => 2,
        SegmentState::Verified => 3,
        SegmentState::Committed => 4,
        SegmentState::Released => 5,
        SegmentState::Quarantined => 6,
        // A branch off Verified that never reaches Committed: ranked with
        // Verified, so a salvaged record never moves a committed segment
        // onto it.
        SegmentState::Resealing | SegmentState::Resealed => 3,
    }
}

/// The fold of everything salvaged.
#[derive(Default)]
struct Fold {
    segments: BTreeMap<SegmentId, SegmentRecord>,
    /// Records of segments whose metadata is not known (yet).
    orphaned: BTreeMap<SegmentId, Vec<Record>>,
    max_id: Option<SegmentId>,
    max_offset: Option<u64>,
    forced: u64,
    dropped: u64,
}

impl Fold {
    fn see_id(&mut self, id: SegmentId) {
        self.max_id = self.max_id.max(Some(id));
    }

    fn see_meta(&mut self, meta: &SealedMeta) {
        self.see_id(meta.id);
        if meta.item_count > 0 {
            self.max_offset = self.max_offset.max(Some(meta.max_offset));
        }
    }

    fn snapshot(&mut self, rec: SegmentRecord) {
        self.see_meta(&rec.meta);
        self.segments.insert(rec.meta.id, rec);
    }

    fn record(&mut self, rec: &Record) {
        self.see_id(rec.id());
        if let Record::Sealed { meta } = rec {
            self.see_meta(meta);
            self.segments
                .entry(meta.id)
                .or_insert_with(|| SegmentRecord {
                    meta: meta.clone(),
                    state: SegmentState::Sealed,
                    attempt: 0,
                    key: None,
                    multipart_id: None,
                    etag: None,
                    version: None,
                    reason: None,
                    resealed_into: None,
                });
            return;
        }
        let Some(cur) = self.segments.get_mut(&rec.id()) else {
            self.orphaned.entry(rec.id()).or_default().push(rec.clone());
            return;
        };
        match apply_forward(cur, rec) {
            Applied::Exact => {}
            Applied::Forced => self.forced += 1,
            Applied::Dropped => self.dropped += 1,
        }
    }
}

enum Applied {
    Exact,
    Forced,
    Dropped,
}

/// Applies `rec` to `cur` if it moves the segment forward (or is the legal
/// next step). Terminal states never change.
fn apply_forward(cur: &mut SegmentRecord, rec: &Record) -> Applied {
    use SegmentState as S;
    let legal = {
        let mut st = JournalState::from_parts(
            [(cur.meta.id, cur.clone())].into_iter().collect(),
            Some(cur.meta.id),
            None,
        );
        st.apply(std::slice::from_ref(rec)).is_ok().then_some(st)
    };
    if let Some(st) = legal {
        if let Some(next) = st.get(cur.meta.id) {
            *cur = next.clone();
        }
        return Applied::Exact;
    }
    if matches!(cur.state, S::Released | S::Quarantined | S::Resealed) {
        return Applied::Dropped;
    }
    let target = match rec {
        Record::Sealed { .. } => return Applied::Dropped,
        Record::Uploading { .. } | Record::MultipartAborted { .. } => S::Uploading,
        Record::Uploaded { .. } => S::Uploaded,
        Record::Verified { .. } => S::Verified,
        Record::Committed { .. } => S::Committed,
        Record::Released { .. } => S::Released,
        Record::Quarantined { .. } => S::Quarantined,
        // Only ever legal from Quarantined (handled above).
        Record::Requeued { .. } => return Applied::Dropped,
        Record::Resealing { .. } => S::Resealing,
        Record::Resealed { .. } => S::Resealed,
    };
    if rank(target) < rank(cur.state) {
        return Applied::Dropped;
    }
    match rec {
        Record::Uploading {
            attempt,
            key,
            multipart_id,
            ..
        } => {
            cur.attempt = cur.attempt.max(*attempt);
            cur.key = Some(key.clone())
                .filter(|k| !k.is_empty())
                .or(cur.key.take());
            cur.multipart_id = multipart_id.clone();
            cur.etag = None;
            cur.version = None;
        }
        Record::MultipartAborted { .. } => cur.multipart_id = None,
        Record::Uploaded { etag, version, .. } => {
            cur.multipart_id = None;
            cur.etag = etag.clone();
            cur.version = version.clone();
        }
        Record::Quarantined { reason, .. } => cur.reason = Some(reason.clone()),
        Record::Resealing { into, reason, .. } => {
            cur.reason = Some(reason.clone());
            cur.resealed_into = Some(*into);
        }
        _ => {}
    }
    cur.state = target;
    Applied::Forced
}

/// Reads every intact frame of `bytes` (a journal file, maybe damaged, maybe
/// with a damaged header) into `fold`. Returns (frames, bytes skipped).
fn salvage(bytes: &[u8], fold: &mut Fold) -> Result<(u64, u64)> {
    let mut pos = HEADER_LEN.min(bytes.len());
    let mut skipped = if decode_header(bytes).is_ok() {
        0
    } else {
        HEADER_LEN.min(bytes.len()) as u64
    };
    let mut frames = 0u64;
    while pos + FRAME_HEADER_LEN <= bytes.len() {
        let (frame, len) = match super::replay::decode_frame_at(bytes, pos) {
            Ok(x) => x,
            Err(e) if e.kind == TailKind::Newer => {
                // Rebuilding would drop what a newer build wrote.
                return Err(Error::Unsupported(format!(
                    "journal frame at byte {pos}: {}; rebuild it with that version",
                    e.detail
                )));
            }
            Err(_) => match find_resync(bytes, pos + 1) {
                Some((at, _)) => {
                    let at = at as usize;
                    skipped += (at - pos) as u64;
                    pos = at;
                    continue;
                }
                None => {
                    skipped += (bytes.len() - pos) as u64;
                    pos = bytes.len();
                    break;
                }
            },
        };
        frames += 1;
        pos += len;
        match frame {
            Frame::MaxId(m) => {
                if let Some(m) = m {
                    fold.see_id(m);
                }
            }
            Frame::MaxOffset(m) => fold.max_offset = fold.max_offset.max(m),
            Frame::Snapshot(rec) => fold.snapshot(*rec),
            Frame::Batch(records) => {
                for r in &records {
                    fold.record(r);
                }
            }
        }
    }
    skipped += (bytes.len() - pos) as u64;
    Ok((frames, skipped))
}

/// Read-only, for `fsck` when the journal does not open: the segments that
/// the intact frames of `journal.log` record as `Committed` or `Released`
/// (also those whose `Sealed` record was in the damaged span), so that a
/// damaged local copy of one is quarantined as it is rather than salvaged
/// and its entries committed a second time. Nothing is written.
pub fn committed_in_intact_frames(data_dir: &Path) -> Result<std::collections::BTreeSet<SegmentId>> {
    let log = journal_dir(data_dir).join(LOG_FILE);
    let (bytes, _zeros) = crate::durable::open_regular(&log, false)
        .and_then(|f| super::read_trimmed(&f))
        .map_err(|e| Error::io(&log, "read journal", e))?;
    let mut fold = Fold::default();
    salvage(&bytes, &mut fold)?;
    let done = |s: SegmentState| matches!(s, SegmentState::Committed | SegmentState::Released);
    let mut out: std::collections::BTreeSet<SegmentId> = fold
        .segments
        .iter()
        .filter(|(_, r)| done(r.state))
        .map(|(id, _)| *id)
        .collect();
    for (id, recs) in &fold.orphaned {
        if recs
            .iter()
            .any(|r| matches!(r, Record::Committed { .. } | Record::Released { .. }))
        {
            out.insert(*id);
        }
    }
    Ok(out)
}

/// [`rebuild_in`] for a caller that holds no `DataDir`:
/// takes the data directory's lock for the rebuild (a broker or a command
/// holding the directory makes it fail with [`Error::Locked`]).
#[cfg(any(test, feature = "testing"))]
pub fn rebuild(data_dir: &Path) -> Result<RebuildReport> {
    let _lock = crate::lock::DirLock::alone(data_dir)?;
    rebuild_locked(data_dir)
}

/// Rebuilds `DATA_DIR/journal/journal.log` from its intact frames and the
/// sealed files in `DATA_DIR/segments` (see the module doc), under the
/// data directory's lock (a `DataDir`'s: `dd.lock()`).
pub fn rebuild_in(lock: &crate::lock::DirLock) -> Result<RebuildReport> {
    rebuild_locked(lock.root())
}

fn rebuild_locked(data_dir: &Path) -> Result<RebuildReport> {
    let dir = journal_dir(data_dir);
    match fs::create_dir(&dir) {
        Ok(()) => fsync_dir(data_dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(&dir, "create journal directory", e)),
    }
    remove_tmp(&dir)?;
    let log = dir.join(LOG_FILE);
    let old = match fs::File::open(&log).and_then(|f| super::read_trimmed(&f)) {
        Ok((b, zeros)) => {
            if zeros > 0 {
                tracing::warn!(
                    file = %log.display(),
                    "the journal ends in {zeros} zero bytes (a zero-extended or sparse \
                     file): left out of the rebuild and of its damaged copy"
                );
            }
            Some(b)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&log, "read journal", e)),
    };
    let mut fold = Fold::default();
    let mut report = RebuildReport::default();
    let mut generation = 1;
    if let Some(bytes) = &old {
        let (frames, skipped) = salvage(bytes, &mut fold)?;
        report.frames_salvaged = frames;
        report.bytes_skipped = skipped;
        if let Ok(h) = decode_header(bytes) {
            generation = h.generation.saturating_add(1);
        }
    }

    // The sealed files on disk.
    let seg_dir = data_dir.join(crate::segment::names::SEGMENTS_DIR);
    let mut files: BTreeMap<SegmentId, PathBuf> = BTreeMap::new();
    match fs::read_dir(&seg_dir) {
        Ok(rd) => {
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(&seg_dir, "list segments", e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if let (Some(id), true) = (
                    crate::segment::names::segment_file_id(name),
                    name.ends_with(".seg"),
                ) {
                    files.insert(id, entry.path());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&seg_dir, "list segments", e)),
    }
    for (id, path) in &files {
        let known = fold.segments.get(id).map(|r| r.state);
        if known.is_some_and(|s| s != SegmentState::Released) {
            continue;
        }
        let meta = match SealedSegment::open(path) {
            Ok(seg) if seg.id() == *id => seg.meta(),
            Ok(seg) => {
                report.conflicts.push(format!(
                    "{}: footer names segment {}; left in place",
                    path.display(),
                    seg.id()
                ));
                continue;
            }
            Err(e) => {
                report.conflicts.push(format!(
                    "{}: {e}; left in place (fsck quarantines it)",
                    path.display()
                ));
                continue;
            }
        };
        fold.see_meta(&meta);
        let mut rec = SegmentRecord {
            meta,
            state: SegmentState::Sealed,
            attempt: 0,
            key: None,
            multipart_id: None,
            etag: None,
            version: None,
            reason: None,
            resealed_into: None,
        };
        // Records whose Sealed record was lost: replay them on the file's
        // metadata when they name its bytes (the key holds the checksum).
        let crc = format!("-{}.seg", rec.meta.key_sum());
        for r in fold.orphaned.remove(id).unwrap_or_default() {
            let names_other = matches!(&r, Record::Uploading { key, .. } if !key.ends_with(&crc));
            if names_other {
                fold.dropped += 1;
                continue;
            }
            match apply_forward(&mut rec, &r) {
                Applied::Exact => {}
                Applied::Forced => fold.forced += 1,
                Applied::Dropped => fold.dropped += 1,
            }
        }
        if rec.state == SegmentState::Released {
            // Released, yet the file is here (an unlink lost to power loss):
            // register it again; the drive finds its object and releases it.
            rec.state = SegmentState::Sealed;
            rec.attempt = 0;
        }
        report.registered_from_files.push(id.0);
        fold.segments.insert(*id, rec);
    }
    fold.dropped += fold.orphaned.values().map(|v| v.len() as u64).sum::<u64>();
    for (id, path) in &files {
        let Some(r) = fold.segments.get(id) else {
            continue;
        };
        let Ok(seg) = SealedSegment::open_light(path) else {
            continue;
        };
        let m = seg.meta();
        if m.key_sum() != r.meta.key_sum() || m.file_len != r.meta.file_len {
            report.conflicts.push(format!(
                "{}: checksum {} / {} bytes, the journal records {} / {}: the journal's \
                 record is kept (the pipeline quarantines a copy that does not match)",
                path.display(),
                m.key_sum(),
                m.file_len,
                r.meta.key_sum(),
                r.meta.file_len
            ));
        }
    }

    // As a compaction: the newest Released segment is kept (the evidence
    // of what was committed, helper-88), the others dropped.
    let newest = fold
        .segments
        .values()
        .rev()
        .find(|r| r.state == SegmentState::Released)
        .map(|r| r.meta.id);
    let state = JournalState::from_parts(
        fold.segments
            .into_iter()
            .filter(|(_, r)| JournalState::kept_by_compaction(r, newest))
            .collect(),
        fold.max_id,
        fold.max_offset,
    );
    report.records_forced = fold.forced;
    report.records_dropped = fold.dropped;
    report.segments = state.segments().len();
    report.max_segment_id = state.max_segment_id().map(|s| s.0);

    // Keep the old file before anything replaces it.
    if let Some(bytes) = &old {
        let copy = dir.join(format!("journal.log.damaged.{}", crate::segment::now_ms()));
        crate::durable::write_file(&copy, bytes)
            .map_err(|e| Error::io(&copy, "keep the damaged journal", e))?;
        crate::durable::fsync_path(&copy)?;
        fsync_dir(&dir)?;
        report.damaged_copy = Some(copy);
    }
    let (_file, _len, _) = compact::write_snapshot_file(&dir, generation, &state)?;
    crate::durable::rename(&dir.join(TMP_FILE), &log)
        .map_err(|e| Error::io(&log, "install rebuilt journal", e))?;
    // IMPORTANT: makes the rename durable before anyone appends.
    fsync_dir(&dir)?;
    tracing::warn!(
        file = %log.display(),
        segments = report.segments,
        from_files = report.registered_from_files.len(),
        skipped = report.bytes_skipped,
        "journal rebuilt"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, JournalOptions, log_path};
    use crate::segment::Entry;
    use crate::segment::sealed::{build_sealed, write_sealed_file};

    fn sealed(dir: &Path, id: u64) -> SealedMeta {
        let entries: Vec<Entry> = (0..10)
            .map(|i| Entry {
                key_hash: i,
                offset: id * 100 + i,
                size: 1,
                timestamp_ms: 1_000 + i,
            })
            .collect();
        let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, 8, &entries).unwrap();
        write_sealed_file(&dir.join("segments"), SegmentId(id), &bytes).unwrap();
        meta
    }

    fn steps(meta: &SealedMeta) -> Vec<Vec<Record>> {
        let id = meta.id;
        vec![
            vec![Record::Sealed { meta: meta.clone() }],
            vec![Record::Uploading {
                id,
                attempt: 1,
                key: format!("s/segments/{:020}-{}.seg", id.0, meta.key_sum()),
                multipart_id: None,
            }],
            vec![Record::Uploaded {
                id,
                etag: None,
                version: None,
            }],
            vec![Record::Verified { id }],
            vec![Record::Committed { id }],
        ]
    }

    /// A journal with segments 1..=3 Committed, one frame per record; the
    /// frame offsets in order.
    fn journal(dir: &Path) -> (Vec<SealedMeta>, Vec<u64>) {
        fs::create_dir_all(dir.join("segments")).unwrap();
        let (mut j, _) = Journal::open(dir, JournalOptions::default()).unwrap();
        let mut metas = Vec::new();
        let mut offsets = Vec::new();
        for id in 1..=3 {
            let meta = sealed(dir, id);
            for batch in steps(&meta) {
                offsets.push(j.file_len());
                j.append(&batch).unwrap();
            }
            metas.push(meta);
        }
        (metas, offsets)
    }

    #[test]
    fn a_damaged_frame_in_the_middle_loses_no_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (metas, offsets) = journal(tmp.path());
        let before = Journal::open_read_only(tmp.path()).unwrap().0;
        // Flip one bit in segment 2's Sealed frame: its meta is lost from the
        // journal, the later records of 2 are orphaned until the local file
        // supplies it.
        let path = log_path(tmp.path());
        let mut bytes = fs::read(&path).unwrap();
        let at = offsets[5] as usize + 12;
        bytes[at] ^= 0x04;
        fs::write(&path, &bytes).unwrap();
        let err = Journal::open(tmp.path(), JournalOptions::default()).unwrap_err();
        assert!(err.to_string().contains("fsck --repair"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), bytes, "nothing cut");

        let r = rebuild(tmp.path()).unwrap();
        assert_eq!(r.registered_from_files, vec![2], "{r:?}");
        assert!(r.bytes_skipped > 0 && r.frames_salvaged > 10, "{r:?}");
        assert!(r.damaged_copy.as_ref().unwrap().exists());
        assert_eq!(fs::read(r.damaged_copy.unwrap()).unwrap(), bytes);
        let (j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        // Every segment is there, in its last state, with the same meta.
        assert_eq!(j.segments(), before.segments());
        assert_eq!(j.max_segment_id(), Some(SegmentId(3)));
        assert_eq!(j.get(SegmentId(2)).unwrap().meta, metas[1]);
    }

    #[test]
    fn from_scratch_registers_every_sealed_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (metas, _) = journal(tmp.path());
        fs::remove_file(log_path(tmp.path())).unwrap();
        let r = rebuild(tmp.path()).unwrap();
        assert_eq!(r.registered_from_files, vec![1, 2, 3]);
        assert_eq!(r.damaged_copy, None);
        let (j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        for m in &metas {
            let rec = j.get(m.id).unwrap();
            assert_eq!((rec.state, &rec.meta), (SegmentState::Sealed, m));
        }
    }

    #[test]
    fn forward_fold_keeps_the_later_state_when_a_step_is_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, offsets) = journal(tmp.path());
        // Lose segment 3's Verified frame (offsets[13]): Committed follows.
        let path = log_path(tmp.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[offsets[13] as usize + 9] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let r = rebuild(tmp.path()).unwrap();
        assert_eq!(r.records_forced, 1, "{r:?}");
        assert!(r.registered_from_files.is_empty(), "{r:?}");
        let (j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert_eq!(j.get(SegmentId(3)).unwrap().state, SegmentState::Committed);
    }
}
