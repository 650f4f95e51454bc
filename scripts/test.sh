#!/usr/bin/env bash
# The test command: unit tests, then integration tests that run the real binaries against the
# real grpcurl, openssl, apt/dpkg and dnf/rpm sandboxes, network namespaces and systemd-nspawn.
# Installs the tools it needs first when any is missing (scripts/install-test-deps.sh, the same
# list CI uses), so on a fresh Debian/Ubuntu machine this one command is enough. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# The integration tests run the workspace's real binaries, which belong to other crates than the
# tests: build them first, so no test ever runs a stale binary.
cargo build --locked --bins
exec cargo test --locked "$@"
