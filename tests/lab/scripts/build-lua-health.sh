#!/usr/bin/env bash
# Builds lua-health (tests/lab/go/lua-health: Argo CD's Lua interpreter, gopher-lua, running a
# resource health check) from the Go module proxy into a cache outside the clone, once per
# version of its sources. Prints the bin directory on stdout when done; progress goes to stderr.
# Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../go/lua-health"
CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)"
OUT="$CACHE/lua-health-$key"
log() { echo "build-lua-health: $*" >&2; }

if [[ -x "$OUT/bin/lua-health" ]]; then echo "$OUT/bin"; exit 0; fi
mkdir -p "$OUT/bin"
exec 9>"$OUT/.lock"
flock 9
if [[ -x "$OUT/bin/lua-health" ]]; then echo "$OUT/bin"; exit 0; fi

command -v go >/dev/null || { log "Go is required (https://go.dev/dl)"; exit 1; }
log "building lua-health"
cd "$src"
GOFLAGS="-buildvcs=false -mod=readonly" CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT/bin/lua-health.tmp" .
mv "$OUT/bin/lua-health.tmp" "$OUT/bin/lua-health"
echo "$OUT/bin"
