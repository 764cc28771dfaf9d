//! The start-up check: every file of `segments/` classified, checked and
//! (in `Mode::Repair`) repaired, quarantined or sealed again, by the rules
//! in the parent module's doc.

use super::*;
use std::sync::Arc;

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
#[cfg(any(test, feature = "testing"))]
pub fn recover_with_geometry(
    dir: &DataDir,
    mode: Mode,
    full_sealed_check: bool,
    geometry: Option<Geometry>,
) -> Result<Recovered> {
    recover_checking(
        dir,
        mode,
        &|_| full_sealed_check,
        &|_| false,
        &|_| false,
        &|_| false,
        geometry,
    )
}

/// Check every `(id, path, summed)` ([`SealedInfo::check`]: structure and
/// whole-body checksum when `summed`, else structure only), on
/// up to `available_parallelism` (at most 4) threads; each map is dropped
/// once checked (only its footer, sums and key filter are kept). Opening a
/// sealed file costs a few system calls even for the structure check, so
/// with many local segments the start-up's open grows with them: spread
/// over the cores.
fn open_parallel(todo: Vec<(SegmentId, Arc<Path>, bool)>) -> Vec<(SegmentId, Result<SealedInfo>)> {
    let open = |p: &Path, summed: bool| SealedInfo::check(p, summed);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(todo.len().max(1));
    if threads <= 1 {
        return todo
            .into_iter()
            .map(|(id, p, summed)| (id, open(&p, summed)))
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let todo = &todo;
    // Each worker's results carry their place in `todo`; merged, they are
    // put back in that order (the caller takes them in file order).
    let mut all: Vec<(usize, SegmentId, Result<SealedInfo>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((id, p, summed)) = todo.get(i) else { break };
                        done.push((i, *id, open(p, *summed)));
                    }
                    done
                })
            })
            .collect();
        let mut all = Vec::with_capacity(todo.len());
        for w in workers {
            match w.join() {
                Ok(done) => all.extend(done),
                // A panic in a check is a bug; re-raise it on this thread
                // rather than treat the files as checked.
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        all
    });
    all.sort_unstable_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, id, r)| (id, r)).collect()
}

/// Marks a damaged sealed file `recover_checking` left in place for the
/// broker's start (`defer_salvage`), in its report line.
pub const DEFERRED: &str = "left in place";

/// [`recover_with_geometry`], choosing per sealed file whether it gets the
/// full check (`full_check(id)`: every item's CRC) or the structural one.
/// The writer full-checks the files still to be uploaded, so damage is
/// found (and salvaged) before their bytes are journaled or uploaded.
///
/// `store_holds(id)`: the journal records segment `id` as committed, so
/// the store holds a verified copy of every entry. A damaged local copy of
/// such a segment is moved to quarantine as it is, with that reason: it is
/// not salvaged (its entries are not lost, and appending its intact ones
/// again would commit them twice) and not reported as a loss.
///
/// `defer_salvage(id)`: a damaged sealed file of segment `id` is left in
/// place, reported as what would be done (`fsck --repair` for a segment the
/// journal has yet to upload: only the broker's start, which holds the
/// writer, can append its intact entries again after salvaging it; salvaged
/// here, its rewritten file would no longer match the journal and its
/// entries would be stranded).
pub fn recover_checking(
    dir: &DataDir,
    mode: Mode,
    full_check: &dyn Fn(SegmentId) -> bool,
    store_holds: &dyn Fn(SegmentId) -> bool,
    defer_salvage: &dyn Fn(SegmentId) -> bool,
    journal_knows: &dyn Fn(SegmentId) -> bool,
    geometry: Option<Geometry>,
) -> Result<Recovered> {
    let started = std::time::Instant::now();
    let seg_dir = dir.segments_dir();
    // Paths shared (not copied) by the lists below: with a million local
    // segments each copy of every path was about 100 MB.
    let mut files: Vec<(Kind, Arc<Path>)> = Vec::new();
    // `segments/` that is itself a host's directory, a data directory or
    // one of a host's streams (a symlink to one, a host started there
    // before the directory above it became a data directory): nothing in
    // it is moved, the start stops (helper-77 F3: its marker files were
    // moved before the check of a directory stopped the start).
    for (marker, what) in [
        (crate::lock::host::HOST_INFO_FILE, "a tierindex host's directory"),
        (crate::identity::IDENTITY_FILE, "a data directory"),
        (crate::lock::host::HOSTED_FILE, "a host's stream"),
    ] {
        if fs::symlink_metadata(seg_dir.join(marker)).is_ok() {
            return Err(Error::InvalidInput(format!(
                "{} is {what} (it has {marker}), not this data directory's own segments \
                 directory: nothing was moved. Point segments/ elsewhere (or move that \
                 out), then start again",
                seg_dir.display()
            )));
        }
    }
    let rd = fs::read_dir(&seg_dir).map_err(|e| Error::io(&seg_dir, "list segments", e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(&seg_dir, "list segments", e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == super::LINKED_BY_FILE {
            continue; // which data directory links here, not a segment
        }
        let kind = classify(&name);
        if kind != Kind::Unknown {
            // A directory, FIFO or device under one of our names (an
            // operator's or a script's mistake) would fail to map with
            // "No such device", or block the open of a FIFO for ever.
            // The listing's own type (no stat per file at start-up); a
            // symlink is followed with one.
            let path = ent.path();
            let mut t = ent
                .file_type()
                .map_err(|e| Error::io(&path, "stat segment file", e))?;
            if t.is_symlink() {
                t = fs::metadata(&path)
                    .map_err(|e| Error::io(&path, "stat segment file", e))?
                    .file_type();
            }
            if !t.is_file() {
                return Err(Error::InvalidInput(format!(
                    "{}: a segment file's name, but not a regular file (a {}); tierindex \
                     never creates one: move it out of the data directory and start again",
                    path.display(),
                    crate::durable::file_kind(&t)
                )));
            }
        }
        files.push((kind, Arc::from(ent.path())));
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

    // The highest id of any file here: a later segment's file proves that
    // a lower active segment's creation had finished (they are created in
    // id order, each header durable before the next file is made).
    let max_file_id = files
        .iter()
        .filter_map(|(k, _)| match k {
            Kind::Sealed(id) | Kind::Active(id) | Kind::SealTmp(id) => Some(*id),
            Kind::Unknown => None,
        })
        .max();
    // The segment a flush last acknowledged entries of (`acked`): its file
    // gone, emptied, zeroed or short is a loss of acknowledged entries,
    // not a creation a crash cut short (helper-82 F1). Not once a start-up
    // has recorded that loss.
    let (ack_read, older_mark) = acked::read_both(dir.root())?;
    let ack_mark = match ack_read {
        acked::Read::Mark(m) => Some(m),
        acked::Read::None => None,
        acked::Read::Damaged(why) => {
            tracing::error!(
                "the acknowledged-segment mark is damaged ({why}): a newest active segment \
                 removed or zeroed since its entries were acknowledged cannot be told from one \
                 that never held any"
            );
            None
        }
    };
    let marked = ack_mark.filter(|m| m.judged());
    // The mark before it, of the segment frozen at the last roll whose
    // seal may not have finished (helper-92 F7): judged the same way.
    let older_mark = older_mark.filter(|_| marked.is_some());
    let marked_for = |id: SegmentId| {
        marked
            .filter(|m| m.segment == id)
            .or(older_mark.filter(|m| m.segment == id))
    };
    // Active segments that passed their check (files are sorted so every
    // `.active` is seen before any `.seg.tmp`).
    let mut accepted_actives: Vec<SegmentId> = Vec::new();
    // Item counts of valid sealed files, to compare with a same-id active.
    let mut sealed_counts: BTreeMap<SegmentId, (u64, Arc<Path>)> = BTreeMap::new();
    // Active files whose seal had finished (removed as leftovers).
    let mut superseded: Vec<u64> = Vec::new();

    // The whole-file checks read every byte of the files still to be
    // uploaded, and the structure checks of the others cost a few system
    // calls each: run them all on all cores at once (nothing else runs yet
    // at start-up); the decisions below stay sequential, in file order.
    let todo: Vec<(SegmentId, Arc<Path>, bool)> = files
        .iter()
        .filter_map(|(kind, path)| match kind {
            Kind::Sealed(id) => Some((*id, path.clone(), full_check(*id))),
            _ => None,
        })
        .collect();
    let full_ids: std::collections::BTreeSet<SegmentId> = todo
        .iter()
        .filter(|(_, _, full)| *full)
        .map(|(id, _, _)| *id)
        .collect();
    // In file order, as the loop below takes them.
    let mut prechecked = open_parallel(todo).into_iter().peekable();

    for (kind, path) in &files {
        match kind {
            Kind::Sealed(id) => {
                bump(*id, &mut out);
                if full_ids.contains(id) {
                    out.report.sealed_item_checked.push(id.0);
                }
                // Whole-body CRC-64 (every item for format 1) or the
                // structure; a failure is salvaged by item below.
                let opened = match prechecked.next_if(|(at, _)| at == id) {
                    Some((_, opened)) => opened,
                    None => SealedInfo::check(path, false),
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
                    Err(e @ Error::Corrupt { .. }) if store_holds(*id) => quarantine(
                        path,
                        format!(
                            "{e}; a damaged local copy of committed segment {id}: the journal \
                             records its object verified and committed, so the store holds every \
                             entry unless the object was removed since (`tierindex verify` checks \
                             it); not salvaged, so its entries are not committed twice; lookups \
                             read the store's copy, and this file is kept here"
                        ),
                        &mut out,
                    )?,
                    Err(e @ Error::Corrupt { .. }) => {
                        let deferred = mode == Mode::Repair && defer_salvage(*id);
                        let m = if deferred { Mode::CheckOnly } else { mode };
                        let note = salvage_sealed_file(dir, m, path, *id, &e.to_string())?;
                        if let Some(p) = &note.sealed_as {
                            let s = SealedInfo::of(&SealedSegment::open(Path::new(p))?);
                            sealed_counts.insert(*id, (s.footer().item_count, path.clone()));
                            out.report.sealed_ok.push(id.0);
                            out.sealed.insert(*id, s);
                        } else if m == Mode::CheckOnly && note.unknown_loss.is_none() {
                            sealed_counts.insert(*id, (note.salvaged_items, path.clone()));
                        }
                        let mut reason = format!("{e}; {}", note.line());
                        if deferred {
                            reason.push_str(&format!(
                                "; {DEFERRED}: its segment is journaled and not yet uploaded, and \
                                 only the broker's next start (`tierindex drain`, or the \
                                 embedding broker) appends its intact entries again after \
                                 salvaging it"
                            ));
                        }
                        out.report.quarantined.push(QuarantineNote {
                            file: path.display().to_string(),
                            reason,
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
                    // Unless a later segment's file exists: then its
                    // creation had finished, the zeros are damage, and it
                    // may have held acknowledged entries (its own sealed
                    // file, when there is one, holds them all: a leftover).
                    if let Some(m) = marked_for(*id)
                        && !sealed_counts.contains_key(id)
                    {
                        let why = "every byte is zero (or the file is empty), but a flush \
                                   acknowledged entries of this segment (ACKED_ACTIVE): the file \
                                   was emptied or zeroed after (damage), and the entries it held \
                                   are gone";
                        let note = acked_loss_note(path, &m, why);
                        quarantine_noted(dir, mode, path, why, note, &mut out)?;
                        continue;
                    }
                    if max_file_id.is_some_and(|m| m > *id) && !sealed_counts.contains_key(id) {
                        let why = "every byte is zero, but a later segment's file exists, so \
                                   its creation had finished: the file was zeroed after it was \
                                   written (damage), and any entry it held is gone";
                        let note = whole_file_loss(path, *id, "active", why);
                        quarantine_noted(dir, mode, path, why, note, &mut out)?;
                        continue;
                    }
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
                let (bytes, appended) = match read_bounded_active_noting(path, geometry) {
                    Ok(b) => b,
                    Err(e @ Error::Corrupt { .. }) => {
                        let note = whole_file_loss(path, *id, "active", &e.to_string());
                        quarantine_noted(dir, mode, path, &e.to_string(), note, &mut out)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let scan = match salvage::scan_active(&bytes, *id, geometry) {
                    Ok(mut s) => {
                        s.appended = appended;
                        s
                    }
                    Err(e @ Error::Corrupt { .. })
                        if marked_for(*id).is_none()
                            && bytes
                                .get(crate::segment::format::HEADER_LEN..)
                                .is_some_and(|rest| rest.iter().all(|b| *b == 0)) =>
                    {
                        // Only the header holds bytes: no item was ever
                        // written (a spare prepared ahead of a roll, say),
                        // so nothing is lost. Kept in quarantine all the
                        // same: the header's damage is the disk's.
                        quarantine(
                            path,
                            format!(
                                "{e}; every byte after the header is zero: no entry was ever \
                                 written to it, nothing is lost"
                            ),
                            &mut out,
                        )?;
                        continue;
                    }
                    Err(e @ Error::Corrupt { .. }) => {
                        let note = match marked_for(*id) {
                            Some(m) => acked_loss_note(path, &m, &e.to_string()),
                            None => whole_file_loss(path, *id, "active", &e.to_string()),
                        };
                        quarantine_noted(dir, mode, path, &e.to_string(), note, &mut out)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                drop(bytes);
                // A file of the marked id that is not the marked segment's
                // (a copy from another data directory or an earlier
                // incarnation of this one):
                // its items verify (their CRCs are salted with the id and
                // the index only), and holding as many it hid the loss of
                // every acknowledged entry (helper-92 F4). Kept aside
                // whole, never uploaded as this stream's.
                if let Some(m) = marked_for(*id)
                    && let Some(differs) = not_the_marked_file(&m, &scan)
                {
                    // Our seal of the segment finished (a kill -9 before it
                    // removed its source) and holds every acknowledged
                    // entry, or the journal records the segment (its checks
                    // account for it): the file is kept aside, nothing
                    // lost here (helper-95 F2).
                    let safe = if sealed_counts.get(id).is_some_and(|(c, _)| *c >= m.items) {
                        Some(format!(
                            "the sealed file of this id holds the {} acknowledged entries",
                            m.items
                        ))
                    } else {
                        journal_knows(*id).then(|| "the journal records this segment".to_string())
                    };
                    if let Some(safe) = safe {
                        quarantine(
                            path,
                            format!(
                                "{FOREIGN_ACTIVE} (ACKED_ACTIVE): {differs}; {safe}: nothing is \
                                 lost; this file is kept here, not uploaded"
                            ),
                            &mut out,
                        )?;
                        continue;
                    }
                    let why = foreign_file_why(&differs, path);
                    // The note says what, the reason also what to do.
                    let note = acked_loss_note(path, &m, &format!("{FOREIGN_ACTIVE}: {differs}"));
                    quarantine_noted(dir, mode, path, &why, note, &mut out)?;
                    continue;
                }
                let torn_note = (!scan.torn.is_empty()).then(|| LossNote {
                    segment: id.0,
                    file: path.display().to_string(),
                    kind: "active".into(),
                    salvaged_items: scan.items.len() as u64,
                    lost_items: scan.torn_items(),
                    lost: scan.torn.clone(),
                    unknown_loss: None,
                    header_rebuilt: false,
            tail_removed: None,
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
                // The loss record of a damaged tail goes with its copy, before
                // the tail is zeroed (a crash in between must not leave the
                // copy without it).
                let mut record_tail = |copy: &Path| -> Result<()> {
                    let Some(mut n) = torn_note.clone() else {
                        return Ok(());
                    };
                    n.original_moved_to = Some(copy.display().to_string());
                    write_record(
                        copy,
                        &QuarantineRecord {
                            original: path.display().to_string(),
                            moved_to: copy.display().to_string(),
                            reason: format!(
                                "damaged items after the last valid one of an active segment, \
                                 copied here before they were zeroed; {}",
                                n.line()
                            ),
                            at_ms: now_ms(),
                            loss: Some(n),
                        },
                    )
                };
                let checked = match mode {
                    Mode::Repair => ActiveSegment::open_noting(
                        path,
                        Some(&dir.quarantine_dir()),
                        geometry,
                        &mut record_tail,
                    )
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
                    // More than the one item a kill -9 mid-append can
                    // tear: damage, and the span was copied first with its
                    // record (`record_tail`), which keeps the loss in
                    // `status` and `quarantine list` (exit 4) after this
                    // start, as a salvage's does. A single torn item (what
                    // any crash may leave) is reported by this start only.
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
                // A directory is left where it is: tierindex never makes
                // one here, and moving one moved whatever it held, a
                // running host's streams and store among them (helper-75
                // F3, helper-76 F2, helper-77 F2: at any depth, a host
                // started before the directory above became a data
                // directory, a symlinked `segments/`).
                if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                    tracing::warn!(
                        path = %path.display(),
                        "a directory in segments/ is left in place (tierindex never creates \
                         one there): move it out of the data directory"
                    );
                    continue;
                }
                quarantine(path, "unknown file in segments/".to_string(), &mut out)?;
            }
        }
    }
    if let Some(m) = marked {
        let older = match older_mark {
            Some(o) => check_acked(dir, mode, &files, &sealed_counts, &o, journal_knows, &mut out)?,
            None => false,
        };
        let newest = check_acked(dir, mode, &files, &sealed_counts, &m, journal_knows, &mut out)?;
        // Flagged so that the next start does not record the loss again;
        // any write of the mark also overwrites the older one's slot.
        if mode == Mode::Repair && (newest || older) {
            let flags = if newest {
                m.flags | acked::FLAG_LOSS_RECORDED
            } else {
                m.flags
            };
            acked::MarkWriter::new(Some(m)).write(dir.root(), acked::AckedMark { flags, ..m })?;
        }
        bump(m.segment, &mut out);
    } else if let Some(m) = ack_mark {
        // Its id is never given out again either.
        bump(m.segment, &mut out);
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
/// read or allocated by a size the bytes themselves claim. A file longer
/// than its CRC-valid header gives is read up to that length only (see
/// [`read_bounded_active_noting`]).
pub(crate) fn read_bounded_active(path: &Path, geometry: Option<Geometry>) -> Result<Vec<u8>> {
    read_bounded_active_noting(path, geometry).map(|(b, _)| b)
}

/// [`read_bounded_active`], with how many bytes past the end the file's
/// CRC-valid header gives were left unread: bytes appended by something
/// else (`printf x >> NNN.active`) are not part of the segment, and
/// refusing the whole file for them left every intact entry in it
/// unaccounted for (helper-52). A file longer than the configured geometry
/// whose header does not decode is still refused: its real length is not
/// known.
pub(crate) fn read_bounded_active_noting(
    path: &Path,
    geometry: Option<Geometry>,
) -> Result<(Vec<u8>, u64)> {
    use crate::segment::format::{ACTIVE_ITEM_LEN, ACTIVE_MAGIC, ActiveLayout, HEADER_LEN, Header};
    use std::os::unix::fs::FileExt;
    let f = crate::durable::open_regular(path, false)
        .map_err(|e| Error::io(path, "open active segment", e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(path, "stat active segment", e))?
        .len();
    let mut hb = [0u8; HEADER_LEN];
    let got = f
        .read_at(&mut hb, 0)
        .map_err(|e| Error::io(path, "read active header", e))?;
    let from_header = Header::decode(&hb[..got], ACTIVE_MAGIC, ACTIVE_ITEM_LEN)
        .ok()
        .and_then(|h| ActiveLayout::new(h.slot_count, h.items).ok())
        .map(|l| l.file_len);
    if let Some(end) = from_header.filter(|end| len > *end) {
        return Ok((read_n(f, path, end, "read active segment")?, len - end));
    }
    let claimed = from_header.or_else(|| {
        geometry
            .and_then(|g| ActiveLayout::new(g.slot_count, g.item_capacity).ok())
            .map(|l| l.file_len)
    });
    match claimed {
        Some(max) if len > max => Err(Error::corrupt(
            path.display().to_string(),
            format!("{len} bytes, longer than the {max} its layout implies"),
        )),
        None => Err(Error::corrupt(
            path.display().to_string(),
            "header does not decode and no geometry is configured to rebuild it",
        )),
        Some(_) => fs::read(path)
            .map(|b| (b, 0))
            .map_err(|e| Error::io(path, "read active segment", e)),
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
        unknown_loss: Some(if kind == "active" {
            format!(
                "no item could be located ({why}): every entry of this file is unaccounted for, \
                 unless it was written with another geometry: set slot_count and segment_items \
                 to those it was written with and run `tierindex quarantine retry` on the file"
            )
        } else {
            format!("no item could be located ({why}): every entry of this file is unaccounted for")
        }),
        header_rebuilt: false,
            tail_removed: None,
        sealed_as: None,
        original_moved_to: None,
    }
}

/// The loss note of the segment the acknowledged-segment mark names,
/// whose file is gone, emptied, zeroed or unreadable.
pub(crate) fn acked_loss_note(path: &Path, m: &acked::AckedMark, why: &str) -> LossNote {
    LossNote {
        segment: m.segment.0,
        file: path.display().to_string(),
        kind: "active".into(),
        salvaged_items: 0,
        lost_items: m.items,
        lost: Vec::new(),
        unknown_loss: Some(format!(
            "{why}: a flush acknowledged {} of its entries (the first at offset {}), so at least \
             that many are LOST, and any acknowledged after that flush too (not counted)",
            m.items,
            offset_text(m.first_offset)
        )),
        header_rebuilt: false,
        tail_removed: None,
        sealed_as: None,
        original_moved_to: None,
    }
}

/// How the reason of a quarantined active file that is not the marked
/// segment's begins: `quarantine retry` refuses to put such a file back
/// (its entries are not this stream's; helper-95 F1: put back, it was
/// sealed and uploaded as ours and the loss record was gone).
pub const FOREIGN_ACTIVE: &str = "this file is not the segment a flush acknowledged entries of";

/// The reason given for an active file of the marked id that is not the
/// marked segment's (`differs`: [`not_the_marked_file`]).
pub(crate) fn foreign_file_why(differs: &str, path: &Path) -> String {
    format!(
        "{FOREIGN_ACTIVE} (ACKED_ACTIVE): {differs}; a file of the same id from another data \
         directory or an earlier incarnation of this one (an older copy of this segment's own \
         file is not told apart so: only by its count); its entries are kept here, not \
         uploaded; if the segment's own file is elsewhere (a backup), put it back as {p} and \
         start again; if this file is this directory's own and ACKED_ACTIVE was copied in \
         from elsewhere, move ACKED_ACTIVE out of the data directory, put this file back as \
         {p} and start again",
        p = path.display()
    )
}

/// Why an active file of the marked id is not the file the mark was
/// written for: its header's creation time or its first entry's offset
/// differs from the mark's (each compared only when both are known: a
/// rebuilt header has no time, a damaged first item no offset, a mark from
/// an older build no time).
pub(crate) fn not_the_marked_file(m: &acked::AckedMark, scan: &salvage::ActiveScan) -> Option<String> {
    if let Some(c) = scan.created_ms.filter(|c| m.created_ms != 0 && *c != m.created_ms) {
        return Some(format!(
            "its header says it was created at {c} ms (Unix time), the marked segment's at {} ms",
            m.created_ms
        ));
    }
    match scan.items.first() {
        Some((0, e)) if m.first_offset != u64::MAX && e.offset != m.first_offset => Some(format!(
            "its first entry's offset is {}, the marked segment's was {}",
            e.offset, m.first_offset
        )),
        _ => None,
    }
}

fn offset_text(o: u64) -> String {
    if o == u64::MAX {
        "unknown".into()
    } else {
        o.to_string()
    }
}

/// After the files are checked: the segment the acknowledged-segment
/// mark names has no file at all (and the journal never recorded it), or
/// its files account for fewer items than a flush acknowledged. Both are
/// losses of acknowledged entries: reported by number and, in `Repair`
/// mode, recorded in `quarantine/` (a record with no file: it keeps
/// `status`, `fsck` and `drain` at exit 4 until an operator moves it
/// away). Returns whether the mark is to be flagged (by the caller), so
/// that the next start does not record it again.
///
/// The files account for the most items any one of them holds or
/// reported: the active file's valid items, a sealed file's count, a loss
/// note's salvaged plus counted lost items. A loss the checks above
/// already reported (a torn span, a salvage, a quarantined file) counts
/// only what it counted: a file both torn and cut short is reported for
/// both, the shortfall in a note of its own. Loss records an earlier start
/// wrote for the segment count too (helper-92 F2: a start killed between
/// its record and the flag recorded the loss twice at the next).
///
/// A torn span below the mark's count is acknowledged entries damaged, not
/// a tear a kill -9 may leave (the flush that wrote the mark made them
/// durable): its note, reported by this start only, is recorded too
/// (helper-92 F3). A segment the journal records with no active file left
/// is the journal's and the sealed file's checks' to account for (a
/// committed copy quarantined because the store holds it: helper-92 F1).
fn check_acked(
    dir: &DataDir,
    mode: Mode,
    files: &[(Kind, Arc<Path>)],
    sealed_counts: &BTreeMap<SegmentId, (u64, Arc<Path>)>,
    m: &acked::AckedMark,
    journal_knows: &dyn Fn(SegmentId) -> bool,
    out: &mut Recovered,
) -> Result<bool> {
    let n = m.segment;
    let path = dir.segments_dir().join(active::active_file_name(n));
    let notes: Vec<LossNote> = out
        .report
        .salvaged
        .iter()
        .filter(|s| s.segment == n.0)
        .cloned()
        .collect();
    let mut flag = false;
    for note in &notes {
        if !note.is_loss() {
            continue;
        }
        if note.original_moved_to.is_some() {
            flag = true;
        } else if mode == Mode::Repair
            && note.kind == "active"
            && note.lost.iter().any(|s| u64::from(s.first_index) < m.items)
        {
            let dst = quarantine_name(dir, &path);
            write_record(
                &dst,
                &QuarantineRecord {
                    original: path.display().to_string(),
                    moved_to: dst.display().to_string(),
                    reason: "items a flush acknowledged (ACKED_ACTIVE) do not verify: damage, not \
                             a tear a crash may leave (no file was moved: this record alone keeps \
                             the loss reported; move it out of quarantine/ once the loss is dealt \
                             with)"
                        .into(),
                    at_ms: now_ms(),
                    loss: Some(note.clone()),
                },
            )?;
            flag = true;
        }
    }
    let has_file = files
        .iter()
        .any(|(k, _)| matches!(k, Kind::Sealed(i) | Kind::Active(i) if *i == n));
    let has_active = files
        .iter()
        .any(|(k, _)| matches!(k, Kind::Active(i) if *i == n));
    let (accounted, kept, why) = if notes.is_empty() && !has_file {
        if journal_knows(n) {
            return Ok(flag);
        }
        (
            0,
            0,
            "its file is gone from segments/ (removed, or lost with the disk), and the journal \
             never recorded it sealed",
        )
    } else {
        if !has_active && journal_knows(n) {
            return Ok(flag);
        }
        let actives = || {
            out.report
                .actives
                .iter()
                .filter(|a| a.id == n.0)
                .map(|a| u64::from(a.valid_items))
        };
        let sealed = sealed_counts.get(&n).map(|(c, _)| *c);
        let accounted = notes
            .iter()
            .map(|s| s.salvaged_items.saturating_add(s.lost_items))
            .chain(actives())
            .chain(sealed)
            .max()
            .unwrap_or(0);
        let kept = notes
            .iter()
            .map(|s| s.salvaged_items)
            .chain(actives())
            .chain(sealed)
            .max()
            .unwrap_or(0);
        (accounted, kept, "")
    };
    if accounted >= m.items {
        return Ok(flag);
    }
    // Records an earlier start wrote for this segment (ids are never given
    // out again: every record naming it is about it): the most items any
    // kept, plus every item they counted lost.
    // Only records written since the mark was last written (its file's
    // mtime): one from before the writer marked the segment again (it
    // was kept as the active one after an earlier loss) was judged
    // against an older count (helper-93 F1: credited against the new
    // mark, a second loss was under-counted). Unknown mtime: none
    // credited (a loss recorded twice, never one hidden). Strictly after,
    // in ms: a record in the same ms as a mark written again is taken as
    // older (the same ms as the mark a killed start found cannot happen:
    // a restart lies between).
    let since = std::fs::metadata(acked::path(dir.root()))
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| d.as_millis() as u64);
    let (prior_kept, prior_lost) = crate::datadir::quarantine_records(dir.root())
        .into_iter()
        .filter(|(_, r)| r.at_ms > since)
        .filter_map(|(_, r)| r.loss)
        .filter(|l| l.segment == n.0 && l.is_loss())
        .fold((0u64, 0u64), |(k, l), note| {
            (k.max(note.salvaged_items), l.saturating_add(note.lost_items))
        });
    let accounted = accounted.max(prior_kept.saturating_add(prior_lost));
    if accounted >= m.items {
        tracing::warn!(
            segment = n.0,
            "the loss of acknowledged entries of this segment was recorded in quarantine/ by an \
             earlier start (not recorded again)"
        );
        return Ok(true);
    }
    let mut note = if has_file || !notes.is_empty() {
        let also = if notes.iter().any(|s| s.is_loss()) || prior_lost > 0 {
            ", beyond the loss reported for it above"
        } else {
            ""
        };
        LossNote {
            segment: n.0,
            file: path.display().to_string(),
            kind: "active".into(),
            salvaged_items: kept,
            lost_items: m.items - accounted,
            lost: Vec::new(),
            unknown_loss: Some(format!(
                "a flush acknowledged {} entries of this segment (ACKED_ACTIVE), but its files \
                 account for {accounted}: the file was cut or zeroed after (damage), and at \
                 least {} are LOST{also}",
                m.items,
                m.items - accounted
            )),
            header_rebuilt: false,
            tail_removed: None,
            sealed_as: None,
            original_moved_to: None,
        }
    } else {
        let mut note = acked_loss_note(&path, m, why);
        note.lost_items = m.items - accounted;
        note
    };
    let reason = if has_file || !notes.is_empty() {
        "the active segment holds fewer entries than a flush acknowledged"
    } else {
        "the active segment's file is gone"
    };
    tracing::error!("acknowledged entries lost: {}", note.line());
    if mode == Mode::Repair {
        let dst = quarantine_name(dir, &path);
        note.original_moved_to = None;
        write_record(
            &dst,
            &QuarantineRecord {
                original: path.display().to_string(),
                moved_to: dst.display().to_string(),
                reason: format!(
                    "{reason} (no file was moved: this record alone keeps the loss reported; \
                     move it out of quarantine/ once the loss is dealt with)"
                ),
                at_ms: now_ms(),
                loss: Some(note.clone()),
            },
        )?;
    }
    out.report.salvaged.push(note);
    Ok(true)
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
    sealed_counts: &mut BTreeMap<SegmentId, (u64, Arc<Path>)>,
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
            let counted = if scan.flush_mark.is_some_and(|m| scan.layout.item_offset(m) as u64 > t) {
                " beyond the flush mark's count"
            } else {
                ""
            };
            format!(
                "file cut to {t} of {} bytes: items past byte {t}{counted} are unaccounted for",
                scan.layout.file_len
            )
        }),
        header_rebuilt: scan.header_rebuilt,
        tail_removed: None,
        sealed_as: None,
        original_moved_to: None,
    };
    let mut why = format!("damaged active segment salvaged by item: {}", note.line());
    if scan.appended > 0 {
        why.push_str(&format!(
            "; {} byte(s) after the end its header gives were not part of the segment \
             (appended by something else: kept with the original)",
            scan.appended
        ));
    }
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
                sealed_counts.insert(id, (s.footer().item_count, Arc::from(p.as_path())));
                out.report.sealed_ok.push(id.0);
                out.sealed.insert(id, s);
                note.sealed_as = Some(p.display().to_string());
            } else if n > 0 {
                sealed_counts.insert(id, (n, Arc::from(path)));
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
    let len = fs::metadata(path)
        .map_err(|e| Error::io(path, "stat sealed segment", e))?
        .len();
    if let Some(note) = cut_appended_tail(dir, mode, path, id, len, why)? {
        return Ok(note);
    }
    // Bounded (a sparse 1 TiB file ran start-up out of memory here): past
    // the largest layout only the length the header gives is read, and
    // without one the file is quarantined whole below, unread.
    let (bytes, read) = match read_sealed_bounded(path, id) {
        Ok(bytes) => {
            let r = salvage::salvage_sealed(&bytes, id);
            (bytes, r)
        }
        Err(e @ Error::Corrupt { .. }) => (Vec::new(), Err(e)),
        Err(e) => return Err(e),
    };
    let mut note = match read {
        Ok(s) => LossNote {
            segment: id.0,
            file: path.display().to_string(),
            kind: "sealed".into(),
            salvaged_items: s.entries.len() as u64,
            lost_items: s.lost_items(),
            lost: s.lost.clone(),
            unknown_loss: None,
            header_rebuilt: false,
            tail_removed: None,
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
    // Kept first: until the rename below, the original stays in place, so
    // a crash in between redoes the salvage at the next start.
    let copy = link_to_quarantine(dir, path)?;
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
        let (p, _) = write_sealed_at(
            &dir.segments_dir(),
            id,
            (s.created_ms, now_ms()),
            s.slot_count.min(1 << 20),
            &packed,
            PACKED_ENTRY_LEN,
            true,
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

/// A sealed file's bytes for salvage, bounded: the length its header
/// gives when the header decodes and the file is at least that long
/// (bytes after it are not part of the segment: a file extended by
/// gigabytes is not read whole), else the whole file when it is no longer
/// than any sealed segment can be; a longer file whose header gives no
/// such length is `Corrupt`, unread.
pub(crate) fn read_sealed_bounded(path: &Path, id: SegmentId) -> Result<Vec<u8>> {
    let max = crate::segment::format::max_sealed_len();
    let len = fs::metadata(path)
        .map_err(|e| Error::io(path, "stat sealed segment", e))?
        .len();
    let n = match header_file_len(path, id)?.filter(|n| *n <= max && *n <= len) {
        Some(n) => n,
        None if len <= max => len,
        None => {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("{len} bytes, longer than any sealed segment ({max})"),
            ));
        }
    };
    read_prefix(path, n)
}

/// The first `n` bytes of `path` (bounded by the caller). Memory the
/// machine cannot give is an error, not an abort.
fn read_prefix(path: &Path, n: u64) -> Result<Vec<u8>> {
    let f = crate::durable::open_regular(path, false)
        .map_err(|e| Error::io(path, "open sealed segment", e))?;
    read_n(f, path, n, "read sealed segment")
}

/// The first `n` bytes of the open file `f` (at `path`), the memory
/// reserved first: what the machine cannot give is an error, not an abort.
fn read_n(f: fs::File, path: &Path, n: u64, what: &'static str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(usize::try_from(n).unwrap_or(usize::MAX))
        .map_err(|e| Error::io(path, what, std::io::Error::other(e)))?;
    f.take(n)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, what, e))?;
    Ok(buf)
}

/// The file length a sealed file's header gives, when the header decodes
/// and names segment `id`.
fn header_file_len(path: &Path, id: SegmentId) -> Result<Option<u64>> {
    use crate::segment::format::{self, HEADER_LEN, Header, SEALED_ITEM_LEN, SEALED_MAGIC};
    let head = read_prefix(path, HEADER_LEN as u64)?;
    Ok(Header::decode(&head, SEALED_MAGIC, SEALED_ITEM_LEN)
        .ok()
        .filter(|h| {
            h.segment_id == id && h.slot_count <= format::MAX_SLOTS && h.items <= format::MAX_ITEMS
        })
        .map(|h| format::SealedLayout::new(h.slot_count, h.items).file_len))
}

/// A sealed file with bytes appended after its footer (`truncate -s`, a
/// copy tool padding to a block, a filesystem repair) still holds the
/// whole segment: its header gives the length it was sealed with, and the
/// whole-file checksum over that prefix sees every byte and its position.
/// When it passes, the file is cut back to that length (the original kept
/// in `quarantine/`): the same bytes, the same checksum, nothing lost.
/// `None` when the header does not give a shorter length that checks; the
/// caller salvages item by item.
fn cut_appended_tail(
    dir: &DataDir,
    mode: Mode,
    path: &Path,
    id: SegmentId,
    len: u64,
    why: &str,
) -> Result<Option<LossNote>> {
    use crate::segment::format;
    if len < format::HEADER_LEN as u64 {
        return Ok(None);
    }
    let Some(sealed_len) = header_file_len(path, id)? else {
        return Ok(None);
    };
    if sealed_len >= len {
        return Ok(None);
    }
    let file = crate::durable::open_regular(path, false)
        .map_err(|e| Error::io(path, "open sealed segment", e))?;
    // Mapped, not read: the prefix checked below may be gigabytes; only it
    // is mapped, and the tail past it is never touched (a sparse terabyte
    // costs nothing). `sealed_len` is at most the largest layout.
    // SAFETY: this process holds the data directory lock and nothing else
    // writes segment files; the map is dropped before the file is replaced.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(sealed_len as usize)
            .map(&file)
    }
    .map_err(|e| Error::io(path, "mmap sealed segment", e))?;
    if (map.len() as u64) < sealed_len {
        return Ok(None);
    }
    let prefix = &map[..sealed_len as usize];
    let footer = match format::check_sealed_sums(prefix) {
        Ok((f, _)) if f.segment_id == id && f.file_len == sealed_len => f,
        _ => return Ok(None),
    };
    let mut note = LossNote {
        segment: id.0,
        file: path.display().to_string(),
        kind: "sealed".into(),
        salvaged_items: footer.item_count,
        lost_items: 0,
        lost: Vec::new(),
        unknown_loss: None,
        header_rebuilt: false,
        tail_removed: Some(len - sealed_len),
        sealed_as: None,
        original_moved_to: None,
    };
    if mode == Mode::CheckOnly {
        return Ok(Some(note));
    }
    // Kept first: until the rename below, the original stays in place, so
    // a crash in between cuts it again at the next start.
    let copy = link_to_quarantine(dir, path)?;
    note.original_moved_to = Some(copy.display().to_string());
    note.sealed_as = Some(path.display().to_string());
    write_record(
        &copy,
        &QuarantineRecord {
            original: path.display().to_string(),
            moved_to: copy.display().to_string(),
            reason: format!("{why}; {}", note.line()),
            at_ms: now_ms(),
            loss: Some(note.clone()),
        },
    )?;
    let seg_dir = dir.segments_dir();
    let tmp = seg_dir.join(crate::segment::sealed::sealed_tmp_name(id));
    crate::durable::write_file(&tmp, prefix)
        .map_err(|e| Error::io(&tmp, "write sealed segment cut to its length", e))?;
    drop(map);
    fsync_path(&tmp)?;
    crate::durable::rename(&tmp, path)
        .map_err(|e| Error::io(path, "rename sealed segment cut to its length", e))?;
    fsync_dir(&seg_dir)?;
    tracing::warn!(segment = id.0, "{}", note.line());
    Ok(Some(note))
}

/// Durable copy of `path` into `quarantine/` under a unique name.
fn copy_to_quarantine(dir: &DataDir, path: &Path) -> Result<PathBuf> {
    let dst = quarantine_name(dir, path);
    fs::copy(path, &dst).map_err(|e| Error::io(&dst, "copy damaged file to quarantine", e))?;
    crate::durable::created(&dst);
    crate::durable::written(&dst);
    fsync_path(&dst)?;
    fsync_dir(&dir.quarantine_dir())?;
    Ok(dst)
}

/// [`copy_to_quarantine`] for a file that is only ever replaced, never
/// written in place (a sealed file): a hard link, so keeping a file with a
/// huge (or sparse) tail costs no space; a copy where links fail (another
/// file system).
fn link_to_quarantine(dir: &DataDir, path: &Path) -> Result<PathBuf> {
    // A link made by a start that crashed before writing its record: that
    // one is kept (and recorded by the caller), not a second beside it.
    if let Some(found) = linked_in_quarantine(dir, path) {
        fsync_path(&found)?;
        fsync_dir(&dir.quarantine_dir())?;
        return Ok(found);
    }
    let dst = quarantine_name(dir, path);
    if let Err(e) = fs::hard_link(path, &dst) {
        // A copy only of what a sealed file can hold: a longer one (a
        // sparse tail) would fill the disk.
        let max = crate::segment::format::max_sealed_len();
        let len = fs::metadata(path)
            .map_err(|e| Error::io(path, "stat sealed segment", e))?
            .len();
        if len > max {
            return Err(Error::io(
                &dst,
                "keep a damaged sealed file in quarantine/: a hard link failed, and the file is \
                 longer than any sealed segment, too long to copy (put quarantine/ on the data \
                 directory's file system)",
                e,
            ));
        }
        return copy_to_quarantine(dir, path);
    }
    crate::durable::created(&dst);
    crate::durable::written(&dst);
    fsync_path(&dst)?;
    fsync_dir(&dir.quarantine_dir())?;
    Ok(dst)
}

/// An entry of `quarantine/` named after `path` (`{name}.*`) that is a
/// hard link to the same file.
fn linked_in_quarantine(dir: &DataDir, path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(path).ok()?;
    let prefix = format!("{}.", path.file_name()?.to_string_lossy());
    fs::read_dir(dir.quarantine_dir())
        .ok()?
        .flatten()
        .find_map(|e| {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                return None;
            }
            let em = e.metadata().ok()?;
            (em.is_file() && em.dev() == m.dev() && em.ino() == m.ino()).then(|| e.path())
        })
}

/// A name in `quarantine/` for `path` that is not taken.
fn quarantine_name(dir: &DataDir, path: &Path) -> PathBuf {
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
    dst
}

/// True when `path` is empty or holds only zero bytes.
fn all_zero(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = crate::durable::open_regular(path, false)
        .map_err(|e| Error::io(path, "open active segment", e))?;
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
