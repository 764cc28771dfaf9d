//! Configuration: one struct, loadable from a TOML file, every field with a
//! default. The CLI layers flags and `TIERINDEX_*` variables on top.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::index::IndexConfig;
use crate::remote::StoreOptions;
use crate::upload::{UploadConfig, VerifyLevel};

/// Everything needed to open a [`crate::TierIndex`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The data directory (segments, journal, quarantine, lock).
    pub data_dir: PathBuf,
    /// Store URL: `file:///abs/path` (default: `<data_dir>/../tierindex-store`),
    /// `s3://bucket/prefix`, or `memory://`.
    pub store: Option<String>,
    /// S3 endpoint override (MinIO and friends); `AWS_ENDPOINT_URL` otherwise.
    pub endpoint: Option<String>,
    /// Allow plain HTTP to the endpoint (default: only for loopback).
    pub allow_http: Option<bool>,
    pub region: Option<String>,
    /// The stream whose index this is; part of every remote key.
    pub stream: String,
    pub slot_count: u32,
    pub segment_items: u32,
    pub segment_max_age_ms: Option<u64>,
    pub max_chain_steps: u32,
    pub max_uploads_in_flight: usize,
    pub multipart_threshold_bytes: u64,
    pub part_size_bytes: u64,
    pub max_attempts: u32,
    pub request_timeout_ms: u64,
    pub verify: VerifyLevel,
    /// Delete the local copy once a segment is committed remotely.
    pub release_after_commit: bool,
    /// Rewrite the upload journal as a snapshot of live state once it grows
    /// past this many bytes.
    pub journal_compact_after_bytes: u64,
    /// Shutdown drain deadline (well under Kubernetes' 30 s grace period).
    pub shutdown_deadline_ms: u64,
    /// How often the background worker checks segment age and retries.
    pub tick_ms: u64,
    /// Serve Prometheus metrics here (e.g. `127.0.0.1:9464`).
    pub metrics_addr: Option<String>,
    /// Probe the store at open (a few small requests under `_probe/`) to
    /// learn whether it honours conditional creates. Off: assume it does not
    /// (every upload is read back in full; always safe, slower).
    pub probe_store: bool,
    /// Publish every committed segment in the stream's remote manifest
    /// (owner epoch + lease; see `remote::manifest`). Off: the journal alone
    /// records what is committed, as before.
    pub manifest: bool,
    /// Who owns the stream's manifest. Default: `{hostname}-{hash of the
    /// absolute data directory}`, stable across restarts of the same data
    /// directory (so a restart after a crash re-takes its own stream at once).
    pub owner_id: Option<String>,
    /// Lease length; renewed every third of it while running.
    pub lease_ttl_ms: u64,
    /// Manage the manifest on a store whose probe found conditional creates
    /// NOT honoured (no fencing then: only with one writer guaranteed).
    pub allow_unconditional_store: bool,
    /// Run the reconciler (journal vs manifest vs bucket listing) every this
    /// many ms in the background; 0 = off. Findings are logged and exported
    /// as metrics.
    pub reconcile_interval_ms: u64,
    /// The background reconciler also repairs what it can from this process
    /// (re-uploads from local copies, manifest entries and damage notes as
    /// the current owner, stale multipart uploads and proven abandoned
    /// uploads of ours; objects of unknown origin are never deleted);
    /// off: it only reports.
    pub reconcile_repair: bool,
    /// Age an abandoned upload of ours or a multipart upload must reach before the
    /// background reconciler's repair removes it.
    pub reconcile_grace_ms: u64,
}

/// Shortest accepted `reconcile_grace_ms`.
pub const RECONCILE_GRACE_MS_MIN: u64 = 1_000;

/// Shortest and longest accepted `lease_ttl_ms`.
pub const LEASE_TTL_MS_MIN: u64 = 100;
pub const LEASE_TTL_MS_MAX: u64 = 86_400_000;

impl Default for Config {
    fn default() -> Self {
        let up = UploadConfig::default();
        let ix = IndexConfig::default();
        Config {
            data_dir: PathBuf::from("tierindex-data"),
            store: None,
            endpoint: None,
            allow_http: None,
            region: None,
            stream: "stream-0".into(),
            slot_count: ix.slot_count,
            segment_items: ix.segment_items,
            segment_max_age_ms: ix.segment_max_age.map(|d| d.as_millis() as u64),
            max_chain_steps: ix.max_chain_steps,
            max_uploads_in_flight: 4,
            multipart_threshold_bytes: up.multipart_threshold_bytes,
            part_size_bytes: up.part_size_bytes,
            max_attempts: up.max_attempts,
            request_timeout_ms: up.request_timeout.as_millis() as u64,
            verify: up.verify,
            release_after_commit: false,
            journal_compact_after_bytes: crate::journal::JournalOptions::default()
                .compact_after_bytes,
            shutdown_deadline_ms: 20_000,
            tick_ms: 200,
            metrics_addr: None,
            probe_store: true,
            manifest: false,
            owner_id: None,
            lease_ttl_ms: 30_000,
            allow_unconditional_store: false,
            reconcile_interval_ms: 0,
            reconcile_repair: true,
            reconcile_grace_ms: 3_600_000,
        }
    }
}

impl Config {
    /// Read a TOML file. Unknown keys are an error (a typo must not be
    /// silently ignored).
    pub fn from_file(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "read config file", e))?;
        Self::from_toml(&text).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    pub fn from_toml(text: &str) -> Result<Config> {
        let c: Config =
            toml::from_str(text).map_err(|e| Error::InvalidInput(format!("config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.slot_count == 0 || self.segment_items == 0 || self.max_chain_steps == 0 {
            return Err(Error::InvalidInput(
                "slot_count, segment_items and max_chain_steps must be at least 1".into(),
            ));
        }
        if self.max_uploads_in_flight == 0 || self.max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_uploads_in_flight and max_attempts must be at least 1".into(),
            ));
        }
        if self.journal_compact_after_bytes < 1024 {
            return Err(Error::InvalidInput(
                "journal_compact_after_bytes must be at least 1024".into(),
            ));
        }
        if let Some(o) = &self.owner_id {
            crate::remote::lease::validate_owner(o)
                .map_err(|e| Error::InvalidInput(format!("owner_id {o:?}: {e}")))?;
        }
        if self.reconcile_grace_ms < RECONCILE_GRACE_MS_MIN {
            return Err(Error::InvalidInput(format!(
                "reconcile_grace_ms must be at least {RECONCILE_GRACE_MS_MIN} (an upload in \
                 flight must not look like an orphan), got {}",
                self.reconcile_grace_ms
            )));
        }
        if self.reconcile_interval_ms != 0 && self.reconcile_interval_ms < 100 {
            return Err(Error::InvalidInput(format!(
                "reconcile_interval_ms must be 0 (off) or at least 100, got {}",
                self.reconcile_interval_ms
            )));
        }
        if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(&self.lease_ttl_ms) {
            return Err(Error::InvalidInput(format!(
                "lease_ttl_ms must be {LEASE_TTL_MS_MIN}..={LEASE_TTL_MS_MAX}, got {}",
                self.lease_ttl_ms
            )));
        }
        crate::remote::keys::validate_stream(&self.stream)
    }

    /// The manifest owner id: `owner_id`, or `{hostname}-{hash}` where the
    /// hash is of the absolute data directory. Stable across restarts of one
    /// data directory (which only one process can hold at a time), so a
    /// restart after a crash re-takes the stream without waiting for the
    /// lease and fences the previous incarnation.
    pub fn effective_owner_id(&self) -> Result<String> {
        if let Some(o) = &self.owner_id {
            crate::remote::lease::validate_owner(o)?;
            return Ok(o.clone());
        }
        let abs = std::path::absolute(&self.data_dir)
            .map_err(|e| Error::io(&self.data_dir, "resolve data dir", e))?;
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(200)
            .collect();
        let host = if host.is_empty() { "host".into() } else { host };
        let hash = crc32fast::hash(abs.as_os_str().as_encoded_bytes());
        let id = format!("{host}-{hash:08x}");
        crate::remote::lease::validate_owner(&id)?;
        Ok(id)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Manifest options from the config (retries follow the upload's).
    pub fn manifest_options(&self) -> crate::remote::manifest::ManifestOptions {
        let d = crate::remote::manifest::ManifestOptions::default();
        crate::remote::manifest::ManifestOptions {
            allow_unconditional_store: self.allow_unconditional_store,
            retry: crate::upload::retry::RetryPolicy {
                max_attempts: self.max_attempts,
                request_timeout: Duration::from_millis(self.request_timeout_ms),
                ..d.retry.clone()
            },
            ..d
        }
    }

    /// The store URL, defaulting to a directory next to the data directory.
    pub fn store_url(&self) -> Result<String> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let abs = std::path::absolute(&self.data_dir)
            .map_err(|e| Error::io(&self.data_dir, "resolve data dir", e))?;
        let parent = abs.parent().unwrap_or(Path::new("/"));
        Ok(format!(
            "file://{}",
            parent.join("tierindex-store").display()
        ))
    }

    pub fn index_config(&self) -> IndexConfig {
        IndexConfig {
            slot_count: self.slot_count,
            segment_items: self.segment_items,
            segment_max_age: self.segment_max_age_ms.map(Duration::from_millis),
            max_chain_steps: self.max_chain_steps,
        }
    }

    pub fn upload_config(&self) -> UploadConfig {
        UploadConfig {
            multipart_threshold_bytes: self.multipart_threshold_bytes,
            part_size_bytes: self.part_size_bytes,
            max_attempts: self.max_attempts,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            verify: self.verify,
            ..UploadConfig::default()
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http,
            region: self.region.clone(),
            ..StoreOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_roundtrip_and_typos_rejected() {
        let c = Config::from_toml("data_dir = \"/tmp/x\"\nsegment_items = 10\n").unwrap();
        assert_eq!(c.segment_items, 10);
        assert_eq!(c.stream, "stream-0");
        assert!(Config::from_toml("segment_itemz = 10").is_err());
        assert!(Config::from_toml("segment_items = 0").is_err());
        assert!(Config::from_toml("stream = \"../etc\"").is_err());
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(Config::from_toml(&text).is_ok());
    }

    #[test]
    fn manifest_keys_default_off_and_validated() {
        let c = Config::from_toml("").unwrap();
        assert!(!c.manifest);
        assert_eq!(c.lease_ttl_ms, 30_000);
        assert!(!c.allow_unconditional_store);
        assert!(c.owner_id.is_none());
        let c =
            Config::from_toml("manifest = true\nowner_id = \"broker-7\"\nlease_ttl_ms = 5000\n")
                .unwrap();
        assert!(c.manifest);
        assert_eq!(c.effective_owner_id().unwrap(), "broker-7");
        assert!(Config::from_toml("owner_id = \"has space\"").is_err());
        assert!(Config::from_toml("owner_id = \"\"").is_err());
        assert!(Config::from_toml("lease_ttl_ms = 10").is_err());
        assert_eq!(Config::from_toml("").unwrap().reconcile_interval_ms, 0);
        assert_eq!(
            Config::from_toml("reconcile_interval_ms = 60000")
                .unwrap()
                .reconcile_interval_ms,
            60_000
        );
        assert!(Config::from_toml("reconcile_interval_ms = 5").is_err());
        let c = Config::from_toml("").unwrap();
        assert!(c.reconcile_repair);
        assert_eq!(c.reconcile_grace_ms, 3_600_000);
        assert!(Config::from_toml("reconcile_grace_ms = 999").is_err());
        assert!(Config::from_toml("reconcile_grace_ms = 1000").is_ok());
        let a = Config {
            data_dir: "/tmp/a".into(),
            ..Config::default()
        };
        let b = Config {
            data_dir: "/tmp/b".into(),
            ..Config::default()
        };
        let ida = a.effective_owner_id().unwrap();
        assert_eq!(ida, a.effective_owner_id().unwrap());
        assert_ne!(ida, b.effective_owner_id().unwrap());
    }
}
