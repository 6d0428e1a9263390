#!/usr/bin/env bash
# The replicator's benchmark against the lab's SecantusDB servers (not a test: it prints figures
# measured in one run): one table of workloads (insert, update, mixed, large, many) × pipelines
# (ours, the driver pipe, the target-alone ceiling, MongoDB's Kafka connector pipeline), per phase (snapshot, stream): rate, lag after
# the writer stops, CPU-seconds per 100k of the pipeline and both servers, the pipeline's peak RSS
# and ours ÷ each peer; then `mongo-replicator verify` of the insert workload's snapshot copy.
# Arguments go to mrep-bench, e.g. --docs 100000 --events 100000 --workers 4 --workloads insert,update.
# The source's oplog is capped for what a run writes; a run whose source pruned its own history
# (SecantusDB's open change streams skip pruned entries silently) is discarded and fails the script.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash tests/lab/scripts/install-secantus.sh >/dev/null
bash tests/lab/scripts/install-kafka.sh >/dev/null
cargo build --release --locked --bin mongo-replicator
cargo build --release --locked -p mongo-replicator-lab --bin mrep-bench
exec target/release/mrep-bench "$@"
