//! Reading an uploaded segment back and deciding whether it is ours.
//!
//! Remote bytes are untrusted input: sizes are checked before a body is
//! collected, and every decode is bounds-checked (`Footer::decode`).
//!
//! A read that disagrees with the expected content is not believed at once:
//! a flipped bit or a short body on the wire looks exactly like a corrupt
//! object. [`look_stable`] re-reads until two consecutive reads report the
//! *same* mismatch (then the object really holds those bytes) or the
//! attempts run out (then the reads are unreliable: retryable error).
//!
//! Object metadata: `tierindex-crc32` (8 lower-case hex digits of
//! `file_crc`) and `tierindex-len` (decimal `file_len`). S3 sends them as
//! `x-amz-meta-*` and returns them on HEAD and GET (object_store puts them in
//! `GetResult::attributes`; `ObjectStoreExt::head` drops them, so a HEAD
//! here is `get_opts` with `head: true`). LocalFileSystem refuses metadata,
//! so on `file://` only size and body are checked.

use object_store::path::Path;
use object_store::{Attribute, Attributes, GetOptions, GetRange, ObjectMeta};

use crate::error::{Error, Result};
use crate::remote::{RemoteStore, classify};
use crate::segment::SealedMeta;
use crate::segment::format::{FOOTER_LEN, FileSums, Footer, SumsHasher};
use crate::retry::{RetryPolicy, backoff, with_retries};
use crate::upload::{RemoteMatch, UploadConfig, VerifyLevel};

/// Metadata key holding the whole-file CRC32 as 8 lower-case hex digits.
pub const META_CRC: &str = "tierindex-crc32";
/// Metadata key holding the whole-file CRC-64/NVME as 16 lower-case hex
/// digits (format-2 files only).
pub const META_CRC64: &str = "tierindex-crc64";
/// Metadata key holding the file length in decimal.
pub const META_LEN: &str = "tierindex-len";

/// The metadata recorded with a segment object.
pub fn segment_attributes(meta: &SealedMeta) -> Attributes {
    let mut a = Attributes::with_capacity(3);
    a.insert(
        Attribute::Metadata(META_CRC.into()),
        format!("{:08x}", meta.file_crc).into(),
    );
    if let Some(c) = meta.crc64 {
        a.insert(
            Attribute::Metadata(META_CRC64.into()),
            format!("{c:016x}").into(),
        );
    }
    a.insert(
        Attribute::Metadata(META_LEN.into()),
        meta.file_len.to_string().into(),
    );
    a
}

/// What one read showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    Missing,
    Good,
    Bad(String),
}

/// Size and metadata check shared by all levels. `require_metadata`: absent
/// metadata is a mismatch (Head level on a store that keeps metadata, where
/// metadata is the only evidence besides the size).
fn check_head(
    meta: &SealedMeta,
    obj: &ObjectMeta,
    attrs: &Attributes,
    require_metadata: bool,
) -> Option<String> {
    if obj.size != meta.file_len {
        return Some(format!(
            "size {} bytes, expected {}",
            obj.size, meta.file_len
        ));
    }
    let crc = attrs.get(&Attribute::Metadata(META_CRC.into()));
    let len = attrs.get(&Attribute::Metadata(META_LEN.into()));
    let want_crc = format!("{:08x}", meta.file_crc);
    let want_len = meta.file_len.to_string();
    match (crc, len) {
        (None, None) if require_metadata => {
            Some("object has no tierindex metadata to check".into())
        }
        (None, None) => None,
        (c, l) => {
            if c.map(|v| v.as_ref()) != Some(want_crc.as_str()) {
                return Some(format!(
                    "metadata {META_CRC} is {:?}, expected {want_crc}",
                    c.map(|v| v.to_string())
                ));
            }
            if l.map(|v| v.as_ref()) != Some(want_len.as_str()) {
                return Some(format!(
                    "metadata {META_LEN} is {:?}, expected {want_len}",
                    l.map(|v| v.to_string())
                ));
            }
            let c64 = attrs.get(&Attribute::Metadata(META_CRC64.into()));
            let want_c64 = meta.crc64.map(|c| format!("{c:016x}"));
            if c64.map(|v| v.as_ref()) != want_c64.as_deref() {
                return Some(format!(
                    "metadata {META_CRC64} is {:?}, expected {want_c64:?}",
                    c64.map(|v| v.to_string())
                ));
            }
            None
        }
    }
}

/// The checksums `meta` claims, in the form [`Footer::meta`] takes (a
/// format-1 meta has no CRC64; the footer's version decides whether one is
/// expected, so a format-2 footer never matches a format-1 meta).
fn claimed_sums(meta: &SealedMeta) -> FileSums {
    FileSums {
        crc32: meta.file_crc,
        crc64: meta.crc64.unwrap_or(0),
    }
}

/// The footer at the end of `tail` decodes and describes `meta`.
fn check_footer(meta: &SealedMeta, tail: &[u8]) -> Option<String> {
    match Footer::decode(tail) {
        Err(e) => Some(format!("footer: {e}")),
        Ok(f) if f.meta(claimed_sums(meta)) != *meta => Some(format!(
            "footer describes segment {} ({} items, {} bytes), expected segment {} ({} items, {} bytes)",
            f.segment_id, f.item_count, f.file_len, meta.id, meta.item_count, meta.file_len
        )),
        Ok(_) => None,
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// One read of `key` at `level`. `NotFound` becomes [`Seen::Missing`];
/// other errors are returned for the retry loop to judge.
pub(crate) async fn look(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    level: VerifyLevel,
) -> Result<Seen, object_store::Error> {
    let os = store.object_store();
    let need_meta = store.metadata_supported();
    // Checksum: the server's stored value when it gives one; when it gives
    // none (no whole-object value, a format-1 file, not an S3 store) the
    // body is proven by reading it instead, never judged from nothing.
    let level = match level {
        VerifyLevel::Checksum => match look_checksum(store, key, meta).await? {
            Some(seen) => return Ok(seen),
            None => VerifyLevel::Full,
        },
        l => l,
    };
    match level {
        VerifyLevel::Head | VerifyLevel::Footer => {
            let head = match os.get_opts(key, GetOptions::new().with_head(true)).await {
                Ok(h) => h,
                Err(e) if not_found(&e) => return Ok(Seen::Missing),
                Err(e) => return Err(e),
            };
            let require = need_meta && level == VerifyLevel::Head;
            if let Some(d) = check_head(meta, &head.meta, &head.attributes, require) {
                return Ok(Seen::Bad(d));
            }
            if level == VerifyLevel::Head {
                return Ok(Seen::Good);
            }
            // Size checked above, so the range is inside the object.
            let start = meta.file_len.saturating_sub(FOOTER_LEN as u64);
            let opts = GetOptions::new().with_range(Some(GetRange::Bounded(start..meta.file_len)));
            let tail = match os.get_opts(key, opts).await {
                Ok(r) => r.bytes().await?,
                Err(e) if not_found(&e) => return Ok(Seen::Missing),
                Err(e) => return Err(e),
            };
            Ok(check_footer(meta, &tail).map_or(Seen::Good, Seen::Bad))
        }
        // (Checksum reaches here only as the Full read it fell back to.)
        VerifyLevel::Full | VerifyLevel::Checksum => {
            // One GET: its response carries the same size and metadata a
            // HEAD would, checked before the body is collected so a wrong
            // size never makes us buffer an arbitrary amount.
            let got = match os.get_opts(key, GetOptions::new()).await {
                Ok(r) => r,
                Err(e) if not_found(&e) => return Ok(Seen::Missing),
                Err(e) => return Err(e),
            };
            if let Some(d) = check_head(meta, &got.meta, &got.attributes, false) {
                return Ok(Seen::Bad(d));
            }
            if meta.crc64.is_none() {
                // Format 1: the CRC32 does not see the items' content or
                // order, so the object must also pass every check a reader
                // makes (layout, item CRCs, slot placement). Bounded: the
                // size was checked above.
                let body = got.bytes().await?;
                if !meta.matches_bytes(&body) {
                    return Ok(Seen::Bad(format!(
                        "body {}, expected {}",
                        meta.describe_sums(&FileSums::of(&body)),
                        meta.key_sum()
                    )));
                }
                if let Err(e) = crate::segment::format::check_sealed(&body) {
                    return Ok(Seen::Bad(format!("a reader would reject it: {e}")));
                }
                let tail = &body[body.len().saturating_sub(FOOTER_LEN)..];
                return Ok(check_footer(meta, tail).map_or(Seen::Good, Seen::Bad));
            }
            // Format 2: the CRC64 of the whole object equal to the one of
            // the file we sealed (and fully checked) proves the same bytes.
            // Streamed: hashed as it arrives, never held whole in memory;
            // only the last FOOTER_LEN bytes are kept for the footer check.
            let (len, sums, tail) = hash_stream(got.into_stream(), meta.file_len).await?;
            if len != meta.file_len {
                return Ok(Seen::Bad(format!(
                    "body is {len} bytes, expected {}",
                    meta.file_len
                )));
            }
            if !meta.matches_sums(len, &sums) {
                return Ok(Seen::Bad(format!(
                    "body {}, expected {}",
                    meta.describe_sums(&sums),
                    meta.key_sum()
                )));
            }
            Ok(check_footer(meta, &tail).map_or(Seen::Good, Seen::Bad))
        }
    }
}

/// Hashes a streamed body: its length, its checksums and its last
/// [`FOOTER_LEN`] bytes. Stops reading past `limit + 1` bytes (a body longer
/// than expected is reported by its length, never buffered).
pub(crate) async fn hash_stream(
    mut stream: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    limit: u64,
) -> Result<(u64, FileSums, Vec<u8>), object_store::Error> {
    use futures::TryStreamExt as _;
    let mut h = SumsHasher::default();
    let mut tail: Vec<u8> = Vec::with_capacity(FOOTER_LEN * 2);
    while let Some(chunk) = stream.try_next().await? {
        h.update(&chunk);
        if chunk.len() >= FOOTER_LEN {
            tail.clear();
            tail.extend_from_slice(&chunk[chunk.len() - FOOTER_LEN..]);
        } else {
            tail.extend_from_slice(&chunk);
            let cut = tail.len().saturating_sub(FOOTER_LEN);
            tail.drain(..cut);
        }
        if h.len() > limit {
            break;
        }
    }
    let (len, sums) = h.finish();
    Ok((len, sums, tail))
}

/// The length and checksums of the object under `key` (one streamed GET,
/// nothing held in memory), or `None` when there is none. At most
/// `limit + 1` bytes are read.
pub async fn object_sums(
    store: &RemoteStore,
    key: &Path,
    limit: u64,
) -> Result<Option<(u64, FileSums)>> {
    let got = match store.object_store().get_opts(key, GetOptions::new()).await {
        Ok(r) => r,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(classify(e)),
    };
    let (len, sums, _) = hash_stream(got.into_stream(), limit)
        .await
        .map_err(classify)?;
    Ok(Some((len, sums)))
}

/// The `Checksum` level: a HEAD with checksum mode. `Some(seen)` when the
/// server answered with a size and a whole-object CRC-64/NVME (equal:
/// `Good`; other: `Bad`), or has no object; `None` when it gave no value to
/// judge by (the caller then reads the body).
async fn look_checksum(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
) -> Result<Option<Seen>, object_store::Error> {
    let Some(want) = meta.crc64 else {
        return Ok(None);
    };
    if !store.has_s3_checksums() {
        return Ok(None);
    }
    let got = match store.head_checksum(key).await {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Some(Seen::Missing)),
        Err(e) => {
            return Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            });
        }
    };
    if got.size != Some(meta.file_len) {
        return Ok(Some(Seen::Bad(format!(
            "size {:?} bytes, expected {}",
            got.size, meta.file_len
        ))));
    }
    Ok(match got.crc64 {
        Some(c) if c == want => Some(Seen::Good),
        Some(c) => Some(Seen::Bad(format!(
            "stored CRC64 {c:016x} (x-amz-checksum-crc64nvme), expected {want:016x}"
        ))),
        None => {
            tracing::warn!(
                %key,
                answered = ?got.raw,
                "the server returned no whole-object CRC64; reading the object back instead"
            );
            None
        }
    })
}

/// Reads until the answer is trustworthy: `Good` or `Missing` at once, `Bad`
/// only once two consecutive reads saw the same mismatch.
pub(crate) async fn look_stable(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    level: VerifyLevel,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<Seen> {
    let reads = policy.max_attempts.max(2);
    let mut last_bad: Option<String> = None;
    for read in 1..=reads {
        let seen = with_retries(policy, rng, "verify read", |_| {
            look(store, key, meta, level)
        })
        .await
        .map_err(classify)?;
        match seen {
            Seen::Bad(d) if last_bad.as_deref() == Some(d.as_str()) => return Ok(Seen::Bad(d)),
            Seen::Bad(d) => {
                tracing::debug!(%key, read, detail = %d, "remote object differs; reading again");
                last_bad = Some(d);
                tokio::time::sleep(backoff(policy, rng, read)).await;
            }
            other => return Ok(other),
        }
    }
    Err(Error::RemoteRetryable(format!(
        "{reads} reads of {key} disagreed with each other (last: {}); the transfer is unreliable",
        last_bad.unwrap_or_default()
    )))
}

/// Checks the object under `key` against `meta` at `level`
/// (`Checksum` is read as `Full`: no probe result is at hand here; use
/// [`verify_segment_cfg`] with the probe's answer in the config).
///
/// `Ok(())` when it matches. A missing object is `Err(Corrupt)` with detail
/// "missing" (the caller believed it uploaded it: that is a lost object, not
/// a transient condition); a mismatch is `Err(Corrupt)` with what differs;
/// transport trouble is `RemoteRetryable`. Uses the default retry policy.
pub async fn verify_segment(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    level: VerifyLevel,
) -> Result<()> {
    let mut rng = fastrand::Rng::new();
    verify_with(
        store,
        key,
        meta,
        level.effective(meta, false),
        &UploadConfig::default().retry_policy(),
        &mut rng,
    )
    .await
}

/// [`verify_segment`] under the caller's retry and timeout settings, and
/// its probe answer (`Checksum` only where `cfg.checksum_proven`).
pub async fn verify_segment_cfg(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    level: VerifyLevel,
    cfg: &UploadConfig,
) -> Result<()> {
    let mut rng = fastrand::Rng::new();
    let level = level.effective(meta, cfg.checksum_proven);
    verify_with(store, key, meta, level, &cfg.retry_policy(), &mut rng).await
}

/// [`remote_matches`] under the caller's retry and timeout settings.
pub async fn remote_matches_cfg(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    cfg: &UploadConfig,
) -> Result<RemoteMatch> {
    let mut rng = fastrand::Rng::new();
    remote_matches_with(store, key, meta, &cfg.retry_policy(), &mut rng).await
}

pub(crate) async fn verify_with(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    level: VerifyLevel,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<()> {
    crate::failpoint::crash("verify");
    match look_stable(store, key, meta, level, policy, rng).await? {
        Seen::Good => Ok(()),
        Seen::Missing => Err(Error::corrupt(
            key.to_string(),
            "missing: no object under the key",
        )),
        Seen::Bad(d) => Err(Error::corrupt(key.to_string(), d)),
    }
}

/// Compares the object under `key` with `meta`: size, metadata (when
/// present) and the CRC32 of the whole body. Used to settle `AlreadyExists`.
#[cfg(any(test, feature = "testing"))]
pub async fn remote_matches(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
) -> Result<RemoteMatch> {
    let mut rng = fastrand::Rng::new();
    remote_matches_with(
        store,
        key,
        meta,
        &UploadConfig::default().retry_policy(),
        &mut rng,
    )
    .await
}

pub(crate) async fn remote_matches_with(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<RemoteMatch> {
    Ok(
        match look_stable(store, key, meta, VerifyLevel::Full, policy, rng).await? {
            Seen::Missing => RemoteMatch::Missing,
            Seen::Good => RemoteMatch::Matches,
            Seen::Bad(d) => RemoteMatch::Differs(d),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::sealed::build_sealed;
    use crate::segment::{Entry, SegmentId};

    fn sample() -> (Vec<u8>, SealedMeta) {
        let es: Vec<Entry> = (0..50)
            .map(|i| Entry {
                key_hash: i * 7919,
                offset: i,
                size: 1,
                timestamp_ms: 1000 + i,
            })
            .collect();
        build_sealed(SegmentId(5), 1, 2, 8, &es).unwrap()
    }

    #[test]
    fn footer_check_catches_wrong_segment() {
        let (bytes, meta) = sample();
        let tail = &bytes[bytes.len() - FOOTER_LEN..];
        assert_eq!(check_footer(&meta, tail), None);
        let mut other = meta.clone();
        other.item_count += 1;
        assert!(check_footer(&other, tail).is_some());
        let mut flipped = tail.to_vec();
        flipped[20] ^= 1;
        assert!(check_footer(&meta, &flipped).is_some());
        assert!(check_footer(&meta, &tail[1..]).is_some());
    }

    #[test]
    fn attributes_format() {
        let (_, meta) = sample();
        let a = segment_attributes(&meta);
        let crc = a.get(&Attribute::Metadata(META_CRC.into())).unwrap();
        assert_eq!(crc.len(), 8);
        assert_eq!(u32::from_str_radix(crc, 16).unwrap(), meta.file_crc);
        let len = a.get(&Attribute::Metadata(META_LEN.into())).unwrap();
        assert_eq!(len.parse::<u64>().unwrap(), meta.file_len);
    }
}
