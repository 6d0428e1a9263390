#!/usr/bin/env bash
# Runs every test: sets up a fresh machine (scripts/setup.sh), builds everything, then runs
# `cargo test` over the workspace inside a network namespace of its own (scripts/in-lab-netns.sh):
# the lab tests start real etcd, kube-apiserver, kube-controller-manager and SecantusDB processes
# on loopback, and a real node (kubelet, containerd, kube-proxy) whose bridge, iptables chains and
# pod addresses must never touch the host's network. Nothing inside reaches a registry, so every
# build happens first. Extra arguments go to cargo test (e.g. a test name filter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# The node tests run mrep-lab (a lab binary) and pods from target/debug/mongo-replicator.
cargo build --workspace --locked --bins
cargo test --workspace --locked --no-run
status=0
bash scripts/in-lab-netns.sh cargo test --workspace --locked --offline "$@" || status=$?
# Belt and braces: remove what a crashed test binary's node may have left (cgroups, run dirs).
target/debug/mrep-lab clean || true
exit "$status"
