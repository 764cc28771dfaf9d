//! Compaction: rewrite the live state as a fresh journal file so that replay
//! cost follows the number of live segments, not the history.
//!
//! Order, and what a crash after each step leaves (also in
//! `docs/format/journal.md`):
//! 1. write `journal.log.tmp`: header (generation + 1), one `MaxId` frame,
//!    one `Snapshot` frame per segment that is not Released;
//!    crash: tmp partial or whole, `journal.log` untouched; open removes tmp.
//! 2. fsync the tmp, then read it back and replay it: it must rebuild exactly
//!    the state we meant to write (pair assertion, so a bug here can never
//!    replace a good journal with a bad one);
//!    crash: as 1.
//! 3. rename tmp over `journal.log`;
//!    crash: the rename is atomic, the directory holds either the old file
//!    plus tmp (open removes tmp) or only the new file. Both replay to the
//!    same state, Released segments aside.
//! 4. fsync the directory: makes 3 durable. Appends only resume after it.
//!
//! A failure in 1 or 2 leaves `journal.log` untouched and our descriptor on it,
//! so it is returned as an error without poisoning. A failure in 3 or 4 leaves
//! us unsure which file the name points to (durably), so it poisons.

use std::fs::File;
use std::io;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::record::{Frame, JournalState, SegmentState};
use super::replay::{encode_frame, encode_header, replay_bytes};
use super::TMP_FILE;
use crate::error::{Error, Result};

/// Removes `journal.log.tmp` if present; true if it was there.
pub(super) fn remove_tmp(dir: &Path) -> Result<bool> {
    let tmp = dir.join(TMP_FILE);
    match crate::durable::unlink(&tmp) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(&tmp, "remove interrupted compaction file", e)),
    }
}

/// Writes `state` as a complete, fsynced journal file at `dir/journal.log.tmp`,
/// checks it by replaying it, and returns it open read-write with its length.
pub(super) fn write_snapshot_file(
    dir: &Path,
    generation: u64,
    state: &JournalState,
) -> Result<(File, u64)> {
    let tmp = dir.join(TMP_FILE);
    let file = crate::durable::no_follow()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, "create compaction file", e))?;
    crate::durable::created(&tmp);
    let mut out = BufWriter::new(&file);
    let mut len = 0u64;
    let mut frame = Vec::new();
    let mut put = |bytes: &[u8], out: &mut BufWriter<&File>| -> Result<()> {
        out.write_all(bytes)
            .map_err(|e| Error::io(&tmp, "write compaction file", e))?;
        len += bytes.len() as u64;
        Ok(())
    };
    put(&encode_header(generation), &mut out)?;
    encode_frame(&Frame::MaxId(state.max_segment_id()), &mut frame)?;
    put(&frame, &mut out)?;
    frame.clear();
    encode_frame(&Frame::MaxOffset(state.max_offset()), &mut frame)?;
    put(&frame, &mut out)?;
    for rec in state.segments().values() {
        debug_assert_ne!(
            rec.state,
            SegmentState::Released,
            "compaction drops Released"
        );
        frame.clear();
        encode_frame(&Frame::Snapshot(Box::new(rec.clone())), &mut frame)?;
        put(&frame, &mut out)?;
    }
    out.flush()
        .map_err(|e| Error::io(&tmp, "write compaction file", e))?;
    drop(out);
    crate::durable::written(&tmp);
    crate::durable::at("journal.compact.fsync")
        .sync_all(&file, &tmp)
        .map_err(|e| Error::io(&tmp, "fsync compaction file", e))?;

    // Pair assertion: the file must replay to exactly `state`, to the byte.
    let mut back = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut back, 0)
        .map_err(|e| Error::io(&tmp, "read back compaction file", e))?;
    let replayed = replay_bytes(&back)?;
    if replayed.state != *state
        || replayed.valid_len != len
        || replayed.report.tail.is_some()
        || replayed.report.generation != generation
    {
        return Err(Error::corrupt(
            tmp.display().to_string(),
            "compaction output does not replay to the state it was written from; \
             the old journal is kept",
        ));
    }
    Ok((file, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::journal::record::Record;
    use crate::journal::record::tests::{happy_path, meta, uploading};
    use crate::journal::{JournalOptions, journal_dir, log_path};
    use crate::segment::SegmentId;

    fn open(dir: &Path, compact_after_bytes: u64) -> Journal {
        let opts = JournalOptions {
            compact_after_bytes,
            ..Default::default()
        };
        Journal::open(dir, opts).unwrap().0
    }

    /// 20 segments through the full cycle, then 3 live ones in mid-flight.
    fn fill(j: &mut Journal) {
        for id in 1..=20 {
            for rec in happy_path(id) {
                j.append(&[rec]).unwrap();
            }
        }
        j.append(&[Record::Sealed { meta: meta(21) }]).unwrap();
        j.append(&happy_path(22)[..3]).unwrap();
        j.append(&[
            Record::Sealed { meta: meta(23) },
            uploading(23, 1, Some("mp")),
            Record::Quarantined {
                id: SegmentId(23),
                reason: "remote conflict".into(),
            },
        ])
        .unwrap();
    }

    #[test]
    fn compaction_keeps_live_state_and_max_id_and_shrinks() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        let before_len = j.file_len();
        let live: Vec<_> = j
            .segments()
            .values()
            .filter(|r| r.state != SegmentState::Released)
            .cloned()
            .collect();
        j.compact().unwrap();
        assert!(
            j.file_len() < before_len / 4,
            "{} vs {before_len}",
            j.file_len()
        );
        assert_eq!(j.generation(), 2);
        assert_eq!(j.segments().values().cloned().collect::<Vec<_>>(), live);
        assert_eq!(j.max_segment_id(), Some(SegmentId(23)));
        assert!(!journal_dir(tmp.path()).join(TMP_FILE).exists());

        // Ids stay unusable after their records are gone.
        assert!(j.append(&[Record::Sealed { meta: meta(5) }]).is_err());
        j.append(&[Record::Verified { id: SegmentId(22) }]).unwrap();
        let in_memory = j.view().clone();
        drop(j);
        let (j, report) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert_eq!(j.view(), &in_memory);
        assert_eq!(report.snapshot_segments, 3);
        assert_eq!(report.records_replayed, 1);
        assert_eq!(report.generation, 2);
        assert_eq!(
            std::fs::metadata(log_path(tmp.path())).unwrap().len(),
            j.file_len()
        );
    }

    #[test]
    fn compacting_everything_away_keeps_max_id() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        j.append(&happy_path(7)).unwrap();
        j.compact().unwrap();
        drop(j);
        let (mut j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert!(j.segments().is_empty());
        assert_eq!(j.max_segment_id(), Some(SegmentId(7)));
        assert!(j.append(&[Record::Sealed { meta: meta(7) }]).is_err());
        j.append(&[Record::Sealed { meta: meta(8) }]).unwrap();
    }

    #[test]
    fn leftover_tmp_is_removed_and_old_journal_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        let state = j.view().clone();
        // An interrupted compaction: a complete-looking and a garbage tmp.
        let kept = j.view.state.without_released();
        write_snapshot_file(&j.dir, 2, &kept).unwrap();
        drop(j);
        let tmp_path = journal_dir(tmp.path()).join(TMP_FILE);
        assert!(tmp_path.exists());
        let (j, report) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert!(report.removed_tmp);
        assert!(!tmp_path.exists());
        assert_eq!(j.view(), &state);
        drop(j);
        std::fs::write(&tmp_path, b"TIXJRNL1 garbage").unwrap();
        let (j, report) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert!(report.removed_tmp);
        assert_eq!(j.view(), &state);
    }

    #[test]
    fn maybe_compact_triggers_on_size_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), 2048);
        assert!(!j.maybe_compact().unwrap());
        let mut compactions = 0;
        for id in 1..=40 {
            j.append(&happy_path(id)).unwrap();
            if j.maybe_compact().unwrap() {
                compactions += 1;
                assert!(j.file_len() <= 2048);
            }
            assert!(j.file_len() <= 2048 + 2048, "never far above the threshold");
        }
        assert!(compactions >= 5, "{compactions}");
    }

    #[test]
    fn maybe_compact_does_not_loop_when_live_state_is_large() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), 512);
        for id in 1..=10 {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
        }
        assert!(j.maybe_compact().unwrap());
        let after = j.file_len();
        assert!(after > 512, "live state alone is above the threshold");
        assert!(
            !j.maybe_compact().unwrap(),
            "no rewrite until the file doubles"
        );
        let mut id = 11;
        while j.file_len() < 2 * after {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
            id += 1;
        }
        assert!(j.maybe_compact().unwrap());
    }

    #[test]
    fn failed_compaction_before_rename_does_not_poison() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        let state = j.view().clone();
        // A directory squatting on the tmp name makes step 1 fail.
        std::fs::create_dir(journal_dir(tmp.path()).join(TMP_FILE)).unwrap();
        assert!(matches!(j.compact(), Err(Error::Io { .. })));
        assert!(!j.is_poisoned());
        assert_eq!(j.view(), &state);
        std::fs::remove_dir(journal_dir(tmp.path()).join(TMP_FILE)).unwrap();
        j.append(&[Record::Verified { id: SegmentId(22) }]).unwrap();
        j.compact().unwrap();
    }
}
