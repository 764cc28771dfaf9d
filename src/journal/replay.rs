//! The bytes of `journal.log` (header and frames, both directions) and replay:
//! the pure function from file bytes to the state table.
//!
//! Everything here treats the input as untrusted: every slice is taken with
//! `get`, every length is bounded before use, and nothing panics on any input.
//! The layout is drawn byte by byte in `docs/format/journal.md`.
//!
//! Replay stops at the first frame that is short, has an impossible length, a
//! bad CRC, an undecodable payload, or is intact but inconsistent with what
//! came before it (an illegal transition, a misplaced snapshot). It then
//! classifies what it stopped at ([`ReplayReport::damage`]):
//! - a torn tail: a short or checksum-failing frame with no intact frame
//!   anywhere after it. Only the last append can be torn (every earlier one
//!   was fdatasync'ed before the next was written), so `Journal::open` cuts it.
//! - damage: an intact (CRC-valid) frame that does not decode, is of a newer
//!   record version, or breaks the state machine; or a bad frame followed by
//!   intact frames (corruption in the middle, not a torn write). `Journal::open`
//!   refuses to open and cuts nothing; `journal::rebuild` (`tierindex fsck
//!   --repair`) rebuilds the journal.

use serde::{Deserialize, Serialize};

use super::record::{Frame, JournalState, Record};
use super::{JournalDamage, ReplayReport};
use crate::error::{Error, Result};

/// First 8 bytes of every journal file.
pub const MAGIC: [u8; 8] = *b"TIXJRNL1";
/// The format version this build writes. Version 2 frames carry a record
/// version (`"v"`); version 1 files (no `"v"`, record version 1) are still
/// read, and a read-write open rewrites them as version 2 before it appends,
/// so an older build never finds a frame it would misread: it refuses the
/// header instead.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version this build reads.
pub const FORMAT_VERSION_MIN: u16 = 1;
/// The highest record (frame payload) version this build reads and writes
/// (see [`frame_version`] for which frames get it). A frame of a higher
/// version is refused, never cut.
pub const RECORD_VERSION: u16 = 4;

/// The record version a frame is written with: the lowest that holds it, so
/// a journal that never held a newer record stays readable by an older
/// build. Version 2 added [`Record::Requeued`]; version 3 added
/// [`Record::Resealing`] and [`Record::Resealed`] (and snapshots of segments
/// in those states, which an older build would take for quarantined);
/// version 4 a snapshot of a Released segment (the newest one, which
/// compaction keeps: an older build refused it as damage).
fn frame_version(frame: &Frame) -> u16 {
    use super::record::SegmentState as S;
    let record = |r: &Record| match r {
        Record::Resealing { .. } | Record::Resealed { .. } => 3,
        Record::Requeued { .. } => 2,
        _ => 1,
    };
    match frame {
        Frame::Batch(recs) => recs.iter().map(record).max().unwrap_or(1),
        Frame::Snapshot(r) if r.state == S::Released => 4,
        Frame::Snapshot(r) if matches!(r.state, S::Resealing | S::Resealed) => 3,
        _ => 1,
    }
}
/// Header: magic(8) version(2) reserved(2) generation(8) crc(4).
pub const HEADER_LEN: usize = 24;
/// Frame header: len(4) crc(4).
pub const FRAME_HEADER_LEN: usize = 8;
/// Hard cap on one frame's payload, independent of configuration so that a
/// smaller `max_record_bytes` after a restart never turns good frames into a
/// "torn tail". Writers stay below it; readers treat more as corruption.
pub const FRAME_LEN_MAX: u32 = 16 << 20;

/// The decoded file header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    /// Bumped by every compaction; the file created by `open` is generation 1.
    pub generation: u64,
}

/// Why replay stopped before the end of the file.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TailKind {
    /// Fewer bytes left than the frame header or the payload needs.
    Short,
    /// Length zero or above [`FRAME_LEN_MAX`].
    BadLength,
    /// CRC over length and payload does not match.
    BadChecksum,
    /// Intact by CRC but not a JSON `Frame` this build knows.
    Undecodable,
    /// Intact and decodable but not allowed here: an illegal transition, a
    /// snapshot after a batch, a second `MaxId`. This is not a torn write;
    /// it means a bug or tampering, so it is also logged as an error.
    Inconsistent,
    /// Intact, but of a record version above [`RECORD_VERSION`]: written by
    /// a newer tierindex. Refused, never cut.
    Newer,
}

impl TailKind {
    /// True for a frame whose CRC matched: it was written whole, so it can
    /// never be the torn end of an interrupted append.
    pub fn is_intact(self) -> bool {
        matches!(
            self,
            TailKind::Undecodable | TailKind::Inconsistent | TailKind::Newer
        )
    }
}

/// Where and why replay stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailError {
    /// File offset of the first byte not accepted.
    pub offset: u64,
    pub kind: TailKind,
    pub detail: String,
}

/// One intact frame and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedFrame {
    pub offset: u64,
    /// Total bytes including the 8-byte frame header.
    pub len: u64,
    pub frame: Frame,
}

/// Everything [`decode_file`] could read.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedFile {
    pub header: Header,
    /// Intact frames in file order, up to the first bad one.
    pub frames: Vec<DecodedFrame>,
    /// Offset just past the last intact frame.
    pub valid_len: u64,
    /// Why decoding stopped before the end of the input, if it did.
    pub tail: Option<TailError>,
}

/// The outcome of replaying a whole file.
#[derive(Clone, Debug, PartialEq)]
pub struct Replayed {
    pub state: JournalState,
    pub report: ReplayReport,
    /// Offset just past the last frame that was applied.
    pub valid_len: u64,
}

/// The 24 header bytes for `generation`.
pub fn encode_header(generation: u64) -> [u8; HEADER_LEN] {
    encode_header_version(FORMAT_VERSION, generation)
}

/// The 24 header bytes of a file of format `version` (tests write old
/// versions with it).
#[doc(hidden)]
pub fn encode_header_version(version: u16, generation: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    // 10..12 reserved, zero.
    h[12..20].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses and checks the header at the start of `bytes`.
///
/// The header is only ever written whole (to a temporary file that is fsynced
/// before it is renamed into place), so a bad header is never a torn write:
/// it is an error, and the caller decides whether to quarantine the file.
pub fn decode_header(bytes: &[u8]) -> Result<Header> {
    let what = "journal header";
    let (Some(head), Some(stored_crc)) = (bytes.get(0..20), le_u32(bytes, 20)) else {
        return Err(Error::corrupt(
            what,
            format!(
                "{} bytes of data (zero bytes at the end not counted), shorter than the \
                 {HEADER_LEN}-byte header: the journal is empty, zeroed or cut; `tierindex \
                 fsck --repair` rebuilds it from the local sealed files",
                bytes.len()
            ),
        ));
    };
    if head.get(0..8) != Some(&MAGIC[..]) {
        return Err(Error::corrupt(what, "bad magic: not a tierindex journal"));
    }
    let crc = crc32fast::hash(head);
    if crc != stored_crc {
        return Err(Error::corrupt(
            what,
            format!("header crc {stored_crc:#010x} != computed {crc:#010x}"),
        ));
    }
    let version = le_u16(head, 8).unwrap_or(0);
    if version > FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "{what}: format version {version}, this build reads {FORMAT_VERSION_MIN} to \
             {FORMAT_VERSION}; the journal was written by a newer tierindex: use that version \
             (nothing was changed)"
        )));
    }
    if version < FORMAT_VERSION_MIN {
        return Err(Error::corrupt(
            what,
            format!(
                "format version {version} is not supported (this build reads \
                 {FORMAT_VERSION_MIN} to {FORMAT_VERSION})"
            ),
        ));
    }
    let reserved = le_u16(head, 10).unwrap_or(u16::MAX);
    if reserved != 0 {
        return Err(Error::corrupt(
            what,
            format!("reserved bytes are {reserved:#06x}, not 0"),
        ));
    }
    let generation = le_u64(head, 12).unwrap_or(0);
    Ok(Header {
        version,
        generation,
    })
}

/// The JSON payload of `frame`: `{"v":<frame_version>,"<Kind>":...}`.
fn frame_payload(frame: &Frame) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(frame)
        .map_err(|e| Error::InvalidInput(format!("journal frame does not serialize: {e}")))?;
    // An externally tagged enum serializes as a one-key object: `{"Kind":..}`.
    let Some(rest) = body.strip_prefix(b"{") else {
        return Err(Error::InvalidInput(
            "journal frame does not serialize as a JSON object".into(),
        ));
    };
    let mut payload = format!("{{\"v\":{},", frame_version(frame)).into_bytes();
    payload.extend_from_slice(rest);
    Ok(payload)
}

/// Decodes a frame payload: the record version (absent in format 1 files:
/// version 1), then the frame.
fn decode_payload(payload: &[u8]) -> std::result::Result<Frame, (TailKind, String)> {
    // The shape this build writes, `{"v":N,"Kind":...}`, parses straight into
    // a frame (replay of a large journal is mostly this), taken only when
    // the frame encodes back to exactly these bytes: a direct parse skips
    // unknown fields without checking them (an out-of-range number, a lone
    // surrogate, bad UTF-8) where the general path refuses them. Anything
    // else (format 1, other spacing or key order, unknown fields) goes
    // through the general path below, with the same answer.
    if let Some((version, rest)) = written_version(payload)
        && version <= u64::from(RECORD_VERSION)
    {
        let mut body = Vec::with_capacity(rest.len() + 1);
        body.push(b'{');
        body.extend_from_slice(rest);
        if let Ok(frame) = serde_json::from_slice::<Frame>(&body)
            && frame_payload(&frame).is_ok_and(|again| again == payload)
        {
            return Ok(frame);
        }
    }
    decode_payload_general(payload)
}

/// [`decode_payload`] for any payload: through a JSON value.
fn decode_payload_general(payload: &[u8]) -> std::result::Result<Frame, (TailKind, String)> {
    let mut value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| (TailKind::Undecodable, e.to_string()))?;
    let Some(obj) = value.as_object_mut() else {
        return Err((TailKind::Undecodable, "payload is not a JSON object".into()));
    };
    let version = match obj.remove("v") {
        None => 1,
        Some(v) => v.as_u64().filter(|v| *v >= 1).ok_or_else(|| {
            (
                TailKind::Undecodable,
                format!("record version {v} is not valid"),
            )
        })?,
    };
    if version > u64::from(RECORD_VERSION) {
        return Err((
            TailKind::Newer,
            format!(
                "record version {version}; this build reads up to {RECORD_VERSION}: written by a \
                 newer tierindex"
            ),
        ));
    }
    serde_json::from_value::<Frame>(value).map_err(|e| (TailKind::Undecodable, e.to_string()))
}

/// The record version and the rest of a payload that starts exactly as
/// [`frame_payload`] writes it: `{"v":` digits `,` (the rest starts after
/// the comma). `None` for any other start.
fn written_version(payload: &[u8]) -> Option<(u64, &[u8])> {
    let rest = payload.strip_prefix(b"{\"v\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 5 || rest.first() == Some(&b'0') {
        return None;
    }
    let version = std::str::from_utf8(rest.get(..digits)?).ok()?.parse().ok()?;
    let rest = rest.get(digits..)?.strip_prefix(b",")?;
    Some((version, rest))
}

/// Appends the encoded `frame` to `out`; returns the payload length.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<u32> {
    let payload = frame_payload(frame)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len > 0 && *len <= FRAME_LEN_MAX)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "journal frame of {} bytes exceeds the {FRAME_LEN_MAX}-byte format limit; \
                 append fewer records at once",
                payload.len()
            ))
        })?;
    let len_bytes = len.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(&payload);
    let start = out.len();
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    // Pair assertion: what we are about to persist must read back as itself.
    debug_assert!(
        matches!(decode_frame(out, start), Ok((f, n)) if f == *frame && n == out.len() - start)
    );
    Ok(len)
}

/// Decodes the frame at `pos`; returns it and its total length.
fn decode_frame(bytes: &[u8], pos: usize) -> std::result::Result<(Frame, usize), TailError> {
    let fail = |kind, detail: String| TailError {
        offset: pos as u64,
        kind,
        detail,
    };
    let rest = bytes.get(pos..).unwrap_or_default();
    let (Some(len), Some(stored_crc)) = (le_u32(rest, 0), le_u32(rest, 4)) else {
        return Err(fail(
            TailKind::Short,
            format!("{} bytes left, frame header needs 8", rest.len()),
        ));
    };
    if len == 0 || len > FRAME_LEN_MAX {
        return Err(fail(TailKind::BadLength, format!("frame length {len}")));
    }
    let end = FRAME_HEADER_LEN + len as usize;
    let Some(payload) = rest.get(FRAME_HEADER_LEN..end) else {
        return Err(fail(
            TailKind::Short,
            format!(
                "frame length {len} but only {} payload bytes left",
                rest.len().saturating_sub(8)
            ),
        ));
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(payload);
    let crc = crc.finalize();
    if crc != stored_crc {
        return Err(fail(
            TailKind::BadChecksum,
            format!("frame crc {stored_crc:#010x} != computed {crc:#010x}"),
        ));
    }
    match decode_payload(payload) {
        Ok(frame) => Ok((frame, end)),
        Err((kind, detail)) => Err(fail(kind, detail)),
    }
}

/// [`decode_frame`] for the rebuild.
pub(super) fn decode_frame_at(
    bytes: &[u8],
    pos: usize,
) -> std::result::Result<(Frame, usize), TailError> {
    decode_frame(bytes, pos)
}

/// Total length of the CRC-valid frame at `pos`, if there is one (whether or
/// not its payload decodes).
fn intact_frame_len(bytes: &[u8], pos: usize) -> Option<usize> {
    match decode_frame(bytes, pos) {
        Ok((_, len)) => Some(len),
        Err(e) if e.kind.is_intact() => {
            let len = le_u32(bytes.get(pos..)?, 0)?;
            Some(FRAME_HEADER_LEN + len as usize)
        }
        Err(_) => None,
    }
}

/// The first offset at or after `from` where a frame that decodes starts,
/// and how many intact frames follow each other from there (the chain).
///
/// A damaged frame followed by such a chain is corruption in the middle of
/// the file, not a torn append: every append but the last was durable before
/// the next began. To keep a random match of the 32-bit CRC inside garbage
/// from passing as a resync, the first frame must also decode, and the chain
/// is followed to its end (the end of the file, or a remainder that holds no
/// further intact frame: the torn last append).
pub(super) fn find_resync(bytes: &[u8], from: usize) -> Option<(u64, u64)> {
    let mut start = from;
    while start + FRAME_HEADER_LEN <= bytes.len() {
        if decode_frame(bytes, start).is_ok() {
            let (mut pos, mut frames) = (start, 0u64);
            while let Some(len) = intact_frame_len(bytes, pos) {
                pos += len;
                frames += 1;
            }
            return Some((start as u64, frames));
        }
        start += 1;
    }
    None
}

/// What replay stopped at, judged: `None` for a torn tail (or no tail).
fn judge_tail(bytes: &[u8], tail: &TailError) -> Option<JournalDamage> {
    let at = usize::try_from(tail.offset).ok()?;
    let after = if tail.kind.is_intact() {
        intact_frame_len(bytes, at).map_or(at + 1, |len| at + len)
    } else {
        at + 1
    };
    let resync = find_resync(bytes, after);
    if !tail.kind.is_intact() && resync.is_none() {
        return None;
    }
    Some(JournalDamage {
        offset: tail.offset,
        kind: tail.kind,
        detail: tail.detail.clone(),
        resync_at: resync.map(|(at, _)| at),
        frames_after: resync.map_or(0, |(_, n)| n),
    })
}

/// The intact frames of a journal file's body (after its header), in file
/// order, decoded one at a time: the last item is the error that stopped
/// them, if one did. Replay applies each frame as it is decoded, so its
/// memory follows the state, not the file's frame count.
pub(super) struct Frames<'a> {
    bytes: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    /// The frames from just after the header.
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Frames {
            bytes,
            pos: HEADER_LEN,
            done: false,
        }
    }

    /// Offset just past the last frame returned.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }
}

impl Iterator for Frames<'_> {
    type Item = std::result::Result<DecodedFrame, TailError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.bytes.len() {
            return None;
        }
        match decode_frame(self.bytes, self.pos) {
            Ok((frame, len)) => {
                let at = self.pos;
                self.pos += len;
                Some(Ok(DecodedFrame {
                    offset: at as u64,
                    len: len as u64,
                    frame,
                }))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// A journal file read one frame at a time from a reader (a file through a
/// buffer), for passes that need no state table: the check of a
/// compaction's output and the highest segment id a journal records. Each
/// frame goes through the decoder replay uses.
pub(super) struct FrameReader<R> {
    r: R,
    /// Offset of the next frame.
    pos: u64,
    buf: Vec<u8>,
}

impl<R: std::io::Read> FrameReader<R> {
    /// Reads and checks the header of `path` (named in errors): a file
    /// shorter than a header is damage, a failed read an I/O error.
    pub(super) fn new(mut r: R, path: &std::path::Path) -> Result<(Header, Self)> {
        let mut head = [0u8; HEADER_LEN];
        r.read_exact(&mut head).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(
                    path.display().to_string(),
                    format!("shorter than the journal's {HEADER_LEN}-byte header"),
                )
            } else {
                Error::io(path, "read journal header", e)
            }
        })?;
        let header = decode_header(&head)?;
        Ok((
            header,
            FrameReader {
                r,
                pos: HEADER_LEN as u64,
                buf: Vec::new(),
            },
        ))
    }

    /// Offset of the next frame (the length read so far).
    pub(super) fn pos(&self) -> u64 {
        self.pos
    }

    /// The next frame and its offset; `None` at the end of the input. A
    /// frame that is cut, of an impossible length, fails its checksum or
    /// does not decode is an error naming its offset.
    pub(super) fn next_frame(&mut self) -> std::result::Result<Option<(u64, Frame)>, String> {
        let at = self.pos;
        self.buf.clear();
        self.buf.resize(FRAME_HEADER_LEN, 0);
        let mut got = 0;
        while got < FRAME_HEADER_LEN {
            match self.r.read(&mut self.buf[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(format!("frame at {at}: cut in its header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("frame at {at}: {e}")),
            }
        }
        let len = le_u32(&self.buf, 0).unwrap_or(0);
        if len == 0 || len > FRAME_LEN_MAX {
            return Err(format!("frame at {at}: length {len}"));
        }
        self.buf.resize(FRAME_HEADER_LEN + len as usize, 0);
        self.r
            .read_exact(&mut self.buf[FRAME_HEADER_LEN..])
            .map_err(|e| format!("frame at {at}: {e}"))?;
        match decode_frame(&self.buf, 0) {
            Ok((frame, n)) if n == self.buf.len() => {
                self.pos += n as u64;
                Ok(Some((at, frame)))
            }
            Ok(_) => Err(format!("frame at {at}: length")),
            Err(e) => Err(format!("frame at {at}: {}", e.detail)),
        }
    }
}

/// Parses a whole journal file: the header (an error if bad) and every intact
/// frame up to the first bad one. Pure; used by `tierindex inspect` and
/// fuzzing (replay decodes the same frames one at a time). Never panics.
pub fn decode_file(bytes: &[u8]) -> Result<DecodedFile> {
    let header = decode_header(bytes)?;
    let mut frames = Vec::new();
    let mut tail = None;
    let mut it = Frames::new(bytes);
    for f in it.by_ref() {
        match f {
            Ok(f) => frames.push(f),
            Err(e) => tail = Some(e),
        }
    }
    Ok(DecodedFile {
        header,
        frames,
        valid_len: it.pos() as u64,
        tail,
    })
}

/// Replays a whole journal file into a state table. Errors only when the
/// header is bad; a bad frame ends replay and is reported, never raised.
pub fn replay_bytes(bytes: &[u8]) -> Result<Replayed> {
    let header = decode_header(bytes)?;
    let mut state = JournalState::default();
    let mut report = ReplayReport {
        generation: header.generation,
        ..ReplayReport::default()
    };
    let mut tail = None;
    let mut seen_batch = false;
    let mut max_id_first = false;
    let mut frames = Frames::new(bytes);
    for (at, next) in frames.by_ref().enumerate() {
        let df = match next {
            Ok(df) => df,
            Err(e) => {
                tail = Some(e);
                break;
            }
        };
        let applied = match df.frame {
            Frame::MaxId(max) if at == 0 => {
                max_id_first = true;
                state.load_max_id(max);
                Ok(())
            }
            Frame::MaxId(_) => Err("MaxId frame that is not the first frame".to_string()),
            Frame::MaxOffset(max) if at == 1 && max_id_first => {
                state.load_max_offset(max);
                Ok(())
            }
            Frame::MaxOffset(_) => {
                Err("MaxOffset frame that does not follow the MaxId frame".to_string())
            }
            Frame::Snapshot(_) if seen_batch => {
                Err("snapshot frame after a batch frame".to_string())
            }
            Frame::Snapshot(rec) => state.load_snapshot(*rec).map(|()| {
                report.snapshot_segments += 1;
            }),
            Frame::Batch(records) => {
                seen_batch = true;
                match state.apply(&records) {
                    Ok(()) => {
                        report.records_replayed += records.len() as u64;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if let Err(detail) = applied {
            tail = Some(TailError {
                offset: df.offset,
                kind: TailKind::Inconsistent,
                detail,
            });
            break;
        }
    }
    // Just past the last frame applied: the frame that stopped replay (a
    // bad one, or an intact one that does not apply) starts there.
    let valid_len = tail.as_ref().map_or(frames.pos() as u64, |t| t.offset);
    report.truncated_bytes = (bytes.len() as u64).saturating_sub(valid_len);
    report.torn_tail_at = (report.truncated_bytes > 0).then_some(valid_len);
    report.damage = tail.as_ref().and_then(|t| judge_tail(bytes, t));
    report.format_version = header.version;
    report.tail = tail;
    report.segments = state.segments().len();
    Ok(Replayed {
        state,
        report,
        valid_len,
    })
}

#[cfg(test)]
mod tests {

    /// A journal shorter than its header is damage; a header that cannot
    /// be read is an I/O error naming the file, not damage.
    #[test]
    fn a_header_read_error_is_an_io_error() {
        struct Failing;
        impl std::io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let p = std::path::Path::new("/j/journal.log");
        match FrameReader::new(Failing, p) {
            Err(Error::Io { path, context, .. }) => {
                assert_eq!((path.as_path(), context), (p, "read journal header"))
            }
            other => panic!("{:?}", other.err()),
        }
        match FrameReader::new(&[0u8; HEADER_LEN - 1][..], p) {
            Err(e @ Error::Corrupt { .. }) => {
                assert!(e.to_string().contains("/j/journal.log"), "{e}")
            }
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn only_a_frame_with_requeued_is_written_as_record_version_2() {
        use crate::segment::SegmentId;
        let mut out = Vec::new();
        encode_frame(
            &Frame::Batch(vec![Record::Verified { id: SegmentId(3) }]),
            &mut out,
        )
        .unwrap();
        assert!(
            out[8..].starts_with(br#"{"v":1,"#),
            "{:?}",
            String::from_utf8_lossy(&out[8..])
        );
        let rq = Frame::Batch(vec![Record::Requeued {
            id: SegmentId(3),
            reason: "retry".into(),
        }]);
        let mut out = Vec::new();
        encode_frame(&rq, &mut out).unwrap();
        assert!(
            out[8..].starts_with(br#"{"v":2,"#),
            "{:?}",
            String::from_utf8_lossy(&out[8..])
        );
        assert_eq!(decode_frame(&out, 0).unwrap().0, rq);
    }
    use super::*;
    use crate::journal::record::Record;
    use crate::journal::record::tests::{happy_path, meta};
    use crate::segment::SegmentId;

    fn file_with(frames: &[Frame]) -> Vec<u8> {
        let mut bytes = encode_header(1).to_vec();
        for f in frames {
            encode_frame(f, &mut bytes).unwrap();
        }
        bytes
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = encode_header(42);
        assert_eq!(
            decode_header(&h).unwrap(),
            Header {
                version: FORMAT_VERSION,
                generation: 42
            }
        );
        // A newer format (with a valid CRC) is refused as unsupported; the
        // previous format is read.
        let newer = encode_header_version(FORMAT_VERSION + 1, 1);
        assert!(matches!(decode_header(&newer), Err(Error::Unsupported(_))));
        assert_eq!(
            decode_header(&encode_header_version(1, 1)).unwrap().version,
            1
        );
        assert!(decode_header(&encode_header_version(0, 1)).is_err());
        for i in 0..HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 0x40;
            assert!(
                matches!(decode_header(&bad), Err(Error::Corrupt { .. })),
                "byte {i}"
            );
        }
        assert!(decode_header(&h[..23]).is_err());
        assert!(decode_header(&[]).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::MaxId(Some(SegmentId(3))),
            Frame::Batch(happy_path(4)),
            Frame::Batch(vec![Record::Sealed { meta: meta(5) }]),
        ];
        let bytes = file_with(&frames);
        let d = decode_file(&bytes).unwrap();
        assert_eq!(d.tail, None);
        assert_eq!(d.valid_len, bytes.len() as u64);
        let got: Vec<Frame> = d.frames.into_iter().map(|f| f.frame).collect();
        assert_eq!(got, frames);
    }

    #[test]
    fn every_truncation_stops_at_the_last_whole_frame() {
        let bytes = file_with(&[Frame::Batch(happy_path(1)), Frame::Batch(happy_path(2))]);
        let d = decode_file(&bytes).unwrap();
        let ends: Vec<u64> = d.frames.iter().map(|f| f.offset + f.len).collect();
        for cut in HEADER_LEN..=bytes.len() {
            let r = replay_bytes(&bytes[..cut]).unwrap();
            let want = ends.iter().filter(|e| **e <= cut as u64).count();
            assert_eq!(r.report.records_replayed, 6 * want as u64, "cut {cut}");
            assert_eq!(r.valid_len, ends[..want].last().copied().unwrap_or(24));
            assert_eq!(r.report.torn_tail_at.is_some(), r.valid_len != cut as u64);
        }
    }

    #[test]
    fn each_damaged_byte_is_caught() {
        let bytes = file_with(&[Frame::Batch(happy_path(1))]);
        for i in HEADER_LEN..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let r = replay_bytes(&bad).unwrap();
            assert_eq!(r.report.records_replayed, 0, "byte {i}");
            assert_eq!(r.report.torn_tail_at, Some(HEADER_LEN as u64));
            assert!(r.report.tail.is_some());
        }
    }

    #[test]
    fn a_bad_frame_followed_by_intact_ones_is_damage_not_a_torn_tail() {
        let frames = [
            Frame::Batch(happy_path(1)),
            Frame::Batch(vec![Record::Sealed { meta: meta(2) }]),
            Frame::Batch(vec![Record::Sealed { meta: meta(3) }]),
        ];
        let bytes = file_with(&frames);
        let d = decode_file(&bytes).unwrap();
        let (second, third) = (d.frames[1].offset, d.frames[2].offset);
        // Every byte of the first two frames: damage, resynced on a later frame.
        for i in HEADER_LEN..third as usize {
            let mut bad = bytes.clone();
            bad[i] ^= 0x08;
            let r = replay_bytes(&bad).unwrap();
            let dmg = r
                .report
                .damage
                .clone()
                .unwrap_or_else(|| panic!("byte {i}"));
            assert!(dmg.resync_at.is_some(), "byte {i}: {dmg:?}");
            assert!(dmg.resync_at.unwrap() >= second, "byte {i}: {dmg:?}");
        }
        // Any byte of the last frame: a torn tail (nothing intact after it).
        for i in third as usize..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x08;
            let r = replay_bytes(&bad).unwrap();
            assert_eq!(r.report.damage, None, "byte {i}");
            assert_eq!(r.report.torn_tail_at, Some(third), "byte {i}");
        }
        // A torn append after intact frames is still a torn tail.
        let mut torn = bytes.clone();
        torn.extend_from_slice(&bytes[second as usize..third as usize - 3]);
        assert_eq!(replay_bytes(&torn).unwrap().report.damage, None);
    }

    /// The example in `docs/format/journal.md`, byte for byte.
    #[test]
    fn the_documented_example_is_what_the_encoder_writes() {
        let mut bytes = encode_header(1).to_vec();
        encode_frame(&Frame::MaxId(None), &mut bytes).unwrap();
        encode_frame(
            &Frame::Batch(vec![Record::Verified { id: SegmentId(7) }]),
            &mut bytes,
        )
        .unwrap();
        let doc = "54 49 58 4a 52 4e 4c 31 02 00 00 00 01 00 00 00 \
                   00 00 00 00 b3 70 1b 12 14 00 00 00 af 2c 6a be \
                   7b 22 76 22 3a 31 2c 22 4d 61 78 49 64 22 3a 6e \
                   75 6c 6c 7d 27 00 00 00 ad c1 91 4e 7b 22 76 22 \
                   3a 31 2c 22 42 61 74 63 68 22 3a 5b 7b 22 56 65 \
                   72 69 66 69 65 64 22 3a 7b 22 69 64 22 3a 37 7d \
                   7d 5d 7d";
        let want: Vec<u8> = doc
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        assert_eq!(bytes, want);
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut bytes = file_with(&[Frame::Batch(happy_path(1))]);
        let good = bytes.len() as u64;
        bytes.extend_from_slice(&[0u8; 4096]);
        let r = replay_bytes(&bytes).unwrap();
        assert_eq!(r.valid_len, good);
        assert_eq!(r.report.truncated_bytes, 4096);
        assert_eq!(r.report.tail.map(|t| t.kind), Some(TailKind::BadLength));
    }

    #[test]
    fn intact_but_illegal_frames_stop_replay() {
        let cases = vec![
            // Illegal transition: Verified for an unknown id.
            vec![
                Frame::Batch(happy_path(1)),
                Frame::Batch(vec![Record::Verified { id: SegmentId(9) }]),
            ],
            // Snapshot after a batch.
            vec![
                Frame::Batch(vec![Record::Sealed { meta: meta(1) }]),
                Frame::Snapshot(Box::new(crate::journal::record::tests::snapshot(2))),
            ],
            // MaxId that is not first.
            vec![Frame::Batch(happy_path(1)), Frame::MaxId(None)],
            // Snapshot above the recorded max id.
            vec![
                Frame::MaxId(Some(SegmentId(1))),
                Frame::Snapshot(Box::new(crate::journal::record::tests::snapshot(2))),
            ],
        ];
        for frames in cases {
            let bytes = file_with(&frames);
            let r = replay_bytes(&bytes).unwrap();
            let tail = r.report.tail.clone().unwrap();
            assert_eq!(tail.kind, TailKind::Inconsistent, "{frames:?}");
            assert_eq!(Some(tail.offset), r.report.torn_tail_at);
            assert!(r.report.truncated_bytes > 0);
        }
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        let mut bytes = encode_header(1).to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 12]);
        let r = replay_bytes(&bytes).unwrap();
        assert_eq!(r.report.tail.map(|t| t.kind), Some(TailKind::BadLength));
    }

    /// The fast path of `decode_payload` answers as the general one for
    /// what the encoder writes and for payloads shaped almost like it.
    #[test]
    fn payload_fast_path_agrees_with_the_general_decoder() {
        let frames = [
            Frame::Batch(happy_path(3)),
            Frame::MaxId(Some(SegmentId(7))),
            Frame::MaxOffset(None),
        ];
        let mut payloads: Vec<Vec<u8>> = frames.iter().map(|f| frame_payload(f).unwrap()).collect();
        for p in [
            &b"{\"v\":1,\"MaxId\":3}"[..],
            b"{\"v\":01,\"MaxId\":3}",
            b"{\"v\":0,\"MaxId\":3}",
            b"{\"v\":4,\"MaxId\":3}",
            b"{\"v\":99999999999,\"MaxId\":3}",
            b"{\"v\":2,\"v\":1,\"MaxId\":3}",
            b"{\"v\":1,\"MaxId\":3,\"MaxOffset\":4}",
            b"{\"v\":1,\"MaxId\":3} x",
            b"{\"v\":1,\"MaxId\":3",
            b"{\"v\":1,}",
            b"{\"v\":1,\"Nope\":3}",
            b"{ \"v\" : 1 , \"MaxId\" : 3 }",
            b"{\"MaxId\":3}",
            b"{\"v\":1,\"Batch\":[{\"Verified\":{\"id\":3,\"x\":1e999}}]}",
            b"{\"v\":1,\"Batch\":[{\"Verified\":{\"id\":3,\"x\":\"\\ud800\"}}]}",
            b"{\"v\":1,\"Batch\":[{\"Verified\":{\"id\":3,\"x\":\"\xff\"}}]}",
            b"{\"v\":1,\"Batch\":[{\"Verified\":{\"id\":3,\"x\":1}}]}",
            b"{\"v\":1,\"Batch\":[{\"Verified\":{\"id\":3.0}}]}",
        ] {
            payloads.push(p.to_vec());
        }
        for p in &payloads {
            let fast = decode_payload(p).map_err(|(k, _)| k);
            let general = decode_payload_general(p).map_err(|(k, _)| k);
            assert_eq!(fast, general, "{}", String::from_utf8_lossy(p));
        }
        for (f, p) in frames.iter().zip(&payloads) {
            assert_eq!(decode_payload(p).as_ref().ok(), Some(f));
        }
    }
}
