//! The `tierindex` binary; everything lives in the library's `cli` module.

fn main() {
    let code = tierindex::cli::main();
    tierindex::failpoint::report_counts();
    std::process::exit(code);
}
