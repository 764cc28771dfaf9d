//! Group commit for the journal.
//!
//! One lane on the process's shared journal threads ([`crate::lanes`])
//! owns the writes: requests that arrive while an fsync is in progress are
//! appended together, with one fsync, when it returns. Each
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
use crate::lanes::{JOURNALS, Lane};

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

/// The committer lane; closed when the last handle goes, or by
/// [`JournalHandle::close`] at shutdown.
struct Committer(Lane<Req>);

impl Drop for Committer {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Shared access to the journal with group-committed appends.
#[derive(Clone)]
pub struct JournalHandle {
    journal: Arc<Mutex<Journal>>,
    lane: Arc<Committer>,
}

impl JournalHandle {
    /// Start the committer lane for `journal`.
    pub fn start(journal: Journal) -> Result<JournalHandle> {
        let journal = Arc::new(Mutex::new(journal));
        let j = journal.clone();
        let lane = Lane::new(&JOURNALS, true, move |batch: Vec<Req>| commit(&j, batch))?;
        Ok(JournalHandle {
            journal,
            lane: Arc::new(Committer(lane)),
        })
    }

    /// Stop the committer lane and wait for it; then the journal gives up
    /// its share of the data directory's lock ([`Journal::retire`]). For the
    /// shutdown only: other clones' appends fail from here on.
    pub fn close(self) {
        let JournalHandle { journal, lane } = self;
        // Closed for every handle (the stream is shutting down: a request
        // another handle sends now fails), then waited for: once it has
        // finished nothing writes the journal, which then gives up its
        // share of the data directory's lock, even while other handles
        // keep the journal itself (read-only) a moment longer.
        lane.0.close();
        let _ = lane.0.join();
        journal.lock().unwrap_or_else(|p| p.into_inner()).retire();
        drop(journal);
    }

    /// Append `records` durably (from async code).
    pub async fn append(&self, records: Vec<Record>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Req {
            records,
            reply: Reply::Async(tx),
        })?;
        rx.await
            .map_err(|_| Error::Internal("journal committer is gone".into()))?
    }

    /// Append `records` durably from synchronous code (upload hooks).
    pub fn append_blocking(&self, records: Vec<Record>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.send(Req {
            records,
            reply: Reply::Sync(tx),
        })?;
        rx.recv()
            .map_err(|_| Error::Internal("journal committer is gone".into()))?
    }

    fn send(&self, req: Req) -> Result<()> {
        self.lane
            .0
            .push(req)
            .map_err(|_| Error::Internal("journal committer is gone".into()))
    }

    /// Read the in-memory state (held briefly; never across an await).
    pub fn read(&self) -> MutexGuard<'_, Journal> {
        // A panic while holding the lock cannot leave the journal half
        // updated (state changes only after a successful write), so a
        // poisoned mutex is still safe to read.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One group commit: every request queued when the turn started.
fn commit(journal: &Mutex<Journal>, batch: Vec<Req>) {
    let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
    let all: Vec<Record> = batch
        .iter()
        .flat_map(|r| r.records.iter().cloned())
        .collect();
    match j.append(&all) {
        Ok(()) => batch.into_iter().for_each(|r| r.reply.send(Ok(()))),
        Err(e) if j.is_poisoned() => {
            // Its reason, not its text: each reply is wrapped as
            // `Poisoned` again (helper-85 F3).
            let why = e.reason();
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
