#!/usr/bin/env bash
# System calls and context switches per request, the gateway beside a proxy of the shared
# harness, one proxy core: runs one harness cell per target and attaches `perf trace -s`
# (per-syscall counts) and `perf stat` (context switches) to the proxy for a few seconds while
# wrk runs; requests in that window are the lines its access/audit file gained.
#
#   bench/syscalls.sh [--scenario sat|sat1tok|post] [--seconds S] [--target gateway|haproxy-jwt-log]...
#
# Defaults: scenario sat, 5 s, targets gateway (cache off, audit batch) and haproxy-jwt-log.
# GW_BIN picks the gateway binary (default target/release/greenhouse-gateway), for a before/after.
# Prints one table per target and writes it to bench/results/syscalls-<scenario>-<stamp>.txt.
# Tracing slows the proxy down (perf trace by about a third), so read the counts per request,
# not the rates. Needs perf and what bench/compare.sh needs. Loopback only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
export BENCH_STATE=${BENCH_STATE:-$ROOT/target/bench-state}
SCENARIO=sat SECONDS_=5 TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) SCENARIO=$2; shift ;;
    --seconds) SECONDS_=$2; shift ;;
    --target) TARGETS+=("$2"); shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(gateway haproxy-jwt-log)
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
GW=${GW_BIN:-$ROOT/target/release/greenhouse-gateway}
[ -x "$GW" ] || { echo "build first: cargo build --release --locked" >&2; exit 1; }
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=$ROOT/bench/results/syscalls-$SCENARIO-$STAMP.txt
RUN=$BENCH_STATE/run
PORT=28190
SLOT="GW_BIN=$GW GW_TOKEN_CACHE_BYTES=0 bash $BENCH_DIR/gateway/run-gateway.sh"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for target in "${TARGETS[@]}"; do
  case "$target" in
    gateway) name=gw-syscalls; pattern=" serve --config $BENCH_STATE/gw-$PORT/"
      extra=(--gateway "gw-syscalls|$PORT|rs256|$SLOT") ;;
    haproxy-jwt-log) name=haproxy-jwt-log; pattern="haproxy -db -f $RUN/haproxy-jwt-log.cfg"; extra=() ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  (cd "$BENCH_DIR" && python3 run.py --reps 1 --targets "$name" --scenarios "$SCENARIO" \
    --duration $((SECONDS_ + 6)) --warmup 2 --idle-conns 0 --quiet-wait 5 \
    --path /v1/partner/jobs --post-path /v1/partner/candidates --post-body candidate.json \
    --echo-path /v1/partner/current_user "${extra[@]}" --out "$TMP/harness-$name") \
    > "$TMP/$name.log" 2>&1 &
  harness=$!
  pid=""
  for _ in $(seq 600); do
    pid=$(pgrep -f "$pattern" | head -1 || true)
    [ -n "$pid" ] && pgrep -x wrk >/dev/null && break
    sleep 0.1
  done
  [ -n "$pid" ] || { echo "$target did not start; see $TMP/$name.log" >&2; cat "$TMP/$name.log" >&2; exit 1; }
  sleep 3
  lines0=$(wc -l < "$RUN/$name.audit.log")
  perf stat -e context-switches,cpu-migrations -p "$pid" -o "$TMP/stat-$name.txt" -- sleep "$SECONDS_" &
  stat=$!
  perf trace -s -p "$pid" -o "$TMP/trace-$name.txt" -- sleep "$SECONDS_" >/dev/null 2>&1 || true
  wait $stat || true
  lines1=$(wc -l < "$RUN/$name.audit.log")
  wait $harness || true
  reqs=$((lines1 - lines0))
  {
    label=$target
    [ "$target" = gateway ] && label="gateway $GW"
    echo "== $label ($SCENARIO, $SECONDS_ s traced): $reqs requests"
    awk -v n="$reqs" '/context-switches|cpu-migrations/ { gsub(",", "", $1); printf "%-20s %10d  %6.2f per request\n", $2, $1, $1 / n }' "$TMP/stat-$name.txt"
    # perf trace -s: per thread, "syscall calls errors total min avg max stddev"; summed per syscall.
    awk -v n="$reqs" '
      $1 ~ /^[a-z_0-9]+$/ && $2 ~ /^[0-9]+$/ && NF >= 8 { calls[$1] += $2; ms[$1] += $4; all += $2 }
      END {
        for (s in calls) printf "%-20s %10d  %6.2f per request  %8.1f ms\n", s, calls[s], calls[s] / n, ms[s] | "sort -k2 -nr"
        close("sort -k2 -nr")
        printf "%-20s %10d  %6.2f per request\n", "all syscalls", all, all / n
      }' "$TMP/trace-$name.txt"
    echo
  } | tee -a "$REPORT"
done
echo "written to $REPORT"
