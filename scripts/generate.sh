#!/usr/bin/env bash
# Regenerates everything generated from the code: the CRD in crds/ and in the Helm chart.
# A test fails when the checked-in files drift from the types.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo run --quiet --locked --bin mongo-replicator -- crd > crds/mongoreplication.yaml
cp crds/mongoreplication.yaml charts/mongo-replicator/crds/mongoreplication.yaml
echo "generated crds/mongoreplication.yaml and charts/mongo-replicator/crds/mongoreplication.yaml"
