#!/bin/sh
# What the tests need beyond PyPI: Debian's prometheus package (promtool and the server), for
# tests/test_monitoring.py. Does nothing when both are installed; otherwise apt-get (as root, or sudo).
set -eu
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
