#!/usr/bin/env bash
# Whole-proxy load bench: the gateway against the sandbox called directly, in the same run.
#
#   bench/load.sh [--out DIR] [--duration SECS] [--reps N] [--connections N] [--no-build] [--keep]
#
# Run by hand (not part of `cargo test` or CI). Loopback only; every wrk run is bounded by -d;
# every process this script starts is stopped by its PID when it exits (trap), however it exits.
# See bench/README.md for what the rows mean and a measured table.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
BIN="$ROOT/target/release/greenhouse-gateway"

OUT_DIR=/tmp/greenhouse-gateway-bench
DURATION=5          # seconds per wrk run
REPS=3              # repetitions; the table shows medians
CONNS=64            # the throughput shape; the latency shape is always 1 connection
WARMUP=2            # seconds of warm-up per target before the first rep
BUILD=1
KEEP=0

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT_DIR=${2:?--out needs a directory}; shift 2 ;;
        --duration) DURATION=${2:?}; shift 2 ;;
        --reps) REPS=${2:?}; shift 2 ;;
        --connections) CONNS=${2:?}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option: $1" >&2; usage 2 ;;
    esac
done
for n in "$DURATION" "$REPS" "$CONNS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "--duration, --reps and --connections take positive integers" >&2; exit 2; }
done

log() { printf '[load.sh] %s\n' "$*" >&2; }
die() { printf '\n[load.sh] ERROR: %s\n\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- process bookkeeping

PIDS=()       # long-running children: sandbox, gateways
WRK_PID=""    # the wrk run in progress, if any
WORK=""

stop_pid() {  # TERM, up to 10 s grace (the gateway flushes its audit trail), then KILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

forget_pid() {
    local pid=$1 p keep=()
    for p in ${PIDS[@]+"${PIDS[@]}"}; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=(${keep[@]+"${keep[@]}"})
}

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    [[ -n $WRK_PID ]] && stop_pid "$WRK_PID"
    for p in ${PIDS[@]+"${PIDS[@]}"}; do stop_pid "$p"; done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 || $rc != 0 ]]; then
            log "logs, rendered configs and audit trails kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools and build

if ! command -v wrk >/dev/null 2>&1; then
    log "wrk not found: installing it from Debian (apt-get install -y wrk)"
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y wrk >/dev/null 2>&1 ||
        { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; } ||
        die "could not install wrk; install it yourself (Debian/Ubuntu: apt-get install wrk)"
fi
command -v curl >/dev/null 2>&1 || die "curl is required"

if [[ $BUILD == 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN not found (run without --no-build)"
"$BIN" sandbox --help 2>/dev/null | grep -q -- '--rate-limit' ||
    die "$BIN has no 'sandbox --rate-limit'; rebuild it"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ghgw-bench.XXXXXX")
mkdir -p "$WORK/raw"

# ---------------------------------------------------------------- ports

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {  # sandbox, gateway (batch) + admin, gateway (always) + admin, free together
    local off p ok
    for off in 0 100 200 300 400 500 600 700 800 900; do
        ok=1
        for p in $((18089 + off)) $((18080 + off)) $((19090 + off)) $((18081 + off)) $((19091 + off)); do
            if port_busy "$p"; then ok=0; break; fi
        done
        if [[ $ok == 1 ]]; then
            SB_PORT=$((18089 + off)) GW_PORT=$((18080 + off)) GW_ADMIN=$((19090 + off))
            GWA_PORT=$((18081 + off)) GWA_ADMIN=$((19091 + off))
            return 0
        fi
    done
    die "no free set of ports found around 18080-19991"
}
pick_ports
SB="http://127.0.0.1:$SB_PORT"
log "ports: sandbox $SB_PORT, gateway $GW_PORT (admin $GW_ADMIN), gateway fsync=always $GWA_PORT (admin $GWA_ADMIN)"

# ---------------------------------------------------------------- start the processes

wait_http() {  # url pid what: wait up to 30 s for a 200 while pid lives
    local url=$1 pid=$2 what=$3 i code
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$what exited during start-up; see $WORK/*.log: $(tail -5 "$WORK"/*.log 2>/dev/null)"
        code=$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    die "$what not ready after 30 s ($url answered $code)"
}

"$BIN" sandbox --listen "127.0.0.1:$SB_PORT" --rate-limit 0 >"$WORK/sandbox.log" 2>&1 &
SB_PID=$!
PIDS+=("$SB_PID")
wait_http "$SB/.well-known/openid-configuration" "$SB_PID" "sandbox"

render() {  # name fsync listen_port admin_port -> rendered config dir
    local dir="$WORK/gw-$1" f
    mkdir -p "$dir/teams"
    local -a subst=(-e "s|@SANDBOX_ORIGIN@|$SB|g" -e "s|@LISTEN_ADDR@|127.0.0.1:$3|g"
        -e "s|@ADMIN_ADDR@|127.0.0.1:$4|g" -e "s|@AUDIT_FSYNC@|$2|g")
    sed "${subst[@]}" "$BENCH/gateway.toml" >"$dir/gateway.toml"
    for f in "$BENCH"/teams/*.toml; do sed "${subst[@]}" "$f" >"$dir/teams/$(basename "$f")"; done
    "$BIN" check --config "$dir/gateway.toml" >"$dir/check.txt" 2>&1 ||
        die "the rendered bench config does not check:$(printf '\n'; cat "$dir/check.txt")"
    echo "$dir"
}

start_gateway() {  # name fsync port admin -> sets LAST_PID
    local dir
    dir=$(render "$1" "$2" "$3" "$4")
    "$BIN" serve --config "$dir/gateway.toml" >"$WORK/gateway-$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_http "http://127.0.0.1:$4/readyz" "$LAST_PID" "gateway ($1)"
}
start_gateway batch batch "$GW_PORT" "$GW_ADMIN"
GW_PID=$LAST_PID
start_gateway always always "$GWA_PORT" "$GWA_ADMIN"
GWA_PID=$LAST_PID

# ---------------------------------------------------------------- the caller token

TOKEN=$(curl -sS --max-time 5 -X POST -H 'Content-Type: application/json' \
    -d '{"claims":{"sub":"svc-bench","aud":"greenhouse-gateway"},"lifetime_secs":3600}' \
    "$SB/_sandbox/mint" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
[[ -n $TOKEN ]] || die "could not mint a caller token from $SB/_sandbox/mint"

# ---------------------------------------------------------------- scenarios

OBO=sourcing.bot@example.com
BASIC="Basic $(printf 'dev-partner-key:' | base64)"
BEARER="Bearer $TOKEN"
BODY="$BENCH/candidate.json"

# name | what it is | url | method | Authorization | On-Behalf-Of | body | baseline | gateway pid
SCENARIOS=(
    "get-direct|GET jobs, direct to sandbox|$SB/v1/partner/jobs|GET|$BASIC|$OBO||-|"
    "get-gw|GET jobs, gateway (audit fsync=batch)|http://127.0.0.1:$GW_PORT/v1/partner/jobs|GET|$BEARER|||get-direct|$GW_PID"
    "get-gw-always|GET jobs, gateway (audit fsync=always)|http://127.0.0.1:$GWA_PORT/v1/partner/jobs|GET|$BEARER|||get-direct|$GWA_PID"
    "post-direct|POST candidate 1.1 KB, direct to sandbox|$SB/v1/partner/candidates|POST|$BASIC|$OBO|$BODY|-|"
    "post-gw|POST candidate 1.1 KB, gateway (validated, fsync=batch)|http://127.0.0.1:$GW_PORT/v1/partner/candidates|POST|$BEARER||$BODY|post-direct|$GW_PID"
)

# Parses one scenario into S_NAME S_DESC S_URL S_METHOD S_AUTH S_OBO S_BODY S_BASE S_GWPID.
load_scenario() {
    IFS='|' read -r S_NAME S_DESC S_URL S_METHOD S_AUTH S_OBO S_BODY S_BASE S_GWPID <<<"$1"
}

# One request per scenario with curl first: the right status, and the gateway really forwards.
for s in "${SCENARIOS[@]}"; do
    load_scenario "$s"
    expect=200
    [[ $S_METHOD == POST ]] && expect=201
    args=(-sS --max-time 10 -o "$WORK/sanity-$S_NAME.body" -D "$WORK/sanity-$S_NAME.head"
        -w '%{http_code}' -X "$S_METHOD" -H "Authorization: $S_AUTH")
    [[ -n $S_OBO ]] && args+=(-H "On-Behalf-Of: $S_OBO")
    [[ -n $S_BODY ]] && args+=(-H 'Content-Type: application/json' --data-binary "@$S_BODY")
    code=$(curl "${args[@]}" "$S_URL" || true)
    [[ $code == "$expect" ]] ||
        die "sanity check $S_NAME ($S_METHOD $S_URL): expected $expect, got $code: $(head -c 400 "$WORK/sanity-$S_NAME.body")"
    if [[ $S_NAME == *-gw* ]]; then
        grep -qi '^x-request-id:' "$WORK/sanity-$S_NAME.head" || die "sanity check $S_NAME: no X-Request-Id"
    fi
done
if curl -sS --max-time 10 "$SB/_sandbox/requests" | grep -qF "$TOKEN"; then
    die "the sandbox received the caller's JWT: the gateway is not replacing Authorization"
fi
log "sanity checks passed (GET 200, POST 201 on every path; caller JWT not forwarded)"

# ---------------------------------------------------------------- running wrk

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
FAILURES=()

# run_cell scenario-line shape conns threads secs rep
run_cell() {
    load_scenario "$1"
    local shape=$2 conns=$3 threads=$4 secs=$5 rep=$6
    local out="$WORK/raw/$S_NAME-$shape-r$rep.txt" sb0 sb1 gw0=0 gw1=0 rc=0
    sb0=$(cpu_ticks "$SB_PID")
    [[ -n $S_GWPID ]] && gw0=$(cpu_ticks "$S_GWPID")
    BENCH_METHOD=$S_METHOD BENCH_AUTH=$S_AUTH BENCH_OBO=$S_OBO BENCH_BODY_FILE=$S_BODY \
        wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 10s --latency \
        -s "$BENCH/wrk.lua" "$S_URL" >"$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    sb1=$(cpu_ticks "$SB_PID")
    [[ -n $S_GWPID ]] && gw1=$(cpu_ticks "$S_GWPID")
    [[ $rc == 0 ]] || die "wrk failed ($rc) for $S_NAME $shape rep $rep: $(cat "$out")"
    local line
    line=$(grep '^BENCH ' "$out") || die "no BENCH line from wrk for $S_NAME: $(cat "$out")"
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
    local reqs rps p50 p99 p999 non2xx sockerr
    reqs=$(get requests) rps=$(get rps) p50=$(get p50_us) p99=$(get p99_us) p999=$(get p999_us)
    non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9][0-9]*\).*/\1/p' "$out")
    non2xx=${non2xx:-0}
    sockerr=$(($(get err_connect) + $(get err_read) + $(get err_write) + $(get err_timeout)))
    if [[ $non2xx != 0 || $sockerr != 0 || $(get err_status) != 0 || $reqs == 0 ]]; then
        FAILURES+=("$S_NAME $shape rep $rep: $reqs requests, $non2xx non-2xx, $sockerr socket errors ($out)")
        log "!!! $S_NAME $shape rep $rep: $non2xx non-2xx responses, $sockerr socket errors"
    fi
    # CPU µs per request, from /proc utime+stime of the process over the run
    local sbcpu gwcpu=""
    sbcpu=$(awk -v t=$((sb1 - sb0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n }')
    [[ -n $S_GWPID ]] && gwcpu=$(awk -v t=$((gw1 - gw0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n }')
    [[ $rep == warmup ]] && return 0
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$S_NAME" "$rep" "$rps" "$p50" "$p99" \
        "$p999" "$non2xx" "$sockerr" "${gwcpu:--}" "${sbcpu:--}" "$reqs" >>"$RESULTS"
    log "$(printf '%-14s %-4s rep %s: %9.0f req/s  p50 %6s µs  p99 %6s µs  non-2xx %s' "$S_NAME" "$shape" "$rep" "$rps" "$p50" "$p99" "$non2xx")"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
TOTAL=$(( (${#SCENARIOS[@]} * (2 * REPS) * DURATION) + ${#SCENARIOS[@]} * WARMUP ))
log "running ${#SCENARIOS[@]} scenarios x 2 shapes x $REPS reps x ${DURATION}s (about $((TOTAL / 60 + 1)) min)"

for s in "${SCENARIOS[@]}"; do run_cell "$s" warm "$CONNS" 2 "$WARMUP" warmup; done
for ((rep = 1; rep <= REPS; rep++)); do
    for s in "${SCENARIOS[@]}"; do run_cell "$s" lat 1 1 "$DURATION" "$rep"; done
    for s in "${SCENARIOS[@]}"; do run_cell "$s" sat "$CONNS" 2 "$DURATION" "$rep"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- after the load

peak_rss() { awk '/^VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$1/status"; }
RSS_NOTE="peak RSS: sandbox $(peak_rss "$SB_PID"), gateway batch $(peak_rss "$GW_PID"), gateway always $(peak_rss "$GWA_PID")"
audit_records() { curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk '/^gateway_audit_records_total/ {print $2}'; }
AUDIT_NOTE="audit records (metrics): batch $(audit_records "$GW_ADMIN"), always $(audit_records "$GWA_ADMIN")"

# Stop the gateways gracefully (flushes the trails), then verify both hash chains.
VERIFY_NOTE=""
for v in batch:"$GW_PID" always:"$GWA_PID"; do
    name=${v%%:*} pid=${v#*:}
    stop_pid "$pid"
    forget_pid "$pid"
    if verdict=$("$BIN" audit verify "$WORK/gw-$name/audit/audit.jsonl" 2>&1); then
        VERIFY_NOTE+="audit verify ($name): $(head -1 <<<"$verdict"); "
    else
        FAILURES+=("audit verify ($name) failed: $(head -3 <<<"$verdict")")
    fi
done

# ---------------------------------------------------------------- the table

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/$TS.md"
cp "$RESULTS" "$OUT_DIR/$TS.tsv"

describe() { local s; for s in "${SCENARIOS[@]}"; do load_scenario "$s"; printf '%s\t%s\t%s\n' "$S_NAME" "$S_BASE" "$S_DESC"; done; }

{
    echo "## greenhouse-gateway load bench, $START"
    echo
    echo "- commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) (plus any uncommitted changes); $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); $(uname -sr)"
    echo "- $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); ${DURATION}s per run, $REPS reps, medians; latency shape: 1 connection (wrk -t1 -c1), throughput shape: $CONNS connections (wrk -t2 -c$CONNS); everything on loopback, no pinning"
    echo "- load average before $LOAD_BEFORE, after $LOAD_AFTER"
    echo "- $RSS_NOTE; $AUDIT_NOTE"
    echo "- ${VERIFY_NOTE%; }"
    echo
    awk -F'\t' -v conns="$CONNS" '
        function median(s,   a, n, i, j, t) {
            n = split(s, a, " ")
            for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            if (n == 0) return ""
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        function add(k, v) { V[k] = (k in V) ? V[k] " " v : v }
        FILENAME == ARGV[1] { order[++norder] = $1; base[$1] = $2; desc[$1] = $3; next }
        {
            shape = $1; name = $2; rep = $3
            R[shape, name, rep] = $4; P50[shape, name, rep] = $5; P99[shape, name, rep] = $6
            add(shape SUBSEP name SUBSEP "rps", $4); add(shape SUBSEP name SUBSEP "p50", $5)
            add(shape SUBSEP name SUBSEP "p99", $6); add(shape SUBSEP name SUBSEP "p999", $7)
            if ($10 != "-") add(shape SUBSEP name SUBSEP "gwcpu", $10)
            add(shape SUBSEP name SUBSEP "sbcpu", $11)
            bad[shape, name] += $8 + $9
            reps[shape, name] = reps[shape, name] " " rep
        }
        END {
            print "### Added latency: 1 connection, closed loop (medians)"
            print ""
            print "| scenario | req/s | p50 µs | p99 µs | p99.9 µs | **+p50 µs** vs direct | **+p99 µs** vs direct | gateway CPU µs/req | sandbox CPU µs/req | non-2xx + socket errors |"
            print "|---|---|---|---|---|---|---|---|---|---|"
            row("lat")
            print ""
            print "### Throughput: " conns " connections, closed loop (medians)"
            print ""
            print "| scenario | req/s | **× direct** (median of per-rep ratios) | per-rep ratios | p50 ms | p99 ms | gateway CPU µs/req | sandbox CPU µs/req | non-2xx + socket errors |"
            print "|---|---|---|---|---|---|---|---|---|"
            row("sat")
        }
        function row(shape,   i, name, b, n, r, k, ratios, dp50, dp99, list, cell) {
            for (i = 1; i <= norder; i++) {
                name = order[i]; b = base[name]
                if (!((shape SUBSEP name SUBSEP "rps") in V)) continue
                ratios = ""; dp50 = ""; dp99 = ""; list = ""
                n = split(substr(reps[shape, name], 2), r, " ")
                for (k = 1; k <= n; k++) {
                    if (b == "-" || !((shape, b, r[k]) in R)) continue
                    ratios = ratios (ratios == "" ? "" : " ") R[shape, name, r[k]] / R[shape, b, r[k]]
                    list = list (list == "" ? "" : ", ") sprintf("%.2f", R[shape, name, r[k]] / R[shape, b, r[k]])
                    dp50 = dp50 (dp50 == "" ? "" : " ") P50[shape, name, r[k]] - P50[shape, b, r[k]]
                    dp99 = dp99 (dp99 == "" ? "" : " ") P99[shape, name, r[k]] - P99[shape, b, r[k]]
                }
                cell = "| " desc[name] " | " sprintf("%.0f", median(V[shape, name, "rps"]))
                if (shape == "lat") {
                    cell = cell " | " median(V[shape, name, "p50"]) " | " median(V[shape, name, "p99"]) " | " median(V[shape, name, "p999"])
                    cell = cell " | " (b == "-" ? "0 (baseline)" : sprintf("%+d", median(dp50))) " | " (b == "-" ? "0 (baseline)" : sprintf("%+d", median(dp99)))
                } else {
                    cell = cell " | " (b == "-" ? "1.00 (baseline)" : sprintf("**%.2f**", median(ratios))) " | " (b == "-" ? "" : list)
                    cell = cell " | " sprintf("%.2f", median(V[shape, name, "p50"]) / 1000) " | " sprintf("%.2f", median(V[shape, name, "p99"]) / 1000)
                }
                cell = cell " | " (((shape SUBSEP name SUBSEP "gwcpu") in V) ? sprintf("%.1f", median(V[shape, name, "gwcpu"])) : "-")
                cell = cell " | " sprintf("%.1f", median(V[shape, name, "sbcpu"])) " | " bad[shape, name] + 0 " |"
                print cell
            }
        }
    ' <(describe) "$RESULTS"
    if [[ ${#FAILURES[@]} -gt 0 ]]; then
        echo
        echo "**FAILED**:"
        for f in "${FAILURES[@]}"; do echo "- $f"; done
    fi
} >"$REPORT"

echo
cat "$REPORT"
echo
log "report: $REPORT (raw per-rep numbers: $OUT_DIR/$TS.tsv)"

if [[ ${#FAILURES[@]} -gt 0 ]]; then
    printf '\n[load.sh] FAILED: %d problem(s) under load:\n' "${#FAILURES[@]}" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    KEEP=1
    exit 1
fi
