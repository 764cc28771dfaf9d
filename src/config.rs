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
}

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
        crate::remote::keys::validate_stream(&self.stream)
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
}
