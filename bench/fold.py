#!/usr/bin/env python3
"""Folds `perf script` output into one line per stack ("root;...;leaf count"), the input of
flame-graph tools (inferno-flamegraph, flamegraph.pl, speedscope). Stdlib only."""
import collections
import re
import sys

counts = collections.Counter()
stack = []
thread = None
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        if stack:
            counts[";".join([thread] + stack[::-1])] += 1
        stack, thread = [], None
        continue
    if thread is None:
        thread = line.split()[0] if line.split() else "?"
        continue
    m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\(", line)
    if m:
        name = re.sub(r"::h[0-9a-f]{16}$", "", m.group(1))
        name = re.sub(r"\+0x[0-9a-f]+$", "", name)
        stack.append(name.replace(";", ":"))
if stack:
    counts[";".join([thread] + stack[::-1])] += 1
for k, v in counts.most_common():
    print(k, v)
