# lapse container image.
#
#   docker build -t lapse .
#   docker run --rm -e LAPSE_KAFKA_BROKERS=kafka:9092 -e LAPSE_REDIS_URL=redis://redis:6379/ -p 9464:9464 lapse
#
# Build stage: rdkafka-sys compiles the bundled librdkafka with ./configure + make
# (gcc), links zlib (libz-sys) and OpenSSL (TLS/SASL to Kafka; libssl-dev, in the
# rust:bookworm image). Redis and the schema registry use rustls (no OpenSSL).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# 1. Dependencies only: this layer is rebuilt only when a manifest or Cargo.lock
# changes. Cargo reads the whole workspace, so the tools crate (tools/) is there
# as its manifest and empty stubs; only the product (`-p lapse`) is ever built:
# the image carries no tool code.
COPY Cargo.toml Cargo.lock ./
COPY tools/Cargo.toml ./tools/
RUN mkdir -p src tools/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > tools/src/main.rs \
    && touch src/lib.rs tools/src/lib.rs \
    && cargo build --release --locked -p lapse --bin lapse \
    && rm -rf src target/release/lapse target/release/deps/lapse-* \
              target/release/deps/liblapse-* target/release/.fingerprint/lapse-*

# 2. lapse itself (the schemas are compiled in as the built-in set, and also shipped below).
COPY schemas ./schemas
COPY src ./src
RUN cargo build --release --locked -p lapse --bin lapse \
    && strip target/release/lapse \
    && target/release/lapse --version

FROM debian:bookworm-slim
# ca-certificates follows the distribution's security updates: not pinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin lapse
COPY --from=builder /build/target/release/lapse /usr/local/bin/lapse
COPY schemas /app/schemas
COPY deploy/lapse.toml /app/lapse.toml
WORKDIR /app
# Numeric, so that runtimes enforcing runAsNonRoot can check it.
USER 10001:10001
# Inside a container /metrics, /healthz and /readyz must be reachable from outside it.
ENV LAPSE_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
# No curl in the image: bash's /dev/tcp asks /healthz (process alive and serving).
# /readyz (Redis and broker reachable) is for load balancers and dashboards, not
# for restarts: restarting lapse does not bring Redis back.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# SIGTERM (Docker's default stop signal) finishes the batch, commits and exits 0
# within kafka.shutdown_drain_timeout (30 s): give containers a longer grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lapse"]
CMD ["run", "--config", "/app/lapse.toml"]
