#!/usr/bin/env bash
# Runs the distributed-backend tests against real services (nats-server
# with JetStream, single-node Garage), installing them first when missing.
# Each test starts its own server on free loopback ports with a temporary
# store, so nothing needs to be running beforehand.
#
#   scripts/test-services.sh            # both backends
#   scripts/test-services.sh nats       # JetStream queue + progress only
#   scripts/test-services.sh s3         # S3 store + inputs only
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
case "$what" in
  nats) eval "$(SKIP_GARAGE=1 scripts/install-services.sh)" ;;
  s3) eval "$(SKIP_NATS=1 scripts/install-services.sh)" ;;
  all) eval "$(scripts/install-services.sh)" ;;
  *) echo "usage: $0 [all|nats|s3]" >&2; exit 2 ;;
esac
if [[ "$what" != s3 ]]; then cargo test -p quire-queue --features nats; fi
if [[ "$what" != nats ]]; then cargo test -p quire-store --features s3; fi
