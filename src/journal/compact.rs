//! Compaction: rewrite the live state as a fresh journal file so that replay
//! cost follows the number of live segments, not the history.
//!
//! Order, and what a crash after each step leaves (also in
//! `docs/format/journal.md`):
//! 1. write `journal.log.tmp`: header (generation + 1), one `MaxId` and one
//!    `MaxOffset` frame, one `Snapshot` frame per segment that is not
//!    Released, and one for the newest Released segment (the journal's
//!    evidence of what was committed, helper-88);
//!    crash: tmp partial or whole, `journal.log` untouched; open removes tmp.
//! 2. fsync the tmp, then read it back frame by frame ([`check_written`]):
//!    it must replay to exactly the state we meant to write (pair
//!    assertion, so a bug here can never replace a good journal with a bad
//!    one);
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
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use super::record::{Frame, JournalState};
use super::replay::{FORMAT_VERSION, FrameReader, encode_frame, encode_header};
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

/// Writes `state` less its Released segments (but the newest) as a complete, fsynced journal
/// file at `dir/journal.log.tmp`, checks it by reading it back, and returns
/// it open read-write with its length and the number of segments written.
///
/// Memory stays near one frame whatever the segment count: the frames are
/// encoded one at a time, and the check reads the file back one frame at a
/// time instead of replaying it into a second state table.
pub(super) fn write_snapshot_file(
    dir: &Path,
    generation: u64,
    state: &JournalState,
) -> Result<(File, u64, usize)> {
    let tmp = dir.join(TMP_FILE);
    let file = crate::durable::no_follow()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, "create compaction file", e))?;
    crate::durable::created(&tmp);
    let mut out = BufWriter::with_capacity(1 << 20, &file);
    let mut len = 0u64;
    let mut frame = Vec::new();
    let mut put = |bytes: &[u8], out: &mut BufWriter<&File>| -> Result<()> {
        out.write_all(bytes)
            .map_err(|e| Error::io(&tmp, "write compaction file", e))?;
        len += bytes.len() as u64;
        Ok(())
    };
    put(&encode_header(generation), &mut out)?;
    let mut written = 0usize;
    for f in snapshot_frames(state) {
        frame.clear();
        encode_frame(&f, &mut frame)?;
        put(&frame, &mut out)?;
        written += usize::from(matches!(f, Frame::Snapshot(_)));
    }
    out.flush()
        .map_err(|e| Error::io(&tmp, "write compaction file", e))?;
    drop(out);
    crate::durable::written(&tmp);
    crate::durable::at("journal.compact.fsync")
        .sync_all(&file, &tmp)
        .map_err(|e| Error::io(&tmp, "fsync compaction file", e))?;
    check_written(&file, &tmp, generation, state, len)?;
    Ok((file, len, written))
}

/// The length of the file [`write_snapshot_file`] would write for `state`,
/// to the byte, computed without writing it or copying a record: each
/// snapshot frame is its 8-byte header and the payload `{"v":N,` followed by
/// the frame's JSON without its opening brace, and `N` (the record version)
/// is one digit.
pub(super) fn snapshot_len(state: &JournalState) -> Result<u64> {
    #[derive(serde::Serialize)]
    enum SnapshotRef<'a> {
        Snapshot(&'a super::record::SegmentRecord),
    }
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut frame = Vec::new();
    let mut len = encode_header(0).len() as u64;
    for f in [
        Frame::MaxId(state.max_segment_id()),
        Frame::MaxOffset(state.max_offset()),
    ] {
        frame.clear();
        encode_frame(&f, &mut frame)?;
        len += frame.len() as u64;
    }
    let mut count = Count(0);
    let mut frames = 0u64;
    let newest = state.newest_released();
    for r in state.segments().values() {
        if !JournalState::kept_by_compaction(r, newest) {
            continue;
        }
        serde_json::to_writer(&mut count, &SnapshotRef::Snapshot(r))
            .map_err(|e| Error::InvalidInput(format!("journal snapshot does not serialize: {e}")))?;
        frames += 1;
    }
    // Per frame: header (8) and `{"v":N,` (7) in place of the JSON's `{` (1).
    Ok(len + count.0 + frames * (8 + 7 - 1))
}

/// The frames a compaction of `state` writes after the header, in order:
/// `MaxId`, `MaxOffset`, then one `Snapshot` per segment that is not
/// Released and for the newest Released one, by id.
fn snapshot_frames(state: &JournalState) -> impl Iterator<Item = Frame> + '_ {
    [
        Frame::MaxId(state.max_segment_id()),
        Frame::MaxOffset(state.max_offset()),
    ]
    .into_iter()
    .chain({
        let newest = state.newest_released();
        state
            .segments()
            .values()
            .filter(move |r| JournalState::kept_by_compaction(r, newest))
            .map(|r| Frame::Snapshot(Box::new(r.clone())))
    })
}

/// Pair assertion: the file just written must replay to exactly the state
/// it was written from (less Released segments but the newest), to the byte, or it never
/// replaces the journal. Read back one frame at a time through the decoder
/// replay uses: the header of `generation` in the current format, exactly
/// the frames of [`snapshot_frames`] and nothing after them. Replay loads
/// such frames into exactly that state when the snapshot frames also pass
/// what `JournalState::load_snapshot` checks (ids rising, none above the
/// max id, no item above the max offset), which is checked here too.
fn check_written(
    file: &File,
    tmp: &Path,
    generation: u64,
    state: &JournalState,
    len: u64,
) -> Result<()> {
    let bad = |why: String| {
        Error::corrupt(
            tmp.display().to_string(),
            format!(
                "compaction output does not replay to the state it was written from \
                 ({why}); the old journal is kept"
            ),
        )
    };
    let mut r = file;
    r.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(tmp, "read back compaction file", e))?;
    let (header, mut frames) = FrameReader::new(BufReader::with_capacity(1 << 20, r), tmp)?;
    if header.generation != generation || header.version != FORMAT_VERSION {
        return Err(bad(format!(
            "header of generation {} version {}",
            header.generation, header.version
        )));
    }
    let mut last_id = None;
    for (i, want) in snapshot_frames(state).enumerate() {
        let (at, got) = match frames.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Err(bad(format!("the file ends before frame {i}"))),
            Err(e) => return Err(bad(e)),
        };
        if got != want {
            return Err(bad(format!("frame {i} at {at} is not the one written")));
        }
        if let Frame::Snapshot(rec) = &got {
            let id = rec.meta.id;
            if last_id.is_some_and(|last| id <= last)
                || state.max_segment_id().is_none_or(|max| id > max)
                || (rec.meta.item_count > 0
                    && state.max_offset().is_none_or(|max| rec.meta.max_offset > max))
            {
                return Err(bad(format!("snapshot of segment {id} does not load")));
            }
            last_id = Some(id);
        }
    }
    match frames.next_frame() {
        Ok(None) if frames.pos() == len => {}
        Ok(None) => return Err(bad(format!("{len} bytes written, {} read", frames.pos()))),
        Ok(Some((at, _))) => return Err(bad(format!("a frame after the last one, at {at}"))),
        Err(e) => return Err(bad(e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::journal::record::{Record, SegmentState};
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
        // The newest Released segment (20) is kept, the others dropped.
        let live: Vec<_> = j
            .segments()
            .values()
            .filter(|r| r.state != SegmentState::Released || r.meta.id == SegmentId(20))
            .cloned()
            .collect();
        assert_eq!(live.len(), 4);
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
        assert_eq!(report.snapshot_segments, 4);
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
        j.append(&happy_path(6)).unwrap();
        j.append(&happy_path(7)).unwrap();
        j.compact().unwrap();
        drop(j);
        let (mut j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        // Only the newest Released segment is kept (helper-88).
        assert_eq!(j.segments().keys().copied().collect::<Vec<_>>(), [SegmentId(7)]);
        assert_eq!(j.segments()[&SegmentId(7)].state, SegmentState::Released);
        assert_eq!(j.max_segment_id(), Some(SegmentId(7)));
        assert!(j.append(&[Record::Sealed { meta: meta(7) }]).is_err());
        j.append(&[Record::Sealed { meta: meta(8) }]).unwrap();
    }

    /// helper-88: compaction keeps the newest Released segment's record,
    /// the journal's evidence of what was committed once the older ones
    /// are dropped, as a snapshot of record version 4 (an older build
    /// refuses it as newer instead of reading it as damage); a later
    /// release moves it on, so the journal keeps one such record.
    #[test]
    fn compaction_keeps_the_newest_released_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        for id in 1..=3 {
            j.append(&happy_path(id)).unwrap();
        }
        let newest = j.get(SegmentId(3)).unwrap().clone();
        j.compact().unwrap();
        assert_eq!(j.segments().values().collect::<Vec<_>>(), [&newest]);
        assert_eq!(
            j.view.state.state_counts().get(&SegmentState::Released),
            Some(&1)
        );
        let bytes = std::fs::read(log_path(tmp.path())).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(r#"{"v":4,"Snapshot":"#), "{text}");
        assert!(text.contains(r#""state":"Released""#), "{text}");
        let in_memory = j.view().clone();
        drop(j);
        let (mut j, report) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert_eq!(j.view(), &in_memory);
        assert_eq!(report.snapshot_segments, 1);
        j.append(&happy_path(4)).unwrap();
        j.compact().unwrap();
        assert_eq!(j.segments().keys().copied().collect::<Vec<_>>(), [SegmentId(4)]);
        assert_eq!(j.view.state.live_segments(), 1);
        drop(j);
        let (j, _) = Journal::open(tmp.path(), JournalOptions::default()).unwrap();
        assert_eq!(j.segments().keys().copied().collect::<Vec<_>>(), [SegmentId(4)]);
    }

    #[test]
    fn leftover_tmp_is_removed_and_old_journal_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        let state = j.view().clone();
        // An interrupted compaction: a complete-looking and a garbage tmp.
        write_snapshot_file(&j.dir, 2, &j.view.state).unwrap();
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
    fn maybe_compact_does_not_rewrite_a_journal_it_cannot_shrink() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), 512);
        for id in 1..=10 {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
        }
        let backlog = j.file_len();
        assert!(backlog > 512);
        // A backlog (every segment still pending): the snapshot frames would
        // be as large as the records or larger, so the file is not rewritten
        // (a 1,000,000-segment backlog's drain spent its deadline on it).
        assert!(!j.maybe_compact().unwrap());
        assert_eq!(j.generation(), 1);
        for id in 1..=8 {
            j.append(&happy_path(id)[1..]).unwrap();
        }
        assert!(j.maybe_compact().unwrap(), "8 of 10 released");
        let after = j.file_len();
        assert!(after < backlog, "{after} vs {backlog}");
        // The two pending, and the newest released (8).
        assert_eq!(j.segments().len(), 3);
        assert!(
            !j.maybe_compact().unwrap(),
            "no rewrite until the file doubles"
        );
        let mut id = 11;
        while j.file_len() < 2 * after {
            j.append(&happy_path(id)).unwrap();
            id += 1;
        }
        assert!(j.maybe_compact().unwrap());
        assert_eq!(j.generation(), 3);
    }

    /// Records as a real upload writes them: an S3 key and an ETag.
    fn upload_records(id: u64) -> [Vec<Record>; 2] {
        let sid = SegmentId(id);
        [
            vec![Record::Uploading {
                id: sid,
                attempt: 1,
                key: format!(
                    "tierindex/streams/orders-0/segments/{id:020}-{:016x}.seg",
                    id * 7919
                ),
                multipart_id: None,
            }],
            vec![
                Record::Uploaded {
                    id: sid,
                    etag: Some(format!("\"{id:032x}\"")),
                    version: None,
                },
                Record::Verified { id: sid },
                Record::Committed { id: sid },
            ],
        ]
    }

    #[test]
    fn snapshot_len_is_the_length_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        for id in 30..=40 {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
            for recs in upload_records(id) {
                j.append(&recs).unwrap();
            }
        }
        let (_, len, _) = write_snapshot_file(&j.dir, 2, &j.view.state).unwrap();
        assert_eq!(snapshot_len(&j.view.state).unwrap(), len);
        let empty = JournalState::default();
        let (_, len, _) = write_snapshot_file(&j.dir, 2, &empty).unwrap();
        assert_eq!(snapshot_len(&empty).unwrap(), len);
    }

    /// A backlog a quarter uploaded (local copies kept, the default): twice
    /// as many records as live segments, but their snapshots would be
    /// longer than the records. Not rewritten, and not considered again
    /// until the file grew by a quarter; once segments are released, it is.
    #[test]
    fn a_backlog_part_uploaded_is_not_rewritten_into_a_longer_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), 1024);
        for id in 1..=400 {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
        }
        for id in 1..=100 {
            for recs in upload_records(id) {
                j.append(&recs).unwrap();
            }
        }
        let len = j.file_len();
        let after = snapshot_len(&j.view.state).unwrap();
        assert!(after * 8 > len * 7, "{after} vs {len}");
        assert!(!j.maybe_compact().unwrap());
        assert_eq!(j.generation(), 1);
        assert_eq!(j.declined_below, len + len / 4);
        for id in 1..=100 {
            j.append(&[Record::Released { id: SegmentId(id) }]).unwrap();
        }
        assert!(j.file_len() < j.declined_below);
        assert!(!j.maybe_compact().unwrap(), "not considered again yet");
        let mut id = 101;
        while !j.maybe_compact().unwrap() {
            for recs in upload_records(id) {
                j.append(&recs).unwrap();
            }
            j.append(&[Record::Released { id: SegmentId(id) }]).unwrap();
            id += 1;
            assert!(id <= 400, "never compacted");
        }
        assert_eq!(j.generation(), 2);
        assert!(j.file_len() < len);
    }

    /// Committed segments whose local copies are kept (the default): five
    /// records each against one snapshot, about four fifths of their
    /// length with S3-like keys and ETags: rewritten.
    #[test]
    fn a_journal_of_kept_committed_segments_is_compacted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), 1024);
        for id in 1..=200 {
            j.append(&[Record::Sealed { meta: meta(id) }]).unwrap();
            for recs in upload_records(id) {
                j.append(&recs).unwrap();
            }
        }
        let len = j.file_len();
        let after = snapshot_len(&j.view.state).unwrap();
        assert!(after * 8 <= len * 7, "{after} vs {len}");
        assert!(j.maybe_compact().unwrap());
        assert_eq!(j.file_len(), after);
        assert_eq!(j.segments().len(), 200);
    }

    /// The check of a compaction's output refuses a file that differs from
    /// the state in any frame, is cut, has a frame more, or is of another
    /// generation; so a bad file never replaces the journal.
    #[test]
    fn a_compaction_file_that_does_not_match_its_state_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = open(tmp.path(), u64::MAX);
        fill(&mut j);
        let state = j.view.state.clone();
        let (file, len, kept) = write_snapshot_file(&j.dir, 2, &state).unwrap();
        assert_eq!(kept, state.live_segments() as usize);
        let path = j.dir.join(TMP_FILE);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(good.len() as u64, len);
        check_written(&file, &path, 2, &state, len).unwrap();
        assert!(check_written(&file, &path, 3, &state, len).is_err());
        let mut other = state.clone();
        other.apply(&[Record::Verified { id: SegmentId(22) }]).unwrap();
        assert!(check_written(&file, &path, 2, &other, len).is_err());
        drop(file);
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let f = File::open(&path).unwrap();
            check_written(&f, &path, 2, &state, bytes.len() as u64).is_err()
        };
        // Every byte after the header, flipped; the file cut anywhere; a
        // frame more.
        for at in [24, 30, good.len() / 2, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x40;
            assert!(refused(&b), "flip at {at}");
        }
        for cut in [24, good.len() / 3, good.len() - 1] {
            assert!(refused(&good[..cut]), "cut at {cut}");
        }
        let mut more = good.clone();
        let mut frame = Vec::new();
        encode_frame(&Frame::MaxOffset(None), &mut frame).unwrap();
        more.extend_from_slice(&frame);
        assert!(refused(&more));
        assert!(!refused(&good));
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
