#!/usr/bin/env bash
# Entra sign-in benchmark against the lab doubles (not a test: it prints figures and ratios
# measured in one run): token acquisition p50/p99, the OIDC client's overhead over a bare HTTPS
# POST, and MONGODB-OIDC vs SCRAM connection opening. Arguments: [--iterations N].
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh >/dev/null
exec cargo bench --locked --bench auth-bench -- "$@"
