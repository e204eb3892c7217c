#!/bin/sh
# Installs what `make test-netns` and benchmarks/network_table.py need beyond the Python
# environment: `iproute2` (`ip netns`, veth, `tc tbf`), `iptables` (the NAT router's
# MASQUERADE and filter rules, the REDIRECT into the benchmarks' delaying relay) and
# `coturn` (the TURN server). Debian packages,
# installed only when missing; needs root (the netns tests need it anyway). Without root it
# says so and exits 0, so that the tests themselves report the skip with its reason.
set -eu

missing=""
{ command -v ip && command -v tc; } >/dev/null 2>&1 || missing="$missing iproute2"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
command -v turnserver >/dev/null 2>&1 || missing="$missing coturn"

if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "setup-netns-deps: not root, cannot install:$missing (the netns tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-netns-deps: no apt-get here; install$missing by hand" >&2
    exit 1
fi
echo "setup-netns-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
apt-get install -y -qq --no-install-recommends $missing >/dev/null
# The package's own service stays off: the tests start turnserver in their namespace.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now coturn >/dev/null 2>&1 || true
fi
