#!/usr/bin/env bash
# The replicator's benchmark against the lab's SecantusDB servers (not a test: it prints figures
# and ratios measured in one run), then `mongo-replicator verify` of the snapshot's copy beside the snapshot's
# figures. Arguments go to mrep-bench, e.g. --docs 200000 --workers 1,2,4,8.
# The source's oplog is capped for what a run writes; a run whose source pruned its own history
# (SecantusDB's open change streams skip pruned entries silently) is discarded and fails the script.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash tests/lab/scripts/install-secantus.sh >/dev/null
cargo build --release --locked --bin mongo-replicator
cargo build --release --locked -p mongo-replicator-lab --bin mrep-bench
exec target/release/mrep-bench "$@"
