//! Lookups over the local segments in two parts: the open (frozen and
//! active) segments under the writer's lock, the sealed ones after it
//! from the shared set, and what the result covers for a remote lookup.

use super::*;

/// A lookup whose open-segment part is done (under the writer's lock, by
/// [`IndexWriter::lookup_open`]) and whose sealed part is not.
pub struct OpenLookup {
    open: Lookup,
    /// The open segments read, oldest first.
    open_ids: Vec<SegmentId>,
    sealed: Arc<LocalSealed>,
    /// [`LocalSealed::reseals`] when the open part was read.
    reseals: u64,
    /// [`LocalSealed::removals`] when the open part was read.
    removals: u64,
}

impl OpenLookup {
    /// Read the local sealed segments (no writer lock needed) and merge:
    /// sealed entries first (they are older), then the open segments'.
    /// Also returns what the result covers, for a remote lookup (see
    /// [`Covered`]).
    ///
    /// `raced` (the third value) is true when a reseal copied entries
    /// between segments while the sealed part was read (`copy_in`): the
    /// open part may predate the copies and the sealed part may have lost
    /// their source, so the caller must redo the lookup holding the
    /// writer's lock (which a reseal holds throughout).
    pub fn finish(self, key_hash: u64, range: TimeRange) -> (Lookup, Covered, bool) {
        // The sealed part leaves out the segments the open part read (one
        // that sealed since is read once, as open) and any newer than them
        // (created since: they hold only entries appended after this
        // lookup began). Neither assumes segments seal in id order.
        let newer = self
            .open_ids
            .last()
            .map_or(SegmentId(u64::MAX), |l| SegmentId(l.0.saturating_add(1)));
        let sealed = self
            .sealed
            .lookup_below(key_hash, range, newer, &self.open_ids);
        let raced = self.sealed.reseals() != self.reseals;
        // A raced lookup is redone under the lock, which logs what it finds:
        // logged here too, each damaged segment would be logged twice.
        let log = !raced;
        let mut out = Lookup {
            entries: sealed.entries,
            ..Lookup::default()
        };
        for (id, bad) in sealed.corrupt {
            if log {
                tracing::error!(segment = id.0, items = bad, path = %self.sealed.path_of(id).display(), "local sealed segment has items whose CRC fails: they are missing from this lookup (run tierindex fsck --repair to salvage the rest)");
            }
            out.corrupt_items += u64::from(bad);
            out.corrupt_segments.push(id.0);
        }
        let mut not_read: std::collections::BTreeSet<SegmentId> =
            sealed.vanished.into_iter().collect();
        for (id, why) in sealed.unreadable {
            if log {
                tracing::error!(segment = id.0, error = %why, "local sealed segment cannot be read: whatever it holds for this key is missing from this lookup (run tierindex fsck)");
            }
            out.unreadable_segments.push(id.0);
            not_read.insert(id);
        }
        let open = self.open;
        out.truncated = open.truncated;
        out.entries.extend(open.entries);
        out.corrupt_items += open.corrupt_items;
        out.corrupt_segments.extend(open.corrupt_segments);
        let covered = Covered {
            open: self.open_ids,
            read: sealed.read.into_iter().map(|i| (i.id(), i)).collect(),
            unreadable: sealed
                .unreadable_info
                .into_iter()
                .map(|i| (i.id(), i))
                .collect(),
            not_read,
            sealed: self.sealed,
            removals: self.removals,
        };
        (out, covered, raced)
    }
}

/// What a local lookup covered, asked per committed remote segment by a
/// remote lookup (which reads the ones not covered from the store).
pub struct Covered {
    /// The open segments read, oldest first.
    pub(super) open: Vec<SegmentId>,
    /// Sealed segments read, as they were when picked.
    pub(super) read: BTreeMap<SegmentId, Arc<crate::segment::local::SealedInfo>>,
    /// Sealed segments that could not be read, as they were when picked.
    pub(super) unreadable: BTreeMap<SegmentId, Arc<crate::segment::local::SealedInfo>>,
    /// Sealed segments picked but not read: unreadable, or gone (released
    /// or quarantined) while the lookup ran.
    pub(super) not_read: std::collections::BTreeSet<SegmentId>,
    pub(super) sealed: Arc<LocalSealed>,
    /// [`LocalSealed::removals`] when the open part was read.
    pub(super) removals: u64,
}

impl Covered {
    /// Whether `meta` (a committed segment) is the committed copy of the
    /// local segment that could not be read (the same segment, not just
    /// its id: another data directory may have committed that id).
    pub fn is_copy_of_unreadable(&self, meta: &SealedMeta) -> bool {
        self.unreadable.get(&meta.id).is_some_and(|i| i.matches(meta))
    }

    /// Whether the local lookup covered the committed segment `meta`
    /// describes, which is then not read from the store. Always the same
    /// segment, not merely the same id (another data directory may have
    /// committed that id, see `pipeline::reseal`; its segment is read):
    /// - an open segment the lookup read (it may have sealed, been
    ///   committed and even released since: the set's log of removed
    ///   segments names it then, or, once the log no longer reaches back,
    ///   `ours(id)`, the journal's record of this data directory's segment
    ///   `id`);
    /// - a sealed segment it read;
    /// - not one it could not read, nor one that went while it ran;
    /// - a segment created after the lookup began (newer than every open
    ///   one it read) and this data directory's: its entries were appended
    ///   since, and are left out rather than read from the store (which
    ///   would leave a gap: the open segment's later entries are not read
    ///   either);
    /// - a sealed segment held now that the lookup ruled out by time range,
    ///   key filter or slot bits (a key filter rules out only keys its
    ///   checked items did not hold).
    pub fn covers(&self, meta: &SealedMeta, ours: impl Fn(SegmentId) -> Option<SealedMeta>) -> bool {
        // The journal's record is asked even when the set's log says the
        // segment was not removed while the lookup ran: a frozen segment
        // the writer has not retired yet (the appender retires them at its
        // next roll) may have been released before the lookup began, and
        // its entries were read from the frozen mapping.
        let ours_now = || {
            self.sealed.same_segment(meta)
                || self.sealed.removed_since(self.removals, meta) == Some(true)
                || ours(meta.id).is_some_and(|m| {
                    m.key_sum() == meta.key_sum()
                        && m.file_len == meta.file_len
                        && m.item_count == meta.item_count
                })
        };
        if self.open.contains(&meta.id) {
            return ours_now();
        }
        if let Some(info) = self.read.get(&meta.id) {
            return info.matches(meta);
        }
        if self.not_read.contains(&meta.id) {
            return false;
        }
        if self.open.last().is_some_and(|last| meta.id > *last) {
            return ours_now();
        }
        self.sealed.same_segment(meta)
    }
}

impl IndexWriter {
    /// Entries for `key` within `range` across every local segment, oldest
    /// segment first, append order within a segment.
    #[cfg(any(test, feature = "testing"))]
    pub fn lookup(&self, key: &[u8], range: TimeRange) -> Lookup {
        self.lookup_hash(crate::key_hash(key), range)
    }

    /// As [`lookup`](Self::lookup). An item whose CRC fails on the way is
    /// not silently skipped: it is counted in [`Lookup::corrupt_items`]
    /// (with the segments in [`Lookup::corrupt_segments`]) and logged.
    #[cfg(any(test, feature = "testing"))]
    pub fn lookup_hash(&self, key_hash: u64, range: TimeRange) -> Lookup {
        // `&self` held throughout: no reseal can run between the parts.
        self.lookup_open(key_hash, range).finish(key_hash, range).0
    }

    /// The part of a lookup that needs this writer: the segments not yet
    /// sealed (frozen and active), read now. The sealed part is read by
    /// [`OpenLookup::finish`], which needs no lock on the writer: a lookup
    /// over many local segments no longer holds the writer while it maps
    /// and reads them (a seal's insert into the shared set can still wait
    /// for a lookup's pick of candidates in memory).
    pub fn lookup_open(&self, key_hash: u64, range: TimeRange) -> OpenLookup {
        let mut out = Lookup::default();
        let open: Vec<&ActiveSegment> = self
            .frozen
            .values()
            .map(|f| f.as_ref())
            .chain(self.active.as_ref())
            .collect();
        for a in &open {
            let l = a.lookup(key_hash, range, self.cfg.max_chain_steps);
            out.truncated |= l.truncated;
            out.entries.extend(l.entries);
            if l.corrupt_items > 0 {
                tracing::error!(
                    segment = a.id().0,
                    "active segment item fails its CRC in the mapping: the chain walk stopped there"
                );
                out.corrupt_items += l.corrupt_items;
                out.corrupt_segments.extend(l.corrupt_segments);
            }
        }
        OpenLookup {
            open: out,
            open_ids: open.iter().map(|a| a.id()).collect(),
            sealed: self.sealed.clone(),
            reseals: self.sealed.reseals(),
            removals: self.sealed.removals(),
        }
    }
}
