#!/usr/bin/env bash
# Random kill loop on demand: SIGKILL the real `tierindex demo` N times at
# random moments (start-up recovery, appends, seals, uploads, verification,
# and inside a SIGTERM drain), restart each time, then drain and check every
# acknowledged entry against the model (tests/kill_loop.rs).
#
#   scripts/crash-loop.sh [N] [SEED]        default N=200 (what CI runs)
#   CRASH_ITERS=K scripts/crash-loop.sh N   also run the crash-point harness
#                                           with K crashes per point
#
# Prints the summary lines; exits non-zero on any violation and leaves the
# data directory for inspection (its path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
export TIERINDEX_KILLS=$N
if [ -n "${2:-}" ]; then export TIERINDEX_KILL_SEED=$2 TIERINDEX_CRASH_SEED=$2; fi
tests=(--test kill_loop)
if [ -n "${CRASH_ITERS:-}" ]; then
  export TIERINDEX_CRASH_ITERS=$CRASH_ITERS
  tests+=(--test crash_points)
fi
exec cargo test --features failpoints "${tests[@]}" -- --nocapture --test-threads=1
