#!/usr/bin/env bash
# Builds the helm CLI (helm.sh/helm/v3/cmd/helm) from the Go module proxy, stamped with its
# version, commit and the Kubernetes minor its client libraries speak, into a cache outside the
# clone (built once per version). Prints the bin directory on stdout when done; progress goes to
# stderr. Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../versions.env
source "$here/../versions.env"

CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
OUT="$CACHE/helm-$HELM_VERSION"
log() { echo "build-helm: $*" >&2; }

if [[ -x "$OUT/bin/helm" ]]; then echo "$OUT/bin"; exit 0; fi
mkdir -p "$OUT/bin"
# One builder at a time (parallel test binaries may all ask for helm).
exec 9>"$OUT/.lock"
flock 9
if [[ -x "$OUT/bin/helm" ]]; then echo "$OUT/bin"; exit 0; fi

command -v go >/dev/null || { log "Go is required (https://go.dev/dl)"; exit 1; }
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0
started=$SECONDS

module="helm.sh/helm/v3"
modcache="$(go env GOMODCACHE)/cache/download"
info="$modcache/$module/@v/$HELM_VERSION.info"
modfile="$modcache/$module/@v/$HELM_VERSION.mod"
[[ -f "$info" && -f "$modfile" ]] || go mod download -json "$module@$HELM_VERSION" >/dev/null
# The commit the proxy recorded for the tag, and the Kubernetes minor of the client-go helm
# requires (helm's Makefile stamps both; without them `helm version` and the default
# .Capabilities.KubeVersion would say v1.20).
commit="$(sed -n 's/.*"Hash":"\([0-9a-f]*\)".*/\1/p' "$info")"
k8s_minor="$(awk '$1=="k8s.io/client-go"{split($2, v, "."); print v[2]; exit}' "$modfile")"
[[ -n "$k8s_minor" ]] || { log "cannot read the k8s.io/client-go version from $modfile"; exit 1; }

ldflags="-s -w"
ldflags+=" -X $module/internal/version.version=$HELM_VERSION"
ldflags+=" -X $module/internal/version.gitCommit=$commit"
ldflags+=" -X $module/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $module/$pkg.k8sVersionMajor=1 -X $module/$pkg.k8sVersionMinor=$k8s_minor"
done

# helm's go.mod has no replace directives, so `go install pkg@version` builds it with exactly the
# dependency versions its release pins (go.sum checked against the checksum database).
log "building helm $HELM_VERSION (a few minutes on two cores)"
tmp="$OUT/bin.tmp"
rm -rf "$tmp"
GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$HELM_VERSION"
mv "$tmp/helm" "$OUT/bin/helm"
rm -rf "$tmp"
log "done in $((SECONDS - started)) s"
echo "$OUT/bin"
