//! Opening a data directory for the pipeline: lock, journal, segments,
//! ownership of the stream's manifest (shared by [`TierIndex`] and the
//! standalone `drain`), and the clean-shutdown marker.

use crate::remote::manifest::HostLeases;
use crate::remote::{ListedSegment, ListedSegments};
use super::*;

/// Open the store named by the config.
pub fn open_store(cfg: &Config) -> Result<RemoteStore> {
    RemoteStore::from_url(&cfg.store_url()?, &cfg.store_options())
}

/// Open data directory, journal, writer; reconcile; no background tasks.
/// Shared by [`TierIndex`] and the standalone `drain`.
#[cfg(any(test, feature = "testing"))]
pub async fn open_shared(cfg: &Config, store: RemoteStore) -> Result<(Arc<Shared>, OpenReport)> {
    open_shared_with_clock(cfg, store, Arc::new(SystemClock)).await
}

/// Probe the store and take the stream's manifest for this owner.
/// Returns the writer and whether creates are conditional.
///
/// `committed`: segments this data directory's journal records as
/// committed to the stream's manifest (`Committed` or `Released`), counted
/// when its IDENTITY recorded manifest mode before this open. With any, a
/// store that has no manifest for the stream is refused before anything is
/// written there: it is not the store they were committed to, or it lost
/// them (a typo in the URL, an emptied or unmounted `file://` directory,
/// another bucket). Taking it would start a new manifest at epoch 1, and
/// the broker would report everything committed while the store holds
/// none of it.
pub(super) async fn take_manifest(
    cfg: &Config,
    store: &RemoteStore,
    clock: Arc<dyn Clock>,
    committed: usize,
    check: &SingleWriterCheck<'_>,
    leases: Option<&HostLeases>,
) -> Result<(ManifestWriter, crate::pipeline::StoreTrust)> {
    let owner = cfg.effective_owner_id()?;
    // Checked first: the probe writes (and removes) objects of its own.
    let exists = manifest_exists(cfg, store, clock.clone()).await?;
    if !exists {
        match refuse_beside_a_recent_single_writer(cfg, store, clock.as_ref(), check).await {
            // Deferred from open: the broker runs. Waiting does not make
            // the other broker go (helper-86 F2: retried as a store error,
            // segments pending, exit 3): stopped like a fenced owner,
            // loudly; nothing committed or deleted, local copies kept.
            Err(Error::Claimed(why)) if check.deferred => {
                tracing::error!(
                    stream = cfg.stream,
                    "the stream's manifest cannot be taken: {why}"
                );
                return Err(Error::Fenced(format!(
                    "the stream's manifest cannot be taken by this process: ownership \
                     refused: {why}"
                )));
            }
            r => r?,
        }
    }
    if committed > 0 && !exists {
        return Err(Error::InvalidInput(format!(
            "the store {} has no manifest for stream {:?}, but the journal in {} records {} \
             segment(s) committed to that stream's manifest: this is not the store they were \
             committed to, or it lost them (a typo in the store URL or endpoint, another \
             bucket or prefix, an emptied or unmounted store directory). The stream was not \
             taken and nothing was committed there. Check the store URL, and the stream name \
             if it was changed (with --store-override). If it is the right \
             store and it lost them, `tierindex reconcile --data-dir {}` lists what is \
             missing and `tierindex reconcile --repair` re-uploads the local copies still \
             held and rebuilds the manifest from them. Entries whose local copies were \
             released are lost with the store: to go on without them, \
             `tierindex --data-dir {} owner take` starts a new manifest there (the segments \
             stay reported as missing by `verify` and `status --remote`)",
            store.display_url(),
            cfg.stream,
            cfg.data_dir.display(),
            committed,
            crate::remote::url::shell_quoted(&cfg.data_dir.display().to_string()),
            crate::remote::url::shell_quoted(&cfg.data_dir.display().to_string()),
        )));
    }
    let caps = if cfg.probe_store {
        let limit = Duration::from_millis(cfg.request_timeout_ms).max(Duration::from_secs(1)) * 2;
        match tokio::time::timeout(limit, crate::remote::probe::probe_shared(store)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::RemoteRetryable(format!(
                    "manifest = true needs the store capability probe, which failed: {e}"
                )));
            }
            Err(_) => {
                return Err(Error::RemoteRetryable(
                    "manifest = true needs the store capability probe, which timed out".into(),
                ));
            }
        }
    } else if !cfg.allow_unconditional_store {
        // Not probed: nothing shows that creates are conditional, which
        // the manifest needs to fence a second writer. Said as it is (the
        // manifest's own refusal speaks of a probe that saw an overwrite).
        return Err(Error::InvalidInput(format!(
            "probe_store = false with the remote manifest (on by default) for stream {:?}: \
             the manifest fences a second writer only on a store whose conditional creates \
             the probe has proven, so it refuses to open unprobed. Turn the probe back on \
             (remove probe_store = false), or choose single-writer mode explicitly with \
             manifest = false (nothing fences a second writer; see docs/crash-safety.md \
             \"Single-writer mode\"), or set allow_unconditional_store = true (the manifest \
             without fencing, under the same condition)",
            cfg.stream
        )));
    } else {
        // Not probed, and allowed: assume the worst (creates not
        // conditional), with the manifest kept but not fencing.
        tracing::warn!("probe_store = false: assuming the store ignores conditional creates");
        crate::remote::probe::Capabilities::default()
    };
    let ms =
        ManifestStore::with_capabilities(store, &cfg.stream, cfg.manifest_options(), &caps, clock)?;
    let writer = ms
        .take_ownership_hosted(&owner, cfg.lease_ttl(), leases)
        .await?;
    // From now on this data directory's committed segments are the
    // manifest's (see `committed` above). Best effort: without the marker
    // the check is only not armed.
    // A refusal recorded by an earlier deferred take is over.
    let refused = cfg.data_dir.join(super::FIRST_TAKE_REFUSED_MARKER);
    if refused.exists()
        && let Err(e) = crate::durable::unlink(&refused).and_then(|()| {
            std::fs::File::open(&cfg.data_dir).and_then(|d| d.sync_all())
        })
    {
        tracing::warn!(error = %e, "could not remove the first-take refusal marker");
    }
    if !cfg.data_dir.join(super::MANIFEST_TAKEN_MARKER).exists()
        && let Err(e) = write_marker(
            &cfg.data_dir,
            super::MANIFEST_TAKEN_MARKER,
            "the stream's manifest was taken\n",
            "write manifest-taken marker",
        )
    {
        tracing::warn!(error = %e, "could not record that the manifest was taken");
    }
    tracing::info!(
        owner,
        epoch = writer.epoch(),
        stream = cfg.stream,
        "took ownership of the stream's manifest"
    );
    Ok((writer, crate::pipeline::StoreTrust::of(&caps)))
}

/// What the first take of a stream's manifest checks the stream's
/// segment objects against (see [`refuse_beside_a_recent_single_writer`]).
pub(super) struct SingleWriterCheck<'a> {
    /// The journal's highest id at open: objects at or below it are not
    /// listed (this data directory's, or not told from them: compaction
    /// drops the records of released segments).
    pub above: Option<crate::segment::SegmentId>,
    /// Keeps the listed objects this data directory's journal, read when
    /// it is called (after the listing), has no record of under that id
    /// and key ([`keep_foreign`]).
    pub foreign: &'a (dyn Fn(&mut Vec<ListedSegment>) + Send + Sync),
    /// The take was deferred from open (the store did not answer then):
    /// this data directory has been uploading meanwhile, a refusal stops
    /// the run like a fence, and a listing past its budget is retried.
    pub deferred: bool,
}

/// Keeps the listed segment objects `journal` has no record of under
/// their id and key (the key names the file's checksum): not this data
/// directory's. Its own are all recorded: it journals a segment's seal,
/// with the checksum, before uploading it, and drops a record only once
/// released, after a manifest commit.
pub(super) fn keep_foreign(
    journal: &crate::journal::JournalState,
    objects: &mut Vec<ListedSegment>,
) {
    objects.retain(|o| {
        journal
            .get(o.id)
            .is_none_or(|r| r.meta.key_sum() != o.sum)
    });
}

/// The manifest mode's first take of a stream beside a single-writer
/// broker (helper-81 F1: a default-mode broker started beside a running
/// `manifest = false` broker of the same stream was not refused; both
/// exited 0, and the new manifest hid every entry of the other from the
/// stream's readers). A single-writer broker holds no lease; what it
/// leaves is segment objects no manifest lists. With no manifest for the
/// stream, the objects above the highest id this data directory's journal
/// held at open (all of them for a new one) that its journal has no
/// record of under their key, the newest written within
/// `reconcile_grace_ms` of now, refuse the take; older ones are logged
/// (a single-writer broker that uploaded nothing for that long is not
/// seen: single-writer mode's documented risk). Judged by the journal's
/// records, not by id: a take deferred from open runs after this data
/// directory gave out ids of its own, which may pass the other broker's
/// (helper-86 F1), and the journal is read after the listing, so an
/// upload made meanwhile is known (helper-86 F6). One LIST, bounded.
async fn refuse_beside_a_recent_single_writer(
    cfg: &Config,
    store: &RemoteStore,
    clock: &dyn Clock,
    check: &SingleWriterCheck<'_>,
) -> Result<()> {
    let q = crate::remote::url::shell_quoted;
    // The way past, when the operator knows no single-writer broker
    // runs: `owner release` writes the stream's manifest with no owner
    // (whatever id it is given), and the broker's next open takes it (a
    // manifest exists: this check is not made). `owner take` would leave
    // a lease the broker's own id does not hold (helper-84 F1).
    let way_past = format!(
        "`tierindex owner release --owner-id operator --fence-live --store {} --stream {}` \
         writes the stream's manifest with no owner, which the broker's next start takes; \
         then `tierindex reconcile --repair` commits those of the other broker's objects \
         whose offsets overlap no entry the manifest lists, and names the others",
        q(store.display_url()),
        q(&cfg.stream)
    );
    // At open nothing was written; a deferred take's data directory
    // uploaded its own segments meanwhile (they stay pending).
    let written = if check.deferred {
        "no manifest was written, and this broker's segments stay pending with their local \
         files"
    } else {
        "nothing was written to the store"
    };
    // Bounded inside the take's own bound: a listing that does not finish
    // in time refuses rather than leaving the take to the background,
    // where it would go on without this check (helper-84 F3: a slow LIST
    // of 900,000 objects let a manifest start beside a live writer).
    let budget = cfg
        .manifest_options()
        .retry
        .request_timeout
        .max(Duration::from_secs(1))
        * 2;
    let mut objects = match tokio::time::timeout(
        budget,
        store.segments_listed_above(&cfg.stream, check.above),
    )
    .await
    {
        Ok(r) => r?,
        // Deferred: tried again later, with this check (the take waits).
        Err(_) if check.deferred => {
            return Err(Error::RemoteRetryable(format!(
                "stream {:?} has no manifest, and its segment objects could not be listed \
                 within {} ms to check that no broker in single-writer mode writes it",
                cfg.stream,
                budget.as_millis()
            )));
        }
        Err(_) => {
            return Err(Error::Claimed(format!(
                "stream {:?} in {} has no manifest, and its segment objects could not be \
                 listed within {} ms to check that no broker in single-writer mode (manifest = \
                 false) writes it; a manifest taken beside such a broker would hide its \
                 entries from the stream's readers. If none does, {way_past}; nothing was \
                 written to the store",
                cfg.stream,
                store.display_url(),
                budget.as_millis()
            )));
        }
    };
    // Read after the listing: an object listed is recorded by then.
    (check.foreign)(&mut objects);
    let listed = ListedSegments::of(&objects);
    if listed.count == 0 {
        return Ok(());
    }
    let now = clock.now_ms();
    let age_ms = now.saturating_sub(listed.newest_ms);
    let ids: Vec<u64> = listed.first_ids.iter().map(|i| i.0).collect();
    let more = if listed.count > ids.len() as u64 { ", ..." } else { "" };
    if age_ms >= cfg.reconcile_grace_ms {
        tracing::warn!(
            stream = cfg.stream,
            objects = listed.count,
            newest_age_s = age_ms / 1000,
            "the stream has no manifest but {} segment object(s) this data directory did not \
             write (lowest ids {ids:?}{more}): a single-writer broker (manifest = false) wrote \
             them earlier, or a manifest was lost. Starting the stream's manifest; readers see \
             their entries once `tierindex reconcile --repair` commits them",
            listed.count
        );
        return Ok(());
    }
    if check.deferred {
        // Kept for the next open (a supervisor's restart after this exit):
        // its check lists from here too (helper-90 F1).
        let text = match check.above {
            Some(a) => format!("above={}\n", a.0),
            None => "above=none\n".to_string(),
        };
        if let Err(e) = write_marker(
            &cfg.data_dir,
            super::FIRST_TAKE_REFUSED_MARKER,
            &text,
            "write first-take refusal marker",
        ) {
            tracing::error!(error = %e, "could not record the first-take refusal for the next open");
        }
    }
    Err(Error::Claimed(format!(
        "stream {:?} in {} has no manifest, but {} segment object(s) this data directory did \
         not write (lowest ids {ids:?}{more}), the newest written {} s ago by the store's \
         clock: a broker in single-writer mode (manifest = false) is most likely writing this \
         stream, and a manifest taken now would hide its entries from the stream's readers. \
         Run that broker in the default mode instead (`--manifest true --switch-mode`: it \
         then takes the stream's manifest, and this one is refused while it holds it), or \
         give this broker another stream. If no such broker runs any more: wait until its \
         newest object is older than reconcile_grace_ms ({} s), or {way_past}; {written}",
        cfg.stream,
        store.display_url(),
        listed.count,
        age_ms / 1000,
        cfg.reconcile_grace_ms / 1000,
    )))
}

/// Single-writer mode beside a broker that owns the stream through its
/// manifest (helper-51: two brokers, one of them configured with
/// `manifest = false`): the single writer's segments would never reach the
/// manifest its readers and the owner go by, and nothing would fence
/// either of them. A read (the newest manifest version and its lease,
/// bounded): a live lease of another owner refuses the open (`Claimed`),
/// naming the holder. No manifest, no lease, an expired one or our own
/// opens; a store that does not answer in time opens with a warning (the
/// single-writer mode's documented risk).
async fn refuse_beside_a_live_manifest_owner(cfg: &Config, store: &RemoteStore) -> Result<()> {
    // A store that did not answer one stream's check in this process is
    // not asked again for a minute: a host opening many streams on a store
    // that hangs would wait out each one's budget in turn (helper-57: 16 s
    // a stream).
    static UNANSWERED: std::sync::Mutex<Vec<(String, std::time::Instant)>> =
        std::sync::Mutex::new(Vec::new());
    const QUIET: Duration = Duration::from_secs(60);
    let url = store.display_url().to_string();
    {
        let mut u = UNANSWERED.lock().unwrap_or_else(|p| p.into_inner());
        u.retain(|(_, at)| at.elapsed() < QUIET);
        if u.iter().any(|(s, _)| *s == url) {
            tracing::warn!(stream = %cfg.stream, "single-writer mode: the store did not answer another stream's check for a live manifest owner in the last minute; opening without it");
            return Ok(());
        }
    }
    let unanswered = |why: &str| {
        tracing::warn!(stream = %cfg.stream, "single-writer mode: {why}; opening without checking for a live manifest owner");
        UNANSWERED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((url.clone(), std::time::Instant::now()));
        Ok(())
    };
    let limit = SINGLE_WRITER_CHECK_BUDGET;
    let read = async {
        let ms = ManifestStore::reader(store, &cfg.stream, cfg.manifest_options())?;
        let Some(m) = ms.load().await? else {
            return Ok(None);
        };
        Ok::<_, Error>(ms.current_lease(&m).await?.map(|c| (c, ms.now_ms())))
    };
    let (cur, now) = match tokio::time::timeout(limit, read).await {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return unanswered(&format!("could not read the stream's manifest: {e}")),
        Err(_) => {
            return unanswered(&format!(
                "the stream's manifest did not load in {} ms",
                limit.as_millis()
            ));
        }
    };
    let ours = cfg.effective_owner_id().ok();
    if ours.as_deref() == Some(cur.lease.owner.as_str()) || !cur.lease.is_live(now) {
        return Ok(());
    }
    Err(Error::Claimed(format!(
        "stream {:?} is owned through its manifest by {} (epoch {}, lease live for {} ms more): \
         a single-writer open (manifest = false) beside it would upload segments that owner \
         and the manifest's readers never see, and nothing would fence either writer. Stop \
         that broker and let its lease expire (or `tierindex owner release` it), or open this \
         data directory in manifest mode (the default) so that ownership is taken in turn",
        cfg.stream,
        cur.lease.owner,
        cur.lease.epoch,
        cur.lease.expires_ms.saturating_sub(now)
    )))
}

/// How long a single-writer open waits for the stream's manifest (its
/// check for a live owner) before it opens without the check.
const SINGLE_WRITER_CHECK_BUDGET: Duration = Duration::from_secs(3);

/// Whether the stream has a manifest in `store` (a read: listing and
/// reading its versions; nothing is written, so no capability is needed).
async fn manifest_exists(cfg: &Config, store: &RemoteStore, clock: Arc<dyn Clock>) -> Result<bool> {
    let caps = crate::remote::probe::Capabilities {
        conditional_create: true,
        ..Default::default()
    };
    ManifestStore::with_capabilities(store, &cfg.stream, cfg.manifest_options(), &caps, clock)?
        .exists()
        .await
}

/// Errors at open that mean "the store cannot be reached now" rather than
/// "this configuration or ownership is wrong": with these the index opens
/// without ownership and takes it later.
pub(super) fn store_unreachable(e: &Error) -> bool {
    matches!(e, Error::RemoteRetryable(_) | Error::Deadline(_))
}

/// As [`open_shared`] with the clock of the manifest lease.
#[cfg(any(test, feature = "testing"))]
pub async fn open_shared_with_clock(
    cfg: &Config,
    store: RemoteStore,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Shared>, OpenReport)> {
    open_shared_hosted(cfg, store, clock, None, None).await
}

/// As [`open_shared_with_clock`]; with `host`, the data directory is one
/// of the host's and locked through its lock; with `leases`, the stream's
/// lease is renewed by the host's lease in the store.
pub(super) async fn open_shared_hosted(
    cfg: &Config,
    store: RemoteStore,
    clock: Arc<dyn Clock>,
    host: Option<Arc<crate::lock::host::HostLock>>,
    leases: Option<Arc<HostLeases>>,
) -> Result<(Arc<Shared>, OpenReport)> {
    // Local recovery reads and checks files: on a blocking thread, never on
    // the caller's runtime thread (issue 16).
    let (dd, previous_shutdown_clean, journal, jrep, committed, (new_identity, new_incarnation)) = {
        let (cfg, url) = (cfg.clone(), store.display_url().to_string());
        type Opened = (
            DataDir,
            bool,
            Journal,
            ReplayReport,
            usize,
            (crate::identity::NewIdentity, Option<String>),
        );
        tokio::task::spawn_blocking(move || -> Result<Opened> {
            let (dd, identity, created) = DataDir::open_as(
                &cfg.data_dir,
                &cfg.stream,
                &url,
                cfg.endpoint.as_deref(),
                Some(crate::identity::Mode::of(cfg.manifest)),
                crate::identity::Overrides {
                    store: cfg.store_override,
                },
                host.as_ref(),
            )?;
            // Removed again if the open is refused from here on (before
            // `dd`, and with it the lock, is dropped).
            let new_identity = crate::identity::NewIdentity::new(&cfg.data_dir, created);
            let new_incarnation = created.then(|| identity.incarnation.clone());
            // A journal that existed and is gone: in single-writer mode the
            // journal alone records what was committed, and a new one would
            // give out ids the store already holds and forget segments
            // whose local copies were released (helper-82 F5: every
            // command exited 0, and `lookup --remote` found none of them).
            // With the manifest a new journal is safe (the manifest lists
            // what was committed; new ids continue above the store's), and
            // the loss is logged. Checked before the marker is removed: a
            // refusal keeps it, so the next open refuses too.
            if crate::datadir::journal_lost(&cfg.data_dir, CLEAN_SHUTDOWN_MARKER) {
                if !cfg.manifest {
                    return Err(Error::InvalidInput(format!(
                        "the journal of {} is missing (journal/journal.log; the clean-shutdown \
                         marker of the last run shows it existed): in single-writer mode (manifest = false) it alone \
                         records which segments were committed, and a new one would reuse \
                         segment ids the store holds and lose track of segments whose local \
                         copies were released. Restore journal/journal.log from a backup if \
                         there is one; otherwise `tierindex fsck --repair` rebuilds it from \
                         the local segment files (segments whose local copies were released \
                         stay known only to the store: `tierindex reconcile` lists them, never \
                         deleted, and new segment ids continue above them). Nothing was \
                         changed",
                        cfg.data_dir.display()
                    )));
                }
                tracing::error!(
                    data_dir = %cfg.data_dir.display(),
                    "the journal is missing (the last run's clean-shutdown marker shows it \
                     existed): starting a \
                     new one from the local segment files; the stream's manifest lists what \
                     was committed (`tierindex status --remote` and `tierindex reconcile` \
                     compare them)"
                );
            }
            let marker = cfg.data_dir.join(CLEAN_SHUTDOWN_MARKER);
            let previous_shutdown_clean = marker.exists();
            if previous_shutdown_clean {
                crate::durable::unlink(&marker)
                    .map_err(|e| Error::io(&marker, "remove clean-shutdown marker", e))?;
                fsync_dir(&cfg.data_dir)?;
            }
            // `open_as` fsynced the data directory after its tree existed.
            let (journal, jrep) = Journal::open_in_synced_dir(
                dd.lock(),
                JournalOptions {
                    compact_after_bytes: cfg.journal_compact_after_bytes,
                    ..JournalOptions::default()
                },
            )?;
            // Committed to a manifest before this open: the store must
            // still have one (see `take_manifest`). Only once this data
            // directory has taken one (its marker): a switch from
            // single-writer mode has committed segments before that.
            let committed = if identity.mode == Some(crate::identity::Mode::Manifest)
                && cfg.data_dir.join(super::MANIFEST_TAKEN_MARKER).exists()
            {
                journal
                    .segments()
                    .values()
                    .filter(|r| {
                        matches!(
                            r.state,
                            crate::journal::SegmentState::Committed
                                | crate::journal::SegmentState::Released
                        )
                    })
                    .count()
            } else {
                0
            };
            if !cfg.store_override {
                crate::identity::journal_keys_name_the_stream(
                    &cfg.data_dir,
                    &cfg.stream,
                    journal.segments(),
                )?;
            }
            // The recorded mode must match (or is recorded now): a data
            // directory that holds segments is not silently moved between
            // manifest and single-writer mode.
            // Whatever it ever held counts: compaction drops Released
            // records but keeps the highest id and offset.
            let holds_data = !journal.segments().is_empty()
                || journal.max_segment_id().is_some()
                || journal.max_offset().is_some()
                || dd.holds_segment_files()?;
            crate::identity::settle_mode(
                &cfg.data_dir,
                identity,
                cfg.manifest,
                cfg.switch_mode,
                holds_data,
            )?;
            Ok((
                dd,
                previous_shutdown_clean,
                journal,
                jrep,
                committed,
                (new_identity, new_incarnation),
            ))
        })
        .await
        .map_err(|e| Error::Internal(format!("open task failed: {e}")))??
    };
    // Only after the data directory is locked (`dd`): taking the stream
    // bumps the epoch, which fences whoever holds it (with the default owner
    // id, the previous incarnation of this data directory). Before the
    // writer opens: new segment ids continue above every id the manifest
    // lists, so a new owner on another data directory never reuses one.
    //
    // The store unreachable (down, timing out): open anyway, without
    // ownership. Appends, seals and uploads go on; the commit step (and the
    // lease task) take ownership once the store answers, and segments wait
    // at Verified, local files kept, until then. A live lease of another
    // owner (Claimed) or a store that cannot fence (no conditional creates)
    // still refuses the open: those need an operator, not patience.
    // The highest id this data directory ever gave out (compaction keeps
    // it): a stream without a manifest whose objects go above it has
    // another writer (see `refuse_beside_a_recent_single_writer`).
    let journal_max = journal.max_segment_id();
    // Where an earlier deferred take's refusing check started its listing
    // (`FIRST_TAKE_REFUSED_MARKER`): this open's starts there too.
    let journal_max = journal_max.min(refused_take_above(&cfg.data_dir));
    let foreign = |objects: &mut Vec<ListedSegment>| keep_foreign(journal.state(), objects);
    let (manifest, trust_create, probed) = if cfg.manifest {
        // Bounded: a store that hangs must not hold the broker's start
        // (with the defaults about 9 s: three manifest requests, each
        // bounded to fit the lease; then the take goes on in the background).
        let limit = cfg
            .manifest_options()
            .retry
            .request_timeout
            .max(Duration::from_secs(1))
            * 3;
        let taken =
            match tokio::time::timeout(limit, take_manifest(
                    cfg,
                    &store,
                    clock.clone(),
                    committed,
                    &SingleWriterCheck {
                        above: journal_max,
                        foreign: &foreign,
                        deferred: false,
                    },
                    leases.as_deref(),
                ))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(Error::Deadline(format!(
                    "taking ownership of the stream's manifest took longer than {} ms",
                    limit.as_millis()
                ))),
            };
        match taken {
            Ok((w, trust)) => (Some(ManifestHandle::new(w, cfg.lease_ttl())), trust, true),
            Err(e) if store_unreachable(&e) => {
                tracing::warn!(error = %e, "store unreachable at open: starting without manifest ownership; commits wait until it is taken");
                let (c, st, ck, hl) = (cfg.clone(), store.clone(), clock.clone(), leases.clone());
                let take = PendingTake {
                    // Given the journal when it runs: the listing starts
                    // above the journal's highest id at open, and each
                    // object listed is this data directory's only if the
                    // journal, read after the listing, records its id and
                    // key (it journals a seal before the upload). Its own
                    // ids given out since may pass another writer's: an id
                    // alone does not tell (helper-86 F1, F6; helper-84 F3:
                    // a deferred take skipped the check).
                    take: Box::new(move |journal| {
                        let (c, st, ck, hl) = (c.clone(), st.clone(), ck.clone(), hl.clone());
                        Box::pin(async move {
                            let foreign = move |objects: &mut Vec<ListedSegment>| {
                                keep_foreign(journal.read().state(), objects)
                            };
                            let check = SingleWriterCheck {
                                above: journal_max,
                                foreign: &foreign,
                                deferred: true,
                            };
                            take_manifest(&c, &st, ck, committed, &check, hl.as_deref()).await
                        })
                    }),
                    retry_at: std::time::Instant::now(),
                    failures: 0,
                    last_error: e.to_string(),
                };
                let owner = cfg.effective_owner_id()?;
                (
                    Some(ManifestHandle::pending(owner, cfg.lease_ttl(), take)),
                    crate::pipeline::StoreTrust::default(),
                    false,
                )
            }
            Err(e) => return Err(e),
        }
    } else {
        refuse_beside_a_live_manifest_owner(cfg, &store).await?;
        (None, crate::pipeline::StoreTrust::default(), false)
    };
    // From here on the stream may be taken: a refusal releases it again,
    // or its lease would keep the stream from its real owner (another
    // data directory, or this one fixed) until it expires (helper-58).
    let opened = async {
        let manifest_max = match &manifest {
            Some(m) => m
                .writer
                .lock()
                .await
                .as_ref()
                .and_then(|w| w.manifest().max_segment_id()),
            None => None,
        };
        let known = journal.max_segment_id().max(manifest_max);
        // Objects above every id the journal and the manifest know: another
        // incarnation of the stream (a lost and re-created data directory, a
        // restored backup, an earlier owner) uploaded them and may not have
        // committed them. New ids continue above those too, so no id (and no
        // key) is ever reused. Skipped while the take is pending (the store did
        // not answer; the take lists when it succeeds, see
        // `Shared::ensure_owner`). Not in single-writer mode: there the
        // reconciler tells another data directory's objects from ours by their
        // ids (another seal of an id the journal knows, or an id it never
        // recorded), and jumping above them would make them look like ours
        // whose records compaction dropped.
        let take_pending = match &manifest {
            Some(m) => m.writer.lock().await.is_none(),
            None => false,
        };
        // A single-writer data directory whose last run shut down cleanly
        // (it had a journal) and whose journal holds no id: lost and
        // rebuilt from local files that were all released (or a run that
        // never sealed). Its segments' objects may be in the store, and
        // new ids continue above them, or they would be given out again
        // (helper-84 F4: a second object under id 1). `journal/LINKED_BY`
        // is no evidence: every reopen writes it (helper-86 F4).
        let rebuilt_single_writer = !cfg.manifest && known.is_none() && previous_shutdown_clean;
        let listed_max = if take_pending || (!cfg.manifest && !rebuilt_single_writer) {
            known
        } else {
            listed_max_segment_id(cfg, &store, known).await
        };
        let epoch = match &manifest {
            Some(m) => m.writer.lock().await.as_ref().map(|w| w.epoch()),
            None => None,
        };
        let min_next = known
            .max(listed_max)
            .map(|m| crate::segment::SegmentId(m.0.saturating_add(1)))
            .max(epoch.map(crate::remote::manifest::epoch_id_floor));
        // Sealed files still to be uploaded (unknown to the journal, Sealed or
        // Uploading) get the full item check at start-up: damage is salvaged
        // before their bytes are journaled or uploaded.
        // The stream is taken (or the store unreachable, or single-writer
        // mode): the identity stays from here on.
        new_identity.keep();
        // Which data directory uses `segments/` and `journal/`, recorded
        // once a new identity stays (a refused first open writes no record).
        // A few small file operations: on a blocking thread, with `dd`
        // (and its lock) held.
        if let Some(inc) = new_incarnation {
            let root = dd.root().to_path_buf();
            let recorded =
                tokio::task::spawn_blocking(move || DataDir::record_user_at(&root, &inc)).await;
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "cannot record which data directory uses its directories");
            }
        }
        let index_cfg = cfg.index_config();
        // A damaged local copy of a committed segment is set aside without a
        // salvage only once the store is found to hold the segment's object
        // (known gap 13): asked here, for the damaged ones only.
        let store_check = Arc::new(CommittedCopyCheck::new(
            &store,
            &cfg.stream,
            take_pending,
        ));
        let check = store_check.clone();
        let (writer, seg_report, journal, reseal_notes) = tokio::task::spawn_blocking(move || {
            let (mut writer, mut seg_report) = {
                let to_upload = |id: crate::segment::SegmentId| {
                    journal.get(id).is_none_or(|r| {
                        matches!(
                            r.state,
                            SegmentState::Sealed | SegmentState::Uploading | SegmentState::Resealing
                        )
                    })
                };
                let committed = |id: crate::segment::SegmentId| {
                    // A `Released` segment's file is a leftover the release
                    // unlinked (back after a power cut): the journal cannot
                    // quarantine a released segment, so its store is not asked.
                    journal.get(id).is_some_and(|r| match r.state {
                        SegmentState::Committed => check.store_holds(r),
                        SegmentState::Released => true,
                        _ => false,
                    })
                };
                // A segment the journal recorded (or compacted away below
                // its highest id), or at or below the highest id the
                // manifest lists or the store listed (a journal lost and
                // rebuilt: released segments are the store's), is accounted
                // for there: the acknowledged-segment mark does not judge it.
                let journal_max = journal.max_segment_id();
                let accounted_max = journal_max.max(known).max(listed_max);
                let journal_knows = |id: crate::segment::SegmentId| {
                    journal.get(id).is_some() || accounted_max.is_some_and(|m| id <= m)
                };
                IndexWriter::open_checking(
                    dd,
                    index_cfg,
                    min_next,
                    None,
                    &to_upload,
                    &committed,
                    &journal_knows,
                )?
            };
            let mut journal = journal;
            readopt_salvaged(&mut writer, &mut journal, &mut seg_report, &check)?;
            // Before anything is journaled or driven: every segment a cut
            // reseal copied into is still local here.
            let notes = crate::pipeline::reseal::finish_at_open(&mut writer, &mut journal)?;
            Ok::<_, Error>((writer, seg_report, journal, notes))
        })
        .await
        .map_err(|e| Error::Internal(format!("open task failed: {e}")))??;
        let journal = JournalHandle::start(journal)?;
        Ok::<_, Error>((writer, seg_report, journal, reseal_notes, store_check))
    }
    .await;
    let (writer, seg_report, journal, reseal_notes, store_check) = match opened {
        Ok(x) => x,
        Err(e) => {
            release_after_refused_open(manifest.as_ref()).await;
            return Err(e);
        }
    };
    let metrics = Arc::new(Metrics::default());
    let sh = Arc::new(Shared {
        seg_dir: writer.segments_dir().to_path_buf(),
        sealed: writer.sealed_set(),
        handoff: writer.handoff(),
        writer_poison: writer.poison_handle(),
        writer: Arc::new(Mutex::new(writer)),
        journal,
        store,
        stream: cfg.stream.clone(),
        upload: cfg.upload_config(),
        trust_create: std::sync::atomic::AtomicBool::new(trust_create.conditional_create),
        trust_checksum: std::sync::atomic::AtomicBool::new(trust_create.checksums),
        trust_unsigned: std::sync::atomic::AtomicBool::new(trust_create.unsigned_payload),
        probed: std::sync::atomic::AtomicBool::new(probed),
        release_after_commit: cfg.release_after_commit,
        max_in_flight: {
            let process = crate::upload_slot_counts().limit;
            if cfg.max_uploads_in_flight > process {
                tracing::warn!(
                    stream = %cfg.stream,
                    max_uploads_in_flight = cfg.max_uploads_in_flight,
                    process_bound = process,
                    "max_uploads_in_flight is above the process's bound on uploads over every \
                     stream: at most {process} run at once (set_max_uploads_in_flight_per_process \
                     raises it)"
                );
            }
            cfg.max_uploads_in_flight
        },
        metrics,
        manifest,
        fenced: std::sync::OnceLock::new(),
        verified_here: Mutex::new(Default::default()),
    });
    // Seals finished during recovery are already among the writer's sealed
    // segments; journal every sealed file the journal lacks in id order, in
    // batches of increasing ids (the journal only accepts new ids in
    // increasing order).
    let notes = async {
        sh.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poll_sealed()?;
        let mut notes = reseal_notes;
        notes.extend(store_check.notes());
        notes.extend(sh.reconcile_local().await?);
        notes.extend(sh.check_committed_local().await?);
        Ok::<_, Error>(notes)
    }
    .await;
    let notes = match notes {
        Ok(n) => n,
        Err(e) => {
            release_after_refused_open(sh.manifest.as_ref()).await;
            return Err(e);
        }
    };
    for n in &notes {
        tracing::warn!("{n}");
    }
    sh.metrics.local_entries_lost.add(seg_report.lost_items());
    for n in seg_report.losses() {
        tracing::error!("entries lost to local damage: {}", n.line());
    }
    let report = OpenReport {
        previous_shutdown_clean,
        segments: seg_report,
        journal_records_replayed: jrep.records_replayed,
        journal_truncated_bytes: jrep.truncated_bytes,
        notes,
        store: sh.store.display_url().to_string(),
    };
    update_gauges(&sh);
    Ok((sh, report))
}

/// An open refused after it took the stream's manifest: the lease is
/// released (bounded: 3 s), so the stream's real owner is not kept out
/// until it expires. A release that fails is logged; the lease then
/// expires as after a crash.
async fn release_after_refused_open(m: Option<&ManifestHandle>) {
    let Some(m) = m else { return };
    match tokio::time::timeout(Duration::from_secs(3), m.release_now()).await {
        Ok(Ok(true)) => tracing::info!(
            "the open was refused after it took the stream's manifest: ownership released"
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the open was refused after it took the stream's manifest, and releasing it failed: its lease expires on its own"),
        Err(_) => tracing::warn!("the open was refused after it took the stream's manifest, and releasing it did not finish in 3 s: its lease expires on its own"),
    }
}

/// A sealed file salvaged at start-up whose segment the journal already
/// recorded (with the damaged file's length and CRC) cannot be uploaded
/// under that record, and the journal has no record that replaces a seal.
/// So its intact entries are appended again, to the active segment (they
/// are index entries: offset, size, time, key hash; which segment holds
/// them does not matter to a lookup), flushed, and only then is the old
/// segment journaled `Quarantined` and its salvaged file moved to
/// quarantine. A crash in between leaves the salvaged file in place and
/// the journal at `Sealed`: the drive then finds the mismatch and
/// quarantines it, and the entries are held twice, never zero times.
pub(super) fn readopt_salvaged(
    writer: &mut IndexWriter,
    journal: &mut Journal,
    report: &mut RecoveryReport,
    store_check: &CommittedCopyCheck,
) -> Result<()> {
    for note in &mut report.salvaged {
        let id = crate::segment::SegmentId(note.segment);
        // A Resealing/Resealed segment's entries are copied (or were) by
        // `reseal::finish_at_open`, which skips the ones already held.
        // A committed one is salvaged only when the store was found not to
        // hold its object ([`CommittedCopyCheck`]); then its intact entries
        // are appended again like any other's.
        let store_lost = store_check.lost(id);
        let resealing = journal.get(id).is_some_and(|r| {
            matches!(
                r.state,
                SegmentState::Resealing | SegmentState::Resealed | SegmentState::Released
            ) || (r.state == SegmentState::Committed && store_lost.is_none())
        });
        if let Some(why) = &store_lost
            && note.kind == "sealed"
        {
            if note.tail_removed.is_some() {
                // Bytes after the footer, cut off: the file is the
                // committed segment again, whole. Nothing to append; the
                // store still lacks the object.
                store_check.note(format!(
                    "committed segment {id}: {why}; its local copy, cut back to its sealed \
                     length, is whole and kept: run `tierindex reconcile --repair` to upload \
                     it again"
                ));
                continue;
            }
            if note.sealed_as.is_none() {
                // Nothing could be salvaged (an empty or unreadable file):
                // the loss is reported by the salvage; the segment is
                // quarantined in the journal so that every drain says so.
                let reason = format!(
                    "local copy of committed segment {id} damaged, and {why}; nothing could be \
                     salvaged from the local copy; {}",
                    note.line()
                );
                journal.append(&[crate::journal::Record::Quarantined { id, reason }])?;
                continue;
            }
        }
        // A file cut back to its sealed length holds the journaled bytes
        // themselves (same length, same checksum): it is uploaded as is.
        if note.kind != "sealed"
            || note.sealed_as.is_none()
            || note.tail_removed.is_some()
            || journal.get(id).is_none()
            || resealing
        {
            continue;
        }
        let Some(seg) = writer.sealed(id)? else {
            continue;
        };
        let entries = seg.entries();
        drop(seg);
        for e in &entries {
            writer.append_entry(*e)?;
        }
        writer.flush()?;
        let reason = match &store_lost {
            Some(why) => format!(
                "local copy of committed segment {id} damaged, and {why}; {} intact entries \
                 appended again to the active segment; {}",
                entries.len(),
                note.line()
            ),
            None => format!(
                "local sealed file damaged after it was journaled; {} intact entries appended again to the active segment; {}",
                entries.len(),
                note.line()
            ),
        };
        journal.append(&[crate::journal::Record::Quarantined {
            id,
            reason: reason.clone(),
        }])?;
        let moved = writer.quarantine_sealed(id, &reason)?;
        note.sealed_as = Some(format!(
            "entries appended again to active segment {} (salvaged file moved to {})",
            writer.active_id().map_or(0, |a| a.0),
            moved.map_or_else(|| "-".into(), |p| p.display().to_string())
        ));
        tracing::warn!(
            segment = id.0,
            entries = entries.len(),
            "salvaged entries of a journaled segment appended again"
        );
    }
    Ok(())
}

/// Start-up's question to the store about a damaged local copy of a
/// committed segment (known gap 13). The journal says the store holds the
/// segment's verified object; a second fault (an operator's or a
/// lifecycle rule's delete, a lost bucket) may have removed it since. So
/// for each such copy, and only those (damage is rare; an intact copy
/// costs nothing here), the object under the committed key is asked for
/// (one HEAD, bounded):
/// - there, with the segment's length: the copy is set aside as it is
///   (quarantine), as before: the store's copy serves its entries;
/// - missing, or another length: the copy is salvaged like a segment
///   still to upload (its intact entries appended again, the items it
///   cannot read reported lost by number, exit 4), and the segment is
///   journaled `Quarantined`, which keeps `drain` and shutdown at exit 4
///   until an operator looks (`tierindex quarantine`);
/// - no answer (the store unreachable, or the open's take of the stream
///   pending because it was): the journal is trusted, as before, and a
///   note says the store's copy was not confirmed. After one unanswered
///   question no more are asked in this open.
pub(super) struct CommittedCopyCheck {
    store: RemoteStore,
    stream: String,
    handle: tokio::runtime::Handle,
    /// The store did not answer (or was known not to): trust the journal.
    gave_up: std::sync::atomic::AtomicBool,
    /// Segments whose object is missing or wrong, and what the store said.
    lost: std::sync::Mutex<std::collections::BTreeMap<crate::segment::SegmentId, String>>,
    notes: std::sync::Mutex<Vec<String>>,
}

/// How long start-up waits for the store's answer about one object.
const COMMITTED_COPY_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

impl CommittedCopyCheck {
    pub(super) fn new(store: &RemoteStore, stream: &str, store_unanswered: bool) -> Self {
        CommittedCopyCheck {
            store: store.clone(),
            stream: stream.to_string(),
            handle: tokio::runtime::Handle::current(),
            gave_up: std::sync::atomic::AtomicBool::new(store_unanswered),
            lost: Default::default(),
            notes: Default::default(),
        }
    }

    /// Whether the store holds committed segment `r`'s object. Called on a
    /// blocking thread (start-up's recovery), only for a damaged local copy.
    pub(super) fn store_holds(&self, r: &crate::journal::SegmentRecord) -> bool {
        use std::sync::atomic::Ordering;
        let id = r.meta.id;
        // The journaled key, and this store's key for the segment: they
        // differ after a move to another stream or prefix
        // (`--store-override`), where the drive and `reconcile --repair`
        // upload it again under this store's key (helper-56).
        let mut keys = Vec::new();
        if let Some(k) = &r.key {
            keys.push(object_store::path::Path::from(k.as_str()));
        }
        if let Ok(k) = self.store.try_segment_key(&self.stream, &r.meta)
            && !keys.contains(&k)
        {
            keys.push(k);
        }
        let named = keys
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(" or ");
        let unconfirmed = |why: String| {
            // Logged once, with the open's notes.
            self.note(format!(
                "the local copy of committed segment {id} is damaged, and the store's copy \
                 under {named} could not be confirmed ({why}): kept in quarantine as it is, \
                 trusting the journal that the store holds every entry; run `tierindex \
                 verify` once the store answers"
            ));
            true
        };
        if self.gave_up.load(Ordering::Acquire) {
            return unconfirmed("the store did not answer during this start".into());
        }
        let gave_up = |why: String| {
            self.gave_up.store(true, Ordering::Release);
            unconfirmed(why)
        };
        let no_answer = || format!("no answer in {} s", COMMITTED_COPY_HEAD_TIMEOUT.as_secs());
        let mut wrong = Vec::new();
        for key in &keys {
            let head = self.handle.block_on(tokio::time::timeout(
                COMMITTED_COPY_HEAD_TIMEOUT,
                object_store::ObjectStoreExt::head(self.store.object_store(), key),
            ));
            match head {
                Ok(Ok(m)) if m.size == r.meta.file_len => return true,
                Ok(Ok(m)) => wrong.push(format!(
                    "the store's object {key} is {} bytes where the segment is {}",
                    m.size, r.meta.file_len
                )),
                Ok(Err(object_store::Error::NotFound { .. })) => {}
                Ok(Err(e)) => return gave_up(crate::remote::classify(e).to_string()),
                Err(_) => return gave_up(no_answer()),
            }
        }
        // Every key answered 404. A HEAD's answer has no body, so a missing
        // bucket (a typo, another account) looks the same as a missing
        // object: only a store that lists other segments of the stream is
        // taken at its word (helper-56).
        if wrong.is_empty() {
            let listed = self.handle.block_on(tokio::time::timeout(
                COMMITTED_COPY_HEAD_TIMEOUT,
                async {
                    use futures::StreamExt as _;
                    let prefix = self.store.segments_prefix(&self.stream)?;
                    match self.store.object_store().list(Some(&prefix)).next().await {
                        None => Ok(false),
                        Some(Ok(_)) => Ok(true),
                        Some(Err(e)) => Err(crate::remote::classify(e)),
                    }
                },
            ));
            match listed {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    return unconfirmed(
                        "no object under its key, and none under the stream's segments in \
                         this store either: the wrong store, bucket or prefix?"
                            .into(),
                    );
                }
                Ok(Err(e)) => return gave_up(e.to_string()),
                Err(_) => return gave_up(no_answer()),
            }
        }
        let missing = if wrong.is_empty() {
            format!("the store has no object under its key {named}")
        } else {
            wrong.join("; ")
        };
        tracing::error!(
            segment = id.0,
            "the local copy of committed segment {id} is damaged and {missing}: the store's \
             copy cannot stand in for it, so the local copy is salvaged"
        );
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, missing);
        false
    }

    /// What the store said of committed segment `id`'s object when it was
    /// found missing or wrong; `None` otherwise.
    pub(super) fn lost(&self, id: crate::segment::SegmentId) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn note(&self, note: String) {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).push(note);
    }

    fn notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(super) fn write_clean_marker(dir: &Path) -> Result<()> {
    write_marker(
        dir,
        CLEAN_SHUTDOWN_MARKER,
        &format!("clean shutdown at {}\n", now_ms()),
        "write clean-shutdown marker",
    )
}

/// The listing start a refused deferred take recorded, for `min` with the
/// journal's highest id: no marker gives `Some(SegmentId(u64::MAX))`
/// (which `min` leaves out); `above=none`, or a marker that cannot be
/// read or parsed, gives `None`: the whole stream is listed (the safe
/// side).
fn refused_take_above(data_dir: &Path) -> Option<crate::segment::SegmentId> {
    let p = data_dir.join(super::FIRST_TAKE_REFUSED_MARKER);
    let text = match crate::durable::read_regular(&p, 64) {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(crate::segment::SegmentId(u64::MAX));
        }
        Err(e) => {
            tracing::warn!(error = %e, "the first-take refusal marker cannot be read: the whole stream is listed");
            return None;
        }
    };
    match text.strip_prefix("above=") {
        Some("none") => None,
        Some(n) => match n.parse() {
            Ok(n) => Some(crate::segment::SegmentId(n)),
            Err(_) => None,
        },
        None => None,
    }
}

/// Writes the marker file `name` in `dir` durably (the file, then the
/// directory's entry).
fn write_marker(dir: &Path, name: &str, text: &str, what: &'static str) -> Result<()> {
    let p = dir.join(name);
    crate::durable::write_file(&p, text.as_bytes()).map_err(|e| Error::io(&p, what, e))?;
    fsync_path(&p)?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::tests::meta;
    use crate::journal::{JournalState, Record};
    use crate::segment::{KeySum, SegmentId};

    fn listed(id: u64, sum: KeySum) -> ListedSegment {
        ListedSegment {
            id: SegmentId(id),
            sum,
            modified_ms: 0,
        }
    }

    /// An object is this data directory's only when its journal records
    /// that id with the checksum the key names: another broker's object
    /// under an id this one also gave out is foreign (helper-86 F1), and so
    /// is one under an id the journal never recorded (helper-87: no unit
    /// test).
    #[test]
    fn keep_foreign_judges_by_id_and_key_checksum() {
        let mut j = JournalState::default();
        j.apply(&[Record::Sealed { meta: meta(1) }, Record::Sealed { meta: meta(2) }])
            .unwrap();
        let own = meta(1).key_sum();
        let KeySum::Crc32(c) = meta(2).key_sum() else {
            panic!("format 1 meta");
        };
        let mut objects = vec![
            listed(1, own),
            listed(2, KeySum::Crc32(c ^ 1)),
            listed(2, KeySum::Crc64(u64::from(c))),
            listed(3, own),
        ];
        keep_foreign(&j, &mut objects);
        let kept: Vec<(u64, KeySum)> = objects.iter().map(|o| (o.id.0, o.sum)).collect();
        assert_eq!(
            kept,
            vec![
                (2, KeySum::Crc32(c ^ 1)),
                (2, KeySum::Crc64(u64::from(c))),
                (3, own)
            ]
        );
    }
}
