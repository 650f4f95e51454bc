#!/usr/bin/env bash
# The test command: unit tests, then integration tests that run the real binaries against the
# real grpcurl, openssl and (later) apt/dnf sandboxes. Needs root for some tests (setpriv,
# sandboxes); scripts/install-grpcurl.sh provides grpcurl.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --locked "$@"
