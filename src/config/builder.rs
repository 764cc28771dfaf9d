//! [`ConfigBuilder`]: a [`Config`] built in code, starting from the safe
//! defaults, with durations as [`Duration`] and every weaker choice a
//! method of its own whose name says what it gives up.

use std::path::PathBuf;
use std::time::Duration;

use super::Config;
use crate::error::Result;
use crate::upload::VerifyLevel;

/// Builds a [`Config`] in code. It starts from [`Config::default`] (the safe
/// mode: the manifest fences a second writer, uploads are proven before they
/// count), sets only what the caller names, and [`build`](Self::build)
/// validates the result as [`TierIndex::open`](crate::TierIndex::open)
/// would.
///
/// Fields may be added to [`Config`] in later releases; code that builds it
/// through this builder keeps compiling.
///
/// ```
/// use std::time::Duration;
/// use tierindex::Config;
///
/// let cfg = Config::builder("/var/lib/broker/index/orders-7")
///     .stream("orders-7")
///     .store("s3://tiered/broker-1")
///     .endpoint("http://127.0.0.1:9000")
///     .shutdown_deadline(Duration::from_secs(15))
///     .build()?;
/// assert_eq!(cfg.shutdown_deadline_ms, 15_000);
/// assert!(cfg.manifest, "fencing stays on unless single_writer_mode() is called");
/// # Ok::<(), tierindex::Error>(())
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ConfigBuilder {
    cfg: Config,
}

/// Milliseconds of `d`, saturating (validation then names the bound).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Config {
    /// A builder for a [`Config`] over `data_dir`, every other setting at its
    /// default.
    pub fn builder(data_dir: impl Into<PathBuf>) -> ConfigBuilder {
        ConfigBuilder {
            cfg: Config {
                data_dir: data_dir.into(),
                ..Config::default()
            },
        }
    }
}

impl ConfigBuilder {
    /// Checks every value ([`Config::validate`]) and returns the config.
    pub fn build(self) -> Result<Config> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }

    /// The config as set so far, unchecked (for a caller that layers more
    /// on top and validates later).
    pub fn into_unchecked(self) -> Config {
        self.cfg
    }

    /// The stream whose index this is; part of every remote key
    /// ([`Config::stream`]).
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.cfg.stream = stream.into();
        self
    }

    /// The store URL: `file:///abs/path`, `s3://bucket/prefix` or `memory://`
    /// ([`Config::store`]). Without it, a `file://` store beside the data
    /// directory.
    pub fn store(mut self, url: impl Into<String>) -> Self {
        self.cfg.store = Some(url.into());
        self
    }

    /// The S3 endpoint, for MinIO, Ceph, Garage and the like
    /// ([`Config::endpoint`]).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.cfg.endpoint = Some(url.into());
        self
    }

    /// Allow or refuse plain HTTP to the endpoint ([`Config::allow_http`];
    /// by default only loopback endpoints may use it).
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.cfg.allow_http = Some(allow);
        self
    }

    /// Sign every segment body's SHA-256 ([`Config::sign_payload`]).
    pub fn sign_payload(mut self, sign: bool) -> Self {
        self.cfg.sign_payload = sign;
        self
    }

    /// The S3 region ([`Config::region`]).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.cfg.region = Some(region.into());
        self
    }

    /// Hash slots per segment ([`Config::slot_count`]).
    pub fn slot_count(mut self, slots: u32) -> Self {
        self.cfg.slot_count = slots;
        self
    }

    /// Entries per segment ([`Config::segment_items`]).
    pub fn segment_items(mut self, items: u32) -> Self {
        self.cfg.segment_items = items;
        self
    }

    /// Roll a non-empty segment once it is this old; `None`: only when full
    /// ([`Config::segment_max_age_ms`]).
    pub fn segment_max_age(mut self, age: Option<Duration>) -> Self {
        self.cfg.segment_max_age_ms = age.map(ms);
        self
    }

    /// Bound on chain steps per active-segment lookup
    /// ([`Config::max_chain_steps`]).
    pub fn max_chain_steps(mut self, steps: u32) -> Self {
        self.cfg.max_chain_steps = steps;
        self
    }

    /// Local sealed segments kept memory-mapped at once
    /// ([`Config::sealed_mapped`]).
    pub fn sealed_mapped(mut self, maps: usize) -> Self {
        self.cfg.sealed_mapped = maps;
        self
    }

    /// Whether the first active segment file is created at open
    /// ([`Config::active_at_open`]).
    pub fn active_at_open(mut self, at_open: bool) -> Self {
        self.cfg.active_at_open = at_open;
        self
    }

    /// Segments uploading at once ([`Config::max_uploads_in_flight`]).
    pub fn max_uploads_in_flight(mut self, n: usize) -> Self {
        self.cfg.max_uploads_in_flight = n;
        self
    }

    /// Sealed files at least this large use multipart
    /// ([`Config::multipart_threshold_bytes`]).
    pub fn multipart_threshold_bytes(mut self, bytes: u64) -> Self {
        self.cfg.multipart_threshold_bytes = bytes;
        self
    }

    /// Multipart part size ([`Config::part_size_bytes`]).
    pub fn part_size_bytes(mut self, bytes: u64) -> Self {
        self.cfg.part_size_bytes = bytes;
        self
    }

    /// Attempts per remote request, the first included
    /// ([`Config::max_attempts`]).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.cfg.max_attempts = attempts;
        self
    }

    /// Deadline of one remote request attempt
    /// ([`Config::request_timeout_ms`]).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.request_timeout_ms = ms(timeout);
        self
    }

    /// What must be proven of an upload before it counts as verified
    /// ([`Config::verify`]). The levels below the default do not prove the
    /// body; see [`VerifyLevel`].
    pub fn verify(mut self, level: VerifyLevel) -> Self {
        self.cfg.verify = level;
        self
    }

    /// Delete each local copy once its segment is committed remotely
    /// ([`Config::release_after_commit`]).
    pub fn release_after_commit(mut self, release: bool) -> Self {
        self.cfg.release_after_commit = release;
        self
    }

    /// Compact the upload journal past this size
    /// ([`Config::journal_compact_after_bytes`]).
    pub fn journal_compact_after_bytes(mut self, bytes: u64) -> Self {
        self.cfg.journal_compact_after_bytes = bytes;
        self
    }

    /// The shutdown drain's deadline ([`Config::shutdown_deadline_ms`]).
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.cfg.shutdown_deadline_ms = ms(deadline);
        self
    }

    /// How often the background worker ticks while segments are pending
    /// ([`Config::tick_ms`]).
    pub fn tick(mut self, every: Duration) -> Self {
        self.cfg.tick_ms = ms(every);
        self
    }

    /// Serve Prometheus metrics at `addr`, e.g. `127.0.0.1:9464`
    /// ([`Config::metrics_addr`]).
    pub fn metrics_addr(mut self, addr: impl Into<String>) -> Self {
        self.cfg.metrics_addr = Some(addr.into());
        self
    }

    /// Probe the store at open ([`Config::probe_store`]). Off, every upload
    /// is read back in full.
    pub fn probe_store(mut self, probe: bool) -> Self {
        self.cfg.probe_store = probe;
        self
    }

    /// **Weaker, named choice: single-writer mode** (`manifest = false`).
    /// No remote manifest: nothing fences a second writer of the stream,
    /// and the journal alone records what is committed. Only where exactly
    /// one writer per stream is guaranteed by other means; see
    /// [`Config::manifest`].
    pub fn single_writer_mode(mut self) -> Self {
        self.cfg.manifest = false;
        self
    }

    /// Who owns the stream's manifest ([`Config::owner_id`]; by default
    /// derived from the host and the data directory).
    pub fn owner_id(mut self, owner: impl Into<String>) -> Self {
        self.cfg.owner_id = Some(owner.into());
        self
    }

    /// The ownership lease's length ([`Config::lease_ttl_ms`]).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.cfg.lease_ttl_ms = ms(ttl);
        self
    }

    /// **Weaker, named choice**: manage the manifest on a store that does not
    /// honour conditional creates, so nothing fences a second writer
    /// ([`Config::allow_unconditional_store`]).
    pub fn allow_unconditional_store(mut self) -> Self {
        self.cfg.allow_unconditional_store = true;
        self
    }

    /// Open a data directory recorded in the other mode, and record this
    /// one ([`Config::switch_mode`]; read "Switching modes" in
    /// `docs/crash-safety.md` first).
    pub fn switch_mode(mut self) -> Self {
        self.cfg.switch_mode = true;
        self
    }

    /// **Weaker, named choice**: open a data directory recorded with another
    /// store or stream ([`Config::store_override`]); its committed segments
    /// may not be in the store now named.
    pub fn store_override(mut self) -> Self {
        self.cfg.store_override = true;
        self
    }

    /// Run the reconciler in the background this often; `None`: never
    /// ([`Config::reconcile_interval_ms`]).
    pub fn reconcile_every(mut self, every: Option<Duration>) -> Self {
        self.cfg.reconcile_interval_ms = every.map_or(0, |d| ms(d).max(1));
        self
    }

    /// Whether the background reconciler repairs or only reports
    /// ([`Config::reconcile_repair`]).
    pub fn reconcile_repair(mut self, repair: bool) -> Self {
        self.cfg.reconcile_repair = repair;
        self
    }

    /// Age an abandoned upload must reach before repair removes it
    /// ([`Config::reconcile_grace_ms`]).
    pub fn reconcile_grace(mut self, grace: Duration) -> Self {
        self.cfg.reconcile_grace_ms = ms(grace);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn starts_from_the_defaults_with_the_data_dir() {
        let built = Config::builder("/srv/ix").build().unwrap();
        let expected = Config {
            data_dir: "/srv/ix".into(),
            ..Config::default()
        };
        assert_eq!(format!("{built:?}"), format!("{expected:?}"));
        assert!(built.manifest && !built.allow_unconditional_store && !built.store_override);
    }

    #[test]
    fn sets_what_it_names_in_the_fields_units() {
        let c = Config::builder("d")
            .stream("orders-7")
            .store("memory://")
            .slot_count(1024)
            .segment_items(5000)
            .segment_max_age(Some(Duration::from_secs(90)))
            .request_timeout(Duration::from_millis(2500))
            .shutdown_deadline(Duration::from_secs(15))
            .tick(Duration::from_millis(50))
            .lease_ttl(Duration::from_secs(20))
            .reconcile_every(Some(Duration::from_secs(60)))
            .reconcile_grace(Duration::from_secs(7200))
            .verify(VerifyLevel::Full)
            .single_writer_mode()
            .build()
            .unwrap();
        assert_eq!(c.stream, "orders-7");
        assert_eq!(c.store.as_deref(), Some("memory://"));
        assert_eq!((c.slot_count, c.segment_items), (1024, 5000));
        assert_eq!(c.segment_max_age_ms, Some(90_000));
        assert_eq!(c.request_timeout_ms, 2500);
        assert_eq!(c.shutdown_deadline_ms, 15_000);
        assert_eq!(c.tick_ms, 50);
        assert_eq!(c.lease_ttl_ms, 20_000);
        assert_eq!(c.reconcile_interval_ms, 60_000);
        assert_eq!(c.reconcile_grace_ms, 7_200_000);
        assert_eq!(c.verify, VerifyLevel::Full);
        assert!(!c.manifest);
        let off = Config::builder("d").reconcile_every(None).build().unwrap();
        assert_eq!(off.reconcile_interval_ms, 0);
    }

    #[test]
    fn build_refuses_what_open_would() {
        for b in [
            Config::builder("d").slot_count(0),
            Config::builder("d").stream(""),
            Config::builder("d").store("s3:/typo"),
            Config::builder("d").tick(Duration::from_micros(500)),
            Config::builder("d").shutdown_deadline(Duration::MAX),
            Config::builder(""),
        ] {
            let e = b.clone().build().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{b:?}: {e}");
            // Unchecked, the same values come through as set.
            let _ = b.into_unchecked();
        }
        // A sub-millisecond interval is not "off".
        let c = Config::builder("d")
            .reconcile_every(Some(Duration::from_micros(10)))
            .into_unchecked();
        assert_eq!(c.reconcile_interval_ms, 1);
        assert!(c.validate().is_err());
    }
}
