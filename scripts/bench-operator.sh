#!/usr/bin/env bash
# The operator's scale benchmark on the lab's real node (not a test: it prints figures measured
# in one run): N MongoReplications applied at once, apply->Ready latencies, then every API write
# during three resync periods at steady state, by client, verb and resource, with reconciles,
# reconcile latency and memory. Arguments go to mrep-operator-bench, e.g.
# --replications 200 --running 20 --namespaces 4 --resync-seconds 20.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh >/dev/null
# Everything is built first: nothing inside the lab's network namespace reaches a registry.
cargo build --workspace --bins --locked
status=0
bash scripts/in-lab-netns.sh target/debug/mrep-operator-bench "$@" || status=$?
# What a killed run may have left (cgroups, run directories).
target/debug/mrep-lab clean || true
exit "$status"
