//! The remote manifest of a stream: the list of committed segments, the
//! owner's epoch and lease, published by compare-and-swap.
//!
//! ## Layout
//! ```text
//! {prefix}/{stream}/manifest/versions/{version:020}.manifest            one per version, create-only
//! {prefix}/{stream}/manifest/chunks/{first:020}-{last:020}-{crc:08x}.chunk   spilled entries, create-only
//! {prefix}/{stream}/manifest/leases/{epoch:020}/{seq:020}.lease         lease renewals, create-only
//! ```
//!
//! ## Compare-and-swap: one create-only object per version
//! Every manifest version is its own object, written once with
//! `PutMode::Create` (`If-None-Match: *`); the current manifest is the
//! highest version listed. A writer that read version `v` publishes `v + 1`;
//! if that create answers `AlreadyExists`, somebody else published first (or
//! our own earlier attempt did, its answer lost): the writer re-reads and
//! either settles (same epoch: rebase and retry) or stops (`Error::Fenced`).
//!
//! Why not `PutMode::Update` on one fixed key: `LocalFileSystem` (file://)
//! implements `Create` (an atomic hard link) but not `Update`, and a second
//! compare-and-swap (flock'ed lock file) would be a second code path to test
//! and one that breaks on network file systems. Create-only versions work
//! the same on S3, s3s-fs, moto, `InMemory` and file://, every version is an
//! immutable object (a lost answer is settled by comparing bytes, as for
//! segments), and old versions double as an audit trail.
//!
//! Old versions are deleted (best effort) so that the newest
//! `keep_versions` remain: publishing version `w` deletes `w - keep`. So a
//! slot is only ever empty again when a version at least `keep` higher
//! exists. A writer paused for that long may re-create an old, deleted
//! slot; right after every create it lists the versions above its own and,
//! if one is `>= own + keep`, its object is void: it deletes it and re-reads
//! (and is fenced). Readers take the highest version, which a stale slot
//! never is.
//!
//! ## Bytes
//! A 16-byte envelope (magic `TIMF`, envelope version, kind, body length,
//! CRC32 of the body) around a JSON body. Decoding treats bytes as
//! untrusted: size limit before reading, exact length, CRC, versions,
//! strict field set, and the structure's invariants; any failure is
//! `Error::Corrupt` (or `Error::Unsupported` for a newer version), never a
//! panic. The full contract is in `docs/format/remote-layout.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::remote::keys;
use crate::remote::lease::{self, Clock, Lease, SystemClock};
use crate::remote::probe::{self, Capabilities};
use crate::remote::{RemoteStore, classify};
use crate::segment::{KeySum, SealedMeta, SegmentId};
use crate::upload::retry::{RetryPolicy, with_retries};

mod renewal;
// Re-exported for the tests (feature `testing`); the crate uses a part.
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use renewal::{
    CurrentLease, KEEP_RENEWALS, LEASE_SUFFIX, LEASES_DIR, LeaseKeeper, Renewal, decode_renewal,
    encode_renewal,
};

/// The lowest segment id an owner of `epoch` may give a new segment:
/// `(epoch - 1) << 32` (0 for the first epoch). Each epoch numbers its
/// segments in its own range, so an owner that was fenced with sealed,
/// uncommitted segments never finds their ids taken by the owner that
/// fenced it (the next owner starts above the manifest *and* above every
/// id an earlier epoch could have handed out locally); when it takes the
/// stream again it commits them under their own ids. 2^32 ids per epoch
/// is more than any owner seals.
pub fn epoch_id_floor(epoch: u64) -> SegmentId {
    SegmentId(epoch.saturating_sub(1).min(u64::from(u32::MAX)) << 32)
}

/// Folder under a stream that holds the manifest objects.
pub const MANIFEST_DIR: &str = "manifest";
/// Folder under `manifest/` with one object per manifest version.
pub const VERSIONS_DIR: &str = "versions";
/// Folder under `manifest/` with the spilled entry chunks.
pub const CHUNKS_DIR: &str = "chunks";
pub const VERSION_SUFFIX: &str = ".manifest";
pub const CHUNK_SUFFIX: &str = ".chunk";
/// Version of the JSON body (`format` field).
pub const FORMAT_VERSION: u32 = 1;
/// Version of the binary envelope.
pub const ENVELOPE_VERSION: u16 = 1;
/// Envelope header length in bytes.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 4] = *b"TIMF";
const KIND_HEAD: u8 = 1;
const KIND_CHUNK: u8 = 2;
/// Attempts of "list, then GET the highest" when versions keep vanishing
/// (deleted by a newer writer's clean-up) in between.
const LOAD_ATTEMPTS: usize = 8;

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

/// One committed segment, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentEntry {
    pub id: SegmentId,
    /// Full object key (`{prefix}/{stream}/segments/{id:020}-{checksum}.seg`).
    pub key: String,
    pub file_len: u64,
    pub file_crc: u32,
    /// CRC-64/NVME of the whole object (format-2 segments; the key names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64: Option<u64>,
    pub item_count: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    pub min_ts: u64,
    pub max_ts: u64,
}

impl SegmentEntry {
    /// The entry of a sealed segment uploaded to `store` under its key.
    pub fn new(store: &RemoteStore, stream: &str, meta: &SealedMeta) -> Result<SegmentEntry> {
        let key = store.try_segment_key(stream, meta)?;
        Ok(SegmentEntry {
            id: meta.id,
            key: key.to_string(),
            file_len: meta.file_len,
            file_crc: meta.file_crc,
            crc64: meta.crc64,
            item_count: meta.item_count,
            min_offset: meta.min_offset,
            max_offset: meta.max_offset,
            min_ts: meta.min_ts,
            max_ts: meta.max_ts,
        })
    }

    /// True when `bytes` hold exactly the object this entry lists (length,
    /// and its CRC64 when it has one, else its CRC32).
    pub fn matches_bytes(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.file_len
            && match self.crc64 {
                Some(c) => crate::segment::format::crc64(bytes) == c,
                None => crc32fast::hash(bytes) == self.file_crc,
            }
    }

    /// The checksum the entry's key names (see [`SealedMeta::key_sum`]).
    pub fn key_sum(&self) -> KeySum {
        match self.crc64 {
            Some(c) => KeySum::Crc64(c),
            None => KeySum::Crc32(self.file_crc),
        }
    }

    /// The key's object name must be `{id:020}-{checksum}.seg` of this
    /// entry (the rest of the key may name another prefix).
    fn check(&self) -> std::result::Result<(), String> {
        let path = Path::parse(&self.key).map_err(|e| format!("segment key: {e}"))?;
        let name = path.filename().unwrap_or("");
        match keys::parse_segment_object_name(name) {
            Some((id, sum)) if id == self.id && sum == self.key_sum() => Ok(()),
            _ => Err(format!(
                "segment {} key {:?} does not name id {} and checksum {}",
                self.id,
                self.key,
                self.id,
                self.key_sum()
            )),
        }
    }
}

/// Where a chunk of spilled entries lives and what it must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// Full object key of the chunk.
    pub key: String,
    /// Length of the whole chunk object.
    pub len: u64,
    /// CRC32 of the whole chunk object (also in its name).
    pub crc: u32,
    /// Number of entries; at least 1.
    pub count: u64,
    /// Lowest and highest segment id inside.
    pub first_id: SegmentId,
    pub last_id: SegmentId,
}

impl ChunkRef {
    fn covers(&self, id: SegmentId) -> bool {
        self.first_id <= id && id <= self.last_id
    }
}

/// Longest `reason` a [`DamageNote`] keeps (longer ones are cut).
pub const DAMAGE_REASON_MAX: usize = 512;
/// Most damage notes one manifest version may carry.
pub const DAMAGE_NOTES_MAX: usize = 4096;

/// A committed segment whose object was found damaged (missing, wrong size
/// or wrong bytes) by a reader that confirmed it with a full read. Readers
/// skip it (reporting why) until a repair re-uploads the object from an
/// intact local copy and clears the note. The entry itself stays listed:
/// the offsets it covers are known, only their bytes are unreadable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DamageNote {
    pub id: SegmentId,
    /// The entry's object key.
    pub key: String,
    /// What the reader found (at most [`DAMAGE_REASON_MAX`] bytes).
    pub reason: String,
    /// No intact local copy was known when marked: the segment's entries
    /// are lost unless a copy turns up (`tierindex reconcile --repair` run
    /// where one is held re-uploads it and clears the note).
    pub lost: bool,
    /// When it was marked (writer's clock, ms since Unix epoch).
    pub marked_ms: u64,
}

impl DamageNote {
    /// A note with `reason` cut to [`DAMAGE_REASON_MAX`] bytes (at a char
    /// boundary).
    pub fn new(e: &SegmentEntry, reason: &str, lost: bool, marked_ms: u64) -> DamageNote {
        let mut end = reason.len().min(DAMAGE_REASON_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        DamageNote {
            id: e.id,
            key: e.key.clone(),
            reason: reason.get(..end).unwrap_or_default().to_string(),
            lost,
            marked_ms,
        }
    }
}

/// One version of a stream's manifest (the head object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    pub stream: String,
    /// 1 for the first manifest, +1 per publish. Equal to the object's name.
    pub version: u64,
    /// Epoch of the owner that wrote this version; +1 per ownership change.
    pub epoch: u64,
    /// The current lease; `None` after a release.
    pub lease: Option<Lease>,
    /// When this version was written (writer's clock, ms since Unix epoch).
    pub written_ms: u64,
    /// Total number of committed segments (chunks + inline).
    pub segment_count: u64,
    /// Spilled, immutable chunks of older entries, in the order they spilled.
    pub chunks: Vec<ChunkRef>,
    /// Entries not spilled yet, strictly ascending by id.
    pub segments: Vec<SegmentEntry>,
    /// Committed segments whose objects were found damaged, strictly
    /// ascending by id (absent from the JSON when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<DamageNote>,
}

impl Manifest {
    /// Version 0 of `stream`: nothing committed, no owner (what a reader
    /// sees before the first manifest is written; never published).
    pub fn empty(stream: &str) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            stream: stream.to_string(),
            version: 0,
            epoch: 0,
            lease: None,
            written_ms: 0,
            segment_count: 0,
            chunks: Vec::new(),
            segments: Vec::new(),
            damaged: Vec::new(),
        }
    }

    /// The highest segment id listed (inline or in a chunk).
    pub fn max_segment_id(&self) -> Option<SegmentId> {
        let inline = self.segments.last().map(|e| e.id);
        let chunked = self.chunks.iter().map(|c| c.last_id).max();
        inline.max(chunked)
    }

    /// The damage note of segment `id`, if it has one.
    pub fn damage(&self, id: SegmentId) -> Option<&DamageNote> {
        self.damaged
            .binary_search_by_key(&id, |d| d.id)
            .ok()
            .and_then(|i| self.damaged.get(i))
    }

    /// The inline entry with `id`, if any (chunks are not searched).
    pub fn inline(&self, id: SegmentId) -> Option<&SegmentEntry> {
        self.segments
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .and_then(|i| self.segments.get(i))
    }

    fn check(&self, stream: &str, version: u64) -> std::result::Result<(), String> {
        if self.stream != stream {
            return Err(format!(
                "names stream {:?}, expected {stream:?}",
                self.stream
            ));
        }
        if self.version != version {
            return Err(format!(
                "says version {}, its key says {version}",
                self.version
            ));
        }
        if self.epoch == 0 {
            return Err("epoch 0".into());
        }
        if let Some(l) = &self.lease {
            if l.epoch != self.epoch {
                return Err(format!(
                    "lease epoch {} differs from manifest epoch {}",
                    l.epoch, self.epoch
                ));
            }
            lease::validate_owner(&l.owner).map_err(|e| e.to_string())?;
        }
        check_sorted(&self.segments)?;
        check_damage_notes(&self.damaged)?;
        let mut total = self.segments.len() as u64;
        for c in &self.chunks {
            check_chunk_ref(c)?;
            total = total
                .checked_add(c.count)
                .ok_or("segment count overflows")?;
        }
        if total != self.segment_count {
            return Err(format!(
                "segment_count {} but chunks and inline hold {total}",
                self.segment_count
            ));
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkBody {
    format: u32,
    stream: String,
    entries: Vec<SegmentEntry>,
}

/// Just the format field, read before the strict decode so a newer format
/// is reported as such rather than as unknown fields.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

fn check_sorted(entries: &[SegmentEntry]) -> std::result::Result<(), String> {
    for e in entries {
        e.check()?;
    }
    for w in entries.windows(2) {
        if let [a, b] = w
            && a.id >= b.id
        {
            return Err(format!(
                "entries not strictly ascending: {} then {}",
                a.id, b.id
            ));
        }
    }
    Ok(())
}

fn check_damage_notes(notes: &[DamageNote]) -> std::result::Result<(), String> {
    if notes.len() > DAMAGE_NOTES_MAX {
        return Err(format!(
            "{} damage notes, at most {DAMAGE_NOTES_MAX}",
            notes.len()
        ));
    }
    for d in notes {
        if d.reason.len() > DAMAGE_REASON_MAX {
            return Err(format!(
                "damage note of segment {} has a {}-byte reason",
                d.id,
                d.reason.len()
            ));
        }
        let name = Path::parse(&d.key)
            .ok()
            .and_then(|p| p.filename().map(str::to_string))
            .unwrap_or_default();
        if !matches!(keys::parse_segment_object_name(&name), Some((id, _)) if id == d.id) {
            return Err(format!(
                "damage note of segment {} names key {:?}",
                d.id, d.key
            ));
        }
    }
    for w in notes.windows(2) {
        if let [a, b] = w
            && a.id >= b.id
        {
            return Err(format!(
                "damage notes not strictly ascending: {} then {}",
                a.id, b.id
            ));
        }
    }
    Ok(())
}

fn check_chunk_ref(c: &ChunkRef) -> std::result::Result<(), String> {
    let path = Path::parse(&c.key).map_err(|e| format!("chunk key: {e}"))?;
    let name = path.filename().unwrap_or("");
    match parse_chunk_name(name) {
        Some((first, last, crc))
            if first == c.first_id && last == c.last_id && crc == c.crc && c.count >= 1 =>
        {
            Ok(())
        }
        _ => Err(format!("chunk reference {:?} is inconsistent", c.key)),
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

fn version_name(version: u64) -> String {
    format!("{version:020}{VERSION_SUFFIX}")
}

/// Strict inverse of the version object name.
pub fn parse_version_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(VERSION_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

fn chunk_name(first: SegmentId, last: SegmentId, crc: u32) -> String {
    format!("{:020}-{:020}-{crc:08x}{CHUNK_SUFFIX}", first.0, last.0)
}

fn parse_chunk_name(name: &str) -> Option<(SegmentId, SegmentId, u32)> {
    let stem = name.strip_suffix(CHUNK_SUFFIX)?;
    let mut parts = stem.split('-');
    let (first, last, crc) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(first)
        || !digits(last)
        || crc.len() != 8
        || !crc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let first = SegmentId(first.parse().ok()?);
    let last = SegmentId(last.parse().ok()?);
    if first > last {
        return None;
    }
    Some((first, last, u32::from_str_radix(crc, 16).ok()?))
}

// ---------------------------------------------------------------------------
// Envelope and codecs
// ---------------------------------------------------------------------------

fn encode_envelope(kind: u8, body: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(body.len()).map_err(|_| {
        Error::InvalidInput(format!(
            "manifest body of {} bytes is too large",
            body.len()
        ))
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// The body of an envelope of `kind`, after every check. `what` names the
/// object in errors.
fn decode_envelope<'a>(bytes: &'a [u8], kind: u8, max: usize, what: &str) -> Result<&'a [u8]> {
    let corrupt = |d: String| Error::corrupt(what, d);
    if bytes.len() > max {
        return Err(corrupt(format!(
            "{} bytes exceed the limit of {max}",
            bytes.len()
        )));
    }
    let (Some(head), Some(body)) = (bytes.get(..HEADER_LEN), bytes.get(HEADER_LEN..)) else {
        return Err(corrupt(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        )));
    };
    let h: [u8; HEADER_LEN] = head
        .try_into()
        .map_err(|_| corrupt("header length".into()))?;
    if h[0..4] != MAGIC {
        return Err(corrupt(format!("bad magic {:02x?}", &h[0..4])));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version > ENVELOPE_VERSION {
        return Err(Error::Unsupported(format!(
            "{what}: envelope version {version}, this build reads up to {ENVELOPE_VERSION}"
        )));
    }
    if version == 0 {
        return Err(corrupt("envelope version 0".into()));
    }
    if h[6] != kind {
        return Err(corrupt(format!(
            "object kind {} where {kind} was expected",
            h[6]
        )));
    }
    if h[7] != 0 {
        return Err(corrupt(format!("reserved byte is {}", h[7])));
    }
    let body_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if body_len > max {
        return Err(corrupt(format!(
            "header claims a body of {body_len} bytes, the limit is {max}"
        )));
    }
    if body.len() != body_len {
        return Err(corrupt(format!(
            "body is {} bytes, the header says {body_len} ({})",
            body.len(),
            if body.len() < body_len {
                "truncated"
            } else {
                "trailing bytes"
            }
        )));
    }
    let got = crc32fast::hash(body);
    if got != crc {
        return Err(corrupt(format!(
            "body CRC {got:08x} does not match the header's {crc:08x}"
        )));
    }
    Ok(body)
}

fn check_format(body: &[u8], what: &str) -> Result<()> {
    let f: FormatOnly = serde_json::from_slice(body)
        .map_err(|e| Error::corrupt(what, format!("body does not decode: {e}")))?;
    if f.format > FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "{what}: format {}, this build reads up to {FORMAT_VERSION}",
            f.format
        )));
    }
    if f.format != FORMAT_VERSION {
        return Err(Error::corrupt(what, format!("format {}", f.format)));
    }
    Ok(())
}

/// Encodes a manifest version (envelope + JSON).
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(m)
        .map_err(|e| Error::InvalidInput(format!("manifest does not encode: {e}")))?;
    encode_envelope(KIND_HEAD, &body)
}

/// Decodes and checks a manifest version read from the key of `version` of
/// `stream`. Never panics, whatever the bytes.
pub fn decode_manifest(bytes: &[u8], stream: &str, version: u64, max: usize) -> Result<Manifest> {
    let what = format!("manifest {stream} version {version}");
    let body = decode_envelope(bytes, KIND_HEAD, max, &what)?;
    check_format(body, &what)?;
    let m: Manifest = serde_json::from_slice(body)
        .map_err(|e| Error::corrupt(&what, format!("body does not decode: {e}")))?;
    m.check(stream, version)
        .map_err(|d| Error::corrupt(&what, d))?;
    Ok(m)
}

fn encode_chunk(stream: &str, entries: &[SegmentEntry]) -> Result<(Vec<u8>, ChunkRef)> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Err(Error::InvalidInput("empty manifest chunk".into()));
    };
    let body = serde_json::to_vec(&ChunkBody {
        format: FORMAT_VERSION,
        stream: stream.to_string(),
        entries: entries.to_vec(),
    })
    .map_err(|e| Error::InvalidInput(format!("manifest chunk does not encode: {e}")))?;
    let bytes = encode_envelope(KIND_CHUNK, &body)?;
    let crc = crc32fast::hash(&bytes);
    let r = ChunkRef {
        key: chunk_name(first.id, last.id, crc),
        len: bytes.len() as u64,
        crc,
        count: entries.len() as u64,
        first_id: first.id,
        last_id: last.id,
    };
    Ok((bytes, r))
}

/// Decodes a chunk and checks it against the reference that names it.
pub fn decode_chunk(
    bytes: &[u8],
    stream: &str,
    r: &ChunkRef,
    max: usize,
) -> Result<Vec<SegmentEntry>> {
    let what = format!("manifest chunk {}", r.key);
    let corrupt = |d: String| Error::corrupt(&what, d);
    if bytes.len() as u64 != r.len || crc32fast::hash(bytes) != r.crc {
        return Err(corrupt(format!(
            "{} bytes with CRC {:08x}, the manifest expects {} bytes with CRC {:08x}",
            bytes.len(),
            crc32fast::hash(bytes),
            r.len,
            r.crc
        )));
    }
    let body = decode_envelope(bytes, KIND_CHUNK, max, &what)?;
    check_format(body, &what)?;
    let c: ChunkBody =
        serde_json::from_slice(body).map_err(|e| corrupt(format!("body does not decode: {e}")))?;
    if c.stream != stream {
        return Err(corrupt(format!("names stream {:?}", c.stream)));
    }
    check_sorted(&c.entries).map_err(corrupt)?;
    let (Some(first), Some(last)) = (c.entries.first(), c.entries.last()) else {
        return Err(corrupt("no entries".into()));
    };
    if c.entries.len() as u64 != r.count || first.id != r.first_id || last.id != r.last_id {
        return Err(corrupt(format!(
            "{} entries {}..={}, the manifest expects {} entries {}..={}",
            c.entries.len(),
            first.id,
            last.id,
            r.count,
            r.first_id,
            r.last_id
        )));
    }
    Ok(c.entries)
}

// ---------------------------------------------------------------------------
// Store access
// ---------------------------------------------------------------------------

/// Tuning and safety switches of the manifest.
#[derive(Clone, Debug)]
pub struct ManifestOptions {
    /// Most entries kept inline in the head object; above this, the oldest
    /// `chunk_entries` spill into a chunk (repeatedly).
    pub max_inline: usize,
    /// Entries per spilled chunk; `1..=max_inline`.
    pub chunk_entries: usize,
    /// Newest versions kept; older ones are deleted. At least 2.
    pub keep_versions: u64,
    /// Largest manifest or chunk object read or written.
    pub max_object_bytes: usize,
    /// Run on a store whose probe found conditional creates NOT honoured
    /// (Garage). Nothing then stops two writers from overwriting each other:
    /// only safe with one writer, guaranteed by something else.
    pub allow_unconditional_store: bool,
    /// Retries of single requests (transient errors only).
    pub retry: RetryPolicy,
    /// Re-reads after lost races before one call gives up (retryable error).
    pub max_conflicts: u32,
}

impl Default for ManifestOptions {
    fn default() -> Self {
        ManifestOptions {
            max_inline: 1024,
            chunk_entries: 512,
            keep_versions: 16,
            max_object_bytes: 64 << 20,
            allow_unconditional_store: false,
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                request_timeout: Duration::from_secs(60),
            },
            max_conflicts: 32,
        }
    }
}

enum Created {
    New,
    Exists,
}

enum Publish {
    Done,
    Conflict,
}

/// A stream's manifest in one store: reads, and the entry to ownership.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct ManifestStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: RemoteStore,
    stream: String,
    dir: Path,
    opts: ManifestOptions,
    clock: Arc<dyn Clock>,
    /// Decoded chunks by their full reference. Chunks are create-only and
    /// named by their CRC, so a decoded one never goes stale; bounded by
    /// [`CHUNK_CACHE_ENTRIES`] entries in all (cleared when over).
    chunks: std::sync::Mutex<ChunkCache>,
    /// Another owner's lease as last seen by `take_ownership`, on the
    /// monotonic clock (see `renewal::Seen`).
    seen: std::sync::Mutex<Option<renewal::Seen>>,
}

/// Most chunk entries a [`ManifestStore`] keeps decoded (about 200 bytes
/// each: 131,072 entries is some 26 MB).
pub const CHUNK_CACHE_ENTRIES: usize = 1 << 17;

#[derive(Debug, Default)]
struct ChunkCache {
    map: HashMap<ChunkRef, Arc<Vec<SegmentEntry>>>,
    entries: usize,
}

impl ManifestStore {
    /// Probes the store and opens the manifest of `stream`. Refused when the
    /// store does not honour conditional creates, unless
    /// `opts.allow_unconditional_store`.
    pub async fn open(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
    ) -> Result<ManifestStore> {
        let caps = probe::probe(store).await?;
        Self::with_capabilities(store, stream, opts, &caps, Arc::new(SystemClock))
    }

    /// A read-only view of `stream`'s manifest: reads need no probe (the
    /// store's conditional creates matter only to writers), so none runs.
    /// Anything written through it still goes through the usual CAS, but
    /// writers should come from [`ManifestStore::open`].
    pub fn reader(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
    ) -> Result<ManifestStore> {
        let caps = Capabilities {
            conditional_create: true,
            ..Capabilities::default()
        };
        Self::with_capabilities(store, stream, opts, &caps, Arc::new(SystemClock))
    }

    /// Opens with capabilities measured earlier and an explicit clock.
    pub fn with_capabilities(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
        caps: &Capabilities,
        clock: Arc<dyn Clock>,
    ) -> Result<ManifestStore> {
        keys::validate_stream(stream)?;
        if opts.max_inline == 0 || opts.chunk_entries == 0 || opts.chunk_entries > opts.max_inline {
            return Err(Error::InvalidInput(format!(
                "manifest options: need 1 <= chunk_entries ({}) <= max_inline ({})",
                opts.chunk_entries, opts.max_inline
            )));
        }
        if opts.keep_versions < 2 || opts.max_object_bytes < 1024 || opts.max_conflicts == 0 {
            return Err(Error::InvalidInput(
                "manifest options: keep_versions >= 2, max_object_bytes >= 1024, \
                 max_conflicts >= 1"
                    .into(),
            ));
        }
        if !caps.conditional_create {
            if !opts.allow_unconditional_store {
                return Err(Error::Remote(format!(
                    "store {} does not honour conditional creates (If-None-Match: *; its probe \
                     saw a second create overwrite the first), so the remote manifest (on by \
                     default) cannot fence a second writer of stream {stream:?}; refusing to \
                     open. Either use a store that honours them (AWS S3, MinIO, Ceph RGW, \
                     s3s-fs), or choose single-writer mode explicitly with `manifest = false` \
                     in the config file or `--manifest false` on the command line (weaker: nothing detects or fences a second writer of \
                     the stream; only where exactly one writer is guaranteed by other means; \
                     see docs/crash-safety.md \"Single-writer mode\"). \
                     allow_unconditional_store = true keeps the manifest on such a store \
                     without fencing, under the same condition",
                    store.display_url()
                )));
            }
            tracing::warn!(
                store = %store.display_url(),
                stream,
                "conditional creates are not honoured; manifest fencing is OFF (override set)"
            );
        }
        let dir = store.prefix().clone().join(stream).join(MANIFEST_DIR);
        Ok(ManifestStore {
            inner: Arc::new(Inner {
                store: store.clone(),
                stream: stream.to_string(),
                dir,
                opts,
                clock,
                chunks: std::sync::Mutex::new(ChunkCache::default()),
                seen: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn stream(&self) -> &str {
        &self.inner.stream
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn options(&self) -> &ManifestOptions {
        &self.inner.opts
    }
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// `{prefix}/{stream}/manifest/versions`.
    pub fn versions_dir(&self) -> Path {
        self.inner.dir.clone().join(VERSIONS_DIR)
    }
    /// The key of manifest `version`.
    pub fn version_key(&self, version: u64) -> Path {
        self.versions_dir().join(version_name(version))
    }
    fn chunk_key(&self, name: &str) -> Path {
        self.inner.dir.clone().join(CHUNKS_DIR).join(name)
    }

    fn os(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.object_store().clone()
    }

    /// The newest manifest, `None` when the stream has none yet.
    pub async fn load(&self) -> Result<Option<Manifest>> {
        Ok(self.load_latest().await?.map(|(m, _)| m))
    }

    /// Every committed entry (chunks and inline), ascending by id.
    pub async fn all_segments(&self, m: &Manifest) -> Result<Vec<SegmentEntry>> {
        let mut all = Vec::new();
        for c in &m.chunks {
            all.extend(self.read_chunk(c).await?);
        }
        all.extend(m.segments.iter().cloned());
        all.sort_by_key(|e| e.id);
        if let Some(w) = all.windows(2).find(|w| matches!(w, [a, b] if a.id == b.id)) {
            let id = w.first().map(|e| e.id).unwrap_or_default();
            return Err(Error::corrupt(
                format!("manifest {} version {}", self.stream(), m.version),
                format!("segment {id} is listed twice"),
            ));
        }
        Ok(all)
    }

    /// Takes the stream for `owner_id`: publishes the next version with
    /// epoch + 1 and a lease until now + `ttl`. Refused with
    /// [`Error::Claimed`] while another owner's lease is live. The same
    /// owner id may always re-take (a restart): the epoch still moves, so the
    /// previous incarnation is fenced.
    pub async fn take_ownership(&self, owner_id: &str, ttl: Duration) -> Result<ManifestWriter> {
        lease::validate_owner(owner_id)?;
        if let Err(e) = lease::check_ttl(ttl, &self.inner.opts.retry) {
            // Logged, not refused: `Config::manifest_options` shortens
            // manifest requests to fit the lease, so only a TTL too short
            // for even 1 s requests (or hand-built options) gets here.
            tracing::warn!(stream = self.stream(), "{e}");
        }
        for _ in 0..self.inner.opts.max_conflicts {
            let latest = self.load_latest().await?;
            let now = self.now_ms();
            let expires_ms = lease::expiry(now, ttl)?;
            let next = match latest {
                None => Manifest {
                    format: FORMAT_VERSION,
                    stream: self.stream().to_string(),
                    version: 1,
                    epoch: 1,
                    lease: None,
                    written_ms: now,
                    segment_count: 0,
                    chunks: Vec::new(),
                    segments: Vec::new(),
                    damaged: Vec::new(),
                },
                Some((m, _)) => {
                    if let Some(cur) = self.current_lease(&m).await?
                        && self.keeps_out(&cur, owner_id, now)
                    {
                        let l = &cur.lease;
                        return Err(Error::Claimed(format!(
                            "stream {:?} is held by owner {:?} (epoch {}) until {}; \
                             it can be taken after that or once released",
                            self.stream(),
                            l.owner,
                            l.epoch,
                            lease::describe_time(l.expires_ms, now)
                        )));
                    }
                    let (Some(version), Some(epoch)) =
                        (m.version.checked_add(1), m.epoch.checked_add(1))
                    else {
                        return Err(Error::corrupt(
                            format!("manifest {}", self.stream()),
                            "version or epoch at u64::MAX",
                        ));
                    };
                    Manifest {
                        version,
                        epoch,
                        written_ms: now,
                        ..m
                    }
                }
            };
            let next = Manifest {
                lease: Some(Lease {
                    owner: owner_id.to_string(),
                    epoch: next.epoch,
                    acquired_ms: now,
                    expires_ms,
                }),
                ..next
            };
            match self.publish(&next).await? {
                Publish::Done => {
                    let keeper = LeaseKeeper::new(self.clone(), owner_id, next.epoch, expires_ms);
                    // Renewal 0 of the new epoch: an earlier owner's next
                    // renewal finds it and stops. Failing to write it only
                    // delays that to the earlier owner's next commit.
                    if let Err(e) = keeper.renew(ttl).await {
                        tracing::warn!(stream = self.stream(), error = %e, "could not write the first lease renewal");
                    }
                    self.sweep(next.version).await;
                    self.sweep_renewals(next.epoch).await;
                    tracing::info!(
                        stream = self.stream(),
                        owner = owner_id,
                        epoch = next.epoch,
                        version = next.version,
                        "took ownership"
                    );
                    return Ok(ManifestWriter {
                        ms: self.clone(),
                        owner: owner_id.to_string(),
                        epoch: next.epoch,
                        base: next,
                        dead: None,
                        chunk_cache: HashMap::new(),
                        keeper,
                    });
                }
                Publish::Conflict => continue,
            }
        }
        Err(self.too_many_conflicts("take ownership"))
    }

    fn too_many_conflicts(&self, what: &str) -> Error {
        Error::RemoteRetryable(format!(
            "{what} of stream {:?}: lost {} races in a row for the next manifest version",
            self.stream(),
            self.inner.opts.max_conflicts
        ))
    }

    /// The highest version and its decoded body, re-listing when it was
    /// deleted between LIST and GET.
    async fn load_latest(&self) -> Result<Option<(Manifest, Bytes)>> {
        for _ in 0..LOAD_ATTEMPTS {
            let Some(v) = self.list_versions(None).await?.into_iter().max() else {
                return Ok(None);
            };
            let what = format!("manifest {} version {v}", self.stream());
            let Some(bytes) = self.get_bytes(&self.version_key(v), &what).await? else {
                continue;
            };
            let m = decode_manifest(&bytes, self.stream(), v, self.inner.opts.max_object_bytes)?;
            return Ok(Some((m, bytes)));
        }
        Err(Error::RemoteRetryable(format!(
            "manifest of stream {:?}: the newest version vanished between LIST and GET \
             {LOAD_ATTEMPTS} times",
            self.stream()
        )))
    }

    /// Everything listed under `dir` (after `offset`), with retries.
    async fn list_under(
        &self,
        dir: &Path,
        offset: Option<Path>,
        what: &'static str,
    ) -> Result<Vec<ObjectMeta>> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        with_retries(&self.inner.opts.retry, &mut rng, what, |_| {
            let (os, dir, offset) = (os.clone(), dir.clone(), offset.clone());
            async move {
                match &offset {
                    None => os.list(Some(&dir)).try_collect().await,
                    Some(o) => os.list_with_offset(Some(&dir), o).try_collect().await,
                }
            }
        })
        .await
        .map_err(classify)
    }

    /// Versions listed under `versions/`, all or only those after `after`.
    async fn list_versions(&self, after: Option<u64>) -> Result<Vec<u64>> {
        let dir = self.versions_dir();
        let offset = after.map(|v| self.version_key(v));
        let listed = self.list_under(&dir, offset, "manifest LIST").await?;
        Ok(listed
            .iter()
            .filter_map(|m| {
                let v = parse_version_name(m.location.filename()?)?;
                // Only direct children of versions/ count.
                (m.location == dir.clone().join(version_name(v))).then_some(v)
            })
            .filter(|v| after.is_none_or(|a| *v > a))
            .collect())
    }

    /// The bytes of `key`, `None` when it does not exist. The size is checked
    /// against the limit before the body is read.
    async fn get_bytes(&self, key: &Path, what: &str) -> Result<Option<Bytes>> {
        self.get_bytes_max(key, what, self.inner.opts.max_object_bytes)
            .await
    }

    /// [`get_bytes`](Self::get_bytes) with its own size limit.
    async fn get_bytes_max(&self, key: &Path, what: &str, max: usize) -> Result<Option<Bytes>> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest GET", |_| {
            let (os, key) = (os.clone(), key.clone());
            async move {
                let r = os.get_opts(&key, GetOptions::default()).await?;
                if r.meta.size > max as u64 {
                    return Ok(Err(r.meta.size));
                }
                r.bytes().await.map(Ok)
            }
        })
        .await;
        match res {
            Ok(Ok(b)) => Ok(Some(b)),
            Ok(Err(size)) => Err(Error::corrupt(
                what,
                format!("object is {size} bytes, the limit is {max}"),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// `PutMode::Create` with retries; a lost answer comes back as `Exists`.
    async fn create(&self, key: &Path, bytes: Bytes) -> Result<Created> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest PUT", |_| {
            let (os, key, bytes) = (os.clone(), key.clone(), bytes.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                os.put_opts(&key, PutPayload::from(bytes), opts).await
            }
        })
        .await;
        match res {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::Exists),
            Err(e) => Err(classify(e)),
        }
    }

    async fn delete(&self, key: &Path) -> Result<()> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest DELETE", |_| {
            let (os, key) = (os.clone(), key.clone());
            async move { os.delete(&key).await }
        })
        .await;
        match res {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Creates version `m.version`. `Done`: it is ours and the newest line
    /// of versions continues from it. `Conflict`: someone else holds the
    /// slot, or our object filled a slot emptied long ago (then it is
    /// deleted again): re-read and decide.
    async fn publish(&self, m: &Manifest) -> Result<Publish> {
        let bytes = Bytes::from(encode_manifest(m)?);
        if bytes.len() > self.inner.opts.max_object_bytes {
            return Err(Error::InvalidInput(format!(
                "manifest version {} would be {} bytes, above max_object_bytes {}; \
                 lower max_inline",
                m.version,
                bytes.len(),
                self.inner.opts.max_object_bytes
            )));
        }
        let key = self.version_key(m.version);
        crate::failpoint::crash("manifest.publish");
        let created = self.create(&key, bytes.clone()).await?;
        crate::failpoint::crash("manifest.publish.after");
        let ours = match created {
            Created::New => true,
            // A lost answer of our own create reads back as exactly our bytes
            // (the retry sent the same ones); anything else is another writer.
            Created::Exists => {
                let what = format!("manifest {} version {}", self.stream(), m.version);
                self.get_bytes(&key, &what)
                    .await?
                    .is_some_and(|b| b == bytes)
            }
        };
        if !ours {
            return Ok(Publish::Conflict);
        }
        let keep = self.inner.opts.keep_versions;
        let void_from = m.version.saturating_add(keep);
        let higher = self.list_versions(Some(m.version)).await?;
        if higher.iter().any(|v| *v >= void_from) {
            // The slot had been cleaned up: versions went on for at least
            // `keep` more while we were away. Our object is void.
            tracing::warn!(
                stream = self.stream(),
                version = m.version,
                "published into a slot emptied by clean-up; withdrawing it"
            );
            if let Err(e) = self.delete(&key).await {
                tracing::warn!(%key, error = %e, "could not delete a void manifest version");
            }
            return Ok(Publish::Conflict);
        }
        Ok(Publish::Done)
    }

    /// After publishing `version`: delete the version falling out of the
    /// kept window. Best effort.
    async fn trim(&self, version: u64) {
        let keep = self.inner.opts.keep_versions;
        crate::failpoint::crash("manifest.trim");
        if let Some(old) = version.checked_sub(keep).filter(|v| *v >= 1)
            && let Err(e) = self.delete(&self.version_key(old)).await
        {
            tracing::warn!(stream = self.stream(), old, error = %e, "could not delete an old manifest version");
        }
    }

    /// Deletes every version older than the kept window (after taking
    /// ownership, to catch up on failed trims). Best effort.
    async fn sweep(&self, version: u64) {
        let keep = self.inner.opts.keep_versions;
        let Some(limit) = version.checked_sub(keep) else {
            return;
        };
        match self.list_versions(None).await {
            Ok(vs) => {
                for v in vs.into_iter().filter(|v| *v <= limit) {
                    if let Err(e) = self.delete(&self.version_key(v)).await {
                        tracing::warn!(stream = self.stream(), v, error = %e, "could not delete an old manifest version");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(stream = self.stream(), error = %e, "could not list manifest versions for clean-up")
            }
        }
    }

    async fn read_chunk(&self, r: &ChunkRef) -> Result<Vec<SegmentEntry>> {
        let cache = || self.inner.chunks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache().map.get(r) {
            return Ok(hit.as_ref().clone());
        }
        let what = format!("manifest chunk {}", r.key);
        let key = Path::parse(&r.key).map_err(|e| Error::corrupt(&what, e.to_string()))?;
        let bytes = self
            .get_bytes(&key, &what)
            .await?
            .ok_or_else(|| Error::corrupt(&what, "missing"))?;
        let entries = decode_chunk(&bytes, self.stream(), r, self.inner.opts.max_object_bytes)?;
        let mut c = cache();
        if c.entries + entries.len() > CHUNK_CACHE_ENTRIES {
            c.map.clear();
            c.entries = 0;
        }
        if entries.len() <= CHUNK_CACHE_ENTRIES {
            c.entries += entries.len();
            c.map.insert(r.clone(), Arc::new(entries.clone()));
        }
        Ok(entries)
    }

    /// Creates a chunk; an existing object must hold exactly these bytes.
    async fn put_chunk(&self, key: &Path, bytes: Bytes) -> Result<()> {
        match self.create(key, bytes.clone()).await? {
            Created::New => Ok(()),
            Created::Exists => {
                let what = format!("manifest chunk {key}");
                match self.get_bytes(key, &what).await? {
                    Some(b) if b == bytes => Ok(()),
                    _ => Err(Error::RemoteConflict(format!(
                        "manifest chunk {key} exists with other bytes; not overwritten"
                    ))),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// What [`ManifestWriter::commit`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new version lists the entries; `added` of them were new.
    Committed { version: u64, added: usize },
    /// Every entry was already listed (an earlier commit whose answer was
    /// lost, or a retry); nothing written.
    AlreadyCommitted { version: u64 },
}

/// The owner of a stream: commits entries, renews and releases the lease.
/// Every write carries this writer's epoch; once a newer epoch is seen the
/// writer is dead and every call returns [`Error::Fenced`].
#[derive(Debug)]
pub struct ManifestWriter {
    ms: ManifestStore,
    owner: String,
    epoch: u64,
    base: Manifest,
    dead: Option<Error>,
    chunk_cache: HashMap<String, Arc<Vec<SegmentEntry>>>,
    /// Renews the lease; shares its state (expiry, fence) with this writer.
    keeper: LeaseKeeper,
}

const CHUNK_CACHE_MAX: usize = 16;

impl ManifestWriter {
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The last version this writer published or read.
    pub fn manifest(&self) -> &Manifest {
        &self.base
    }
    /// When the lease ends by this owner's last renewal (0 after release).
    #[cfg(any(test, feature = "testing"))]
    pub fn lease_expires_ms(&self) -> u64 {
        self.base
            .lease
            .as_ref()
            .map_or(0, |l| l.expires_ms.max(self.keeper.expires_ms()))
    }
    /// Renews this writer's lease without borrowing the writer (so renewals
    /// never wait behind commits). Shares the fence with the writer.
    pub fn lease_keeper(&self) -> LeaseKeeper {
        self.keeper.clone()
    }
    pub fn store(&self) -> &ManifestStore {
        &self.ms
    }

    fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.keeper.fenced() {
            return Err(Error::Fenced(why.to_string()));
        }
        match &self.dead {
            None => Ok(()),
            Some(Error::Fenced(m)) => Err(Error::Fenced(m.clone())),
            Some(e) => Err(Error::Fenced(e.to_string())),
        }
    }

    /// Re-reads after a lost race: the newest version must still be ours
    /// (same epoch, our lease), else this writer is fenced for good.
    async fn rebase(&mut self) -> Result<()> {
        let stream = self.ms.stream().to_string();
        let Some((latest, _)) = self.ms.load_latest().await? else {
            return Err(Error::corrupt(
                format!("manifest {stream}"),
                "no version left after one was published",
            ));
        };
        let now = self.ms.now_ms();
        let fenced = if latest.epoch > self.epoch {
            let holder = match &latest.lease {
                Some(l) => format!(
                    "owner {:?} with a lease until {}",
                    l.owner,
                    lease::describe_time(l.expires_ms, now)
                ),
                None => "no current lease".into(),
            };
            Some(format!(
                "stream {stream:?}: epoch {} ({holder}) replaced our epoch {} (owner {:?}) at \
                 manifest version {}; stop publishing",
                latest.epoch, self.epoch, self.owner, latest.version
            ))
        } else if latest.epoch < self.epoch {
            return Err(Error::corrupt(
                format!("manifest {stream} version {}", latest.version),
                format!(
                    "epoch went back from ours {} to {}",
                    self.epoch, latest.epoch
                ),
            ));
        } else {
            match &latest.lease {
                Some(l) if l.owner == self.owner => None,
                Some(l) => Some(format!(
                    "stream {stream:?}: epoch {} is recorded for owner {:?}, not us ({:?})",
                    latest.epoch, l.owner, self.owner
                )),
                None => Some(format!(
                    "stream {stream:?}: our epoch {} was released at manifest version {}",
                    self.epoch, latest.version
                )),
            }
        };
        if let Some(why) = fenced {
            tracing::warn!(stream, epoch = self.epoch, "fenced: {why}");
            self.keeper.fence(&why);
            self.dead = Some(Error::Fenced(why.clone()));
            return Err(Error::Fenced(why));
        }
        self.base = latest;
        Ok(())
    }

    /// Publishes `make(base)` as the next version, re-reading and rebuilding
    /// after each lost race. `make` returns `None` when nothing needs writing.
    async fn publish_next<F>(&mut self, what: &str, mut make: F) -> Result<Option<u64>>
    where
        F: FnMut(&Manifest, u64) -> Result<Option<Manifest>>,
    {
        self.check_alive()?;
        for _ in 0..self.ms.inner.opts.max_conflicts {
            let now = self.ms.now_ms();
            let Some(next) = make(&self.base, now)? else {
                return Ok(None);
            };
            match self.ms.publish(&next).await? {
                Publish::Done => {
                    self.ms.trim(next.version).await;
                    let v = next.version;
                    self.base = next;
                    return Ok(Some(v));
                }
                Publish::Conflict => self.rebase().await?,
            }
        }
        Err(self.ms.too_many_conflicts(what))
    }

    fn next_version(base: &Manifest) -> Result<u64> {
        base.version.checked_add(1).ok_or_else(|| {
            Error::corrupt(format!("manifest {}", base.stream), "version at u64::MAX")
        })
    }

    /// Extends the lease to now + `ttl` with a renewal object (the manifest
    /// head is not rewritten; see [`LeaseKeeper::renew`]). Allowed after
    /// expiry as long as nobody took over (the epoch is still ours).
    #[cfg(any(test, feature = "testing"))]
    pub async fn renew(&mut self, ttl: Duration) -> Result<()> {
        self.check_alive()?;
        match self.keeper.renew(ttl).await {
            Err(Error::Fenced(why)) => {
                self.dead = Some(Error::Fenced(why.clone()));
                Err(Error::Fenced(why))
            }
            r => r,
        }
    }

    /// Gives the stream up: publishes a version without a lease (the epoch
    /// stays; the next owner takes epoch + 1 without waiting). Renewals
    /// stop first.
    pub async fn release(mut self) -> Result<()> {
        self.keeper.mark_released();
        self.publish_next("release", |base, now| {
            Ok(Some(Manifest {
                version: Self::next_version(base)?,
                written_ms: now,
                lease: None,
                ..base.clone()
            }))
        })
        .await?;
        Ok(())
    }

    /// Records that segment `note.id`'s object is damaged (readers skip it
    /// until [`clear_damage`](Self::clear_damage)). The segment must be
    /// listed under `note.key`. An identical note (same key and `lost`)
    /// writes nothing; `lost` only ever goes from false to true here.
    pub async fn mark_damaged(&mut self, note: DamageNote) -> Result<Option<u64>> {
        self.check_alive()?;
        match self.find(note.id).await? {
            Some(e) if e.key == note.key => {}
            Some(e) => {
                return Err(Error::InvalidInput(format!(
                    "segment {} is listed under {:?}, not {:?}",
                    note.id, e.key, note.key
                )));
            }
            None => {
                return Err(Error::InvalidInput(format!(
                    "segment {} is not in the manifest of {:?}",
                    note.id,
                    self.ms.stream()
                )));
            }
        }
        self.publish_next("mark damaged", |base, now| {
            let mut damaged = base.damaged.clone();
            match damaged.binary_search_by_key(&note.id, |d| d.id) {
                Ok(i) => {
                    let Some(old) = damaged.get_mut(i) else {
                        return Ok(None);
                    };
                    if old.lost || old.lost == note.lost {
                        return Ok(None);
                    }
                    *old = note.clone();
                }
                Err(i) => {
                    if damaged.len() >= DAMAGE_NOTES_MAX {
                        return Err(Error::RemoteRetryable(format!(
                            "manifest of {:?} already carries {DAMAGE_NOTES_MAX} damage notes; \
                             repair some first",
                            base.stream
                        )));
                    }
                    damaged.insert(i, note.clone());
                }
            }
            Ok(Some(Manifest {
                version: Self::next_version(base)?,
                written_ms: now,
                damaged,
                ..base.clone()
            }))
        })
        .await
    }

    /// Removes segment `id`'s damage note (its object was re-uploaded and
    /// verified). Nothing to remove writes nothing.
    pub async fn clear_damage(&mut self, id: SegmentId) -> Result<Option<u64>> {
        self.publish_next("clear damage", |base, now| {
            if base.damage(id).is_none() {
                return Ok(None);
            }
            Ok(Some(Manifest {
                version: Self::next_version(base)?,
                written_ms: now,
                damaged: base
                    .damaged
                    .iter()
                    .filter(|d| d.id != id)
                    .cloned()
                    .collect(),
                ..base.clone()
            }))
        })
        .await
    }

    /// Adds `entries` to the manifest in one new version. Entries already
    /// listed with identical content are skipped (a retry is harmless); one
    /// listed with other content is [`Error::RemoteConflict`]. Fails with
    /// [`Error::Fenced`] when a newer epoch exists; then nothing of this call
    /// is in the manifest.
    pub async fn commit(&mut self, entries: &[SegmentEntry]) -> Result<CommitOutcome> {
        self.check_alive()?;
        let entries = self.check_input(entries)?;
        for _ in 0..self.ms.inner.opts.max_conflicts {
            let new = self.missing(&entries).await?;
            if new.is_empty() {
                return Ok(CommitOutcome::AlreadyCommitted {
                    version: self.base.version,
                });
            }
            let added = new.len();
            let now = self.ms.now_ms();
            let mut next = Manifest {
                version: Self::next_version(&self.base)?,
                written_ms: now,
                segment_count: self.base.segment_count.saturating_add(added as u64),
                ..self.base.clone()
            };
            next.segments.extend(new);
            next.segments.sort_by_key(|e| e.id);
            self.spill(&mut next).await?;
            match self.ms.publish(&next).await? {
                Publish::Done => {
                    self.ms.trim(next.version).await;
                    let version = next.version;
                    self.base = next;
                    return Ok(CommitOutcome::Committed { version, added });
                }
                Publish::Conflict => self.rebase().await?,
            }
        }
        Err(self.ms.too_many_conflicts("commit"))
    }

    /// Input checks: well-formed keys of this stream, ids unique (identical
    /// duplicates collapse).
    fn check_input(&self, entries: &[SegmentEntry]) -> Result<Vec<SegmentEntry>> {
        let prefix = self.ms.inner.store.prefix();
        let mut v = entries.to_vec();
        for e in &v {
            e.check().map_err(Error::InvalidInput)?;
            let parsed = Path::parse(&e.key)
                .ok()
                .and_then(|p| keys::parse_segment_key(prefix, &p));
            if !matches!(&parsed, Some((s, _, _)) if s == self.ms.stream()) {
                return Err(Error::InvalidInput(format!(
                    "segment key {:?} is not under {prefix}/{}/segments",
                    e.key,
                    self.ms.stream()
                )));
            }
        }
        v.sort_by_key(|e| e.id);
        v.dedup();
        if let Some(w) = v.windows(2).find(|w| matches!(w, [a, b] if a.id == b.id)) {
            let id = w.first().map(|e| e.id).unwrap_or_default();
            return Err(Error::InvalidInput(format!(
                "segment {id} given twice with different content"
            )));
        }
        Ok(v)
    }

    /// The entries not yet in the base manifest (inline or in a chunk).
    async fn missing(&mut self, entries: &[SegmentEntry]) -> Result<Vec<SegmentEntry>> {
        let mut out = Vec::new();
        for e in entries {
            match self.find(e.id).await? {
                Some(found) if found == *e => {}
                Some(found) => {
                    return Err(Error::RemoteConflict(format!(
                        "segment {} is already in the manifest of {:?} as {:?} \
                         (checksum {}, {} bytes); refusing {:?} (checksum {}, {} bytes)",
                        e.id,
                        self.ms.stream(),
                        found.key,
                        found.key_sum(),
                        found.file_len,
                        e.key,
                        e.key_sum(),
                        e.file_len
                    )));
                }
                None => out.push(e.clone()),
            }
        }
        Ok(out)
    }

    /// The entry the manifest (as this writer last saw it) lists under
    /// `id`, inline or in a chunk.
    pub async fn listed(&mut self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        self.find(id).await
    }

    async fn find(&mut self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        if let Some(e) = self.base.inline(id) {
            return Ok(Some(e.clone()));
        }
        let covering: Vec<ChunkRef> = self
            .base
            .chunks
            .iter()
            .filter(|c| c.covers(id))
            .cloned()
            .collect();
        for c in covering {
            let entries = match self.chunk_cache.get(&c.key) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(self.ms.read_chunk(&c).await?);
                    if self.chunk_cache.len() >= CHUNK_CACHE_MAX {
                        self.chunk_cache.clear();
                    }
                    self.chunk_cache.insert(c.key.clone(), e.clone());
                    e
                }
            };
            if let Ok(i) = entries.binary_search_by_key(&id, |e| e.id) {
                return Ok(entries.get(i).cloned());
            }
        }
        Ok(None)
    }

    /// While more than `max_inline` entries are inline, moves the lowest
    /// `chunk_entries` into a new create-only chunk object.
    async fn spill(&mut self, next: &mut Manifest) -> Result<()> {
        let (max_inline, per_chunk) = (
            self.ms.inner.opts.max_inline,
            self.ms.inner.opts.chunk_entries,
        );
        while next.segments.len() > max_inline {
            let rest = next.segments.split_off(per_chunk.min(next.segments.len()));
            let spilled = std::mem::replace(&mut next.segments, rest);
            let (bytes, mut r) = encode_chunk(self.ms.stream(), &spilled)?;
            let key = self.ms.chunk_key(&r.key);
            r.key = key.to_string();
            self.ms.put_chunk(&key, Bytes::from(bytes)).await?;
            self.chunk_cache.insert(r.key.clone(), Arc::new(spilled));
            next.chunks.push(r);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> SegmentEntry {
        SegmentEntry {
            id: SegmentId(id),
            key: format!(
                "p/s/segments/{}",
                keys::segment_object_name(SegmentId(id), KeySum::Crc32(id as u32))
            ),
            file_len: 100 + id,
            file_crc: id as u32,
            crc64: None,
            item_count: 3,
            min_offset: id * 10,
            max_offset: id * 10 + 2,
            min_ts: 1_000 + id,
            max_ts: 2_000 + id,
        }
    }

    fn manifest(n: u64) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            stream: "s".into(),
            version: 7,
            epoch: 2,
            lease: Some(Lease {
                owner: "a".into(),
                epoch: 2,
                acquired_ms: 5,
                expires_ms: 10,
            }),
            written_ms: 6,
            segment_count: n,
            chunks: Vec::new(),
            segments: (1..=n).map(entry).collect(),
            damaged: Vec::new(),
        }
    }

    const MAX: usize = 1 << 20;

    #[test]
    fn manifest_round_trip() {
        let m = manifest(5);
        let b = encode_manifest(&m).unwrap();
        assert_eq!(&b[..4], b"TIMF");
        assert_eq!(decode_manifest(&b, "s", 7, MAX).unwrap(), m);
        // Another stream or version than the key says: corrupt.
        assert!(matches!(
            decode_manifest(&b, "t", 7, MAX),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            decode_manifest(&b, "s", 8, MAX),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_caught() {
        let b = encode_manifest(&manifest(3)).unwrap();
        for i in 0..b.len() * 8 {
            let mut x = b.clone();
            x[i / 8] ^= 1 << (i % 8);
            let r = decode_manifest(&x, "s", 7, MAX);
            assert!(
                matches!(r, Err(Error::Corrupt { .. } | Error::Unsupported(_))),
                "bit {i}: {r:?}"
            );
        }
        for len in 0..b.len() {
            let r = decode_manifest(&b[..len], "s", 7, MAX);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "len {len}: {r:?}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_manifest(&long, "s", 7, MAX).is_err());
    }

    #[test]
    fn garbage_and_huge_lengths_are_errors_not_panics() {
        let mut rng = fastrand::Rng::with_seed(42);
        for _ in 0..20_000 {
            let len = rng.usize(0..200);
            let mut v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() && v.len() >= 8 {
                v[..4].copy_from_slice(b"TIMF");
                v[4] = 1;
                v[5] = 0;
                v[6] = KIND_HEAD;
                v[7] = 0;
            }
            assert!(decode_manifest(&v, "s", 7, MAX).is_err());
        }
        // A header claiming 4 GiB of body: refused before anything else.
        let mut h = encode_envelope(KIND_HEAD, b"{}").unwrap();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode_manifest(&h, "s", 7, MAX).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        // Valid envelope, JSON that is not a manifest, or one with an extra field.
        for body in [
            &b"[1,2,3]"[..],
            b"{\"format\":1}",
            b"{\"format\":1,\"x\":1}",
            &[b'['; 100_000][..],
        ] {
            let b = encode_envelope(KIND_HEAD, body).unwrap();
            let r = decode_manifest(&b, "s", 7, MAX);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        }
    }

    #[test]
    fn newer_versions_are_unsupported_not_corrupt() {
        let mut b = encode_manifest(&manifest(1)).unwrap();
        b[4] = 2;
        assert!(matches!(
            decode_manifest(&b, "s", 7, MAX),
            Err(Error::Unsupported(_))
        ));
        let body = serde_json::to_vec(&serde_json::json!({"format": 2, "new": true})).unwrap();
        let b = encode_envelope(KIND_HEAD, &body).unwrap();
        assert!(matches!(
            decode_manifest(&b, "s", 7, MAX),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn invariants_are_checked() {
        let mut m = manifest(3);
        m.segments.swap(0, 1);
        let b = encode_manifest(&m).unwrap();
        assert!(decode_manifest(&b, "s", 7, MAX).is_err());

        let mut m = manifest(3);
        m.segment_count = 4;
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());

        let mut m = manifest(3);
        m.segments[1].file_crc ^= 1; // key names another CRC
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());

        let mut m = manifest(1);
        if let Some(l) = m.lease.as_mut() {
            l.epoch = 1;
        }
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());
    }

    #[test]
    fn chunk_round_trip_and_reference_checks() {
        let entries: Vec<_> = (10..20).map(entry).collect();
        let (bytes, r) = encode_chunk("s", &entries).unwrap();
        assert_eq!(
            parse_chunk_name(&r.key),
            Some((SegmentId(10), SegmentId(19), r.crc))
        );
        assert_eq!(decode_chunk(&bytes, "s", &r, MAX).unwrap(), entries);
        assert!(decode_chunk(&bytes, "t", &r, MAX).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 4;
        assert!(matches!(
            decode_chunk(&bad, "s", &r, MAX),
            Err(Error::Corrupt { .. })
        ));
        let wrong = ChunkRef {
            count: 9,
            ..r.clone()
        };
        assert!(decode_chunk(&bytes, "s", &wrong, MAX).is_err());
        // A head envelope is not a chunk.
        let head = encode_manifest(&manifest(1)).unwrap();
        let r2 = ChunkRef {
            len: head.len() as u64,
            crc: crc32fast::hash(&head),
            ..r
        };
        assert!(decode_chunk(&head, "s", &r2, MAX).is_err());
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(parse_version_name(&version_name(42)), Some(42));
        assert_eq!(parse_version_name(&version_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "0042.manifest",
            "00000000000000000042.manifest.tmp",
            "0000000000000000004x.manifest",
            "99999999999999999999.manifest",
        ] {
            assert_eq!(parse_version_name(bad), None, "{bad}");
        }
        let n = chunk_name(SegmentId(1), SegmentId(2), 0xabc);
        assert_eq!(
            parse_chunk_name(&n),
            Some((SegmentId(1), SegmentId(2), 0xabc))
        );
        assert_eq!(
            parse_chunk_name(&chunk_name(SegmentId(3), SegmentId(2), 1)),
            None
        );
        assert_eq!(parse_chunk_name("x-y-z.chunk"), None);
    }
}
