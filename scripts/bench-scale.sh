#!/usr/bin/env bash
# Issue 16's scale benchmarks, in two parts.
#
#   scripts/bench-scale.sh [drain-cpu]
#   scripts/bench-scale.sh streams
#
# streams: for each N in BENCH_STREAMS (default "100 1000"),
# examples/streams.rs opens N streams in one process (one data directory
# each, a file:// store, the default probe and manifest), appends one entry
# to each, measures threads, descriptors, maps, RSS and the CPU of
# BENCH_IDLE_SECS (default 10) idle seconds, then shuts them all down under
# one deadline. BENCH_STREAMS_MODE=single-writer: no manifest (and no lease
# to renew every 10 s per stream). The soft `ulimit -n` is raised to
# 5 x N + 256 for the run, or to the hard limit if that is lower;
# BENCH_NOFILE=1024 sets it instead (the streams are one host's, which keep
# no descriptor each: 10,000 fit under 1,024). Prints its
# `RESULT streams binary=B ...` line; BENCH_STREAMS_BASELINE=/path/to/an
# older build of the same example runs it too, in the same loop (this
# tree's first for each N).
#
# drain-cpu: the CPU a drain of a backlog of N small sealed segments uses,
# for several N, to see whether the cost per segment stays flat (linear in
# the backlog) or grows.
#
# For each N in BENCH_SCALE_SEGMENTS (default "2500 5000 10000"):
#  1. examples/make_backlog.rs writes a data directory with N sealed,
#     journaled, never-uploaded segments of BENCH_SCALE_ITEMS (100) entries
#     and BENCH_SCALE_SLOTS (64) slots (3.65 KB files);
#  2. `tierindex drain` uploads it to a file:// store, once in the default
#     manifest mode and once with --manifest false (single-writer), timed by
#     /usr/bin/time (user + sys CPU seconds, wall, max RSS).
# Prints `RESULT drain-cpu binary=B mode=M segments=N cpu_s=C
# per_segment_ms=P user_s=U sys_s=S wall_s=W maxrss_kib=R
# manifest_versions=V` lines on stdout (V: the newest manifest version, 0
# in single-writer mode). B is `new` (this tree's build), or `baseline`:
# BENCH_BASELINE=/path/to/an/older/tierindex drains the same backlogs with
# that binary too, in the same run, for a before/after comparison (this
# tree's binary runs first for each N; the backlog is written by this
# tree's make_backlog, so the baseline must read its format).
# BENCH_WORK=/dev/shm/... runs on tmpfs: the filesystem's own costs (ext4
# inode allocation after many unlinks, fsync) out of the CPU figures.
#
# Knobs: BENCH_SCALE_SEGMENTS, BENCH_SCALE_ITEMS, BENCH_SCALE_SLOTS, BENCH_BASELINE,
# BENCH_STREAMS, BENCH_IDLE_SECS, BENCH_STREAMS_MODE, BENCH_STREAMS_BASELINE,
# BENCH_WORK (scratch, default /tmp/tierindex-scale.PID, removed unless
# BENCH_KEEP=1), BENCH_NO_BUILD=1 (use the release binaries already built).
# Exit: 0 when every run drained fully (streams: every run finished), 1
# otherwise, 2 usage.
set -euo pipefail
export LC_ALL=C NO_COLOR=1

PART=${1:-drain-cpu}
case $PART in
drain-cpu | streams) ;;
-h | --help)
  sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
  ;;
*)
  echo "usage: $0 [drain-cpu|streams]" >&2
  exit 2
  ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release
SEGMENTS=${BENCH_SCALE_SEGMENTS:-2500 5000 10000}
ITEMS=${BENCH_SCALE_ITEMS:-100}
SLOTS=${BENCH_SCALE_SLOTS:-64}
WORK=${BENCH_WORK:-/tmp/tierindex-scale.$$}
BASELINE=
if [ -n "${BENCH_BASELINE:-}" ]; then
  # An absolute path: a bare name would be looked up on PATH when run.
  BASELINE=$(realpath -e -- "$BENCH_BASELINE" 2>/dev/null) || BASELINE=
  if [ -z "$BASELINE" ] || [ ! -f "$BASELINE" ] || [ ! -x "$BASELINE" ]; then
    echo "bench-scale: BENCH_BASELINE=$BENCH_BASELINE is not an executable file" >&2
    exit 2
  fi
fi

if [ "$PART" = streams ]; then
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release --example streams) >&2
  fi
  SBASE=
  if [ -n "${BENCH_STREAMS_BASELINE:-}" ]; then
    SBASE=$(realpath -e -- "$BENCH_STREAMS_BASELINE" 2>/dev/null) || SBASE=
    if [ -z "$SBASE" ] || [ ! -x "$SBASE" ]; then
      echo "bench-scale: BENCH_STREAMS_BASELINE=$BENCH_STREAMS_BASELINE is not an executable file" >&2
      exit 2
    fi
  fi
  mkdir -p "$WORK"
  trap '[ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$WORK"' EXIT
  status=0
  for n in ${BENCH_STREAMS:-100 1000}; do
    for binary in new ${SBASE:+baseline}; do
      exe=$BIN/examples/streams
      [ "$binary" = baseline ] && exe=$SBASE
      rm -rf "$WORK/streams-$n"
      mkdir -p "$WORK/streams-$n"
      # Room for 5 descriptors a stream (a baseline's 4, plus a spare),
      # within the hard limit (a count past it fails at open, and says so).
      nofile=$((n * 5 + 256))
      hard=$(ulimit -Hn)
      [ "$hard" != unlimited ] && [ "$nofile" -gt "$hard" ] && nofile=$hard
      [ -n "${BENCH_NOFILE:-}" ] && nofile=$BENCH_NOFILE
      if out=$( (ulimit -n "$nofile" && RUST_LOG=warn "$exe" "$WORK/streams-$n" "$n" "${BENCH_IDLE_SECS:-10}" "${BENCH_STREAMS_MODE:-manifest}") 2>"$WORK/err"); then
        echo "$out" | sed -n "s/^RESULT streams /RESULT streams binary=$binary mode=${BENCH_STREAMS_MODE:-manifest} nofile=$nofile /p"
        grep '^threads:' "$WORK/err" >&2 || true
      else
        echo "bench-scale: $n streams ($binary) failed:" >&2
        tail -5 "$WORK/err" >&2
        status=1
      fi
      # BENCH_KEEP=1 keeps it: on ext4, files deleted in the last few
      # minutes slow the next run's creates (the inode allocator skips
      # recently deleted inodes), so runs compared there should each start
      # a few minutes after any large delete.
      [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$WORK/streams-$n"
    done
  done
  exit $status
fi

if [ ! -x /usr/bin/time ]; then
  echo "bench-scale: /usr/bin/time is needed (Debian package 'time')" >&2
  exit 1
fi
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release --features cli --bin tierindex --example make_backlog) >&2
fi
mkdir -p "$WORK"
cleanup() { [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

status=0
for n in $SEGMENTS; do
  "$BIN/examples/make_backlog" "$WORK/backlog-$n" "$n" "$ITEMS" "$SLOTS" >&2
  for binary in new ${BASELINE:+baseline}; do
    exe=$BIN/tierindex
    [ "$binary" = baseline ] && exe=$BASELINE
    for mode in manifest single-writer; do
      flag=true
      [ "$mode" = single-writer ] && flag=false
      data=$WORK/data-$n-$mode
      store=$WORK/store-$n-$mode
      rm -rf "$data" "$store"
      cp -r "$WORK/backlog-$n" "$data"
      if ! /usr/bin/time -o "$WORK/time" -f "%U %S %e %M" \
        "$exe" --data-dir "$data" --store "file://$store" --manifest "$flag" \
        drain --deadline 30m >"$WORK/out" 2>"$WORK/err"; then
        echo "bench-scale: drain of $n ($binary, $mode) failed:" >&2
        tail -5 "$WORK/err" >&2
        status=1
        continue
      fi
      read -r user sys wall rss <"$WORK/time"
      # The newest manifest version's number: how many versions the drain
      # published (group commit puts several segments in one).
      versions=$({ find "$store" -path '*/manifest/versions/*.manifest' -printf '%f\n' 2>/dev/null || true; } |
        sort | tail -1 | sed 's/\.manifest$//; s/^0*//')
      awk -v b="$binary" -v m="$mode" -v n="$n" -v u="$user" -v s="$sys" -v w="$wall" -v r="$rss" -v v="${versions:-0}" 'BEGIN {
        c = u + s
        printf "RESULT drain-cpu binary=%s mode=%s segments=%d cpu_s=%.2f per_segment_ms=%.3f user_s=%.2f sys_s=%.2f wall_s=%.2f maxrss_kib=%d manifest_versions=%d\n", b, m, n, c, c * 1000 / n, u, s, w, r, v
      }'
      rm -rf "$data" "$store"
    done
  done
  rm -rf "$WORK/backlog-$n"
done
exit $status
