//! Byte-level layout of active segments (format version 1) and sealed
//! segments (format version 2 written, versions 1 and 2 read).
//!
//! Every function here is a pure encode/decode on byte slices: no I/O, no
//! panics on any input. Decoders bounds-check everything and return
//! [`Error::Corrupt`] with what was expected and what was found. The same
//! layout is drawn in `docs/format/segment.md`; keep the two in step.
//!
//! All integers are little-endian. Header, item, directory and footer
//! checksums are CRC32 (IEEE, crc32fast). The sealed v2 body checksum and the
//! whole-file checksum are CRC64/NVME ([`crc64`]): every item ends with its
//! own CRC32, and by the CRC residue property a CRC32 over "bytes followed by
//! their own CRC32" does not depend on those bytes, so a whole-file CRC32 is
//! blind to the items' content and order. CRC64/NVME has another polynomial
//! and sees every byte and its position; it is also the checksum S3 stores
//! and validates (`x-amz-checksum-crc64nvme`), so one value goes from the
//! seal to the object key, the upload header and the read-back.

use crate::error::{Error, Result};
use crate::segment::{Entry, SealedMeta, SegmentId};

/// Format version of active segments (the only one), and of the first
/// sealed format.
pub const FORMAT_VERSION: u16 = 1;
/// Format version of the sealed files this build writes: like version 1, but
/// the footer's body checksum is a CRC64/NVME (`data_crc64`) and the file's
/// identity is the CRC64/NVME of all its bytes (`SealedMeta::crc64`).
pub const SEALED_FORMAT_VERSION: u16 = 2;

/// CRC-64/NVME (the `crc64nvme` of S3 checksums): poly 0xad93d23594c93659,
/// reflected, init and xorout all ones.
#[inline]
pub fn crc64(bytes: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes)
}

/// A streaming CRC-64/NVME.
pub fn crc64_digest() -> crc_fast::Digest {
    crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme)
}

/// `crc64(a ‖ b)` from `crc64(a)`, `crc64(b)` and `b.len()`.
#[inline]
pub fn crc64_combine(crc_a: u64, crc_b: u64, len_b: u64) -> u64 {
    crc_fast::checksum_combine(crc_fast::CrcAlgorithm::Crc64Nvme, crc_a, crc_b, len_b)
}

/// Magic at byte 0 of an active segment.
pub const ACTIVE_MAGIC: [u8; 8] = *b"TIXACTIV";
/// Magic at byte 0 of a sealed segment.
pub const SEALED_MAGIC: [u8; 8] = *b"TIXSEALD";
/// Magic at byte 0 of a sealed segment's footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"TIXFOOTR";

/// Header length used by both kinds (bytes actually checksummed).
pub const HEADER_LEN: usize = 64;
/// The active file's slot table starts on this page boundary.
pub const PAGE: usize = 4096;
/// Size of one active item.
pub const ACTIVE_ITEM_LEN: usize = 40;
/// Size of one sealed item.
pub const SEALED_ITEM_LEN: usize = 32;
/// Size of the sealed footer.
pub const FOOTER_LEN: usize = 128;

/// Upper bounds that keep a hostile header from asking for absurd sizes.
pub const MAX_SLOTS: u32 = 1 << 26;
pub const MAX_ITEMS: u32 = 1 << 28;

#[inline]
fn get_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
#[inline]
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
#[inline]
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
#[inline]
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The slot a key hash lands in: `(key_hash * slot_count) >> 64`, the
/// multiply-high range reduction (uniform for a uniform hash, and an order
/// of magnitude cheaper than a 64-bit division on the append and seal paths).
#[inline]
pub fn slot_of(key_hash: u64, slot_count: u32) -> u32 {
    debug_assert!(slot_count > 0);
    ((u128::from(key_hash) * u128::from(slot_count)) >> 64) as u32
}

// ---------------------------------------------------------------------------
// Header (shared shape, different magic and item size)
// ---------------------------------------------------------------------------

/// Header of an active or sealed segment.
///
/// For an active segment `items` is the item capacity; for a sealed segment it
/// is the item count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u16,
    pub item_len: u32,
    pub segment_id: SegmentId,
    pub created_ms: u64,
    pub slot_count: u32,
    pub items: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.magic);
        put_u16(&mut b, 8, self.version);
        put_u16(&mut b, 10, HEADER_LEN as u16);
        put_u32(&mut b, 12, self.item_len);
        put_u64(&mut b, 16, self.segment_id.0);
        put_u64(&mut b, 24, self.created_ms);
        put_u32(&mut b, 32, self.slot_count);
        put_u32(&mut b, 36, self.items);
        // 40..60 reserved, zero.
        let crc = crc32fast::hash(&b[..60]);
        put_u32(&mut b, 60, crc);
        b
    }

    /// Decode and check a header with the expected magic and item size.
    pub fn decode(bytes: &[u8], magic: [u8; 8], item_len: usize) -> Result<Header> {
        let what = if magic == ACTIVE_MAGIC {
            "active segment header"
        } else {
            "sealed segment header"
        };
        let b = bytes.get(..HEADER_LEN).ok_or_else(|| {
            Error::corrupt(what, format!("{} bytes, need {HEADER_LEN}", bytes.len()))
        })?;
        if b[0..8] != magic {
            return Err(Error::corrupt(what, format!("bad magic {:02x?}", &b[0..8])));
        }
        let crc = crc32fast::hash(&b[..60]);
        if crc != get_u32(b, 60) {
            return Err(Error::corrupt(what, "header checksum mismatch"));
        }
        // The checksum held, so the version is what the writer meant: a
        // newer file is refused, never quarantined as corrupt.
        let version = get_u16(b, 8);
        let known = if magic == SEALED_MAGIC {
            version == FORMAT_VERSION || version == SEALED_FORMAT_VERSION
        } else {
            version == FORMAT_VERSION
        };
        if !known {
            return Err(Error::Unsupported(format!(
                "{what} has format version {version}; this build reads {}",
                if magic == SEALED_MAGIC {
                    "1 and 2"
                } else {
                    "1"
                }
            )));
        }
        if usize::from(get_u16(b, 10)) != HEADER_LEN || get_u32(b, 12) as usize != item_len {
            return Err(Error::corrupt(what, "unexpected header or item length"));
        }
        if b[40..60].iter().any(|&x| x != 0) {
            return Err(Error::corrupt(what, "reserved header bytes are not zero"));
        }
        let h = Header {
            magic,
            version,
            item_len: item_len as u32,
            segment_id: SegmentId(get_u64(b, 16)),
            created_ms: get_u64(b, 24),
            slot_count: get_u32(b, 32),
            items: get_u32(b, 36),
        };
        if h.slot_count == 0 || h.slot_count > MAX_SLOTS {
            return Err(Error::corrupt(
                what,
                format!("slot count {} out of range", h.slot_count),
            ));
        }
        if h.items > MAX_ITEMS {
            return Err(Error::corrupt(
                what,
                format!("item count {} out of range", h.items),
            ));
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------
// Active segment
// ---------------------------------------------------------------------------

/// Where things live in an active segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveLayout {
    pub slot_count: u32,
    pub item_capacity: u32,
    /// Byte offset of the slot table (always [`PAGE`]).
    pub slots_offset: u64,
    /// Byte offset of item 0 (page aligned).
    pub items_offset: u64,
    /// Total file length (page aligned).
    pub file_len: u64,
}

impl ActiveLayout {
    pub fn new(slot_count: u32, item_capacity: u32) -> Result<ActiveLayout> {
        if slot_count == 0 || slot_count > MAX_SLOTS {
            return Err(Error::InvalidInput(format!(
                "slot count must be in 1..={MAX_SLOTS}, got {slot_count}"
            )));
        }
        if item_capacity == 0 || item_capacity > MAX_ITEMS {
            return Err(Error::InvalidInput(format!(
                "item capacity must be in 1..={MAX_ITEMS}, got {item_capacity}"
            )));
        }
        let slots_offset = PAGE as u64;
        let items_offset = round_up(slots_offset + u64::from(slot_count) * 4, PAGE as u64);
        let file_len = round_up(
            items_offset + u64::from(item_capacity) * ACTIVE_ITEM_LEN as u64,
            PAGE as u64,
        );
        Ok(ActiveLayout {
            slot_count,
            item_capacity,
            slots_offset,
            items_offset,
            file_len,
        })
    }

    /// Byte offset of item `index`.
    #[inline]
    pub fn item_offset(&self, index: u32) -> usize {
        (self.items_offset + u64::from(index) * ACTIVE_ITEM_LEN as u64) as usize
    }
}

/// One item of an active segment as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveItem {
    pub entry: Entry,
    /// Index + 1 of the previous item in the same slot, 0 for none.
    pub prev: u32,
}

/// CRC of an active item: covers the segment id and the item's index so an
/// item copied to the wrong place or from another segment never validates.
#[inline]
fn active_item_crc(segment_id: SegmentId, index: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&segment_id.0.to_le_bytes());
    h.update(&index.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// Encode an active item into exactly [`ACTIVE_ITEM_LEN`] bytes.
#[inline]
pub fn encode_active_item(out: &mut [u8], segment_id: SegmentId, index: u32, item: &ActiveItem) {
    debug_assert_eq!(out.len(), ACTIVE_ITEM_LEN);
    let mut b = [0u8; ACTIVE_ITEM_LEN];
    put_u64(&mut b, 0, item.entry.key_hash);
    put_u64(&mut b, 8, item.entry.offset);
    put_u64(&mut b, 16, item.entry.timestamp_ms);
    put_u32(&mut b, 24, item.entry.size);
    put_u32(&mut b, 28, item.prev);
    // 32..36 reserved, zero.
    let crc = active_item_crc(segment_id, index, &b[..36]);
    put_u32(&mut b, 36, crc);
    out.copy_from_slice(&b);
}

/// Decode an active item; `None` when its checksum does not match (a torn or
/// never-written item), or the reserved bytes are not zero.
#[inline]
pub fn decode_active_item(b: &[u8], segment_id: SegmentId, index: u32) -> Option<ActiveItem> {
    let b = b.get(..ACTIVE_ITEM_LEN)?;
    if get_u32(b, 32) != 0 || active_item_crc(segment_id, index, &b[..36]) != get_u32(b, 36) {
        return None;
    }
    Some(ActiveItem {
        entry: Entry {
            key_hash: get_u64(b, 0),
            offset: get_u64(b, 8),
            timestamp_ms: get_u64(b, 16),
            size: get_u32(b, 24),
        },
        prev: get_u32(b, 28),
    })
}

/// Where an active file's flush marks sit: two 16-byte records in its
/// header page, in sectors of their own (never the header's), written in
/// turn. A mark records how many items a flush had made durable; nothing
/// syncs it (docs/format/segment.md, "Flush marks").
pub const FLUSH_MARK_OFFSETS: [usize; 2] = [2048, 3072];
/// Length of one flush mark.
pub const FLUSH_MARK_LEN: usize = 16;
const FLUSH_MARK_MAGIC: [u8; 4] = *b"TIXF";

/// A flush mark saying items `0..count` of segment `segment_id` were made
/// durable by a flush that returned.
pub fn encode_flush_mark(segment_id: SegmentId, count: u32) -> [u8; FLUSH_MARK_LEN] {
    let mut b = [0u8; FLUSH_MARK_LEN];
    b[..4].copy_from_slice(&FLUSH_MARK_MAGIC);
    put_u32(&mut b, 4, count);
    // 8..12 reserved, zero.
    let mut h = crc32fast::Hasher::new();
    h.update(&segment_id.0.to_le_bytes());
    h.update(&b[..12]);
    put_u32(&mut b, 12, h.finalize());
    b
}

/// The largest count among an active file's valid flush marks (`bytes`:
/// the file from its start), at most `capacity`; `None` when no mark
/// validates (a file from before the marks, never flushed, or damaged
/// there). A mark is valid when its magic, reserved bytes and CRC (salted
/// with the segment id) match.
pub fn decode_flush_marks(bytes: &[u8], segment_id: SegmentId, capacity: u32) -> Option<u32> {
    FLUSH_MARK_OFFSETS
        .iter()
        .filter_map(|&at| {
            let b = bytes.get(at..at + FLUSH_MARK_LEN)?;
            if b[..4] != FLUSH_MARK_MAGIC || get_u32(b, 8) != 0 {
                return None;
            }
            let mut h = crc32fast::Hasher::new();
            h.update(&segment_id.0.to_le_bytes());
            h.update(&b[..12]);
            (h.finalize() == get_u32(b, 12)).then(|| get_u32(b, 4))
        })
        .filter(|&n| n <= capacity)
        .max()
}

// ---------------------------------------------------------------------------
// Sealed segment
// ---------------------------------------------------------------------------

/// The longest a sealed segment file can be (the layout at the largest
/// slot and item counts): a longer file is damage, never read or mapped
/// whole.
pub fn max_sealed_len() -> u64 {
    SealedLayout::new(MAX_SLOTS, MAX_ITEMS).file_len
}

/// Where things live in a sealed segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedLayout {
    pub slot_count: u32,
    pub item_count: u32,
    /// Slot directory: `slot_count + 1` u32s starting here.
    pub dir_offset: u64,
    pub items_offset: u64,
    pub footer_offset: u64,
    pub file_len: u64,
}

impl SealedLayout {
    pub fn new(slot_count: u32, item_count: u32) -> SealedLayout {
        let dir_offset = HEADER_LEN as u64;
        let items_offset = dir_offset + (u64::from(slot_count) + 1) * 4;
        let footer_offset = items_offset + u64::from(item_count) * SEALED_ITEM_LEN as u64;
        SealedLayout {
            slot_count,
            item_count,
            dir_offset,
            items_offset,
            footer_offset,
            file_len: footer_offset + FOOTER_LEN as u64,
        }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn dir_len(&self) -> u64 {
        (u64::from(self.slot_count) + 1) * 4
    }
}

/// CRC of a sealed item: covers the segment id, so an item range read from
/// the wrong object never validates.
#[inline]
fn sealed_item_crc(segment_id: SegmentId, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&segment_id.0.to_le_bytes());
    h.update(body);
    h.finalize()
}

#[inline]
#[cfg(any(test, feature = "testing"))]
pub fn encode_sealed_item(out: &mut [u8], segment_id: SegmentId, e: &Entry) {
    debug_assert_eq!(out.len(), SEALED_ITEM_LEN);
    let mut b = [0u8; SEALED_ITEM_LEN];
    put_u64(&mut b, 0, e.key_hash);
    put_u64(&mut b, 8, e.offset);
    put_u64(&mut b, 16, e.timestamp_ms);
    put_u32(&mut b, 24, e.size);
    let crc = sealed_item_crc(segment_id, &b[..28]);
    put_u32(&mut b, 28, crc);
    out.copy_from_slice(&b);
}

pub fn decode_sealed_item(b: &[u8], segment_id: SegmentId) -> Result<Entry> {
    let b = b
        .get(..SEALED_ITEM_LEN)
        .ok_or_else(|| Error::corrupt("sealed item", "short read"))?;
    if sealed_item_crc(segment_id, &b[..28]) != get_u32(b, 28) {
        return Err(Error::corrupt(
            format!("sealed segment {segment_id}"),
            "item checksum mismatch",
        ));
    }
    Ok(Entry {
        key_hash: get_u64(b, 0),
        offset: get_u64(b, 8),
        timestamp_ms: get_u64(b, 16),
        size: get_u32(b, 24),
    })
}

/// The whole-file checksums of a sealed file (footer included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSums {
    /// CRC32 of every byte (weak: see the module docs).
    pub crc32: u32,
    /// CRC-64/NVME of every byte: the file's identity from format 2 on.
    pub crc64: u64,
}

impl FileSums {
    /// Both checksums of `bytes`.
    pub fn of(bytes: &[u8]) -> FileSums {
        FileSums {
            crc32: crc32fast::hash(bytes),
            crc64: crc64(bytes),
        }
    }
}

/// [`FileSums`] of bytes that arrive in pieces (a streamed GET).
#[derive(Clone)]
pub struct SumsHasher {
    crc32: crc32fast::Hasher,
    crc64: crc_fast::Digest,
    len: u64,
}

impl Default for SumsHasher {
    fn default() -> Self {
        SumsHasher {
            crc32: crc32fast::Hasher::new(),
            crc64: crc64_digest(),
            len: 0,
        }
    }
}

impl SumsHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.crc32.update(bytes);
        self.crc64.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before the first byte.
    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes seen and their checksums.
    pub fn finish(&self) -> (u64, FileSums) {
        (
            self.len,
            FileSums {
                crc32: self.crc32.clone().finalize(),
                crc64: self.crc64.finalize(),
            },
        )
    }
}

/// The self-describing footer at the end of every sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    pub segment_id: SegmentId,
    pub slot_count: u32,
    pub item_count: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    pub created_ms: u64,
    pub sealed_ms: u64,
    pub file_len: u64,
    pub dir_offset: u64,
    pub items_offset: u64,
    /// CRC32 of the slot directory bytes alone (lets a remote reader check
    /// the directory after one range read).
    pub dir_crc: u32,
    /// Checksum of every byte before the footer: in version 1 a CRC32 (held
    /// in the low 32 bits; blind to the items' content, see the module
    /// docs), in version 2 a CRC64/NVME.
    pub data_crc: u64,
    /// Format version of the file ([`FORMAT_VERSION`] or
    /// [`SEALED_FORMAT_VERSION`]); the header carries the same value.
    pub version: u16,
}

impl Footer {
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        debug_assert!(self.version == FORMAT_VERSION || self.version == SEALED_FORMAT_VERSION);
        put_u16(&mut b, 8, self.version);
        put_u16(&mut b, 10, FOOTER_LEN as u16);
        put_u32(&mut b, 12, self.slot_count);
        put_u64(&mut b, 16, self.segment_id.0);
        put_u64(&mut b, 24, self.item_count);
        put_u64(&mut b, 32, self.min_ts);
        put_u64(&mut b, 40, self.max_ts);
        put_u64(&mut b, 48, self.min_offset);
        put_u64(&mut b, 56, self.max_offset);
        put_u64(&mut b, 64, self.created_ms);
        put_u64(&mut b, 72, self.sealed_ms);
        put_u64(&mut b, 80, self.file_len);
        put_u64(&mut b, 88, self.dir_offset);
        put_u64(&mut b, 96, self.items_offset);
        put_u32(&mut b, 104, self.dir_crc);
        if self.version == FORMAT_VERSION {
            // 112..124 reserved, zero.
            put_u32(&mut b, 108, self.data_crc as u32);
        } else {
            // 116..124 reserved, zero.
            put_u64(&mut b, 108, self.data_crc);
        }
        let crc = crc32fast::hash(&b[..124]);
        put_u32(&mut b, 124, crc);
        b
    }

    /// Decode the footer from exactly its [`FOOTER_LEN`] bytes and check that
    /// it is self-consistent (its own CRC, the layout it implies, bounds).
    /// Does not check `data_crc`: that needs the whole file.
    pub fn decode(b: &[u8]) -> Result<Footer> {
        const WHAT: &str = "sealed segment footer";
        if b.len() != FOOTER_LEN {
            return Err(Error::corrupt(
                WHAT,
                format!("{} bytes, need {FOOTER_LEN}", b.len()),
            ));
        }
        if b[0..8] != FOOTER_MAGIC {
            return Err(Error::corrupt(
                WHAT,
                "bad magic (not a sealed segment, or truncated)",
            ));
        }
        if crc32fast::hash(&b[..124]) != get_u32(b, 124) {
            return Err(Error::corrupt(WHAT, "footer checksum mismatch"));
        }
        let version = get_u16(b, 8);
        let reserved_from = match version {
            FORMAT_VERSION => 112,
            SEALED_FORMAT_VERSION => 116,
            _ => {
                return Err(Error::Unsupported(format!(
                    "{WHAT} has format version {version}; this build reads 1 and 2"
                )));
            }
        };
        if usize::from(get_u16(b, 10)) != FOOTER_LEN
            || b[reserved_from..124].iter().any(|&x| x != 0)
        {
            return Err(Error::corrupt(
                WHAT,
                "unexpected footer length or reserved bytes",
            ));
        }
        let f = Footer {
            slot_count: get_u32(b, 12),
            segment_id: SegmentId(get_u64(b, 16)),
            item_count: get_u64(b, 24),
            min_ts: get_u64(b, 32),
            max_ts: get_u64(b, 40),
            min_offset: get_u64(b, 48),
            max_offset: get_u64(b, 56),
            created_ms: get_u64(b, 64),
            sealed_ms: get_u64(b, 72),
            file_len: get_u64(b, 80),
            dir_offset: get_u64(b, 88),
            items_offset: get_u64(b, 96),
            dir_crc: get_u32(b, 104),
            data_crc: if version == FORMAT_VERSION {
                u64::from(get_u32(b, 108))
            } else {
                get_u64(b, 108)
            },
            version,
        };
        if f.slot_count == 0 || f.slot_count > MAX_SLOTS || f.item_count > u64::from(MAX_ITEMS) {
            return Err(Error::corrupt(WHAT, "slot or item count out of range"));
        }
        let layout = f.layout();
        if layout.file_len != f.file_len
            || layout.dir_offset != f.dir_offset
            || layout.items_offset != f.items_offset
        {
            return Err(Error::corrupt(
                WHAT,
                format!(
                    "layout mismatch: footer says len {} dir@{} items@{}, counts imply len {} dir@{} items@{}",
                    f.file_len,
                    f.dir_offset,
                    f.items_offset,
                    layout.file_len,
                    layout.dir_offset,
                    layout.items_offset
                ),
            ));
        }
        if f.item_count > 0 && (f.min_ts > f.max_ts || f.min_offset > f.max_offset) {
            return Err(Error::corrupt(
                WHAT,
                "min above max in time or offset range",
            ));
        }
        Ok(f)
    }

    /// The layout implied by the counts (checked equal to the stored offsets
    /// by [`Footer::decode`]).
    pub fn layout(&self) -> SealedLayout {
        // item_count is bounded by MAX_ITEMS in decode; saturate for safety.
        SealedLayout::new(
            self.slot_count,
            u32::try_from(self.item_count).unwrap_or(u32::MAX),
        )
    }

    /// The journal/manifest view of this footer plus the whole-file
    /// checksums. A version-1 file has no `crc64` in its meta: its key and
    /// records stay the ones it was uploaded and journaled under.
    pub fn meta(&self, sums: FileSums) -> SealedMeta {
        SealedMeta {
            id: self.segment_id,
            file_len: self.file_len,
            file_crc: sums.crc32,
            crc64: (self.version >= SEALED_FORMAT_VERSION).then_some(sums.crc64),
            item_count: self.item_count,
            min_ts: self.min_ts,
            max_ts: self.max_ts,
            min_offset: self.min_offset,
            max_offset: self.max_offset,
            created_ms: self.created_ms,
            sealed_ms: self.sealed_ms,
        }
    }
}

/// Decode and check a slot directory: `slot_count + 1` monotone u32s, the
/// first 0, the last `item_count`. Returns the start indexes.
pub fn decode_slot_dir(
    b: &[u8],
    slot_count: u32,
    item_count: u64,
    dir_crc: u32,
) -> Result<Vec<u32>> {
    const WHAT: &str = "sealed slot directory";
    let want = (slot_count as usize + 1) * 4;
    if b.len() != want {
        return Err(Error::corrupt(
            WHAT,
            format!("{} bytes, need {want}", b.len()),
        ));
    }
    if crc32fast::hash(b) != dir_crc {
        return Err(Error::corrupt(WHAT, "checksum mismatch"));
    }
    let mut out = Vec::with_capacity(slot_count as usize + 1);
    let mut prev = 0u32;
    for (i, c) in b.chunks_exact(4).enumerate() {
        let v = get_u32(c, 0);
        if (i == 0 && v != 0) || v < prev {
            return Err(Error::corrupt(
                WHAT,
                format!("entry {i} not monotone ({v} after {prev})"),
            ));
        }
        prev = v;
        out.push(v);
    }
    if u64::from(prev) != item_count {
        return Err(Error::corrupt(
            WHAT,
            format!("ends at {prev}, footer says {item_count} items"),
        ));
    }
    Ok(out)
}

/// The structural part of [`check_sealed`]: length, footer, header, and the
/// slot directory with its own CRC. No pass over the items.
pub fn check_sealed_structure(bytes: &[u8]) -> Result<Footer> {
    let len = bytes.len();
    if len < HEADER_LEN + FOOTER_LEN {
        return Err(Error::corrupt(
            "sealed segment",
            format!("only {len} bytes"),
        ));
    }
    let footer = Footer::decode(&bytes[len - FOOTER_LEN..])?;
    if footer.file_len != len as u64 {
        return Err(Error::corrupt(
            "sealed segment",
            format!("file is {len} bytes, footer says {}", footer.file_len),
        ));
    }
    let header = Header::decode(bytes, SEALED_MAGIC, SEALED_ITEM_LEN)?;
    if header.segment_id != footer.segment_id
        || header.version != footer.version
        || header.created_ms != footer.created_ms
        || header.slot_count != footer.slot_count
        || u64::from(header.items) != footer.item_count
    {
        return Err(Error::corrupt(
            "sealed segment",
            "header and footer disagree",
        ));
    }
    let layout = footer.layout();
    let dir_bytes = &bytes[layout.dir_offset as usize..layout.items_offset as usize];
    decode_slot_dir(
        dir_bytes,
        footer.slot_count,
        footer.item_count,
        footer.dir_crc,
    )?;
    Ok(footer)
}

/// The CRC-64/NVME of a sealed file's body (every byte before the footer)
/// and of the whole file, in one pass: the footer continues the body's
/// digest. (A `crc64_combine` per file instead cost about 19 µs, 42% of a
/// start-up's CPU over 1,000,000 small pending segments.)
fn crc64_body_and_file(bytes: &[u8]) -> (u64, u64) {
    let split = bytes.len().saturating_sub(FOOTER_LEN);
    let mut d = crc64_digest();
    d.update(&bytes[..split]);
    let body = d.finalize();
    d.update(&bytes[split..]);
    (body, d.finalize())
}

/// The start-up check of a local sealed file: [`check_sealed_structure`]
/// plus the whole-body checksum, returning the whole-file checksums. For
/// format 2 the body's CRC-64/NVME sees every byte and its position, so a
/// match proves the items are the bytes the sealer wrote and the pass over
/// the items is skipped (item CRCs are still checked by every lookup, and
/// in full by [`check_sealed`] when this one fails, to salvage by item).
/// Format 1's body CRC is blind to item contents (every item ends with its
/// own CRC32), so a format-1 file gets the full [`check_sealed`].
pub fn check_sealed_sums(bytes: &[u8]) -> Result<(Footer, FileSums)> {
    let footer = check_sealed_structure(bytes)?;
    if footer.version == FORMAT_VERSION {
        return check_sealed(bytes);
    }
    let (data_crc64, file_crc64) = crc64_body_and_file(bytes);
    if data_crc64 != footer.data_crc {
        return Err(Error::corrupt("sealed segment", "data checksum mismatch"));
    }
    let sums = FileSums {
        crc32: crc32fast::hash(bytes),
        crc64: file_crc64,
    };
    Ok((footer, sums))
}

/// Check that a full sealed file is valid: footer, header, whole-body
/// checksum, directory, and that every item sits in the slot its hash
/// names. Returns the footer and the whole-file checksums.
pub fn check_sealed(bytes: &[u8]) -> Result<(Footer, FileSums)> {
    let footer = check_sealed_structure(bytes)?;
    let body = &bytes[..bytes.len() - FOOTER_LEN];
    let tail = &bytes[bytes.len() - FOOTER_LEN..];
    let data_crc32 = crc32fast::hash(body);
    let (data_crc64, file_crc64) = crc64_body_and_file(bytes);
    let data_ok = if footer.version == FORMAT_VERSION {
        u64::from(data_crc32) == footer.data_crc
    } else {
        data_crc64 == footer.data_crc
    };
    if !data_ok {
        return Err(Error::corrupt("sealed segment", "data checksum mismatch"));
    }
    let layout = footer.layout();
    let dir_bytes = &bytes[layout.dir_offset as usize..layout.items_offset as usize];
    let dir = decode_slot_dir(
        dir_bytes,
        footer.slot_count,
        footer.item_count,
        footer.dir_crc,
    )?;
    let items = &bytes[layout.items_offset as usize..layout.footer_offset as usize];
    for (slot, w) in dir.windows(2).enumerate() {
        for idx in w[0]..w[1] {
            let at = idx as usize * SEALED_ITEM_LEN;
            let e = decode_sealed_item(&items[at..at + SEALED_ITEM_LEN], footer.segment_id)?;
            if slot_of(e.key_hash, footer.slot_count) as usize != slot {
                return Err(Error::corrupt(
                    "sealed segment",
                    format!("item {idx} in wrong slot"),
                ));
            }
        }
    }
    let mut h = crc32fast::Hasher::new_with_initial_len(data_crc32, body.len() as u64);
    h.update(tail);
    let sums = FileSums {
        crc32: h.finalize(),
        crc64: file_crc64,
    };
    Ok((footer, sums))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_file_crc64_in_one_pass_equal_the_separate_ones() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in [FOOTER_LEN, FOOTER_LEN + 1, 1000, 4999, 5000] {
            let b = &bytes[..len];
            let (body, file) = crc64_body_and_file(b);
            assert_eq!(body, crc64(&b[..len - FOOTER_LEN]), "{len}");
            assert_eq!(file, crc64(b), "{len}");
        }
    }

    #[test]
    fn header_roundtrip_and_rejects_flips() {
        let h = Header {
            magic: ACTIVE_MAGIC,
            version: FORMAT_VERSION,
            item_len: ACTIVE_ITEM_LEN as u32,
            segment_id: SegmentId(7),
            created_ms: 123,
            slot_count: 16,
            items: 100,
        };
        let b = h.encode();
        assert_eq!(
            Header::decode(&b, ACTIVE_MAGIC, ACTIVE_ITEM_LEN).unwrap(),
            h
        );
        assert!(Header::decode(&b, SEALED_MAGIC, SEALED_ITEM_LEN).is_err());
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                Header::decode(&c, ACTIVE_MAGIC, ACTIVE_ITEM_LEN).is_err(),
                "flip at {i}"
            );
        }
    }

    #[test]
    fn active_item_crc_binds_segment_and_index() {
        let it = ActiveItem {
            entry: Entry {
                key_hash: 1,
                offset: 2,
                size: 3,
                timestamp_ms: 4,
            },
            prev: 0,
        };
        let mut b = [0u8; ACTIVE_ITEM_LEN];
        encode_active_item(&mut b, SegmentId(1), 5, &it);
        assert_eq!(decode_active_item(&b, SegmentId(1), 5), Some(it));
        assert_eq!(decode_active_item(&b, SegmentId(1), 6), None);
        assert_eq!(decode_active_item(&b, SegmentId(2), 5), None);
        assert_eq!(
            decode_active_item(&[0u8; ACTIVE_ITEM_LEN], SegmentId(1), 0),
            None
        );
    }

    #[test]
    fn footer_roundtrip_and_rejects_flips() {
        let l = SealedLayout::new(8, 3);
        let f = Footer {
            segment_id: SegmentId(9),
            slot_count: 8,
            item_count: 3,
            min_ts: 1,
            max_ts: 2,
            min_offset: 3,
            max_offset: 4,
            created_ms: 5,
            sealed_ms: 6,
            file_len: l.file_len,
            dir_offset: l.dir_offset,
            items_offset: l.items_offset,
            dir_crc: 7,
            data_crc: 8,
            version: FORMAT_VERSION,
        };
        for f in [
            f,
            Footer {
                data_crc: 0x0123_4567_89ab_cdef,
                version: SEALED_FORMAT_VERSION,
                ..f
            },
        ] {
            let b = f.encode();
            assert_eq!(Footer::decode(&b).unwrap(), f);
            for i in 0..FOOTER_LEN {
                let mut c = b;
                c[i] ^= 1;
                assert!(Footer::decode(&c).is_err(), "flip at {i}");
            }
        }
    }
}
