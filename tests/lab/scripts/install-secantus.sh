#!/usr/bin/env bash
# Installs the SecantusDB server (secantusd-rs) from crates.io at the pinned version into a cache
# outside the clone (built once per version). Prints the binary's path on stdout.
# Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../versions.env
source "$here/../versions.env"
CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
ROOT="$CACHE/secantus-$SECANTUS_VERSION"
BIN="$ROOT/bin/secantusd-rs"
if [[ ! -x "$BIN" ]]; then
  mkdir -p "$ROOT"
  exec 9>"$ROOT/.lock"
  flock 9
  if [[ ! -x "$BIN" ]]; then
    command -v cmake >/dev/null || { echo "install-secantus: cmake is required (apt-get install cmake)" >&2; exit 1; }
    echo "install-secantus: building secantus-mdb $SECANTUS_VERSION (5-8 minutes cold)" >&2
    # The crate declares a newer rust-version than it needs; --locked pins its dependency graph.
    CARGO_TARGET_DIR="$CACHE/secantus-target" cargo install secantus-mdb --version "$SECANTUS_VERSION" \
      --ignore-rust-version --locked --root "$ROOT" >&2
    rm -rf "$CACHE/secantus-target"
  fi
fi
echo "$BIN"
