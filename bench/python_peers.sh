#!/usr/bin/env bash
# The side-by-side of results/python.md: needle's Python API against implicit, LightFM and
# torch-rechub from PyPI on MovieLens-1M. Creates bench/.venv-peers (needle built from this checkout, the peers,
# pandas, scipy) and prints the table. Usage: bash bench/python_peers.sh DATA_DIR [TASK ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${1:?usage: bash bench/python_peers.sh DATA_DIR [TASK ...]}"
shift
VENV=bench/.venv-peers
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check numpy pandas pyarrow scipy implicit setuptools wheel torch torch-rechub
# LightFM 1.17's setup.py fails in an isolated build environment; it builds against this one.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation lightfm
"$VENV/bin/pip" install -q --disable-pip-version-check ./crates/needle-py
"$VENV/bin/python" bench/python_peers.py "$DATA_DIR" "$@"
