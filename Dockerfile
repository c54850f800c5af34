# The gateway's image: compiled with the Rust toolchain, run from distroless (glibc and CA
# certificates; no shell, no package manager, no curl) as uid 10001. It holds no configuration:
# mount one at /etc/greenhouse-gateway (policies/production/ is the example) and give the audit
# trail a volume of its own per replica. See the README, "Deploying three replicas".
#
#   docker build -t greenhouse-gateway .
#   .ci/docker-context-check    # no Docker needed: the files this build stage copies are a crate cargo accepts

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies in their own layer, rebuilt only when Cargo.toml or Cargo.lock change: the
# manifests with stub sources (a main, a lib and one stub per [[bench]] that Cargo.toml declares,
# since cargo refuses a manifest whose targets have no file).
COPY Cargo.toml Cargo.lock ./
# hyper with the gateway's patch (vendor/hyper/PATCHED.md), which Cargo.toml's [patch] points at
COPY vendor ./vendor
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && for bench in $(awk -F'"' '/^\[\[bench\]\]/ { b = 1; next } /^\[/ { b = 0 } b && /^name *=/ { print $2 }' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$bench.rs"; \
    done \
 && cargo build --release --locked --bin greenhouse-gateway \
 && rm -rf src benches
# The real sources: benches/ because Cargo.toml declares the benches, policies/ because the seed
# spec is built into the binary. Tests are not needed to build it.
COPY src ./src
COPY benches ./benches
COPY policies ./policies
# COPY keeps the context's modification times, which may be older than the stub build: touch the
# crate roots so that cargo rebuilds the crate itself. Then the audit folder the runtime user owns.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin greenhouse-gateway \
 && install -d -o 10001 -g 10001 -m 0750 /out/var/lib/greenhouse-gateway/audit

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/greenhouse-gateway /usr/local/bin/greenhouse-gateway
COPY --from=build --chown=10001:10001 /out/var/lib/greenhouse-gateway /var/lib/greenhouse-gateway
USER 10001:10001
# The audit trail (policies/production/gateway.toml writes audit.jsonl here). A volume, so that
# the trail outlives the container; one per replica, since each writes its own hash chain.
VOLUME ["/var/lib/greenhouse-gateway/audit"]
# 8443: the gateway (TLS in the production example); 9090: the admin listener (/healthz, /readyz,
# /metrics). In a container both must bind 0.0.0.0; admin.addr off loopback needs admin.token.
EXPOSE 8443 9090
# GET /healthz of the admin listener named by the mounted config (0.0.0.0 is probed on loopback),
# with the config's admin.token (from GATEWAY_ADMIN_TOKEN in the container's environment).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["greenhouse-gateway", "healthcheck", "--config", "/etc/greenhouse-gateway/gateway.toml"]
ENTRYPOINT ["greenhouse-gateway"]
CMD ["serve", "--config", "/etc/greenhouse-gateway/gateway.toml"]
