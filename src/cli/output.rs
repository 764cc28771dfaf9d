//! Writing to stdout and stderr without panicking.
//!
//! `println!` panics when its reader went away (`tierindex status | head
//! -1`): Rust ignores SIGPIPE, so the write fails with EPIPE instead. Here a
//! failed stdout write marks stdout closed and later output is skipped; the
//! binary (`src/main.rs`, never the library) then ends by SIGPIPE, the
//! conventional status of a pipeline's writer. Writes to stderr ignore
//! errors: there is nowhere left to report them.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// True once a write to stdout failed because its reader closed it.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Writes `line` and a newline to stdout and flushes it. Returns false (and
/// writes nothing more, ever) once stdout is closed.
pub(crate) fn out_line(line: &str) -> bool {
    if stdout_closed() {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let res = out
        .write_all(line.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match res {
        Ok(()) => true,
        Err(e) => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                note(&format!("tierindex: cannot write to stdout: {e}"));
            }
            false
        }
    }
}

/// Writes `line` and a newline to stderr; errors are ignored.
pub(crate) fn note(line: &str) {
    // The credentials this process was given never reach the terminal,
    // whatever quoted them (a mistyped URL echoed in an error, a server).
    let line = crate::error::scrub(line);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    let _ = err.write_all(b"\n");
}
