//! [`Host`]: many streams in one process under one directory and one lock.

use std::path::Path;

use super::*;
use crate::lock::host::HostLock;

/// A directory of data directories, one per stream, locked once for all of
/// them (issue 16: a process hosting thousands of streams holds one
/// descriptor for their locks, not one a stream).
///
/// ```no_run
/// # async fn f() -> tierindex::Result<()> {
/// use std::time::Duration;
/// use tierindex::{Config, Host};
/// let host = Host::open("/var/lib/broker/tier")?;
/// let cfg = Config::builder(host.root().join("orders-0")).stream("orders-0").build()?;
/// let (orders, _) = host.open_stream(cfg).await?;
/// orders.append(b"key", 0, 100, 1_700_000_000_000)?;
/// orders.flush()?;
/// let reports = Host::shutdown_all(vec![orders], Duration::from_secs(30)).await;
/// # Ok(()) }
/// ```
///
/// Each stream's data directory is `ROOT/NAME`, with everything a data
/// directory opened on its own has, plus a `HOSTED` marker: a `tierindex`
/// command (or a broker without a host) that opens it on its own then needs
/// the host's lock too, and is refused while the host runs. The host's lock
/// lives as long as the `Host` or any stream opened through it.
///
/// In manifest mode (the default) the host also keeps its streams' leases:
/// one renewal object a third of the TTL apart for all of its streams in
/// one store, instead of one a stream (see `docs/format/remote-layout.md`,
/// "Ownership and the lease"). A stream leaves it at release, at the end of
/// its shutdown, or when dropped.
#[derive(Clone, Debug)]
pub struct Host {
    pub(super) lock: Arc<HostLock>,
    /// The host leases of its streams, one per store (see
    /// `remote::manifest::hosted`).
    pub(super) leases: Arc<crate::remote::manifest::HostLeases>,
}

impl Host {
    /// At most this many streams shut down at a time in
    /// [`Host::shutdown_all`]: each opens a few files for a moment, and a
    /// process under a low descriptor limit must not run out.
    pub const SHUTDOWN_CONCURRENCY: usize = 64;

    /// Creates `root` if missing and takes its lock: [`Error::Locked`] when
    /// another host, or a command on one of its streams, holds it. `root`
    /// must not itself be a data directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Host> {
        let root = root.as_ref();
        if crate::datadir::has_data_dir_files(root) {
            return Err(Error::InvalidInput(format!(
                "{} is a data directory (it has an identity or a journal); a \
                 host's directory holds data directories, one per stream: name its parent, \
                 or a new directory",
                root.display()
            )));
        }
        refuse_inside_a_data_dir(root)?;
        Ok(Host {
            lock: HostLock::open(root)?,
            leases: Arc::default(),
        })
    }

    /// The host's directory, resolved (symlinks followed).
    pub fn root(&self) -> &Path {
        self.lock.root()
    }

    /// [`TierIndex::open`] for a stream whose data directory
    /// (`cfg.data_dir`) is directly under [`Host::root`].
    pub async fn open_stream(&self, cfg: Config) -> Result<(TierIndex, OpenReport)> {
        let store = TierIndex::checked_store(&cfg)?;
        TierIndex::open_inner(cfg, store, Arc::new(SystemClock), Some(self)).await
    }

    /// [`Host::open_stream`] with a store the caller built (one [`Store`]
    /// shared by every stream of one bucket shares its connections).
    pub async fn open_stream_with(
        &self,
        cfg: Config,
        store: Store,
    ) -> Result<(TierIndex, OpenReport)> {
        TierIndex::open_inner(cfg, store.0, Arc::new(SystemClock), Some(self)).await
    }

    /// Shuts `streams` down under one deadline, [`Host::SHUTDOWN_CONCURRENCY`] at a
    /// time, and returns their reports in the same order. A stream whose
    /// turn comes late gets what is left of the deadline; one whose turn
    /// comes after it gets none: its report says what it left (its active
    /// segment unsealed, its segments pending), which the next open
    /// recovers as after a crash. A stream's shutdown may run past the
    /// deadline by up to a second while its journal's committer ends (when
    /// the shared journal threads are busy), so the whole call can too.
    pub async fn shutdown_all(streams: Vec<TierIndex>, deadline: Duration) -> Vec<ShutdownReport> {
        use futures::StreamExt as _;
        let until = Instant::now() + deadline;
        futures::stream::iter(streams)
            .map(|s| s.shutdown(until.saturating_duration_since(Instant::now())))
            .buffered(Self::SHUTDOWN_CONCURRENCY)
            .collect()
            .await
    }
}

/// A host's directory inside a data directory (under its `segments/`, say)
/// is refused: that data directory's start-up check moves what it does not
/// know out of `segments/`, a running host's streams and store included
/// (helper-75 F3). Checked on the resolved path's ancestors: one with an
/// `IDENTITY` or a `journal/journal.log` is a data directory.
fn refuse_inside_a_data_dir(root: &Path) -> Result<()> {
    // The nearest existing ancestor, resolved (the root may not exist yet).
    let mut probe = root.to_path_buf();
    let resolved = loop {
        if let Ok(p) = probe.canonicalize() {
            break Some(p);
        }
        if !probe.pop() || probe.as_os_str().is_empty() {
            break None;
        }
    };
    let Some(resolved) = resolved else {
        return Ok(());
    };
    // (`root` itself a data directory was refused before this.)
    for a in resolved.ancestors() {
        if crate::datadir::has_data_dir_files(a) {
            return Err(Error::InvalidInput(format!(
                "{} is inside the data directory {}: its start-up check would move this \
                 host's streams out of it. Name a directory outside any data directory",
                root.display(),
                a.display()
            )));
        }
    }
    Ok(())
}
