//! Drive one segment forward through its journal states.
//!
//! The same loop serves a fresh upload and a resume after a crash: it reads
//! the segment's journal record and does what that state calls for, making
//! each step durable in the journal *before* acting on it:
//!
//! | state       | action                                                              |
//! |-------------|---------------------------------------------------------------------|
//! | Sealed      | journal `Uploading{attempt+1}`, PUT (create-only) → `Uploaded`       |
//! | Uploading   | abort a journaled multipart id; compare the key: ours → `Uploaded`, missing → PUT again, other bytes → delete them and PUT again (local copy intact) or `Quarantined` (no intact local copy) |
//! | Uploaded    | verify (read back) → `Verified`; mismatch → delete our bad object, `Uploading` again (bounded) |
//! | Verified    | with `manifest = true`: add the segment's entry to the stream's manifest (already listed is fine); then → `Committed`. Fenced: stop (stays `Verified`) |
//! | Verified, id taken | the manifest lists the id with other content (sealed while ownership was pending): reseal, see [`crate::pipeline::reseal`] → `Resealed` |
//! | Uploading, Uploaded, Verified under a key outside this store's prefix and stream (`--store-override`), or Verified by an earlier run and not found whole here | a new attempt under this store's key (local copy checked first; without one: `Quarantined` naming the old key); from `Verified` through `Quarantined` + `Requeued` in one frame (back to `Sealed`). The old object is left alone |
//! | Committed   | release the local copy if the policy says so, once a HEAD shows the object still there → `Released` |
//!
//! A local file that vanished is not fatal while the remote object can still
//! be proven ours; otherwise the segment is quarantined with the reason.
//! The local copy is deleted only from `Committed`, i.e. after `Verified`.

use std::path::PathBuf;

use object_store::ObjectStoreExt as _;
use object_store::path::Path as ObjPath;

use crate::error::{Error, Result};
use crate::journal::{Record, SegmentRecord, SegmentState};
use crate::pipeline::Shared;
use crate::remote::manifest::SegmentEntry;
use crate::segment::SegmentId;
use crate::segment::sealed::sealed_file_name;
use crate::upload::{self, PutOutcome, RemoteMatch, UploadHooks};

/// Verification mismatches tolerated (each followed by a re-upload) before
/// the segment is quarantined: a store that keeps corrupting our bytes needs
/// an operator, not an endless loop.
const MAX_VERIFY_FAILURES: u32 = 3;

/// Journals the multipart upload id before the first part is sent.
struct JournalHooks<'a> {
    sh: &'a Shared,
    id: SegmentId,
    attempt: u32,
    key: String,
}

impl UploadHooks for JournalHooks<'_> {
    fn multipart_started(&mut self, upload_id: &str) -> Result<()> {
        self.attempt += 1;
        self.sh.journal.append_blocking(vec![Record::Uploading {
            id: self.id,
            attempt: self.attempt,
            key: self.key.clone(),
            multipart_id: Some(upload_id.to_string()),
        }])
    }
}

fn record(sh: &Shared, id: SegmentId) -> Result<SegmentRecord> {
    sh.journal
        .read()
        .get(id)
        .cloned()
        .ok_or_else(|| Error::InvalidInput(format!("segment {id} is not in the journal")))
}

/// Is the local sealed file the one the journal recorded when it was
/// sealed? `None`, or why not: the upload's own check of the bytes
/// ([`upload::CheckedBytes::read`]: length, whole-file checksums, a footer
/// that decodes to exactly the recorded metadata), read on a blocking
/// thread. A weaker check here once let a foreign sealed file that passed
/// it fail only the upload's check, which the drive then took for a bad
/// read-back and retried until the deadline.
/// A read that failed for a reason that may pass (out of descriptors) is
/// an `Err`: the step is retried, nothing is quarantined for it.
async fn local_mismatch(
    path: &std::path::Path,
    meta: &crate::segment::SealedMeta,
) -> Result<Option<String>> {
    match upload::CheckedBytes::read(path, meta).await {
        Ok(_) => Ok(None),
        Err(upload::NotChecked::Mismatch(why)) => Ok(Some(why)),
        Err(upload::NotChecked::Unreadable(e)) => Err(e),
    }
}

/// A local sealed file that is not the one the journal describes: a local
/// fault no retry can fix (damage, or a file swapped in). Journal the
/// segment as quarantined and move the file to `quarantine/` with a record,
/// at once: it must be neither uploaded nor served by lookups.
async fn quarantine_local(sh: &Shared, id: SegmentId, why: String) -> Result<SegmentState> {
    let reason = format!("local sealed file does not match its journal record: {why}");
    let state = quarantine(sh, id, reason.clone()).await?;
    let writer = sh.writer.clone();
    let moved = tokio::task::spawn_blocking(move || {
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .quarantine_sealed(id, &reason)
    })
    .await
    .map_err(|e| Error::Internal(format!("quarantine task failed: {e}")))?;
    match moved {
        Ok(Some(to)) => {
            tracing::error!(segment = id.0, to = %to.display(), "local sealed file moved to quarantine")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(segment = id.0, error = %e, "could not move the local sealed file to quarantine; it stays in place, quarantined in the journal")
        }
    }
    Ok(state)
}

fn local_path(sh: &Shared, id: SegmentId) -> PathBuf {
    sh.seg_dir.join(sealed_file_name(id))
}

/// Journal the start of upload attempt `attempt` to `key` (single PUT; a
/// multipart upload journals its id through [`JournalHooks`]).
async fn journal_uploading(sh: &Shared, id: SegmentId, attempt: u32, key: &ObjPath) -> Result<()> {
    sh.journal
        .append(vec![Record::Uploading {
            id,
            attempt,
            key: key.to_string(),
            multipart_id: None,
        }])
        .await
}

/// What [`rekey_foreign`] or [`reprove_verified`] did.
enum Rekeyed {
    /// Nothing: go on with the state as journaled.
    No,
    /// The journal changed: look at the segment again.
    Again,
    /// The segment came to rest (quarantined).
    Rest(SegmentState),
}

/// Takes a segment back for a fresh upload under `key` because `why`:
/// `Uploading`/`Uploaded` get a new attempt; `Verified` (which may not go
/// back to `Uploading`) is journaled `Quarantined` and `Requeued` in one
/// frame, back to `Sealed`. Only with a local copy that still matches its
/// record: without one the segment is quarantined with `why`, naming
/// `old`, where the copy that was sent (or proven) may still be.
async fn upload_again(
    sh: &Shared,
    rec: &SegmentRecord,
    old: &str,
    key: &ObjPath,
    why: String,
) -> Result<Rekeyed> {
    let id = rec.meta.id;
    let local = local_path(sh, id);
    if let Some(bad) = local_mismatch(&local, &rec.meta).await? {
        let reason = format!(
            "{why}; it cannot be uploaded again: its local copy {bad}. The copy journaled \
             under {old} (in the store it was sent to) is the one left"
        );
        // A file that is there but not the journaled one is also taken out
        // of service (lookups), as any such file is.
        let state = if local.exists() {
            quarantine_local(sh, id, reason).await?
        } else {
            quarantine(sh, id, reason).await?
        };
        return Ok(Rekeyed::Rest(state));
    }
    let reason = if old == key.as_ref() {
        format!("{why}: uploaded again under {key}")
    } else {
        format!("{why}: uploaded again under {key}; nothing under {old} is deleted")
    };
    tracing::warn!(segment = id.0, "{reason}");
    match rec.state {
        SegmentState::Uploading | SegmentState::Uploaded => {
            journal_uploading(sh, id, rec.attempt + 1, key).await?;
        }
        SegmentState::Verified => requeue(sh, id, reason).await?,
        _ => return Ok(Rekeyed::No),
    }
    Ok(Rekeyed::Again)
}

/// A segment journaled under `old`, a key outside this store's prefix and
/// stream (the prefix or stream was changed with `--store-override`): that
/// key can never be listed in this stream's manifest, so an `Uploading`,
/// `Uploaded` or `Verified` one is uploaded again under `key`
/// ([`upload_again`]).
async fn rekey_foreign(
    sh: &Shared,
    rec: &SegmentRecord,
    old: &str,
    key: &ObjPath,
) -> Result<Rekeyed> {
    if !matches!(
        rec.state,
        SegmentState::Uploading | SegmentState::Uploaded | SegmentState::Verified
    ) {
        return Ok(Rekeyed::No);
    }
    let mut why = format!(
        "segment {} is journaled {:?} under {old}, which is not under {}'s {}/{}/segments \
         (the prefix or stream was changed)",
        rec.meta.id,
        rec.state,
        sh.store.display_url(),
        sh.store.prefix(),
        sh.stream
    );
    if let Some(mp) = &rec.multipart_id {
        // Not aborted: the upload belongs to wherever `old` was sent.
        why.push_str(&format!(
            "; its multipart upload {mp} under that key was left incomplete there"
        ));
    }
    upload_again(sh, rec, old, key, why).await
}

/// A `Verified` record this process did not write: the object is proven
/// again in this store (at the level an upload is verified at) before it
/// is committed. The record may come from a run against another store
/// whose keys look the same (another bucket, endpoint or directory, given
/// with `--store-override`), or the object may have been removed since.
/// Missing or other bytes: uploaded again ([`upload_again`]).
async fn reprove_verified(sh: &Shared, rec: &SegmentRecord, key: &ObjPath) -> Result<Rekeyed> {
    let id = rec.meta.id;
    if sh
        .verified_here
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&id)
    {
        return Ok(Rekeyed::No);
    }
    let cfg = sh.upload_config();
    let level = cfg.level_after_write(&sh.store, &rec.meta);
    match upload::verify_segment_cfg(&sh.store, key, &rec.meta, level, &cfg).await {
        Ok(()) => {
            sh.verified_here
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            Ok(Rekeyed::No)
        }
        Err(e @ Error::Corrupt { .. }) => {
            let why = format!(
                "segment {id} is journaled Verified, but {} does not hold it under {key} ({e}): \
                 it was proven in another store (changed with --store-override) or the object \
                 was removed since",
                sh.store.display_url()
            );
            upload_again(sh, rec, key.as_ref(), key, why).await
        }
        Err(e) => Err(e),
    }
}

fn mark_verified_here(sh: &Shared, id: SegmentId) {
    sh.verified_here
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id);
}

/// Delete the object under our own key that was never verified and does
/// not hold our bytes (already gone is fine).
async fn delete_own_unverified(sh: &Shared, key: &ObjPath) -> Result<()> {
    match sh.store.object_store().delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(crate::remote::classify(e)),
    }
}

/// Back to `Sealed` from any state but `Released`, `Quarantined` and
/// `Resealed`: `Quarantined` then `Requeued` in one frame (the journal has
/// no other way back), so the drive uploads it afresh.
pub(crate) async fn requeue(sh: &Shared, id: SegmentId, reason: String) -> Result<()> {
    sh.journal
        .append(vec![
            Record::Quarantined {
                id,
                reason: reason.clone(),
            },
            Record::Requeued { id, reason },
        ])
        .await
}

async fn quarantine(sh: &Shared, id: SegmentId, reason: String) -> Result<SegmentState> {
    tracing::error!(segment = id.0, %reason, "segment quarantined in the journal");
    sh.metrics.quarantined.inc();
    sh.journal
        .append(vec![Record::Quarantined { id, reason }])
        .await?;
    Ok(SegmentState::Quarantined)
}

/// Run segment `id` to a resting state: `Committed`/`Released` (done),
/// `Quarantined` (operator), or an error (retry later; the journal says
/// where it stopped).
pub async fn drive(sh: &Shared, id: SegmentId) -> Result<SegmentState> {
    use tracing::Instrument as _;
    // The span is attached to the future (`instrument`), never entered
    // across an `.await`: an entered guard would leak into whatever else
    // the worker thread runs while this future is parked.
    let span = tracing::info_span!("upload", segment = id.0);
    drive_inner(sh, id).instrument(span).await
}

async fn drive_inner(sh: &Shared, id: SegmentId) -> Result<SegmentState> {
    let mut verify_failures = 0u32;
    loop {
        // Fenced: another owner took the stream; write nothing more.
        sh.check_fenced()?;
        let rec = record(sh, id)?;
        // A key journaled against another prefix or stream (the broker was
        // pointed elsewhere with --store-override): it can never be listed
        // in this stream's manifest, so a pending segment is uploaded again
        // under this store's key, and a committed one is looked for there
        // (where `reconcile --repair` uploads it).
        // Single-writer lookups, `verify` and `status` read a committed
        // segment under its journaled key, so there a committed one keeps
        // it (its release looks for it there, as they do).
        let foreign = rec.key.as_deref().filter(|k| {
            !sh.store.holds_stream_key(&sh.stream, k)
                && (sh.manifest.is_some()
                    || !matches!(
                        rec.state,
                        SegmentState::Committed | SegmentState::Released
                    ))
        });
        let key = match (&rec.key, foreign) {
            (Some(k), None) => ObjPath::from(k.clone()),
            _ => sh.store.segment_key(&sh.stream, &rec.meta),
        };
        let rekeyed = match foreign {
            Some(old) => rekey_foreign(sh, &rec, old, &key).await?,
            None if rec.state == SegmentState::Verified => reprove_verified(sh, &rec, &key).await?,
            None => Rekeyed::No,
        };
        match rekeyed {
            Rekeyed::No => {}
            Rekeyed::Again => continue,
            Rekeyed::Rest(state) => return Ok(state),
        }
        match rec.state {
            SegmentState::Sealed | SegmentState::Uploading => {
                if rec.state == SegmentState::Uploading {
                    if let Some(mp) = rec.multipart_id.clone() {
                        upload::abort_multipart_cfg(&sh.store, &key, &mp, &sh.upload).await?;
                        sh.journal
                            .append(vec![Record::MultipartAborted {
                                id,
                                multipart_id: mp,
                            }])
                            .await?;
                    }
                    let found =
                        upload::remote_matches_cfg(&sh.store, &key, &rec.meta, &sh.upload).await?;
                    let local_ok = matches!(found, RemoteMatch::Differs(_))
                        && local_mismatch(&local_path(sh, id), &rec.meta)
                            .await?
                            .is_none();
                    match found {
                        RemoteMatch::Matches => {
                            sh.journal
                                .append(vec![Record::Uploaded {
                                    id,
                                    etag: None,
                                    version: None,
                                }])
                                .await?;
                            continue;
                        }
                        RemoteMatch::Differs(why) if local_ok => {
                            // Other bytes under our key while the journal
                            // says *we* were uploading to it: our own write
                            // went wrong (a part the store acknowledged but
                            // lost or mangled, and the drive was cut before
                            // its read-back could delete it). The key names
                            // the CRC of the only bytes that belong there, so
                            // these bytes are nobody's good object; it was
                            // never verified. Delete it and upload again from
                            // the local copy, which still matches its record.
                            sh.metrics.verify_failures.inc();
                            tracing::warn!(%why, attempt = rec.attempt, "other bytes under our key after an interrupted upload; replacing them");
                            delete_own_unverified(sh, &key).await?;
                            journal_uploading(sh, id, rec.attempt + 1, &key).await?;
                            return Err(Error::RemoteRetryable(format!(
                                "object under {key} had other bytes ({why}); deleted, upload again"
                            )));
                        }
                        RemoteMatch::Differs(why) => {
                            // Without a local copy that still matches, there
                            // is nothing to replace the object with: keep
                            // both for an operator.
                            return quarantine(
                                sh,
                                id,
                                format!("object under {key} is not ours: {why}"),
                            )
                            .await;
                        }
                        RemoteMatch::Missing => {}
                    }
                }
                let local = local_path(sh, id);
                if !local.exists() && rec.state == SegmentState::Sealed {
                    // The journal may have fallen back to Sealed (a cut
                    // journal) after the object was uploaded and the local
                    // copy released: prove it from the store before giving up.
                    if upload::remote_matches_cfg(&sh.store, &key, &rec.meta, &sh.upload).await?
                        == RemoteMatch::Matches
                    {
                        journal_uploading(sh, id, rec.attempt + 1, &key).await?;
                        continue;
                    }
                }
                if !local.exists() {
                    // Moved to quarantine/ by the start-up check (damage it
                    // could not salvage): say so, not "missing".
                    let why = match moved_to_quarantine(&local) {
                        Some(q) => format!(
                            "local file {} was moved to {} by the start-up check (damaged; \
                             see `tierindex quarantine list` and its note) and the store has \
                             no copy",
                            local.display(),
                            q.display()
                        ),
                        // By number (helper-82 F2: the report gave only the
                        // reason): the journal's record says what it held.
                        None => format!(
                            "local file {} is missing and the store has no copy: its {} \
                             entries (offsets {}..={}) are LOST unless the file is put back \
                             (then `tierindex quarantine retry {}`)",
                            local.display(),
                            rec.meta.item_count,
                            rec.meta.min_offset,
                            rec.meta.max_offset,
                            id.0
                        ),
                    };
                    return quarantine(sh, id, why).await;
                }
                // A local fault is not a store error: check the file before
                // anything is written to the journal or the store. One read
                // and one checksum pass, on a blocking thread; the upload
                // sends exactly these checked bytes.
                let bytes = match upload::CheckedBytes::read(&local, &rec.meta).await {
                    Ok(b) => b,
                    Err(upload::NotChecked::Mismatch(why)) => {
                        return quarantine_local(sh, id, why).await;
                    }
                    Err(upload::NotChecked::Unreadable(e)) => return Err(e),
                };
                let attempt = rec.attempt + 1;
                journal_uploading(sh, id, attempt, &key).await?;
                let mut hooks = JournalHooks {
                    sh,
                    id,
                    attempt,
                    key: key.to_string(),
                };
                let started = std::time::Instant::now();
                let cfg = sh.upload_config();
                let put = upload::put_segment_checked(
                    &sh.store, &key, bytes, &rec.meta, &cfg, &mut hooks,
                )
                .await;
                // A failed read-back may mean the local file changed under
                // us: look again (only on that path) before blaming the store.
                let changed = match &put {
                    Err(Error::Corrupt { .. }) => local_mismatch(&local, &rec.meta).await?,
                    _ => None,
                };
                match put {
                    Ok(out) => {
                        crate::failpoint::crash("verify.after");
                        let (etag, version) = match out {
                            PutOutcome::Created { etag, version } => (etag, version),
                            PutOutcome::AlreadyPresent => (None, None),
                        };
                        sh.metrics.upload_bytes.add(rec.meta.file_len);
                        sh.metrics.segments_uploaded.inc();
                        sh.metrics.entries_uploaded.add(rec.meta.item_count);
                        sh.metrics
                            .upload_latency_ms
                            .observe(started.elapsed().as_millis() as u64);
                        // put_segment already read the object back (at the
                        // configured level, Full where the write could have
                        // replaced other bytes; AlreadyPresent is a full
                        // comparison), so Uploaded and Verified go into the
                        // journal together: one fsync, no second read-back.
                        // The Uploaded arm below runs only after a crash
                        // between the PUT and this append. Without a
                        // manifest nothing happens between Verified and
                        // Committed, so Committed joins the same frame
                        // (one fsync per segment instead of two); with one,
                        // the Verified arm commits to the manifest first.
                        let mut records = vec![
                            Record::Uploaded { id, etag, version },
                            Record::Verified { id },
                        ];
                        if sh.manifest.is_none() {
                            crate::failpoint::crash("commit");
                            records.push(Record::Committed { id });
                        }
                        sh.journal.append(records).await?;
                        mark_verified_here(sh, id);
                        if sh.manifest.is_none() {
                            sh.metrics.segments_committed.inc();
                        }
                    }
                    Err(Error::RemoteConflict(why)) => return quarantine(sh, id, why).await,
                    Err(Error::Corrupt { .. }) if changed.is_some() => {
                        let why = changed.unwrap_or_default();
                        // The sealed file changed after it was checked and
                        // sent: no retry can fix that. Never upload bytes
                        // the journal does not describe.
                        return quarantine_local(sh, id, why).await;
                    }
                    Err(e @ Error::Corrupt { .. }) => {
                        // The read-back right after our own create or
                        // multipart completion found other bytes (a part
                        // the store acknowledged but lost or mangled), or
                        // no object. That object is ours: our key, written
                        // by this attempt, never verified. Delete it and
                        // upload again; left in place, the next drive would
                        // find "other bytes under our key" and quarantine.
                        // Not quarantined however often it happens: the
                        // local copy is kept, the scheduler backs off, the
                        // deadline bounds a drain, and the segment completes
                        // once the store stops corrupting parts (counted in
                        // the verify-failure metric, logged as a warning).
                        // A crash before the new Uploading record below
                        // resumes at the comparison in the Uploading arm,
                        // which deletes the bad object and uploads again.
                        sh.metrics.verify_failures.inc();
                        // The multipart hook journaled its own attempt number.
                        let attempt = record(sh, id)?.attempt;
                        tracing::warn!(error = %e, attempt, "read-back after upload failed");
                        delete_own_unverified(sh, &key).await?;
                        journal_uploading(sh, id, attempt + 1, &key).await?;
                        return Err(Error::RemoteRetryable(e.to_string()));
                    }
                    Err(e) => return Err(e),
                }
            }
            SegmentState::Uploaded => {
                // After a crash between the PUT and its journal record: the
                // same level the upload itself would have verified at (the
                // body proven wherever the write could have replaced
                // someone else's bytes), not merely the configured one.
                let cfg = sh.upload_config();
                let level = cfg.level_after_write(&sh.store, &rec.meta);
                match upload::verify_segment_cfg(&sh.store, &key, &rec.meta, level, &cfg).await {
                    Ok(()) => {
                        crate::failpoint::crash("verify.after");
                        sh.journal.append(vec![Record::Verified { id }]).await?;
                        mark_verified_here(sh, id);
                    }
                    Err(e @ Error::Corrupt { .. }) => {
                        verify_failures += 1;
                        sh.metrics.verify_failures.inc();
                        tracing::warn!(error = %e, "verification failed");
                        if verify_failures >= MAX_VERIFY_FAILURES || !local_path(sh, id).exists() {
                            return quarantine(sh, id, format!("verification failed: {e}")).await;
                        }
                        // The object under our key is not what we sent. It is
                        // ours by key layout and was never marked verified, so
                        // remove it and upload again.
                        delete_own_unverified(sh, &key).await?;
                        journal_uploading(sh, id, rec.attempt + 1, &key).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            SegmentState::Verified => {
                // With a manifest, the segment is committed once the
                // manifest lists it; the journal's Committed follows. A
                // crash in between resumes here: the manifest answers
                // AlreadyCommitted and the journal catches up. Fenced: the
                // error goes up, the segment stays Verified, its local copy
                // stays.
                if sh.manifest.is_some() {
                    let mut entry = SegmentEntry::new(&sh.store, &sh.stream, &rec.meta)?;
                    entry.key = key.to_string();
                    match sh.commit_to_manifest(entry.clone()).await {
                        Ok(()) => {}
                        Err(Error::RemoteConflict(why)) => {
                            // Its id is taken by another segment (sealed
                            // while ownership was pending): it can never be
                            // committed under that id. Its entries go into
                            // a new segment above the epoch's id floor.
                            let Some((other, floor)) = sh.id_taken(&entry).await? else {
                                return Err(Error::RemoteConflict(why));
                            };
                            if let Some(bad) =
                                local_mismatch(&local_path(sh, id), &rec.meta).await?
                            {
                                return quarantine_local(sh, id, bad).await;
                            }
                            let reason = format!(
                                "segment id {id} is already in the manifest as {} (checksum {}, {} bytes)",
                                other.key,
                                other.key_sum(),
                                other.file_len
                            );
                            return crate::pipeline::reseal::reseal(
                                sh, id, &rec.meta, floor, reason,
                            )
                            .await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                crate::failpoint::crash("commit");
                sh.journal.append(vec![Record::Committed { id }]).await?;
                sh.metrics.segments_committed.inc();
            }
            SegmentState::Committed => {
                if !sh.release_after_commit {
                    return Ok(SegmentState::Committed);
                }
                if let Some((from, into)) = crate::pipeline::reseal::blocks_release(sh, id) {
                    return Err(Error::RemoteRetryable(format!(
                        "local copy kept: segment {from} is being resealed into segment {into} \
                         and later ones, which the next start finishes from the local copies"
                    )));
                }
                // The local copy must be the one committed: a second process
                // that sealed this id from the same active file (a copy of
                // the data directory, a host's stream opened beside its
                // host) can leave a file holding entries the committed
                // object does not. Kept aside for an operator, never
                // deleted; the segment is released once the file is out of
                // `segments/`.
                // A file in `segments/` the set does not hold (its move to
                // quarantine failed: the set lets go of it first, so that
                // lookups stop serving it) is not proven to be the
                // committed one: kept, for an operator.
                if !sh.sealed.contains(id) && local_path(sh, id).exists() {
                    return Err(Error::Remote(format!(
                        "local file {} of committed segment {id} was not taken in by this \
                         process (a move to quarantine failed, or it appeared since): kept, \
                         not released. Run `tierindex fsck` on the data directory",
                        local_path(sh, id).display()
                    )));
                }
                if let Some(diff) = sh.sealed.differs_from(id, &rec.meta, true) {
                    let note = sh.set_aside_not_committed(id, &diff).await?;
                    return Err(Error::corrupt(local_path(sh, id).display().to_string(), note));
                }
                // Never drop the last copy: the object must still be there,
                // whole (someone may have deleted it since it was verified,
                // e.g. another data directory's reconciler taking it for an
                // orphan). Missing or wrong size: keep the local copy and
                // report; `tierindex reconcile --repair` re-uploads it, and
                // the next drive releases.
                if local_path(sh, id).exists() {
                    // Proven in this process (its upload was verified, at
                    // the level the probe allows; usually moments ago, but
                    // a parked release can come hours later): its size is
                    // checked again. Otherwise (a crash between Committed
                    // and Released, a release retried in a later run,
                    // `release_after_commit` turned on later) the body is
                    // read back whole before the last local copy goes: a
                    // size check missed an object damaged in place at rest.
                    let proven_here = sh
                        .verified_here
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&id);
                    let seen = if proven_here {
                        match sh.store.object_store().head(&key).await {
                            Ok(m) if m.size == rec.meta.file_len => Ok(()),
                            Ok(m) => Err(format!(
                                "is {} bytes, the journal says {}",
                                m.size, rec.meta.file_len
                            )),
                            Err(object_store::Error::NotFound { .. }) => {
                                Err("missing".to_string())
                            }
                            Err(e) => return Err(crate::remote::classify(e)),
                        }
                    } else {
                        let cfg = sh.upload_config();
                        match upload::verify_segment_cfg(
                            &sh.store,
                            &key,
                            &rec.meta,
                            upload::VerifyLevel::Full,
                            &cfg,
                        )
                        .await
                        {
                            Ok(()) => {
                                mark_verified_here(sh, id);
                                Ok(())
                            }
                            Err(Error::Corrupt { detail, .. }) if detail.starts_with("missing") => {
                                Err("missing".to_string())
                            }
                            Err(Error::Corrupt { detail, .. }) => Err(format!(
                                "does not hold the committed bytes ({detail})"
                            )),
                            Err(e) => return Err(e),
                        }
                    };
                    match seen {
                        Ok(()) => {}
                        Err(missing) if missing == "missing" => {
                            tracing::error!(%key, "committed object is missing: local copy kept, not released");
                            let elsewhere = match foreign {
                                Some(old) => format!(
                                    " It was committed under {old}, outside this store's \
                                     stream (the prefix or stream was changed with \
                                     --store-override)."
                                ),
                                None => " If the store was changed with --store-override, the \
                                         object is in the store it was committed to."
                                    .to_string(),
                            };
                            return Err(Error::Remote(format!(
                                "committed object {key} is missing from {}: local copy kept, not \
                                 released.{elsewhere} `tierindex reconcile --repair` uploads it \
                                 here from the local copy",
                                sh.store.display_url()
                            )));
                        }
                        Err(why) => {
                            tracing::error!(%key, "committed object {why}: local copy kept, not released");
                            return Err(Error::Remote(format!(
                                "committed object {key} {why}: local copy kept, not released. \
                                 `tierindex reconcile --deep --repair` repairs it from the local copy \
                                 (`--deep` reads every object whole: one of the right size with \
                                 the wrong bytes is found only so)"
                            )));
                        }
                    }
                    // Readers go through the manifest: the local copy goes
                    // only once it lists this segment, whole. Committed
                    // under another prefix, stream or store (a
                    // --store-override run), the journal's Committed is no
                    // proof of that here.
                    if sh.manifest.is_some()
                        && let Some(state) = check_listed(sh, &rec, &key, foreign).await?
                    {
                        if state == SegmentState::Sealed {
                            continue;
                        }
                        return Ok(state);
                    }
                }
                // Delete first, then journal: a crash in between leaves a
                // Committed segment without its file, which releases again.
                crate::failpoint::crash("release");
                // The writer's lock only to clone what the release needs:
                // appends do not wait for the unlink and directory fsync.
                let writer = sh.writer.clone();
                tokio::task::spawn_blocking(move || {
                    let releaser = writer.lock().unwrap_or_else(|p| p.into_inner()).releaser();
                    releaser.release(id)
                })
                .await
                .map_err(|e| Error::Internal(format!("release task failed: {e}")))??;
                crate::failpoint::crash("release.after");
                sh.journal.append(vec![Record::Released { id }]).await?;
                return Ok(SegmentState::Released);
            }
            s @ (SegmentState::Released
            | SegmentState::Quarantined
            | SegmentState::Resealing
            | SegmentState::Resealed) => return Ok(s),
        }
    }
}

/// Before a release with the manifest: whether this stream's manifest
/// lists segment `rec` as committed under `key` (or with the same content
/// under another key whose object is in place). `Ok(None)`: it does, the
/// local copy may go. Not listed (a store switched with --store-override,
/// a manifest restored from a backup): kept, and reported as needing an
/// operator (`Error::Remote`: not retried within a drain); `reconcile
/// --repair` commits it. Listed with other content (its id was taken by
/// another segment): journaled `Quarantined` then `Requeued`, back to
/// `Sealed` (`Ok(Some(Sealed))`: the drive goes on from there), so its
/// entries, of which the local copy holds the only copy a reader could
/// find, are uploaded again and resealed under a new id when the commit
/// finds the id taken.
async fn check_listed(
    sh: &Shared,
    rec: &SegmentRecord,
    key: &ObjPath,
    foreign: Option<&str>,
) -> Result<Option<SegmentState>> {
    let id = rec.meta.id;
    let mut want = SegmentEntry::new(&sh.store, &sh.stream, &rec.meta)?;
    want.key = key.to_string();
    let whence = match foreign {
        Some(old) => format!(
            " It was committed under {old}, outside this store's stream (the prefix or \
             stream was changed with --store-override)."
        ),
        None => String::new(),
    };
    let listed = sh.manifest_entry(id).await?;
    let Some(listed) = listed else {
        return Err(Error::Remote(format!(
            "segment {id} is committed in the journal, but this stream's manifest in {} does \
             not list it: local copy kept, not released.{whence} `tierindex reconcile \
             --repair` commits it",
            sh.store.display_url()
        )));
    };
    if listed == want {
        return Ok(None);
    }
    let mut same = listed.clone();
    same.key = want.key.clone();
    if same != want {
        let reason = format!(
            "this stream's manifest lists segment {id} with other content (object {}, {} \
             bytes, crc32 {:08x}) than the local copy (object {key}, {} bytes, crc32 {:08x}); \
             its entries are only in the local copy, kept in segments/.{whence} Requeued: \
             uploaded again, then resealed under a new id once the commit finds the id taken",
            listed.key, listed.file_len, listed.file_crc, want.file_len, want.file_crc
        );
        tracing::error!(segment = id.0, %reason, "committed segment requeued to be resealed");
        requeue(sh, id, reason).await?;
        return Ok(Some(SegmentState::Sealed));
    }
    // The same bytes listed under another key: readers find them there.
    let other = ObjPath::from(listed.key.clone());
    match sh.store.object_store().head(&other).await {
        Ok(m) if m.size == listed.file_len => Ok(None),
        Ok(m) => Err(Error::Remote(format!(
            "this stream's manifest lists segment {id} under {other}, which is {} bytes, not \
             {}: local copy kept, not released. `tierindex reconcile --repair` repairs it \
             from the local copy",
            m.size, listed.file_len
        ))),
        Err(object_store::Error::NotFound { .. }) => Err(Error::Remote(format!(
            "this stream's manifest lists segment {id} under {other}, which is missing: local \
             copy kept, not released. `tierindex reconcile --repair` repairs it from the \
             local copy"
        ))),
        Err(e) => Err(crate::remote::classify(e)),
    }
}

/// Where the data directory's `quarantine/` records that `local` (a file
/// of its `segments/`, named by its id) was moved, the newest such move,
/// from the records the quarantine commands read.
fn moved_to_quarantine(local: &std::path::Path) -> Option<std::path::PathBuf> {
    let root = local.parent()?.parent()?;
    let name = local.file_name()?;
    crate::datadir::quarantine_records(root)
        .into_iter()
        .filter(|(_, r)| std::path::Path::new(&r.original).file_name() == Some(name))
        .max_by_key(|(_, r)| r.at_ms)
        .map(|(_, r)| std::path::PathBuf::from(r.moved_to))
}
