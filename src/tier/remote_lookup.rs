//! [`TierIndex::lookup_remote`]: lookups across local and uploaded segments.

use super::*;

impl TierIndex {
    /// Entries for `key` within `range` in local segments and in the
    /// committed remote segments the local lookup did not cover (released
    /// local copies, local files that cannot be read, another data
    /// directory's segments).
    ///
    /// The remote candidates are the manifest's list when `manifest = true`
    /// (only committed objects are read: a partial upload is never seen),
    /// else the journal's `Committed` and `Released` records (compaction
    /// drops `Released` ones, so without the manifest older released
    /// segments are not found). A committed segment is skipped only when it
    /// is the very segment the local lookup read or ruled out, not merely
    /// one with the same id (see `index::Covered`). Each candidate whose
    /// time range can match costs one range GET once its index is cached
    /// (`remote::fetch`). A local segment that cannot be read and has no
    /// committed copy is named in [`RemoteLookup::unreadable`].
    pub async fn lookup_remote(&self, key: &[u8], range: TimeRange) -> Result<RemoteLookup> {
        let h = crate::key_hash(key);
        let sh = self.sh().clone();
        // The store's list is read before the local part, so a segment of
        // this data directory that seals and commits meanwhile is not read
        // twice (locally as open, remotely as committed). A local copy
        // released after the list was read may be missing from it (it was
        // committed after): then the list is read again, once (a copy is
        // released only after its segment is committed).
        let sealed = sh.sealed.clone();
        let removals = sealed.removals();
        let (mut listed, mut unlisted) = self.remote_list(&sh).await?;
        let (local, covered) = self.local_lookup(h, range);
        sh.metrics.local_corrupt_items.add(local.corrupt_items);
        sh.metrics
            .local_unreadable_segments
            .add(local.unreadable_segments.len() as u64);
        // Read again too when a local file could not be read: its segment
        // may have been committed after the first read.
        if sealed.removals() != removals || !local.unreadable_segments.is_empty() {
            (listed, unlisted) = self.remote_list(&sh).await?;
        }
        // A local segment that could not be read and has no committed copy:
        // its entries are missing from the result, which says so.
        // (Its copy is the same segment, not just the same id: another
        // data directory's segment of that id is read, and is no copy.)
        let uncommitted: Vec<u64> = local
            .unreadable_segments
            .iter()
            .copied()
            .filter(|id| {
                !listed
                    .iter()
                    .any(|l| l.meta.id.0 == *id && covered.is_copy_of_unreadable(&l.meta))
            })
            .collect();
        // What the journal says this data directory committed (for the
        // segments the local part read as open, to tell them from another
        // data directory's under the same id).
        let ours = |id: crate::segment::SegmentId| sh.journal.read().segments().get(&id).map(|r| r.meta.clone());
        // Candidates, plus (manifest) each one's entry and the segments the
        // manifest marks as damaged: those are reported, never read.
        let mut entries = std::collections::HashMap::new();
        let mut marked: Vec<(u64, String)> = Vec::new();
        let mut remote: Vec<RemoteSegment> = Vec::new();
        for l in listed {
            if covered.covers(&l.meta, ours) {
                continue;
            }
            if let Some(d) = l.damage {
                marked.push((l.meta.id.0, d));
                continue;
            }
            // A manifest entry whose key does not parse is this segment's
            // failure, reported with it; the others are still read.
            let key = match l.key {
                Ok(k) => k,
                Err(why) => {
                    marked.push((l.meta.id.0, why));
                    continue;
                }
            };
            if let Some(e) = l.entry {
                entries.insert(e.id, e);
            }
            remote.push(RemoteSegment { key, meta: l.meta });
        }
        let fetcher = self.fetcher.get_or_init(|| {
            Fetcher::new(
                sh.store.clone(),
                sh.upload.retry_policy(),
                crate::remote::fetch::REMOTE_INDEX_CACHE_BYTES,
            )
        });
        let mut out = RemoteLookup {
            entries: Vec::new(),
            truncated: local.truncated,
            remote_segments: remote.len() + marked.len(),
            unreadable: Vec::new(),
            unlisted: Vec::new(),
        };
        if !unlisted.is_empty() {
            unlisted.sort_unstable();
            tracing::warn!(
                segments = unlisted.len(),
                first = unlisted[0],
                "the stream's manifest does not list segments this data directory's journal \
                 records committed (a manifest restored from an older version, or commits made \
                 to another store): searched under the journal's keys; run `tierindex reconcile` \
                 (`--repair` commits them again)"
            );
            out.unlisted = unlisted;
        }
        for (id, why) in marked {
            sh.metrics.remote_unreadable.inc();
            out.unreadable.push((id, why));
        }
        for id in uncommitted {
            out.unreadable.push((
                id,
                "local sealed segment cannot be read and has no committed copy: its entries \
                 are missing (run tierindex fsck)"
                    .into(),
            ));
        }
        for seg in &remote {
            let mut res = fetcher.lookup_in(seg, h, range).await;
            if let Err(e @ Error::Corrupt { .. }) = &res {
                // Bad bytes in a ranged read: the object's, or the read's?
                // A full read (CRC of the whole object) decides.
                match fetcher.confirm_damage(seg).await {
                    Ok(None) => {
                        tracing::warn!(segment = seg.meta.id.0, key = %seg.key, error = %e, "ranged read was bad but the object is whole; reading again");
                        res = fetcher.lookup_in(seg, h, range).await;
                    }
                    Ok(Some(why)) => {
                        let entry = entries.get(&seg.meta.id);
                        if let (Some(m), Some(entry)) = (&sh.manifest, entry) {
                            self.mark_damaged(m, entry, &why).await;
                        }
                        res = Err(Error::corrupt(seg.key.to_string(), why));
                    }
                    Err(c) => {
                        tracing::warn!(segment = seg.meta.id.0, error = %c, "could not confirm damage with a full read");
                    }
                }
            }
            match res {
                Ok(es) => out.entries.extend(es),
                Err(e) => {
                    tracing::error!(segment = seg.meta.id.0, key = %seg.key, error = %e, "remote segment unreadable");
                    sh.metrics.remote_unreadable.inc();
                    out.unreadable.push((seg.meta.id.0, e.to_string()));
                }
            }
        }
        out.entries.extend(local.entries);
        Ok(out)
    }

    /// The committed segments, unfiltered: the manifest's list with
    /// `manifest = true`, else the journal's `Committed` and `Released`
    /// records (a committed segment's object is verified; its local copy
    /// may be unlinked before `Released` is journaled). With the manifest,
    /// also the journal's committed segments it does not list (a rolled
    /// back manifest), whose ids come second: read from the journal before
    /// the manifest, since a commit reaches the manifest first.
    async fn remote_list(&self, sh: &Shared) -> Result<(Vec<Listed>, Vec<u64>)> {
        let journal_committed = || {
            let j = sh.journal.read();
            j.segments()
                .values()
                .filter(|r| matches!(r.state, SegmentState::Committed | SegmentState::Released))
                .map(|r| Listed {
                    key: Ok(match &r.key {
                        Some(k) => object_store::path::Path::from(k.as_str()),
                        None => sh.store.segment_key(&sh.stream, &r.meta),
                    }),
                    meta: r.meta.clone(),
                    entry: None,
                    damage: None,
                })
                .collect::<Vec<_>>()
        };
        let Some(m) = &sh.manifest else {
            return Ok((journal_committed(), Vec::new()));
        };
        let ours = journal_committed();
        let owned = {
            let g = m.writer.lock().await;
            g.as_ref()
                .map(|w| (w.store().clone(), w.manifest().clone()))
        };
        let (ms, manifest) = match owned {
            Some(x) => x,
            // Ownership still pending: read the manifest as any reader
            // would (no probe needed to read).
            None if m.pending_reason().is_some() => {
                let ms = self.manifest_reader(sh)?;
                match ms.load().await? {
                    Some(man) => (ms, man),
                    None => (ms, crate::remote::manifest::Manifest::empty(&sh.stream)),
                }
            }
            None => return Err(Error::ShutDown),
        };
        let mut v = Vec::new();
        let mut ids = std::collections::HashMap::new();
        for e in ms.all_segments(&manifest).await? {
            let damage = manifest.damage(e.id).map(damage_text);
            ids.insert(e.id, e.key_sum());
            v.push(Listed {
                key: RemoteSegment::from_entry(&e)
                    .map(|s| s.key)
                    .map_err(|err| err.to_string()),
                meta: RemoteSegment::meta_of(&e),
                entry: Some(e),
                damage,
            });
        }
        let mut unlisted = Vec::new();
        for l in ours {
            // Not listed, or another segment (other bytes) under its id.
            if ids.get(&l.meta.id) != Some(&l.meta.key_sum()) {
                unlisted.push(l.meta.id.0);
                v.push(l);
            }
        }
        Ok((v, unlisted))
    }

    /// A read-only view of the stream's manifest (cached, so its decoded
    /// chunks are reused across lookups).
    fn manifest_reader(&self, sh: &Shared) -> Result<ManifestStore> {
        if let Some(ms) = self.manifest_reader.get() {
            return Ok(ms.clone());
        }
        let ms = ManifestStore::reader(&sh.store, &sh.stream, self.cfg.manifest_options())?;
        Ok(self.manifest_reader.get_or_init(|| ms).clone())
    }

    /// Records confirmed damage of a committed segment in the manifest, so
    /// every reader skips it (and says why) until a repair re-uploads it.
    /// Lost unless an intact local copy is still on disk here. Failures
    /// (fenced, store down) are logged: the lookup still reports the
    /// segment as unreadable.
    async fn mark_damaged(
        &self,
        m: &crate::pipeline::ManifestHandle,
        entry: &SegmentEntry,
        why: &str,
    ) {
        let sh = self.sh();
        let local = sh
            .seg_dir
            .join(crate::segment::sealed::sealed_file_name(entry.id));
        let lost = !std::fs::read(&local).is_ok_and(|b| entry.matches_bytes(&b));
        let mut g = m.writer.lock().await;
        let Some(w) = g.as_mut() else {
            tracing::error!(
                segment = entry.id.0,
                reason = why,
                "committed segment is damaged; not marked in the manifest (ownership not taken)"
            );
            return;
        };
        let note = DamageNote::new(entry, why, lost, w.store().now_ms());
        if lost {
            tracing::error!(segment = entry.id.0, key = %entry.key, reason = why, "committed segment is damaged and no local copy is held: its entries are LOST unless a copy is found; marked in the manifest");
        } else {
            tracing::error!(segment = entry.id.0, key = %entry.key, reason = why, "committed segment is damaged; a local copy is held (tierindex reconcile --repair re-uploads it); marked in the manifest");
        }
        match w.mark_damaged(note).await {
            Ok(_) => sh.metrics.remote_damage_marked.inc(),
            Err(Error::Fenced(why)) => {
                let _ = sh.note_fenced(why);
            }
            Err(e) => {
                tracing::warn!(segment = entry.id.0, error = %e, "could not mark the damage in the manifest");
            }
        }
    }
}

/// A committed segment as listed by [`TierIndex::remote_list`].
struct Listed {
    /// What the list says of the segment.
    meta: crate::segment::SealedMeta,
    /// Its object key, or why the manifest's entry does not give one.
    key: std::result::Result<object_store::path::Path, String>,
    /// Its manifest entry (`manifest = true`).
    entry: Option<crate::remote::manifest::SegmentEntry>,
    /// The manifest's damage note on it, if any: reported, never read.
    damage: Option<String>,
}
