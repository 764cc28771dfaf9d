//! Process lifecycle: exit codes and an opt-in signal helper.
//!
//! The library never installs signal handlers on its own. A host that wants
//! the standard behaviour calls [`ShutdownSignals::install`]: the first
//! SIGTERM or SIGINT resolves [`ShutdownSignals::first`] (start the drain);
//! a second one exits the process at once with [`EXIT_FORCED`]. Nothing is
//! lost by that: every step is journaled, and the next start resumes.

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Everything sealed was uploaded and verified; nothing pending.
pub const EXIT_DRAINED: i32 = 0;
/// A fatal error (bad configuration, unusable data directory, ...).
pub const EXIT_ERROR: i32 = 1;
/// Command-line usage error (clap).
pub const EXIT_USAGE: i32 = 2;
/// Work is pending (deadline hit or the store unreachable); it is recorded in
/// the journal and resumes at the next start or `tierindex drain`.
pub const EXIT_PENDING: i32 = 3;
/// Some segment is quarantined or a check found a mismatch: an operator
/// should look (`tierindex status`, `tierindex verify`).
pub const EXIT_NEEDS_OPERATOR: i32 = 4;
/// A second signal arrived during the drain: exited at once; pending work
/// resumes at the next start.
pub const EXIT_FORCED: i32 = 5;
/// Another owner took the stream's manifest (a newer epoch): this process
/// stopped writing to the store. Segments it had not committed stay
/// `Verified` in its journal with their local files; an operator decides.
pub const EXIT_FENCED: i32 = 6;

/// Set by the `tierindex` command line under `--json`: a forced exit
/// (second signal) then also prints `{"error": ..., "exit": 5}` on stdout,
/// so a script reading stdout gets a document.
pub(crate) static FORCED_EXIT_JSON: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Opt-in SIGTERM/SIGINT handling (see the module docs).
pub struct ShutdownSignals {
    rx: watch::Receiver<bool>,
    handle: signal_hook::iterator::Handle,
}

impl ShutdownSignals {
    /// Install handlers for SIGTERM and SIGINT on a dedicated thread.
    pub fn install() -> Result<ShutdownSignals> {
        let mut signals = Signals::new([SIGTERM, SIGINT])
            .map_err(|e| Error::io("signals", "install signal handlers", e))?;
        let handle = signals.handle();
        let (tx, rx) = watch::channel(false);
        std::thread::Builder::new()
            .name("tierindex-signals".into())
            .spawn(move || {
                let mut seen = 0;
                for sig in signals.forever() {
                    seen += 1;
                    if seen == 1 {
                        tracing::warn!(
                            signal = sig,
                            "shutdown requested; draining (send again to exit at once)"
                        );
                        let _ = tx.send(true);
                    } else {
                        // Not eprintln!: a closed stderr must not panic here.
                        use std::io::Write as _;
                        const WHY: &str =
                            "second signal; exiting now, pending work resumes at the next start";
                        let _ = writeln!(std::io::stderr(), "tierindex: {WHY}");
                        // Only with `--json` is stdout's lock taken (a
                        // reader that stopped reading must not hold up the
                        // exit otherwise), and the flag read again under it:
                        // a document being printed ends first and clears it.
                        let json = || FORCED_EXIT_JSON.load(std::sync::atomic::Ordering::Relaxed);
                        if json()
                            && let mut out = std::io::stdout().lock()
                            && json()
                        {
                            let _ = writeln!(
                                out,
                                "{{\n  \"error\": \"{WHY}\",\n  \"exit\": {EXIT_FORCED}\n}}"
                            );
                            let _ = out.flush();
                        }
                        std::process::exit(EXIT_FORCED);
                    }
                }
            })
            .map_err(|e| Error::io("signals", "spawn signal thread", e))?;
        Ok(ShutdownSignals { rx, handle })
    }

    /// Resolves at the first signal.
    pub async fn first(&mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// True once the first signal arrived.
    pub fn received(&self) -> bool {
        *self.rx.borrow()
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        self.handle.close();
    }
}
