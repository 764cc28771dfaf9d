//! `tierindex quarantine list | show ID | retry ID`: what is quarantined,
//! why, and a way back once the cause is gone.
//!
//! Two kinds of quarantine exist:
//! - *files* moved to `quarantine/` (start-up checks, salvage, a local
//!   sealed file that did not match its journal record), each with a
//!   `<name>.why.json` record (older ones have none). ID is the file name.
//! - *segments* marked `Quarantined` in the journal. ID is the segment id.
//!
//! `retry` re-checks a quarantined file and moves it back into `segments/`
//! only when it passes the full check, names the segment its file name
//! says, no file of that segment is there, and the journal either does not
//! know the segment or records exactly this file in a state that still
//! uploads. The next start (`drain`, or the broker) takes it from there.
//! A segment the journal marks `Quarantined` (`retry SEGMENT_ID`, or
//! `retry FILE` of its moved file) re-enters the pipeline when its local
//! sealed file, in `segments/` or moved back from `quarantine/`, passes the
//! full check and matches its journal `Sealed` record exactly: `retry`
//! journals `Requeued` (Quarantined -> Sealed), and the next drain uploads
//! it with a new attempt. Otherwise it says why and exits 4.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::Serialize;

use crate::cli::{Cli, emit};
use crate::datadir::{self, DataDir, QuarantineRecord, RECORD_SUFFIX};
use crate::durable::fsync_dir;
use crate::error::{Error, Result};
use crate::journal::{Journal, SegmentState};
use crate::lifecycle::{EXIT_DRAINED, EXIT_NEEDS_OPERATOR};
use crate::segment::format;

#[derive(Subcommand, Debug, Clone)]
pub enum QuarantineAction {
    /// Every quarantined file and journal segment, with why.
    List,
    /// One entry in full (a file name from `list`, or a segment id).
    Show { id: String },
    /// Re-check a quarantined file; move it back only if the cause is gone.
    Retry { id: String },
}

#[derive(Serialize)]
struct Entry {
    id: String,
    kind: &'static str,
    reason: String,
    record: Option<QuarantineRecord>,
}

fn entries(root: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut records: std::collections::BTreeMap<
        PathBuf,
        std::result::Result<QuarantineRecord, String>,
    > = datadir::quarantine_records_read(root).into_iter().collect();
    let qdir = root.join(datadir::QUARANTINE_DIR);
    if let Ok(rd) = fs::read_dir(&qdir) {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(RECORD_SUFFIX))
            .collect();
        names.sort();
        for n in names {
            let (reason, record) = match records.remove(&qdir.join(format!("{n}{RECORD_SUFFIX}"))) {
                Some(Ok(r)) => (r.reason.clone(), Some(r)),
                Some(Err(e)) => (
                    format!(
                        "its record cannot be read ({e}): entries it describes may be lost; \
                         `tierindex inspect` the file"
                    ),
                    None,
                ),
                None => (
                    "(no record: quarantined by an older version, or start-up stopped before \
                     writing it)"
                        .into(),
                    None,
                ),
            };
            out.push(Entry {
                id: n,
                kind: "file",
                reason,
                record,
            });
        }
    }
    // Records whose file is not there (deleted by an operator, who kept
    // the record): what they say still counts, as in `status`, `fsck` and
    // `drain` (helper-74 F5: those said 4 naming this list, which said
    // "0 quarantined"). Moving the record out of quarantine/ ends it.
    for (p, rec) in records {
        let id = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (reason, record) = match rec {
            Ok(r) => (
                format!(
                    "{} (the quarantined file itself is not there; move this record out of \
                     quarantine/ once its loss is dealt with)",
                    r.reason
                ),
                Some(r),
            ),
            Err(e) => (
                format!(
                    "a record that cannot be read ({e}), of a file not there: entries may have \
                     been lost; move it out of quarantine/ once dealt with"
                ),
                None,
            ),
        };
        out.push(Entry {
            id,
            kind: "record",
            reason,
            record,
        });
    }
    match Journal::open_read_only(root) {
        Ok((view, _)) => {
            for (id, r) in view.segments() {
                if r.state == SegmentState::Quarantined {
                    out.push(Entry {
                        id: id.0.to_string(),
                        kind: "journal segment",
                        reason: r.reason.clone().unwrap_or_default(),
                        record: None,
                    });
                }
            }
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

pub fn run(cli: &Cli, action: &QuarantineAction) -> Result<i32> {
    let cfg = cli.config()?;
    let root = cfg.data_dir.clone();
    // A mistyped --data-dir must be an error, not "0 quarantined", and
    // `retry` must not create a data directory there.
    if !crate::datadir::is_data_dir(&root) {
        return Err(Error::InvalidInput(format!(
            "no data directory at {}: check --data-dir",
            root.display()
        )));
    }
    match action {
        QuarantineAction::List => {
            let es = entries(&root)?;
            emit(cli.json, &es, |es| {
                let mut s = format!("{} quarantined", es.len());
                for e in es {
                    s.push_str(&format!("\n  {:<16} {}  {}", e.kind, e.id, e.reason));
                    if let Some(n) = e.record.as_ref().and_then(|r| r.loss.as_ref()) {
                        s.push_str(&format!("\n      {}", n.line()));
                    }
                }
                s
            });
            Ok(if es.is_empty() {
                EXIT_DRAINED
            } else {
                EXIT_NEEDS_OPERATOR
            })
        }
        QuarantineAction::Show { id } => {
            let es = entries(&root)?;
            let Some(e) = es.into_iter().find(|e| &e.id == id) else {
                return Err(Error::InvalidInput(format!(
                    "nothing quarantined under {id:?} (see `tierindex quarantine list`)"
                )));
            };
            emit(cli.json, &e, |e| {
                serde_json::to_string_pretty(e).unwrap_or_default()
            });
            Ok(EXIT_NEEDS_OPERATOR)
        }
        QuarantineAction::Retry { id } => retry(cli, &root, id),
    }
}

fn retry(cli: &Cli, root: &Path, id: &str) -> Result<i32> {
    // The lock: the broker must be down while files move.
    let dd = DataDir::open(root)?;
    let src = dd.quarantine_dir().join(id);
    if id.contains('/') || !src.is_file() {
        if let Ok((view, _)) = Journal::open_read_only(root)
            && let Ok(n) = id.parse::<u64>()
            && let Some(r) = view
                .get(crate::segment::SegmentId(n))
                .filter(|r| r.state == SegmentState::Quarantined)
        {
            let local = dd
                .segments_dir()
                .join(crate::segment::sealed::sealed_file_name(r.meta.id));
            let bytes = match fs::read(&local) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return refuse(
                        cli,
                        id,
                        &format!(
                            "the journal marks this segment Quarantined and {} is not there; \
                             retry its file from `quarantine list` if it was moved",
                            local.display()
                        ),
                    );
                }
                Err(e) => return Err(Error::io(&local, "read sealed segment", e)),
            };
            let (footer, sums) = match format::check_sealed(&bytes) {
                Ok(v) => v,
                Err(e) => return refuse(cli, id, &format!("still fails the full check: {e}")),
            };
            if footer.meta(sums) != r.meta {
                return refuse(
                    cli,
                    id,
                    "the journal records other content for this segment (not the file it sealed)",
                );
            }
            requeue(&dd, r.meta.id)?;
            emit(cli.json, &local.display().to_string(), |d| {
                format!("requeued {d} (journal: Quarantined -> Sealed); the next drain uploads it")
            });
            return Ok(EXIT_DRAINED);
        }
        return Err(Error::InvalidInput(format!(
            "no quarantined file {id:?} (see `tierindex quarantine list`)"
        )));
    }
    // The original name: the file name up to `.seg` / `.active`.
    let Some((seg_id, name)) = original_name(id) else {
        return refuse(
            cli,
            id,
            "not a segment file (only sealed segment files are retried)",
        );
    };
    if !name.ends_with(".seg") {
        return retry_active(cli, &dd, root, id, &src, seg_id, &name);
    }
    // The original of a file start-up cut back to its sealed length: the
    // segment is in segments/ whole, nothing of it needs to go back.
    let mut rec_path = src.as_os_str().to_owned();
    rec_path.push(RECORD_SUFFIX);
    let rec_path = PathBuf::from(rec_path);
    if datadir::quarantine_records(root)
        .iter()
        .any(|(p, r)| *p == rec_path && r.loss.as_ref().is_some_and(|l| l.tail_removed.is_some()))
    {
        return refuse(
            cli,
            id,
            "start-up cut the bytes after its footer off and kept the segment as it was sealed \
             (see its record): nothing of it needs to go back",
        );
    }
    // Bounded: no sealed segment is longer than the largest layout.
    let max = format::max_sealed_len();
    let bytes = match crate::durable::read_regular(&src, max) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return refuse(cli, id, &format!("still fails the full check: {e}"));
        }
        Err(e) => return Err(Error::io(&src, "read quarantined file", e)),
    };
    let (footer, sums) = match format::check_sealed(&bytes) {
        Ok(v) => v,
        Err(e) => return refuse(cli, id, &format!("still fails the full check: {e}")),
    };
    if footer.segment_id.0 != seg_id {
        return refuse(
            cli,
            id,
            &format!(
                "its footer says segment {}, its name {seg_id}",
                footer.segment_id
            ),
        );
    }
    let dst = dd.segments_dir().join(&name);
    if dst.exists() {
        return refuse(
            cli,
            id,
            &format!(
                "{} exists: a file of this segment is in place",
                dst.display()
            ),
        );
    }
    let mut requeue_it = false;
    match Journal::open_read_only(root) {
        Ok((view, _)) => {
            if let Some(r) = view.get(footer.segment_id) {
                if footer.meta(sums) != r.meta {
                    return refuse(
                        cli,
                        id,
                        "the journal records other content for this segment (not the file it sealed)",
                    );
                }
                requeue_it = r.state == SegmentState::Quarantined;
            }
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    move_back(&dd, &src, &dst)?;
    if requeue_it {
        // After the move: a crash in between leaves the file in place and
        // the segment Quarantined, which `retry SEGMENT_ID` requeues.
        requeue(&dd, footer.segment_id)?;
        emit(cli.json, &dst.display().to_string(), |d| {
            format!(
                "restored {d} and requeued it (journal: Quarantined -> Sealed); the next drain uploads it"
            )
        });
        return Ok(EXIT_DRAINED);
    }
    emit(cli.json, &dst.display().to_string(), |d| {
        format!("restored {d}; the next start (drain or the broker) journals and uploads it")
    });
    Ok(EXIT_DRAINED)
}

/// `retry` of a quarantined active file. Put back only when none of its
/// items was salvaged (its record says so: else they are sealed already,
/// and putting it back would hold them twice), nothing of its id is in
/// `segments/` or the journal, and the configured geometry now locates its
/// items (an active file whose header was damaged is read with the
/// geometry it was written with: the operator sets `slot_count` and
/// `segment_items`). The next start salvages it as any active file.
fn retry_active(
    cli: &Cli,
    dd: &DataDir,
    root: &Path,
    id: &str,
    src: &Path,
    seg_id: u64,
    name: &str,
) -> Result<i32> {
    let mut rec_path = src.as_os_str().to_owned();
    rec_path.push(RECORD_SUFFIX);
    let rec_path = PathBuf::from(rec_path);
    let record = datadir::quarantine_records(root)
        .into_iter()
        .find(|(p, _)| *p == rec_path)
        .map(|(_, r)| r);
    if record
        .as_ref()
        .is_some_and(|r| r.reason.starts_with(crate::datadir::FOREIGN_ACTIVE))
    {
        return refuse(
            cli,
            id,
            "it was quarantined as not this segment's file (from another data directory or an \
             earlier incarnation of this one: see its record): its entries are not this \
             stream's to upload, and its record keeps any loss of the segment reported. Read \
             its entries with `tierindex inspect`; if it is this directory's own after all, \
             see the record's advice",
        );
    }
    let Some(loss) = record.as_ref().and_then(|r| r.loss.as_ref()) else {
        return refuse(
            cli,
            id,
            if record.is_some() {
                "its record names no loss (see `tierindex quarantine show`): nothing of it \
                 needs to go back"
            } else {
                "an active file is put back only when its record shows nothing of it was \
                 salvaged; this one has no record"
            },
        );
    };
    if loss.salvaged_items > 0 || loss.sealed_as.is_some() {
        return refuse(
            cli,
            id,
            &format!(
                "its {} salvaged item(s) were sealed when it was quarantined; putting it back \
                 would hold them twice (see its record)",
                loss.salvaged_items
            ),
        );
    }
    let sid = crate::segment::SegmentId(seg_id);
    let taken: Vec<String> = [
        crate::segment::sealed::sealed_file_name(sid),
        crate::segment::active::active_file_name(sid),
    ]
    .into_iter()
    .filter(|n| dd.segments_dir().join(n).exists())
    .collect();
    if !taken.is_empty() {
        return refuse(
            cli,
            id,
            &format!("segments/ already holds {taken:?} of this segment"),
        );
    }
    match Journal::open_read_only(root) {
        Ok((view, _)) if view.get(sid).is_some() => {
            return refuse(cli, id, "the journal already records this segment");
        }
        // The journal takes a `Sealed` record only above every id it ever
        // recorded: restored under its own id now, the file would be sealed
        // at the next start and never journaled or uploaded.
        Ok((view, _)) if view.max_segment_id().is_some_and(|m| m >= sid) => {
            return refuse(
                cli,
                id,
                &format!(
                    "segments up to {} were journaled since it was quarantined, and a segment \
                     id is journaled only above every earlier one: put back under its own id \
                     it could never be uploaded. Read its entries with `tierindex inspect` and \
                     the geometry it was written with",
                    view.max_segment_id().map_or(0, |m| m.0)
                ),
            );
        }
        Ok(_) => {}
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let cfg = cli.config()?;
    let geometry = crate::segment::salvage::Geometry {
        slot_count: cfg.slot_count,
        item_capacity: cfg.segment_items,
    };
    // Bounded like the start-up check: no longer than the largest layout.
    let bytes = match datadir::read_bounded_active(src, Some(geometry)) {
        Ok(b) => b,
        Err(e @ Error::Corrupt { .. }) => return refuse(cli, id, &e.to_string()),
        Err(e) => return Err(e),
    };
    let found = match crate::segment::salvage::scan_active(&bytes, sid, Some(geometry)) {
        Ok(scan) if !scan.items.is_empty() => scan.items.len(),
        Ok(_) => 0,
        Err(e) => {
            return refuse(
                cli,
                id,
                &format!(
                    "still unreadable with slot_count {} and segment_items {}: {e}; set the \
                     geometry it was written with",
                    cfg.slot_count, cfg.segment_items
                ),
            );
        }
    };
    if found == 0 {
        return refuse(
            cli,
            id,
            &format!(
                "no item located with slot_count {} and segment_items {}; set the geometry it \
                 was written with",
                cfg.slot_count, cfg.segment_items
            ),
        );
    }
    let dst = dd.segments_dir().join(name);
    move_back(dd, src, &dst)?;
    emit(cli.json, &dst.display().to_string(), |d| {
        format!(
            "restored {d}: {found} item(s) located with this geometry; the next start (drain or \
             the broker, with the same slot_count and segment_items) salvages and seals them"
        )
    });
    Ok(EXIT_DRAINED)
}

/// Move quarantined file `src` back to `dst` in `segments/`, then drop its
/// record; both directories fsynced, so the move is durable either way (a
/// crash before the record goes leaves a record without its file).
fn move_back(dd: &DataDir, src: &Path, dst: &Path) -> Result<()> {
    fs::rename(src, dst).map_err(|e| Error::io(src, "move file back from quarantine", e))?;
    fsync_dir(&dd.segments_dir())?;
    let mut rec = src.as_os_str().to_owned();
    rec.push(RECORD_SUFFIX);
    let _ = fs::remove_file(PathBuf::from(rec));
    fsync_dir(&dd.quarantine_dir())
}

/// Journal `Requeued` for a Quarantined segment whose local file was found
/// intact and matching (durable before this returns).
fn requeue(dd: &DataDir, id: crate::segment::SegmentId) -> Result<()> {
    let (mut j, _) = Journal::open_in(dd.lock(), crate::journal::JournalOptions::default())?;
    j.append(&[crate::journal::Record::Requeued {
        id,
        reason: "quarantine retry: the local file passes the full check and matches its \
                 journal record"
            .into(),
    }])
}

fn refuse(cli: &Cli, id: &str, why: &str) -> Result<i32> {
    emit(cli.json, &(id, why), |(id, why)| {
        format!("not retried {id}: {why}")
    });
    Ok(EXIT_NEEDS_OPERATOR)
}

/// `00000000000000000007.seg.1764...` → (7, "00000000000000000007.seg").
fn original_name(moved: &str) -> Option<(u64, String)> {
    for suffix in [".seg", ".active"] {
        if let Some(at) = moved.find(suffix) {
            let stem = &moved[..at];
            let rest = &moved[at + suffix.len()..];
            if stem.len() == 20
                && stem.bytes().all(|b| b.is_ascii_digit())
                && (rest.is_empty() || rest.starts_with('.'))
                && !rest.starts_with(".tmp")
            {
                return Some((stem.parse().ok()?, format!("{stem}{suffix}")));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::original_name;

    #[test]
    fn original_names() {
        assert_eq!(
            original_name("00000000000000000007.seg.1764641234567"),
            Some((7, "00000000000000000007.seg".into()))
        );
        assert_eq!(
            original_name("00000000000000000007.active.1.2"),
            Some((7, "00000000000000000007.active".into()))
        );
        assert_eq!(original_name("00000000000000000007.seg.tmp.1"), None);
        assert_eq!(original_name("README.txt.1"), None);
    }
}
