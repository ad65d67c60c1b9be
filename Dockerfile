# mesh-egress: multi-stage build. Stage 1 builds the release binary, stage 2 is a slim runtime.

FROM rust:1-bookworm AS builder
WORKDIR /src

# 1) Dependencies only: build against placeholder sources so this layer is cached
#    until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY .cargo ./.cargo
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin mesh-egress \
 && rm -rf src

# 2) The real sources. `touch` makes sure cargo sees them as newer than the placeholder build
#    (COPY keeps the files' original mtimes, which can be older).
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin mesh-egress \
 && install -m 0755 target/release/mesh-egress /mesh-egress

FROM debian:bookworm-slim
# iptables is for the init container that runs `transparent-proxy install`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iptables \
 && rm -rf /var/lib/apt/lists/*

# Non-root user with Kuma's default proxy uid (5678), which the transparent-proxy
# iptables rules exclude from redirection.
RUN groupadd --system --gid 5678 mesh-egress \
 && useradd --system --uid 5678 --gid 5678 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mesh-egress \
 && mkdir -p /var/lib/mesh-egress \
 && chown 5678:5678 /var/lib/mesh-egress

COPY --from=builder /mesh-egress /usr/local/bin/mesh-egress
COPY config/demo /etc/mesh-egress

USER 5678:5678
# 15001 transparent-proxy outbound, 15053 DNS proxy (UDP and TCP), 9901 admin.
EXPOSE 15001 15053/udp 15053/tcp 9901
ENTRYPOINT ["mesh-egress"]
CMD ["run", "-c", "/etc/mesh-egress", "--state-dir", "/var/lib/mesh-egress"]
