#!/usr/bin/env bash
# What an embedding broker gets from `tierindex = "..."` with default
# features (issue 14): the library alone builds and lints clean, and its
# dependency tree holds none of the command-line tool's crates nor any
# test-only crate. Run by scripts/test.sh (step `embedder`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The library without `cli` or `testing`: `cargo clippy --all-targets`
# cannot see this build, because the crate's dev-dependency on itself
# turns both features on for test builds. The public API is only what
# src/lib.rs re-exports (plus `lifecycle`), every item documented
# (`missing_docs`), and its docs build without a broken or private link.
cargo clippy --lib -- -D warnings
# With the tool but without the test support: nothing in the library may
# be dead there (what only the tests use is behind `testing`).
cargo clippy --lib --bin tierindex --features cli -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib

tree=$(cargo tree -e normal --prefix none | sed 's/ .*//' | sort -u)
n=$(printf '%s\n' "$tree" | wc -l)
bad=$(printf '%s\n' "$tree" | grep -xE 'clap|clap_builder|clap_derive|indicatif|tracing-subscriber|criterion|proptest|tempfile' || true)
if [ -n "$bad" ]; then
  echo "embedder: the library's default dependency tree holds CLI or test crates:" >&2
  printf '  %s\n' $bad >&2
  exit 1
fi
echo "embedder: $n packages in the library's default tree (normal edges), no CLI or test crates"

# No module imports one that imports it back (issue 14).
python3 scripts/check-module-cycles.py
