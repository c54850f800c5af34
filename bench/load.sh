#!/usr/bin/env bash
# Whole-proxy load bench: the gateway against the sandbox called directly, in the same run.
#
#   bench/load.sh [--out DIR] [--duration SECS] [--reps N] [--connections N] [--no-pin]
#                 [--no-build] [--keep]
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
WARMUP=2            # seconds of warm-up per target at the start of every rep
BUILD=1
KEEP=0
PIN=1               # latency shape: wrk, sandbox and gateways all on CPU 0 (see bench/README.md)

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT_DIR=${2:?--out needs a directory}; shift 2 ;;
        --duration) DURATION=${2:?}; shift 2 ;;
        --reps) REPS=${2:?}; shift 2 ;;
        --connections) CONNS=${2:?}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-pin) PIN=0; shift ;;
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
if [[ $PIN == 1 ]] && ! command -v taskset >/dev/null 2>&1; then
    log "taskset not found (util-linux): the latency shape runs unpinned"
    PIN=0
fi
ALL_CPUS="0-$(($(nproc) - 1))"

if [[ $BUILD == 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN not found (run without --no-build)"
"$BIN" sandbox --help 2>/dev/null | grep -q -- '--rate-limit' ||
    die "$BIN has no 'sandbox --rate-limit'; rebuild it"

# The sandbox keeps the candidates it creates in memory (the newest 100,000, ~10 KB of RSS each,
# so up to ~1 GB) and its POST handler slows down as that store grows. So the whole stack
# (sandbox, both gateways, a fresh caller token) is started anew for every rep: each rep starts
# from an empty store, and every rep is alike.
mem_avail_mb() { awk '/^MemAvailable/ {print int($2 / 1024)}' /proc/meminfo; }
[[ $(mem_avail_mb) -ge 2048 ]] ||
    die "the sandbox may need ~1.5 GiB for the candidates it stores; only $(mem_avail_mb) MiB available"

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

# ---------------------------------------------------------------- the stack

wait_http() {  # url pid what: wait up to 30 s for a 200 while pid lives
    local url=$1 pid=$2 what=$3 i code=""
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$what exited during start-up; see the logs in $WORK"
        code=$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    die "$what not ready after 30 s ($url answered $code)"
}

render() {  # dir fsync listen_port admin_port: the bench config with the placeholders filled in
    local dir=$1 f
    mkdir -p "$dir/teams"
    local -a subst=(-e "s|@SANDBOX_ORIGIN@|$SB|g" -e "s|@LISTEN_ADDR@|127.0.0.1:$3|g"
        -e "s|@ADMIN_ADDR@|127.0.0.1:$4|g" -e "s|@AUDIT_FSYNC@|$2|g")
    sed "${subst[@]}" "$BENCH/gateway.toml" >"$dir/gateway.toml"
    for f in "$BENCH"/teams/*.toml; do sed "${subst[@]}" "$f" >"$dir/teams/$(basename "$f")"; done
    "$BIN" check --config "$dir/gateway.toml" >"$dir/check.txt" 2>&1 ||
        die "the rendered bench config does not check:$(printf '\n'; cat "$dir/check.txt")"
}

start_gateway() {  # dir fsync port admin -> sets LAST_PID
    render "$@"
    "$BIN" serve --config "$1/gateway.toml" >"$1/gateway.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_http "http://127.0.0.1:$4/readyz" "$LAST_PID" "gateway ($2)"
}

# name | what it is | url | method | Authorization | On-Behalf-Of | body | baseline | gateway pid
load_scenario() {
    IFS='|' read -r S_NAME S_DESC S_URL S_METHOD S_AUTH S_OBO S_BODY S_BASE S_GWPID <<<"$1"
}

OBO=sourcing.bot@example.com
BASIC="Basic $(printf 'dev-partner-key:' | base64)"
BODY="$WORK/candidate.json"   # a valid 1,146-byte PartnerCandidate (validation path)
cat >"$BODY" <<'JSON'
{"external_id":"bench-candidate-000001","first_name":"Alexandra","last_name":"Example-Benchmark","company":"Northwind Traders International","title":"Principal Software Engineer, Distributed Systems and Developer Platforms","emails":[{"value":"alexandra.example@example.com","type":"personal"},{"value":"a.example@work.example.org","type":"work"}],"phone_numbers":[{"value":"+1 415 555 0100","type":"mobile"},{"value":"+1 415 555 0199","type":"work"}],"social_media_addresses":[{"value":"https://www.linkedin.com/in/alexandra-example-benchmark"},{"value":"https://github.com/alexandra-example"},{"value":"https://alexandra.example.dev/about"}],"application":{"job_id":7001,"initial_stage_id":1,"source_id":42,"referrer":{"type":"email","value":"sourcing.bot@example.com"}},"attachments":[{"filename":"alexandra-example-resume-2026.pdf","type":"resume","url":"https://files.example.com/resumes/alexandra-example-resume-2026.pdf","content_type":"application/pdf"},{"filename":"alexandra-example-cover-letter.pdf","type":"cover_letter","url":"https://files.example.com/letters/alexandra-example-cover-letter.pdf","content_type":"application/pdf"}]}
JSON

start_stack() {  # rep: sandbox, two gateways, token, SCENARIOS, sanity checks
    local rep=$1 dir="$WORK/rep$1" s expect code
    mkdir -p "$dir"
    pick_ports
    SB="http://127.0.0.1:$SB_PORT"
    log "rep $rep: sandbox :$SB_PORT, gateway :$GW_PORT (admin :$GW_ADMIN), gateway fsync=always :$GWA_PORT (admin :$GWA_ADMIN)"

    "$BIN" sandbox --listen "127.0.0.1:$SB_PORT" --rate-limit 0 >"$dir/sandbox.log" 2>&1 &
    SB_PID=$!
    PIDS+=("$SB_PID")
    wait_http "$SB/.well-known/openid-configuration" "$SB_PID" "sandbox"
    start_gateway "$dir/gw-batch" batch "$GW_PORT" "$GW_ADMIN"
    GW_PID=$LAST_PID
    start_gateway "$dir/gw-always" always "$GWA_PORT" "$GWA_ADMIN"
    GWA_PID=$LAST_PID

    TOKEN=$(curl -sS --max-time 5 -X POST -H 'Content-Type: application/json' \
        -d '{"claims":{"sub":"svc-bench","aud":"greenhouse-gateway"},"lifetime_secs":3600}' \
        "$SB/_sandbox/mint" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
    [[ -n $TOKEN ]] || die "could not mint a caller token from $SB/_sandbox/mint"
    local bearer="Bearer $TOKEN"

    SCENARIOS=(
        "get-direct|GET jobs, direct to sandbox|$SB/v1/partner/jobs|GET|$BASIC|$OBO||-|"
        "get-gw|GET jobs, gateway (audit fsync=batch)|http://127.0.0.1:$GW_PORT/v1/partner/jobs|GET|$bearer|||get-direct|$GW_PID"
        "get-gw-always|GET jobs, gateway (audit fsync=always)|http://127.0.0.1:$GWA_PORT/v1/partner/jobs|GET|$bearer|||get-direct|$GWA_PID"
        "post-direct|POST candidate 1.1 KB, direct to sandbox|$SB/v1/partner/candidates|POST|$BASIC|$OBO|$BODY|-|"
        "post-gw|POST candidate 1.1 KB, gateway (validated, fsync=batch)|http://127.0.0.1:$GW_PORT/v1/partner/candidates|POST|$bearer||$BODY|post-direct|$GW_PID"
    )

    # One request per scenario with curl first: the right status, and the gateway really forwards.
    for s in "${SCENARIOS[@]}"; do
        load_scenario "$s"
        expect=200
        [[ $S_METHOD == POST ]] && expect=201
        local -a args=(-sS --max-time 10 -o "$dir/sanity-$S_NAME.body" -D "$dir/sanity-$S_NAME.head"
            -w '%{http_code}' -X "$S_METHOD" -H "Authorization: $S_AUTH")
        [[ -n $S_OBO ]] && args+=(-H "On-Behalf-Of: $S_OBO")
        [[ -n $S_BODY ]] && args+=(-H 'Content-Type: application/json' --data-binary "@$S_BODY")
        code=$(curl "${args[@]}" "$S_URL" || true)
        [[ $code == "$expect" ]] ||
            die "sanity check $S_NAME ($S_METHOD $S_URL): expected $expect, got $code: $(head -c 400 "$dir/sanity-$S_NAME.body")"
        if [[ $S_NAME == *-gw* ]]; then
            grep -qi '^x-request-id:' "$dir/sanity-$S_NAME.head" || die "sanity check $S_NAME: no X-Request-Id"
        fi
    done
    if curl -sS --max-time 10 "$SB/_sandbox/requests" | grep -qF "$TOKEN"; then
        die "the sandbox received the caller's JWT: the gateway is not replacing Authorization"
    fi
}

peak_rss_mb() { awk '/^VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
audit_records() { curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk '/^gateway_audit_records_total/ {print $2}'; }

stop_stack() {  # rep: gateways first (graceful: the trails are flushed), verify both chains
    local rep=$1 v name pid admin verdict n verified=1
    PEAK_SB+=("$(peak_rss_mb "$SB_PID")")
    PEAK_GW+=("$(peak_rss_mb "$GW_PID")/$(peak_rss_mb "$GWA_PID")")
    for v in "batch:$GW_PID:$GW_ADMIN" "always:$GWA_PID:$GWA_ADMIN"; do
        IFS=: read -r name pid admin <<<"$v"
        n=$(audit_records "$admin" || true)
        AUDIT_COUNT[$name]=$((${AUDIT_COUNT[$name]:-0} + ${n:-0}))
        stop_pid "$pid"
        forget_pid "$pid"
        if verdict=$("$BIN" audit verify "$WORK/rep$rep/gw-$name/audit/audit.jsonl" 2>&1); then
            VERIFIED[$name]="${VERIFIED[$name]:-}${VERIFIED[$name]:+, }$(head -1 <<<"$verdict" | sed 's/^OK: //')"
        else
            FAILURES+=("rep $rep: audit verify ($name) failed: $(head -3 <<<"$verdict")")
            verified=0
        fi
    done
    stop_pid "$SB_PID"
    forget_pid "$SB_PID"
    # The rep's audit trails are large (~700 bytes per request); keep them with --keep or when a
    # chain did not verify.
    [[ $KEEP == 1 || $verified == 0 ]] || rm -rf "$WORK/rep$rep/gw-batch/audit" "$WORK/rep$rep/gw-always/audit"
}

pin_stack() {  # cpus: move every thread of the sandbox and both gateways
    local p
    for p in "$SB_PID" "$GW_PID" "$GWA_PID"; do
        taskset -a -p -c "$1" "$p" >/dev/null || die "taskset -a -p -c $1 $p failed"
    done
}

PEAK_SB=()
PEAK_GW=()
declare -A AUDIT_COUNT=() VERIFIED=()

# ---------------------------------------------------------------- running wrk

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null || echo; } | awk '{print $12 + $13}'; }

alive_or_die() {  # every process of the stack must still be running
    local p
    for p in "$SB_PID" "$GW_PID" "$GWA_PID"; do
        kill -0 "$p" 2>/dev/null ||
            die "process $p ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || echo 'sandbox or gateway')) is gone mid-run (crashed, or killed from outside: another session's pkill?); logs in $WORK"
    done
}

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
    local -a pin=()
    [[ $PIN == 1 && $shape == lat ]] && pin=(taskset -c 0)
    BENCH_METHOD=$S_METHOD BENCH_AUTH=$S_AUTH BENCH_OBO=$S_OBO BENCH_BODY_FILE=$S_BODY \
        ${pin[@]+"${pin[@]}"} wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 10s --latency \
        -s "$BENCH/wrk.lua" "$S_URL" >"$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    alive_or_die
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
    [[ $(mem_avail_mb) -ge 1024 ]] ||
        die "less than 1 GiB of memory left (sandbox RSS $(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$SB_PID/status") MiB); stopping"
    [[ $rep == warmup* ]] && return 0
    # Little's law: a closed loop keeps exactly $conns requests in flight, so req/s x mean latency
    # must come out at (at most) $conns. wrk's histogram sometimes breaks this on a busy box: its
    # recorded latencies then add up to more than the run's wall time, and its tail is unreliable.
    local little
    little=$(awk -v r="$rps" -v m="$(get mean_us)" -v c="$conns" 'BEGIN { printf "%.2f", r * m / 1e6 / c }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$S_NAME" "$rep" "$rps" "$p50" "$p99" \
        "$p999" "$non2xx" "$sockerr" "${gwcpu:--}" "${sbcpu:--}" "$reqs" "$little" >>"$RESULTS"
    log "$(printf '%-14s %-4s rep %s: %9.0f req/s  p50 %6s µs  p99 %6s µs  non-2xx %s' "$S_NAME" "$shape" "$rep" "$rps" "$p50" "$p99" "$non2xx")"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
NSCEN=5
TOTAL=$((REPS * (NSCEN * (2 * DURATION + WARMUP) + 5)))
log "running $NSCEN scenarios x 2 shapes x $REPS reps x ${DURATION}s (about $((TOTAL / 60 + 1)) min)"

# Within a shape the direct cells run first, so a baseline never directly follows a gateway cell
# (a cell after a gateway cell sometimes got bogus wrk tail latencies; see the † note).
RUN_ORDER=(0 3 1 2 4)   # get-direct, post-direct, get-gw, get-gw-always, post-gw

SAT_THREADS=$((CONNS < 2 ? CONNS : 2))

for ((rep = 1; rep <= REPS; rep++)); do
    start_stack "$rep"
    for i in "${RUN_ORDER[@]}"; do run_cell "${SCENARIOS[$i]}" warm "$CONNS" "$SAT_THREADS" "$WARMUP" "warmup$rep"; done
    [[ $PIN == 1 ]] && pin_stack 0
    for i in "${RUN_ORDER[@]}"; do run_cell "${SCENARIOS[$i]}" lat 1 1 "$DURATION" "$rep"; done
    [[ $PIN == 1 ]] && pin_stack "$ALL_CPUS"
    for i in "${RUN_ORDER[@]}"; do run_cell "${SCENARIOS[$i]}" sat "$CONNS" "$SAT_THREADS" "$DURATION" "$rep"; done
    stop_stack "$rep"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

RSS_NOTE="peak RSS per rep: sandbox ${PEAK_SB[*]} MiB; gateway batch/always ${PEAK_GW[*]} MiB"
AUDIT_NOTE="audit records (gateway metrics, all reps): batch ${AUDIT_COUNT[batch]:-0}, always ${AUDIT_COUNT[always]:-0}"
VERIFY_NOTE="audit verify per rep: batch OK ${VERIFIED[batch]:-none}; always OK ${VERIFIED[always]:-none}"

# ---------------------------------------------------------------- the table

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/$TS.md"
cp "$RESULTS" "$OUT_DIR/$TS.tsv"
cp -r "$WORK/raw" "$OUT_DIR/$TS-wrk"

describe() { local s; for s in "${SCENARIOS[@]}"; do load_scenario "$s"; printf '%s\t%s\t%s\n' "$S_NAME" "$S_BASE" "$S_DESC"; done; }

{
    echo "## greenhouse-gateway load bench, $START"
    echo
    echo "- commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) (plus any uncommitted changes); $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); $(uname -sr)"
    echo "- $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); ${DURATION}s per run, $REPS reps (a fresh sandbox + gateways per rep, ${WARMUP}s warm-up per target), medians; latency shape: 1 connection (wrk -t1 -c1)$([[ $PIN == 1 ]] && echo ", wrk + sandbox + gateways pinned to CPU 0" || echo ", unpinned"), throughput shape: $CONNS connections (wrk -t$SAT_THREADS -c$CONNS, unpinned); everything on loopback"
    echo "- load average before $LOAD_BEFORE, after $LOAD_AFTER"
    echo "- $RSS_NOTE; $AUDIT_NOTE"
    echo "- $VERIFY_NOTE"
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
            if ($13 + 0 > 1.10) { dagger[shape, name] = "†"; anydagger = 1 }
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
            if (anydagger) {
                print ""
                print "† in at least one rep, wrk'"'"'s recorded latencies of this cell added up to more than 1.10 x (connections x wall time), which a closed loop cannot do (Little'"'"'s law): its tail percentiles are unreliable there (req/s is a plain count and is not affected; p50 barely moves)."
            }
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
                    cell = cell " | " median(V[shape, name, "p50"]) " | " median(V[shape, name, "p99"]) dagger[shape, name] " | " median(V[shape, name, "p999"]) dagger[shape, name]
                    cell = cell " | " (b == "-" ? "0 (baseline)" : sprintf("%+d", median(dp50))) " | " (b == "-" ? "0 (baseline)" : sprintf("%+d", median(dp99)) ((dagger[shape, name] dagger[shape, b]) != "" ? "†" : ""))
                } else {
                    cell = cell " | " (b == "-" ? "1.00 (baseline)" : sprintf("**%.2f**", median(ratios))) " | " (b == "-" ? "" : list)
                    cell = cell " | " sprintf("%.2f", median(V[shape, name, "p50"]) / 1000) " | " sprintf("%.2f", median(V[shape, name, "p99"]) / 1000) dagger[shape, name]
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
log "report: $REPORT (per-rep numbers: $OUT_DIR/$TS.tsv, wrk output: $OUT_DIR/$TS-wrk/)"

if [[ ${#FAILURES[@]} -gt 0 ]]; then
    printf '\n[load.sh] FAILED: %d problem(s) under load:\n' "${#FAILURES[@]}" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    KEEP=1
    exit 1
fi
