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
use std::sync::{Arc, Mutex, OnceLock};

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
pub struct LocalSealed {
    dir: PathBuf,
    known: BTreeMap<SegmentId, SealedInfo>,
    maps: Mutex<Maps>,
    capacity: usize,
}

impl LocalSealed {
    /// An empty set for the sealed files in `dir`, keeping at most
    /// `capacity` (at least 1) mapped.
    pub fn new(dir: &Path, capacity: usize) -> LocalSealed {
        LocalSealed {
            dir: dir.to_path_buf(),
            known: BTreeMap::new(),
            maps: Mutex::new(Maps::default()),
            capacity: capacity.max(1),
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a checked segment known only by its info.
    pub fn insert_info(&mut self, info: SealedInfo) {
        let id = info.id();
        self.maps().forget(id);
        self.known.insert(id, info);
    }

    /// Record a checked, mapped segment (a seal's read-back): its map is
    /// kept as the most recently used.
    pub fn insert(&mut self, seg: SealedSegment) {
        let id = seg.id();
        self.known.insert(id, SealedInfo::of(&seg));
        let mut m = self.maps();
        m.forget(id);
        self.keep(&mut m, Arc::new(seg));
    }

    /// Forget a segment (released, quarantined); its map goes once no
    /// holder keeps it.
    pub fn remove(&mut self, id: SegmentId) -> bool {
        self.maps().forget(id);
        self.known.remove(&id).is_some()
    }

    pub fn contains(&self, id: SegmentId) -> bool {
        self.known.contains_key(&id)
    }
    pub fn ids(&self) -> Vec<SegmentId> {
        self.known.keys().copied().collect()
    }
    /// Ids from `since` on, oldest first.
    pub fn ids_from(&self, since: SegmentId) -> Vec<SegmentId> {
        self.known.range(since..).map(|(id, _)| *id).collect()
    }
    /// Footers of every segment, oldest first.
    pub fn footers(&self) -> impl Iterator<Item = &Footer> {
        self.known.values().map(|i| &i.footer)
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
        let Some(info) = self.known.get(&id) else {
            return Ok(None);
        };
        if let Some(seg) = self.maps().touch(id) {
            return Ok(Some(seg));
        }
        // Mapped outside the cache's lock: a miss reads the footer, header
        // and slot directory.
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
        let mut m = self.maps();
        m.opened += 1;
        Ok(Some(self.keep(&mut m, seg)))
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
        let Some(info) = self.known.get(&id) else {
            return Ok(None);
        };
        if let Some(s) = info.sums.get() {
            return Ok(Some(info.footer.meta(*s)));
        }
        let Some(seg) = self.get(id)? else {
            return Ok(None);
        };
        let meta = seg.meta();
        if let Some(s) = seg.sums_if_known() {
            let _ = info.sums.set(s);
        }
        Ok(Some(meta))
    }

    /// Entries for `key_hash` in `range` across every local sealed
    /// segment, oldest first. Segments are skipped without being mapped by
    /// their footer's time range and by their slot bits.
    pub fn lookup_hash(&self, key_hash: u64, range: TimeRange) -> SealedLookup {
        let mut out = SealedLookup::default();
        for (id, info) in &self.known {
            let f = &info.footer;
            if f.item_count == 0
                || !range.overlaps(f.min_ts, f.max_ts)
                || !info.slots.may_hold(key_hash, f.slot_count)
            {
                continue;
            }
            match self.get(*id) {
                Ok(Some(seg)) => {
                    let (es, bad) = seg.lookup_counting(key_hash, range);
                    out.entries.extend(es);
                    if bad > 0 {
                        out.corrupt.push((*id, bad));
                    }
                }
                Ok(None) => {}
                Err(e) => out.unreadable.push((*id, e.to_string())),
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
        let mut set = LocalSealed::new(tmp.path(), 3);
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
        let mut set = LocalSealed::new(tmp.path(), 100);
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
        let mut set = LocalSealed::new(tmp.path(), 1);
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
