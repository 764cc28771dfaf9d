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

/// The pids `/proc/locks` shows holding a `flock` on `target` (a file or
/// a directory), sorted, at most 8; empty where there is no `/proc/locks`
/// (another system) or none is shown. The informational files name the
/// last tierindex to take a lock, which need not be who holds it now (any
/// process can `flock` a data directory's `LOCK`: helper-74 F9).
pub(crate) fn flock_holders(target: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(m) = std::fs::metadata(target) else {
        return Vec::new();
    };
    // Bounded: one line per lock on the machine, 1 MiB is thousands.
    let mut text = String::new();
    if File::open("/proc/locks")
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .is_err()
    {
        return Vec::new();
    }
    let want = (
        u64::from(libc::major(m.dev())),
        u64::from(libc::minor(m.dev())),
        m.ino(),
    );
    let mut pids: Vec<u32> = text
        .lines()
        .filter_map(|line| parse_lock_line(line).filter(|&(_, dev)| dev == want))
        .map(|(pid, _)| pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.truncate(8);
    pids
}

/// `1: FLOCK  ADVISORY  WRITE 28428 08:01:1234 0 EOF` -> (28428, (8, 1,
/// 1234)); a waiter's line (`1: -> FLOCK ...`) and other kinds are None.
fn parse_lock_line(line: &str) -> Option<(u32, (u64, u64, u64))> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(1) != Some(&"FLOCK") {
        return None;
    }
    let pid = f.get(4)?.parse().ok()?;
    let mut dev = f.get(5)?.split(':');
    let major = u64::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u64::from_str_radix(dev.next()?, 16).ok()?;
    let ino = dev.next()?.parse().ok()?;
    Some((pid, (major, minor, ino)))
}

/// `pid 1, pid 2` for a message.
pub(crate) fn pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| format!("pid {p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Who holds the lock of the directory `root`: the pids `/proc/locks`
/// shows, then what its informational file `name` says of the last
/// tierindex to take it; only the latter where no pid is shown.
pub(crate) fn holder_of(root: &Path, name: &str) -> String {
    let last = holder_in(root, name);
    let me = std::process::id();
    match flock_holders(root).as_slice() {
        [] => last,
        pids if pids.contains(&me) => format!(
            "{} (pid {me} holds it (/proc/locks); the last tierindex to take it wrote: \
             {last}): another instance is open on it in this process, or one was dropped \
             without `shutdown` and its background tasks have not let go of it yet: call \
             `shutdown` on that one (it returns once the lock is released), or retry shortly",
            crate::error::HELD_BY_THIS_PROCESS
        ),
        pids => format!(
            "{} holds it (/proc/locks); the last tierindex to take it wrote: {last}",
            pid_list(pids)
        ),
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

/// How long a lock is waited for when its informational file names this
/// very process and no lock this process holds now is on it: the
/// descriptor was closed here, but a child this process started (any
/// thread's `Command::spawn`) still holds a copy between its `fork` and its
/// `exec`, which closes it. A short, bounded wait; a lock held by another
/// process, or by a lock this process still holds, is refused at once.
const FORKED_COPY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The directories this process holds a lock on now (device, inode: a
/// count, since shared locks may be taken more than once).
static HELD_HERE: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn held_here() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<(u64, u64), usize>> {
    HELD_HERE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory's `flock`, held while this lives (its descriptor closes on
/// drop), and known to this process as held by it meanwhile.
#[derive(Debug)]
pub(crate) struct RootLock {
    _file: File,
    id: (u64, u64),
}

impl Drop for RootLock {
    fn drop(&mut self) {
        let mut held = held_here();
        if let Some(n) = held.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// Whether what `root`'s informational files (`LOCK`, a host's
/// `TIERINDEX_HOST`) say names this process on this machine as the last
/// holder.
fn names_this_process(root: &Path) -> bool {
    let me = format!("pid={} host={} ", std::process::id(), hostname());
    [LOCK_FILE, host::HOST_INFO_FILE]
        .iter()
        .any(|name| holder_in(root, name).contains(&me))
}

/// `root`'s `flock` (exclusive, or `shared`), without blocking on another
/// holder: `Ok(None)` when one holds it. A holder that is only a forked
/// copy of a descriptor this process closed is waited for, briefly (see
/// [`FORKED_COPY_WAIT`]).
pub(crate) fn try_lock_dir(
    root: &Path,
    shared: bool,
    words: (&'static str, &'static str),
) -> Result<Option<RootLock>> {
    lock_dir_waiting(root, shared, words, names_this_process)
}

/// [`try_lock_dir`], waiting out (for at most [`FORKED_COPY_WAIT`]) any
/// holder that is not a lock this process holds now and that `transient`
/// says may let go soon.
fn lock_dir_waiting(
    root: &Path,
    shared: bool,
    (open, what): (&'static str, &'static str),
    transient: fn(&Path) -> bool,
) -> Result<Option<RootLock>> {
    use std::os::unix::fs::MetadataExt as _;
    let file = File::open(root).map_err(|e| Error::io(root, open, e))?;
    let m = file.metadata().map_err(|e| Error::io(root, open, e))?;
    let id = (m.dev(), m.ino());
    let until = std::time::Instant::now() + FORKED_COPY_WAIT;
    loop {
        let got = if shared {
            crate::durable::try_lock_shared(&file, root, what)?
        } else {
            crate::durable::try_lock(&file, root, what)?
        };
        if got {
            *held_here().entry(id).or_insert(0) += 1;
            return Ok(Some(RootLock { _file: file, id }));
        }
        if held_here().contains_key(&id)
            || !transient(root)
            || std::time::Instant::now() >= until
        {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// An exclusive, non-blocking `flock` of the directory `root` itself, held
/// until the returned lock drops ([`Error::Locked`], with what its `LOCK`
/// file says, when another holds it).
pub(crate) fn lock_root(root: &Path) -> Result<RootLock> {
    locked_or_refused(root, try_lock_dir(root, false, ROOT_LOCK_WORDS)?)
}

/// [`lock_root`] for a host claiming one of its streams while it holds the
/// host's lock: any other holder of the stream's own lock is transient
/// then (a forked copy of a descriptor this process closed, or a process
/// on its own that takes the stream's lock before its host's and lets go
/// when it finds the host's held), so it is waited out, briefly.
pub(crate) fn lock_root_under_host(root: &Path) -> Result<RootLock> {
    locked_or_refused(
        root,
        lock_dir_waiting(root, false, ROOT_LOCK_WORDS, |_| true)?,
    )
}

const ROOT_LOCK_WORDS: (&str, &str) = ("open data directory", "lock data directory");

fn locked_or_refused(root: &Path, l: Option<RootLock>) -> Result<RootLock> {
    l.ok_or_else(|| Error::Locked {
        path: root.to_path_buf(),
        holder: holder_of(root, LOCK_FILE),
    })
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
    Own {
        dir: RootLock,
        host: Vec<RootLock>,
    },
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
                holder: match flock_holders(&lock_path).as_slice() {
                    [] => format!(
                        "a process holding its LOCK file locked, as a tierindex from before \
                         2026-12-05 does (not shown in /proc/locks; the last tierindex to take \
                         it wrote: {})",
                        holder_in(root, LOCK_FILE)
                    ),
                    pids => format!(
                        "{} holds its LOCK file locked (/proc/locks), as a tierindex from \
                         before 2026-12-05 does; the last tierindex to take the directory \
                         wrote: {}",
                        pid_list(pids),
                        holder_in(root, LOCK_FILE)
                    ),
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_parse() {
        assert_eq!(
            parse_lock_line("1: FLOCK  ADVISORY  WRITE 28428 08:01:1234 0 EOF"),
            Some((28428, (8, 1, 1234)))
        );
        assert_eq!(
            parse_lock_line("2: FLOCK  ADVISORY  READ 7 fd:1a:99 0 EOF"),
            Some((7, (0xfd, 0x1a, 99)))
        );
        for waiter_or_other in [
            "1: -> FLOCK  ADVISORY  WRITE 5 08:01:1234 0 EOF",
            "3: POSIX  ADVISORY  WRITE 9 08:01:1234 0 EOF",
            "4: FLOCK ADVISORY WRITE notapid 08:01:1",
            "",
        ] {
            assert_eq!(parse_lock_line(waiter_or_other), None, "{waiter_or_other}");
        }
    }

    /// The pid shown is the holder's, not what an informational file says
    /// (helper-74 F9: a stale `LOCK` naming a dead run).
    #[test]
    fn the_holder_is_named_from_proc_locks() {
        if !Path::new("/proc/locks").exists() {
            panic!("this test needs Linux's /proc/locks");
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LOCK_FILE), "data directory: pid=1 host=gone since_ms=0")
            .unwrap();
        assert!(!holder_of(d.path(), LOCK_FILE).contains("/proc/locks"));
        let held = lock_root(d.path()).unwrap();
        let me = std::process::id();
        assert_eq!(flock_holders(d.path()), vec![me]);
        let said = holder_of(d.path(), LOCK_FILE);
        // This process holds it: said so (helper-82 F3), with the pid.
        assert!(said.starts_with(crate::error::HELD_BY_THIS_PROCESS), "{said}");
        assert!(said.contains(&format!("pid {me} holds it")), "{said}");
        assert!(said.contains("pid=1 host=gone"), "{said}");
        drop(held);
        assert_eq!(flock_holders(d.path()), Vec::<u32>::new());
    }
}
