# streamrec: one image with the two release binaries, `ingest-api` and `dataflow`.
#
#   docker build -t streamrec .
#   docker run --rm streamrec ingest-api --help
#
# docker-compose.yml runs it twice, once per binary.

ARG RUST_VERSION=1.89

# ---------------------------------------------------------------------------------------------
# planner: the workspace reduced to its manifests, Cargo.lock and a stub file at every target's
# path. Its output changes only when a manifest or the lock file does, so the dependency layer
# of the builder below stays cached across source edits, and crates added to the workspace are
# picked up without editing this file.
FROM rust:${RUST_VERSION}-bookworm AS planner
WORKDIR /build
COPY . .
# Every target cargo knows of (lib, bin, test, example, bench, build script) gets the same stub,
# which compiles both as a library and as a program.
RUN set -eu; \
    mkdir -p /recipe; \
    cp Cargo.lock /recipe/; \
    for manifest in $(find . -name Cargo.toml -not -path './target/*'); do \
        mkdir -p "/recipe/$(dirname "$manifest")"; \
        cp "$manifest" "/recipe/$manifest"; \
    done; \
    cargo metadata --offline --no-deps --format-version 1 \
        | grep -o '"src_path":"[^"]*"' | cut -d'"' -f4 \
        | while read -r path; do \
            stub="/recipe/${path#/build/}"; \
            mkdir -p "$(dirname "$stub")"; \
            printf '#![allow(dead_code)]\nfn main() {}\n' > "$stub"; \
        done

# ---------------------------------------------------------------------------------------------
# builder: dependencies first (cached), then the real sources.
FROM rust:${RUST_VERSION}-bookworm AS builder
# The rdkafka crate builds its bundled librdkafka (./configure + make, C and C++) and links
# zlib for the `libz` feature.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# Both builds select the same packages, so features resolve the same and the second build reuses
# every dependency the first one compiled.
COPY --from=planner /recipe/ ./
RUN cargo build --release --locked -p streamrec-ingest-api -p streamrec-dataflow

COPY . .
# COPY keeps the files' own modification times, which can be older than the stub build above;
# touching the sources makes cargo rebuild the workspace crates (the dependencies stay built).
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p streamrec-ingest-api -p streamrec-dataflow

# ---------------------------------------------------------------------------------------------
# runtime: the two binaries, the sample data they default to, CA certificates, nothing else.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin streamrec

COPY --from=builder /build/target/release/ingest-api /build/target/release/dataflow /usr/local/bin/

# Both binaries default to paths relative to the working directory: data/behavior_sample.csv
# (ingest-api) and data/item_features.csv (dataflow). A .env file here would be read too.
WORKDIR /app
COPY data/behavior_sample.csv data/item_features.csv /app/data/
# The dataflow's checkpoints (CHECKPOINT_DIR defaults to ./checkpoints), writable by the
# unprivileged user; compose mounts a volume here, which takes this ownership when created.
RUN mkdir -p /app/checkpoints && chown streamrec:streamrec /app/checkpoints

USER streamrec
# Inside a container the API must listen on all interfaces; the binary's own default is
# 127.0.0.1:8000. The dataflow ignores BIND.
ENV BIND=0.0.0.0:8000
EXPOSE 8000
CMD ["ingest-api"]
