//! Commands that talk to the store: `verify`, `owner`, `reconcile`,
//! `store-check`.

use serde::Serialize;

use crate::cli::{Cli, OwnerAction, emit};
use crate::error::{Error, Result};
use crate::journal::{Journal, SegmentState};
use crate::lifecycle::{EXIT_DRAINED, EXIT_NEEDS_OPERATOR};
use crate::remote::{RemoteStore, probe};
use crate::tier::open_store;
use crate::upload::{VerifyLevel, verify_segment};

#[derive(Serialize)]
struct VerifyOut {
    store: String,
    checked: u64,
    ok: u64,
    bad: Vec<(u64, String)>,
}

/// Re-check every segment the journal says is verified or later: the
/// object exists, has the size, and the CRC of its bytes matches.
pub async fn verify(cli: &Cli) -> Result<i32> {
    let cfg = cli.config()?;
    let store = open_store(&cfg)?;
    let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
    let mut out = VerifyOut {
        store: store.display_url().to_string(),
        checked: 0,
        ok: 0,
        bad: Vec::new(),
    };
    for (id, r) in view.segments() {
        if !matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        ) {
            continue;
        }
        out.checked += 1;
        let key = match &r.key {
            Some(k) => object_store::path::Path::from(k.as_str()),
            None => store.try_segment_key(&cfg.stream, &r.meta)?,
        };
        match verify_segment(&store, &key, &r.meta, VerifyLevel::Full).await {
            Ok(()) => out.ok += 1,
            Err(e) => out.bad.push((id.0, e.to_string())),
        }
    }
    emit(cli.json, &out, |o| {
        let mut s = format!(
            "{}: {} checked, {} ok, {} bad",
            o.store,
            o.checked,
            o.ok,
            o.bad.len()
        );
        for (id, why) in &o.bad {
            s.push_str(&format!("\n  segment {id:020}: {why}"));
        }
        s
    });
    Ok(if out.bad.is_empty() {
        EXIT_DRAINED
    } else {
        EXIT_NEEDS_OPERATOR
    })
}

/// Probe a store's behaviour (conditional writes, multipart, ranges,
/// metadata) and report it.
pub async fn store_check(cli: &Cli, url: Option<&str>) -> Result<i32> {
    let cfg = cli.config()?;
    let url = match url {
        Some(u) => u.to_string(),
        None => cfg.store_url()?,
    };
    let store = RemoteStore::from_url(&url, &cfg.store_options())?;
    let caps = probe::probe(&store).await?;
    #[derive(Serialize)]
    struct Out {
        store: String,
        capabilities: probe::Capabilities,
        fenced_multi_writer_safe: bool,
    }
    let out = Out {
        store: store.display_url().to_string(),
        // The manifest fences with create-only versions: If-None-Match is
        // all it needs (If-Match is not used).
        fenced_multi_writer_safe: caps.conditional_create,
        capabilities: caps,
    };
    emit(cli.json, &out, |o| {
        let c = &o.capabilities;
        let mut s = format!(
            "{}\n  conditional create (If-None-Match): {}\n  conditional update (If-Match): {}\n  multipart: {}\n  range GET: {}\n  object metadata: {}",
            o.store,
            c.conditional_create,
            c.conditional_update,
            c.multipart,
            c.range_get,
            c.metadata
        );
        if !o.fenced_multi_writer_safe {
            s.push_str("\n  WARNING: this store does not honour conditional creates: uploads read every object back to prove it is ours; it cannot fence a second writer (the manifest refuses this store unless allow_unconditional_store is set)");
        }
        for n in &c.notes {
            s.push_str(&format!("\n  note: {n}"));
        }
        s
    });
    if !out.capabilities.range_get {
        return Err(Error::Remote(
            "store does not serve range GETs correctly".into(),
        ));
    }
    Ok(EXIT_DRAINED)
}

/// The lease part of a manifest, as `owner` and `status --remote` show it
/// (flattened into their JSON: `owner`, `lease_expires_ms`, `lease_live`).
#[derive(Serialize)]
struct LeaseView {
    owner: Option<String>,
    lease_expires_ms: Option<u64>,
    lease_live: bool,
}

impl LeaseView {
    fn of(m: Option<&crate::remote::manifest::Manifest>, now: u64) -> LeaseView {
        let lease = m.and_then(|m| m.lease.as_ref());
        LeaseView {
            owner: lease.map(|l| l.owner.clone()),
            lease_expires_ms: lease.map(|l| l.expires_ms),
            lease_live: lease.is_some_and(|l| l.is_live(now)),
        }
    }

    fn describe(&self, now: u64) -> String {
        match (&self.owner, self.lease_expires_ms) {
            (Some(w), Some(exp)) => format!(
                "owner {w:?}, lease {} ({})",
                if self.lease_live { "live" } else { "expired" },
                crate::remote::lease::describe_time(exp, now)
            ),
            _ => "no owner (released)".to_string(),
        }
    }
}

#[derive(Serialize)]
struct OwnerOut {
    store: String,
    stream: String,
    action: &'static str,
    /// No manifest yet for this stream.
    manifest: bool,
    version: u64,
    epoch: u64,
    #[serde(flatten)]
    lease: LeaseView,
    committed_segments: u64,
}

/// `tierindex owner [show|take|release]`: the stream's manifest ownership.
pub async fn owner(cli: &Cli, action: OwnerAction) -> Result<i32> {
    use crate::remote::manifest::{ManifestOptions, ManifestStore};
    let cfg = cli.config()?;
    let store = open_store(&cfg)?;
    let opts = ManifestOptions {
        allow_unconditional_store: cfg.allow_unconditional_store,
        ..ManifestOptions::default()
    };
    let ms = ManifestStore::open(&store, &cfg.stream, opts).await?;
    let owner_id = |o: &Option<String>| match o {
        Some(o) => Ok(o.clone()),
        None => cfg.effective_owner_id(),
    };
    let name = match &action {
        OwnerAction::Show => "show",
        OwnerAction::Take {
            owner_id: o,
            ttl_ms,
        } => {
            let ttl = std::time::Duration::from_millis(ttl_ms.unwrap_or(cfg.lease_ttl_ms));
            ms.take_ownership(&owner_id(o)?, ttl).await?;
            "take"
        }
        OwnerAction::Release { owner_id: o } => {
            // Re-take as the holder (always allowed for the same id), then
            // give the lease up.
            let w = ms
                .take_ownership(&owner_id(o)?, std::time::Duration::from_secs(60))
                .await?;
            w.release().await?;
            "release"
        }
    };
    let m = ms.load().await?;
    let now = ms.now_ms();
    let out = OwnerOut {
        store: store.display_url().to_string(),
        stream: cfg.stream.clone(),
        action: name,
        manifest: m.is_some(),
        version: m.as_ref().map_or(0, |m| m.version),
        epoch: m.as_ref().map_or(0, |m| m.epoch),
        lease: LeaseView::of(m.as_ref(), now),
        committed_segments: m.as_ref().map_or(0, |m| m.segment_count),
    };
    emit(cli.json, &out, |o| {
        if !o.manifest {
            return format!("{} stream {}: no manifest yet", o.store, o.stream);
        }
        let lease = o.lease.describe(now);
        format!(
            "{} stream {}: manifest version {}, epoch {}, {lease}, {} committed segment(s)",
            o.store, o.stream, o.version, o.epoch, o.committed_segments
        )
    });
    Ok(EXIT_DRAINED)
}

/// `lookup --remote`: entries for `key_hash` in the committed remote
/// segments not held in `held` (ids of local files). Candidates: the
/// manifest's list with `manifest = true` (read only: no ownership taken),
/// else the journal's `Released` records. Returns (candidates, hits as
/// (segment, entry), unreadable segments with why).
pub(crate) async fn remote_hits(
    cfg: &crate::config::Config,
    key_hash: u64,
    range: crate::segment::TimeRange,
    held: &std::collections::BTreeSet<u64>,
) -> Result<(usize, Vec<(u64, crate::segment::Entry)>, Vec<String>)> {
    use crate::remote::fetch::{Fetcher, RemoteSegment};
    let store = open_store(cfg)?;
    let mut bad = Vec::new();
    let segs: Vec<RemoteSegment> = if cfg.manifest {
        let opts = crate::remote::manifest::ManifestOptions {
            allow_unconditional_store: cfg.allow_unconditional_store,
            ..Default::default()
        };
        let ms = crate::remote::manifest::ManifestStore::open(&store, &cfg.stream, opts).await?;
        match ms.load().await? {
            Some(m) => {
                let mut v = Vec::new();
                for e in ms.all_segments(&m).await? {
                    match m.damage(e.id) {
                        // Marked damaged: reported, never read.
                        Some(d) if !held.contains(&e.id.0) => bad.push(format!(
                            "remote segment {:020} ({}): {}",
                            e.id.0,
                            e.key,
                            crate::tier::damage_text(d)
                        )),
                        _ => v.push(RemoteSegment::from_entry(&e)?),
                    }
                }
                v
            }
            None => Vec::new(),
        }
    } else {
        let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
        view.segments()
            .values()
            .filter(|r| r.state == SegmentState::Released)
            .map(|r| {
                Ok(RemoteSegment {
                    key: match &r.key {
                        Some(k) => object_store::path::Path::from(k.as_str()),
                        None => store.try_segment_key(&cfg.stream, &r.meta)?,
                    },
                    meta: r.meta.clone(),
                })
            })
            .collect::<Result<_>>()?
    };
    let segs: Vec<RemoteSegment> = segs
        .into_iter()
        .filter(|s| !held.contains(&s.meta.id.0))
        .collect();
    let f = Fetcher::new(
        store,
        cfg.upload_config().retry_policy(),
        crate::tier::REMOTE_INDEX_CACHE_BYTES,
    );
    let candidates = segs.len() + bad.len();
    let mut hits = Vec::new();
    for s in &segs {
        match f.lookup_in(s, key_hash, range).await {
            Ok(es) => hits.extend(es.into_iter().map(|e| (s.meta.id.0, e))),
            Err(e) => bad.push(format!(
                "remote segment {:020} ({}): {e}",
                s.meta.id.0, s.key
            )),
        }
    }
    Ok((candidates, hits, bad))
}

/// `tierindex reconcile [--repair] [--grace-ms MS] [--deep]`: journal vs
/// manifest vs the bucket listing (`recovery::reconcile`).
pub async fn reconcile(cli: &Cli, repair: bool, grace_ms: u64, deep: bool) -> Result<i32> {
    use crate::recovery::reconcile::{ReconcileOptions, reconcile};
    let cfg = cli.config()?;
    let store = open_store(&cfg)?;
    let opts = ReconcileOptions {
        repair,
        grace: std::time::Duration::from_millis(grace_ms),
        deep,
    };
    let report = reconcile(&cfg, &store, &opts).await?;
    emit(cli.json, &report, |r| {
        let mut s = String::new();
        for f in &r.findings {
            let seg = f
                .segment
                .map(|id| format!(" segment {id:020}"))
                .unwrap_or_default();
            let tag = if f.lost {
                "LOST "
            } else if f.deleted {
                "deleted "
            } else if f.informational {
                "note "
            } else if f.repaired {
                "fixed "
            } else {
                ""
            };
            s.push_str(&format!(
                "{tag}{}:{seg} {}: {} -> {}\n",
                f.kind.describe(),
                f.key,
                f.detail,
                f.action
            ));
        }
        s.push_str(&format!("multipart uploads: {}\n", r.multipart_uploads));
        s.push_str(&format!(
            "{} stream {}: {} journal segment(s), {} object(s) listed, manifest {}; \
             {} finding(s), {} repaired, {} unresolved, {} lost{}",
            r.store,
            r.stream,
            r.journal_segments,
            r.listed_objects,
            if r.manifest_present {
                format!("with {} entr(ies)", r.manifest_segments)
            } else {
                "absent".to_string()
            },
            r.findings_total,
            r.repaired,
            r.unresolved,
            r.lost,
            if r.repair { "" } else { " (report only)" }
        ));
        s
    });
    Ok(if report.needs_operator() {
        EXIT_NEEDS_OPERATOR
    } else {
        EXIT_DRAINED
    })
}

/// The remote half of `status --remote`.
#[derive(Serialize)]
struct RemoteState {
    store: String,
    stream: String,
    manifest_present: bool,
    version: u64,
    epoch: u64,
    #[serde(flatten)]
    lease: LeaseView,
    committed_segments: u64,
    damaged: Vec<crate::remote::manifest::DamageNote>,
    /// Objects listed under the stream's segments prefix.
    listed_objects: usize,
    /// Journal segments at Verified or later whose object is not listed at
    /// its recorded size.
    objects_missing: usize,
    /// Journal Committed/Released segments a present manifest does not list.
    not_in_manifest: usize,
}

#[derive(Serialize)]
struct SegmentRemote<'a> {
    #[serde(flatten)]
    record: &'a crate::journal::SegmentRecord,
    /// `listed`, `damaged`, `LOST`, `not listed`, or `no manifest`.
    manifest: &'static str,
    /// `present`, `absent`, or `size N (recorded M)`.
    object: String,
}

#[derive(Serialize)]
struct StatusRemoteOut<'a> {
    totals: crate::tier::Status,
    remote: RemoteState,
    segments: Vec<SegmentRemote<'a>>,
}

/// `tierindex status --remote`: the journal's view with the store's next to
/// it (manifest read without a probe, one LIST; nothing written). Exit 4
/// when something needs an operator (a quarantined segment, an object
/// missing under a Verified-or-later segment, a LOST damage note), 3 while
/// work is pending, else 0.
pub async fn status_remote(cli: &Cli) -> Result<i32> {
    use crate::remote::manifest::ManifestStore;
    use futures::TryStreamExt as _;
    let cfg = cli.config()?;
    let store = open_store(&cfg)?;
    let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
    let totals = crate::tier::status_from(view.segments(), cfg.release_after_commit);

    let ms = ManifestStore::reader(&store, &cfg.stream, cfg.manifest_options())?;
    let manifest = ms.load().await?;
    let mut listed_in_manifest = std::collections::BTreeMap::new();
    if let Some(m) = &manifest {
        for e in ms.all_segments(m).await? {
            listed_in_manifest.insert(e.id, e);
        }
    }
    let prefix = store.segments_prefix(&cfg.stream)?;
    let policy = cfg.upload_config().retry_policy();
    let mut rng = fastrand::Rng::new();
    let os = store.object_store().clone();
    let listed: Vec<object_store::ObjectMeta> =
        crate::upload::retry::with_retries(&policy, &mut rng, "segments LIST", |_| {
            let (os, prefix) = (os.clone(), prefix.clone());
            async move { os.list(Some(&prefix)).try_collect::<Vec<_>>().await }
        })
        .await
        .map_err(crate::remote::classify)?;
    let sizes: std::collections::BTreeMap<String, u64> = listed
        .iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect();

    let now = ms.now_ms();
    let mut remote = RemoteState {
        store: store.display_url().to_string(),
        stream: cfg.stream.clone(),
        manifest_present: manifest.is_some(),
        version: manifest.as_ref().map_or(0, |m| m.version),
        epoch: manifest.as_ref().map_or(0, |m| m.epoch),
        lease: LeaseView::of(manifest.as_ref(), now),
        committed_segments: manifest.as_ref().map_or(0, |m| m.segment_count),
        damaged: manifest.as_ref().map_or(Vec::new(), |m| m.damaged.clone()),
        listed_objects: listed.len(),
        objects_missing: 0,
        not_in_manifest: 0,
    };
    let mut segments = Vec::new();
    for r in view.segments().values() {
        let key = match &r.key {
            Some(k) => k.clone(),
            None => store.try_segment_key(&cfg.stream, &r.meta)?.to_string(),
        };
        let expected = matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        );
        let object = match sizes.get(&key) {
            Some(&n) if n == r.meta.file_len => "present".to_string(),
            Some(&n) => format!("size {n} (recorded {})", r.meta.file_len),
            None => "absent".to_string(),
        };
        if expected && object != "present" {
            remote.objects_missing += 1;
        }
        let manifest_col = match &manifest {
            None => "no manifest",
            Some(m) => match (listed_in_manifest.get(&r.meta.id), m.damage(r.meta.id)) {
                (Some(e), _) if e.file_crc != r.meta.file_crc => "other bytes listed",
                (Some(_), Some(d)) if d.lost => "LOST",
                (Some(_), Some(_)) => "damaged",
                (Some(_), None) => "listed",
                (None, _) => {
                    if matches!(r.state, SegmentState::Committed | SegmentState::Released) {
                        remote.not_in_manifest += 1;
                    }
                    "not listed"
                }
            },
        };
        segments.push(SegmentRemote {
            record: r,
            manifest: manifest_col,
            object,
        });
    }
    let lost_notes = remote.damaged.iter().filter(|d| d.lost).count();
    let quarantined = totals.by_state.get("Quarantined").copied().unwrap_or(0);
    let pending = totals.pending_segments;
    let needs_operator = quarantined > 0 || remote.objects_missing > 0 || lost_notes > 0;
    let out = StatusRemoteOut {
        totals,
        remote,
        segments,
    };
    emit(cli.json, &out, |o| {
        let mut s = String::from(
            "segment               state        items      bytes  crc32     key  | manifest | object\n",
        );
        for x in &o.segments {
            s.push_str(&format!(
                "{}  | {} | {}\n",
                crate::cli::local::segment_line(x.record),
                x.manifest,
                x.object
            ));
        }
        s.push_str(&crate::cli::local::totals_line(&o.totals));
        s.push('\n');
        let r = &o.remote;
        let owner = r.lease.describe(now);
        if r.manifest_present {
            s.push_str(&format!(
                "remote: {} stream {}: manifest version {}, epoch {}, {owner}, {} committed segment(s), {} damage note(s)\n",
                r.store, r.stream, r.version, r.epoch, r.committed_segments, r.damaged.len()
            ));
        } else {
            s.push_str(&format!(
                "remote: {} stream {}: no manifest\n",
                r.store, r.stream
            ));
        }
        for d in &r.damaged {
            s.push_str(&format!(
                "  damaged {:020}{}: {}\n",
                d.id.0,
                if d.lost { " LOST" } else { "" },
                d.reason
            ));
        }
        s.push_str(&format!(
            "remote: {} object(s) listed; {} verified-or-later segment(s) without their object; {} committed segment(s) the manifest does not list",
            r.listed_objects, r.objects_missing, r.not_in_manifest
        ));
        s
    });
    Ok(if needs_operator {
        EXIT_NEEDS_OPERATOR
    } else if pending > 0 {
        crate::lifecycle::EXIT_PENDING
    } else {
        EXIT_DRAINED
    })
}
