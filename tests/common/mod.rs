//! Helpers shared by the pipeline and binary lifecycle tests: bounded waits,
//! child-process guards, and readers of a data directory's journal and
//! segment files that do not go through the code under test.
//!
//! Each test crate uses a different subset, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tierindex::SegmentId;
use tierindex::journal::{self, Frame, Journal, JournalView, Record};
use tierindex::segment::sealed::sealed_file_name;

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// `DATA_DIR/segments/NNN.seg`.
pub fn sealed_path(data_dir: &Path, id: SegmentId) -> PathBuf {
    data_dir
        .join(tierindex::datadir::SEGMENTS_DIR)
        .join(sealed_file_name(id))
}

/// The journal as a reader sees it (no lock taken; works while a writer runs).
pub fn journal_view(data_dir: &Path) -> JournalView {
    Journal::open_read_only(data_dir)
        .unwrap_or_else(|e| panic!("read journal in {}: {e}", data_dir.display()))
        .0
}

/// Every record ever appended (batch frames, in order), from the raw file.
pub fn journal_records(data_dir: &Path) -> Vec<Record> {
    let path = journal::log_path(data_dir);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let decoded = journal::decode_file(&bytes).expect("journal decodes");
    decoded
        .frames
        .into_iter()
        .flat_map(|f| match f.frame {
            Frame::Batch(rs) => rs,
            _ => Vec::new(),
        })
        .collect()
}

/// How many records of kind `kind` the journal holds per segment.
pub fn record_counts(data_dir: &Path, kind: &str) -> BTreeMap<SegmentId, usize> {
    let mut m = BTreeMap::new();
    for r in journal_records(data_dir) {
        if r.kind() == kind {
            *m.entry(r.id()).or_default() += 1;
        }
    }
    m
}

/// Ids of the `NNN.seg` files in the data directory's segment folder.
pub fn local_sealed_ids(data_dir: &Path) -> Vec<SegmentId> {
    let dir = data_dir.join(tierindex::datadir::SEGMENTS_DIR);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut ids: Vec<SegmentId> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".seg")?;
            if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
                stem.parse().ok().map(SegmentId)
            } else {
                None
            }
        })
        .collect();
    ids.sort();
    ids
}

/// Every regular file under `dir`, recursively, as paths relative to `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Kills (SIGKILL) and reaps the child when dropped unless it already exited,
/// so a failing assertion never leaves a demo process running.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn new(child: Child, name: &str) -> ChildGuard {
        ChildGuard {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with the pid of a child we have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}) failed: {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() >= until => return None,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("wait for {}: {e}", self.name),
            }
        }
    }

    /// Waits at most `timeout`; panics (the guard then kills it) otherwise.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(st) => st,
            None => panic!("{} did not exit within {timeout:?}", self.name),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines of a child's pipe, read on a thread and delivered through a channel
/// (so reading never blocks a test past its own deadline).
pub struct Lines {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn spawn(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits at most `timeout` for a line matching `pred`; keeps every line.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.seen.push(l.clone());
                    if hit {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Collects lines until the pipe closes (the child exited) or `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }
}

/// `N` of the last `flushed N` line among `lines`.
pub fn last_flushed(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("flushed ")?.trim().parse().ok())
}

/// Runs the `tierindex` binary with `--config cfg` and `args`, with none of
/// the caller's `TIERINDEX_DATA_DIR` / `_STORE` / `_STREAM` leaking in.
pub fn run_with_config(cfg: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tierindex"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("TIERINDEX_DATA_DIR")
        .env_remove("TIERINDEX_STORE")
        .env_remove("TIERINDEX_STREAM")
        .output()
        .expect("run tierindex")
}

/// A short `demo` run: `entries` entries over 16 keys (`key-{offset % 16}`)
/// in 300-item segments, as fast as it goes, then its shutdown drain.
pub fn small_demo(entries: &str) -> Vec<&str> {
    vec![
        "demo",
        "--segment-items",
        "300",
        "--slots",
        "64",
        "--entries",
        entries,
        "--rate",
        "100000",
        "--keys",
        "16",
    ]
}
