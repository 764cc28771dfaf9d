//! The manifest's data (entries, chunk references, damage notes), its
//! object names, and the checksummed envelope and codecs of its objects.
//! Pure: no I/O.

use super::*;

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
    pub(super) fn check(&self) -> std::result::Result<(), String> {
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
    pub(super) fn covers(&self, id: SegmentId) -> bool {
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
    /// An operator accepted the loss (`tierindex accept-loss`, only of a
    /// LOST note): readers go on skipping the segment, and reports name it
    /// as an accepted loss instead of asking an operator again. A copy
    /// found later still repairs it (the note is cleared). Absent from a
    /// note nobody accepted, so manifests without one read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<LossAcceptance>,
}

/// An operator's acceptance of a LOST segment's loss.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossAcceptance {
    /// When (the accepting command's clock, ms since Unix epoch).
    pub at_ms: u64,
    /// The operator's reason (at most [`DAMAGE_REASON_MAX`] bytes).
    pub reason: String,
}

impl DamageNote {
    /// A note with `reason` cut to [`DAMAGE_REASON_MAX`] bytes (at a char
    /// boundary).
    pub fn new(e: &SegmentEntry, reason: &str, lost: bool, marked_ms: u64) -> DamageNote {
        DamageNote {
            id: e.id,
            key: e.key.clone(),
            reason: cut_to(reason, DAMAGE_REASON_MAX),
            lost,
            marked_ms,
            accepted: None,
        }
    }

    /// A LOST note an operator accepted: its segment's entries are known
    /// lost and nothing more is asked of an operator.
    pub fn loss_accepted(&self) -> bool {
        self.lost && self.accepted.is_some()
    }

    /// A note that still asks something of an operator (a repair, or an
    /// acceptance of the loss).
    pub fn needs_operator(&self) -> bool {
        !self.loss_accepted()
    }
}

impl LossAcceptance {
    /// "accepted by an operator at <UTC time>: <reason>", for reports.
    pub fn describe(&self) -> String {
        acceptance_text(self.at_ms, &self.reason)
    }
}

/// Latest acceptance time a manifest may carry: the end of year 9999 (ms
/// since the Unix epoch), the last one an RFC 3339 time can say.
pub const ACCEPTED_MS_MAX: u64 = crate::remote::lease::RFC3339_MS_MAX;

/// [`LossAcceptance::describe`] of its two fields. A time past
/// [`ACCEPTED_MS_MAX`] (refused when a manifest is read; helper-79 F1: it
/// panicked the formatter) is shown as its number.
pub fn acceptance_text(at_ms: u64, reason: &str) -> String {
    let at = if at_ms <= ACCEPTED_MS_MAX {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        format!("{at_ms} ms since the epoch")
    };
    format!("loss accepted by an operator at {at}: {reason:?}")
}

/// `text` cut to at most `max` bytes at a char boundary.
pub(crate) fn cut_to(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_string()
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

    pub(super) fn check(&self, stream: &str, version: u64) -> std::result::Result<(), String> {
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
pub(super) struct ChunkBody {
    pub(super) format: u32,
    pub(super) stream: String,
    pub(super) entries: Vec<SegmentEntry>,
}

/// Just the format field, read before the strict decode so a newer format
/// is reported as such rather than as unknown fields.
#[derive(Deserialize)]
pub(super) struct FormatOnly {
    pub(super) format: u32,
}

pub(super) fn check_sorted(entries: &[SegmentEntry]) -> std::result::Result<(), String> {
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

pub(super) fn check_damage_notes(notes: &[DamageNote]) -> std::result::Result<(), String> {
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
        if let Some(a) = &d.accepted {
            if !d.lost {
                return Err(format!(
                    "damage note of segment {} is accepted but not LOST",
                    d.id
                ));
            }
            if a.at_ms > ACCEPTED_MS_MAX {
                return Err(format!(
                    "damage note of segment {} was accepted at {} ms, past year 9999",
                    d.id, a.at_ms
                ));
            }
            if a.reason.len() > DAMAGE_REASON_MAX {
                return Err(format!(
                    "damage note of segment {} has a {}-byte acceptance reason",
                    d.id,
                    a.reason.len()
                ));
            }
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

pub(super) fn check_chunk_ref(c: &ChunkRef) -> std::result::Result<(), String> {
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

pub(super) fn version_name(version: u64) -> String {
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

pub(super) fn chunk_name(first: SegmentId, last: SegmentId, crc: u32) -> String {
    format!("{:020}-{:020}-{crc:08x}{CHUNK_SUFFIX}", first.0, last.0)
}

pub(super) fn parse_chunk_name(name: &str) -> Option<(SegmentId, SegmentId, u32)> {
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

pub(super) fn encode_envelope(kind: u8, body: &[u8]) -> Result<Vec<u8>> {
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
pub(super) fn decode_envelope<'a>(bytes: &'a [u8], kind: u8, max: usize, what: &str) -> Result<&'a [u8]> {
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

pub(super) fn check_format(body: &[u8], what: &str) -> Result<()> {
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

pub(super) fn encode_chunk(stream: &str, entries: &[SegmentEntry]) -> Result<(Vec<u8>, ChunkRef)> {
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

