#!/usr/bin/env bash
# The main job, locally on the lab: sets up a fresh machine, builds mongo-replicator, starts a
# real control plane, installs the CRD, applies an example and shows it as a user sees it.
# Arguments go to `mrep-lab demo` (e.g. --keep to leave the lab running, --example FILE).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --locked --workspace --bins
exec target/debug/mrep-lab demo "$@"
