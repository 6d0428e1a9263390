#!/usr/bin/env bash
# Runs every test: sets up a fresh machine (scripts/setup.sh), then `cargo test` over the
# workspace. The lab tests start real etcd, kube-apiserver, kube-controller-manager and
# SecantusDB processes on loopback. Extra arguments go to cargo test (e.g. a test name filter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo test --workspace --locked "$@"
