//! The local sealed segments a writer holds, known by their footers, with a
//! bounded number mapped at once (issue 16: one map per sealed segment for
//! the life of the process ran into `vm.max_map_count`, about 65,000 maps,
//! and then neither a roll nor a restart could map another file).
//!
//! Each segment is known by the footer its start-up or seal check read, its
//! file checksums once computed and a 512-bit filter of its keys (or, for a
//! segment of more than [`KeyBits::MAX_ITEMS`] items or with an item that
//! fails its CRC, of its slots): about 240 bytes of heap, no file
//! descriptor, no map. A lookup finds the segments whose key filter admits
//! the key by ANDing 6 bit slices of all of them (a few words per 64
//! segments, see [`Known`]; a set of at most 64 checks each filter); segments with slot bits are checked one by
//! one (all of them, by a walk of the set, once they are an eighth of it).
//!
//! A key filter is built from items whose CRCs were checked then: damage
//! to a segment after that is reported by the lookups of keys it held (and
//! by `fsck`), no longer by a lookup of another key that shares a slot
//! with the damaged item (whose result is complete all the same). A lookup or a reader that needs the bytes maps the
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
use crate::segment::sealed::{self, SealedSegment, sealed_file_name};
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
/// Keyed rows a set holds before its filters are bit-sliced (see
/// [`Known`]): at most, as many bytes as one word a slice.
const SLICED_AT: usize = 64;
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
    fn of(bytes: &[u8], footer: &Footer) -> SlotBits {
        let n = footer.slot_count;
        let mut b = [0u64; 8];
        for s in sealed::occupied_slots(bytes, footer) {
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

/// A segment's keys as a 512-bit Bloom filter: each key hash sets
/// [`PROBES`](Self::PROBES) bits, taken from a remix of the whole hash (the
/// slot is the hash's high bits). Built from the items themselves, each
/// item's CRC checked, for segments of at most
/// [`MAX_ITEMS`](Self::MAX_ITEMS) items: at 10 keys a segment admits a key
/// it does not hold about once in 500,000 (slot bits: once in 50); at 64,
/// once in 50. A clear bit proves the key absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyBits([u64; 8]);

impl KeyBits {
    pub(crate) const BITS: usize = 512;
    pub(crate) const PROBES: usize = 6;
    /// Segments with more items get slot bits instead: their filter would
    /// be mostly ones, and their items are more than the open reads
    /// anyway (64 items are 2 KiB, on the page the footer is read from
    /// for the small segments that need a filter most). The start-up's
    /// check reads the items of these only (`sealed::check_file`).
    pub(crate) const MAX_ITEMS: u64 = sealed::READ_ITEMS_MAX;

    /// The bits `key_hash` sets (9 bits each from a splitmix64 remix).
    pub(crate) fn positions(key_hash: u64) -> [usize; Self::PROBES] {
        let mut z = key_hash.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        std::array::from_fn(|i| ((z >> (9 * i)) & 511) as usize)
    }

    /// The filter of `seg`'s keys, or `None`: more items than
    /// [`MAX_ITEMS`](Self::MAX_ITEMS), or an item that fails its CRC (so a
    /// key could be missing from the filter; slot bits, built from the
    /// checked directory, serve it, and the lookups that read that slot
    /// report the damage).
    /// Whether every bit `key_hash` sets is set.
    fn admits(&self, key_hash: u64) -> bool {
        Self::positions(key_hash)
            .iter()
            .all(|&p| self.0[p / 64] & (1 << (p % 64)) != 0)
    }

    fn of(bytes: &[u8], footer: &Footer) -> Option<KeyBits> {
        if footer.item_count > Self::MAX_ITEMS {
            return None;
        }
        let mut b = [0u64; 8];
        sealed::for_each_key_hash(bytes, footer, |h| {
            for p in Self::positions(h) {
                b[p / 64] |= 1 << (p % 64);
            }
        })
        .then_some(KeyBits(b))
    }
}

/// How a lookup rules a segment out without mapping it.
#[derive(Debug)]
enum Prune {
    /// A key filter not yet in the set's slices (before its insert).
    Keys(Box<KeyBits>),
    /// A key filter in the set's slices (or its `filters`, while small),
    /// at this row.
    Row(u32),
    /// Slot bits, checked segment by segment.
    Slots(Box<SlotBits>),
}

/// A checked footer without what its counts imply (the file's length and
/// its directory's and items' offsets, which [`Footer::decode`] checked
/// equal to [`Footer::layout`]'s): 24 bytes less for each local segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeptFooter {
    segment_id: SegmentId,
    slot_count: u32,
    dir_crc: u32,
    item_count: u64,
    min_ts: u64,
    max_ts: u64,
    min_offset: u64,
    max_offset: u64,
    created_ms: u64,
    sealed_ms: u64,
    data_crc: u64,
    version: u16,
}

impl KeptFooter {
    fn of(f: &Footer) -> KeptFooter {
        let k = KeptFooter {
            segment_id: f.segment_id,
            slot_count: f.slot_count,
            dir_crc: f.dir_crc,
            item_count: f.item_count,
            min_ts: f.min_ts,
            max_ts: f.max_ts,
            min_offset: f.min_offset,
            max_offset: f.max_offset,
            created_ms: f.created_ms,
            sealed_ms: f.sealed_ms,
            data_crc: f.data_crc,
            version: f.version,
        };
        debug_assert_eq!(k.footer(), *f, "a footer that did not pass its decode's layout check");
        k
    }

    fn footer(&self) -> Footer {
        let mut f = Footer {
            segment_id: self.segment_id,
            slot_count: self.slot_count,
            dir_crc: self.dir_crc,
            item_count: self.item_count,
            min_ts: self.min_ts,
            max_ts: self.max_ts,
            min_offset: self.min_offset,
            max_offset: self.max_offset,
            created_ms: self.created_ms,
            sealed_ms: self.sealed_ms,
            data_crc: self.data_crc,
            version: self.version,
            file_len: 0,
            dir_offset: 0,
            items_offset: 0,
        };
        let l = f.layout();
        (f.file_len, f.dir_offset, f.items_offset) = (l.file_len, l.dir_offset, l.items_offset);
        f
    }
}

/// What is known of a local sealed file without mapping it.
#[derive(Debug)]
pub struct SealedInfo {
    footer: KeptFooter,
    prune: Prune,
    /// The whole file's checksums, once computed (a full or summed check at
    /// start-up, the seal's read-back, or a first `meta`).
    sums: OnceLock<FileSums>,
}

impl SealedInfo {
    /// What `seg`'s check established, keeping its sums if they were
    /// computed; the map itself is dropped with `seg`.
    pub fn of(seg: &SealedSegment) -> SealedInfo {
        Self::from_parts(seg.bytes(), seg.footer(), seg.sums_if_known())
    }

    /// Check the sealed file at `path` as a start-up does (`summed`: the
    /// whole-body checksum too, else the structure) and keep what the
    /// check established; the file is not kept open or mapped (see
    /// [`sealed::check_file`]).
    pub fn check(path: &Path, summed: bool) -> Result<SealedInfo> {
        sealed::check_file(path, summed, Self::from_parts)
    }

    fn from_parts(bytes: &[u8], footer: &Footer, sums: Option<FileSums>) -> SealedInfo {
        let lock = OnceLock::new();
        if let Some(s) = sums {
            let _ = lock.set(s);
        }
        let prune = match KeyBits::of(bytes, footer) {
            Some(k) => Prune::Keys(Box::new(k)),
            None => Prune::Slots(Box::new(SlotBits::of(bytes, footer))),
        };
        SealedInfo {
            footer: KeptFooter::of(footer),
            prune,
            sums: lock,
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
        let f = self.footer();
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
    pub fn footer(&self) -> Footer {
        self.footer.footer()
    }

    /// How this file, by its footer and its checksums when known, differs
    /// from `meta` (a journal record of the segment): each difference as
    /// "what local (journal: recorded)"; empty when none is seen.
    pub fn differences(&self, meta: &SealedMeta) -> Vec<String> {
        let f = self.footer();
        let mut diffs = Vec::new();
        let mut cmp = |what: &str, local: u64, journal: u64| {
            if local != journal {
                diffs.push(format!("{what} {local} (journal: {journal})"));
            }
        };
        cmp("items", f.item_count, meta.item_count);
        cmp("bytes", f.file_len, meta.file_len);
        cmp("first offset", f.min_offset, meta.min_offset);
        cmp("last offset", f.max_offset, meta.max_offset);
        cmp("sealed at ms", f.sealed_ms, meta.sealed_ms);
        if let Some(s) = self.sums.get() {
            let local = f.meta(*s);
            cmp("CRC-32", u64::from(local.file_crc), u64::from(meta.file_crc));
            if let (Some(a), Some(b)) = (local.crc64, meta.crc64) {
                cmp("CRC-64", a, b);
            }
        }
        diffs
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

/// The set's segments by id, and their key filters bit-sliced: slice `b`
/// holds bit `b` of every filter, one bit a row, so a lookup ANDs the
/// key's [`KeyBits::PROBES`] slices (1,000,000 segments: 6 slices of
/// 125 KB, most of it skipped after the first two) instead of walking
/// every segment. A released segment's row is cleared and reused, so the
/// slices grow with the most segments held at once, not with those ever
/// held. Segments without a key filter ([`Prune::Slots`]) are walked.
///
/// A set of at most [`SLICED_AT`] keyed rows keeps its filters as they are,
/// one per row, and a lookup checks each (64 at most): 512 slices of one
/// word are 4 KiB for a set of one segment, 40 MiB over 10,000 restarted
/// streams of a segment or two each (issue 16). The slices are built once
/// the rows pass [`SLICED_AT`], and kept from then on.
#[derive(Default)]
struct Known {
    by_id: BTreeMap<SegmentId, Arc<SealedInfo>>,
    /// Row -> segment. A free row keeps the id it last held, but its bits
    /// are all clear, so no lookup picks it (and one that did would find
    /// that id's info not at this row).
    rows: Vec<SegmentId>,
    free: Vec<u32>,
    /// [`KeyBits::BITS`] slices of `words` words each, slice `b` at
    /// `bits[b * words..][..words]`, in one allocation: once sliced,
    /// `words` is at least `rows.len().div_ceil(64)`, grown by an eighth at
    /// a time. (A
    /// `Vec` a slice cost 512 allocations and about 37 KiB for a stream's
    /// first segment: 10,000 restarted streams held 330 MiB more than new
    /// ones, issue 16.)
    bits: Vec<u64>,
    /// Words a slice; 0 while the set is small (`filters` then).
    words: usize,
    /// Row -> key filter while the set is small (`words == 0`); a free
    /// row's filter is all clear.
    filters: Vec<KeyBits>,
    /// Segments pruned by slot bits.
    unsliced: std::collections::BTreeSet<SegmentId>,
}

impl std::ops::Deref for Known {
    type Target = BTreeMap<SegmentId, Arc<SealedInfo>>;
    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl Known {
    /// Add `info` (replacing any segment of its id), its key filter moved
    /// into the slices.
    fn insert(&mut self, info: SealedInfo) -> Arc<SealedInfo> {
        let id = info.id();
        self.remove(id);
        let info = self.place(info);
        self.by_id.insert(id, info.clone());
        info
    }

    /// Add every one of `infos`, as [`insert`](Self::insert) each. Into an
    /// empty set, ids ascending and distinct (a start-up's), the map is
    /// built in one pass with full nodes (one by one, ascending inserts
    /// leave its nodes half empty: about 15 bytes more a segment).
    fn extend(&mut self, infos: Vec<SealedInfo>) {
        let sorted = infos.windows(2).all(|w| w[0].id() < w[1].id());
        if !self.by_id.is_empty() || !sorted {
            for info in infos {
                self.insert(info);
            }
            return;
        }
        // Rows for all of them at once: one layout, not one per eighth.
        let keyed = infos
            .iter()
            .filter(|i| matches!(i.prune, Prune::Keys(_)))
            .count();
        if self.rows.len() + keyed > SLICED_AT {
            self.relayout((self.rows.len() + keyed).div_ceil(64));
        }
        let all: Vec<(SegmentId, Arc<SealedInfo>)> = infos
            .into_iter()
            .map(|info| (info.id(), self.place(info)))
            .collect();
        self.by_id = all.into_iter().collect();
        self.rows.shrink_to_fit();
        if self.words > 0 {
            self.relayout(self.rows.len().div_ceil(64));
        } else {
            self.filters.shrink_to_fit();
        }
    }

    /// Slice `b`'s words.
    fn slice(&self, b: usize) -> &[u64] {
        &self.bits[b * self.words..][..self.words]
    }

    /// Lays the slices out again at `words` words each (at least what the
    /// rows use, and at least 1); a small set's filters move into them.
    fn relayout(&mut self, words: usize) {
        let words = words.max(self.rows.len().div_ceil(64)).max(1);
        if words == self.words {
            self.bits.shrink_to_fit();
            return;
        }
        let mut bits = vec![0u64; KeyBits::BITS * words];
        let keep = self.words.min(words);
        for b in 0..KeyBits::BITS {
            if keep > 0 {
                bits[b * words..][..keep].copy_from_slice(&self.bits[b * self.words..][..keep]);
            }
        }
        for (row, f) in std::mem::take(&mut self.filters).iter().enumerate() {
            let (w, bit) = (row / 64, 1u64 << (row % 64));
            for b in 0..KeyBits::BITS {
                if f.0[b / 64] & (1 << (b % 64)) != 0 {
                    bits[b * words + w] |= bit;
                }
            }
        }
        self.bits = bits;
        self.words = words;
    }

    /// `info` (not in the set) with its key filter moved into the slices.
    fn place(&mut self, mut info: SealedInfo) -> Arc<SealedInfo> {
        let id = info.id();
        match std::mem::replace(&mut info.prune, Prune::Row(u32::MAX)) {
            Prune::Keys(bits) => {
                let row = self.row_for(id);
                if self.words == 0 {
                    let r = row as usize;
                    if r == self.filters.len() {
                        self.filters.push(*bits);
                    } else {
                        self.filters[r] = *bits;
                    }
                } else {
                    let (w, bit) = (row as usize / 64, 1u64 << (row % 64));
                    for b in 0..KeyBits::BITS {
                        if bits.0[b / 64] & (1 << (b % 64)) != 0 {
                            self.bits[b * self.words + w] |= bit;
                        }
                    }
                }
                info.prune = Prune::Row(row);
            }
            other => {
                info.prune = other;
                self.unsliced.insert(id);
            }
        }
        Arc::new(info)
    }

    /// A free row for `id`, its bits all clear.
    fn row_for(&mut self, id: SegmentId) -> u32 {
        if let Some(r) = self.free.pop() {
            self.rows[r as usize] = id;
            return r;
        }
        let r = self.rows.len();
        self.rows.push(id);
        if self.words == 0 {
            if r >= SLICED_AT {
                self.relayout(r.div_ceil(64));
            }
        } else if r / 64 >= self.words {
            self.relayout(self.words + (self.words / 8).max(1));
        }
        r as u32
    }

    fn remove(&mut self, id: SegmentId) -> Option<Arc<SealedInfo>> {
        let info = self.by_id.remove(&id)?;
        match info.prune {
            Prune::Row(r) if (r as usize) < self.rows.len() => {
                if self.words == 0 {
                    self.filters[r as usize] = KeyBits([0; 8]);
                } else {
                    let (w, bit) = (r as usize / 64, 1u64 << (r % 64));
                    for b in 0..KeyBits::BITS {
                        self.bits[b * self.words + w] &= !bit;
                    }
                }
                self.free.push(r);
            }
            _ => {
                self.unsliced.remove(&id);
            }
        }
        Some(info)
    }

    /// The segments that may hold `key_hash` by their filters, in no order.
    fn may_hold<'a>(&'a self, key_hash: u64) -> Vec<(SegmentId, &'a Arc<SealedInfo>)> {
        let mut out = Vec::new();
        let found = |row: usize, out: &mut Vec<(SegmentId, &'a Arc<SealedInfo>)>| {
            let id = self.rows[row];
            if let Some(info) = self.by_id.get(&id)
                && matches!(info.prune, Prune::Row(r) if r as usize == row)
            {
                out.push((id, info));
            }
        };
        if self.words == 0 {
            for (row, f) in self.filters.iter().enumerate() {
                if f.admits(key_hash) {
                    found(row, &mut out);
                }
            }
        } else {
            let p = KeyBits::positions(key_hash);
            let s: [&[u64]; KeyBits::PROBES] = std::array::from_fn(|i| self.slice(p[i]));
            for w in 0..self.rows.len().div_ceil(64) {
                let mut x = s[0][w] & s[1][w];
                if x == 0 {
                    continue;
                }
                for t in &s[2..] {
                    x &= t[w];
                }
                while x != 0 {
                    let row = w * 64 + x.trailing_zeros() as usize;
                    x &= x - 1;
                    found(row, &mut out);
                }
            }
        }
        let slotted = |info: &SealedInfo| match &info.prune {
            Prune::Slots(b) => b.may_hold(key_hash, info.footer.slot_count),
            _ => false,
        };
        // A few among many: each found by id; else one walk.
        if self.unsliced.len() * 8 < self.by_id.len() {
            for id in &self.unsliced {
                if let Some(info) = self.by_id.get(id)
                    && slotted(info)
                {
                    out.push((*id, info));
                }
            }
        } else {
            for (id, info) in &self.by_id {
                if slotted(info) {
                    out.push((*id, info));
                }
            }
        }
        out
    }
}

/// The local sealed segments of one writer.
///
/// Shared between the writer and lookups, which run off the writer's lock
/// (issue 16: a lookup over many segments held the lock appends take for
/// tens of milliseconds). The set of segments is behind a read-write lock
/// held only to change it or to pick a lookup's candidates (the filters'
/// slices and footers in memory: no file is opened or read under it, though caching a
/// new map may unmap an evicted one); maps are behind their own lock, held
/// only to look up, insert or evict one.
pub struct LocalSealed {
    dir: PathBuf,
    known: RwLock<Known>,
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
            known: RwLock::new(Known::default()),
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
    fn known(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }
    fn known_mut(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a checked segment known only by its info.
    #[cfg(any(test, feature = "testing"))]
    pub fn insert_info(&self, info: SealedInfo) {
        let id = info.id();
        // The set first, then the cache: a racing `get` that mapped the
        // file under the old info either cached it before this (dropped
        // here) or finds its info replaced and does not cache it.
        self.known_mut().insert(info);
        self.maps().forget(id);
    }

    /// Record checked segments known only by their infos (a start-up's,
    /// into an empty set: built in one pass).
    pub fn insert_infos(&self, infos: Vec<SealedInfo>) {
        let ids: Vec<SegmentId> = infos.iter().map(|i| i.id()).collect();
        self.known_mut().extend(infos);
        let mut m = self.maps();
        for id in ids {
            m.forget(id);
        }
    }

    /// Record a checked, mapped segment (a seal's read-back): its map is
    /// kept as the most recently used.
    pub fn insert(&self, seg: SealedSegment) {
        let id = seg.id();
        // The set's lock is kept while the map goes in (the same order as
        // `get_known`: set, then cache).
        let info = SealedInfo::of(&seg);
        let mut known = self.known_mut();
        known.insert(info);
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
        let was = known.remove(id);
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
        if *seg.footer() != info.footer() {
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

    /// How the local sealed file of `id` differs from `meta` (the journal's
    /// record of it), by its footer as recorded when it was taken in and
    /// its checksums when known, and (`on_disk`) by its length on disk now;
    /// `None` when they agree or the file is not held. No read of the file:
    /// for a release, which must not delete a local copy that is not the
    /// committed one (a second process sealed other entries under its id),
    /// and at start-up (without `on_disk`: the footer was just read).
    pub fn differs_from(&self, id: SegmentId, meta: &SealedMeta, on_disk: bool) -> Option<String> {
        let info = self.known().get(&id).cloned()?;
        let mut diffs = info.differences(meta);
        if on_disk {
            match std::fs::metadata(self.dir.join(sealed_file_name(id))) {
                Ok(m) if m.len() != meta.file_len => diffs.push(format!(
                    "bytes on disk {} (journal: {})",
                    m.len(),
                    meta.file_len
                )),
                // Missing, or not to be stat'ed now (EACCES, EIO): the
                // footer's comparison stands alone; a stat error is no
                // proof of another file.
                Ok(_) | Err(_) => {}
            }
        }
        (!diffs.is_empty()).then(|| diffs.join(", "))
    }

    /// The segment's metadata as journaled: from the recorded footer and
    /// sums, mapping the file only when its sums were never computed.
    pub fn meta(&self, id: SegmentId) -> Result<Option<SealedMeta>> {
        let Some(info) = self.known().get(&id).cloned() else {
            return Ok(None);
        };
        if let Some(s) = info.sums.get() {
            return Ok(Some(info.footer().meta(*s)));
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
    /// without being mapped by their key filters (or slot bits) and their
    /// footers' time ranges.
    ///
    /// Runs without the writer's lock: the candidates are picked under the
    /// set's read lock (the filters' slices in memory, no I/O), then
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
            let mut c: Vec<(SegmentId, Arc<SealedInfo>)> = known
                .may_hold(key_hash)
                .into_iter()
                .filter(|(id, info)| {
                    let f = &info.footer;
                    *id < below
                        && !skip.contains(id)
                        && f.item_count > 0
                        && range.overlaps(f.min_ts, f.max_ts)
                })
                .map(|(id, info)| (id, info.clone()))
                .collect();
            c.sort_unstable_by_key(|(id, _)| *id);
            c
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
    fn single_key_segments_are_skipped_without_a_map() {
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
            // Six bits of 512 per segment: others almost never share them.
            let opened = set.opened() - before;
            assert!((1..=8).contains(&opened), "{opened} of 200 mapped");
        }
        // Never a false "no": every key is found through its bits.
        for id in 1..=200u64 {
            let l = set.lookup_hash(crate::key_hash(&id.to_le_bytes()), TimeRange::ALL);
            assert_eq!(l.entries.len(), 1, "{id}");
        }
    }

    /// Segment `id` of `n` entries, keys `key(id, 0..n)`, written and
    /// opened with the structure check only (as a start-up opens segments
    /// already uploaded).
    fn write_keys(dir: &Path, id: u64, n: u64) -> SealedSegment {
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                key_hash: key(id, i),
                offset: id * 1000 + i,
                size: 1,
                timestamp_ms: 5,
            })
            .collect();
        let (bytes, _) = build_sealed(SegmentId(id), 1, 2, 1024, &entries).unwrap();
        write_sealed_file(dir, SegmentId(id), &bytes).unwrap();
        SealedSegment::open_light(&dir.join(sealed_file_name(SegmentId(id)))).unwrap()
    }

    fn key(id: u64, i: u64) -> u64 {
        crate::key_hash(&(id * 1000 + i).to_le_bytes())
    }

    #[test]
    fn a_small_set_keeps_its_filters_unsliced_until_it_passes_64_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 4);
        let check = |ids: &[u64], gone: &[u64]| {
            for &id in ids {
                for i in 0..3 {
                    let l = set.lookup_hash(key(id, i), TimeRange::ALL);
                    assert_eq!(l.entries.len(), 1, "{id}/{i}");
                    assert_eq!(l.entries[0].offset, id * 1000 + i);
                }
            }
            for &id in gone {
                let l = set.lookup_hash(key(id, 0), TimeRange::ALL);
                assert!(l.entries.is_empty() && l.read.is_empty(), "{id} removed");
            }
        };
        // A start-up's one-pass build of a few: no slices.
        let infos: Vec<SealedInfo> = (1..=5u64)
            .map(|id| SealedInfo::of(&write_keys(tmp.path(), id, 3)))
            .collect();
        set.insert_infos(infos);
        {
            let k = set.known();
            assert_eq!((k.words, k.bits.len(), k.filters.len()), (0, 0, 5));
        }
        check(&[1, 2, 3, 4, 5], &[]);
        // Removed rows admit nothing and are reused.
        assert!(set.remove(SegmentId(2)));
        {
            let k = set.known();
            assert_eq!(k.free.len(), 1);
            assert_eq!(k.filters[k.free[0] as usize], KeyBits([0; 8]), "cleared");
        }
        check(&[1, 3, 4, 5], &[2]);
        set.insert_info(SealedInfo::of(&write_keys(tmp.path(), 6, 3)));
        assert_eq!(set.known().filters.len(), 5, "row reused");
        check(&[1, 3, 4, 5, 6], &[2]);
        // Up to 64 rows: still one filter a row.
        for id in 7..=65u64 {
            set.insert_info(SealedInfo::of(&write_keys(tmp.path(), id, 3)));
        }
        {
            let k = set.known();
            assert_eq!((k.rows.len(), k.words, k.filters.len()), (64, 0, 64));
        }
        let all: Vec<u64> = [1u64, 3, 4, 5].into_iter().chain(6..=65).collect();
        check(&all, &[2]);
        // A free row is taken first; a 65th row slices them all.
        assert!(set.remove(SegmentId(30)));
        set.insert_info(SealedInfo::of(&write_keys(tmp.path(), 66, 3)));
        assert_eq!(set.known().words, 0, "the free row was reused");
        set.insert_info(SealedInfo::of(&write_keys(tmp.path(), 67, 3)));
        {
            let k = set.known();
            assert_eq!((k.rows.len(), k.words), (65, 2));
            assert!(k.filters.is_empty());
        }
        let live: Vec<u64> = [1u64, 3, 4, 5]
            .into_iter()
            .chain(6..=67)
            .filter(|&id| id != 30)
            .collect();
        check(&live, &[2, 30]);
        // A start-up of more than 64 is sliced at once.
        let tmp2 = tempfile::tempdir().unwrap();
        let set2 = LocalSealed::new(tmp2.path(), 4);
        let infos: Vec<SealedInfo> = (1..=65u64)
            .map(|id| SealedInfo::of(&write_keys(tmp2.path(), id, 3)))
            .collect();
        set2.insert_infos(infos);
        {
            let k = set2.known();
            assert_eq!((k.words, k.filters.len()), (2, 0));
        }
        for id in 1..=65u64 {
            assert_eq!(set2.lookup_hash(key(id, 2), TimeRange::ALL).entries.len(), 1);
        }
    }

    #[test]
    fn key_filters_map_only_the_segments_that_hold_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 10_000);
        for id in 1..=300u64 {
            let seg = write_keys(tmp.path(), id, 10);
            let info = SealedInfo::of(&seg);
            assert!(matches!(info.prune, Prune::Keys(_)), "{:?}", info.prune);
            set.insert_info(info);
        }
        assert_eq!(set.known().rows.len(), 300);
        assert!(set.known().unsliced.is_empty());
        let mut extra = 0;
        for id in 1..=300u64 {
            for i in 0..10 {
                let l = set.lookup_hash(key(id, i), TimeRange::ALL);
                assert_eq!(l.entries.len(), 1, "{id}/{i}");
                assert_eq!(l.entries[0].offset, id * 1000 + i);
                // The holder, and a false candidate once in ~500,000.
                assert!(l.read.iter().any(|r| r.id().0 == id));
                extra += extra_reads(&l, id);
            }
        }
        assert!(extra <= 2, "{extra} segments read that did not hold the key");
        // A key no segment holds maps nothing (almost always).
        let misses: usize = (0..1000u64)
            .map(|k| set.lookup_hash(crate::key_hash(&(k + 10_000_000).to_le_bytes()), TimeRange::ALL).read.len())
            .sum();
        assert!(misses <= 2, "{misses} segments read for 1,000 absent keys");
    }

    fn extra_reads(l: &SealedLookup, holder: u64) -> usize {
        l.read.iter().filter(|i| i.id().0 != holder).count()
    }

    #[test]
    fn a_released_segments_row_is_cleared_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 4);
        for id in 1..=128u64 {
            set.insert_info(SealedInfo::of(&write_keys(tmp.path(), id, 3)));
        }
        for id in (1..=128u64).step_by(2) {
            assert!(set.remove(SegmentId(id)));
            // Its keys now lead nowhere: no stale bits, nothing mapped.
            let l = set.lookup_hash(key(id, 0), TimeRange::ALL);
            assert!(l.entries.is_empty() && l.read.is_empty() && l.unreadable.is_empty());
        }
        {
            // Every freed row's bits are clear in every slice.
            let k = set.known();
            assert_eq!(k.free.len(), 64);
            for &r in &k.free {
                let (w, bit) = (r as usize / 64, 1u64 << (r % 64));
                assert!(
                    (0..KeyBits::BITS).all(|b| k.slice(b)[w] & bit == 0),
                    "row {r}"
                );
            }
        }
        for id in 201..=264u64 {
            set.insert_info(SealedInfo::of(&write_keys(tmp.path(), id, 3)));
        }
        let k = set.known();
        assert_eq!(k.rows.len(), 128, "rows reused, not grown");
        assert!(k.free.is_empty());
        assert_eq!((k.words, k.bits.len()), (2, 2 * KeyBits::BITS));
        drop(k);
        for id in (2..=128u64).step_by(2).chain(201..=264) {
            for i in 0..3 {
                let l = set.lookup_hash(key(id, i), TimeRange::ALL);
                assert_eq!(l.entries.len(), 1, "{id}/{i}");
            }
        }
        // Replacing a segment (same id, other keys, its file replaced too)
        // drops its old filter: its old keys pick nothing.
        let seg = {
            let entries = [Entry {
                key_hash: key(999, 0),
                offset: 1,
                size: 1,
                timestamp_ms: 5,
            }];
            let (bytes, _) = build_sealed(SegmentId(2), 1, 2, 8, &entries).unwrap();
            let path = tmp.path().join(sealed_file_name(SegmentId(2)));
            std::fs::remove_file(&path).unwrap();
            write_sealed_file(tmp.path(), SegmentId(2), &bytes).unwrap();
            SealedSegment::open_light(&path).unwrap()
        };
        set.insert_info(SealedInfo::of(&seg));
        assert_eq!(set.known().rows.len(), 128);
        for i in 0..3 {
            let old = set.lookup_hash(key(2, i), TimeRange::ALL);
            assert!(old.read.is_empty() && old.unreadable.is_empty(), "{old:?}");
        }
        assert_eq!(set.lookup_hash(key(999, 0), TimeRange::ALL).entries.len(), 1);
    }

    #[test]
    fn big_or_damaged_segments_are_pruned_by_slot_bits_and_still_found() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 100);
        // 65 items: more than a key filter serves.
        let big = write_keys(tmp.path(), 1, KeyBits::MAX_ITEMS + 1);
        // 10 items, one of them damaged after the seal.
        drop(write_keys(tmp.path(), 2, 10));
        let path = tmp.path().join(sealed_file_name(SegmentId(2)));
        let mut bytes = std::fs::read(&path).unwrap();
        let f = *SealedSegment::open_light(&path).unwrap().footer();
        let at = f.items_offset as usize + 3 * crate::segment::format::SEALED_ITEM_LEN + 9;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let damaged = SealedSegment::open_light(&path).unwrap();
        let small = write_keys(tmp.path(), 3, 10);
        for seg in [&big, &damaged, &small] {
            set.insert_info(SealedInfo::of(seg));
        }
        {
            let k = set.known();
            assert_eq!(k.unsliced.iter().map(|i| i.0).collect::<Vec<_>>(), [1, 2]);
            assert_eq!(k.rows, [SegmentId(3)]);
        }
        for i in 0..=KeyBits::MAX_ITEMS {
            assert_eq!(set.lookup_hash(key(1, i), TimeRange::ALL).entries.len(), 1);
        }
        // Every key of the damaged segment is found or its damage reported.
        let mut reported = 0;
        for i in 0..10 {
            let l = set.lookup_hash(key(2, i), TimeRange::ALL);
            if l.entries.is_empty() {
                assert_eq!(l.corrupt, [(SegmentId(2), 1)], "{i}");
                reported += 1;
            }
        }
        assert_eq!(reported, 1);
        assert_eq!(set.lookup_hash(key(3, 4), TimeRange::ALL).entries.len(), 1);
        // Oldest segment first whatever the path that found it.
        let tmp3 = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp3.path(), 100);
        let shared = |id: u64, n: u64| {
            let entries: Vec<Entry> = (0..n)
                .map(|i| Entry {
                    key_hash: if i == 0 { 42 } else { key(id, i) },
                    offset: id * 1000 + i,
                    size: 1,
                    timestamp_ms: 5,
                })
                .collect();
            let (bytes, _) = build_sealed(SegmentId(id), 1, 2, 256, &entries).unwrap();
            write_sealed_file(tmp3.path(), SegmentId(id), &bytes).unwrap();
            SealedInfo::of(&open(tmp3.path(), id))
        };
        for id in [5u64, 1, 4, 2, 3] {
            set.insert_info(shared(id, if id % 2 == 0 { 100 } else { 5 }));
        }
        let l = set.lookup_hash(42, TimeRange::ALL);
        let ids: Vec<u64> = l.entries.iter().map(|e| e.offset / 1000).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
    }

    /// A segment's info as a start-up builds it, from bytes (no file).
    fn info_of(id: u64, keys: &[u64]) -> SealedInfo {
        let entries: Vec<Entry> = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| Entry {
                key_hash: k,
                offset: i as u64,
                size: 1,
                timestamp_ms: 5,
            })
            .collect();
        let (bytes, _) = build_sealed(SegmentId(id), 1, 2, 64, &entries).unwrap();
        let footer = crate::segment::format::check_sealed_structure(&bytes).unwrap();
        SealedInfo::from_parts(&bytes, &footer, None)
    }

    #[test]
    fn the_sliced_filters_never_miss_a_segment_that_holds_the_key() {
        // Random inserts (key filters and slot bits), removals, same-id
        // replacements and a start-up's bulk load, against a plain model of
        // who holds which key: every holder is always a candidate, and a
        // segment no longer held never is.
        let mut x = 0x5eed_u64;
        let mut rnd = move |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for round in 0..40 {
            let mut known = Known::default();
            let mut model: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let keyset = |rnd: &mut dyn FnMut(u64) -> u64| -> Vec<u64> {
                // 1 to 100 keys from a small space, so segments share keys.
                let wide = rnd(4) == 0;
                let n = 1 + rnd(if wide { 100 } else { 20 });
                (0..n).map(|_| crate::key_hash(&rnd(300).to_le_bytes())).collect()
            };
            if round % 2 == 0 {
                let mut bulk = Vec::new();
                for id in 1..=rnd(200) {
                    let keys = keyset(&mut rnd);
                    bulk.push(info_of(id, &keys));
                    model.insert(id, keys);
                }
                known.extend(bulk);
            }
            for _ in 0..300 {
                let id = 1 + rnd(250);
                if rnd(3) == 0 {
                    assert_eq!(known.remove(SegmentId(id)).is_some(), model.remove(&id).is_some());
                } else {
                    let keys = keyset(&mut rnd);
                    known.insert(info_of(id, &keys));
                    model.insert(id, keys);
                }
            }
            for k in 0..300u64 {
                let h = crate::key_hash(&k.to_le_bytes());
                let picked: std::collections::BTreeSet<u64> =
                    known.may_hold(h).iter().map(|(id, _)| id.0).collect();
                for (id, keys) in &model {
                    if keys.contains(&h) {
                        assert!(picked.contains(id), "round {round}: key {k} of {id} missed");
                    }
                }
                assert!(picked.iter().all(|id| model.contains_key(id)), "round {round}");
            }
            assert_eq!(known.len(), model.len());
        }
    }

    #[test]
    fn a_few_slot_bit_segments_among_many_are_found_by_id() {
        let tmp = tempfile::tempdir().unwrap();
        let set = LocalSealed::new(tmp.path(), 100);
        for id in 1..=40u64 {
            let n = if id % 20 == 0 { KeyBits::MAX_ITEMS + 10 } else { 5 };
            set.insert_info(SealedInfo::of(&write_keys(tmp.path(), id, n)));
        }
        {
            let k = set.known();
            assert_eq!(k.unsliced.len(), 2);
            // The per-id path, not the walk.
            assert!(k.unsliced.len() * 8 < k.by_id.len());
        }
        for id in 1..=40u64 {
            let n = if id % 20 == 0 { KeyBits::MAX_ITEMS + 10 } else { 5 };
            for i in 0..n {
                let l = set.lookup_hash(key(id, i), TimeRange::ALL);
                assert_eq!(l.entries.len(), 1, "{id}/{i}");
                assert_eq!(l.entries[0].offset, id * 1000 + i);
            }
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
