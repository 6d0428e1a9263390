#!/usr/bin/env bash
# Installs what the build and the lab need on a fresh Debian machine (only what is missing),
# then builds the lab's real parts into the cache (~/.cache/mongo-replicator or $MREP_CACHE):
# kube-apiserver, kube-controller-manager, kubectl and etcd from Go modules, the node's parts
# (kubelet, kube-scheduler, kube-proxy, containerd, CNI plugins, the workload identity webhook,
# pause) and the SecantusDB server from crates.io. Cached parts are not rebuilt.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "setup: $*" >&2; }

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(build-essential)
command -v c++ >/dev/null || missing+=(g++)
command -v openssl >/dev/null || missing+=(openssl)
command -v flock >/dev/null || missing+=(util-linux)
# The lab's node: runc (Debian's, with seccomp), iptables for the kubelet and kube-proxy, ip for
# the bridge, unshare/nsenter for its namespaces, ldd for the image.
command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || missing+=(runc)
command -v iptables >/dev/null || [[ -x /usr/sbin/iptables ]] || missing+=(iptables)
command -v ip >/dev/null || [[ -x /usr/sbin/ip ]] || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
command -v ldd >/dev/null || missing+=(libc-bin)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
command -v go >/dev/null || { log "Go 1.26 or newer is required (it builds the Kubernetes binaries)"; exit 1; }
command -v cargo >/dev/null || { log "Rust (cargo) 1.95 or newer is required"; exit 1; }

t=$SECONDS
bash "$root/tests/lab/scripts/build-kube.sh" >/dev/null
log "Kubernetes binaries ready ($((SECONDS - t)) s)"
t=$SECONDS
bash "$root/tests/lab/scripts/build-node.sh" >/dev/null
log "node binaries ready ($((SECONDS - t)) s)"
t=$SECONDS
bash "$root/tests/lab/scripts/install-secantus.sh" >/dev/null
log "SecantusDB server ready ($((SECONDS - t)) s)"
t=$SECONDS
bash "$root/tests/lab/scripts/build-helm.sh" >/dev/null
log "helm ready ($((SECONDS - t)) s)"
bash "$root/tests/lab/scripts/build-lua-health.sh" >/dev/null
log "lua-health ready (Argo CD health checks)"
