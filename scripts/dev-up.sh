#!/usr/bin/env bash
# One command for a newcomer: build, make a dev PKI, start an agent on localhost, show its status.
#
#   scripts/dev-up.sh            # build, start (or restart), print status
#   scripts/dev-up.sh stop       # stop the dev agent
#
# Everything lives in target/dev/: pki/, agent.toml, state/, agent.sock, agent.log, agent.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DEV="$PWD/target/dev"
PORT="${PATCH_AGENT_DEV_PORT:-7443}"

stop() {
    if [ -f "$DEV/agent.pid" ] && kill -0 "$(cat "$DEV/agent.pid")" 2>/dev/null; then
        kill -TERM "$(cat "$DEV/agent.pid")"
        for _ in $(seq 50); do kill -0 "$(cat "$DEV/agent.pid")" 2>/dev/null || break; sleep 0.1; done
        echo "stopped the dev agent"
    fi
    rm -f "$DEV/agent.pid"
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi

echo "== building (release)"
cargo build --release --locked --bins
BIN="$PWD/target/release"

mkdir -p "$DEV"
if [ ! -f "$DEV/pki/ca.pem" ]; then
    "$BIN/patchctl" pki init "$DEV/pki" >/dev/null
    echo "== dev PKI in $DEV/pki (CA, agent, controller, viewer)"
fi
cat > "$DEV/agent.toml" <<TOML
[agent]
state_dir = "$DEV/state"
[server]
listen = "127.0.0.1:$PORT"
local_socket = "$DEV/agent.sock"
[tls]
ca = "$DEV/pki/ca.pem"
cert = "$DEV/pki/agent.pem"
key = "$DEV/pki/agent.key"
[auth]
controllers = ["controller"]
viewers = ["viewer"]
TOML
"$BIN/patch-agent" check-config --config "$DEV/agent.toml"

stop
"$BIN/patch-agent" run --config "$DEV/agent.toml" >"$DEV/agent.log" 2>&1 &
echo $! >"$DEV/agent.pid"
export PATCHCTL_CA="$DEV/pki/ca.pem" PATCHCTL_CERT="$DEV/pki/controller.pem" PATCHCTL_KEY="$DEV/pki/controller.key"
for _ in $(seq 100); do
    if "$BIN/patchctl" status --agent "127.0.0.1:$PORT" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$(cat "$DEV/agent.pid")" 2>/dev/null; then cat "$DEV/agent.log"; exit 1; fi
    sleep 0.1
done
echo "== agent running (pid $(cat "$DEV/agent.pid"), log $DEV/agent.log); waiting for its first package scan"
for _ in $(seq 240); do
    if ! "$BIN/patchctl" status --agent "127.0.0.1:$PORT" --json | grep -q '"last_scan_at": "-"'; then break; fi
    sleep 0.5
done
"$BIN/patchctl" status --agent "127.0.0.1:$PORT"
cat <<HELP

Try:
  export PATCHCTL_CA=$PATCHCTL_CA PATCHCTL_CERT=$PATCHCTL_CERT PATCHCTL_KEY=$PATCHCTL_KEY
  $BIN/patchctl status --agent 127.0.0.1:$PORT --json
  $BIN/patchctl status --agent unix:$DEV/agent.sock
  grpcurl -cacert $DEV/pki/ca.pem -cert $DEV/pki/viewer.pem -key $DEV/pki/viewer.key 127.0.0.1:$PORT list
  grpcurl -plaintext -unix $DEV/agent.sock patchagent.v1.Agent/GetStatus
  scripts/dev-up.sh stop
HELP
