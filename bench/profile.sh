#!/usr/bin/env bash
# A CPU profile of the gateway under the shared harness's load, one proxy core, as in
# bench/compare.sh: `perf record` attaches to the gateway while one scenario runs, then writes a
# breakdown by stage of a request, a flat profile and folded stacks (for a flame graph).
#
#   bench/profile.sh [--scenario sat|sat1tok|post|light] [--cache-bytes N] [--seconds S]
#                    [--fsync batch|always] [--quota memory|redis] [--out DIR] [--no-build]
#
# Defaults: scenario sat, verified-token cache off (0), 10 s of samples, audit batch, memory
# quotas, out bench/results/profile-<scenario>-<stamp>. Needs perf (linux-perf) and what
# bench/compare.sh needs. Loopback only; every process started is stopped by the harness.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
export BENCH_STATE=${BENCH_STATE:-$ROOT/target/bench-state}
SCENARIO=sat CACHE=0 SECONDS_=10 FSYNC=batch QUOTA=memory OUT="" BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) SCENARIO=$2; shift ;;
    --cache-bytes) CACHE=$2; shift ;;
    --seconds) SECONDS_=$2; shift ;;
    --fsync) FSYNC=$2; shift ;;
    --quota) QUOTA=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
[ "$BUILD" = 1 ] && (cd "$ROOT" && cargo build --release --locked)
GW=$ROOT/target/release/greenhouse-gateway
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/bench/results/profile-$SCENARIO-$STAMP}
mkdir -p "$OUT"
PORT=28190
SLOT="GW_BIN=$GW GW_TOKEN_CACHE_BYTES=$CACHE GW_FSYNC=$FSYNC GW_QUOTA=$QUOTA bash $BENCH_DIR/gateway/run-gateway.sh"
# One rep, long enough for the warm-up plus the samples; no idle-connection probe.
(cd "$BENCH_DIR" && python3 run.py --reps 1 --targets gw-profile --scenarios "$SCENARIO" \
  --duration $((SECONDS_ + 6)) --warmup 2 --idle-conns 0 --quiet-wait 5 \
  --path /v1/partner/jobs --post-path /v1/partner/candidates --post-body candidate.json \
  --echo-path /v1/partner/current_user \
  --gateway "gw-profile|$PORT|rs256|$SLOT" --out "$OUT/harness") > "$OUT/harness.log" 2>&1 &
harness=$!
trap 'kill $harness 2>/dev/null || true' EXIT
# The measured cell starts after the sanity checks and the warm-up: wait for the port, then for
# wrk to be running against it.
for _ in $(seq 600); do
  pid=$(pgrep -f "greenhouse-gateway serve --config $BENCH_STATE/gw-$PORT/" | head -1 || true)
  [ -n "$pid" ] && pgrep -x wrk >/dev/null && break
  sleep 0.1
done
[ -n "${pid:-}" ] || { echo "the gateway did not start; see $OUT/harness.log" >&2; exit 1; }
sleep 4
perf record -F 499 -g --call-graph dwarf,16384 -p "$pid" -o "$OUT/perf.data" -- sleep "$SECONDS_" 2>"$OUT/perf-record.log"
wait $harness || true
perf report -i "$OUT/perf.data" --no-children --stdio --percent-limit 0.3 --sort symbol \
  -g none 2>/dev/null | sed -e 's/ *$//' | cut -c1-200 > "$OUT/flat.txt"
perf script -i "$OUT/perf.data" 2>/dev/null | python3 "$ROOT/bench/fold.py" > "$OUT/folded.txt"
rm -f "$OUT/perf.data"
{ grep -h "^rep" "$OUT/harness.log" || true; python3 "$ROOT/bench/breakdown.py" "$OUT/folded.txt"; } > "$OUT/breakdown.txt"
gzip -9f "$OUT/folded.txt"
cat "$OUT/breakdown.txt"
echo "profile in $OUT (breakdown.txt, flat.txt, folded.txt.gz; zcat folded.txt.gz | inferno-flamegraph > flame.svg)"
