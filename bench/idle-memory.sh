#!/usr/bin/env bash
# Private memory (USS) of the gateway process alone, started in the shared harness's gateway slot
# (../shared/bench/gateway/run-gateway.sh: its full configuration, verified-token cache off) and
# left idle, with no request: anonymous memory and the binary's own pages, from
# /proc/PID/smaps. The harness's own memory figures count the slot's whole process tree, which
# also holds run-gateway.sh's bash and its Python OAuth token stub.
#
#   bench/idle-memory.sh [--starts N] [--wait SECONDS]      (GW_BIN: the binary to measure)
#
# Needs the harness's keys in $BENCH_STATE (default target/bench-state; see bench/README.md).
# Loopback only; every process it starts is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
export BENCH_STATE=${BENCH_STATE:-$ROOT/target/bench-state}
BIN=$(readlink -f "${GW_BIN:-$ROOT/target/release/greenhouse-gateway}")
STARTS=2
WAIT=5
while [ $# -gt 0 ]; do
  case "$1" in
    --starts) STARTS=$2; shift ;;
    --wait) WAIT=$2; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release --locked, or set GW_BIN)" >&2; exit 1; }
[ -f "$BENCH_STATE/jwks.json" ] || { echo "no $BENCH_STATE/jwks.json: run the harness's gen_keys.py with BENCH_STATE set (bench/README.md)" >&2; exit 1; }
WORK=$(mktemp -d)
slot=""
cleanup() { [ -n "$slot" ] && kill -- -"$slot" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
echo "binary: $BIN"
for i in $(seq "$STARTS"); do
  port=$((28290 + i))
  BENCH_PORT=$port BENCH_LISTEN=127.0.0.1:$port BENCH_UPSTREAM_URL=http://127.0.0.1:9 \
    BENCH_JWKS=$BENCH_STATE/jwks.json BENCH_UPSTREAM_BEARER=$(cat "$BENCH_STATE/upstream_bearer") \
    BENCH_JWT_ISS=https://idp.bench.invalid BENCH_JWT_AUD=api-gateway BENCH_AUDIT_FILE=$WORK/audit-$i.log \
    GW_BIN=$BIN GW_TOKEN_CACHE_BYTES=0 setsid bash "$BENCH_DIR/gateway/run-gateway.sh" >"$WORK/slot-$i.log" 2>&1 &
  slot=$!
  sleep "$WAIT"
  pid=""
  for c in $(pgrep -P "$slot" || true); do
    [ "$(readlink -f /proc/"$c"/exe 2>/dev/null)" = "$BIN" ] && pid=$c
  done
  [ -n "$pid" ] || { echo "the gateway did not start:" >&2; cat "$WORK/slot-$i.log" >&2; exit 1; }
  awk -v start="$i" '/^Anonymous:/ { a += $2 } /^Private_(Clean|Dirty):/ { u += $2 }
    END { printf "start %d: USS %.1f MiB (anonymous %.1f MiB, the binary and other files %.1f MiB)\n", start, u / 1024, a / 1024, (u - a) / 1024 }' "/proc/$pid/smaps"
  kill -- -"$slot" 2>/dev/null || true
  wait "$slot" 2>/dev/null || true
  slot=""
done
