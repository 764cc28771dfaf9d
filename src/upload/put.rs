//! [`put_segment`]: create one segment object, never overwrite it.
//!
//! Order and why (see also the module docs of [`crate::upload`]):
//! 1. check the local bytes against the journal's meta (pair assertion);
//! 2. when the store's conditional create is not trusted, or for multipart
//!    (no conditional mode exists), HEAD the key first: an existing object is
//!    settled by content comparison and never written over;
//! 3. write: a single `PutMode::Create`, or create-upload → hook → parts →
//!    complete;
//! 4. verify; `Full` whenever the write could have replaced someone else's
//!    bytes (multipart, untrusted create), so the bytes are proven ours.
//!
//! Residual race (documented in `docs/format/remote-layout.md`): on a store
//! that ignores `If-None-Match` (Garage) or for multipart, a second writer of
//! the same key between our HEAD and our write is overwritten. The key holds
//! the file's CRC, so two writers of one key hold the same bytes unless their
//! CRCs collide; the read-back still proves the final object is ours.

use std::path::Path as FsPath;

use bytes::Bytes;
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::{Attributes, GetOptions, PutMode, PutMultipartOptions, PutOptions, PutPayload};

use crate::error::{Error, Result};
use crate::remote::{RemoteStore, classify};
use crate::segment::SealedMeta;
use crate::segment::format::{FOOTER_LEN, FileSums, Footer};
use crate::retry::{RetryPolicy, with_retries};
use crate::upload::verify::{Seen, look_stable, remote_matches_with, segment_attributes};
use crate::upload::{MAX_PARTS, PutOutcome, RemoteMatch, UploadConfig, UploadHooks};

/// Uploads the sealed file at `local`, described by `meta`, to `key`.
/// See the module docs for the order of steps and what each error means:
/// `Corrupt` (local file does not match `meta`, or the object read back is
/// wrong), `RemoteConflict` (another object under the key), `RemoteRetryable`
/// (try again later), `Remote` (configuration/auth), `InvalidInput`.
#[cfg(any(test, feature = "testing"))]
pub async fn put_segment(
    store: &RemoteStore,
    key: &Path,
    local: &FsPath,
    meta: &SealedMeta,
    cfg: &UploadConfig,
    hooks: &mut dyn UploadHooks,
) -> Result<PutOutcome> {
    cfg.validate(store)?;
    check_key(store, key, meta)?;
    let bytes = read_checked(local, meta).await?;
    put_checked(store, key, bytes, meta, cfg, hooks).await
}

/// The sealed file's bytes, proven (length, whole-file checksums, footer)
/// to be the file a [`SealedMeta`] describes. Only [`CheckedBytes::read`]
/// makes one, so an upload from it needs no second pass over the bytes.
#[derive(Debug, Clone)]
pub struct CheckedBytes {
    bytes: Bytes,
    meta: SealedMeta,
}

impl CheckedBytes {
    /// Reads `local` whole on a blocking thread (never on a tokio worker)
    /// and checks it against `meta` there: one read and one checksum pass
    /// per upload. `Err(NotChecked::Mismatch)` is the local mismatch (or a
    /// file that is gone, or cannot be a segment) in words, a local fault
    /// no store retry can fix; `Err(NotChecked::Unreadable)` a read that
    /// failed for a reason that may pass (out of descriptors or memory, a
    /// permission changed): the file was not judged.
    pub async fn read(local: &FsPath, meta: &SealedMeta) -> std::result::Result<Self, NotChecked> {
        let path = local.to_path_buf();
        let m = meta.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let b = crate::failpoint::hit("upload.read")
                .and_then(|()| std::fs::read(&path))
                .map_err(|e| {
                if read_may_pass(&e) {
                    NotChecked::Unreadable(Error::io(&path, "read sealed segment for upload", e))
                } else {
                    NotChecked::Mismatch(format!("cannot read {}: {e}", path.display()))
                }
            })?;
            check_bytes(&b, &m, &path.display().to_string())
                .map_err(|e| NotChecked::Mismatch(e.to_string()))?;
            Ok(Bytes::from(b))
        })
        .await;
        match joined {
            Ok(Ok(bytes)) => Ok(CheckedBytes {
                bytes,
                meta: meta.clone(),
            }),
            Ok(Err(why)) => Err(why),
            Err(e) => Err(NotChecked::Unreadable(Error::Internal(format!(
                "reading {} failed: {e}",
                local.display()
            )))),
        }
    }
}

/// Why [`CheckedBytes::read`] gave no bytes.
#[derive(Debug)]
pub enum NotChecked {
    /// The file is not the one the record describes (or is gone): a local
    /// fault no retry fixes.
    Mismatch(String),
    /// The file could not be read for a reason that may pass: it was not
    /// judged, and must not be quarantined for it (helper-75 F2: a process
    /// out of descriptors quarantined intact segments as "does not match
    /// its journal record").
    Unreadable(Error),
}

/// An error reading a file that says nothing about its content and may
/// pass: out of descriptors or memory, interrupted, a permission (an
/// operator's `chmod`, a mount option) that can be given back.
fn read_may_pass(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::ENOBUFS
                | libc::EAGAIN
                | libc::EINTR
                | libc::EACCES
                | libc::EPERM
        )
    )
}

/// [`put_segment`] from bytes already read and checked by
/// [`CheckedBytes::read`] against this very `meta`.
pub async fn put_segment_checked(
    store: &RemoteStore,
    key: &Path,
    bytes: CheckedBytes,
    meta: &SealedMeta,
    cfg: &UploadConfig,
    hooks: &mut dyn UploadHooks,
) -> Result<PutOutcome> {
    cfg.validate(store)?;
    check_key(store, key, meta)?;
    if bytes.meta != *meta {
        return Err(Error::InvalidInput(format!(
            "bytes checked against segment {} ({}) offered for segment {} ({})",
            bytes.meta.id,
            bytes.meta.key_sum(),
            meta.id,
            meta.key_sum()
        )));
    }
    put_checked(store, key, bytes.bytes, meta, cfg, hooks).await
}

/// A key of our layout must name this very file: uploading segment A's
/// bytes under segment B's key would poison every later comparison.
fn check_key(store: &RemoteStore, key: &Path, meta: &SealedMeta) -> Result<()> {
    if let Some((id, sum)) = store.parse_segment_key(key)
        && (id != meta.id || sum != meta.key_sum())
    {
        return Err(Error::InvalidInput(format!(
            "key {key} names segment {id} checksum {sum}, but the file is segment {} checksum {}",
            meta.id,
            meta.key_sum()
        )));
    }
    Ok(())
}

/// [`put_segment`] from bytes already read (and checked against `meta`
/// again here): a repair reads the local copy *before* it deletes a wrong
/// object, so a local file released meanwhile cannot leave neither copy.
pub async fn put_segment_bytes(
    store: &RemoteStore,
    key: &Path,
    bytes: Bytes,
    meta: &SealedMeta,
    cfg: &UploadConfig,
    hooks: &mut dyn UploadHooks,
) -> Result<PutOutcome> {
    cfg.validate(store)?;
    check_key(store, key, meta)?;
    check_bytes(&bytes, meta, key.as_ref())?;
    put_checked(store, key, bytes, meta, cfg, hooks).await
}

/// The upload itself, from bytes proven to be the file `meta` describes.
async fn put_checked(
    store: &RemoteStore,
    key: &Path,
    bytes: Bytes,
    meta: &SealedMeta,
    cfg: &UploadConfig,
    hooks: &mut dyn UploadHooks,
) -> Result<PutOutcome> {
    let policy = cfg.retry_policy();
    let mut rng = fastrand::Rng::new();
    let multipart = meta.file_len >= cfg.multipart_threshold_bytes && store.multipart().is_some();

    let check_first = cfg.write_may_replace(store, meta);
    if check_first && let Some(done) = settle_existing(store, key, meta, &policy, &mut rng).await? {
        return Ok(done);
    }

    let written = if multipart {
        put_multipart(store, key, meta, &bytes, cfg, &policy, &mut rng, hooks).await?
    } else {
        put_single(store, key, meta, bytes, cfg, &policy, &mut rng).await?
    };
    let PutOutcome::Created { .. } = &written else {
        return Ok(written); // AlreadyPresent was proven by a full comparison.
    };
    crate::failpoint::crash("upload.put.after");

    let level = cfg.level_after_write(store, meta);
    crate::failpoint::crash("verify");
    match look_stable(store, key, meta, level, &policy, &mut rng).await? {
        Seen::Good => Ok(written),
        Seen::Missing => Err(Error::corrupt(
            key.to_string(),
            "missing right after a successful upload (deleted by someone else?)",
        )),
        Seen::Bad(d) => Err(Error::corrupt(
            key.to_string(),
            format!("verification after upload failed: {d}; object left as is"),
        )),
    }
}

/// Reads the local sealed file and proves it is the file `meta` describes.
pub async fn read_checked(local: &FsPath, meta: &SealedMeta) -> Result<Bytes> {
    let bytes = tokio::fs::read(local)
        .await
        .map_err(|e| Error::io(local, "read sealed segment for upload", e))?;
    check_bytes(&bytes, meta, &local.display().to_string())?;
    Ok(Bytes::from(bytes))
}

/// Proves `bytes` are the sealed file `meta` describes (length, whole-file
/// checksums, footer): the one check of local bytes before an upload, and
/// of a local copy the drive doubts. `what` names the bytes in the error.
pub(crate) fn check_bytes(bytes: &[u8], meta: &SealedMeta, what: &str) -> Result<()> {
    let fail = |detail: String| Err(Error::corrupt(what.to_string(), detail));
    if bytes.len() as u64 != meta.file_len {
        return fail(format!(
            "file is {} bytes, the journal recorded {}; refusing to upload",
            bytes.len(),
            meta.file_len
        ));
    }
    let sums = FileSums::of(bytes);
    if !meta.matches_sums(bytes.len() as u64, &sums) || sums.crc32 != meta.file_crc {
        return fail(format!(
            "file has {}, the journal recorded {}; refusing to upload",
            meta.describe_sums(&sums),
            meta.key_sum()
        ));
    }
    let tail = bytes
        .get(bytes.len().saturating_sub(FOOTER_LEN)..)
        .unwrap_or_default();
    match Footer::decode(tail) {
        Ok(f) if f.meta(sums) == *meta => Ok(()),
        Ok(f) => fail(format!(
            "its footer describes another file (segment {}, {} items, sealed at {} ms) than \
             the journal's record (segment {}, {} items, sealed at {} ms); refusing to upload",
            f.segment_id, f.item_count, f.sealed_ms, meta.id, meta.item_count, meta.sealed_ms
        )),
        Err(e) => fail(e.to_string()),
    }
}

/// If an object exists under `key`, decides the outcome from its content.
async fn settle_existing(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<Option<PutOutcome>> {
    match remote_matches_with(store, key, meta, policy, rng).await? {
        RemoteMatch::Missing => Ok(None),
        RemoteMatch::Matches => Ok(Some(PutOutcome::AlreadyPresent)),
        RemoteMatch::Differs(d) => Err(conflict(key, &d)),
    }
}

fn conflict(key: &Path, detail: &str) -> Error {
    Error::RemoteConflict(format!(
        "{key} already holds other bytes ({detail}); not overwritten, not deleted: \
         an operator must inspect it (the key names the checksum of the only bytes that \
         belong there: with the broker stopped, `tierindex reconcile --deep --repair` \
         replaces a damaged object the manifest lists from an intact local copy; then \
         `tierindex quarantine retry` and a drain finish the segment)"
    ))
}

fn attributes(store: &RemoteStore, meta: &SealedMeta) -> Attributes {
    if store.metadata_supported() {
        segment_attributes(meta)
    } else {
        Attributes::new()
    }
}

/// True for the "this store keeps no object metadata" refusals.
fn metadata_refused(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }
    )
}

async fn put_single(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    bytes: Bytes,
    cfg: &UploadConfig,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<PutOutcome> {
    let trust_create = cfg.trust_conditional_create;
    let os = store.body_store(cfg.unsigned_body());
    // Bounded: once for a metadata refusal, once for an object that vanished
    // between AlreadyExists and the comparison.
    for _round in 0..3 {
        let attrs = attributes(store, meta);
        let with_attrs = !attrs.is_empty();
        let res = with_retries(policy, rng, "PUT segment", |attempt| {
            let opts = PutOptions {
                mode: PutMode::Create,
                attributes: attrs.clone(),
                ..Default::default()
            };
            let payload = PutPayload::from(bytes.clone());
            async move {
                if attempt > 1 {
                    tracing::debug!(%key, attempt, "re-sending create");
                    // An earlier attempt may have committed. Where the store
                    // ignores If-None-Match, re-sending would overwrite it:
                    // look first and let the content comparison decide.
                    if !trust_create {
                        let head = GetOptions::new().with_head(true);
                        match os.get_opts(key, head).await {
                            Ok(_) => {
                                return Err(object_store::Error::AlreadyExists {
                                    path: key.to_string(),
                                    source: "found by HEAD before re-sending a create".into(),
                                });
                            }
                            Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                crate::failpoint::crash("upload.put");
                os.put_opts(key, payload, opts).await
            }
        })
        .await;
        match res {
            Ok(r) => {
                return Ok(PutOutcome::Created {
                    etag: r.e_tag,
                    version: r.version,
                });
            }
            Err(e) if with_attrs && metadata_refused(&e) => {
                store.mark_metadata_unsupported();
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Either our own earlier attempt committed and its answer was
                // lost, or someone else created the key: the content decides.
                match remote_matches_with(store, key, meta, policy, rng).await? {
                    RemoteMatch::Matches => return Ok(PutOutcome::AlreadyPresent),
                    RemoteMatch::Differs(d) => return Err(conflict(key, &d)),
                    RemoteMatch::Missing => {
                        tracing::warn!(%key, "AlreadyExists, then missing; creating again");
                    }
                }
            }
            Err(e) => return Err(classify(e)),
        }
    }
    Err(Error::RemoteRetryable(format!(
        "{key}: the store kept answering AlreadyExists for an object it then could not find"
    )))
}

/// True when an error says the multipart upload id is unknown (already
/// completed or aborted). S3 answers 404 NoSuchUpload (NotFound);
/// InMemory answers a Generic "MultipartUpload not found".
fn upload_gone(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::NotFound { .. } => true,
        object_store::Error::Generic { .. } => {
            let s = e.to_string();
            s.contains("MultipartUpload not found") || s.contains("NoSuchUpload")
        }
        _ => false,
    }
}

/// Normalises "upload gone" into `NotFound` so the retry loop stops on it.
fn gone_as_not_found(key: &Path, e: object_store::Error) -> object_store::Error {
    if upload_gone(&e) && !matches!(e, object_store::Error::NotFound { .. }) {
        object_store::Error::NotFound {
            path: key.to_string(),
            source: Box::new(e),
        }
    } else {
        e
    }
}

#[allow(clippy::too_many_arguments)]
async fn put_multipart(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    bytes: &Bytes,
    cfg: &UploadConfig,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
    hooks: &mut dyn UploadHooks,
) -> Result<PutOutcome> {
    let mp = store
        .body_multipart(cfg.unsigned_body())
        .ok_or_else(|| Error::InvalidInput("store has no multipart API".into()))?
        .clone();
    let part_size = cfg
        .part_size_bytes
        .max(meta.file_len.div_ceil(MAX_PARTS))
        .max(1);

    // Create the upload (with metadata when the store takes it).
    let mut attrs = attributes(store, meta);
    let id = loop {
        let res = with_retries(policy, rng, "create multipart upload", |_| {
            let opts = PutMultipartOptions {
                attributes: attrs.clone(),
                ..Default::default()
            };
            let mp = mp.clone();
            async move {
                crate::failpoint::crash("upload.multipart.create");
                mp.create_multipart_opts(key, opts).await
            }
        })
        .await;
        match res {
            Ok(id) => break id,
            Err(e) if !attrs.is_empty() && metadata_refused(&e) => {
                store.mark_metadata_unsupported();
                attrs = Attributes::new();
            }
            Err(e) => return Err(classify(e)),
        }
    };

    // The caller journals the id before any part exists.
    if let Err(e) = hooks.multipart_started(&id) {
        abort_quietly(store, key, &id, policy, rng).await;
        return Err(e);
    }

    let mut parts: Vec<PartId> = Vec::new();
    let len = bytes.len();
    let step = usize::try_from(part_size).unwrap_or(usize::MAX);
    let mut start = 0usize;
    while start < len {
        let end = start.saturating_add(step).min(len);
        let idx = parts.len();
        let chunk = bytes.slice(start..end);
        let res = with_retries(policy, rng, "upload part", |_| {
            let mp = mp.clone();
            let payload = PutPayload::from(chunk.clone());
            let id = &id;
            async move {
                crate::failpoint::crash("upload.multipart.part");
                mp.put_part(key, id, idx, payload).await
            }
        })
        .await;
        match res {
            Ok(p) => parts.push(p),
            Err(e) => {
                abort_quietly(store, key, &id, policy, rng).await;
                return Err(classify(e));
            }
        }
        start = end;
    }

    let res = with_retries(policy, rng, "complete multipart upload", |_| {
        let mp = mp.clone();
        let parts = parts.clone();
        let id = &id;
        async move {
            crate::failpoint::crash("upload.multipart.complete");
            mp.complete_multipart(key, id, parts)
                .await
                .map_err(|e| gone_as_not_found(key, e))
        }
    })
    .await;
    match res {
        Ok(r) => Ok(PutOutcome::Created {
            etag: r.e_tag,
            version: r.version,
        }),
        Err(e) => {
            // The completion may have committed and lost its answer (a retry
            // then finds the upload gone). The object decides.
            match remote_matches_with(store, key, meta, policy, rng).await? {
                RemoteMatch::Matches => Ok(PutOutcome::Created {
                    etag: None,
                    version: None,
                }),
                // The key was empty when this upload began (checked above),
                // so the object is what *our* completion assembled from a
                // part the store acknowledged but lost or mangled: ours,
                // never verified. Corrupt (not a conflict) so the caller
                // deletes it and uploads again while the local copy holds.
                RemoteMatch::Differs(d) => Err(Error::corrupt(
                    key.to_string(),
                    format!(
                        "our multipart completion committed other bytes ({d}) and lost its answer"
                    ),
                )),
                RemoteMatch::Missing => {
                    abort_quietly(store, key, &id, policy, rng).await;
                    Err(match e {
                        object_store::Error::NotFound { .. } => Error::RemoteRetryable(format!(
                            "multipart upload {id} for {key} vanished before completion \
                             (aborted by a lifecycle rule?); upload again"
                        )),
                        other => classify(other),
                    })
                }
            }
        }
    }
}

async fn abort_quietly(
    store: &RemoteStore,
    key: &Path,
    id: &str,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) {
    if let Err(e) = abort_with(store, key, id, policy, rng).await {
        // The id is in the caller's journal; recovery aborts it later.
        tracing::warn!(%key, upload_id = id, error = %e, "could not abort multipart upload");
    }
}

/// Aborts a multipart upload. An upload that is already gone (completed,
/// aborted, expired) is success; so is a store without a multipart API
/// (no upload can exist there).
#[cfg(any(test, feature = "testing"))]
pub async fn abort_multipart(store: &RemoteStore, key: &Path, upload_id: &str) -> Result<()> {
    abort_multipart_cfg(store, key, upload_id, &UploadConfig::default()).await
}

/// [`abort_multipart`] under the caller's retry and timeout settings.
pub async fn abort_multipart_cfg(
    store: &RemoteStore,
    key: &Path,
    upload_id: &str,
    cfg: &UploadConfig,
) -> Result<()> {
    let mut rng = fastrand::Rng::new();
    abort_with(store, key, upload_id, &cfg.retry_policy(), &mut rng).await
}

async fn abort_with(
    store: &RemoteStore,
    key: &Path,
    upload_id: &str,
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
) -> Result<()> {
    let Some(mp) = store.multipart() else {
        return Ok(());
    };
    let id = upload_id.to_string();
    let res = with_retries(policy, rng, "abort multipart upload", |_| {
        let mp = mp.clone();
        let id = id.clone();
        async move {
            mp.abort_multipart(key, &id)
                .await
                .map_err(|e| gone_as_not_found(key, e))
        }
    })
    .await;
    match res {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::sealed::build_sealed;
    use crate::segment::{Entry, SegmentId};

    fn sample(id: u64) -> (Vec<u8>, SealedMeta) {
        let es: Vec<Entry> = (0..20)
            .map(|i| Entry {
                key_hash: i * 31,
                offset: i,
                size: 1,
                timestamp_ms: i,
            })
            .collect();
        build_sealed(SegmentId(id), 1, 2, 4, &es).unwrap()
    }

    #[tokio::test]
    async fn local_file_must_match_meta() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, meta) = sample(1);
        let p = d.path().join("a.seg");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_checked(&p, &meta).await.unwrap(), bytes);

        let mut wrong_crc = meta.clone();
        wrong_crc.file_crc ^= 1;
        assert!(matches!(
            read_checked(&p, &wrong_crc).await,
            Err(Error::Corrupt { .. })
        ));
        let mut wrong_len = meta.clone();
        wrong_len.file_len += 1;
        assert!(matches!(
            read_checked(&p, &wrong_len).await,
            Err(Error::Corrupt { .. })
        ));
        let mut wrong_items = meta.clone();
        wrong_items.item_count += 1;
        assert!(matches!(
            read_checked(&p, &wrong_items).await,
            Err(Error::Corrupt { .. })
        ));
        let mut flipped = bytes.clone();
        flipped[100] ^= 4;
        std::fs::write(&p, &flipped).unwrap();
        assert!(matches!(
            read_checked(&p, &meta).await,
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            read_checked(&d.path().join("none"), &meta).await,
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn upload_gone_detection() {
        let nf = object_store::Error::NotFound {
            path: "k".into(),
            source: "NoSuchUpload".into(),
        };
        assert!(upload_gone(&nf));
        let mem = object_store::Error::Generic {
            store: "InMemory",
            source: "MultipartUpload not found: 7".into(),
        };
        assert!(upload_gone(&mem));
        assert!(matches!(
            gone_as_not_found(&Path::from("k"), mem),
            object_store::Error::NotFound { .. }
        ));
        let other = object_store::Error::Generic {
            store: "S3",
            source: "503".into(),
        };
        assert!(!upload_gone(&other));
    }
}
