#!/usr/bin/env bash
# One command for a newcomer: build, make a dev PKI and a job-signing key, start a controller
# (patchctl serve) and an agent reporting to it on localhost, show the agent's status.
#
#   scripts/dev-up.sh            # build, start (or restart), print status
#   scripts/dev-up.sh stop       # stop the dev agent and controller
#
# Everything lives in target/dev/: pki/, keys/, trusted-keys/, agent.toml, state/, agent.sock,
# agent.log, agent.pid, controller.db, controller.log, controller.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DEV="$PWD/target/dev"
PORT="${PATCH_AGENT_DEV_PORT:-7443}"
CTL_PORT="${PATCH_AGENT_DEV_CONTROLLER_PORT:-7000}"
WEB_PORT="${PATCH_AGENT_DEV_DASHBOARD_PORT:-8080}"
METRICS_PORT="${PATCH_AGENT_DEV_METRICS_PORT:-9591}"

stop() {
    for what in agent controller; do
        if [ -f "$DEV/$what.pid" ] && kill -0 "$(cat "$DEV/$what.pid")" 2>/dev/null; then
            kill -TERM "$(cat "$DEV/$what.pid")"
            for _ in $(seq 50); do kill -0 "$(cat "$DEV/$what.pid")" 2>/dev/null || break; sleep 0.1; done
            echo "stopped the dev $what"
        fi
        rm -f "$DEV/$what.pid"
    done
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
if [ ! -f "$DEV/pki/controller-server.pem" ]; then
    "$BIN/patchctl" pki issue "$DEV/pki" --name controller.dev --san 127.0.0.1 --usage server \
        -o "$DEV/pki/controller-server" >/dev/null
fi
if [ ! -f "$DEV/keys/signing.key" ]; then
    "$BIN/patchctl" keys new "$DEV/keys" >/dev/null
    echo "== job-signing key in $DEV/keys (public half trusted by the agent)"
fi
mkdir -p "$DEV/trusted-keys"
cp "$DEV/keys/signing.pem" "$DEV/trusted-keys/"
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
[agent.labels]
environment = "dev"
[jobs]
trusted_keys_dir = "$DEV/trusted-keys"
[report]
controller = "127.0.0.1:$CTL_PORT"
server_name = "controller.dev"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
TOML
"$BIN/patch-agent" check-config --config "$DEV/agent.toml"

stop
"$BIN/patchctl" serve --listen "127.0.0.1:$CTL_PORT" --db "$DEV/controller.db" --ca "$DEV/pki/ca.pem" \
    --cert "$DEV/pki/controller-server.pem" --key "$DEV/pki/controller-server.key" \
    --http "127.0.0.1:$WEB_PORT" >"$DEV/controller.log" 2>&1 &
echo $! >"$DEV/controller.pid"
echo "== controller (patchctl serve) on 127.0.0.1:$CTL_PORT, database $DEV/controller.db, dashboard http://127.0.0.1:$WEB_PORT/"
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
    # Read the whole answer first: grep -q closing the pipe early would cut patchctl off.
    status=$("$BIN/patchctl" status --agent "127.0.0.1:$PORT" --json 2>/dev/null || true)
    if [ -n "$status" ] && ! grep -q '"last_scan_at": "-"' <<<"$status"; then break; fi
    sleep 0.5
done
"$BIN/patchctl" status --agent "127.0.0.1:$PORT"
HOST_ID=$("$BIN/patchctl" status --agent "127.0.0.1:$PORT" --json | sed -n 's/^ *"host_id": "\([^"]*\)".*/\1/p' | head -1)
cat <<HELP

Try:
  export PATCHCTL_CA=$PATCHCTL_CA PATCHCTL_CERT=$PATCHCTL_CERT PATCHCTL_KEY=$PATCHCTL_KEY
  $BIN/patchctl status --agent 127.0.0.1:$PORT --json
  $BIN/patchctl status --agent unix:$DEV/agent.sock
  grpcurl -cacert $DEV/pki/ca.pem -cert $DEV/pki/viewer.pem -key $DEV/pki/viewer.key 127.0.0.1:$PORT list
  grpcurl -plaintext -unix $DEV/agent.sock patchagent.v1.Agent/GetStatus
  $BIN/patchctl job sign --signing-key $DEV/keys/signing.key -o $DEV/scan.job --target $HOST_ID --scan --dry-run
  $BIN/patchctl submit --agent unix:$DEV/agent.sock $DEV/scan.job
  $BIN/patchctl history --db $DEV/controller.db
  $BIN/patchctl compliance --db $DEV/controller.db [--format csv|html]
  dashboard: http://127.0.0.1:$WEB_PORT/   metrics: http://127.0.0.1:$WEB_PORT/metrics (controller), http://127.0.0.1:$METRICS_PORT/metrics (agent)
  scripts/dev-up.sh stop
HELP
