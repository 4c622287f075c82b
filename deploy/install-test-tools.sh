#!/bin/sh
# What the tests need beyond PyPI, from Debian: prometheus (promtool and the server) for
# tests/test_monitoring.py; stunnel4 and the openssl CLI for tests/test_tls.py (a TLS terminator in front
# of the embedded broker, which serves no TLS itself, and the test's own CA and certificates). Does
# nothing when all are installed; otherwise apt-get (as root, or sudo) installs the missing packages.
set -eu
missing=""
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing="$missing prometheus"
command -v stunnel4 >/dev/null || missing="$missing stunnel4"
command -v openssl >/dev/null || missing="$missing openssl"
if [ -z "$missing" ]; then
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -q
# shellcheck disable=SC2086 # one word per package
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
