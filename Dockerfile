# zkroute: build with the same command as the README and CI, run as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 zkroute \
 && useradd --system --uid 10001 --gid 10001 --no-create-home zkroute \
 && mkdir -p /var/lib/zkroute /etc/zkroute && chown zkroute:zkroute /var/lib/zkroute \
 && apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/zkroute /usr/local/bin/zkroute
USER zkroute
# The configuration file (see the README); every key can also be a ZKROUTE_* variable.
# /var/lib/zkroute is writable for zookeeper.snapshot.
ENV ZKROUTE_CONFIG=/etc/zkroute/zkroute.toml
# Admin port: / (dashboard) /metrics /healthz /ready /config. Bind it to 0.0.0.0 in the config
# to scrape it from outside the pod.
EXPOSE 9901
HEALTHCHECK --interval=10s --timeout=2s CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
# Exec form: SIGTERM reaches zkroute, which drains and exits 0.
ENTRYPOINT ["/usr/local/bin/zkroute"]
