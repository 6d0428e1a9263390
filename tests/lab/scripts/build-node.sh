#!/usr/bin/env bash
# Builds the parts of the lab's real node from Go modules through the module proxy, each pinned in
# versions.env and built once per version into a cache outside the clone:
#   kubelet, kube-scheduler, kube-proxy  (same k8s.io/kubernetes module as build-kube.sh)
#   containerd, containerd-shim-runc-v2, ctr (static; no btrfs/devmapper/zfs snapshotters)
#   CNI plugins bridge, host-local, loopback, portmap
#   the Azure workload identity webhook (cmd/webhook)
#   pause, the sandbox's process (a few lines of Go, built here: no public registry is reachable)
# runc and iptables come from Debian (scripts/setup.sh installs them).
# Prints a bin directory holding (links to) all of them on stdout; progress and timings go to stderr.
# Env: MREP_CACHE (default ~/.cache/mongo-replicator)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../versions.env
source "$here/../versions.env"
CACHE="${MREP_CACHE:-$HOME/.cache/mongo-replicator}"
KEY="kube-$KUBE_VERSION-containerd-$CONTAINERD_VERSION-cni-$CNI_PLUGINS_VERSION-wi-$WORKLOAD_IDENTITY_VERSION-pause-$PAUSE_VERSION"
NODE="$CACHE/node-$KEY"
log() { echo "build-node: $*" >&2; }

KUBE_OUT="$CACHE/kube-$KUBE_VERSION"
CONTAINERD_OUT="$CACHE/containerd-$CONTAINERD_VERSION"
CNI_OUT="$CACHE/cni-plugins-$CNI_PLUGINS_VERSION"
WI_OUT="$CACHE/azure-workload-identity-$WORKLOAD_IDENTITY_VERSION"
PAUSE_OUT="$CACHE/pause-$PAUSE_VERSION"
declare -A WHERE=(
  [kubelet]="$KUBE_OUT/bin" [kube-scheduler]="$KUBE_OUT/bin" [kube-proxy]="$KUBE_OUT/bin"
  [containerd]="$CONTAINERD_OUT/bin" [containerd-shim-runc-v2]="$CONTAINERD_OUT/bin" [ctr]="$CONTAINERD_OUT/bin"
  [bridge]="$CNI_OUT/bin" [host-local]="$CNI_OUT/bin" [loopback]="$CNI_OUT/bin" [portmap]="$CNI_OUT/bin"
  [azure-wi-webhook]="$WI_OUT/bin" [pause]="$PAUSE_OUT/bin"
)
complete() { for b in "${!WHERE[@]}"; do [[ -x "$NODE/bin/$b" ]] || return 1; done; }
if complete; then echo "$NODE/bin"; exit 0; fi

command -v go >/dev/null || { log "Go is required (https://go.dev/dl)"; exit 1; }
export GOFLAGS="-buildvcs=false -mod=mod"
export CGO_ENABLED=0
total=$SECONDS

# Runs "$@" under an exclusive lock on $1/.lock unless every named binary already exists.
# Usage: built DIR BIN... -- COMMAND...
built() {
  local dir="$1"; shift
  local bins=()
  while [[ "$1" != "--" ]]; do bins+=("$1"); shift; done
  shift
  have() { for b in "${bins[@]}"; do [[ -x "$dir/bin/$b" ]] || return 1; done; }
  have && return 0
  mkdir -p "$dir/bin"
  (
    exec 9>"$dir/.lock"
    flock 9
    have && exit 0
    local t=$SECONDS
    "$@"
    log "${bins[*]} built in $((SECONDS - t)) s"
  )
}

# --- kubelet, kube-scheduler, kube-proxy: in build-kube.sh's module dir, under its lock -----
kube_node() {
  # build-kube.sh wrote this module (go.mod with the staging replaces); the caller holds its lock.
  cd "$KUBE_OUT/src/kube"
  local minor ldflags pkg cmd
  go get "k8s.io/kubernetes/cmd/kubelet@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kube-scheduler@$KUBE_VERSION" \
    "k8s.io/kubernetes/cmd/kube-proxy@$KUBE_VERSION" >&2
  minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kubelet kube-scheduler kube-proxy; do
    [[ -x "$KUBE_OUT/bin/$cmd" ]] && continue
    local t=$SECONDS
    go build -trimpath -ldflags "$ldflags" -o "$KUBE_OUT/bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$KUBE_OUT/bin/$cmd.tmp" "$KUBE_OUT/bin/$cmd"
    log "$cmd built in $((SECONDS - t)) s"
  done
}

# A module that requires $1@$2, for building commands of it with this directory's go.mod.
module_dir() {
  local dir="$1" module="$2" version="$3"
  mkdir -p "$dir"
  cd "$dir"
  printf 'module mongo-replicator.io/lab/build\n\ngo 1.26\n' > go.mod
  go get "$module@$version" >&2
}

containerd_build() {
  module_dir "$CONTAINERD_OUT/src" github.com/containerd/containerd/v2 "$CONTAINERD_VERSION"
  local pkg=github.com/containerd/containerd/v2
  local ldflags="-s -w -X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Package=$pkg"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    go build -trimpath -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ldflags" \
      -o "$CONTAINERD_OUT/bin/$cmd.tmp" "$pkg/cmd/$cmd"
    mv "$CONTAINERD_OUT/bin/$cmd.tmp" "$CONTAINERD_OUT/bin/$cmd"
  done
}

cni_build() {
  module_dir "$CNI_OUT/src" github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION"
  local pkg=github.com/containernetworking/plugins
  local ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION"
  for p in main/bridge ipam/host-local main/loopback meta/portmap; do
    go build -trimpath -ldflags "$ldflags" -o "$CNI_OUT/bin/${p#*/}.tmp" "$pkg/plugins/$p"
    mv "$CNI_OUT/bin/${p#*/}.tmp" "$CNI_OUT/bin/${p#*/}"
  done
}

# The webhook logs through monis.app/mlog, a host the module proxy here does not serve (403
# "module-host allowlist"). This stand-in has the part of its API the webhook calls, on logr's
# JSON logger; only log output differs, pod mutation is the webhook's own code.
mlog_shim() {
  mkdir -p "$1"
  printf 'module monis.app/mlog\n\ngo 1.26\n\nrequire github.com/go-logr/logr v1.4.3\n' > "$1/go.mod"
  cat > "$1/mlog.go" <<'GO'
// Package mlog is the lab's stand-in for monis.app/mlog: the calls the workload identity
// webhook makes, logging JSON lines to stderr through logr's funcr.
package mlog

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

type LogLevel string

const (
	LevelWarning LogLevel = "warning"
	LevelInfo    LogLevel = "info"
	LevelDebug   LogLevel = "debug"
	LevelTrace   LogLevel = "trace"
	LevelAll     LogLevel = "all"
)

type LogFormat string

const (
	FormatJSON LogFormat = "json"
	FormatCLI  LogFormat = "cli"
)

type LogSpec struct {
	Level  LogLevel
	Format LogFormat
}

var verbosity atomic.Int32

func levelV(l LogLevel) (int, error) {
	switch l {
	case "", LevelWarning, LevelInfo:
		return 0, nil
	case LevelDebug:
		return 4, nil
	case LevelTrace:
		return 6, nil
	case LevelAll:
		return 108, nil
	}
	return 0, fmt.Errorf("invalid log level %q", l)
}

func ValidateAndSetLogLevelAndFormatGlobally(_ context.Context, spec LogSpec) error {
	v, err := levelV(spec.Level)
	if err != nil {
		return err
	}
	verbosity.Store(int32(v))
	return nil
}

func Enabled(l LogLevel) bool {
	v, err := levelV(l)
	return err == nil && v <= int(verbosity.Load())
}

func Logr() logr.Logger {
	return funcr.NewJSON(func(obj string) { fmt.Fprintln(os.Stderr, obj) }, funcr.Options{
		Verbosity: int(verbosity.Load()),
	})
}

func Setup() func() { return func() {} }

func Fatal(err error) {
	Logr().Error(err, "fatal")
	os.Exit(1)
}

type Logger interface {
	Error(msg string, err error, keysAndValues ...any)
	Warning(msg string, keysAndValues ...any)
	Info(msg string, keysAndValues ...any)
	Debug(msg string, keysAndValues ...any)
	Trace(msg string, keysAndValues ...any)
	WithValues(keysAndValues ...any) Logger
	WithName(name string) Logger
}

type logger struct {
	names  []string
	values []any
}

func New() Logger { return logger{} }

func (l logger) sink() logr.Logger {
	out := Logr().WithValues(l.values...)
	for _, n := range l.names {
		out = out.WithName(n)
	}
	return out
}

func (l logger) Error(msg string, err error, kv ...any) { l.sink().Error(err, msg, kv...) }
func (l logger) Warning(msg string, kv ...any)          { l.sink().Info(msg, append(kv, "warning", true)...) }
func (l logger) Info(msg string, kv ...any)             { l.sink().Info(msg, kv...) }
func (l logger) Debug(msg string, kv ...any)            { l.sink().V(4).Info(msg, kv...) }
func (l logger) Trace(msg string, kv ...any)            { l.sink().V(6).Info(msg, kv...) }
func (l logger) WithValues(kv ...any) Logger {
	return logger{names: l.names, values: append(append([]any{}, l.values...), kv...)}
}
func (l logger) WithName(n string) Logger {
	return logger{names: append(append([]string{}, l.names...), n), values: l.values}
}
GO
}

webhook_build() {
  # The checksum database has no entry for this module, and the proxy serves explicit versions only.
  export GONOSUMDB=github.com/Azure/azure-workload-identity,monis.app/mlog
  mlog_shim "$WI_OUT/src/mlog"
  mkdir -p "$WI_OUT/src"
  cd "$WI_OUT/src"
  printf 'module mongo-replicator.io/lab/build\n\ngo 1.26\n\nreplace monis.app/mlog => ./mlog\n' > go.mod
  go get "github.com/Azure/azure-workload-identity@$WORKLOAD_IDENTITY_VERSION" >&2
  local pkg=github.com/Azure/azure-workload-identity
  go build -trimpath -ldflags "-s -w -X $pkg/pkg/version.BuildVersion=$WORKLOAD_IDENTITY_VERSION" \
    -o "$WI_OUT/bin/azure-wi-webhook.tmp" "$pkg/cmd/webhook"
  mv "$WI_OUT/bin/azure-wi-webhook.tmp" "$WI_OUT/bin/azure-wi-webhook"
}

pause_build() {
  mkdir -p "$PAUSE_OUT/src"
  cd "$PAUSE_OUT/src"
  printf 'module mongo-replicator.io/lab/pause\n\ngo 1.26\n' > go.mod
  cat > main.go <<'GO'
// Command pause holds a pod sandbox's namespaces: it sleeps until SIGINT or SIGTERM and reaps
// any child that the pod's shared PID namespace hands to it.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  go build -trimpath -ldflags "-s -w" -o "$PAUSE_OUT/bin/pause.tmp" .
  mv "$PAUSE_OUT/bin/pause.tmp" "$PAUSE_OUT/bin/pause"
}

built "$PAUSE_OUT" pause -- pause_build
built "$CNI_OUT" bridge host-local loopback portmap -- cni_build
built "$WI_OUT" azure-wi-webhook -- webhook_build
built "$CONTAINERD_OUT" containerd containerd-shim-runc-v2 ctr -- containerd_build
have_kube() { for b in kubelet kube-scheduler kube-proxy; do [[ -x "$KUBE_OUT/bin/$b" ]] || return 1; done; }
if ! have_kube; then
  mkdir -p "$KUBE_OUT"
  (
    # build-kube.sh takes the same lock; run it first so this lock is free for it.
    bash "$here/build-kube.sh" >/dev/null
    exec 9>"$KUBE_OUT/.lock"
    flock 9
    have_kube || kube_node
  )
fi

mkdir -p "$NODE/bin"
for b in "${!WHERE[@]}"; do ln -sfn "${WHERE[$b]}/$b" "$NODE/bin/$b"; done
log "node parts ready in $((SECONDS - total)) s"
echo "$NODE/bin"
