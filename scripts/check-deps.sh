#!/usr/bin/env bash
# The daemon's crate (agent/daemon, package `patch-agent`) links only what the daemon runs: no
# SQLite or PostgreSQL client (the controller's store), no certificate generation (patchctl pki), no anyhow (the
# CLI's error edge). hyper-util must not be one of its own dependencies either; it still
# arrives inside tonic's HTTP/2 transport, which is why only the direct list is checked for it.
# Proc-macro crates are left out: they run in the compiler and are never linked (prost-derive
# uses anyhow).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree --locked -e normal,no-proc-macro -p patch-agent --prefix none)
direct=$(cargo tree --locked -e normal,no-proc-macro -p patch-agent --prefix none --depth 1)
bad=0
for crate in rusqlite postgres tokio-postgres rcgen anyhow; do
    if grep -q "^$crate v" <<<"$tree"; then
        echo "check-deps: the daemon depends on $crate:" >&2
        cargo tree --locked -e normal,no-proc-macro -p patch-agent -i "$crate" >&2
        bad=1
    fi
done
if grep -q "^hyper-util v" <<<"$direct"; then
    echo "check-deps: hyper-util is a direct dependency of the daemon's crate" >&2
    bad=1
fi
[ "$bad" = 0 ] && echo "check-deps: the daemon's crate links none of rusqlite, postgres, rcgen, anyhow; hyper-util only through tonic"
exit "$bad"
