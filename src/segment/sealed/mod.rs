//! Sealed segments: writing one from a frozen active segment, and reading one.
//!
//! Write order (each step's crash outcome is in `docs/crash-safety.md`):
//! 1. write the file to `NNN.seg.tmp` (`write_sealed_streaming`: items
//!    first, bucket by bucket, then the header and slot directory, then the
//!    footer), starting writeback as it goes, and `sync_all` it,
//! 3. rename to `NNN.seg`, then fsync the directory so the rename is durable.
//!
//! Only after step 3 may the caller remove the `.active` file it came from.
//! A sealed file is never written again.

use std::fs::File;
#[cfg(any(test, feature = "testing"))]
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::durable::fsync_dir_at;
#[cfg(any(test, feature = "testing"))]
use crate::durable::{fsync_dir, fsync_file};
use crate::error::{Error, Result};
use crate::segment::format::{
    self, FOOTER_LEN, Footer, HEADER_LEN, Header, SEALED_ITEM_LEN, SEALED_MAGIC, SealedLayout,
    slot_of,
};
use crate::segment::{Entry, SealedMeta, SegmentId, TimeRange};

/// File name of a sealed segment.
pub fn sealed_file_name(id: SegmentId) -> String {
    format!("{id}.seg")
}

/// File name of a sealed segment being written.
pub fn sealed_tmp_name(id: SegmentId) -> String {
    format!("{id}.seg.tmp")
}

mod write;
pub use write::*;
#[cfg(test)]
use write::{BLOCK_RECS, PARALLEL_MIN_ITEMS, item_crc, le_u64};

/// How much of a sealed file an open checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Footer, header, slot directory (a few KiB).
    Structure,
    /// Structure and the whole-body checksum (every item too for format 1).
    Sums,
    /// Everything, every item's CRC and slot included.
    Full,
}

/// Open a sealed file for reading and check its length is plausible
/// (before anything is mapped or read).
fn open_sealed_file(path: &Path) -> Result<(File, u64)> {
    // Not a plain open: a FIFO under a segment's name would block it
    // for ever (a lookup, `status`).
    // Tried again briefly out of descriptors: a seal's read-back that
    // fails poisons its writer.
    let file = crate::durable::open_retrying(path, || crate::durable::open_regular(path, false))
        .map_err(|e| Error::io(path, "open sealed segment", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat sealed segment", e))?
        .len();
    if len < (HEADER_LEN + FOOTER_LEN) as u64 {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("only {len} bytes, too short for a sealed segment"),
        ));
    }
    // Untrusted length: a file longer than any layout (a sparse tail)
    // is damage, reported before anything is mapped.
    let max = format::max_sealed_len();
    if len > max {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("{len} bytes, longer than any sealed segment ({max})"),
        ));
    }
    Ok((file, len))
}

/// Run `check` over a sealed file's bytes; errors name `path`.
fn check_bytes(
    path: &Path,
    bytes: &[u8],
    check: Check,
) -> Result<(Footer, Option<format::FileSums>)> {
    let at_path = |e: Error| match e {
        Error::Corrupt { detail, .. } => Error::corrupt(path.display().to_string(), detail),
        other => other,
    };
    match check {
        Check::Full => format::check_sealed(bytes)
            .map(|(f, s)| (f, Some(s)))
            .map_err(at_path),
        Check::Sums => format::check_sealed_sums(bytes)
            .map(|(f, s)| (f, Some(s)))
            .map_err(at_path),
        Check::Structure => format::check_sealed_structure(bytes)
            .map(|f| (f, None))
            .map_err(at_path),
    }
}

/// Files up to this long may be read into memory by [`check_file`],
/// longer ones are mapped. A segment of 10 items with the default 65,536
/// slots is 262,660 bytes (its directory is 256 KiB).
const READ_MAX: u64 = 1 << 20;

/// A structure check reads no item, but the start-up's key filter reads
/// them when there are at most this many (`segment::local::KeyBits`).
pub(crate) const READ_ITEMS_MAX: u64 = 64;

/// Check a sealed file as a start-up does (`summed`: structure and the
/// whole-body checksum, [`format::check_sealed_sums`]; else the
/// structure, as [`SealedSegment::open_light`]) and hand its bytes, footer
/// and sums (when computed) to `f`; nothing is kept open or mapped after.
/// A file of up to 1 MiB is read into memory rather than mapped when its
/// check or key filter reads most of it anyway (a summed check, or at most
/// 64 items): a start-up over a million small segments spent most of its
/// time mapping and unmapping them, and with several threads each unmap
/// stops every core for a TLB flush.
pub fn check_file<T>(
    path: &Path,
    summed: bool,
    f: impl FnOnce(&[u8], &Footer, Option<format::FileSums>) -> T,
) -> Result<T> {
    let check = if summed {
        Check::Sums
    } else {
        Check::Structure
    };
    use std::os::unix::fs::FileExt as _;
    let (file, len) = open_sealed_file(path)?;
    // Read whole only what the check and the filter read anyway: every
    // byte for a summed check, else the header, directory and footer, and
    // the items when few. A structure check of a file with many items
    // maps it and touches only its directory's pages. (The footer read
    // here is untrusted: a bad one takes the whole-file path, whose check
    // reports it.)
    let many_items = !summed && {
        let mut b = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut b, len - FOOTER_LEN as u64).is_ok()
            && Footer::decode(&b).is_ok_and(|f| f.item_count > READ_ITEMS_MAX)
    };
    if len > READ_MAX || many_items {
        let seg = SealedSegment::map_checked(path, file, check)?;
        return Ok(f(&seg.map, &seg.footer, seg.sums_if_known()));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::io(path, "read sealed segment", e))?;
    // A file that grew while read: not the length checked, so not what was
    // read; reported as the damage it is (a sealed file never changes).
    let now = file
        .metadata()
        .map_err(|e| Error::io(path, "stat sealed segment", e))?
        .len();
    if now != len {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("changed length while read ({len} then {now} bytes)"),
        ));
    }
    let (footer, sums) = check_bytes(path, &bytes, check)?;
    Ok(f(&bytes, &footer, sums))
}

/// The slots of a checked sealed file's directory that hold at least one
/// item, in order.
pub fn occupied_slots<'a>(bytes: &'a [u8], footer: &'a Footer) -> impl Iterator<Item = u32> + 'a {
    let n = if footer.item_count == 0 {
        0
    } else {
        footer.slot_count
    };
    (0..n).filter(move |s| dir_entry(bytes, footer, *s) < dir_entry(bytes, footer, *s + 1))
}

fn dir_entry(bytes: &[u8], footer: &Footer, slot: u32) -> u32 {
    let at = footer.dir_offset as usize + slot as usize * 4;
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Call `f` with every item's key hash of a sealed file (checked: its
/// footer is `footer`), in file order (slot order, so ascending by hash),
/// each item's CRC checked. False, part way through, when an item fails
/// its CRC or lies past the bytes: the caller then knows only some of the
/// keys.
pub fn for_each_key_hash(bytes: &[u8], footer: &Footer, mut f: impl FnMut(u64)) -> bool {
    for idx in 0..footer.item_count {
        let at = (footer.items_offset as usize).saturating_add(idx as usize * SEALED_ITEM_LEN);
        let Some(b) = bytes.get(at..at.saturating_add(SEALED_ITEM_LEN)) else {
            return false;
        };
        match format::decode_sealed_item(b, footer.segment_id) {
            Ok(e) => f(e.key_hash),
            Err(_) => return false,
        }
    }
    true
}

/// A sealed segment opened for reading (mmap, validated on open).
pub struct SealedSegment {
    path: PathBuf,
    map: Mmap,
    footer: Footer,
    /// Checksums of the whole file; computed at a full open, else on first
    /// use.
    sums: std::sync::OnceLock<format::FileSums>,
}

impl SealedSegment {
    /// Open and fully check a sealed file (footer, header, data CRC,
    /// directory, item checksums). Any failure is `Error::Corrupt`.
    pub fn open(path: &Path) -> Result<SealedSegment> {
        Self::open_checked(path, true)
    }

    /// Open with the structural checks only: length, footer (its own CRC),
    /// header, and the slot directory (its CRC). Reads a few KiB, not the
    /// whole file, so start-up cost does not grow with the segments kept
    /// locally. Item checksums are still checked by every lookup, and the
    /// whole-file CRC before any upload (against the journal).
    pub fn open_light(path: &Path) -> Result<SealedSegment> {
        Self::open_checked(path, false)
    }

    fn open_checked(path: &Path, full: bool) -> Result<SealedSegment> {
        Self::open_mode(path, if full { Check::Full } else { Check::Structure })
    }

    fn open_mode(path: &Path, check: Check) -> Result<SealedSegment> {
        let (file, _) = open_sealed_file(path)?;
        Self::map_checked(path, file, check)
    }

    /// Map `file` (opened from `path` by [`open_sealed_file`]) and check
    /// it (the check compares the footer's length with the map's).
    fn map_checked(path: &Path, file: File, check: Check) -> Result<SealedSegment> {
        // SAFETY: sealed files are never modified after the rename, and this
        // process holds the data directory lock, so no one truncates the file
        // under the mapping.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap sealed segment", e))?;
        drop(file);
        let (footer, sums) = check_bytes(path, &map, check)?;
        let lock = std::sync::OnceLock::new();
        if let Some(s) = sums {
            let _ = lock.set(s);
        }
        Ok(SealedSegment {
            path: path.to_path_buf(),
            map,
            footer,
            sums: lock,
        })
    }

    pub fn id(&self) -> SegmentId {
        self.footer.segment_id
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    pub fn meta(&self) -> SealedMeta {
        let sums = *self.sums.get_or_init(|| format::FileSums::of(&self.map));
        self.footer.meta(sums)
    }
    /// The whole file's checksums if a check or [`meta`](Self::meta)
    /// already computed them.
    pub fn sums_if_known(&self) -> Option<format::FileSums> {
        self.sums.get().copied()
    }
    /// Give the checksums an earlier check of this same file computed (the
    /// caller compared the footer), so `meta` does not read it again.
    pub(crate) fn set_sums(&self, sums: format::FileSums) {
        let _ = self.sums.set(sums);
    }

    fn dir_entry(&self, slot: u32) -> u32 {
        dir_entry(&self.map, &self.footer, slot)
    }

    /// Entries with this key hash and a timestamp in `range`, in append order.
    pub fn lookup(&self, key_hash: u64, range: TimeRange) -> Vec<Entry> {
        let f = &self.footer;
        if f.item_count == 0 || !range.overlaps(f.min_ts, f.max_ts) {
            return Vec::new();
        }
        let slot = slot_of(key_hash, f.slot_count);
        let (start, end) = (self.dir_entry(slot), self.dir_entry(slot + 1));
        let mut out = Vec::new();
        for idx in start..end {
            let at = f.items_offset as usize + idx as usize * SEALED_ITEM_LEN;
            // Checked at open; a failure here would mean the mapping changed.
            if let Ok(e) =
                format::decode_sealed_item(&self.map[at..at + SEALED_ITEM_LEN], f.segment_id)
                && e.key_hash == key_hash
                && range.contains(e.timestamp_ms)
            {
                out.push(e);
            }
        }
        out
    }

    /// As [`lookup`](Self::lookup), also counting the items of the key's
    /// slot whose CRC fails (bit rot since the file was checked): those
    /// are missing from the result, and the caller reports them.
    pub fn lookup_counting(&self, key_hash: u64, range: TimeRange) -> (Vec<Entry>, u32) {
        let f = &self.footer;
        if f.item_count == 0 || !range.overlaps(f.min_ts, f.max_ts) {
            return (Vec::new(), 0);
        }
        let slot = slot_of(key_hash, f.slot_count);
        let (start, end) = (self.dir_entry(slot), self.dir_entry(slot + 1));
        let mut out = Vec::new();
        let mut bad = 0u32;
        for idx in start..end.min(u32::try_from(f.item_count).unwrap_or(u32::MAX)) {
            let at = f.items_offset as usize + idx as usize * SEALED_ITEM_LEN;
            let Some(b) = self.map.get(at..at + SEALED_ITEM_LEN) else {
                bad += 1;
                continue;
            };
            match format::decode_sealed_item(b, f.segment_id) {
                Ok(e) if e.key_hash == key_hash && range.contains(e.timestamp_ms) => out.push(e),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
        (out, bad)
    }

    /// All entries, grouped by slot.
    pub fn entries(&self) -> Vec<Entry> {
        let f = &self.footer;
        let items = &self.map[f.items_offset as usize..(f.file_len as usize - FOOTER_LEN)];
        items
            .chunks_exact(SEALED_ITEM_LEN)
            .filter_map(|c| format::decode_sealed_item(c, f.segment_id).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn check_file_reads_small_files_and_maps_many_item_ones_alike() {
        let dir = tempfile::tempdir().unwrap();
        for (id, n, slots) in [(1u64, 10u64, 65_536u32), (2, 65, 16), (3, 3000, 16)] {
            let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, slots, &entries(n)).unwrap();
            let path = write_sealed_file(dir.path(), SegmentId(id), &bytes).unwrap();
            for summed in [false, true] {
                let (footer, sums, keys) = check_file(&path, summed, |b, f, s| {
                    let mut keys = 0;
                    let all = for_each_key_hash(b, f, |_| keys += 1);
                    (*f, s, all.then_some(keys))
                })
                .unwrap();
                assert_eq!(footer.item_count, n);
                assert_eq!(sums.is_some(), summed);
                if summed {
                    assert_eq!(sums.unwrap().crc32, meta.file_crc);
                }
                assert_eq!(keys, Some(n));
            }
            // Cut short or grown by a byte: damage reported, no panic.
            for cut in [bytes.len() - 1, bytes.len() + 1] {
                let mut b = bytes.clone();
                b.resize(cut, 0);
                std::fs::write(&path, &b).unwrap();
                for summed in [false, true] {
                    let e = check_file(&path, summed, |_, _, _| ()).unwrap_err();
                    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
                }
            }
        }
    }

    fn entries(n: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                key_hash: crate::key_hash(&(i % 17).to_le_bytes()),
                offset: 100 + i,
                size: i as u32,
                timestamp_ms: 1000 + i,
            })
            .collect()
    }

    #[test]
    fn write_open_lookup() {
        let d = tempfile::tempdir().unwrap();
        let es = entries(200);
        let (bytes, meta) = build_sealed(SegmentId(3), 1, 2, 8, &es).unwrap();
        assert_eq!(meta.file_crc, crc32fast::hash(&bytes));
        assert_eq!(meta.crc64, Some(format::crc64(&bytes)));
        assert!(meta.matches_bytes(&bytes));
        assert_eq!(meta.item_count, 200);
        assert_eq!((meta.min_offset, meta.max_offset), (100, 299));
        let p = write_sealed_file(d.path(), SegmentId(3), &bytes).unwrap();
        let s = SealedSegment::open(&p).unwrap();
        assert_eq!(s.meta(), meta);
        let k = crate::key_hash(&5u64.to_le_bytes());
        let got = s.lookup(k, TimeRange::ALL);
        let want: Vec<Entry> = es.iter().filter(|e| e.key_hash == k).copied().collect();
        assert_eq!(got, want);
        let narrow = s.lookup(
            k,
            TimeRange {
                from_ms: 1000,
                to_ms: 1010,
            },
        );
        assert_eq!(narrow.len(), 1);
        assert!(!d.path().join(sealed_tmp_name(SegmentId(3))).exists());
    }

    #[test]
    fn sealed_file_holds_a_stable_sort_by_slot_on_disk_and_in_memory() {
        let d = tempfile::tempdir().unwrap();
        for (n, slots) in [
            (0u64, 1u32),
            (1, 1),
            (200, 8),
            (70_000, 3),
            (70_000, 40_000),
            (5_000, 1 << 20),
        ] {
            let (bytes, meta) = build_sealed(SegmentId(n + 1), 1, 2, slots, &entries(n)).unwrap();
            let mut appended = Vec::new();
            for e in entries(n) {
                appended.extend_from_slice(&e.key_hash.to_le_bytes());
                appended.extend_from_slice(&e.offset.to_le_bytes());
                appended.extend_from_slice(&e.timestamp_ms.to_le_bytes());
                appended.extend_from_slice(&e.size.to_le_bytes());
            }
            let (p, m2) = write_sealed_streaming(
                d.path(),
                SegmentId(n + 1),
                1,
                2,
                slots,
                &appended,
                PACKED_ENTRY_LEN,
            )
            .unwrap();
            assert_eq!(m2, meta, "n={n} slots={slots}");
            assert_eq!(fs::read(&p).unwrap(), bytes, "n={n} slots={slots}");
            fs::remove_file(&p).unwrap();
            // Against a naive model: a stable sort of the appended entries by
            // slot is exactly the item order in the file.
            let mut model = entries(n);
            model.sort_by_key(|e| slot_of(e.key_hash, slots));
            let (footer, _) = format::check_sealed(&bytes).unwrap();
            let items = &bytes[footer.items_offset as usize..bytes.len() - FOOTER_LEN];
            let got: Vec<Entry> = items
                .chunks_exact(SEALED_ITEM_LEN)
                .map(|c| format::decode_sealed_item(c, SegmentId(n + 1)).unwrap())
                .collect();
            assert_eq!(got, model, "n={n} slots={slots}");
        }
    }

    /// The sealed file built the plain way, independently of `seal_into`:
    /// a stable sort by slot, `encode_sealed_item`, one CRC over the bytes.
    fn reference_sealed(
        id: SegmentId,
        created_ms: u64,
        sealed_ms: u64,
        slot_count: u32,
        es: &[Entry],
    ) -> Vec<u8> {
        let layout = SealedLayout::new(slot_count, es.len() as u32);
        let mut sorted = es.to_vec();
        sorted.sort_by_key(|e| slot_of(e.key_hash, slot_count));
        let mut dir = vec![0u32; slot_count as usize + 1];
        for e in es {
            dir[slot_of(e.key_hash, slot_count) as usize + 1] += 1;
        }
        for s in 0..slot_count as usize {
            dir[s + 1] += dir[s];
        }
        let header = Header {
            magic: SEALED_MAGIC,
            version: format::SEALED_FORMAT_VERSION,
            item_len: SEALED_ITEM_LEN as u32,
            segment_id: id,
            created_ms,
            slot_count,
            items: es.len() as u32,
        };
        let mut out = header.encode().to_vec();
        let dir_bytes: Vec<u8> = dir.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.extend_from_slice(&dir_bytes);
        for e in &sorted {
            let mut b = [0u8; SEALED_ITEM_LEN];
            format::encode_sealed_item(&mut b, id, e);
            out.extend_from_slice(&b);
        }
        let (min_ts, max_ts, min_offset, max_offset) = if es.is_empty() {
            (0, 0, 0, 0)
        } else {
            (
                es.iter().map(|e| e.timestamp_ms).min().unwrap(),
                es.iter().map(|e| e.timestamp_ms).max().unwrap(),
                es.iter().map(|e| e.offset).min().unwrap(),
                es.iter().map(|e| e.offset).max().unwrap(),
            )
        };
        let footer = Footer {
            segment_id: id,
            slot_count,
            item_count: es.len() as u64,
            min_ts,
            max_ts,
            min_offset,
            max_offset,
            created_ms,
            sealed_ms,
            file_len: layout.file_len,
            dir_offset: layout.dir_offset,
            items_offset: layout.items_offset,
            dir_crc: crc32fast::hash(&dir_bytes),
            data_crc: format::crc64(&out),
            version: format::SEALED_FORMAT_VERSION,
        };
        out.extend_from_slice(&footer.encode());
        out
    }

    fn packed(es: &[Entry], stride: usize) -> Vec<u8> {
        let mut v = vec![0xa5u8; es.len() * stride];
        for (e, out) in es.iter().zip(v.chunks_exact_mut(stride)) {
            out[0..8].copy_from_slice(&e.key_hash.to_le_bytes());
            out[8..16].copy_from_slice(&e.offset.to_le_bytes());
            out[16..24].copy_from_slice(&e.timestamp_ms.to_le_bytes());
            out[24..28].copy_from_slice(&e.size.to_le_bytes());
        }
        v
    }

    /// Random-ish entries (uniform hashes), plus a share of repeated keys so
    /// slots hold several items whose order must be kept.
    fn random_entries(n: u64, seed: u64) -> Vec<Entry> {
        let mut r = fastrand::Rng::with_seed(seed);
        (0..n)
            .map(|i| Entry {
                key_hash: if r.u8(..) < 64 {
                    crate::key_hash(&r.u64(..8).to_le_bytes())
                } else {
                    r.u64(..)
                },
                offset: i,
                size: r.u32(..),
                timestamp_ms: r.u64(..),
            })
            .collect()
    }

    #[test]
    fn item_crc_tables_match_crc32fast() {
        let mut r = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let salt = r.u64(..).to_le_bytes();
            let mut e = [0u8; PACKED_ENTRY_LEN];
            r.fill(&mut e);
            let base = {
                let mut h = crc32fast::Hasher::new();
                h.update(&salt);
                h.update(&[0u8; PACKED_ENTRY_LEN]);
                h.finalize()
            };
            let mut h = crc32fast::Hasher::new();
            h.update(&salt);
            h.update(&e);
            let w = |k: usize| le_u64(&e[8 * k..]);
            let last = u32::from_le_bytes([e[24], e[25], e[26], e[27]]);
            assert_eq!(item_crc(base, [w(0), w(1), w(2)], last), h.finalize());
        }
    }

    /// Both writers, on one and two threads, on bucket shapes from one slot
    /// to more slots than items, against the plain reference.
    #[test]
    fn seal_matches_the_plain_reference() {
        let d = tempfile::tempdir().unwrap();
        let cases: &[(u64, u32)] = &[
            (0, 1),
            (0, 1000),
            (1, 1),
            (3, 8),
            (100, 1),
            (1000, 1 << 20),
            (5000, 3),
            // Just under and over the two-thread threshold.
            (PARALLEL_MIN_ITEMS as u64 - 1, 4096),
            (PARALLEL_MIN_ITEMS as u64, 4096),
            // Many buckets, a partial last bucket (slot count not a power
            // of two), blocks filling exactly (BLOCK_RECS items per bucket).
            (100_000, 10_007),
            (300_000, 1 << 16),
            (BLOCK_RECS as u64 * 64, 64),
        ];
        for (k, &(n, slots)) in cases.iter().enumerate() {
            let id = SegmentId(k as u64 * 7919 + 3);
            let es = random_entries(n, k as u64);
            let want = reference_sealed(id, 11, 22, slots, &es);
            for stride in [PACKED_ENTRY_LEN, 40] {
                let items = packed(&es, stride);
                let (got, meta) = build_sealed_packed(id, 11, 22, slots, &items, stride).unwrap();
                assert!(got == want, "memory n={n} slots={slots} stride={stride}");
                assert_eq!(meta.file_crc, crc32fast::hash(&want));
                let (p, m2) =
                    write_sealed_streaming(d.path(), id, 11, 22, slots, &items, stride).unwrap();
                assert_eq!(m2, meta);
                assert!(fs::read(&p).unwrap() == want, "file n={n} slots={slots}");
                // A sealed file is never written over: the next stride's
                // seal of this id is refused while it is there.
                let err = write_sealed_streaming(d.path(), id, 11, 22, slots, &items, stride)
                    .unwrap_err();
                assert!(err.to_string().contains("already exists"), "{err}");
                assert!(fs::read(&p).unwrap() == want, "kept n={n} slots={slots}");
                assert!(!d.path().join(sealed_tmp_name(id)).exists());
                fs::remove_file(&p).unwrap();
            }
        }
    }

    /// Every item in one slot (one bucket takes the whole input).
    #[test]
    fn seal_with_every_item_in_one_slot() {
        let es: Vec<Entry> = (0..100_000u64)
            .map(|i| Entry {
                key_hash: 42,
                offset: i,
                size: 1,
                timestamp_ms: i,
            })
            .collect();
        let want = reference_sealed(SegmentId(9), 1, 2, 1 << 16, &es);
        let (got, _) =
            build_sealed_packed(SegmentId(9), 1, 2, 1 << 16, &packed(&es, 40), 40).unwrap();
        assert!(got == want);
    }

    #[test]
    fn bad_packed_input_is_an_error() {
        for (len, stride, slots) in [(41, 40, 8), (40, 27, 8), (40, 40, 0), (40, 40, u32::MAX)] {
            let r = build_sealed_packed(SegmentId(1), 1, 2, slots, &vec![0; len], stride);
            assert!(
                matches!(r, Err(Error::InvalidInput(_))),
                "{len} {stride} {slots}"
            );
        }
    }

    /// Rewrites a format-2 file as the format-1 file of the same items
    /// (header and footer version, CRC32 body checksum).
    fn as_v1(v2: &[u8]) -> Vec<u8> {
        let mut b = v2.to_vec();
        let n = b.len();
        let mut h = Header::decode(&b, SEALED_MAGIC, SEALED_ITEM_LEN).unwrap();
        h.version = format::FORMAT_VERSION;
        b[..HEADER_LEN].copy_from_slice(&h.encode());
        let mut f = Footer::decode(&b[n - FOOTER_LEN..]).unwrap();
        f.version = format::FORMAT_VERSION;
        f.data_crc = u64::from(crc32fast::hash(&b[..n - FOOTER_LEN]));
        b[n - FOOTER_LEN..].copy_from_slice(&f.encode());
        b
    }

    /// Swaps items `i` and `j` (indexes into the item area) in place.
    fn swap_items(b: &mut [u8], items_offset: usize, i: usize, j: usize) {
        let (i, j) = (i.min(j), i.max(j));
        let (lo, hi) = b.split_at_mut(items_offset + j * SEALED_ITEM_LEN);
        lo[items_offset + i * SEALED_ITEM_LEN..][..SEALED_ITEM_LEN]
            .swap_with_slice(&mut hi[..SEALED_ITEM_LEN]);
    }

    #[test]
    fn crc64_is_the_s3_crc64nvme() {
        // The CRC-64/NVME check value, and the base64 S3 shows for "".
        assert_eq!(format::crc64(b"123456789"), 0xae8b_1486_0a79_9888);
        assert_eq!(format::crc64(b""), 0);
        let (a, b) = (b"hello ".as_slice(), b"world".as_slice());
        assert_eq!(
            format::crc64_combine(format::crc64(a), format::crc64(b), b.len() as u64),
            format::crc64(b"hello world")
        );
    }

    /// Issue 10: the whole-file CRC32 of format 1 is blind to the items'
    /// bytes and order (each item ends with its own CRC32); the format-2
    /// CRC64 sees every byte and its position.
    #[test]
    fn file_checksum_sees_every_byte_and_every_swap() {
        let es = random_entries(24, 7);
        let (bytes, meta) = build_sealed(SegmentId(5), 1, 2, 4, &es).unwrap();
        let f = Footer::decode(&bytes[bytes.len() - FOOTER_LEN..]).unwrap();
        let items_offset = f.items_offset as usize;
        let c64 = meta.crc64.unwrap();
        // Every single-byte change, with several values per byte.
        for i in 0..bytes.len() {
            for x in [0x01u8, 0x80, 0xff, 0x5a] {
                let mut b = bytes.clone();
                b[i] ^= x;
                assert_ne!(format::crc64(&b), c64, "change at {i} by {x:#x} unseen");
            }
        }
        // Every swap of two different items.
        let mut crc32_blind = 0;
        for i in 0..es.len() {
            for j in i + 1..es.len() {
                let mut b = bytes.clone();
                swap_items(&mut b, items_offset, i, j);
                if b == bytes {
                    continue; // two identical items
                }
                assert_ne!(format::crc64(&b), c64, "swap {i}<->{j} unseen");
                assert!(format::check_sealed(&b).is_err(), "swap {i}<->{j} passes");
                if crc32fast::hash(&b) == meta.file_crc {
                    crc32_blind += 1;
                }
            }
        }
        // The weakness the new checksum exists for (kept as a fact, so the
        // docs' claim about format 1 stays checked).
        assert!(
            crc32_blind > 0,
            "format-1 CRC32 unexpectedly saw every swap"
        );
        // An item rewritten with a valid item CRC: same CRC32, other CRC64.
        let mut b = bytes.clone();
        let mut e = es[0];
        e.offset ^= 0xdead;
        let at = items_offset
            + (0..es.len())
                .find(|&k| {
                    format::decode_sealed_item(
                        &bytes[items_offset + k * SEALED_ITEM_LEN..][..SEALED_ITEM_LEN],
                        SegmentId(5),
                    )
                    .unwrap()
                        == es[0]
                })
                .unwrap()
                * SEALED_ITEM_LEN;
        format::encode_sealed_item(&mut b[at..at + SEALED_ITEM_LEN], SegmentId(5), &e);
        assert_eq!(crc32fast::hash(&b), meta.file_crc);
        assert_ne!(format::crc64(&b), c64);
        assert!(format::check_sealed(&b).is_err());
    }

    /// The start-up check (`check_sealed_sums`) skips the pass over the
    /// items for format 2 only because the body's CRC-64 sees every byte:
    /// any single-byte change and any swap of items fails it, and it
    /// returns the same sums as the full check. A format-1 file, whose
    /// body CRC is blind to swaps, still gets the full item check.
    #[test]
    fn startup_check_sees_what_the_full_check_sees() {
        let es = random_entries(24, 11);
        let (bytes, _) = build_sealed(SegmentId(6), 1, 2, 4, &es).unwrap();
        assert_eq!(
            format::check_sealed_sums(&bytes).unwrap(),
            format::check_sealed(&bytes).unwrap()
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                format::check_sealed_sums(&b).is_err(),
                "change at {i} passes"
            );
        }
        let f = Footer::decode(&bytes[bytes.len() - FOOTER_LEN..]).unwrap();
        let mut swapped = 0;
        for (i, j) in [(0, 1), (2, 9), (5, 23)] {
            let mut b = bytes.clone();
            swap_items(&mut b, f.items_offset as usize, i, j);
            if b != bytes {
                swapped += 1;
                assert!(
                    format::check_sealed_sums(&b).is_err(),
                    "swap {i}<->{j} passes"
                );
            }
        }
        assert!(swapped > 0);
        // Format 1: the swaps its CRC32 cannot see are caught by the items.
        let v1 = as_v1(&bytes);
        assert!(format::check_sealed_sums(&v1).is_ok());
        let f1 = Footer::decode(&v1[v1.len() - FOOTER_LEN..]).unwrap();
        for i in 0..es.len() {
            for j in i + 1..es.len() {
                let mut b = v1.clone();
                swap_items(&mut b, f1.items_offset as usize, i, j);
                if b != v1 {
                    assert_eq!(
                        format::check_sealed_sums(&b).is_err(),
                        format::check_sealed(&b).is_err(),
                        "swap {i}<->{j}"
                    );
                }
            }
        }
    }

    /// Different contents under one segment id never share a key.
    #[test]
    fn keys_of_different_contents_differ() {
        let mut seen = std::collections::HashMap::new();
        for seed in 0..300u64 {
            let es = random_entries(1 + seed % 40, seed);
            let (bytes, meta) = build_sealed(SegmentId(1), 1, 2, 8, &es).unwrap();
            if let Some(prev) = seen.insert(meta.key_sum(), bytes.clone()) {
                assert_eq!(prev, bytes, "two contents share key {}", meta.key_sum());
            }
        }
        assert!(seen.len() > 250);
    }

    /// Format-1 files stay readable: checked with their CRC32 body checksum,
    /// and their meta keeps no CRC64 (so their key stays the CRC32 one).
    #[test]
    fn format_1_files_stay_readable() {
        let d = tempfile::tempdir().unwrap();
        let es = entries(50);
        let (v2, m2) = build_sealed(SegmentId(8), 1, 2, 8, &es).unwrap();
        let v1 = as_v1(&v2);
        let (f, sums) = format::check_sealed(&v1).unwrap();
        assert_eq!(f.version, format::FORMAT_VERSION);
        let m1 = f.meta(sums);
        assert_eq!(m1.crc64, None);
        assert_eq!(m1.file_crc, crc32fast::hash(&v1));
        assert_eq!(m1.key_sum(), crate::segment::KeySum::Crc32(m1.file_crc));
        assert!(matches!(m2.key_sum(), crate::segment::KeySum::Crc64(_)));
        let p = write_sealed_file(d.path(), SegmentId(8), &v1).unwrap();
        let s = SealedSegment::open(&p).unwrap();
        assert_eq!(s.meta(), m1);
        let k = crate::key_hash(&3u64.to_le_bytes());
        assert_eq!(
            s.lookup(k, TimeRange::ALL),
            SealedSegment::open(&write_sealed_file(d.path(), SegmentId(8), &v2).unwrap())
                .unwrap()
                .lookup(k, TimeRange::ALL)
        );
        // A header of one version with a footer of the other is refused.
        let mut mixed = v2.clone();
        mixed[..HEADER_LEN].copy_from_slice(&v1[..HEADER_LEN]);
        assert!(format::check_sealed_structure(&mixed).is_err());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let (bytes, _) = build_sealed(SegmentId(1), 1, 2, 4, &entries(10)).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(format::check_sealed(&b).is_err(), "flip at {i} undetected");
        }
        for cut in 0..bytes.len() {
            assert!(format::check_sealed(&bytes[..cut]).is_err());
        }
    }
}
