//! The locks that give a data directory one writer: its own (a `flock` of
//! the directory), or its host's ([`host`]). Below `datadir` and `journal`,
//! which both take them, and importing neither.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

pub mod host;

use host::{Claim, HostLock};

/// `DATA_DIR/LOCK`: who holds the data directory (informational); the lock
/// itself is a `flock` of the directory.
pub const LOCK_FILE: &str = "LOCK";

/// Who holds `root`'s lock, as its file `name` says (informational: at
/// most its first 512 bytes, control characters replaced).
pub(crate) fn holder_in(root: &Path, name: &str) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = crate::durable::open_regular(&root.join(name), false) {
        let _ = f.take(512).read_to_end(&mut buf);
    }
    let s: String = String::from_utf8_lossy(&buf)
        .trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.is_empty() {
        "unknown holder".into()
    } else {
        s
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `WHAT: pid=.. host=.. since_ms=..`, for a lock's informational file.
pub(crate) fn holder_line(what: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "{what}: pid={} host={} since_ms={ms}",
        std::process::id(),
        hostname()
    )
}

/// An exclusive, non-blocking `flock` of the directory `root` itself, held
/// until the returned descriptor closes ([`Error::Locked`], with what its
/// `LOCK` file says, when another holds it).
pub(crate) fn lock_root(root: &Path) -> Result<File> {
    let lock = File::open(root).map_err(|e| Error::io(root, "open data directory", e))?;
    if !crate::durable::try_lock(&lock, root, "lock data directory")? {
        return Err(Error::Locked {
            path: root.to_path_buf(),
            holder: holder_in(root, LOCK_FILE),
        });
    }
    Ok(lock)
}

/// What keeps a data directory locked; released when it drops.
#[derive(Debug)]
pub struct DirLock {
    root: PathBuf,
    _held: Held,
}

// The fields are held for their drop (the descriptors close, the claim
// releases its name).
#[allow(dead_code)]
#[derive(Debug)]
enum Held {
    /// Its own lock, and its host's when it has a `HOSTED` marker.
    Own { dir: File, host: Option<File> },
    /// Its host's lock, held by the host ([`HostLock::claim`]).
    Hosted(Claim),
}

impl DirLock {
    /// The data directory it locks.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes `root`'s lock as a process holding it on its own does: its
    /// own, then its host's when it is hosted (see [`host`]: in that
    /// order). For a writer without a `DataDir` (a journal opened or
    /// rebuilt on its own): it writes nothing.
    pub fn alone(root: &Path) -> Result<DirLock> {
        let dir = lock_root(root)?;
        let host = host::lock_host_of(root)?;
        Ok(DirLock {
            root: root.to_path_buf(),
            _held: Held::Own { dir, host },
        })
    }

    /// [`DirLock::alone`] for a `DataDir`: also refuses a build from before
    /// the directory lock (it locks `LOCK` itself), and writes who holds it
    /// into `LOCK`.
    pub fn own(root: &Path) -> Result<DirLock> {
        let lock_path = root.join(LOCK_FILE);
        let mut info = crate::durable::no_follow()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| {
                // A read-only directory or a LOCK owned by another user
                // (a data directory copied as root): say what to check.
                let what = if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) {
                    "open lock file for writing: this command takes the data directory's lock; \
                     check that this user may write the directory and its LOCK file (owner, \
                     mode, a read-only mount); `tierindex status` and `inspect` read without it"
                } else {
                    "open lock file"
                };
                Error::io(&lock_path, what, e)
            })?;
        let lock = DirLock::alone(root)?;
        // A build from before the directory lock (crates before 2026-12-05)
        // locks `LOCK` itself: one running must not be missed. Checked, not
        // held (a descriptor a stream).
        if !crate::durable::try_lock(&info, &lock_path, "lock data directory")? {
            return Err(Error::Locked {
                path: root.to_path_buf(),
                holder: format!(
                    "an older tierindex holding its LOCK file: {}",
                    holder_in(root, LOCK_FILE)
                ),
            });
        }
        let _ = info.unlock();
        // Informational only (who holds the lock); not a durability point.
        let me = holder_line("data directory");
        let _ = info
            .set_len(0)
            .and_then(|_| info.rewind())
            .and_then(|_| info.write_all(me.as_bytes()));
        Ok(lock)
    }

    /// `root`, a data directory directly under `host`'s directory, held
    /// through the host's lock ([`HostLock::claim`]).
    pub fn hosted(host: &Arc<HostLock>, root: &Path) -> Result<DirLock> {
        Ok(DirLock {
            root: root.to_path_buf(),
            _held: Held::Hosted(host.claim(root)?),
        })
    }
}
