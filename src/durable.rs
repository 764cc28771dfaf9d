//! The one place that makes file contents and directory entries durable.
//!
//! Every fsync of a directory in the crate goes through [`fsync_dir`] (or
//! [`fsync_dir_at`], the same behind a named failpoint), and the fsync of a
//! whole file written in one go through [`fsync_path`] / [`fsync_file`].
//! The semantics are the same everywhere:
//!
//! * a failed `fsync` is [`Error::Poisoned`]: the kernel may already have
//!   dropped the dirty pages (or the directory update) and cleared the
//!   error, so a later fsync could succeed without the data ever reaching
//!   the disk. The caller must poison whatever it serves and never retry;
//! * failing to *open* the directory or file is [`Error::Io`]: no fsync was
//!   attempted, nothing was lost to a cleared error, and a later successful
//!   fsync of the same directory covers every earlier change in it.
//!
//! IMPORTANT (Linux): a file's own fsync does not make its name durable;
//! every create, rename and unlink needs the directory fsynced after it.
//!
//! ## The persist seam
//!
//! The persist calls of the active segment, the seal and the upload journal
//! (create, positioned write, length change, msync of a range, fsync,
//! fdatasync, rename, unlink, directory fsync) go through the functions
//! here ([`rename`], [`unlink`], [`write_all_at`], [`msync_range`],
//! [`sync_all`], [`sync_data`], [`fsync_dir`], and [`created`] /
//! [`resized`] after an open that created a file or a preallocation). Each
//! reports the step it completed to [`seam`]'s observer, which only tests
//! install: the power-loss simulation (`tests/power_loss.rs`) builds its
//! model of what is durable from these reports, so it follows the code's
//! real persist calls. A sync the code does not make is a sync the model
//! never sees. A failed step reports nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

/// The observer of persist steps (tests only; without the `testing`
/// feature [`seam::note`] compiles to nothing).
pub mod seam {
    use std::path::{Path, PathBuf};

    /// One completed persist step.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Step {
        /// A file was created (its directory entry is not durable yet).
        Create(PathBuf),
        /// A file's length changed (preallocation, truncation).
        SetLen(PathBuf),
        /// Bytes were written with `pwrite` (not durable yet).
        Write(PathBuf),
        /// `msync` of `[from, to)` of a mapped file.
        SyncRange {
            /// The file.
            path: PathBuf,
            /// First byte.
            from: u64,
            /// One past the last byte.
            to: u64,
        },
        /// `fsync` of a file: its data, length and metadata.
        Fsync(PathBuf),
        /// `fdatasync` of a file: its data and length.
        Fdatasync(PathBuf),
        /// A rename within a directory (not durable yet).
        Rename {
            /// The old name.
            from: PathBuf,
            /// The new name.
            to: PathBuf,
        },
        /// An unlink (not durable yet).
        Unlink(PathBuf),
        /// `fsync` of a directory: its creates, renames and unlinks.
        FsyncDir(PathBuf),
    }

    #[cfg(any(test, feature = "testing"))]
    type Observer = Box<dyn FnMut(&Step)>;

    #[cfg(any(test, feature = "testing"))]
    thread_local! {
        static OBSERVER: std::cell::RefCell<Option<Observer>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Installs `f` as this thread's observer (`None` removes it); returns
    /// the previous one. Steps taken on other threads are not seen.
    #[cfg(any(test, feature = "testing"))]
    pub fn observe(f: Option<Observer>) -> Option<Observer> {
        OBSERVER.with(|o| std::mem::replace(&mut *o.borrow_mut(), f))
    }

    /// Runs `f` and returns the steps it took on this thread (a worker
    /// thread's are not seen).
    #[cfg(any(test, feature = "testing"))]
    pub fn steps_of<T>(f: impl FnOnce() -> T) -> (T, Vec<Step>) {
        let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let sink = log.clone();
        let prev = observe(Some(Box::new(move |s: &Step| sink.borrow_mut().push(s.clone()))));
        let out = f();
        observe(prev);
        let steps = log.borrow().clone();
        (out, steps)
    }

    /// Reports a completed step to this thread's observer, if any.
    #[inline(always)]
    pub(crate) fn note(step: impl FnOnce() -> Step) {
        #[cfg(any(test, feature = "testing"))]
        OBSERVER.with(|o| {
            if let Some(f) = o.borrow_mut().as_mut() {
                f(&step());
            }
        });
        #[cfg(not(any(test, feature = "testing")))]
        let _ = step;
    }

    pub(crate) fn path(p: &Path) -> PathBuf {
        p.to_path_buf()
    }
}

use seam::{Step, note};

/// A file was just created at `path` (an open with `create`/`create_new`
/// that succeeded).
pub fn created(path: &Path) {
    note(|| Step::Create(seam::path(path)));
}

/// `path`'s length was just changed (preallocation or truncation).
pub fn resized(path: &Path) {
    note(|| Step::SetLen(seam::path(path)));
}

/// Bytes were just written to `path` by a buffered writer or `fs::write`
/// (flushed to the kernel, not durable).
pub fn written(path: &Path) {
    note(|| Step::Write(seam::path(path)));
}

/// Opens `path` for reading (`O_NONBLOCK`, so a FIFO planted there is not
/// waited on) and refuses anything but a regular file: a directory, FIFO,
/// socket or device under the name of one of tierindex's files is an
/// operator's mistake, and reading it would fail oddly or block for ever.
/// `write` adds write access (the journal), and then a symlink is refused
/// as by [`no_follow`].
pub fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file (tierindex never creates anything else here: move it \
             out of the data directory)",
        )
    };
    let nofollow = if write { libc::O_NOFOLLOW } else { 0 };
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags | nofollow)
            .open(path)
    };
    let f = match open(libc::O_NONBLOCK) {
        Ok(f) => f,
        // A regular file under a lease (NFS delegation, SMB oplock) answers
        // a non-blocking open with EWOULDBLOCK where a blocking one waits
        // for the lease to break: wait, as before, once stat says it is a
        // regular file.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if !std::fs::metadata(path)?.is_file() {
                return Err(not_regular());
            }
            open(0)?
        }
        Err(e) => return Err(e),
    };
    if !f.metadata()?.file_type().is_file() {
        return Err(not_regular());
    }
    // O_NONBLOCK has no effect on a regular file's reads on Linux, so a
    // read-only handle keeps it (two syscalls less per segment opened);
    // a handle that writes (the journal) goes back to blocking I/O.
    if !write {
        return Ok(f);
    }
    let fd = f.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor `f` owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Reads a whole regular file ([`open_regular`]) of at most `max` bytes;
/// a longer one is an `InvalidData` error naming both lengths (it is never
/// read into memory).
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = open_regular(path, false)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {max} this file can hold"),
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than the {max} bytes this file can hold"),
        ));
    }
    Ok(out)
}

/// Open options that refuse to follow a symlink at the last component
/// (`O_NOFOLLOW`): every file tierindex writes in the data directory is
/// its own, so a symlink planted there (pointing at any file the broker
/// may write) makes the open fail instead of writing through it.
pub fn no_follow() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut o = std::fs::OpenOptions::new();
    o.custom_flags(libc::O_NOFOLLOW);
    o
}

/// `fs::write`: creates or replaces `path` with `bytes` (not durable:
/// fsync the file and its directory). A symlink at `path` is refused
/// ([`no_follow`]).
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let existed = path.exists();
    open_retrying(path, || {
        no_follow()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    })?
    .write_all(bytes)?;
    if !existed {
        created(path);
    }
    written(path);
    Ok(())
}

/// `pwrite` all of `buf` at `at`.
pub fn write_all_at(f: &File, buf: &[u8], at: u64, path: &Path) -> io::Result<()> {
    f.write_all_at(buf, at)?;
    note(|| Step::Write(seam::path(path)));
    Ok(())
}

/// `msync` of `[off, off + len)` of `map` (a mapping of `path`).
pub fn msync_range(map: &memmap2::MmapMut, off: usize, len: usize, path: &Path) -> io::Result<()> {
    map.flush_range(off, len)?;
    note(|| Step::SyncRange {
        path: seam::path(path),
        from: off as u64,
        to: (off + len) as u64,
    });
    Ok(())
}

/// `fsync` of `f` (the file at `path`), as an I/O result (callers decide
/// how a failure poisons).
pub fn sync_all(f: &File, path: &Path) -> io::Result<()> {
    f.sync_all()?;
    note(|| Step::Fsync(seam::path(path)));
    Ok(())
}

/// `fdatasync` of `f` (the file at `path`).
pub fn sync_data(f: &File, path: &Path) -> io::Result<()> {
    f.sync_data()?;
    note(|| Step::Fdatasync(seam::path(path)));
    Ok(())
}

/// The seam's steps behind the named failpoint `point`
/// ([`crate::failpoint`]): an armed point fails (or crashes) the step
/// before it runs, and an injected error is returned as the step's own
/// error would be. `durable::at("seal.fsync").sync_all(&f, &tmp)`.
pub fn at(point: &'static str) -> At {
    At(point)
}

/// See [`at`].
#[derive(Clone, Copy, Debug)]
pub struct At(&'static str);

impl At {
    /// [`write_all_at`] behind the point.
    pub fn write_all_at(self, f: &File, buf: &[u8], off: u64, path: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        write_all_at(f, buf, off, path)
    }

    /// [`msync_range`] behind the point.
    pub fn msync_range(
        self,
        map: &memmap2::MmapMut,
        off: usize,
        len: usize,
        path: &Path,
    ) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        msync_range(map, off, len, path)
    }

    /// [`sync_all`] behind the point.
    pub fn sync_all(self, f: &File, path: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        sync_all(f, path)
    }

    /// [`sync_data`] behind the point.
    pub fn sync_data(self, f: &File, path: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        sync_data(f, path)
    }

    /// [`rename`] behind the point.
    pub fn rename(self, from: &Path, to: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        rename(from, to)
    }

    /// [`rename_noreplace`] behind the point.
    pub fn rename_noreplace(self, from: &Path, to: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        rename_noreplace(from, to)
    }

    /// [`unlink`] behind the point.
    pub fn unlink(self, path: &Path) -> io::Result<()> {
        crate::failpoint::hit(self.0)?;
        unlink(path)
    }
}

/// What a file that is not a regular one is, for messages.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// Rename `from` to `to` (durable after a directory fsync).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    note(|| Step::Rename {
        from: seam::path(from),
        to: seam::path(to),
    });
    Ok(())
}

/// [`rename`], refused (`AlreadyExists`) when `to` exists: one atomic
/// `renameat2(RENAME_NOREPLACE)`. A file system without that flag gets a
/// check, then the rename: not atomic against a second writer, but that
/// writer would already be one beside this directory's lock.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(e);
        }
        match std::fs::symlink_metadata(to) {
            Ok(_) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::rename(from, to)?,
            Err(e) => return Err(e),
        }
    }
    note(|| Step::Rename {
        from: seam::path(from),
        to: seam::path(to),
    });
    Ok(())
}

/// Unlink `path` (durable after a directory fsync).
pub fn unlink(path: &Path) -> io::Result<()> {
    std::fs::remove_file(path)?;
    note(|| Step::Unlink(seam::path(path)));
    Ok(())
}

/// Runs `open` (an open or create of `path`, nothing written yet), and
/// again, briefly (5 tries over about 31 ms), while it fails because the
/// process or the system is out of descriptors or memory, or the call was
/// interrupted: a process hosting thousands of streams reaches its
/// descriptor limit for a moment (helper-75: a seal that could not create
/// its tmp file poisoned its writer, exit 1). Any other error, or the
/// last, is returned. For a step that a failure would poison; never for a
/// write or a sync.
pub fn open_retrying<T>(path: &Path, mut open: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut wait = std::time::Duration::from_millis(1);
    loop {
        match open() {
            Err(e)
                if wait <= std::time::Duration::from_millis(16)
                    && matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EMFILE | libc::ENFILE | libc::EINTR | libc::ENOMEM | libc::EAGAIN
                        )
                    ) =>
            {
                tracing::warn!(file = %path.display(), "{e}; trying again");
                std::thread::sleep(wait);
                wait *= 2;
            }
            r => return r,
        }
    }
}

/// fsync a directory so creates, renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = open_retrying(dir, || File::open(dir))
        .map_err(|e| Error::io(dir, "open directory for fsync", e))?;
    f.sync_all().map_err(|e| {
        Error::Poisoned(format!("fsync of directory {} failed: {e}", dir.display()))
    })?;
    note(|| Step::FsyncDir(seam::path(dir)));
    Ok(())
}

/// fsyncs the parent of `dir`, which existed before this open (gap 17:
/// an earlier process may have been killed between its `mkdir` and the
/// fsync). A parent this process may not read (mode `711`) cannot be
/// opened to be synced: the name is older than this open, so a warning,
/// not a refusal. A failed fsync is poison, as everywhere.
pub fn sync_name_of_existing(dir: &Path) -> Result<()> {
    // The directory that holds its real name: `dir` may be a symbolic link
    // or `.` (helper-79 F6: the link's directory, or `dir` itself, was
    // synced instead).
    let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let parent = match real.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Ok(()),
    };
    match fsync_dir(parent) {
        Err(Error::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
            ) =>
        {
            tracing::warn!(
                directory = %parent.display(),
                "cannot open {} to make {}'s name durable ({source}); its name is older than \
                 this open, left to the file system",
                parent.display(),
                dir.display()
            );
            Ok(())
        }
        r => r,
    }
}

/// [`fsync_dir`] behind the failpoint `point` (an injected error is a failed
/// fsync: [`Error::Poisoned`]).
pub fn fsync_dir_at(point: &'static str, dir: &Path) -> Result<()> {
    crate::failpoint::hit(point).map_err(|e| {
        Error::Poisoned(format!("fsync of directory {} failed: {e}", dir.display()))
    })?;
    fsync_dir(dir)
}

/// fsync an open file (data and metadata).
pub fn fsync_file(f: &File, path: &Path) -> Result<()> {
    sync_all(f, path)
        .map_err(|e| Error::Poisoned(format!("fsync of {} failed: {e}", path.display())))
}

/// Takes an exclusive, non-blocking lock on `f` (`flock` on Linux), held
/// until `f` is closed: the one file lock of the crate (a data directory,
/// a host's directory). `Ok(false)` when another open file holds it, in
/// this process or another.
pub fn try_lock(f: &File, path: &Path, what: &'static str) -> Result<bool> {
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, what, e)),
    }
}

/// [`try_lock`], shared: any number of shared holders, none while an
/// exclusive one holds it (a host's directory, held shared by the commands
/// on its streams, exclusively by the host).
pub fn try_lock_shared(f: &File, path: &Path, what: &'static str) -> Result<bool> {
    match f.try_lock_shared() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, what, e)),
    }
}

/// Open `path` and fsync it (for a file just written with `fs::write`).
pub fn fsync_path(path: &Path) -> Result<()> {
    let f = open_retrying(path, || File::open(path))
        .map_err(|e| Error::io(path, "open file for fsync", e))?;
    fsync_file(&f, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_out_of_descriptors_is_tried_again_briefly_and_nothing_else_is() {
        let p = Path::new("/x");
        let mut n = 0;
        let r = open_retrying(p, || {
            n += 1;
            if n < 3 {
                Err(io::Error::from_raw_os_error(libc::EMFILE))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let mut n = 0;
        let r: io::Result<()> = open_retrying(p, || {
            n += 1;
            Err(io::Error::from_raw_os_error(libc::ENFILE))
        });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENFILE));
        assert_eq!(n, 6, "five waits, then the last error");
        let mut n = 0;
        let r: io::Result<()> = open_retrying(p, || {
            n += 1;
            Err(io::Error::from_raw_os_error(libc::EIO))
        });
        assert!(r.is_err());
        assert_eq!(n, 1, "EIO is not tried again");
    }

    #[test]
    fn a_missing_directory_is_an_io_error_not_poison() {
        let d = tempfile::tempdir().unwrap();
        let gone = d.path().join("gone");
        assert!(matches!(fsync_dir(&gone), Err(Error::Io { .. })));
        assert!(matches!(fsync_path(&gone), Err(Error::Io { .. })));
        fsync_dir(d.path()).unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        fsync_path(&f).unwrap();
    }
}
