//! Store access: load the newest manifest (head and chunks, with a cache),
//! create-only publication of a version, trimming old versions.

use super::*;

// ---------------------------------------------------------------------------
// Store access
// ---------------------------------------------------------------------------

/// Tuning and safety switches of the manifest.
#[derive(Clone, Debug)]
pub struct ManifestOptions {
    /// Most entries kept inline in the head object; above this, the oldest
    /// `chunk_entries` spill into a chunk (repeatedly).
    pub max_inline: usize,
    /// Entries per spilled chunk; `1..=max_inline`.
    pub chunk_entries: usize,
    /// Newest versions kept; older ones are deleted. At least 2.
    pub keep_versions: u64,
    /// Largest manifest or chunk object read or written.
    pub max_object_bytes: usize,
    /// Run on a store whose probe found conditional creates NOT honoured
    /// (Garage). Nothing then stops two writers from overwriting each other:
    /// only safe with one writer, guaranteed by something else.
    pub allow_unconditional_store: bool,
    /// Retries of single requests (transient errors only).
    pub retry: RetryPolicy,
    /// Re-reads after lost races before one call gives up (retryable error).
    pub max_conflicts: u32,
}

impl Default for ManifestOptions {
    fn default() -> Self {
        ManifestOptions {
            max_inline: 1024,
            chunk_entries: 512,
            keep_versions: 16,
            max_object_bytes: 64 << 20,
            allow_unconditional_store: false,
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                request_timeout: Duration::from_secs(60),
            },
            max_conflicts: 32,
        }
    }
}

pub(super) enum Created {
    New,
    Exists,
}

pub(super) enum Publish {
    Done,
    Conflict,
}

/// A stream's manifest in one store: reads, and the entry to ownership.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct ManifestStore {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) store: RemoteStore,
    pub(super) stream: String,
    pub(super) dir: Path,
    pub(super) opts: ManifestOptions,
    pub(super) clock: Arc<dyn Clock>,
    /// Decoded chunks by their full reference. Chunks are create-only and
    /// named by their CRC, so a decoded one never goes stale; bounded by
    /// [`CHUNK_CACHE_ENTRIES`] entries in all (cleared when over).
    pub(super) chunks: std::sync::Mutex<ChunkCache>,
    /// Another owner's lease as last seen by `take_ownership`, on the
    /// monotonic clock (see `renewal::Seen`).
    pub(super) seen: std::sync::Mutex<Option<renewal::Seen>>,
}

/// Most chunk entries a [`ManifestStore`] keeps decoded (about 200 bytes
/// each: 131,072 entries is some 26 MB).
pub const CHUNK_CACHE_ENTRIES: usize = 1 << 17;

#[derive(Debug, Default)]
pub(super) struct ChunkCache {
    pub(super) map: HashMap<ChunkRef, Arc<Vec<SegmentEntry>>>,
    pub(super) entries: usize,
}

impl ManifestStore {
    /// Probes the store and opens the manifest of `stream`. Refused when the
    /// store does not honour conditional creates, unless
    /// `opts.allow_unconditional_store`.
    pub async fn open(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
    ) -> Result<ManifestStore> {
        let caps = probe::probe(store).await?;
        Self::with_capabilities(store, stream, opts, &caps, Arc::new(SystemClock))
    }

    /// A read-only view of `stream`'s manifest: reads need no probe (the
    /// store's conditional creates matter only to writers), so none runs.
    /// Anything written through it still goes through the usual CAS, but
    /// writers should come from [`ManifestStore::open`].
    pub fn reader(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
    ) -> Result<ManifestStore> {
        let caps = Capabilities {
            conditional_create: true,
            ..Capabilities::default()
        };
        Self::with_capabilities(store, stream, opts, &caps, Arc::new(SystemClock))
    }

    /// Opens with capabilities measured earlier and an explicit clock.
    pub fn with_capabilities(
        store: &RemoteStore,
        stream: &str,
        opts: ManifestOptions,
        caps: &Capabilities,
        clock: Arc<dyn Clock>,
    ) -> Result<ManifestStore> {
        keys::validate_stream(stream)?;
        if opts.max_inline == 0 || opts.chunk_entries == 0 || opts.chunk_entries > opts.max_inline {
            return Err(Error::InvalidInput(format!(
                "manifest options: need 1 <= chunk_entries ({}) <= max_inline ({})",
                opts.chunk_entries, opts.max_inline
            )));
        }
        if opts.keep_versions < 2 || opts.max_object_bytes < 1024 || opts.max_conflicts == 0 {
            return Err(Error::InvalidInput(
                "manifest options: keep_versions >= 2, max_object_bytes >= 1024, \
                 max_conflicts >= 1"
                    .into(),
            ));
        }
        if !caps.conditional_create {
            if !opts.allow_unconditional_store {
                return Err(Error::Remote(format!(
                    "store {} does not honour conditional creates (If-None-Match: *; its probe \
                     saw a second create overwrite the first), so the remote manifest (on by \
                     default) cannot fence a second writer of stream {stream:?}; refusing to \
                     open. Either use a store that honours them (AWS S3, MinIO, Ceph RGW, \
                     s3s-fs), or choose single-writer mode explicitly with `manifest = false` \
                     in the config file or `--manifest false` on the command line (weaker: nothing detects or fences a second writer of \
                     the stream; only where exactly one writer is guaranteed by other means; \
                     see docs/crash-safety.md \"Single-writer mode\"). \
                     allow_unconditional_store = true keeps the manifest on such a store \
                     without fencing, under the same condition",
                    store.display_url()
                )));
            }
            tracing::warn!(
                store = %store.display_url(),
                stream,
                "conditional creates are not honoured; manifest fencing is OFF (override set)"
            );
        }
        let dir = store.prefix().clone().join(stream).join(MANIFEST_DIR);
        Ok(ManifestStore {
            inner: Arc::new(Inner {
                store: store.clone(),
                stream: stream.to_string(),
                dir,
                opts,
                clock,
                chunks: std::sync::Mutex::new(ChunkCache::default()),
                seen: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn stream(&self) -> &str {
        &self.inner.stream
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn options(&self) -> &ManifestOptions {
        &self.inner.opts
    }
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// `{prefix}/{stream}/manifest/versions`.
    pub fn versions_dir(&self) -> Path {
        self.inner.dir.clone().join(VERSIONS_DIR)
    }
    /// The key of manifest `version`.
    pub fn version_key(&self, version: u64) -> Path {
        self.versions_dir().join(version_name(version))
    }
    pub(super) fn chunk_key(&self, name: &str) -> Path {
        self.inner.dir.clone().join(CHUNKS_DIR).join(name)
    }

    pub(super) fn os(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.object_store().clone()
    }

    /// The newest manifest, `None` when the stream has none yet.
    pub async fn load(&self) -> Result<Option<Manifest>> {
        Ok(self.load_latest().await?.map(|(m, _)| m))
    }

    /// Every committed entry (chunks and inline), ascending by id.
    pub async fn all_segments(&self, m: &Manifest) -> Result<Vec<SegmentEntry>> {
        let mut all = Vec::new();
        for c in &m.chunks {
            all.extend(self.read_chunk(c).await?);
        }
        all.extend(m.segments.iter().cloned());
        all.sort_by_key(|e| e.id);
        if let Some(w) = all.windows(2).find(|w| matches!(w, [a, b] if a.id == b.id)) {
            let id = w.first().map(|e| e.id).unwrap_or_default();
            return Err(Error::corrupt(
                format!("manifest {} version {}", self.stream(), m.version),
                format!("segment {id} is listed twice"),
            ));
        }
        Ok(all)
    }

    /// Whether the stream has a manifest in the store at all: any version
    /// listed (one LIST; nothing read or decoded).
    pub async fn exists(&self) -> Result<bool> {
        Ok(!self.list_versions(None).await?.is_empty())
    }

    /// Takes the stream for `owner_id`: publishes the next version with
    /// epoch + 1 and a lease until now + `ttl`. Refused with
    /// [`Error::Claimed`] while another owner's lease is live. The same
    /// owner id may always re-take (a restart): the epoch still moves, so the
    /// previous incarnation is fenced.
    pub async fn take_ownership(&self, owner_id: &str, ttl: Duration) -> Result<ManifestWriter> {
        self.take_ownership_hosted(owner_id, ttl, None).await
    }

    /// [`take_ownership`](Self::take_ownership), with the lease renewed by
    /// `host`'s host lease in this store (see `hosted`) rather than by
    /// renewals of its own.
    pub async fn take_ownership_hosted(
        &self,
        owner_id: &str,
        ttl: Duration,
        host: Option<&super::HostLeases>,
    ) -> Result<ManifestWriter> {
        lease::validate_owner(owner_id)?;
        // Before anything is published: a take whose host lease could not
        // start would leave its lease standing for a TTL.
        if host.is_some() && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::InvalidInput(
                "a host's stream must be taken on a tokio runtime (its host lease renews on it)"
                    .into(),
            ));
        }
        if let Err(e) = lease::check_ttl(ttl, &self.inner.opts.retry) {
            // Logged, not refused: `Config::manifest_options` shortens
            // manifest requests to fit the lease, so only a TTL too short
            // for even 1 s requests (or hand-built options) gets here.
            tracing::warn!(stream = self.stream(), "{e}");
        }
        for _ in 0..self.inner.opts.max_conflicts {
            let latest = self.load_latest().await?;
            let now = self.now_ms();
            let expires_ms = lease::expiry(now, ttl)?;
            let next = match latest {
                None => Manifest {
                    format: FORMAT_VERSION,
                    stream: self.stream().to_string(),
                    version: 1,
                    epoch: 1,
                    lease: None,
                    written_ms: now,
                    segment_count: 0,
                    chunks: Vec::new(),
                    segments: Vec::new(),
                    damaged: Vec::new(),
                },
                Some((m, _)) => {
                    // The same owner may always re-take: its lease is not
                    // read (after a crash, a host's streams would each read
                    // the host's whole renewal for nothing).
                    let other = m.lease.as_ref().is_some_and(|l| l.owner != owner_id);
                    if other
                        && let Some(cur) = self.current_lease(&m).await?
                        && self.keeps_out(&cur, owner_id, now)
                    {
                        let l = &cur.lease;
                        // A lease taken "in the future" was written by a
                        // clock ahead of this one: it keeps others out for
                        // as long as the skew (helper-61).
                        let skew = if l.acquired_ms > now.saturating_add(5_000) {
                            format!(
                                "; it was taken at {}, later than this machine's clock says \
                                 now: the holder's clock runs ahead of this one (check NTP)",
                                lease::describe_time(l.acquired_ms, now)
                            )
                        } else {
                            String::new()
                        };
                        return Err(Error::Claimed(format!(
                            "stream {:?} is held by owner {:?} (epoch {}) until {}{skew}; \
                             it can be taken after that or once released (if that broker is \
                             known to be down: `tierindex owner release --owner-id {} \
                             --fence-live --store {} --stream {}`)",
                            self.stream(),
                            l.owner,
                            l.epoch,
                            lease::describe_time(l.expires_ms, now),
                            // Shell-quoted: the id is read from the store,
                            // and an operator may paste the command (helper-81
                            // F2: it named neither the store nor the stream).
                            crate::remote::url::shell_quoted(&l.owner),
                            crate::remote::url::shell_quoted(self.inner.store.display_url()),
                            crate::remote::url::shell_quoted(self.stream()),
                        )));
                    }
                    let (Some(version), Some(epoch)) =
                        (m.version.checked_add(1), m.epoch.checked_add(1))
                    else {
                        return Err(Error::corrupt(
                            format!("manifest {}", self.stream()),
                            "version or epoch at u64::MAX",
                        ));
                    };
                    Manifest {
                        version,
                        epoch,
                        written_ms: now,
                        ..m
                    }
                }
            };
            let next = Manifest {
                lease: Some(Lease {
                    owner: owner_id.to_string(),
                    epoch: next.epoch,
                    acquired_ms: now,
                    expires_ms,
                }),
                ..next
            };
            match self.publish(&next).await? {
                Publish::Done => {
                    let keeper = LeaseKeeper::new(self.clone(), owner_id, next.epoch, expires_ms);
                    if let Some(h) = host {
                        keeper.set_host(h.join(self, ttl, owner_id, next.epoch)?);
                    }
                    // Renewal 0 of the new epoch: an earlier owner's next
                    // renewal finds it and stops. Failing to write it only
                    // delays that to the earlier owner's next commit.
                    if let Err(e) = keeper.renew(ttl).await {
                        tracing::warn!(stream = self.stream(), error = %e, "could not write the first lease renewal");
                    }
                    self.sweep(next.version).await;
                    self.sweep_renewals(next.epoch).await;
                    tracing::info!(
                        stream = self.stream(),
                        owner = owner_id,
                        epoch = next.epoch,
                        version = next.version,
                        "took ownership"
                    );
                    return Ok(ManifestWriter {
                        ms: self.clone(),
                        owner: owner_id.to_string(),
                        epoch: next.epoch,
                        base: next,
                        dead: None,
                        chunk_cache: HashMap::new(),
                        keeper,
                    });
                }
                Publish::Conflict => continue,
            }
        }
        Err(self.too_many_conflicts("take ownership"))
    }

    pub(super) fn too_many_conflicts(&self, what: &str) -> Error {
        Error::RemoteRetryable(format!(
            "{what} of stream {:?}: lost {} races in a row for the next manifest version",
            self.stream(),
            self.inner.opts.max_conflicts
        ))
    }

    /// The highest version and its decoded body, re-listing when it was
    /// deleted between LIST and GET.
    pub(super) async fn load_latest(&self) -> Result<Option<(Manifest, Bytes)>> {
        for _ in 0..LOAD_ATTEMPTS {
            let Some(v) = self.list_versions(None).await?.into_iter().max() else {
                return Ok(None);
            };
            let what = format!("manifest {} version {v}", self.stream());
            let Some(bytes) = self.get_bytes(&self.version_key(v), &what).await? else {
                continue;
            };
            let m = decode_manifest(&bytes, self.stream(), v, self.inner.opts.max_object_bytes)
                .map_err(|e| match e {
                    Error::Corrupt { what, detail } => Error::Corrupt {
                        what,
                        detail: format!(
                            "{detail}. The newest version of the stream's manifest is damaged, and \
                             it is not skipped (an older version can lack newer commits and \
                             epochs). To go on: stop every broker of the stream; keep a copy of \
                             {} and move it out of the versions folder, which makes the \
                             newest remaining version (normally {}; none: the stream has no \
                             manifest left) the newest; then run `tierindex reconcile --repair` \
                             on each data directory of the stream (each commits again what its \
                             journal records committed and that version lacks, or rebuilds the \
                             manifest from the listing)",
                            self.version_key(v),
                            v.saturating_sub(1)
                        ),
                    },
                    other => other,
                })?;
            return Ok(Some((m, bytes)));
        }
        Err(Error::RemoteRetryable(format!(
            "manifest of stream {:?}: the newest version vanished between LIST and GET \
             {LOAD_ATTEMPTS} times",
            self.stream()
        )))
    }

    /// Everything listed under `dir` (after `offset`), with retries.
    pub(super) async fn list_under(
        &self,
        dir: &Path,
        offset: Option<Path>,
        what: &'static str,
    ) -> Result<Vec<ObjectMeta>> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        with_retries(&self.inner.opts.retry, &mut rng, what, |_| {
            let (os, dir, offset) = (os.clone(), dir.clone(), offset.clone());
            async move {
                match &offset {
                    None => os.list(Some(&dir)).try_collect().await,
                    Some(o) => os.list_with_offset(Some(&dir), o).try_collect().await,
                }
            }
        })
        .await
        .map_err(classify)
    }

    /// Versions listed under `versions/`, all or only those after `after`.
    pub(super) async fn list_versions(&self, after: Option<u64>) -> Result<Vec<u64>> {
        let dir = self.versions_dir();
        let offset = after.map(|v| self.version_key(v));
        let listed = self.list_under(&dir, offset, "manifest LIST").await?;
        Ok(listed
            .iter()
            .filter_map(|m| {
                let v = parse_version_name(m.location.filename()?)?;
                // Only direct children of versions/ count.
                (m.location == dir.clone().join(version_name(v))).then_some(v)
            })
            .filter(|v| after.is_none_or(|a| *v > a))
            .collect())
    }

    /// The bytes of `key`, `None` when it does not exist. The size is checked
    /// against the limit before the body is read.
    pub(super) async fn get_bytes(&self, key: &Path, what: &str) -> Result<Option<Bytes>> {
        self.get_bytes_max(key, what, self.inner.opts.max_object_bytes)
            .await
    }

    /// [`get_bytes`](Self::get_bytes) with its own size limit.
    pub(super) async fn get_bytes_max(&self, key: &Path, what: &str, max: usize) -> Result<Option<Bytes>> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest GET", |_| {
            let (os, key) = (os.clone(), key.clone());
            async move {
                let r = os.get_opts(&key, GetOptions::default()).await?;
                if r.meta.size > max as u64 {
                    return Ok(Err(r.meta.size));
                }
                r.bytes().await.map(Ok)
            }
        })
        .await;
        match res {
            Ok(Ok(b)) => Ok(Some(b)),
            Ok(Err(size)) => Err(Error::corrupt(
                what,
                format!("object is {size} bytes, the limit is {max}"),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// `PutMode::Create` with retries; a lost answer comes back as `Exists`.
    pub(super) async fn create(&self, key: &Path, bytes: Bytes) -> Result<Created> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest PUT", |_| {
            let (os, key, bytes) = (os.clone(), key.clone(), bytes.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                os.put_opts(&key, PutPayload::from(bytes), opts).await
            }
        })
        .await;
        match res {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::Exists),
            Err(e) => Err(classify(e)),
        }
    }

    pub(super) async fn delete(&self, key: &Path) -> Result<()> {
        let os = self.os();
        let mut rng = fastrand::Rng::new();
        let res = with_retries(&self.inner.opts.retry, &mut rng, "manifest DELETE", |_| {
            let (os, key) = (os.clone(), key.clone());
            async move { os.delete(&key).await }
        })
        .await;
        match res {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Creates version `m.version`. `Done`: it is ours and the newest line
    /// of versions continues from it. `Conflict`: someone else holds the
    /// slot, or our object filled a slot emptied long ago (then it is
    /// deleted again): re-read and decide.
    pub(super) async fn publish(&self, m: &Manifest) -> Result<Publish> {
        let bytes = Bytes::from(encode_manifest(m)?);
        if bytes.len() > self.inner.opts.max_object_bytes {
            return Err(Error::InvalidInput(format!(
                "manifest version {} would be {} bytes, above max_object_bytes {}; \
                 lower max_inline",
                m.version,
                bytes.len(),
                self.inner.opts.max_object_bytes
            )));
        }
        let key = self.version_key(m.version);
        crate::failpoint::crash("manifest.publish");
        let created = self.create(&key, bytes.clone()).await?;
        crate::failpoint::crash("manifest.publish.after");
        let ours = match created {
            Created::New => true,
            // A lost answer of our own create reads back as exactly our bytes
            // (the retry sent the same ones); anything else is another writer.
            Created::Exists => {
                let what = format!("manifest {} version {}", self.stream(), m.version);
                self.get_bytes(&key, &what)
                    .await?
                    .is_some_and(|b| b == bytes)
            }
        };
        if !ours {
            return Ok(Publish::Conflict);
        }
        let keep = self.inner.opts.keep_versions;
        let void_from = m.version.saturating_add(keep);
        let higher = self.list_versions(Some(m.version)).await?;
        if higher.iter().any(|v| *v >= void_from) {
            // The slot had been cleaned up: versions went on for at least
            // `keep` more while we were away. Our object is void.
            tracing::warn!(
                stream = self.stream(),
                version = m.version,
                "published into a slot emptied by clean-up; withdrawing it"
            );
            if let Err(e) = self.delete(&key).await {
                tracing::warn!(%key, error = %e, "could not delete a void manifest version");
            }
            return Ok(Publish::Conflict);
        }
        Ok(Publish::Done)
    }

    /// After publishing `version`: delete the version falling out of the
    /// kept window. Best effort.
    pub(super) async fn trim(&self, version: u64) {
        let keep = self.inner.opts.keep_versions;
        crate::failpoint::crash("manifest.trim");
        if let Some(old) = version.checked_sub(keep).filter(|v| *v >= 1)
            && let Err(e) = self.delete(&self.version_key(old)).await
        {
            tracing::warn!(stream = self.stream(), old, error = %e, "could not delete an old manifest version");
        }
    }

    /// Deletes every version older than the kept window (after taking
    /// ownership, to catch up on failed trims). Best effort.
    pub(super) async fn sweep(&self, version: u64) {
        let keep = self.inner.opts.keep_versions;
        let Some(limit) = version.checked_sub(keep) else {
            return;
        };
        match self.list_versions(None).await {
            Ok(vs) => {
                for v in vs.into_iter().filter(|v| *v <= limit) {
                    if let Err(e) = self.delete(&self.version_key(v)).await {
                        tracing::warn!(stream = self.stream(), v, error = %e, "could not delete an old manifest version");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(stream = self.stream(), error = %e, "could not list manifest versions for clean-up")
            }
        }
    }

    pub(super) async fn read_chunk(&self, r: &ChunkRef) -> Result<Vec<SegmentEntry>> {
        let cache = || self.inner.chunks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache().map.get(r) {
            return Ok(hit.as_ref().clone());
        }
        let what = format!("manifest chunk {}", r.key);
        let key = Path::parse(&r.key).map_err(|e| Error::corrupt(&what, e.to_string()))?;
        let bytes = self
            .get_bytes(&key, &what)
            .await?
            .ok_or_else(|| Error::corrupt(&what, "missing"))?;
        let entries = decode_chunk(&bytes, self.stream(), r, self.inner.opts.max_object_bytes)?;
        let mut c = cache();
        if c.entries + entries.len() > CHUNK_CACHE_ENTRIES {
            c.map.clear();
            c.entries = 0;
        }
        if entries.len() <= CHUNK_CACHE_ENTRIES {
            c.entries += entries.len();
            c.map.insert(r.clone(), Arc::new(entries.clone()));
        }
        Ok(entries)
    }

    /// Creates a chunk; an existing object must hold exactly these bytes.
    pub(super) async fn put_chunk(&self, key: &Path, bytes: Bytes) -> Result<()> {
        match self.create(key, bytes.clone()).await? {
            Created::New => Ok(()),
            Created::Exists => {
                let what = format!("manifest chunk {key}");
                match self.get_bytes(key, &what).await? {
                    Some(b) if b == bytes => Ok(()),
                    _ => Err(Error::RemoteConflict(format!(
                        "manifest chunk {key} exists with other bytes; not overwritten"
                    ))),
                }
            }
        }
    }
}
