#!/usr/bin/env bash
# CA + server certificate (SAN: 127.0.0.1, ::1, localhost) for SuperLink (and optionally SuperNode Runtime API)
set -euo pipefail
D=${1:-certs}; mkdir -p "$D"; cd "$D"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
  -subj "/CN=flwr-lab-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
cat > server.ext <<'X'
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
X
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
  -extfile server.ext -out server.pem 2>/dev/null
openssl verify -CAfile ca.crt server.pem
