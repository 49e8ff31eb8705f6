#!/usr/bin/env bash
# Installs the Python readers the dataset tests read quire's outputs back with:
# pyarrow (Parquet) and webdataset (caption shards), in a virtual environment.
#
#   scripts/setup-python-readers.sh [VENV_DIR]
#
# Default VENV_DIR: ${QUIRE_TOOLS:-~/.cache/quire-tools}/py-readers. Versions are pinned
# below; the venv is rebuilt when they change. Idempotent: a venv that already holds the
# pinned versions is left alone. Prints the path of the venv's python (what the Rust tests
# take from QUIRE_PYTHON).
set -euo pipefail

PYARROW_VERSION=26.0.1
WEBDATASET_VERSION=1.0.2

tools="${QUIRE_TOOLS:-$HOME/.cache/quire-tools}"
venv="${1:-$tools/py-readers}"
stamp="$venv/.quire-pins"
want="pyarrow==$PYARROW_VERSION webdataset==$WEBDATASET_VERSION"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/python"
  exit 0
fi

python="$(command -v python3 || true)"
if [ -z "$python" ]; then
  echo "setup-python-readers: python3 is missing (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! "$python" -m venv "$venv" >&2; then
  # Debian splits venv (ensurepip) out of python3.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    rm -rf "$venv"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    "$python" -m venv "$venv" >&2
  else
    echo "setup-python-readers: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $want >&2
"$venv/bin/python" -c 'import pyarrow.parquet, webdataset' >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
