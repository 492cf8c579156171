# syntax=docker/dockerfile:1
# MBCAS node daemon image.
#
#   docker build -t mbcas:dev .            (or: cargo xtask kind-up, which builds and loads it)
#
# Builder: the same toolchain `cargo xtask setup` installs on a developer machine
# (Debian's llvm-22-dev, the pinned nightly with rust-src for the eBPF crate,
# bpf-linker built against LLVM 22), then a release build of `mbcas`, which
# builds and embeds the eBPF object through mbcas-daemon/build.rs.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Toolchain first, from the files that define it, so source edits keep this layer.
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY xtask xtask
COPY mbcas-common mbcas-common
COPY mbcas-ebpf mbcas-ebpf
COPY mbcas-daemon mbcas-daemon
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    apt-get update -q && cargo xtask setup
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mbcas-daemon --bin mbcas \
    && install -m 0755 target/release/mbcas /usr/local/bin/mbcas

# Runtime: just the binary. It needs no shell and no libraries beyond glibc.
FROM debian:bookworm-slim
COPY --from=builder /usr/local/bin/mbcas /usr/local/bin/mbcas
USER 0
ENTRYPOINT ["/usr/local/bin/mbcas"]
CMD ["run", "--mode", "kubernetes"]
