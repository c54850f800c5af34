#!/usr/bin/env python3
"""Where the gateway's CPU goes, by stage of a request, from folded stacks (bench/fold.py).

    python3 bench/breakdown.py folded.txt

Each sample is put in the first stage (top to bottom) whose pattern its stack matches; the
shares add up to 100 %. The patterns are names from the gateway and its libraries, so a
rename shows up here as a larger "other"."""
import collections
import re
import sys

STAGES = [
    ("audit writer thread", lambda t, s: t == "audit-writer"),
    ("other threads", lambda t, s: t != "tokio-rt-worker"),
    ("JWT signature check", lambda t, s: re.search(r"VerificationKey::verifies|verify_sig|jsonwebtoken", s)),
    ("JWT parse and claims (before the signature)", lambda t, s: re.search(r"auth::jwt::", s)),
    ("request log line", lambda t, s: "AccessLine" in s),
    ("audit record: appended here or handed off", lambda t, s: re.search(r"AuditLog::write|write_reserved|write_here|Writer::commit_group", s)),
    ("response spec-drift check", lambda t, s: "inspect_response" in s),
    ("metrics", lambda t, s: "metrics::Metrics" in s),
    ("quota decision", lambda t, s: re.search(r"pipeline::checks::admit|quota::", s)),
    ("upstream call: request, pool, headers", lambda t, s: re.search(r"hyper_util::client|Upstream::send|proxy::send|upstream_headers", s)),
    ("upstream connection task: socket writes and reads", lambda t, s: "server::serve" not in s and re.search(r"Dispatcher|hyper::client", s)),
    ("caller connection: response socket writes", lambda t, s: re.search(r"poll_write|poll_flush", s)),
    ("caller connection: request socket reads and parse", lambda t, s: re.search(r"poll_read|parse_headers|role::Server", s)),
    ("tracing spans (request span, enter/exit)", lambda t, s: re.search(r"tracing_subscriber|tracing::span|Instrumented", s) and not re.search(r"greenhouse_gateway::pipeline", s)),
    ("decision path (routing, team, On-Behalf-Of, headers)", lambda t, s: "greenhouse_gateway" in s),
    ("runtime (scheduler, epoll, timers)", lambda t, s: re.search(r"tokio::runtime|epoll|mio::", s)),
]


def main(path):
    total = 0
    shares = collections.Counter()
    for line in open(path):
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        total += n
        thread, _, rest = stack.partition(";")
        for name, match in STAGES:
            if match(thread, rest):
                shares[name] += n
                break
        else:
            shares["other"] += n
    print("%d samples" % total)
    for name, _ in STAGES + [("other", None)]:
        if shares[name]:
            print("%5.1f %%  %s" % (100.0 * shares[name] / total, name))


if __name__ == "__main__":
    main(sys.argv[1])
