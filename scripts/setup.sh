#!/usr/bin/env bash
# Creates .venv and installs entropic with its CLI and dev tools.
# On CPU-only machines the constraints file pins the CPU build of torch, so no CUDA wheels are downloaded.
# GPU users: `pip install -e ".[cli]"` without the constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[cli,dev]"
