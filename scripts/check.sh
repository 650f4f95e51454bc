#!/usr/bin/env bash
# Pre-commit check: formatting and lints, as CI runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
scripts/check-deps.sh
