# syntax=docker/dockerfile:1
# Build: docker build -t mongo-replicator .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY tests/lab/Cargo.toml tests/lab/Cargo.toml
RUN mkdir -p src tests/lab/src/bin tests/integration \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && touch tests/lab/src/lib.rs && echo 'fn main() {}' > tests/lab/src/bin/mrep-lab.rs \
 && echo 'fn main() {}' > tests/integration/main.rs \
 && cargo build --release --locked --bin mongo-replicator \
 && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin mongo-replicator

# glibc and CA certificates, nothing else; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mongo-replicator /usr/local/bin/mongo-replicator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mongo-replicator"]
