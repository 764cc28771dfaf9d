//! Index segments: the mmap-backed active segment, the immutable sealed file,
//! and the byte-level formats both use.
//!
//! Data flow: `append` writes an item into the active segment's mmap and links
//! it into the hash-slot table; `flush` msyncs the item range (the durability
//! point). When the segment is full, too old, or asked to, it is frozen and a
//! sealer writes a dense, slot-grouped, checksummed `.seg` file from it (temp
//! name, fsync, rename, fsync dir) and then removes the `.active` file.
//!
//! Formats are documented byte by byte in `docs/format/segment.md`.

pub mod active;
pub mod format;
pub mod local;
pub mod names;
pub mod salvage;
pub mod sealed;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a segment within one data directory (and one stream). Ids grow
/// monotonically; the file names are the id in 20 decimal digits.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct SegmentId(pub u64);

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:020}", self.0)
    }
}

/// One index entry as the broker gives it and lookups return it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// XXH3-64 of the key bytes (see [`key_hash`]).
    pub key_hash: u64,
    /// Log offset of the message.
    pub offset: u64,
    /// Size of the message in bytes.
    pub size: u32,
    /// Message timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// The stable key hash used by every format version 1 file: XXH3-64, seed 0.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Inclusive timestamp range for lookups. `TimeRange::ALL` matches everything.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TimeRange {
    /// First timestamp included.
    pub from_ms: u64,
    /// Last timestamp included.
    pub to_ms: u64,
}

impl TimeRange {
    /// Every timestamp.
    pub const ALL: TimeRange = TimeRange {
        from_ms: 0,
        to_ms: u64::MAX,
    };

    /// True when `ts` is in the range.
    pub fn contains(&self, ts: u64) -> bool {
        self.from_ms <= ts && ts <= self.to_ms
    }

    /// True when `[min, max]` intersects this range.
    pub fn overlaps(&self, min: u64, max: u64) -> bool {
        min <= self.to_ms && self.from_ms <= max
    }
}

/// What a sealed segment is, as recorded in the journal and the manifest.
/// Everything here is derivable from the sealed file's footer plus its CRC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMeta {
    pub id: SegmentId,
    /// Total length of the sealed file in bytes (footer included).
    pub file_len: u64,
    /// CRC32 (crc32fast, IEEE) of the whole sealed file, footer included.
    /// Weak: blind to the items' content and order (every item ends with
    /// its own CRC32). It names format-1 files only; format 2 is named by
    /// `crc64`.
    pub file_crc: u32,
    /// CRC-64/NVME of the whole sealed file, footer included: the file's
    /// identity from format 2 on (object key, `x-amz-checksum-crc64nvme`,
    /// read-back). `None` for a format-1 file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64: Option<u64>,
    pub item_count: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    pub created_ms: u64,
    pub sealed_ms: u64,
}

impl SealedMeta {
    /// The checksum that names this file in its object key: the CRC64 of a
    /// format-2 file, the CRC32 of a format-1 file.
    pub fn key_sum(&self) -> KeySum {
        match self.crc64 {
            Some(c) => KeySum::Crc64(c),
            None => KeySum::Crc32(self.file_crc),
        }
    }

    /// True when `bytes` hold exactly this file: length, and the strongest
    /// whole-file checksum it has (CRC64 from format 2 on).
    pub fn matches_bytes(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.file_len
            && match self.crc64 {
                Some(c) => format::crc64(bytes) == c,
                None => crc32fast::hash(bytes) == self.file_crc,
            }
    }

    /// [`SealedMeta::matches_bytes`] for bytes already hashed.
    pub fn matches_sums(&self, len: u64, sums: &format::FileSums) -> bool {
        len == self.file_len
            && match self.crc64 {
                Some(c) => sums.crc64 == c,
                None => sums.crc32 == self.file_crc,
            }
    }

    /// "CRC64 0123456789abcdef" or "CRC32 01234567": the checksum that
    /// identifies this file, as `sums` show it, for messages.
    pub fn describe_sums(&self, sums: &format::FileSums) -> String {
        match self.crc64 {
            Some(_) => format!("CRC64 {:016x}", sums.crc64),
            None => format!("CRC32 {:08x}", sums.crc32),
        }
    }
}

/// The whole-file checksum an object key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeySum {
    /// Format 1: 8 lower-case hex digits of the CRC32.
    Crc32(u32),
    /// Format 2: 16 lower-case hex digits of the CRC-64/NVME.
    Crc64(u64),
}

impl fmt::Display for KeySum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySum::Crc32(c) => write!(f, "{c:08x}"),
            KeySum::Crc64(c) => write!(f, "{c:016x}"),
        }
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
