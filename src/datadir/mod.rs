//! The data directory: its lock, its layout, and the start-up check that
//! turns whatever a crash left into a consistent set of segments.
//!
//! ```text
//! DATA_DIR/
//!   LOCK                 who holds the lock (pid/host/start), for messages;
//!                        the lock itself is a flock of the directory
//!                        (`DATA_DIR` itself: it cannot be unlinked from
//!                        under its holder as a file could)
//!   segments/            NNN.active (in steady state one, plus an empty spare
//!                        with the next id once it is half full), NNN.seg
//!   journal/             upload journal (see journal module)
//!   quarantine/          files that failed their checks, moved aside, never deleted
//!   ACKED_ACTIVE         the newest segment a flush acknowledged entries of
//!                        (`acked`): its file gone or zeroed is a loss
//! ```
//!
//! Start-up rules (also tabled in `docs/crash-safety.md`):
//! - `NNN.seg` must pass the full sealed check, else it is quarantined.
//! - `NNN.active` that is empty or all zeros (its creation never became
//!   durable) is removed: it never held an entry. Unless `ACKED_ACTIVE`
//!   names it, or a later file exists: then it is damage, a loss.
//! - Every `.active` but the newest holding entries is sealed; an empty one
//!   (with a valid header) above it is a spare prepared ahead of a roll:
//!   not a leftover, the writer removes it (or takes it up when no segment
//!   holds entries).
//! - `NNN.active` with a bad header is quarantined; otherwise its torn tail
//!   is zeroed (a damaged span that still holds valid items is first copied
//!   to quarantine) and its slot table rebuilt. If a valid `NNN.seg` with
//!   the same item count exists, the active file is a leftover of a finished
//!   seal and is removed; if the `.seg` holds more items, the active file is
//!   quarantined; if fewer, the `.seg` is quarantined and the active one is
//!   sealed again.
//! - `NNN.seg.tmp` is an interrupted seal: removed when its `.active` source
//!   passed its check (the seal is redone), quarantined otherwise.
//! - A file of a newer format version stops start-up (`Unsupported`): it is
//!   not damaged, so it is not moved aside.
//! - Any other file is quarantined. Nothing is ever deleted to get past an
//!   error, and one bad file never stops the rest from opening.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::durable::{fsync_dir, fsync_path};
use crate::lock::DirLock;
use crate::lock::host::HostLock;
use std::sync::Arc;
use crate::error::{Error, Result};
use crate::segment::active::{self, ActiveRecovery, ActiveSegment};
use crate::segment::salvage::{self, Geometry, LostSpan};
use crate::segment::local::SealedInfo;
use crate::segment::sealed::{
    PACKED_ENTRY_LEN, SealedSegment, write_sealed_at, write_sealed_streaming,
};
use crate::segment::{SegmentId, now_ms};

pub use crate::segment::names::SEGMENTS_DIR;
pub const JOURNAL_DIR: &str = "journal";
pub const QUARANTINE_DIR: &str = "quarantine";
#[cfg(any(test, feature = "testing"))]
pub use crate::lock::LOCK_FILE;

/// True when `path` looks like a data directory: it has an identity, a
/// journal directory or a segments directory.
pub fn is_data_dir(path: &Path) -> bool {
    [
        crate::identity::IDENTITY_FILE,
        JOURNAL_DIR,
        SEGMENTS_DIR,
    ]
    .iter()
    .any(|n| path.join(n).exists())
}

/// True when `path` holds a data directory's own files (an identity, or a
/// journal): a stricter [`is_data_dir`] for a host's directory, whose
/// streams may be named `segments` or `journal` (helper-77: a host with
/// such a stream looked like a data directory and could not restart).
pub fn has_data_dir_files(path: &Path) -> bool {
    path.join(crate::identity::IDENTITY_FILE).is_file()
        || path.join(JOURNAL_DIR).join("journal.log").is_file()
}

/// Creates the data directory's tree where missing, each new name durable:
/// each directory that got new names is fsynced once, after all of them
/// (a new stream's data directory gets three: one fsync, not three).
/// `root` itself is fsynced whether or not this call created anything in
/// it (a process killed between an earlier `mkdir` and its fsync left
/// names no one made durable), unless `root_synced_by_caller`: the caller
/// fsyncs `root` itself before it relies on the names (see
/// [`DataDir::open_as`], whose identity write does, saving one fsync of a
/// new stream's open: issue 16).
///
/// `root`'s own name in its parent is made durable at every open too
/// unless `hosted`: the host fsyncs its directory at its own every open
/// ([`HostLock::open`]). A process killed between an earlier `mkdir` of
/// `root` and that fsync left the name to the file system (gap 17).
fn create_tree(root: &Path, root_synced_by_caller: bool, hosted: bool) -> Result<()> {
    let mut parents: Vec<PathBuf> = Vec::new();
    if !root_synced_by_caller {
        parents.push(root.to_path_buf());
    }
    let existed = root.exists();
    for d in [
        root.to_path_buf(),
        root.join(SEGMENTS_DIR),
        root.join(JOURNAL_DIR),
        root.join(QUARANTINE_DIR),
    ] {
        if !d.exists() {
            if let Err(e) = fs::create_dir_all(&d) {
                // What was created so far is made durable first.
                for p in &parents {
                    fsync_dir(p)?;
                }
                return Err(Error::io(&d, "create data directory", e));
            }
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty())
                && !(root_synced_by_caller && parent == root)
                && !parents.iter().any(|p| p == parent)
            {
                parents.push(parent.to_path_buf());
            }
        }
    }
    // The parent of a new root first: `root`'s own name, then its entries.
    parents.sort_by_key(|p| p.components().count());
    for p in &parents {
        fsync_dir(p)?;
    }
    if existed && !hosted {
        crate::durable::sync_name_of_existing(root)?;
    }
    Ok(())
}


/// A host's directory (it has `TIERINDEX_HOST`) holds data directories,
/// one per stream: opened as a data directory itself it became one, and
/// its host then refused to start (helper-75 F5).
/// One that is already a data directory (made by an older build) is left
/// to open, so that its entries can still be drained.
fn refuse_a_hosts_directory(root: &Path) -> Result<()> {
    let info = root.join(crate::lock::host::HOST_INFO_FILE);
    if std::fs::symlink_metadata(&info).is_ok() && !has_data_dir_files(root) {
        return Err(Error::InvalidInput(format!(
            "{} is a tierindex host's directory (it has {}): it holds data directories, one \
             per stream; name one of them (a directory under it), or another directory",
            root.display(),
            crate::lock::host::HOST_INFO_FILE
        )));
    }
    Ok(())
}

/// An open, locked data directory.
pub struct DataDir {
    root: PathBuf,
    // The directory itself, flock'd for the life of the DataDir: released
    // when it drops. A lock on a file inside it (`LOCK`, before) was lost
    // to an operator's `rm LOCK`: the next process then took a new one and
    // repaired the live broker's active file under it. Or its host's.
    /// `segments/` and `journal/` that are symbolic links: their targets,
    /// flock'd for the life of the DataDir ([`guard_linked_dirs`]). Before
    /// `lock`, so they are released first: a reopen that gets the
    /// directory's lock finds them free.
    _linked: Vec<fs::File>,
    lock: Arc<DirLock>,
}

/// `segments/` or `journal/` may be a symbolic link (to another disk), but
/// the data directory's lock covers the directory, not what its links point
/// to: two data directories whose `segments/` resolved to one directory
/// overwrote each other's acknowledged entries, and one broker still
/// exited 0 (helper-61 F3). So a linked one is refused when its target is
/// another data directory's own (`<other>/segments` of a directory with an
/// `IDENTITY`), and its target is flock'd for the life of the DataDir, so a
/// second data directory linking to the same place is refused while this
/// one is open.
///
/// A bind mount shows no link: two data directories whose `segments/` are
/// one directory mounted twice lost acknowledged entries and exited 0
/// (helper-63 #6). So every `segments/` and `journal/`, linked or not,
/// records in `LINKED_BY` which data directory last opened it (its
/// incarnation, device and inode, and path), and one is refused when the
/// record is another data directory's: another directory (by device and
/// inode, the same in every mount namespace) of another incarnation, or a
/// data directory found at the recorded path whose own directory of that
/// name is this one. Whether or not the other runs, whichever opened
/// first, in one mount namespace or two. A copy or a restored backup has
/// the original's incarnation: not refused. Not seen: two first opens at
/// once (neither has recorded itself yet), and a directory the previous
/// build last opened (no record) opened first by the other data directory.
fn guard_linked_dirs(root: &Path, claim: bool) -> Result<Vec<fs::File>> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    // A directory is known by (device, inode), not by its path: a bind
    // mount or another path to this same directory is not another one.
    let id_of = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut held = Vec::new();
    let me = fs::canonicalize(root).map_err(|e| Error::io(root, "resolve data directory", e))?;
    let my_id = id_of(&me);
    // The data directory and its three folders are four directories: a
    // `segments/` linked to `journal/` (or to the data directory itself)
    // had start-up move `journal.log` to quarantine as an unknown file at
    // every start (helper-63).
    let ids: Vec<_> = [SEGMENTS_DIR, JOURNAL_DIR, QUARANTINE_DIR]
        .iter()
        .map(|n| (n, id_of(&root.join(n))))
        .collect();
    for (i, (a, ia)) in ids.iter().enumerate() {
        let same_as = if ia.is_some() && *ia == my_id {
            Some("the data directory itself".to_string())
        } else {
            ids[..i]
                .iter()
                .find(|(_, ib)| ia.is_some() && ib == ia)
                .map(|(b, _)| format!("{b}/"))
        };
        if let Some(other) = same_as {
            return Err(Error::InvalidInput(format!(
                "{}/{a} is the same directory as {other} (a symbolic link?): each of \
                 segments/, journal/ and quarantine/ must be a directory of its own; \
                 nothing was changed",
                root.display()
            )));
        }
    }
    // This data directory's incarnation, if it has one yet.
    let mine_inc = crate::identity::Identity::load(root)
        .ok()
        .flatten()
        .map(|i| i.incarnation)
        .unwrap_or_default();
    let mut to_claim = Vec::new();
    let (mut foreign, mut foreign_markers) = (Vec::new(), Vec::new());
    for name in [SEGMENTS_DIR, JOURNAL_DIR] {
        let link = root.join(name);
        let linked = fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        let target = if linked {
            fs::canonicalize(&link).map_err(|e| Error::io(&link, "resolve symbolic link", e))?
        } else {
            link.clone()
        };
        let target_id = id_of(&target);
        let refuse = |whose: String| {
            Error::InvalidInput(format!(
                "{} is a symbolic link to {}, which {whose}: two data directories sharing one \
                 {name} directory overwrite each other's files. Give this data directory a \
                 {name} directory of its own; nothing was changed",
                link.display(),
                target.display()
            ))
        };
        if linked
            && let Some(parent) = target.parent()
            && id_of(parent) != my_id
            && target.file_name() == Some(std::ffi::OsStr::new(name))
            && parent.join(crate::identity::IDENTITY_FILE).exists()
        {
            return Err(refuse(format!(
                "is the {name} directory of data directory {}",
                parent.display()
            )));
        }
        // The data directory that last opened it (its path, raw bytes):
        // still using it, it is sharing it (the brokers need not run at
        // once: a second one would take the first one's sealed files for
        // its own). Moved or copied, or using another directory now: this
        // one takes it over.
        let marker = target.join(LINKED_BY_FILE);
        // Anything but a regular file there (a planted symlink) is refused:
        // it could not be read or written, and the check would be off
        // (helper-63).
        if fs::symlink_metadata(&marker).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(Error::InvalidInput(format!(
                "{} is not a regular file: tierindex writes only a regular file there (which \
                 data directory uses {}); remove it, then open again",
                marker.display(),
                target.display()
            )));
        }
        // The record ([`LinkRecord`]): the data directory's identity, its
        // device and inode, and where it was. Another incarnation in
        // another directory is another data directory, wherever it is now
        // (helper-63: once the first one moved, a second one linking there
        // took it over); the same one moved keeps it.
        let recorded = crate::durable::read_regular(&marker, 8192).ok();
        if let Some(b) = &recorded {
            let rec = LinkRecord::parse(b);
            let inc = rec.incarnation;
            let other = rec.path;
            // Recorded by this very directory: its own record, whatever
            // incarnation it names (a refused first open removes the
            // IDENTITY it wrote; a damaged IDENTITY is the open's to report,
            // not this check's). Known by the device and inode recorded
            // with it, the same in every mount namespace: by its path, two
            // containers mounting one directory as their data directories'
            // `segments/`, each data directory at the same path, both read
            // the other's record as their own (helper-70). A record without
            // them (from an older build, in a link's target) is known by
            // its path, found by device and inode.
            let itself = match rec.dir_id {
                Some(id) => Some(id) == my_id,
                None => other.is_absolute() && id_of(other).is_some() && id_of(other) == my_id,
            };
            // Another data directory found at the recorded path (not this
            // one there: a backup restored in place is another directory at
            // the path it recorded) whose own directory is this one.
            let other_uses_it = other.is_absolute()
                && !itself
                && id_of(other).is_some()
                && id_of(other) != my_id
                && other.join(crate::identity::IDENTITY_FILE).exists()
                && target_id.is_some()
                && id_of(&other.join(name)) == target_id;
            // Another data directory's record (another directory, another
            // incarnation): through a link, whatever the record's form; in
            // a directory of its own, a record with the device and inode
            // (only this build writes records there). A copy or a restored
            // backup of a data directory has its incarnation: not refused.
            let another_incarnation = !itself
                && (linked || rec.dir_id.is_some())
                && !inc.is_empty()
                && inc != mine_inc.as_bytes();
            if linked && (other_uses_it || another_incarnation) {
                return Err(refuse(format!(
                    "data directory {} (incarnation {}) links to as its {name}/ (if that data \
                     directory is gone for good, remove {} and open again)",
                    other.display(),
                    String::from_utf8_lossy(inc),
                    marker.display()
                )));
            }
            if other_uses_it || another_incarnation {
                // Said once both directories are looked at: the message
                // names every record to remove (helper-71).
                foreign.push((name, link.clone(), other.to_path_buf(), inc.to_vec()));
                foreign_markers.push(marker.display().to_string());
            }
        }
        // A check that changes nothing (`fsck` without `--repair`) does not
        // write `LINKED_BY`; a directory of its own is recorded once this
        // data directory has its identity (the broker's open records a new
        // one once it keeps it: `DataDir::record_user_at`). Written once both
        // directories passed.
        if claim && (linked || !mine_inc.is_empty()) {
            to_claim.push((marker, recorded));
        }
        if !linked {
            continue;
        }
        let dir = fs::File::open(&target).map_err(|e| Error::io(&target, "open", e))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                // Locked, as the data directory's own lock says: callers
                // that wait for a lock (a reseal's reopen) wait for this too.
                return Err(Error::Locked {
                    path: target.clone(),
                    holder: format!(
                        "the target of {}: another data directory's {name}/ links there?",
                        link.display()
                    ),
                });
            }
            return Err(Error::io(&target, "lock linked directory", e));
        }
        held.push(dir);
    }
    if let Some((name, link, other, inc)) = foreign.first() {
        let mine = if mine_inc.is_empty() {
            "none yet".to_string()
        } else {
            mine_inc.clone()
        };
        return Err(Error::InvalidInput(format!(
            "{} was last opened as the {name} directory of another data directory, {} \
             (incarnation {}; this one's: {mine}){}: a bind mount, perhaps from another \
             container or mount namespace? Two data directories sharing one {name} directory \
             overwrite each other's files. Give this data directory a {name} directory of its \
             own. If this one is a copy of that data directory's files and that one no longer \
             uses them, or that data directory is gone for good, remove {} and open again; \
             nothing was changed",
            link.display(),
            other.display(),
            String::from_utf8_lossy(inc),
            if foreign.len() > 1 {
                format!(" (and so was {}/)", foreign[1].0)
            } else {
                String::new()
            },
            foreign_markers.join(" and ")
        )));
    }
    if let Some(mine) = (!to_claim.is_empty())
        .then(|| record_of(&me, &mine_inc))
        .flatten()
    {
        for (marker, recorded) in &to_claim {
            claim_dir(marker, &mine, recorded.as_deref());
        }
    }
    Ok(held)
}

/// Writes `LINKED_BY` in `segments/` and `journal/` (their targets, when
/// linked; [`guard_linked_dirs`] checked them). Called for a new data
/// directory once its open keeps its identity ([`DataDir::record_user_at`]),
/// so its first open does not leave an incarnation out.
fn claim_linked_dirs(root: &Path, incarnation: &str) {
    let Ok(me) = fs::canonicalize(root) else {
        return;
    };
    let Some(mine) = record_of(&me, incarnation) else {
        return;
    };
    for name in [SEGMENTS_DIR, JOURNAL_DIR] {
        let link = root.join(name);
        let target = if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            match fs::canonicalize(&link) {
                Ok(t) => t,
                Err(_) => continue,
            }
        } else {
            link
        };
        let marker = target.join(LINKED_BY_FILE);
        let recorded = crate::durable::read_regular(&marker, 8192).ok();
        claim_dir(&marker, &mine, recorded.as_deref());
    }
}

/// The record naming the data directory at `me` (its canonical path) of
/// `incarnation`: `<incarnation>\n<device>:<inode>\n<me>`.
fn record_of(me: &Path, incarnation: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(me).ok()?;
    let mut mine = format!("{incarnation}\n{}:{}\n", m.dev(), m.ino()).into_bytes();
    mine.extend_from_slice(me.as_os_str().as_bytes());
    Some(mine)
}

/// `marker` made to say `mine` ([`record_of`]) unless it does already.
/// Advisory, not synced (lost to a crash, it is written again at the next
/// open), not through a symlink planted in its place (`write_file` opens
/// `O_NOFOLLOW`).
fn claim_dir(marker: &Path, mine: &[u8], recorded: Option<&[u8]>) {
    if recorded != Some(mine)
        && let Err(e) = crate::durable::write_file(marker, mine)
    {
        tracing::warn!(file = %marker.display(), error = %e, "cannot record which data directory uses this directory");
    }
}

/// A `LINKED_BY` record: `<incarnation>\n<device>:<inode>\n<path>`, or
/// without the device and inode (`<incarnation>\n<path>`, written by older
/// builds in a link's target). Anything else reads as a record of no
/// incarnation with no usable path.
struct LinkRecord<'a> {
    incarnation: &'a [u8],
    dir_id: Option<(u64, u64)>,
    path: &'a Path,
}

impl<'a> LinkRecord<'a> {
    fn parse(b: &'a [u8]) -> LinkRecord<'a> {
        use std::os::unix::ffi::OsStrExt as _;
        let (incarnation, rest) = match b.iter().position(|&c| c == b'\n') {
            Some(i) => (&b[..i], &b[i + 1..]),
            None => (&b[..0], b),
        };
        // A path is absolute: a line that does not start with `/` is the
        // device and inode.
        let (dir_id, path) = match rest.iter().position(|&c| c == b'\n') {
            Some(i) if !rest.starts_with(b"/") => (
                std::str::from_utf8(&rest[..i]).ok().and_then(|l| {
                    let (d, n) = l.split_once(':')?;
                    Some((d.parse().ok()?, n.parse().ok()?))
                }),
                &rest[i + 1..],
            ),
            _ => (None, rest),
        };
        LinkRecord {
            incarnation,
            dir_id,
            path: Path::new(std::ffi::OsStr::from_bytes(path)),
        }
    }
}

/// In `segments/` and `journal/` (their targets, when linked): the data
/// directory that last opened them ([`guard_linked_dirs`]). Not a segment file: start-up
/// leaves it where it is.
pub(crate) const LINKED_BY_FILE: &str = "LINKED_BY";

/// The journal of `data_dir` existed and is gone: no `journal.log`, but
/// the clean-shutdown marker `marker` (a name in `data_dir`) that the last
/// run wrote after its journal was made. Damage (an operator's `rm`, a
/// lost file), not a crash (helper-82 F5: every command went on with a
/// new, empty journal). `journal/LINKED_BY` is no such evidence: every
/// open of a data directory with an identity writes it before the
/// journal is made, so a crash inside the journal's creation leaves it
/// (the CI crash campaign's `journal.compact.fsync` point).
pub(crate) fn journal_lost(data_dir: &Path, marker: &str) -> bool {
    !crate::journal::log_path(data_dir).exists() && data_dir.join(marker).exists()
}

impl DataDir {
    /// Create the directory tree if missing and take the exclusive lock
    /// (and, for a data directory a host holds, the host's: see [`host`]).
    pub fn open(root: &Path) -> Result<DataDir> {
        Self::open_claiming(root, true)
    }

    /// [`DataDir::open`] for a check that changes nothing (`fsck` without
    /// `--repair`): a linked `segments/` or `journal/` is checked and
    /// locked, but its `LINKED_BY` is not written.
    pub fn open_to_check(root: &Path) -> Result<DataDir> {
        Self::open_claiming(root, false)
    }

    fn open_claiming(root: &Path, claim: bool) -> Result<DataDir> {
        Self::open_claiming_synced(root, claim, false)
    }

    fn open_claiming_synced(root: &Path, claim: bool, root_synced_by_caller: bool) -> Result<DataDir> {
        refuse_a_hosts_directory(root)?;
        create_tree(root, root_synced_by_caller, false)?;
        let lock = Arc::new(DirLock::own(root)?);
        Ok(DataDir {
            root: root.to_path_buf(),
            _linked: guard_linked_dirs(root, claim)?,
            lock,
        })
    }

    /// A data directory directly under `host`'s directory, locked through
    /// the host's lock ([`HostLock::claim`]): no descriptor of its own.
    /// `root_synced_by_caller`: see [`create_tree`] (its one caller,
    /// [`DataDir::open_as`], fsyncs `root` itself).
    fn open_hosted(
        host: &Arc<HostLock>,
        root: &Path,
        root_synced_by_caller: bool,
    ) -> Result<DataDir> {
        refuse_a_hosts_directory(root)?;
        let lock = Arc::new(DirLock::hosted(host, root)?);
        create_tree(root, root_synced_by_caller, true)?;
        Ok(DataDir {
            root: root.to_path_buf(),
            _linked: guard_linked_dirs(root, true)?,
            lock,
        })
    }

    /// The lock this data directory is held by. A journal opened under it
    /// keeps a share, so that the lock outlives whichever of the two is
    /// dropped last.
    pub fn lock(&self) -> &Arc<DirLock> {
        &self.lock
    }

    /// [`DataDir::open`], then the directory's identity
    /// ([`crate::identity::ensure`]): written when there is none yet (a new
    /// data directory, or one from before identity files), else read. The
    /// broker's open uses this; the lock is held before the file is written.
    /// The flag: the identity was written by this call (the open removes it
    /// again when it is refused later: [`crate::identity::NewIdentity`]).
    pub fn open_as(
        root: &Path,
        stream: &str,
        store: &str,
        endpoint: Option<&str>,
        mode: Option<crate::identity::Mode>,
        overrides: crate::identity::Overrides,
        host: Option<&Arc<HostLock>>,
    ) -> Result<(DataDir, crate::identity::Identity, bool)> {
        // `root` is fsynced once below, by the identity's write or on its
        // own: its new names (the tree's) are durable when this returns.
        let dd = match host {
            Some(h) => DataDir::open_hosted(h, root, true)?,
            None => DataDir::open_claiming_synced(root, true, true)?,
        };
        let existed = std::fs::symlink_metadata(root.join(crate::identity::IDENTITY_FILE)).is_ok();
        let id = crate::identity::ensure(root, stream, store, endpoint, mode, overrides)?;
        let written = !existed;
        if !written {
            fsync_dir(root)?;
        }
        Ok((dd, id, written))
    }

    /// Records in `segments/` and `journal/` (their targets, when linked)
    /// that the data directory at `root`, which the caller holds open (and
    /// locked), of `incarnation`, uses them: for a new identity once the
    /// open keeps it (the open recorded an identity that was there
    /// already; [`guard_linked_dirs`]). Blocking file I/O.
    pub fn record_user_at(root: &Path, incarnation: &str) {
        claim_linked_dirs(root, incarnation);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Whether `segments/` holds any file (active, spare or sealed; whatever
    /// it holds counts). Used to tell a data directory that holds nothing
    /// yet.
    pub fn holds_segment_files(&self) -> Result<bool> {
        let dir = self.segments_dir();
        match fs::read_dir(&dir) {
            Ok(rd) => Ok(rd
                .filter_map(|e| e.ok())
                .any(|e| e.file_name() != LINKED_BY_FILE)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&dir, "list segments", e)),
        }
    }
    pub fn segments_dir(&self) -> PathBuf {
        self.root.join(SEGMENTS_DIR)
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join(JOURNAL_DIR)
    }
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join(QUARANTINE_DIR)
    }

    /// Move `path` into `quarantine/` under a unique name; durable (both
    /// directories fsync'd). Returns the new path.
    pub fn quarantine(&self, path: &Path) -> Result<PathBuf> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        let qdir = self.quarantine_dir();
        let mut dst = qdir.join(format!("{name}.{}", now_ms()));
        let mut n = 0;
        while dst.exists() {
            n += 1;
            dst = qdir.join(format!("{name}.{}.{n}", now_ms()));
        }
        crate::durable::rename(path, &dst).map_err(|e| Error::io(path, "move file to quarantine", e))?;
        fsync_dir(&qdir)?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        tracing::warn!(from = %path.display(), to = %dst.display(), "quarantined");
        Ok(dst)
    }

    /// [`quarantine`](Self::quarantine), plus a record next to the moved
    /// file (`<moved name>.why.json`: where it came from, why, what was
    /// lost) that `tierindex quarantine list|show|retry` reads.
    pub fn quarantine_because(
        &self,
        path: &Path,
        reason: &str,
        loss: Option<&LossNote>,
    ) -> Result<PathBuf> {
        let dst = self.quarantine(path)?;
        let rec = QuarantineRecord {
            original: path.display().to_string(),
            moved_to: dst.display().to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
            loss: loss.cloned(),
        };
        write_record(&dst, &rec)?;
        Ok(dst)
    }
}

/// What `quarantine/<name>.why.json` holds.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub original: String,
    pub moved_to: String,
    pub reason: String,
    pub at_ms: u64,
    pub loss: Option<LossNote>,
}

/// Suffix of the record written next to a quarantined file.
pub const RECORD_SUFFIX: &str = ".why.json";

/// Largest quarantine record read back. A record lists each lost run of
/// items (about 130 bytes of JSON each): every other item of a default
/// segment (2^20 items) lost is about 70 MiB. Only a segment of more than
/// about 16 million items, half of them damaged in alternation, writes
/// more; such a record is reported unreadable (a warning), and the file it
/// describes stays in `quarantine/`.
const QUARANTINE_RECORD_MAX: u64 = 1 << 30;

/// Write (durably) the record of the quarantined file `moved`.
pub fn write_record(moved: &Path, rec: &QuarantineRecord) -> Result<()> {
    let mut name = moved.as_os_str().to_owned();
    name.push(RECORD_SUFFIX);
    let p = PathBuf::from(name);
    let body = serde_json::to_vec_pretty(rec)
        .map_err(|e| Error::InvalidInput(format!("encode quarantine record: {e}")))?;
    crate::durable::write_file(&p, body.as_ref()).map_err(|e| Error::io(&p, "write quarantine record", e))?;
    fsync_path(&p)?;
    if let Some(dir) = p.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

pub mod acked;
mod recover;
mod report;
use crate::segment::names::{Kind, classify};
pub use recover::*;
pub use report::*;

/// What the segment files hold that the journal does not account for yet
/// (read-only: for `tierindex status` on a directory whose broker may run).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LocalPending {
    /// Verified items in `.active` files (read as a scan does, in place).
    pub unsealed_items: u64,
    /// Active files holding at least one verified item: (id, items),
    /// oldest first.
    pub active_segments: Vec<(u64, u64)>,
    /// Sealed files the journal does not know: (id, bytes).
    pub unjournaled_sealed: Vec<(u64, u64)>,
    /// What could not be read (the directory, an active file), with why:
    /// the counts above leave it out, so they are a floor (helper-82 F4:
    /// after an I/O error a report said 0 unsealed entries while 29,600
    /// acknowledged ones sat in active files).
    pub unreadable: Vec<String>,
    /// Acknowledged entries lost, before a start-up recorded the loss:
    /// the segment a flush last acknowledged entries of (`acked`; the
    /// newest mark's segment and the one frozen before it, helper-93 F2),
    /// whose file is gone (and `known` does not know it) or whose files
    /// hold fewer valid items than were acknowledged; and any active file
    /// whose items below its own flush mark (or the mark's count) do not
    /// verify (helper-92 F6: the start and `fsck` reported those, `status`
    /// did not). For a gone one the caller checks the journal once more
    /// (it may have recorded the segment since it was read) and reports
    /// it lost. `(segment, gone, note)`: `gone` is the file's absence.
    pub acked_lost: Vec<(SegmentId, bool, LossNote)>,
}

/// Scan `root/segments` for unsealed entries and sealed files the journal
/// does not know (`known` says which ids it knows). Files that cannot be
/// read are named in [`LocalPending::unreadable`] (fsck says more).
pub fn local_pending(
    root: &Path,
    known: &dyn Fn(SegmentId) -> bool,
    geometry: Option<salvage::Geometry>,
) -> LocalPending {
    let mut out = LocalPending::default();
    // Read before the listing: a segment marked after it is not judged by
    // a listing that could not see its file.
    let (read, older) = match acked::read_both(root) {
        Ok((r, o)) => (Ok(r), o),
        Err(e) => (Err(e), None),
    };
    let mark = match read {
        Ok(acked::Read::Mark(m)) if m.judged() => Some(m),
        Ok(acked::Read::Damaged(why)) => {
            // Metadata, not entries: the next flush of a newer segment
            // writes it again.
            tracing::warn!(
                "the acknowledged-segment mark is damaged ({why}): a newest active segment \
                 removed or zeroed since its entries were acknowledged cannot be told from one \
                 that never held any"
            );
            None
        }
        Err(e) => {
            out.unreadable.push(e.to_string());
            None
        }
        Ok(_) => None,
    };
    // The mark before it (the segment frozen at the last roll, whose seal
    // may not have finished: helper-92 F7), judged for a file gone.
    let older = older.filter(|_| mark.is_some());
    let mut mark_file = false;
    let mut older_file = false;
    let dir = root.join(SEGMENTS_DIR);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        // None yet: nothing to count (a directory that went is the
        // caller's to say: `drain`'s `LocalGone`).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.unreadable.push(format!("{}: {e}", dir.display()));
            return out;
        }
    };
    let mut files: Vec<(Kind, PathBuf)> = Vec::new();
    for e in rd {
        match e {
            Ok(e) => files.push((classify(&e.file_name().to_string_lossy()), e.path())),
            Err(e) => {
                out.unreadable.push(format!("{}: {e}", dir.display()));
                break;
            }
        }
    }
    files.sort();
    // Sealed files by id: one beside an active file of its id (a seal that
    // finished before a kill -9 removed the source) may hold what the
    // active file no longer does.
    let sealed_paths: BTreeMap<SegmentId, PathBuf> = files
        .iter()
        .filter_map(|(k, p)| match k {
            Kind::Sealed(id) => Some((*id, p.clone())),
            _ => None,
        })
        .collect();
    for (kind, path) in files {
        match kind {
            Kind::Active(id) => {
                // Bounded by the header's layout: a file longer than it is
                // not read (fsck reports it).
                // One that does not decode or scan (damage, or a creation
                // a crash cut short) is fsck's and the next open's, and one
                // that went since the listing (a running broker sealed it)
                // is not there to count; one the system cannot read (EIO,
                // a permission) is named.
                let mut read = true;
                let scan = match recover::read_bounded_active(&path, geometry) {
                    Ok(b) => salvage::scan_active(&b, id, geometry).ok(),
                    Err(Error::Io { source, .. })
                        if source.kind() != std::io::ErrorKind::NotFound =>
                    {
                        out.unreadable.push(format!("{}: {source}", path.display()));
                        read = false;
                        None
                    }
                    Err(Error::Io { .. }) => {
                        // Gone since the listing: sealed by a running broker.
                        read = false;
                        None
                    }
                    Err(_) => None,
                };
                let n = scan.as_ref().map_or(0, |s| s.items.len() as u64);
                older_file |= older.is_some_and(|m| m.segment == id);
                mark_file |= mark.is_some_and(|m| m.segment == id);
                let judged = mark.filter(|m| m.segment == id).or(older.filter(|m| m.segment == id));
                // Not the marked segment's file (helper-92 F4): its entries
                // are not this stream's (a start keeps it aside), and the
                // acknowledged ones are lost unless our seal holds them.
                if read
                    && let (Some(m), Some(s)) = (judged, scan.as_ref())
                    && let Some(differs) = recover::not_the_marked_file(&m, s)
                {
                    if !known(id) && sealed_count(&sealed_paths, id).is_none_or(|c| c < m.items) {
                        let why = recover::foreign_file_why(&differs, &path);
                        out.acked_lost
                            .push((id, false, recover::acked_loss_note(&path, &m, &why)));
                    }
                    continue;
                }
                if read
                    && let Some(note) =
                        active_loss(&path, id, scan.as_ref(), n, judged.as_ref(), &sealed_paths)
                {
                    out.acked_lost.push((id, false, note));
                }
                if n > 0 {
                    out.unsealed_items += n;
                    out.active_segments.push((id.0, n));
                }
            }
            Kind::Sealed(id) => {
                if mark.is_some_and(|m| m.segment == id) {
                    mark_file = true;
                }
                older_file |= older.is_some_and(|m| m.segment == id);
                if !known(id) {
                    let len = fs::metadata(&path).map_or(0, |m| m.len());
                    out.unjournaled_sealed.push((id.0, len));
                }
            }
            _ => {}
        }
    }
    if let Some(m) = mark
        && !mark_file
        && !known(m.segment)
    {
        let path = dir.join(active::active_file_name(m.segment));
        let note = recover::acked_loss_note(
            &path,
            &m,
            "its file is gone from segments/ (removed, or lost with the disk), and the journal \
             never recorded it sealed",
        );
        out.acked_lost.push((m.segment, true, note));
    }
    if let Some(m) = older
        && !older_file
        && !known(m.segment)
    {
        let path = dir.join(active::active_file_name(m.segment));
        let note = recover::acked_loss_note(
            &path,
            &m,
            "its file is gone from segments/ (removed, or lost with the disk) before its seal \
             finished, and the journal never recorded it sealed",
        );
        out.acked_lost.push((m.segment, true, note));
    }
    out
}

/// The item count of the sealed file of `id`, when it passes the
/// whole-file check (read in full: only where a loss is to be accounted
/// for).
fn sealed_count(sealed_paths: &BTreeMap<SegmentId, PathBuf>, id: SegmentId) -> Option<u64> {
    sealed_paths
        .get(&id)
        .and_then(|p| match SealedInfo::check(p, true) {
            Ok(s) if s.id() == id => Some(s.footer().item_count),
            _ => None,
        })
}

/// What `status` can prove lost of one active file (`scan`, `n` verified
/// items; `None` when it did not decode) before a start records it, as
/// the start and `fsck` count it (helper-92 F6: `status` said LOST where
/// they found nothing lost, and pending where they said 50 LOST):
///
/// - items that do not verify below what a flush made durable: below the
///   file's own flush mark (the scan's `lost` spans, which the start's
///   salvage reports) or below the count of the acknowledged-segment mark
///   `judged`. A span above both is not called lost here: a torn tail is
///   what a kill -9 may leave (the start reports it as possibly lost), and
///   a hole there can be a read racing a running broker's append (the
///   flush marks are written after the items they count, and read first);
/// - the mark's count beyond what the segment's files hold.
///
/// A sealed file of the same id that passes the whole-file check and holds
/// more items than the active file (its seal finished before the damage,
/// or before a kill -9 let it remove its source) holds every entry the
/// active file lost: the start keeps it and reports nothing (see
/// `salvage_active_file` and `check_acked` in `recover.rs`). `None` when
/// nothing is proven lost.
fn active_loss(
    path: &Path,
    id: SegmentId,
    scan: Option<&salvage::ActiveScan>,
    n: u64,
    judged: Option<&acked::AckedMark>,
    sealed_paths: &BTreeMap<SegmentId, PathBuf>,
) -> Option<LossNote> {
    use crate::segment::format::ACTIVE_ITEM_LEN;
    let durable = judged
        .map_or(0, |m| m.items)
        .max(scan.and_then(|s| s.flush_mark).map_or(0, u64::from));
    let spans: Vec<LostSpan> = scan
        .map(|s| {
            s.lost
                .iter()
                .filter(|l| u64::from(l.first_index) < durable)
                .map(|l| {
                    let items = u64::from(l.items).min(durable - u64::from(l.first_index));
                    LostSpan {
                        first_index: l.first_index,
                        // At most `l.items`: fits.
                        items: u32::try_from(items).unwrap_or(l.items),
                        byte_offset: l.byte_offset,
                        bytes: items * ACTIVE_ITEM_LEN as u64,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let lost: u64 = spans.iter().map(|l| u64::from(l.items)).sum();
    if lost == 0 && judged.is_none_or(|m| n >= m.items) {
        return None;
    }
    // Read only when there is a loss to account for (damage: rare).
    let sealed = sealed_count(sealed_paths, id);
    let (lost, spans) = if sealed.is_some_and(|c| c > n) {
        (0, Vec::new())
    } else {
        (lost, spans)
    };
    let accounted = n.saturating_add(lost).max(sealed.unwrap_or(0));
    let short = judged.map_or(0, |m| m.items.saturating_sub(accounted));
    if lost == 0 && short == 0 {
        return None;
    }
    let held = match sealed {
        Some(c) => format!("its files hold {accounted} valid entries (the active file {n}, the sealed one {c})"),
        None => format!("its file holds {n} valid entries"),
    };
    if lost == 0 {
        let m = judged?;
        // Its own count, not the mark's (helper-96 H96-6: "50 LOST ... so
        // at least that many [200] are LOST").
        let why = if scan.is_none() {
            "its header does not decode with the configured geometry (`fsck` with the geometry \
             it was written with can say more)"
        } else {
            "cut, emptied or zeroed"
        };
        let mut note = recover::acked_loss_note(path, m, "");
        note.salvaged_items = n;
        note.lost_items = short;
        note.unknown_loss = Some(format!(
            "{held} ({why}), but a flush acknowledged {} of its entries (the first at offset \
             {}): at least {short} are LOST, and any acknowledged after that flush too (not \
             counted)",
            m.items,
            if m.first_offset == u64::MAX {
                "unknown".to_string()
            } else {
                m.first_offset.to_string()
            }
        ));
        return Some(note);
    }
    Some(LossNote {
        segment: id.0,
        file: path.display().to_string(),
        kind: "active".into(),
        salvaged_items: n,
        lost_items: lost + short,
        lost: spans,
        unknown_loss: judged.filter(|_| short > 0).map(|m| {
            format!(
                "a flush acknowledged {} entries of this segment (ACKED_ACTIVE), but {held} and \
                 {lost} counted lost: at least {short} more are LOST",
                m.items
            )
        }),
        header_rebuilt: false,
        tail_removed: None,
        sealed_as: None,
        original_moved_to: None,
    })
}

/// Every quarantine record (`quarantine/*.why.json`), oldest name first.
/// One that cannot be read is logged and left out: see
/// [`quarantine_records_read`].
pub fn quarantine_records(root: &Path) -> Vec<(PathBuf, QuarantineRecord)> {
    quarantine_records_read(root)
        .into_iter()
        .filter_map(|(p, r)| match r {
            Ok(r) => Some((p, r)),
            Err(e) => {
                tracing::warn!(record = %p.display(), error = %e, "quarantine record unreadable; the file it describes is still in quarantine/");
                None
            }
        })
        .collect()
}

/// Every quarantine record, oldest name first, with why one cannot be read
/// (emptied, garbled, not a regular file, too long).
pub fn quarantine_records_read(
    root: &Path,
) -> Vec<(PathBuf, std::result::Result<QuarantineRecord, String>)> {
    let Ok(rd) = fs::read_dir(root.join(QUARANTINE_DIR)) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, std::result::Result<QuarantineRecord, String>)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(RECORD_SUFFIX))
        .map(|p| {
            // Bounded (a planted sparse file must not eat the memory).
            let read = crate::durable::read_regular(&p, QUARANTINE_RECORD_MAX)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            (p, read)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Entry;
    use crate::segment::sealed::{build_sealed, write_sealed_file};

    /// Entries 0..50, each key, offset and timestamp its index.
    fn fifty_entries() -> Vec<Entry> {
        (0..50)
            .map(|i| Entry {
                key_hash: i,
                offset: i,
                size: 1,
                timestamp_ms: i,
            })
            .collect()
    }

    /// Gap 17: a data directory whose `mkdir` an earlier process never
    /// made durable (killed before its fsync) gets its name in its parent
    /// fsynced by the next open, not only by the open that created it.
    #[test]
    fn an_existing_data_directorys_name_is_made_durable_at_every_open() {
        use crate::durable::seam::{Step, steps_of};
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("dd");
        fs::create_dir(&root).unwrap();
        let (dd, steps) = steps_of(|| DataDir::open(&root));
        drop(dd.unwrap());
        assert!(
            steps.contains(&Step::FsyncDir(d.path().to_path_buf())),
            "{steps:?}"
        );
        let (dd, steps) = steps_of(|| DataDir::open(&root));
        drop(dd.unwrap());
        assert!(
            steps.contains(&Step::FsyncDir(d.path().to_path_buf())),
            "and at the open after: {steps:?}"
        );
        // Opened through a symbolic link: the directory holding its real
        // name is synced (helper-79 F6).
        let real_parent = d.path().join("a");
        fs::create_dir_all(real_parent.join("real")).unwrap();
        fs::create_dir_all(d.path().join("b")).unwrap();
        std::os::unix::fs::symlink(real_parent.join("real"), d.path().join("b").join("link"))
            .unwrap();
        let (dd, steps) = steps_of(|| DataDir::open(&d.path().join("b").join("link")));
        drop(dd.unwrap());
        let canonical_parent = real_parent.canonicalize().unwrap();
        assert!(
            steps.contains(&Step::FsyncDir(canonical_parent)),
            "through a link: {steps:?}"
        );
    }

    /// An operator's `rm LOCK` (a "stale lock file") under a live holder
    /// does not let a second process in: the lock is the directory's.
    #[test]
    fn a_removed_lock_file_does_not_free_the_data_directory() {
        let d = tempfile::tempdir().unwrap();
        let a = DataDir::open(d.path()).unwrap();
        fs::remove_file(d.path().join(LOCK_FILE)).unwrap();
        match DataDir::open(d.path()) {
            Err(Error::Locked { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a second holder got in after `rm LOCK`"),
        }
        drop(a);
        let _b = DataDir::open(d.path()).unwrap();
        assert!(d.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn second_open_is_refused_with_holder() {
        let d = tempfile::tempdir().unwrap();
        let _a = DataDir::open(d.path()).unwrap();
        match DataDir::open(d.path()) {
            Err(Error::Locked { holder, .. }) => assert!(holder.contains("pid="), "{holder}"),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("second open must fail"),
        }
    }

    #[test]
    fn garbage_truncated_and_unknown_files_are_quarantined_not_deleted() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let segs = dd.segments_dir();
        let es = fifty_entries();
        let (bytes, _) = build_sealed(SegmentId(1), 0, 0, 8, &es).unwrap();
        write_sealed_file(&segs, SegmentId(1), &bytes).unwrap();
        write_sealed_file(&segs, SegmentId(2), &bytes[..bytes.len() - 7]).unwrap();
        fs::write(segs.join("00000000000000000003.seg"), b"garbage").unwrap();
        fs::write(segs.join("notes.txt"), b"hello").unwrap();

        let check = recover(&dd, Mode::CheckOnly).unwrap();
        assert_eq!(check.report.quarantined.len(), 3);
        assert!(
            segs.join("notes.txt").exists(),
            "check-only must not move files"
        );

        let r = recover(&dd, Mode::Repair).unwrap();
        // "Segment 2" holds segment 1's bytes (cut): none of its items
        // validates against the id in its name, so nothing is salvaged.
        assert_eq!(r.report.sealed_ok, vec![1]);
        assert!(
            r.report
                .salvaged
                .iter()
                .any(|n| n.segment == 2 && n.salvaged_items == 0 && n.unknown_loss.is_some())
        );
        assert_eq!(r.report.quarantined.len(), 3);
        let moved = fs::read_dir(dd.quarantine_dir())
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(RECORD_SUFFIX)
            })
            .count();
        assert_eq!(moved, 3);
        // Each move has its record: why, and what was lost.
        assert_eq!(quarantine_records(d.path()).len(), 3);
        assert_eq!(r.max_id_seen, Some(SegmentId(3)));
        assert!(r.sealed.contains_key(&SegmentId(1)));
    }

    /// Bytes appended after a sealed file's footer, here a terabyte hole,
    /// do not make the segment a loss: the length its header gives passes
    /// the whole-file checksum, so the file is cut back to it (same bytes)
    /// without the tail ever being read, and the original is kept.
    #[test]
    fn a_sealed_file_extended_past_its_footer_is_cut_back_to_its_sealed_bytes() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let segs = dd.segments_dir();
        let es = fifty_entries();
        let (bytes, _) = build_sealed(SegmentId(4), 0, 0, 8, &es).unwrap();
        let p = write_sealed_file(&segs, SegmentId(4), &bytes).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(bytes.len() as u64 + (1 << 40)).unwrap();
        drop(f);

        let check = recover(&dd, Mode::CheckOnly).unwrap();
        assert_eq!(check.report.salvaged.len(), 1);
        assert_eq!(check.report.salvaged[0].tail_removed, Some(1 << 40));
        assert!(!check.report.salvaged[0].is_loss());
        assert!(check.report.salvaged[0].line().contains("cut off at the next start"));
        assert_eq!(fs::metadata(&p).unwrap().len(), bytes.len() as u64 + (1 << 40));

        let r = recover(&dd, Mode::Repair).unwrap();
        let n = &r.report.salvaged[0];
        assert_eq!((n.salvaged_items, n.lost_items, n.tail_removed), (50, 0, Some(1 << 40)));
        assert!(!n.is_loss() && r.report.losses().is_empty(), "{}", n.line());
        assert_eq!(fs::read(&p).unwrap(), bytes, "the sealed bytes themselves");
        assert_eq!(r.report.sealed_ok, vec![4]);
        assert!(r.sealed.contains_key(&SegmentId(4)));
        assert_eq!(quarantine_records(d.path()).len(), 1, "the original is kept");
        // Nothing left to do at the next start.
        drop(r);
        assert!(recover(&dd, Mode::Repair).unwrap().report.is_clean());
    }

    /// A crash after the original was linked into `quarantine/` and before
    /// its record was written: the next start cuts the file again and
    /// records the link it finds, instead of leaving it without a record
    /// beside a second one.
    #[test]
    fn a_cut_interrupted_after_its_link_reuses_the_link() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let segs = dd.segments_dir();
        let (bytes, _) = build_sealed(SegmentId(5), 0, 0, 8, &fifty_entries()).unwrap();
        let p = write_sealed_file(&segs, SegmentId(5), &bytes).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(bytes.len() as u64 + 4096).unwrap();
        drop(f);
        fs::create_dir_all(dd.quarantine_dir()).unwrap();
        let early = dd.quarantine_dir().join(format!(
            "{}.1",
            p.file_name().unwrap().to_string_lossy()
        ));
        fs::hard_link(&p, &early).unwrap();

        let r = recover(&dd, Mode::Repair).unwrap();
        let n = &r.report.salvaged[0];
        assert_eq!(n.original_moved_to.as_deref(), Some(early.to_str().unwrap()));
        assert_eq!(fs::read(&p).unwrap(), bytes);
        drop(r);
        let ino = fs::metadata(&early).unwrap().ino();
        let links: Vec<_> = fs::read_dir(dd.quarantine_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.metadata().unwrap().ino() == ino)
            .collect();
        assert_eq!(links.len(), 1, "{links:?}");
        let recs = quarantine_records(d.path());
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0].1.moved_to, early.to_str().unwrap());
        assert_eq!(fs::metadata(&early).unwrap().len(), bytes.len() as u64 + 4096);
    }

    /// Damaged items after the last valid one of an active file, more than
    /// a crash mid-append tears, and past its flush mark (appended after
    /// the last flush): recovered in place, the tail copied to quarantine/
    /// before it is zeroed, with a record, so the loss stays in `status`
    /// and `quarantine list` after this start (helper-39, F5: the copy had
    /// no record). The same damage below the mark (flushed items) is a
    /// certain loss: the file is salvaged, not appended to again.
    #[test]
    fn a_damaged_active_tail_is_kept_with_a_record() {
        use crate::segment::active::ActiveSegment;
        use crate::segment::format::{ACTIVE_ITEM_LEN, ActiveLayout};
        for flushed in [17usize, 20] {
            let d = tempfile::tempdir().unwrap();
            let dd = DataDir::open(d.path()).unwrap();
            let segs = dd.segments_dir();
            let mut a = ActiveSegment::create(&segs, SegmentId(1), 8, 100, 0).unwrap();
            for e in fifty_entries().iter().take(flushed) {
                a.append_entry(*e).unwrap();
            }
            a.flush().unwrap();
            for e in fifty_entries().iter().take(20).skip(flushed) {
                a.append_entry(*e).unwrap();
            }
            let path = a.path().to_path_buf();
            drop(a);
            let l = ActiveLayout::new(8, 100).unwrap();
            let mut b = fs::read(&path).unwrap();
            for i in 17..20 {
                b[l.item_offset(i) + 3] ^= 0x5a;
            }
            fs::write(&path, &b).unwrap();
            let r = recover(&dd, Mode::Repair).unwrap();
            let n = &r.report.salvaged[0];
            assert_eq!(n.lost_items, 3, "{}", n.line());
            let recs = quarantine_records(d.path());
            assert_eq!(recs.len(), 1, "{recs:?}");
            let loss = recs[0].1.loss.as_ref().unwrap();
            assert!(loss.is_loss() && loss.lost_items == 3);
            assert!(
                fs::metadata(&recs[0].1.moved_to).unwrap().len() >= 3 * ACTIVE_ITEM_LEN as u64
            );
            // In place (the tail was only torn, as far as the file can
            // tell) or salvaged (the flush mark says those items were
            // acknowledged).
            assert_eq!(path.exists(), flushed == 17, "flushed {flushed}: {}", n.line());
            assert_eq!(
                n.sealed_as.is_some(),
                flushed == 20,
                "flushed {flushed}: {}",
                n.line()
            );
        }
    }

    /// Bytes appended after a sealed file whose item is also damaged: the
    /// tail is not part of the segment, so the items are salvaged where the
    /// header puts them and only the damaged one is lost (it was "an
    /// unknown number" with the tail, every item of the file).
    #[test]
    fn a_damaged_sealed_file_with_a_tail_loses_only_its_damaged_item() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let segs = dd.segments_dir();
        let es = fifty_entries();
        let (mut bytes, _) = build_sealed(SegmentId(6), 0, 0, 8, &es).unwrap();
        let at = bytes.len() - crate::segment::format::FOOTER_LEN - 40;
        bytes[at] ^= 0xff;
        let p = write_sealed_file(&segs, SegmentId(6), &bytes).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(bytes.len() as u64 + (1 << 40)).unwrap();
        drop(f);
        let r = recover(&dd, Mode::Repair).unwrap();
        let n = &r.report.salvaged[0];
        assert_eq!((n.salvaged_items, n.lost_items), (49, 1), "{}", n.line());
        assert!(n.unknown_loss.is_none(), "{}", n.line());
        assert!(r.sealed.contains_key(&SegmentId(6)));
        assert!(fs::metadata(&p).unwrap().len() < 1 << 20, "written anew, no tail");
    }

    /// Two data directories opened at once whose `segments/` link to one
    /// directory with no `LINKED_BY` yet (two first opens): the second is
    /// refused by the target's lock, as `Locked`; once the first is closed
    /// it opens, a check (`open_to_check`) writes no `LINKED_BY`, and a
    /// `LINKED_BY` planted as a symlink is not written through.
    #[test]
    fn a_linked_segments_directory_is_locked_while_in_use() {
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("shared");
        fs::create_dir(&shared).unwrap();
        for d in ["a", "b"] {
            fs::create_dir(t.path().join(d)).unwrap();
            std::os::unix::fs::symlink(&shared, t.path().join(d).join(SEGMENTS_DIR)).unwrap();
        }
        let victim = t.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, shared.join(LINKED_BY_FILE)).unwrap();
        match DataDir::open_to_check(&t.path().join("a")) {
            Err(Error::InvalidInput(m)) => assert!(m.contains("not a regular file"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        fs::remove_file(shared.join(LINKED_BY_FILE)).unwrap();
        let a = DataDir::open_to_check(&t.path().join("a")).unwrap();
        assert!(!shared.join(LINKED_BY_FILE).exists(), "a check writes nothing");
        match DataDir::open(&t.path().join("b")) {
            Err(Error::Locked { holder, .. }) => assert!(holder.contains("links there"), "{holder}"),
            other => panic!("{:?}", other.err()),
        }
        drop(a);
        let b = DataDir::open(&t.path().join("b")).unwrap();
        let by = fs::read(shared.join(LINKED_BY_FILE)).unwrap();
        // No identity yet: an empty incarnation, the directory's device and
        // inode, then the path.
        use std::os::unix::fs::MetadataExt as _;
        let m = fs::metadata(t.path().join("b")).unwrap();
        let mut want = format!("\n{}:{}\n", m.dev(), m.ino()).into_bytes();
        want.extend_from_slice(
            fs::canonicalize(t.path().join("b"))
                .unwrap()
                .as_os_str()
                .as_encoded_bytes(),
        );
        assert_eq!(by, want);
        drop(b);
        // a still links there, and LINKED_BY names b, a data directory
        // (it has an identity) that links there too.
        fs::write(t.path().join("b").join(crate::identity::IDENTITY_FILE), b"x").unwrap();
        match DataDir::open(&t.path().join("a")) {
            Err(Error::InvalidInput(m)) => assert!(m.contains("links to as its segments/"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        // A data directory's own record, naming an incarnation it no longer
        // has (a refused first open removed its IDENTITY): not a lock-out.
        let e = t.path().join("e");
        let shared_e = t.path().join("shared-e");
        fs::create_dir_all(&e).unwrap();
        fs::create_dir(&shared_e).unwrap();
        std::os::unix::fs::symlink(&shared_e, e.join(SEGMENTS_DIR)).unwrap();
        let mut rec = b"0123abcd\n".to_vec();
        rec.extend_from_slice(fs::canonicalize(&e).unwrap().as_os_str().as_encoded_bytes());
        fs::write(shared_e.join(LINKED_BY_FILE), rec).unwrap();
        drop(DataDir::open(&e).unwrap());
        // segments/ linked to the data directory's own journal/: refused.
        let c = t.path().join("c");
        fs::create_dir_all(c.join(JOURNAL_DIR)).unwrap();
        std::os::unix::fs::symlink(c.join(JOURNAL_DIR), c.join(SEGMENTS_DIR)).unwrap();
        match DataDir::open(&c) {
            Err(Error::InvalidInput(m)) => assert!(m.contains("is the same directory as"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
    }

    /// A `segments/` of its own that another data directory uses too (a
    /// bind mount; here a link made after the other's open stands in for
    /// it): the data directory that did not record itself last is refused,
    /// and nothing is written; so it is once the other moved away, and when
    /// the record names this data directory's path but another directory
    /// (two containers, each mounting its data directory at one path and
    /// one shared directory as its `segments/`: helper-70). A copy of a data
    /// directory (its record naming the original) opens and records itself;
    /// so does one that lost its `IDENTITY` in place.
    #[test]
    fn a_segments_directory_another_data_directory_uses_is_refused() {
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::fs::MetadataExt as _;
        let t = tempfile::tempdir().unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        let open_as = |d: &Path| {
            let (dd, id, created) =
                DataDir::open_as(d, "s", "file:///st", None, None, Default::default(), None)?;
            if created {
                DataDir::record_user_at(d, &id.incarnation);
            }
            Ok::<_, Error>((dd, id))
        };
        let record_as = |d: &Path, dir: &Path, inc: &str| {
            let m = fs::metadata(dir).unwrap();
            let mut v = format!("{inc}\n{}:{}\n", m.dev(), m.ino()).into_bytes();
            v.extend_from_slice(fs::canonicalize(d).unwrap().as_os_str().as_bytes());
            v
        };
        let record = |d: &Path, inc: &str| record_as(d, d, inc);
        let by = |d: &Path| fs::read(d.join(SEGMENTS_DIR).join(LINKED_BY_FILE)).unwrap();
        let refused = |r: Result<DataDir>| match r {
            Err(Error::InvalidInput(m)) => {
                assert!(m.contains("a bind mount, perhaps from another container"), "{m}")
            }
            other => panic!("{:?}", other.err()),
        };
        let (dd, id_b) = open_as(&b).unwrap();
        drop(dd);
        for n in [SEGMENTS_DIR, JOURNAL_DIR] {
            let got = fs::read(b.join(n).join(LINKED_BY_FILE)).unwrap();
            assert_eq!(got, record(&b, &id_b.incarnation), "{n}");
        }
        // a: a data directory whose segments/ is b's, and which opened last.
        let (dd, id_a) = open_as(&a).unwrap();
        drop(dd);
        fs::remove_dir_all(a.join(SEGMENTS_DIR)).unwrap();
        std::os::unix::fs::symlink(b.join(SEGMENTS_DIR), a.join(SEGMENTS_DIR)).unwrap();
        let planted = record(&a, &id_a.incarnation);
        fs::write(b.join(SEGMENTS_DIR).join(LINKED_BY_FILE), &planted).unwrap();
        refused(DataDir::open_to_check(&b));
        refused(open_as(&b).map(|(dd, _)| dd));
        assert_eq!(by(&b), planted);
        // a moved away: still another incarnation's record.
        fs::rename(&a, t.path().join("a-moved")).unwrap();
        refused(open_as(&b).map(|(dd, _)| dd));
        // The record removed, as the message says: b opens and records itself.
        fs::remove_file(b.join(SEGMENTS_DIR).join(LINKED_BY_FILE)).unwrap();
        drop(open_as(&b).unwrap());
        assert_eq!(by(&b), record(&b, &id_b.incarnation));
        // A record naming b's own path but another directory and
        // incarnation: another mount namespace's data directory at b's path.
        let elsewhere = record_as(&b, t.path(), "0123abcd");
        fs::write(b.join(SEGMENTS_DIR).join(LINKED_BY_FILE), &elsewhere).unwrap();
        refused(open_as(&b).map(|(dd, _)| dd));
        assert_eq!(by(&b), elsewhere);
        // In journal/ too: one message names both records (helper-71).
        let jrec = b.join(JOURNAL_DIR).join(LINKED_BY_FILE);
        let kept = fs::read(&jrec).unwrap();
        fs::write(&jrec, &elsewhere).unwrap();
        match open_as(&b) {
            Err(Error::InvalidInput(m)) => assert!(
                m.contains("(and so was journal/)")
                    && m.contains(&format!("{} and {}", b.join(SEGMENTS_DIR).join(LINKED_BY_FILE).display(), jrec.display())),
                "{m}"
            ),
            other => panic!("{:?}", other.err()),
        }
        fs::write(&jrec, kept).unwrap();
        fs::write(b.join(SEGMENTS_DIR).join(LINKED_BY_FILE), record(&b, &id_b.incarnation)).unwrap();
        // c: a copy of b (its identity and records): b's incarnation.
        for n in ["", SEGMENTS_DIR, JOURNAL_DIR] {
            fs::create_dir_all(c.join(n)).unwrap();
        }
        let idf = crate::identity::IDENTITY_FILE;
        fs::copy(b.join(idf), c.join(idf)).unwrap();
        for n in [SEGMENTS_DIR, JOURNAL_DIR] {
            fs::copy(b.join(n).join(LINKED_BY_FILE), c.join(n).join(LINKED_BY_FILE)).unwrap();
        }
        drop(open_as(&c).unwrap());
        assert_eq!(by(&c), record(&c, &id_b.incarnation));
        // b lost its IDENTITY: a new incarnation, its own directories.
        fs::remove_file(b.join(idf)).unwrap();
        let (dd, id_b2) = open_as(&b).unwrap();
        drop(dd);
        assert_ne!(id_b2.incarnation, id_b.incarnation);
        assert_eq!(by(&b), record(&b, &id_b2.incarnation));
        // A record of an older build (no device and inode) in a directory
        // of its own naming another incarnation: known by its path only.
        let mut old = b"0123abcd\n".to_vec();
        old.extend_from_slice(fs::canonicalize(&c).unwrap().as_os_str().as_bytes());
        fs::write(b.join(SEGMENTS_DIR).join(LINKED_BY_FILE), &old).unwrap();
        drop(open_as(&b).unwrap());
        // c restored from a backup in place: another directory at the path
        // its record names, and its incarnation (`safe_defaults`' restored
        // backup was refused as a data directory sharing its own segments/).
        let c_old = t.path().join("c-old");
        fs::rename(&c, &c_old).unwrap();
        for n in ["", SEGMENTS_DIR, JOURNAL_DIR] {
            fs::create_dir_all(c.join(n)).unwrap();
        }
        fs::copy(c_old.join(idf), c.join(idf)).unwrap();
        for n in [SEGMENTS_DIR, JOURNAL_DIR] {
            fs::copy(c_old.join(n).join(LINKED_BY_FILE), c.join(n).join(LINKED_BY_FILE)).unwrap();
        }
        drop(open_as(&c).unwrap());
        assert_eq!(by(&c), record(&c, &id_b.incarnation));
    }

    #[test]
    fn link_records_parse() {
        let r = LinkRecord::parse(b"inc\n1:2\n/a/b\nc");
        assert_eq!((r.incarnation, r.dir_id, r.path), (&b"inc"[..], Some((1, 2)), Path::new("/a/b\nc")));
        let r = LinkRecord::parse(b"inc\n/a/b\nc");
        assert_eq!((r.incarnation, r.dir_id, r.path), (&b"inc"[..], None, Path::new("/a/b\nc")));
        let r = LinkRecord::parse(b"x:y\n/a");
        assert_eq!((r.dir_id, r.path), (None, Path::new("/a")));
        let r = LinkRecord::parse(b"/a");
        assert_eq!((r.incarnation, r.dir_id, r.path), (&b""[..], None, Path::new("/a")));
        let r = LinkRecord::parse(b"i\nnot:num\n/a");
        assert_eq!((r.dir_id, r.path), (None, Path::new("/a")));
    }
}
