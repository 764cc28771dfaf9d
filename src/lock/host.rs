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
//! - A host opens `NAME` by taking `NAME`'s own lock (a process that holds
//!   `NAME` on its own, a `tierindex` command or a broker without a host,
//!   makes that fail: the open is refused), making `NAME/HOSTED` name it
//!   (durably), then dropping `NAME`'s lock.
//! - A process that opens `NAME` on its own ([`super::DirLock::alone`])
//!   takes `NAME`'s lock first, and only then reads `HOSTED`. When it names
//!   a host, it also takes that host's directory's lock, shared (commands on
//!   two streams of one host run side by side), and holds both; the host
//!   holding it refuses the open.
//!
//!   The host holds `NAME`'s own lock while it reads and writes `HOSTED`
//!   (then drops it): a process holding `NAME` on its own refuses the
//!   claim; one that opens `NAME` after the claim reads the marker and
//!   needs the host's lock. Two hosts reaching one directory (a bind
//!   mount) take turns on `NAME`'s lock, and the second finds the first's
//!   marker.
//! - The host's directory is found by the device and inode `HOSTED`
//!   records, not by `NAME`'s parent: `NAME` reached through another path
//!   (moved out, bind-mounted into a container, copied) still needs that
//!   host's lock, found at the recorded path, or as `NAME`'s parent when
//!   the parent is that directory (the host's directory renamed); when
//!   neither is, the open is refused, saying what to check.
//! - A process that opens a `NAME` without `HOSTED` directly under a host's
//!   directory (one holding `TIERINDEX_HOST`) takes that directory's lock
//!   shared too: a stream of a running host whose marker was removed (by
//!   hand, a restore) is refused, not opened beside its host. Under any
//!   other directory it tries that directory's lock and lets go: a host
//!   whose `TIERINDEX_HOST` was removed too still holds it.
//! - A host that finds `HOSTED` naming another host's directory takes
//!   `NAME` over only when that directory is still at its recorded path
//!   and unlocked (its host, which takes its lock before any claim, is not
//!   running), and holds that lock until its own marker is written;
//!   otherwise it refuses.
//! - A host whose directory was renamed away while it ran opens no more
//!   streams (the path is no longer its directory).
//! - Within the host's process, one open per directory (device and inode:
//!   a rename under the host does not make a second one).
//!
//! A build from before hosts (crates before 2026-12-05) does not know
//! `HOSTED`: running one on a hosted data directory while its host runs is
//! not excluded (docs/ARCHITECTURE.md, "Hosts").

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::durable::{fsync_dir, fsync_path};
use crate::error::{Error, Result};
use super::RootLock;

/// Marker file in a data directory that a host has opened.
pub const HOSTED_FILE: &str = "HOSTED";

/// Who holds a host (informational), in its directory: not `LOCK`, so that
/// a host's directory never looks like a data directory's.
pub const HOST_INFO_FILE: &str = "TIERINDEX_HOST";

/// How a stream's share of its host's lock says what failed.
const HOST_LOCK_WORDS: (&str, &str) = ("open host directory", "lock host directory");

const MARKER_MAGIC: &str = "tierindex HOSTED 1";
/// A marker is a few hundred bytes; what is past this is not read.
const MARKER_MAX: u64 = 16_384;

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
    /// Text: the path as hex (any bytes, newlines included, round-trip),
    /// then as text for a reader (not decoded).
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt as _;
        let hex: String = self
            .path
            .as_os_str()
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let shown: String = self
            .path
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        format!(
            "{MARKER_MAGIC}\nroot_dev={}\nroot_ino={}\nroot_hex={hex}\nroot={shown}\n\n\
             This data directory belongs to the tierindex host of the directory above \
             (device, inode, path). A process that opens it on its own takes that host's \
             lock too, so it cannot run while the host does.\n",
            self.root.0, self.root.1
        )
        .into_bytes()
    }

    /// `Ok(None)`: no marker. A marker that does not decode is an error
    /// that says what to do (never guessed past).
    fn read(dir: &Path) -> Result<Option<Marker>> {
        let path = dir.join(HOSTED_FILE);
        let f = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
        };
        let f = match f {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Ok(_) | Err(_) => {
                // A symlink (ELOOP), a FIFO, a directory: not a marker
                // tierindex wrote, and not to be guessed past.
                return Err(Error::InvalidInput(format!(
                    "{} is not a regular file (a symlink, a directory or a device): this \
                     data directory cannot tell whose lock covers it. If no tierindex host \
                     runs it, remove it and open the data directory again",
                    path.display()
                )));
            }
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
        let mut field = |name: &str| -> Option<&str> {
            std::str::from_utf8(lines.next()?.strip_prefix(name.as_bytes())?).ok()
        };
        let dev = field("root_dev=")?.parse::<u64>().ok()?;
        let ino = field("root_ino=")?.parse::<u64>().ok()?;
        let hex = field("root_hex=")?;
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * 4096 {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Marker {
            root: (dev, ino),
            path: PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)),
        })
    }

    /// The host's directory at its recorded path, when it still is that
    /// directory (the same device and inode).
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
    _lock: RootLock,
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
        let existed = root.exists();
        if !existed {
            std::fs::create_dir_all(root)
                .map_err(|e| Error::io(root, "create host directory", e))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(root, "resolve host directory", e))?;
        if existed {
            crate::durable::sync_name_of_existing(&root)?;
        }
        let lock = match super::lock_root(&root) {
            Err(Error::Locked { path, .. }) => {
                return Err(Error::Locked {
                    path,
                    holder: format!(
                        "another tierindex host, or a command on one of its streams ({}; \
                         {HOST_INFO_FILE} names the last host)",
                        super::holder_of(&root, HOST_INFO_FILE)
                    ),
                });
            }
            r => r?,
        };
        // The streams' names: a process killed between a stream's `mkdir`
        // and its fsync (in `claim`) left its name to the file system;
        // the streams opened from now rely on it (gap 17).
        fsync_dir(&root)?;
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
        // The directory's own lock, held while the marker is read and
        // written (module doc): a process holding it on its own refuses
        // the claim; another host's claim, or an open on its own, waits
        // its turn and then reads what this one wrote.
        let own = match super::lock_root_under_host(&dir) {
            Ok(f) => f,
            Err(Error::Locked { holder, .. }) => {
                return Err(Error::Locked { path: dir, holder });
            }
            Err(e) => return Err(e),
        };
        // A build from before the directory lock flocks LOCK itself.
        let info = dir.join(super::LOCK_FILE);
        if let Ok(f) = crate::durable::open_regular(&info, false) {
            if !crate::durable::try_lock(&f, &info, "lock data directory")? {
                return Err(Error::Locked {
                    path: dir,
                    holder: format!(
                        "a process holding its LOCK file locked, as a tierindex from before \
                         2026-12-05 does ({})",
                        match super::flock_holders(&info).as_slice() {
                            [] => "not shown in /proc/locks".to_string(),
                            pids => format!("/proc/locks: {}", super::pid_list(pids)),
                        }
                    ),
                });
            }
            // Checked, not held: let go now, not when the descriptor
            // closes (a child forked meanwhile would keep its copy).
            let _ = f.unlock();
        }
        match Marker::read(&dir)? {
            Some(m) if m.root == self.id => {}
            Some(m) => {
                // The other host's lock, held until our marker is written:
                // it cannot start and claim in between.
                let _other = self.may_take_over(&dir, &m)?;
                write_marker(&dir, &ours)?;
            }
            None => write_marker(&dir, &ours)?,
        }
        drop(own);
        Ok(claim)
    }

    /// `dir`'s marker names another host's directory: taken over only when
    /// that directory is where it was recorded and its lock is free (its
    /// host takes the lock before any claim, so none runs).
    fn may_take_over(&self, dir: &Path, m: &Marker) -> Result<RootLock> {
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
                tracing::warn!(
                    dir = %dir.display(),
                    from = %other.display(),
                    to = %self.root.display(),
                    "a data directory of another host's, not running, is taken over by this host"
                );
                Ok(f)
            }
            Err(Error::Locked { .. }) => Err(Error::Locked {
                path: dir.to_path_buf(),
                holder: format!(
                    "the tierindex host of {}, which runs (or a command on one of its \
                     streams): this data directory is reached here through another path, or is a \
                     copy of one of that host's streams",
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
        // The path must still be the host's directory (one renamed while
        // the host ran, and a new one made in its place, is not locked).
        if ident(&self.root).ok() != Some(self.id) {
            return Err(Error::InvalidInput(format!(
                "{} is no longer this host's directory (it was renamed or replaced while \
                 the host ran): no stream is opened in it. Stop the host, put its \
                 directory back, and start it again",
                self.root.display()
            )));
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
    // Under the directory's lock; the pid keeps two processes' apart all
    // the same (a leftover of a crash is harmless: never read).
    let tmp = dir.join(format!("{HOSTED_FILE}.tmp.{}", std::process::id()));
    crate::durable::write_file(&tmp, &m.encode())
        .map_err(|e| Error::io(&tmp, "write host marker", e))?;
    fsync_path(&tmp)?;
    crate::durable::rename(&tmp, &path).map_err(|e| Error::io(&path, "install host marker", e))?;
    fsync_dir(dir)
}

/// For [`super::DirLock::alone`], after it took `dir`'s own lock: when
/// `dir` is hosted, its host's lock, shared, and when its `HOSTED` marker
/// names a directory other than its parent, the parent's as for a
/// directory with no marker (held by the caller for as long as it holds
/// `dir`). A marker restored from a backup, or copied from another host's
/// stream, names a host that is not the one running `dir` now: taking
/// only that one's lock let a `drain` run beside the real host, which then
/// lost acknowledged entries (helper-75 F1).
pub(super) fn lock_host_of(dir: &Path) -> Result<Vec<RootLock>> {
    let parent = dir
        .canonicalize()
        .map_err(|e| Error::io(dir, "resolve data directory", e))?
        .parent()
        .map(Path::to_path_buf);
    let above = |p: &Option<PathBuf>| -> Result<Vec<RootLock>> {
        Ok(match p {
            Some(p) => lock_host_above(dir, p)?.into_iter().collect(),
            None => Vec::new(),
        })
    };
    let Some(m) = Marker::read(dir)? else {
        return above(&parent);
    };
    let marker_host = lock_marker_host(dir, &m, parent.as_deref())?;
    let mut held = vec![marker_host.1];
    if parent.as_deref() != Some(marker_host.0.as_path()) {
        held.extend(above(&parent)?);
    }
    Ok(held)
}

/// The lock of the host `m` names (its directory, and the lock, shared).
fn lock_marker_host(dir: &Path, m: &Marker, parent: Option<&Path>) -> Result<(PathBuf, RootLock)> {
    let parent = parent.map(Path::to_path_buf);
    // The recorded path, or this directory's parent when that is the same
    // directory (the host's directory renamed, while it runs or not).
    let root = match m.root_in_place() {
        Some(r) => r.to_path_buf(),
        None => match parent.filter(|p| ident(p).ok() == Some(m.root)) {
            Some(p) => p,
            None => {
                return Err(Error::InvalidInput(format!(
                    "{} belongs to the tierindex host of {} (device {}, inode {}), which is \
                     not there any more: the data directory was moved or copied out of it, \
                     or that directory was (or restored, or moved to another disk, or its \
                     device was numbered otherwise after a reboot: the directory at that path \
                     has another device or inode; a directory is known by both, since another \
                     file system mounted there, an overlay or a container's, can show the same \
                     inode number). Find where that host's directory is now (a \
                     running host's process still holds it open) and stop that host, or put \
                     this directory back under it; only if that host is gone for good, \
                     remove {} and open it again",
                    dir.display(),
                    m.path.display(),
                    m.root.0,
                    m.root.1,
                    dir.join(HOSTED_FILE).display()
                )));
            }
        },
    };
    if let Some(l) = super::try_lock_dir(&root, true, HOST_LOCK_WORDS)? {
        return Ok((root, l));
    }
    Err(Error::Locked {
        path: dir.to_path_buf(),
        holder: format!(
            "the tierindex host of {} ({}; its {HOST_INFO_FILE} names the last host): this \
             data directory is one of its streams (it has a {HOSTED_FILE} file)",
            root.display(),
            super::holder_of(&root, HOST_INFO_FILE)
        ),
    })
}

/// A data directory without a `HOSTED` marker, directly under a host's
/// directory (one with [`HOST_INFO_FILE`]): its host may hold it with the
/// marker removed (by hand, or a backup restored without it), and a second
/// writer beside that host would lose acknowledged entries. So the host's
/// lock is taken as for a marked stream: shared, refused while a host runs
/// there. Only directories a host ever ran in are locked this way. In any
/// other parent the lock is only tried, and let go at once: a host running
/// there with its `TIERINDEX_HOST` removed too (by hand: helper-60) holds
/// it exclusively, and is refused as above; a host that starts later finds
/// this directory's own lock held when it claims it. A parent that cannot
/// be opened (no read permission) is not tried.
fn lock_host_above(dir: &Path, parent: &Path) -> Result<Option<RootLock>> {
    match std::fs::symlink_metadata(parent.join(HOST_INFO_FILE)) {
        Ok(m) if m.file_type().is_file() => {}
        _ => {
            return match super::try_lock_dir(parent, true, HOST_LOCK_WORDS) {
                Ok(Some(tried)) => {
                    drop(tried);
                    Ok(None)
                }
                Ok(None) => Err(Error::Locked {
                    path: dir.to_path_buf(),
                    holder: format!(
                        "a process that holds {} itself locked, as a running tierindex host \
                         does (its {HOST_INFO_FILE} file, which would name it, is not there): \
                         this data directory may be one of its streams whose {HOSTED_FILE} was \
                         removed. Stop that process first (`fuser -v {}` names it), or move \
                         this directory out of that directory if it is not one of its streams",
                        parent.display(),
                        parent.display()
                    ),
                }),
                Err(e) => {
                    tracing::debug!(parent = %parent.display(), error = %e, "the parent directory's lock could not be tried");
                    Ok(None)
                }
            };
        }
    }
    if let Some(l) = super::try_lock_dir(parent, true, HOST_LOCK_WORDS)? {
        return Ok(Some(l));
    }
    Err(Error::Locked {
        path: dir.to_path_buf(),
        holder: format!(
            "the tierindex host of {} ({}; its {HOST_INFO_FILE} names the last host): this \
             data directory is directly under that running host's directory and has no \
             {HOSTED_FILE} file naming it (its {HOSTED_FILE} was removed, or names another \
             host's directory: restored from a backup, or copied), so it may be one of its \
             streams. Stop that host first (or move this directory out of its directory if \
             it is not one of its streams)",
            parent.display(),
            super::holder_of(parent, HOST_INFO_FILE)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gap 17: a host's open makes durable its own name and its streams'
    /// names, whatever process created them.
    #[test]
    fn a_hosts_open_makes_its_name_and_its_streams_names_durable() {
        use crate::durable::seam::{Step, steps_of};
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("host");
        std::fs::create_dir_all(root.join("s1")).unwrap();
        let (h, steps) = steps_of(|| HostLock::open(&root));
        let h = h.unwrap();
        for dir in [d.path().to_path_buf(), h.root().to_path_buf()] {
            assert!(steps.contains(&Step::FsyncDir(dir.clone())), "{dir:?}: {steps:?}");
        }
    }

    #[test]
    fn a_marker_round_trips_and_garbage_is_no_marker() {
        use std::os::unix::ffi::OsStrExt as _;
        for path in [
            PathBuf::from("/var/lib/tier host/é"),
            PathBuf::from("/tmp/a\nroot_dev=1\nb"),
            PathBuf::from(std::ffi::OsStr::from_bytes(b"/x/\xff\x00y")),
        ] {
            let m = Marker {
                root: (2049, 1234567),
                path,
            };
            assert_eq!(Marker::decode(&m.encode()), Some(m));
        }
        for bad in [
            &b""[..],
            b"tierindex HOSTED 1",
            b"tierindex HOSTED 2\nroot_dev=1\nroot_ino=2\nroot_hex=2f78\n",
            b"tierindex HOSTED 1\nroot_dev=x\nroot_ino=2\nroot_hex=2f78\n",
            b"tierindex HOSTED 1\nroot_dev=1\nroot_ino=2\nroot_hex=\n",
            b"tierindex HOSTED 1\nroot_dev=1\nroot_ino=2\nroot_hex=2f7\n",
            b"tierindex HOSTED 1\nroot_dev=1\nroot_ino=2\nroot_hex=2fzz\n",
            b"tierindex HOSTED 1\nroot_dev=1\nroot_ino=2\nroot_hex=2f\xc3\n",
            b"tierindex HOSTED 1\nroot_ino=2\nroot_dev=1\nroot_hex=2f78\n",
            b"This data directory belongs to a tierindex host",
        ] {
            assert_eq!(Marker::decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
