#!/usr/bin/env bash
# Runs COMMAND in a new network namespace with only loopback (up): the lab's node puts its
# bridge, iptables chains and pod addresses there, never on the host. Processes inside cannot
# reach the network (build first). MREP_HOST_NET_PID names this script's process, still in the
# host's namespace, for tests that check the host is left as it was.
set -euo pipefail
(($#)) || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
export MREP_HOST_NET_PID=$$
unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh "$@"
