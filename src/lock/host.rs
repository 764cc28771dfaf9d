//! One lock for many data directories: a host directory whose lock covers
//! every data directory directly under it (issue 16: thousands of streams
//! in one process must not hold a descriptor each).
//!
//! ```text
//! HOST_ROOT/
//!   TIERINDEX_HOST       who holds the host (pid/host/start), for messages;
//!                        the lock is a flock of HOST_ROOT itself
//!   NAME/                a data directory (see the parent module)
//!     HOSTED             marker: this data directory is locked through
//!                        its parent's lock
//! ```
//!
//! The rules, and why they exclude every other writer:
//! - A host takes `HOST_ROOT`'s lock and holds it for its life; a second
//!   host on the same root is refused.
//! - A host opens `NAME` by first making `NAME/HOSTED` exist (durably), and
//!   only then trying `NAME`'s own lock, which it drops at once. A process
//!   that holds `NAME` on its own (a `tierindex` command, a broker without
//!   a host) makes that try fail: the open is refused.
//! - A process that opens `NAME` on its own (`DataDir::open`,
//!   [`super::DirLock::alone`])
//!   takes `NAME`'s lock first, and only then looks for `HOSTED`. When it is
//!   there, it also takes the parent's lock, and holds both; the parent's
//!   lock held by a host refuses it.
//!
//!   Either the host's try comes after the other process took `NAME`'s
//!   lock (the try fails), or the other process looks for `HOSTED` after
//!   the host wrote it (it needs the parent's lock). Both cannot miss.
//! - Within the host's process, one open per name at a time.
//!
//! A build from before hosts (crates before 2026-12-06) does not know
//! `HOSTED`: running one on a hosted data directory while its host runs is
//! not excluded (docs/ARCHITECTURE.md, "Hosts").

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::durable::{fsync_dir, fsync_path};
use crate::error::{Error, Result};

/// Marker file in a data directory that a host has opened.
pub const HOSTED_FILE: &str = "HOSTED";

/// Who holds a host (informational), in its directory: not `LOCK`, so that
/// a host's directory never looks like a data directory's.
pub const HOST_INFO_FILE: &str = "TIERINDEX_HOST";

const HOSTED_TEXT: &str = "This data directory belongs to a tierindex host: its lock is the \
parent directory's. A process that opens it on its own takes the parent's lock too, so it \
cannot run while the host does.\n";

/// The host directory's lock and the names open under it in this process.
#[derive(Debug)]
pub struct HostLock {
    root: PathBuf,
    _lock: File,
    open: Mutex<HashSet<OsString>>,
}

/// One name claimed under a [`HostLock`]; released on drop.
#[derive(Debug)]
pub struct Claim {
    host: Arc<HostLock>,
    name: OsString,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.host
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl HostLock {
    /// Creates `root` if missing and takes its lock. (The caller refuses a
    /// `root` that is itself a data directory: `Host::open`.)
    pub fn open(root: &Path) -> Result<Arc<HostLock>> {
        if !root.exists() {
            std::fs::create_dir_all(root)
                .map_err(|e| Error::io(root, "create host directory", e))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(root, "resolve host directory", e))?;
        let lock = match super::lock_root(&root) {
            Err(Error::Locked { path, .. }) => {
                return Err(Error::Locked {
                    path,
                    holder: format!(
                        "another tierindex host, or a command on one of its streams (the \
                         last host: {})",
                        super::holder_in(&root, HOST_INFO_FILE)
                    ),
                });
            }
            r => r?,
        };
        let info = root.join(HOST_INFO_FILE);
        // Informational only (who holds the host); not a durability point.
        let _ = crate::durable::no_follow()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&info)
            .and_then(|mut f| f.write_all(super::holder_line("host").as_bytes()));
        Ok(Arc::new(HostLock {
            root,
            _lock: lock,
            open: Mutex::new(HashSet::new()),
        }))
    }

    /// The host directory, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Claims the data directory `dir` (which must be directly under the
    /// host's directory) for this process: after this returns, no other
    /// process, and no other open in this one, holds it or can take it
    /// while the claim and the host live. Creates `dir` if missing.
    pub fn claim(self: &Arc<Self>, dir: &Path) -> Result<Claim> {
        let name = self.name_of(dir)?;
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if !open.insert(name.clone()) {
                return Err(Error::Locked {
                    path: dir.to_path_buf(),
                    holder: "this process: the stream is already open under its host".into(),
                });
            }
        }
        // From here the claim releases the name on any error.
        let claim = Claim {
            host: self.clone(),
            name,
        };
        let dir = self.root.join(&claim.name);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, "create data directory", e))?;
            fsync_dir(&self.root)?;
        }
        // The marker first, durably; then the try of the directory's own
        // lock (module doc: the order is what excludes the other process).
        let marker = dir.join(HOSTED_FILE);
        if !marker.is_file() {
            crate::durable::write_file(&marker, HOSTED_TEXT.as_bytes())
                .map_err(|e| Error::io(&marker, "write host marker", e))?;
            fsync_path(&marker)?;
            fsync_dir(&dir)?;
        }
        drop(super::lock_root(&dir)?);
        // A build from before the directory lock flocks LOCK itself.
        let info = dir.join(super::LOCK_FILE);
        if let Ok(f) = crate::durable::open_regular(&info, false)
            && !crate::durable::try_lock(&f, &info, "lock data directory")?
        {
            return Err(Error::Locked {
                path: dir,
                holder: "an older tierindex holding its LOCK file".into(),
            });
        }
        Ok(claim)
    }

    /// The name of `dir` under the host's directory. `dir` itself may not
    /// exist yet; its parent must resolve to the host's directory.
    fn name_of(&self, dir: &Path) -> Result<OsString> {
        let outside = || {
            Error::InvalidInput(format!(
                "{} is not a directory directly under the host's directory {}: a host \
                 locks only the data directories it holds",
                dir.display(),
                self.root.display()
            ))
        };
        let name = dir.file_name().ok_or_else(outside)?;
        if name == "." || name == ".." {
            return Err(outside());
        }
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = parent.canonicalize().map_err(|_| outside())?;
        if parent != self.root {
            return Err(outside());
        }
        // A symlink named like a stream could point anywhere: refused.
        if let Ok(m) = std::fs::symlink_metadata(self.root.join(name))
            && !m.is_dir()
        {
            return Err(Error::InvalidInput(format!(
                "{} is not a directory (a symlink or a file): a host opens only the \
                 data directories it holds",
                self.root.join(name).display()
            )));
        }
        Ok(name.to_os_string())
    }
}

/// For [`super::DirLock::alone`], after it took `dir`'s lock:
/// when `dir` is hosted, the parent's lock too (held by the caller for the
/// life of its `DataDir`).
pub(super) fn lock_host_of(dir: &Path) -> Result<Option<File>> {
    if !dir.join(HOSTED_FILE).exists() {
        return Ok(None);
    }
    let real = dir
        .canonicalize()
        .map_err(|e| Error::io(dir, "resolve data directory", e))?;
    let Some(parent) = real.parent() else {
        return Ok(None);
    };
    match super::lock_root(parent) {
        Ok(f) => Ok(Some(f)),
        Err(Error::Locked { .. }) => Err(Error::Locked {
            path: dir.to_path_buf(),
            holder: format!(
                "the tierindex host of {} ({}): this data directory is one of its \
                 streams (it has a {HOSTED_FILE} file)",
                parent.display(),
                super::holder_in(parent, HOST_INFO_FILE)
            ),
        }),
        Err(e) => Err(e),
    }
}
