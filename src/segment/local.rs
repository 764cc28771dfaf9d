//! The local sealed segments a writer holds, known by their footers, with a
//! bounded number mapped at once (issue 16: one map per sealed segment for
//! the life of the process ran into `vm.max_map_count`, about 65,000 maps,
//! and then neither a roll nor a restart could map another file).
//!
//! Each segment is known by the footer its start-up or seal check read, its
//! file checksums once computed and 512 slot bits: about 200 bytes of heap,
//! no file descriptor, no map. A lookup or a reader that needs the bytes maps the
//! file on demand ([`SealedSegment::open_light`]: the length, footer,
//! header and slot directory (4 bytes a slot: 256 KiB at 65,536 slots) are
//! read and checked again, and the footer must be the
//! one recorded, else the file changed under the writer and is reported as
//! corrupt, never served). At most `capacity` maps are kept, least recently
//! used first out; a map handed out stays valid as long as its holder keeps
//! it.
//!
//! The cache is a map with a use-ordered index (a hit or an eviction is
//! O(log capacity)): a crate would add a dependency for 40 lines.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::error::{Error, Result};
use crate::segment::format::{FileSums, Footer, slot_of};
use crate::segment::sealed::{SealedSegment, sealed_file_name};
use crate::segment::{Entry, SealedMeta, SegmentId, TimeRange};

/// Maps kept by default (per writer): a quarter of the kernel's default
/// `vm.max_map_count` (65,530), so a writer alone never reaches it. A
/// lookup over every timestamp maps every segment whose time range can
/// match: with more local segments than this, such lookups map files
/// again (tens of microseconds each); narrower ranges prune by footer.
pub const DEFAULT_MAPPED: usize = 16_384;
/// Removed segments remembered for remote lookups running meanwhile (see
/// [`LocalSealed::removed_since`]): about 200 bytes each.
const REMOVED_KEPT: usize = 4096;
/// The largest map bound accepted (an operator who raised
/// `vm.max_map_count`).
pub const MAX_MAPPED: usize = 1 << 20;

/// Which parts of the key space a segment holds keys in: its slot
/// directory folded to 512 bits (slot `s` of `S` sets bit `s * 512 / S`;
/// slots are ordered by key hash, so each bit is a contiguous range of
/// hashes). A clear bit proves the segment holds no key of that range, so
/// a lookup skips the segment without mapping it. Built from the directory
/// the open already read and checked: no extra I/O. Segments with more
/// occupied slots than bits prune nothing; many small segments prune well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotBits([u64; 8]);

impl SlotBits {
    const BITS: u64 = 512;

    fn bit(slot: u32, slot_count: u32) -> usize {
        (u64::from(slot) * Self::BITS.min(u64::from(slot_count)) / u64::from(slot_count.max(1)))
            as usize
    }
    fn of(seg: &SealedSegment) -> SlotBits {
        let n = seg.footer().slot_count;
        let mut b = [0u64; 8];
        for s in seg.occupied_slots() {
            let i = Self::bit(s, n);
            b[i / 64] |= 1 << (i % 64);
        }
        SlotBits(b)
    }
    fn may_hold(&self, key_hash: u64, slot_count: u32) -> bool {
        let i = Self::bit(slot_of(key_hash, slot_count), slot_count);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// What is known of a local sealed file without mapping it.
#[derive(Debug)]
pub struct SealedInfo {
    footer: Footer,
    slots: SlotBits,
    /// The whole file's checksums, once computed (a full or summed check at
    /// start-up, the seal's read-back, or a first `meta`).
    sums: OnceLock<FileSums>,
}

impl SealedInfo {
    /// What `seg`'s check established, keeping its sums if they were
    /// computed; the map itself is dropped with `seg`.
    pub fn of(seg: &SealedSegment) -> SealedInfo {
        let sums = OnceLock::new();
        if let Some(s) = seg.sums_if_known() {
            let _ = sums.set(s);
        }
        SealedInfo {
            footer: *seg.footer(),
            slots: SlotBits::of(seg),
            sums,
        }
    }
    pub fn id(&self) -> SegmentId {
        self.footer.segment_id
    }
    /// Whether this is the segment `meta` describes (a committed
    /// segment's, from the manifest or the journal): the same id, length,
    /// item count, time and offset ranges, and, when this file's sums are
    /// known (always for a segment sealed by this process), the same
    /// whole-file checksum. Not merely the same id: another data directory
    /// may have committed that id (see `pipeline::reseal`).
    pub fn matches(&self, meta: &SealedMeta) -> bool {
        let f = &self.footer;
        let sums_agree = self.sums.get().is_none_or(|s| match meta.crc64 {
            Some(c) => s.crc64 == c,
            None => s.crc32 == meta.file_crc,
        });
        f.segment_id == meta.id
            && f.file_len == meta.file_len
            && f.item_count == meta.item_count
            && f.min_ts == meta.min_ts
            && f.max_ts == meta.max_ts
            && f.min_offset == meta.min_offset
            && f.max_offset == meta.max_offset
            && sums_agree
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

/// Outcome of [`LocalSealed::lookup_hash`].
#[derive(Debug, Default)]
pub struct SealedLookup {
    /// Entries found, oldest segment first.
    pub entries: Vec<Entry>,
    /// Items of the key's slots whose CRC fails, by segment.
    pub corrupt: Vec<(SegmentId, u32)>,
    /// Segments that could not be read at all (missing, changed, I/O
    /// error), with why: their entries are missing from the result.
    pub unreadable: Vec<(SegmentId, String)>,
    /// What was known of each of those when it was picked (to tell its
    /// committed copy from another data directory's segment of that id).
    pub unreadable_info: Vec<Arc<SealedInfo>>,
    /// Candidates that went (released or quarantined) while the lookup
    /// ran: not read, and not reported as unreadable.
    pub vanished: Vec<SegmentId>,
    /// Candidates read, with what was known of each when it was picked.
    pub read: Vec<Arc<SealedInfo>>,
}

struct Mapped {
    seg: Arc<SealedSegment>,
    last_use: u64,
}

#[derive(Default)]
struct Maps {
    map: HashMap<SegmentId, Mapped>,
    /// `last_use` -> id, oldest first: eviction in O(log n).
    order: BTreeMap<u64, SegmentId>,
    clock: u64,
    /// Files mapped on demand (cache misses), for tests.
    opened: u64,
}

impl Maps {
    fn forget(&mut self, id: SegmentId) {
        if let Some(x) = self.map.remove(&id) {
            self.order.remove(&x.last_use);
        }
    }
    /// The cached map of `id`, now the most recently used.
    fn touch(&mut self, id: SegmentId) -> Option<Arc<SealedSegment>> {
        self.clock += 1;
        let now = self.clock;
        let x = self.map.get_mut(&id)?;
        self.order.remove(&x.last_use);
        x.last_use = now;
        self.order.insert(now, id);
        Some(x.seg.clone())
    }
}

/// The local sealed segments of one writer.
///
/// Shared between the writer and lookups, which run off the writer's lock
/// (issue 16: a lookup over many segments held the lock appends take for
/// tens of milliseconds). The set of segments is behind a read-write lock
/// held only to change it or to pick a lookup's candidates (a walk of the
/// footers in memory: no file is opened or read under it, though caching a
/// new map may unmap an evicted one); maps are behind their own lock, held
/// only to look up, insert or evict one.
pub struct LocalSealed {
    dir: PathBuf,
    known: RwLock<BTreeMap<SegmentId, Arc<SealedInfo>>>,
    maps: Mutex<Maps>,
    capacity: usize,
    /// Segments removed so far (released, quarantined): a remote lookup
    /// that sees this change while it runs reads the store's list again.
    /// Changed under the set's write lock, with the removal, so a lookup
    /// that finds a segment gone also finds the count moved.
    removals: AtomicU64,
    /// The last [`REMOVED_KEPT`] segments removed, by the removal count
    /// after each: a remote lookup still knows a segment it read as open
    /// that has since sealed, committed and been released.
    removed: Mutex<std::collections::VecDeque<(u64, Arc<SealedInfo>)>>,
    /// Reseals begun so far (`IndexWriter::copy_in`): a lookup that sees
    /// this change while it runs redoes its local part under the writer's
    /// lock.
    reseals: AtomicU64,
}

impl LocalSealed {
    /// An empty set for the sealed files in `dir`, keeping at most
    /// `capacity` (at least 1) mapped.
    pub fn new(dir: &Path, capacity: usize) -> LocalSealed {
        LocalSealed {
            dir: dir.to_path_buf(),
            known: RwLock::new(BTreeMap::new()),
            maps: Mutex::new(Maps::default()),
            capacity: capacity.max(1),
            removals: AtomicU64::new(0),
            removed: Mutex::new(std::collections::VecDeque::new()),
            reseals: AtomicU64::new(0),
        }
    }

    /// Segments removed so far (see the field).
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }
    /// Reseals begun so far (see the field).
    pub fn reseals(&self) -> u64 {
        self.reseals.load(Ordering::SeqCst)
    }
    /// A reseal begins: called under the writer's lock before any entry is
    /// copied.
    pub fn note_reseal(&self) {
        self.reseals.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the set holds now the segment `meta` describes (see
    /// [`SealedInfo::matches`]).
    pub fn same_segment(&self, meta: &SealedMeta) -> bool {
        self.known().get(&meta.id).is_some_and(|i| i.matches(meta))
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn known(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<SegmentId, Arc<SealedInfo>>> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }
    fn known_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SegmentId, Arc<SealedInfo>>> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a checked segment known only by its info.
    pub fn insert_info(&self, info: SealedInfo) {
        let id = info.id();
        // The set first, then the cache: a racing `get` that mapped the
        // file under the old info either cached it before this (dropped
        // here) or finds its info replaced and does not cache it.
        self.known_mut().insert(id, Arc::new(info));
        self.maps().forget(id);
    }

    /// Record a checked, mapped segment (a seal's read-back): its map is
    /// kept as the most recently used.
    pub fn insert(&self, seg: SealedSegment) {
        let id = seg.id();
        // The set's lock is kept while the map goes in (the same order as
        // `get_known`: set, then cache).
        let mut known = self.known_mut();
        known.insert(id, Arc::new(SealedInfo::of(&seg)));
        let mut m = self.maps();
        m.forget(id);
        self.keep(&mut m, Arc::new(seg));
        drop(known);
    }

    /// Forget a segment (released, quarantined); its map goes once no
    /// holder keeps it. Done before the file is unlinked or moved, so a
    /// lookup that then fails to open it knows it is gone, not damaged.
    pub fn remove(&self, id: SegmentId) -> bool {
        let mut known = self.known_mut();
        let was = known.remove(&id);
        if let Some(info) = &was {
            let n = self.removals.fetch_add(1, Ordering::SeqCst) + 1;
            let mut log = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() >= REMOVED_KEPT {
                log.pop_front();
            }
            log.push_back((n, info.clone()));
        }
        drop(known);
        self.maps().forget(id);
        was.is_some()
    }

    /// Whether the segment `meta` describes was removed after the removal
    /// count was `since`. `None`: the log no longer reaches back that far.
    pub fn removed_since(&self, since: u64, meta: &SealedMeta) -> Option<bool> {
        let log = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = log.front().map_or(self.removals(), |(n, _)| n - 1);
        if oldest > since {
            return None;
        }
        Some(
            log.iter()
                .any(|(n, info)| *n > since && info.matches(meta)),
        )
    }

    /// Where segment `id`'s file is.
    pub fn path_of(&self, id: SegmentId) -> PathBuf {
        self.dir.join(sealed_file_name(id))
    }
    pub fn contains(&self, id: SegmentId) -> bool {
        self.known().contains_key(&id)
    }
    pub fn ids(&self) -> Vec<SegmentId> {
        self.known().keys().copied().collect()
    }
    /// Ids from `since` on, oldest first.
    pub fn ids_from(&self, since: SegmentId) -> Vec<SegmentId> {
        self.known().range(since..).map(|(id, _)| *id).collect()
    }
    /// The highest offset any non-empty segment holds, by its footer.
    pub fn max_offset(&self) -> Option<u64> {
        self.known()
            .values()
            .filter(|i| i.footer.item_count > 0)
            .map(|i| i.footer.max_offset)
            .max()
    }
    /// Segments held, and of those mapped now (at most the capacity).
    pub fn counts(&self) -> (usize, usize) {
        let held = self.known().len();
        (held, self.maps().map.len())
    }
    /// Maps held now (at most the capacity; a handed-out map evicted from
    /// the cache is its holder's).
    #[cfg(any(test, feature = "testing"))]
    pub fn mapped(&self) -> usize {
        self.maps().map.len()
    }
    /// Files mapped on demand so far.
    #[cfg(any(test, feature = "testing"))]
    pub fn opened(&self) -> u64 {
        self.maps().opened
    }

    /// The segment's file, mapped (from the cache, or opened now with the
    /// structural check and compared with its recorded footer). `Ok(None)`:
    /// not a local segment. An error: the file is gone, unreadable or not
    /// the one recorded.
    pub fn get(&self, id: SegmentId) -> Result<Option<Arc<SealedSegment>>> {
        let Some(info) = self.known().get(&id).cloned() else {
            return Ok(None);
        };
        self.get_known(id, &info).map(Some)
    }

    /// Whether `info` is still what the set records for `id` (not
    /// released, quarantined or replaced since it was picked).
    fn still(&self, id: SegmentId, info: &Arc<SealedInfo>) -> bool {
        self.known().get(&id).is_some_and(|k| Arc::ptr_eq(k, info))
    }

    fn get_known(&self, id: SegmentId, info: &Arc<SealedInfo>) -> Result<Arc<SealedSegment>> {
        if let Some(seg) = self.maps().touch(id) {
            return Ok(seg);
        }
        // Mapped outside both locks: a miss reads the footer, header and
        // slot directory.
        let path = self.dir.join(sealed_file_name(id));
        let seg = SealedSegment::open_light(&path)?;
        if seg.footer() != &info.footer {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!(
                    "local sealed segment {id} changed since it was checked: its footer is not \
                     the one recorded at start-up or seal; not read (run tierindex fsck)"
                ),
            ));
        }
        if let Some(s) = info.sums.get() {
            seg.set_sums(*s);
        }
        let seg = Arc::new(seg);
        // Cached only while the set still records this info (checked under
        // the set's read lock, which `insert_info` and `remove` wait for
        // before they drop the cached map): a segment released or replaced
        // meanwhile never leaves a stale map behind.
        let known = self.known();
        if !known.get(&id).is_some_and(|k| Arc::ptr_eq(k, info)) {
            return Ok(seg);
        }
        let mut m = self.maps();
        m.opened += 1;
        let seg = self.keep(&mut m, seg);
        drop(known);
        Ok(seg)
    }

    /// Put `seg` in the cache (a racing open of the same id keeps the one
    /// already there), evicting the least recently used beyond capacity.
    fn keep(&self, m: &mut Maps, seg: Arc<SealedSegment>) -> Arc<SealedSegment> {
        let id = seg.id();
        if let Some(cached) = m.touch(id) {
            return cached;
        }
        while m.map.len() >= self.capacity {
            let Some((_, old)) = m.order.pop_first() else {
                break;
            };
            m.map.remove(&old);
        }
        m.clock += 1;
        let now = m.clock;
        m.order.insert(now, id);
        m.map.insert(
            id,
            Mapped {
                seg: seg.clone(),
                last_use: now,
            },
        );
        seg
    }

    /// The segment's metadata as journaled: from the recorded footer and
    /// sums, mapping the file only when its sums were never computed.
    pub fn meta(&self, id: SegmentId) -> Result<Option<SealedMeta>> {
        let Some(info) = self.known().get(&id).cloned() else {
            return Ok(None);
        };
        if let Some(s) = info.sums.get() {
            return Ok(Some(info.footer.meta(*s)));
        }
        let seg = self.get_known(id, &info)?;
        let meta = seg.meta();
        if let Some(s) = seg.sums_if_known() {
            let _ = info.sums.set(s);
        }
        Ok(Some(meta))
    }

    /// Entries for `key_hash` in `range` across every local sealed
    /// segment, oldest first (as [`lookup_below`](Self::lookup_below)
    /// with no bound and nothing skipped).
    #[cfg(any(test, feature = "testing"))]
    pub fn lookup_hash(&self, key_hash: u64, range: TimeRange) -> SealedLookup {
        self.lookup_below(key_hash, range, SegmentId(u64::MAX), &[])
    }

    /// Entries for `key_hash` in `range` across the local sealed segments
    /// below `below` and not in `skip`, oldest first. Segments are skipped
    /// without being mapped by their footer's time range and by their slot
    /// bits.
    ///
    /// Runs without the writer's lock: the candidates are picked under the
    /// set's read lock (a walk of the footers in memory, no I/O), then
    /// mapped and read with no lock held. A candidate released or
    /// quarantined meanwhile (gone from the set) is not read and not
    /// reported as unreadable: it is listed in
    /// [`SealedLookup::vanished`], so a remote lookup reads its committed
    /// copy.
    pub fn lookup_below(
        &self,
        key_hash: u64,
        range: TimeRange,
        below: SegmentId,
        skip: &[SegmentId],
    ) -> SealedLookup {
        let mut out = SealedLookup::default();
        let candidates: Vec<(SegmentId, Arc<SealedInfo>)> = {
            let known = self.known();
            known
                .range(..below)
                .filter(|(id, _)| !skip.contains(id))
                .filter(|(_, info)| {
                    let f = &info.footer;
                    f.item_count > 0
                        && range.overlaps(f.min_ts, f.max_ts)
                        && info.slots.may_hold(key_hash, f.slot_count)
                })
                .map(|(id, info)| (*id, info.clone()))
                .collect()
        };
        for (id, info) in candidates {
            match self.get_known(id, &info) {
                Ok(seg) => {
                    let (es, bad) = seg.lookup_counting(key_hash, range);
                    out.entries.extend(es);
                    if bad > 0 {
                        out.corrupt.push((id, bad));
                    }
                    out.read.push(info);
                }
                Err(_) if !self.still(id, &info) => out.vanished.push(id),
                Err(e) => {
                    out.unreadable.push((id, e.to_string()));
                    out.unreadable_info.push(info);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::sealed::{build_sealed, write_sealed_file};

    fn write(dir: &Path, id: u64, ts: u64) {
        let entries: Vec<Entry> = (0..10)
            .map(|i| Entry {
                key_hash: crate::key_hash(&[i as u8]),
                offset: id * 100 + i,
                size: 1,
                timestamp_ms: ts,
            })
            .collect();
        let (bytes, _) = build_sealed(SegmentId(id), 1, 2, 8, &entries).unwrap();
        write_sealed_file(dir, SegmentId(id), &bytes).unwrap();
    }

    fn open(dir: &Path, id: u64) -> SealedSegment {
        SealedSegment::open(&dir.join(sealed_file_name(SegmentId(id)))).unwrap()
    }

    #[test]
    fn keeps_at_most_capacity_mapped_and_still_finds_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 3);
        for id in 1..=10 {
            write(tmp.path(), id, 1000 + id);
            set.insert_info(SealedInfo::of(&open(tmp.path(), id)));
        }
        assert_eq!(set.mapped(), 0);
        let l = set.lookup_hash(crate::key_hash(&[3]), TimeRange::ALL);
        assert_eq!(l.entries.len(), 10);
        assert!(l.corrupt.is_empty() && l.unreadable.is_empty());
        assert_eq!(set.mapped(), 3);
        assert_eq!(set.opened(), 10);
        // Pruned by time: one segment's range, one map.
        let before = set.opened();
        let l = set.lookup_hash(
            crate::key_hash(&[3]),
            TimeRange {
                from_ms: 1001,
                to_ms: 1001,
            },
        );
        assert_eq!(l.entries.len(), 1);
        assert_eq!(set.opened(), before + 1);
        // A hit does not map again.
        set.get(SegmentId(1)).unwrap().unwrap();
        assert_eq!(set.opened(), before + 1);
        // Meta without sums maps once and then remembers them.
        let m = set.meta(SegmentId(5)).unwrap().unwrap();
        assert_eq!(m, open(tmp.path(), 5).meta());
        assert!(set.remove(SegmentId(5)));
        assert!(set.get(SegmentId(5)).unwrap().is_none());
    }

    #[test]
    fn slot_bits_skip_segments_that_cannot_hold_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 100);
        for id in 1..=200u64 {
            let e = Entry {
                key_hash: crate::key_hash(&id.to_le_bytes()),
                offset: id,
                size: 1,
                timestamp_ms: 5,
            };
            let (bytes, _) = build_sealed(SegmentId(id), 1, 2, 4096, &[e]).unwrap();
            write_sealed_file(tmp.path(), SegmentId(id), &bytes).unwrap();
            set.insert_info(SealedInfo::of(&open(tmp.path(), id)));
        }
        for id in [1u64, 77, 200] {
            let before = set.opened();
            let l = set.lookup_hash(crate::key_hash(&id.to_le_bytes()), TimeRange::ALL);
            assert_eq!(l.entries.len(), 1);
            assert_eq!(l.entries[0].offset, id);
            // One bit of 512 per segment: a few others may share it.
            let opened = set.opened() - before;
            assert!((1..=8).contains(&opened), "{opened} of 200 mapped");
        }
        // Never a false "no": every key is found through its bits.
        for id in 1..=200u64 {
            let l = set.lookup_hash(crate::key_hash(&id.to_le_bytes()), TimeRange::ALL);
            assert_eq!(l.entries.len(), 1, "{id}");
        }
    }

    #[test]
    fn a_file_changed_or_gone_after_its_check_is_reported_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 1);
        for id in 1..=2 {
            write(tmp.path(), id, 5);
            set.insert_info(SealedInfo::of(&open(tmp.path(), id)));
        }
        // Replaced by another valid file of the same id (other content).
        let (other, _) = build_sealed(
            SegmentId(1),
            1,
            2,
            8,
            &[Entry {
                key_hash: 1,
                offset: 1,
                size: 1,
                timestamp_ms: 5,
            }],
        )
        .unwrap();
        write_sealed_file(tmp.path(), SegmentId(1), &other).unwrap();
        std::fs::remove_file(tmp.path().join(sealed_file_name(SegmentId(2)))).unwrap();
        let l = set.lookup_hash(crate::key_hash(&[3]), TimeRange::ALL);
        assert!(l.entries.is_empty());
        assert_eq!(l.unreadable.len(), 2, "{l:?}");
        assert!(l.unreadable[0].1.contains("changed since it was checked"));
        assert!(set.get(SegmentId(1)).is_err());
    }
}
