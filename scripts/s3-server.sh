#!/usr/bin/env bash
# Install, start and stop real S3-compatible servers for tierindex's tests.
#
#   scripts/s3-server.sh start  KIND     install if needed, start fresh, print env
#   scripts/s3-server.sh stop   KIND     stop exactly the PIDs this script started
#   scripts/s3-server.sh env    KIND     print `export` lines for a running server
#   scripts/s3-server.sh status KIND     exit 0 when running, 1 when not
#   scripts/s3-server.sh install KIND    install only (cached; never rebuilds)
#   scripts/s3-server.sh stop-node  garage-cluster|ceph N [--kill]   stop one node (1..3)
#   scripts/s3-server.sh start-node garage-cluster|ceph N            restart that node
#
# KIND: s3s | moto | garage | garage-cluster | ceph | minio
# (ceph: one mon, one mgr, three OSDs on sparse files, one RGW; "node N" is OSD
# N-1, and "node rgw" is the gateway, restarted on the same port)
#
# Typical use:   eval "$(scripts/s3-server.sh start garage)"
#
# stdout carries only the env lines; progress goes to stderr. Binaries are cached
# in ${TIERINDEX_CACHE:-$HOME/.cache/tierindex}; each start gets a fresh data dir
# in ${TIERINDEX_RUN:-/tmp/tierindex-s3}/KIND. Servers bind 127.0.0.1 only.
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 server not available on this machine
# (minio without a `minio` binary on PATH; ceph without its packages and
# neither root nor `sudo -n` to apt-get them).
set -euo pipefail

SCRIPT_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
LIB_DIR=$(dirname "$SCRIPT_PATH")/lib
CACHE=${TIERINDEX_CACHE:-$HOME/.cache/tierindex}
RUN=${TIERINDEX_RUN:-/tmp/tierindex-s3}
BUCKET=tierindex-test
# Bounded waits (seconds): a server that does not answer by then is an error.
START_TIMEOUT=${TIERINDEX_S3_START_TIMEOUT:-90}
STOP_TIMEOUT=${TIERINDEX_S3_STOP_TIMEOUT:-15}
# Python with boto3 (and moto for KIND=moto). A venv in the cache is used once
# pip refused the system interpreter (PEP 668 "externally managed" Pythons).
PY=${TIERINDEX_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$CACHE/pyvenv/bin/python" ]; then PY=$CACHE/pyvenv/bin/python; else PY=python3; fi
fi

S3S_VERSION=0.14.1 # 0.15+ needs a newer rustc than the machine's
GARAGE_VERSION=2.5.0
CLUSTER_NODES=3

log() { printf '[s3-server %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "ERROR: $1"
  exit "${2:-1}"
}

usage() {
  sed -n '2,24p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- helpers

probe() { "$PY" "$LIB_DIR/s3probe.py" "$@"; }

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

now() { date +%s; }

# Run "$@" until it succeeds or SECONDS_ pass; its output goes to the log.
retry_until() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$(($(now) + seconds))
  until "$@" >>"$LOGF" 2>&1; do
    if (($(now) >= deadline)); then
      die "timed out after ${seconds}s: $what (see $LOGF)"
    fi
    sleep 0.5
  done
}

with_lock() {
  # Serialise installs: two test runs must not build the same binary at once.
  local lock=$1
  shift
  mkdir -p "$CACHE"
  exec 9>"$lock"
  flock 9
  "$@"
  exec 9>&-
}

need_python() {
  if ! command -v "$PY" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing python3 + pip with apt-get"
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >&2
    else
      die "python3 not found and cannot install it; set TIERINDEX_PYTHON"
    fi
  fi
  if ! "$PY" -c 'import boto3' 2>/dev/null; then
    log "installing boto3 with pip"
    pip_install boto3 || die "pip install boto3 failed"
  fi
}

pip_install() { # packages...
  "$PY" -m pip install -q "$@" >&2 && return 0
  [ -z "${TIERINDEX_PYTHON:-}" ] && [ "$PY" = python3 ] || return 1
  log "pip refused $PY; installing into a virtualenv at $CACHE/pyvenv instead"
  mkdir -p "$CACHE"
  if ! python3 -m venv "$CACHE/pyvenv" >&2; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 || return 1
    python3 -m venv "$CACHE/pyvenv" >&2 || return 1
  fi
  PY=$CACHE/pyvenv/bin/python
  "$PY" -m pip install -q boto3 "$@" >&2
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
}

cargo_install() { # name version root features...
  local name=$1 version=$2 root=$3
  shift 3
  local t0
  t0=$(now)
  log "building $name $version into $root (one-time; later runs reuse it)"
  # Own target dir: never touch the project's target/ nor a CARGO_TARGET_DIR the
  # caller exported for the project; removed after a successful install.
  local build="$CACHE/build-$name" ilog="$CACHE/install-$name.log" pid rc=0
  CARGO_TARGET_DIR="$build" cargo install "$name@$version" --locked "$@" --root "$root" \
    >>"$ilog" 2>&1 &
  pid=$!
  # A background job ignores Ctrl-C in a script: stop the build if we exit.
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  trap 'exit 130' INT TERM
  # A heartbeat, so a build of several minutes does not look like a hang.
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    kill -0 "$pid" 2>/dev/null && log "still building $name ($(($(now) - t0))s): $(tail -n 1 "$ilog" | cut -c1-80)"
  done
  wait "$pid" || rc=$?
  trap - EXIT INT TERM
  [ "$rc" = 0 ] || die "cargo install $name failed (exit $rc); see $ilog"
  rm -rf "$build"
  local took=$(($(now) - t0))
  echo "$took" >"$root/INSTALL_SECONDS"
  log "built $name $version in ${took}s"
}

S3S_BIN="$CACHE/s3s-$S3S_VERSION/bin/s3s-fs"
GARAGE_BIN="$CACHE/garage-$GARAGE_VERSION/bin/garage"

install_s3s() {
  [ -x "$S3S_BIN" ] && return 0
  need_cargo
  with_lock "$CACHE/.lock-s3s" _install_s3s
}
_install_s3s() {
  [ -x "$S3S_BIN" ] && return 0 # another run finished it while we waited
  cargo_install s3s-fs "$S3S_VERSION" "$CACHE/s3s-$S3S_VERSION" --features binary
}

install_garage() {
  [ -x "$GARAGE_BIN" ] && return 0
  need_cargo
  with_lock "$CACHE/.lock-garage" _install_garage
}
_install_garage() {
  [ -x "$GARAGE_BIN" ] && return 0
  cargo_install garage "$GARAGE_VERSION" "$CACHE/garage-$GARAGE_VERSION" \
    --no-default-features --features bundled-libs,sqlite
}

install_moto() {
  need_python
  if "$PY" -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
    return 0
  fi
  local t0
  t0=$(now)
  log "installing moto[server] with pip"
  pip_install 'moto[server]' || die "pip install 'moto[server]' failed"
  log "installed moto[server] in $(($(now) - t0))s"
}

install_kind() {
  need_python
  case $1 in
  s3s) install_s3s ;;
  moto) install_moto ;;
  garage | garage-cluster) install_garage ;;
  ceph) install_ceph ;;
  minio) command -v minio >/dev/null 2>&1 || die "minio: no 'minio' binary on PATH; it cannot be installed here (no registry ships it). Install MinIO yourself or use another KIND." 3 ;;
  *) die "unknown KIND '$1' (s3s, moto, garage, garage-cluster, ceph, minio)" 2 ;;
  esac
}

# ---------------------------------------------------------------- processes
# The pid file has one line per process: ROLE PID MARKER. MARKER is a string that
# must appear in /proc/PID/cmdline, so a recycled PID is never signalled.

pidfile() { echo "$RUN/$1/pids"; }

cmdline_has() { # pid marker
  [ -r "/proc/$1/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"
}

pid_alive() { # pid marker
  [ "$1" != "-" ] && kill -0 "$1" 2>/dev/null && cmdline_has "$1" "$2"
}

# spawn KIND ROLE MARKER LOGFILE CMD...  -> appends to the pid file
spawn() {
  local kind=$1 role=$2 marker=$3 logf=$4
  shift 4
  # setsid: the server gets its own session, so it outlives this script and is
  # not hit by a Ctrl-C meant for the caller; stop is done by PID only.
  setsid "$@" >>"$logf" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  if ! kill -0 "$pid" 2>/dev/null; then
    # Say how it ended: a status above 128 is a signal (nothing of the
    # server's own reaches its log when it is killed before it starts one).
    local rc=0 how
    wait "$pid" 2>/dev/null || rc=$?
    if ((rc > 128)); then how="killed by signal $((rc - 128))"; else how="exit status $rc"; fi
    if ((rc == 28)); then
      how="$how: ENOSPC, its file system is full or below the server's free-space floor: $(df -h "$(dirname "$logf")" 2>/dev/null | tail -n 1)"
    fi
    tail -n 20 "$logf" >&2 || true
    die "$kind $role exited immediately ($how); log: $logf"
  fi
  set_pid "$kind" "$role" "$pid" "$marker"
}

set_pid() { # kind role pid marker
  local f tmp
  f=$(pidfile "$1")
  tmp="$f.tmp"
  if [ -f "$f" ]; then grep -v "^$2 " "$f" >"$tmp" || true; else : >"$tmp"; fi
  echo "$2 $3 $4" >>"$tmp"
  mv "$tmp" "$f"
}

stop_pid() { # pid marker signal
  local pid=$1 marker=$2 sig=${3:-TERM}
  if ! pid_alive "$pid" "$marker"; then
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
  local deadline=$(($(now) + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if (($(now) >= deadline)); then
      log "pid $pid ignored SIG$sig for ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
  done
}

rss_mb() { # pid -> resident set size in MB (0 when unknown)
  local kb
  kb=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null || true)
  echo $((${kb:-0} / 1024))
}

# Prints: "all", "some" or "none" (which recorded processes are alive).
alive_state() {
  local f n=0 up=0 role pid marker
  f=$(pidfile "$1")
  [ -f "$f" ] || {
    echo none
    return
  }
  while read -r role pid marker; do
    [ -n "$role" ] || continue
    n=$((n + 1))
    if pid_alive "$pid" "$marker"; then up=$((up + 1)); fi
  done <"$f"
  if ((n > 0 && up == n)); then
    echo all
  elif ((up > 0)); then
    echo some
  else
    echo none
  fi
}

do_stop() {
  local kind=$1 f role pid marker
  f=$(pidfile "$kind")
  if [ ! -f "$f" ]; then
    log "$kind: not running (no pid file)"
    return 0
  fi
  if [ "$kind" = ceph ]; then
    ceph_stop_all "$f"
    rm -f "$f" "$RUN/$kind/env"
    return 0
  fi
  while read -r role pid marker; do
    [ -n "$role" ] || continue
    if pid_alive "$pid" "$marker"; then
      stop_pid "$pid" "$marker" TERM
      log "$kind: stopped $role (pid $pid)"
    else
      log "$kind: $role (pid $pid) was not running; nothing signalled"
    fi
  done <"$f"
  rm -f "$f" "$RUN/$kind/env"
}

# ---------------------------------------------------------------- env output

write_env() { # kind endpoint region key secret [extra lines...]
  local kind=$1 endpoint=$2 region=$3 key=$4 secret=$5
  shift 5
  local f="$RUN/$kind/env"
  {
    printf 'export TIERINDEX_S3_KIND=%q\n' "$kind"
    printf 'export TIERINDEX_S3_ENDPOINT=%q\n' "$endpoint"
    printf 'export TIERINDEX_S3_BUCKET=%q\n' "$BUCKET"
    printf 'export TIERINDEX_S3_REGION=%q\n' "$region"
    printf 'export TIERINDEX_S3_ACCESS_KEY=%q\n' "$key"
    printf 'export TIERINDEX_S3_SECRET_KEY=%q\n' "$secret"
    printf 'export TIERINDEX_S3_SERVER_SCRIPT=%q\n' "$SCRIPT_PATH"
    local line
    for line in "$@"; do printf 'export %s\n' "$line"; done
    # Standard names, so the aws CLI, boto3 and object_store's from_env() work.
    printf 'export AWS_ACCESS_KEY_ID=%q\n' "$key"
    printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$secret"
    printf 'export AWS_REGION=%q\n' "$region"
    printf 'export AWS_DEFAULT_REGION=%q\n' "$region"
    printf 'export AWS_ENDPOINT_URL=%q\n' "$endpoint"
    printf 'export AWS_ENDPOINT=%q\n' "$endpoint"
    printf 'export AWS_ALLOW_HTTP=true\n'
  } >"$f.tmp"
  chmod 600 "$f.tmp"
  mv "$f.tmp" "$f"
}

# Load a running server's env into this shell (for the probe helper).
load_env() {
  local f="$RUN/$1/env"
  [ -f "$f" ] || die "$1: no env file at $f (is it started?)"
  # shellcheck disable=SC1090
  . "$f"
}

# Append the measured conditional-write behaviour to the env file.
record_conditional() {
  local kind=$1 out verdict
  out=$(probe cond) || die "$kind: conditional-write probe failed"
  verdict=${out%% *}
  log "$kind: conditional writes $out"
  # Each half on its own: Ceph RGW honours creates but not a quoted If-Match,
  # and tierindex's manifest needs only creates.
  local create update
  create=$(sed -n 's/.* create=\([a-z-]*\) .*/\1/p' <<<"$out")
  update=$(sed -n 's/.* update=\([a-z-]*\) .*/\1/p' <<<"$out")
  {
    echo "export TIERINDEX_S3_CONDITIONAL_WRITES=$verdict"
    echo "export TIERINDEX_S3_CONDITIONAL_CREATE=${create:?}"
    echo "export TIERINDEX_S3_CONDITIONAL_UPDATE=${update:?}"
  } >>"$RUN/$kind/env"
}

verify() { # kind
  load_env "$1"
  local out
  out=$(probe smoke "$START_TIMEOUT") || die "$1: smoke test failed"
  log "$1: $out"
  record_conditional "$1"
}

# ---------------------------------------------------------------- servers

fresh_dir() {
  local dir="$RUN/$1"
  case $dir in /*/*) ;; *) die "refusing to use run dir '$dir'" ;; esac
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "$dir"
}

start_s3s() {
  local dir port key secret
  dir=$(fresh_dir s3s)
  LOGF="$dir/server.log"
  port=$(probe ports 1)
  key=tierindex
  secret=$(hex 16)
  mkdir -p "$dir/root/$BUCKET" # s3s-fs: a bucket is a sub-folder of the root
  spawn s3s server "$dir/root" "$LOGF" "$S3S_BIN" --host 127.0.0.1 --port "$port" \
    --access-key "$key" --secret-key "$secret" "$dir/root"
  probe wait-http "http://127.0.0.1:$port/" "$START_TIMEOUT"
  write_env s3s "http://127.0.0.1:$port" us-east-1 "$key" "$secret"
}

start_moto() {
  local dir port py
  dir=$(fresh_dir moto)
  LOGF="$dir/server.log"
  port=$(probe ports 1)
  # Resolve the real interpreter so the recorded PID is python itself, not a shim.
  py=$("$PY" -c 'import sys; print(sys.executable)')
  spawn moto server "moto.server" "$LOGF" "$py" -m moto.server -H 127.0.0.1 -p "$port"
  probe wait-http "http://127.0.0.1:$port/moto-api/" "$START_TIMEOUT"
  write_env moto "http://127.0.0.1:$port" us-east-1 testing "moto-$(hex 8)"
  load_env moto
  probe ensure-bucket "$START_TIMEOUT" >>"$LOGF"
}

start_minio() {
  local dir port console user pass
  dir=$(fresh_dir minio)
  LOGF="$dir/server.log"
  read -r port console < <(probe ports 2)
  user=tierindex
  pass=$(hex 16)
  mkdir -p "$dir/data"
  spawn minio server "$dir/data" "$LOGF" env MINIO_ROOT_USER="$user" MINIO_ROOT_PASSWORD="$pass" \
    MINIO_BROWSER=off minio server --address "127.0.0.1:$port" \
    --console-address "127.0.0.1:$console" "$dir/data"
  probe wait-http "http://127.0.0.1:$port/minio/health/live" "$START_TIMEOUT"
  write_env minio "http://127.0.0.1:$port" us-east-1 "$user" "$pass"
  load_env minio
  probe ensure-bucket "$START_TIMEOUT" >>"$LOGF"
}

# --- garage

garage() { "$GARAGE_BIN" -c "$GCFG" "$@"; }

garage_config() { # file nodedir rf rpc s3 admin rpc_secret
  local f=$1 d=$2 rf=$3 rpc=$4 s3=$5 admin=$6 secret=$7
  mkdir -p "$d/meta" "$d/data"
  umask 077
  cat >"$f" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = $rf
consistency_mode = "consistent"
metadata_fsync = false
data_fsync = false

rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
bootstrap_peers = []

[s3_api]
api_bind_addr = "127.0.0.1:$s3"
s3_region = "garage"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(hex 32)"
metrics_token = "$(hex 32)"
EOF
  umask 022
}

garage_spawn_node() { # kind n
  local kind=$1 n=$2 d="$RUN/$1/node$2"
  RUST_LOG=${RUST_LOG:-garage=info} spawn "$kind" "node$n" "$d/garage.toml" "$d/server.log" \
    "$GARAGE_BIN" -c "$d/garage.toml" server
}

# Bring up N garage nodes with replication factor RF: config, start, connect,
# layout (one zone per node), bucket, key, permissions.
start_garage_common() { # kind nodes rf
  local kind=$1 nodes=$2 rf=$3 dir secret ports i n d
  dir=$(fresh_dir "$kind")
  LOGF="$dir/setup.log"
  secret=$(hex 32)
  read -r -a ports < <(probe ports $((3 * nodes)))
  : >"$dir/state"
  for ((n = 1; n <= nodes; n++)); do
    i=$(((n - 1) * 3))
    d="$dir/node$n"
    mkdir -p "$d"
    garage_config "$d/garage.toml" "$d" "$rf" "${ports[i]}" "${ports[i + 1]}" "${ports[i + 2]}" "$secret"
    echo "NODE${n}_S3=${ports[i + 1]} NODE${n}_RPC=${ports[i]} NODE${n}_ADMIN=${ports[i + 2]}" >>"$dir/state"
    garage_spawn_node "$kind" "$n"
  done
  GCFG="$dir/node1/garage.toml"
  retry_until "$START_TIMEOUT" "garage status on node 1" garage status
  local ids=()
  for ((n = 1; n <= nodes; n++)); do
    # A node writes its key when its server starts; only node 1 was waited
    # for above, so node n may not have one yet (seen in CI: "Unable to read
    # node key" on node 3). Retry until it answers.
    local id t0
    t0=$(now)
    until id=$("$GARAGE_BIN" -c "$dir/node$n/garage.toml" node id -q 2>>"$LOGF"); do
      (($(now) - t0 < START_TIMEOUT)) || die "garage node id failed on node $n (see $LOGF)"
      sleep 0.2
    done
    ids+=("${id%%@*}")
    echo "NODE${n}_PEER=$id" >>"$dir/state"
    if ((n > 1)); then
      retry_until "$START_TIMEOUT" "connect node 1 to node $n" garage node connect "$id"
    fi
  done
  if ((nodes > 1)); then
    # A restarted node only reconnects on the peers' slow retry timer (~1 min
    # seen here) unless it knows them: give each config the others as
    # bootstrap_peers (read at the next start-node).
    local peers
    for ((n = 1; n <= nodes; n++)); do
      peers=$(grep -o 'NODE[0-9]*_PEER=.*' "$dir/state" | grep -v "^NODE${n}_PEER=" |
        sed 's/^NODE[0-9]*_PEER=\(.*\)$/"\1"/' | paste -sd, -)
      sed -i "s|^bootstrap_peers = \[\]$|bootstrap_peers = [$peers]|" "$dir/node$n/garage.toml"
    done
  fi
  for ((n = 1; n <= nodes; n++)); do
    garage layout assign -z "dc$n" -c 1G "${ids[n - 1]}" >>"$LOGF" 2>&1 ||
      die "garage layout assign failed (see $LOGF)"
  done
  garage layout apply --version 1 >>"$LOGF" 2>&1 || die "garage layout apply failed (see $LOGF)"
  # Every node must see every other one, or stopping one node later can leave
  # the other two without a quorum between them.
  for ((n = nodes; n >= 1; n--)); do
    GCFG="$dir/node$n/garage.toml"
    retry_until "$START_TIMEOUT" "node $n to see $nodes healthy nodes" garage_healthy_at_least "$nodes"
  done
  retry_until "$START_TIMEOUT" "garage bucket create" garage bucket create "$BUCKET"
  # Garage key ids are GK + 24 hex digits, secrets 64 hex digits. Import our own
  # so the key output (which shows the secret) never has to be parsed or logged.
  local key secret_key
  key="GK$(hex 12)"
  secret_key=$(hex 32)
  garage key import --yes -n tierindex-test "$key" "$secret_key" >/dev/null 2>>"$LOGF" ||
    die "garage key import failed (see $LOGF)"
  garage bucket allow --read --write --owner "$BUCKET" --key "$key" >>"$LOGF" 2>&1 ||
    die "garage bucket allow failed (see $LOGF)"
  garage status >>"$LOGF" 2>&1 || true

  local extra=() eps=() s3port
  for ((n = 1; n <= nodes; n++)); do
    s3port=${ports[(n - 1) * 3 + 1]}
    eps+=("http://127.0.0.1:$s3port")
    probe wait-http "http://127.0.0.1:$s3port/" "$START_TIMEOUT"
  done
  if ((nodes > 1)); then
    extra+=("TIERINDEX_S3_NODES=$nodes")
    for ((n = 1; n <= nodes; n++)); do extra+=("TIERINDEX_S3_ENDPOINT_$n=${eps[n - 1]}"); done
    extra+=("TIERINDEX_S3_ENDPOINTS=$(
      IFS=,
      echo "${eps[*]}"
    )")
  fi
  write_env "$kind" "${eps[0]}" garage "$key" "$secret_key" "${extra[@]}"
}

start_garage() { start_garage_common garage 1 1; }
start_garage_cluster() { start_garage_common garage-cluster "$CLUSTER_NODES" 3; }

node_arg() { # kind n
  case $1 in
  garage-cluster | ceph) ;;
  *) die "stop-node/start-node only apply to garage-cluster and ceph" 2 ;;
  esac
  local max=$CLUSTER_NODES
  [ "$1" = ceph ] && max=$CEPH_OSDS
  if [ "$1" = ceph ] && [ "$2" = rgw ]; then
    [ -f "$(pidfile "$1")" ] || die "$1 is not running"
    return 0
  fi
  if ! [[ $2 =~ ^[1-9]$ ]] || (($2 > max)); then
    die "node must be 1..$max" 2
  fi
  [ -f "$(pidfile "$1")" ] || die "$1 is not running"
}

do_stop_node() { # kind n [--kill]
  node_arg "$1" "$2"
  local sig=TERM role pid marker
  [ "${3:-}" = --kill ] && sig=KILL
  if [ "$1" = ceph ]; then
    ceph_stop_node "$2" "$sig"
    return
  fi
  while read -r role pid marker; do
    if [ "$role" = "node$2" ]; then
      stop_pid "$pid" "$marker" "$sig"
      set_pid "$1" "$role" - "$marker"
      log "$1: node $2 stopped (SIG$sig)"
    fi
  done < <(cat "$(pidfile "$1")")
}

do_start_node() { # kind n
  node_arg "$1" "$2"
  local role pid marker port var
  if [ "$1" = ceph ]; then
    ceph_start_node "$2"
    return
  fi
  while read -r role pid marker; do
    if [ "$role" = "node$2" ] && pid_alive "$pid" "$marker"; then
      log "$1: node $2 already running (pid $pid)"
      return 0
    fi
  done < <(cat "$(pidfile "$1")")
  LOGF="$RUN/$1/setup.log"
  garage_spawn_node "$1" "$2"
  # shellcheck disable=SC1090 # written by start_garage_common: NODEn_S3=port ...
  . "$RUN/$1/state"
  var="NODE$2_S3"
  port=${!var}
  probe wait-http "http://127.0.0.1:$port/" "$START_TIMEOUT"
  GCFG="$RUN/$1/node$2/garage.toml"
  retry_until "$START_TIMEOUT" "garage status on node $2" garage status
  # Connect to every running peer now and wait until this node sees them all
  # healthy: before that, requests through any node can fail with "Could not
  # reach quorum" although only one node was ever down.
  # Each node keeps its own view, and a peer's view of the restarted node only
  # recovers on that peer's retry timer: connect in both directions and check
  # every running node's view.
  local m peer self_var="NODE$2_PEER" running=("$2")
  for ((m = 1; m <= CLUSTER_NODES; m++)); do
    ((m == $2)) && continue
    node_running "$1" "$m" || continue
    running+=("$m")
    var="NODE${m}_PEER"
    peer=${!var}
    retry_until "$START_TIMEOUT" "connect node $2 to node $m" garage node connect "$peer"
    GCFG="$RUN/$1/node$m/garage.toml"
    retry_until "$START_TIMEOUT" "connect node $m to node $2" garage node connect "${!self_var}"
    GCFG="$RUN/$1/node$2/garage.toml"
  done
  for m in "${running[@]}"; do
    GCFG="$RUN/$1/node$m/garage.toml"
    retry_until "$START_TIMEOUT" "node $m to see ${#running[@]} healthy nodes" \
      garage_healthy_at_least "${#running[@]}"
  done
  log "$1: node $2 started again; ${#running[@]} nodes see each other"
}

# Succeeds when every recorded process that is down is a node (nodeN), so
# `start` can bring the nodes back instead of starting from scratch.
only_nodes_down() { # kind
  local role pid marker
  while read -r role pid marker; do
    [ -n "$role" ] || continue
    case $role in node[0-9]* | rgw) continue ;; esac
    pid_alive "$pid" "$marker" || return 1
  done <"$(pidfile "$1")"
}

node_running() { # kind n
  local role pid marker
  while read -r role pid marker; do
    if [ "$role" = "node$2" ] && pid_alive "$pid" "$marker"; then return 0; fi
  done <"$(pidfile "$1")"
  return 1
}

# Succeeds when `garage status` (via $GCFG) lists at least N healthy nodes.
garage_healthy_at_least() {
  local healthy
  healthy=$(garage status 2>/dev/null | sed -n '/HEALTHY NODES/,/^$/p' | grep -cE '^[0-9a-f]{16} ' || true)
  echo "healthy nodes: $healthy"
  ((healthy >= $1))
}

# --- ceph
#
# A whole Ceph cluster on this host, from nothing, under $RUN/ceph only (no
# /etc/ceph, no systemd): one mon, one mgr, three bluestore OSDs on sparse
# files, one RGW (beast) on 127.0.0.1. Every command gets `-c $CEPH_CONF`.
# Facts this rests on (measured on Debian's 16.2.15; see docs/testing.md):
# - a single host needs osd_crush_chooseleaf_type = 0 before `ceph-mon --mkfs`
#   (the default CRUSH rule is made then), or a size-3 pool never gets clean;
# - `ceph-osd --mkfs --key S` does not write the OSD's keyring: we write it;
# - OSD failure reports are counted per host by default, so with one host an
#   OSD killed with SIGKILL would never be marked down: count per OSD.

CEPH_OSDS=3
CEPH_PKGS=(radosgw ceph-mon ceph-mgr ceph-osd ceph-common)
CEPH_BINS=(ceph ceph-authtool monmaptool ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin)
# The manager is not needed for S3 (it keeps PG statistics and health checks)
# and costs about 300 MB; TIERINDEX_CEPH_MGR=0 leaves it out.
CEPH_MGR=${TIERINDEX_CEPH_MGR:-1}
# Apparent size of each OSD's sparse block file; only written bytes use disk.
CEPH_OSD_BYTES=${TIERINDEX_CEPH_OSD_BYTES:-$((4 * 1024 * 1024 * 1024))}

ceph_installed() {
  local b
  for b in "${CEPH_BINS[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
}

# Root runs apt-get itself; elsewhere (a GitHub runner) passwordless sudo.
AS_ROOT=()
install_ceph() {
  ceph_installed && return 0
  if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then AS_ROOT=(sudo -n); fi
  if { [ "$(id -u)" != 0 ] && [ ${#AS_ROOT[@]} = 0 ]; } || ! command -v apt-get >/dev/null 2>&1; then
    die "ceph: packages missing, and no apt-get as root or with sudo -n; install them: apt-get install -y ${CEPH_PKGS[*]}" 3
  fi
  with_lock "$CACHE/.lock-apt" _install_ceph
}
_install_ceph() {
  ceph_installed && return 0
  local t0 ilog="$CACHE/install-ceph.log"
  t0=$(now)
  log "installing ${CEPH_PKGS[*]} with apt-get (one-time; about 30 s and 80 MB)"
  "${AS_ROOT[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq >>"$ilog" 2>&1 ||
    die "apt-get update failed; see $ilog"
  "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    "${CEPH_PKGS[@]}" >>"$ilog" 2>&1 || die "apt-get install ${CEPH_PKGS[*]} failed; see $ilog"
  ceph_installed || die "ceph: packages installed but a binary is missing (${CEPH_BINS[*]})"
  log "installed Ceph $(ceph --version 2>/dev/null | awk '{print $3}') in $(($(now) - t0))s"
}

CEPH_DIR=
CEPH_CONF=
ceph_paths() {
  CEPH_DIR="$RUN/ceph"
  CEPH_CONF="$CEPH_DIR/ceph.conf"
}

# The ceph CLI waits for a monitor for minutes by default: bound every call.
cephc() { timeout 30 ceph -c "$CEPH_CONF" --connect-timeout 20 "$@"; }

ceph_config() { # fsid mon_v2 mon_v1 rgw_port
  local fsid=$1 v2=$2 v1=$3 rgw=$4 d=$CEPH_DIR
  # \$cluster, \$name and \$id are Ceph's own metavariables, kept for Ceph.
  cat >"$CEPH_CONF" <<CONF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $d/keyring
run_dir = $d/run
admin_socket = $d/run/\$cluster-\$name.asok
pid_file = $d/run/\$cluster-\$name.pid
log_file = $d/log/\$cluster-\$name.log
mon_cluster_log_file = $d/log/\$cluster.log
log_to_stderr = false
err_to_stderr = true
crash_dir = $d/crash

# one host, three OSDs, small pools
osd_crush_chooseleaf_type = 0
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
mon_allow_pool_delete = true
# The monitor refuses to start (exit 28, ENOSPC, before its log opens) when
# its file system has no more than mon_data_avail_crit percent free. A test
# cluster holds a few MB: on a busy CI disk (build trees of tens of GB) the
# default floor stopped two CI runs; only a really full disk stops it now.
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_warn_on_pool_no_redundancy = false

# failure detection on one host: count reports per OSD, not per host
mon_osd_min_down_reporters = 1
mon_osd_reporter_subtree_level = osd
osd_heartbeat_interval = 2
osd_heartbeat_grace = 10

[mon]
mon_data = $d/mon/\$cluster-\$id

[mgr]
mgr_data = $d/mgr/\$cluster-\$id

[osd]
osd_data = $d/osd/\$cluster-\$id
keyring = $d/osd/\$cluster-\$id/keyring
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $CEPH_OSD_BYTES
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = 536870912

[client.rgw.a]
rgw_data = $d/rgw/\$cluster-\$id
rgw_frontends = beast endpoint=127.0.0.1:$rgw
rgw_thread_pool_size = 64
CONF
}

# Succeeds when the monitor sees at least N OSDs up.
ceph_osds_up_at_least() {
  local up
  up=$(cephc osd stat 2>/dev/null | sed -n 's/.* osds: \([0-9]*\) up.*/\1/p')
  echo "osds up: ${up:-?}"
  [ -n "$up" ] && ((up >= $1))
}

ceph_osd_state_is() { # id up|down
  cephc osd dump 2>/dev/null | grep -Eq "^osd\.$1 $2 "
}

ceph_spawn_osd() { # n (node number 1..3; OSD id n-1)
  local n=$1 id=$(($1 - 1))
  spawn ceph "node$n" "$CEPH_CONF" "$CEPH_DIR/log/osd.$id.out" \
    ceph-osd -c "$CEPH_CONF" -i "$id" -f
}

ceph_mgr_available() { cephc mgr stat 2>/dev/null | grep -q '"available": true'; }

start_ceph() {
  local dir fsid ports v2 v1 rgw n id uuid secret key secret_key t0
  dir=$(fresh_dir ceph)
  ceph_paths
  LOGF="$dir/setup.log"
  t0=$(now)
  mkdir -p "$dir"/{run,log,crash,mon/ceph-a,mgr/ceph-a,rgw/ceph-rgw.a}
  read -r v2 v1 rgw < <(probe ports 3)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  ceph_config "$fsid" "$v2" "$v1" "$rgw"
  echo "RGW_PORT=$rgw" >"$dir/state"

  # Keys: the monitor imports every entity of this keyring at mkfs.
  local kr="$dir/keyring"
  (
    umask 077
    ceph-authtool --create-keyring "$kr" --gen-key -n mon. --cap mon 'allow *'
    ceph-authtool "$kr" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
      --cap mgr 'allow *' --cap mds 'allow *'
    ceph-authtool "$kr" --gen-key -n mgr.a --cap mon 'allow profile mgr' --cap osd 'allow *' \
      --cap mds 'allow *'
    ceph-authtool "$kr" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' \
      --cap mgr 'allow rw'
  ) >>"$LOGF" 2>&1 || die "ceph-authtool failed (see $LOGF)"
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" \
    "$dir/monmap" >>"$LOGF" 2>&1 || die "monmaptool failed (see $LOGF)"
  ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$dir/monmap" --keyring "$kr" >>"$LOGF" 2>&1 ||
    die "ceph-mon --mkfs failed (see $LOGF)"
  spawn ceph mon "$CEPH_CONF" "$dir/log/mon.a.out" ceph-mon -c "$CEPH_CONF" -i a -f
  retry_until "$START_TIMEOUT" "ceph mon to answer" cephc mon stat
  log "ceph: mon up after $(($(now) - t0))s"
  if [ "$CEPH_MGR" = 1 ]; then
    spawn ceph mgr "$CEPH_CONF" "$dir/log/mgr.a.out" ceph-mgr -c "$CEPH_CONF" -i a -f
  fi

  # OSDs: register (the monitor picks ids 0, 1, 2 in a fresh cluster), make
  # the bluestore file devices in parallel, write each keyring, start.
  local pids=() ids=()
  for ((n = 1; n <= CEPH_OSDS; n++)); do
    uuid=$(cat /proc/sys/kernel/random/uuid)
    secret=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$secret" >"$dir/osd-new-$n.json"
    id=$(cephc osd new "$uuid" -i "$dir/osd-new-$n.json" 2>>"$LOGF") ||
      die "ceph osd new failed for node $n (see $LOGF)"
    rm -f "$dir/osd-new-$n.json"
    [ "$id" = $((n - 1)) ] || die "ceph osd new gave id '$id' for node $n, expected $((n - 1))"
    ids+=("$id")
    mkdir -p "$dir/osd/ceph-$id"
    (
      umask 077
      printf '[osd.%s]\n\tkey = %s\n' "$id" "$secret" >"$dir/osd/ceph-$id/keyring"
    )
    ceph-osd -c "$CEPH_CONF" -i "$id" --mkfs --osd-uuid "$uuid" --key "$secret" \
      >>"$dir/log/osd.$id.mkfs" 2>&1 &
    pids+=($!)
  done
  for ((n = 1; n <= CEPH_OSDS; n++)); do
    wait "${pids[n - 1]}" || die "ceph-osd --mkfs failed for osd.${ids[n - 1]} (see $dir/log/osd.${ids[n - 1]}.mkfs)"
    ceph_spawn_osd "$n"
  done
  retry_until "$START_TIMEOUT" "$CEPH_OSDS OSDs up" ceph_osds_up_at_least "$CEPH_OSDS"
  log "ceph: $CEPH_OSDS OSDs up after $(($(now) - t0))s"

  # RGW creates its pools on first start (size 3, min_size 2 by default above).
  spawn ceph rgw "$CEPH_CONF" "$dir/log/rgw.a.out" radosgw -c "$CEPH_CONF" -n client.rgw.a -f
  probe wait-http "http://127.0.0.1:$rgw/" "$START_TIMEOUT"
  log "ceph: rgw answers after $(($(now) - t0))s"
  key=$(hex 10 | tr 'a-f' 'A-F') # 20 characters, like an AWS access key id
  secret_key=$(hex 20)
  retry_until "$START_TIMEOUT" "radosgw-admin user create" timeout 30 \
    radosgw-admin -c "$CEPH_CONF" -n client.admin user create --uid tierindex \
    --display-name tierindex --access-key "$key" --secret "$secret_key"
  # radosgw-admin prints the user, secret included, into the log: scrub it.
  sed -i "s/$secret_key/<secret>/g" "$LOGF"
  if [ "$CEPH_MGR" = 1 ]; then
    retry_until "$START_TIMEOUT" "ceph mgr available" ceph_mgr_available
  fi
  write_env ceph "http://127.0.0.1:$rgw" us-east-1 "$key" "$secret_key" \
    "TIERINDEX_S3_NODES=$CEPH_OSDS"
  load_env ceph
  probe ensure-bucket "$START_TIMEOUT" >>"$LOGF"
  cephc osd pool ls detail >>"$LOGF" 2>&1 || true
}

ceph_start_rgw() {
  local role pid marker RGW_PORT
  while read -r role pid marker; do
    if [ "$role" = rgw ] && pid_alive "$pid" "$marker"; then
      log "ceph: rgw already running (pid $pid)"
      return 0
    fi
  done <"$(pidfile ceph)"
  # shellcheck disable=SC1091 # written by start_ceph: RGW_PORT=port
  . "$CEPH_DIR/state"
  spawn ceph rgw "$CEPH_CONF" "$CEPH_DIR/log/rgw.a.out" radosgw -c "$CEPH_CONF" -n client.rgw.a -f
  probe wait-http "http://127.0.0.1:$RGW_PORT/" "$START_TIMEOUT"
  log "ceph: rgw started again on port $RGW_PORT"
}

# Stop a Ceph cluster: everything but the monitor at once (an OSD that is
# told to stop reports itself down to the monitor), then the monitor.
ceph_stop_all() {
  local f=$1 role pid marker
  local -a pids=() markers=() roles=()
  while read -r role pid marker; do
    [ -n "$role" ] || continue
    [ "$role" = mon ] && continue
    if pid_alive "$pid" "$marker"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      markers+=("$marker")
      roles+=("$role")
    else
      log "ceph: $role (pid $pid) was not running; nothing signalled"
    fi
  done <"$f"
  local i
  for i in "${!pids[@]}"; do
    stop_pid "${pids[i]}" "${markers[i]}" TERM # already signalled: waits, then SIGKILL
    log "ceph: stopped ${roles[i]} (pid ${pids[i]})"
  done
  while read -r role pid marker; do
    [ "$role" = mon ] || continue
    if pid_alive "$pid" "$marker"; then
      stop_pid "$pid" "$marker" TERM
      log "ceph: stopped mon (pid $pid)"
    fi
  done <"$f"
}

ceph_stop_node() { # n|rgw sig
  local n=$1 sig=$2 id role pid marker want="node$1"
  ceph_paths
  LOGF="$CEPH_DIR/setup.log"
  [ "$n" = rgw ] && want=rgw
  while read -r role pid marker; do
    if [ "$role" = "$want" ]; then
      stop_pid "$pid" "$marker" "$sig"
      set_pid ceph "$role" - "$marker"
    fi
  done < <(cat "$(pidfile ceph)")
  if [ "$n" = rgw ]; then
    log "ceph: rgw stopped (SIG$sig)"
    return 0
  fi
  id=$((n - 1))
  # Return once the monitor knows. After SIGKILL the peers report the refused
  # connection at once (1.9 s here); the heartbeat grace (10 s) is the fallback.
  retry_until "$START_TIMEOUT" "osd.$id marked down" ceph_osd_state_is "$id" down
  log "ceph: node $n (osd.$id) stopped (SIG$sig) and marked down"
}

ceph_start_node() { # n|rgw
  local n=$1 id
  ceph_paths
  LOGF="$CEPH_DIR/setup.log"
  if [ "$n" = rgw ]; then
    ceph_start_rgw
    return
  fi
  id=$((n - 1))
  if node_running ceph "$n"; then
    log "ceph: node $n (osd.$id) already running"
    return 0
  fi
  ceph_spawn_osd "$n"
  retry_until "$START_TIMEOUT" "osd.$id up" ceph_osd_state_is "$id" up
  log "ceph: node $n (osd.$id) started again and up"
}

# ---------------------------------------------------------------- commands

STARTING=
on_start_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -n "$STARTING" ]; then
    log "$STARTING: start failed; stopping what was started"
    do_stop "$STARTING" || true
  fi
}

do_start() {
  local kind=$1 state t0
  mkdir -p "$RUN"
  state=$(alive_state "$kind")
  if [ "$state" = all ] && [ -f "$RUN/$kind/env" ]; then
    log "$kind: already running"
    cat "$RUN/$kind/env"
    return 0
  fi
  install_kind "$kind"
  if [ "$state" = some ] && { [ "$kind" = garage-cluster ] || [ "$kind" = ceph ]; } &&
    [ -f "$RUN/$kind/env" ] && only_nodes_down "$kind"; then
    local n
    for ((n = 1; n <= CLUSTER_NODES; n++)); do do_start_node "$kind" "$n"; done
    if [ "$kind" = ceph ]; then do_start_node ceph rgw; fi
    cat "$RUN/$kind/env"
    return 0
  fi
  [ "$state" = none ] || log "$kind: partly running; restarting from scratch"
  do_stop "$kind" 2>/dev/null
  # If the start fails half-way, stop whatever it had already started.
  STARTING=$kind
  trap on_start_exit EXIT
  t0=$(now)
  log "$kind: starting"
  case $kind in
  s3s) start_s3s ;;
  moto) start_moto ;;
  garage) start_garage ;;
  garage-cluster) start_garage_cluster ;;
  ceph) start_ceph ;;
  minio) start_minio ;;
  esac
  verify "$kind"
  trap - EXIT
  log "$kind: ready in $(($(now) - t0))s (logs: $RUN/$kind)"
  cat "$RUN/$kind/env"
}

do_env() {
  local kind=$1
  if [ "$(alive_state "$kind")" = none ] || [ ! -f "$RUN/$kind/env" ]; then
    die "$kind is not running; start it with: $SCRIPT_PATH start $kind"
  fi
  cat "$RUN/$kind/env"
}

do_status() {
  local kind=$1 state f role pid marker
  state=$(alive_state "$kind")
  f=$(pidfile "$kind")
  case $state in
  all) echo "$kind: running" ;;
  some) echo "$kind: partly running" ;;
  none) echo "$kind: not running" ;;
  esac
  if [ -f "$f" ]; then
    local rss total=0
    while read -r role pid marker; do
      if pid_alive "$pid" "$marker"; then
        rss=$(rss_mb "$pid")
        total=$((total + rss))
        echo "  $role pid $pid up, RSS $rss MB"
      else
        echo "  $role down"
      fi
    done <"$f"
    echo "  total RSS $total MB"
  fi
  [ -f "$RUN/$kind/env" ] && grep -E 'TIERINDEX_S3_(ENDPOINT|CONDITIONAL)' "$RUN/$kind/env" | sed 's/^export /  /'
  [ "$state" != none ]
}

main() {
  [ $# -ge 2 ] || usage
  local cmd=$1 kind=$2
  case $kind in
  s3s | moto | garage | garage-cluster | ceph | minio) ;;
  *) die "unknown KIND '$kind' (s3s, moto, garage, garage-cluster, ceph, minio)" 2 ;;
  esac
  LOGF=/dev/null
  case $cmd in
  start) do_start "$kind" ;;
  stop) do_stop "$kind" ;;
  env) do_env "$kind" ;;
  status) do_status "$kind" ;;
  install) install_kind "$kind" ;;
  stop-node) do_stop_node "$kind" "${3:-}" "${4:-}" ;;
  start-node) do_start_node "$kind" "${3:-}" ;;
  *) usage ;;
  esac
}

main "$@"
