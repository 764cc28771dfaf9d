//! The bodies of the tierindex fuzz targets, shared by `cargo fuzz`
//! (`fuzz/fuzz_targets/*.rs`, one line each) and by the seeded-random smoke
//! test the main crate runs in CI (`tests/parsers_fuzz_smoke.rs` includes this
//! file with `#[path]`). Each entry point takes arbitrary bytes, must never
//! panic on them, and asserts cheap structural properties of whatever the
//! parsers accept. See `docs/fuzzing.md`.
//!
//! Every format here is guarded by CRC32s, which a coverage-guided fuzzer
//! almost never gets right by mutation. So most targets read their first byte
//! as a *mode*: even = hand the bytes to the parser as they are, odd = first
//! repair what a flags byte selects (magic, lengths, layout, checksums, chain
//! links), so the checks behind the checksums get exercised too. With every
//! repair selected the result must be accepted: that also proves the parsers
//! take what they are supposed to take.
//!
//! Only `tierindex`, `crc32fast` and `toml` are used (all three are normal
//! dependencies of the main crate, so the smoke test can include this file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tierindex::Config;
use tierindex::journal::{
    Frame, HEADER_LEN as JOURNAL_HEADER_LEN, JournalState, Record, SegmentRecord, TailKind,
    decode_file, encode_frame, encode_header, replay_bytes,
};
use tierindex::segment::active::{self, ActiveSegment};
use tierindex::segment::format::{
    self, ACTIVE_ITEM_LEN, ACTIVE_MAGIC, ActiveItem, ActiveLayout, FOOTER_LEN, FOOTER_MAGIC,
    FORMAT_VERSION, Footer, HEADER_LEN, Header, MAX_ITEMS, MAX_SLOTS, SEALED_FORMAT_VERSION,
    SEALED_ITEM_LEN, SEALED_MAGIC, SealedLayout, slot_of,
};
use tierindex::segment::sealed::{SealedSegment, build_sealed};
use tierindex::segment::{Entry, SealedMeta, SegmentId, TimeRange};

// ---------------------------------------------------------------------------
// Little helpers
// ---------------------------------------------------------------------------

/// Reads little-endian integers from `b` at `at`; missing bytes read as zero.
fn rd<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    for (i, x) in a.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    a
}
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(rd(b, at))
}
fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(rd(b, at))
}
fn wr16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A cursor over fuzz bytes; reads past the end give zeros.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    pub fn u32(&mut self) -> u32 {
        let v = rd32(self.data, self.pos);
        self.pos += 4;
        v
    }
    pub fn u64(&mut self) -> u64 {
        let v = rd64(self.data, self.pos);
        self.pos += 8;
        v
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
}

static SCRATCH_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh file name in `dir` (unique per call and process).
fn scratch_path(dir: &Path, what: &str) -> PathBuf {
    let n = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{what}-{}-{n}", std::process::id()))
}

/// The scratch directory the `cargo fuzz` binaries use for the parsers that
/// read files: `/dev/shm` when there is one (no disk I/O, fsync is free),
/// else the temp dir. One directory per process, reused for every input.
pub fn process_scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("tierindex-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create fuzz scratch dir");
    dir
}

/// Removes `path` and whatever `open` saved next to it in `save_dir`.
fn remove_scratch(path: &Path, save_dir: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir_all(save_dir);
}

// ---------------------------------------------------------------------------
// Sealed segments: check_sealed (+ everything it calls), SealedSegment::open
// ---------------------------------------------------------------------------

/// Repairs selected by the second byte of a `segment_sealed` input.
pub mod sealed_fix {
    /// Reshape to the layout the footer's slot count (mod 64) implies, and
    /// write counts and offsets into the footer.
    pub const LAYOUT: u8 = 1;
    /// Stable-sort the items by slot and write a matching directory.
    pub const DIR: u8 = 2;
    /// Recompute every item checksum.
    pub const ITEM_CRC: u8 = 4;
    /// Footer min/max from the items.
    pub const RANGES: u8 = 8;
    /// Header: magic, version, lengths, reserved, fields agreeing with the
    /// footer, checksum.
    pub const HEADER: u8 = 16;
    /// Footer `dir_crc`.
    pub const DIR_CRC: u8 = 32;
    /// Footer `data_crc`.
    pub const DATA_CRC: u8 = 64;
    /// Footer magic, version, length, reserved, checksum.
    pub const FOOTER: u8 = 128;
    pub const ALL: u8 = 255;
}

/// Applies the repairs in `flags` (see [`sealed_fix`]) to `input` taken as a
/// sealed file (footer = its last 128 bytes).
pub fn fix_sealed(flags: u8, input: &[u8]) -> Vec<u8> {
    use sealed_fix::*;
    let mut file = input.to_vec();
    if file.len() < HEADER_LEN + FOOTER_LEN {
        file.resize(HEADER_LEN + FOOTER_LEN, 0);
    }
    let mut footer = file.split_off(file.len() - FOOTER_LEN);
    let mut body = file;
    if flags & LAYOUT != 0 {
        let slots = 1 + rd32(&footer, 12) % 64;
        let fixed = HEADER_LEN + (slots as usize + 1) * 4;
        if body.len() < fixed {
            body.resize(fixed, 0);
        }
        let n = (body.len() - fixed) / SEALED_ITEM_LEN;
        body.truncate(fixed + n * SEALED_ITEM_LEN);
        let l = SealedLayout::new(slots, n as u32);
        wr32(&mut footer, 12, slots);
        wr64(&mut footer, 24, n as u64);
        wr64(&mut footer, 80, l.file_len);
        wr64(&mut footer, 88, l.dir_offset);
        wr64(&mut footer, 96, l.items_offset);
    }
    let slots = rd32(&footer, 12);
    let n = rd64(&footer, 24);
    let id = rd64(&footer, 16);
    let layout = ((1..=MAX_SLOTS).contains(&slots) && n <= u64::from(MAX_ITEMS))
        .then(|| SealedLayout::new(slots, n as u32))
        .filter(|l| l.footer_offset == body.len() as u64);
    if let Some(l) = layout {
        let (dir_at, items_at) = (l.dir_offset as usize, l.items_offset as usize);
        if flags & DIR != 0 {
            let mut items: Vec<Vec<u8>> = body[items_at..]
                .chunks_exact(SEALED_ITEM_LEN)
                .map(<[u8]>::to_vec)
                .collect();
            items.sort_by_key(|it| slot_of(rd64(it, 0), slots)); // stable
            let mut dir = vec![0u32; slots as usize + 1];
            for it in &items {
                dir[slot_of(rd64(it, 0), slots) as usize + 1] += 1;
            }
            for s in 0..slots as usize {
                dir[s + 1] += dir[s];
            }
            for (i, v) in dir.iter().enumerate() {
                wr32(&mut body, dir_at + i * 4, *v);
            }
            body.truncate(items_at);
            body.extend(items.concat());
        }
        if flags & ITEM_CRC != 0 {
            for it in body[items_at..].chunks_exact_mut(SEALED_ITEM_LEN) {
                let e = Entry {
                    key_hash: rd64(it, 0),
                    offset: rd64(it, 8),
                    timestamp_ms: rd64(it, 16),
                    size: rd32(it, 24),
                };
                format::encode_sealed_item(it, SegmentId(id), &e);
            }
        }
        if flags & RANGES != 0 {
            let (mut min_ts, mut max_ts, mut min_off, mut max_off) = (u64::MAX, 0, u64::MAX, 0);
            for it in body[items_at..].chunks_exact(SEALED_ITEM_LEN) {
                min_off = min_off.min(rd64(it, 8));
                max_off = max_off.max(rd64(it, 8));
                min_ts = min_ts.min(rd64(it, 16));
                max_ts = max_ts.max(rd64(it, 16));
            }
            if n == 0 {
                (min_ts, max_ts, min_off, max_off) = (0, 0, 0, 0);
            }
            wr64(&mut footer, 32, min_ts);
            wr64(&mut footer, 40, max_ts);
            wr64(&mut footer, 48, min_off);
            wr64(&mut footer, 56, max_off);
        }
        if flags & DIR_CRC != 0 {
            wr32(&mut footer, 104, crc32fast::hash(&body[dir_at..items_at]));
        }
    }
    if flags & HEADER != 0 {
        let h = Header {
            magic: SEALED_MAGIC,
            version: SEALED_FORMAT_VERSION,
            item_len: SEALED_ITEM_LEN as u32,
            segment_id: SegmentId(id),
            created_ms: rd64(&footer, 64),
            slot_count: slots,
            items: n as u32,
        };
        body[..HEADER_LEN].copy_from_slice(&h.encode());
    }
    if flags & DATA_CRC != 0 {
        wr64(&mut footer, 108, format::crc64(&body));
    }
    if flags & FOOTER != 0 {
        footer[0..8].copy_from_slice(&FOOTER_MAGIC);
        wr16(&mut footer, 8, SEALED_FORMAT_VERSION);
        wr16(&mut footer, 10, FOOTER_LEN as u16);
        footer[116..124].fill(0);
        let crc = crc32fast::hash(&footer[..124]);
        wr32(&mut footer, 124, crc);
    }
    body.extend_from_slice(&footer);
    body
}

/// `check_sealed` on `file`; when it accepts, check what it promises.
/// Returns whether it accepted.
pub fn check_sealed_bytes(file: &[u8]) -> bool {
    let Ok((footer, sums)) = format::check_sealed(file) else {
        return false;
    };
    let len = file.len();
    assert_eq!(footer.file_len, len as u64, "accepted: footer file_len");
    assert_eq!(
        sums,
        format::FileSums::of(file),
        "accepted: whole-file sums"
    );
    // Every piece also decodes on its own, as a remote reader takes them.
    let fo = len - FOOTER_LEN;
    assert_eq!(Footer::decode(&file[fo..]).ok(), Some(footer));
    assert_eq!(
        footer.encode()[..],
        file[fo..],
        "accepted footer re-encodes"
    );
    let h = Header::decode(file, SEALED_MAGIC, SEALED_ITEM_LEN).expect("accepted: header");
    assert_eq!(
        h.encode()[..],
        file[..HEADER_LEN],
        "accepted header re-encodes"
    );
    assert_eq!(
        (h.segment_id, h.created_ms, h.slot_count, u64::from(h.items)),
        (
            footer.segment_id,
            footer.created_ms,
            footer.slot_count,
            footer.item_count
        )
    );
    let l = footer.layout();
    assert_eq!(l.file_len, len as u64);
    let dir = format::decode_slot_dir(
        &file[l.dir_offset as usize..l.items_offset as usize],
        footer.slot_count,
        footer.item_count,
        footer.dir_crc,
    )
    .expect("accepted: slot directory");
    assert_eq!(dir.len(), footer.slot_count as usize + 1);
    let entries: Vec<Entry> = file[l.items_offset as usize..fo]
        .chunks_exact(SEALED_ITEM_LEN)
        .map(|c| format::decode_sealed_item(c, footer.segment_id).expect("accepted: item"))
        .collect();
    assert_eq!(entries.len() as u64, footer.item_count);
    // An accepted file is canonical: sealing its entries again gives the same
    // bytes. The footer's min/max are the exception: check_sealed only checks
    // min <= max, not that they match the items, so take them from the file.
    let (mut again, meta) = build_sealed(
        footer.segment_id,
        footer.created_ms,
        footer.sealed_ms,
        footer.slot_count,
        &entries,
    )
    .expect("accepted entries seal again");
    let v1 = footer.version == FORMAT_VERSION;
    if v1 {
        // The same items in format 1: header and footer version, and the
        // CRC32 body checksum.
        let mut h = Header::decode(&again, SEALED_MAGIC, SEALED_ITEM_LEN).expect("own header");
        h.version = FORMAT_VERSION;
        again[..HEADER_LEN].copy_from_slice(&h.encode());
        let mut f = Footer::decode(&again[fo..]).expect("own footer");
        f.version = FORMAT_VERSION;
        f.data_crc = u64::from(crc32fast::hash(&again[..fo]));
        again[fo..].copy_from_slice(&f.encode());
    }
    let ranges_match = again[fo + 32..fo + 64] == file[fo + 32..fo + 64];
    again[fo + 32..fo + 64].copy_from_slice(&file[fo + 32..fo + 64]);
    let crc = crc32fast::hash(&again[fo..fo + 124]);
    wr32(&mut again, fo + 124, crc);
    assert!(again == file, "accepted sealed file is not canonical");
    if ranges_match {
        let want = if v1 {
            SealedMeta {
                file_crc: crc32fast::hash(file),
                crc64: None,
                ..meta
            }
        } else {
            meta
        };
        assert_eq!(want, footer.meta(sums));
    }
    true
}

/// Opens an accepted sealed file through [`SealedSegment`] and looks every
/// entry up again.
fn sealed_open_and_lookup(file: &[u8], scratch: &Path) {
    let path = scratch_path(scratch, "sealed");
    std::fs::write(&path, file).expect("write scratch sealed file");
    let seg = SealedSegment::open(&path).expect("check_sealed accepted, open must too");
    let (footer, file_crc) = format::check_sealed(file).expect("accepted before");
    assert_eq!(seg.meta(), footer.meta(file_crc));
    let entries = seg.entries();
    assert_eq!(entries.len() as u64, footer.item_count);
    for e in entries.iter().take(64) {
        let found = seg.lookup(e.key_hash, TimeRange::ALL);
        let ranged = TimeRange {
            from_ms: e.timestamp_ms,
            to_ms: e.timestamp_ms,
        };
        assert!(found.contains(e), "entry not found by its key");
        // The footer's min/max gate ranged lookups; where they cover the
        // entry it is found by its own timestamp too.
        if footer.min_ts <= e.timestamp_ms && e.timestamp_ms <= footer.max_ts {
            assert!(seg.lookup(e.key_hash, ranged).contains(e));
        }
    }
    drop(seg);
    let _ = std::fs::remove_file(&path);
}

/// Target `segment_sealed`: `[mode][flags][file...]`. Even mode: `file` as
/// it is; odd mode: repaired by `flags` first (see [`sealed_fix`]).
pub fn sealed(data: &[u8], scratch: &Path) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if check_sealed_bytes(rest) {
            sealed_open_and_lookup(rest, scratch);
        }
        return;
    }
    let Some((&flags, rest)) = rest.split_first() else {
        return;
    };
    let file = fix_sealed(flags, rest);
    let ok = check_sealed_bytes(&file);
    if flags == sealed_fix::ALL {
        assert!(ok, "a fully repaired sealed file was rejected");
    }
    if ok && mode & 2 != 0 {
        sealed_open_and_lookup(&file, scratch);
    }
}

// ---------------------------------------------------------------------------
// Active segments: check_active, read_entries, and ActiveSegment::open
// ---------------------------------------------------------------------------

/// Repairs selected by the second byte of a `segment_active` input.
pub mod active_fix {
    /// Magic, version, header and item length, reserved bytes.
    pub const HEADER: u8 = 1;
    /// Slot count into 1..=64, item capacity into 1..=512.
    pub const SIZES: u8 = 2;
    /// Header checksum.
    pub const HEADER_CRC: u8 = 4;
    /// Item reserved bytes and checksums (binding segment id and index).
    pub const ITEM_CRC: u8 = 8;
    /// Chain links: each item's `prev` is its slot's previous item.
    pub const CHAIN: u8 = 16;
    /// Pad or cut the file to exactly the length the header implies.
    pub const EXACT_LEN: u8 = 32;
    /// Place the items at the header's items offset (else they follow the
    /// header directly, as raw bytes).
    pub const PLACE: u8 = 64;
    /// Finally cut 0..=40 bytes (the input's first byte mod 41) off the end:
    /// a file someone truncated, maybe inside an item.
    pub const CUT: u8 = 128;
    /// Every repair (not `CUT`).
    pub const ALL: u8 = 127;
}

/// Largest active file the target lets `ActiveSegment::open` extend.
const OPEN_LIMIT: u64 = 4 << 20;

/// Builds an active file from `[header 64][item bytes...]`, repaired by
/// `flags` (see [`active_fix`]).
pub fn fix_active(flags: u8, input: &[u8]) -> Vec<u8> {
    use active_fix::*;
    let mut hdr = rd::<HEADER_LEN>(input, 0);
    let cut = usize::from(hdr[0] % 41);
    let mut items = input.get(HEADER_LEN..).unwrap_or_default().to_vec();
    if flags & HEADER != 0 {
        hdr[0..8].copy_from_slice(&ACTIVE_MAGIC);
        wr16(&mut hdr, 8, FORMAT_VERSION);
        wr16(&mut hdr, 10, HEADER_LEN as u16);
        wr32(&mut hdr, 12, ACTIVE_ITEM_LEN as u32);
        hdr[40..60].fill(0);
    }
    if flags & SIZES != 0 {
        let slots = 1 + rd32(&hdr, 32) % 64;
        let cap = 1 + rd32(&hdr, 36) % 512;
        wr32(&mut hdr, 32, slots);
        wr32(&mut hdr, 36, cap);
    }
    if flags & HEADER_CRC != 0 {
        let crc = crc32fast::hash(&hdr[..60]);
        wr32(&mut hdr, 60, crc);
    }
    let id = SegmentId(rd64(&hdr, 16));
    let (slots, cap) = (rd32(&hdr, 32), rd32(&hdr, 36));
    let layout = ActiveLayout::new(slots, cap)
        .ok()
        .filter(|l| l.file_len <= OPEN_LIMIT);
    // Chain repair needs a table of slot heads: only for modest slot counts.
    if flags & (ITEM_CRC | CHAIN) != 0 && (1..=1 << 16).contains(&slots) {
        let mut heads = vec![0u32; slots as usize];
        for (i, it) in items.chunks_exact_mut(ACTIVE_ITEM_LEN).enumerate() {
            let mut item = ActiveItem {
                entry: Entry {
                    key_hash: rd64(it, 0),
                    offset: rd64(it, 8),
                    timestamp_ms: rd64(it, 16),
                    size: rd32(it, 24),
                },
                prev: rd32(it, 28),
            };
            if flags & CHAIN != 0 {
                let s = slot_of(item.entry.key_hash, slots) as usize;
                item.prev = heads[s];
                heads[s] = i as u32 + 1;
                wr32(it, 28, item.prev);
            }
            if flags & ITEM_CRC != 0 {
                format::encode_active_item(it, id, i as u32, &item);
            }
        }
    }
    let mut file = hdr.to_vec();
    match layout {
        Some(l) if flags & PLACE != 0 => {
            file.resize(l.items_offset as usize, 0);
            file.append(&mut items);
            if flags & EXACT_LEN != 0 {
                file.resize(l.file_len as usize, 0);
            }
        }
        _ => file.append(&mut items),
    }
    if flags & CUT != 0 {
        file.truncate(file.len().saturating_sub(cut).max(HEADER_LEN));
    }
    file
}

/// `check_active` and `read_entries` on `file`, and, when the header is sane
/// and small, `ActiveSegment::open` on it: the read-only check must predict
/// exactly what open keeps and zeroes, and a second check after open must
/// find nothing left to repair. Returns whether `check_active` accepted.
pub fn check_active_bytes(file: &[u8], scratch: &Path) -> bool {
    let path = scratch_path(scratch, "active");
    let save_dir = PathBuf::from(format!("{}.saved", path.display()));
    std::fs::write(&path, file).expect("write scratch active file");
    let checked = active::check_active(&path);
    let read = active::read_entries(&path);
    if let Ok((id, rec)) = &checked {
        let (rid, entries) = read
            .as_ref()
            .expect("check_active accepted, read_entries must");
        assert_eq!(id, rid);
        assert_eq!(entries.len(), rec.valid_items as usize);
        let h = Header::decode(file, ACTIVE_MAGIC, ACTIVE_ITEM_LEN).expect("accepted header");
        assert!(rec.valid_items <= h.items);
        let l = ActiveLayout::new(h.slot_count, h.items).expect("accepted layout");
        assert!(file.len() as u64 <= l.file_len);
        assert_eq!(
            rec.extended_from,
            ((file.len() as u64) < l.file_len).then_some(file.len() as u64)
        );
    }
    let small = Header::decode(file, ACTIVE_MAGIC, ACTIVE_ITEM_LEN)
        .ok()
        .and_then(|h| ActiveLayout::new(h.slot_count, h.items).ok())
        .is_some_and(|l| l.file_len <= OPEN_LIMIT);
    if small {
        std::fs::create_dir_all(&save_dir).expect("create scratch save dir");
        let opened = ActiveSegment::open(&path, Some(&save_dir));
        assert_eq!(
            checked.is_ok(),
            opened.is_ok(),
            "check_active and open disagree: {:?} vs {:?}",
            checked.as_ref().err(),
            opened.as_ref().err()
        );
        if let (Ok((id, rec)), Ok((seg, orec))) = (&checked, opened) {
            assert_eq!(seg.id(), *id);
            assert_eq!(orec.valid_items, rec.valid_items, "kept items");
            assert_eq!(
                orec.torn_bytes_zeroed, rec.torn_bytes_zeroed,
                "zeroed bytes"
            );
            assert_eq!(orec.extended_from, rec.extended_from);
            assert_eq!(seg.len(), rec.valid_items);
            let entries = seg.entries();
            assert_eq!(Some(&entries), read.as_ref().ok().map(|r| &r.1));
            for e in entries.iter().take(32) {
                let found = seg.lookup(e.key_hash, TimeRange::ALL, u32::MAX);
                assert!(found.entries.contains(e), "recovered entry not found");
            }
            drop(seg);
            // Recovery is idempotent: nothing is left to zero or extend.
            let (id2, rec2) = active::check_active(&path).expect("recovered file checks");
            assert_eq!(id2, *id);
            assert_eq!(rec2.valid_items, rec.valid_items);
            assert_eq!(rec2.torn_bytes_zeroed, 0);
            assert_eq!(rec2.extended_from, None);
            let (_, entries2) = active::read_entries(&path).expect("recovered file reads");
            assert_eq!(entries2, entries);
        }
    }
    remove_scratch(&path, &save_dir);
    checked.is_ok()
}

/// Target `segment_active`: `[mode][flags][header 64][items...]`. Even
/// mode: everything after the mode byte is the file; odd: built and repaired
/// by [`fix_active`].
pub fn active(data: &[u8], scratch: &Path) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_active_bytes(rest, scratch);
        return;
    }
    let Some((&flags, rest)) = rest.split_first() else {
        return;
    };
    let file = fix_active(flags, rest);
    let ok = check_active_bytes(&file, scratch);
    if flags & active_fix::ALL == active_fix::ALL {
        assert!(ok, "a fully repaired active file was rejected");
    }
}

// ---------------------------------------------------------------------------
// Footer, header, items, slot directory: the piecewise decoders
// ---------------------------------------------------------------------------

fn footer_bytes(b: &[u8]) {
    if let Ok(f) = Footer::decode(b) {
        assert_eq!(b.len(), FOOTER_LEN);
        assert_eq!(f.encode()[..], b[..], "accepted footer re-encodes");
        assert!(f.slot_count >= 1 && f.slot_count <= MAX_SLOTS);
        assert!(f.item_count <= u64::from(MAX_ITEMS));
        let l = f.layout();
        assert_eq!(
            (l.file_len, l.dir_offset, l.items_offset),
            (f.file_len, f.dir_offset, f.items_offset)
        );
        assert_eq!(l.footer_offset + FOOTER_LEN as u64, f.file_len);
        if f.item_count > 0 {
            assert!(f.min_ts <= f.max_ts && f.min_offset <= f.max_offset);
        }
        let _ = f.meta(format::FileSums { crc32: 0, crc64: 0 });
    }
}

fn header_bytes(b: &[u8]) {
    for (magic, item_len) in [
        (ACTIVE_MAGIC, ACTIVE_ITEM_LEN),
        (SEALED_MAGIC, SEALED_ITEM_LEN),
    ] {
        if let Ok(h) = Header::decode(b, magic, item_len) {
            assert_eq!(
                h.encode()[..],
                b[..HEADER_LEN],
                "accepted header re-encodes"
            );
            assert!(h.slot_count >= 1 && h.slot_count <= MAX_SLOTS && h.items <= MAX_ITEMS);
        }
    }
}

fn item_bytes(b: &[u8], id: SegmentId, index: u32) {
    if let Ok(e) = format::decode_sealed_item(b, id) {
        let mut out = [0u8; SEALED_ITEM_LEN];
        format::encode_sealed_item(&mut out, id, &e);
        assert_eq!(
            out[..],
            b[..SEALED_ITEM_LEN],
            "accepted sealed item re-encodes"
        );
    }
    if let Some(it) = format::decode_active_item(b, id, index) {
        let mut out = [0u8; ACTIVE_ITEM_LEN];
        format::encode_active_item(&mut out, id, index, &it);
        assert_eq!(
            out[..],
            b[..ACTIVE_ITEM_LEN],
            "accepted active item re-encodes"
        );
    }
}

fn slot_dir_bytes(b: &[u8], slot_count: u32, item_count: u64, crc: u32) {
    if let Ok(dir) = format::decode_slot_dir(b, slot_count, item_count, crc) {
        assert_eq!(dir.len(), slot_count as usize + 1);
        assert_eq!(dir.first(), Some(&0));
        assert_eq!(dir.last().map(|v| u64::from(*v)), Some(item_count));
        assert!(dir.windows(2).all(|w| w[0] <= w[1]));
    }
}

/// Target `footer`: `[mode][...]`, mode % 4:
/// 0: the rest as a footer, a header (both kinds), an item (both kinds), and
///    `[slot_count u32][item_count u64][crc u32][dir...]` as a slot directory;
/// 1: `[flags][128 bytes]` a footer repaired by flags (1 magic/version/length/
///    reserved, 2 counts in range, 4 layout fields, 8 ranges ordered,
///    16 checksum), which must decode when all five are set;
/// 2: `[flags][64 bytes]` a header likewise (1 magic..reserved, 2 sizes in
///    range, 4 checksum; 8 picks the sealed kind);
/// 3: `[item_count u64][dir...]` a slot directory with a correct checksum.
pub fn footer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            footer_bytes(rest);
            header_bytes(rest);
            item_bytes(
                rest,
                SegmentId(rd64(rest, 0) & 0xff),
                u32::from(rest.len() as u8),
            );
            item_bytes(rest, SegmentId(0), 0);
            let dir = rest.get(16..).unwrap_or_default();
            slot_dir_bytes(dir, rd32(rest, 0), rd64(rest, 4), rd32(rest, 12));
            slot_dir_bytes(
                dir,
                (dir.len() / 4).saturating_sub(1) as u32,
                rd64(rest, 4),
                crc32fast::hash(dir),
            );
        }
        1 => {
            let Some((&flags, rest)) = rest.split_first() else {
                return;
            };
            let mut f = rd::<FOOTER_LEN>(rest, 0);
            if flags & 1 != 0 {
                f[0..8].copy_from_slice(&FOOTER_MAGIC);
                wr16(&mut f, 8, FORMAT_VERSION);
                wr16(&mut f, 10, FOOTER_LEN as u16);
                f[112..124].fill(0);
            }
            if flags & 2 != 0 {
                let (slots, items) = (rd32(&f, 12), rd64(&f, 24));
                wr32(&mut f, 12, 1 + slots % MAX_SLOTS);
                wr64(&mut f, 24, items % (u64::from(MAX_ITEMS) + 1));
            }
            if flags & 4 != 0 {
                let l = SealedLayout::new(rd32(&f, 12), rd64(&f, 24).min(u32::MAX.into()) as u32);
                wr64(&mut f, 80, l.file_len);
                wr64(&mut f, 88, l.dir_offset);
                wr64(&mut f, 96, l.items_offset);
            }
            if flags & 8 != 0 {
                for at in [32, 48] {
                    let (a, b) = (rd64(&f, at), rd64(&f, at + 8));
                    wr64(&mut f, at, a.min(b));
                    wr64(&mut f, at + 8, a.max(b));
                }
            }
            if flags & 16 != 0 {
                let crc = crc32fast::hash(&f[..124]);
                wr32(&mut f, 124, crc);
            }
            footer_bytes(&f);
            if flags & 31 == 31 {
                assert!(
                    Footer::decode(&f).is_ok(),
                    "a fully repaired footer was rejected"
                );
            }
        }
        2 => {
            let Some((&flags, rest)) = rest.split_first() else {
                return;
            };
            let (magic, item_len) = if flags & 8 != 0 {
                (SEALED_MAGIC, SEALED_ITEM_LEN)
            } else {
                (ACTIVE_MAGIC, ACTIVE_ITEM_LEN)
            };
            let mut h = rd::<HEADER_LEN>(rest, 0);
            if flags & 1 != 0 {
                h[0..8].copy_from_slice(&magic);
                wr16(&mut h, 8, FORMAT_VERSION);
                wr16(&mut h, 10, HEADER_LEN as u16);
                wr32(&mut h, 12, item_len as u32);
                h[40..60].fill(0);
            }
            if flags & 2 != 0 {
                let (slots, items) = (rd32(&h, 32), rd32(&h, 36));
                wr32(&mut h, 32, 1 + slots % MAX_SLOTS);
                wr32(&mut h, 36, items % (MAX_ITEMS + 1));
            }
            if flags & 4 != 0 {
                let crc = crc32fast::hash(&h[..60]);
                wr32(&mut h, 60, crc);
            }
            header_bytes(&h);
            if flags & 7 == 7 {
                assert!(
                    Header::decode(&h, magic, item_len).is_ok(),
                    "a fully repaired header was rejected"
                );
            }
        }
        _ => {
            let dir = rest.get(8..).unwrap_or_default();
            let slots = (dir.len() / 4).saturating_sub(1) as u32;
            let crc = crc32fast::hash(dir);
            slot_dir_bytes(dir, slots, rd64(rest, 0), crc);
            // The directory's own last entry as the item count.
            let last = rd32(dir, dir.len().saturating_sub(4));
            slot_dir_bytes(dir, slots, u64::from(last), crc);
        }
    }
}

// ---------------------------------------------------------------------------
// Journal: decode_file, replay_bytes
// ---------------------------------------------------------------------------

/// `decode_file` and `replay_bytes` on `bytes`, with their invariants:
/// frames are contiguous, the valid prefix and the tail report agree, and the
/// prefix `Journal::open` keeps replays to the same state with no tail.
/// Returns the replay when the header was good.
pub fn check_journal_bytes(bytes: &[u8]) -> Option<tierindex::journal::Replayed> {
    let decoded = decode_file(bytes);
    let replayed = replay_bytes(bytes);
    assert_eq!(
        decoded.is_ok(),
        replayed.is_ok(),
        "decode and replay disagree"
    );
    let (d, r) = (decoded.ok()?, replayed.ok()?);
    let len = bytes.len() as u64;
    let hl = JOURNAL_HEADER_LEN as u64;
    assert!(hl <= d.valid_len && d.valid_len <= len);
    assert_eq!(d.tail.is_none(), d.valid_len == len);
    let mut at = hl;
    for f in &d.frames {
        assert_eq!(f.offset, at, "frames are contiguous");
        at += f.len;
    }
    assert_eq!(at, d.valid_len);
    if let Some(t) = &d.tail {
        assert_eq!(t.offset, d.valid_len);
    }
    assert!(hl <= r.valid_len && r.valid_len <= d.valid_len);
    assert_eq!(r.report.truncated_bytes, len - r.valid_len);
    assert_eq!(
        r.report.torn_tail_at,
        (r.valid_len < len).then_some(r.valid_len)
    );
    match &r.report.tail {
        Some(t) => assert_eq!(t.offset, r.valid_len),
        None => assert_eq!(r.valid_len, len),
    }
    assert_eq!(r.report.generation, d.header.generation);
    assert_eq!(r.report.segments, r.state.segments().len());
    for (id, rec) in r.state.segments() {
        assert_eq!(*id, rec.meta.id);
        assert!(r.state.max_segment_id() >= Some(*id));
    }
    // What a read-write open keeps (it truncates at valid_len) replays to
    // the same state, with nothing left to cut.
    let kept = replay_bytes(&bytes[..r.valid_len as usize]).expect("kept prefix replays");
    assert_eq!(kept.state, r.state);
    assert_eq!(kept.valid_len, r.valid_len);
    assert_eq!(kept.report.tail, None);
    assert_eq!(kept.report.records_replayed, r.report.records_replayed);
    assert_eq!(kept.report.snapshot_segments, r.report.snapshot_segments);
    Some(r)
}

/// One frame with a correct (or, with `bad_crc`, a wrong) checksum around an
/// arbitrary payload.
fn raw_frame(payload: &[u8], bad_crc: bool, out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    let crc = h.finalize() ^ u32::from(bad_crc);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

fn small_string(c: &mut Cursor, prefix: &str) -> String {
    const ODD: [&str; 6] = ["", "\"", "\\", "\u{0}", "é", "\u{1F600}"];
    let v = c.u8();
    format!("{prefix}{}{}", v % 10, ODD[usize::from(v / 10) % ODD.len()])
}

fn opt_string(c: &mut Cursor, prefix: &str) -> Option<String> {
    (c.u8() & 1 == 1).then(|| small_string(c, prefix))
}

/// A record steered by `c`, usually one the state machine accepts.
fn gen_record(c: &mut Cursor, model: &JournalState) -> Record {
    let pick = c.u8();
    let known: Vec<&SegmentRecord> = model.segments().values().collect();
    let id = if known.is_empty() || pick & 0x80 != 0 {
        SegmentId(u64::from(c.u8() % 8))
    } else {
        known[usize::from(c.u8()) % known.len()].meta.id
    };
    let cur = model.get(id);
    match pick % 8 {
        0 => {
            let next = model.max_segment_id().map_or(0, |m| m.0.saturating_add(1));
            let id = if c.u8() & 3 == 0 { id } else { SegmentId(next) };
            let (a, b) = (c.u64(), c.u64());
            Record::Sealed {
                meta: SealedMeta {
                    id,
                    file_len: c.u64(),
                    file_crc: c.u32(),
                    crc64: None,
                    item_count: c.u64(),
                    min_ts: a.min(b),
                    max_ts: a.max(b),
                    min_offset: a,
                    max_offset: b,
                    created_ms: c.u64(),
                    sealed_ms: c.u64(),
                },
            }
        }
        1 => Record::Uploading {
            id,
            attempt: cur
                .map_or(0, |r| r.attempt)
                .wrapping_add(u32::from(c.u8() % 3)),
            key: if c.u8().is_multiple_of(8) {
                String::new()
            } else {
                small_string(c, "stream/k")
            },
            multipart_id: opt_string(c, "mp"),
        },
        2 => Record::MultipartAborted {
            id,
            multipart_id: match cur.and_then(|r| r.multipart_id.clone()) {
                Some(m) if c.u8() & 1 == 0 => m,
                _ => small_string(c, "mp"),
            },
        },
        3 => Record::Uploaded {
            id,
            etag: opt_string(c, "etag"),
            version: opt_string(c, "v"),
        },
        4 => Record::Verified { id },
        5 => Record::Committed { id },
        6 => Record::Released { id },
        _ => Record::Quarantined {
            id,
            reason: small_string(c, "why"),
        },
    }
}

/// A journal written like the real writer writes it (only batches the state
/// machine accepts; compaction = header + `MaxId` + one `Snapshot` per live
/// segment), then replayed whole, cut, and with one bit flipped.
fn journal_model(data: &[u8]) {
    let mut c = Cursor::new(data);
    let cut_seed = c.u32();
    let flip_seed = c.u32();
    let mut generation = 1 + u64::from(c.u8());
    let mut file = encode_header(generation).to_vec();
    let mut model = JournalState::default();
    // (end offset of each frame, state after it); the header is frame "-1".
    // States after snapshot frames are not tracked (None): only lengths are checked there.
    let mut ends: Vec<(usize, Option<JournalState>)> = vec![(file.len(), Some(model.clone()))];
    let mut records = 0u64;
    let mut snapshots = 0u64;
    // Set when the file ends in a frame replay must refuse as Inconsistent,
    // or in bytes that are garbage.
    let mut bad_tail: Option<TailKind> = None;
    while !c.is_empty() && bad_tail.is_none() && file.len() < 1 << 16 {
        match c.u8() % 16 {
            0..=10 => {
                let n = 1 + usize::from(c.u8() % 4);
                let mut staged = model.clone();
                let mut batch = Vec::new();
                for _ in 0..n {
                    batch.push(gen_record(&mut c, &staged));
                    // Later records are generated against earlier ones.
                    let _ = staged.apply(&batch[batch.len() - 1..]);
                }
                if model.apply(&batch).is_ok() {
                    encode_frame(&Frame::Batch(batch.clone()), &mut file).expect("encode");
                    records += batch.len() as u64;
                    ends.push((file.len(), Some(model.clone())));
                } else if c.u8().is_multiple_of(8) {
                    // Intact by CRC but illegal: replay must stop here.
                    encode_frame(&Frame::Batch(batch), &mut file).expect("encode");
                    bad_tail = Some(TailKind::Inconsistent);
                }
            }
            11 | 12 => {
                // Compaction, as `compact::write_snapshot_file` writes it.
                generation += 1;
                model = model.without_released();
                file = encode_header(generation).to_vec();
                ends = vec![(file.len(), Some(JournalState::default()))];
                encode_frame(&Frame::MaxId(model.max_segment_id()), &mut file).expect("encode");
                // The state after the MaxId frame alone has no public
                // constructor: replay those few bytes.
                ends.push((file.len(), Some(replay_bytes(&file).expect("MaxId").state)));
                encode_frame(&Frame::MaxOffset(model.max_offset()), &mut file).expect("encode");
                ends.push((
                    file.len(),
                    Some(replay_bytes(&file).expect("MaxOffset").state),
                ));
                let live: Vec<SegmentRecord> = model.segments().values().cloned().collect();
                for rec in &live {
                    encode_frame(&Frame::Snapshot(Box::new(rec.clone())), &mut file)
                        .expect("encode");
                    ends.push((file.len(), None));
                }
                ends.last_mut().expect("MaxId end").1 = Some(model.clone());
                records = 0;
                snapshots = live.len() as u64;
            }
            13 => {
                // A snapshot after a batch, or a second MaxId: both illegal.
                let has_batch = records > 0;
                let frame = if has_batch && c.u8() & 1 == 0 {
                    match model.segments().values().next() {
                        Some(r) => Frame::Snapshot(Box::new(r.clone())),
                        None => Frame::MaxId(None),
                    }
                } else {
                    Frame::MaxId(model.max_segment_id())
                };
                if ends.len() == 1 {
                    // As the very first frame a MaxId is legal; keep going.
                    if let Frame::MaxId(None) = frame {
                        encode_frame(&frame, &mut file).expect("encode");
                        ends.push((file.len(), Some(model.clone())));
                    }
                    continue;
                }
                encode_frame(&frame, &mut file).expect("encode");
                bad_tail = Some(TailKind::Inconsistent);
            }
            _ => {
                // Garbage (zeros or bytes from the input) after the last frame.
                let n = usize::from(c.u8() % 40);
                if c.u8() & 1 == 0 {
                    file.resize(file.len() + n, 0);
                } else {
                    file.extend_from_slice(c.take(n));
                }
                bad_tail = Some(TailKind::Short); // or any other kind
            }
        }
    }
    let (good_len, good_state) = ends.last().cloned().expect("header end");

    // 1. Whole file: exactly the model, up to the last good frame.
    let r = check_journal_bytes(&file).expect("a journal we wrote has a good header");
    match bad_tail {
        None => {
            assert_eq!(r.valid_len as usize, file.len());
            assert_eq!(r.report.tail, None);
            assert_eq!(r.state, model, "replay rebuilds the written state");
            assert_eq!(r.report.records_replayed, records);
            assert_eq!(r.report.snapshot_segments, snapshots);
        }
        Some(TailKind::Inconsistent) => {
            assert_eq!(r.valid_len as usize, good_len);
            assert_eq!(Some(r.state), good_state);
            assert_eq!(r.report.tail.map(|t| t.kind), Some(TailKind::Inconsistent));
        }
        Some(_) => {
            // Random bytes could in theory form a frame; never fewer frames.
            assert!(r.valid_len as usize >= good_len);
            if r.valid_len as usize == good_len {
                assert_eq!(Some(r.state), good_state);
            }
        }
    }

    // 2. Cut anywhere (a torn write): the last whole frame before the cut.
    let cut = JOURNAL_HEADER_LEN + cut_seed as usize % (good_len - JOURNAL_HEADER_LEN + 1);
    let (want_len, want_state) = ends
        .iter()
        .rev()
        .find(|(end, _)| *end <= cut)
        .cloned()
        .expect("header end");
    let r = check_journal_bytes(&file[..cut]).expect("header intact");
    assert_eq!(r.valid_len as usize, want_len, "cut at {cut}");
    if let Some(want) = want_state {
        assert_eq!(r.state, want, "cut at {cut}");
    }

    // 3. One bit flipped in a frame's checksum or payload: replay stops at
    // that frame (CRC32 catches every single-bit error).
    if ends.len() > 1 {
        let k = 1 + flip_seed as usize % (ends.len() - 1);
        let (start, before) = ends[k - 1].clone();
        let end = ends[k].0;
        // Skip the 4-byte length: a changed length changes the CRC'd span.
        let at = start + 4 + (flip_seed as usize >> 8) % (end - start - 4);
        let mut bad = file[..end].to_vec();
        bad[at] ^= 1 << (flip_seed >> 29);
        let r = check_journal_bytes(&bad).expect("header intact");
        assert_eq!(r.valid_len as usize, start, "flip at {at}");
        if let Some(before) = before {
            assert_eq!(r.state, before);
        }
        assert_eq!(r.report.tail.map(|t| t.kind), Some(TailKind::BadChecksum));
    }
}

/// Target `journal_replay`: `[mode][...]`, mode % 3:
/// 0: the rest is a journal file;
/// 1: the rest is newline-separated frame payloads (JSON, usually) that get a
///    header and correct frame checksums; a line starting with `#` gets a
///    wrong checksum;
/// 2: the rest steers a model-based writer (see `journal_model`).
pub fn journal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            check_journal_bytes(rest);
        }
        1 => {
            let mut file = encode_header(1).to_vec();
            for line in rest.split(|b| *b == b'\n') {
                match line.strip_prefix(b"#") {
                    Some(payload) => raw_frame(payload, true, &mut file),
                    None => raw_frame(line, false, &mut file),
                }
            }
            check_journal_bytes(&file).expect("header is good");
        }
        _ => journal_model(rest),
    }
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// Target `config_toml`: the bytes (lossily) as TOML text. What parses also
/// serializes, and parses back to the same thing.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(c) = Config::from_toml(&text) else {
        return;
    };
    c.validate().expect("from_toml validated");
    let _ = (c.index_config(), c.upload_config(), c.store_options());
    let _ = c.store_url();
    let out = toml::to_string(&c).expect("a parsed config serializes");
    let back = Config::from_toml(&out).expect("a serialized config parses again");
    assert_eq!(format!("{c:?}"), format!("{back:?}"), "config round trip");
}
