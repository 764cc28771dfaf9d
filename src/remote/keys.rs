//! Remote key layout: where a sealed segment lives in the bucket.
//!
//! ```text
//! {prefix}/{stream}/segments/{id:020}-{crc64:016x}.seg   format 2 (written now)
//! {prefix}/{stream}/segments/{id:020}-{crc32:08x}.seg    format 1 (read, drained)
//! ```
//!
//! The key is a pure function of the stream name and the segment's
//! [`SealedMeta`], so a retry, a restart or a second uploader of the same
//! sealed file always names the same object, and two different files with the
//! same id (a re-seal after a crash, a re-created data directory) name
//! different objects. That is what makes "create, and on AlreadyExists
//! compare" safe: an existing object under our key is either our bytes or a
//! checksum collision, never a legitimate newer version. Format 2 names the
//! file by its CRC-64/NVME, which sees every byte and its position; the
//! format-1 CRC32 does not see the items' content or order (see
//! `segment::format`), so two format-1 files of different content can share
//! a key. The layout is documented in `docs/format/remote-layout.md`.

use object_store::path::Path;

use crate::error::{Error, Result};
use crate::segment::{KeySum, SealedMeta, SegmentId};

/// Folder under a stream that holds its segment objects.
pub const SEGMENTS_DIR: &str = "segments";
/// Suffix of every segment object name.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Longest stream name accepted.
pub const STREAM_NAME_MAX: usize = 128;

/// Checks a stream name: 1 to 128 characters from `[A-Za-z0-9._-]`, and not
/// `.` or `..` (those are path components with a meaning on a file system).
pub fn validate_stream(stream: &str) -> Result<()> {
    let ok_chars = stream
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if stream.is_empty()
        || stream.len() > STREAM_NAME_MAX
        || !ok_chars
        || stream == "."
        || stream == ".."
    {
        return Err(Error::InvalidInput(format!(
            "stream name {stream:?} must be 1..={STREAM_NAME_MAX} characters of [A-Za-z0-9._-] \
             and not \".\" or \"..\""
        )));
    }
    Ok(())
}

/// The object name (last path part) of a segment.
pub fn segment_object_name(id: SegmentId, sum: KeySum) -> String {
    format!("{:020}-{sum}{SEGMENT_SUFFIX}", id.0)
}

/// Parses an object name made by [`segment_object_name`]. Strict: exactly 20
/// decimal digits, a dash, exactly 8 (format 1) or 16 (format 2) lower-case
/// hex digits, `.seg`.
pub fn parse_segment_object_name(name: &str) -> Option<(SegmentId, KeySum)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (id, crc) = stem.split_once('-')?;
    if id.len() != 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !crc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let id: u64 = id.parse().ok()?;
    let sum = match crc.len() {
        8 => KeySum::Crc32(u32::from_str_radix(crc, 16).ok()?),
        16 => KeySum::Crc64(u64::from_str_radix(crc, 16).ok()?),
        _ => return None,
    };
    Some((SegmentId(id), sum))
}

/// `{prefix}/{stream}/segments`: the folder to list for reconciliation.
pub fn segments_prefix(prefix: &Path, stream: &str) -> Result<Path> {
    validate_stream(stream)?;
    Ok(prefix.clone().join(stream).join(SEGMENTS_DIR))
}

/// The full key of a segment object.
pub fn segment_key(prefix: &Path, stream: &str, meta: &SealedMeta) -> Result<Path> {
    Ok(segments_prefix(prefix, stream)?.join(segment_object_name(meta.id, meta.key_sum())))
}

/// Parses a full key back into `(stream, id, checksum)` when it has exactly
/// the shape [`segment_key`] makes under `prefix`; anything else is `None`
/// (an object a reconciler must not touch blindly).
pub fn parse_segment_key(prefix: &Path, key: &Path) -> Option<(String, SegmentId, KeySum)> {
    let rest: Vec<_> = key.prefix_match(prefix)?.collect();
    let [stream, dir, name] = rest.as_slice() else {
        return None;
    };
    let stream = stream.as_ref();
    if dir.as_ref() != SEGMENTS_DIR || validate_stream(stream).is_err() {
        return None;
    }
    let (id, crc) = parse_segment_object_name(name.as_ref())?;
    Some((stream.to_string(), id, crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64, crc: u32) -> SealedMeta {
        SealedMeta {
            id: SegmentId(id),
            file_len: 1,
            file_crc: crc,
            crc64: None,
            item_count: 0,
            min_ts: 0,
            max_ts: 0,
            min_offset: 0,
            max_offset: 0,
            created_ms: 0,
            sealed_ms: 0,
        }
    }

    #[test]
    fn key_shape_and_roundtrip() {
        let prefix = Path::from("tier/idx");
        let k = segment_key(&prefix, "orders-1", &meta(42, 0xdead_beef)).unwrap();
        assert_eq!(
            k.as_ref(),
            "tier/idx/orders-1/segments/00000000000000000042-deadbeef.seg"
        );
        assert_eq!(
            parse_segment_key(&prefix, &k),
            Some((
                "orders-1".to_string(),
                SegmentId(42),
                KeySum::Crc32(0xdead_beef)
            ))
        );
        // Format 2: the CRC64 names the object.
        let m2 = SealedMeta {
            crc64: Some(0x0123_4567_89ab_cdef),
            ..meta(42, 0xdead_beef)
        };
        let k = segment_key(&prefix, "orders-1", &m2).unwrap();
        assert_eq!(
            k.as_ref(),
            "tier/idx/orders-1/segments/00000000000000000042-0123456789abcdef.seg"
        );
        assert_eq!(
            parse_segment_key(&prefix, &k),
            Some((
                "orders-1".to_string(),
                SegmentId(42),
                KeySum::Crc64(0x0123_4567_89ab_cdef)
            ))
        );
        // Root prefix works too.
        let root = Path::default();
        let k = segment_key(&root, "s", &meta(u64::MAX, 0)).unwrap();
        assert_eq!(k.as_ref(), "s/segments/18446744073709551615-00000000.seg");
        assert_eq!(
            parse_segment_key(&root, &k),
            Some(("s".to_string(), SegmentId(u64::MAX), KeySum::Crc32(0)))
        );
    }

    #[test]
    fn stream_names_are_validated() {
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(129), "a%2F"] {
            assert!(validate_stream(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "A.b_c-9", &"x".repeat(128), "..."] {
            assert!(validate_stream(good).is_ok(), "{good:?} rejected");
        }
        assert!(segment_key(&Path::default(), "a/b", &meta(1, 1)).is_err());
    }

    #[test]
    fn parse_is_strict() {
        let p = Path::from("p");
        for bad in [
            "p/s/segments/0000000000000000004-deadbeef.seg", // 19 digits
            "p/s/segments/00000000000000000042-DEADBEEF.seg", // upper hex
            "p/s/segments/00000000000000000042-deadbee.seg", // 7 hex
            "p/s/segments/00000000000000000042-0123456789abcde.seg", // 15 hex
            "p/s/segments/00000000000000000042-0123456789abcdef0.seg", // 17 hex
            "p/s/segments/00000000000000000042-0123456789ABCDEF.seg", // upper hex
            "p/s/segments/00000000000000000042-deadbeef.seg.tmp",
            "p/s/other/00000000000000000042-deadbeef.seg",
            "p/s/x/segments/00000000000000000042-deadbeef.seg",
            "q/s/segments/00000000000000000042-deadbeef.seg",
            "p/s/segments/99999999999999999999-deadbeef.seg", // > u64::MAX
        ] {
            assert_eq!(parse_segment_key(&p, &Path::from(bad)), None, "{bad}");
        }
    }
}
