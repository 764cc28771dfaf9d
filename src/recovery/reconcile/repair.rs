//! Rules 1 to 3's object work: check an object against its journal
//! record, re-upload it from an intact local copy (a wrong object moved
//! aside first), read a listed object's footer into a manifest entry.

use super::*;

/// The journal's record of a manifest entry's segment, if it records these
/// very bytes (same CRC and length): its local file may repair the object.
pub(super) fn journal_copy<'a>(view: &'a JournalView, e: &SegmentEntry) -> Option<&'a SegmentRecord> {
    view.get(e.id)
        .filter(|r| r.meta.key_sum() == e.key_sum() && r.meta.file_len == e.file_len)
}

/// The key a journal record's object lives under in this store: the
/// journaled one, unless (with the manifest, `manifest`) it lies outside
/// this store's prefix and stream (journaled against another,
/// `--store-override`): then this store's own key, the one its manifest can
/// list and the drive looks for. Single-writer readers (lookups, `verify`)
/// read the journaled key, so without the manifest it is kept.
pub(super) fn record_key(
    store: &RemoteStore,
    stream: &str,
    r: &SegmentRecord,
    manifest: bool,
) -> Result<Path> {
    match &r.key {
        Some(k) if manifest && !store.holds_stream_key(stream, k) => {
            store.try_segment_key(stream, &r.meta)
        }
        Some(k) => Path::parse(k).map_err(|e| {
            Error::corrupt(
                format!("journal record of segment {}", r.meta.id),
                format!("key {k:?}: {e}"),
            )
        }),
        None => store.try_segment_key(stream, &r.meta),
    }
}

/// What is wrong with the object of `meta` under `key`, if anything.
pub(super) async fn check_object(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    sizes: &BTreeMap<String, u64>,
    deep: bool,
) -> Result<Option<(FindingKind, String)>> {
    Ok(match sizes.get(key.as_ref()) {
        None => Some((
            FindingKind::ObjectMissing,
            format!(
                "the journal records it at {} bytes; no object under the key",
                meta.file_len
            ),
        )),
        Some(&size) if size != meta.file_len => Some((
            FindingKind::SizeMismatch,
            format!(
                "object is {size} bytes, the journal records {}",
                meta.file_len
            ),
        )),
        Some(_) if deep => {
            match upload::verify_segment(store, key, meta, VerifyLevel::Full).await {
                Ok(()) => None,
                Err(Error::Corrupt { detail, .. }) => Some((FindingKind::ContentMismatch, detail)),
                Err(e) => return Err(e),
            }
        }
        Some(_) => None,
    })
}

/// Rule 1: re-upload from the local copy, or report LOST.
#[allow(clippy::too_many_arguments)]
pub(super) async fn repair_object(
    store: &RemoteStore,
    cfg: &Config,
    opts: &ReconcileOptions,
    seg_dir: &FsPath,
    kind: FindingKind,
    key: &Path,
    meta: &SealedMeta,
    present: bool,
    detail: String,
) -> Finding {
    let mut f = Finding::new(kind, Some(meta.id), key.as_ref(), detail);
    let local = seg_dir.join(sealed_file_name(meta.id));
    // Read (and check) the local copy before anything is deleted: in a
    // running process the pipeline may release the file at any moment, and
    // these bytes must be in hand before the wrong object goes.
    let bytes = match upload::put::read_checked(&local, meta).await {
        Ok(b) => b,
        // A copy there that this process cannot read (permissions, out of
        // descriptors, an I/O error) is not "no copy": nothing is judged,
        // and a loss is never recorded or accepted on it (helper-79 F2).
        Err(Error::Io { source, .. }) if source.kind() != std::io::ErrorKind::NotFound => {
            f.action = format!(
                "not checked: the local copy at {} could not be read ({source}); nothing \
                 deleted, nothing marked (run again as a user that can read it)",
                local.display()
            );
            return f;
        }
        Err(_) => {
            f.lost = true;
            f.action = format!(
                "LOST: no local copy with the recorded length and CRC at {}; its {} entries, \
                 offsets {}..={}, are in no copy this data directory holds; nothing deleted",
                local.display(),
                meta.item_count,
                meta.min_offset,
                meta.max_offset
            );
            return f;
        }
    };
    if !opts.repair {
        f.action = "none (the local copy matches: --repair re-uploads it)".into();
        return f;
    }
    let mut moved_to = None;
    if present && !cfg.manifest {
        // Single-writer mode never deletes an object: the wrong bytes are
        // copied aside first (and the copy checked), so nothing is lost even
        // if this judgement were wrong.
        match move_aside(store, cfg, key).await {
            Ok(to) => {
                f.deleted = false;
                moved_to = Some(to);
            }
            Err(e) => {
                f.action = format!(
                    "none: could not move the wrong object aside ({e}); single-writer mode \
                     (manifest = false) never deletes objects. The local copy matches; the \
                     object under the key is not the bytes the key names ({}): move it aside \
                     by hand, then run reconcile --repair again to re-upload",
                    f.detail
                );
                return f;
            }
        }
    } else if present {
        // The key names the CRC of the only bytes that belong there: what
        // is under it now is wrong, and a create-only upload cannot replace it.
        if let Err(e) = delete(store, cfg, key).await {
            f.action = format!("repair failed: could not delete the wrong object: {e}");
            return f;
        }
        f.deleted = true;
    }
    match upload::put::put_segment_bytes(
        store,
        key,
        bytes,
        meta,
        &cfg.upload_config(),
        &mut NoHooks,
    )
    .await
    {
        Ok(_) => {
            f.repaired = true;
            f.action = if let Some(to) = &moved_to {
                format!(
                    "moved the wrong object aside to {to} (kept, not deleted) and re-uploaded \
                     from the local copy (verified). Proof: the journal records segment {} with \
                     checksum {} and {} bytes under this key ({}), the local copy matches it",
                    meta.id,
                    meta.key_sum(),
                    meta.file_len,
                    f.detail
                )
            } else if present {
                format!(
                    "deleted the wrong object, re-uploaded from the local copy (verified). \
                     Proof: the journal records segment {} with checksum {} and {} bytes under \
                     this key ({}), the local copy matches it",
                    meta.id,
                    meta.key_sum(),
                    meta.file_len,
                    f.detail
                )
            } else {
                "re-uploaded from the local copy (verified)".into()
            };
        }
        Err(e) if moved_to.is_some() => {
            f.action = format!(
                "moved the wrong object aside to {} (kept), but the re-upload failed: {e}; run \
                 reconcile --repair again",
                moved_to.as_deref().unwrap_or_default()
            )
        }
        Err(e) if f.deleted => {
            f.action = format!(
                "deleted the wrong object (the journal records other bytes under this key; the \
                 local copy matches them and is kept), but the re-upload failed: {e}; run \
                 reconcile --repair again"
            )
        }
        Err(e) => f.action = format!("repair failed: {e}"),
    }
    f
}

/// Folder under a stream where single-writer repairs keep the wrong objects
/// they replace (`{prefix}/{stream}/damaged/{name}.{ms}.{rand}`): outside
/// `segments/`, so no rule of the reconciler ever lists or touches them.
pub const DAMAGED_DIR: &str = "damaged";

/// Copies the object under `key` to `{prefix}/{stream}/damaged/...`, checks
/// the copy's size, then deletes the original. Returns the copy's key.
pub(super) async fn move_aside(store: &RemoteStore, cfg: &Config, key: &Path) -> Result<String> {
    let os = store.object_store();
    let src = os.head(key).await.map_err(classify)?;
    let name = key.filename().unwrap_or("object");
    let to = store
        .prefix()
        .clone()
        .join(cfg.stream.as_str())
        .join(DAMAGED_DIR)
        .join(format!(
            "{name}.{}.{:08x}",
            crate::segment::now_ms(),
            fastrand::u32(..)
        ));
    os.copy(key, &to).await.map_err(classify)?;
    let copy = os.head(&to).await.map_err(classify)?;
    if copy.size != src.size {
        return Err(Error::Remote(format!(
            "the copy {to} is {} bytes, the object {} bytes; original left in place",
            copy.size, src.size
        )));
    }
    delete(store, cfg, key).await?;
    Ok(to.to_string())
}

/// Is a listed object one the journal knows is NOT committed (so it must
/// stay out of a rebuilt manifest)?
pub(super) fn excluded_by_journal(r: Option<&SegmentRecord>, sum: KeySum) -> bool {
    match r {
        None => false,
        Some(r) if r.meta.key_sum() != sum => true,
        Some(r) => !matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        ),
    }
}

/// Rule 3: the manifest entry of a listed object, from its footer. The
/// inner `Err` says why the object cannot be used.
pub(super) async fn read_entry(
    store: &RemoteStore,
    stream: &str,
    o: &Listed,
    journaled: Option<&SegmentRecord>,
    deep: bool,
) -> Result<std::result::Result<SegmentEntry, String>> {
    let flen = FOOTER_LEN as u64;
    if o.size < flen {
        return Ok(Err(format!(
            "{} bytes, shorter than a footer ({flen})",
            o.size
        )));
    }
    let bytes = match store
        .object_store()
        .get_range(&o.key, o.size - flen..o.size)
        .await
    {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => {
            return Ok(Err("vanished since the LIST".into()));
        }
        Err(e) => return Err(classify(e)),
    };
    let f = match Footer::decode(&bytes) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("footer: {e}"))),
    };
    if f.segment_id != o.id {
        return Ok(Err(format!(
            "footer says segment {}, the key says {}",
            f.segment_id, o.id
        )));
    }
    if f.file_len != o.size {
        return Ok(Err(format!(
            "footer says {} bytes, the object is {}",
            f.file_len, o.size
        )));
    }
    if matches!(o.sum, KeySum::Crc64(_)) != (f.version >= format::SEALED_FORMAT_VERSION) {
        return Ok(Err(format!(
            "the key names checksum {} but the footer is format {}",
            o.sum, f.version
        )));
    }
    // A format-2 key names the CRC64; the entry also keeps the CRC32, taken
    // from our journal's record of these very bytes, else from one streamed
    // read that must reproduce the CRC64 the key names.
    let (file_crc, crc64) = match o.sum {
        KeySum::Crc32(c) => (c, None),
        KeySum::Crc64(c) => match journaled.filter(|r| r.meta.key_sum() == o.sum) {
            Some(r) => (r.meta.file_crc, Some(c)),
            None => match upload::verify::object_sums(store, &o.key, o.size).await? {
                None => return Ok(Err("vanished since the LIST".into())),
                Some((len, s)) if len == o.size && s.crc64 == c => (s.crc32, Some(c)),
                Some(_) => {
                    return Ok(Err(format!(
                        "its bytes do not have the CRC64 {c:016x} its key names"
                    )));
                }
            },
        },
    };
    let meta = SealedMeta {
        id: o.id,
        file_len: o.size,
        file_crc,
        crc64,
        item_count: f.item_count,
        min_ts: f.min_ts,
        max_ts: f.max_ts,
        min_offset: f.min_offset,
        max_offset: f.max_offset,
        created_ms: f.created_ms,
        sealed_ms: f.sealed_ms,
    };
    if let Some(r) = journaled {
        let j = &r.meta;
        if (j.item_count, j.min_ts, j.max_ts, j.min_offset, j.max_offset)
            != (f.item_count, f.min_ts, f.max_ts, f.min_offset, f.max_offset)
        {
            return Ok(Err("footer disagrees with the journal's record".into()));
        }
    }
    if deep {
        match upload::verify_segment(store, &o.key, &meta, VerifyLevel::Full).await {
            Ok(()) => {}
            Err(Error::Corrupt { detail, .. }) => return Ok(Err(detail)),
            Err(e) => return Err(e),
        }
    }
    let e = SegmentEntry::new(store, stream, &meta)?;
    if e.key != o.key.as_ref() {
        return Ok(Err(format!("key does not round-trip: {}", e.key)));
    }
    Ok(Ok(e))
}

