#!/usr/bin/env bash
# Usage: wait_run.sh <run-id> <superlink-connection> [timeout_s]
# Polls `flwr ls --run-id` until status starts with "finished:", prints it,
# exits 0 for finished:completed, 1 for finished:failed/stopped, 2 on timeout.
RUN_ID=$1; CONN=$2; TIMEOUT=${3:-600}; END=$((SECONDS+TIMEOUT))
while (( SECONDS < END )); do
  ST=$(flwr ls "$CONN" --run-id "$RUN_ID" --format json 2>/dev/null | python3 -c '
import json,sys
try:
    d=json.load(sys.stdin); r=d["runs"][0]; print(r["status"]+"|"+r["status-details"])
except Exception as e: print("unknown|"+repr(e))')
  case "$ST" in
    finished:completed*) echo "$ST"; exit 0;;
    finished:*) echo "$ST"; exit 1;;
  esac
  sleep 2
done
echo "timeout: last status $ST"; exit 2
