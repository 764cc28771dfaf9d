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

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// fsync a directory so creates, renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io(dir, "open directory for fsync", e))?;
    f.sync_all()
        .map_err(|e| Error::Poisoned(format!("fsync of directory {} failed: {e}", dir.display())))
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
    f.sync_all()
        .map_err(|e| Error::Poisoned(format!("fsync of {} failed: {e}", path.display())))
}

/// Takes an exclusive, non-blocking lock on `f` (`flock` on Linux), held
/// until `f` is closed: the one file lock of the crate (the data
/// directory's `LOCK`, the journal directory). `Ok(false)` when another
/// open file holds it, in this process or another.
pub fn try_lock(f: &File, path: &Path) -> Result<bool> {
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, "lock", e)),
    }
}

/// Open `path` and fsync it (for a file just written with `fs::write`).
pub fn fsync_path(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, "open file for fsync", e))?;
    fsync_file(&f, path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
