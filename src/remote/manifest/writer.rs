//! The owner's writer: take ownership (epoch, lease), commit entries as a
//! new version, renew and release the lease, fenced by a newer epoch.

use super::*;

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// What [`ManifestWriter::commit`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new version lists the entries; `added` of them were new.
    Committed { version: u64, added: usize },
    /// Every entry was already listed (an earlier commit whose answer was
    /// lost, or a retry); nothing written.
    AlreadyCommitted { version: u64 },
}

/// The owner of a stream: commits entries, renews and releases the lease.
/// Every write carries this writer's epoch; once a newer epoch is seen the
/// writer is dead and every call returns [`Error::Fenced`].
#[derive(Debug)]
pub struct ManifestWriter {
    pub(super) ms: ManifestStore,
    pub(super) owner: String,
    pub(super) epoch: u64,
    pub(super) base: Manifest,
    pub(super) dead: Option<Error>,
    pub(super) chunk_cache: HashMap<String, Arc<Vec<SegmentEntry>>>,
    /// Renews the lease; shares its state (expiry, fence) with this writer.
    pub(super) keeper: LeaseKeeper,
}

pub(super) const CHUNK_CACHE_MAX: usize = 16;

/// Starts the advice a fence reason carries when the newer epoch is held
/// under this writer's own owner id (what a report looks for).
pub const SAME_OWNER_ID_FENCE: &str = "another broker runs with the same owner_id";

/// Why and what to do when the epoch that fenced `owner` is held by
/// `owner` too: two brokers sharing an id fence each other in turn, and a
/// message that called it "another owner" and advised a restart kept them
/// at it (helper-81 F3).
pub fn same_owner_id_advice(owner: &str) -> String {
    format!(
        "{SAME_OWNER_ID_FENCE} {owner:?} (a shared configuration file or a copied data \
         directory), or an operator took the stream as this id (`tierindex owner take`): give \
         each broker its own owner_id; do not simply restart this one: a restart under the same \
         id takes the stream back and fences the other"
    )
}

impl ManifestWriter {
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The last version this writer published or read.
    pub fn manifest(&self) -> &Manifest {
        &self.base
    }
    /// When the lease ends by this owner's last renewal (0 after release).
    #[cfg(any(test, feature = "testing"))]
    pub fn lease_expires_ms(&self) -> u64 {
        self.base
            .lease
            .as_ref()
            .map_or(0, |l| l.expires_ms.max(self.keeper.expires_ms()))
    }
    /// Renews this writer's lease without borrowing the writer (so renewals
    /// never wait behind commits). Shares the fence with the writer.
    pub fn lease_keeper(&self) -> LeaseKeeper {
        self.keeper.clone()
    }
    pub fn store(&self) -> &ManifestStore {
        &self.ms
    }

    pub(super) fn check_alive(&self) -> Result<()> {
        if let Some(why) = self.keeper.fenced() {
            return Err(Error::Fenced(why.to_string()));
        }
        match &self.dead {
            None => Ok(()),
            Some(Error::Fenced(m)) => Err(Error::Fenced(m.clone())),
            Some(e) => Err(Error::Fenced(e.to_string())),
        }
    }

    /// Re-reads after a lost race: the newest version must still be ours
    /// (same epoch, our lease), else this writer is fenced for good.
    pub(super) async fn rebase(&mut self) -> Result<()> {
        let stream = self.ms.stream().to_string();
        let Some((latest, _)) = self.ms.load_latest().await? else {
            return Err(Error::corrupt(
                format!("manifest {stream}"),
                "no version left after one was published",
            ));
        };
        let now = self.ms.now_ms();
        let fenced = if latest.epoch > self.epoch {
            let same_id = latest.lease.as_ref().is_some_and(|l| l.owner == self.owner);
            let holder = match &latest.lease {
                Some(l) => format!(
                    "owner {:?} with a lease until {}",
                    l.owner,
                    lease::describe_time(l.expires_ms, now)
                ),
                None => "no current lease".into(),
            };
            let mut why = format!(
                "stream {stream:?}: epoch {} ({holder}) replaced our epoch {} (owner {:?}) at \
                 manifest version {}; stop publishing",
                latest.epoch, self.epoch, self.owner, latest.version
            );
            if same_id {
                why.push_str(&format!("; {}", same_owner_id_advice(&self.owner)));
            }
            Some(why)
        } else if latest.epoch < self.epoch {
            return Err(Error::corrupt(
                format!("manifest {stream} version {}", latest.version),
                format!(
                    "epoch went back from ours {} to {}",
                    self.epoch, latest.epoch
                ),
            ));
        } else {
            match &latest.lease {
                Some(l) if l.owner == self.owner => None,
                Some(l) => Some(format!(
                    "stream {stream:?}: epoch {} is recorded for owner {:?}, not us ({:?})",
                    latest.epoch, l.owner, self.owner
                )),
                None => Some(format!(
                    "stream {stream:?}: our epoch {} was released at manifest version {}",
                    self.epoch, latest.version
                )),
            }
        };
        if let Some(why) = fenced {
            tracing::warn!(stream, epoch = self.epoch, "fenced: {why}");
            self.keeper.fence(&why);
            self.dead = Some(Error::Fenced(why.clone()));
            return Err(Error::Fenced(why));
        }
        self.base = latest;
        Ok(())
    }

    /// Publishes `make(base)` as the next version, re-reading and rebuilding
    /// after each lost race. `make` returns `None` when nothing needs writing.
    pub(super) async fn publish_next<F>(&mut self, what: &str, mut make: F) -> Result<Option<u64>>
    where
        F: FnMut(&Manifest, u64) -> Result<Option<Manifest>>,
    {
        self.check_alive()?;
        for _ in 0..self.ms.inner.opts.max_conflicts {
            let now = self.ms.now_ms();
            let Some(next) = make(&self.base, now)? else {
                return Ok(None);
            };
            match self.ms.publish(&next).await? {
                Publish::Done => {
                    self.ms.trim(next.version).await;
                    let v = next.version;
                    self.base = next;
                    return Ok(Some(v));
                }
                Publish::Conflict => self.rebase().await?,
            }
        }
        Err(self.ms.too_many_conflicts(what))
    }

    /// The next version of `base` with `damaged` as its damage notes.
    fn with_notes(base: &Manifest, now: u64, damaged: Vec<DamageNote>) -> Result<Manifest> {
        Ok(Manifest {
            version: Self::next_version(base)?,
            written_ms: now,
            damaged,
            ..base.clone()
        })
    }

    pub(super) fn next_version(base: &Manifest) -> Result<u64> {
        base.version.checked_add(1).ok_or_else(|| {
            Error::corrupt(format!("manifest {}", base.stream), "version at u64::MAX")
        })
    }

    /// Extends the lease to now + `ttl` with a renewal object (the manifest
    /// head is not rewritten; see [`LeaseKeeper::renew`]). Allowed after
    /// expiry as long as nobody took over (the epoch is still ours).
    #[cfg(any(test, feature = "testing"))]
    pub async fn renew(&mut self, ttl: Duration) -> Result<()> {
        self.check_alive()?;
        match self.keeper.renew(ttl).await {
            Err(Error::Fenced(why)) => {
                self.dead = Some(Error::Fenced(why.clone()));
                Err(Error::Fenced(why))
            }
            r => r,
        }
    }

    /// Gives the stream up: publishes a version without a lease (the epoch
    /// stays; the next owner takes epoch + 1 without waiting). Renewals
    /// stop first.
    pub async fn release(mut self) -> Result<()> {
        self.keeper.mark_released();
        let r = self
            .publish_next("release", |base, now| {
                Ok(Some(Manifest {
                    version: Self::next_version(base)?,
                    written_ms: now,
                    lease: None,
                    ..base.clone()
                }))
            })
            .await;
        // Off the host's list only now: a host lease that stopped holding
        // the stream before the release landed would let another owner
        // take it meanwhile.
        self.keeper.leave_host();
        r?;
        Ok(())
    }

    /// Records that segment `note.id`'s object is damaged (readers skip it
    /// until [`clear_damage`](Self::clear_damage)). The segment must be
    /// listed under `note.key`. An identical note (same key and `lost`)
    /// writes nothing; `lost` only ever goes from false to true here.
    pub async fn mark_damaged(&mut self, note: DamageNote) -> Result<Option<u64>> {
        self.check_alive()?;
        match self.find(note.id).await? {
            Some(e) if e.key == note.key => {}
            Some(e) => {
                return Err(Error::InvalidInput(format!(
                    "segment {} is listed under {:?}, not {:?}",
                    note.id, e.key, note.key
                )));
            }
            None => {
                return Err(Error::InvalidInput(format!(
                    "segment {} is not in the manifest of {:?}",
                    note.id,
                    self.ms.stream()
                )));
            }
        }
        self.publish_next("mark damaged", |base, now| {
            let mut damaged = base.damaged.clone();
            match damaged.binary_search_by_key(&note.id, |d| d.id) {
                Ok(i) => {
                    let Some(old) = damaged.get_mut(i) else {
                        return Ok(None);
                    };
                    if old.lost || old.lost == note.lost {
                        return Ok(None);
                    }
                    *old = note.clone();
                }
                Err(i) => {
                    if damaged.len() >= DAMAGE_NOTES_MAX {
                        return Err(Error::RemoteRetryable(format!(
                            "manifest of {:?} already carries {DAMAGE_NOTES_MAX} damage notes; \
                             repair some first",
                            base.stream
                        )));
                    }
                    damaged.insert(i, note.clone());
                }
            }
            Ok(Some(Self::with_notes(base, now, damaged)?))
        })
        .await
    }

    /// Records an operator's acceptance of the loss of segment `id`, whose
    /// note must be LOST and listed under `key` (the caller proved no
    /// intact copy is held: `tierindex reconcile --accept-loss`). An accepted note
    /// writes nothing; readers go on skipping the segment.
    pub async fn accept_loss(&mut self, id: SegmentId, key: &str, reason: &str) -> Result<Option<u64>> {
        self.check_alive()?;
        let reason = cut_to(reason, DAMAGE_REASON_MAX);
        self.publish_next("accept loss", |base, now| {
            let mut damaged = base.damaged.clone();
            let Some(note) = damaged.iter_mut().find(|d| d.id == id) else {
                return Err(Error::InvalidInput(format!(
                    "the manifest of {:?} has no damage note for segment {id}",
                    base.stream
                )));
            };
            if note.key != key || !note.lost {
                return Err(Error::InvalidInput(format!(
                    "segment {id}'s damage note is {} under {:?}, not LOST under {key:?}: \
                     nothing accepted",
                    if note.lost { "LOST" } else { "not LOST" },
                    note.key
                )));
            }
            if note.accepted.is_some() {
                return Ok(None);
            }
            note.accepted = Some(LossAcceptance {
                at_ms: now,
                reason: reason.clone(),
            });
            Ok(Some(Self::with_notes(base, now, damaged)?))
        })
        .await
    }

    /// Removes segment `id`'s damage note (its object was re-uploaded and
    /// verified). Nothing to remove writes nothing.
    pub async fn clear_damage(&mut self, id: SegmentId) -> Result<Option<u64>> {
        self.publish_next("clear damage", |base, now| {
            if base.damage(id).is_none() {
                return Ok(None);
            }
            let damaged = base.damaged.iter().filter(|d| d.id != id).cloned().collect();
            Ok(Some(Self::with_notes(base, now, damaged)?))
        })
        .await
    }

    /// Adds `entries` to the manifest in one new version. Entries already
    /// listed with identical content are skipped (a retry is harmless); one
    /// listed with other content is [`Error::RemoteConflict`]. Fails with
    /// [`Error::Fenced`] when a newer epoch exists; then nothing of this call
    /// is in the manifest.
    pub async fn commit(&mut self, entries: &[SegmentEntry]) -> Result<CommitOutcome> {
        self.check_alive()?;
        let entries = self.check_input(entries)?;
        for _ in 0..self.ms.inner.opts.max_conflicts {
            let new = self.missing(&entries).await?;
            if new.is_empty() {
                return Ok(CommitOutcome::AlreadyCommitted {
                    version: self.base.version,
                });
            }
            let added = new.len();
            let now = self.ms.now_ms();
            let mut next = Manifest {
                version: Self::next_version(&self.base)?,
                written_ms: now,
                segment_count: self.base.segment_count.saturating_add(added as u64),
                ..self.base.clone()
            };
            next.segments.extend(new);
            next.segments.sort_by_key(|e| e.id);
            self.spill(&mut next).await?;
            match self.ms.publish(&next).await? {
                Publish::Done => {
                    self.ms.trim(next.version).await;
                    let version = next.version;
                    self.base = next;
                    return Ok(CommitOutcome::Committed { version, added });
                }
                Publish::Conflict => self.rebase().await?,
            }
        }
        Err(self.ms.too_many_conflicts("commit"))
    }

    /// Input checks: well-formed keys of this stream, ids unique (identical
    /// duplicates collapse).
    pub(super) fn check_input(&self, entries: &[SegmentEntry]) -> Result<Vec<SegmentEntry>> {
        let prefix = self.ms.inner.store.prefix();
        let mut v = entries.to_vec();
        for e in &v {
            e.check().map_err(Error::InvalidInput)?;
            let parsed = Path::parse(&e.key)
                .ok()
                .and_then(|p| keys::parse_segment_key(prefix, &p));
            if !matches!(&parsed, Some((s, _, _)) if s == self.ms.stream()) {
                return Err(Error::InvalidInput(format!(
                    "segment key {:?} is not under {prefix}/{}/segments",
                    e.key,
                    self.ms.stream()
                )));
            }
        }
        v.sort_by_key(|e| e.id);
        v.dedup();
        if let Some(w) = v.windows(2).find(|w| matches!(w, [a, b] if a.id == b.id)) {
            let id = w.first().map(|e| e.id).unwrap_or_default();
            return Err(Error::InvalidInput(format!(
                "segment {id} given twice with different content"
            )));
        }
        Ok(v)
    }

    /// The entries not yet in the base manifest (inline or in a chunk).
    pub(super) async fn missing(&mut self, entries: &[SegmentEntry]) -> Result<Vec<SegmentEntry>> {
        let mut out = Vec::new();
        for e in entries {
            match self.find(e.id).await? {
                Some(found) if found == *e => {}
                Some(found) => {
                    return Err(Error::RemoteConflict(format!(
                        "segment {} is already in the manifest of {:?} as {:?} \
                         (checksum {}, {} bytes); refusing {:?} (checksum {}, {} bytes)",
                        e.id,
                        self.ms.stream(),
                        found.key,
                        found.key_sum(),
                        found.file_len,
                        e.key,
                        e.key_sum(),
                        e.file_len
                    )));
                }
                None => out.push(e.clone()),
            }
        }
        Ok(out)
    }

    /// The entry the manifest (as this writer last saw it) lists under
    /// `id`, inline or in a chunk.
    pub async fn listed(&mut self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        self.find(id).await
    }

    pub(super) async fn find(&mut self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        if let Some(e) = self.base.inline(id) {
            return Ok(Some(e.clone()));
        }
        let covering: Vec<ChunkRef> = self
            .base
            .chunks
            .iter()
            .filter(|c| c.covers(id))
            .cloned()
            .collect();
        for c in covering {
            let entries = match self.chunk_cache.get(&c.key) {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(self.ms.read_chunk(&c).await?);
                    if self.chunk_cache.len() >= CHUNK_CACHE_MAX {
                        self.chunk_cache.clear();
                    }
                    self.chunk_cache.insert(c.key.clone(), e.clone());
                    e
                }
            };
            if let Ok(i) = entries.binary_search_by_key(&id, |e| e.id) {
                return Ok(entries.get(i).cloned());
            }
        }
        Ok(None)
    }

    /// While more than `max_inline` entries are inline, moves the lowest
    /// `chunk_entries` into a new create-only chunk object.
    pub(super) async fn spill(&mut self, next: &mut Manifest) -> Result<()> {
        let (max_inline, per_chunk) = (
            self.ms.inner.opts.max_inline,
            self.ms.inner.opts.chunk_entries,
        );
        while next.segments.len() > max_inline {
            let rest = next.segments.split_off(per_chunk.min(next.segments.len()));
            let spilled = std::mem::replace(&mut next.segments, rest);
            let (bytes, mut r) = encode_chunk(self.ms.stream(), &spilled)?;
            let key = self.ms.chunk_key(&r.key);
            r.key = key.to_string();
            self.ms.put_chunk(&key, Bytes::from(bytes)).await?;
            self.chunk_cache.insert(r.key.clone(), Arc::new(spilled));
            next.chunks.push(r);
        }
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{RemoteStore, StoreOptions};
    use std::time::Duration;

    /// A second writer under the same owner id takes the stream (a shared
    /// configuration file): the first one's fence says so and advises
    /// against a plain restart (helper-81 F3).
    #[tokio::test]
    async fn a_fence_by_our_own_owner_id_says_so() {
        let d = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(d.path()).unwrap();
        let remote = RemoteStore::from_url(url.as_str(), &StoreOptions::default()).unwrap();
        let ms = ManifestStore::open(&remote, "s", ManifestOptions::default())
            .await
            .unwrap();
        let entry = |id: u64| {
            let meta = crate::segment::SealedMeta {
                id: crate::SegmentId(id),
                file_len: 1_000 + id,
                file_crc: 1,
                crc64: None,
                item_count: 10,
                min_ts: id * 10,
                max_ts: id * 10 + 9,
                min_offset: id * 100,
                max_offset: id * 100 + 9,
                created_ms: 1,
                sealed_ms: 1,
            };
            SegmentEntry::new(&remote, "s", &meta).unwrap()
        };
        let ttl = Duration::from_secs(60);
        let mut a = ms.take_ownership("broker-1", ttl).await.unwrap();
        a.commit(&[entry(1)]).await.unwrap();
        let _b = ms.take_ownership("broker-1", ttl).await.unwrap();
        let Err(Error::Fenced(why)) = a.commit(&[entry(2)]).await else {
            panic!("not fenced");
        };
        assert!(why.contains(SAME_OWNER_ID_FENCE), "{why}");
        assert!(why.contains("\"broker-1\"") && why.contains("do not simply restart"), "{why}");
    }
}
