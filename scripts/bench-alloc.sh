#!/usr/bin/env bash
# Disk allocated by idle streams (issue 16): runs examples/streams with a
# geometry, measures `du` of its directory inside the idle window, prints it
# beside the example's RESULT line, and removes the directory.
#
#   scripts/bench-alloc.sh BIN DIR STREAMS ITEMS SLOTS
#
# BIN: a built examples/streams (cargo build --release --example streams).
set -euo pipefail
if [ $# -ne 5 ]; then
  echo "usage: $0 BIN DIR STREAMS ITEMS SLOTS" >&2
  exit 2
fi
BIN=$1; DIR=$2; N=$3; ITEMS=$4; SLOTS=$5
rm -rf "$DIR"; mkdir -p "$DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
OUT=$(mktemp)
STREAMS_SEGMENT_ITEMS=$ITEMS STREAMS_SLOTS=$SLOTS "$BIN" "$DIR" "$N" 12 single-writer > "$OUT" 2>/dev/null &
pid=$!
# Open is done once every stream's directory exists; then inside the 12 s idle window.
for _ in $(seq 1 600); do
  c=$(find "$DIR" -maxdepth 2 -name segments -type d 2>/dev/null | wc -l)
  [ "$c" -ge "$N" ] && break
  sleep 0.1
done
sleep 3
alloc=$(du -s --block-size=1 "$DIR" | cut -f1)
wait "$pid"
echo "$BIN streams=$N items=$ITEMS slots=$SLOTS allocated_bytes=$alloc per_stream_kib=$((alloc / N / 1024)) $(grep RESULT "$OUT" | sed 's/^RESULT streams //')"
rm -rf "$DIR" "$OUT"
