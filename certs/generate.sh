#!/usr/bin/env bash
# Generates a self-signed development certificate for localhost in this folder. For local TLS
# experiments only: never use these files in production. (The tests generate their own in-process.)
set -euo pipefail
cd "$(dirname "$0")"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout dev-key.pem -out dev-cert.pem
echo "wrote certs/dev-cert.pem and certs/dev-key.pem"
