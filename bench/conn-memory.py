#!/usr/bin/env python3
"""Memory per idle keep-alive connection of the gateway process alone.

Starts the gateway in the shared harness's slot (../shared/bench/gateway/run-gateway.sh: its full
configuration, verified-token cache off) in front of a small upstream in a process of its own
that answers every request 200 with `[]`, warms it up with 200 connections, then opens N more
keep-alive connections, each after one authenticated GET that the upstream answers, and holds
them. Prints the gateway process's anonymous memory (settled: see `settled`) before and with
them, and the difference per connection. Takes about 30 s.

    python3 bench/conn-memory.py [--conns N] [--heaptrack FILE]

GW_BIN: the binary (default target/release/greenhouse-gateway). --heaptrack FILE runs the gateway
under heaptrack and stops it while the connections are held, so `heaptrack_print --print-leaks 1
FILE.zst` lists what they hold (heaptrack does not see mimalloc: build with
`--features system-allocator` for it). Needs the harness's keys in $BENCH_STATE (default
target/bench-state; see bench/README.md). Loopback only; every process it starts is stopped.
"""
import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.environ.get("BENCH_DIR", os.path.join(ROOT, "..", "shared", "bench"))
STATE = os.environ.setdefault("BENCH_STATE", os.path.join(ROOT, "target", "bench-state"))
PORT, UPSTREAM_PORT = 28490, 28477


def anon_kib(pid: int) -> int:
    with open("/proc/%d/smaps" % pid) as f:
        return sum(int(l.split()[1]) for l in f if l.startswith("Anonymous:"))


async def upstream(reader, writer):
    body = b"[]"
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def one_request_then_hold(token: str, held: list, sem: asyncio.Semaphore):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", PORT)
        w.write(("GET /v1/partner/jobs HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n\r\n"
                 % token).encode())
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit("the gateway answered %r" % head.split(b"\r\n")[0])
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:"))
        await r.readexactly(length)
        held.append(w)


async def measure(pid: int, n: int, token: str) -> tuple:
    sem = asyncio.Semaphore(100)
    warm = []
    await asyncio.gather(*[one_request_then_hold(token, warm, sem) for _ in range(200)])
    before = await settled(pid)
    held = []
    await asyncio.gather(*[one_request_then_hold(token, held, sem) for _ in range(n)])
    return before, await settled(pid), warm + held


async def settled(pid: int) -> int:
    """Anonymous memory after at least 12 s, once it has not moved for 3 s (at most 40 s): after
    a burst, freed pages go back to the system and the runtime's idle blocking threads exit
    (after 10 s) with their stacks, either of which would otherwise land in one reading and not
    the other."""
    readings = []
    for _ in range(80):
        readings.append(anon_kib(pid))
        if len(readings) >= 24 and len(set(readings[-6:])) == 1:
            break
        await asyncio.sleep(0.5)
    return readings[-1]


def gateway_pid(slot: subprocess.Popen, binary: str, deadline: float) -> int:
    while time.time() < deadline:
        out = subprocess.run(["pgrep", "-s", str(slot.pid), "-f", binary + " serve"],
                             capture_output=True, text=True).stdout.split()
        for pid in out:
            exe = os.path.realpath("/proc/%s/exe" % pid)
            if exe == binary:
                return int(pid)
        time.sleep(0.2)
    raise SystemExit("the gateway did not start")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--heaptrack", metavar="FILE")
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_upstream:
        server = await asyncio.start_server(upstream, "127.0.0.1", UPSTREAM_PORT)
        async with server:
            await server.serve_forever()
    binary = os.path.realpath(os.environ.get("GW_BIN", os.path.join(ROOT, "target/release/greenhouse-gateway")))
    if not os.access(binary, os.X_OK):
        raise SystemExit("no binary at %s (cargo build --release --locked, or set GW_BIN)" % binary)
    token = open(os.path.join(STATE, "tokens.rs256")).readline().strip()
    # The upstream in a process of its own, as in the harness: sharing this one's event loop with
    # the clients, it answered slowly enough that the gateway opened more upstream connections
    # while the measured ones came in, which counted against them.
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream"])
    work = tempfile.mkdtemp()
    gw_bin = binary
    if args.heaptrack:
        gw_bin = os.path.join(work, "wrap.sh")
        with open(gw_bin, "w") as f:
            f.write('#!/bin/sh\nif [ "$1" = serve ]; then exec heaptrack -o %s %s "$@"; fi\nexec %s "$@"\n'
                    % (args.heaptrack, binary, binary))
        os.chmod(gw_bin, 0o755)
    env = dict(os.environ, BENCH_PORT=str(PORT), BENCH_LISTEN="127.0.0.1:%d" % PORT,
               BENCH_UPSTREAM_URL="http://127.0.0.1:%d" % UPSTREAM_PORT,
               BENCH_JWKS=os.path.join(STATE, "jwks.json"),
               BENCH_UPSTREAM_BEARER=open(os.path.join(STATE, "upstream_bearer")).read().strip(),
               BENCH_JWT_ISS="https://idp.bench.invalid", BENCH_JWT_AUD="api-gateway",
               BENCH_AUDIT_FILE=os.path.join(work, "audit.log"), GW_BIN=gw_bin, GW_TOKEN_CACHE_BYTES="0")
    log = open(os.path.join(work, "slot.log"), "w")
    slot = subprocess.Popen(["bash", os.path.join(BENCH_DIR, "gateway", "run-gateway.sh")],
                            env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        pid = gateway_pid(slot, binary, time.time() + 30)
        await asyncio.sleep(3)  # keys loaded, upstream token taken
        # `held` keeps the connections open until the gateway is stopped (for --heaptrack)
        before, after, held = await measure(pid, args.conns, token)
        print("binary: %s\nanonymous memory: %d KiB idle after warm-up, %d KiB holding %d connections: "
              "%.2f KiB per connection" % (binary, before, after, args.conns, (after - before) / args.conns))
        if args.heaptrack:
            os.kill(pid, signal.SIGKILL)  # heaptrack's file then lists what the connections hold
            time.sleep(2)
        for w in held:
            w.close()
    finally:
        try:
            os.killpg(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        slot.wait()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


asyncio.run(main())
