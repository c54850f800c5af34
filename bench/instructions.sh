#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind: a same-machine A/B that
# the machine's noise does not move (on a shared VM the harness's CPU per request varies 10-20 %
# between repetitions; an instruction count is the same for the same binary and inputs).
#
#   bench/instructions.sh [--requests N] [--path P] [--keep DIR] BIN [BIN...]
#
# For each binary: the shared harness's gateway slot (full configuration, audit `batch`, memory
# quotas, verified-token cache off, so every request checks an RS256 signature) runs under
# `valgrind --tool=callgrind` in front of the harness's upstream nginx; 200 requests warm it up,
# the counters are zeroed, N requests (default 2000, 4 connections, h2load) are counted, and the
# totals are dumped. Prints instructions per request for each binary and the ratio to the first.
# With --keep, each binary's dump is kept as DIR/callgrind.<n>.out (`callgrind_annotate` reads it).
# The count covers every thread of the gateway (workers, audit writer, timers), not the kernel.
# Needs valgrind, h2load (nghttp2-client), nginx and the harness's state (BENCH_STATE, as for
# bench/compare.sh: `bash ../shared/bench/setup.sh` and `python3 ../shared/bench/gen_keys.py`).
# Loopback only; stops everything it starts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
export BENCH_STATE=${BENCH_STATE:-$ROOT/target/bench-state}
N=2000 REQ_PATH=/v1/partner/jobs KEEP="" BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) N=$2; shift ;;
    --path) REQ_PATH=$2; shift ;;
    --keep) KEEP=$2; mkdir -p "$KEEP"; shift ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) BINS+=("$(realpath "$1")") ;;
  esac
  shift
done
[ ${#BINS[@]} -gt 0 ] || { echo "usage: $0 [--requests N] [--path P] BIN [BIN...]" >&2; exit 2; }
for tool in valgrind callgrind_control h2load nginx; do
  command -v $tool >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done
[ -f "$BENCH_STATE/token.rs256" ] || { echo "no harness state in $BENCH_STATE (gen_keys.py)" >&2; exit 1; }

WORK=$(mktemp -d)
UP_PORT=28380 PORT=28390
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The harness's upstream (its template, on a port of its own).
sed -e "s#@RUN@#$WORK#g" -e "s#@UPSTREAM_PORT@#$UP_PORT#g" "$BENCH_DIR/conf/upstream-nginx.conf" \
  > "$WORK/upstream.conf"
grep -q "listen 127.0.0.1:$UP_PORT" "$WORK/upstream.conf" || { echo "upstream template changed" >&2; exit 1; }
nginx -p "$WORK" -e "$WORK/nginx.err" -c "$WORK/upstream.conf" &
pids+=($!)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
TOKEN=$(cat "$BENCH_STATE/token.rs256")
load() {
  h2load --h1 -n "$1" -c 4 -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT$REQ_PATH" \
    > "$WORK/h2load.out"
  grep -q "$1 succeeded, 0 failed, 0 errored" "$WORK/h2load.out" && grep -q "status codes: $1 2xx" "$WORK/h2load.out" \
    || { echo "not every request succeeded:" >&2; cat "$WORK/h2load.out" >&2; exit 1; }
}

first="" n=0
for bin in "${BINS[@]}"; do
  cat > "$WORK/gw" <<SH
#!/usr/bin/env bash
if [ "\$1" = serve ]; then
  exec valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.%p --dump-instr=no "$bin" "\$@"
fi
exec "$bin" "\$@"
SH
  chmod +x "$WORK/gw"
  port_open $PORT && { echo "port $PORT is already taken" >&2; exit 1; }
  BENCH_PORT=$PORT BENCH_LISTEN=127.0.0.1:$PORT BENCH_UPSTREAM_URL=http://127.0.0.1:$UP_PORT \
    BENCH_JWKS=$BENCH_STATE/jwks.json BENCH_JWT_ISS=https://idp.bench.invalid BENCH_JWT_AUD=api-gateway \
    BENCH_UPSTREAM_BEARER=$(cat "$BENCH_STATE/upstream_bearer") BENCH_AUDIT_FILE=$WORK/audit.log \
    GW_BIN=$WORK/gw GW_TOKEN_CACHE_BYTES=0 setsid bash "$BENCH_DIR/gateway/run-gateway.sh" \
    > "$WORK/slot.log" 2>&1 &
  slot=$!
  pids+=($slot)
  for _ in $(seq 600); do port_open $PORT && break; sleep 0.2; done
  port_open $PORT || { echo "the gateway did not start:" >&2; tail -20 "$WORK/slot.log" >&2; exit 1; }
  load 200
  callgrind_control -z > /dev/null
  load "$N"
  callgrind_control -d > /dev/null
  sleep 1
  total=$(cat "$WORK"/cg.*.* 2>/dev/null | awk '/^summary:/ {s += $2} END {print s + 0}')
  [ "$total" -gt 0 ] || { echo "no callgrind dump" >&2; exit 1; }
  n=$((n + 1))
  [ -n "$KEEP" ] && cat "$WORK"/cg.*.* > "$KEEP/callgrind.$n.out"
  per=$((total / N))
  [ -z "$first" ] && first=$per
  awk -v b="$bin" -v p="$per" -v f="$first" \
    'BEGIN {printf "%-50s %12d instructions/request  %.3fx\n", b, p, p / f}'
  kill -- -"$slot" 2>/dev/null || true
  wait "$slot" 2>/dev/null || true
  for _ in $(seq 150); do pgrep -f "callgrind-out-file=$WORK/" > /dev/null || break; sleep 0.2; done
  rm -f "$WORK"/cg.* "$WORK/audit.log"
done
