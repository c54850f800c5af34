# Multi-stage build: compile with the Rust toolchain, run from a slim image as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY policies ./policies
# Tests and benches are not needed to build the binary.
RUN cargo build --release --locked --bin greenhouse-gateway

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /src/target/release/greenhouse-gateway /usr/local/bin/greenhouse-gateway
# The shipped policies are the dev playground's; mount your own over /app/policies.
COPY policies ./policies
USER 10001
# 8080: the gateway; 9090: the admin listener (health, readiness, metrics). In a container the
# listeners must bind 0.0.0.0 (set listen.addr and admin.addr; admin.addr off loopback needs
# admin.token).
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["greenhouse-gateway"]
CMD ["serve", "--config", "/app/policies/gateway.toml"]
