//! Commands that only read (or, with `--repair`, fix) the local data
//! directory: `status`, `inspect`, `fsck`, `lookup`.

use std::path::Path;

use serde::Serialize;

use crate::cli::table::{SEGMENT_HEADER, segment_line, totals_line};
use crate::cli::{Cli, emit};
use crate::datadir::{self, DataDir, Mode};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, JournalOptions, SegmentRecord};
use crate::lifecycle::{EXIT_DRAINED, EXIT_NEEDS_OPERATOR, EXIT_PENDING};
use crate::segment::format::{self, ACTIVE_MAGIC, SEALED_MAGIC};
use crate::segment::salvage;
use crate::segment::sealed::SealedSegment;
use crate::segment::{Entry, SegmentId, TimeRange, active};
use crate::tier::{Status, status_from};

#[derive(Serialize)]
struct StatusOut<'a> {
    totals: Status,
    segments: Vec<&'a SegmentRecord>,
}

/// What the journal does not say, added to its totals: entries not in
/// the journal yet (unsealed ones in `.active` files, sealed files it does
/// not know) are pending, and the loss records in `quarantine/` are losses.
/// `status` and `status --remote` both count them.
/// Active files whose header does not decode are read with the configured
/// geometry, as `fsck` and the start rebuild it (helper-96 H96-5: `status`
/// called every entry of such a file LOST).
pub(crate) fn add_local(
    totals: &mut crate::tier::Status,
    cfg: &crate::config::Config,
    view: &crate::journal::JournalView,
) {
    let geometry = crate::segment::salvage::Geometry {
        slot_count: cfg.slot_count,
        item_capacity: cfg.segment_items,
    };
    let data_dir = cfg.data_dir.as_path();
    let local = datadir::local_pending(data_dir, &|id| view.get(id).is_some(), Some(geometry));
    totals.unsealed_items = local.unsealed_items;
    totals.unreadable_local = local.unreadable.clone();
    totals.pending_segments += local.active_segments.len() as u64;
    // The newest active file is the one a broker writes, or wrote when it
    // stopped; older ones (a crash before their seal) are in
    // `unsealed_items` and sealed at the next start. Offline, nothing else
    // fills these (helper-60: `status --json` showed no active segment
    // after a kill while `.active` files held entries).
    if totals.active_segment.is_none()
        && let Some(&(id, n)) = local.active_segments.last()
    {
        totals.active_segment = Some(id);
        totals.active_items = u32::try_from(n).unwrap_or(u32::MAX);
    }
    let max = view.max_segment_id();
    for (id, bytes) in &local.unjournaled_sealed {
        if max.is_some_and(|m| crate::segment::SegmentId(*id) <= m) {
            // Below the journal's highest id: it can never record it.
            totals.not_journaled.push(*id);
        } else {
            totals.pending_segments += 1;
            totals.pending_bytes += bytes;
        }
        totals.unjournaled_sealed.push(*id);
    }
    // Saturating: the counts come from files (a record, the mark) that
    // may be hostile (helper-96 H96-3: an overflow panic).
    for n in recorded_losses(data_dir) {
        totals.lost_items = totals.lost_items.saturating_add(n.lost_items);
        totals.losses.push(n.line);
    }
    // The newest segment a flush acknowledged entries of, gone or short
    // (not recorded yet: the next start records it). The journal read
    // again: it may have recorded (and released) the segment since `view`.
    for (id, gone, note) in local.acked_lost {
        // A journal that cannot be read cannot say (a lost one is
        // reported as such): not judged then.
        let journaled = gone
            && crate::journal::Journal::max_segment_id_on_disk(data_dir)
                .map_or(true, |max| max.is_some_and(|m| id <= m));
        // Or its file is there after all: a listing that raced a running
        // broker's seal (the sealed file renamed in, the active one
        // removed, both where the listing had been or was not yet) saw
        // neither; the older mark names exactly a segment being sealed.
        let seg_dir = data_dir.join(datadir::SEGMENTS_DIR);
        let there = gone
            && [
                crate::segment::active::active_file_name(id),
                crate::segment::sealed::sealed_file_name(id),
            ]
            .iter()
            .any(|n| seg_dir.join(n).exists());
        if !journaled && !there {
            totals.lost_items = totals.lost_items.saturating_add(note.lost_items);
            totals.losses.push(note.line());
        }
    }
}

/// A loss recorded in `quarantine/`.
pub(crate) struct RecordedLoss {
    /// Items counted lost (0 for a record that cannot be read).
    pub lost_items: u64,
    /// What to print.
    pub line: String,
}

/// The losses recorded in `quarantine/*.why.json`: every entry lost to
/// local damage that an operator has not dealt with yet (moved the record
/// away). `status`, `fsck`, `lookup`, `drain` and `demo` report them and
/// exit 4 while they are there, whichever run found them. A record that
/// cannot be read (emptied, garbled) may have recorded one, and counts as
/// one (helper-74: an emptied record made every command but `quarantine
/// list` report clean).
pub(crate) fn recorded_losses(data_dir: &Path) -> Vec<RecordedLoss> {
    datadir::quarantine_records_read(data_dir)
        .into_iter()
        .filter_map(|(p, r)| match r {
            Ok(r) => r.loss.filter(|n| n.is_loss()).map(|n| RecordedLoss {
                lost_items: n.lost_items,
                line: n.line(),
            }),
            Err(e) => Some(RecordedLoss {
                lost_items: 0,
                line: format!(
                    "quarantine record {} cannot be read ({e}): it may record entries lost to \
                     local damage; `tierindex quarantine list` shows the file it describes",
                    p.display()
                ),
            }),
        })
        .collect()
}

/// The lines for what [`add_local`] added (each starting with a newline).
pub(crate) fn local_lines(t: &crate::tier::Status) -> String {
    let mut s = String::new();
    if t.unsealed_items > 0 || !t.unjournaled_sealed.is_empty() {
        s.push_str(&format!(
            "\nnot journaled yet: {} entries in active segments; sealed files unknown to the journal: {:?}",
            t.unsealed_items, t.unjournaled_sealed
        ));
    }
    for l in &t.losses {
        s.push_str(&format!("\nLOST {l}"));
    }
    for u in &t.unreadable_local {
        s.push_str(&format!(
            "\nCANNOT READ {u}: the counts above leave out whatever it holds (acknowledged \
             entries among them); `tierindex fsck` says more once it can be read"
        ));
    }
    if !t.not_journaled.is_empty() {
        s.push('\n');
        s.push_str(&not_journaled_line(&t.not_journaled));
    }
    s
}

/// What `status` and `fsck` say of sealed files the journal cannot record.
fn not_journaled_line(ids: &[u64]) -> String {
    format!(
        "NOT JOURNALED: {} local sealed file(s) have no journal record and are below the \
         journal's highest id, so nothing uploads their entries (a second process sealed them \
         beside this one, a build before session 31 sealed later segments after one failed to \
         seal, or the journal lost their records): {ids:?}. Keep the files; \
         `tierindex inspect` shows their entries, `tierindex drain` checks whether the \
         store holds them, and once they belong to this stream `tierindex drain \
         --adopt-unjournaled` appends them again and uploads them",
        ids.len()
    )
}

pub fn status(cli: &Cli) -> Result<i32> {
    let cfg = cli.config()?;
    let (view, _rep) = Journal::open_read_only(&cfg.data_dir)?;
    let mut totals = status_from(view.state(), cfg.release_after_commit);
    add_local(&mut totals, &cfg, &view);
    let pending = totals.pending_segments;
    let quarantined = u64::from(totals.needs_operator());
    let out = StatusOut {
        totals,
        segments: view.segments().values().collect(),
    };
    emit(cli.json, &out, |o| {
        let mut s = format!("{SEGMENT_HEADER}\n");
        for r in &o.segments {
            s.push_str(&segment_line(r));
            s.push('\n');
        }
        s.push_str(&totals_line(&o.totals));
        s.push_str(&local_lines(&o.totals));
        s
    });
    Ok(if quarantined > 0 {
        EXIT_NEEDS_OPERATOR
    } else if pending > 0 {
        EXIT_PENDING
    } else {
        EXIT_DRAINED
    })
}

#[derive(Serialize)]
#[serde(tag = "kind")]
enum Inspected {
    Active {
        segment: u64,
        valid_items: u32,
        torn_bytes_after_valid: u64,
        file_shorter_than_header_says: Option<u64>,
        /// Items its last flush made durable, as its flush marks say.
        flush_mark: Option<u32>,
        /// Of those, how many do not verify: acknowledged items damaged or
        /// zeroed since (start-up salvages the file and reports them lost).
        acknowledged_items_not_verified: u32,
        first_entries: Vec<Entry>,
    },
    Sealed {
        meta: crate::segment::SealedMeta,
        slot_count: u32,
        first_entries: Vec<Entry>,
    },
    Journal {
        generation: u64,
        frames: usize,
        valid_len: u64,
        torn_tail: Option<String>,
        frames_json: Vec<serde_json::Value>,
    },
}

/// Largest journal file `inspect` reads (into memory, decoded whole). A
/// live journal is compacted far below this; a longer file is refused by
/// size, never read.
const INSPECT_MAX_JOURNAL_BYTES: u64 = 256 << 20;

pub fn inspect(cli: &Cli, file: &Path) -> Result<i32> {
    use std::io::Read;
    // Only regular files (`inspect /dev/zero` would read forever), opened
    // without blocking (a FIFO would block the open itself).
    let f = crate::durable::open_regular(file, false).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::InvalidInput(format!(
                "{}: not a regular file; inspect takes a segment or journal file",
                file.display()
            ))
        } else {
            Error::io(file, "open file to inspect", e)
        }
    })?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(file, "stat file to inspect", e))?
        .len();
    // The magic first; nothing else is read before the kind is known and
    // the file's length is within what that kind can be.
    let mut magic = Vec::with_capacity(8);
    f.take(8)
        .read_to_end(&mut magic)
        .map_err(|e| Error::io(file, "read file to inspect", e))?;
    let out = if magic == ACTIVE_MAGIC {
        // Mapped, not read: bounded by the page cache, not the heap.
        let (id, rec) = active::check_active(file)?;
        let (_, entries) = active::read_entries(file)?;
        Inspected::Active {
            segment: id.0,
            valid_items: rec.valid_items,
            torn_bytes_after_valid: rec.torn_bytes_zeroed,
            file_shorter_than_header_says: rec.extended_from,
            flush_mark: rec.flush_mark,
            acknowledged_items_not_verified: rec.unverified_below_mark,
            first_entries: entries.into_iter().take(20).collect(),
        }
    } else if magic == SEALED_MAGIC {
        let max = format::max_sealed_len();
        if len > max {
            return Err(tail_hint(
                file,
                len,
                Error::corrupt(
                    file.display().to_string(),
                    format!("{len} bytes, longer than any sealed segment ({max}); not read"),
                ),
            ));
        }
        // Mapped and fully checked (every item and the whole-file sums).
        let seg = SealedSegment::open(file).map_err(|e| tail_hint(file, len, e))?;
        Inspected::Sealed {
            meta: seg.meta(),
            slot_count: seg.footer().slot_count,
            first_entries: seg.entries().into_iter().take(20).collect(),
        }
    } else if magic == journal::MAGIC {
        if len > INSPECT_MAX_JOURNAL_BYTES {
            return Err(Error::InvalidInput(format!(
                "{}: {len} bytes; inspect decodes at most {INSPECT_MAX_JOURNAL_BYTES} bytes of a \
                 journal. `tierindex status` reads the journal's state without printing every \
                 record",
                file.display()
            )));
        }
        let mut bytes = Vec::new();
        crate::durable::open_regular(file, false)
            .and_then(|f| f.take(INSPECT_MAX_JOURNAL_BYTES).read_to_end(&mut bytes))
            .map_err(|e| Error::io(file, "read file to inspect", e))?;
        let d = journal::decode_file(&bytes)?;
        Inspected::Journal {
            generation: d.header.generation,
            frames: d.frames.len(),
            valid_len: d.valid_len,
            torn_tail: d.tail.as_ref().map(|t| format!("{t:?}")),
            frames_json: d
                .frames
                .iter()
                .filter_map(|f| serde_json::to_value(&f.frame).ok())
                .collect(),
        }
    } else {
        return Err(Error::corrupt(
            file.display().to_string(),
            "not a tierindex segment or journal (unknown magic)",
        ));
    };
    emit(cli.json, &out, |o| {
        serde_json::to_string_pretty(o).unwrap_or_default()
    });
    Ok(EXIT_DRAINED)
}

/// A sealed file that fails its check but whose header gives a shorter
/// length than the file has: say so, and what repairs it.
fn tail_hint(file: &Path, len: u64, e: Error) -> Error {
    let Error::Corrupt { what, detail } = e else {
        return e;
    };
    let mut head = Vec::new();
    let _ = crate::durable::open_regular(file, false).and_then(|f| {
        use std::io::Read as _;
        f.take(format::HEADER_LEN as u64).read_to_end(&mut head)
    });
    let hint = format::Header::decode(&head, SEALED_MAGIC, format::SEALED_ITEM_LEN)
        .ok()
        .filter(|h| h.slot_count <= format::MAX_SLOTS && h.items <= format::MAX_ITEMS)
        .map(|h| format::SealedLayout::new(h.slot_count, h.items).file_len)
        .filter(|n| *n < len)
        .map(|n| {
            format!(
                "; its header gives {n} bytes, and the {} after them are not part of the \
                 segment: start-up (or `tierindex fsck --repair`) cuts them off when the first \
                 {n} pass the whole-file checksum, else salvages the items",
                len - n
            )
        })
        .unwrap_or_default();
    Error::Corrupt {
        what,
        detail: format!("{detail}{hint}"),
    }
}

#[derive(Serialize)]
struct FsckOut {
    repaired: bool,
    segments: datadir::RecoveryReport,
    journal_records: u64,
    journal_torn_tail_at: Option<u64>,
    journal_truncated_bytes: u64,
    /// Pending segments whose local file is missing.
    missing: Vec<String>,
    /// Committed segments whose local file is not the one committed (its
    /// footer differs from the journal's record): it may hold entries the
    /// store does not; `--repair` moves it to quarantine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_committed_file: Vec<String>,
    /// Sealed files without a journal record below the journal's highest
    /// id: nothing uploads their entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_journaled: Vec<u64>,
    /// `--repair` rebuilt a damaged or missing journal (`journal::rebuild`).
    #[serde(skip_serializing_if = "Option::is_none")]
    journal_rebuilt: Option<journal::RebuildReport>,
    /// Losses recorded in `quarantine/*.why.json` by an earlier run (or
    /// start) that an operator has not moved away: exit 4, as `status`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    losses_recorded_earlier: Vec<String>,
    /// Segment files but no `journal/journal.log` (check only; `--repair`
    /// rebuilds it): exit 4.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    journal_missing: bool,
}

pub fn fsck(cli: &Cli, repair: bool) -> Result<i32> {
    let cfg = cli.config()?;
    let dd = if repair {
        DataDir::open(&cfg.data_dir)?
    } else {
        DataDir::open_to_check(&cfg.data_dir)?
    };
    let mode = if repair {
        Mode::Repair
    } else {
        Mode::CheckOnly
    };
    let geometry = crate::segment::salvage::Geometry {
        slot_count: cfg.slot_count,
        item_capacity: cfg.segment_items,
    };
    // Committed segments (as the journal says; a damaged one, as its
    // intact frames say): a damaged local copy is quarantined as it is,
    // not salvaged, as at start-up. Segments still to be uploaded: a
    // damaged local copy is left for the broker's start, which salvages it
    // and appends its intact entries again (fsck holds no writer to do so).
    let mut to_upload = std::collections::BTreeSet::new();
    // The highest id the journal recorded (compaction keeps it): the
    // segment a flush last acknowledged, with no file left, is lost unless
    // the journal recorded it sealed (see `datadir::acked`).
    // A journal that cannot be read (missing, damaged) cannot say: then
    // the mark judges nothing (`journal_readable`).
    let mut journal_max = None;
    let mut journal_readable = false;
    let committed: std::collections::BTreeSet<crate::segment::SegmentId> =
        match Journal::open_read_only(&cfg.data_dir) {
            Ok((v, _)) => {
                journal_max = v.max_segment_id();
                journal_readable = true;
                to_upload = v
                    .segments()
                    .values()
                    .filter(|r| {
                        matches!(
                            r.state,
                            journal::SegmentState::Sealed
                                | journal::SegmentState::Uploading
                                | journal::SegmentState::Uploaded
                                | journal::SegmentState::Verified
                        )
                    })
                    .map(|r| r.meta.id)
                    .collect();
                v.segments()
                    .values()
                    .filter(|r| {
                        matches!(
                            r.state,
                            journal::SegmentState::Committed | journal::SegmentState::Released
                        )
                    })
                    .map(|r| r.meta.id)
                    .collect()
            }
            Err(Error::Corrupt { .. }) => journal::committed_in_intact_frames(&cfg.data_dir)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the damaged journal's intact frames could not be read: no segment is known to be committed");
                    Default::default()
                }),
            Err(_) => Default::default(),
        };
    let rec = datadir::recover_checking(
        &dd,
        mode,
        &|_| true,
        &|id| committed.contains(&id),
        &|id| to_upload.contains(&id),
        &|id| !journal_readable || journal_max.is_some_and(|m| id <= m),
        Some(geometry),
    )?;
    let mut journal_rebuilt = None;
    // No journal beside segment files: damage (an operator's `rm`, a lost
    // file), not the crash of a first open, which makes the journal before
    // any segment (helper-74: `fsck` said "journal records: 0", exit 0,
    // and the next start began a new, empty journal). `--repair` rebuilds
    // it (`journal_rebuilt`).
    let journal_missing = !repair
        && !journal::log_path(&cfg.data_dir).exists()
        && (datadir::journal_lost(&cfg.data_dir, crate::tier::CLEAN_SHUTDOWN_MARKER)
            || !rec.report.sealed_ok.is_empty()
            || !rec.report.actives.is_empty()
            || !rec.report.salvaged.is_empty()
            || !rec.report.quarantined.is_empty());
    let (jrep, segments, max_id) = if repair {
        journal_rebuilt = rebuild_journal_if_damaged(&dd)?;
        let (j, r) = Journal::open_in(dd.lock(), JournalOptions::default())?;
        (r, j.segments().clone(), j.max_segment_id())
    } else {
        match Journal::open_read_only(&cfg.data_dir) {
            Ok((v, r)) => (r, v.segments().clone(), v.max_segment_id()),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Default::default()
            }
            Err(e) => return Err(e),
        }
    };
    // Sealed files the journal has no record of, below its highest id: it
    // can never record them, so nothing uploads their entries (a second
    // process sealed them beside this one). `drain` reports them too
    // ("NOT JOURNALED", exit 4) unless the store holds them as committed;
    // fsck does not ask the store (helper-61: it exited 0).
    let not_journaled: Vec<u64> = rec
        .report
        .sealed_ok
        .iter()
        .copied()
        .filter(|&id| {
            let id = crate::segment::SegmentId(id);
            max_id.is_some_and(|m| id <= m) && !segments.contains_key(&id)
        })
        .collect();
    // A segment the journal still has to upload needs its local file.
    let missing: Vec<String> = segments
        .values()
        .filter(|r| {
            matches!(
                r.state,
                journal::SegmentState::Sealed | journal::SegmentState::Uploading
            )
        })
        .filter(|r| {
            !dd.segments_dir()
                .join(crate::segment::sealed::sealed_file_name(r.meta.id))
                .exists()
        })
        .map(|r| {
            format!(
                "segment {} is {:?} in the journal but its local file is missing (its entries are lost unless the store already holds the object)",
                r.meta.id, r.state
            )
        })
        .collect();
    // A segment's local file must be the one the journal records: another
    // (sealed by a second process under its id, copied over it) may hold
    // entries the store does not, and must be neither served as the
    // segment nor uploaded or released as it (helper-73 F3: only committed
    // segments were compared here, while `lookup` flags every state).
    let mut not_committed_file = Vec::new();
    for r in segments.values() {
        use journal::SegmentState as S;
        let uploaded = match r.state {
            S::Sealed | S::Uploading => false,
            S::Uploaded | S::Verified | S::Committed => true,
            _ => continue,
        };
        // Only a committed segment's file is moved by `--repair`: the
        // pipeline still reads the others' (upload, verification).
        let movable = r.state == S::Committed;
        let path = dd
            .segments_dir()
            .join(crate::segment::sealed::sealed_file_name(r.meta.id));
        // Kept by a repair's recovery; a check reads the footer again (a
        // file that fails the check was reported above).
        let diffs = match rec.sealed.get(&r.meta.id) {
            Some(info) => info.differences(&r.meta),
            None if path.exists() => match crate::segment::local::SealedInfo::check(&path, false) {
                Ok(info) => info.differences(&r.meta),
                Err(_) => continue,
            },
            None => continue,
        };
        if diffs.is_empty() {
            continue;
        }
        let why = if uploaded {
            format!(
                "local sealed file of {:?} segment {} is not the one the journal records ({}): \
                 it may hold entries the store does not",
                r.state,
                r.meta.id,
                diffs.join(", ")
            )
        } else {
            format!(
                "local sealed file of {:?} segment {} is not the one the journal records ({}): \
                 nothing uploads it as the segment (the next drain quarantines the segment), \
                 and the entries the journal records for it are not in it",
                r.state,
                r.meta.id,
                diffs.join(", ")
            )
        };
        if !movable {
            // Left for the pipeline, which checks a file against its
            // record before it uploads or verifies with it.
            not_committed_file.push(why);
        } else if repair {
            let to = dd.quarantine_because(&path, &why, None)?;
            not_committed_file.push(format!("{why}; moved to {}", to.display()));
        } else {
            not_committed_file.push(format!("{why}; `fsck --repair` moves it to quarantine"));
        }
    }
    // Segments are synced by recover(); nothing else to flush here.
    // A rebuilt journal is a repair of damage found (exit 4, as for a
    // segment), unless there was no journal and nothing to put in one.
    let journal_clean = journal_rebuilt
        .as_ref()
        .is_none_or(|rb| rb.damaged_copy.is_none() && rb.segments == 0);
    // Losses an earlier run or start recorded (its report said them once;
    // `status` says them until the record is moved away): this check says
    // them too, not "nothing found".
    let this_run: Vec<String> = rec.report.losses().iter().map(|n| n.line()).collect();
    let losses_recorded_earlier: Vec<String> = recorded_losses(&cfg.data_dir)
        .into_iter()
        .map(|n| n.line)
        .filter(|l| !this_run.contains(l))
        .collect();
    let clean = rec.report.is_clean()
        && !journal_missing
        && losses_recorded_earlier.is_empty()
        && not_journaled.is_empty()
        && jrep.torn_tail_at.is_none()
        && missing.is_empty()
        && not_committed_file.is_empty()
        && journal_clean;
    // What an ordinary kill -9 or power cut leaves (torn tails of bytes
    // never acknowledged, finished leftovers, active segments to seal, a
    // journal record cut short) is routine: the next start finishes it,
    // and nothing needs an operator, so it exits 3 (pending), not 4
    // (helper-59: `fsck` after a kill asked for an operator). Damage
    // (quarantine, salvage, a span saved aside, a missing or replaced
    // file, a rebuilt journal) still exits 4.
    let needs_operator = !not_journaled.is_empty()
        || journal_missing
        || !losses_recorded_earlier.is_empty()
        || !rec.report.quarantined.is_empty()
        || !rec.report.salvaged.is_empty()
        || rec.report.actives.iter().any(|a| a.tail_saved_to.is_some())
        || !missing.is_empty()
        || !not_committed_file.is_empty()
        || !journal_clean;
    // After `--repair`, only active segments to seal are left to the start.
    let routine_left = !repair || !rec.report.to_reseal.is_empty();
    let out = FsckOut {
        repaired: repair,
        segments: rec.report,
        journal_records: jrep.records_replayed,
        journal_torn_tail_at: jrep.torn_tail_at,
        journal_truncated_bytes: jrep.truncated_bytes,
        missing,
        not_committed_file,
        not_journaled,
        journal_rebuilt,
        losses_recorded_earlier,
        journal_missing,
    };
    emit(cli.json, &out, |o| {
        let mut s = format!(
            "sealed ok: {}; active: {}; quarantined: {}; removed: {}; to reseal: {:?}; journal records: {}{}",
            o.segments.sealed_ok.len(),
            o.segments.actives.len(),
            o.segments.quarantined.len(),
            o.segments.removed.len(),
            o.segments.to_reseal,
            o.journal_records,
            o.journal_torn_tail_at
                .map(|t| format!("; journal torn tail at byte {t}"))
                .unwrap_or_default()
        );
        if let Some(rb) = &o.journal_rebuilt {
            s.push_str(&format!(
                "\njournal rebuilt: {} segment(s) ({} registered from their sealed files: {:?}), \
                 {} intact frame(s) kept, {} damaged byte(s) skipped, {} record(s) dropped; \
                 the old journal is kept at {}",
                rb.segments,
                rb.registered_from_files.len(),
                rb.registered_from_files,
                rb.frames_salvaged,
                rb.bytes_skipped,
                rb.records_dropped,
                rb.damaged_copy
                    .as_ref()
                    .map_or("(none)".into(), |p| p.display().to_string())
            ));
            for c in &rb.conflicts {
                s.push_str(&format!("\n  {c}"));
            }
        }
        for q in &o.segments.quarantined {
            s.push_str(&format!(
                "\n  {} {}: {}",
                match (
                    o.repaired && !q.reason.contains(datadir::DEFERRED),
                    q.reason.contains("found after its footer"),
                ) {
                    (true, false) => "quarantined",
                    (true, true) => "cut back (original kept in quarantine/)",
                    (false, false) => "would quarantine",
                    (false, true) => "would cut back",
                },
                q.file,
                q.reason
            ));
        }
        for a in &o.segments.actives {
            if a.torn_bytes_zeroed > 0 {
                s.push_str(&format!(
                    "\n  active {:020}: {} valid items, {} torn bytes {}",
                    a.id,
                    a.valid_items,
                    a.torn_bytes_zeroed,
                    if o.repaired { "zeroed" } else { "to zero" }
                ));
            }
        }
        for n in &o.segments.salvaged {
            s.push_str(&format!(
                "\n  {} {}",
                match (o.repaired, n.original_moved_to.is_some()) {
                    (true, true) => "salvaged",
                    (true, false) => "left for the next start, which will salvage",
                    (false, _) => "would salvage",
                },
                n.line()
            ));
        }
        for m in &o.missing {
            s.push_str(&format!("\n  MISSING {m}"));
        }
        for m in &o.not_committed_file {
            s.push_str(&format!("\n  NOT THE JOURNALED FILE: {m}"));
        }
        if !o.not_journaled.is_empty() {
            s.push_str(&format!("\n  {}", not_journaled_line(&o.not_journaled)));
        }
        if o.journal_missing {
            s.push_str(
                "\n  JOURNAL MISSING: the data directory had a journal (segment files, or \
                 the last run's clean-shutdown marker, show it) but has no \
                 journal/journal.log (removed or lost: \
                 what was uploaded, committed or released is not known here). Restore it from \
                 a backup if there is one; otherwise `tierindex fsck --repair` rebuilds it \
                 from the sealed files, then `tierindex reconcile` compares it with the store \
                 (segments whose local copies were released are known only there). Until \
                 then a broker in single-writer mode refuses to start on it, and one with the \
                 manifest starts a new journal from the local files",
            );
        }
        if !o.losses_recorded_earlier.is_empty() {
            s.push_str(&format!(
                "\n  LOST to local damage, found by an earlier run: {} file(s) (recorded in \
                 quarantine/*.why.json; `tierindex quarantine list` shows them; move a record \
                 out of quarantine/ once its loss is dealt with)",
                o.losses_recorded_earlier.len()
            ));
            for l in &o.losses_recorded_earlier {
                s.push_str(&format!("\n    lost {l}"));
            }
        }
        for r in &o.segments.removed {
            s.push_str(&format!(
                "\n  {} {r}",
                if o.repaired {
                    "removed"
                } else {
                    "would remove"
                }
            ));
        }
        if !clean && !needs_operator {
            s.push_str(match (o.repaired, routine_left) {
                (true, false) => "\nroutine crash recovery done, nothing damaged",
                (true, true) => {
                    "\nroutine crash recovery only, nothing damaged: the next start seals what \
                     is listed to reseal (exit 3)"
                }
                (false, _) => {
                    "\nroutine crash recovery only, nothing damaged: the next start (or `fsck \
                     --repair`) finishes it (exit 3)"
                }
            });
        }
        s
    });
    Ok(if clean {
        EXIT_DRAINED
    } else if needs_operator {
        EXIT_NEEDS_OPERATOR
    } else if routine_left {
        EXIT_PENDING
    } else {
        EXIT_DRAINED
    })
}

/// `fsck --repair`: a journal that is missing, or damaged in a way that is
/// not a torn tail (`Journal::open` refuses it), is rebuilt from its intact
/// frames and the sealed files. A newer build's journal is never rebuilt.
fn rebuild_journal_if_damaged(dd: &DataDir) -> Result<Option<journal::RebuildReport>> {
    let data_dir = dd.root();
    let missing = !journal::log_path(data_dir).exists();
    let damaged = match Journal::open_read_only(data_dir) {
        Ok(_) => false,
        Err(Error::Corrupt { .. }) => true,
        Err(_) => false,
    };
    if missing || damaged {
        let report = journal::rebuild_in(dd.lock())?;
        // The rebuilt journal holds only what the local files show: a
        // segment sealed, committed and released since the mark was
        // written is in the store, not here, so the mark can no longer be
        // judged locally (helper-89 F1: `fsck` and `status` called such a
        // segment LOST).
        if let Ok(datadir::acked::Read::Mark(m)) = datadir::acked::read(data_dir)
            && m.judged()
        {
            tracing::warn!(
                segment = m.segment.0,
                "the journal was rebuilt: the newest segment a flush acknowledged entries of \
                 ({} entries from offset {}) is no longer judged by its local file; if it was \
                 released after its commit, the store holds it (`tierindex reconcile` lists \
                 the stream's objects)",
                m.items,
                m.first_offset
            );
            datadir::acked::MarkWriter::new(Some(m)).write(
                data_dir,
                datadir::acked::AckedMark {
                    flags: m.flags | datadir::acked::FLAG_NOT_JUDGED,
                    ..m
                },
            )?;
        }
        return Ok(Some(report));
    }
    Ok(None)
}

pub async fn lookup(cli: &Cli, key: &str, from: u64, to: u64, remote: bool) -> Result<i32> {
    let cfg = cli.config()?;
    let seg_dir = cfg.data_dir.join(datadir::SEGMENTS_DIR);
    let range = TimeRange {
        from_ms: from,
        to_ms: to,
    };
    let h = crate::key_hash(key.as_bytes());
    let mut names: Vec<_> = std::fs::read_dir(&seg_dir)
        .map_err(|e| Error::io(&seg_dir, "list segments", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut found: Vec<(u64, Entry)> = Vec::new();
    let mut skipped = Vec::new();
    // Local files with items that could not be read (or not read at all):
    // the answer may lack their entries, unless the store's copy of the
    // same segment was read instead (`--remote`).
    let mut damaged: std::collections::BTreeSet<u64> = Default::default();
    // Local sealed files that passed every check, by id: (length, CRC32).
    // A remote segment is left out only when one of these is the same
    // sealed segment; an active file, a damaged one, or another segment
    // under its id (a restored backup) is searched beside it.
    let mut intact: std::collections::BTreeMap<u64, (u64, crate::segment::KeySum)> =
        Default::default();
    // Files are read as `drain` would salvage them: every item whose own
    // CRC verifies is found, also after a damaged span (`segment::salvage`);
    // the damaged items are named under `skipped`.
    let geometry = crate::segment::salvage::Geometry {
        slot_count: cfg.slot_count,
        item_capacity: cfg.segment_items,
    };
    let wanted = |e: &Entry| e.key_hash == h && range.contains(e.timestamp_ms);
    // What the journal records of each sealed segment (read only, no lock:
    // a running broker's too): a local file under a segment's name that is
    // not the recorded one (another data directory's seal of the id,
    // another segment's file copied over it) is not that segment, and its
    // entries are not served as its own (helper-72: they were, exit 0).
    // And the segments it records `Quarantined`: their entries are in no
    // file a lookup reads (helper-75 F2: 0 hits, exit 0, for acknowledged
    // entries of a segment quarantined by a failed read).
    let (recorded, quarantined): (
        std::collections::BTreeMap<u64, crate::segment::SealedMeta>,
        Vec<(u64, String)>,
    ) = match Journal::open_read_only(&cfg.data_dir) {
        Ok((v, _)) => (
            v.segments()
                .iter()
                .map(|(id, r)| (id.0, r.meta.clone()))
                .collect(),
            v.segments()
                .values()
                .filter(|r| r.state == journal::SegmentState::Quarantined)
                // Only one whose entries' times can be in the range.
                .filter(|r| r.meta.min_ts <= range.to_ms && r.meta.max_ts >= range.from_ms)
                .map(|r| (r.meta.id.0, r.reason.clone().unwrap_or_default()))
                .collect(),
        ),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Default::default()
        }
        Err(e) => {
            skipped.push(format!(
                "journal: {e}; local sealed files were not compared with its records"
            ));
            Default::default()
        }
    };
    // A running broker seals and releases while this reads: a file gone
    // since the listing is no damage. An active file's sealed file is read
    // in its place (queued next); a sealed file gone was released, its
    // entries in the store (helper-57: such lookups exited 4 as damaged).
    let listed: std::collections::BTreeSet<std::path::PathBuf> = names.iter().cloned().collect();
    let mut queue: std::collections::VecDeque<std::path::PathBuf> = names.into();
    let gone = |name: &str, what: &str| format!("{name}: gone since the listing ({what})");
    while let Some(p) = queue.pop_front() {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let named_id = |suffix: &str| {
            name.strip_suffix(suffix)
                .and_then(|s| s.parse::<u64>().ok())
                .map(SegmentId)
        };
        if let Some(id) = named_id(".seg") {
            match SealedSegment::open(&p) {
                Ok(s) => {
                    let m = s.meta();
                    match recorded.get(&id.0) {
                        Some(j)
                            if j.file_len != m.file_len
                                || j.key_sum() != m.key_sum()
                                || s.id() != id =>
                        {
                            // Not read: its entries may be another
                            // segment's; the segment's own are missing
                            // from the answer unless the store's copy is
                            // read (`--remote`).
                            damaged.insert(id.0);
                            skipped.push(format!(
                                "{name}: NOT THE FILE THE JOURNAL RECORDS for segment {id} \
                                 (segment {} of {} bytes, checksum {}; the journal: {} bytes, \
                                 checksum {}): not read (`tierindex fsck` says more of a \
                                 committed segment's file; a pending one's is quarantined by \
                                 its upload)",
                                s.id(),
                                m.file_len,
                                m.key_sum(),
                                j.file_len,
                                j.key_sum()
                            ));
                        }
                        _ => {
                            intact.insert(s.id().0, (m.file_len, m.key_sum()));
                            found.extend(s.lookup(h, range).into_iter().map(|e| (s.id().0, e)));
                        }
                    }
                }
                Err(e @ Error::Corrupt { .. }) => {
                    // Bounded: at most the largest layout, or what the
                    // header gives (bytes appended after a segment are
                    // not part of it).
                    let salvaged = datadir::read_sealed_bounded(&p, id)
                        .and_then(|b| salvage::salvage_sealed(&b, id));
                    match salvaged {
                        Ok(s) => {
                            found
                                .extend(s.entries.iter().filter(|e| wanted(e)).map(|e| (id.0, *e)));
                            if s.lost_items() > 0 {
                                damaged.insert(id.0);
                            }
                            skipped.push(format!(
                                "{name}: {e}; salvaged by item: {} item(s) read, {} damaged item(s) unreadable",
                                s.entries.len(),
                                s.lost_items()
                            ));
                        }
                        Err(s) => {
                            damaged.insert(id.0);
                            skipped.push(format!("{name}: {e}; salvage: {s}"))
                        }
                    }
                }
                Err(_) if !p.exists() => skipped.push(gone(
                    &name,
                    "released meanwhile: its entries are in the store",
                )),
                Err(e) => {
                    damaged.insert(id.0);
                    skipped.push(format!("{name}: {e}"))
                }
            }
        } else if let Some(id) = named_id(".active") {
            let scanned = datadir::read_bounded_active(&p, Some(geometry))
                .and_then(|b| salvage::scan_active(&b, id, Some(geometry)));
            match scanned {
                Ok(scan) => {
                    found.extend(
                        scan.items
                            .iter()
                            .map(|(_, e)| *e)
                            .filter(|e| wanted(e))
                            .map(|e| (id.0, e)),
                    );
                    if scan.lost_items() > 0 {
                        damaged.insert(id.0);
                    }
                    if scan.lost_items() > 0 || scan.header_rebuilt {
                        skipped.push(format!(
                            "{name}: damaged; salvaged by item: {} item(s) read, {} damaged item(s) unreadable{}",
                            scan.items.len(),
                            scan.lost_items(),
                            if scan.header_rebuilt {
                                " (header rebuilt from the configured geometry)"
                            } else {
                                ""
                            }
                        ));
                    }
                }
                Err(_) if !p.exists() => {
                    let sealed = p.with_file_name(format!("{:020}.seg", id.0));
                    if listed.contains(&sealed) {
                        // Read in its turn.
                    } else if sealed.exists() {
                        queue.push_front(sealed);
                    } else {
                        skipped.push(gone(&name, "sealed and released meanwhile"));
                    }
                }
                Err(e) => {
                    damaged.insert(id.0);
                    skipped.push(format!("{name}: {e}"))
                }
            }
        }
    }
    for (id, why) in &quarantined {
        // Its file is in `segments/`, the one the journal records, and was
        // read above (a segment quarantined for its store object, not its
        // file): its entries are in the answer (helper-78 F4: "not
        // searched", exit 4, next to its hits).
        if intact.contains_key(id) {
            continue;
        }
        if damaged.insert(*id) {
            skipped.push(format!(
                "segment {id:020} is Quarantined in the journal ({why}): its entries are not \
                 searched; `tierindex quarantine list` says why, and `tierindex quarantine retry` \
                 puts back a file that passes its check"
            ));
        }
    }
    let mut remote_segments = 0usize;
    let mut remote_unreadable = 0usize;
    if remote {
        let r = crate::cli::remote::remote_hits(&cfg, h, range, &intact).await?;
        remote_segments = r.candidates;
        remote_unreadable = r.bad.len();
        found.extend(r.hits);
        skipped.extend(r.bad);
        // The store's copy of a damaged local file was read: nothing of
        // that segment is missing from the answer.
        damaged.retain(|id| !r.read.contains(id));
        // An entry both in a local file and in the remote segment of the
        // same id (an active file restored from a backup) is one hit.
        found.sort_by_key(|(seg, e)| (*seg, e.offset, e.timestamp_ms, e.size));
        found.dedup();
    }
    #[derive(Serialize)]
    struct Hit {
        segment: u64,
        offset: u64,
        size: u32,
        timestamp_ms: u64,
    }
    #[derive(Serialize)]
    struct Out {
        key: String,
        key_hash: String,
        hits: Vec<Hit>,
        skipped: Vec<String>,
        /// Remote segments searched (`--remote`).
        remote_segments: usize,
        /// Damaged local files whose unreadable items may hold entries for
        /// the key, and of which no store copy was read (exit 4).
        incomplete_segments: Vec<u64>,
        /// Losses recorded in `quarantine/*.why.json` (entries lost to
        /// local damage, found by a start or a drain): their items cannot
        /// be read, so the answer may lack entries for the key (exit 4, as
        /// `status`, until an operator moves the records away).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        losses_recorded: Vec<String>,
    }
    let out = Out {
        key: key.into(),
        key_hash: format!("{h:016x}"),
        hits: found
            .into_iter()
            .map(|(segment, e)| Hit {
                segment,
                offset: e.offset,
                size: e.size,
                timestamp_ms: e.timestamp_ms,
            })
            .collect(),
        skipped,
        remote_segments,
        incomplete_segments: damaged.iter().copied().collect(),
        losses_recorded: recorded_losses(&cfg.data_dir)
            .into_iter()
            .map(|n| n.line)
            .collect(),
    };
    emit(cli.json, &out, |o| {
        let mut s = format!(
            "{} hit(s) for {:?} (hash {})",
            o.hits.len(),
            o.key,
            o.key_hash
        );
        if remote {
            s.push_str(&format!(
                ", {} remote segment(s) searched",
                o.remote_segments
            ));
        }
        for h in &o.hits {
            s.push_str(&format!(
                "\n  segment {:020} offset {} size {} ts {}",
                h.segment, h.offset, h.size, h.timestamp_ms
            ));
        }
        for k in &o.skipped {
            s.push_str(&format!("\n  skipped {k}"));
        }
        if !o.losses_recorded.is_empty() {
            s.push_str(&format!(
                "\nLOST to local damage (recorded in quarantine/*.why.json): {} file(s); their \
                 unreadable items may have held entries for this key (exit 4 until the records \
                 are moved away; `tierindex quarantine list` shows them)",
                o.losses_recorded.len()
            ));
            for l in &o.losses_recorded {
                s.push_str(&format!("\n  lost {l}"));
            }
        }
        if !o.incomplete_segments.is_empty() {
            s.push_str(&format!(
                "\nincomplete: {} damaged local file(s) hold items that could not be read; \
                 their entries for this key may be missing{} (exit 4; `tierindex fsck` says more)",
                o.incomplete_segments.len(),
                if remote {
                    " (no copy of them in the store was read)"
                } else {
                    "; `--remote` reads the store's copy of committed ones"
                }
            ));
        }
        s
    });
    Ok(
        if remote_unreadable > 0
            || !out.incomplete_segments.is_empty()
            || !out.losses_recorded.is_empty()
        {
            crate::lifecycle::EXIT_NEEDS_OPERATOR
        } else {
            EXIT_DRAINED
        },
    )
}
