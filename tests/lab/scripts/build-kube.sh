#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from Go modules through the
# module proxy, stamped with their versions, into a cache outside the clone (built once per version).
# Prints the bin directory on stdout when done; progress goes to stderr.
# Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../versions.env
source "$here/../versions.env"

# Staging modules are published as v0.<minor>.<patch> of the same release.
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
OUT="$CACHE/kube-$KUBE_VERSION"
BINS=(kube-apiserver kube-controller-manager kubectl etcd)
log() { echo "build-kube: $*" >&2; }

complete() { for b in "${BINS[@]}"; do [[ -x "$OUT/bin/$b" ]] || return 1; done; }
if complete; then echo "$OUT/bin"; exit 0; fi

mkdir -p "$OUT/bin" "$OUT/src/kube" "$OUT/src/etcd"
# One builder at a time (parallel test binaries may all ask for the lab).
exec 9>"$OUT/.lock"
flock 9
if complete; then echo "$OUT/bin"; exit 0; fi

command -v go >/dev/null || { log "Go is required (https://go.dev/dl)"; exit 1; }
export GOFLAGS="-buildvcs=false -mod=mod"
export CGO_ENABLED=0
started=$SECONDS

# --- kube-apiserver, kube-controller-manager, kubectl --------------------------------------
cd "$OUT/src/kube"
modcache="$(go env GOMODCACHE)/cache/download"
modfile="$modcache/k8s.io/kubernetes/@v/$KUBE_VERSION.mod"
[[ -f "$modfile" ]] || go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" >/dev/null
{
  echo "module mongo-replicator.io/lab/kube"
  echo
  echo "go $(awk '/^go /{print $2; exit}' "$modfile")"
  echo
  echo "require k8s.io/kubernetes $KUBE_VERSION"
  echo
  echo "replace ("
  # The release's go.mod points every staging module at ./staging; a consumer must pin each one
  # it requires to the published v0.Y.Z of the same release.
  awk '/=> \.\/staging\/src\//{print $1}' "$modfile" | while read -r m; do
    if grep -qE "^[[:space:]]+$m v0\.0\.0" "$modfile"; then
      echo "	$m => $m $STAGING_VERSION"
    fi
  done
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

// Package tools pins the commands the lab builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubectl/pkg/cmd"
)
GO
log "resolving k8s.io/kubernetes $KUBE_VERSION"
go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kube-controller-manager@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kubectl@$KUBE_VERSION" >&2

minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for cmd in kube-apiserver kube-controller-manager kubectl; do
  if [[ ! -x "$OUT/bin/$cmd" ]]; then
    log "building $cmd $KUBE_VERSION (the first one takes tens of minutes on two cores)"
    go build -trimpath -ldflags "$ldflags" -o "$OUT/bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$OUT/bin/$cmd.tmp" "$OUT/bin/$cmd"
  fi
done

# --- etcd, at the version k8s.io/apiserver requires -----------------------------------------
apiserver_mod="$modcache/k8s.io/apiserver/@v/$STAGING_VERSION.mod"
[[ -f "$apiserver_mod" ]] || go mod download -json "k8s.io/apiserver@$STAGING_VERSION" >/dev/null
ETCD_VERSION="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' "$apiserver_mod")"
if [[ ! -x "$OUT/bin/etcd" ]]; then
  cd "$OUT/src/etcd"
  cat > go.mod <<MOD
module mongo-replicator.io/lab/etcd

go 1.26

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
  cat > main.go <<'GO'
// Command etcd is the etcd server: go.etcd.io/etcd/server/v3's etcdmain is what the etcd binary runs.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  log "building etcd $ETCD_VERSION"
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$ETCD_VERSION" -o "$OUT/bin/etcd.tmp" .
  mv "$OUT/bin/etcd.tmp" "$OUT/bin/etcd"
fi
echo "$ETCD_VERSION" > "$OUT/etcd-version"
log "done in $((SECONDS - started)) s"
echo "$OUT/bin"
