//! One reconcile run: the views read once ([`Run::load`]), the state the
//! rules share (findings, what is known bad, what to write to the
//! manifest), the manifest writes the rules asked for, and the report.
//! Each rule is a method of [`Run`] in its own file; `reconcile_with`
//! calls them in rule order.

use super::*;

pub(super) struct Run<'a> {
    pub(super) store: &'a RemoteStore,
    pub(super) cfg: &'a Config,
    pub(super) opts: &'a ReconcileOptions,
    pub(super) stream: &'a str,
    pub(super) seg_dir: std::path::PathBuf,
    /// The journal, read before the LIST.
    pub(super) view: JournalView,
    pub(super) prefix: Path,
    pub(super) listed_objects: usize,
    /// Size of every listed object, by key (updated as repairs put them).
    pub(super) sizes: BTreeMap<String, u64>,
    /// Listed objects that parse as this stream's segment keys.
    pub(super) ours: BTreeMap<String, Listed>,
    /// Everything else under the prefix.
    pub(super) foreign: Vec<ObjectMeta>,
    pub(super) ms_read: ManifestStore,
    pub(super) manifest: Option<crate::remote::manifest::Manifest>,
    /// The manifest's entries (and, after a commit, the ones committed).
    pub(super) m_entries: BTreeMap<SegmentId, SegmentEntry>,
    pub(super) manifest_segments: usize,
    pub(super) findings: Vec<Finding>,
    /// Keys already checked (rule 1).
    pub(super) checked: BTreeSet<String>,
    /// Keys whose object is known wrong and was not repaired.
    pub(super) bad: BTreeSet<String>,
    /// Entries to commit, with the indexes of the findings the commit
    /// resolves (rules 2 and 3).
    pub(super) to_commit: Vec<SegmentEntry>,
    pub(super) commit_findings: Vec<usize>,
    /// Damage notes to clear and to add, with the indexes of the findings
    /// they resolve (damage notes).
    pub(super) clears: Vec<SegmentId>,
    pub(super) marks: Vec<DamageNote>,
    pub(super) note_findings: Vec<usize>,
    /// Losses to accept (`ReconcileOptions::accept_loss`): id and key,
    /// with the indexes of the findings the acceptance resolves.
    pub(super) accepts: Vec<(SegmentId, String)>,
    pub(super) accept_findings: Vec<usize>,
    /// Committed segments the manifest lost whose object and local copy
    /// are gone too (rule 2a, `list_lost`): each committed again with its
    /// LOST note, with the indexes of the findings the listing resolves.
    pub(super) lost_listings: Vec<(SegmentEntry, DamageNote)>,
    pub(super) lost_listing_findings: Vec<usize>,
}

impl<'a> Run<'a> {
    /// Read the three views: the journal, the LIST of the segments prefix,
    /// the manifest (read only, no probe: reads do not depend on it).
    pub(super) async fn load(
        cfg: &'a Config,
        store: &'a RemoteStore,
        opts: &'a ReconcileOptions,
    ) -> Result<Run<'a>> {
        let stream = cfg.stream.as_str();
        let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
        // A journal whose keys name another stream (an IDENTITY copied from
        // another data directory): its repairs would write this data
        // directory's segments into that stream.
        if !cfg.store_override {
            crate::identity::journal_keys_name_the_stream(
                &cfg.data_dir,
                stream,
                view.segments(),
            )?;
        }
        let seg_dir = cfg.data_dir.join(datadir::SEGMENTS_DIR);

        let prefix = store.segments_prefix(stream)?;
        let listed = list(store, cfg, &prefix).await?;
        let listed_objects = listed.len();
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        let mut ours: BTreeMap<String, Listed> = BTreeMap::new();
        let mut foreign: Vec<ObjectMeta> = Vec::new();
        for m in listed {
            sizes.insert(m.location.to_string(), m.size);
            match keys::parse_segment_key(store.prefix(), &m.location) {
                Some((s, id, sum)) if s == stream => {
                    let modified_ms =
                        u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0);
                    ours.insert(
                        m.location.to_string(),
                        Listed {
                            key: m.location.clone(),
                            id,
                            sum,
                            size: m.size,
                            modified_ms,
                        },
                    );
                }
                _ => foreign.push(m),
            }
        }

        let ms_read = ManifestStore::reader(store, stream, cfg.manifest_options())?;
        let manifest = ms_read.load().await?;
        let mut m_entries: BTreeMap<SegmentId, SegmentEntry> = BTreeMap::new();
        if let Some(m) = &manifest {
            for e in ms_read.all_segments(m).await? {
                m_entries.insert(e.id, e);
            }
        }
        let manifest_segments = m_entries.len();
        Ok(Run {
            store,
            cfg,
            opts,
            stream,
            seg_dir,
            view,
            prefix,
            listed_objects,
            sizes,
            ours,
            foreign,
            ms_read,
            manifest,
            m_entries,
            manifest_segments,
            findings: Vec::new(),
            checked: BTreeSet::new(),
            bad: BTreeSet::new(),
            to_commit: Vec::new(),
            commit_findings: Vec::new(),
            clears: Vec::new(),
            marks: Vec::new(),
            note_findings: Vec::new(),
            accepts: Vec::new(),
            accept_findings: Vec::new(),
            lost_listings: Vec::new(),
            lost_listing_findings: Vec::new(),
        })
    }

    /// Whether the object under `k` is listed with `len` bytes and not
    /// known wrong.
    pub(super) fn object_ok(&self, k: &str, len: u64) -> bool {
        self.sizes.get(k) == Some(&len) && !self.bad.contains(k)
    }

    /// A manifest entry's object found missing or wrong (`kind`): repaired
    /// from the journal's local copy of the segment (`repair_object`), or,
    /// without one, a LOST finding (nothing deleted to get past it).
    /// `present`: an object is listed under the key.
    pub(super) async fn repair_from_local(
        &self,
        kind: FindingKind,
        e: &SegmentEntry,
        key: &Path,
        present: bool,
        detail: String,
    ) -> Finding {
        match journal_copy(&self.view, e) {
            Some(r) => {
                repair_object(
                    self.store,
                    self.cfg,
                    self.opts,
                    &self.seg_dir,
                    kind,
                    key,
                    &r.meta,
                    present,
                    detail,
                )
                .await
            }
            None => {
                let mut f = Finding::new(kind, Some(e.id), &e.key, detail);
                // A file under the segment's name the journal does not
                // record (its record compacted away, or a journal rebuilt)
                // may be these very bytes: not LOST, so never marked or
                // accepted as lost while it is there (helper-79 F2).
                if let Some(local) = local_files_named(&self.seg_dir, e.id).first() {
                    f.action = format!(
                        "not judged: the journal records no local copy of these bytes, but {} \
                         exists; `tierindex inspect` it: if it is this segment ({} bytes, \
                         checksum {}), it is the copy to restore the object from (put it under \
                         the key); nothing deleted, nothing marked",
                        local.display(),
                        e.file_len,
                        e.key_sum()
                    );
                    return f;
                }
                f.lost = true;
                f.action = format!(
                    "LOST: the journal holds no local copy of these bytes; its {} entries, \
                     offsets {}..={}, are in no copy this data directory holds; nothing deleted",
                    e.item_count, e.min_offset, e.max_offset
                );
                f
            }
        }
    }

    /// Write what the rules asked of the manifest (damage notes first,
    /// then commits) through `access`, and put the outcome in the findings
    /// it resolves. Returns whether a manifest exists now.
    pub(super) async fn write_manifest(&mut self, access: &dyn ManifestAccess) -> bool {
        let mut manifest_now = self.manifest.is_some();
        if !self.clears.is_empty() || !self.marks.is_empty() {
            let (action, ok) = match access.notes(&self.clears, &self.marks).await {
                Ok(a) => (a, true),
                Err(why) => (why, false),
            };
            for i in &self.note_findings {
                if let Some(f) = self.findings.get_mut(*i) {
                    f.action = format!("{}; {action}", f.action);
                    if !f.lost {
                        f.repaired = ok;
                    }
                }
            }
        }
        if !self.to_commit.is_empty() {
            let (action, ok) = match access.commit(&self.to_commit).await {
                Ok(a) => (a, true),
                Err(why) => (why, false),
            };
            for i in &self.commit_findings {
                if let Some(f) = self.findings.get_mut(*i) {
                    f.action = action.clone();
                    f.repaired = ok;
                }
            }
            if ok {
                manifest_now = true;
                for e in std::mem::take(&mut self.to_commit) {
                    self.m_entries.insert(e.id, e);
                }
            }
        }
        if !self.lost_listings.is_empty() {
            // Listed first, then marked: a crash between the two leaves an
            // entry without its object, which the next run marks LOST (a
            // listed LOST segment without a note), and which readers skip
            // as damaged meanwhile. Never listed without the note's write
            // being tried.
            let (entries, notes): (Vec<SegmentEntry>, Vec<DamageNote>) =
                std::mem::take(&mut self.lost_listings).into_iter().unzip();
            let (action, listed, ok) = match access.commit(&entries).await {
                Ok(listed) => match access.notes(&[], &notes).await {
                    Ok(marked) => (format!("{listed}; {marked}"), true, true),
                    Err(why) => (format!("{listed}; {why}"), true, false),
                },
                Err(why) => (why, false, false),
            };
            for i in &self.lost_listing_findings {
                if let Some(f) = self.findings.get_mut(*i) {
                    f.action = format!("{}: {action}", f.action);
                    f.repaired = ok;
                }
            }
            if listed {
                manifest_now = true;
                for e in entries {
                    self.m_entries.insert(e.id, e);
                }
            }
            if !ok {
                // Not marked: nothing to accept on.
                let ids: BTreeSet<SegmentId> = notes.iter().map(|n| n.id).collect();
                self.accepts.retain(|(id, _)| !ids.contains(id));
            }
        }
        if !self.accepts.is_empty() {
            // The proof, read again right before it is written: each object
            // is asked for directly (a HEAD, then a full read of one of the
            // recorded size), not judged by the listing alone, which may lag
            // (helper-79). Whole now, or no answer: not accepted.
            let fetcher = Fetcher::new(
                self.store.clone(),
                self.cfg.upload_config().retry_policy(),
                crate::remote::fetch::REMOTE_INDEX_CACHE_BYTES,
            );
            let mut proven = Vec::new();
            let mut refused: Vec<(SegmentId, String)> = Vec::new();
            for (id, key) in std::mem::take(&mut self.accepts) {
                let Some(e) = self.m_entries.get(&id).filter(|e| e.key == key) else {
                    refused.push((id, "the manifest does not list it under this key".into()));
                    continue;
                };
                let seg = match RemoteSegment::from_entry(e) {
                    Ok(s) => s,
                    Err(err) => {
                        refused.push((id, err.to_string()));
                        continue;
                    }
                };
                match fetcher.confirm_damage(&seg).await {
                    Ok(Some(_)) => proven.push((id, key)),
                    Ok(None) => refused.push((id, "its object reads whole now".into())),
                    Err(err) => refused.push((id, format!("the store did not answer ({err})"))),
                }
            }
            for (id, why) in &refused {
                for i in &self.accept_findings {
                    if let Some(f) = self.findings.get_mut(*i)
                        && f.segment == Some(id.0)
                    {
                        f.action = format!("{}; loss not accepted: {why}", f.action);
                    }
                }
            }
            self.accept_findings.retain(|i| {
                self.findings
                    .get(*i)
                    .and_then(|f| f.segment)
                    .is_some_and(|s| proven.iter().any(|(id, _)| id.0 == s))
            });
            self.accepts = proven;
        }
        if !self.accepts.is_empty() {
            let (action, ok) = match access
                .accept_losses(&self.accepts, &self.opts.accept_reason)
                .await
            {
                Ok(a) => (a, true),
                Err(why) => (why, false),
            };
            for i in &self.accept_findings {
                if let Some(f) = self.findings.get_mut(*i) {
                    f.action = format!("{}; {action}", f.action);
                    f.accepted_loss = ok;
                }
            }
        }
        manifest_now
    }

    /// The report, with rule 5's line.
    pub(super) fn report(self, multipart_uploads: String) -> ReconcileReport {
        let findings = self.findings;
        let repaired = findings.iter().filter(|f| f.repaired).count();
        let deleted = findings.iter().filter(|f| f.deleted).count();
        let unresolved = findings.iter().filter(|f| f.unresolved()).count();
        let lost = findings
            .iter()
            .filter(|f| f.lost && !f.accepted_loss)
            .count();
        let accepted_losses = findings
            .iter()
            .filter(|f| f.lost && f.accepted_loss)
            .count();
        ReconcileReport {
            store: self.store.display_url().to_string(),
            stream: self.stream.to_string(),
            repair: self.opts.repair,
            deep: self.opts.deep,
            grace_ms: grace_ms(self.opts),
            journal_segments: self.view.segments().len(),
            listed_objects: self.listed_objects,
            manifest_present: self.manifest.is_some(),
            manifest_segments: self.manifest_segments,
            findings_total: findings.len(),
            repaired,
            deleted,
            unresolved,
            lost,
            accepted_losses,
            multipart_uploads,
            findings,
        }
    }
}

/// The grace period in milliseconds.
pub(super) fn grace_ms(opts: &ReconcileOptions) -> u64 {
    u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX)
}

/// Files that may hold segment `id`'s bytes though the journal records no
/// copy: `segments/<id>.seg` and anything in the data directory's
/// `quarantine/` whose name starts with the id (where tierindex moves
/// sealed files and never deletes them; helper-80 F2: a loss was accepted
/// over an intact copy there). `seg_dir` is the data directory's
/// `segments/`.
pub(super) fn local_files_named(seg_dir: &FsPath, id: SegmentId) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let own = seg_dir.join(sealed_file_name(id));
    if std::fs::symlink_metadata(&own).is_ok() {
        out.push(own);
    }
    let prefix = format!("{:020}", id.0);
    if let Some(q) = seg_dir.parent().map(|d| d.join(crate::datadir::QUARANTINE_DIR))
        && let Ok(rd) = std::fs::read_dir(&q)
    {
        // Bounded: a quarantine holds what an operator left there.
        for e in rd.flatten().take(100_000) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && !name.ends_with(".json") {
                out.push(e.path());
            }
        }
    }
    out
}
