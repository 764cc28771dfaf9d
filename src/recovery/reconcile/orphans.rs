//! Rule 4: objects no view references, and the one deletion the reconciler
//! makes (an object this data directory provably wrote for a segment it set
//! aside).

use super::*;

/// What rule 4 needs to judge one listed object.
pub(super) struct OrphanCtx<'a> {
    pub(super) store: &'a RemoteStore,
    pub(super) cfg: &'a Config,
    pub(super) opts: &'a ReconcileOptions,
    pub(super) seg_dir: &'a FsPath,
    /// The journal read before and after the LIST.
    pub(super) views: [&'a JournalView; 2],
    pub(super) m_entries: &'a BTreeMap<SegmentId, SegmentEntry>,
    /// The manifest's version when one exists now.
    pub(super) manifest_version: Option<u64>,
    pub(super) now: u64,
    pub(super) grace_ms: u64,
}

/// What to tell an operator about an object no view references.
pub(super) const UNKNOWN_ORIGIN_ADVICE: &str = "never deleted: no journal record of this data directory \
     names this key, so it is of unknown origin and may hold the only copy of acknowledged \
     entries. If another data directory writes this stream to this store, give each its own \
     stream (and turn on manifest = true, which refuses a second live writer); if this data \
     directory was lost or re-created, keep the object: `tierindex lookup --remote` and \
     `inspect` can still read it";

/// Rule 4 for one listed object of this stream's key layout. `None` when a
/// view references it (nothing to say).
///
/// The deletion rule: an object is deleted only when every one of these
/// holds, each of which is named in the finding's action:
/// - the manifest is on (`cfg.manifest`) and exists: single-writer mode
///   never deletes an object;
/// - the journal of this data directory records the segment as
///   `Quarantined` (never committed, never driven again) with exactly this
///   key as its upload attempt and the same CRC: we wrote (or tried to
///   write) it;
/// - the manifest does not list the segment id at all;
/// - it is older than the grace period;
/// - an intact local copy (recorded length and CRC) exists and the object's
///   bytes equal it (full read): the object is not the only copy of anything.
///
/// Everything else is reported and kept: objects of unknown origin, of
/// another seal of an id (another data directory), and every segment the
/// journal or the manifest references (pending ones are the pipeline's).
pub(super) async fn judge_unreferenced(ctx: &OrphanCtx<'_>, o: &Listed) -> Option<Finding> {
    let k = o.key.to_string();
    let [before, after] = ctx.views;
    let rec = after.get(o.id).or_else(|| before.get(o.id));
    let same_bytes = |r: &SegmentRecord| r.meta.key_sum() == o.sum;
    let in_manifest = ctx.m_entries.get(&o.id);
    if in_manifest.is_some_and(|e| e.key_sum() == o.sum) {
        return None;
    }
    if let Some(r) = rec.filter(|r| same_bytes(r)) {
        let quarantined_attempt =
            r.state == SegmentState::Quarantined && r.key.as_deref() == Some(k.as_str());
        if !quarantined_attempt {
            // Sealed .. Released: the journal references it (a pending one
            // is the pipeline's, which compares before it uploads).
            return None;
        }
        return Some(judge_abandoned(ctx, o, r, in_manifest.is_some()).await);
    }
    // Also referenced when the other journal read knows these bytes.
    if [before, after]
        .iter()
        .any(|v| v.get(o.id).is_some_and(&same_bytes))
    {
        return None;
    }
    let age = ctx.now.saturating_sub(o.modified_ms);
    let mut f = Finding::new(
        FindingKind::Orphan,
        Some(o.id),
        &k,
        format!(
            "in neither the journal nor the manifest; {} bytes, last modified {age} ms ago",
            o.size
        ),
    );
    let max = after.max_segment_id().max(before.max_segment_id());
    if let Some(r) = rec {
        f.detail = format!(
            "{}; this data directory's journal records segment {} with checksum {} ({:?}): \
             this object is another seal of the id, not ours",
            f.detail,
            o.id,
            r.meta.key_sum(),
            r.state
        );
    } else if ctx.manifest_version.is_none() && max.is_some_and(|m| o.id <= m) {
        f.informational = true;
        f.action = "kept: no manifest, and the id is at or below the journal's highest id: \
                    probably one of ours whose Released record compaction dropped (an object of \
                    another data directory on this stream looks the same); never deleted"
            .into();
        return Some(f);
    } else if let Some(m) = max.filter(|m| o.id <= *m) {
        f.detail = format!(
            "{}; its id is at or below the journal's highest id ({m}), which no longer records \
             it (compaction drops Released records) and it did not pass the checks of a \
             segment to commit again (footer, length)",
            f.detail
        );
    } else {
        f.detail = format!(
            "{}; this data directory's journal never recorded segment {}",
            f.detail, o.id
        );
    }
    if age < ctx.grace_ms {
        f.informational = true;
        f.action = format!(
            "kept: younger than the grace period ({} ms), may be in flight; {UNKNOWN_ORIGIN_ADVICE}",
            ctx.grace_ms
        );
    } else {
        f.action = format!("kept: {UNKNOWN_ORIGIN_ADVICE}");
    }
    Some(f)
}

/// Rule 4 for the object of one of our own Quarantined segments: deleted
/// only with the full proof (see [`judge_unreferenced`]).
pub(super) async fn judge_abandoned(
    ctx: &OrphanCtx<'_>,
    o: &Listed,
    r: &SegmentRecord,
    id_in_manifest: bool,
) -> Finding {
    let k = o.key.to_string();
    let age = ctx.now.saturating_sub(o.modified_ms);
    let reason = r.reason.as_deref().unwrap_or("no reason recorded");
    let mut f = Finding::new(
        FindingKind::AbandonedUpload,
        Some(o.id),
        &k,
        format!(
            "journal: segment {} Quarantined ({reason}), upload attempt {} under exactly this \
             key; {} bytes, last modified {age} ms ago",
            o.id, r.attempt, o.size
        ),
    );
    f.informational = true;
    let keep = |f: &mut Finding, why: String| f.action = format!("kept: {why}");
    if !ctx.cfg.manifest {
        keep(
            &mut f,
            "single-writer mode (manifest = false) never deletes objects".into(),
        );
        return f;
    }
    let Some(version) = ctx.manifest_version else {
        keep(
            &mut f,
            "no manifest to prove the segment was never committed".into(),
        );
        return f;
    };
    if id_in_manifest {
        keep(
            &mut f,
            format!(
                "manifest version {version} lists segment {} (another CRC)",
                o.id
            ),
        );
        return f;
    }
    if age < ctx.grace_ms {
        keep(
            &mut f,
            format!("younger than the grace period ({} ms)", ctx.grace_ms),
        );
        return f;
    }
    if !ctx.opts.repair {
        f.informational = false;
        f.action = "none (--repair deletes it once its bytes are proved equal to the intact \
                    local copy)"
            .into();
        return f;
    }
    let local = ctx.seg_dir.join(sealed_file_name(o.id));
    if upload::put::read_checked(&local, &r.meta).await.is_err() {
        f.informational = false;
        keep(
            &mut f,
            format!(
                "no intact local copy at {}: the object may hold the only copy of its entries; \
                 an operator decides",
                local.display()
            ),
        );
        return f;
    }
    match upload::verify_segment(ctx.store, &o.key, &r.meta, VerifyLevel::Full).await {
        Ok(()) => {}
        Err(e) => {
            f.informational = false;
            keep(
                &mut f,
                format!("its bytes could not be proved equal to the local copy ({e})"),
            );
            return f;
        }
    }
    // The pipeline never drives a Quarantined segment again, so this holds
    // in process too.
    match delete(ctx.store, ctx.cfg, &o.key).await {
        Ok(()) => {
            f.informational = false;
            f.deleted = true;
            f.action = format!(
                "deleted. Proof: the journal of this data directory records segment {} as \
                 Quarantined with upload attempt {} under exactly this key and checksum {}; \
                 manifest version {version} does not list the segment; older than the grace \
                 period ({} ms); its bytes equal the intact local copy {}, which is kept",
                o.id,
                r.attempt,
                o.sum,
                ctx.grace_ms,
                local.display()
            );
        }
        Err(e) => {
            f.informational = false;
            f.action = format!("delete failed: {e}");
        }
    }
    f
}


impl Run<'_> {
    /// Rule 4: objects no view references, and our own abandoned uploads;
    /// foreign objects are reported, never deleted. The journal is read
    /// again now, after the LIST: an object uploaded between the first
    /// read and the LIST has its `Uploading` record (journaled before any
    /// PUT) in this one, so a live pipeline's fresh upload is never taken
    /// for an orphan. Both reads count (compaction may have dropped a
    /// Released record in between). `manifest_now`: a manifest exists
    /// (read before, or written by this run); `now`: the time ages are
    /// judged at.
    pub(super) async fn unreferenced(&mut self, manifest_now: bool, now: u64) -> Result<()> {
        let (view_after, _) = Journal::open_read_only(&self.cfg.data_dir)?;
        let manifest_version = if manifest_now {
            self.ms_read.load().await.ok().flatten().map(|m| m.version)
        } else {
            None
        };
        let ctx = OrphanCtx {
            store: self.store,
            cfg: self.cfg,
            opts: self.opts,
            seg_dir: &self.seg_dir,
            views: [&self.view, &view_after],
            m_entries: &self.m_entries,
            manifest_version,
            now,
            grace_ms: grace_ms(self.opts),
        };
        // Rule 2d judged these (released segments the manifest lost):
        // not reported twice.
        let judged: BTreeSet<String> = self
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::ManifestLostEntries)
            .map(|f| f.key.clone())
            .collect();
        for o in self.ours.values() {
            if judged.contains(&o.key.to_string()) {
                continue;
            }
            if let Some(f) = judge_unreferenced(&ctx, o).await {
                self.findings.push(f);
            }
        }
        for m in &self.foreign {
            let mut f = Finding::new(
                FindingKind::Foreign,
                None,
                m.location.as_ref(),
                format!(
                    "{} bytes; not a segment key of stream {:?}",
                    m.size, self.stream
                ),
            );
            f.informational = true;
            f.action = "kept: foreign objects are never deleted".into();
            self.findings.push(f);
        }
        Ok(())
    }
}
