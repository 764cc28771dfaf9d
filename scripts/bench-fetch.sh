#!/usr/bin/env bash
# Issue 6's remote lookup benchmark: examples/bench_fetch.rs against a real
# S3-compatible server (requests per lookup cold and warm, latency).
#
#   scripts/bench-fetch.sh [KIND]      KIND: s3s (default), moto, garage, minio
#
# Starts KIND with scripts/s3-server.sh under TIERINDEX_RUN (default
# /tmp/tierindex-bench-s3), runs the example (release build), stops the server
# if this script started it. Knobs: BENCH_SEGMENTS, BENCH_ITEMS, BENCH_SLOTS,
# BENCH_LOOKUPS (see the example). Prints `RESULT name value unit` lines.
set -euo pipefail
KIND=${1:-s3s}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export TIERINDEX_RUN=${TIERINDEX_RUN:-/tmp/tierindex-bench-s3}
started=0
if ! bash scripts/s3-server.sh env "$KIND" >/dev/null 2>&1; then
  bash scripts/s3-server.sh start "$KIND" >/dev/null
  started=1
fi
trap '[ "$started" = 1 ] && bash scripts/s3-server.sh stop "$KIND" || true' EXIT
eval "$(bash scripts/s3-server.sh env "$KIND")"
cargo build --release --example bench_fetch
echo "bench-fetch: $KIND, commit $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"${CARGO_TARGET_DIR:-target}/release/examples/bench_fetch"
