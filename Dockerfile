# mesh-egress: multi-stage build. Stage 1 builds the profile-guided release binary (scripts/pgo-build), stage 2 is a slim runtime.

FROM rust:1-bookworm AS builder
WORKDIR /src

# The profile-guided build (scripts/pgo-build) needs an llvm-profdata of rustc's LLVM version:
# rustup's component, or Debian's llvm-N where rustup cannot download it.
RUN rustup component add llvm-tools \
 || (apt-get update && apt-get install -y --no-install-recommends \
       "llvm-$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')")

# 1) Dependencies only, downloaded in a layer of their own that stays cached until Cargo.toml
#    or Cargo.lock change. (They are compiled below: the instrumented and the optimised builds
#    compile them with different flags, the second with a profile of this very tree.)
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
# Cargo.toml names this benchmark; cargo reads no manifest without it.
COPY benches/micro.rs ./benches/
RUN cargo fetch --locked

# 2) The sources, then the profile-guided build: instrumented, trained by examples/pgo_train.rs,
#    rebuilt with the profile (docs/benchmarks.md, "Profile-guided build").
COPY examples ./examples
COPY scripts/pgo-build ./scripts/
COPY src ./src
RUN scripts/pgo-build /mesh-egress

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
