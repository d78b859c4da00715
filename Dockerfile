# syntax=docker/dockerfile:1
#
# meshfed's container image: a release build on Debian 12 (bookworm), run from distroless (glibc, libgcc,
# CA certificates; no shell, no package manager) as a non-root user (65532). The Deployment adds a
# read-only root file system with an in-memory /tmp (manifests/base/deployment.yaml).
#
#   docker build -t REGISTRY/meshfed:0.1.0 .      (BuildKit: the default builder of Docker 23 and later)
#
# The test command lints this file with hadolint (tests/packaging.rs); it does not build it, since the CI
# machines have no Docker engine. Where one runs: cargo test --test packaging -- --ignored

FROM rust:1.95-bookworm AS build
WORKDIR /src
# only what the build reads (.dockerignore)
COPY . .
# symbols kept (readable backtraces), debug info dropped (a smaller image)
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin meshfed \
    && cp target/release/meshfed /meshfed

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="meshfed" \
      org.opencontainers.image.description="xDS control plane federating Istio meshes across clouds" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /meshfed /usr/local/bin/meshfed
USER 65532:65532
# plaintext ADS (off in the manifests), ADS over TLS/mTLS, debug and metrics
EXPOSE 15010 15012 15014
ENTRYPOINT ["/usr/local/bin/meshfed"]
CMD ["serve"]
