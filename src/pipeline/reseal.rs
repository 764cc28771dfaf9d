//! Resealing: a Verified segment whose id the manifest already lists with
//! another segment's content can never be committed under that id. Its
//! entries are copied into the active segment (at or above the current
//! epoch's id floor) and the journal marks it superseded.
//!
//! How an id gets taken: a data directory that opened while the store was
//! unreachable numbered its segments without an epoch (from its own
//! journal, from 1 when it is new), and another data directory committed
//! the same ids meanwhile. The epoch's id floor keeps every id given after
//! the take apart; the segments sealed before it are resealed here.
//!
//! Every entry ends in exactly one committed segment, across crashes:
//! 1. `Resealing { id, into }` is journaled before any entry is copied (the
//!    segment is never committed from then on);
//! 2. the entries go into segment `into` (and the ones after it when it
//!    fills), flushed. The writer is held from before 1 to after 3, so none
//!    of those segments rolls, seals or is journaled meanwhile;
//! 3. `Resealed { id }` is journaled; then the local file is deleted.
//!
//! A crash between 1 and 3 leaves `Resealing`: the next open (before any
//! drive runs) copies the entries that none of the segments from `into` on
//! holds yet, into `into` or above, and journals `Resealed`
//! ([`finish_at_open`]). A failure between 1 and 3 without a crash poisons
//! the writer (nothing more is appended), and no segment from `into` on
//! releases its local copy while a reseal into it is unfinished
//! ([`blocks_release`]), so that the next open sees every copy made. A crash between 3 and the delete leaves a
//! `Resealed` segment's file: the next open deletes it.

use crate::error::{Error, Result};
use crate::index::IndexWriter;
use crate::journal::{Journal, Record, SegmentState};
use crate::pipeline::Shared;
use crate::segment::{SealedMeta, SegmentId};

/// A segment from which a reseal in progress (`Resealing`) copies into `id`
/// or a segment before it: the local copy of `id` must stay until that
/// reseal is finished (at the next open, which tells the entries already
/// copied by what the local segments from `into` on hold).
pub fn blocks_release(sh: &Shared, id: SegmentId) -> Option<(SegmentId, SegmentId)> {
    sh.journal
        .read()
        .segments()
        .values()
        .filter(|r| r.state == SegmentState::Resealing)
        .find_map(|r| {
            r.resealed_into
                .filter(|into| *into <= id)
                .map(|into| (r.meta.id, into))
        })
}

/// The entries of local sealed segment `id`. `strict`: all of them, or an
/// error (a file whose items do not all decode is not copied from at run
/// time; the caller quarantines). Not strict (finishing at open, after the
/// start-up check salvaged a damaged file and reported what it lost): what
/// the file holds.
fn entries_of(
    w: &IndexWriter,
    id: SegmentId,
    meta: &SealedMeta,
    strict: bool,
) -> Result<Vec<crate::Entry>> {
    let seg = w.sealed(id)?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "segment {id} has no local sealed file to reseal from"
        ))
    })?;
    let entries = seg.entries();
    if strict && entries.len() as u64 != meta.item_count {
        return Err(Error::corrupt(
            seg.path().display().to_string(),
            format!(
                "{} of its {} entries decode; not resealed",
                entries.len(),
                meta.item_count
            ),
        ));
    }
    Ok(entries)
}

/// Reseal Verified segment `id` (see the module doc). `floor`: the current
/// epoch's id floor; `reason`: why its id cannot be committed. Returns the
/// segment's new state (`Resealed`).
pub async fn reseal(
    sh: &Shared,
    id: SegmentId,
    meta: &SealedMeta,
    floor: SegmentId,
    reason: String,
) -> Result<SegmentState> {
    let writer = sh.writer.clone();
    let journal = sh.journal.clone();
    let metrics = sh.metrics.clone();
    let meta = meta.clone();
    let why = reason.clone();
    let (into, copied) = tokio::task::spawn_blocking(move || -> Result<(SegmentId, u64)> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let entries = entries_of(&w, id, &meta, true)?;
        let (into, copied) = w.copy_in(&entries, None, floor, |into| {
            journal.append_blocking(vec![Record::Resealing {
                id,
                into,
                reason: why,
            }])
        })?;
        // A closed writer (a shutdown drain) sealed the copies itself:
        // journal them with the end of the reseal, so that this same drain
        // uploads them. (An open writer seals them later, as any segment.)
        let mut recs = Vec::new();
        if w.is_closed() {
            let j = journal.read();
            recs.extend(
                w.poll_sealed()?
                    .into_iter()
                    .filter(|m| j.get(m.id).is_none())
                    .map(|meta| Record::Sealed { meta }),
            );
        }
        // In id order, as the journal takes them.
        recs.sort_by_key(|r| r.id());
        let new_sealed = recs.len() as u64;
        recs.push(Record::Resealed { id });
        if let Err(e) = journal.append_blocking(recs) {
            // The copies' metadata left the writer with the poll: nothing
            // more may be sealed above them in this process (a later id
            // journaled first would keep them from ever being journaled).
            // The next open finds the Resealing record and the files.
            w.poison_with(format!(
                "journaling the end of segment {id}'s reseal failed: {}",
                e.reason()
            ));
            return Err(e);
        }
        metrics.segments_sealed.add(new_sealed);
        w.release(id)?;
        Ok((into, copied))
    })
    .await
    .map_err(|e| Error::Internal(format!("reseal task failed: {e}")))??;
    sh.metrics.segments_resealed.inc();
    tracing::warn!(
        segment = id.0,
        into = into.0,
        entries = copied,
        %reason,
        "segment resealed: its entries were copied into a new segment, which is uploaded and committed in its place; its local file was deleted"
    );
    Ok(SegmentState::Resealed)
}

/// At open, before any drive: finish every reseal a crash cut short, and
/// delete the local files of `Resealed` segments a crash left behind.
/// Returns one note per segment touched.
pub fn finish_at_open(w: &mut IndexWriter, journal: &mut Journal) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let todo: Vec<_> = journal
        .view()
        .segments()
        .values()
        .filter(|r| matches!(r.state, SegmentState::Resealing | SegmentState::Resealed))
        .map(|r| (r.meta.clone(), r.state, r.resealed_into))
        .collect();
    for (meta, state, into) in todo {
        let id = meta.id;
        if state == SegmentState::Resealing {
            let entries = match entries_of(w, id, &meta, false) {
                Ok(e) => e,
                Err(e) => {
                    // Nothing to copy from: the copies made before the crash
                    // stay where they are; an operator must look.
                    let reason = format!("resealing could not finish: {e}");
                    journal.append(&[Record::Quarantined {
                        id,
                        reason: reason.clone(),
                    }])?;
                    w.quarantine_sealed(id, &reason)?;
                    notes.push(format!("segment {id}: {reason}"));
                    continue;
                }
            };
            // Into `into` or above: the active segment kept at open may be
            // one below it (sealing when the crash came), and a copy there
            // would not be seen by the next finish.
            let (_, copied) =
                w.copy_in(&entries, into, into.unwrap_or(SegmentId(0)), |_| Ok(()))?;
            journal.append(&[Record::Resealed { id }])?;
            notes.push(format!(
                "segment {id}: finished resealing cut by a crash ({copied} of {} entries copied now{})",
                entries.len(),
                if (entries.len() as u64) < meta.item_count {
                    format!(
                        "; {} of its {} entries did not read and are reported by the start-up check",
                        meta.item_count - entries.len() as u64,
                        meta.item_count
                    )
                } else {
                    String::new()
                }
            ));
        }
        if w.holds_sealed(id) {
            w.release(id)?;
            notes.push(format!(
                "segment {id}: local file of a resealed segment deleted (its entries are in segment {} and later)",
                into.map_or_else(|| "?".to_string(), |i| i.0.to_string())
            ));
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::datadir::DataDir;
    use crate::index::IndexConfig;
    use crate::journal::JournalOptions;

    fn open(dir: &Path) -> (IndexWriter, Journal) {
        let cfg = IndexConfig {
            slot_count: 64,
            segment_items: 100,
            segment_max_age: None,
            max_chain_steps: 1 << 20,
            ..IndexConfig::default()
        };
        // A dropped writer's sealer thread may still hold the directory.
        let deadline = Instant::now() + Duration::from_secs(30);
        let dd = loop {
            match DataDir::open(dir) {
                Err(Error::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.unwrap(),
            }
        };
        let (j, _) = Journal::open_in(dd.lock(), JournalOptions::default()).unwrap();
        let min = j.max_segment_id().map(|m| SegmentId(m.0 + 1));
        let (w, _) = IndexWriter::open(dd, cfg, min, None).unwrap();
        (w, j)
    }

    /// Journal every finished seal, the way the pipeline does.
    fn journal_seals(w: &mut IndexWriter, j: &mut Journal) {
        let metas = w.poll_sealed().unwrap();
        let recs: Vec<Record> = metas
            .into_iter()
            .map(|meta| Record::Sealed { meta })
            .collect();
        j.append(&recs).unwrap();
    }

    /// Offset -> how many local sealed segments hold it, after sealing all.
    fn offsets_held(mut w: IndexWriter) -> BTreeMap<u64, u32> {
        w.close(Instant::now() + Duration::from_secs(30)).unwrap();
        let mut out = BTreeMap::new();
        for id in w.sealed_ids() {
            for e in w.sealed(id).unwrap().unwrap().entries() {
                *out.entry(e.offset).or_default() += 1;
            }
        }
        out
    }

    /// A writer whose segment 1 (offsets 0..100) is sealed and journaled
    /// Verified; the active segment is empty.
    /// [`verified_segment_1`], then 20 of the broker's own entries
    /// (offsets 500..520) flushed into the active segment; also returns
    /// segment 1's entries.
    fn verified_segment_1_beside_own_entries(
        dir: &Path,
    ) -> (IndexWriter, Journal, Vec<crate::Entry>) {
        let (mut w, j) = verified_segment_1(dir);
        for o in 500..520u64 {
            w.append(&(o % 7).to_le_bytes(), o, 10, 1_000 + o).unwrap();
        }
        w.flush().unwrap();
        let entries = w.sealed(SegmentId(1)).unwrap().unwrap().entries();
        (w, j, entries)
    }

    fn verified_segment_1(dir: &Path) -> (IndexWriter, Journal) {
        let (mut w, mut j) = open(dir);
        for o in 0..100u64 {
            w.append(&(o % 7).to_le_bytes(), o, 10, 1_000 + o).unwrap();
        }
        w.roll().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !w.holds_sealed(SegmentId(1)) {
            assert!(Instant::now() < deadline, "segment 1 never sealed");
            std::thread::sleep(Duration::from_millis(5));
            journal_seals(&mut w, &mut j);
        }
        let id = SegmentId(1);
        j.append(&[
            Record::Uploading {
                id,
                attempt: 1,
                key: "k".into(),
                multipart_id: None,
            },
            Record::Uploaded {
                id,
                etag: None,
                version: None,
            },
            Record::Verified { id },
        ])
        .unwrap();
        (w, j)
    }

    /// A reseal cut by a crash after `cut` of segment 1's 100 entries were
    /// copied (and, with `journaled`, after `Resealed` but before the local
    /// file was deleted) is finished at the next open: every entry held
    /// exactly once, segment 1 Resealed, its file gone.
    /// `closed`: the writer was closed first (a shutdown drain), so the
    /// copy goes into a fresh segment sealed at once (segment 2 holds the
    /// broker's own entries, sealed by the close).
    fn cut_reseal(cut: usize, journaled: bool, closed: bool) {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut w, mut j, entries) = verified_segment_1_beside_own_entries(d.path());
            if closed {
                w.close(Instant::now() + Duration::from_secs(30)).unwrap();
            }
            let id = SegmentId(1);
            let (into, copied) = w
                .copy_in(&entries[..cut], None, SegmentId(0), |into| {
                    j.append(&[Record::Resealing {
                        id,
                        into,
                        reason: "test".into(),
                    }])
                })
                .unwrap();
            let want = if closed { SegmentId(3) } else { SegmentId(2) };
            assert_eq!((into, copied), (want, cut as u64));
            if journaled {
                j.append(&[Record::Resealed { id }]).unwrap();
            }
            // Crash: nothing more runs.
        }
        let (mut w, mut j) = open(d.path());
        let notes = finish_at_open(&mut w, &mut j).unwrap();
        assert!(!notes.is_empty());
        let r = j.get(SegmentId(1)).unwrap();
        assert_eq!(r.state, SegmentState::Resealed, "{notes:?}");
        assert_eq!(
            r.resealed_into,
            Some(if closed { SegmentId(3) } else { SegmentId(2) })
        );
        assert!(!w.holds_sealed(SegmentId(1)));
        assert!(
            !d.path()
                .join(crate::datadir::SEGMENTS_DIR)
                .join(crate::segment::sealed::sealed_file_name(SegmentId(1)))
                .exists()
        );
        // A second open finds nothing left to do.
        drop(j);
        let held = offsets_held(w);
        let expected: Vec<u64> = (0..100).chain(500..520).collect();
        assert_eq!(
            held.keys().copied().collect::<Vec<_>>(),
            expected,
            "cut {cut}"
        );
        assert!(held.values().all(|n| *n == 1), "cut {cut}: {held:?}");
        let (mut w, mut j) = open(d.path());
        assert!(finish_at_open(&mut w, &mut j).unwrap().is_empty());
    }

    /// The active segment was below the floor, so the reseal rolled it (its
    /// seal still running) and started segment `into` above; the crash came
    /// before any copy. The next start may keep the rolled segment as its
    /// active one (it holds entries, `into` is empty): the copy must still
    /// go to `into` or above, where the next finish looks.
    #[test]
    fn a_reseal_cut_while_the_segment_below_into_was_sealing_copies_above_into() {
        let d = tempfile::tempdir().unwrap();
        let floor = SegmentId(10);
        {
            let (mut w, mut j, entries) = verified_segment_1_beside_own_entries(d.path());
            let id = SegmentId(1);
            let crashed = w.copy_in(&entries, None, floor, |into| {
                assert!(into >= floor);
                j.append(&[Record::Resealing {
                    id,
                    into,
                    reason: "test".into(),
                }])?;
                Err(Error::Internal("crash before the copy".into()))
            });
            assert!(crashed.is_err());
        }
        let (mut w, mut j) = open(d.path());
        finish_at_open(&mut w, &mut j).unwrap();
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Resealed);
        assert!(w.active_id().is_some_and(|a| a >= floor));
        drop(j);
        let held = offsets_held(w);
        let expected: Vec<u64> = (0..100).chain(500..520).collect();
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), expected);
        assert!(held.values().all(|n| *n == 1), "{held:?}");
    }

    #[test]
    fn a_reseal_cut_before_any_copy_is_finished_at_open() {
        cut_reseal(0, false, false);
        cut_reseal(0, false, true);
    }

    #[test]
    fn a_reseal_cut_halfway_is_finished_without_doubles() {
        cut_reseal(37, false, false);
        cut_reseal(37, false, true);
    }

    #[test]
    fn a_reseal_cut_after_the_copy_copies_nothing_again() {
        cut_reseal(100, false, false);
        cut_reseal(100, false, true);
    }

    #[test]
    fn a_resealed_segment_left_on_disk_is_deleted_at_open() {
        cut_reseal(100, true, false);
        cut_reseal(100, true, true);
    }

    /// A closed writer (a shutdown drain) reseals into fresh segments from
    /// the id floor on, each sealed when it fills and at the end, with
    /// their metadata ready to journal; no active file is left, and the
    /// writer stays closed to appends.
    #[test]
    fn a_closed_writer_reseals_into_fresh_sealed_segments() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _j, mut entries) = verified_segment_1_beside_own_entries(d.path());
        let closed = w.close(Instant::now() + Duration::from_secs(30)).unwrap();
        assert_eq!(closed.len(), 1, "the broker's own entries sealed");
        // 150 entries: one full segment of 100 and one of 50.
        entries.extend((0..50u64).map(|o| crate::Entry {
            key_hash: o % 7,
            offset: 10_000 + o,
            size: 10,
            timestamp_ms: 2_000 + o,
        }));
        let floor = SegmentId(10);
        let mut started = None;
        let (into, copied) = w
            .copy_in(&entries, None, floor, |into| {
                started = Some(into);
                Ok(())
            })
            .unwrap();
        assert_eq!((into, copied, started), (floor, 150, Some(floor)));
        let metas = w.poll_sealed().unwrap();
        let got: Vec<(SegmentId, u64)> = metas.iter().map(|m| (m.id, m.item_count)).collect();
        assert_eq!(got, vec![(SegmentId(10), 100), (SegmentId(11), 50)]);
        for m in &metas {
            let seg = w.sealed(m.id).unwrap().expect("a local sealed segment");
            assert_eq!(seg.meta(), *m);
        }
        let mut offsets: Vec<u64> = [SegmentId(10), SegmentId(11)]
            .iter()
            .flat_map(|id| w.sealed(*id).unwrap().unwrap().entries())
            .map(|e| e.offset)
            .collect();
        offsets.sort_unstable();
        let want: Vec<u64> = (0..100).chain(10_000..10_050).collect();
        assert_eq!(offsets, want);
        let actives: Vec<_> = std::fs::read_dir(d.path().join(crate::datadir::SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".seg"))
            .collect();
        assert!(actives.is_empty(), "files left beside the sealed ones: {actives:?}");
        assert!(w.poisoned().is_none());
        assert!(matches!(w.append(b"k", 1, 1, 1), Err(Error::ShutDown)));
        // A failure before the copy leaves no file and nothing poisoned.
        let r = w.copy_in(&entries, None, floor, |_| Err(Error::Internal("no".into())));
        assert!(r.is_err());
        assert!(w.poisoned().is_none());
        assert!(w.poll_sealed().unwrap().is_empty());
        // Ids taken by another owner, learnt by the drain after the close:
        // the next copy goes above them.
        w.raise_next_id(SegmentId(20)).unwrap();
        let (into, _) = w.copy_in(&entries[..1], None, floor, |_| Ok(())).unwrap();
        assert_eq!(into, SegmentId(20));
    }
}
