//! One lock for many data directories: a host directory whose lock covers
//! every data directory directly under it (issue 16: thousands of streams
//! in one process must not hold a descriptor each).
//!
//! ```text
//! HOST_ROOT/
//!   TIERINDEX_HOST       the last host (pid/host/start), for messages; the
//!                        lock is a flock of HOST_ROOT itself
//!   NAME/                a data directory (see the parent module)
//!     HOSTED             marker: this data directory is locked through its
//!                        host's lock; names the host's directory (device,
//!                        inode and path)
//! ```
//!
//! The rules, and why they exclude every other writer:
//! - A host holds `HOST_ROOT`'s lock exclusively for its life: a second
//!   host, or a host while a command runs on one of its streams, is refused.
//! - A host opens `NAME` by first making `NAME/HOSTED` name it (durably),
//!   and only then trying `NAME`'s own lock, which it drops at once. A
//!   process that holds `NAME` on its own (a `tierindex` command, a broker
//!   without a host) makes that try fail: the open is refused (and a marker
//!   the try wrote is removed).
//! - A process that opens `NAME` on its own ([`super::DirLock::alone`])
//!   takes `NAME`'s lock first, and only then reads `HOSTED`. When it names
//!   a host, it also takes that host's directory's lock, shared (commands on
//!   two streams of one host run side by side), and holds both; the host
//!   holding it refuses the open.
//!
//!   Either the host's try comes after the other process took `NAME`'s
//!   lock (the try fails), or the other process reads `HOSTED` after the
//!   host wrote it (it needs the host's lock). Both cannot miss.
//! - The host's directory is found by the device and inode `HOSTED`
//!   records, not by `NAME`'s parent: `NAME` reached through another path
//!   (moved out, bind-mounted into a container, copied) still needs that
//!   host's lock, found at the recorded path; when the recorded path no
//!   longer is that directory, the open is refused, saying what to check.
//! - A host that finds `HOSTED` naming another host's directory takes
//!   `NAME` over only when that directory is still at its recorded path
//!   and unlocked (its host, which takes its lock before any claim, is not
//!   running); otherwise it refuses.
//! - Within the host's process, one open per directory (device and inode:
//!   a rename under the host does not make a second one).
//!
//! A build from before hosts (crates before 2026-12-05) does not know
//! `HOSTED`: running one on a hosted data directory while its host runs is
//! not excluded (docs/ARCHITECTURE.md, "Hosts").

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::durable::{fsync_dir, fsync_path};
use crate::error::{Error, Result};

/// Marker file in a data directory that a host has opened.
pub const HOSTED_FILE: &str = "HOSTED";

/// Who holds a host (informational), in its directory: not `LOCK`, so that
/// a host's directory never looks like a data directory's.
pub const HOST_INFO_FILE: &str = "TIERINDEX_HOST";

const MARKER_MAGIC: &str = "tierindex HOSTED 1";
/// A marker is a few hundred bytes; what is past this is not read.
const MARKER_MAX: u64 = 8192;

/// Device and inode: what a directory is, whatever path reaches it.
type Ident = (u64, u64);

fn ident(path: &Path) -> std::io::Result<Ident> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// What `HOSTED` says: its host's directory.
#[derive(Debug, PartialEq, Eq)]
struct Marker {
    root: Ident,
    path: PathBuf,
}

impl Marker {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt as _;
        let mut out = format!(
            "{MARKER_MAGIC}\nroot_dev={}\nroot_ino={}\nroot=",
            self.root.0, self.root.1
        )
        .into_bytes();
        out.extend_from_slice(self.path.as_os_str().as_bytes());
        out.extend_from_slice(
            b"\n\nThis data directory belongs to the tierindex host of the directory above \
              (device, inode, path). A process that opens it on its own takes that host's \
              lock too, so it cannot run while the host does.\n",
        );
        out
    }

    /// `Ok(None)`: no marker. A marker that does not decode is an error
    /// that says what to do (never guessed past).
    fn read(dir: &Path) -> Result<Option<Marker>> {
        let path = dir.join(HOSTED_FILE);
        let f = match crate::durable::open_regular(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, "read host marker", e)),
        };
        let mut buf = Vec::new();
        f.take(MARKER_MAX)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&path, "read host marker", e))?;
        Self::decode(&buf).map(Some).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} does not name its host (damaged, or written by hand): this data \
                 directory cannot tell whose lock covers it. If no tierindex host runs it, \
                 remove the file and open it again",
                path.display()
            ))
        })
    }

    fn decode(buf: &[u8]) -> Option<Marker> {
        use std::os::unix::ffi::OsStrExt as _;
        let mut lines = buf.split(|b| *b == b'\n');
        if lines.next()? != MARKER_MAGIC.as_bytes() {
            return None;
        }
        let mut field = |name: &str| -> Option<&[u8]> {
            lines.next()?.strip_prefix(name.as_bytes())
        };
        let num = |v: &[u8]| std::str::from_utf8(v).ok()?.parse::<u64>().ok();
        let dev = num(field("root_dev=")?)?;
        let ino = num(field("root_ino=")?)?;
        let path = field("root=")?;
        if path.is_empty() {
            return None;
        }
        Some(Marker {
            root: (dev, ino),
            path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        })
    }

    /// The host's directory at its recorded path, when it still is that
    /// directory.
    fn root_in_place(&self) -> Option<&Path> {
        (ident(&self.path).ok()? == self.root).then_some(self.path.as_path())
    }
}

/// The host directory's lock and the directories open under it in this
/// process.
#[derive(Debug)]
pub struct HostLock {
    root: PathBuf,
    id: Ident,
    _lock: File,
    open: Mutex<HashSet<Ident>>,
}

/// One data directory claimed under a [`HostLock`]; released on drop.
#[derive(Debug)]
pub struct Claim {
    host: Arc<HostLock>,
    id: Ident,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.host
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl HostLock {
    /// Creates `root` if missing and takes its lock, exclusively. (The
    /// caller refuses a `root` that is itself a data directory:
    /// `Host::open`.)
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
                         last host, as {HOST_INFO_FILE} says: {})",
                        super::holder_in(&root, HOST_INFO_FILE)
                    ),
                });
            }
            r => r?,
        };
        let id = ident(&root).map_err(|e| Error::io(&root, "stat host directory", e))?;
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
            id,
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
        let dir = self.root.join(&name);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, "create data directory", e))?;
            fsync_dir(&self.root)?;
        }
        let id = ident(&dir).map_err(|e| Error::io(&dir, "stat data directory", e))?;
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if !open.insert(id) {
                return Err(Error::Locked {
                    path: dir,
                    holder: "this process: the directory is already open under its host \
                             (perhaps by another name, before a rename)"
                        .into(),
                });
            }
        }
        // From here the claim releases the directory on any error.
        let claim = Claim {
            host: self.clone(),
            id,
        };
        let ours = Marker {
            root: self.id,
            path: self.root.clone(),
        };
        // The marker first, durably; then the try of the directory's own
        // lock (module doc: the order is what excludes the other process).
        let wrote = match Marker::read(&dir)? {
            Some(m) if m.root == self.id => false,
            Some(m) => {
                self.may_take_over(&dir, &m)?;
                write_marker(&dir, &ours)?;
                false
            }
            None => {
                write_marker(&dir, &ours)?;
                true
            }
        };
        let refused = |holder: String| {
            // A marker this try wrote is taken back: the holder on its own
            // never needed it (it looked before we wrote, or it would have
            // needed our lock). Best effort: a marker left is only stricter.
            if wrote {
                let m = dir.join(HOSTED_FILE);
                if std::fs::remove_file(&m).is_ok() {
                    let _ = fsync_dir(&dir);
                }
            }
            Error::Locked {
                path: dir.clone(),
                holder,
            }
        };
        match super::lock_root(&dir) {
            Ok(f) => drop(f),
            Err(Error::Locked { holder, .. }) => return Err(refused(holder)),
            Err(e) => return Err(e),
        }
        // A build from before the directory lock flocks LOCK itself.
        let info = dir.join(super::LOCK_FILE);
        if let Ok(f) = crate::durable::open_regular(&info, false)
            && !crate::durable::try_lock(&f, &info, "lock data directory")?
        {
            return Err(refused("an older tierindex holding its LOCK file".into()));
        }
        Ok(claim)
    }

    /// `dir`'s marker names another host's directory: taken over only when
    /// that directory is where it was recorded and its lock is free (its
    /// host takes the lock before any claim, so none runs).
    fn may_take_over(&self, dir: &Path, m: &Marker) -> Result<()> {
        let Some(other) = m.root_in_place() else {
            return Err(Error::InvalidInput(format!(
                "{} belongs to the tierindex host of {} (device {}, inode {}), which is not \
                 there any more: the data directory was moved or copied out of it, or that \
                 directory was. If no host runs it (a host whose directory was renamed \
                 still does), remove {} and open it again",
                dir.display(),
                m.path.display(),
                m.root.0,
                m.root.1,
                dir.join(HOSTED_FILE).display()
            )));
        };
        match super::lock_root(other) {
            Ok(f) => {
                drop(f);
                tracing::warn!(
                    dir = %dir.display(),
                    from = %other.display(),
                    to = %self.root.display(),
                    "a data directory of another host's, not running, is taken over by this host"
                );
                Ok(())
            }
            Err(Error::Locked { .. }) => Err(Error::Locked {
                path: dir.to_path_buf(),
                holder: format!(
                    "the tierindex host of {}, which runs (or a command on one of its \
                     streams): this data directory is reached here through another path",
                    other.display()
                ),
            }),
            Err(e) => Err(e),
        }
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

fn write_marker(dir: &Path, m: &Marker) -> Result<()> {
    let path = dir.join(HOSTED_FILE);
    let tmp = dir.join(format!("{HOSTED_FILE}.tmp"));
    crate::durable::write_file(&tmp, &m.encode())
        .map_err(|e| Error::io(&tmp, "write host marker", e))?;
    fsync_path(&tmp)?;
    crate::durable::rename(&tmp, &path).map_err(|e| Error::io(&path, "install host marker", e))?;
    fsync_dir(dir)
}

/// For [`super::DirLock::alone`], after it took `dir`'s own lock: when
/// `dir` is hosted, its host's lock, shared (held by the caller for as long
/// as it holds `dir`).
pub(super) fn lock_host_of(dir: &Path) -> Result<Option<File>> {
    let Some(m) = Marker::read(dir)? else {
        return Ok(None);
    };
    let Some(root) = m.root_in_place() else {
        return Err(Error::InvalidInput(format!(
            "{} belongs to the tierindex host of {} (device {}, inode {}), which is not \
             there any more: the data directory was moved or copied out of it, or that \
             directory was. If no host runs it (a host whose directory was renamed still \
             does), remove {} and open it again",
            dir.display(),
            m.path.display(),
            m.root.0,
            m.root.1,
            dir.join(HOSTED_FILE).display()
        )));
    };
    let f = File::open(root).map_err(|e| Error::io(root, "open host directory", e))?;
    if crate::durable::try_lock_shared(&f, root, "lock host directory")? {
        return Ok(Some(f));
    }
    Err(Error::Locked {
        path: dir.to_path_buf(),
        holder: format!(
            "the tierindex host of {} (as its {HOST_INFO_FILE} says: {}): this data \
             directory is one of its streams (it has a {HOSTED_FILE} file)",
            root.display(),
            super::holder_in(root, HOST_INFO_FILE)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_round_trips_and_garbage_is_no_marker() {
        let m = Marker {
            root: (2049, 1234567),
            path: PathBuf::from("/var/lib/tier host/é"),
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        for bad in [
            &b""[..],
            b"tierindex HOSTED 1",
            b"tierindex HOSTED 2\nroot_dev=1\nroot_ino=2\nroot=/x\n",
            b"tierindex HOSTED 1\nroot_dev=x\nroot_ino=2\nroot=/x\n",
            b"tierindex HOSTED 1\nroot_dev=1\nroot_ino=2\nroot=\n",
            b"tierindex HOSTED 1\nroot_ino=2\nroot_dev=1\nroot=/x\n",
            b"This data directory belongs to a tierindex host",
        ] {
            assert_eq!(Marker::decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
