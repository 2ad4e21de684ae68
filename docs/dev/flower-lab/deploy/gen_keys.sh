#!/usr/bin/env bash
# ECDSA (NIST P-384) SuperNode keys in OpenSSH format: <name> (private), <name>.pub (public)
set -euo pipefail
D=${1:-keys}; shift || true; mkdir -p "$D"
for n in "${@:-supernode0 supernode1 rogue}"; do
  for name in $n; do rm -f "$D/$name" "$D/$name.pub"; ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$D/$name"; done
done
ls -l "$D"
