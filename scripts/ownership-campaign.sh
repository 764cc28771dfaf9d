#!/usr/bin/env bash
# Ownership campaign (issue 15, item 5): three `tierindex demo` brokers and
# the recovery tool (`drain`, `owner take`) compete for one stream with
# `manifest = true` and 600 ms leases, under random SIGSTOP/SIGCONT (pauses
# longer than the lease), SIGKILL, SIGTERM, restarts and data directories
# moved between brokers; a model checks fencing and every acknowledged
# entry after every step (tests/ownership_campaign.rs).
#
#   scripts/ownership-campaign.sh [STEPS] [SEED]    default STEPS=120 (CI size)
#   TIERINDEX_OWNERSHIP_STEPS=N, TIERINDEX_OWNERSHIP_SEED=S work too.
#
# Store (TIERINDEX_OWNERSHIP_KIND):
#   s3s (default), ceph, moto, ...  start that server with scripts/s3-server.sh
#                  (own TIERINDEX_RUN), run, stop it. A server that does not
#                  start fails the run; one that ignores conditional creates
#                  (garage) is refused by the test.
#   external       use the TIERINDEX_S3_* / AWS_* already exported (e.g. the
#                  server scripts/test.sh started); missing ones fail.
#   file           a file:// store (no server).
#
# Prints the summary line (seed included); exits non-zero on any violation
# and keeps the directory for inspection (its path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-${TIERINDEX_OWNERSHIP_STEPS:-120}}
export TIERINDEX_OWNERSHIP_STEPS=$STEPS
if [ -n "${2:-}" ]; then export TIERINDEX_OWNERSHIP_SEED=$2; fi
KIND=${TIERINDEX_OWNERSHIP_KIND:-s3s}
run() {
  cargo test --test ownership_campaign -- --nocapture --test-threads=1
}
case "$KIND" in
  file)
    export TIERINDEX_OWNERSHIP_STORE=file
    run
    ;;
  external)
    export TIERINDEX_OWNERSHIP_STORE=s3
    if [ -z "${TIERINDEX_S3_ENDPOINT:-}" ]; then
      echo "ownership-campaign: TIERINDEX_OWNERSHIP_KIND=external but TIERINDEX_S3_ENDPOINT is not set" >&2
      exit 1
    fi
    run
    ;;
  *)
    export TIERINDEX_OWNERSHIP_STORE=s3
    export TIERINDEX_RUN=${TIERINDEX_RUN:-/tmp/tierindex-ownership-$$}
    cleanup() { bash scripts/s3-server.sh stop "$KIND" >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    envs=$(bash scripts/s3-server.sh start "$KIND") || {
      echo "ownership-campaign: the $KIND server did not start" >&2
      exit 1
    }
    eval "$envs"
    rc=0
    run || rc=$?
    exit "$rc"
    ;;
esac
