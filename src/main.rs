//! The `tierindex` binary; everything lives in the library's `cli` module.

fn main() {
    std::process::exit(tierindex::cli::main());
}
