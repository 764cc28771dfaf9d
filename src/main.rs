//! The `tierindex` binary; everything lives in the library's `cli` module.

fn main() {
    let code = tierindex::cli::main();
    tierindex::cli::report_failpoint_counts();
    if tierindex::cli::stdout_closed() {
        // Whoever read our stdout went away (`tierindex status | head -1`).
        // End the way Unix tools do, by SIGPIPE (a shell shows 141), with
        // no message. Only here, in the binary: the library leaves signal
        // dispositions to its host.
        // SAFETY: resetting a disposition to its default and raising the
        // signal in the main thread, just before exit; nothing runs after.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    std::process::exit(code);
}
