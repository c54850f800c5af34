#!/usr/bin/env python3
"""Instructions per request by where the code comes from, from a dump `bench/instructions.sh
--keep DIR` kept (DIR/callgrind.<n>.out), each function's own instructions (not its callees'),
then the calls into the allocator per request.

    python3 bench/cg-breakdown.py DIR/callgrind.1.out REQUESTS

Groups are by crate or library (the file a function's code is in), so inlined code counts where
it was written: `serde_json`'s code inlined into the gateway's audit serialiser counts as
serde_json. Needs callgrind_annotate (valgrind).
"""
import re
import subprocess
import sys

GROUPS = [
    ("RSA and SHA-256 in aws-lc (signature check)", r"/aws-lc/"),
    ("SHA-256 in the sha2 crate (audit chain, body digest; portable code under valgrind)", r"sha2-|sha2::"),
    ("allocator (mimalloc, libc malloc)", r"mimalloc|/malloc/"),
    ("memcpy, memmove, memset, memcmp", r"string/\.\./sysdeps|memchr"),
    ("JSON (serde_json) and base64", r"serde_json-|serde_core-|base64-"),
    ("tracing, log line formatting (tracing-subscriber, fmt, nu-ansi-term)",
     r"tracing|nu-ansi-term|core/src/fmt|alloc/src/fmt|sharded-slab|alloc/src/string\.rs"),
    ("HTTP (hyper, hyper-util, http, httparse, h2)", r"hyper|/http-\d|httparse|/h2-"),
    ("async runtime (tokio, futures)", r"tokio-|futures-"),
    ("the gateway's own code", r"^(/work/[^/]+/)?src/|^src/"),
    ("hashing of maps (SipHash, ahash, foldhash)", r"hash/sip|ahash|foldhash|hashbrown"),
    ("time formatting (time, httpdate)", r"/time-\d|httpdate"),
    ("JSON Schema (jsonschema, regex)", r"jsonschema|regex|referencing"),
    ("moka, metrics (prometheus-client)", r"moka|prometheus"),
    ("Rust core and alloc, other", r"library/(core|alloc|std)/"),
]


def main() -> None:
    path, requests = sys.argv[1], int(sys.argv[2])
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
        capture_output=True, text=True, check=True).stdout
    total = 0
    sums = {name: 0 for name, _ in GROUPS}
    other = 0
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m or "=>" in line:
            continue
        cost, where = int(m.group(1).replace(",", "")), m.group(2)
        if where.startswith("PROGRAM TOTALS"):
            total = cost
            continue
        # Self cost only: thread entry points carry their callees' cost in this listing.
        if any(s in where for s in ("clone.S:clone", "pthread_create.c:start_thread", "thread_start",
                                    "call_once{{vtable.shim}}", "__rust_begin_short_backtrace")):
            continue
        for name, pattern in GROUPS:
            if re.search(pattern, where):
                sums[name] += cost
                break
        else:
            other += cost
    print(f"{total / requests:12,.0f} instructions per request in all ({path})")
    for name, cost in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"{cost / requests:12,.0f}  {100 * cost / total:5.1f} %  {name}")
    print(f"{other / requests:12,.0f}  {100 * other / total:5.1f} %  elsewhere")
    allocs, reallocs = allocator_calls(path)
    print(f"{allocs / requests:12,.1f} allocations per request (and {reallocs / requests:,.1f} reallocations)")


# The allocator's entry points as the gateway's code reaches them: mimalloc's (the default build)
# and libc's (`--features system-allocator`, and C code such as aws-lc in either build).
ALLOCATE = {"mi_malloc_aligned", "mi_zalloc_aligned", "malloc", "calloc"}
REALLOCATE = {"mi_realloc_aligned", "realloc"}


def allocator_calls(path: str) -> tuple[int, int]:
    """Calls into the allocator's entry points, from the dump's call records (`cfn=` then
    `calls=`); names are compressed as `(id) name` the first time and `(id)` after."""
    names: dict[str, str] = {}
    allocs = reallocs = 0
    callee = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                callee = names.get(m.group(1)) if line.startswith("cfn=") else None
                continue
            if line.startswith("calls=") and callee is not None:
                n = int(line.split()[0].split("=")[1])
                if callee in ALLOCATE:
                    allocs += n
                elif callee in REALLOCATE:
                    reallocs += n
                callee = None
    return allocs, reallocs


if __name__ == "__main__":
    main()
