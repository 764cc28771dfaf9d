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
pub mod salvage;
pub mod sealed;

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
    pub from_ms: u64,
    pub to_ms: u64,
}

impl TimeRange {
    pub const ALL: TimeRange = TimeRange {
        from_ms: 0,
        to_ms: u64::MAX,
    };

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
    /// This is the checksum recorded with the remote object.
    pub file_crc: u32,
    pub item_count: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    pub created_ms: u64,
    pub sealed_ms: u64,
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
