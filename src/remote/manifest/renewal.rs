//! Lease renewals: small create-only objects next to the manifest, so that
//! keeping a lease neither rewrites the manifest head (up to `max_inline`
//! entries) nor waits behind commits for the manifest writer.
//!
//! ```text
//! {prefix}/{stream}/manifest/leases/{epoch:020}/{seq:020}.lease
//! ```
//!
//! The manifest head still records the lease as taken (owner, epoch,
//! acquired, first expiry). Each renewal is the next `seq` of the owner's
//! epoch: a 16-byte envelope (kind 3) around `{format, stream, owner, epoch,
//! seq, written_ms, expires_ms}`. The lease in force is the head's, with
//! its expiry moved to the latest renewal of the same epoch and owner
//! ([`ManifestStore::current_lease`]). Renewals of any other epoch, of
//! another owner, or of a released head (`lease: null`) count for nothing.
//!
//! A taker writes `seq` 0 of its new epoch right after publishing it; an
//! owner's renewal lists `leases/` above its own epoch afterwards, so a
//! takeover is noticed at the next renewal as well as at the next commit
//! (a taker that died between publishing and writing `seq` 0 is noticed at
//! the next commit only). Safety never rests on this: every manifest write
//! carries the epoch.
//!
//! Old renewals are deleted (best effort): the owner keeps the newest
//! [`KEEP_RENEWALS`] of its epoch, and a taker deletes every older epoch's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::hosted::Membership;
use super::{
    Created, FORMAT_VERSION, Manifest, ManifestStore, check_format, decode_envelope,
    encode_envelope,
};
use crate::error::{Error, Result};
use crate::remote::lease::{self, LEASE_TTL_MAX, Lease};

/// Folder under `manifest/` with the renewal objects, one folder per epoch.
pub const LEASES_DIR: &str = "leases";
pub const LEASE_SUFFIX: &str = ".lease";
const KIND_RENEWAL: u8 = 3;
/// Renewals of its epoch an owner keeps; older ones are deleted.
pub const KEEP_RENEWALS: u64 = 3;
/// Largest renewal object read (they are about 200 bytes).
const MAX_RENEWAL_BYTES: usize = 4096;

/// One renewal of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renewal {
    pub format: u32,
    pub stream: String,
    pub owner: String,
    pub epoch: u64,
    pub seq: u64,
    /// The writer's wall clock when it renewed.
    pub written_ms: u64,
    /// Until when (exclusive) the lease is live, by the writer's clock.
    pub expires_ms: u64,
    /// The host lease that keeps this lease live from now on (see
    /// `hosted`): a hosted stream writes one renewal per epoch, naming its
    /// host, and its host renews them all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn epoch_name(epoch: u64) -> String {
    format!("{epoch:020}")
}

fn renewal_name(seq: u64) -> String {
    format!("{seq:020}{LEASE_SUFFIX}")
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.len() != 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Encodes a renewal (envelope + JSON).
pub fn encode_renewal(r: &Renewal) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(r)
        .map_err(|e| Error::InvalidInput(format!("lease renewal does not encode: {e}")))?;
    encode_envelope(KIND_RENEWAL, &body)
}

/// Decodes a renewal read from the key of (`epoch`, `seq`) of `stream`, and
/// checks it against the key. Never panics, whatever the bytes.
pub fn decode_renewal(bytes: &[u8], stream: &str, epoch: u64, seq: u64) -> Result<Renewal> {
    let what = format!("lease renewal {stream} epoch {epoch} seq {seq}");
    let body = decode_envelope(bytes, KIND_RENEWAL, MAX_RENEWAL_BYTES, &what)?;
    check_format(body, &what)?;
    let r: Renewal = serde_json::from_slice(body)
        .map_err(|e| Error::corrupt(&what, format!("body does not decode: {e}")))?;
    let max_ttl = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap_or(u64::MAX);
    let bad = if r.stream != stream {
        Some(format!("names stream {:?}", r.stream))
    } else if r.epoch != epoch || r.seq != seq {
        Some(format!(
            "names epoch {} seq {}, its key epoch {epoch} seq {seq}",
            r.epoch, r.seq
        ))
    } else if lease::validate_owner(&r.owner).is_err() {
        Some("invalid owner id".to_string())
    } else if r.host.as_deref().is_some_and(|h| !super::hosted::valid_host_id(h)) {
        Some("invalid host id".to_string())
    } else if r.expires_ms <= r.written_ms || r.expires_ms - r.written_ms > max_ttl {
        Some(format!(
            "expiry {} is not within the longest TTL after its write time {}",
            r.expires_ms, r.written_ms
        ))
    } else {
        None
    };
    match bad {
        Some(d) => Err(Error::corrupt(&what, d)),
        None => Ok(r),
    }
}

/// A lease as a reader sees it: the head's, with the latest expiry any
/// readable renewal of the same epoch and owner gives it, and how long the
/// writer asked for (for the monotonic check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentLease {
    pub lease: Lease,
    /// TTL of the write that set `lease.expires_ms` (head or renewal).
    pub ttl_ms: u64,
    /// The newest renewal seen (`None`: none yet). A new one means the
    /// holder is still renewing, whatever the expiries say.
    pub seq: Option<u64>,
    /// The newest renewal of the host lease that holds this lease (`None`:
    /// not hosted, or the host no longer lists it). Counts like `seq`.
    pub host_seq: Option<u64>,
}

/// What this process last saw of another owner's lease, on its monotonic
/// clock: a lease whose holder wrote no new renewal for its whole TTL here
/// is expired, whatever expiry its writer's (possibly jumped) wall clock
/// wrote.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    owner: String,
    epoch: u64,
    seq: Option<u64>,
    host_seq: Option<u64>,
    since_mono_ms: u64,
}

/// Sightings shared by every `ManifestStore` on the system clock (one per
/// store URL and stream), so a broker that reopens, or a pending take that
/// builds a new store per attempt, keeps counting. Bounded: cleared when
/// over [`SEEN_MAX`] streams.
static SEEN: std::sync::Mutex<Option<std::collections::HashMap<String, Seen>>> =
    std::sync::Mutex::new(None);
const SEEN_MAX: usize = 4096;

impl ManifestStore {
    /// `{prefix}/{stream}/manifest/leases`.
    pub fn leases_dir(&self) -> Path {
        self.inner.dir.clone().join(LEASES_DIR)
    }
    fn epoch_dir(&self, epoch: u64) -> Path {
        self.leases_dir().join(epoch_name(epoch))
    }
    /// The key of renewal `seq` of `epoch`.
    pub fn renewal_key(&self, epoch: u64, seq: u64) -> Path {
        self.epoch_dir(epoch).join(renewal_name(seq))
    }

    /// Every renewal object under `leases/` as (epoch, seq), or only those
    /// of epochs above `above`.
    async fn list_renewals(&self, dir: Path, above: Option<u64>) -> Result<Vec<(u64, u64)>> {
        let leases = self.leases_dir();
        let offset = above.map(|e| self.renewal_key(e, u64::MAX));
        let listed = self.list_under(&dir, offset, "lease LIST").await?;
        Ok(listed
            .iter()
            .filter_map(|m| {
                let mut parts = m.location.prefix_match(&leases)?;
                let epoch = parse_digits(parts.next()?.as_ref())?;
                let seq = parse_digits(parts.next()?.as_ref().strip_suffix(LEASE_SUFFIX)?)?;
                if parts.next().is_some() {
                    return None;
                }
                Some((epoch, seq))
            })
            .filter(|(e, _)| above.is_none_or(|a| *e > a))
            .collect())
    }

    /// The readable renewals of `epoch` written by `owner`: the one with
    /// the latest expiry, the newest seq, and the host the newest renewal
    /// naming one names. A renewal that vanished
    /// (deleted meanwhile), is too large or does not decode is skipped
    /// (logged): a renewal only ever extends a lease, so skipping one can
    /// only end it sooner. A failed request is an error (a taker must not
    /// take over because a read failed).
    async fn renewals_of(
        &self,
        epoch: u64,
        owner: &str,
    ) -> Result<Option<(Renewal, u64, Option<String>)>> {
        let seqs: Vec<u64> = self
            .list_renewals(self.epoch_dir(epoch), None)
            .await?
            .into_iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s)
            .collect();
        let mut best: Option<(Renewal, u64)> = None;
        let mut host: Option<(u64, String)> = None;
        for seq in seqs {
            let what = format!("lease renewal {} epoch {epoch} seq {seq}", self.stream());
            let key = self.renewal_key(epoch, seq);
            let bytes = match self.get_bytes_max(&key, &what, MAX_RENEWAL_BYTES).await {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(stream = self.stream(), error = %e, "unreadable lease renewal ignored");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match decode_renewal(&bytes, self.stream(), epoch, seq) {
                Ok(r) if r.owner == owner => {
                    if let Some(h) = &r.host
                        && host.as_ref().is_none_or(|(s, _)| *s < seq)
                    {
                        host = Some((seq, h.clone()));
                    }
                    best = Some(match best {
                        None => (r, seq),
                        Some((b, top)) => {
                            let top = top.max(seq);
                            if r.expires_ms > b.expires_ms {
                                (r, top)
                            } else {
                                (b, top)
                            }
                        }
                    });
                }
                Ok(r) => tracing::warn!(
                    stream = self.stream(),
                    epoch,
                    seq,
                    owner = %r.owner,
                    holder = owner,
                    "lease renewal written by another owner than the epoch's; ignored"
                ),
                Err(e) => tracing::warn!(
                    stream = self.stream(),
                    error = %e,
                    "unreadable lease renewal ignored"
                ),
            }
        }
        Ok(best.map(|(r, top)| (r, top, host.map(|(_, h)| h))))
    }

    /// The lease in force by manifest `m`: its head lease, its expiry
    /// moved to the latest renewal of the same epoch and owner, and, when
    /// those name a host lease that still lists the stream at that epoch
    /// and owner, to the host's newest renewal. `None` when the head has no
    /// lease (released).
    pub async fn current_lease(&self, m: &Manifest) -> Result<Option<CurrentLease>> {
        let Some(head) = &m.lease else {
            return Ok(None);
        };
        let mut cur = CurrentLease {
            lease: head.clone(),
            ttl_ms: head.expires_ms.saturating_sub(head.acquired_ms),
            seq: None,
            host_seq: None,
        };
        if let Some((r, top, host)) = self.renewals_of(head.epoch, &head.owner).await? {
            cur.seq = Some(top);
            if r.expires_ms > cur.lease.expires_ms {
                cur.lease.expires_ms = r.expires_ms;
                cur.ttl_ms = r.expires_ms - r.written_ms;
            }
            if let Some(h) = host
                && let Some(hr) = self.host_lease(&h).await?
                && hr.holds(self.stream(), &head.owner, head.epoch)
            {
                cur.host_seq = Some(hr.seq);
                if hr.expires_ms > cur.lease.expires_ms {
                    cur.lease.expires_ms = hr.expires_ms;
                    cur.ttl_ms = hr.expires_ms - hr.written_ms;
                }
            }
        }
        Ok(Some(cur))
    }

    /// Whether another owner's lease keeps `owner_id` out now: live by the
    /// wall clock ([`Lease::is_live`]) and not stale by this process's
    /// monotonic clock (seen unchanged here for a whole TTL: its writer
    /// stopped renewing, whatever expiry its clock wrote).
    pub(super) fn keeps_out(&self, cur: &CurrentLease, owner_id: &str, now: u64) -> bool {
        let l = &cur.lease;
        if l.owner == owner_id || !l.is_live(now) {
            return false;
        }
        let mono = self.inner.clock.mono_ms();
        self.with_seen(|seen| match seen.as_ref() {
            Some(s)
                if s.owner == l.owner
                    && s.epoch == l.epoch
                    && s.seq == cur.seq
                    && s.host_seq == cur.host_seq =>
            {
                let unchanged = mono.saturating_sub(s.since_mono_ms);
                if unchanged >= cur.ttl_ms {
                    tracing::warn!(
                        stream = self.stream(),
                        holder = %l.owner,
                        epoch = l.epoch,
                        unchanged_ms = unchanged,
                        ttl_ms = cur.ttl_ms,
                        "the holder's lease claims to be live by its clock but has not been \
                         renewed for its whole TTL by this process's monotonic clock (its \
                         writer's clock is probably ahead); taking over"
                    );
                    return false;
                }
                true
            }
            _ => {
                *seen = Some(Seen {
                    owner: l.owner.clone(),
                    epoch: l.epoch,
                    seq: cur.seq,
                    host_seq: cur.host_seq,
                    since_mono_ms: mono,
                });
                true
            }
        })
    }

    /// Runs `f` on this stream's sighting: the process-wide one on the
    /// system clock, else this store's own (a test clock).
    fn with_seen<R>(&self, f: impl FnOnce(&mut Option<Seen>) -> R) -> R {
        if !self.inner.clock.process_wide() {
            let mut g = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
            return f(&mut g);
        }
        let key = format!("{}\u{0}{}", self.inner.store.display_url(), self.inner.dir);
        let mut g = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let map = g.get_or_insert_with(std::collections::HashMap::new);
        if map.len() >= SEEN_MAX && !map.contains_key(&key) {
            map.clear();
        }
        let mut slot = map.remove(&key);
        let r = f(&mut slot);
        if let Some(s) = slot {
            map.insert(key, s);
        }
        r
    }

    /// Creates renewal `r` under its key. `Ok(false)`: the key holds other
    /// bytes.
    async fn put_renewal(&self, r: &Renewal) -> Result<bool> {
        let bytes = Bytes::from(encode_renewal(r)?);
        let key = self.renewal_key(r.epoch, r.seq);
        match self.create(&key, bytes.clone()).await? {
            Created::New => Ok(true),
            Created::Exists => {
                let what = format!("lease renewal {key}");
                // Our own earlier attempt whose answer was lost, or not ours.
                Ok(self
                    .get_bytes(&key, &what)
                    .await?
                    .is_some_and(|b| b == bytes))
            }
        }
    }

    /// The highest epoch with a renewal folder above `epoch`, if any: an
    /// owner that took the stream after us.
    async fn epoch_above(&self, epoch: u64) -> Result<Option<u64>> {
        Ok(self
            .list_renewals(self.leases_dir(), Some(epoch))
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .max())
    }

    /// A renewal folder of epoch `seen` lies above ours: whether the
    /// manifest confirms a newer epoch. A folder the manifest does not back
    /// (left over from a manifest history that was lost and rebuilt at a
    /// lower epoch) is not a takeover: logged, and deleted by the next
    /// take's sweep.
    async fn head_epoch_above(&self, ours: u64, seen: u64) -> Result<bool> {
        let head = self.load().await?.map(|m| m.epoch);
        if head.is_some_and(|h| h > ours) {
            return Ok(true);
        }
        tracing::warn!(
            stream = self.stream(),
            epoch = ours,
            folder = seen,
            manifest_epoch = ?head,
            "a lease renewal folder of a higher epoch than the manifest's; ignored (left over \
             from an earlier manifest history)"
        );
        Ok(false)
    }

    /// Deletes the renewals of every epoch but `epoch` (a taker's clean-up:
    /// older epochs', and any higher one left over from a manifest history
    /// that was lost). Best effort.
    pub(super) async fn sweep_renewals(&self, epoch: u64) {
        match self.list_renewals(self.leases_dir(), None).await {
            Ok(all) => {
                // Higher folders only while the manifest is still at our
                // epoch (a taker racing us after our publish keeps its own).
                let higher_stale = if all.iter().any(|(e, _)| *e > epoch) {
                    matches!(self.load().await, Ok(Some(m)) if m.epoch == epoch)
                } else {
                    false
                };
                for (e, s) in all
                    .into_iter()
                    .filter(|(e, _)| *e < epoch || (higher_stale && *e > epoch))
                {
                    if let Err(err) = self.delete(&self.renewal_key(e, s)).await {
                        tracing::warn!(stream = self.stream(), epoch = e, seq = s, error = %err, "could not delete an old lease renewal");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(stream = self.stream(), error = %e, "could not list lease renewals for clean-up")
            }
        }
    }
}

/// Renews one owner's lease without the manifest writer: cheap to clone,
/// usable while a commit holds the writer. Shares its state with the
/// [`super::ManifestWriter`] it came from.
#[derive(Clone, Debug)]
pub struct LeaseKeeper {
    inner: Arc<KeeperInner>,
}

#[derive(Debug)]
struct KeeperInner {
    ms: ManifestStore,
    owner: String,
    epoch: u64,
    /// The next renewal's seq; the lock also serialises renewals.
    next_seq: tokio::sync::Mutex<u64>,
    /// The expiry of the latest renewal that landed (or of the take).
    expires_ms: AtomicU64,
    released: AtomicBool,
    fenced: OnceLock<String>,
    /// The host lease that renews this one (a [`crate::Host`]'s stream);
    /// dropped at release, which takes the stream off the host's list.
    hosted: std::sync::Mutex<Option<Membership>>,
    /// A renewal naming the host landed: the host renews from now on.
    delegated: AtomicBool,
}

impl LeaseKeeper {
    pub(super) fn new(ms: ManifestStore, owner: &str, epoch: u64, expires_ms: u64) -> LeaseKeeper {
        LeaseKeeper {
            inner: Arc::new(KeeperInner {
                ms,
                owner: owner.to_string(),
                epoch,
                next_seq: tokio::sync::Mutex::new(0),
                expires_ms: AtomicU64::new(expires_ms),
                released: AtomicBool::new(false),
                fenced: OnceLock::new(),
                hosted: std::sync::Mutex::new(None),
                delegated: AtomicBool::new(false),
            }),
        }
    }

    /// Hands this lease to a host lease: the next renewal names the host,
    /// and the host renews it from then on.
    pub(super) fn set_host(&self, m: Membership) {
        *self.hosted() = Some(m);
    }

    /// Takes the stream off its host's list (release, shutdown).
    pub fn leave_host(&self) {
        let m = self.hosted().take();
        drop(m);
    }

    fn hosted(&self) -> std::sync::MutexGuard<'_, Option<Membership>> {
        self.inner
            .hosted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a host renews this lease (its renewal naming the host
    /// landed): [`renew`](Self::renew) then writes nothing.
    pub fn is_hosted(&self) -> bool {
        self.inner.delegated.load(Ordering::SeqCst)
            && self.hosted().as_ref().is_some_and(Membership::running)
    }

    /// Resolves when the host lease renewing this one stops running (its
    /// tokio runtime ended): the lease task then renews on its own again.
    /// `None`: not hosted.
    pub fn host_ended(&self) -> Option<impl Future<Output = ()> + Send + use<>> {
        self.hosted().as_ref().map(Membership::ended)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }
    /// The expiry of the latest renewal that landed.
    #[cfg(any(test, feature = "testing"))]
    pub fn expires_ms(&self) -> u64 {
        let own = self.inner.expires_ms.load(Ordering::SeqCst);
        let host = self.hosted().as_ref().map_or(0, Membership::expires_ms);
        own.max(host)
    }
    /// Why this owner is fenced, once a renewal or commit found out.
    pub fn fenced(&self) -> Option<&str> {
        self.inner.fenced.get().map(String::as_str)
    }
    pub(super) fn fence(&self, why: &str) {
        let _ = self.inner.fenced.set(why.to_string());
    }
    pub(super) fn mark_released(&self) {
        self.inner.released.store(true, Ordering::SeqCst);
    }

    /// Writes the next renewal: the lease lasts until now + `ttl`. Allowed
    /// after expiry as long as nobody took over. Then checks for a newer
    /// epoch: [`Error::Fenced`] once another owner took the stream. A
    /// hosted lease writes one renewal, naming its host, and nothing after
    /// it lands: the host renews it.
    pub async fn renew(&self, ttl: Duration) -> Result<()> {
        let k = &self.inner;
        if let Some(why) = k.fenced.get() {
            return Err(Error::Fenced(why.clone()));
        }
        if k.released.load(Ordering::SeqCst) {
            return Err(Error::ShutDown);
        }
        if self.is_hosted() {
            return Ok(());
        }
        let host = self.hosted().as_ref().map(|m| m.host_id().to_string());
        let mut next = k.next_seq.lock().await;
        let mut landed = false;
        for _ in 0..3 {
            let now = k.ms.now_ms();
            let r = Renewal {
                format: FORMAT_VERSION,
                stream: k.ms.stream().to_string(),
                owner: k.owner.clone(),
                epoch: k.epoch,
                seq: *next,
                written_ms: now,
                expires_ms: lease::expiry(now, ttl)?,
                host: host.clone(),
            };
            crate::failpoint::crash("lease.renew");
            if k.ms.put_renewal(&r).await? {
                *next = r.seq.saturating_add(1);
                k.expires_ms.fetch_max(r.expires_ms, Ordering::SeqCst);
                if host.is_some() {
                    k.delegated.store(true, Ordering::SeqCst);
                }
                if let Some(old) = r.seq.checked_sub(KEEP_RENEWALS)
                    && let Err(e) = k.ms.delete(&k.ms.renewal_key(k.epoch, old)).await
                {
                    tracing::debug!(stream = k.ms.stream(), error = %e, "could not delete an old lease renewal");
                }
                landed = true;
                break;
            }
            // The slot holds other bytes (an older incarnation of this
            // process with the same epoch cannot exist, so this is a seq
            // we lost track of): continue above everything listed.
            let top =
                k.ms.list_renewals(k.ms.epoch_dir(k.epoch), None)
                    .await?
                    .into_iter()
                    .filter(|(e, _)| *e == k.epoch)
                    .map(|(_, s)| s)
                    .max()
                    .unwrap_or(0);
            *next = top.saturating_add(1).max(next.saturating_add(1));
        }
        drop(next);
        self.fence_if_taken().await?;
        if !landed {
            return Err(Error::RemoteRetryable(format!(
                "lease renewal of stream {:?} epoch {}: three renewal slots were taken by \
                 other bytes",
                k.ms.stream(),
                k.epoch
            )));
        }
        Ok(())
    }

    /// Whether another owner took the stream (a newer epoch's renewal
    /// folder, confirmed by the manifest's head): then fenced, and
    /// [`Error::Fenced`]. One listing, and a read only when one is found.
    /// A hosted lease runs it once its host's renewals land again after a
    /// gap ([`Self::host_lapses`]); at most a few of a host's streams at
    /// once.
    pub async fn check_taken(&self) -> Result<()> {
        if let Some(why) = self.fenced() {
            return Err(Error::Fenced(why.to_string()));
        }
        let permits = self.hosted().as_ref().map(Membership::check_permits);
        let _permit = match permits {
            Some(p) => p.acquire_owned().await.ok(),
            None => None,
        };
        self.fence_if_taken().await
    }

    /// `None`: not hosted. See [`Membership::lapses`].
    pub fn host_lapses(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.hosted().as_ref().map(Membership::lapses)
    }

    async fn fence_if_taken(&self) -> Result<()> {
        let k = &self.inner;
        if let Some(e) = k.ms.epoch_above(k.epoch).await?
            && k.ms.head_epoch_above(k.epoch, e).await?
        {
            let why = format!(
                "stream {:?}: epoch {e} took the stream from our epoch {} (owner {:?}); stop \
                 publishing",
                k.ms.stream(),
                k.epoch,
                k.owner
            );
            tracing::warn!(stream = k.ms.stream(), epoch = k.epoch, "fenced: {why}");
            self.fence(&why);
            return Err(Error::Fenced(self.fenced().unwrap_or(&why).to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Renewal {
        Renewal {
            format: FORMAT_VERSION,
            stream: "s".into(),
            owner: "a".into(),
            epoch: 3,
            seq: 7,
            written_ms: 1_000,
            expires_ms: 31_000,
            host: None,
        }
    }

    #[test]
    fn renewal_round_trips_and_is_checked_against_its_key() {
        let bytes = encode_renewal(&sample()).unwrap();
        assert_eq!(decode_renewal(&bytes, "s", 3, 7).unwrap(), sample());
        for (stream, epoch, seq) in [("t", 3, 7), ("s", 4, 7), ("s", 3, 8)] {
            let r = decode_renewal(&bytes, stream, epoch, seq);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(decode_renewal(&flipped, "s", 3, 7).is_err());
        for n in 0..bytes.len() {
            assert!(decode_renewal(&bytes[..n], "s", 3, 7).is_err());
        }
    }

    #[test]
    fn a_renewal_claiming_more_than_the_longest_ttl_is_corrupt() {
        let max = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap();
        for expires_ms in [1_000, 999, 1_000 + max + 1] {
            let r = Renewal {
                expires_ms,
                ..sample()
            };
            let bytes = encode_renewal(&r).unwrap();
            assert!(decode_renewal(&bytes, "s", 3, 7).is_err(), "{expires_ms}");
        }
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(parse_digits(&epoch_name(42)), Some(42));
        assert_eq!(parse_digits("42"), None);
        assert_eq!(parse_digits("0000000000000000004x"), None);
        assert_eq!(
            parse_digits(renewal_name(u64::MAX).strip_suffix(LEASE_SUFFIX).unwrap()),
            Some(u64::MAX)
        );
    }
}
