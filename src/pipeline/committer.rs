//! Group commit for the journal.
//!
//! One thread owns the writes: requests that arrive while an fsync is in
//! progress are appended together, with one fsync, when it returns. Each
//! caller gets `Ok` only after the fsync that covers its records returned;
//! the in-memory state is readable by anyone through [`JournalHandle::read`].
//!
//! A batch that fails validation wrote nothing (the journal validates before
//! writing), so its requests are retried one by one to find the bad one. A
//! write or fsync failure poisons the journal; every later request fails.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::journal::{Journal, Record};

enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<()>>),
    Sync(mpsc::Sender<Result<()>>),
}

impl Reply {
    fn send(self, r: Result<()>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Sync(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

struct Req {
    records: Vec<Record>,
    reply: Reply,
}

/// Shared access to the journal with group-committed appends.
#[derive(Clone)]
pub struct JournalHandle {
    journal: Arc<Mutex<Journal>>,
    tx: mpsc::Sender<Req>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl JournalHandle {
    /// Start the committer thread for `journal`.
    pub fn start(journal: Journal) -> Result<JournalHandle> {
        let journal = Arc::new(Mutex::new(journal));
        let (tx, rx) = mpsc::channel::<Req>();
        let j = journal.clone();
        let thread = std::thread::Builder::new()
            .name("tierindex-journal".into())
            .spawn(move || committer(j, rx))
            .map_err(|e| Error::io("journal", "spawn journal thread", e))?;
        Ok(JournalHandle {
            journal,
            tx,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Stop the committer thread and wait for it, so the journal (and its
    /// directory lock) is released when the last handle drops. Only the
    /// last handle may call this; with other clones alive the thread keeps
    /// running and this returns without waiting.
    pub fn close(self) {
        let JournalHandle {
            journal,
            tx,
            thread,
        } = self;
        drop(tx);
        let last = Arc::strong_count(&thread) == 1;
        if last && let Some(t) = thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
        drop(journal);
    }

    /// Append `records` durably (from async code).
    pub async fn append(&self, records: Vec<Record>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Req {
                records,
                reply: Reply::Async(tx),
            })
            .map_err(|_| Error::Internal("journal thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::Internal("journal thread is gone".into()))?
    }

    /// Append `records` durably from synchronous code (upload hooks).
    pub fn append_blocking(&self, records: Vec<Record>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Req {
                records,
                reply: Reply::Sync(tx),
            })
            .map_err(|_| Error::Internal("journal thread is gone".into()))?;
        rx.recv()
            .map_err(|_| Error::Internal("journal thread is gone".into()))?
    }

    /// Read the in-memory state (held briefly; never across an await).
    pub fn read(&self) -> MutexGuard<'_, Journal> {
        // A panic while holding the lock cannot leave the journal half
        // updated (state changes only after a successful write), so a
        // poisoned mutex is still safe to read.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn committer(journal: Arc<Mutex<Journal>>, rx: mpsc::Receiver<Req>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        let all: Vec<Record> = batch
            .iter()
            .flat_map(|r| r.records.iter().cloned())
            .collect();
        match j.append(&all) {
            Ok(()) => batch.into_iter().for_each(|r| r.reply.send(Ok(()))),
            Err(e) if j.is_poisoned() => {
                let why = e.to_string();
                batch
                    .into_iter()
                    .for_each(|r| r.reply.send(Err(Error::Poisoned(why.clone()))));
            }
            Err(_) => {
                // Validation failed and nothing was written: find the
                // culprit(s) by appending each request alone.
                for r in batch {
                    let res = j.append(&r.records);
                    r.reply.send(res);
                }
            }
        }
        if let Err(e) = j.maybe_compact() {
            tracing::error!(error = %e, "journal compaction failed");
        }
    }
}
