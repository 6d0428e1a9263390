#!/usr/bin/env bash
# The main job, locally on the lab: sets up a fresh machine, builds mongo-replicator, starts a
# real control plane with a real node (in a network namespace of its own), installs the operator
# with the Helm chart, applies a MongoReplication and shows it become Ready with data in the
# target, as a user sees it. Arguments go to `mrep-lab demo` (--keep leaves the lab running).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --locked --workspace --bins
exec target/debug/mrep-lab demo "$@"
