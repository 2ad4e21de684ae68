#!/usr/bin/env bash
# End-to-end local deployment of the toy app on 127.0.0.1 with Flower 1.41.
#   ./e2e.sh insecure      SuperLink + 2 SuperNodes, no TLS, no auth
#   ./e2e.sh tls           TLS + SuperNode authentication (+ an unregistered node that must be refused)
# Extra args after the mode are passed to `flwr run` (e.g. --run-config "num-rounds=3").
# Exit code: 0 if the run finished:completed (and, in tls mode, the rogue node was refused), else 1.
set -uo pipefail
MODE=${1:-insecure}; shift || true
HERE=$(cd "$(dirname "$0")" && pwd)
APP=${APP:-/tmp/flwr-lab/toyapp}
VENV=${VENV:-/tmp/flwr-venv}
WORK=${WORK:-/tmp/flwr-lab/e2e-$MODE}
PORT=${PORT:-9400}            # SuperLink: ONE port for Fleet + Control + ServerAppIo/Runtime (HTTP API)
NPORT0=${NPORT0:-9410}        # SuperNode i Runtime API port = NPORT0 + i (must differ per SuperNode)

export PATH=$VENV/bin:$PATH
export FLWR_HOME=$WORK/flwr-home                       # CLI config + installed FABs live here
export FLWR_TELEMETRY_ENABLED=0                        # no telemetry
export FLWR_DISABLE_UPDATE_CHECK=1                     # no update-check HTTP call
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # SuperLink: no `uv sync` of app deps

rm -rf "$WORK"; mkdir -p "$WORK/logs" "$FLWR_HOME"
PIDS=()
t() { date +%s.%N; }
el() { python3 -c "print(f'{$(t) - $1:.2f}')"; }
cleanup() {
  # SuperNodes first, then SuperLink (SIGTERM, then SIGKILL after 15 s)
  local p
  for ((k=${#PIDS[@]}-1; k>=0; k--)); do p=${PIDS[k]}; kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && { echo "SIGKILL $p"; kill -KILL "$p"; }
  done
  PIDS=()
}
trap cleanup EXIT

T0=$(t)
if [[ $MODE == tls ]]; then
  "$HERE/gen_certs.sh" "$WORK/certs" >/dev/null
  "$HERE/gen_keys.sh" "$WORK/keys" supernode0 supernode1 rogue >/dev/null
  C=$WORK/certs
  LINK_FLAGS=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key" --enable-supernode-auth)
  NODE_TLS=(--root-certificates "$C/ca.crt")
  cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "e2e"

[superlink.e2e]
address = "127.0.0.1:$PORT"
root-certificates = "$C/ca.crt"
EOF
else
  LINK_FLAGS=(--insecure)
  NODE_TLS=(--insecure)
  cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "e2e"

[superlink.e2e]
address = "127.0.0.1:$PORT"
insecure = true
EOF
fi

flower-superlink "${LINK_FLAGS[@]}" --host 127.0.0.1 --port "$PORT" > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
# wait until the Control API answers
for _ in $(seq 120); do flwr ls e2e --format json >/dev/null 2>&1 && break; sleep 0.5; done
echo "superlink up: $(el "$T0")s"

if [[ $MODE == tls ]]; then
  for i in 0 1; do flwr supernode register "$WORK/keys/supernode$i.pub" e2e --format json > "$WORK/logs/register$i.json" || exit 1; done
  echo "registered: $(el "$T0")s ($(cat "$WORK"/logs/register*.json | tr -d '\n '))"
fi

for i in 0 1; do
  AUTH=(); [[ $MODE == tls ]] && AUTH=(--auth-supernode-private-key "$WORK/keys/supernode$i")
  flower-supernode "${NODE_TLS[@]}" "${AUTH[@]}" --superlink "127.0.0.1:$PORT" \
    --port $((NPORT0 + i)) --node-config "partition-id=$i num-partitions=2" \
    > "$WORK/logs/supernode$i.log" 2>&1 &
  PIDS+=($!)
done

ROGUE_OK=1
if [[ $MODE == tls ]]; then
  TR=$(t)
  timeout 60 flower-supernode "${NODE_TLS[@]}" --auth-supernode-private-key "$WORK/keys/rogue" \
    --superlink "127.0.0.1:$PORT" --port $((NPORT0 + 9)) --node-config "partition-id=9 num-partitions=2" \
    > "$WORK/logs/rogue.log" 2>&1
  RC=$?
  echo "rogue supernode exited rc=$RC after $(el "$TR")s: $(grep -o '\[code: [0-9]*\][^.]*' "$WORK/logs/rogue.log" | head -1)"
  [[ $RC -ne 0 ]] && grep -q "code: 2004" "$WORK/logs/rogue.log" || ROGUE_OK=0
fi

# wait for both SuperNodes online (the ServerApp also waits for expect-nodes itself)
for _ in $(seq 120); do
  N=$(flwr supernode list e2e --format json 2>/dev/null | python3 -c 'import json,sys; print(sum(n["status"]=="online" for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null)
  [[ "$N" == 2 ]] && break; sleep 0.5
done
echo "2 supernodes online: $(el "$T0")s"

TR=$(t)
RID=$(cd "$APP" && flwr run . e2e --format json "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["run-id"])')
echo "run $RID submitted"
ST=$("$(dirname "$HERE")/wait_run.sh" "$RID" e2e 600); WRC=$?
echo "run status: $ST  (submit->finished $(el "$TR")s, total $(el "$T0")s)"
flwr log "$RID" e2e --show > "$WORK/logs/run.log" 2>&1
grep -E "TOYAPP_RESULT|replies in|ERROR code" "$WORK/logs/run.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
flwr ls e2e --run-id "$RID" --format json > "$WORK/logs/run.json"

TS=$(t); cleanup; echo "shutdown: $(el "$TS")s"
# the SuperExec children watch --parent-pid and exit on their own within a few seconds
for _ in $(seq 50); do pgrep -f "runtime-api-address 127.0.0.1:($PORT|$NPORT0|$((NPORT0+1))|$((NPORT0+9)))" >/dev/null || break; sleep 0.2; done
LEFT=$(pgrep -f "runtime-api-address 127.0.0.1:($PORT|$NPORT0|$((NPORT0+1))|$((NPORT0+9)))" || true)
[[ -n $LEFT ]] && echo "WARNING leftover processes: $LEFT"
[[ $WRC -eq 0 && $ROGUE_OK -eq 1 ]] && { echo "E2E $MODE OK"; exit 0; }
echo "E2E $MODE FAILED (wait rc=$WRC rogue_ok=$ROGUE_OK)"; exit 1
