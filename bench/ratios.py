#!/usr/bin/env python3
"""The issue #14 ratios of one harness run, each taken within a repetition, then the median over
the repetitions (as the README's table quotes them).

    python3 bench/ratios.py RESULTS_DIR      (the folder of run.py's raw.jsonl and summary.json)

Reads the cells bench/compare.sh runs (targets gateway, gateway-es256, gateway-always,
gateway-redis, gateway-cached beside direct, haproxy, haproxy-jwt, haproxy-jwt-log,
haproxy-jwt-es256, envoy-jwt) and prints one line per ratio; a ratio whose cells are missing is
printed as n/a. Standard library only."""
import json
import os
import statistics
import sys


def load(folder):
    cells = {}
    with open(os.path.join(folder, "raw.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            cells[(d["scenario"], d["target"], d["rep"])] = d
    reps = sorted({k[2] for k in cells})
    return cells, reps


def per_rep(cells, reps, fn):
    out = []
    for r in reps:
        try:
            v = fn(lambda sc, t, k: cells[(sc, t, r)][k])
        except (KeyError, ZeroDivisionError, TypeError):
            continue
        out.append(v)
    return out


def show(name, values, target):
    if not values:
        print(f"{name}: n/a (target {target})")
        return
    med = statistics.median(values)
    each = ", ".join(f"{v:.2f}" for v in values)
    print(f"{name}: {med:.2f}x (per repetition {each}; target {target})")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cells, reps = load(sys.argv[1])

    def ratio(sc, a, b, k):
        return lambda g: g(sc, a, k) / g(sc, b, k)

    def added(sc, a, b, k):
        return lambda g: (g(sc, a, k) - g(sc, "direct", k)) / (g(sc, b, k) - g(sc, "direct", k))

    rows = [
        ("distinct RS256 req/s / HAProxy+JWT+log", ratio("sat", "gateway", "haproxy-jwt-log", "rps"), ">= 1.5"),
        ("distinct RS256 CPU/req / HAProxy+JWT+log", ratio("sat", "gateway", "haproxy-jwt-log", "proxy_cpu_us_per_req"), "<= 0.67"),
        ("distinct RS256 req/s / Envoy+jwt_authn", ratio("sat", "gateway", "envoy-jwt", "rps"), ">= 3"),
        ("ES256 req/s / HAProxy ES256", ratio("sat", "gateway-es256", "haproxy-jwt-es256", "rps"), ">= 1.3"),
        ("one token (cache on) CPU/req / plain HAProxy", ratio("sat1tok", "gateway-cached", "haproxy", "proxy_cpu_us_per_req"), "<= 1.3"),
        ("POST validated req/s / HAProxy+JWT", ratio("post", "gateway", "haproxy-jwt", "rps"), ">= 1.2"),
        ("fsync always / batch, distinct tokens", ratio("sat", "gateway-always", "gateway", "rps"), ">= 0.9"),
        ("fsync always / batch, one token", ratio("sat1tok", "gateway-always", "gateway", "rps"), ">= 0.9"),
        ("fsync always / batch, POST", ratio("post", "gateway-always", "gateway", "rps"), ">= 0.9"),
        ("Redis / memory, distinct tokens", ratio("sat", "gateway-redis", "gateway", "rps"), ">= 0.7"),
        ("Redis / memory, one token", ratio("sat1tok", "gateway-redis", "gateway", "rps"), ">= 0.7"),
        ("Redis / memory, POST", ratio("post", "gateway-redis", "gateway", "rps"), ">= 0.7"),
        ("one connection added p50 / HAProxy+JWT", added("light", "gateway", "haproxy-jwt", "p50_us"), "<= 0.8"),
        ("one connection added p99 / HAProxy+JWT", added("light", "gateway", "haproxy-jwt", "p99_us"), "<= 1.0"),
    ]
    for name, fn, target in rows:
        show(name, per_rep(cells, reps, fn), target)


if __name__ == "__main__":
    main()
