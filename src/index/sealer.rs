//! The sealer thread's side: its queue (a spare's preparation at the
//! front, seals at the back), what it sends back, the durable seal of a
//! frozen segment and the pair check that reads it back.

use super::*;
use crate::lanes::{Lane, SEALERS};

/// Work for the sealer thread.
pub(super) enum Job {
    /// Seal a frozen segment.
    Seal(Arc<ActiveSegment>),
    /// Create (allocate, fsync, map, prefault) the next active segment
    /// ahead of the roll that needs it, so that the append which rolls
    /// only swaps it in; its first stretch of items brought into the page
    /// cache is this many bytes (see [`ActiveSegment::prefault`]).
    /// Created only while the claim (the writer's `spare_claim`) names
    /// the id, and under its lock.
    Prepare(SegmentId, usize, Arc<std::sync::Mutex<Option<SegmentId>>>),
    /// Allocate a stretch of the active segment's file (up to the byte
    /// given), then populate it in the map (address, length), ahead of the
    /// appends ([`ActiveSegment::prefault_due`],
    /// [`ActiveSegment::lead_for_writing`],
    /// [`crate::segment::active::populate`]), for writing when the flag
    /// says so.
    Prefault(usize, usize, Arc<crate::segment::active::Allocation>, u64, bool),
    /// Drop a sealed segment's frozen mapping here, not under the writer
    /// lock: its file is already unlinked, so the last reference frees the
    /// whole preallocated file (measured at 10-15 ms for 8 MB on ext4,
    /// which every append waited for).
    Retire(Arc<ActiveSegment>),
    /// Tests: stop the thread until the sender sends or is dropped, so
    /// that what is queued behind it waits.
    #[cfg(test)]
    Hold(mpsc::Receiver<()>),
}

/// The writer's sealer lane (on the process's shared sealer threads, see
/// [`crate::lanes`]): a spare's preparation goes to the front (the next
/// roll waits for it), seals to the back. Closing lets the lane finish
/// what is queued and end; clones share it.
#[derive(Clone)]
pub(super) struct Jobs(Lane<Job>);

impl Jobs {
    /// Queue `job`; `false`: the lane is closed or ended (a panic).
    pub(super) fn push(&self, job: Job) -> bool {
        match job {
            Job::Prepare(..) | Job::Prefault(..) => self.0.push_front(job).is_ok(),
            _ => self.0.push(job).is_ok(),
        }
    }
    pub(super) fn close(&self) {
        self.0.close();
    }
    /// Closed and done, or ended by a panic.
    pub(super) fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
    /// Wait up to `limit` until finished; `None`: not finished by then;
    /// `Some(Err(()))`: a job panicked.
    pub(super) fn join_timeout(&self, limit: Duration) -> Option<std::result::Result<(), ()>> {
        self.0.join_timeout(limit)
    }
}

/// What the sealer thread sends back.
pub(super) enum Done {
    Sealed(SealDone),
    Prepared(SegmentId, Result<ActiveSegment>),
}

pub(super) struct SealDone {
    pub(super) id: SegmentId,
    /// The sealed file's metadata; the file itself, opened with every
    /// check, is already in the writer's sealed set.
    pub(super) result: Result<SealedMeta>,
}

/// Pair check, on the sealer thread (never under the writer's lock: it
/// reads and checksums the whole file): open what was just written with
/// every check and compare it with what was meant to be written.
pub(super) fn read_back(
    seg_dir: &Path,
    id: SegmentId,
    meta: SealedMeta,
) -> Result<(SealedMeta, SealedSegment)> {
    let path = seg_dir.join(sealed_file_name(id));
    let sealed = SealedSegment::open(&path).map_err(|e| {
        Error::corrupt(
            path.display().to_string(),
            format!("sealed segment {id} does not read back: {e}"),
        )
    })?;
    if sealed.meta() != meta {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("sealed segment {id} reads back different from what was written"),
        ));
    }
    Ok((meta, sealed))
}

/// Write the sealed file of a frozen active segment durably (tmp, fsync,
/// rename, dir fsync), reading its items straight from the mapping.
pub fn seal_to_file(seg_dir: &Path, seg: &ActiveSegment) -> Result<SealedMeta> {
    let (_path, meta) = write_sealed_streaming(
        seg_dir,
        seg.id(),
        seg.created_ms(),
        now_ms(),
        seg.slot_count(),
        seg.item_bytes(),
        ACTIVE_ITEM_LEN,
    )?;
    debug_assert_eq!(meta.item_count, u64::from(seg.len()));
    Ok(meta)
}

/// Seal one frozen active segment durably and remove its source.
pub fn seal_segment(seg_dir: &Path, seg: &ActiveSegment) -> Result<SealedMeta> {
    let meta = seal_to_file(seg_dir, seg)?;
    crate::durable::at("seal.remove_active")
        .unlink(seg.path())
        .map_err(|e| Error::io(seg.path(), "remove sealed source", e))?;
    fsync_dir_at("seal.remove_active.dirsync", seg_dir)?;
    Ok(meta)
}

/// Start the sealer lane: it runs its jobs until closed and done (sending
/// each outcome to `done`, waking `notify` after each seal), and holds the
/// data directory's lock (`lock`) until it ends, so the directory is not
/// reopened while a seal may still write to it. A failed seal poisons the
/// writer (`poison`). A sealed segment goes into `sealed` here, with its
/// slot summary computed (a read of the whole slot table), so that none of
/// a seal's work runs under the writer's lock; its metadata goes into
/// `handoff`, where the pipeline's worker takes it without that lock.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    done_tx: mpsc::Sender<Done>,
    handoff: Arc<super::Handoff>,
    thread_dir: PathBuf,
    (slots, items): (u32, u32),
    poison: Arc<Poison>,
    notify: Arc<Mutex<Option<SealNotify>>>,
    lock: Arc<DataDir>,
    sealed: Arc<LocalSealed>,
) -> Result<Jobs> {
    let mut run = move |job: Job| {
        let _lock = &lock;
        let seg = match job {
            Job::Seal(seg) => seg,
            Job::Retire(seg) => {
                drop(seg);
                return;
            }
            #[cfg(test)]
            Job::Hold(rx) => {
                let _ = rx.recv();
                return;
            }
            Job::Prefault(addr, len, alloc, to, write) => {
                // Not allocated: not populated either (the appends allocate,
                // or are refused, themselves: an append's write fault on a
                // hole on a full disk would be a SIGBUS). Only while the
                // segment is still mapped (one dropped on the writer's
                // thread meanwhile, as a close does, is not).
                match alloc.extend_to(to) {
                    Ok(()) => alloc.populate_mapped(addr, len, write),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "allocating a stretch of an active segment ahead of its appends failed; \
                         the appends allocate it themselves"
                    ),
                }
                return;
            }
            Job::Prepare(id, ahead, claim) => {
                let claimed = claim.lock().unwrap_or_else(|p| p.into_inner());
                if *claimed != Some(id) {
                    // The writer gave up on it and created a later segment
                    // itself: creating this one now would put a file below
                    // it (nobody waits for it).
                    return;
                }
                let r = ActiveSegment::create(&thread_dir, id, slots, items, now_ms());
                drop(claimed);
                let r = r.map(|mut seg| {
                    seg.prefault(ahead);
                    seg
                });
                let _ = done_tx.send(Done::Prepared(id, r));
                return;
            }
        };
        let span = tracing::info_span!("seal", segment = seg.id().0);
        // A pool thread, no `.await`: entering is sound here.
        #[allow(clippy::disallowed_methods)]
        let _g = span.enter();
        let started = Instant::now();
        // Its pages' writeback failed: sealing them now would be a
        // second try through another file. Left as `.active` for
        // the next start's recovery (the writer is poisoned).
        let result = if seg.sync_failed() {
            Err(Error::Poisoned(format!(
                "segment {} not sealed: an msync of its active file failed; the next \
                 start recovers it",
                seg.id()
            )))
        } else if let Err(why) = poison.check() {
            // An earlier seal failed (or the writer is poisoned otherwise):
            // this later segment is left as `.active` too, for the next
            // start, which seals them all in id order. Sealed now, it would
            // be journaled above the failed one, whose id the journal could
            // then never take: its acknowledged entries would never be
            // uploaded (helper-63: a full disk failed segment 2841's seal,
            // 2842 and 2843 were sealed and journaled, and 2841 ended
            // "NOT JOURNALED").
            Err(Error::Poisoned(format!(
                "segment {} not sealed: the writer is poisoned ({why}); the next start seals \
                 it",
                seg.id()
            )))
        } else {
            Ok(())
        };
        let result = result
            .and_then(|()| seal_segment(&thread_dir, &seg))
            .and_then(|meta| read_back(&thread_dir, seg.id(), meta))
            .map(|(meta, file)| {
                // Its items are durable in the sealed file: a
                // flush need not msync the frozen copy any more.
                seg.mark_durable();
                sealed.insert(file);
                // Before `Done` is sent and the worker woken: whoever the
                // seal wakes finds its metadata.
                handoff.push_meta(meta.clone());
                meta
            });
        match &result {
            Ok(m) => tracing::info!(
                items = m.item_count,
                bytes = m.file_len,
                ms = started.elapsed().as_millis() as u64,
                "sealed"
            ),
            Err(e) => {
                tracing::error!(error = %e, "seal failed; writer poisoned");
                poison.set(format!("sealing segment {} failed: {e}", seg.id()));
            }
        }
        let _ = done_tx.send(Done::Sealed(SealDone {
            id: seg.id(),
            result,
        }));
        let n = notify.lock().ok().and_then(|n| n.clone());
        if let Some(n) = n {
            n();
        }
    };
    Lane::new(&SEALERS, false, move |jobs: Vec<Job>| jobs.into_iter().for_each(&mut run)).map(Jobs)
}
