//! Copying a resealed segment's entries in (`pipeline::reseal`): into the
//! active segment, or, on a closed writer, into fresh segments sealed on
//! the spot; entries already held are counted off, never doubled.

use super::*;

impl IndexWriter {
    /// Copy `entries` (those of a segment being resealed, see
    /// `pipeline::reseal`) into the active segment and, when it fills, the
    /// ones after it; then flush. Entries already held by a local segment
    /// at or above `since` are skipped: the copy a crash cut short is
    /// finished, never doubled. `before_copy(into)` runs first, with the id
    /// of the segment the copy starts in (the caller journals it, so that
    /// it is durable before any copied entry is). The active segment is
    /// rolled first when it is below `min_id` (the current epoch's id
    /// floor), and new ids continue at `min_id` or above.
    ///
    /// A closed writer (a shutdown drain, `tierindex drain`) accepts no
    /// appends, but its drain must still be able to reseal: the copies go
    /// into fresh segments (from `min_id` or the next id on), each sealed
    /// here, on the caller's thread, when it fills and at the end. Their
    /// metadata waits in [`poll_sealed`](Self::poll_sealed) for the caller
    /// to journal, so the same drain uploads them.
    ///
    /// The caller holds the writer for the whole call, so no append lands
    /// between the copies. A segment the copy fills rolls and is sealed by
    /// the sealer thread meanwhile, and the pipeline's worker may journal
    /// it (and upload and commit it) before the reseal journals its end:
    /// its local copy stays while the reseal is unfinished
    /// (`pipeline::reseal::blocks_release`), so a restart still counts
    /// what it holds and copies nothing twice.
    /// Returns `(into, copied)`.
    pub fn copy_in(
        &mut self,
        entries: &[Entry],
        since: Option<SegmentId>,
        min_id: SegmentId,
        before_copy: impl FnOnce(SegmentId) -> Result<()>,
    ) -> Result<(SegmentId, u64)> {
        // Lookups reading the sealed segments off this writer's lock learn
        // that entries moved, and redo their lookup under the lock.
        self.sealed.note_reseal();
        if self.closed {
            return self.copy_in_closed(entries, since, min_id, before_copy);
        }
        self.raise_next_id(min_id)?;
        let below = self.active.as_ref().is_none_or(|a| a.id() < min_id);
        if below {
            self.roll()?;
            if self.active.as_ref().is_some_and(|a| a.id() < min_id) {
                // It was empty (roll kept it): replace it.
                self.raise_next_id(min_id)?;
            }
        }
        let into = self.active_id().ok_or(Error::ShutDown)?;
        let mut held = self.held_from(since)?;
        before_copy(into)?;
        let mut copied = 0u64;
        let mut copy = || -> Result<()> {
            for e in entries {
                if take_held(&mut held, e) {
                    continue;
                }
                self.append_entry(*e)?;
                copied += 1;
            }
            // Syncs the segments rolled over on the way too.
            self.flush()
        };
        // Cut short after the caller journaled the start: the rest is
        // finished at the next open, which must find every segment from
        // `into` on as this process leaves it. So nothing more is appended
        // here (the pipeline also keeps those segments' local copies, see
        // `pipeline::reseal::blocks_release`).
        if let Err(e) = copy() {
            self.poison
                .set(format!("copying a resealed segment's entries failed: {e}"));
            return Err(e);
        }
        Ok((into, copied))
    }

    /// How many copies of each entry the local segments from `since` on
    /// hold (a count, not a set: a segment may hold one entry twice).
    fn held_from(&self, since: Option<SegmentId>) -> Result<HashMap<EntryKey, u32>> {
        let Some(since) = since else {
            return Ok(HashMap::new());
        };
        let mut sealed = Vec::new();
        for id in self.sealed.ids_from(since) {
            // Sealed by the sealer thread but not collected yet: still
            // frozen, and counted once, below.
            if self.frozen.contains_key(&id) {
                continue;
            }
            let seg = self
                .sealed
                .get(id)?
                .ok_or_else(|| Error::Internal(format!("local sealed segment {id} vanished")))?;
            sealed.extend(seg.entries());
        }
        let open = self
            .frozen
            .range(since..)
            .map(|(_, f)| f.as_ref())
            .chain(self.active.as_ref())
            .filter(|a| a.id() >= since)
            .flat_map(|a| a.entries().into_iter());
        let mut m = HashMap::new();
        for e in sealed.into_iter().chain(open) {
            *m.entry(entry_key(&e)).or_insert(0u32) += 1;
        }
        Ok(m)
    }

    /// [`copy_in`](Self::copy_in) on a closed writer: into fresh segments,
    /// sealed here (the sealer thread has ended).
    fn copy_in_closed(
        &mut self,
        entries: &[Entry],
        since: Option<SegmentId>,
        min_id: SegmentId,
        before_copy: impl FnOnce(SegmentId) -> Result<()>,
    ) -> Result<(SegmentId, u64)> {
        self.poison.check()?;
        // Every seal of the close must be in `poll_sealed` first: one that
        // landed after this copy's fresh (higher) ids were journaled could
        // never be journaled (ids are journaled in increasing order). Not
        // an error that loses anything: the reseal is retried, or left for
        // the next start.
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        if !self.frozen.is_empty() {
            return Err(Error::Deadline(format!(
                "{} segment(s) of the close are still sealing; the reseal waits for them",
                self.frozen.len()
            )));
        }
        self.raise_next_id(min_id)?;
        let mut held = self.held_from(since)?;
        let first = self.create_active()?;
        let into = first.id();
        if let Err(e) = before_copy(into) {
            // Nothing journaled, nothing copied: the empty file goes.
            remove_empty(&self.seg_dir, first).inspect_err(|e| self.poison_on_sync(e))?;
            return Err(e);
        }
        let mut copied = 0u64;
        let mut seg = Some(first);
        let mut copy = || -> Result<()> {
            for e in entries {
                if take_held(&mut held, e) {
                    continue;
                }
                let full = seg.as_ref().is_none_or(|s| s.is_full());
                if full {
                    if let Some(s) = seg.take() {
                        self.seal_here(s)?;
                    }
                    seg = Some(self.create_active()?);
                }
                if let Some(s) = seg.as_mut() {
                    s.append_entry(*e)?;
                    copied += 1;
                }
            }
            match seg.take() {
                Some(s) if s.is_empty() => remove_empty(&self.seg_dir, s),
                Some(s) => self.seal_here(s),
                None => Ok(()),
            }
        };
        // As in `copy_in`: cut short after the start was journaled, the
        // rest is finished at the next open (an active file left here is
        // sealed then, and counted as holding what it holds).
        if let Err(e) = copy() {
            self.poison
                .set(format!("copying a resealed segment's entries failed: {e}"));
            return Err(e);
        }
        Ok((into, copied))
    }

    /// Flush and seal `seg` on this thread, as the sealer thread would
    /// (durable write, removal of the source, read-back check), and make
    /// it a local sealed segment whose metadata waits in `poll_sealed`.
    /// Any failure poisons the writer.
    fn seal_here(&mut self, mut seg: ActiveSegment) -> Result<()> {
        let r = seg.flush().and_then(|_| {
            seal_segment(&self.seg_dir, &seg).and_then(|meta| read_back(&self.seg_dir, seg.id(), meta))
        });
        let id = seg.id();
        drop(seg);
        let (meta, sealed) = r.inspect_err(|e| {
            self.poison
                .set(format!("sealing segment {id} failed: {e}"))
        })?;
        tracing::info!(
            segment = id.0,
            items = meta.item_count,
            bytes = meta.file_len,
            "sealed (resealed entries, after close)"
        );
        self.sealed.insert(sealed);
        self.handoff.push_meta(meta);
        Ok(())
    }
}

/// An entry's identity for counting copies in a reseal.
type EntryKey = (u64, u64, u32, u64);

fn entry_key(e: &Entry) -> EntryKey {
    (e.key_hash, e.offset, e.size, e.timestamp_ms)
}

/// Whether `e` is one of the copies `held` still counts (and count it off).
fn take_held(held: &mut HashMap<EntryKey, u32>, e: &Entry) -> bool {
    match held.get_mut(&entry_key(e)).filter(|n| **n > 0) {
        Some(n) => {
            *n -= 1;
            true
        }
        None => false,
    }
}
