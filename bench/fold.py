#!/usr/bin/env python3
"""Folds `perf script` output into one line per stack ("thread;root;...;leaf count"), the input
of flame-graph tools (inferno-flamegraph, flamegraph.pl, speedscope). Generic arguments and
closure suffixes are dropped from Rust names (the outer type is kept), so the file stays small enough to keep. Stdlib only."""
import collections
import re
import sys


def simplify(name):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    name = re.sub(r"\+0x[0-9a-f]+$", "", name)
    out, depth = [], 0
    for ch in name:  # keep `<Type as Trait>` and `f<Type>`, drop the generic arguments inside
        if ch == "<":
            depth += 1
            if depth == 2:
                out.append("<..")
            if depth >= 2:
                continue
        elif ch == ">":
            depth -= 1
            if depth >= 1:
                if depth == 1:
                    out.append(">")
                continue
        elif depth >= 2:
            continue
        out.append(ch)
    name = "".join(out)
    name = re.sub(r"\{\{closure\}\}|\{closure#\d+\}|\{async_(fn|block)(_env)?#\d+\}", "{closure}", name)
    return name.replace(";", ":")


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
        name = simplify(m.group(1))
        if not stack or stack[-1] != name:  # inlined frames repeated under one name
            stack.append(name)
if stack:
    counts[";".join([thread] + stack[::-1])] += 1
for k, v in counts.most_common():
    print(k, v)
