//! Host leases: one renewal object keeps the leases of every stream a
//! [`crate::Host`] owns in one store, so a process with thousands of
//! streams writes one small object a third of the TTL apart, not one per
//! stream (issue 16: 10,000 streams renewing their own leases cost 1,000
//! renewals a second and 10-17% of a core while idle).
//!
//! ```text
//! {prefix}/_hosts/{host:32 hex}/{seq:020}.lease
//! ```
//!
//! A hosted stream's own renewal (see `renewal`) names the host
//! (`host: "<id>"`), and is written once per epoch, at the take. A reader
//! of the stream's lease ([`ManifestStore::current_lease`]) then reads the
//! host's newest renewal: when it lists the stream with the same owner and
//! epoch, the lease lasts until that renewal's expiry. The host lists only
//! the streams it still holds: a stream shut down, dropped or fenced leaves
//! the list at the host's next renewal, and its lease then runs out like an
//! unrenewed one. Safety never rests on this, as for every lease: each
//! manifest write carries the epoch.
//!
//! The host's id is random per [`HostLeases`] (a process run), so a
//! restarted host never collides with its earlier renewals. A host with no
//! streams left deletes its renewals; a crashed one leaves at most
//! [`KEEP_HOST_RENEWALS`] small objects, which the next host that starts in
//! the same store deletes once their newest is [`STALE_HOST_AFTER`] old.
//!
//! What a hosted stream gives up: its owner learns that another owner took
//! the stream at its next manifest commit, not at its next renewal (it
//! writes no renewals of its own to check on). Builds from before host
//! leases cannot read a renewal that names a host: to them a hosted
//! stream's lease runs out a TTL after its take, and they may take it over
//! then (fencing the host's stream, never corrupting it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    Created, FORMAT_VERSION, ManifestStore, check_format, decode_envelope, encode_envelope,
};
use crate::error::{Error, Result};
use crate::remote::keys;
use crate::remote::lease::{self, LEASE_TTL_MAX};

/// Folder under the store's prefix with the host leases.
pub const HOSTS_DIR: &str = "_hosts";
const KIND_HOST_RENEWAL: u8 = 4;
/// Renewals a host keeps; older ones are deleted.
pub const KEEP_HOST_RENEWALS: u64 = 3;
/// Most streams one host lease lists (a host with more shares it out over
/// several leases: see [`HostLeases::join`]).
pub const HOST_MEMBERS_MAX: usize = 20_000;
/// Largest host renewal read: [`HOST_MEMBERS_MAX`] members of the longest
/// stream name and owner id (an owner id of quotes and backslashes doubles
/// in JSON: 128 + 512 + 45 bytes a member, 13.7 MB), with room to spare.
pub const MAX_HOST_RENEWAL_BYTES: usize = 24 << 20;
/// A host whose newest renewal is this old (by the store's clock: the
/// modification times of its objects against that of the sweeping host's
/// own first renewal) is gone: the next host to start in the store deletes
/// its renewals.
pub const STALE_HOST_AFTER: Duration = Duration::from_secs(2 * 86_400);
const SUFFIX: &str = ".lease";

/// One stream a host holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMember {
    pub stream: String,
    pub owner: String,
    pub epoch: u64,
}

/// One renewal of a host lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRenewal {
    pub format: u32,
    pub host: String,
    pub seq: u64,
    /// The writer's wall clock when it renewed.
    pub written_ms: u64,
    /// Until when (exclusive) the listed streams' leases are live, by the
    /// writer's clock.
    pub expires_ms: u64,
    pub members: Vec<HostMember>,
}

impl HostRenewal {
    /// Whether this renewal holds `stream` for `owner` at `epoch`: a binary
    /// search, the members being sorted by (stream, owner) (a host writes
    /// them so, and [`decode_host_renewal`] sorts what it reads).
    pub fn holds(&self, stream: &str, owner: &str, epoch: u64) -> bool {
        let from = self
            .members
            .partition_point(|m| member_key(m) < (stream, owner));
        self.members[from..]
            .iter()
            .take_while(|m| member_key(m) == (stream, owner))
            .any(|m| m.epoch == epoch)
    }
}

fn member_key(m: &HostMember) -> (&str, &str) {
    (m.stream.as_str(), m.owner.as_str())
}

/// A host id: 32 lower-case hex digits.
pub fn valid_host_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn seq_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

fn parse_seq(name: &str) -> Option<u64> {
    let d = name.strip_suffix(SUFFIX)?;
    if d.len() != 20 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

/// Encodes a host renewal (envelope + JSON).
pub fn encode_host_renewal(r: &HostRenewal) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(r)
        .map_err(|e| Error::InvalidInput(format!("host lease renewal does not encode: {e}")))?;
    if body.len() + 64 > MAX_HOST_RENEWAL_BYTES {
        return Err(Error::InvalidInput(format!(
            "host lease renewal of {} bytes is over the limit of {MAX_HOST_RENEWAL_BYTES}",
            body.len()
        )));
    }
    encode_envelope(KIND_HOST_RENEWAL, &body)
}

/// Decodes a host renewal read from the key of (`host`, `seq`) and checks
/// it against the key. Never panics, whatever the bytes.
pub fn decode_host_renewal(bytes: &[u8], host: &str, seq: u64) -> Result<HostRenewal> {
    let what = format!("host lease {host} seq {seq}");
    let body = decode_envelope(bytes, KIND_HOST_RENEWAL, MAX_HOST_RENEWAL_BYTES, &what)?;
    check_format(body, &what)?;
    let mut r: HostRenewal = serde_json::from_slice(body)
        .map_err(|e| Error::corrupt(&what, format!("body does not decode: {e}")))?;
    r.members
        .sort_unstable_by(|a, b| member_key(a).cmp(&member_key(b)));
    let max_ttl = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap_or(u64::MAX);
    let bad = if r.host != host || r.seq != seq {
        Some(format!(
            "names host {:?} seq {}, its key host {host} seq {seq}",
            r.host, r.seq
        ))
    } else if r.expires_ms <= r.written_ms || r.expires_ms - r.written_ms > max_ttl {
        Some(format!(
            "expiry {} is not within the longest TTL after its write time {}",
            r.expires_ms, r.written_ms
        ))
    } else if r.members.len() > HOST_MEMBERS_MAX {
        Some(format!(
            "lists {} streams, the most is {HOST_MEMBERS_MAX}",
            r.members.len()
        ))
    } else {
        r.members
            .iter()
            .find(|m| {
                keys::validate_stream(&m.stream).is_err()
                    || lease::validate_owner(&m.owner).is_err()
            })
            .map(|m| {
                format!(
                    "lists an invalid stream name or owner id ({} bytes, {} bytes)",
                    m.stream.len(),
                    m.owner.len()
                )
            })
    };
    match bad {
        Some(d) => Err(Error::corrupt(&what, d)),
        None => Ok(r),
    }
}

/// The newest decoded renewal of each host read, by store and host,
/// shared by every reader in the process; bounded (cleared when over
/// [`HOST_CACHE_ENTRIES`] hosts).
static HOST_CACHE: Mutex<Option<HashMap<String, Arc<HostRenewal>>>> = Mutex::new(None);
const HOST_CACHE_ENTRIES: usize = 16;

fn cached_host_renewal(key: &str, seq: u64) -> Option<Arc<HostRenewal>> {
    let g = HOST_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    g.as_ref()
        .and_then(|m| m.get(key))
        .filter(|r| r.seq == seq)
        .cloned()
}

fn cache_host_renewal(key: String, r: Arc<HostRenewal>) {
    let mut g = HOST_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let m = g.get_or_insert_with(HashMap::new);
    if m.len() >= HOST_CACHE_ENTRIES && !m.contains_key(&key) {
        m.clear();
    }
    // Only ever newer: an older seq read late does not replace it.
    if m.get(&key).is_none_or(|old| old.seq < r.seq) {
        m.insert(key, r);
    }
}

impl ManifestStore {
    /// Store access for host leases: this store, retry policy and clock,
    /// none of this stream's state (its chunk cache stays with it).
    fn for_hosts(&self) -> ManifestStore {
        let i = &self.inner;
        ManifestStore {
            inner: Arc::new(super::store::Inner {
                store: i.store.clone(),
                stream: HOSTS_DIR.to_string(),
                dir: self.hosts_dir(),
                opts: i.opts.clone(),
                clock: i.clock.clone(),
                chunks: Mutex::new(Default::default()),
                seen: Mutex::new(None),
            }),
        }
    }

    /// `{prefix}/_hosts`.
    fn hosts_dir(&self) -> Path {
        self.inner.store.prefix().clone().join(HOSTS_DIR)
    }
    /// `{prefix}/_hosts/{host}`.
    fn host_dir(&self, host: &str) -> Path {
        self.hosts_dir().join(host)
    }

    /// Seqs listed under a host's folder, highest first.
    async fn host_seqs(&self, host: &str) -> Result<Vec<u64>> {
        let dir = self.host_dir(host);
        let listed = self.list_under(&dir, None, "host lease LIST").await?;
        let mut seqs: Vec<u64> = listed
            .iter()
            .filter_map(|m| {
                let s = parse_seq(m.location.filename()?)?;
                (m.location == dir.clone().join(seq_name(s))).then_some(s)
            })
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    /// The newest readable renewal of host `host`, `None` when it has none.
    /// A renewal that vanished or does not decode is skipped (logged); a
    /// failed request is an error (a taker must not take over because a
    /// read failed).
    pub(super) async fn host_lease(&self, host: &str) -> Result<Option<Arc<HostRenewal>>> {
        if !valid_host_id(host) {
            return Ok(None);
        }
        for seq in self.host_seqs(host).await?.into_iter().take(8) {
            let what = format!("host lease {host} seq {seq}");
            let key = self.host_dir(host).join(seq_name(seq));
            // A host renewal is create-only under a name no other content
            // gets (a random host id and its seq): decoded once per process,
            // not once per stream that reads it (a taker of a failed host's
            // 10,000 streams would read its 600 KB renewal 10,000 times).
            let cache_key = format!(
                "{}\u{0}{}",
                self.inner.store.display_url(),
                self.host_dir(host)
            );
            if let Some(r) = cached_host_renewal(&cache_key, seq) {
                return Ok(Some(r));
            }
            let bytes = match self.get_bytes_max(&key, &what, MAX_HOST_RENEWAL_BYTES).await {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(host, error = %e, "unreadable host lease renewal ignored");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match decode_host_renewal(&bytes, host, seq) {
                Ok(r) => {
                    let r = Arc::new(r);
                    cache_host_renewal(cache_key, r.clone());
                    return Ok(Some(r));
                }
                Err(e) => {
                    tracing::warn!(host, error = %e, "unreadable host lease renewal ignored")
                }
            }
        }
        Ok(None)
    }

    /// Deletes every renewal of `host`. Best effort.
    async fn delete_host(&self, host: &str) {
        match self.host_seqs(host).await {
            Ok(seqs) => {
                for s in seqs {
                    if let Err(e) = self.delete(&self.host_dir(host).join(seq_name(s))).await {
                        tracing::debug!(host, error = %e, "could not delete a host lease renewal");
                    }
                }
            }
            Err(e) => tracing::debug!(host, error = %e, "could not list a host lease"),
        }
    }

    /// Deletes the renewals of hosts other than `ours` whose newest object
    /// is older than [`STALE_HOST_AFTER`] by the store's clock (hosts that
    /// crashed): "now" is the modification time of `ours_key`, our own
    /// renewal just written, so a sweeping host's own clock plays no part.
    /// Best effort.
    async fn sweep_stale_hosts(&self, ours: &str, ours_key: &Path) {
        use object_store::ObjectStoreExt as _;
        let now = match self.os().head(ours_key).await {
            Ok(m) => m.last_modified.timestamp_millis(),
            Err(e) => {
                tracing::debug!(error = %e, "could not read our host lease's time; no sweep");
                return;
            }
        };
        let dir = self.hosts_dir();
        let listed = match self.list_under(&dir, None, "host lease LIST").await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "could not list host leases for clean-up");
                return;
            }
        };
        let mut newest: HashMap<String, i64> = HashMap::new();
        for m in &listed {
            let Some(mut parts) = m.location.prefix_match(&dir) else {
                continue;
            };
            let Some(host) = parts.next().map(|p| p.as_ref().to_string()) else {
                continue;
            };
            let at = m.last_modified.timestamp_millis();
            let e = newest.entry(host).or_insert(at);
            *e = (*e).max(at);
        }
        let stale = i64::try_from(STALE_HOST_AFTER.as_millis()).unwrap_or(i64::MAX);
        for (host, at) in newest {
            if host != ours && valid_host_id(&host) && now.saturating_sub(at) > stale {
                tracing::info!(host, last_renewed_ms = at, "deleting a host lease not renewed for two days");
                self.delete_host(&host).await;
            }
        }
    }
}

/// The host leases of one [`crate::Host`]: one per store (and TTL) its
/// streams use. Cheap to share; each lease lives while a stream holds it.
#[derive(Debug, Default)]
pub struct HostLeases {
    leases: Mutex<HashMap<String, Vec<Weak<SharedLease>>>>,
}

/// One host lease: the streams it holds and the task that renews it.
#[derive(Debug)]
pub struct SharedLease {
    id: String,
    members: Mutex<HashMap<(String, String), u64>>,
    /// False once its renewal task ended (its runtime shut down): a join
    /// then starts another lease rather than hand its stream to nobody.
    running: Arc<std::sync::atomic::AtomicBool>,
    /// Closed (its sender dropped) when the renewal task ends: a member
    /// then goes back to renewing on its own.
    ended: tokio::sync::watch::Receiver<()>,
    /// Expiry of the newest renewal that landed (0: none yet).
    expires_ms: AtomicU64,
    wake: Arc<Notify>,
    /// Counts the renewals that landed [`LAPSE_AFTER`] of the TTL or more
    /// after the one before was sent, by the monotonic clock or the wall
    /// clock (a paused or suspended process, a store out of reach): the
    /// lease may have looked expired meanwhile, so each member checks
    /// whether its stream was taken ([`Membership::lapses`]); and the
    /// renewal after such a one once more (a takeover in flight then, its
    /// renewal 0 not written yet, is seen by the second check). Without
    /// it a hosted owner would learn of a takeover only at its next
    /// commit.
    lapses: tokio::sync::watch::Sender<u64>,
    /// Bounds those checks (one listing each) across the members.
    checks: Arc<tokio::sync::Semaphore>,
}

/// From a renewal's sending to the next one's landing, as a fraction of
/// the TTL (numerator, denominator), past which the members check whether
/// their streams were taken: renewals are sent a third of the TTL apart,
/// so about two went missing and the lease came within a sixth of its TTL
/// of looking expired to a reader (less a clock skew; one missing renewal
/// makes no check).
const LAPSE_AFTER: (u32, u32) = (5, 6);
/// Members checking for a takeover at once, per host lease.
const LAPSE_CHECKS: usize = 16;

/// A stream's place in a host lease; leaving (drop) takes it off the list
/// at the host's next renewal.
#[derive(Debug)]
pub struct Membership {
    lease: Arc<SharedLease>,
    key: (String, String),
    epoch: u64,
    /// Subscribed at the join: a lapse between the join and the lease
    /// task's first wait is not missed.
    lapses: tokio::sync::watch::Receiver<u64>,
}

impl Membership {
    /// The host's id, as a stream's renewal names it.
    pub fn host_id(&self) -> &str {
        &self.lease.id
    }
    /// Expiry of the host's newest renewal that landed (0: none yet).
    #[cfg(any(test, feature = "testing"))]
    pub fn expires_ms(&self) -> u64 {
        self.lease.expires_ms.load(Ordering::SeqCst)
    }
    /// Whether the host's renewal task still runs (it ends with its tokio
    /// runtime): a member of a lease that no longer runs renews on its own.
    pub fn running(&self) -> bool {
        self.lease.running.load(Ordering::SeqCst)
    }
    /// Changes each time the host's renewals land again after a gap in
    /// which the lease may have looked expired (see the field).
    pub fn lapses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.lapses.clone()
    }
    /// The permits to check for a takeover (at most [`LAPSE_CHECKS`] of a
    /// host's members at once).
    pub fn check_permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.lease.checks.clone()
    }
    /// Resolves when the host's renewal task has ended.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.lease.ended.clone();
        async move { while rx.changed().await.is_ok() {} }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut m = self
            .lease
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.get(&self.key) == Some(&self.epoch) {
            m.remove(&self.key);
        }
        if m.is_empty() {
            // The host now vouches for nobody: its task deletes its
            // renewals at once rather than leaving them for a TTL.
            self.lease.wake.notify_one();
        }
    }
}

impl HostLeases {
    /// Puts `stream` (owner, epoch) on the host lease of `ms`'s store for
    /// `ttl`, starting that lease (and its renewal task, on the current
    /// tokio runtime) if this host has none there yet. The stream's lease
    /// is not extended by the host until the host's next renewal, within a
    /// third of the TTL: until then its take's own expiry covers it.
    pub fn join(
        &self,
        ms: &ManifestStore,
        ttl: Duration,
        owner: &str,
        epoch: u64,
    ) -> Result<Membership> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Internal("a host lease needs a tokio runtime to renew on".into())
        })?;
        // The store by everything it was built from (the endpoint and
        // options too: two clusters with one bucket name print alike), else
        // (a store built by the caller) by its client.
        let store = &ms.inner.store;
        let id = match store.probe_key() {
            Some(k) => format!("built {k:x}"),
            None => format!("client {:p}", Arc::as_ptr(store.object_store())),
        };
        let key = format!("{id}\u{0}{}\u{0}{}", store.prefix(), ttl.as_millis());
        let member = (ms.stream().to_string(), owner.to_string());
        let mut all = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, v| {
            v.retain(|w| w.strong_count() > 0);
            !v.is_empty()
        });
        let slot = all.entry(key).or_default();
        let found = slot.iter().filter_map(Weak::upgrade).find(|l| {
            if !l.running.load(Ordering::SeqCst) {
                return false;
            }
            let m = l.members.lock().unwrap_or_else(|p| p.into_inner());
            m.len() < HOST_MEMBERS_MAX || m.contains_key(&member)
        });
        let lease = match found {
            Some(l) => l,
            None => {
                let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
                let (ended_tx, ended) = tokio::sync::watch::channel(());
                let l = Arc::new(SharedLease {
                    id: id.clone(),
                    running: running.clone(),
                    ended,
                    members: Mutex::new(HashMap::new()),
                    expires_ms: AtomicU64::new(0),
                    wake: Arc::new(Notify::new()),
                    lapses: tokio::sync::watch::channel(0).0,
                    checks: Arc::new(tokio::sync::Semaphore::new(LAPSE_CHECKS)),
                });
                slot.push(Arc::downgrade(&l));
                runtime.spawn(renew_host(
                    Arc::downgrade(&l),
                    ms.for_hosts(),
                    id,
                    l.wake.clone(),
                    ttl,
                    Running(running, ended_tx),
                ));
                l
            }
        };
        lease
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member.clone(), epoch);
        let lapses = lease.lapses.subscribe();
        Ok(Membership {
            lease,
            key: member,
            epoch,
            lapses,
        })
    }

    /// How many host leases are live (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn live(&self) -> usize {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

impl SharedLease {
    fn snapshot(&self) -> Vec<HostMember> {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<HostMember> = m
            .iter()
            .map(|((stream, owner), epoch)| HostMember {
                stream: stream.clone(),
                owner: owner.clone(),
                epoch: *epoch,
            })
            .collect();
        v.sort_unstable_by(|a, b| member_key(a).cmp(&member_key(b)));
        v
    }
}

/// The renewal task of one host lease: renews a third of the TTL apart
/// while it holds streams; deletes its renewals when it holds none (at
/// once: a leaving stream wakes it) and when the lease is gone.
async fn renew_host(
    lease: Weak<SharedLease>,
    ops: ManifestStore,
    id: String,
    wake: Arc<Notify>,
    ttl: Duration,
    _running: Running,
) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    let mut next_seq: u64 = 0;
    let mut written = false;
    let mut swept = false;
    // When the newest renewal that landed was sent, by both clocks (or
    // the lease started, or last held nobody: its members' own takes
    // cover them from then).
    let mut last_sent = (tokio::time::Instant::now(), ops.now_ms());
    let lapse = ttl * LAPSE_AFTER.0 / LAPSE_AFTER.1;
    let lapse_ms = u64::try_from(lapse.as_millis()).unwrap_or(u64::MAX);
    // A lapse was signalled: signal once more at the next renewal.
    let mut again = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        let Some(l) = lease.upgrade() else { break };
        let members = l.snapshot();
        if members.is_empty() {
            last_sent = (tokio::time::Instant::now(), ops.now_ms());
            drop(l);
            if written {
                ops.delete_host(&id).await;
                written = false;
            }
            continue;
        }
        let now = ops.now_ms();
        let expires_ms = match lease::expiry(now, ttl) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(host = id, error = %e, "host lease TTL refused; not renewing");
                break;
            }
        };
        let r = HostRenewal {
            format: FORMAT_VERSION,
            host: id.clone(),
            seq: next_seq,
            written_ms: now,
            expires_ms,
            members,
        };
        let bytes = match encode_host_renewal(&r) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(host = id, error = %e, "host lease renewal does not encode; not renewed");
                continue;
            }
        };
        drop(l);
        let key = ops.host_dir(&id).join(seq_name(next_seq));
        let sent = (tokio::time::Instant::now(), now);
        let landed = |last_sent: &mut (tokio::time::Instant, u64), again: &mut bool| {
            let gap = tokio::time::Instant::now().saturating_duration_since(last_sent.0);
            let gap_ms = ops.now_ms().saturating_sub(last_sent.1);
            *last_sent = sent;
            let lapsed = gap >= lapse || gap_ms >= lapse_ms;
            let Some(l) = lease.upgrade() else { return };
            if lapsed {
                tracing::warn!(
                    host = id,
                    gap_ms = (gap.as_millis() as u64).max(gap_ms),
                    members = l.members.lock().unwrap_or_else(|p| p.into_inner()).len(),
                    "the host lease was renewed after a gap in which it may have looked expired; \
                     its streams check whether another owner took them"
                );
            } else if !*again {
                return;
            }
            *again = lapsed;
            l.lapses.send_modify(|n| *n = n.wrapping_add(1));
        };
        match ops.create(&key, bytes).await {
            Ok(Created::New) => {
                written = true;
                landed(&mut last_sent, &mut again);
                if let Some(l) = lease.upgrade() {
                    l.expires_ms.fetch_max(expires_ms, Ordering::SeqCst);
                }
                if !swept {
                    // On a task of its own: many hosts left over by a crash
                    // loop must not hold up the next renewal.
                    swept = true;
                    let (ops, id, key) = (ops.clone(), id.clone(), key.clone());
                    tokio::spawn(async move { ops.sweep_stale_hosts(&id, &key).await });
                }
                if let Some(old) = next_seq.checked_sub(KEEP_HOST_RENEWALS)
                    && let Err(e) = ops.delete(&ops.host_dir(&id).join(seq_name(old))).await
                {
                    tracing::debug!(host = id, error = %e, "could not delete an old host lease renewal");
                }
                next_seq = next_seq.saturating_add(1);
            }
            // Our id is random and ours alone: a slot taken means our own
            // earlier attempt whose answer was lost. Move on past it.
            Ok(Created::Exists) => {
                written = true;
                next_seq = next_seq.saturating_add(1);
                wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(host = id, error = %e, "renewing the host lease failed; retrying")
            }
        }
    }
    if written {
        ops.delete_host(&id).await;
    }
}

/// Marks its lease as no longer renewed when the renewal task ends, or is
/// dropped with its runtime.
struct Running(
    Arc<std::sync::atomic::AtomicBool>,
    #[allow(dead_code)] tokio::sync::watch::Sender<()>,
);

impl Drop for Running {
    fn drop(&mut self) {
        // Before the sender drops with it: a member woken by the close
        // finds the lease not running.
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HostRenewal {
        HostRenewal {
            format: FORMAT_VERSION,
            host: "0123456789abcdef0123456789abcdef".into(),
            seq: 4,
            written_ms: 1_000,
            expires_ms: 31_000,
            members: vec![HostMember {
                stream: "orders-0".into(),
                owner: "broker-1".into(),
                epoch: 3,
            }],
        }
    }

    #[test]
    fn host_renewal_round_trips_and_is_checked_against_its_key() {
        let h = sample().host;
        let bytes = encode_host_renewal(&sample()).unwrap();
        let back = decode_host_renewal(&bytes, &h, 4).unwrap();
        assert_eq!(back, sample());
        assert!(back.holds("orders-0", "broker-1", 3));
        assert!(!back.holds("orders-0", "broker-1", 4));
        assert!(!back.holds("orders-0", "broker-2", 3));
        assert!(!back.holds("orders-1", "broker-1", 3));
        assert!(decode_host_renewal(&bytes, &h, 5).is_err());
        assert!(decode_host_renewal(&bytes, "ffffffffffffffffffffffffffffffff", 4).is_err());
        for n in 0..bytes.len() {
            assert!(decode_host_renewal(&bytes[..n], &h, 4).is_err());
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(decode_host_renewal(&flipped, &h, 4).is_err());
    }

    #[test]
    fn a_host_renewal_with_bad_members_or_expiry_is_corrupt() {
        let h = sample().host;
        let max = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap();
        let mut bad = Vec::new();
        for expires_ms in [1_000, 999, 1_000 + max + 1] {
            bad.push(HostRenewal {
                expires_ms,
                ..sample()
            });
        }
        for (stream, owner) in [("..", "o"), ("a/b", "o"), ("s", ""), ("s", "a b")] {
            bad.push(HostRenewal {
                members: vec![HostMember {
                    stream: stream.into(),
                    owner: owner.into(),
                    epoch: 1,
                }],
                ..sample()
            });
        }
        for r in bad {
            let bytes = encode_host_renewal(&r).unwrap();
            assert!(
                matches!(decode_host_renewal(&bytes, &h, 4), Err(Error::Corrupt { .. })),
                "{r:?}"
            );
        }
    }

    #[test]
    fn host_ids_and_names_parse_strictly() {
        assert!(valid_host_id("0123456789abcdef0123456789abcdef"));
        for bad in ["", "0123", "0123456789ABCDEF0123456789abcdef", "../../../../../../../../../../x"] {
            assert!(!valid_host_id(bad), "{bad}");
        }
        assert_eq!(parse_seq(&seq_name(7)), Some(7));
        assert_eq!(parse_seq(&seq_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_seq("7.lease"), None);
        assert_eq!(parse_seq("0000000000000000000x.lease"), None);
    }
}
