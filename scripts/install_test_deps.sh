#!/usr/bin/env bash
# System packages the test suite drives for real (run by `make test`; CI runs as root).
#   prometheus, promtool: the observability tests scrape a live inferd and check alert rules.
# Each is installed only when missing; without root or apt, say so and go on (the tests that
# need a package then fail with a message naming it).
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_deps: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
  exit 0
fi
echo "install_test_deps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
  || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
